"""``dynfuse train-router``: a router over experts the user already has, which stay frozen.

1. The experts are imported and checked (models/byo/loading.py) before anything trains: a refusal names the expert.
2. The router's own encoders, dynfuse's small word-level text encoder and the image glimpse, are trained on the
   training split through a linear probe each on the labels, as Stage I trains the glimpse through its probe.
   Labels, not the experts' outputs: nothing says whether the user's experts were trained on this training split,
   and where they were, their outputs there look better than they are. What tells the classes apart in a caption
   or a thumbnail is also what tells the router whether that modality is informative.
3. Each expert runs once, on its own spec tensors (made by models/specs.py from the decoded pictures and the raw
   texts, as serving makes them), over the validation split and the evaluated splits; the outputs are cached and
   each component's MAdds measured (models/costs.py). The experts do not run over the training split: Stage II
   learns from held-out outputs only (see ``train_routers``), and the encoders learn from the labels.
4. Stage II is models/training.py's ``train_routers``, unchanged: one router per lambda with the resource-aware
   loss, cross-fitted on validation to choose the served one, every split evaluated.

The run directory is that of ``dynfuse train`` (checkpoint.pt, summary.json); ``dynfuse export`` writes it to the
store, calling the experts' factories again.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from models.attribution_training import fit_attribution
from models.byo.loading import ExpertRef, load_experts, parse_expert_options
from models.byo.model import ROUTER_ONLY, RouterOnlyConfig, RouterOnlyModel
from models.costs import routing_costs
from models.data.manifest import read_split
from models.data.tensors import TensorSplit, load_pixels
from models.dynamic_fusion import preset_config
from models.evaluation import format_table
from models.specs import SpecSet, TextSpec
from models.training import (
    EVALUATED_SPLITS,
    RUN_FORMAT,
    TrainConfig,
    _write_run_dir,
    choose_full_expert,
    drop_words,
    expert_accuracy,
    load_dataset,
    router_entries,
    shift_images,
    train_routers,
)

# Epochs of the encoders' pass when TrainConfig.stage1_epochs is None: two small networks and two linear probes
# converge faster than Stage I's every expert.
ENCODER_EPOCHS = {"tiny": 10, "default": 8, "large": 8}


def train_router_only(
    data_dir: Path,
    run_dir: Path,
    experts: list[str] | list[ExpertRef],
    config: TrainConfig,
    *,
    search: tuple[Path, ...] = (),
    progress: bool = True,
    log=print,
) -> dict:
    """Train a router over user experts on a manifest directory; write the run directory, return its summary."""
    run_dir = Path(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"run directory {run_dir} is not empty; choose another --out or remove it")
    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    refs = [e for e in experts if isinstance(e, ExpertRef)] or parse_expert_options(experts)  # type: ignore[arg-type]
    sizes = preset_config(config.preset)
    dataset = load_dataset(Path(data_dir), sizes.image_size, sizes.max_tokens, progress=progress, log=log)
    search = tuple(Path(d).resolve() for d in (*search, Path.cwd()))
    chains = load_experts(refs, dataset.labels, search=search)  # every refusal before any training
    recorded = [
        {"name": r.name, "target": r.target, "origin": r.origin, "fingerprint": c.fingerprint()}
        for r, c in zip(refs, chains, strict=True)
    ]
    torch.manual_seed(config.seed)
    model_config = RouterOnlyConfig(
        dataset.labels, recorded, dataset.tokenizer.vocab_size, config.preset, tuple(str(d) for d in search)
    )
    model = RouterOnlyModel(model_config, chains)
    spec_set = SpecSet(model.specs)
    log(
        f"router over {len(chains)} experts ({', '.join(f'{c.name}: {c.spec.components}' for c in chains)}), "
        f"{len(spec_set.specs)} preprocessing specs, {len(dataset.labels)} classes, "
        + ", ".join(f"{name} {len(split)}" for name, split in dataset.splits.items())
    )

    timings = {}
    clock = time.perf_counter()
    history = train_router_encoders(model, dataset.splits["train"], dataset.splits["val"], config, progress=progress)
    timings["encoders_seconds"] = time.perf_counter() - clock
    clock = time.perf_counter()
    cache = {
        split: cached_outputs(
            model,
            dataset.splits[split],
            read_split(Path(data_dir), split),
            spec_set,
            progress=progress,
            desc=f"experts on {split}",
        )  # fmt: skip
        for split in EVALUATED_SPLITS
        if split in dataset.splits
    }
    timings["experts_seconds"] = time.perf_counter() - clock
    accuracy = expert_accuracy(cache["val"], dataset.splits["val"])
    full_expert = choose_full_expert(model, cache["val"], dataset.splits["val"])
    costs = routing_costs(model, full_expert)
    log("validation accuracy: " + ", ".join(f"{e} {a:.2%} ({costs['static'][e]:,} MAdds)" for e, a in accuracy.items()))
    log(f"full path: {full_expert} (the most accurate expert on validation), {costs['full']:,} MAdds")
    clock = time.perf_counter()
    attribution = train_attribution(model, dataset, Path(data_dir), spec_set, costs, config, log=log)
    timings["attribution_seconds"] = time.perf_counter() - clock
    clock = time.perf_counter()
    routers, default_router, evaluation = train_routers(
        model, dataset, cache, costs, full_expert, config, progress=progress
    )
    timings["routers_seconds"] = time.perf_counter() - clock
    headline = evaluation.get("test", evaluation["val"])

    elapsed = time.perf_counter() - started
    checkpoint = {
        "format": RUN_FORMAT,
        "model_name": ROUTER_ONLY,
        "config": model_config.to_dict(),
        "state_dict": model.state_dict(),
        "routers": router_entries(routers),
        "default_router": default_router,
        "default_min_confidence": evaluation["default_min_confidence"],
        "labels": dataset.labels,
        "tokenizer": dataset.tokenizer.to_dict(),
        "preprocessing": dataset.preprocessing.to_dict(),
        "experts": [
            c.spec.to_dict() | {"source": r["target"], "specs": list(c.specs)}
            for c, r in zip(chains, recorded, strict=True)
        ],
        "specs": {key: spec_entry(key, spec) for key, spec in spec_set.specs.items()},
        "full_expert": full_expert,
        "shared_encoders": dict(model.shared_encoders),
        "madds": costs,
        "attribution": attribution,
        "train_config": asdict(config),
        "data": {"dir": str(Path(data_dir).resolve()), "sizes": {k: len(v) for k, v in dataset.splits.items()}},
        "evaluation": evaluation,
        "history": history,
        "train_seconds": round(elapsed, 1),
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
    summary = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "routers")}
    summary["attribution"] = {k: v for k, v in attribution.items() if k != "heads"}
    _write_run_dir(run_dir, checkpoint, summary)
    log(f"\n{'test' if 'test' in evaluation else 'validation'} split, served router {default_router}:")
    log(format_table(headline))
    log(f"trained the router in {elapsed:.0f} s -> {run_dir}")
    return summary


def train_attribution(model: RouterOnlyModel, dataset, data_dir: Path, spec_set: SpecSet, costs: dict,
                      config: TrainConfig, *, log) -> dict:  # fmt: skip
    """How each user expert's answers are attributed (models/attribution_training.py), with each two-modality
    expert's declared missing-modality representation; heads learn on the validation split, as the router does."""
    samples: dict[str, list] = {}

    def batches(expert: str, split: str, batch_size: int = 64):
        if split not in samples:
            samples[split] = read_split(data_dir, split)
        chain = model.chains[expert]
        for start in range(0, len(samples[split]), batch_size):
            batch = samples[split][start : start + batch_size]
            pixels = load_pixels(batch, spec_set.decode_side) if spec_set.decode_side else None
            texts = [s.text for s in batch]
            tensors = {name: torch.from_numpy(value) for key in chain.specs
                       for name, value in spec_set.apply(key, texts, pixels).items()}  # fmt: skip
            with torch.no_grad():
                yield chain._run(tensors)

    fills = {name: chain.missing() for name, chain in model.chains.items() if chain.fusion_plan().reads_both}
    entries, heads = fit_attribution(
        model,
        batches,
        costs=costs,
        budget=config.attribution_budget,
        label_counts=np.bincount(dataset.splits["train"].labels.numpy(), minlength=len(dataset.labels)),
        head_splits=("val",),
        eval_splits=tuple(s for s in EVALUATED_SPLITS[1:] if s in dataset.splits),
        fills=fills,
        seed=config.seed,
        log=log,
    )
    return entries | {"heads": {e: {"config": h.config(), "state_dict": h.state_dict()} for e, h in heads.items()}}


