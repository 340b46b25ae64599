"""Every figure about the shipped default model, computed from its files: accuracy, compute saved, operating points,
the router's modality weights, per kind, test_ood, and the Pareto plots.

The model is ``store/shapes/1``; its test and test_ood splits are generated again from the data configuration its
provenance records (the generator is deterministic), and evaluated through the served components
(``export/evaluate.py``). The figures go to ``bench/results/default_model.json``; every block of README.md,
docs/*.md and bench/BENCHMARKS.md between ``<!-- figures: NAME -->`` and ``<!-- /figures -->`` is written from
that file. Timings (milliseconds per sample) are measured here too, with the machine and its load beside them;
they are the only figures that depend on the machine, and the only ones ``--check`` does not compare.

    python -m bench.figures             # compute, write the JSON, the plots and the pages (make figures)
    python -m bench.figures --check     # compute and compare with the JSON and the pages; write nothing
    python -m bench.figures --render    # write the pages from the JSON as it is (no model run)

tests/integration/test_documented_figures.py runs ``--check``'s comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STORE = REPO / "store"
MODEL = "shapes"
RESULT = REPO / "bench" / "results" / "default_model.json"
PLOTS = {"test": REPO / "bench" / "results" / "pareto.png", "test_ood": REPO / "bench" / "results" / "pareto_ood.png"}
DATA_WORK = REPO / "build" / "figures"
PAGES = ("README.md", "docs/*.md", "bench/BENCHMARKS.md")
SPLITS = ("test", "test_ood")
BLOCK = re.compile(r"(<!-- figures: (?P<name>[\w./-]+) -->\n)(?P<body>.*?)(<!-- /figures -->)", re.DOTALL)
ROUND = 6  # digits kept in the JSON: what the pages show, and what --check compares


# ---------------------------------------------------------------------------------------------------- computing


def data_dir_for(model, work: Path = DATA_WORK) -> Path:
    """The model's test and test_ood splits, generated from the data configuration its provenance records."""
    from models.data.synthetic import GENERATOR_VERSION, SynthConfig, generate

    recorded = model.manifest.get("provenance", {}).get("data")
    if recorded is None:
        raise SystemExit(f"{model.path}: model.json records no provenance.data; rebuild it with make ship-default")
    if recorded["generator_version"] != GENERATOR_VERSION:
        raise SystemExit(
            f"{model.path} was trained on generator version {recorded['generator_version']}, this checkout's is "
            f"{GENERATOR_VERSION}: rebuild the model (make ship-default)"
        )
    config = SynthConfig(**{k: v for k, v in recorded.items() if k != "generator_version"})
    target = Path(work) / f"data-g{GENERATOR_VERSION}-{config.size}-s{config.seed}-{config.image_size}px"
    if not all((target / f"{split}.jsonl").is_file() for split in SPLITS):
        generate(target, config, splits=SPLITS, progress=False, overwrite=True)
    return target


def compute(store: Path = STORE, *, timings: bool = True, work: Path = DATA_WORK) -> tuple[dict, dict]:
    """(figures, rows by split): everything the pages show about the model, and the raw policy rows."""
    from export.evaluate import evaluate_store
    from export.store import load_model
    from models.evaluation import find_row

    model = load_model(store, MODEL)
    data = data_dir_for(model, work)
    rows = {split: evaluate_store(store, MODEL, data, split=split, progress=False)[0] for split in SPLITS}
    test, ood = rows["test"], rows["test_ood"]
    kinds = sorted(find_row(test, "auto")["accuracy_by_kind"])
    provenance = model.manifest["provenance"]
    figures = {
        "model": {
            "name": model.name,
            "version": model.version,
            "commit": provenance.get("commit"),
            "training_inputs": provenance["training_inputs"]["digest"],
            "served_point": model.default_point,
            "served_min_confidence": model.default_min_confidence,
            "full_expert": model.full_expert,
            "madds_full": model.madds_full,
            "samples": {split: _samples(data, split) for split in SPLITS},
        },
        "kinds": kinds,
        "experts": [
            {
                "name": expert.name,
                "madds": expert.madds,
                "path_madds": expert.path_madds,
                "static_madds": int(find_row(test, f"static:{expert.name}")["madds_per_sample"]),
                "accuracy": find_row(test, f"static:{expert.name}")["accuracy"],
                "accuracy_by_kind": find_row(test, f"static:{expert.name}")["accuracy_by_kind"],
                "accuracy_test_ood": find_row(ood, f"static:{expert.name}")["accuracy"],
            }
            for expert in model.experts
        ],
        "policies": {
            split: [_policy(row) for row in rows[split] if not row["policy"].startswith("static:")] for split in SPLITS
        },  # fmt: skip
        # DRDF's modal weights (route.modality_weights); the answers' attribution (importance) is bench/importance.py's
        "modality_weights": find_row(test, "auto").get("modality_weights", {}),
    }
    if timings:
        figures["timing"] = measure_timings(store, data)
    return _rounded(figures), rows


