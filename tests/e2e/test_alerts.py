"""The shipped alert rules (docker/prometheus/alerts.yml) fire on a real Prometheus when a replayed shift makes
audited answers stop agreeing with the full path, moves the route mix and engages the guard; and stay quiet on
the traffic before it.

Prometheus (Debian's ``prometheus``) scrapes a real ``dynfuse serve`` every second and evaluates the shipped
rules every second, with one change: their ``for:`` durations (5, 10 and 30 minutes) become 2 seconds, so that
the test takes a minute, not half an hour. The expressions are the shipped ones, verbatim.

The replay uses the tiny model's own answers, read beforehand through the same pipeline in this process: the
traffic before the shift is pairs whose audits agree with the full path, in the served point's validation route
mix; the shift is pairs the router sends to one cheaper expert and whose audits disagree. The tiny model routes
too poorly for its own validation figures to tell two phases of natural traffic apart (its cheaper answers
agree with the full path about half the time), so the store copy says its served point agreed 90% of the time
on validation, as a model worth serving would.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import MODEL_NAME, b64, require_tool, with_guard_floor
from prometheus_process import start_prometheus, stop

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
ALERTS = REPO / "docker" / "prometheus" / "alerts.yml"
VALIDATED = 0.9  # the served point's validated agreement, as the store copy says
BEFORE, SHIFT = 60, 60  # requests before the shift, and of the shift
DRIFT_WINDOW = 30


def answers_of(store: Path, data: Path) -> list[dict]:
    """Every labelled pair of the tiny data with the served point's routed answer and the full path's answer,
    through the stored model's pipeline (what the server will answer, and what its audits will find)."""
    from export.backends import create_backend
    from export.pipeline import DynamicPipeline
    from export.store import load_model
    from models.data.manifest import load_image_rgb, read_split

    model = load_model(store)
    pipeline = DynamicPipeline(model, create_backend("onnx", "cpu", 1))
    pairs = [s for split in ("test", "val", "test_ood") for s in read_split(data, split)]
    out = []
    for start in range(0, len(pairs), 64):
        batch = pairs[start : start + 64]
        pictures = [load_image_rgb(s) for s in batch]
        routed = pipeline.predict([pipeline.prepare(s.text, p) for s, p in zip(batch, pictures, strict=True)])[0]
        full = pipeline.predict(
            [pipeline.prepare(s.text, p, route=model.full_expert) for s, p in zip(batch, pictures, strict=True)]
        )[0]
        for sample, answer, reference in zip(batch, routed, full, strict=True):
            out.append(
                {
                    "pair": {"image": b64(sample.image_path.read_bytes()), "text": sample.text},
                    "expert": answer.expert,
                    "agrees": answer.label == reference.label,
                }
            )
    return out


def jensen_shannon(p: dict, q: dict) -> float:
    def entropy(values):
        return -sum(v * math.log2(v) for v in values if v > 0)

    keys = sorted(set(p) | set(q))
    m = [(p.get(k, 0) + q.get(k, 0)) / 2 for k in keys]
    return entropy(m) - (entropy([p.get(k, 0) for k in keys]) + entropy([q.get(k, 0) for k in keys])) / 2


@pytest.fixture
def shifted_store(store_copy) -> Path:
    [path] = list(store_copy.glob(f"{MODEL_NAME}/*/model.json"))
    manifest = json.loads(path.read_text())
    manifest["safety"]["operating_points"][manifest["router"]["operating_point"]]["agreement"] = VALIDATED
    # A floor for the guard when export chose none for the served point (the shipped lambda_0.3: none qualified).
    path.write_text(json.dumps(with_guard_floor(manifest)))
    return store_copy


