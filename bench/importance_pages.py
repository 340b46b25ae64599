"""The importance figures the pages show, written from ``bench/results/importance.json`` (bench/importance.py).

Every block of README.md, docs/*.md and bench/BENCHMARKS.md between ``<!-- importance: NAME -->`` and
``<!-- /importance -->`` is rendered from that file; tests/unit/test_bench_importance.py fails when a block is not
what the recorded figures render, or when they are not of the model the repository ships.

    python -m bench.importance_pages      # write the blocks from the recorded JSON (bench/importance.py does it too)
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "bench" / "results" / "importance.json"
PAGES = ("README.md", "docs/*.md", "bench/BENCHMARKS.md")
BLOCK = re.compile(r"(<!-- importance: (?P<name>[\w./-]+) -->\n)(?P<body>.*?)(<!-- /importance -->)", re.DOTALL)
KINDS = ("text_sufficient", "image_needed", "noisy_image", "image_decides", "cross_modal")
SPLITS = ("test", "test_ood")


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]) + "\n"


def _pct(value: float, digits: int = 1) -> str:
    return f"{100 * value:.{digits}f}%"


def _mark(text: str, met: bool) -> str:
    return text if met else f"{text} (**not met**)"


def render_model(result: dict) -> str:
    """Which model, which held-out set, which command."""
    provenance = result.get("provenance", {})
    commit = (provenance.get("commit") or "an unknown commit")[:7]
    digest = (provenance.get("training_inputs") or "unknown")[:12]
    splits = [split for split in SPLITS if split in result["splits"]]
    samples = ", ".join(f"{split} {result['splits'][split]['samples']:,}" for split in splits)
    return (
        f"Figures of `store/{result['model']}/{result['version']}` (built at `{commit}`, training inputs `{digest}`) "
        f"on a held-out set generated with seed {result['held_out']['seed']} ({samples} pairs), measured on "
        f"{result['date']} by `python -m bench.importance` into "
        "[`bench/results/importance.json`](../bench/results/importance.json).\n"
    )


def render_methods(result: dict) -> str:
    """How each expert's default importance is computed, and what it and explain=true cost."""
    how = {"one_modality": "reads one modality: it gets 1", "exact": "exact Shapley values",
           "head": "a head distilled from exact values"}  # fmt: skip
    rows = [[f"`{expert}`", f"`{entry['method']}` ({how.get(entry['method'], entry['method'])})",
             f"{entry['madds']:,}", f"{entry['explain_madds']:,}"]
            for expert, entry in result["attribution"].items()]  # fmt: skip
    return _table(["expert", "default", "its MAdds", "`explain=true`'s MAdds"], rows)


def render_kinds(result: dict) -> str:
    """Mean image share per case kind: the default importance, the exact values, the routers' modality weights."""
    splits = [s for s in SPLITS if s in result["splits"]]
    header = ["kind"]
    for split in splits:
        header += [f"{split}: `importance`", "exact", "`route.modality_weights`"]
    rows = []
    for kind in KINDS:
        row = [kind]
        for split in splits:
            shares = result["splits"][split]["image_share_by_kind"]
            row += [f"{shares[name][kind]:.3f}" for name in ("default", "exact", "modality_weights")]
        rows.append(row)
    return _table(header, rows)


def render_goals(result: dict) -> str:
    """The issue's goals, per split, with whether each is met."""
    goals, splits = result["goals"], [s for s in SPLITS if s in result["splits"]]
    figures = {split: result["splits"][split] for split in splits}
    met = result["met"]

    def cells(measure, key) -> list[str]:
        return [_mark(measure(figures[split]), met[split][key]) for split in splits]

    def deleted(f: dict) -> str:
        held = f["deletion"]["expert_held"]["default"]
        return f"{_pct(held['rated_higher'])} of {held['pairs']:,}"

    def auroc(f: dict) -> str:
        d = f["direction"]
        return (f"{d['auroc_default']:.3f} (exact {d['auroc_exact']:.3f}, modality weights "
                f"{d['auroc_modality_weights']:.3f})")  # fmt: skip

    auroc_goal = " / ".join(f"{goals['auroc'][split]:.2f}" for split in splits)
    rows = [
        [f"sign of image − text agrees with `explain` (≥ {_pct(goals['sign_agreement'], 0)})",
         *cells(lambda f: _pct(f["agreement"]["sign"]), "sign_agreement")],
        [f"MAE of the image share against `explain` (≤ {goals['mae']})",
         *cells(lambda f: f"{f['agreement']['mae']:.4f}", "mae")],
        [f"default's MAdds per request, share of the full path (≤ {_pct(goals['cost_share'], 0)})",
         *cells(lambda f: _pct(f["cost"]["default_share_of_full"], 2), "cost")],
        [f"deletion: the removed modality rated higher (≥ {_pct(goals['deletion'], 0)})",
         *cells(deleted, "deletion")],
        [f"image_decides: image > 0.5 (≥ {_pct(goals['direction'], 0)})",
         *cells(lambda f: _pct(f["direction"]["image_decides_image_above_half"]), "image_decides")],
        [f"text_sufficient: text > 0.5 (≥ {_pct(goals['direction'], 0)})",
         *cells(lambda f: _pct(f["direction"]["text_sufficient_text_above_half"]), "text_sufficient")],
        [f"AUROC image_decides vs text_sufficient (≥ {auroc_goal})", *cells(auroc, "auroc")],
    ]  # fmt: skip
    return _table(["goal", *splits], rows)


