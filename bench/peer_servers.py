"""The servers bench/peer_compare.py measures dynfuse against, each a process of its own on a loopback port.

- ``litserve-full``: LitServe (a generic batching server) serving the static full expert of the store: the text
  encoder and the full expert's chain as ONNX Runtime sessions, no glimpse, no router, on every request.
- ``litserve-auto``: LitServe running dynfuse's own pipeline (``DynamicPipeline.predict``, route ``auto``).
- ``fastapi-decode``: bare FastAPI that parses the body and decodes and resizes the image as the others do, then
  answers a fixed label without running any model: what the HTTP path and decoding alone cost.

All read the same JSON bodies as ``/v1/classify`` (``{"image": base64 PNG, "text": ...}``), decode a picture as
dynfuse does (Pillow, upright RGB, resized to the model's side) and batch as dynfuse's defaults do (16 requests,
2 ms). The runtime is dynfuse's own ONNX Runtime backend (all cores, thread spinning off), so the peers differ
from dynfuse in the server around the model, not in the model's settings.

    python -m bench.peer_servers litserve-full --store store --port 8100
"""

from __future__ import annotations

import argparse
import base64
import io
from pathlib import Path

import litserve as ls
import numpy as np
from fastapi import FastAPI, Request

from export.backends import create_backend
from export.store import load_model
from service.config import Settings

SERVERS = ("litserve-full", "litserve-auto", "fastapi-decode")
# The peers batch as dynfuse does by default (DYNFUSE_MAX_BATCH_SIZE, DYNFUSE_MAX_BATCH_DELAY_MS).
MAX_BATCH_SIZE = Settings.model_fields["max_batch_size"].default
BATCH_TIMEOUT_S = Settings.model_fields["max_batch_delay_ms"].default / 1000


def decode_picture(data: str):
    """A base64 image -> upright RGB, as dynfuse's decoder and the training data have it."""
    from PIL import Image

    from models.preprocess import to_rgb

    with Image.open(io.BytesIO(base64.b64decode(data))) as image:
        image.load()
        return to_rgb(image)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


class StaticFull(ls.LitAPI):
    """The full expert alone: what a generic server deploys when it has no router."""

    def __init__(self, store: Path, **options):
        super().__init__(**options)
        self.store = store

    def setup(self, device):
        self.model = load_model(self.store)
        backend = create_backend("onnx", "cpu", None)
        components = [self.model.shared_encoders["text"], *self.model.expert(self.model.full_expert).components]
        self.runners = [backend.load(self.model.components[name]) for name in components]
        self.labels = list(self.model.labels)

    def decode_request(self, request):
        tokens = np.asarray(self.model.tokenizer.encode(request["text"]), dtype=np.int64)
        return tokens, self.model.preprocessing.pixels(decode_picture(request["image"]))

    def batch(self, inputs):
        return np.stack([t for t, _ in inputs]), np.stack([p for _, p in inputs])

    def predict(self, x):
        tokens, pixels = x
        tensors = {"token_ids": tokens, "image": self.model.preprocessing.normalize(pixels)}
        for run in self.runners:
            tensors.update(run(tensors))
        return softmax(tensors["logits"])

    def unbatch(self, output):
        return list(output)

    def encode_response(self, probabilities):
        best = int(probabilities.argmax())
        return {
            "label": self.labels[best],
            "scores": {label: round(float(p), 6) for label, p in zip(self.labels, probabilities, strict=True)},
        }


class DynfusePipeline(ls.LitAPI):
    """dynfuse's own pipeline, route auto, behind LitServe's HTTP server, queues and batching."""

    def __init__(self, store: Path, **options):
        super().__init__(**options)
        self.store = store

    def setup(self, device):
        from export.pipeline import DynamicPipeline

        self.model = load_model(self.store)
        self.pipeline = DynamicPipeline(self.model, create_backend("onnx", "cpu", None))
        self.pipeline.warmup(batch_sizes=(1, MAX_BATCH_SIZE))
        self.labels = list(self.model.labels)

    def decode_request(self, request):
        return self.pipeline.prepare(request.get("text"), decode_picture(request["image"]))

    def batch(self, inputs):
        return inputs

    def predict(self, inputs):
        outputs, _ = self.pipeline.predict(inputs)
        return outputs

    def unbatch(self, outputs):
        return outputs

    def encode_response(self, out):
        return {
            "label": out.label,
            "scores": {label: round(float(p), 6) for label, p in zip(self.labels, out.probabilities, strict=True)},
            "expert": out.expert,
            "madds": out.madds,
        }


def fastapi_decode_app(store: Path):
    model = load_model(store)
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/v1/classify")
    async def classify(request: Request):
        body = await request.json()
        model.tokenizer.encode(body["text"])
        model.preprocessing.pixels(decode_picture(body["image"]))
        return {"label": model.labels[0]}

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("server", choices=SERVERS)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    if args.server == "fastapi-decode":
        import uvicorn

        uvicorn.run(fastapi_decode_app(args.store), host="127.0.0.1", port=args.port, log_level="warning")
        return 0
    api = {"litserve-full": StaticFull, "litserve-auto": DynfusePipeline}[args.server]
    options = {"max_batch_size": MAX_BATCH_SIZE, "batch_timeout": BATCH_TIMEOUT_S, "api_path": "/v1/classify"}
    server = ls.LitServer(api(args.store, **options), accelerator="cpu", devices=1, workers_per_device=1)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
