"""Compute accounting: multiply-adds per sample, measured with PyTorch's FLOP counter, never typed in.

A request's cost is the shared encoders it ran, the router and its expert's own components, each
counted once; ``madds_full`` is the static full model (the encoders the full expert needs and its
components, no glimpse or router). The full expert is the most accurate one on validation, so it is
known only after Stage I.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_madds(module: nn.Module) -> int:
    """Multiply-adds of one forward pass on one sample at the module's serving input size."""
    was_training = module.training
    module.eval()
    try:
        # Made before the counter starts: a component later in a user's chain makes its example inputs by running
        # the components before it (models/byo/components.py), which are not its cost.
        with torch.no_grad():
            inputs = module.example_inputs(1)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(*inputs)
    finally:
        module.train(was_training)
    return counter.get_total_flops() // 2  # the counter reports 2 FLOPs per multiply-add


def component_madds(components: dict[str, nn.Module]) -> dict[str, int]:
    return {name: count_madds(module) for name, module in components.items()}


def routing_costs(model: nn.Module, full_expert: str | None = None) -> dict:
    """Measured MAdds of a dynamic fusion model: per component, per routed path, per static expert, and
    ``full`` (the static ``full_expert``) when it is given.

    ``path``: a request with both modalities taking that expert (shared encoders + router + its components).
    ``static``: the expert as a model of its own (what its components need, no glimpse, no router).
    """
    components = model.components
    madds = component_madds(components)
    producers = {out: name for name, module in components.items() for out in module.output_names if out != "logits"}
    inputs_of = {name: module.input_names for name, module in components.items()}
    shared = sum(madds[name] for name in model.shared_encoders.values()) + madds["router"]
    path = {e.name: shared + sum(madds[c] for c in e.components) for e in model.experts}
    static = {
        e.name: sum(madds[c] for c in static_components(e.components, producers, inputs_of)) for e in model.experts
    }
    costs = {"components": madds, "path": path, "static": static}
    if full_expert is not None:
        costs["full"] = static[full_expert]
    return costs


def static_components(
    expert_components: tuple[str, ...], producers: dict[str, str], inputs_of: dict[str, tuple]
) -> list[str]:
    """The expert's components plus whatever produces their inputs (e.g. the text encoder for a text head).

    ``producers`` maps a tensor name to the component that outputs it; raw inputs have no producer.
    """
    needed = list(expert_components)
    pending = list(expert_components)
    while pending:
        for tensor in inputs_of[pending.pop()]:
            producer = producers.get(tensor)
            if producer is not None and producer not in needed:
                needed.insert(0, producer)
                pending.append(producer)
    return needed
