"""Where a model's files came from: the commit and command that built it, its data, and a digest of the training inputs.

The shipped default model (``store/shapes/1``, export/default_model.py) records this in ``model.json`` under
``provenance``; ``tests/integration/test_shipped_model.py`` recomputes ``training_inputs`` from the checkout
and fails when the code that made the model changed without the model being rebuilt.

The digest covers what decides the files: the model and training code (``models/``, except the
bring-your-own-experts package, which the default model does not use), the data generator (inside
``models/``), the export code that writes a version, and the build's configuration (preset, data size,
seed, image size, mix, the training config). Each Python file is hashed by its syntax tree, not its bytes:
comments, docstrings and formatting decide nothing, so editing them needs no rebuild. No torch here: the
store reader checks a recorded provenance at load.
"""

from __future__ import annotations

import ast
import hashlib
import json
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Relative to the repository root: what the default model's files are made by.
# export/safety.py measures the safety figures (and writes the density file) that model.json ships with.
TRAINING_INPUTS = ("models/**/*.py", "export/writer.py", "export/onnx.py", "export/torchscript.py",
                   "export/parity.py", "export/examples.py", "export/safety.py", "export/default_model.py")  # fmt: skip
EXCLUDED = ("models/byo/",)  # router-only training over users' experts: not on the default model's path
DIGEST_SCHEME = "python-ast-v1"  # how a file is hashed; a new scheme makes every recorded digest differ


class ProvenanceError(ValueError):
    """A recorded provenance is malformed."""


def training_input_files(root: Path = ROOT) -> list[str]:
    """The repository-relative paths the digest covers, sorted."""
    root = Path(root)
    files = {
        path.relative_to(root).as_posix()
        for pattern in TRAINING_INPUTS
        for path in root.glob(pattern)
        if path.is_file() and "__pycache__" not in path.parts
    }
    return sorted(f for f in files if not f.startswith(EXCLUDED))


def source_digest(source: str, name: str = "<source>") -> str:
    """sha256 of a Python source's syntax tree without its docstrings: the same for any comment, docstring or
    layout change, different for any change of what the code does."""
    tree = ast.parse(source, filename=name)
    return hashlib.sha256(_canonical(tree).encode()).hexdigest()


def _canonical(node) -> str:
    """The tree as text, stable across Python 3.10-3.13: fields in their declared order, with empty and None
    fields left out (newer Pythons add fields such as ``type_params`` that are empty in older code)."""
    if isinstance(node, ast.AST):
        body = getattr(node, "body", None)
        parts = []
        for field in node._fields:
            value = getattr(node, field, None)
            if field == "body" and isinstance(body, list) and _has_docstring(node):
                value = body[1:]
            if value is None or value == []:
                continue
            parts.append(f"{field}={_canonical(value)}")
        return f"{type(node).__name__}({','.join(parts)})"
    if isinstance(node, list):
        return "[" + ",".join(_canonical(item) for item in node) + "]"
    return repr(node)


def _has_docstring(node) -> bool:
    if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) or not node.body:
        return False
    first = node.body[0]
    return isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)


def training_inputs(build: dict, root: Path = ROOT) -> dict:
    """``{"scheme", "digest", "build", "files": {path: digest}}``: one digest over every training input and the
    build configuration, and each file's own (so a mismatch can be named)."""
    root = Path(root)
    files = {path: source_digest((root / path).read_text(), path) for path in training_input_files(root)}
    payload = json.dumps({"scheme": DIGEST_SCHEME, "build": build, "files": files}, sort_keys=True)
    return {
        "scheme": DIGEST_SCHEME,
        "digest": hashlib.sha256(payload.encode()).hexdigest(),
        "build": build,
        "files": files,
    }


def changed_inputs(recorded: dict, current: dict) -> list[str]:
    """What differs between two ``training_inputs``, named for a reader: files added, removed or changed, and
    the build configuration."""
    changes = []
    if recorded.get("scheme") != current["scheme"]:
        changes.append(f"digest scheme {recorded.get('scheme')!r} -> {current['scheme']!r}")
    if recorded.get("build") != current["build"]:
        changes.append(f"build configuration {recorded.get('build')} -> {current['build']}")
    old, new = recorded.get("files", {}), current["files"]
    changes += [f"{path} (new)" for path in sorted(set(new) - set(old))]
    changes += [f"{path} (removed)" for path in sorted(set(old) - set(new))]
    changes += [f"{path} (changed)" for path in sorted(set(old) & set(new)) if old[path] != new[path]]
    return changes


def git_state(root: Path = ROOT) -> dict:
    """The checkout's commit and whether any training input differs from it (``dirty``): a model built from
    uncommitted code names the commit it started from and says so."""
    try:
        commit = _git(root, "rev-parse", "HEAD")
        status = _git(root, "status", "--porcelain", "--", *training_input_files(root))
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(status)}


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()


def record(command: str, data: dict, build: dict, root: Path = ROOT) -> dict:
    """The ``provenance`` entry of a model built now."""
    import numpy
    import torch

    return {
        **git_state(root),
        "command": command,
        "data": data,
        "training_inputs": training_inputs(build, root),
        "software": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": numpy.__version__,
        },
        "machine": f"{platform.machine()}, {_cpu_name()}",
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def check(provenance: object) -> None:
    """A recorded provenance has what a reader relies on; ``ProvenanceError`` names what is wrong."""
    if not isinstance(provenance, dict):
        raise ProvenanceError(f"provenance must be an object, got {type(provenance).__name__}")
    commit = provenance.get("commit")
    if commit is not None and not (isinstance(commit, str) and len(commit) == 40 and _is_hex(commit)):
        raise ProvenanceError(f"provenance.commit must be a 40-digit git commit id, got {commit!r}")
    if not isinstance(provenance.get("command"), str) or not provenance["command"].strip():
        raise ProvenanceError("provenance.command must name the command that built the model")
    data = provenance.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("seed"), int) or isinstance(data.get("seed"), bool):
        raise ProvenanceError(f"provenance.data.seed must be an integer, got {data!r}")
    inputs = provenance.get("training_inputs")
    if not isinstance(inputs, dict):
        raise ProvenanceError("provenance.training_inputs is missing")
    digest = inputs.get("digest")
    if not (isinstance(digest, str) and len(digest) == 64 and _is_hex(digest)):
        raise ProvenanceError(f"provenance.training_inputs.digest must be a sha256, got {digest!r}")
    files = inputs.get("files")
    if not isinstance(files, dict) or not files:
        raise ProvenanceError("provenance.training_inputs.files must list the files the digest covers")
    payload = json.dumps({"scheme": inputs.get("scheme"), "build": inputs.get("build"), "files": files}, sort_keys=True)
    if hashlib.sha256(payload.encode()).hexdigest() != digest:
        raise ProvenanceError("provenance.training_inputs.digest is not the digest of its files and build: edited")


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)
