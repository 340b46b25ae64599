"""Figure 9: does ``importance`` say what decided the answer? Measured on a held-out benchmark-v2 set.

A data set is generated with a seed the model's training never saw (``dynfuse data synth --seed``), and its test
and test_ood splits go through the served API (``/v1/classify/batch`` in process, 32 pairs a call), three times:
as is (the default ``importance`` and what it cost), with ``explain`` (the exact Shapley values beside it), and
with each modality left out (what the served system answers without it). Per split it reports:

- per case kind, the mean image share of the default importance, of the exact values and of DRDF's modality
  weights (``route.modality_weights``, what ``importance`` used to be);
- the direction users expect: image_decides with the image > 0.5, text_sufficient with the text > 0.5, and the
  AUROC of the image share as a detector of image_decides against text_sufficient;
- agreement of the default with the exact values: the sign of image - text, and the mean absolute error;
- faithfulness by deletion (ERASER's comprehensiveness, for two modalities): among the pairs where removing exactly
  one modality changes the label, how often the removed one is the one importance rated higher. The expert that
  answered is held fixed (its answers with a modality removed are ``explanation.labels``); the served system, whose
  router then picks another path, is reported beside it;
- the cost: the default's MAdds per request against the full path's, and what ``explain`` adds.

    python -m bench.importance [--store store] [--data build/importance-heldout-s2121] [--seed 2121]

With the default --out it also writes the pages' importance blocks (bench/importance_pages.py).
"""

from __future__ import annotations

import argparse
import base64
import json
import time
from pathlib import Path

import numpy as np

from bench import importance_pages as pages
from bench.common import DEFAULT_STORE, RESULTS, chunks, load_test_split, markdown_table, write_result

SPLITS = ("test", "test_ood")
KINDS = ("text_sufficient", "image_needed", "noisy_image", "image_decides", "cross_modal")
GOALS = {
    "sign_agreement": 0.95,  # default against exact, sign of image - text
    "mae": 0.08,  # default against exact, image share
    "cost_share": 0.02,  # the default's MAdds per request over the full path's
    "deletion": 0.90,
    "direction": 0.85,  # image_decides: image > 0.5; text_sufficient: text > 0.5
    "auroc": {"test": 0.95, "test_ood": 0.90},
}
BATCH = 32


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counting half (Mann-Whitney U over both sizes)."""
    positive, negative = np.asarray(positive, float), np.asarray(negative, float)
    if not len(positive) or not len(negative):
        return float("nan")
    above = (positive[:, None] > negative[None, :]).sum() + 0.5 * (positive[:, None] == negative[None, :]).sum()
    return float(above / (len(positive) * len(negative)))


def sign_agreement(first: np.ndarray, second: np.ndarray) -> float:
    """How often two (N, 2) text/image splits agree on which modality counted more (both even counts as agreeing)."""
    return float((np.sign(first[:, 1] - first[:, 0]) == np.sign(second[:, 1] - second[:, 0])).mean())


def deletion(labels: list[str], without_image: list[str], without_text: list[str], importance: np.ndarray) -> dict:
    """ERASER's comprehensiveness for two modalities: among the pairs where removing exactly one modality changes
    the label, the share where importance rated that one higher."""
    changed_text = np.array([a != b for a, b in zip(labels, without_text, strict=True)])  # the text removed
    changed_image = np.array([a != b for a, b in zip(labels, without_image, strict=True)])
    text_decided = changed_text & ~changed_image
    image_decided = changed_image & ~changed_text
    right = (text_decided & (importance[:, 0] > importance[:, 1])) | (
        image_decided & (importance[:, 1] > importance[:, 0])
    )
    pairs = int(text_decided.sum() + image_decided.sum())
    return {
        "pairs": pairs,
        "text_decided": int(text_decided.sum()),
        "image_decided": int(image_decided.sum()),
        "rated_higher": float(right.sum() / pairs) if pairs else float("nan"),
    }


def _pairs(sample: dict, without: str | None = None) -> dict:
    entry = {"id": sample["id"], "image": base64.b64encode(sample["png"]).decode(), "text": sample["text"]}
    if without is not None:
        entry.pop(without)
    return entry


def run_split(client, samples: list[dict], model: str) -> dict[str, list[dict]]:
    """Each sample's answers: as served, explained, and without each modality."""
    answers: dict[str, list[dict]] = {"plain": [], "explained": [], "without_text": [], "without_image": []}
    for batch in chunks(samples, BATCH):
        for name, options, without in (
            ("plain", {}, None),
            ("explained", {"explain": True}, None),
            ("without_text", {}, "text"),
            ("without_image", {}, "image"),
        ):
            body = {"inputs": [_pairs(s, without) for s in batch], "model": model} | options
            response = client.post("/v1/classify/batch", json=body)
            assert response.status_code == 200, response.text
            answers[name] += response.json()["outputs"]
    return answers


