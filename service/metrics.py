"""Every Prometheus metric of the service, in one place (names and labels are a contract: DESIGN.md).

Each app gets its own registry, so tests start from zero and two apps in one process don't collide.
With several server processes (``dynfuse serve --workers N``), prometheus_client's multiprocess mode
keeps each process's values in files under ``PROMETHEUS_MULTIPROC_DIR`` and a scrape of any process
reports the sums over all of them.
"""

from __future__ import annotations

import bisect
import collections
import copy
import os
from collections.abc import Sequence
from pathlib import Path

import prometheus_client
from prometheus_client import CollectorRegistry, generate_latest, multiprocess

from models.ood import UNCERTAIN_REASONS

MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"  # set by `dynfuse serve --workers N` for its workers
ANONYMOUS = "anonymous"  # the key label of a request no inference key identified (service/auth.py)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SHORT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
IMPORTANCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
# Most answers are sure of themselves: the resolution is where a confident model's mass is.
TOP_PROBABILITY_BUCKETS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)
AUDIT_OUTCOMES = ("agreed", "disagreed", "dropped")

MODALITIES = ("text", "image")
REJECT_REASONS = (
    "invalid",
    "unauthorized",
    "too_large",
    "queue_full",
    "not_ready",
    "client_disconnect",
    "over_capacity",  # refused at admission, before the body was read
    "deadline",  # not served before the request's deadline (504)
    "body_timeout",  # the client did not send its body before the deadline (408)
)  # ApiError.reason values
BACKGROUND_LOOPS = ("follow", "store_poll")  # the loops service/repository_sync.py runs, supervised
# What the inference routes answer; 503 (overloaded, not ready) and 504 (deadline) are the only 5xx a
# request should ever get, and 500 a test should never see.
STATUSES = ("200", "400", "401", "404", "408", "413", "415", "422", "431", "499", "500", "503", "504")
# The front doors an inference request comes through (the ``protocol`` label): HTTP (/v1 and /v2) and the Open
# Inference Protocol over gRPC (service/grpc/). A gRPC request's ``status`` is the HTTP status of the same outcome
# (INVALID_ARGUMENT is 400, RESOURCE_EXHAUSTED 413 or 503, ...: service/grpc/errors.py), so one query reads both.
PROTOCOLS = ("http", "grpc")


class _QuickLabels:
    """``.labels()`` that finds a series already made without prometheus_client's checks and lock.

    An answer looks up about a dozen series (its expert, who decided, its operating point, each modality, ...),
    each through the library's argument checks, a tuple of ``str()`` and a lock: observe_prediction took 8.3 us,
    3.9 us this way. The series made are in the metric's own dict, keyed by their label values as strings, so a
    call with only positional values looks there first; anything else (a series not made yet, a value of another
    type, a wrong count, keywords) goes to the library as before. remove() and clear() change that same dict, so
    nothing found here is ever stale."""

    def labels(self, *labelvalues, **labelkwargs):
        if not labelkwargs:
            child = getattr(self, "_metrics", {}).get(labelvalues)
            if child is not None:
                return child
        return super().labels(*labelvalues, **labelkwargs)


class Counter(_QuickLabels, prometheus_client.Counter):
    pass


class Gauge(_QuickLabels, prometheus_client.Gauge):
    pass


class Histogram(_QuickLabels, prometheus_client.Histogram):
    pass