def spec_entry(key: str, spec) -> dict:
    """A spec as the checkpoint keeps it; a tokenizer file travels inside, so the run directory is whole."""
    if isinstance(spec, TextSpec):
        return spec.to_dict(file_name=f"tokenizer-{key}.json") | {"content": Path(spec.tokenizer).read_text()}
    return spec.to_dict()


def train_router_encoders(
    model: RouterOnlyModel, train: TensorSplit, val: TensorSplit, config: TrainConfig, *, progress: bool
) -> list[dict]:
    """The router's text encoder and glimpse, each through a linear probe on the labels (Stage I's recipe:
    AdamW, one-cycle, word dropout, shifted images)."""
    modules = (model.text_encoder, model.image_glimpse, model.training_modules)
    params = [p for module in modules for p in module.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    epochs = config.stage1_epochs if config.stage1_epochs is not None else ENCODER_EPOCHS[config.preset]
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=epochs * steps_per_epoch, pct_start=0.15
    )
    generator = torch.Generator().manual_seed(config.seed)
    max_shift = config.max_shift if config.max_shift is not None else train.images.shape[-1] // 16
    probes = model.training_modules
    history = []
    for epoch in tqdm(range(epochs), desc="router encoders", disable=not progress):
        for module in modules:
            module.train()
        total = 0.0
        for index in torch.randperm(len(train), generator=generator).split(config.batch_size):
            tokens = drop_words(train.token_ids[index], config.word_dropout, generator)
            images = shift_images(train.images[index], max_shift, generator)
            labels = train.labels[index]
            loss = F.cross_entropy(probes["text_probe"](model.text_encoder(tokens)[1]), labels)
            loss = loss + F.cross_entropy(probes["glimpse_probe"](model.glimpse(images)), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(index)
        for module in modules:
            module.eval()
        with torch.no_grad():
            text_accuracy = _accuracy(probes["text_probe"](model.text_encoder(val.token_ids)[1]), val.labels)
            glimpse_accuracy = _accuracy(probes["glimpse_probe"](model.glimpse(val.images)), val.labels)
        history.append({"stage": "encoders", "epoch": epoch + 1, "loss": total / len(train),
                        "val_text_probe": text_accuracy, "val_glimpse_probe": glimpse_accuracy})  # fmt: skip
    return history


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean())


