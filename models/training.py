"""Two-stage training, DynMM's way, with a lambda sweep over one set of experts.

Stage I trains every expert (and the shared encoders) at once, so no branch starves; the most
accurate expert on validation becomes the full path. Stage II freezes them and trains one router
per lambda with straight-through hard gates over a tempered softmax of the router's scores and the
resource-aware loss

    L = sum_i g_i * (CE(E_i(x), y) + lambda * C(E_i) / C(full))

where g is one-hot in the forward pass and carries the soft gate's gradient backwards. With the
experts frozen, their per-sample losses and the encoders' features are computed once and cached,
so each router trains in seconds. Every router shares the Stage I experts, which is what makes
them points on one accuracy/compute curve.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from models.attribution_training import builtin_batches, fit_attribution, fusion_plans, removal_loss
from models.costs import routing_costs
from models.data.manifest import check_labels, has_split, label_names, read_split
from models.data.tensors import TensorSplit, load_pixels, tensorize
from models.dynamic_fusion import DynamicFusionModel, preset_config
from models.evaluation import format_table, summarize
from models.policy import fit_temperature
from models.preprocess import ImagePreprocessing
from models.registry import create_model
from models.router import DualRouter
from models.router_selection import evaluate_split, policy_figures, routing_outputs, select_policy
from models.staging import staging_dir
from models.tokenizer import PAD_ID, UNK_ID, Tokenizer

CHECKPOINT = "checkpoint.pt"
SUMMARY = "summary.json"
RUN_FORMAT = "dynfuse-run/2"

STAGE1_EPOCHS = {"tiny": 20, "default": 14, "large": 20}
# Evaluated in this order: test and test_ood (captions from a held-out family, models/data/synthetic) when present.
EVALUATED_SPLITS = ("val", "test", "test_ood")


@dataclass
class TrainConfig:
    preset: str = "default"  # tiny | default | large (models/dynamic_fusion.py PRESETS)
    lambdas: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8)  # one router per value
    seed: int = 0
    stage1_epochs: int | None = None  # None: the preset's STAGE1_EPOCHS
    stage2_epochs: int = 100  # cheap: the routers train on cached features and losses
    batch_size: int = 64
    lr: float = 3e-3  # Stage I, AdamW with a one-cycle schedule
    weight_decay: float = 1e-4
    # Stage I replaces this share of the words with <unk>, so the text paths and the router have seen unknown
    # words before a request brings some: without it, <unk>'s embedding is never trained.
    word_dropout: float = 0.1
    # Stage I shifts each image by up to this many pixels (image_size / 16 when None): the experts memorized
    # the training images without it, and every routing figure suffers from an expert that looks better than it is.
    max_shift: int | None = None
    router_lr: float = 3e-3  # Stage II, Adam (1e-2 collapsed some routers onto one expert)
    # Stage II also learns from copies of the validation split whose captions lost words to <unk>, with the experts'
    # losses on those captions: a router that sees only the training family's captions keys on their template
    # words, and sends captions worded otherwise astray. Two kinds of copy: each word dropped on its own, this share
    # of them (one copy per value) ...
    stage2_word_dropout: tuple[float, ...] = (0.3, 0.6)
    # ... and this share of the vocabulary forgotten, every occurrence of a forgotten word <unk> (one copy per value
    # and draw). That is how captions from an unseen family read: the same few unknown words recur in every caption
    # that uses them, class words among them. With these copies the routers alone hold up on held-out test_ood
    # (bench/BENCHMARKS.md §12); with the word-level copies alone the cheapest fell 5 points below the full path.
    stage2_vocab_dropout: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)
    stage2_vocab_draws: int = 2
    # Stage II's two supervised terms beside DynMM's loss (see train_router): the fused gate towards each sample's
    # best expert, and each modality's router on its own towards it.
    best_expert_weight: float = 1.0
    router_alone_weight: float = 1.0
    router_folds: int = 2  # the validation split is cross-fitted in this many folds to choose the served router
    # The default importance may cost this share of the full path's MAdds per request: experts whose exact values
    # cost more get a distilled head (models/attribution_training.py).
    attribution_budget: float = 0.02
    temperature: float = 1.0  # of the gate's softmax at the end of Stage II (the authors' code: 1)
    temperature_start: float = 1.0  # annealed linearly to `temperature`; > 1 keeps every expert's gradient alive early
    gumbel: bool = False  # add Gumbel noise to the gate logits (the paper's option; the authors' code: off)
    # The served policy: the cheapest router alone whose accuracy is within this of the full expert's on validation
    # and on each reworded copy (models/router_selection.py select_policy). One point: what users are promised of
    # `auto` against the full path, also on captions worded otherwise (issue 22).
    select_tolerance: float = 0.01
    threads: int | None = None  # torch intra-op threads; None: all cores
    model_overrides: dict = field(
        default_factory=dict
    )  # config fields over the preset's, e.g. experts or expert_configs

    def __post_init__(self) -> None:
        self.lambdas = tuple(float(v) for v in self.lambdas)
        if not self.lambdas:
            raise ValueError("lambdas is empty: give at least one value, e.g. --lambdas 0,0.1")
        if any(v < 0 or not math.isfinite(v) for v in self.lambdas):
            raise ValueError(f"lambdas must be finite and >= 0, got {self.lambdas}")
        if self.preset not in STAGE1_EPOCHS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(STAGE1_EPOCHS)}")
        if not 0.0 <= self.word_dropout < 1.0:
            raise ValueError(f"word_dropout must be in [0, 1), got {self.word_dropout}")
        self.stage2_word_dropout = tuple(float(v) for v in self.stage2_word_dropout)
        if any(not 0.0 < v < 1.0 for v in self.stage2_word_dropout):
            raise ValueError(f"stage2_word_dropout values must be in (0, 1), got {self.stage2_word_dropout}")
        self.stage2_vocab_dropout = tuple(float(v) for v in self.stage2_vocab_dropout)
        if any(not 0.0 < v < 1.0 for v in self.stage2_vocab_dropout):
            raise ValueError(f"stage2_vocab_dropout values must be in (0, 1), got {self.stage2_vocab_dropout}")
        if isinstance(self.stage2_vocab_draws, bool) or not isinstance(self.stage2_vocab_draws, int):
            raise ValueError(f"stage2_vocab_draws must be an integer, got {self.stage2_vocab_draws!r}")
        if self.stage2_vocab_draws < 1:
            raise ValueError(f"stage2_vocab_draws must be at least 1, got {self.stage2_vocab_draws}")

    @property
    def epochs(self) -> int:
        return self.stage1_epochs if self.stage1_epochs is not None else STAGE1_EPOCHS[self.preset]


@dataclass
class Dataset:
    labels: list[str]
    tokenizer: Tokenizer
    preprocessing: ImagePreprocessing
    splits: dict[str, TensorSplit] = field(default_factory=dict)


def load_dataset(data_dir: Path, image_size: int, max_tokens: int, *, progress: bool, log=print) -> Dataset:
    """Read train/val, and test and test_ood when they are there and labelled; the tokenizer and the image
    statistics come from train alone."""
    samples = {"train": read_split(data_dir, "train"), "val": read_split(data_dir, "val")}
    for split in EVALUATED_SPLITS[1:]:
        if not has_split(data_dir, split):
            continue
        evaluated = read_split(data_dir, split, require_label=False)
        if all(s.label is not None for s in evaluated):
            samples[split] = evaluated
        else:  # Hateful Memes ships its test split without labels
            log(f"the {split} split has no labels: it is not evaluated")
    labels = label_names(samples["train"])
    for split in samples:
        if split != "train":
            check_labels(samples[split], labels)
    tokenizer = Tokenizer.build((s.text for s in samples["train"]), max_tokens=max_tokens)
    pixels = {name: load_pixels(s, image_size, progress=progress, desc=f"{name} images") for name, s in samples.items()}
    # The statistics of x / 255 in float32, as normalize computes it.
    train_pixels = (pixels["train"].reshape(-1, 3).astype(np.float32) / np.float32(255.0)).astype(np.float64)
    mean = tuple(round(float(v), 6) for v in train_pixels.mean(0))
    std = tuple(round(max(float(v), 1e-3), 6) for v in train_pixels.std(0))
    preprocessing = ImagePreprocessing(image_size, mean, std)
    dataset = Dataset(labels, tokenizer, preprocessing)
    for name, split_samples in samples.items():
        dataset.splits[name] = tensorize(split_samples, pixels[name], tokenizer, preprocessing, labels)
    return dataset


def train(data_dir: Path, run_dir: Path, config: TrainConfig, *, progress: bool = True, log=print) -> dict:
    """Train a model family on a manifest directory and write the run directory; returns the summary."""
    run_dir = Path(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"run directory {run_dir} is not empty; choose another --out or remove it")
    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    model_name = f"dynamic_fusion_{config.preset}"
    base = preset_config(config.preset, **config.model_overrides)  # what the data needs: sizes, max tokens
    dataset = load_dataset(Path(data_dir), base.image_size, base.max_tokens, progress=progress, log=log)
    torch.manual_seed(config.seed)
    model: DynamicFusionModel = create_model(
        model_name, **config.model_overrides, num_classes=len(dataset.labels), vocab_size=dataset.tokenizer.vocab_size
    )
    log(
        f"{model_name}: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"experts {', '.join(e.name for e in model.experts)}, {len(dataset.labels)} classes, "
        f"vocabulary {dataset.tokenizer.vocab_size}, "
        + ", ".join(f"{name} {len(split)}" for name, split in dataset.splits.items())
    )

    history = train_experts(model, dataset.splits["train"], dataset.splits["val"], config, progress=progress)
    cache = {name: expert_outputs(model, split) for name, split in dataset.splits.items() if name != "train"}
    cache["val"]["augmented"] = caption_variants(model, dataset.splits["val"], config)
    full_expert = choose_full_expert(model, cache["val"], dataset.splits["val"])
    costs = routing_costs(model, full_expert)
    log(f"full path: {full_expert} (the most accurate expert on validation), {costs['full']:,} MAdds")
    attribution = train_attribution(model, dataset, costs, config, log=log)
    routers, default_router, evaluation = train_routers(
        model, dataset, cache, costs, full_expert, config, progress=progress
    )
    headline = evaluation.get("test", evaluation["val"])

    elapsed = time.perf_counter() - started
    checkpoint = {
        "format": RUN_FORMAT,
        "model_name": model_name,
        "config": model.config.to_dict(),
        "state_dict": model.state_dict(),
        "routers": router_entries(routers),
        "default_router": default_router,
        "default_min_confidence": evaluation["default_min_confidence"],
        "labels": dataset.labels,
        "tokenizer": dataset.tokenizer.to_dict(),
        "preprocessing": dataset.preprocessing.to_dict(),
        "experts": [e.to_dict() for e in model.experts],
        "full_expert": full_expert,
        "shared_encoders": dict(model.shared_encoders),
        "madds": costs,
        "attribution": attribution,
        "train_config": asdict(config),
        "data": {"dir": str(Path(data_dir).resolve()), "sizes": {k: len(v) for k, v in dataset.splits.items()}},
        "evaluation": evaluation,
        "history": history,
        "train_seconds": round(elapsed, 1),
    }
    summary = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "routers")}
    summary["attribution"] = {k: v for k, v in attribution.items() if k != "heads"}
    _write_run_dir(run_dir, checkpoint, summary)
    log(f"\n{'test' if 'test' in evaluation else 'validation'} split, served router {default_router}:")
    log(format_table(headline))
    log(f"trained in {elapsed:.0f} s -> {run_dir}")
    return summary


def train_experts(
    model: DynamicFusionModel, train: TensorSplit, val: TensorSplit, config: TrainConfig, *, progress: bool
):
    """Stage I: every expert, the shared encoders, the glimpse probe and the families' own regularizers, one
    summed loss."""
    params = [p for name, p in model.named_parameters() if not name.startswith("router.")]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.15
    )
    generator = torch.Generator().manual_seed(config.seed)
    max_shift = config.max_shift if config.max_shift is not None else train.images.shape[-1] // 16
    plans = fusion_plans(model)
    history = []
    epochs = tqdm(range(config.epochs), desc="stage I (experts)", disable=not progress)
    for epoch in epochs:
        model.train()
        order = torch.randperm(len(train), generator=generator)
        total = 0.0
        batches = tqdm(order.split(config.batch_size), desc=f"epoch {epoch + 1}", leave=False, disable=not progress)
        for index in batches:
            tokens = drop_words(train.token_ids[index], config.word_dropout, generator)
            images = shift_images(train.images[index], max_shift, generator)
            labels = train.labels[index]
            logits, tensors = model.forward_experts(tokens, images)
            loss = sum(model.expert_loss(expert, out, tensors, labels) for expert, out in logits.items())
            loss = loss + F.cross_entropy(model.glimpse_logits(images), labels) + model.auxiliary_loss(tensors)
            loss = loss + removal_loss(model, plans, tensors, labels, generator)  # what attribution asks of them
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(index)
        accuracy = expert_accuracy(expert_outputs(model, val), val)
        history.append({"stage": 1, "epoch": epoch + 1, "loss": total / len(train), "val_accuracy": accuracy})
        epochs.set_postfix(loss=f"{total / len(train):.3f}", **{k: f"{v:.3f}" for k, v in accuracy.items()})
    model.eval()
    return history


def train_attribution(model: DynamicFusionModel, dataset: Dataset, costs: dict, config: TrainConfig, *, log) -> dict:
    """How each expert's answers are attributed to the modalities, with the heads distilled for the experts whose
    exact values cost more than the budget (trained on the training and validation splits, checked on the
    others); what the checkpoint keeps under ``attribution``."""
    evaluated = tuple(s for s in EVALUATED_SPLITS[1:] if s in dataset.splits)
    entries, heads = fit_attribution(
        model,
        builtin_batches(model, dataset.splits),
        costs=costs,
        budget=config.attribution_budget,
        label_counts=np.bincount(dataset.splits["train"].labels.numpy(), minlength=len(dataset.labels)),
        head_splits=("train", "val"),
        eval_splits=evaluated,
        seed=config.seed,
        log=log,
    )
    return entries | {"heads": {e: {"config": h.config(), "state_dict": h.state_dict()} for e, h in heads.items()}}


def drop_words(token_ids: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Each word (not padding) becomes <unk> with probability ``rate``."""
    if rate == 0:
        return token_ids
    dropped = (torch.rand(token_ids.shape, generator=generator) < rate) & (token_ids != PAD_ID)
    return torch.where(dropped, torch.full_like(token_ids, UNK_ID), token_ids)