def _samples(data: Path, split: str) -> int:
    return sum(1 for line in (data / f"{split}.jsonl").read_text().splitlines() if line.strip())


def _policy(row: dict) -> dict:
    keep = ("policy", "accuracy", "madds_per_sample", "saved_ratio", "route_mix", "accuracy_by_kind", "fallback_share")
    return {key: row[key] for key in keep if key in row}


def _rounded(value):
    if isinstance(value, float):
        return round(value, ROUND)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def measure_timings(store: Path, data: Path, rounds: int = 3) -> dict:
    """Milliseconds per sample of each expert forced over the test split at the serving batch size, with the
    machine and its load: the one machine-dependent figure of the pages."""
    from bench.common import CpuWatch, decoded_inputs, load_test_split, machine
    from bench.experts import time_experts
    from export.backends import create_backend
    from export.pipeline import DynamicPipeline
    from export.store import load_model
    from service.config import Settings

    settings = Settings(store=store)
    pipeline = DynamicPipeline(load_model(store, MODEL), create_backend("onnx", "cpu", settings.threads))
    pipeline.warmup(batch_sizes=(1, settings.max_batch_size))
    inputs = decoded_inputs(pipeline, load_test_split(data))
    load_before = os.getloadavg()[0]
    with CpuWatch() as watch:
        ms = time_experts(pipeline, inputs, settings.max_batch_size, rounds)
    described = machine()
    return {
        "ms_per_sample": ms,
        "batch_size": settings.max_batch_size,
        "machine": f"{described['cpu']['model']}, {described['cores']} cores",
        "load_average": round(max(load_before, os.getloadavg()[0]), 1),
        "other_processes_cpu_share": round(watch.foreign_share, 2),
    }


def plot(rows: dict, figures: dict) -> None:
    from models.evaluation import plot_pareto

    model = figures["model"]
    for split, path in PLOTS.items():
        title = f"{model['name']} v{model['version']}, {split} split ({model['samples'][split]} samples)"
        plot_pareto(rows[split], path, title=title)


# ---------------------------------------------------------------------------------------------------- comparing


