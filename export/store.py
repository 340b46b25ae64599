"""The model store: ``STORE/<name>/<version>/model.json`` beside the component files.

This module reads it (serving imports it, so: no torch). ``load_model`` picks the highest version
unless one is pinned and verifies the sha256 of every file ``model.json`` lists before anything
runs; a changed byte is refused with the file's name. ``export/writer.py`` writes the store.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from export import provenance
from models.errors import DynfuseError
from models.ood import OodDetector
from models.preprocess import ImagePreprocessing
from models.specs import SpecError, SpecSet, spec_from_dict
from models.tokenizer import Tokenizer

MODEL_FORMAT = "dynfuse-model/1"
# A model whose experts bring their own preprocessing (models/specs.py): an older reader refuses it by name,
# rather than failing on the first request that needs a spec's tensor.
MODEL_FORMAT_WITH_SPECS = "dynfuse-model/2"
READ_FORMATS = (MODEL_FORMAT, MODEL_FORMAT_WITH_SPECS)
MANIFEST = "model.json"
FORMATS = ("onnx", "torchscript")


class StoreError(DynfuseError):
    """The store is missing, malformed or does not hold what was asked for."""


class ModelNotFoundError(StoreError):
    pass


class IntegrityError(StoreError):
    """A file's bytes are not those that were exported."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # numpy dtype name: float32, int64
    shape: tuple[int, ...]  # -1 for the batch axis


@dataclass(frozen=True)
class ComponentInfo:
    name: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    madds: int  # per sample, measured at export
    files: dict[str, Path]  # format -> file


@dataclass(frozen=True)
class ExpertInfo:
    name: str
    modalities: tuple[str, ...]
    components: tuple[str, ...]  # run in this order; the last outputs "logits"
    madds: int  # its own components
    path_madds: int  # a request with both modalities taking this path: encoders + router + own


@dataclass(frozen=True)
class OperatingPoint:
    """One trained router of the model: a named place on its accuracy/compute curve."""

    name: str
    component: str  # the router component that scores requests at this point
    lam: float  # the resource-loss weight it was trained with
    temperature: float  # calibrates its scores (models/policy.py calibrate) before a threshold reads them
    validation: dict  # accuracy, madds_per_sample, saved_ratio, route_mix on the validation split


@dataclass(frozen=True)
class StoredModel:
    name: str
    version: str
    path: Path
    manifest: dict  # model.json as read
    labels: tuple[str, ...]
    tokenizer: Tokenizer
    preprocessing: ImagePreprocessing
    components: dict[str, ComponentInfo]
    experts: tuple[ExpertInfo, ...]  # in the router's score order
    full_expert: str
    router: str  # the served router's component
    shared_encoders: dict[str, str]  # modality -> component every request with that modality runs
    madds_full: int
    operating_points: dict[str, OperatingPoint]  # every router, by name
    default_point: str  # the one served unless a request or the settings pick another
    # The confidence floor served with default_point unless a request or the settings set one (model.json
    # router.min_confidence); None: the router's picks alone.
    default_min_confidence: float | None = None
    specs: SpecSet = field(default_factory=SpecSet)  # the experts' own preprocessing, by key; empty for most
    # What safe routing means for this model, measured on validation at export (models/safety.py): empty for a
    # model exported without it; and the out-of-distribution density of its features (models/ood.py).
    safety: dict = field(default_factory=dict)
    ood: OodDetector | None = None

    def expert(self, name: str) -> ExpertInfo:
        for expert in self.experts:
            if expert.name == name:
                return expert
        raise KeyError(f"model {self.name} has no expert {name!r}; it has {', '.join(self.expert_names)}")

    @property
    def expert_names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.experts)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def list_store(store: Path) -> dict[str, list[str]]:
    """Model name -> its versions (those with a model.json), lowest first."""
    store = Path(store)
    if not store.is_dir():
        return {}
    models = {}
    for model_dir in sorted(p for p in store.iterdir() if p.is_dir() and not p.name.startswith(".")):
        versions = [v.name for v in model_dir.iterdir() if (v / MANIFEST).is_file() and not v.name.startswith(".")]
        if versions:
            models[model_dir.name] = sorted(versions, key=_version_key)
    return models


def _version_key(version: str) -> tuple:
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


def resolve(store: Path, name: str | None = None, version: str | None = None) -> Path:
    """The directory of the requested model version (highest unless pinned)."""
    models = list_store(store)
    if not models:
        raise ModelNotFoundError(f"no model in store {store}; build one with `dynfuse build-default --store {store}`")
    if name is None:
        if len(models) > 1:
            raise ModelNotFoundError(f"store {store} holds several models ({', '.join(models)}); name one")
        name = next(iter(models))
    if name not in models:
        raise ModelNotFoundError(f"no model {name!r} in store {store}; it holds: {', '.join(models)}")
    if version is None:
        version = models[name][-1]
    elif str(version) not in models[name]:
        raise ModelNotFoundError(f"model {name!r} has no version {version!r}; versions: {', '.join(models[name])}")
    return Path(store) / name / str(version)


def load_model(store: Path, name: str | None = None, version: str | None = None, *, verify: bool = True) -> StoredModel:
    return load_model_dir(resolve(store, name, version), verify=verify)