def _split(values: list[dict]) -> np.ndarray:
    """(N, 2) text, image from the responses' {"text", "image"} objects."""
    return np.array([[v["text"], v["image"]] for v in values])


def split_figures(samples: list[dict], answers: dict[str, list[dict]], madds_full: int) -> dict:
    kinds = np.array([s["kind"] for s in samples])
    plain, explained = answers["plain"], answers["explained"]
    default = np.array([[a["importance"]["text"], a["importance"]["image"]] for a in explained])
    exact = np.array(
        [[a["explanation"]["importance"]["text"], a["explanation"]["importance"]["image"]] for a in explained]
    )
    weights = np.array(
        [[a["route"]["modality_weights"]["text"], a["route"]["modality_weights"]["image"]] for a in plain]
    )
    experts = np.array([a["route"]["expert"] for a in plain])
    assert all(p["importance"] == e["importance"] for p, e in zip(plain, explained, strict=True)), "explain moved it"

    def by_kind(values: np.ndarray) -> dict:
        return {k: round(float(values[kinds == k].mean()), 4) for k in KINDS if (kinds == k).any()}

    decides, sufficient = kinds == "image_decides", kinds == "text_sufficient"
    labels = [a["label"] for a in explained]
    per_expert = {}
    for expert in sorted(set(experts)):
        rows = experts == expert
        per_expert[expert] = {
            "requests": int(rows.sum()),
            "method": explained[int(np.flatnonzero(rows)[0])]["importance_method"],
            "sign_agreement": round(sign_agreement(default[rows], exact[rows]), 4),
            "mae": round(float(np.abs(default[rows, 1] - exact[rows, 1]).mean()), 4),
            "image_share_default": round(float(default[rows, 1].mean()), 4),
            "image_share_exact": round(float(exact[rows, 1].mean()), 4),
        }
    # What the answering expert keeps of its answer with one modality removed: where the text alone keeps it, the
    # text could have decided; where only the image does, the image did (a caption of unknown words, say).
    kept = {
        coalition: np.array([a["explanation"]["labels"][coalition] == a["label"] for a in explained])
        for coalition in ("text_only", "image_only")
    }
    return {
        "samples": len(samples),
        "label_kept_by_kind": {coalition: by_kind(values.astype(float)) for coalition, values in kept.items()},
        "route_mix": {e: round(float((experts == e).mean()), 4) for e in sorted(set(experts))},
        "image_share_by_kind": {
            "default": by_kind(default[:, 1]),
            "exact": by_kind(exact[:, 1]),
            "modality_weights": by_kind(weights[:, 1]),
        },  # fmt: skip
        "direction": {
            "image_decides_image_above_half": round(float((default[decides, 1] > 0.5).mean()), 4),
            "text_sufficient_text_above_half": round(float((default[sufficient, 0] > 0.5).mean()), 4),
            "auroc_default": round(auroc(default[decides, 1], default[sufficient, 1]), 4),
            "auroc_exact": round(auroc(exact[decides, 1], exact[sufficient, 1]), 4),
            "auroc_modality_weights": round(auroc(weights[decides, 1], weights[sufficient, 1]), 4),
        },
        "agreement": {
            "sign": round(sign_agreement(default, exact), 4),
            "mae": round(float(np.abs(default[:, 1] - exact[:, 1]).mean()), 4),
            "by_expert": per_expert,
        },
        "deletion": {
            "expert_held": {
                "default": deletion(
                    labels,
                    [a["explanation"]["labels"]["text_only"] for a in explained],
                    [a["explanation"]["labels"]["image_only"] for a in explained],
                    default,
                ),
                "exact": deletion(
                    labels,
                    [a["explanation"]["labels"]["text_only"] for a in explained],
                    [a["explanation"]["labels"]["image_only"] for a in explained],
                    exact,
                ),
            },  # fmt: skip
            "served": deletion(
                [a["label"] for a in plain],
                [a["label"] for a in answers["without_image"]],
                [a["label"] for a in answers["without_text"]],
                default,
            ),
        },
        "cost": {
            "default_madds_per_request": round(float(np.mean([a["compute"]["attribution_madds"] for a in plain])), 1),
            "default_share_of_full": round(
                float(np.mean([a["compute"]["attribution_madds"] for a in plain])) / madds_full, 5
            ),
            "explain_madds_per_request": round(
                float(np.mean([a["compute"]["attribution_madds"] for a in explained])), 1
            ),
            "madds_full": madds_full,
        },
        "accuracy": round(float(np.mean([a["label"] == s["label"] for a, s in zip(plain, samples, strict=True)])), 4),
    }


