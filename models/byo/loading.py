"""Finding the user's experts and refusing the ones that cannot work, before any training.

An expert is named on the command line, ``--expert NAME=package.module:factory``, or installed by a package under
the ``dynfuse.experts`` entry-point group (``--expert NAME`` then finds it). Modules are imported with the current
directory on ``sys.path``, as uvicorn imports an app, so a file in the project is found without installing it.

Every refusal is an ``ExpertError`` whose message starts with ``expert NAME:`` and says what to change: a factory
that cannot be imported, is not callable or raises; modalities that are unknown or do not match the declared
preprocessing; labels that are not the data's; inputs that the module's ``forward`` does not accept, or that
nothing provides; logits of the wrong width.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

import torch
from torch import nn

from models.attribution import AttributionError
from models.attribution_training import absent_like
from models.byo.components import ExpertChain
from models.byo.interface import Component, Expert
from models.errors import DynfuseError
from models.experts import MODALITIES
from models.specs import ImageSpec, TextSpec

ENTRY_POINT_GROUP = "dynfuse.experts"
RESERVED_NAMES = ("auto", "soft")  # route values of the API
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")  # expert and component names become file and tensor names


class ExpertError(DynfuseError, ValueError):
    """A user's expert refused before training; the message names it."""


@dataclass(frozen=True)
class ExpertRef:
    name: str
    target: str  # "package.module:factory"
    origin: str  # "--expert" or "entry point of <distribution>"


