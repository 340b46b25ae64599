"""Training what attribution needs (models/attribution.py): experts that have seen a modality missing, the
constant v(neither), and cheap stand-ins for the experts whose exact values would cost too much.

1. Stage I shows every two-modality expert a share of its rows with the text removed, the image removed, or both,
   in the representation ``ABSENT`` describes (``removal_loss``). The rows are extra: the expert still sees every
   row whole, so what it learns from both modalities is not diluted; only its fusion components run on the
   extra rows (the encoders' outputs are reused), which is where the removal happens anyway.
2. After Stage I, ``fit_attribution`` decides per expert how the default ``importance`` is computed:
   ``one_modality`` (1 for what it reads), ``exact`` (its fusion components rerun twice per request, when that
   costs at most ``budget`` of the full path's MAdds) or ``head`` (a ``CoalitionHead`` distilled from the exact
   values on the training and validation splits: its text branch learns what the expert answers from the text
   alone, its image branch what it answers from the image alone, from pooled copies of the very inputs the
   fusion components read). The Shapley values are then computed from the head's two answers exactly as from
   the expert's own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models import attribution
from models.attribution import FusionPlan

# Stage I's removal rows per batch, as shares of the batch, for each two-modality expert.
REMOVE_TEXT, REMOVE_IMAGE, REMOVE_BOTH = 0.2, 0.2, 0.05
HEAD_EPOCHS = 60
HEAD_HIDDEN = 64


def fusion_plans(model) -> dict[str, FusionPlan]:
    """Every expert's fusion plan, from its components' declared input and output names."""
    components = model.components
    inputs_of = {name: tuple(m.input_names) for name, m in components.items()}
    outputs_of = {name: tuple(m.output_names) for name, m in components.items()}
    modality_of_raw = getattr(model, "raw_modality", attribution.raw_modality)
    return {
        e.name: attribution.plan_fusion(e.name, e.modalities, e.components, inputs_of, outputs_of, modality_of_raw)
        for e in model.experts
    }


def absent_like(tensor: torch.Tensor, fill) -> torch.Tensor:
    """A removed modality's version of ``tensor``: ``fill`` (a number, or one sample's values) in every row."""
    value = torch.as_tensor(np.asarray(fill), dtype=tensor.dtype, device=tensor.device)
    return value.expand(tensor.shape[1:]).expand(tensor.shape).clone()


def run_fusion(
    model,
    plan: FusionPlan,
    tensors: dict[str, torch.Tensor],
    removed: dict[str, torch.Tensor],  # modality -> (B,) bool: rows where it is removed
    fills: dict[str, dict] | None = None,  # modality -> tensor -> fill; None: ABSENT everywhere
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The expert's logits (B, K) with each modality removed in its rows, and the tensors its fusion components
    read (after the removal), from ``tensors`` that hold those inputs for the whole batch."""
    available = {}
    for modality, names in plan.inputs.items():
        rows = removed.get(modality)
        for name in names:
            value = tensors[name]
            if rows is not None and bool(rows.any()):
                fill = attribution.ABSENT if fills is None else fills[modality][name]
                mask = rows.reshape(-1, *([1] * (value.dim() - 1)))
                value = torch.where(mask, absent_like(value, fill), value)
            available[name] = value
    components = model.components
    for name in plan.components:
        module = components[name]
        outputs = module(*(available[i] for i in module.input_names))
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        available.update(zip(module.output_names, outputs, strict=True))
    return available["logits"], available


def removal_loss(model, plans: dict[str, FusionPlan], tensors: dict, labels: torch.Tensor, generator) -> torch.Tensor:
    """Stage I's extra term: each two-modality expert on copies of some rows with a modality removed, its own loss
    on them, weighted by their share of the batch (so one row weighs the same whole or removed)."""
    batch = labels.shape[0]
    counts = [round(batch * share) for share in (REMOVE_TEXT, REMOVE_IMAGE, REMOVE_BOTH)]
    total = labels.new_zeros((), dtype=torch.float32)
    for plan in plans.values():
        if not plan.reads_both or sum(counts) == 0:
            continue
        rows = torch.randperm(batch, generator=generator)[: sum(counts)]
        which = torch.repeat_interleave(torch.arange(3), torch.tensor(counts))  # 0: text, 1: image, 2: both removed
        picked = {name: tensors[name][rows] for names in plan.inputs.values() for name in names}
        removed = {"text": which != 1, "image": which != 0}
        logits, used = run_fusion(model, plan, picked, removed)
        total = total + model.expert_loss(plan.expert, logits, used, labels[rows]) * (len(rows) / batch)
    return total


