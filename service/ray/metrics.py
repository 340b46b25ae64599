"""The service's metrics, also reported through Ray's metrics agent.

Every replica of a Serve deployment is a process of its own, and the HTTP proxy sends a scrape of /metrics to
any one of them, so the process's own registry cannot give the cluster's figures. Ray's agent on each node
exports the custom metrics of every replica there, under the same names prefixed ``ray_`` and with Ray's tags
added (deployment, replica, application, node, ...). docker/prometheus/ray.yml maps the names back, so the
dashboard's ``sum by (...)`` queries read a cluster exactly as they read one process.

``RayMetrics`` is ``service.metrics.Metrics`` with metric classes that write both: the process's registry
(the replica's own /metrics, for a look at one replica) and Ray's metric of the same name and labels.

Two ways Ray's export differs from a prometheus_client registry, both made good here (Ray 2.60, OpenTelemetry):

- A series exists only once something was recorded for it, and Ray's ``Counter.inc`` refuses 0; so the counters
  the service creates at 0 (``dynfuse_degraded_requests_total``, the routes not taken yet, ...) record a 0 below
  Ray's check, as prometheus_client's ``.labels()`` creates them at 0.
- A process sends a gauge's value once, at the first export after it was set, and the agent forgets a gauge not
  sent again within two export intervals: a gauge set at load (``dynfuse_model_info``) or idle between
  requests (``dynfuse_inflight_requests``) leaves the export after about 20 s. A thread sends every gauge's
  value again each half interval.
"""

from __future__ import annotations

import threading

import ray
from prometheus_client import Counter, Gauge, Histogram
from ray.serve import metrics as ray_metrics

from service.metrics import Metrics


class _Child:
    """One labelled series of both registries, with prometheus_client's methods."""

    def __init__(self, parent: _Mirrored, local, tags: dict[str, str]):
        self.parent = parent
        self.local = local
        self.tags = tags

    def inc(self, amount: float = 1.0) -> None:
        self.local.inc(amount)
        self.parent.add(self.tags, amount)

    def dec(self, amount: float = 1.0) -> None:
        self.local.dec(amount)
        self.parent.add(self.tags, -amount)

    def set(self, value: float) -> None:
        self.local.set(value)
        self.parent.set(self.tags, value)

    def observe(self, value: float) -> None:
        self.local.observe(value)
        self.parent.remote.observe(value, tags=self.tags)


class _Mirrored:
    local_class: type
    remote: object

    def __init__(self, name: str, documentation: str, labelnames, registry=None, **options):
        self.labelnames = tuple(labelnames)
        local_options = {k: v for k, v in options.items() if k in ("buckets", "multiprocess_mode")}
        self.local = self.local_class(name, documentation, self.labelnames, registry=registry, **local_options)
        self.remote = self.make_remote(name, documentation, options)
        # A gauge's value per series (Ray's gauge only knows set()); a counter's series announced to Ray.
        self._values: dict[tuple, float] = {}
        self._lock = threading.Lock()

    def labels(self, *values: str) -> _Child:
        tags = dict(zip(self.labelnames, (str(v) for v in values), strict=True))
        self.announce(tags)
        return _Child(self, self.local.labels(*values), tags)

    def remove(self, *values: str) -> None:
        """The series is no longer reported here; Ray's agent drops a gauge that is no longer sent."""
        self.local.remove(*values)
        with self._lock:
            self._values.pop(tuple(zip(self.labelnames, (str(v) for v in values), strict=True)), None)

    def announce(self, tags: dict[str, str]) -> None:
        """A series the service creates before its first event (so that rate() sees every increment)."""

    def add(self, tags: dict[str, str], amount: float) -> None:
        raise NotImplementedError

    def set(self, tags: dict[str, str], value: float) -> None:
        raise NotImplementedError


class MirroredCounter(_Mirrored):
    local_class = Counter

    def make_remote(self, name, documentation, options):
        # Ray adds the "_total" of a counter itself; prometheus_client's name has none either.
        return ray_metrics.Counter(name, description=documentation, tag_keys=self.labelnames)

    def announce(self, tags):
        # Ray exports a series from its first record, and Counter.inc refuses 0; _record is the step after that
        # check, and Ray's counter takes a 0 (a delta of nothing). Once per series: .labels() is called per event.
        key = tuple(tags.items())
        with self._lock:
            if key in self._values:
                return
            self._values[key] = 0.0
        self.remote._record(0.0, tags=tags)

    def add(self, tags, amount):
        if amount > 0:
            self.remote.inc(amount, tags=tags)


class MirroredGauge(_Mirrored):
    local_class = Gauge

    def make_remote(self, name, documentation, options):
        return ray_metrics.Gauge(name, description=documentation, tag_keys=self.labelnames)

    def announce(self, tags):
        with self._lock:
            if tuple(tags.items()) not in self._values:
                self._values[tuple(tags.items())] = 0.0
                self.remote.set(0.0, tags=tags)

    def add(self, tags, amount):
        with self._lock:
            key = tuple(tags.items())
            self._values[key] = self._values.get(key, 0.0) + amount
            self.remote.set(self._values[key], tags=tags)

    def set(self, tags, value):
        with self._lock:
            self._values[tuple(tags.items())] = value
            self.remote.set(value, tags=tags)

    def resend(self) -> None:
        """Every series' value again, so that Ray's agent keeps it (see the module's docstring)."""
        with self._lock:
            for key, value in self._values.items():
                self.remote.set(value, tags=dict(key))


class MirroredHistogram(_Mirrored):
    local_class = Histogram

    def make_remote(self, name, documentation, options):
        return ray_metrics.Histogram(
            name, description=documentation, boundaries=list(options["buckets"]), tag_keys=self.labelnames
        )


class RayMetrics(Metrics):
    kinds = (MirroredCounter, MirroredGauge, MirroredHistogram)

    def __init__(self, model: str, registry=None, resend_every_s: float | None = None):
        super().__init__(model, registry)
        # Half of Ray's export interval (the agent keeps a gauge for two); Ray floors the interval at 1 s.
        interval_s = max(ray._config.metrics_report_interval_ms(), 1000) / 1000
        self.resend_every_s = resend_every_s or interval_s / 2
        self.gauges = [kind for kind in vars(self).values() if isinstance(kind, MirroredGauge)]
        self._closed = threading.Event()
        self._resender = threading.Thread(target=self._resend, name="dynfuse-ray-gauges", daemon=True)
        self._resender.start()

    def _resend(self) -> None:
        while not self._closed.wait(self.resend_every_s):
            for gauge in self.gauges:
                gauge.resend()

    def close(self) -> None:
        self._closed.set()
        super().close()
