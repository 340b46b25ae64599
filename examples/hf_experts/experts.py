"""Three experts over two Hugging Face models: text only (cheap), image only, and both (the costly one).

dynfuse train-router imports this file and calls each factory once (``--expert NAME=experts:factory``, with
this directory as the current one, or ``examples.hf_experts.experts:factory`` from the repository root).
The models are read from ``$DYNFUSE_EXAMPLE_MODELS`` (default: ``models/`` beside this file), as written by
make_models.py. With internet, a hub id works in place of a directory, e.g.
``text_classifier("textattack/bert-base-uncased-SST-2")``: that is the only change.
"""

from __future__ import annotations

import os
from pathlib import Path

from models.byo.huggingface import image_classifier, late_fusion, text_classifier

MODELS = Path(os.environ.get("DYNFUSE_EXAMPLE_MODELS", Path(__file__).parent / "models"))
MAX_LENGTH = 24


def text():
    return text_classifier(MODELS / "text", max_length=MAX_LENGTH)


def image():
    return image_classifier(MODELS / "image")


def both():
    return late_fusion(MODELS / "text", MODELS / "image", max_length=MAX_LENGTH)