def differences(expected: dict, actual: dict, path: str = "") -> list[str]:
    """Where two figure files differ, timings aside. A count over N samples may move by one sample (a runtime on
    another CPU may break a near tie the other way): accuracies and shares within 1.5/N, MAdds within one path's
    worth over N."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        skip = {"timing"} if not path else set()  # the machine's, not the model's
        problems = [f"{path}.{k}: missing" for k in expected if k not in actual and k not in skip]
        problems += [f"{path}.{k}: not in the recorded figures" for k in actual if k not in expected and k not in skip]
        for key in expected:
            if key in actual and key not in skip:
                problems += differences(expected[key], actual[key], f"{path}.{key}" if path else key)
        return problems
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return [f"{path}: {len(actual)} entries, recorded {len(expected)}"]
        return [
            p for i, (e, a) in enumerate(zip(expected, actual, strict=True)) for p in differences(e, a, f"{path}[{i}]")
        ]
    if isinstance(expected, float) or isinstance(actual, float):
        if not isinstance(actual, int | float) or not math.isclose(expected, actual, abs_tol=_tolerance(path)):
            return [f"{path}: computed {actual}, recorded {expected}"]
        return []
    return [] if expected == actual else [f"{path}: computed {actual!r}, recorded {expected!r}"]


def _tolerance(path: str) -> float:
    if "madds" in path:
        return 10_000.0  # one request of ~9 M MAdds moving path, over 1,200 samples, is 7,500
    return 1.5 / 1200 + 1e-9  # accuracy, shares, saved ratio (one request moving path moves it by < 1/1200)


# ---------------------------------------------------------------------------------------------------- rendering


def render(name: str, figures: dict) -> str:
    """The markdown of one named block."""
    try:
        renderer = RENDERERS[name]
    except KeyError:
        raise KeyError(f"no figure block named {name!r}; known: {', '.join(sorted(RENDERERS))}") from None
    return renderer(figures).rstrip("\n") + "\n"


def _pct(value: float, digits: int = 1) -> str:
    return f"{100 * value:.{digits}f}%".replace("-", "−")


def _row(figures: dict, split: str, policy: str) -> dict:
    return next(r for r in figures["policies"][split] if r["policy"] == policy)


def _expert_order(figures: dict) -> list[str]:
    return [e["name"] for e in figures["experts"]]


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _floor_words(model: dict) -> str:
    """The words after the served point's name when the store serves it with a confidence floor (model.json
    router.min_confidence): ", with its confidence floor 0.5"; none without one."""
    floor = model.get("served_min_confidence")
    return "" if floor is None else f", with its confidence floor {floor:g}"


def render_policies(figures: dict) -> str:
    """The headline policies on the test split, with their route mix."""
    experts = _expert_order(figures)
    model = figures["model"]
    label = {
        "full": f"full (`{model['full_expert']}`, static)",
        "cheap": "cheap (the cheapest expert, static)",
        "auto": f"**auto** (the served router, `{model['served_point']}`{_floor_words(model)})",
        "oracle": "oracle (cheapest right expert)",
        "soft": "soft (every expert, weighted)",
    }
    rows = []
    for policy, name in label.items():
        row = _row(figures, "test", policy)
        mix = (
            "all of them" if policy == "soft" else " / ".join(f"{100 * row['route_mix'][e]:.1f}" for e in experts) + "%"
        )
        accuracy = _pct(row["accuracy"], 2)
        rows.append([name, f"**{accuracy}**" if policy == "auto" else accuracy, f"{row['madds_per_sample']:,.0f}",
                     _pct(row["saved_ratio"]), mix])  # fmt: skip
    header = ["policy", "accuracy", "MAdds / sample", "saved", f"route mix ({' / '.join(experts)})"]
    return _table(header, rows)


def render_summary(figures: dict) -> str:
    """The headline in words: auto against full and the oracle, on test and test_ood."""
    from models.evaluation import compare_points

    test = {p: _row(figures, "test", p) for p in ("full", "auto", "oracle")}
    ood = {p: _row(figures, "test_ood", p) for p in ("full", "auto")}
    share = test["auto"]["saved_ratio"] / test["oracle"]["saved_ratio"] if test["oracle"]["saved_ratio"] else 0.0
    used = [e for e, s in test["auto"]["route_mix"].items() if s >= 0.03]
    on_test = compare_points("`auto`", test["auto"]["accuracy"], "the full path", test["full"]["accuracy"])
    on_ood = compare_points("`auto`", ood["auto"]["accuracy"], "the full path", ood["full"]["accuracy"])
    return (
        f"On the test split, {on_test} and saves {_pct(test['auto']['saved_ratio'])} of its multiply-adds: "
        f"{_pct(share, 0)} of what a perfect router (the oracle) would save. {len(used)} experts take at least 3% of "
        f"the requests each ({', '.join(f'`{e}`' for e in used)}). On `test_ood`, where captions use words training "
        f"never saw, {on_ood}, saving {_pct(ood['auto']['saved_ratio'])}.\n"
    )


def render_experts(figures: dict) -> str:
    """Each expert alone: its MAdds, accuracy overall, per kind and on test_ood, and its time per sample."""
    kinds = figures["kinds"]
    timing = figures.get("timing", {})
    ms = timing.get("ms_per_sample", {})
    full = figures["model"]["full_expert"]
    rows = [
        [f"`{e['name']}`" + (" (full)" if e["name"] == full else ""), f"{e['static_madds']:,}", f"{e['path_madds']:,}",
         f"{ms[e['name']]:.2f}" if e["name"] in ms else "", _pct(e["accuracy"]),
         *(_pct(e["accuracy_by_kind"][k]) for k in kinds), _pct(e["accuracy_test_ood"])]
        for e in figures["experts"]
    ]  # fmt: skip
    header = ["expert", "MAdds alone", "MAdds routed", "ms/sample", "accuracy", *kinds, "test_ood"]
    note = (
        "\nMAdds alone: the expert as a static model (the encoders it reads and its own components); routed: what a "
        "request with both modalities that the router sends there costs (plus the other encoder, the glimpse and "
        "the router).\n"
    )
    if timing:
        note += (
            f"\nms/sample: each expert forced over the test split at batch {timing['batch_size']}, on "
            f"{timing['machine']} with a load average of {timing['load_average']} (other processes "
            f"{_pct(timing['other_processes_cpu_share'], 0)} of the CPU): a contended figure when that is high.\n"
        )
    return _table(header, rows) + "\n" + note


def render_modality_weights(figures: dict) -> str:
    """The served router's modality weight of the image per kind: mean (quartiles), highest mean first."""
    by_kind = figures["modality_weights"].get("image_by_kind", {})
    ordered = sorted(by_kind.items(), key=lambda item: -item[1]["mean"])
    rows = [[kind, f"{f['mean']:.2f}", f"{f['q1']:.2f}–{f['q3']:.2f}"] for kind, f in ordered]
    return _table(["case kind", "mean `modality_weights.image`", "quartiles"], rows)