@torch.no_grad()
def cached_outputs(
    model: RouterOnlyModel,
    split: TensorSplit,
    samples: list,
    spec_set: SpecSet,
    *,
    batch_size: int = 64,
    progress: bool = False,
    desc: str = "experts",
) -> dict:
    """What Stage II and evaluation need of a split, in ``expert_outputs``' layout: the router's features, each
    expert's logits and losses. Pictures are decoded a batch at a time at the specs' decode side."""
    assert [s.id for s in samples] == split.ids, "the manifest changed while training"
    parts: dict[str, list] = {"text_features": [], "glimpse_features": [], "logits": []}
    for start in tqdm(range(0, len(split), batch_size), desc=desc, disable=not progress, leave=False):
        batch = samples[start : start + batch_size]
        parts["text_features"].append(model.text_encoder(split.token_ids[start : start + batch_size])[1])
        parts["glimpse_features"].append(model.glimpse(split.images[start : start + batch_size]))
        texts = [s.text for s in batch]
        pixels = load_pixels(batch, spec_set.decode_side) if spec_set.decode_side else None
        tensors = {
            name: torch.from_numpy(value)
            for key in spec_set.specs
            for name, value in spec_set.apply(key, texts, pixels).items()
        }
        parts["logits"].append(model.expert_logits(tensors))
    experts = [e.name for e in model.experts]
    logits = {e: torch.cat([p[e] for p in parts["logits"]]) for e in experts}
    losses = torch.stack([F.cross_entropy(logits[e], split.labels, reduction="none") for e in experts], 1)
    return {
        "text_features": torch.cat(parts["text_features"]),  # (N, Dt)
        "glimpse_features": torch.cat(parts["glimpse_features"]),  # (N, Dg)
        "logits": logits,  # expert -> (N, K)
        "losses": losses,  # (N, E) in router order
    }
