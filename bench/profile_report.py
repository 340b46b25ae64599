"""Read a py-spy profile (``--format raw --threads``: one collapsed stack and its sample count per line)
and say where the server's CPU goes: by thread, by stage of the request path, by function.

py-spy only sees Python threads: ONNX Runtime's own intra-op threads are native and do not appear,
so the figures are shares of the Python threads' on-CPU samples (idle threads are not sampled).

    python -m bench.profile_report bench/results/profile_c32.txt
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from bench.common import REPO, RESULTS, markdown_table

# Per-request hand-offs to other threads, recognised anywhere in the stack (they cost on the event loop).
HANDOFFS = (
    (("solve_dependencies", "run_in_threadpool"), "sync dependencies -> AnyIO thread pool (FastAPI)"),
    (("run_decoding (service/inference", "run_in_threadpool"), "image decode -> AnyIO thread pool (large images)"),
    (("ThreadPoolExecutor.submit",), "batch -> worker thread (run_in_executor)"),
)
# Otherwise the stage is decided by the innermost frame that matches one of these.
STAGES = (
    ("onnxruntime/", "ONNX Runtime session.run (the model)"),
    ("export/pipeline.py", "pipeline Python around the model"),
    ("PIL/", "image decode (Pillow)"),
    ("models/preprocess.py", "image preprocess (NumPy)"),
    ("models/tokenizer.py", "tokenize"),
    ("base64.py", "base64 decode"),
    ("pydantic", "pydantic validation"),
    ("prometheus_client/", "metrics (prometheus_client)"),
    ("json/", "JSON encode/decode"),
    ("service/inference.py", "render response / service glue"),
    ("service/batcher.py", "micro-batcher"),
    ("service/middleware.py", "service middleware"),
    ("service/", "service routes and deps"),
    ("anyio/", "thread pools, worker side (waiting, waking)"),
    ("concurrent/futures", "thread pools, worker side (waiting, waking)"),
    ("threading.py", "thread pools, worker side (waiting, waking)"),
    ("queue.py", "thread pools, worker side (waiting, waking)"),
    ("telemetry", "FastAPI/Starlette framework"),
    ("starlette/", "FastAPI/Starlette framework"),
    ("fastapi/", "FastAPI/Starlette framework"),
    ("uvicorn/", "uvicorn HTTP protocol"),
    ("httptools", "uvicorn HTTP protocol"),
    ("asyncio/", "asyncio event loop"),
    ("uvloop", "asyncio event loop"),
)
# Functions worth an inclusive figure: the project's own, and the framework calls that cost per request.
PROJECT = ("service/", "export/", "models/")
ENTRY_POINTS = ("service/cli.py", "service/server.py")
NOTABLE = ("run_in_threadpool", "run_sync", "solve_dependencies", "JSONResponse", "Request.body", "wait_for")
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def parse(path: Path) -> list[tuple[str, list[str], int]]:
    """(thread name, frames root first as 'function (file)', samples) per collapsed line."""
    stacks = []
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        parts = stack.split(";")
        thread = parts[0].split(": ", 1)[-1] if parts[0].startswith(("thread", "process")) else "?"
        frames = []
        for part in parts[1:]:
            match = _FRAME.match(part)
            frames.append(f"{match['function']} ({match['file']})" if match else part)
        stacks.append((thread, frames, int(count)))
    return stacks


def thread_group(name: str) -> str:
    if name.startswith("MainThread"):
        return "event loop (MainThread)"
    if name.startswith("dynfuse-batch"):
        return "batch worker (dynfuse-batch)"
    if name.startswith("AnyIO worker"):
        return "AnyIO thread pool"
    return name


def stage_of(frames: list[str]) -> str:
    stack = ";".join(frames)
    for needles, stage in HANDOFFS:
        if all(needle in stack for needle in needles):
            return stage
    for frame in reversed(frames):
        for needle, stage in STAGES:
            if needle in frame:
                return stage
    return "other"


def _notable(frame: str) -> bool:
    own = any(p in frame for p in PROJECT) and not any(p in frame for p in ENTRY_POINTS)
    return own or any(name in frame for name in NOTABLE)


def analyze(path: Path, top: int = 15) -> dict:
    path = Path(path)
    stacks = parse(path)
    total = sum(count for _, _, count in stacks)
    assert total > 0, f"{path}: no samples"
    threads: Counter = Counter()
    stages: Counter = Counter()
    leaf: Counter = Counter()
    inclusive: Counter = Counter()
    for thread, frames, count in stacks:
        threads[thread_group(thread)] += count
        stages[stage_of(frames)] += count
        if frames:
            leaf[frames[-1]] += count
        for frame in set(frames):
            if _notable(frame):
                inclusive[frame] += count

    def shares(counter: Counter, n: int | None = None) -> list[tuple[str, float, int]]:
        return [(name, count / total, count) for name, count in counter.most_common(n)]

    return {
        "file": str(path.resolve().relative_to(REPO)) if path.resolve().is_relative_to(REPO) else str(path),
        "samples": total,
        "threads": shares(threads),
        "stages": shares(stages),
        "self": shares(leaf, top),
        "inclusive": shares(inclusive, top),
    }


def render(report: dict) -> str:
    def table(title: str, rows) -> str:
        body = [[f"`{name}`" if "(" in name else name, f"{share:.1%}", count] for name, share, count in rows]
        return markdown_table([title, "share", "samples"], body)

    return "\n\n".join(
        [
            f"{report['samples']} samples of Python threads on CPU ({report['file']})",
            table("thread", report["threads"]),
            table("stage of the request path", report["stages"]),
            table("function, self time", report["self"]),
            table("function, inclusive (project code and per-request framework calls)", report["inclusive"]),
        ]
    )


def record_profile(pid: int, seconds: float, suffix: str, load: Callable[[float], dict]) -> dict:
    """py-spy on a server under ``load(seconds)``: collapsed stacks (analysed) and a flame graph, one load each.

    The load runs in a thread; it starts first and outlasts py-spy, so the profile sees the steady state only."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    outputs = {"raw": RESULTS / f"profile_c32{suffix}.txt", "flamegraph": RESULTS / f"profile_c32{suffix}.svg"}
    loads: dict[str, dict] = {}
    for fmt, path in outputs.items():
        thread = threading.Thread(target=lambda fmt=fmt: loads.setdefault(fmt, load(seconds + 3)))
        thread.start()
        time.sleep(1.5)
        command = [py_spy, "record", "--pid", str(pid), "--duration", f"{seconds:g}", "--rate", "100"]
        command += ["--nonblocking", "--threads", "--format", fmt, "-o", str(path)]
        spy = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
        thread.join()
        if spy.returncode != 0:
            raise RuntimeError(f"py-spy failed: {spy.stderr[-1000:]}")
    report = analyze(outputs["raw"])
    print("\n" + render(report))
    return {"files": {k: str(v.relative_to(REPO)) for k, v in outputs.items()}, "load_while_profiling": loads, **report}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path, help="py-spy record --format raw --threads output")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    print(render(analyze(args.profile, args.top)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
