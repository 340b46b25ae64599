"""A user's expert as dynfuse components: what cost counting, export and the serving pipeline already handle.

Every dynfuse component declares ``input_names``, ``output_names`` and ``example_inputs(batch_size)``, and the
pipeline finds each input by name among the request's tensors and the outputs of components already run. A
user's module gets the same through ``UserComponent``, with names made unique across experts:

- the spec tensors it reads keep the spec's key: ``input_ids`` -> ``input_ids@hf32-5e81d7c0`` (models/specs.py);
- what a component hands to the next one is prefixed by the component's own name, ``text.encoder.features``;
- the last component's ``logits`` stay ``logits``, with the columns put in the data's label order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from models.attribution import AttributionError, FusionPlan, plan_fusion
from models.byo.interface import Expert
from models.experts import ExpertSpec
from models.specs import ImageSpec, TextSpec, tensor_name


class UserComponent(nn.Module):
    """One module of a user's expert, called with keyword arguments, returning plain tensors in a fixed order."""

    def __init__(
        self,
        module: nn.Module,
        arguments: Sequence[str],  # the module's keyword arguments, in input order
        input_names: tuple[str, ...],  # the tensors they get (qualified names)
        output_keys: tuple[str, ...],  # what the module returns, by the user's names
        output_names: tuple[str, ...],  # the same, qualified
        chain: ExpertChain,
        label_order: list[int] | None = None,  # logits columns in the data's label order, when they differ
    ):
        super().__init__()
        self.module = module
        self.arguments = tuple(arguments)
        self.input_names, self.output_names, self.output_keys = input_names, output_names, output_keys
        self._chain = [chain]  # in a list: a plain reference, not a submodule (the chain holds this component)
        self.reorders = label_order is not None and label_order != sorted(label_order)
        self.register_buffer("label_order", torch.tensor(label_order or [], dtype=torch.int64), persistent=False)

    def forward(self, *inputs: torch.Tensor):
        values = self.module_outputs(*inputs)
        if self.reorders:
            values = (*values[:-1], values[-1].index_select(1, self.label_order))  # (B, K) in the data's order
        return values[0] if len(values) == 1 else values

    def module_outputs(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What the user's module returns, as a tuple in ``output_keys`` order (logits in the module's own order)."""
        out = self.module(**dict(zip(self.arguments, inputs, strict=True)))
        if isinstance(out, torch.Tensor):
            return (out,)
        if isinstance(out, Mapping):  # a dict, or a transformers ModelOutput
            return tuple(out[key] for key in self.output_keys)
        return tuple(out)[: len(self.output_keys)]

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        tensors = self._chain[0].example_tensors(batch_size, upto=self)
        return tuple(tensors[name] for name in self.input_names)


class ExpertChain:
    """A user's expert as dynfuse sees it: its specs by key, its components in order, their example inputs."""

    def __init__(self, expert: Expert, labels: Sequence[str]):
        self.name = expert.name
        self.modalities = tuple(expert.modalities)
        self.image: ImageSpec | None = expert.image
        self.text: TextSpec | None = expert.text
        self.specs = {spec.key: spec for spec in expert.specs()}
        available = {name: tensor_name(name, key) for key, spec in self.specs.items() for name in spec.input_names}
        order = [list(expert.labels).index(label) for label in labels]
        self.components: dict[str, UserComponent] = {}
        for position, component in enumerate(expert.components):
            qualified = f"{self.name}.{component.name}"
            last = position == len(expert.components) - 1
            outputs = tuple("logits" if last and key == "logits" else f"{qualified}.{key}" for key in component.outputs)
            self.components[qualified] = UserComponent(
                component.module,
                arguments=tuple(component.arguments),
                input_names=tuple(available[tensor] for tensor in component.arguments.values()),
                output_keys=component.outputs,
                output_names=outputs,
                chain=self,
                label_order=order if last else None,
            )
            available |= dict(zip(component.outputs, outputs, strict=True))
        self.names = available  # the user's name of a tensor -> its qualified name
        self.declared_missing = {m: dict(v) for m, v in (expert.missing or {}).items()}

    def fusion_plan(self) -> FusionPlan:
        """The components that read both modalities (and those after), and what each modality hands them."""
        inputs_of = {name: c.input_names for name, c in self.components.items()}
        outputs_of = {name: c.output_names for name, c in self.components.items()}
        return plan_fusion(self.name, self.modalities, tuple(self.components), inputs_of, outputs_of)

    def missing(self) -> dict[str, dict[str, object]]:
        """The declared missing-modality representation by qualified tensor name, checked against what the fusion
        part reads: exactly those tensors, for each modality (AttributionError otherwise, saying what to declare)."""
        plan = self.fusion_plan()
        if not plan.reads_both:
            return {}
        user = {qualified: name for name, qualified in self.names.items()}
        wanted = {m: [user.get(t, t) for t in plan.inputs[m]] for m in plan.modalities}
        example = ", ".join(f"{m!r}: {{{', '.join(f'{n!r}: ...' for n in names)}}}" for m, names in wanted.items())
        how = (
            f"its fusion part ({', '.join(c.split('.', 1)[1] for c in plan.components)}) reads from the text "
            f"{wanted['text']} and from the image {wanted['image']}; declare the value of each when its modality is "
            f"missing, as the expert was trained to see it (or one that means nothing to it, e.g. zero logits): "
            f"Expert(..., missing={{{example}}})"
        )
        declared = self.declared_missing
        if not declared:
            raise AttributionError(
                f"expert {self.name}: it reads text and image, and dynfuse attributes each answer to them by asking it "
                f"what it answers with one missing: {how}"
            )
        if set(declared) != set(plan.modalities) or any(sorted(declared[m]) != sorted(wanted[m]) for m in wanted):
            given = {m: sorted(v) for m, v in declared.items()}
            raise AttributionError(f"expert {self.name}: missing declares {given}, but {how}")
        return {m: {self.names[name]: value for name, value in declared[m].items()} for m in plan.modalities}

    @property
    def spec(self) -> ExpertSpec:
        return ExpertSpec(self.name, self.modalities, tuple(self.components))

    def run(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The expert's logits (B, K) in the data's label order; ``tensors`` holds its spec tensors by name."""
        return self._run(dict(tensors))["logits"]

    def _run(self, available: dict[str, torch.Tensor], upto: UserComponent | None = None) -> dict:
        for component in self.components.values():
            if component is upto:
                break
            outputs = component(*(available[name] for name in component.input_names))
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            available |= dict(zip(component.output_names, outputs, strict=True))
        return available

    @torch.no_grad()
    def example_tensors(self, batch_size: int, upto: UserComponent | None = None) -> dict[str, torch.Tensor]:
        """Random spec tensors of ``batch_size`` rows, and what the components before ``upto`` make of them."""
        tensors: dict[str, torch.Tensor] = {}
        for key, spec in self.specs.items():
            tensors |= {tensor_name(name, key): value for name, value in example_spec_tensors(spec, batch_size).items()}
        return self._run(tensors, upto)

    def fingerprint(self) -> str:
        """sha256 over every weight and buffer, the specs and the label order: what the router was trained on."""
        digest = hashlib.sha256()
        for key in sorted(self.specs):
            digest.update(key.encode())
        for name, component in self.components.items():
            digest.update(name.encode() + repr(component.label_order.tolist()).encode())
            for tensor_key, tensor in sorted(component.module.state_dict().items()):
                digest.update(f"{tensor_key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


def example_spec_tensors(spec: ImageSpec | TextSpec, batch_size: int) -> dict[str, torch.Tensor]:
    """Inputs shaped as a spec makes them: normalized-looking pixels, or right-padded token ids of random lengths."""
    if isinstance(spec, ImageSpec):
        return {"image": torch.randn(batch_size, 3, spec.size, spec.size)}
    lengths = torch.randint(1, spec.max_length + 1, (batch_size, 1))
    present = torch.arange(spec.max_length)[None, :] < lengths  # (B, T)
    words = torch.randint(
        spec.first_word_id, max(spec.vocab_size, spec.first_word_id + 1), (batch_size, spec.max_length)
    )
    ids = torch.where(present, words, torch.full_like(words, spec.pad_id))
    if spec.kind == "word":
        return {"token_ids": ids}
    return {"input_ids": ids, "attention_mask": present.to(torch.int64)}