def forget_words(token_ids: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Each word of the vocabulary is forgotten with probability ``rate``; every occurrence of a forgotten word
    becomes <unk>. Unlike ``drop_words``, a caption loses the same words wherever they occur."""
    # Ids up to the highest present (and <unk>'s, for captions that are all padding: an image-only data set).
    vocabulary = max(int(token_ids.max()) if token_ids.numel() else 0, UNK_ID) + 1
    forgotten = torch.rand(vocabulary, generator=generator) < rate
    forgotten[PAD_ID] = False
    forgotten[UNK_ID] = False
    return torch.where(forgotten[token_ids], torch.full_like(token_ids, UNK_ID), token_ids)


def caption_variant_names(config: TrainConfig) -> list[str]:
    """What each of ``caption_variants``' copies is, in order: ``words_<rate>``, then ``vocabulary_<rate>#<draw>``."""
    return [f"words_{rate:g}" for rate in config.stage2_word_dropout] + [
        f"vocabulary_{rate:g}#{draw + 1}"
        for draw in range(config.stage2_vocab_draws if config.stage2_vocab_dropout else 0)
        for rate in config.stage2_vocab_dropout
    ]


def caption_variants(model: DynamicFusionModel, split: TensorSplit, config: TrainConfig) -> list[dict]:
    """``expert_outputs`` of the split's copies Stage II adds to it (``cache["augmented"]``): once per
    ``config.stage2_word_dropout`` rate with that share of the words replaced by <unk>, then once per
    ``config.stage2_vocab_dropout`` rate and draw with that share of the vocabulary forgotten."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    copies = [drop_words(split.token_ids, rate, generator) for rate in config.stage2_word_dropout]
    for _ in range(config.stage2_vocab_draws if config.stage2_vocab_dropout else 0):
        copies += [forget_words(split.token_ids, rate, generator) for rate in config.stage2_vocab_dropout]
    return [expert_outputs(model, dataclasses.replace(split, token_ids=token_ids)) for token_ids in copies]


def shift_images(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by up to ``max_shift`` pixels each way, its border repeated into the gap. A few pixels
    keep every label true: the objects stay whole and in the same order from left to right and top to bottom."""
    if max_shift == 0:
        return images
    side = images.shape[-1]
    padded = F.pad(images, (max_shift,) * 4, mode="replicate")  # (B, 3, S + 2m, S + 2m)
    offsets = torch.randint(0, 2 * max_shift + 1, (images.shape[0], 2), generator=generator).tolist()
    return torch.stack([padded[i, :, y : y + side, x : x + side] for i, (y, x) in enumerate(offsets)])


def expert_accuracy(outputs: dict, split: TensorSplit) -> dict[str, float]:
    return {e: float((logits.argmax(1) == split.labels).float().mean()) for e, logits in outputs["logits"].items()}


def choose_full_expert(model: DynamicFusionModel, val_outputs: dict, val: TensorSplit) -> str:
    """The full path: the most accurate expert on validation; among equals, the cheapest."""
    accuracy = expert_accuracy(val_outputs, val)
    static = routing_costs(model)["static"]
    return max(model.experts, key=lambda e: (round(accuracy[e.name], 6), -static[e.name])).name


@torch.no_grad()
def expert_outputs(model: DynamicFusionModel, split: TensorSplit, batch_size: int = 256) -> dict:
    """Frozen-model outputs Stage II and evaluation need: features, each expert's logits and losses."""
    model.eval()
    parts: dict[str, list] = {"text_features": [], "glimpse_features": [], "logits": []}
    for start in range(0, len(split), batch_size):
        tokens = split.token_ids[start : start + batch_size]
        images = split.images[start : start + batch_size]
        logits, tensors = model.forward_experts(tokens, images)
        parts["text_features"].append(tensors["text_features"])
        parts["glimpse_features"].append(model.glimpse(images))
        parts["logits"].append(logits)
    logits = {e.name: torch.cat([p[e.name] for p in parts["logits"]]) for e in model.experts}
    losses = torch.stack([F.cross_entropy(logits[e.name], split.labels, reduction="none") for e in model.experts], 1)
    return {
        "text_features": torch.cat(parts["text_features"]),  # (N, Dt)
        "glimpse_features": torch.cat(parts["glimpse_features"]),  # (N, Dg)
        "logits": logits,  # expert -> (N, K)
        "losses": losses,  # (N, E) in router order
    }


def train_routers(
    model, dataset: Dataset, cache: dict, costs: dict, full_expert: str, config: TrainConfig, *, progress: bool
) -> tuple[list[dict], str, dict]:
    """Stage II over frozen experts: one router per lambda, the served one chosen, every split evaluated.

    ``cache`` holds the experts' outputs per split (``expert_outputs``); ``model`` needs ``experts`` and
    ``new_router()`` (the router-only path of models/byo comes here too). Returns the routers, the served
    router's name (its weights also loaded into ``model.router``) and the evaluation per split, with its summary.
    """
    # Stage II learns from the experts' outputs on the validation split, which they never trained on: on their
    # own training split they look far better than they are (a small CNN recalls images it has seen), and a
    # router taught there sends hard inputs to cheap experts. The served router is chosen on validation too,
    # from routes made by routers that did not see the sample (cross-fitting), so its figures are honest.
    routers, validation_routes = [], {}
    for lam in tqdm(config.lambdas, desc="stage II (routers)", disable=not progress):
        name = f"lambda_{lam:g}"
        validation_routes[name] = cross_fitted_routes(model, cache["val"], costs, lam, config)
        router = train_router(model, cache["val"], costs, lam, config)
        temperature = calibrated_temperature(model, cache["val"], costs, lam, validation_routes[name])
        # The cross-fitted scores travel with the run: export measures what "safe routing" means on them.
        routers.append({"name": name, "lambda": lam, "router": router, "temperature": temperature,
                        "validation_scores": validation_routes[name]["scores"]})  # fmt: skip

    context = {"model": model, "routers": routers, "costs": costs, "full_expert": full_expert}
    val = dataset.splits["val"]
    # The same validation samples with their captions reworded (word dropout), routed by the same cross-fitted
    # routers: the served policy (a router, maybe with a confidence floor) must hold up there too.
    variant_routes = [
        (variant, {n: r["variants"][k] for n, r in validation_routes.items()})
        for k, variant in enumerate(cache["val"].get("augmented") or [])
    ]
    default_router, default_floor = select_policy(
        routing_outputs(**context, split=val, outputs=cache["val"], routes=validation_routes),
        routers,
        config.select_tolerance,
        [routing_outputs(**context, split=val, outputs=v, routes=r) for v, r in variant_routes],
    )
    reworded = [evaluate_split(**context, split=val, outputs=v, routes=r) for v, r in variant_routes]
    model.router.load_state_dict(next(r for r in routers if r["name"] == default_router)["router"].state_dict())
    served = {"default_router": default_router, "default_min_confidence": default_floor}
    evaluation = {"val": evaluate_split(**context, split=val, outputs=cache["val"], routes=validation_routes,
                                        **served)}  # fmt: skip
    if reworded:  # what the selection saw of each router on the reworded captions
        evaluation["val_reworded"] = [
            {
                "copy": name,
                "policies": [policy_figures(row) for row in rows if row["policy"].startswith(("full", "lambda="))],
            }
            for name, rows in zip(caption_variant_names(config), reworded, strict=True)
        ]
    for split in EVALUATED_SPLITS[1:]:
        if split in dataset.splits:
            routes = {r["name"]: route(r["router"], cache[split]) for r in routers}
            evaluation[split] = evaluate_split(**context, split=dataset.splits[split], outputs=cache[split],
                                               routes=routes, **served)  # fmt: skip
    evaluation["default_router"] = default_router
    evaluation["default_min_confidence"] = default_floor
    evaluation["summary"] = summarize(evaluation.get("test", evaluation["val"]))
    return routers, default_router, evaluation


def train_router(model: DynamicFusionModel, cache: dict, costs: dict, lam: float, config: TrainConfig) -> DualRouter:
    """Stage II for one lambda: the resource-aware loss with straight-through hard gates, frozen experts.

    Each sample's penalty for expert i is CE(E_i(x), y) + lambda * C(E_i) / C(full); DynMM's loss is the penalty
    of the expert the hard gate picks, with the gradient of the tempered softmax. Alone, that gate commits
    early: once its softmax is nearly one-hot, the experts it does not pick get no gradient, and a router that
    first favoured a strong expert for every input keeps doing so even where a cheap one is as good. Two
    supervised terms keep every expert in play: the fused gate's cross-entropy towards the sample's best
    expert (the one of least penalty), and each modality's router on its own towards the same target (a
    per-expert sigmoid, as DRDF's routers are). The second is what lets each router's weights say what its
    own modality can tell, and so what makes MWF's importance mean something.
    """
    torch.manual_seed(config.seed)
    router = model.new_router()
    optimizer = torch.optim.Adam(router.parameters(), lr=config.router_lr)
    cache = with_variants(cache)  # the samples, then each caption variant of them (``caption_variants``)
    penalty = routing_penalty(model, cache, costs, lam)  # (N, E): what choosing each expert costs this sample
    best = penalty.argmin(dim=1)  # (N,)
    best_one_hot = F.one_hot(best, penalty.shape[1]).to(penalty.dtype)
    n = penalty.shape[0]
    present = torch.ones(n)
    generator = torch.Generator().manual_seed(config.seed)
    for epoch in range(config.stage2_epochs):
        progress = epoch / max(config.stage2_epochs - 1, 1)
        temperature = config.temperature_start + (config.temperature - config.temperature_start) * progress
        for index in torch.randperm(n, generator=generator).split(max(config.batch_size, 128)):
            text_features, glimpse_features = cache["text_features"][index], cache["glimpse_features"][index]
            gate_logits, _ = router.gate_logits(text_features, glimpse_features, present[index], present[index])
            if config.gumbel:
                uniform = torch.rand(gate_logits.shape, generator=generator).clamp(1e-9, 1 - 1e-9)
                gate_logits = gate_logits - torch.log(-torch.log(uniform))
            soft = F.softmax(gate_logits / temperature, dim=1)
            hard = F.one_hot(soft.argmax(1), soft.shape[1]).to(soft.dtype)
            gate = hard - soft.detach() + soft  # forward: one-hot; backward: the soft gate's gradient
            loss = (gate * penalty[index]).sum(1).mean()
            loss = loss + config.best_expert_weight * F.cross_entropy(gate_logits, best[index])
            alone = sum(
                F.binary_cross_entropy_with_logits(logits, best_one_hot[index])
                for logits in router.router_logits(text_features, glimpse_features)
            )
            loss = loss + config.router_alone_weight * alone
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    router.eval()
    return router


def with_variants(cache: dict) -> dict:
    """A cache with the rows of its caption variants (``cache["augmented"]``) after its own; as it is without."""
    variants = cache.get("augmented") or []
    if not variants:
        return cache
    parts = [cache, *variants]
    joined = {key: torch.cat([part[key] for part in parts]) for key in ("text_features", "glimpse_features", "losses")}
    joined["logits"] = {e: torch.cat([part["logits"][e] for part in parts]) for e in cache["logits"]}
    return joined


def routing_penalty(model, cache: dict, costs: dict, lam: float) -> torch.Tensor:
    """(N, E): each sample's cross-entropy under each expert plus lambda times the expert's relative cost."""
    relative_cost = torch.tensor([costs["path"][e.name] / costs["full"] for e in model.experts])  # (E,)
    return cache["losses"] + lam * relative_cost


def calibrated_temperature(model, cache: dict, costs: dict, lam: float, routes: dict) -> float:
    """Temperature scaling of a router's scores on validation (its cross-fitted routes), against each sample's
    least-penalty expert: the scaled score of the chosen expert then says how often that choice is the
    right one, so a threshold on it escalates the choices the router is right to doubt."""
    targets = routing_penalty(model, cache, costs, lam).argmin(dim=1).numpy()
    return round(fit_temperature(routes["scores"].numpy(), targets), 4)


def cross_fitted_routes(model, cache: dict, costs: dict, lam: float, config: TrainConfig) -> dict:
    """Routes for every sample of ``cache`` from routers trained on the other folds: honest validation figures."""
    n = cache["losses"].shape[0]
    folds = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed)) % max(
        1, min(config.router_folds, n)
    )

    def empty() -> dict:
        return {
            "scores": torch.zeros(n, len(model.experts)),
            "importance": torch.zeros(n, 2),
            "weights": torch.zeros(n, len(model.experts)),
        }

    variants = cache.get("augmented") or []
    routes = empty() | {"variants": [empty() for _ in variants]}  # the caption variants' rows, routed likewise
    for fold in folds.unique():
        held_out = folds == fold
        train_part = {k: _rows(v, ~held_out) for k, v in cache.items()}
        router = train_router(model, train_part, costs, lam, config) if (~held_out).any() else model.new_router()
        for target, outputs in ((routes, cache), *zip(routes["variants"], variants, strict=True)):
            for name, values in route(router, {k: _rows(v, held_out) for k, v in outputs.items()}).items():
                target[name][held_out] = values
    return routes