def goals(figures: dict) -> dict:
    met = {}
    for split, f in figures.items():
        deleted = f["deletion"]["expert_held"]["default"]["rated_higher"]
        met[split] = {
            "sign_agreement": f["agreement"]["sign"] >= GOALS["sign_agreement"],
            "mae": f["agreement"]["mae"] <= GOALS["mae"],
            "cost": f["cost"]["default_share_of_full"] <= GOALS["cost_share"],
            "deletion": deleted >= GOALS["deletion"],
            "image_decides": f["direction"]["image_decides_image_above_half"] >= GOALS["direction"],
            "text_sufficient": f["direction"]["text_sufficient_text_above_half"] >= GOALS["direction"],
            "auroc": f["direction"]["auroc_default"] >= GOALS["auroc"][split],
        }
    return met


def plot(figures: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(figures), figsize=(6 * len(figures), 4), sharey=True)
    for ax, (split, f) in zip(np.atleast_1d(axes), figures.items(), strict=True):
        shares = f["image_share_by_kind"]
        kinds = [k for k in KINDS if k in shares["default"]]
        x = np.arange(len(kinds))
        for offset, (name, colour) in zip(
            (-0.27, 0.0, 0.27),
            (("default", "#3b6ea8"), ("exact", "#f2a541"), ("modality_weights", "#9a9a9a")),
            strict=True,
        ):
            label = {"default": "importance (default)", "exact": "explain=true (exact Shapley)",
                     "modality_weights": "route.modality_weights (DRDF)"}[name]  # fmt: skip
            ax.bar(x + offset, [shares[name][k] for k in kinds], width=0.27, color=colour, label=label)
        ax.axhline(0.5, color="black", linewidth=0.6, linestyle=":")
        ax.set_xticks(x, [k.replace("_", "\n") for k in kinds])
        ax.set_title(
            f"{split}: AUROC {f['direction']['auroc_default']:.3f}, sign agreement {f['agreement']['sign']:.1%}"
        )
        ax.set_ylim(0, 1)
    np.atleast_1d(axes)[0].set_ylabel("mean image share")
    handles, labels = np.atleast_1d(axes)[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def held_out_data(data: Path, seed: int, store_model) -> Path:
    """The held-out set: generated here when missing, and never the seed the model was trained on."""
    from models.data.synthetic import SynthConfig, generate

    trained_on = store_model.manifest.get("provenance", {}).get("data", {}).get("seed")
    if trained_on is None:  # a model built before provenance: its data directory may still be on this machine
        synth = Path(store_model.manifest.get("training", {}).get("data", {}).get("dir", "")) / "synth.json"
        trained_on = json.loads(synth.read_text())["config"]["seed"] if synth.is_file() else None
    if trained_on == seed:
        raise SystemExit(f"--seed {seed} is the seed the model was trained on: pick another")
    if not (data / "synth.json").is_file():
        generate(data, SynthConfig(seed=seed, image_size=store_model.preprocessing.image_size), splits=SPLITS)
    return data


def wait_ready(client, timeout_s: float = 900.0) -> None:
    """Until the app has loaded and warmed the model (minutes on a busy machine)."""
    deadline = time.monotonic() + timeout_s
    while client.get("/readyz").status_code != 200:
        if time.monotonic() > deadline:
            raise SystemExit(f"the model was not ready after {timeout_s:.0f} s: {client.get('/readyz').text}")
        time.sleep(0.2)


def measure(store: Path, model: str, data: Path) -> dict:
    """The figures of each split of ``data``, through the API of an app serving ``model`` of ``store``."""
    from fastapi.testclient import TestClient

    from export.store import load_model
    from service.config import Settings
    from service.main import create_app

    madds_full = load_model(store, model).madds_full
    figures = {}
    # No audits and no guard: audits sample answers at random, and a guard they engage changes later answers, so
    # the figures would differ from run to run. These are the figures of the router's own answers.
    settings = Settings(store=store, model=model, audit_rate=0.0, guard=False)
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        for split in SPLITS:
            samples = load_test_split(data, split)
            figures[split] = split_figures(samples, run_split(client, samples, model), madds_full)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--model", default=None, help="the store's model (default: its only one)")
    parser.add_argument("--seed", type=int, default=2121, help="the held-out set's seed (never the training's)")
    parser.add_argument("--data", type=Path, default=None, help="default: build/importance-heldout-s<seed>")
    parser.add_argument("--out", type=Path, default=RESULTS / "importance.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "importance.png")
    parser.add_argument("--plot-only", action="store_true", help="redraw the figure from --out's figures")
    args = parser.parse_args(argv)
    if args.plot_only:
        plot(json.loads(args.out.read_text())["splits"], args.plot)
        return 0

    from export.store import load_model

    model = load_model(args.store, args.model)
    data = held_out_data(args.data or Path("build") / f"importance-heldout-s{args.seed}", args.seed, model)
    figures = measure(args.store, model.name, data)
    met = goals(figures)
    for split, f in figures.items():
        print(f"\n{split} ({f['samples']} pairs, accuracy {f['accuracy']:.2%}):")
        shares = f["image_share_by_kind"]
        print(markdown_table(
            ["kind", "importance.image (default)", "exact", "route.modality_weights.image"],
            [[k, f"{shares['default'][k]:.3f}", f"{shares['exact'][k]:.3f}", f"{shares['modality_weights'][k]:.3f}"]
             for k in KINDS if k in shares["default"]],
        ))  # fmt: skip
        print(json.dumps({k: f[k] for k in ("direction", "cost")}, indent=1))
        print("agreement", f["agreement"]["sign"], f["agreement"]["mae"], "deletion", json.dumps(f["deletion"]))
        print("goals met:", met[split])
    plot(figures, args.plot)
    write_result(
        args.out,
        {
            "figure": "importance: what decided the answer, default against exact, on a held-out set",
            "model": model.name,
            "version": model.version,
            "held_out": {"data": str(data), "seed": args.seed, "splits": list(SPLITS)},
            # which build of the model these are of: the pages' figures must be of the shipped one
            "provenance": {
                "commit": model.manifest.get("provenance", {}).get("commit"),
                "training_inputs": model.manifest.get("provenance", {}).get("training_inputs", {}).get("digest"),
            },
            "attribution": {
                e: {k: v for k, v in entry.items() if k in ("method", "madds", "explain_madds")}
                for e, entry in model.manifest.get("attribution", {}).get("experts", {}).items()
            },  # fmt: skip
            "splits": figures,
            "goals": GOALS,
            "met": met,
            "plot": args.plot.name,
        },
    )
    if args.out.resolve() == pages.RESULT.resolve():  # the recorded figures: the pages show them
        for page in pages.write_pages(json.loads(args.out.read_text())):
            print(f"wrote {page.relative_to(pages.REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