def load_model_dir(path: Path, *, verify: bool = True) -> StoredModel:
    """A model version directory, read and (by default) verified."""
    path = Path(path)
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise StoreError(f"{manifest_path}: cannot be read: {error}") from error
    if manifest.get("format") not in READ_FORMATS:
        raise StoreError(f"{manifest_path}: format {manifest.get('format')!r} is not one of {READ_FORMATS}")
    if verify:
        verify_files(path, manifest)
    if "provenance" in manifest:  # how the model was built (the shipped default model records it)
        try:
            provenance.check(manifest["provenance"])
        except provenance.ProvenanceError as error:
            raise StoreError(f"{manifest_path}: {error}") from error
    return _parse(path, manifest)


def verify_files(path: Path, manifest: dict) -> None:
    """Every file model.json lists exists and has the recorded sha256."""
    for file_name, expected in _listed_files(manifest).items():
        file_path = path / file_name
        if not file_path.is_file():
            raise IntegrityError(f"{file_path}: listed in {MANIFEST} but missing")
        actual = sha256_file(file_path)
        if actual != expected:
            raise IntegrityError(
                f"{file_path}: sha256 {actual[:16]}… does not match {expected[:16]}… recorded in {MANIFEST}; "
                "the file changed after export: re-export the model or restore the file"
            )


def _listed_files(manifest: dict) -> dict[str, str]:
    files = {name: entry["sha256"] for name, entry in manifest.get("files", {}).items()}
    for component in manifest["components"].values():
        for entry in component["files"].values():
            files[entry["file"]] = entry["sha256"]
    for example in manifest.get("examples", []):  # the playground's image-text pairs (export/examples.py)
        files[example["file"]] = example["sha256"]
    for spec in manifest.get("preprocessing", {}).get("specs", {}).values():  # the experts' own tokenizer files
        if "tokenizer" in spec:
            files[spec["tokenizer"]] = spec["sha256"]
    return files


def _parse(path: Path, manifest: dict) -> StoredModel:
    try:
        components = {
            name: ComponentInfo(
                name=name,
                inputs=tuple(_tensor(t) for t in entry["inputs"]),
                outputs=tuple(_tensor(t) for t in entry["outputs"]),
                madds=int(entry["madds"]),
                files={fmt: path / f["file"] for fmt, f in entry["files"].items()},
            )
            for name, entry in manifest["components"].items()
        }
        experts = tuple(
            ExpertInfo(
                name=e["name"],
                modalities=tuple(e["modalities"]),
                components=tuple(e["components"]),
                madds=int(e["madds"]),
                path_madds=int(e["path_madds"]),
            )
            for e in manifest["experts"]
        )
        pre = manifest["preprocessing"]
        points = {
            entry.get("name", entry["component"].removeprefix("router.")): OperatingPoint(
                name=entry.get("name", entry["component"].removeprefix("router.")),
                component=entry["component"],
                lam=float(entry["lambda"]),
                temperature=float(entry.get("temperature", 1.0)),
                validation=dict(entry.get("validation", {})),
            )
            for entry in manifest["routers"]
        }
        return StoredModel(
            name=manifest["name"],
            version=str(manifest["version"]),
            path=path,
            manifest=manifest,
            labels=tuple(manifest["labels"]),
            tokenizer=Tokenizer.load(path / pre["tokenizer"]),
            preprocessing=ImagePreprocessing.from_dict(pre),
            components=components,
            experts=experts,
            full_expert=manifest["full_expert"],
            router=manifest["router"]["component"],
            shared_encoders=dict(manifest["shared_encoders"]),
            madds_full=int(manifest["madds_full"]),
            operating_points=points,
            default_point=next(p.name for p in points.values() if p.component == manifest["router"]["component"]),
            default_min_confidence=_unit_or_none(manifest["router"].get("min_confidence"), "router.min_confidence"),
            specs=_specs(path, pre.get("specs", {})),
            safety=dict(manifest.get("safety") or {}),
            ood=_ood(path, manifest.get("safety") or {}),
        )
    except SpecError as error:
        raise StoreError(f"{path / MANIFEST}: {error}") from error
    except (KeyError, TypeError, ValueError, StopIteration) as error:
        raise StoreError(f"{path / MANIFEST}: malformed ({type(error).__name__}: {error})") from error


def _unit_or_none(value, field_name: str) -> float | None:
    """A probability in [0, 1] from model.json, or None; anything else is a broken manifest."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{field_name} must be a number in [0, 1] or null, not {value!r}")
    return float(value)


def _specs(path: Path, entries: dict) -> SpecSet:
    """The experts' preprocessing specs; each must still have the key its content gives (components read
    tensors by that key)."""
    specs = {key: spec_from_dict(entry, path) for key, entry in entries.items()}
    for key, spec in specs.items():
        if spec.key != key:
            raise SpecError(f"preprocessing spec {key!r} describes the spec {spec.key!r}: model.json was edited")
    return SpecSet(specs)


def _ood(path: Path, safety: dict) -> OodDetector | None:
    entry = safety.get("ood")
    if not entry:
        return None
    try:
        return OodDetector.load(path / entry["file"])
    except (OSError, ValueError, KeyError) as error:
        raise StoreError(f"{path / entry['file']}: the out-of-distribution density cannot be read: {error}") from error


def _tensor(entry: dict) -> TensorInfo:
    return TensorInfo(entry["name"], entry["dtype"], tuple(entry["shape"]))
