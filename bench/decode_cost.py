"""CPU per image of what the event loop does with a held-out picture: ``open_image`` (the header and its checks), then
``plain_png_pixels`` (libspng) or Pillow's decode, as ``service.inference.ImageDecoder.pixels_now`` does.

Best of ``--repeats`` passes over ``--images`` held-out 64x64 PNGs, thread CPU time. ``--baseline DIR`` runs the same
loop in another checkout too (``git worktree add DIR <commit>``), each in a process of its own, alternating
``--rounds`` times.

    python -m bench.decode_cost [--images 400] [--repeats 7] [--baseline DIR --rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import DEFAULT_STORE, REPO, RESULTS, load_test_split, write_result

HELD_OUT_SEED = 7  # bench/peer_compare.py's
SIDE = 64  # the default model's


def measure(data: Path, images: int, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` CPU microseconds per image: the checks alone, and checks + pixels."""
    from service.decode import decode_image, open_image, plain_png_pixels

    files = [sample["png"] for sample in load_test_split(data)[:images]]

    def check() -> None:
        for data in files:
            opened = open_image(data, max_pixels=4096 * 4096)
            opened.image.close() if not hasattr(opened, "close") else opened.close()

    def check_and_pixels() -> None:
        for data in files:
            opened = open_image(data, max_pixels=4096 * 4096)
            if plain_png_pixels(opened, SIDE) is None:
                decode_image(opened, side=SIDE)
            opened.image.close() if not hasattr(opened, "close") else opened.close()

    out = {}
    for name, loop in (("check_us", check), ("check_and_pixels_us", check_and_pixels)):
        best = float("inf")
        for _ in range(repeats):
            started = time.thread_time()
            loop()
            best = min(best, time.thread_time() - started)
        out[name] = 1e6 * best / len(files)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--data", type=Path, help=f"held-out data set (default: made with seed {HELD_OUT_SEED})")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3, help="alternations with --baseline")
    parser.add_argument("--baseline", type=Path, help="another checkout to compare with, alternating")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # one run's figures, for compare
    parser.add_argument("--out", type=Path, default=RESULTS / "decode_cost.json")
    args = parser.parse_args(argv)
    if args.data is None:
        from bench.peer_compare import held_out_data

        args.data = held_out_data(args.store, None, HELD_OUT_SEED)
    if args.json:
        print(json.dumps(measure(args.data, args.images, args.repeats)))
        return 0
    roots = {"this": REPO} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    runs: dict[str, list[dict]] = {name: [] for name in roots}
    for index in range(args.rounds if args.baseline else 1):
        for name in roots if index % 2 == 0 else reversed(roots):
            command = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--json",
                "--data",
                str(args.data.resolve()),
                "--images",
                str(args.images),
            ]
            command += ["--repeats", str(args.repeats)]
            # This script, the decoder of the checkout measured.
            env = {**os.environ, "PYTHONPATH": str(roots[name])}
            done = subprocess.run(command, cwd=roots[name], env=env, check=True, capture_output=True, text=True)
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    medians = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    for name, figures in medians.items():
        print(f"{name}: " + ", ".join(f"{k} {v:.1f}" for k, v in figures.items()))
    write_result(
        args.out,
        {
            "figure": "CPU per held-out image of the header checks and the pixels",
            "baseline": str(args.baseline) if args.baseline else None,
            "images": args.images,
            "runs": runs,
            "median": medians,
            "loadavg": os.getloadavg(),
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
