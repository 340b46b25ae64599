"""The metric names, types and labels are a contract (DESIGN.md): pinned here."""

from __future__ import annotations

from service.metrics import Metrics

CONTRACT = {
    "dynfuse_requests": ("counter", {"model", "status", "protocol", "key"}),
    "dynfuse_route_decisions": ("counter", {"model", "expert", "decided_by"}),
    "dynfuse_compute_madds": ("counter", {"model"}),
    "dynfuse_compute_full_madds": ("counter", {"model"}),
    "dynfuse_modality_importance": ("histogram", {"model", "expert", "modality"}),
    "dynfuse_modality_weight": ("histogram", {"model", "modality"}),
    "dynfuse_request_duration_seconds": ("histogram", {"model", "protocol"}),
    "dynfuse_queue_duration_seconds": ("histogram", {"model"}),
    "dynfuse_expert_duration_seconds": ("histogram", {"model", "expert"}),
    "dynfuse_batch_size": ("histogram", {"model"}),
    "dynfuse_inflight_requests": ("gauge", {"model"}),
    "dynfuse_rejected_requests": ("counter", {"model", "reason"}),
    "dynfuse_model_info": ("gauge", {"model", "version", "backend", "device"}),
    "dynfuse_operating_point_requests": ("counter", {"model", "operating_point"}),
    "dynfuse_degraded_requests": ("counter", {"model"}),
    "dynfuse_degraded_seconds": ("counter", {"model"}),
    "dynfuse_audits": ("counter", {"model", "expert", "operating_point", "outcome"}),
    "dynfuse_audit_madds": ("counter", {"model"}),
    "dynfuse_validated_agreement": ("gauge", {"model", "operating_point"}),
    "dynfuse_route_mix_drift": ("gauge", {"model", "operating_point"}),
    "dynfuse_guard_changes": ("counter", {"model", "from", "to"}),
    "dynfuse_guard_active": ("gauge", {"model"}),
    "dynfuse_uncertain_requests": ("counter", {"model", "reason"}),
    "dynfuse_top_probability": ("histogram", {"model", "expert"}),
    "dynfuse_background_restarts": ("counter", {"model", "loop"}),
}


def exercised_metrics() -> Metrics:
    """Metrics with one observation in each, so every family has labelled samples to read."""
    metrics = Metrics("m")
    metrics.observe_prediction(
        expert="text", decided_by="router", madds=10, madds_full=100, importance=(0.7, 0.3),
        modality_weights=(0.6, 0.4), operating_point="lambda_0",
    )  # fmt: skip
    metrics.observe_batch(4, [0.001] * 4, {"text": 0.002})
    metrics.reject("queue_full")
    metrics.set_model_info("1", "onnx", "cpu")
    metrics.count_request(200, 0.01, key="ci", protocol="grpc")
    metrics.inflight.labels("m").inc()
    metrics.request_duration.labels("m", "grpc").observe(0.01)
    metrics.init_routes(["text", "mi2p"], ["router"], ["lambda_0"])
    metrics.init_safety(["text", "mi2p"], "mi2p", {"lambda_0": 0.9}, ("lambda_0", "lambda_0+min_confidence=0.5"))
    metrics.route_mix_drift.labels("m", "lambda_0").set(0.1)
    metrics.observe_answer("text", 0.7, "low_confidence")
    return metrics


def test_every_contract_metric_exists_with_its_type_and_labels():
    found = {}
    for family in exercised_metrics().registry.collect():
        labels = {name for sample in family.samples for name in sample.labels if name != "le"}
        found[family.name] = (family.type, labels)
    assert found == CONTRACT


def test_counters_are_exposed_with_the_total_suffix():
    metrics = Metrics("m")
    metrics.observe_prediction(expert="text", decided_by="router", madds=10, madds_full=100, importance=(0.7, 0.3))
    text = metrics.render().decode()
    for line in (
        'dynfuse_route_decisions_total{decided_by="router",expert="text",model="m"} 1.0',
        'dynfuse_compute_madds_total{model="m"} 10.0',
        'dynfuse_compute_full_madds_total{model="m"} 100.0',
        'dynfuse_modality_importance_bucket{expert="text",le="0.3",modality="image",model="m"} 1.0',
    ):
        assert line in text


def test_a_degraded_prediction_counts_its_operating_point_and_the_degradation():
    metrics = Metrics("m")
    metrics.observe_prediction(
        expert="text", decided_by="router", madds=10, madds_full=100, importance=(0.7, 0.3),
        operating_point="lambda_0.8", degraded=True,
    )  # fmt: skip
    metrics.degraded_seconds.labels("m").inc(1.5)
    text = metrics.render().decode()
    for line in (
        'dynfuse_operating_point_requests_total{model="m",operating_point="lambda_0.8"} 1.0',
        'dynfuse_degraded_requests_total{model="m"} 1.0',
        'dynfuse_degraded_seconds_total{model="m"} 1.5',
    ):
        assert line in text


def test_two_apps_do_not_share_counts():
    first, second = Metrics("m"), Metrics("m")
    first.reject("queue_full")
    assert 'dynfuse_rejected_requests_total{model="m",reason="queue_full"} 1.0' in first.render().decode()
    assert 'dynfuse_rejected_requests_total{model="m",reason="queue_full"} 0.0' in second.render().decode()


