"""Figure: the served policy's frontier. Every (router, confidence floor) pair of a trained run, as Stage II's
selection sees it (validation with cross-fitted routes, and its two reworded copies) and, for reporting only, on
the model's own test and test_ood splits and on a held-out benchmark set its training never saw.

Stage II serves the cheapest router alone within ``select_tolerance`` of the full path on validation and on each
reworded copy, and a router with a floor only when no router alone holds up (models/router_selection.py
``select_policy``); the held-out columns never enter that choice. Issue 22's goals
for the served system, read here offline: on the held-out test split at least 55% of MAdds saved, and on its
test_ood (whole, and its last 600 pairs) within 1 point of the full path.

    python -m bench.served_policy [--run build/ship-work/run-default-...] [--held-out build/heldout-s7]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.common import REPO, RESULTS, markdown_table, write_result
from bench.shift import GOAL_LAST_OOD, GOAL_LAST_OOD_POINTS, GOAL_TEST_SAVED, HELD_OUT, held_out_data

SPLITS = ("test", "test_ood")


def default_run() -> Path:
    """The run `make ship-default` trained last (build/ship-work/run-default-*)."""
    runs = sorted((REPO / "build" / "ship-work").glob("run-default-*/checkpoint.pt"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise SystemExit("no run in build/ship-work: run `make ship-default`, or pass --run")
    return runs[-1].parent


def trained_run(run: Path):
    """A run as the offline figures read it, on one torch thread (as `make ship-default` trains): its checkpoint,
    model, training config, and ``split_of(data_dir, split)``, a data set's split tensorized as the model sees it."""
    import torch

    from models import training
    from models.data.manifest import read_split
    from models.data.tensors import load_pixels, tensorize
    from models.preprocess import ImagePreprocessing
    from models.tokenizer import Tokenizer

    torch.set_num_threads(1)
    checkpoint = training.load_run(run)
    model = training.rebuild_model(checkpoint)
    config = training.TrainConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in checkpoint["train_config"].items()}
    )
    tokenizer = Tokenizer.from_dict(checkpoint["tokenizer"])
    preprocessing = ImagePreprocessing.from_dict(checkpoint["preprocessing"])

    def split_of(data: Path, split: str):
        samples = read_split(data, split)
        pixels = load_pixels(samples, preprocessing.image_size)
        return tensorize(samples, pixels, tokenizer, preprocessing, checkpoint["labels"])

    return checkpoint, model, config, split_of


def measure(run: Path, held_out: Path) -> dict:
    from models import training
    from models.router_selection import routing_outputs
    from models.safety import CONFIDENCE_FLOORS, floor_policies

    checkpoint, model, config, split_of = trained_run(run)
    routers = training.rebuild_routers(checkpoint, model)
    trained_on = Path(checkpoint["data"]["dir"])
    splits = {"val": split_of(trained_on, "val")}
    splits |= {split: split_of(trained_on, split) for split in SPLITS}
    splits |= {f"held_out_{split}": split_of(held_out, split) for split in SPLITS}
    cache = {name: training.expert_outputs(model, split) for name, split in splits.items()}
    cache["val"]["augmented"] = training.caption_variants(model, splits["val"], config)
    entries = checkpoint["routers"]
    context = {
        "model": model,
        "routers": entries,
        "costs": checkpoint["madds"],
        "full_expert": checkpoint["full_expert"],
    }
    costs = checkpoint["madds"]
    validation = {e["name"]: training.cross_fitted_routes(model, cache["val"], costs, e["lambda"], config)
                  for e in entries}  # fmt: skip
    tables = {"val": routing_outputs(**context, split=splits["val"], outputs=cache["val"], routes=validation)}
    for k, copy in enumerate(training.caption_variant_names(config)):
        routes = {name: r["variants"][k] for name, r in validation.items()}
        tables[f"val_reworded_{copy}"] = routing_outputs(
            **context, split=splits["val"], outputs=cache["val"]["augmented"][k], routes=routes
        )
    for name in splits:
        if name != "val":
            routes = {e["name"]: training.route(routers[e["name"]], cache[name]) for e in entries}
            tables[name] = routing_outputs(**context, split=splits[name], outputs=cache[name], routes=routes)
    last = {"held_out_test_ood_last": GOAL_LAST_OOD}  # the held-out test_ood's last pairs, as bench.shift streams it

    def figures(outputs, name: str, floor, tail: int | None = None) -> dict:
        if tail:
            outputs = _tail(outputs, tail)
        row = next(r for r in floor_policies(outputs, name, CONFIDENCE_FLOORS) if r["min_confidence"] == floor)
        full = float((outputs.expert_probs[outputs.full_expert].argmax(1) == outputs.labels).mean())
        return {"points_vs_full": round(100 * (row["accuracy"] - full), 2), "saved": round(row["saved_ratio"], 4),
                "fallback_share": round(row["fallback_share"], 4)}  # fmt: skip

    rows = []
    for entry in entries:
        for floor in (None, *CONFIDENCE_FLOORS):
            row = {"router": entry["name"], "min_confidence": floor}
            row |= {table: figures(outputs, entry["name"], floor) for table, outputs in tables.items()}
            row |= {key: figures(tables["held_out_test_ood"], entry["name"], floor, n) for key, n in last.items()}
            rows.append(row)
    served = (checkpoint["default_router"], checkpoint.get("default_min_confidence"))
    return {
        "run": str(run),
        "held_out": str(held_out),
        "select_tolerance_points": 100 * config.select_tolerance,
        "served": {"router": served[0], "min_confidence": served[1]},
        "rows": rows,
    }


