"""Running experts on one batch: each component at most once per request, shared ones on the union of requests.

The pipeline says which experts run for which requests (one each when routed hard, every eligible one for DRDF's
soft fusion, the full path again for a confidence fallback). Here every component runs once, on the requests of
every expert whose chain has it: the CNN trunk that four experts share runs once on all their requests, not once
per expert. A second call (the fallback) reuses what the first produced, so no component runs twice for a
request. What a component produces is kept in its own rows: a consumer's rows are always among its producer's.

Some inputs are made lazily, once per batch, for exactly the rows whose components read them: the model's
normalized image (``image``) and, for experts that bring their own preprocessing, each spec's tensors
(``image@<key>``, ``input_ids@<key>``, ...; models/specs.py). A source's tensors are made once for the union of
its readers' rows, so two experts with one spec share its cost, and a request routed elsewhere pays nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from export.attribution import EXACT, HEAD, WANT_EXACT, WANT_HEAD, ExpertAttribution, coalition_logits
from export.store import StoredModel

Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
# A lazy source's tensors for some rows: (source, rows) -> {tensor name: values for those rows}.
Preprocess = Callable[[str, np.ndarray], dict[str, np.ndarray]]
IMAGE_SOURCE = "image"  # the model's own normalized image; every other lazy source is a spec's key


class BatchExecution:
    def __init__(
        self,
        model: StoredModel,
        runner: Callable[[str], Runner],
        tensors: dict[str, np.ndarray],  # full-batch request tensors: token_ids, text features, ...
        preprocess: Preprocess,  # makes a lazy source's tensors for the rows whose expert reads them
        attributions: dict[str, ExpertAttribution] | None = None,  # how each expert's answers are attributed
    ):
        self.model = model
        self.attributions = attributions or {}
        self.runner = runner
        self.tensors = tensors
        self.preprocess = preprocess
        # tensor name -> the lazy source that makes it
        self.sources = {IMAGE_SOURCE: IMAGE_SOURCE} | model.specs.source_of
        self.chains = {e.name: e.components for e in model.experts}
        self.inputs = {name: tuple(t.name for t in info.inputs) for name, info in model.components.items()}
        # Producers before consumers: chains are ordered, so the order of first appearance over all of them is one.
        self.order = tuple(dict.fromkeys(c for e in model.experts for c in e.components))
        self.produced: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # tensor -> (its rows, its values for them)
        self.ran: dict[str, set[int]] = {}  # component -> the rows it has run for
        self.made: dict[str, set[int]] = {}  # lazy source -> the rows its tensors were made for
        # expert -> HEAD / EXACT -> row -> (2, K) logits with the image removed, with the text removed
        self.coalitions: dict[str, dict[str, dict[int, np.ndarray]]] = {}

    def run(
        self, members: dict[str, np.ndarray], wants: dict[str, np.ndarray] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Run each expert of ``members`` (expert -> rows); returns each expert's logits for its rows, in
        ``members``' row order, and the seconds each expert took (a shared component's time is split among
        its experts in proportion to their requests). ``wants`` (expert -> flags per row of ``members``) asks
        for the logits attribution needs (export/attribution.py), kept in ``coalitions``."""
        # Row sets as Python sets of at most a batch of ints: NumPy's union1d and setdiff1d cost several
        # microseconds a call on arrays this small, a dozen calls a batch (bench/pipeline_cost.py).
        wanted: dict[str, set[int]] = {}
        for expert, rows in members.items():
            listed = rows.tolist() if isinstance(rows, np.ndarray) else list(rows)
            for component in self.chains[expert]:
                wanted.setdefault(component, set()).update(listed)
        pending = {c: _sorted_rows(rows - self.ran.get(c, set())) for c, rows in wanted.items()}
        self._make_lazy_inputs(pending)
        seconds = dict.fromkeys(members, 0.0)
        for component in self.order:
            rows = pending.get(component)
            if rows is None or not len(rows):
                continue
            started = time.perf_counter()
            outputs = self.runner(component)({name: self._gather(name, rows) for name in self.inputs[component]})
            elapsed = time.perf_counter() - started
            users = {e: r for e, r in members.items() if component in self.chains[e]}
            for expert, expert_rows in users.items():
                seconds[expert] += elapsed * len(expert_rows) / sum(len(r) for r in users.values())
            for name, value in outputs.items():
                self._keep(f"logits@{component}" if name == "logits" else name, rows, value)
            self.ran.setdefault(component, set()).update(rows.tolist())
        logits = {expert: self._gather(f"logits@{self.chains[expert][-1]}", rows) for expert, rows in members.items()}
        for expert, flags in (wants or {}).items():
            started = time.perf_counter()
            self._attribute(expert, np.asarray(members[expert]), np.asarray(flags))
            seconds[expert] = seconds.get(expert, 0.0) + time.perf_counter() - started
        return logits, seconds

    def _attribute(self, expert: str, rows: np.ndarray, flags: np.ndarray) -> None:
        """The coalition logits of ``expert`` for the rows whose flags ask for them, from its fusion inputs as its
        chain produced them."""
        info = self.attributions[expert]
        kept = self.coalitions.setdefault(expert, {HEAD: {}, EXACT: {}})
        for how, flag in ((HEAD, WANT_HEAD), (EXACT, WANT_EXACT)):
            if not info.reads_both or (how == HEAD and info.head is None):
                continue  # nothing of the kind to compute: a one-modality expert, or one without a head
            asked = rows[(flags & flag) != 0]
            if not len(asked):
                continue
            pairs = coalition_logits(self.model, info, self.runner, lambda name, r=asked: self._gather(name, r), how)
            kept[how].update(zip(asked.tolist(), pairs, strict=True))

    def _make_lazy_inputs(self, pending: dict[str, np.ndarray]) -> None:
        """Each lazy source once, for the rows of every pending component that reads it and lacks it."""
        readers: dict[str, set[int]] = {}
        for component, rows in pending.items():
            for source in {self.sources.get(name) for name in self.inputs[component]} - {None}:
                readers.setdefault(source, set()).update(rows.tolist())  # type: ignore[arg-type]
        for source, rows in readers.items():
            have = self.made.setdefault(source, set())
            missing = _sorted_rows(rows - have)
            if not len(missing):
                continue
            for name, values in self.preprocess(source, missing).items():
                self._keep(name, missing, values)
            have.update(missing.tolist())

    def _keep(self, name: str, rows: np.ndarray, values: np.ndarray) -> None:
        if name in self.produced:  # a later pass: merge, keeping rows sorted
            old_rows, old_values = self.produced[name]
            rows, values = np.concatenate([old_rows, rows]), np.concatenate([old_values, values])
            order = np.argsort(rows, kind="stable")
            rows, values = rows[order], values[order]
        self.produced[name] = (rows, values)

    def _gather(self, name: str, rows: np.ndarray) -> np.ndarray:
        if name not in self.produced:
            return self.tensors[name][rows]
        source_rows, values = self.produced[name]
        if len(source_rows) == len(rows):
            return values  # the same rows: a consumer's rows are always among its producer's
        return values[np.searchsorted(source_rows, rows)]


def _sorted_rows(rows: set[int]) -> np.ndarray:
    """A set of rows as the sorted int64 array the components' inputs are gathered with."""
    return np.array(sorted(rows), dtype=np.int64)
