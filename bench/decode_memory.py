"""Peak memory of decoding one big image the way the server does (service/decode.py): what the README's claim
about a 4096x4096 palette PNG rests on.

Each image is decoded in a fresh Python process (so one decode's freed memory does not hide the next one's):
it reads the file, resets its peak resident size (``/proc/self/clear_refs``), runs ``open_image`` and
``decode_image`` at the default model's side (64: the image is reduced to about 128x128 while it decodes), and
reports its peak resident size minus its resident size before the decode, with the decode's time.

    python -m bench.decode_memory          # -> bench/results/decode_memory.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import REPO, RESULTS, write_result

SIDE = 4096


def images() -> dict[str, bytes]:
    """Name -> file bytes: the README's palette PNG, and the other modes a big image comes in."""
    from PIL import Image

    def saved(image, fmt: str, **options) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **options)
        return buffer.getvalue()

    palette = Image.new("P", (SIDE, SIDE), 3)
    palette.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    palette.paste(200, (SIDE // 4, SIDE // 4, SIDE // 2, SIDE // 2))
    gradient = Image.linear_gradient("L").resize((SIDE, SIDE))
    return {
        "png_palette_4096": saved(palette, "PNG", optimize=True),
        "png_bilevel_4096": saved(gradient.convert("1"), "PNG"),
        "png_gray16_4096": saved(gradient.convert("I;16"), "PNG"),
        "png_rgb_4096": saved(Image.merge("RGB", (gradient, gradient.rotate(90), gradient.rotate(180))), "PNG"),
        "gif_4096": saved(palette, "GIF"),
        "jpeg_4096": saved(Image.merge("RGB", (gradient, gradient.rotate(90), gradient)), "JPEG", quality=90),
    }


CHILD = """
import json, resource, sys, time
from pathlib import Path
from service.decode import decode_image, open_image

def rss_kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])

data = Path(sys.argv[1]).read_bytes()
Path("/proc/self/clear_refs").write_text("5")
before = rss_kib("VmRSS")
started = time.perf_counter()
opened = open_image(data, max_pixels=4096 * 4096)
image = decode_image(opened, side=int(sys.argv[2]))
seconds = time.perf_counter() - started
print(json.dumps({"peak_growth_mib": round((rss_kib("VmHWM") - before) / 1024, 1), "seconds": round(seconds, 3),
                  "mode": opened.image.mode if hasattr(opened.image, "mode") else None, "result": list(image.size)}))
"""


def measure(data: bytes, side: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".img") as file:
        file.write(data)
        file.flush()
        result = subprocess.run(
            [sys.executable, "-c", CHILD, file.name, str(side)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
    return json.loads(result.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=64, help="the model's image side (the default model's: 64)")
    parser.add_argument("--out", type=Path, default=RESULTS / "decode_memory.json")
    args = parser.parse_args(argv)
    results = {}
    for name, data in images().items():
        results[name] = {"file_bytes": len(data), **measure(data, args.side)}
        print(f"{name}: {results[name]}")
    write_result(
        args.out,
        {
            "side": args.side,
            "pixels": f"{SIDE}x{SIDE}",
            "rgb_full_size_mib": round(SIDE * SIDE * 3 / (1 << 20), 1),
            "images": results,
            "load_average": os.getloadavg(),
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