# Label values dashboards and alerts select on: every one exists from the first scrape.
REJECTION_REASONS = {
    "invalid",
    "unauthorized",
    "too_large",
    "queue_full",
    "not_ready",
    "client_disconnect",
    "over_capacity",  # refused at admission, before the body was read (503)
    "deadline",  # not answered before the request's deadline (504)
    "body_timeout",  # the body did not arrive before the deadline (408)
}
STATUSES = {"200", "400", "401", "404", "408", "413", "415", "422", "431", "499", "500", "503", "504"}


def test_every_rejection_reason_and_status_is_a_series_from_the_first_scrape():
    text = Metrics("m").render().decode()
    for reason in REJECTION_REASONS:
        assert f'dynfuse_rejected_requests_total{{model="m",reason="{reason}"}} 0.0' in text, reason
    for status in STATUSES:
        for protocol in ("http", "grpc"):
            line = f'dynfuse_requests_total{{key="anonymous",model="m",protocol="{protocol}",status="{status}"}} 0.0'
            assert line in text, line
    for protocol in ("http", "grpc"):
        assert f'dynfuse_request_duration_seconds_count{{model="m",protocol="{protocol}"}} 0.0' in text, protocol


def test_a_request_counts_under_its_protocol():
    metrics = Metrics("m")
    metrics.count_request(200, 0.003, protocol="grpc")
    metrics.count_request(413, 0.001, protocol="grpc")
    metrics.count_request(200, 0.02)  # HTTP by default: the front door's own calls
    text = metrics.render().decode()
    for line in (
        'dynfuse_requests_total{key="anonymous",model="m",protocol="grpc",status="200"} 1.0',
        'dynfuse_requests_total{key="anonymous",model="m",protocol="grpc",status="413"} 1.0',
        'dynfuse_requests_total{key="anonymous",model="m",protocol="http",status="200"} 1.0',
        'dynfuse_request_duration_seconds_count{model="m",protocol="grpc"} 2.0',
        'dynfuse_request_duration_seconds_bucket{le="0.0025",model="m",protocol="grpc"} 1.0',
        'dynfuse_request_duration_seconds_count{model="m",protocol="http"} 1.0',
    ):
        assert line in text, line


def test_the_safety_series_exist_from_the_first_scrape():
    """Audits per cheaper expert, operating point and outcome, the guard's two changes, uncertain reasons, the
    validated agreement and the guard's state: rate() and the alert rules see their first increments."""
    metrics = Metrics("m")
    metrics.init_routes(["text", "mi2p"], ["router"], ["lambda_0"])
    metrics.init_safety(["text", "mi2p"], "mi2p", {"lambda_0": 0.9}, ("lambda_0", "lambda_0+min_confidence=0.5"))
    text = metrics.render().decode()
    for line in (
        'dynfuse_audits_total{expert="text",model="m",operating_point="lambda_0",outcome="agreed"} 0.0',
        'dynfuse_audits_total{expert="text",model="m",operating_point="lambda_0",outcome="disagreed"} 0.0',
        'dynfuse_audits_total{expert="text",model="m",operating_point="lambda_0",outcome="dropped"} 0.0',
        'dynfuse_audit_madds_total{model="m"} 0.0',
        'dynfuse_guard_changes_total{from="lambda_0",model="m",to="lambda_0+min_confidence=0.5"} 0.0',
        'dynfuse_guard_changes_total{from="lambda_0+min_confidence=0.5",model="m",to="lambda_0"} 0.0',
        'dynfuse_guard_active{model="m"} 0.0',
        'dynfuse_validated_agreement{model="m",operating_point="lambda_0"} 0.9',
        'dynfuse_uncertain_requests_total{model="m",reason="low_confidence"} 0.0',
        'dynfuse_uncertain_requests_total{model="m",reason="out_of_distribution"} 0.0',
        'dynfuse_top_probability_count{expert="mi2p",model="m"} 0.0',
    ):
        assert line in text, line
    # The full path's answers are never audited: no series for them.
    assert 'dynfuse_audits_total{expert="mi2p"' not in text


def test_a_request_is_counted_under_its_key_name_and_the_rest_as_anonymous():
    metrics = Metrics("m")
    metrics.count_request(200, 0.01, key="ci")
    metrics.count_request(200, 0.01, key="ci")
    metrics.count_request(401, 0.01)
    metrics.count_request(200, 0.01, key="ci", protocol="grpc")
    text = metrics.render().decode()
    assert 'dynfuse_requests_total{key="ci",model="m",protocol="http",status="200"} 2.0' in text
    assert 'dynfuse_requests_total{key="ci",model="m",protocol="grpc",status="200"} 1.0' in text
    assert 'dynfuse_requests_total{key="anonymous",model="m",protocol="http",status="401"} 1.0' in text
    assert 'dynfuse_requests_total{key="anonymous",model="m",protocol="http",status="200"} 0.0' in text


def test_the_background_loops_restarts_exist_from_the_first_scrape():
    metrics = Metrics("m")
    metrics.restarted("follow")()
    text = metrics.render().decode()
    assert 'dynfuse_background_restarts_total{loop="follow",model="m"} 1.0' in text
    assert 'dynfuse_background_restarts_total{loop="store_poll",model="m"} 0.0' in text
