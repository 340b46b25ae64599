"""DYNFUSE_DECODE_THREADS: big images decode on that many threads at once, no more and no fewer; small ones on the
event loop. Each decode is held until as many run at once as the setting allows, so that a pool of any other size
shows: a smaller one never gets there (the wait runs out), a larger one goes past it."""

from __future__ import annotations

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from conftest import b64
from PIL import Image

from service import inference


def big_png(seed: int) -> bytes:
    """A 300x300 picture: over INLINE_DECODE_PIXELS, so it decodes on a decode thread."""
    pixels = np.random.default_rng(seed).integers(0, 256, (300, 300, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class HeldDecodes:
    """Stands in front of the decoder: records how many decodes run at once, and holds each one until ``together``
    run at once or every one of ``total`` has begun (or a generous deadline passes, when neither will come)."""

    def __init__(self, together: int, total: int, deadline_s: float = 8.0):
        self.together = together
        self.total = total
        self.deadline_s = deadline_s  # under the request deadline (10 s): a wait that runs out fails as itself
        self.begun = 0
        self.running = 0
        self.most = 0
        self.threads: set[str] = set()
        self.changed = threading.Condition()
        self.real = inference.decode_image

    def __call__(self, opened, *, side):
        with self.changed:
            self.running += 1
            self.begun += 1
            self.most = max(self.most, self.running)
            self.threads.add(threading.current_thread().name)
            self.changed.notify_all()
            together = self.changed.wait_for(
                lambda: self.running >= self.together or self.begun == self.total, timeout=self.deadline_s
            )
            assert together, f"only {self.running} decodes at once within {self.deadline_s} s"
        try:
            return self.real(opened, side=side)
        finally:
            with self.changed:
                self.running -= 1


def test_big_images_decode_on_exactly_decode_threads_threads_at_once(serve, monkeypatch):
    threads = 3  # not the default (2): a pool of the default size never gets 3 at once
    requests = [{"image": b64(big_png(seed)), "text": "a red circle"} for seed in range(threads + 2)]
    held = HeldDecodes(together=threads, total=len(requests))
    monkeypatch.setattr(inference, "decode_image", held)
    client = serve(decode_threads=threads)

    started = time.monotonic()
    with ThreadPoolExecutor(len(requests)) as pool:
        responses = list(pool.map(lambda body: client.post("/v1/classify", json=body), requests))

    assert [r.status_code for r in responses] == [200] * len(requests), [r.text for r in responses]
    assert held.most == threads  # 5 requests: a larger pool would run a 4th while 3 are held
    assert all(name.startswith("dynfuse-decode") for name in held.threads), held.threads
    assert time.monotonic() - started < held.deadline_s  # nobody waited for a pool size that never came


def test_a_small_image_decodes_on_the_event_loop(serve, monkeypatch, samples):
    threads = []
    real = inference.ImageDecoder.pixels_now  # every decode, Pillow's or libspng's (service/decode.py)

    def recording(self, opened):
        threads.append(threading.current_thread().name)
        return real(self, opened)

    monkeypatch.setattr(inference.ImageDecoder, "pixels_now", recording)
    client = serve(decode_threads=1)

    assert client.post("/v1/classify", json={"image": b64(samples[0]["png"]), "text": "x"}).status_code == 200
    assert len(threads) == 1
    assert not threads[0].startswith("dynfuse-decode"), threads
