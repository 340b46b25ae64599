"""The dynamic pipeline for experts that bring their own preprocessing (models/specs.py), on the scripted model of
tests/unit/test_pipeline_decisions.py with its text and image experts replaced by ones that read their own spec:

- the text expert (own_text_head) reads ``token_ids@<key>`` from a word tokenizer of its own (vocabulary <pad>,
  <unk>, zebra, owl; 3 tokens), so "zebra owl" is (2, 3, 0) to it, while the model's tokenizer (a, b, c, d) calls
  both words unknown;
- the image expert (own_image_head) reads ``image@<key>``: the picture at 8 x 8, x / 255 (mean 0, std 1).

The full path (trunk -> full_head) reads the model's own tensors. A request's route comes from its picture: every
pixel of value c makes the scripted router's case c (1: text, 2: image, 3: full), the text being unknown words.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image
from test_pipeline_decisions import MADDS, SHARED, ScriptedBackend, scripted_model

from export.pipeline import DynamicPipeline
from export.store import ComponentInfo, ExpertInfo, TensorInfo
from models.specs import ImageSpec, SpecSet, TextSpec

OWN_TEXT = (0.6, 0.3, 0.1)  # what each expert of its own answers, whatever it reads
OWN_IMAGE = (0.1, 0.2, 0.7)


class SpecBackend(ScriptedBackend):
    """The scripted backend; the experts of their own record each call's inputs and answer OWN_TEXT / OWN_IMAGE."""

    def __init__(self):
        super().__init__()
        self.seen: dict[str, list[dict[str, np.ndarray]]] = {"own_text_head": [], "own_image_head": []}

    def load(self, component: ComponentInfo):
        if component.name not in self.seen:
            return super().load(component)

        def run(inputs):
            self.seen[component.name].append({k: v.copy() for k, v in inputs.items()})
            answer = OWN_TEXT if component.name == "own_text_head" else OWN_IMAGE
            return {"logits": np.log(np.tile(np.array(answer, np.float32), (len(next(iter(inputs.values()))), 1)))}

        return run


class AnyCaseSpecBackend(SpecBackend):
    """For warmup's random inputs: case numbers folded into 1..4."""

    @staticmethod
    def cases(name, inputs):
        return (ScriptedBackend.cases(name, inputs) % 4) + 1


