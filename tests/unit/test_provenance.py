"""export/provenance.py: what the digest of the training inputs sees, and what the store refuses at load."""

from __future__ import annotations

import copy
import json

import pytest

from export import provenance
from export.provenance import ProvenanceError, changed_inputs, check, source_digest, training_inputs

CODE = '''"""A module."""

import math


def area(radius):
    """The area."""
    return math.pi * radius**2  # pi r squared
'''


def test_comments_docstrings_and_layout_do_not_change_the_digest():
    reworded = CODE.replace('"""The area."""', '"""Area of a disc of that radius."""').replace("# pi r squared", "")
    reformatted = reworded.replace("math.pi * radius**2", "(math.pi\n            * radius ** 2)")
    assert source_digest(reworded) == source_digest(CODE)
    assert source_digest(reformatted) == source_digest(CODE)
    assert source_digest(CODE.replace('"""A module."""\n', "")) == source_digest(CODE)


@pytest.mark.parametrize(
    "edit",
    [
        ("radius**2", "radius**3"),  # arithmetic
        ("math.pi", "3.14"),  # a constant
        ("def area(radius)", "def area(radius, scale=1)"),  # a signature
        ('"""The area."""\n    return', '"""The area."""\n    radius = abs(radius)\n    return'),  # a statement
    ],
)
def test_any_change_of_what_the_code_does_changes_the_digest(edit):
    assert source_digest(CODE.replace(*edit)) != source_digest(CODE)


def test_a_string_statement_after_the_first_is_code_not_a_docstring():
    assert source_digest(CODE.replace("    return", '    "marker"\n    return')) != source_digest(CODE)


def test_the_digest_covers_the_training_code_the_generator_and_export_but_not_users_experts():
    files = provenance.training_input_files()
    for expected in (
        "models/training.py",
        "models/router.py",
        "models/data/synthetic/scenes.py",
        "models/experts/mi2p.py",
        "export/writer.py",
        "export/safety.py",
        "export/default_model.py",
    ):
        assert expected in files
    assert not any(f.startswith("models/byo/") for f in files)
    assert not any(f.startswith("service/") for f in files)


def test_a_changed_file_or_build_is_named(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "a.py").write_text("x = 1\n")
    (tmp_path / "models" / "b.py").write_text("y = 2\n")
    before = training_inputs({"seed": 0}, tmp_path)
    (tmp_path / "models" / "a.py").write_text("x = 2\n")
    (tmp_path / "models" / "c.py").write_text("z = 3\n")
    after = training_inputs({"seed": 1}, tmp_path)
    assert after["digest"] != before["digest"]
    assert changed_inputs(before, after) == [
        "build configuration {'seed': 0} -> {'seed': 1}",
        "models/c.py (new)",
        "models/a.py (changed)",
    ]
    assert changed_inputs(before, training_inputs({"seed": 0}, tmp_path))[0] == "models/c.py (new)"


def valid() -> dict:
    return {
        "commit": "0123456789abcdef0123456789abcdef01234567",
        "dirty": False,
        "command": "dynfuse build-default --store build/ship-store --formats onnx",
        "data": {"seed": 0, "size": 8000},
        "training_inputs": training_inputs({"seed": 0}),
    }


def test_a_valid_provenance_passes():
    check(valid())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p.update(commit="abc"), "40-digit git commit"),
        (lambda p: p.update(command=""), "name the command"),
        (lambda p: p["data"].update(seed="0"), "seed must be an integer"),
        (lambda p: p.pop("training_inputs"), "training_inputs is missing"),
        (lambda p: p["training_inputs"].update(digest="nope"), "must be a sha256"),
        (lambda p: p["training_inputs"]["files"].update({"models/x.py": "0" * 64}), "edited"),
        (lambda p: p["training_inputs"].update(files={}), "must list the files"),
    ],
)
def test_a_malformed_provenance_is_refused_with_what_is_wrong(edit, message):
    broken = copy.deepcopy(valid())
    edit(broken)
    with pytest.raises(ProvenanceError, match=message):
        check(broken)


def test_the_store_refuses_a_model_whose_provenance_was_edited(store_copy):
    from export.store import StoreError, load_model

    manifest_path = next(store_copy.glob("shapes/*/model.json"))
    manifest = json.loads(manifest_path.read_text())
    manifest["provenance"] = valid()
    manifest_path.write_text(json.dumps(manifest))
    assert load_model(store_copy).manifest["provenance"]["data"]["seed"] == 0

    manifest["provenance"]["training_inputs"]["build"] = {"seed": 1}
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="model.json: provenance.training_inputs.digest is not the digest"):
        load_model(store_copy)


def test_a_backend_refuses_a_version_without_its_format_and_says_what_to_do(store_copy):
    from export.backends import BackendError, create_backend
    from export.store import load_model

    model = load_model(store_copy)
    component = next(iter(model.components.values()))
    onnx_only = type(component)(**{**component.__dict__, "files": {"onnx": component.files["onnx"]}})
    with pytest.raises(BackendError, match="has no torchscript file .*exported with onnx only.*backend=onnx"):
        create_backend("torchscript").load(onnx_only)
