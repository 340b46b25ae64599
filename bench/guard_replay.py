"""Figure: what the guard detects, and how fast, at a given audit rate: the shift of bench/shift.py replayed
offline many times over.

The stored model answers the test split, then test_ood (``--ood-repeats`` times over: a shift that lasts, so
that a low audit rate's delay can be seen), through its own pipeline (``dynfuse evaluate``'s
outputs: every expert and the served router on every pair), which says for each request whether the router
picked a cheaper expert and whether that expert's answer agrees with the full path's: what an audit of it would
find. The stream is then replayed ``--trials`` times through the server's own ``Guard`` (service/guard.py, the
settings' defaults unless given), each time auditing each cheaper answer with probability ``rate`` (a different
random draw per trial), as the server does. For each rate: how often the guard engaged during the test phase
(a false engagement: that traffic is like validation), and after how many test_ood requests it was on.

One run of bench/shift.py is one draw of this; this says how likely its outcome was.

When export found no safer policy for the served point (model.json ``safety.guard``: no floor), the server's
guard is off and never engages; the replay then measures detection alone (``guard_off``): when audits like the
server's would have crossed the guard's line. The alert ``DynfuseRoutingAgreementLow`` (docker/prometheus/alerts.yml)
watches the same line, with the same margin and minimum of audits, over 15 minutes of audits instead of the last
``DYNFUSE_GUARD_WINDOW``.

    python -m bench.guard_replay [--store store] [--data build/heldout-s7] [--rates 0.02,0.05,0.1,0.25]
"""

from __future__ import annotations

import argparse
import logging
import random
from pathlib import Path

import numpy as np

from bench.common import DEFAULT_STORE, REPO, RESULTS, markdown_table, write_result
from bench.shift import GOAL_ENGAGE_WITHIN, HELD_OUT, held_out_data


def stream(store: Path, model: str | None, data: Path) -> tuple[dict, np.ndarray, np.ndarray, int]:
    """(model.json, cheaper (N,), agrees (N,), test requests): the test split then test_ood, in file order."""
    from export.evaluate import evaluate_store
    from models.policy import decide_routes

    cheaper, agrees = [], []
    for split in ("test", "test_ood"):
        _, out = evaluate_store(store, model, data, split=split, progress=False)
        full = out.experts.index(out.full_expert)
        answers = np.stack([out.expert_probs[e].argmax(axis=1) for e in out.experts], axis=1)
        path_madds = np.array([out.path_madds[e] for e in out.experts], dtype=np.float64)
        choice, _ = decide_routes(out.router_scores[out.default_router], full, path_madds=path_madds)
        cheaper.append(choice != full)
        agrees.append(answers[np.arange(len(choice)), choice] == answers[:, full])
    from export.store import load_model

    return load_model(store, model).manifest, np.concatenate(cheaper), np.concatenate(agrees), len(cheaper[0])


def guard_off(manifest: dict) -> bool:
    """Whether the server's guard is off for the served point: export chose no safer policy for it."""
    point = manifest["router"]["operating_point"]
    return manifest["safety"].get("guard", {}).get(point, {}).get("min_confidence") is None