def _tail(outputs, n: int):
    from dataclasses import replace

    return replace(
        outputs,
        labels=outputs.labels[-n:],
        expert_probs={e: p[-n:] for e, p in outputs.expert_probs.items()},
        router_scores={r: s[-n:] for r, s in outputs.router_scores.items()},
        router_importance=None,
        router_weights=None,
        kinds=None,
    )


def holds(row: dict, tolerance_points: float) -> bool:
    """What the selection asks of a pair: within the tolerance of the full path on validation and its copies."""
    return all(v["points_vs_full"] >= -tolerance_points for k, v in row.items() if k.startswith("val"))


def meets_goals(row: dict) -> bool:
    return (
        row["held_out_test"]["saved"] >= GOAL_TEST_SAVED
        and row["held_out_test_ood"]["points_vs_full"] >= -GOAL_LAST_OOD_POINTS
        and row["held_out_test_ood_last"]["points_vs_full"] >= -GOAL_LAST_OOD_POINTS
    )


def table(result: dict, only_interesting: bool = True) -> str:
    tolerance = result["select_tolerance_points"]
    served = result["served"]
    reworded = [k for k in result["rows"][0] if k.startswith("val_reworded")]
    header = ["router", "floor", "val: points, saved", f"{len(reworded)} reworded copies: worst points", "selectable",
              "held-out test: points, saved", "held-out test_ood: points, saved", f"last {GOAL_LAST_OOD}: points",
              "goals met"]  # fmt: skip
    # Each router alone, its cheapest selectable pair (on validation), and every pair that meets the goals.
    cheapest = {}
    for row in result["rows"]:
        if (
            holds(row, tolerance)
            and row["val"]["saved"] > cheapest.get(row["router"], {"val": {"saved": -1}})["val"]["saved"]
        ):
            cheapest[row["router"]] = row
    lines = []
    for row in result["rows"]:
        selectable, goals = holds(row, tolerance), meets_goals(row)
        if only_interesting and not (goals or row["min_confidence"] is None or cheapest.get(row["router"]) is row):
            continue
        name = f"`{row['router']}`"
        if (row["router"], row["min_confidence"]) == (served["router"], served["min_confidence"]):
            name = f"**{name} (served)**"
        lines.append([
            name, "" if row["min_confidence"] is None else f"{row['min_confidence']:g}",
            f"{row['val']['points_vs_full']:+.2f}, {100 * row['val']['saved']:.1f}%",
            f"{min(row[k]['points_vs_full'] for k in reworded):+.2f}" if reworded else "", "yes" if selectable else "",
            f"{row['held_out_test']['points_vs_full']:+.2f}, {100 * row['held_out_test']['saved']:.1f}%",
            f"{row['held_out_test_ood']['points_vs_full']:+.2f}, {100 * row['held_out_test_ood']['saved']:.1f}%",
            f"{row['held_out_test_ood_last']['points_vs_full']:+.2f}", "yes" if goals else "",
        ])  # fmt: skip
    return markdown_table(header, lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=None, help="a run directory (default: make ship-default's)")
    parser.add_argument("--held-out", type=Path, default=HELD_OUT)
    parser.add_argument("--out", type=Path, default=RESULTS / "served_policy.json")
    args = parser.parse_args(argv)
    result = measure(args.run or default_run(), held_out_data(args.held_out))
    write_result(args.out, result)
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
