"""Multiplicative combination against late fusion, head to head: beta in {0, 0.1, 0.2, 0.5} and one boosted run.

Both heads read the same frozen features of a trained run (the text encoder's pooled features and the CNN's
pooled features, as ``late_fusion`` and ``mulmix`` do in the model), are trained the same way on the training
split (same epochs, optimizer, seed) and are scored on the test split and on test_ood, per case kind. Only the
head differs, so the table isolates the combination: beta = 0 is plain averaging of the three candidates
({text}, {image}, {text, image}); larger beta lets a confident candidate excuse the others.

    python -m bench.mulmix [--run build/default-model/run-default-s0-data-g2-8000-s0-64px] [--epochs 30]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.common import DEFAULT_DATA, REPO, RESULTS, markdown_table, write_result

DEFAULT_RUN = REPO / "build" / "default-model" / "run-default-s0-data-g2-8000-s0-64px"
BETAS = (0.0, 0.1, 0.2, 0.5)
BOOSTED = {"beta": 1.0, "margin": 0.1}  # the paper's boosted training at beta = 1


def features(model, split) -> dict:
    import torch

    with torch.no_grad():
        parts = {"text_features": [], "image_features": []}
        for start in range(0, len(split), 256):
            tokens, images = split.token_ids[start : start + 256], split.images[start : start + 256]
            parts["text_features"].append(model.text_encoder(tokens)[1])
            parts["image_features"].append(model.image_encoder(model.image_trunk(images))[0])
    return {name: torch.cat(values) for name, values in parts.items()} | {"labels": split.labels, "kinds": split.kinds}


def train_head(head, train: dict, loss_fn, epochs: int, seed: int):
    import torch

    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    n = len(train["labels"])
    head.train()
    for _ in range(epochs):
        for index in torch.randperm(n, generator=generator).split(64):
            loss = loss_fn(head, train["text_features"][index], train["image_features"][index], train["labels"][index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return head.eval()


def score(head, data: dict) -> dict:
    import numpy as np
    import torch

    with torch.no_grad():
        right = (head(data["text_features"], data["image_features"]).argmax(1) == data["labels"]).numpy()
    kinds = np.asarray(data["kinds"])
    by_kind = {k: float(right[kinds == k].mean()) for k in sorted(set(kinds))}
    return {"accuracy": float(right.mean()), "by_kind": by_kind}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=DEFAULT_RUN)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "mulmix.json")
    args = parser.parse_args(argv)

    import torch.nn.functional as F

    from models.data.manifest import read_split
    from models.data.tensors import load_pixels, tensorize
    from models.experts.late_fusion import FusionHead, LateFusionConfig
    from models.experts.mulmix import MulMixConfig, MulMixExpert
    from models.preprocess import ImagePreprocessing
    from models.tokenizer import Tokenizer
    from models.training import load_run, rebuild_model

    checkpoint = load_run(args.run)
    model = rebuild_model(checkpoint)
    tokenizer = Tokenizer.from_dict(checkpoint["tokenizer"])
    preprocessing = ImagePreprocessing.from_dict(checkpoint["preprocessing"])
    data = {}
    for split in ("train", "test", "test_ood"):
        samples = read_split(args.data, split)
        pixels = load_pixels(samples, preprocessing.image_size)
        data[split] = features(model, tensorize(samples, pixels, tokenizer, preprocessing, checkpoint["labels"]))

    def cross_entropy(head, text, image, labels):
        return F.cross_entropy(head(text, image), labels)

    def multiplicative(head, text, image, labels):
        return head.loss(text, image, labels)

    variants = {"late_fusion": (lambda: FusionHead(model.config, LateFusionConfig()), cross_entropy)}
    for beta in BETAS:
        make = lambda b=beta: MulMixExpert(model.config, MulMixConfig(beta=b))  # noqa: E731
        variants[f"mulmix beta={beta:g}"] = (make, multiplicative)
    boosted = f"mulmix beta={BOOSTED['beta']:g}, boosted (margin {BOOSTED['margin']:g})"
    variants[boosted] = (lambda: MulMixExpert(model.config, MulMixConfig(**BOOSTED)), multiplicative)

    results = {}
    for name, (make, loss_fn) in variants.items():
        started = time.perf_counter()
        head = train_head(make(), data["train"], loss_fn, args.epochs, args.seed)
        results[name] = {split: score(head, data[split]) for split in ("test", "test_ood")}
        results[name]["train_seconds"] = round(time.perf_counter() - started, 1)
        print(f"{name}: test {results[name]['test']['accuracy']:.2%}")

    kinds = sorted(results["late_fusion"]["test"]["by_kind"])
    rows = [
        [name, f"{r['test']['accuracy']:.2%}", *(f"{r['test']['by_kind'][k]:.1%}" for k in kinds),
         f"{r['test_ood']['accuracy']:.2%}"]
        for name, r in results.items()
    ]  # fmt: skip
    print("\n" + markdown_table(["head", "test", *kinds, "test_ood"], rows))
    write_result(
        args.out,
        {
            "figure": "multiplicative combination against late fusion (heads on frozen features)",
            "run": str(args.run),
            "epochs": args.epochs,
            "seed": args.seed,
            "results": results,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