def replay(manifest: dict, cheaper, agrees, n_test: int, rate: float, settings, trials: int) -> dict:
    from service.guard import Guard, GuardSettings

    point = manifest["router"]["operating_point"]
    safety = manifest["safety"]
    if guard_off(manifest):  # detection alone: a stand-in floor so that the Guard judges the audits
        safety = {**safety, "guard": {**safety["guard"], point: {**safety["guard"][point], "min_confidence": 1.0}}}
    guard_settings = GuardSettings(
        enabled=True,
        margin=settings.guard_margin,
        recover_margin=settings.guard_recover_margin,
        window=settings.guard_window,
        min_audits=settings.guard_min_audits,
    )
    false_engagements, engaged_at, guarded_test = 0, [], []
    for trial in range(trials):
        draw = random.Random(trial)
        guard = Guard(
            model=manifest["name"], operating_point=point, min_confidence=None, safety=safety,
            settings=guard_settings,
        )  # fmt: skip
        on_in_test, first_ood = 0, None
        for i in range(len(cheaper)):
            if guard.active:  # this request is served guarded
                if i < n_test:
                    on_in_test += 1
                elif first_ood is None:
                    first_ood = i - n_test + 1
            if cheaper[i] and draw.random() < rate:
                guard.record(bool(agrees[i]))
        false_engagements += on_in_test > 0
        guarded_test.append(on_in_test / n_test)
        engaged_at.append(first_ood)
    reached = np.array([e if e is not None else np.inf for e in engaged_at], dtype=float)
    n_ood = len(cheaper) - n_test

    def quantile(q: float) -> float | None:
        value = float(np.quantile(reached, q, method="higher"))
        return value if np.isfinite(value) else None

    return {
        "rate": rate,
        "trials": trials,
        "false_engagement_in_test": false_engagements / trials,
        "test_requests_guarded_mean": float(np.mean(guarded_test)),
        "engaged_in_ood": float(np.isfinite(reached).mean()),
        "ood_requests_to_engage": {"median": quantile(0.5), "p90": quantile(0.9)},
        f"within_{GOAL_ENGAGE_WITHIN}": float((reached <= GOAL_ENGAGE_WITHIN).mean()),
        "within_600": float((reached <= 600).mean()),
        f"within_{n_ood}": float((reached <= n_ood).mean()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--model", default=None)
    parser.add_argument("--data", type=Path, default=HELD_OUT)
    parser.add_argument("--rates", default="0.02,0.05,0.1,0.25")
    parser.add_argument("--trials", type=int, default=500)
    parser.add_argument(
        "--ood-repeats", type=int, default=4, help="test_ood streamed this many times over (a longer shift)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "guard_replay.json")
    args = parser.parse_args(argv)

    from service.config import Settings

    logging.getLogger("dynfuse").setLevel(logging.ERROR)  # every replayed engagement would log a warning
    settings = Settings(store=args.store)
    data = held_out_data(args.data)
    manifest, cheaper, agrees, n_test = stream(args.store, args.model, data)
    # A shift that lasts: test_ood's requests again, in the same order (each audit is a fresh random draw).
    cheaper = np.concatenate([cheaper[:n_test], *[cheaper[n_test:]] * args.ood_repeats])
    agrees = np.concatenate([agrees[:n_test], *[agrees[n_test:]] * args.ood_repeats])
    point = manifest["router"]["operating_point"]
    validated = manifest["safety"]["operating_points"][point]["agreement"]
    observed = {
        "test": float(agrees[:n_test][cheaper[:n_test]].mean()),
        "test_ood": float(agrees[n_test:][cheaper[n_test:]].mean()),
    }
    runs = [replay(manifest, cheaper, agrees, n_test, float(r), settings, args.trials) for r in args.rates.split(",")]
    rows = [
        [
            f"{run['rate']:g}",
            f"{run['false_engagement_in_test']:.0%}",
            f"{run['test_requests_guarded_mean']:.1%}",
            f"{run['engaged_in_ood']:.0%}",
            run["ood_requests_to_engage"]["median"],
            run["ood_requests_to_engage"]["p90"],
            f"{run[f'within_{GOAL_ENGAGE_WITHIN}']:.0%}",
        ]  # fmt: skip
        for run in runs
    ]
    print(
        f"{point}: validated agreement {validated:.3f}; on the stream: test {observed['test']:.3f}, "
        f"test_ood {observed['test_ood']:.3f}; guard window {settings.guard_window}, min audits "
        f"{settings.guard_min_audits}, margin {settings.guard_margin}, recover margin {settings.guard_recover_margin}"
    )
    if guard_off(manifest):
        print(
            f"the served point {point} has no safer policy (export: {manifest['safety'].get('guard_rule')}): the "
            "server's guard is off; below, when audits would cross its line (detection alone)"
        )
    print(
        markdown_table(
            [
                "audit rate",
                "false engagement (test)",
                "test requests guarded",
                "engaged on test_ood",
                "test_ood requests to engage, median",
                "p90",
                f"within {GOAL_ENGAGE_WITHIN}",
            ],
            rows,
        )  # fmt: skip
    )
    write_result(
        args.out,
        {
            "figure": "guard detection: the shift replayed with random audits",
            "model": manifest["name"],
            "version": manifest["version"],
            "data": str(data.relative_to(REPO) if data.is_relative_to(REPO) else data),
            "operating_point": point,
            # True: no safer policy for the point, the server's guard never engages; the runs are detection alone
            "guard_off": guard_off(manifest),
            "validated_agreement": validated,
            "stream_agreement": observed,
            "requests": {"test": n_test, "test_ood": int(len(cheaper) - n_test)},
            "guard": {
                "window": settings.guard_window,
                "min_audits": settings.guard_min_audits,
                "margin": settings.guard_margin,
                "recover_margin": settings.guard_recover_margin,
            },
            "runs": runs,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
