"""Model registry: ``@register_model`` functions build a model from keyword config overrides.

Checkpoints store the registered name and the full config, so export and serving rebuild a model
with ``create_model(name, **config)`` from the file alone.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    assert fn.__name__ not in _REGISTRY, f"model {fn.__name__!r} registered twice"
    _REGISTRY[fn.__name__] = fn
    return fn


def create_model(name: str, **config) -> nn.Module:
    _load_families()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    return _REGISTRY[name](**config)


def list_models() -> list[str]:
    _load_families()
    return sorted(_REGISTRY)


def _load_families() -> None:
    # Importing a family module runs its @register_model decorators.
    import models.dynamic_fusion  # noqa: F401
