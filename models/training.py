"""Two-stage training, DynMM's way, with a lambda sweep over one set of experts.

Stage I trains every expert (and the shared encoders) at once, so no branch starves. Stage II
freezes them and trains one router per lambda with straight-through hard gates over a tempered
softmax of the router's scores and the resource-aware loss

    L = sum_i g_i * (CE(E_i(x), y) + lambda * C(E_i) / C(full))

where g is one-hot in the forward pass and carries the soft gate's gradient backwards. With the
experts frozen, their per-sample losses and the encoders' features are computed once and cached,
so each router trains in seconds. Every router shares the Stage I experts, which is what makes
them points on one accuracy/compute curve.
"""

from __future__ import annotations

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

from models.costs import routing_costs
from models.data.manifest import check_labels, has_split, label_names, read_split
from models.data.tensors import TensorSplit, load_pixels, tensorize
from models.dynamic_fusion import PRESETS, DynamicFusionConfig, DynamicFusionModel
from models.evaluation import RoutingOutputs, evaluate_policies, find_row, format_table, summarize
from models.preprocess import ImagePreprocessing
from models.registry import create_model
from models.router import DualRouter
from models.staging import staging_dir
from models.tokenizer import Tokenizer

CHECKPOINT = "checkpoint.pt"
SUMMARY = "summary.json"
RUN_FORMAT = "dynfuse-run/1"

STAGE1_EPOCHS = {"tiny": 20, "default": 10, "large": 20}


@dataclass
class TrainConfig:
    preset: str = "default"  # tiny | default | large (models/dynamic_fusion.py PRESETS)
    lambdas: tuple[float, ...] = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)  # one router per value
    seed: int = 0
    stage1_epochs: int | None = None  # None: the preset's STAGE1_EPOCHS
    stage2_epochs: int = 100  # cheap: the routers train on cached features and losses
    batch_size: int = 64
    lr: float = 3e-3  # Stage I, AdamW with a cosine schedule
    weight_decay: float = 1e-4
    router_lr: float = 3e-3  # Stage II, Adam (1e-2 collapsed some routers onto one expert)
    temperature: float = 1.0  # of the gate's softmax at the end of Stage II (the authors' code: 1)
    temperature_start: float = 1.0  # annealed linearly to `temperature`; > 1 keeps every expert's gradient alive early
    gumbel: bool = False  # add Gumbel noise to the gate logits (the paper's option; the authors' code: off)
    # The served router: the cheapest on validation whose accuracy is within this of the full expert's.
    select_tolerance: float = 0.005
    threads: int | None = None  # torch intra-op threads; None: all cores

    def __post_init__(self) -> None:
        self.lambdas = tuple(float(v) for v in self.lambdas)
        if not self.lambdas:
            raise ValueError("lambdas is empty: give at least one value, e.g. --lambdas 0,0.1")
        if any(v < 0 or not math.isfinite(v) for v in self.lambdas):
            raise ValueError(f"lambdas must be finite and >= 0, got {self.lambdas}")
        if self.preset not in STAGE1_EPOCHS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(STAGE1_EPOCHS)}")

    @property
    def epochs(self) -> int:
        return self.stage1_epochs if self.stage1_epochs is not None else STAGE1_EPOCHS[self.preset]


@dataclass
class Dataset:
    labels: list[str]
    tokenizer: Tokenizer
    preprocessing: ImagePreprocessing
    splits: dict[str, TensorSplit] = field(default_factory=dict)


