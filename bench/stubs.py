"""Import-time stand-ins for Pillow and tqdm, for ``bench/gpu.py`` on bare GPU machines (torch and NumPy only).

``export/writer.py`` and ``models/`` import both at module level; the GPU benchmark reads no image and shows
no progress bar, so an empty stand-in is enough. Nothing is replaced when the real module imports.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types


def _stub(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # torch._dynamo asks every module for one
    return module


def stub_missing_modules() -> list[str]:
    """Import-time stand-ins for Pillow and tqdm on machines that lack them (nothing here calls them)."""
    stubbed = []
    try:
        import PIL.Image
        import PIL.ImageOps  # noqa: F401
    except ImportError:
        image = _stub("PIL.Image")
        image.Image = type("Image", (), {})
        image.BILINEAR = 2
        image.DecompressionBombError = type("DecompressionBombError", (Exception,), {})
        image.DecompressionBombWarning = type("DecompressionBombWarning", (RuntimeWarning,), {})
        pil = _stub("PIL")
        pil.Image, pil.ImageOps, pil.UnidentifiedImageError = image, _stub("PIL.ImageOps"), OSError
        sys.modules.update({"PIL": pil, "PIL.Image": image, "PIL.ImageOps": pil.ImageOps})
        stubbed.append("PIL")
    try:
        import tqdm.auto  # noqa: F401
    except ImportError:
        auto = _stub("tqdm.auto")
        auto.tqdm = lambda iterable=None, *args, **kwargs: iterable
        sys.modules.update({"tqdm": _stub("tqdm"), "tqdm.auto": auto})
        stubbed.append("tqdm")
    return stubbed