class Metrics:
    # The metric classes: prometheus_client's here; service/ray/metrics.py swaps in classes that also report to
    # Ray's metrics agent, so that every replica of a Ray deployment is scraped under these same names.
    kinds: tuple[type, type, type] = (Counter, Gauge, Histogram)

    def __init__(self, model: str, registry: CollectorRegistry | None = None):
        self.model = model
        self.multiprocess = MULTIPROCESS_DIR in os.environ
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        Counter, Gauge, Histogram = self.kinds  # noqa: N806 - the same names as prometheus_client's classes

        # Traffic
        self.requests = Counter(
            "dynfuse_requests",
            "Inference requests by status code (for gRPC: the HTTP status of the same outcome), protocol, and the "
            "name of the inference key that made them.",
            ["model", "status", "protocol", "key"],
            registry=r,
        )
        self.rejected = Counter(
            "dynfuse_rejected_requests", "Requests refused, by reason.", ["model", "reason"], registry=r
        )
        self.inflight = Gauge(
            "dynfuse_inflight_requests",
            "Inference requests being handled.",
            ["model"],
            multiprocess_mode="livesum",  # over the live processes
            registry=r,
        )

        # Routing and compute
        self.route_decisions = Counter(
            "dynfuse_route_decisions",
            "Expert paths taken, and who decided.",
            ["model", "expert", "decided_by"],
            registry=r,
        )
        self.compute_madds = Counter("dynfuse_compute_madds", "Multiply-adds actually executed.", ["model"], registry=r)
        self.compute_full_madds = Counter(
            "dynfuse_compute_full_madds", "Multiply-adds the static full model would have spent.", ["model"], registry=r
        )
        self.modality_importance = Histogram(
            "dynfuse_modality_importance",
            "Each modality's share of what raised the answer's log-probability (Shapley), per answering expert.",
            ["model", "expert", "modality"],
            buckets=IMPORTANCE_BUCKETS,
            registry=r,
        )
        self.modality_weight = Histogram(
            "dynfuse_modality_weight",
            "DRDF's modal weight per request: how decisive each modality's router was for the choice of path.",
            ["model", "modality"],
            buckets=IMPORTANCE_BUCKETS,
            registry=r,
        )

        # Operating points and degradation
        self.operating_point_requests = Counter(
            "dynfuse_operating_point_requests",
            "Predictions by the operating point (router) that decided them.",
            ["model", "operating_point"],
            registry=r,
        )
        self.degraded_requests = Counter(
            "dynfuse_degraded_requests",
            "Predictions served at a cheaper operating point because the server was under load.",
            ["model"],
            registry=r,
        )
        self.degraded_seconds = Counter(
            "dynfuse_degraded_seconds", "Seconds spent serving at the degraded operating point.", ["model"], registry=r
        )

        # Is routing still safe? Shadow audits, drift of the route mix, the guard, uncertain answers
        self.audits = Counter(
            "dynfuse_audits",
            "Shadow audits: answers of a cheaper expert re-run on the full path in spare capacity, by the expert the "
            "router picked, its operating point and the outcome (agreed, disagreed, dropped unrun).",
            ["model", "expert", "operating_point", "outcome"],
            registry=r,
        )
        self.audit_madds = Counter(
            "dynfuse_audit_madds",
            "Multiply-adds spent on shadow audits (not in dynfuse_compute_madds_total).",
            ["model"],
            registry=r,
        )
        self.validated_agreement = Gauge(
            "dynfuse_validated_agreement",
            "Agreement of an operating point's cheaper answers with the full path on validation (model.json).",
            ["model", "operating_point"],
            multiprocess_mode="max",
            registry=r,
        )
        self.route_mix_drift = Gauge(
            "dynfuse_route_mix_drift",
            "Jensen-Shannon divergence (bits, 0-1) between the router's recent picks and its validation mix.",
            ["model", "operating_point"],
            multiprocess_mode="livemax",  # the largest over the live workers, each with its own window
            registry=r,
        )
        self.guard_changes = Counter(
            "dynfuse_guard_changes",
            "Changes of the served policy by the guard, from one policy to the other.",
            ["model", "from", "to"],
            registry=r,
        )
        self.guard_active = Gauge(
            "dynfuse_guard_active",
            "1 while the guard serves a safer policy (in any worker), else 0.",
            ["model"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.uncertain = Counter(
            "dynfuse_uncertain_requests",
            "Answers flagged uncertain, by reason (low_confidence, out_of_distribution).",
            ["model", "reason"],
            registry=r,
        )
        self.top_probability = Histogram(
            "dynfuse_top_probability",
            "The answering path's top class probability (as in the response's scores).",
            ["model", "expert"],
            buckets=TOP_PROBABILITY_BUCKETS,
            registry=r,
        )

        # Latency and batching
        self.request_duration = Histogram(
            "dynfuse_request_duration_seconds",
            "Inference request latency, by protocol (http or grpc).",
            ["model", "protocol"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_duration = Histogram(
            "dynfuse_queue_duration_seconds",
            "Time waiting for a micro-batch.",
            ["model"],
            buckets=SHORT_BUCKETS,
            registry=r,
        )
        self.expert_duration = Histogram(
            "dynfuse_expert_duration_seconds",
            "Time of one expert on its sub-batch.",
            ["model", "expert"],
            buckets=SHORT_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "dynfuse_batch_size", "Requests per micro-batch.", ["model"], buckets=BATCH_BUCKETS, registry=r
        )
        self.background_restarts = Counter(
            "dynfuse_background_restarts",
            "Restarts of a background loop that failed (follow: the other workers' loads; store_poll).",
            ["model", "loop"],
            registry=r,
        )
        self.model_info = Gauge(
            "dynfuse_model_info",
            "The served model (value 1).",
            ["model", "version", "backend", "device"],
            # 1 from every live process, reported once: a dead worker's file (a version it served) drops out
            multiprocess_mode="livemax",
            registry=r,
        )

        # Series that exist from the first scrape: Prometheus's rate() cannot see increments made
        # before a series' first sample, so a series born at its first increment under-reports, and a
        # burst shorter than the scrape interval would not show at all.
        for series in (
            self.compute_madds,
            self.compute_full_madds,
            self.inflight,
            self.queue_duration,
            self.batch_size,
            self.degraded_requests,
            self.degraded_seconds,
            self.audit_madds,
        ):
            series.labels(model)
        # Bound once: a refusal under overload must cost as little as possible, and .labels() is a lock
        # and a dictionary lookup every time.
        self._bind_requests(model)
        self._by_reason = {reason: self.rejected.labels(model, reason) for reason in REJECT_REASONS}
        for modality in MODALITIES:
            self.modality_weight.labels(model, modality)
        for loop in BACKGROUND_LOOPS:
            self.background_restarts.labels(model, loop)

    def restarted(self, loop: str):
        """What to call when the background loop ``loop`` is restarted (counted under the default model)."""
        return self.background_restarts.labels(self.model, loop).inc

    def init_routes(self, experts, decided_by, operating_points=(), soft: str | None = None) -> None:
        """The per-expert and per-operating-point series, created once the model is known. ``soft``: the expert
        label of soft fusion (every expert runs; only a request asks for it)."""
        for expert in experts:
            self.expert_duration.labels(self.model, expert)
            for who in decided_by:
                self.route_decisions.labels(self.model, expert, who)
        for expert in (*experts, *((soft,) if soft is not None else ())):
            for modality in MODALITIES:
                self.modality_importance.labels(self.model, expert, modality)
        if soft is not None:
            self.route_decisions.labels(self.model, soft, "request")
        for point in operating_points:
            self.operating_point_requests.labels(self.model, point)
        for reason in UNCERTAIN_REASONS:
            self.uncertain.labels(self.model, reason)

    def init_safety(
        self,
        experts,
        full_expert: str,
        validated: dict[str, float],
        guard_policies: tuple[str, str] | None,
        soft: str | None = None,
    ) -> None:
        """The audit, drift and guard series of a loaded model, from the first scrape on: audits per cheaper expert
        and operating point, the validated agreement per point, the guard's two changes (served -> safer and
        back) and its state, the top-probability histogram per answering path."""
        for point, agreement in validated.items():
            self.validated_agreement.labels(self.model, point).set(agreement)
            for expert in experts:
                for outcome in AUDIT_OUTCOMES if expert != full_expert else ():
                    self.audits.labels(self.model, expert, point, outcome)
        if guard_policies is not None:
            served, safer = guard_policies
            self.guard_changes.labels(self.model, served, safer)
            self.guard_changes.labels(self.model, safer, served)
        self.guard_active.labels(self.model).set(0)
        for expert in (*experts, *([soft] if soft else [])):
            self.top_probability.labels(self.model, expert)

    def set_model_info(self, version: str, backend: str, device: str) -> None:
        self.model_info.labels(self.model, version, backend, device).set(1)

    def clear_model_info(self, version: str, backend: str, device: str) -> None:
        """That version is no longer served (swapped or unloaded). Set to 0 before it is removed: with several
        workers the series lives on in this process's file, and a 0 there lets the others' max decide."""
        self.model_info.labels(self.model, version, backend, device).set(0)
        if not self.multiprocess:
            self.model_info.remove(self.model, version, backend, device)

    def for_model(self, model: str) -> Metrics:
        """The same metrics (one registry, one scrape) labelled for another model served beside this one."""
        if model == self.model:
            return self
        view = copy.copy(self)
        view.model = model
        for series in (
            self.compute_madds,
            self.compute_full_madds,
            self.queue_duration,
            self.batch_size,
            self.audit_madds,
        ):
            series.labels(model)
        for modality in MODALITIES:
            self.modality_weight.labels(model, modality)
        view._bind_requests(model)
        view._by_reason = {reason: self.rejected.labels(model, reason) for reason in REJECT_REASONS}
        return view

    def _bind_requests(self, model: str) -> None:
        """The request series of ``model``, every status of every protocol, created (at 0) and bound once."""
        self._by_status = {
            (protocol, status, ANONYMOUS): self.requests.labels(model, status, protocol, ANONYMOUS)
            for protocol in PROTOCOLS
            for status in STATUSES
        }
        self._duration = {protocol: self.request_duration.labels(model, protocol) for protocol in PROTOCOLS}

    def observe_prediction(
        self,
        *,
        expert: str,
        decided_by: str,
        madds: int,
        madds_full: int,
        importance,
        modality_weights=None,
        operating_point: str | None = None,
        degraded: bool = False,
    ) -> None:
        self.route_decisions.labels(self.model, expert, decided_by).inc()
        if operating_point is not None:
            self.operating_point_requests.labels(self.model, operating_point).inc()
        if degraded:
            self.degraded_requests.labels(self.model).inc()
        self.compute_madds.labels(self.model).inc(madds)
        self.compute_full_madds.labels(self.model).inc(madds_full)
        self.modality_importance.labels(self.model, expert, "text").observe(float(importance[0]))
        self.modality_importance.labels(self.model, expert, "image").observe(float(importance[1]))
        if modality_weights is not None:
            self.modality_weight.labels(self.model, "text").observe(float(modality_weights[0]))
            self.modality_weight.labels(self.model, "image").observe(float(modality_weights[1]))

    def observe_call(self, outputs: Sequence, uncertain_reasons: Sequence[str | None], madds_full: int) -> None:
        """``observe_prediction`` and ``observe_answer`` of each answer of a call of several (each output with the
        fields of a PipelineOutput of those names), every series touched once: a counter increased by the call's
        total, a histogram's buckets and sum by theirs. One by one, an answer touches about a dozen series, and with
        --workers N each increment is a write to a shared file under a lock."""
        model = self.model
        for (expert, decided_by), count in collections.Counter((o.expert, o.decided_by) for o in outputs).items():
            self.route_decisions.labels(model, expert, decided_by).inc(count)
        points = collections.Counter(o.operating_point for o in outputs if o.operating_point is not None)
        for point, count in points.items():
            self.operating_point_requests.labels(model, point).inc(count)
        if degraded := sum(1 for o in outputs if o.degraded):
            self.degraded_requests.labels(model).inc(degraded)
        self.compute_madds.labels(model).inc(sum(o.madds for o in outputs))
        self.compute_full_madds.labels(model).inc(madds_full * len(outputs))
        by_expert: dict[str, list] = {}
        for output in outputs:
            by_expert.setdefault(output.expert, []).append(output)
        for expert, answered in by_expert.items():
            importance = [o.importance.tolist() for o in answered]
            for index, modality in enumerate(MODALITIES):
                observe_all(self.modality_importance.labels(model, expert, modality), [v[index] for v in importance])
            observe_all(self.top_probability.labels(model, expert), [float(o.probabilities.max()) for o in answered])
        weights = [o.modality_weights.tolist() for o in outputs if o.modality_weights is not None]
        for index, modality in enumerate(MODALITIES) if weights else ():
            observe_all(self.modality_weight.labels(model, modality), [w[index] for w in weights])
        for reason, count in collections.Counter(r for r in uncertain_reasons if r is not None).items():
            self.uncertain.labels(model, reason).inc(count)

    def observe_answer(self, expert: str, top_probability: float, uncertain_reason: str | None) -> None:
        self.top_probability.labels(self.model, expert).observe(top_probability)
        if uncertain_reason is not None:
            self.uncertain.labels(self.model, uncertain_reason).inc()

    def observe_batch(self, size: int, queue_seconds: list[float], expert_seconds: dict[str, float]) -> None:
        self.batch_size.labels(self.model).observe(size)
        for seconds in queue_seconds:
            self.queue_duration.labels(self.model).observe(seconds)
        for expert, seconds in expert_seconds.items():
            self.expert_duration.labels(self.model, expert).observe(seconds)

    def reject(self, reason: str) -> None:
        child = self._by_reason.get(reason)
        (child if child is not None else self.rejected.labels(self.model, reason)).inc()

    def count_request(self, status: int, seconds: float, key: str = ANONYMOUS, protocol: str = "http") -> None:
        """One inference request answered with ``status`` after ``seconds``, made with the inference key named
        ``key`` (service/auth.py: never the key itself), that came in over ``protocol``."""
        child = self._by_status.get((protocol, str(status), key))
        if child is None:  # a key's series are made at its first request: the keys file may change at any time
            child = self._by_status[(protocol, str(status), key)] = self.requests.labels(
                self.model, str(status), protocol, key
            )
        child.inc()
        self._duration[protocol].observe(seconds)

    def render(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        forget_dead_processes(os.environ[MULTIPROCESS_DIR])
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # every process's files, summed
        return generate_latest(registry)

    def close(self) -> None:
        """At process exit: drop this process's live gauges (its counters and histograms stay in the sums)."""
        if self.multiprocess:
            multiprocess.mark_process_dead(os.getpid())


def forget_dead_processes(directory: str) -> list[int]:
    """Drop the live gauges of worker processes that died without saying so (killed, crashed), so that
    ``dynfuse_inflight_requests`` does not count their requests for ever; their counters stay in the
    sums. Run at every scrape: the supervisor that restarts workers is uvicorn's, not ours. Returns the
    pids forgotten."""
    dead = set()
    for path in Path(directory).glob("gauge_live*_*.db"):
        pid = path.stem.rsplit("_", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            dead.add(int(pid))
    for pid in dead:
        multiprocess.mark_process_dead(pid, directory)
    return sorted(dead)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:  # a zombie (dead, not reaped yet by the supervisor) still answers signal 0
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def observe_all(child, values: Sequence[float]) -> None:
    """``child.observe(v)`` for every value, each bucket increased once by the values it takes and the sum once by
    theirs (prometheus_client keeps a value in the first bucket whose bound is at least the value, and a NaN, which
    no bucket takes, only in the sum, as observe() does). A child without those parts (another client's) is given
    one value at a time."""
    bounds, buckets, total = (getattr(child, name, None) for name in ("_upper_bounds", "_buckets", "_sum"))
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for value in values:
            child.observe(value)
        return
    for index, count in collections.Counter(bisect.bisect_left(bounds, v) for v in values if v == v).items():
        buckets[index].inc(count)
    total.inc(sum(values))
