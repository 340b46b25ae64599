"""Bring your own experts: keep the models you have, and let dynfuse train only the router that picks one.

- ``interface``: what a user writes (``Expert``, ``Component``, with ``ImageSpec`` and ``TextSpec`` from
  models/specs.py).
- ``loading``: experts named on the command line (``NAME=package.module:factory``) or by the ``dynfuse.experts``
  entry-point group, each checked before any training, with messages that name it.
- ``components``: a user's modules as dynfuse components (named inputs and outputs, example inputs), which is
  all that cost counting, export and the serving pipeline need.
- ``model``: the router-only model: dynfuse's small text encoder, the image glimpse and the dual router over
  the frozen user experts.
- ``training``: ``dynfuse train-router``: a short pass for the router's encoders, the experts run once over the
  held-out splits, then Stage II of models/training.py, unchanged.
- ``builtin``: the experts of a trained dynfuse run as user experts; ``huggingface``: experts from
  ``transformers`` models saved in a local directory.
"""

from models.byo.interface import Component, Expert
from models.specs import ImageSpec, TextSpec

__all__ = ["Component", "Expert", "ImageSpec", "TextSpec"]
