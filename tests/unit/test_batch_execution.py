"""export/execution.py's BatchExecution called directly, as the pipeline and the Ray experts' side call it: lazy
sources kept apart and made once for the rows that read them, and the attribution flags of ``run(members, wants)``
honoured row by row, whatever the expert's method (the pipeline only ever sends the flags its Attributor asks for).
"""

from __future__ import annotations

import numpy as np
import pytest
from test_pipeline_attribution import FusionBackend, attributed_model, full_logits, head_logits

from export.attribution import EXACT, HEAD, WANT_EXACT, WANT_HEAD, Attributor
from export.execution import BatchExecution
from export.store import ComponentInfo, ExpertInfo, TensorInfo


def component(name: str, *inputs: str) -> ComponentInfo:
    return ComponentInfo(name, tuple(TensorInfo(i, "float32", (-1, 1)) for i in inputs),
                         (TensorInfo("logits", "float32", (-1, 1)),), 1, {})  # fmt: skip


class TwoSources:
    """A model whose expert "plain" reads the model's image and whose expert "spec" reads a spec's pixels (source
    "s"); each component answers the sum of its inputs, and each lazy source makes 100 * row + 1 (image) or
    + 2 (spec) for the rows asked."""

    def __init__(self):
        self.experts = (ExpertInfo("plain", ("image",), ("a",), 1, 1), ExpertInfo("spec", ("image",), ("b",), 1, 1))
        self.components = {"a": component("a", "image"), "b": component("b", "pixels@s")}
        self.specs = type("Specs", (), {"source_of": {"pixels@s": "s"}})()
        self.made: list[tuple[str, list[int]]] = []

    def preprocess(self, source: str, rows: np.ndarray) -> dict[str, np.ndarray]:
        self.made.append((source, rows.tolist()))
        name, offset = ("image", 1) if source == "image" else ("pixels@s", 2)
        return {name: (100.0 * rows + offset)[:, None]}

    @staticmethod
    def runner(name: str):
        return lambda inputs: {"logits": sum(inputs.values())}


def test_each_lazy_source_is_made_once_for_the_rows_that_read_it_and_kept_apart_from_the_others():
    model = TwoSources()
    execution = BatchExecution(model, model.runner, {}, model.preprocess)

    first, _ = execution.run({"plain": np.array([0, 1])})
    # Row 1 runs "spec" too: the image it already has is not made again, the spec's pixels are made for it alone.
    second, _ = execution.run({"plain": [1], "spec": [1]})

    assert model.made == [("image", [0, 1]), ("s", [1])]
    assert first["plain"].ravel().tolist() == [1.0, 101.0]
    assert (second["plain"].ravel().tolist(), second["spec"].ravel().tolist()) == ([101.0], [102.0])


@pytest.mark.parametrize("method", ["exact", "head"])
def test_run_computes_exactly_the_attribution_each_rows_flags_ask_for(method):
    model = attributed_model(method)
    backend = FusionBackend(model)
    cases = np.array([1, 2, 3], np.float32)  # rows 0, 1, 2 are cases 1, 2, 3

    def preprocess(source, rows):
        assert source == "image"
        return {"image": np.broadcast_to((cases[rows] / 255)[:, None, None, None], (len(rows), 3, 4, 4)).copy()}

    features = np.stack([cases, np.zeros(3, np.float32)], axis=1)
    tensors = {"text_features": features, "text_tokens": np.zeros((3, 4, 2), np.float32)}
    runner = {name: backend.load(info) for name, info in model.components.items()}.__getitem__
    execution = BatchExecution(model, runner, tensors, preprocess, Attributor(model).experts)

    # Row 0 asks for the exact values only, row 1 for nothing, row 2 (the text expert's) for everything.
    execution.run(
        {"full": np.array([0, 1]), "text": [2]},
        {"full": np.array([WANT_EXACT, 0]), "text": np.array([WANT_HEAD | WANT_EXACT])},
    )

    kept = execution.coalitions["full"]
    assert (list(kept[EXACT]), list(kept[HEAD])) == ([0], [])  # the head is not run for an exact-only ask
    assert kept[EXACT][0].tolist() == [list(full_logits(1)["text_only"]), list(full_logits(1)["image_only"])]
    assert execution.coalitions["text"] == {HEAD: {}, EXACT: {}}  # one modality: nothing to compute
    # Every flag on the full path's rows: the exact-only expert has no head to run.
    execution.run({"full": np.array([0, 1])}, {"full": np.array([WANT_HEAD | WANT_EXACT] * 2)})
    assert sorted(kept[EXACT]) == [0, 1]
    if method == "head":
        assert kept[HEAD][1].tolist() == [list(head_logits(2)["text_only"]), list(head_logits(2)["image_only"])]
    else:
        assert kept[HEAD] == {}