def render_operating_points(figures: dict) -> str:
    """Every policy of the test split: the operating points, thresholds, confidence floors, soft fusion."""
    rows = []
    served = figures["model"]["served_point"]
    for row in figures["policies"]["test"]:
        policy = row["policy"]
        if policy == "cheap":
            continue
        name = f"`{policy}`"
        if policy == "full":
            name = f"`full` (`{figures['model']['full_expert']}`)"
        elif policy == "auto":
            name = f"**`auto`** (`{served}`{_floor_words(figures['model'])}, served)"
        accuracy = _pct(row["accuracy"], 2)
        rows.append([name, f"**{accuracy}**" if policy == "auto" else accuracy, f"{row['madds_per_sample']:,.0f}",
                     _pct(row["saved_ratio"])])  # fmt: skip
    return _table(["policy", "accuracy", "MAdds / sample", "saved"], rows)


def render_test_ood(figures: dict) -> str:
    """test_ood: full, auto, the confidence floors, soft fusion and the oracle."""
    rows = []
    for row in figures["policies"]["test_ood"]:
        policy = row["policy"]
        if policy not in ("full", "auto", "soft", "oracle") and not policy.startswith("confidence="):
            continue
        fell_back = _pct(row["fallback_share"]) if "fallback_share" in row else ""
        rows.append([f"`{policy}`", _pct(row["accuracy"], 2), f"{row['madds_per_sample']:,.0f}",
                     _pct(row["saved_ratio"]), fell_back])  # fmt: skip
    return _table(["policy", "accuracy", "MAdds / sample", "saved", "fell back"], rows)


def render_model(figures: dict) -> str:
    """Which model the figures are of, and where they come from."""
    model = figures["model"]
    commit = (model["commit"] or "an unknown commit")[:7]
    samples = ", ".join(f"{split} {n:,}" for split, n in model["samples"].items())
    return (
        f"Figures of `store/{model['name']}/{model['version']}` (built at `{commit}`, training inputs "
        f"`{model['training_inputs'][:12]}`), served operating point `{model['served_point']}`{_floor_words(model)}, "
        "full path "
        f"`{model['full_expert']}` ({model['madds_full']:,} MAdds); samples: {samples}. Computed by "
        "`make figures` (`python -m bench.figures`) from the shipped files into "
        "[`bench/results/default_model.json`](../bench/results/default_model.json).\n"
    )