def load_dataset(data_dir: Path, config: DynamicFusionConfig, *, progress: bool, log=print) -> Dataset:
    """Read train/val (and a labelled test split when present); tokenizer and image statistics come from train."""
    samples = {"train": read_split(data_dir, "train"), "val": read_split(data_dir, "val")}
    if has_split(data_dir, "test"):
        test = read_split(data_dir, "test", require_label=False)
        if all(s.label is not None for s in test):
            samples["test"] = test
        else:  # Hateful Memes ships its test split without labels
            log("the test split has no labels: figures are reported on the validation split")
    labels = label_names(samples["train"])
    for split in ("val", "test"):
        if split in samples:
            check_labels(samples[split], labels)
    tokenizer = Tokenizer.build((s.text for s in samples["train"]), max_tokens=config.max_tokens)
    pixels = {
        name: load_pixels(s, config.image_size, progress=progress, desc=f"{name} images") for name, s in samples.items()
    }
    # The statistics of x / 255 in float32, as normalize computes it.
    train_pixels = (pixels["train"].reshape(-1, 3).astype(np.float32) / np.float32(255.0)).astype(np.float64)
    mean = tuple(round(float(v), 6) for v in train_pixels.mean(0))
    std = tuple(round(max(float(v), 1e-3), 6) for v in train_pixels.std(0))
    preprocessing = ImagePreprocessing(config.image_size, mean, std)
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
    torch.manual_seed(config.seed)
    model_name = f"dynamic_fusion_{config.preset}"
    base_config = DynamicFusionConfig(**PRESETS[config.preset])  # what the data needs: sizes, max tokens
    dataset = load_dataset(Path(data_dir), base_config, progress=progress, log=log)
    torch.manual_seed(config.seed)
    model: DynamicFusionModel = create_model(
        model_name, num_classes=len(dataset.labels), vocab_size=dataset.tokenizer.vocab_size
    )
    costs = routing_costs(model)
    log(
        f"{model_name}: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{len(dataset.labels)} classes, vocabulary {dataset.tokenizer.vocab_size}, "
        + ", ".join(f"{name} {len(split)}" for name, split in dataset.splits.items())
    )

    history = train_experts(model, dataset.splits["train"], dataset.splits["val"], config, progress=progress)
    cache = {name: _expert_outputs(model, split) for name, split in dataset.splits.items()}
    routers = []
    for lam in tqdm(config.lambdas, desc="stage II (routers)", disable=not progress):
        router = train_router(model, cache["train"], costs, lam, config)
        routers.append({"name": f"lambda_{lam:g}", "lambda": lam, "router": router})

    validation = _evaluate(model, dataset, cache, routers, costs, "val", default_router=routers[0]["name"])
    default_router = select_router(validation, routers, config.select_tolerance)
    validation = _evaluate(model, dataset, cache, routers, costs, "val", default_router=default_router)
    model.router.load_state_dict(next(r for r in routers if r["name"] == default_router)["router"].state_dict())
    evaluation = {"default_router": default_router, "val": validation}
    if "test" in dataset.splits:
        evaluation["test"] = _evaluate(model, dataset, cache, routers, costs, "test", default_router=default_router)
    headline = evaluation.get("test", validation)
    evaluation["summary"] = summarize(headline)

    elapsed = time.perf_counter() - started
    checkpoint = {
        "format": RUN_FORMAT,
        "model_name": model_name,
        "config": model.config.to_dict(),
        "state_dict": model.state_dict(),
        "routers": [
            {"name": r["name"], "lambda": r["lambda"], "state_dict": r["router"].state_dict()} for r in routers
        ],
        "default_router": default_router,
        "labels": dataset.labels,
        "tokenizer": dataset.tokenizer.to_dict(),
        "preprocessing": dataset.preprocessing.to_dict(),
        "experts": [e.to_dict() for e in model.experts],
        "full_expert": model.full_expert,
        "shared_encoders": dict(model.shared_encoders),
        "madds": costs,
        "train_config": asdict(config),
        "data": {"dir": str(Path(data_dir).resolve()), "sizes": {k: len(v) for k, v in dataset.splits.items()}},
        "evaluation": evaluation,
        "history": history,
        "train_seconds": round(elapsed, 1),
    }
    summary = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "routers")}
    _write_run_dir(run_dir, checkpoint, summary)
    log(f"\n{'test' if 'test' in evaluation else 'validation'} split, served router {default_router}:")
    log(format_table(headline))
    log(f"trained in {elapsed:.0f} s -> {run_dir}")
    return summary