@torch.no_grad()
def coalition_logits(model, plan: FusionPlan, tensors: dict, fills: dict | None = None) -> torch.Tensor:
    """(B, 2, K): the expert's logits with the image removed (text only) and with the text removed (image only)."""
    batch = next(iter(tensors[n] for names in plan.inputs.values() for n in names)).shape[0]
    doubled = {name: torch.cat([tensors[name], tensors[name]]) for names in plan.inputs.values() for name in names}
    first = torch.arange(2 * batch) < batch
    logits, _ = run_fusion(model, plan, doubled, {"image": first, "text": ~first}, fills)
    return torch.stack([logits[:batch], logits[batch:]], dim=1)


@torch.no_grad()
def neither_log_probs(model, plan: FusionPlan, example: dict, fills: dict | None = None) -> list[float]:
    """v(neither) of a two-modality expert: its log-probabilities with both modalities removed (any request's)."""
    one = {name: example[name][:1] for names in plan.inputs.values() for name in names}
    everything = torch.ones(1, dtype=torch.bool)
    logits, _ = run_fusion(model, plan, one, {"text": everything, "image": everything}, fills)
    return [round(float(v), 6) for v in F.log_softmax(logits, dim=1)[0]]


class CoalitionHead(nn.Module):
    """A cheap stand-in for an expert's fusion components with one modality removed: ``coalition_logits``
    (B, 2, K), what the expert answers from the text alone (its text inputs, pooled, through a small MLP) and
    from the image alone (likewise). Each answer depends on one modality only, as the expert's own does."""

    output_names = ("coalition_logits",)

    def __init__(self, inputs: list[dict], num_classes: int, hidden: int = HEAD_HIDDEN):
        super().__init__()
        self.inputs = [dict(i) for i in inputs]  # {"name", "modality", "shape" (per sample), "dtype"}
        self.input_names = tuple(i["name"] for i in self.inputs)
        self.num_classes = num_classes
        widths = {m: sum(_pooled_width(i) for i in self.inputs if i["modality"] == m) for m in attribution.MODALITIES}
        assert all(widths.values()), f"a head needs a float input per modality, got {self.inputs}"
        self.branches = nn.ModuleDict(
            {
                m: nn.Sequential(
                    nn.LayerNorm(width), nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
                )
                for m, width in widths.items()
            }
        )

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.answer(self.pool(*tensors))

    def pool(self, *tensors: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each modality's inputs as one vector per sample (no parameters: training pools once, up front)."""
        mask = next((v != 0 for i, v in zip(self.inputs, tensors, strict=True) if _is_int(i)), None)  # word mask
        pooled: dict[str, list] = {m: [] for m in attribution.MODALITIES}
        for spec, value in zip(self.inputs, tensors, strict=True):
            if not _is_int(spec):
                pooled[spec["modality"]].append(_pool(value, mask))
        return {m: torch.cat(vectors, dim=1) for m, vectors in pooled.items()}

    def answer(self, pooled: dict[str, torch.Tensor]) -> torch.Tensor:
        text_only = self.branches["text"](pooled["text"])  # (B, K): the image removed
        image_only = self.branches["image"](pooled["image"])  # (B, K): the text removed
        return torch.stack([text_only, image_only], dim=1)

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        made = []
        for spec in self.inputs:
            shape = (batch_size, *spec["shape"])
            if _is_int(spec):
                length = spec["shape"][-1]
                lengths = torch.randint(1, length + 1, (batch_size, 1))
                made.append(torch.randint(2, 50, shape) * (torch.arange(length)[None, :] < lengths))
            else:
                made.append(torch.relu(torch.randn(shape)))
        return tuple(made)

    def config(self) -> dict:
        return {"inputs": self.inputs, "num_classes": self.num_classes, "hidden": self.branches["text"][1].out_features}


def _is_int(spec: dict) -> bool:
    return spec["dtype"].startswith("int")


def _pooled_width(spec: dict) -> int:
    if _is_int(spec):
        return 0
    shape = spec["shape"]
    return shape[0] if len(shape) in (1, 3) else shape[-1]  # (D,), (C, h, w) -> C, (T, D) -> D


def _pool(value: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A per-sample vector of a feature tensor: (B, D) as it is, (B, C, h, w) averaged over the map, (B, T, D)
    averaged over the words (the mask's, when it has the same length)."""
    if value.dim() == 2:
        return value
    if value.dim() == 4:
        return value.mean(dim=(2, 3))
    if mask is not None and mask.shape[1] == value.shape[1]:
        weights = mask.to(value.dtype)[:, :, None]
        return (value * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    return value.mean(dim=1)


def head_inputs(plan: FusionPlan, tensors: dict[str, torch.Tensor]) -> list[dict]:
    """What a head for this plan reads: the fusion components' inputs, with their modality, shape and dtype."""
    return [
        {
            "name": name,
            "modality": modality,
            "shape": list(tensors[name].shape[1:]),
            "dtype": str(tensors[name].dtype).removeprefix("torch."),
        }  # fmt: skip
        for modality, names in plan.inputs.items()
        for name in names
    ]


def can_have_head(plan: FusionPlan, tensors: dict[str, torch.Tensor]) -> bool:
    """A head pools float features: each modality needs one among the fusion components' inputs."""
    specs = head_inputs(plan, tensors)
    return all(any(s["modality"] == m and not _is_int(s) for s in specs) for m in plan.modalities)


def train_head(head: CoalitionHead, pooled: dict[str, torch.Tensor], targets: torch.Tensor, *, seed: int):
    """Distil (N, 2, K) coalition logits into the head: cross-entropy against the expert's soft answers."""
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=1e-4)
    n = targets.shape[0]
    soft = F.softmax(targets, dim=2)
    generator = torch.Generator().manual_seed(seed)
    steps = HEAD_EPOCHS * math.ceil(n / 128)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    head.train()
    for _ in range(HEAD_EPOCHS):
        for index in torch.randperm(n, generator=generator).split(128):
            predicted = head.answer({m: v[index] for m, v in pooled.items()})
            loss = -(soft[index] * F.log_softmax(predicted, dim=2)).sum(2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    head.eval()
    return head


def importance_from_logits(logits: np.ndarray) -> np.ndarray:
    """(N, 2) importance of each row's own answer (its argmax under ``both``) from (N, 4, K) coalition logits."""
    probabilities = attribution.softmax(logits, axis=2)
    labels = probabilities[:, attribution.BOTH].argmax(axis=1)
    return attribution.shares(attribution.shapley(attribution.label_log_probs(probabilities, labels)))


# A source of batches: (expert, split) -> every tensor the expert's chain made on each batch ("logits" its own).
Batches = Callable[[str, str], Iterator[dict[str, torch.Tensor]]]


def fit_attribution(
    model,
    batches: Batches,
    *,
    costs: dict,
    budget: float,
    label_counts: np.ndarray,
    head_splits: tuple[str, ...],
    eval_splits: tuple[str, ...],
    fills: dict[str, dict] | None = None,
    seed: int = 0,
    log=print,
) -> tuple[dict, dict[str, CoalitionHead]]:
    """How each expert's answers are attributed, and the heads trained for it (module docstring, step 2).

    ``budget`` is the default estimate's allowance per request, as a share of the full path's MAdds. ``fills``
    gives each two-modality expert's declared missing-modality representation (expert -> modality -> tensor ->
    value); None: ``ABSENT`` everywhere (the built-in experts). Returns the entries model.json keeps per
    expert and the heads by expert."""
    plans = fusion_plans(model)
    counts = np.asarray(label_counts, np.float64)
    prior = [round(float(v), 6) for v in np.log((counts + 1.0) / (counts.sum() + len(counts)))]
    entries: dict[str, dict] = {}
    heads: dict[str, CoalitionHead] = {}
    for expert in model.experts:
        plan = plans[expert.name]
        if not plan.reads_both:
            entries[plan.expert] = {"method": "one_modality", "modalities": list(plan.modalities), "neither": prior,
                                    "madds": 0, "explain_madds": 0}  # fmt: skip
            continue
        expert_fills = (fills or {}).get(plan.expert) or {
            m: dict.fromkeys(names, attribution.ABSENT) for m, names in plan.inputs.items()
        }
        exact_madds = 2 * sum(costs["components"][c] for c in plan.components)
        first = next(batches(plan.expert, head_splits[0]))
        entry = {
            "method": "exact",
            "modalities": list(plan.modalities),
            "components": list(plan.components),
            "absent": expert_fills,
            "neither": neither_log_probs(model, plan, first, expert_fills),
            "madds": exact_madds,
            "explain_madds": exact_madds,
        }
        if exact_madds > budget * costs["full"]:
            if can_have_head(plan, first):
                head = _fit_head(model, plan, batches, head_splits, expert_fills, first, seed)
                heads[plan.expert] = head
                entry |= {"method": "head", "head": f"attribution.{plan.expert}", "madds": count_head_madds(head)}
            else:
                log(f"attribution of {plan.expert}: exact ({exact_madds:,} MAdds, over the budget): no float "
                    "features per modality for a head to pool")  # fmt: skip
        if plan.expert in heads:
            entry["agreement"] = {
                split: _agreement(model, plan, batches(plan.expert, split), heads[plan.expert], entry, expert_fills)
                for split in eval_splits
            }
            figures = ", ".join(f"{s} MAE {a['mae']:.3f}, sign {a['sign']:.1%}" for s, a in entry["agreement"].items())
            log(f"attribution of {plan.expert}: head {entry['madds']:,} MAdds (exact {exact_madds:,}): {figures}")
        entries[plan.expert] = entry
    return {"budget": budget, "experts": entries}, heads


def _fit_head(model, plan: FusionPlan, batches: Batches, splits, fills, first, seed: int) -> CoalitionHead:
    head = CoalitionHead(head_inputs(plan, first), num_classes=first["logits"].shape[1])
    pooled: dict[str, list] = {m: [] for m in attribution.MODALITIES}
    targets = []
    for split in splits:
        for batch in batches(plan.expert, split):
            with torch.no_grad():
                for m, v in head.pool(*(batch[name] for name in head.input_names)).items():
                    pooled[m].append(v)
            targets.append(coalition_logits(model, plan, batch, fills))
    return train_head(head, {m: torch.cat(v) for m, v in pooled.items()}, torch.cat(targets), seed=seed)


def count_head_madds(head: CoalitionHead) -> int:
    from models.costs import count_madds

    return count_madds(head)


@torch.no_grad()
def _agreement(model, plan: FusionPlan, split_batches, head: CoalitionHead, entry: dict, fills) -> dict:
    """The head's importance against the exact one on a split: mean absolute error, and how often the sign of
    image - text agrees."""
    exact, estimated = [], []
    neither = torch.tensor(entry["neither"])
    for batch in split_batches:
        both = batch["logits"]
        rest = neither.expand(both.shape[0], 1, -1)
        exact_pairs = coalition_logits(model, plan, batch, fills)
        head_pairs = head(*(batch[name] for name in head.input_names))
        exact.append(torch.cat([both[:, None], exact_pairs, rest], dim=1).numpy())
        estimated.append(torch.cat([both[:, None], head_pairs, rest], dim=1).numpy())
    if not exact:
        return {"n": 0}
    exact_importance = importance_from_logits(np.concatenate(exact))
    head_importance = importance_from_logits(np.concatenate(estimated))
    gap = exact_importance[:, 1] - exact_importance[:, 0], head_importance[:, 1] - head_importance[:, 0]
    return {
        "n": len(exact_importance),
        "mae": round(float(np.abs(exact_importance[:, 1] - head_importance[:, 1]).mean()), 4),
        "sign": round(float((np.sign(gap[0]) == np.sign(gap[1])).mean()), 4),
    }


def builtin_batches(model, splits: dict, batch_size: int = 256) -> Batches:
    """Batches of a built-in model's splits (``TensorSplit``s by name) through the text encoder and one expert's
    chain, in eval mode."""

    def batches(expert: str, split: str) -> Iterator[dict[str, torch.Tensor]]:
        data = splits[split]
        chain = ["text_encoder", *model.expert(expert).components]
        model.eval()
        for start in range(0, len(data), batch_size):
            inputs = {"token_ids": data.token_ids[start : start + batch_size],
                      "image": data.images[start : start + batch_size]}  # fmt: skip
            with torch.no_grad():
                yield model.run_components(chain, inputs, {})

    return batches


def rebuild_heads(entries: dict | None) -> dict[str, CoalitionHead]:
    """The trained heads of a checkpoint's ``attribution``, as components named ``attribution.<expert>``."""
    heads = {}
    for expert, saved in ((entries or {}).get("heads") or {}).items():
        head = CoalitionHead(**saved["config"])
        head.load_state_dict(saved["state_dict"])
        heads[f"attribution.{expert}"] = head.eval()
    return heads