def parse_expert_options(options: Sequence[str]) -> list[ExpertRef]:
    """``NAME=package.module:factory`` as given, ``NAME`` from the ``dynfuse.experts`` entry points."""
    refs: list[ExpertRef] = []
    installed = None
    for option in options:
        name, equals, target = option.partition("=")
        name = name.strip()
        if not _NAME.match(name) or name in RESERVED_NAMES:
            raise ExpertError(
                f"expert {name!r}: a name is a letter then letters, digits, '_' or '-' (at most 64), and not "
                f"{' or '.join(RESERVED_NAMES)}; write --expert NAME=package.module:factory"
            )
        if any(ref.name == name for ref in refs):
            raise ExpertError(f"expert {name}: named twice; give each expert its own name")
        if equals:
            refs.append(ExpertRef(name, target.strip(), "--expert"))
            continue
        installed = (
            installed if installed is not None else {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
        )
        if name not in installed:
            offered = ", ".join(sorted(installed)) or "none"
            raise ExpertError(
                f"expert {name}: not in the {ENTRY_POINT_GROUP!r} entry-point group (installed: {offered}); "
                f"write --expert {name}=package.module:factory, or install the package that provides it"
            )
        entry = installed[name]
        distribution = entry.dist.name if entry.dist is not None else "an installed package"
        refs.append(ExpertRef(name, entry.value, f"entry point of {distribution}"))
    if len(refs) < 2:
        raise ExpertError(f"a router chooses among experts: give at least two (got {len(refs)})")
    return refs


@contextlib.contextmanager
def _importable_from(directories: Sequence[Path]) -> Iterator[None]:
    added = [str(d) for d in directories if str(d) not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for directory in added:
            sys.path.remove(directory)


def load_expert(ref: ExpertRef, *, search: Sequence[Path] = ()) -> Expert:
    """Import and call one factory; refuse anything that is not an ``Expert``, naming the expert."""
    module_name, colon, attribute = ref.target.partition(":")
    if not colon or not module_name or not attribute:
        raise ExpertError(f"expert {ref.name}: {ref.target!r} is not package.module:factory ({ref.origin})")
    with _importable_from([Path.cwd(), *search]):
        try:
            module = importlib.import_module(module_name)
        except Exception as error:  # a user's module may fail in any way while it is imported
            raise ExpertError(
                f"expert {ref.name}: cannot import module {module_name!r} ({type(error).__name__}: {error}); "
                "run from the directory that holds it, or install its package"
            ) from error
        factory = module
        for part in attribute.split("."):
            factory = getattr(factory, part, None)
            if factory is None:
                raise ExpertError(f"expert {ref.name}: module {module_name!r} has no {attribute!r}")
        if not callable(factory):
            raise ExpertError(f"expert {ref.name}: {ref.target} is a {type(factory).__name__}, not a function")
        try:
            expert = factory()
        except Exception as error:  # whatever the user's code raises is reported, with the expert's name
            raise ExpertError(
                f"expert {ref.name}: its factory {ref.target} raised {type(error).__name__}: {error}"
            ) from error
    if not isinstance(expert, Expert):
        raise ExpertError(
            f"expert {ref.name}: its factory {ref.target} returned a {type(expert).__name__}, not a models.byo.Expert"
        )
    expert.name, expert.source = ref.name, ref.target
    return expert


def check_expert(expert: Expert, labels: Sequence[str]) -> None:
    """Refuse an expert that cannot serve the data's labels or cannot run on its own inputs."""
    prefix = f"expert {expert.name}:"
    modalities = tuple(expert.modalities)
    unknown = sorted(set(modalities) - set(MODALITIES))
    if unknown or not modalities or len(set(modalities)) != len(modalities):
        raise ExpertError(f"{prefix} modalities {list(modalities)}: give one or both of {', '.join(MODALITIES)}")
    for modality, spec, kind in (("image", expert.image, ImageSpec), ("text", expert.text, TextSpec)):
        if (modality in modalities) != (spec is not None):
            has = "declares" if modality in modalities else "does not declare"
            raise ExpertError(
                f"{prefix} it {has} the {modality} modality but {'gives no' if spec is None else 'gives a'} "
                f"{modality} spec; a {modality} expert needs {modality}={kind.__name__}(...), and only one reads it"
            )
        if spec is not None and not isinstance(spec, kind):
            raise ExpertError(f"{prefix} {modality}= must be a {kind.__name__}, got a {type(spec).__name__}")
    _check_labels(expert, labels)
    components = list(expert.components)
    if not components or not all(isinstance(c, Component) for c in components):
        raise ExpertError(f"{prefix} components must be a non-empty list of models.byo.Component")
    names = [c.name for c in components]
    if len(set(names)) != len(names) or not all(_NAME.match(n) for n in names):
        raise ExpertError(f"{prefix} component names {names} must be distinct names of letters, digits, '_', '-'")
    if "logits" not in components[-1].outputs:
        raise ExpertError(f"{prefix} its last component ({names[-1]}) must output 'logits'")
    available = {name: "its specs" for spec in expert.specs() for name in spec.input_names}
    for component in components:
        _check_arguments(expert, component, available)
        available |= dict.fromkeys(component.outputs, f"component {component.name}")
    _dry_run(expert, labels)
    _check_missing(expert, labels)


def _check_missing(expert: Expert, labels: Sequence[str]) -> None:
    """A two-modality expert declares how it sees each modality missing, for exactly what its fusion part reads,
    and runs on it: its answers with one modality missing are what attribution asks of it."""
    chain = ExpertChain(expert, labels)
    try:
        fills = chain.missing()
    except AttributionError as error:
        raise ExpertError(str(error)) from error
    if not fills:
        return
    plan = chain.fusion_plan()
    tensors = chain.example_tensors(2, upto=chain.components[plan.components[0]])
    for modality, values in fills.items():
        removed = dict(tensors)
        for name, value in values.items():
            try:
                removed[name] = absent_like(tensors[name], value)
            except (RuntimeError, ValueError, TypeError) as error:
                raise ExpertError(
                    f"expert {expert.name}: missing[{modality!r}] gives {name.split('.')[-1].split('@')[0]!r} a value "
                    f"of the wrong shape for its tensor {tuple(tensors[name].shape[1:])}: {error}"
                ) from error
        with torch.no_grad():
            for name in plan.components:  # only the fusion part: what comes before it is what was replaced
                component = chain.components[name]
                outputs = component(*(removed[i] for i in component.input_names))
                outputs = outputs if isinstance(outputs, tuple) else (outputs,)
                removed |= dict(zip(component.output_names, outputs, strict=True))
        if not torch.isfinite(removed["logits"]).all():
            raise ExpertError(f"expert {expert.name}: its logits with {modality} missing as declared are not finite")


def _check_labels(expert: Expert, labels: Sequence[str]) -> None:
    declared = [str(label) for label in expert.labels]
    if len(set(declared)) != len(declared):
        raise ExpertError(f"expert {expert.name}: its labels repeat a name: {declared}")
    missing, extra = sorted(set(labels) - set(declared)), sorted(set(declared) - set(labels))
    if missing or extra:
        raise ExpertError(
            f"expert {expert.name}: its labels differ from the data's ({len(declared)} against {len(labels)}): "
            f"missing {missing or 'none'}, not in the data {extra or 'none'}; an expert must classify the data's "
            "labels (its logits are reordered to the data's order when only the order differs)"
        )
    expert.labels = declared


def _check_arguments(expert: Expert, component: Component, available: dict[str, str]) -> None:
    where = f"expert {expert.name}, component {component.name}:"
    if not isinstance(component.module, nn.Module):
        raise ExpertError(f"{where} module is a {type(component.module).__name__}, not a torch.nn.Module")
    parameters = inspect.signature(component.module.forward).parameters.values()
    named = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes_any = any(p.kind == p.VAR_KEYWORD for p in parameters)
    required = [
        p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty
    ]
    not_accepted = [a for a in component.arguments if a not in named and not takes_any]
    not_given = [r for r in required if r not in component.arguments]
    if not_accepted or not_given:
        raise ExpertError(
            f"{where} it declares inputs {list(component.arguments)} but {type(component.module).__name__}.forward "
            f"takes ({', '.join(sorted(named)) or 'nothing by name'})"
            + (f"; not accepted: {not_accepted}" if not_accepted else "")
            + (f"; required but not declared: {not_given}" if not_given else "")
        )
    for argument, tensor in component.arguments.items():
        if tensor not in available:
            offered = ", ".join(f"{name} ({source})" for name, source in available.items()) or "nothing"
            raise ExpertError(
                f"{where} its input {argument!r} reads {tensor!r}, which nothing provides; available: {offered}. "
                f"Map a name with inputs={{{argument!r}: 'image'}}, say"
            )


def _dry_run(expert: Expert, labels: Sequence[str]) -> None:
    """Run the chain once on two example rows: every component must run and the logits must be (2, K), finite."""
    for component in expert.components:
        component.module.eval()
    chain = ExpertChain(expert, labels)
    tensors = chain.example_tensors(2, upto=next(iter(chain.components.values())))
    with torch.no_grad():
        for name, component in chain.components.items():
            try:
                outputs = component.module_outputs(*(tensors[i] for i in component.input_names))
            except Exception as error:  # the user's module, on inputs shaped as its specs make them
                raise ExpertError(
                    f"expert {expert.name}, component {name.split('.', 1)[1]}: it fails on example inputs "
                    f"({', '.join(f'{i}: {tuple(tensors[i].shape)}' for i in component.input_names)}): "
                    f"{type(error).__name__}: {error}"
                ) from error
            if len(outputs) != len(component.output_names):
                raise ExpertError(
                    f"expert {expert.name}, component {name.split('.', 1)[1]}: it returns {len(outputs)} tensors "
                    f"where it declares {len(component.output_names)} outputs {list(component.output_keys)}"
                )
            tensors |= dict(zip(component.output_names, outputs, strict=True))
    logits = tensors["logits"]  # in the module's own column order: the width is what is checked here
    if logits.shape != (2, len(labels)) or not torch.isfinite(logits).all():
        raise ExpertError(
            f"expert {expert.name}: its logits have shape {tuple(logits.shape)} for 2 rows, expected (2, "
            f"{len(labels)}), one column per label, finite; check its classifier's number of labels"
        )


def load_experts(
    options: Sequence[str] | Sequence[ExpertRef], labels: Sequence[str], *, search=()
) -> list[ExpertChain]:
    """Every expert imported, checked against the data's labels and frozen; refusals name the expert."""
    refs = [o for o in options if isinstance(o, ExpertRef)] or parse_expert_options(options)  # type: ignore[arg-type]
    experts = [load_expert(ref, search=search) for ref in refs]  # every import first: the cheapest refusals
    chains = []
    for expert in experts:
        check_expert(expert, labels)
        for component in expert.components:
            component.module.eval().requires_grad_(False)
        chains.append(ExpertChain(expert, labels))
    return chains
