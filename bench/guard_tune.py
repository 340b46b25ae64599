"""Choose the guard's default settings on a held-out set that is NOT the one its figures are reported on.

The shift of bench/guard_replay.py (test, then test_ood 4 times over) on ``--data`` (default ``build/heldout-s11``,
generated from seed 11 when missing; the figures of bench/BENCHMARKS.md §12 are on ``build/heldout-s7``), replayed
through the server's own Guard for every combination of the grid below at audit rate 0.25, ``--trials`` times each.
Choice: among the settings whose false engagement during the test phase is at most ``--max-false`` (below the
issue's 5%, to leave room for another data set) and that engage within 300 test_ood requests at least
``--min-within`` of the time, the one with the shortest median delay at the default rate (0.02; every one of them
replayed at that rate too, where false engagement must also stay under ``--max-false``); ties go to fewer false
engagements at 0.25, then to the least sensitive test of the inputs (the larger ``input_shift_share``, then the
larger ``input_false_alarm_requests``): inputs a little less typical than validation's, which this data may not
show, set it off less often.

``shifted_false_alarm_audits`` starts at 100, by design rather than by fit: while the inputs changed, the guard
engages falsely once per that many audits if the change turns out harmless (agreement as validated), and such a
change is not in this data to measure. At 100, that is once per about 5,000 routed requests at the default rate.

    python -m bench.guard_tune [--data build/heldout-s11] [--trials 200]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
from pathlib import Path

from bench.common import DEFAULT_STORE, REPO, RESULTS, markdown_table, write_result
from bench.guard_replay import input_evidence, replay, shifted_stream
from bench.shift import GOAL_ENGAGE_RATE, GOAL_ENGAGE_WITHIN, held_out_data

TUNING = REPO / "build" / "heldout-s11"
TUNING_SEED = 11
GRID = {
    "margin": (0.06, 0.1, 0.14),
    "false_alarm_audits": (2000, 5000, 10000),
    "shifted_false_alarm_audits": (100, 200, 400),
    "input_shift_share": (0.0, 0.03, 0.05, 0.1),
    "input_false_alarm_requests": (5000, 20000),
}
DEFAULT_RATE = 0.02


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--model", default=None)
    parser.add_argument("--data", type=Path, default=TUNING)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--max-false", type=float, default=0.03)
    parser.add_argument("--min-within", type=float, default=0.95)
    parser.add_argument("--out", type=Path, default=RESULTS / "guard_tune.json")
    args = parser.parse_args(argv)

    from service.config import Settings
    from service.guard import GuardSettings

    logging.getLogger("dynfuse").setLevel(logging.ERROR)
    base = GuardSettings.of(Settings(store=args.store), enabled=True)
    data = held_out_data(args.data, seed=TUNING_SEED)
    s = shifted_stream(args.store, args.model, data, ood_repeats=4)
    stream = (s["manifest"], s["cheaper"], s["agrees"], s["pvalues"], s["n_test"])
    candidates = []
    for values in itertools.product(*GRID.values()):
        choice = dict(zip(GRID, values, strict=True))
        if choice["input_shift_share"] == 0 and (
            choice["shifted_false_alarm_audits"] != GRID["shifted_false_alarm_audits"][0]
            or choice["input_false_alarm_requests"] != GRID["input_false_alarm_requests"][0]
        ):
            continue  # without the inputs' test those two do nothing: one of them is enough
        if choice["input_shift_share"] == 0:
            choice["shifted_false_alarm_audits"] = choice["false_alarm_audits"]
        settings = dataclasses.replace(base, **choice)
        run = replay(*stream[:4], stream[4], GOAL_ENGAGE_RATE, settings, args.trials)
        candidates.append({"settings": choice, "at_0.25": run})
    allowed = [
        c
        for c in candidates
        if c["at_0.25"]["false_engagement_in_test"] <= args.max_false
        and c["at_0.25"][f"within_{GOAL_ENGAGE_WITHIN}"] >= args.min_within
    ]
    for c in allowed:
        settings = dataclasses.replace(base, **c["settings"])
        c["at_0.02"] = replay(*stream[:4], stream[4], DEFAULT_RATE, settings, args.trials)
    allowed = [c for c in allowed if c["at_0.02"]["false_engagement_in_test"] <= args.max_false]
    allowed.sort(
        key=lambda c: (
            c["at_0.02"]["ood_requests_to_engage"]["median"] or float("inf"),
            c["at_0.25"]["false_engagement_in_test"],
            -c["at_0.25"][f"within_{GOAL_ENGAGE_WITHIN}"],
            -c["settings"]["input_shift_share"],
            -c["settings"]["input_false_alarm_requests"],
        )
    )
    best = allowed[0]
    rows = [
        [
            *(c["settings"][k] for k in GRID),
            f"{c['at_0.25']['false_engagement_in_test']:.1%}",
            f"{c['at_0.25'][f'within_{GOAL_ENGAGE_WITHIN}']:.1%}",
            c["at_0.25"]["ood_requests_to_engage"]["median"],
            c["at_0.02"]["ood_requests_to_engage"]["median"],
            f"{c['at_0.02']['false_engagement_in_test']:.1%}",
            "**chosen**" if c is best else "",
        ]
        for c in allowed[:10]
    ]
    print(
        markdown_table(
            [
                *GRID,
                "false (0.25)",
                f"within {GOAL_ENGAGE_WITHIN} (0.25)",
                "median (0.25)",
                "median (0.02)",
                "false (0.02)",
                "",
            ],
            rows,
        )
    )
    write_result(
        args.out,
        {
            "figure": "the guard's settings chosen on a held-out set other than the reported one",
            "data": str(data.relative_to(REPO) if data.is_relative_to(REPO) else data),
            "trials": args.trials,
            "max_false_engagement": args.max_false,
            "inputs": input_evidence(dataclasses.replace(base, **best["settings"]), stream[3], stream[4]),
            "grid": {k: list(v) for k, v in GRID.items()},
            "chosen": best["settings"],
            "allowed": len(allowed),
            "best_ten": allowed[:10],
            "candidates": candidates,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