def test_the_shipped_alerts_fire_on_a_replayed_shift_and_not_before(server_process, shifted_store, tiny_data, tmp_path):
    binary = require_tool("prometheus")
    manifest = json.loads(next(shifted_store.glob(f"{MODEL_NAME}/*/model.json")).read_text())
    point, full = manifest["router"]["operating_point"], manifest["full_expert"]
    validation_mix = next(r for r in manifest["routers"] if r["name"] == point)["validation"]["route_mix"]

    # The replay: before the shift, agreeing pairs (or pairs the full path answers) in the validation mix;
    # the shift, disagreeing pairs of the cheaper expert the validation mix uses least.
    answers = answers_of(shifted_store, tiny_data)
    calm = {e: [a for a in answers if a["expert"] == e and (a["agrees"] or e == full)] for e in validation_mix}
    placed = []  # (position in its expert's run, answer): sorted, every stretch of the replay holds the mix
    for expert, share in validation_mix.items():
        count = round(share * BEFORE) if calm[expert] else 0
        placed += [((i + 0.5) / count, calm[expert][i % len(calm[expert])]) for i in range(count)]
    before = [answer for _, answer in sorted(placed, key=lambda item: (item[0], item[1]["expert"]))]
    last_window = [a["expert"] for a in before[-DRIFT_WINDOW:]]
    window_mix = {e: last_window.count(e) / len(last_window) for e in set(last_window)}
    assert jensen_shannon(window_mix, validation_mix) < 0.05, (window_mix, validation_mix)
    wrong = {e: [a for a in answers if a["expert"] == e and not a["agrees"]] for e in validation_mix if e != full}
    target = min((e for e in wrong if wrong[e]), key=lambda e: validation_mix[e])
    shift = [wrong[target][i % len(wrong[target])] for i in range(SHIFT)]
    assert jensen_shannon({target: 1.0}, validation_mix) > 0.2, (target, validation_mix)
    audited_before = sum(a["expert"] != full for a in before)

    # Prometheus with the shipped rules, their "for:" shortened (the module's docstring says why).
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["for"] = "2s"
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    _, base = server_process(
        store=shifted_store, audit_rate=1.0, guard_window=10, guard_min_audits=10, drift_window=DRIFT_WINDOW
    )
    started: list[subprocess.Popen] = []
    try:
        prom = start_prometheus(
            binary,
            tmp_path,
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(tmp_path / "alerts.yml")],
                "scrape_configs": [
                    {
                        "job_name": "dynfuse",
                        "scrape_interval": "1s",
                        "scrape_timeout": "1s",
                        "static_configs": [{"targets": [base.removeprefix("http://")]}],
                    }
                ],
            },
            started,
        )
        prom.wait_for('up{job="dynfuse"}', lambda v: v == 1, "first scrape of dynfuse")
        judged = f'sum(dynfuse_audits_total{{model="{MODEL_NAME}", outcome=~"agreed|disagreed"}})'

        with httpx.Client(base_url=base, timeout=10) as client:
            for answer in before:
                assert client.post("/v1/classify", json=answer["pair"]).status_code == 200
            prom.wait_for(judged, lambda v: v == audited_before, "the audits before the shift", timeout=60)
            # The rules evaluated on them for longer than their "for:" (2 s): an alert they raised would be firing.
            prom.wait_evaluated(time.time() + 3, "the rules on the audits before the shift")
            assert prom.alerts() == {}, "an alert fired before the shift"
            guard = client.get(f"/v1/models/{MODEL_NAME}").json()["safety"]["guard"]
            assert guard["state"] == "watching"

            for answer in shift:
                assert client.post("/v1/classify", json=answer["pair"]).status_code == 200
            prom.wait_for(judged, lambda v: v == audited_before + SHIFT, "the audits of the shift", timeout=60)
            guard = client.get(f"/v1/models/{MODEL_NAME}").json()["safety"]["guard"]
            assert guard["state"] == "guarding"
            assert client.post("/v1/classify", json=shift[0]["pair"]).json()["route"]["guarded"] is True

        deadline = time.monotonic() + 60
        firing = {}
        while time.monotonic() < deadline:
            firing = {name: alerts for name, alerts in prom.alerts().items() if alerts[0]["state"] == "firing"}
            if len(firing) == 3:
                break
            time.sleep(0.5)
        assert set(firing) == {"DynfuseRoutingAgreementLow", "DynfuseRouteMixDrift", "DynfuseGuardActive"}, firing
        [agreement] = firing["DynfuseRoutingAgreementLow"]
        assert agreement["labels"]["operating_point"] == point
        # The alert's figure is the agreement of this point's audits as its counters hold them. Which answers of the
        # shift a floor (the store's, then the guard's) sent to the full path at once depends on when the guard
        # engaged, so the counters, not the replayed list, say how many agreed; the list bounds it from below.
        labels = f'model="{MODEL_NAME}", operating_point="{point}"'
        agreed = prom.scalar(f'sum(dynfuse_audits_total{{{labels}, outcome="agreed"}})')
        judged_here = prom.scalar(f'sum(dynfuse_audits_total{{{labels}, outcome=~"agreed|disagreed"}})')
        assert float(agreement["value"]) == pytest.approx(agreed / judged_here, abs=0.005)
        assert audited_before / (audited_before + SHIFT) - 0.02 <= float(agreement["value"]) < VALIDATED - 0.06
        [drift] = firing["DynfuseRouteMixDrift"]
        assert float(drift["value"]) == pytest.approx(jensen_shannon({target: 1.0}, validation_mix), abs=1e-6)
        assert [a["labels"]["model"] for a in firing["DynfuseGuardActive"]] == [MODEL_NAME]
    finally:
        stop(started)
