"""Figure: which reworded copies of validation make Stage II's routers hold up on unseen wording (issue 22, item 7).

Stage II trains the routers on the validation split plus reworded copies of it (models/training.py
``caption_variants``). This trains the routers of a few lambdas over the shipped run's frozen Stage I experts with
each of several sets of copies, and reads each router alone (no floor, no guard) on the test and test_ood splits
of held-out benchmark sets: how far test_ood falls below the full path, and what test saves. Copies are "words"
(each word to <unk> on its own, ``drop_words``) or "vocabulary" (a share of the vocabulary forgotten, every
occurrence <unk>, ``forget_words``); ``xN``: N draws at each rate.

    python -m bench.stage2_copies [--run build/ship-work/run-default-...] [--seeds 7,11] [--lambdas 0.5,0.6,0.8]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.common import REPO, RESULTS, markdown_table, write_result
from bench.served_policy import default_run, trained_run
from bench.shift import held_out_data

# name -> ((kind, rates, draws), ...); the first is no copies at all, the second the previous default.
COPY_SETS = {
    "none": (),
    "words 0.3, 0.6 (before)": (("words", (0.3, 0.6), 1),),
    "vocabulary 0.3, 0.6": (("vocabulary", (0.3, 0.6), 1),),
    "words 0.2-0.8 x2": (("words", (0.2, 0.4, 0.6, 0.8), 2),),
    "vocabulary 0.2-0.8 x2": (("vocabulary", (0.2, 0.4, 0.6, 0.8), 2),),
    "words 0.3, 0.6 + vocabulary 0.2-0.8 x2 (shipped)": (
        ("words", (0.3, 0.6), 1),
        ("vocabulary", (0.2, 0.4, 0.6, 0.8), 2),
    ),
}


def measure(run: Path, seeds: list[int], lambdas: list[float]) -> dict:
    import dataclasses

    import torch

    from models import training
    from models.router_selection import routing_outputs
    from models.safety import floor_policies

    checkpoint, model, config, split_of = trained_run(run)

    val = split_of(Path(checkpoint["data"]["dir"]), "val")
    sets = {f"s{seed}": held_out_data(REPO / "build" / f"heldout-s{seed}", seed) for seed in seeds}
    splits = {f"{name}_{split}": split_of(data, split) for name, data in sets.items() for split in ("test", "test_ood")}
    cache = {name: training.expert_outputs(model, split) for name, split in splits.items()}
    val_outputs = training.expert_outputs(model, val)
    costs = checkpoint["madds"]
    drop = {"words": training.drop_words, "vocabulary": training.forget_words}

    rows = []
    for copy_set, parts in COPY_SETS.items():
        generator = torch.Generator().manual_seed(config.seed + 1)
        token_ids = [
            drop[kind](val.token_ids, rate, generator)
            for kind, rates, draws in parts
            for _ in range(draws)
            for rate in rates
        ]
        copies = [training.expert_outputs(model, dataclasses.replace(val, token_ids=ids)) for ids in token_ids]
        val_cache = val_outputs | {"augmented": copies}
        entries = [
            {"name": f"lambda_{lam:g}", "lambda": lam, "temperature": 1.0,
             "router": training.train_router(model, val_cache, costs, lam, config)}
            for lam in lambdas
        ]  # fmt: skip
        context = {"model": model, "routers": entries, "costs": costs, "full_expert": checkpoint["full_expert"]}
        for entry in entries:
            row = {"copies": copy_set, "count": len(copies), "router": entry["name"]}
            for key, split in splits.items():
                routes = {e["name"]: training.route(e["router"], cache[key]) for e in entries}
                outputs = routing_outputs(**context, split=split, outputs=cache[key], routes=routes)
                alone = floor_policies(outputs, entry["name"], ())[0]
                full = float((outputs.expert_probs[outputs.full_expert].argmax(1) == outputs.labels).mean())
                row[key] = {"points_vs_full": round(100 * (alone["accuracy"] - full), 2),
                            "saved": round(alone["saved_ratio"], 4)}  # fmt: skip
            rows.append(row)
            print(row, flush=True)
    return {"run": str(run), "held_out_seeds": seeds, "lambdas": lambdas, "rows": rows}


def table(result: dict) -> str:
    sets = [f"s{seed}" for seed in result["held_out_seeds"]]
    header = ["copies", "count", "router", *(f"{s}: test saved; test_ood points" for s in sets)]
    lines = [
        [row["copies"], row["count"], f"`{row['router']}`",
         *(f"{100 * row[f'{s}_test']['saved']:.1f}%; {row[f'{s}_test_ood']['points_vs_full']:+.2f}" for s in sets)]
        for row in result["rows"]
    ]  # fmt: skip
    return markdown_table(header, lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=None, help="a run directory (default: make ship-default's)")
    parser.add_argument("--seeds", default="7,11", help="held-out benchmark sets, by seed (build/heldout-s<seed>)")
    parser.add_argument("--lambdas", default="0.5,0.6,0.8")
    parser.add_argument("--out", type=Path, default=RESULTS / "stage2_copies.json")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    result = measure(args.run or default_run(), seeds, [float(v) for v in args.lambdas.split(",")])
    write_result(args.out, result)
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