def render_goals(figures: dict) -> str:
    """The accuracy goals of the benchmark-v2 issue, measured on the shipped model."""
    from models.evaluation import compare_points

    experts = {e["name"]: e for e in figures["experts"]}
    test = {p: _row(figures, "test", p) for p in ("full", "auto", "oracle")}
    ood = {p: _row(figures, "test_ood", p) for p in ("full", "auto")}
    cross = {name: e["accuracy_by_kind"].get("cross_modal", 0.0) for name, e in experts.items()}
    best = max(("mi2p", "muse"), key=lambda name: cross.get(name, 0.0))
    gain = 100 * (cross[best] - cross["late_fusion"])
    drop = 100 * (test["full"]["accuracy"] - test["auto"]["accuracy"])
    share = test["auto"]["saved_ratio"] / test["oracle"]["saved_ratio"] if test["oracle"]["saved_ratio"] else 0.0
    mix = sorted(test["auto"]["route_mix"].items(), key=lambda item: -item[1])
    used = [(e, s) for e, s in mix if s >= 0.03]
    means = {k: f["mean"] for k, f in figures["modality_weights"].get("image_by_kind", {}).items()}
    spread = max(means.values()) - min(means.values()) if means else float("nan")
    ood_gap = 100 * (ood["full"]["accuracy"] - ood["auto"]["accuracy"])

    def met(ok: bool) -> str:
        return "yes" if ok else "**no**"

    rows = [
        ["cross-modal: best of `mi2p`/`muse` ≥ 10 points above `late_fusion`",
         f"`{best}` {_pct(cross[best])} against {_pct(cross['late_fusion'])}: **{gain:+.1f}**", met(gain >= 10)],
        ["`auto` saves ≥ 50% at ≤ 0.5 points below full",
         f"{_pct(test['auto']['saved_ratio'])} saved; "
         f"{compare_points('auto', test['auto']['accuracy'], 'full', test['full']['accuracy'])}",
         met(test["auto"]["saved_ratio"] >= 0.5 and drop <= 0.5)],
        ["… and ≥ 85% of what `oracle` saves",
         f"{_pct(share)} ({_pct(test['auto']['saved_ratio'])} of {_pct(test['oracle']['saved_ratio'])})",
         met(share >= 0.85)],
        ["≥ 4 experts each chosen for ≥ 3% of test requests",
         ", ".join(f"`{e}` {_pct(s)}" for e, s in mix), met(len(used) >= 4)],
        ["mean `importance.image` differs by ≥ 0.3 between kinds (measured here: the router's "
         "`route.modality_weights`, what `importance` was then; the answers' attribution is figure 9's)",
         f"{spread:.3f}: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(means.items(), key=lambda i: -i[1])),
         met(spread >= 0.3)],
        ["`test_ood`: `auto` within 2 points of full",
         compare_points("auto", ood["auto"]["accuracy"], "full", ood["full"]["accuracy"]), met(ood_gap <= 2)],
    ]  # fmt: skip
    return _table(["goal", "measured on the shipped model", "met?"], rows)


RENDERERS = {
    "default-model/goals": render_goals,
    "default-model/model": render_model,
    "default-model/policies": render_policies,
    "default-model/summary": render_summary,
    "default-model/experts": render_experts,
    "default-model/modality-weights": render_modality_weights,
    "default-model/operating-points": render_operating_points,
    "default-model/test-ood": render_test_ood,
}


def pages(repo: Path = REPO) -> list[Path]:
    return sorted({p for pattern in PAGES for p in repo.glob(pattern)})


def render_page(text: str, figures: dict, page: Path) -> str:
    def replace(match: re.Match) -> str:
        body = render(match["name"], figures)
        if page.parent != REPO / "docs":  # links in the blocks are written from docs/
            body = body.replace("](../bench/", "](bench/" if page.parent == REPO else "](")
        return f"{match.group(1)}{body}{match.group(4)}"

    return BLOCK.sub(replace, text)


def stale_blocks(figures: dict, repo: Path = REPO) -> list[str]:
    """The marked blocks whose text is not what the figures render to."""
    stale = []
    for page in pages(repo):
        text = page.read_text()
        if render_page(text, figures, page) != text:
            names = [m["name"] for m in BLOCK.finditer(text)]
            stale.append(f"{page.relative_to(repo)} ({', '.join(names)})")
    return stale


def write_pages(figures: dict, repo: Path = REPO) -> list[Path]:
    changed = []
    for page in pages(repo):
        text = page.read_text()
        rendered = render_page(text, figures, page)
        if rendered != text:
            page.write_text(rendered)
            changed.append(page)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="compute and compare; write nothing")
    mode.add_argument("--render", action="store_true", help="write the pages from the recorded JSON only")
    parser.add_argument("--store", type=Path, default=STORE)
    args = parser.parse_args(argv)

    if args.render:
        figures = json.loads(RESULT.read_text())
        for page in write_pages(figures):
            print(f"wrote {page.relative_to(REPO)}")
        return 0
    figures, rows = compute(args.store, timings=not args.check)
    if args.check:
        recorded = json.loads(RESULT.read_text())
        problems = differences(recorded, figures) + [f"stale block in {p}" for p in stale_blocks(recorded)]
        for problem in problems:
            print(problem, file=sys.stderr)
        print(f"{len(problems)} differences between the shipped model's figures and {RESULT.relative_to(REPO)}")
        return 1 if problems else 0
    RESULT.write_text(json.dumps(figures, indent=1) + "\n")
    print(f"wrote {RESULT.relative_to(REPO)}")
    plot(rows, figures)
    print(f"wrote {', '.join(str(p.relative_to(REPO)) for p in PLOTS.values())}")
    for page in write_pages(figures):
        print(f"wrote {page.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