def train_experts(
    model: DynamicFusionModel, train: TensorSplit, val: TensorSplit, config: TrainConfig, *, progress: bool
):
    """Stage I: every expert, the shared encoders and the glimpse probe, one summed cross-entropy."""
    params = [p for name, p in model.named_parameters() if not name.startswith("router.")]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.15
    )
    generator = torch.Generator().manual_seed(config.seed)
    history = []
    epochs = tqdm(range(config.epochs), desc="stage I (experts)", disable=not progress)
    for epoch in epochs:
        model.train()
        order = torch.randperm(len(train), generator=generator)
        total = 0.0
        batches = tqdm(order.split(config.batch_size), desc=f"epoch {epoch + 1}", leave=False, disable=not progress)
        for index in batches:
            tokens, images, labels = train.token_ids[index], train.images[index], train.labels[index]
            logits = model.expert_logits(tokens, images)
            loss = sum(F.cross_entropy(out, labels) for out in logits.values())
            loss = loss + F.cross_entropy(model.glimpse_logits(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(index)
        accuracy = {name: float(acc) for name, acc in _expert_accuracy(model, val).items()}
        history.append({"stage": 1, "epoch": epoch + 1, "loss": total / len(train), "val_accuracy": accuracy})
        epochs.set_postfix(loss=f"{total / len(train):.3f}", **{k: f"{v:.3f}" for k, v in accuracy.items()})
    model.eval()
    return history


@torch.no_grad()
def _expert_accuracy(model: DynamicFusionModel, split: TensorSplit) -> dict[str, float]:
    outputs = _expert_outputs(model, split)
    return {e: float((outputs["logits"][e].argmax(1) == split.labels).float().mean()) for e in outputs["logits"]}


@torch.no_grad()
def _expert_outputs(model: DynamicFusionModel, split: TensorSplit, batch_size: int = 256) -> dict:
    """Frozen-model outputs Stage II and evaluation need: features, each expert's logits and losses."""
    model.eval()
    parts: dict[str, list] = {"text_features": [], "glimpse_features": [], "logits": []}
    for start in range(0, len(split), batch_size):
        tokens = split.token_ids[start : start + batch_size]
        images = split.images[start : start + batch_size]
        text_features = model.text_encoder(tokens)
        parts["text_features"].append(text_features)
        parts["glimpse_features"].append(model.image_glimpse(images))
        parts["logits"].append(model.heads(text_features, model.image_encoder(images)))
    logits = {e.name: torch.cat([p[e.name] for p in parts["logits"]]) for e in model.experts}
    losses = torch.stack([F.cross_entropy(logits[e.name], split.labels, reduction="none") for e in model.experts], 1)
    return {
        "text_features": torch.cat(parts["text_features"]),  # (N, Dt)
        "glimpse_features": torch.cat(parts["glimpse_features"]),  # (N, Dg)
        "logits": logits,  # expert -> (N, K)
        "losses": losses,  # (N, E) in router order
    }


def train_router(model: DynamicFusionModel, cache: dict, costs: dict, lam: float, config: TrainConfig) -> DualRouter:
    """Stage II for one lambda: straight-through hard gates, resource-aware loss, frozen experts."""
    torch.manual_seed(config.seed)
    router = model.new_router()
    optimizer = torch.optim.Adam(router.parameters(), lr=config.router_lr)
    relative_cost = torch.tensor([costs["path"][e.name] / costs["full"] for e in model.experts])  # (E,)
    penalty = cache["losses"] + lam * relative_cost  # (N, E): what choosing each expert costs this sample
    n = penalty.shape[0]
    present = torch.ones(n)
    generator = torch.Generator().manual_seed(config.seed)
    for epoch in range(config.stage2_epochs):
        progress = epoch / max(config.stage2_epochs - 1, 1)
        temperature = config.temperature_start + (config.temperature - config.temperature_start) * progress
        for index in torch.randperm(n, generator=generator).split(max(config.batch_size, 128)):
            gate_logits, _ = router.gate_logits(
                cache["text_features"][index], cache["glimpse_features"][index], present[index], present[index]
            )  # (B, E)
            if config.gumbel:
                uniform = torch.rand(gate_logits.shape, generator=generator).clamp(1e-9, 1 - 1e-9)
                gate_logits = gate_logits - torch.log(-torch.log(uniform))
            soft = F.softmax(gate_logits / temperature, dim=1)
            hard = F.one_hot(soft.argmax(1), soft.shape[1]).to(soft.dtype)
            gate = hard - soft.detach() + soft  # forward: one-hot; backward: the soft gate's gradient
            loss = (gate * penalty[index]).sum(1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    router.eval()
    return router


@torch.no_grad()
def _evaluate(
    model, dataset: Dataset, cache: dict, routers: list[dict], costs: dict, split: str, *, default_router: str
):
    outputs = cache[split]
    n = len(dataset.splits[split])
    present = torch.ones(n)
    scores = {
        r["name"]: r["router"](outputs["text_features"], outputs["glimpse_features"], present, present)[0].numpy()
        for r in routers
    }
    routing = RoutingOutputs(
        labels=dataset.splits[split].labels.numpy(),
        expert_probs={e: F.softmax(v, dim=1).numpy() for e, v in outputs["logits"].items()},
        router_scores=scores,
        routers=[{"name": r["name"], "lambda": r["lambda"]} for r in routers],
        default_router=default_router,
        experts=[e.name for e in model.experts],
        path_madds=costs["path"],
        static_madds=costs["static"],
        madds_full=costs["full"],
        full_expert=model.full_expert,
        kinds=dataset.splits[split].kinds,
    )
    return evaluate_policies(routing)


def select_router(validation_rows: list[dict], routers: list[dict], tolerance: float) -> str:
    """The cheapest router whose validation accuracy is within ``tolerance`` of the full expert's."""
    full_accuracy = find_row(validation_rows, "full")["accuracy"]
    candidates = [find_row(validation_rows, f"lambda={r['lambda']:g}") | {"name": r["name"]} for r in routers]
    good = [c for c in candidates if c["accuracy"] >= full_accuracy - tolerance]
    if good:
        return min(good, key=lambda c: c["madds_per_sample"])["name"]
    return max(candidates, key=lambda c: (c["accuracy"], -c["madds_per_sample"]))["name"]


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
