"""Figure: every router alone on captions worded otherwise, before and after Stage II's vocabulary dropout (issue 22,
item 7). No confidence floor, no guard: the router's own choice, one expert per pair.

Both sets of routers are trained here by Stage II over the same frozen Stage I experts (the shipped run's), on the
validation split and its reworded copies: "before" with the word-level copies alone (the previous default), "after"
with this checkout's defaults, which add copies with a share of the vocabulary forgotten. The "after" routers are
the shipped run's own, and the script checks that they are. Each router alone is read on held-out benchmark sets
its training never saw (test: MAdds saved and points against the full path; test_ood, captions from the held-out
family: points against full, whole and its last 600 pairs, as bench.shift streams it).

    python -m bench.router_robustness [--run build/ship-work/run-default-...] [--seeds 7,17]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from bench.common import REPO, RESULTS, markdown_table, write_result
from bench.served_policy import _tail, default_run, trained_run
from bench.shift import GOAL_LAST_OOD, GOAL_LAST_OOD_POINTS, GOAL_TEST_SAVED, held_out_data

SPLITS = ("test", "test_ood")


def measure(run: Path, seeds: list[int]) -> dict:
    import torch

    from models import training
    from models.router_selection import routing_outputs
    from models.safety import floor_policies

    checkpoint, model, after, split_of = trained_run(run)
    before = dataclasses.replace(after, stage2_vocab_dropout=())

    val = split_of(Path(checkpoint["data"]["dir"]), "val")
    sets = {f"s{seed}": held_out_data(REPO / "build" / f"heldout-s{seed}", seed) for seed in seeds}
    splits = {f"{name}_{split}": split_of(data, split) for name, data in sets.items() for split in SPLITS}
    cache = {name: training.expert_outputs(model, split) for name, split in splits.items()}
    costs = checkpoint["madds"]

    def routers(config) -> list[dict]:
        val_cache = training.expert_outputs(model, val) | {"augmented": training.caption_variants(model, val, config)}
        return [
            {"name": e["name"], "lambda": e["lambda"], "temperature": e["temperature"],
             "router": training.train_router(model, val_cache, costs, e["lambda"], config)}
            for e in checkpoint["routers"]
        ]  # fmt: skip

    trained = {"before": routers(before), "after": routers(after)}
    shipped = {e["name"]: e["state_dict"] for e in checkpoint["routers"]}
    for entry in trained["after"]:  # the shipped routers, retrained from the same inputs
        state = entry["router"].state_dict()
        assert all(torch.equal(state[k], shipped[entry["name"]][k]) for k in state), entry["name"]

    rows = []
    for version, entries in trained.items():
        context = {"model": model, "routers": entries, "costs": costs, "full_expert": checkpoint["full_expert"]}
        for entry in entries:
            row = {"version": version, "router": entry["name"]}
            for name in sets:
                figures = {}
                for split in SPLITS:
                    key = f"{name}_{split}"
                    routes = {e["name"]: training.route(e["router"], cache[key]) for e in entries}
                    outputs = routing_outputs(**context, split=splits[key], outputs=cache[key], routes=routes)
                    parts = {split: outputs}
                    if split == "test_ood":  # and its last pairs, as bench.shift streams them
                        parts["test_ood_last"] = _tail(outputs, GOAL_LAST_OOD)
                    for part, table in parts.items():
                        alone = floor_policies(table, entry["name"], ())[0]
                        full = float((table.expert_probs[table.full_expert].argmax(1) == table.labels).mean())
                        figures[part] = {"points_vs_full": round(100 * (alone["accuracy"] - full), 2),
                                         "saved": round(alone["saved_ratio"], 4)}  # fmt: skip
                row[name] = figures
            rows.append(row)
    return {
        "run": str(run),
        "held_out_seeds": seeds,
        "before": {"stage2_word_dropout": before.stage2_word_dropout, "stage2_vocab_dropout": ()},
        "after": {
            "stage2_word_dropout": after.stage2_word_dropout,
            "stage2_vocab_dropout": after.stage2_vocab_dropout,
            "stage2_vocab_draws": after.stage2_vocab_draws,
        },  # fmt: skip
        "served": {"router": checkpoint["default_router"], "min_confidence": checkpoint.get("default_min_confidence")},
        "rows": rows,
    }


def meets_goals(row: dict, sets: list[str]) -> bool:
    """Issue 22's goals for a router alone on every held-out set: test >= 55% saved, test_ood (whole and its last
    600) within 1 point of the full path."""
    return all(
        row[s]["test"]["saved"] >= GOAL_TEST_SAVED
        and row[s]["test_ood"]["points_vs_full"] >= -GOAL_LAST_OOD_POINTS
        and row[s]["test_ood_last"]["points_vs_full"] >= -GOAL_LAST_OOD_POINTS
        for s in sets
    )


def table(result: dict) -> str:
    sets = [f"s{seed}" for seed in result["held_out_seeds"]]
    header = ["router", "Stage II copies", *(f"{s}: test saved, points; test_ood; last {GOAL_LAST_OOD}" for s in sets),
              "goals met"]  # fmt: skip
    lines = []
    for row in sorted(result["rows"], key=lambda r: (r["router"], r["version"] == "after")):
        name = f"`{row['router']}`"
        if row["version"] == "after" and row["router"] == result["served"]["router"]:
            name = f"**{name} (served)**"
        cells = [
            f"{100 * row[s]['test']['saved']:.1f}%, {row[s]['test']['points_vs_full']:+.2f}; "
            f"{row[s]['test_ood']['points_vs_full']:+.2f}; {row[s]['test_ood_last']['points_vs_full']:+.2f}"
            for s in sets
        ]
        copies = "words + vocabulary" if row["version"] == "after" else "words only (before)"
        lines.append([name, copies, *cells, "yes" if meets_goals(row, sets) else ""])
    return markdown_table(header, lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=None, help="a run directory (default: make ship-default's)")
    parser.add_argument("--seeds", default="7,17", help="held-out benchmark sets, by seed (build/heldout-s<seed>)")
    parser.add_argument("--out", type=Path, default=RESULTS / "router_robustness.json")
    args = parser.parse_args(argv)
    result = measure(args.run or default_run(), [int(s) for s in args.seeds.split(",")])
    write_result(args.out, result)
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