def render_details(result: dict) -> str:
    """What the goals rest on: deletion with the served system, the explained cost, per expert, labels kept."""
    splits = [s for s in SPLITS if s in result["splits"]]
    figures = {split: result["splits"][split] for split in splits}
    served = [
        f"{_pct(f['deletion']['served']['rated_higher'])} of {f['deletion']['served']['pairs']:,}"
        for f in figures.values()
    ]
    exact = [
        f"{_pct(f['deletion']['expert_held']['exact']['rated_higher'])} of "
        f"{f['deletion']['expert_held']['exact']['pairs']:,}"
        for f in figures.values()
    ]
    added = {split: f["cost"]["explain_madds_per_request"] - f["cost"]["default_madds_per_request"]
             for split, f in figures.items()}  # fmt: skip
    rows = [
        ["accuracy of the served answers", *[_pct(f["accuracy"], 2) for f in figures.values()]],
        ["deletion with the exact values (answering expert held)", *exact],
        ["deletion with the served system (the request sent without that modality: the router picks again)", *served],
        ["MAdds an explained request adds, on average (share of the full path)",
         *[f"{added[split]:,.0f} ({_pct(added[split] / f['cost']['madds_full'])})" for split, f in figures.items()]],
    ]  # fmt: skip
    order = list(result["attribution"])
    experts = sorted({e for f in figures.values() for e in f["agreement"]["by_expert"]},
                     key=lambda e: order.index(e) if e in order else len(order))  # fmt: skip
    for expert in experts:
        cells = []
        for f in figures.values():
            entry = f["agreement"]["by_expert"].get(expert)
            cells.append(
                f"{entry['requests']:,} answers, sign {_pct(entry['sign_agreement'])}, MAE {entry['mae']:.3f}"
                if entry
                else "no answers"
            )
        method = result["attribution"].get(expert, {}).get("method", "?")
        rows.append([f"`{expert}` ({method}): its answers, default against exact", *cells])
    for kind in KINDS:
        kept = [
            f"{_pct(f['label_kept_by_kind']['text_only'][kind])} / {_pct(f['label_kept_by_kind']['image_only'][kind])}"
            for f in figures.values()
        ]
        rows.append([f"{kind}: the answering expert keeps its label with the text alone / the image alone", *kept])
    return _table(["measure", *splits], rows)


def render_summary(result: dict) -> str:
    """One sentence for the model pages."""
    test = result["splits"]["test"]
    shares = test["image_share_by_kind"]["default"]
    costs = [result["splits"][s]["cost"]["default_share_of_full"] for s in SPLITS if s in result["splits"]]
    return (
        f"On a held-out set (seed {result['held_out']['seed']}), the image's mean share of `importance` is "
        f"{shares['image_decides']:.2f} for image_decides and {shares['text_sufficient']:.2f} for text_sufficient on "
        f"test; the default agrees with the exact Shapley values on which modality counted more for "
        f"{_pct(test['agreement']['sign'])} of the test pairs (MAE {test['agreement']['mae']:.3f}), and costs "
        f"{' and '.join(_pct(c, 2) for c in costs)} of the full path's MAdds (test, test_ood).\n"
    )


RENDERERS = {
    "model": render_model,
    "methods": render_methods,
    "kinds": render_kinds,
    "goals": render_goals,
    "details": render_details,
    "summary": render_summary,
}


def pages(repo: Path = REPO) -> list[Path]:
    return sorted({p for pattern in PAGES for p in repo.glob(pattern)})


def render_page(text: str, result: dict, page: Path, repo: Path = REPO) -> str:
    def replace(match: re.Match) -> str:
        body = RENDERERS[match["name"]](result)
        if page.parent != repo / "docs":  # links in the blocks are written from docs/
            body = body.replace("](../bench/", "](bench/" if page.parent == repo else "](")
        return f"{match.group(1)}{body}{match.group(4)}"

    return BLOCK.sub(replace, text)


def block_names(repo: Path = REPO) -> set[str]:
    return {m["name"] for page in pages(repo) for m in BLOCK.finditer(page.read_text())}


def stale_pages(result: dict, repo: Path = REPO) -> list[str]:
    return [
        str(page.relative_to(repo))
        for page in pages(repo)
        if render_page(page.read_text(), result, page, repo) != page.read_text()
    ]


def write_pages(result: dict, repo: Path = REPO) -> list[Path]:
    changed = []
    for page in pages(repo):
        text = page.read_text()
        rendered = render_page(text, result, page, repo)
        if rendered != text:
            page.write_text(rendered)
            changed.append(page)
    return changed


def main() -> int:
    for page in write_pages(json.loads(RESULT.read_text())):
        print(f"wrote {page.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
