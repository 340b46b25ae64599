"""``dynfuse export``: a training run directory -> a verified model version in the store.

Every component is exported on its own to ONNX and TorchScript and checked against eager PyTorch
on fresh random inputs and on real samples; then the whole ONNX pipeline is run on a labelled
split and its labels and expert choices are compared with eager PyTorch's. Only when all of that
passes does the version directory appear (written aside, then renamed), with ``model.json`` listing
every file's sha256.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from export import byo
from export.backends import create_backend
from export.examples import write_examples
from export.onnx import OnnxComponent, export_onnx
from export.parity import TOLERANCE, ParityError, check_parity, max_abs_difference
from export.pipeline import DynamicPipeline, PipelineInput
from export.safety import measure_safety
from export.store import FORMATS, MANIFEST, MODEL_FORMAT, list_store, load_model_dir, sha256_file
from export.torchscript import TorchScriptComponent, export_torchscript
from models.attribution_training import rebuild_heads
from models.byo.model import ROUTER_ONLY, RouterOnlyModel, rebuild_router_only
from models.data.manifest import has_split, read_split
from models.data.tensors import TensorSplit, load_pixels, tensorize
from models.encoders import thumbnail
from models.preprocess import ImagePreprocessing
from models.staging import staging_dir
from models.tokenizer import Tokenizer
from models.training import load_run, rebuild_model, rebuild_routers

TOKENIZER_FILE = "tokenizer.json"
MIN_PIPELINE_AGREEMENT = 0.999
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def next_version(store: Path, name: str) -> str:
    versions = [int(v) for v in list_store(store).get(name, []) if v.isdigit()]
    return str(max(versions, default=0) + 1)


def export_run(
    run_dir: Path,
    store: Path,
    *,
    name: str | None = None,
    version: str | None = None,
    data_dir: Path | None = None,
    formats: tuple[str, ...] = FORMATS,
    provenance: dict | None = None,
    progress: bool = True,
    log=print,
) -> Path:
    """Export a run into ``store/<name>/<version>`` and return that directory.

    ``formats`` may leave one out, e.g. TorchScript only on a GPU machine without onnxscript. ``provenance``
    (export/provenance.py) goes into model.json as it is: how the default model was built."""
    run_dir, store = Path(run_dir), Path(store)
    unknown = set(formats) - set(FORMATS)
    if not formats or unknown:
        raise ValueError(f"formats must be a non-empty subset of {FORMATS}, got {formats}")
    checkpoint = load_run(run_dir)
    name = name or run_dir.resolve().name
    if not _NAME.match(name):
        raise ValueError(f"model name {name!r}: use letters, digits, '_', '.' or '-'")
    version = str(version) if version is not None else next_version(store, name)
    target = store / name / version
    if target.exists():
        raise FileExistsError(f"{target} already exists; choose another --version or leave it out for the next one")

    # A router over a user's experts (models/byo) calls their factories again; export/byo.py does what differs.
    router_only = checkpoint["model_name"] == ROUTER_ONLY
    model = rebuild_router_only(checkpoint) if router_only else rebuild_model(checkpoint)
    routers = rebuild_routers(checkpoint, model)
    components = {n: m for n, m in model.components.items() if n != "router"}
    components |= {f"router.{router_name}": module for router_name, module in routers.items()}
    components |= rebuild_heads(checkpoint.get("attribution"))  # the distilled stand-ins of costly experts
    if router_only:
        checked = byo.check_samples(checkpoint, model, data_dir, log)
    else:
        checked = _check_samples(checkpoint, data_dir, log)  # (split, tensors, uint8 pixels) or None

    staging = staging_dir(target)
    try:
        if checked is None:
            real_inputs = None
        else:
            real_inputs = (
                byo.real_component_inputs(model, checked) if router_only else _real_component_inputs(model, checked[1])
            )
        entries, parity = {}, {}
        for component_name, module in tqdm(components.items(), desc="export", disable=not progress):
            entries[component_name], parity[component_name] = _export_component(
                component_name, module, staging, real_inputs, formats
            )
        Tokenizer.from_dict(checkpoint["tokenizer"]).save(staging / TOKENIZER_FILE)
        files = {TOKENIZER_FILE: {"sha256": sha256_file(staging / TOKENIZER_FILE)}}
        safety = measure_safety(checkpoint, model, data_dir, staging, log)
        if safety is not None:
            files[safety["ood"]["file"]] = {"sha256": safety["ood"]["sha256"]}
        manifest = _manifest(checkpoint, name, version, entries, parity, files)
        if safety is not None:
            manifest["safety"] = safety
        if router_only:
            byo.add_specs(manifest, byo.write_spec_files(checkpoint, staging))
        manifest["examples"] = write_examples(data_dir or checkpoint["data"]["dir"], staging, log=log)
        if provenance is not None:
            manifest["provenance"] = provenance
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if checked is not None:
            agreement = _pipeline_agreement(model, staging, checked, backend=formats[0])
            manifest["parity"]["pipeline"] = agreement
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
            log(
                f"{formats[0]} pipeline vs eager on {agreement['samples']} {agreement['split']} samples: labels "
                f"{agreement['label_agreement']:.4%}, experts {agreement['expert_agreement']:.4%}"
            )
            if min(agreement["label_agreement"], agreement["expert_agreement"]) < MIN_PIPELINE_AGREEMENT:
                raise ParityError(
                    f"the {formats[0]} pipeline disagrees with eager PyTorch: {agreement}; nothing was written"
                )
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"exported {name} version {version} -> {target}")
    return target


def _export_component(name: str, module, staging: Path, real_inputs: dict | None, formats) -> tuple[dict, dict]:
    module.eval()
    files, differences = {}, {}
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(1234)  # fresh random inputs, but the same ones on every export
    input_sets = [module.example_inputs(b) for b in (1, 3, 16)]
    torch.random.set_rng_state(generator_state)
    if real_inputs is not None:
        input_sets.append(tuple(real_inputs[i] for i in module.input_names))
    for fmt, suffix, write, load in (
        ("onnx", ".onnx", export_onnx, OnnxComponent),
        ("torchscript", ".pt", export_torchscript, TorchScriptComponent),
    ):
        if fmt not in formats:
            continue
        path = staging / f"{name}{suffix}"
        write(module, path)
        differences[fmt] = max_abs_difference(module, load(path), input_sets)
        check_parity(name, fmt, differences[fmt])
        files[fmt] = {"file": path.name, "sha256": sha256_file(path)}

    example = input_sets[0]  # batch 1; the manifest records the batch axis as dynamic
    with torch.no_grad():
        outputs = module(*example)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    entry = {
        "inputs": [_tensor_entry(n, t) for n, t in zip(module.input_names, example, strict=True)],
        "outputs": [_tensor_entry(n, t) for n, t in zip(module.output_names, outputs, strict=True)],
        "madds": None,  # filled from the run's measured costs
        "files": files,
    }
    return entry, differences


def _tensor_entry(name: str, tensor: torch.Tensor) -> dict:
    return {"name": name, "dtype": str(tensor.dtype).removeprefix("torch."), "shape": [-1, *tensor.shape[1:]]}


def _manifest(checkpoint: dict, name: str, version: str, entries: dict, parity: dict, files: dict) -> dict:
    costs = checkpoint["madds"]
    attribution = {k: v for k, v in checkpoint.get("attribution", {}).items() if k != "heads"}
    head_madds = {e["head"]: e["madds"] for e in attribution.get("experts", {}).values() if e.get("head")}
    for component_name, entry in entries.items():
        if component_name in head_madds:
            entry["madds"] = head_madds[component_name]
        else:
            entry["madds"] = costs["components"]["router" if component_name.startswith("router.") else component_name]
    default_router = checkpoint["default_router"]
    evaluation = checkpoint["evaluation"]
    validation = {row.get("router"): row for row in evaluation["val"] if row["policy"].startswith("lambda=")}
    pre = checkpoint["preprocessing"]
    return {
        "format": MODEL_FORMAT,
        "name": name,
        "version": version,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "family": checkpoint["model_name"],
        "config": checkpoint["config"],
        "labels": checkpoint["labels"],
        "preprocessing": {**pre, "tokenizer": TOKENIZER_FILE, "max_tokens": checkpoint["tokenizer"]["max_tokens"]},
        "components": entries,
        "shared_encoders": checkpoint["shared_encoders"],
        "experts": [
            {
                **expert,
                "madds": sum(costs["components"][c] for c in expert["components"]),
                "path_madds": costs["path"][expert["name"]],
                "static_madds": costs["static"][expert["name"]],
            }
            for expert in checkpoint["experts"]
        ],
        "full_expert": checkpoint["full_expert"],
        "router": {
            "component": f"router.{default_router}",
            "operating_point": default_router,
            "lambda": next(r["lambda"] for r in checkpoint["routers"] if r["name"] == default_router),
            "temperature": next(
                r.get("temperature", 1.0) for r in checkpoint["routers"] if r["name"] == default_router
            ),
            "madds": costs["components"]["router"],
            # The confidence floor served with it (models/router_selection.py select_policy): the full path runs too
            # where the routed expert's top probability is below it. None: the router's picks alone.
            "min_confidence": checkpoint.get("default_min_confidence"),
            "kind": "DRDF dual router + MWF, hard argmax (DynMM)",
            "scores": [e["name"] for e in checkpoint["experts"]],
            "importance": ["text", "image"],
        },
        # Every trained router is an operating point: a named place on the accuracy/compute curve, with its
        # figures on validation (cross-fitted routes) and the temperature that calibrates its scores.
        "routers": [
            {
                "name": r["name"],
                "component": f"router.{r['name']}",
                "lambda": r["lambda"],
                "temperature": r.get("temperature", 1.0),
                "default": r["name"] == default_router,
                "validation": _compact(validation.get(r["name"], {})),
            }
            for r in checkpoint["routers"]
        ],
        "madds_full": costs["full"],
        # How each expert's answers are attributed to the modalities (export/attribution.py reads it).
        **({"attribution": attribution} if attribution else {}),
        "evaluation": {
            "summary": evaluation["summary"],
            "split": "test" if "test" in evaluation else "val",
            "policies": [_compact(row) for row in evaluation.get("test", evaluation["val"])],
            # Captions from a held-out family (the synthetic benchmark's test_ood), when the data had them.
            **({"test_ood": [_compact(row) for row in evaluation["test_ood"]]} if "test_ood" in evaluation else {}),
        },
        "training": {
            "train_config": checkpoint["train_config"],
            "data": checkpoint["data"],
            "train_seconds": checkpoint["train_seconds"],
        },
        "parity": {"tolerance": TOLERANCE, "components": parity},
        "files": files,
    }


def _compact(row: dict) -> dict:
    keep = ("policy", "accuracy", "madds_per_sample", "saved_ratio", "route_mix", "accuracy_by_kind")
    keep += ("modality_weights",)
    return {k: row[k] for k in keep if k in row}


def _check_samples(checkpoint: dict, data_dir: Path | None, log) -> tuple[str, TensorSplit, np.ndarray] | None:
    """The test split (else val) of the training data, preprocessed as the store will, for the checks."""
    data_dir = Path(data_dir or checkpoint["data"]["dir"])
    if not data_dir.is_dir():
        log(f"training data {data_dir} not found: parity checked on random inputs only (pass --data to add real ones)")
        return None
    split = "test" if has_split(data_dir, "test") else "val"
    samples = read_split(data_dir, split, require_label=False)
    tokenizer = Tokenizer.from_dict(checkpoint["tokenizer"])
    preprocessing = ImagePreprocessing.from_dict(checkpoint["preprocessing"])
    pixels = load_pixels(samples, preprocessing.image_size)
    tensors = tensorize(samples, pixels, tokenizer, preprocessing, checkpoint["labels"])
    return split, tensors, pixels


@torch.no_grad()
def _real_component_inputs(model, samples: TensorSplit, limit: int = 256) -> dict[str, torch.Tensor]:
    """Every tensor a component may read, computed from real samples the way the pipeline computes them."""
    token_ids, images = samples.token_ids[:limit], samples.images[:limit]
    rows = torch.arange(len(token_ids))
    text_present = (rows % 4 != 3).to(torch.float32)  # every combination of present and missing modalities
    image_present = (rows % 4 != 2).to(torch.float32)
    _, tensors = model.forward_experts(token_ids, images)
    return tensors | {
        "text_features": tensors["text_features"] * text_present[:, None],  # zeros when absent, as served
        "thumbnail": thumbnail(images, model.config.glimpse_size),
        "glimpse_features": model.glimpse(images) * image_present[:, None],
        "text_present": text_present,
        "image_present": image_present,
    }


@torch.no_grad()
def _pipeline_agreement(model, staging: Path, checked, *, backend: str, batch_size: int = 64) -> dict:
    """Labels and expert choices of the exported pipeline against eager PyTorch, sample by sample."""
    # verify=False: the hashes were taken from these very bytes moments ago.
    pipeline = DynamicPipeline(load_model_dir(staging, verify=False), create_backend(backend, "cpu"))
    if isinstance(model, RouterOnlyModel):
        split, batches = checked.split, byo.eager_batches(model, pipeline, checked, batch_size)
    else:
        split, batches = checked[0], _eager_batches(model, *checked[1:], batch_size)
    experts = [e.name for e in model.experts]
    n = label_matches = expert_matches = 0
    differences = []
    for ids, eager_choice, eager_labels, inputs in batches:
        outputs, _ = pipeline.predict(inputs)
        for i, out in enumerate(outputs):
            eager = [str(pipeline.labels[eager_labels[i]]), experts[eager_choice[i]]]
            same_label, same_expert = out.label == eager[0], out.expert == eager[1]
            label_matches += same_label
            expert_matches += same_expert
            if not (same_label and same_expert):
                differences.append({"id": ids[i], "onnx": [out.label, out.expert], "eager": eager})
        n += len(outputs)
    return {
        "split": split,
        "samples": n,
        "label_agreement": label_matches / n,
        "expert_agreement": expert_matches / n,
        "differences": differences[:20],
    }


def _eager_batches(model, samples: TensorSplit, pixels: np.ndarray, batch_size: int):
    """(ids, eager expert index, eager label index, pipeline inputs) per batch of a built-in model."""
    experts = [e.name for e in model.experts]
    for start in range(0, len(samples), batch_size):
        tokens = samples.token_ids[start : start + batch_size]
        images = samples.images[start : start + batch_size]
        scores, _ = model.route(tokens, images)
        eager_choice = scores.argmax(1).tolist()
        logits = model.expert_logits(tokens, images)
        eager_labels = [int(logits[experts[c]][i].argmax()) for i, c in enumerate(eager_choice)]
        batch_pixels = pixels[start : start + batch_size]
        inputs = [PipelineInput(token_ids=t.numpy(), image=p) for t, p in zip(tokens, batch_pixels, strict=True)]
        yield samples.ids[start : start + batch_size], eager_choice, eager_labels, inputs
