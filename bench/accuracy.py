"""Figure 1: accuracy against compute of the default model on the test split.

Every policy (full, cheap, auto, oracle, the threshold sweep, one router per lambda) is evaluated
in one run from the same outputs of the exported ONNX components (``export/evaluate.py``, what
``dynfuse evaluate`` runs), so the rows are comparable to the last digit.

    python -m bench.accuracy [--store store] [--data build/default-model/data-g1-8000-s0-64px]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.common import DEFAULT_DATA, DEFAULT_STORE, REPO, RESULTS, markdown_table, write_result

GOAL_SAVED = 0.50  # auto saves at least this share of the full model's MAdds...
GOAL_DROP_POINTS = 0.5  # ...at no more than this many accuracy points below full


def table(rows: list[dict]) -> str:
    experts = list(rows[0]["route_mix"])
    kinds = sorted(rows[0].get("accuracy_by_kind", {}))
    header = ["policy", "accuracy", "MAdds/sample", "saved", *(f"→ {e}" for e in experts)]
    header += [f"acc. {k}" for k in kinds]
    body = []
    for row in rows:
        cells = [f"`{row['policy']}`", f"{row['accuracy']:.2%}", f"{row['madds_per_sample']:,.0f}"]
        cells += [f"{row['saved_ratio']:.1%}", *(f"{row['route_mix'][e]:.1%}" for e in experts)]
        cells += [f"{row['accuracy_by_kind'][k]:.1%}" for k in kinds]
        body.append(cells)
    return markdown_table(header, body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--model", default=None, help="default: the store's only model")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", type=Path, default=RESULTS / "accuracy.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "pareto.png")
    args = parser.parse_args(argv)

    from export.evaluate import evaluate_store
    from models.evaluation import compare_points, find_row, plot_pareto, summarize

    started = time.perf_counter()
    rows, outputs = evaluate_store(args.store, args.model, args.data, split=args.split, progress=False)
    seconds = time.perf_counter() - started
    summary = summarize(rows)
    full, auto = find_row(rows, "full"), find_row(rows, "auto")
    goal_met = summary["auto_saved_ratio"] >= GOAL_SAVED and summary["auto_accuracy_drop_points"] <= GOAL_DROP_POINTS
    title = f"{outputs.extra['model']} v{outputs.extra['version']}, {args.split} split ({len(outputs.labels)} samples)"
    plot_pareto(rows, args.plot, title=title)
    print(f"wrote {args.plot.relative_to(REPO) if args.plot.is_relative_to(REPO) else args.plot}")

    print(f"\n{title}, {outputs.extra['backend']}, madds_full {outputs.madds_full:,}, evaluated in {seconds:.1f} s\n")
    print(table(rows))
    print(
        f"\n{compare_points('auto', auto['accuracy'], 'full', full['accuracy'])}, saving {auto['saved_ratio']:.1%} "
        "of the MAdds; "
        f"{summary['auto_share_of_oracle_savings']:.1%} of the oracle's savings. "
        f"Goal (saved >= {GOAL_SAVED:.0%} at <= {GOAL_DROP_POINTS} points): {'MET' if goal_met else 'NOT MET'}"
    )
    write_result(
        args.out,
        {
            "figure": "accuracy against compute",
            "model": outputs.extra["model"],
            "version": outputs.extra["version"],
            "backend": outputs.extra["backend"],
            "split": args.split,
            "samples": len(outputs.labels),
            "madds_full": outputs.madds_full,
            "served_router": outputs.default_router,
            "evaluate_seconds": round(seconds, 2),
            "summary": summary,
            "goal": {"saved_at_least": GOAL_SAVED, "max_drop_points": GOAL_DROP_POINTS, "met": goal_met},
            "plot": str(args.plot.name),
            "policies": rows,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
