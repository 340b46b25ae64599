"""``dynfuse export`` and the store reader: model.json, hashes, versions, parity, no torch when serving."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import quiet

from export.backends import create_backend
from export.pipeline import DynamicPipeline, PipelineInput
from export.store import IntegrityError, ModelNotFoundError, list_store, load_model, sha256_file
from export.writer import export_run


def test_model_json_lists_everything_serving_needs(tiny_export):
    manifest = json.loads((tiny_export / "shapes" / "1" / "model.json").read_text())

    assert manifest["labels"]
    assert manifest["preprocessing"]["image_size"] == 32
    # The distilled attribution heads of the experts whose exact values cost over 2% of the full path: mi2p's
    # two reruns alone cost more than the full path (export/attribution.py).
    heads = {f"attribution.{e}" for e, entry in manifest["attribution"]["experts"].items() if entry["method"] == "head"}
    assert "attribution.mi2p" in heads
    assert set(manifest["components"]) == {
        "text_encoder", "image_glimpse", "image_trunk", "image_encoder", "text_head", "image_lite", "image_head",
        "fusion_head", "mulmix", "mi2p", "muse", "router.lambda_0", "router.lambda_0.3", *heads,
    }  # fmt: skip
    for name, component in manifest["components"].items():
        assert component["madds"] > 0, name
        assert component["inputs"][0]["shape"][0] == -1  # dynamic batch axis
        for entry in component["files"].values():
            assert sha256_file(tiny_export / "shapes" / "1" / entry["file"]) == entry["sha256"]
    assert {e["name"]: e["modalities"] for e in manifest["experts"]} == {
        "text": ["text"], "image_lite": ["image"], "image": ["image"], "late_fusion": ["text", "image"],
        "mulmix": ["text", "image"], "mi2p": ["text", "image"], "muse": ["text", "image"],
    }  # fmt: skip
    full = manifest["full_expert"]  # the most accurate expert on validation; madds_full is it as a static model
    assert manifest["madds_full"] == next(e["static_madds"] for e in manifest["experts"] if e["name"] == full)
    assert manifest["router"]["component"] in manifest["components"]
    parity = manifest["parity"]
    assert max(v for formats in parity["components"].values() for v in formats.values()) <= parity["tolerance"]
    assert parity["pipeline"]["label_agreement"] >= 0.999
    assert parity["pipeline"]["expert_agreement"] >= 0.999
    assert manifest["evaluation"]["summary"]["full_accuracy"] > 0


def test_run_and_model_directories_get_the_usual_mode_not_0700(tiny_run, tiny_export):
    # A store built as root must stay readable to a container's non-root user.
    umask = os.umask(0)
    os.umask(umask)
    for directory in (tiny_run, tiny_export / "shapes" / "1"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o777 & ~umask, directory


def test_a_changed_byte_is_refused_naming_the_file(store_copy):
    target = store_copy / "shapes" / "1" / "fusion_head.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))

    with pytest.raises(IntegrityError, match=r"fusion_head\.onnx: sha256 .* does not match"):
        load_model(store_copy)


def test_a_missing_file_is_refused(store_copy):
    (store_copy / "shapes" / "1" / "tokenizer.json").unlink()
    with pytest.raises(IntegrityError, match="tokenizer.json: listed in model.json but missing"):
        load_model(store_copy)


def copy_version(store: Path, version: str) -> None:
    """Version 1 again as ``version``: a version is a directory whose model.json says which it is."""
    target = Path(shutil.copytree(store / "shapes" / "1", store / "shapes" / version))
    manifest = json.loads((target / "model.json").read_text())
    (target / "model.json").write_text(json.dumps(manifest | {"version": version}))


def test_the_highest_version_is_served_unless_one_is_pinned(tiny_run, store_copy):
    copy_version(store_copy, "2")
    copy_version(store_copy, "10")

    assert list_store(store_copy) == {"shapes": ["1", "2", "10"]}
    assert load_model(store_copy).version == "10"
    assert load_model(store_copy, "shapes", "2").version == "2"
    with pytest.raises(ModelNotFoundError, match="no version '7'"):
        load_model(store_copy, "shapes", "7")
    with pytest.raises(ModelNotFoundError, match="no model 'other'"):
        load_model(store_copy, "other")
    with pytest.raises(FileExistsError):
        export_run(tiny_run, store_copy, name="shapes", version="2", progress=False, log=quiet)


def test_importing_the_serving_path_does_not_import_torch():
    code = (
        "import sys, export.store, export.pipeline, export.backends, service.main;"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_onnx_and_torchscript_pipelines_agree(tiny_export, samples):
    import io

    from PIL import Image

    model = load_model(tiny_export)
    pipelines = [DynamicPipeline(model, create_backend(b)) for b in ("onnx", "torchscript")]
    inputs = [
        PipelineInput(
            token_ids=pipelines[0].prepare_text(s["text"]) if i % 3 else None,
            image=pipelines[0].prepare_image(Image.open(io.BytesIO(s["png"]))) if i % 4 else None,
        )
        for i, s in enumerate(samples[:40])
        if i % 3 or i % 4
    ]
    (onnx, _), (torchscript, _) = (p.predict(inputs) for p in pipelines)
    for a, b in zip(onnx, torchscript, strict=True):
        assert (a.label, a.expert, a.decided_by, a.madds) == (b.label, b.expert, b.decided_by, b.madds)
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5)
        np.testing.assert_allclose(a.importance, b.importance, atol=1e-5)


def test_the_pipeline_runs_each_expert_only_on_its_sub_batch(tiny_store, samples, monkeypatch):
    import io

    from PIL import Image

    pipeline = DynamicPipeline(load_model(tiny_store), create_backend("onnx"))
    calls = {}
    for name in ("text_encoder", "image_glimpse", "image_trunk", "image_encoder", "text_head", "mi2p", "image_head"):
        runner = pipeline.runner(name)

        def counting(inputs, name=name, runner=runner):
            calls[name] = calls.get(name, 0) + len(next(iter(inputs.values())))
            return runner(inputs)

        monkeypatch.setitem(pipeline._runners, name, counting)
    image = pipeline.prepare_image(Image.open(io.BytesIO(samples[0]["png"])))
    tokens = pipeline.prepare_text(samples[0]["text"])
    inputs = [
        PipelineInput(tokens, image, route="text"),
        PipelineInput(tokens, image, route="text"),
        PipelineInput(tokens, image, route="mi2p"),
        PipelineInput(None, image, route="image"),
        PipelineInput(tokens, None),  # the text expert: the only one that needs no image
    ]
    outputs, seconds = pipeline.predict(inputs)

    assert [o.expert for o in outputs] == ["text", "text", "mi2p", "image", "text"]
    assert calls == {
        "text_encoder": 4,  # every request with text
        "image_glimpse": 4,  # every request with an image
        "text_head": 3,
        "image_trunk": 2,  # shared by mi2p and image, run for their requests only
        "mi2p": 1,
        "image_encoder": 1,
        "image_head": 1,
    }
    assert set(seconds) == {"text", "mi2p", "image"}


def test_export_refuses_a_component_that_disagrees_with_eager(tiny_run, tmp_path, monkeypatch):
    from export import parity, writer

    monkeypatch.setattr(writer, "max_abs_difference", lambda *args: 0.5)
    store = tmp_path / "store"
    with pytest.raises(parity.ParityError, match="differs from eager PyTorch by 0.5"):
        export_run(tiny_run, store, name="shapes", progress=False, log=quiet)
    assert list_store(store) == {}
    assert not any(p.name.startswith(".") for p in (store / "shapes").iterdir())


def test_cli_export_and_evaluate_from_the_store(tiny_run, tiny_export, tiny_data, tmp_path):
    # tiny_export is `dynfuse export`'s own output (conftest.py runs the command line).
    cli = [sys.executable, "-m", "service.cli"]
    evaluated = subprocess.run(
        [*cli, "evaluate", "--store", str(tiny_export), "--model", "shapes", "--data", str(tiny_data), "--quiet",
         "--json", str(tmp_path / "e.json"), "--plot", str(tmp_path / "p.png")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads((tmp_path / "e.json").read_text())
    policies = {row["policy"]: row for row in report["policies"]}
    assert {"full", "cheap", "auto", "oracle"} <= set(policies)
    assert any(p.startswith("threshold=") for p in policies)
    for row in policies.values():
        assert set(row) >= {"policy", "accuracy", "madds_per_sample", "saved_ratio", "route_mix"}
        # A hard policy runs one expert per request; soft fusion runs every expert on every request.
        assert sum(row["route_mix"].values()) == pytest.approx(
            len(row["route_mix"]) if row["policy"] == "soft" else 1.0
        )
    # What the store serves reproduces the training-time figures.
    train_summary = json.loads((tiny_run / "summary.json").read_text())["evaluation"]["summary"]
    assert report["summary"]["auto_accuracy"] == pytest.approx(train_summary["auto_accuracy"], abs=1e-9)
    assert report["summary"]["auto_saved_ratio"] == pytest.approx(train_summary["auto_saved_ratio"], abs=1e-9)
    assert (tmp_path / "p.png").stat().st_size > 1000
    # The printed comparison reads the way a reader says it: the sign and the word follow auto - full.
    auto, full = policies["auto"]["accuracy"], policies["full"]["accuracy"]
    difference = round(100 * auto - 100 * full, 2)
    word = (
        "level with full"
        if difference == 0
        else f"{abs(difference):.2f} points {'above' if difference > 0 else 'below'} full"
    )
    assert f"auto is {word} ({auto:.2%} against {full:.2%})" in evaluated.stdout
    assert report["summary"]["auto_minus_full_points"] == pytest.approx(100 * (auto - full))


def test_cli_reports_user_errors_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "evaluate", "--store", str(tmp_path), "--data", str(tmp_path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.startswith("dynfuse evaluate: error: no model in store")
    assert "Traceback" not in result.stderr
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.slow
def test_a_torchscript_only_export_serves_with_the_torchscript_backend(tiny_run, tmp_path, samples):
    target = export_run(tiny_run, tmp_path / "store", name="ts", formats=("torchscript",), progress=False, log=quiet)

    manifest = json.loads((target / "model.json").read_text())
    assert {fmt for c in manifest["components"].values() for fmt in c["files"]} == {"torchscript"}
    assert not list(target.glob("*.onnx"))
    assert manifest["parity"]["pipeline"]["expert_agreement"] >= 0.999
    pipeline = DynamicPipeline(load_model(tmp_path / "store"), create_backend("torchscript"))
    [output], _ = pipeline.predict([PipelineInput(pipeline.prepare_text(samples[0]["text"]), None)])
    assert output.expert == "text"