def spec_model(tmp_path, *, text: bool = True, image_side: int = 8):
    tokenizer = tmp_path / "own_tokenizer.json"
    tokenizer.write_text(json.dumps({"type": "word", "max_tokens": 3, "vocab": ["<pad>", "<unk>", "zebra", "owl"]}))
    own_image = ImageSpec(image_side, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    own_text = TextSpec(tokenizer, 3)
    specs = {own_image.key: own_image} | ({own_text.key: own_text} if text else {})
    model = scripted_model()
    logits = (TensorInfo("logits", "float32", (-1, 3)),)
    components = model.components | {
        "own_image_head": ComponentInfo(
            "own_image_head", (TensorInfo(f"image@{own_image.key}", "float32", (-1, 3, image_side, image_side)),),
            logits, 200, {},
        ),
        "own_text_head": ComponentInfo(
            "own_text_head", (TensorInfo(f"token_ids@{own_text.key}", "int64", (-1, 3)),), logits, 100, {}
        ),
    }  # fmt: skip
    text_chain = ("own_text_head",) if text else ("text_head",)
    experts = (
        ExpertInfo("text", ("text",), text_chain, 100, SHARED + 100),
        ExpertInfo("image", ("image",), ("own_image_head",), 200, SHARED + 200),
        model.experts[2],
    )
    return dataclasses.replace(model, components=components, experts=experts, specs=SpecSet(specs)), own_text, own_image


def picture(value: int, side: int = 16) -> Image.Image:
    return Image.new("RGB", (side, side), (value, value, value))


def test_a_request_keeps_its_raw_text_and_its_picture_at_the_largest_side_a_spec_reads(tmp_path):
    model, _, _ = spec_model(tmp_path)
    pipeline = DynamicPipeline(model, SpecBackend())

    prepared = pipeline.prepare("zebra owl", picture(3), route="soft")
    assert pipeline.decode_side == 8  # the spec's 8 over the model's own 4
    assert prepared.text == "zebra owl"
    assert (prepared.spec_image.shape, prepared.spec_image.dtype) == ((8, 8, 3), np.uint8)
    assert (prepared.spec_image == 3).all()
    assert prepared.image.shape == (4, 4, 3)  # the model's own pixels, beside
    assert prepared.token_ids.tolist() == [1, 1, 0, 0]  # the model's tokenizer: two unknown words
    assert prepared.route == "soft"
    text_only = pipeline.prepare("owl", None)
    assert (text_only.text, text_only.spec_image, text_only.image) == ("owl", None, None)


def test_without_a_text_spec_the_raw_text_is_not_kept_and_a_small_image_spec_leaves_the_models_side(tmp_path):
    model, _, _ = spec_model(tmp_path, text=False, image_side=2)
    pipeline = DynamicPipeline(model, SpecBackend())

    prepared = pipeline.prepare("zebra owl", picture(3))
    assert prepared.text is None
    assert pipeline.decode_side == 4  # the model's own side is the larger
    assert prepared.spec_image.shape == (2, 2, 3)


def test_each_spec_is_applied_once_per_batch_to_exactly_the_rows_whose_expert_reads_it(tmp_path):
    model, own_text, own_image = spec_model(tmp_path)
    backend = SpecBackend()
    pipeline = DynamicPipeline(model, backend)
    inputs = [
        pipeline.prepare("zebra owl", picture(1)),  # case 1: text
        pipeline.prepare("owl", picture(2)),  # case 2: image
        pipeline.prepare("owl owl zebra owl", picture(3)),  # case 3: full
        pipeline.prepare("zebra", picture(1)),  # case 1: text
        pipeline.prepare("owl zebra", picture(2), route="soft"),  # every expert
    ]
    outputs, _ = pipeline.predict(inputs)

    assert [o.expert for o in outputs] == ["text", "image", "full", "text", "soft"]
    assert outputs[0].probabilities == pytest.approx(np.array(OWN_TEXT), abs=1e-6)
    assert outputs[1].probabilities == pytest.approx(np.array(OWN_IMAGE), abs=1e-6)
    assert [o.madds for o in outputs[:3]] == [SHARED + 100, SHARED + 200, SHARED + MADDS["trunk"] + MADDS["full_head"]]
    # One call each, on the rows that run the expert, with the spec's own tensors: token ids of its vocabulary...
    (text_call,) = backend.seen["own_text_head"]
    assert text_call[f"token_ids@{own_text.key}"].tolist() == [[2, 3, 0], [2, 0, 0], [3, 2, 0]]
    # ...and the picture at 8 x 8, x / 255, channels first.
    (image_call,) = backend.seen["own_image_head"]
    image = image_call[f"image@{own_image.key}"]
    assert (image.shape, image.dtype) == ((2, 3, 8, 8), np.float32)
    assert image[:, 0, 0, 0] == pytest.approx([2 / 255, 2 / 255])


def test_evaluation_applies_every_spec_to_a_batch_and_runs_one_experts_chain(tmp_path):
    model, own_text, own_image = spec_model(tmp_path)
    backend = SpecBackend()
    pipeline = DynamicPipeline(model, backend)

    pixels = np.full((2, 8, 8, 3), 51, np.uint8)
    tensors = pipeline.spec_tensors(["owl", "zebra zebra"], pixels)
    assert set(tensors) == {f"token_ids@{own_text.key}", f"image@{own_image.key}"}
    assert tensors[f"token_ids@{own_text.key}"].tolist() == [[3, 0, 0], [2, 2, 0]]
    assert tensors[f"image@{own_image.key}"] == pytest.approx(np.full((2, 3, 8, 8), 0.2), abs=1e-6)

    logits = pipeline.run_expert("image", tensors)
    assert np.exp(logits) == pytest.approx(np.tile(OWN_IMAGE, (2, 1)), abs=1e-6)
    # The full path's chain in order: the trunk's image_mid feeds full_head (case 2 in every pixel, text case 0).
    full = pipeline.run_expert(
        "full", {"image": np.full((1, 3, 4, 4), 2 / 255, np.float32), "text_features": np.zeros((1, 2), np.float32)}
    )
    assert [name for name, _ in backend.calls] == ["trunk", "full_head"]
    assert np.exp(full[0]) == pytest.approx([0.05, 0.9, 0.05], abs=1e-6)  # PROBS["full"][2]


def test_warmup_gives_the_experts_of_their_own_a_raw_text_and_a_picture_at_the_decode_side(tmp_path):
    model, own_text, own_image = spec_model(tmp_path)
    backend = AnyCaseSpecBackend()
    pipeline = DynamicPipeline(model, backend)
    seen = []
    real = pipeline.predict

    def recording(inputs):
        seen.extend(inputs)
        return real(inputs)

    pipeline.predict = recording
    pipeline.warmup((2,))

    assert len(seen) == 4 * 2 + 2  # each route at batch size 2, then each operating point once
    for x in seen:
        assert len(x.text.split()) == 4  # the model's 4 tokens, as words
        assert set(x.text.split()) <= {"a", "b", "c", "d"}
        assert x.token_ids.tolist() == pipeline.prepare_text(x.text).tolist()
        assert (x.spec_image.shape, x.spec_image.dtype) == ((8, 8, 3), np.uint8)
    assert backend.seen["own_text_head"]
    assert backend.seen["own_image_head"]
    spec_pixels = np.concatenate([x.spec_image.ravel() for x in seen])
    assert spec_pixels.min() < 16 and spec_pixels.max() > 240  # noqa: PT018 - random pictures over the whole range


def test_warmup_of_a_model_without_a_text_spec_keeps_no_raw_text(tmp_path):
    model, _, _ = spec_model(tmp_path, text=False)
    pipeline = DynamicPipeline(model, AnyCaseSpecBackend())
    seen = []
    real = pipeline.predict
    pipeline.predict = lambda inputs: (seen.extend(inputs), real(inputs))[1]
    pipeline.warmup((1,))

    assert len(seen) == 4 + 2
    assert all(x.text is None for x in seen)
    assert all(x.spec_image.shape == (8, 8, 3) for x in seen)
