"""Experts from Hugging Face ``transformers`` classifiers, loaded the real way: ``from_pretrained``.

``source`` is a local directory written by ``save_pretrained`` (what the tests and the walkthrough use: nothing
here can download weights) or, on a machine with internet, a hub id such as ``"google/vit-base-patch16-224"``;
that is the one change. The preprocessing comes from the files saved with the model: ``tokenizer.json`` for
text (read with the ``tokenizers`` package), ``preprocessor_config.json`` (size, image_mean, image_std) for
images, so the expert is fed as it was trained. The model is used as it is: dynfuse calls it with keyword
arguments and reads ``logits`` from its output.

Labels come from the model's ``config.id2label``; a model whose labels are not the data's is refused before
training (models/byo/loading.py), one with the same labels in another order has its logits reordered.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from models.byo.interface import Component, Expert
from models.specs import ImageSpec, TextSpec


def text_classifier(source: str | Path, *, max_length: int = 64, description: str = "") -> Expert:
    """A ``*ForSequenceClassification`` model and its ``tokenizer.json`` as a text expert."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(source)
    return Expert(
        modalities=("text",),
        labels=_labels(model),
        text=TextSpec(_file(source, "tokenizer.json"), max_length),
        components=[Component(model, inputs=("input_ids", "attention_mask"), outputs=("logits",), name="classifier")],
        description=description or f"{type(model).__name__} from {source}",
    )


def image_classifier(source: str | Path, *, description: str = "") -> Expert:
    """A ``*ForImageClassification`` model and its ``preprocessor_config.json`` as an image expert."""
    from transformers import AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(source)
    return Expert(
        modalities=("image",),
        labels=_labels(model),
        image=image_spec(_file(source, "preprocessor_config.json"), default_size=model.config.image_size),
        components=[Component(model, inputs={"pixel_values": "image"}, outputs=("logits",), name="classifier")],
        description=description or f"{type(model).__name__} from {source}",
    )


def late_fusion(text_source: str | Path, image_source: str | Path, *, max_length: int = 64) -> Expert:
    """Both classifiers on one request, their log-probabilities averaged: the costly expert that reads both.

    Three components, so that attribution is nearly free: each classifier's logits, then their fusion. A missing
    modality is zero logits (a uniform distribution: no evidence), so the fusion answers from the other one alone,
    and the exact Shapley values cost two reruns of the fusion, an average of two vectors."""
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    text_model = AutoModelForSequenceClassification.from_pretrained(text_source)
    image_model = AutoModelForImageClassification.from_pretrained(image_source)
    labels = _labels(text_model)
    if _labels(image_model) != labels:
        raise ValueError(f"{text_source} and {image_source} classify different labels, or in another order")
    return Expert(
        modalities=("text", "image"),
        labels=labels,
        text=TextSpec(_file(text_source, "tokenizer.json"), max_length),
        image=image_spec(_file(image_source, "preprocessor_config.json"), default_size=image_model.config.image_size),
        components=[
            Component(
                TextLogits(text_model), inputs=("input_ids", "attention_mask"), outputs=("text_logits",), name="text"
            ),
            Component(
                ImageLogits(image_model), inputs={"pixel_values": "image"}, outputs=("image_logits",), name="image"
            ),
            Component(LateFusion(), inputs=("text_logits", "image_logits"), outputs=("logits",), name="fusion"),
        ],  # fmt: skip
        missing={"text": {"text_logits": 0.0}, "image": {"image_logits": 0.0}},
        description=f"late fusion of {text_source} and {image_source}",
    )


class TextLogits(nn.Module):
    """A text classifier's logits, as a plain tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, K)


class ImageLogits(nn.Module):
    """An image classifier's logits, as a plain tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits  # (B, K)


class LateFusion(nn.Module):
    """Mean of a text and an image classifier's log-probabilities (same labels, same order)."""

    def forward(self, text_logits: torch.Tensor, image_logits: torch.Tensor) -> torch.Tensor:
        return (text_logits.log_softmax(-1) + image_logits.log_softmax(-1)) / 2


def image_spec(preprocessor_config: Path, *, default_size: int) -> ImageSpec:
    """Size, mean and std from an image processor's saved config, as the model was trained with them."""
    config = json.loads(Path(preprocessor_config).read_text()) if Path(preprocessor_config).is_file() else {}
    size = config.get("size", default_size)
    if isinstance(size, dict):  # {"height": h, "width": w} or {"shortest_edge": s}
        sides = {size[k] for k in ("height", "width", "shortest_edge") if k in size}
        if len(sides) != 1:
            raise ValueError(f"{preprocessor_config}: size {size} is not square; dynfuse's image specs are")
        size = sides.pop()
    return ImageSpec(int(size), tuple(config.get("image_mean", (0.5,) * 3)), tuple(config.get("image_std", (0.5,) * 3)))


def _labels(model) -> list[str]:
    return [model.config.id2label[i] for i in range(model.config.num_labels)]


def _file(source: str | Path, name: str) -> Path:
    """A file saved beside the model: in the local directory, else fetched from the hub (needs internet)."""
    local = Path(source) / name
    if local.is_file() or Path(source).is_dir():
        return local
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(str(source), name))