def _rows(value, mask: torch.Tensor):
    if isinstance(value, list):  # caption variants: the same rows of each
        return [_rows(variant, mask) for variant in value]
    return {k: _rows(v, mask) for k, v in value.items()} if isinstance(value, dict) else value[mask]


@torch.no_grad()
def route(router: DualRouter, outputs: dict) -> dict:
    """The router's scores (N, E), importance (N, 2) and fused weights (N, E) on cached features, both
    modalities present."""
    present = torch.ones(outputs["text_features"].shape[0])
    scores, importance, weights = router(outputs["text_features"], outputs["glimpse_features"], present, present)
    return {"scores": scores, "importance": importance, "weights": weights}


def _write_run_dir(run_dir: Path, checkpoint: dict, summary: dict) -> None:
    """Write into a temporary sibling and rename, so a failed run leaves no half-written directory."""
    staging = staging_dir(run_dir)
    try:
        torch.save(checkpoint, staging / CHECKPOINT)
        (staging / SUMMARY).write_text(json.dumps(summary, indent=1, default=_json_default) + "\n")
        if run_dir.exists():
            run_dir.rmdir()  # empty, checked at the start
        os.replace(staging, run_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def load_run(run_dir: Path) -> dict:
    """The checkpoint of a run directory, checked for format."""
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a directory written by `dynfuse train`?")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if checkpoint.get("format") != RUN_FORMAT:
        raise ValueError(f"{path}: unsupported run format {checkpoint.get('format')!r}, expected {RUN_FORMAT}")
    return checkpoint


def rebuild_model(checkpoint: dict) -> DynamicFusionModel:
    """The trained model (served router loaded) from a checkpoint alone."""
    model = create_model(checkpoint["model_name"], **checkpoint["config"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def rebuild_routers(checkpoint: dict, model: DynamicFusionModel) -> dict[str, DualRouter]:
    routers = {}
    for entry in checkpoint["routers"]:
        router = model.new_router()
        router.load_state_dict(entry["state_dict"])
        routers[entry["name"]] = router.eval()
    return routers


def router_entries(routers: list[dict]) -> list[dict]:
    """The trained routers as a run checkpoint stores them: name, lambda, temperature, weights, and the
    cross-fitted scores on validation (export measures the model's safety figures on them)."""
    return [
        {
            "name": r["name"],
            "lambda": r["lambda"],
            "temperature": r["temperature"],
            "state_dict": r["router"].state_dict(),
            **({"validation_scores": r["validation_scores"]} if "validation_scores" in r else {}),
        }
        for r in routers
    ]
