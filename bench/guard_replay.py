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
import dataclasses
import json
import logging
import random
from pathlib import Path

import numpy as np

from bench.common import DEFAULT_STORE, REPO, RESULTS, markdown_table, write_result
from bench.shift import GOAL_ENGAGE_WITHIN, HELD_OUT, held_out_data


def ood_pvalues(store: Path, model: str | None, data: Path, split: str) -> np.ndarray:
    """(N,) each request's out-of-distribution p-value as the server computes it for requests that name no policy
    (the served point with the store's confidence floor: the answering path decides which views score it)."""
    import io

    from PIL import Image

    from bench.uncertain import answers
    from export.backends import create_backend
    from export.pipeline import DynamicPipeline
    from export.store import load_model
    from models.data.manifest import read_split

    pipeline = DynamicPipeline(load_model(store, model), create_backend("onnx", "cpu"))
    samples = read_split(data, split)
    pictures = []
    for sample in samples:
        with Image.open(io.BytesIO(sample.image_path.read_bytes())) as image:
            pictures.append(image.convert("RGB"))
    return np.array([o.ood_pvalue for o in answers(pipeline, [s.text for s in samples], pictures)])


def stream(store: Path, model: str | None, data: Path) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray, int]:
    """(model.json, cheaper (N,), agrees (N,), ood p-values (N,), test requests): the test split then test_ood, in
    file order."""
    from export.evaluate import evaluate_store
    from models.policy import decide_routes

    cheaper, agrees, pvalues = [], [], []
    for split in ("test", "test_ood"):
        pvalues.append(ood_pvalues(store, model, data, split))
        _, out = evaluate_store(store, model, data, split=split, progress=False)
        full = out.experts.index(out.full_expert)
        answers = np.stack([out.expert_probs[e].argmax(axis=1) for e in out.experts], axis=1)
        path_madds = np.array([out.path_madds[e] for e in out.experts], dtype=np.float64)
        choice, _ = decide_routes(out.router_scores[out.default_router], full, path_madds=path_madds)
        cheaper.append(choice != full)
        agrees.append(answers[np.arange(len(choice)), choice] == answers[:, full])
    from export.store import load_model

    manifest = load_model(store, model).manifest
    return manifest, np.concatenate(cheaper), np.concatenate(agrees), np.concatenate(pvalues), len(cheaper[0])


def guard_off(manifest: dict) -> bool:
    """Whether the server's guard is off for the served point: export chose no safer policy for it."""
    point = manifest["router"]["operating_point"]
    return manifest["safety"].get("guard", {}).get(point, {}).get("min_confidence") is None


def replay(manifest: dict, cheaper, agrees, pvalues, n_test: int, rate: float, guard_settings, trials: int) -> dict:
    """The stream through ``trials`` fresh Guards, each auditing each cheaper answer with probability ``rate``; every
    request's out-of-distribution p-value goes to the guard as the server's auditor sends it. A trial stops at its
    first guarded test_ood request (what is measured is whether and when that came)."""
    from service.guard import Guard

    point = manifest["router"]["operating_point"]
    safety = manifest["safety"]
    if guard_off(manifest):  # detection alone: a stand-in floor so that the Guard judges the audits
        safety = {**safety, "guard": {**safety["guard"], point: {**safety["guard"][point], "min_confidence": 1.0}}}
    false_engagements, engaged_at, guarded_test, lowered_test = 0, [], [], 0
    cheaper, agrees, pvalues = cheaper.tolist(), agrees.tolist(), pvalues.tolist()
    for trial in range(trials):
        draw = random.Random(trial)
        guard = Guard(
            model=manifest["name"], operating_point=point, min_confidence=None, safety=safety,
            settings=guard_settings,
        )  # fmt: skip
        on_in_test, first_ood, lowered = 0, None, False
        for i in range(len(cheaper)):
            if guard.active:  # this request is served guarded
                if i >= n_test:
                    first_ood = i - n_test + 1
                    break
                on_in_test += 1
            guard.observe_input(pvalues[i])
            lowered = lowered or (i < n_test and guard.inputs_changed)
            if cheaper[i] and draw.random() < rate:
                guard.record(agrees[i])
        false_engagements += on_in_test > 0
        lowered_test += lowered
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
        "inputs_changed_in_test": lowered_test / trials,
        "engaged_in_ood": float(np.isfinite(reached).mean()),
        "ood_requests_to_engage": {"median": quantile(0.5), "p90": quantile(0.9)},
        f"within_{GOAL_ENGAGE_WITHIN}": float((reached <= GOAL_ENGAGE_WITHIN).mean()),
        "within_600": float((reached <= 600).mean()),
        f"within_{n_ood}": float((reached <= n_ood).mean()),
    }


def input_evidence(guard_settings, pvalues, n_test: int) -> dict:
    """Deterministic (no audits): the share of requests flagged out of distribution per phase, and the first
    test_ood request at which the inputs' CUSUM said the inputs changed."""
    from service.cusum import Cusum, Design, threshold

    alpha = guard_settings.ood_alpha
    flagged = pvalues < alpha
    out = {"ood_share": {"test": float(flagged[:n_test].mean()), "test_ood": float(flagged[n_test:].mean())}}
    if guard_settings.input_shift_share <= alpha:
        return out | {"inputs_changed_from": None}
    design = Design(alpha, guard_settings.input_shift_share)
    cusum = Cusum(design, threshold(design, guard_settings.input_false_alarm_requests))
    first_test = first_ood = None
    for i, flag in enumerate(flagged.tolist()):
        if cusum.observe(flag):
            if i < n_test and first_test is None:
                first_test = i + 1
            if i >= n_test:
                first_ood = i - n_test + 1
                break
    return out | {"input_threshold": cusum.h, "inputs_changed_in_test_at": first_test, "inputs_changed_from": first_ood}


def shifted_stream(store: Path, model: str | None, data: Path, ood_repeats: int) -> dict:
    """The stream of ``stream`` with test_ood repeated ``ood_repeats`` times over (a shift that lasts; each audit is
    a fresh random draw), kept in build/ next to the data (it takes a minute or two to compute)."""
    from export.store import load_model

    stored = load_model(store, model).manifest
    cache = data.parent / f"guard-stream-{data.name}-{stored['name']}-{stored['version']}.npz"
    if cache.is_file():
        saved = np.load(cache, allow_pickle=False)
        manifest = json.loads(str(saved["manifest"]))
        cheaper, agrees, pvalues, n_test = saved["cheaper"], saved["agrees"], saved["pvalues"], int(saved["n_test"])
    else:
        manifest, cheaper, agrees, pvalues, n_test = stream(store, model, data)
        np.savez(cache, manifest=json.dumps(manifest), cheaper=cheaper, agrees=agrees, pvalues=pvalues, n_test=n_test)
    repeat = [slice(0, n_test), *[slice(n_test, None)] * ood_repeats]
    return {
        "manifest": manifest,
        "cheaper": np.concatenate([cheaper[r] for r in repeat]),
        "agrees": np.concatenate([agrees[r] for r in repeat]),
        "pvalues": np.concatenate([pvalues[r] for r in repeat]),
        "n_test": n_test,
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
    from service.guard import GuardSettings

    logging.getLogger("dynfuse").setLevel(logging.ERROR)  # every replayed engagement would log a warning
    settings = Settings(store=args.store)  # the server's defaults (and any DYNFUSE_* set)
    guard_settings = GuardSettings.of(settings, enabled=True)
    data = held_out_data(args.data)
    shifted = shifted_stream(args.store, args.model, data, args.ood_repeats)
    manifest, cheaper, agrees, pvalues, n_test = (
        shifted[k] for k in ("manifest", "cheaper", "agrees", "pvalues", "n_test")
    )
    point = manifest["router"]["operating_point"]
    validated = manifest["safety"]["operating_points"][point]["agreement"]
    observed = {
        "test": float(agrees[:n_test][cheaper[:n_test]].mean()),
        "test_ood": float(agrees[n_test:][cheaper[n_test:]].mean()),
    }
    inputs = input_evidence(guard_settings, pvalues, n_test)
    runs = [
        replay(manifest, cheaper, agrees, pvalues, n_test, float(r), guard_settings, args.trials)
        for r in args.rates.split(",")
    ]
    rows = [
        [
            f"{run['rate']:g}",
            f"{run['false_engagement_in_test']:.1%}",
            f"{run['test_requests_guarded_mean']:.1%}",
            f"{run['engaged_in_ood']:.0%}",
            run["ood_requests_to_engage"]["median"],
            run["ood_requests_to_engage"]["p90"],
            f"{run[f'within_{GOAL_ENGAGE_WITHIN}']:.1%}",
            f"{run['within_600']:.1%}",
        ]  # fmt: skip
        for run in runs
    ]
    print(
        f"{point}: validated agreement {validated:.3f}; on the stream: test {observed['test']:.3f}, "
        f"test_ood {observed['test_ood']:.3f}; out of distribution: test {inputs['ood_share']['test']:.3f}, "
        f"test_ood {inputs['ood_share']['test_ood']:.3f}, inputs changed from test_ood request "
        f"{inputs['inputs_changed_from']}; guard: {guard_settings}"
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
                "within 600",
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
            "inputs": inputs,
            "requests": {"test": n_test, "test_ood": int(len(cheaper) - n_test)},
            "guard": dataclasses.asdict(guard_settings),
            "runs": runs,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
