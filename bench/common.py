"""Shared helpers of the benchmark scripts: the machine record, result files, the test split, timing statistics.

Only the standard library at import time: ``bench/gpu.py`` runs on machines with torch and NumPy but
none of the serving stack, and imports this module too.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DEFAULT_STORE = REPO / "store"
DEFAULT_DATA = REPO / "build" / "figures" / "data-g2-8000-s0-64px"  # make figures writes its test splits there
PACKAGES = (
    "numpy",
    "onnxruntime",
    "onnxruntime-gpu",
    "torch",
    "pillow",
    "fastapi",
    "uvicorn",
    "uvloop",
    "httptools",
    "pydantic",
)


def _cpuinfo() -> dict:
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return {"model": platform.processor() or "unknown"}
    return {
        "model": fields.get("model name", "unknown"),
        "family": fields.get("cpu family"),
        "model_number": fields.get("model"),
        "mhz": fields.get("cpu MHz"),
    }


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    return None


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return f"{line.split('=', 1)[1].strip(chr(34))}, kernel {platform.release()}"
    except OSError:
        pass
    return platform.platform()


def machine() -> dict:
    """What ran the benchmark: CPU, cores, memory, OS, Python and the versions of the packages that matter."""
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return {
        "cpu": _cpuinfo(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "os": _os_name(),
        "python": platform.python_version(),
        "packages": versions,
    }


def command_line() -> str:
    """How this script was started, as a command someone can paste."""
    module = Path(sys.argv[0]).resolve()
    if module.parent == REPO / "bench":
        return shlex.join(["python", "-m", f"bench.{module.stem}", *sys.argv[1:]])
    return shlex.join(["python", *sys.argv])


def code_version() -> dict:
    """The commit measured, and whether files outside bench/ differed from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", ".", ":!bench"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}
    return {"commit": commit.stdout.strip() or None, "modified_outside_bench": bool(status.stdout.strip())}


def write_result(path: Path, payload: dict) -> Path:
    """``payload`` with the machine, the command and the date, as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command_line(),
        "code": code_version(),
        "machine": machine(),
        **payload,
    }
    path.write_text(json.dumps(record, indent=1, default=_jsonable) + "\n")
    print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    return path


def _jsonable(value):
    if hasattr(value, "item"):  # NumPy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


class CpuWatch:
    """The share of the machine's CPU that processes other than ours used while the block ran.

    The benchmarks share the machine with whatever else runs on it (a test suite, a build); this
    figure goes into every result so a reader can tell a quiet run from a disturbed one. ``pids``
    are our long-lived child processes (the server); children we waited for count through cutime.
    """

    def __init__(self, pids: tuple[int, ...] = ()):
        self.pids = pids
        self.foreign_share: float | None = None

    def __enter__(self) -> CpuWatch:
        self._start = (_busy_jiffies(), _own_jiffies(self.pids), time.monotonic())
        return self

    def __exit__(self, *_exc) -> None:
        busy, own, started = self._start
        elapsed = time.monotonic() - started
        capacity = elapsed * (os.cpu_count() or 1) * os.sysconf("SC_CLK_TCK")
        if capacity > 0:
            foreign = (_busy_jiffies() - busy) - (_own_jiffies(self.pids) - own)
            self.foreign_share = max(0.0, foreign / capacity)


def _busy_jiffies() -> int:
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except OSError:
        return 0
    return sum(fields) - fields[3] - fields[4]  # all but idle and iowait


def _own_jiffies(pids: tuple[int, ...]) -> int:
    total = 0
    for pid, children in ((os.getpid(), True), *((p, False) for p in pids)):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(stat[11]) + int(stat[12])  # utime, stime
        if children:
            total += int(stat[13]) + int(stat[14])  # cutime, cstime: children we waited for
    return total


def wait_for_quiet(threshold: float = 0.15, window_s: float = 2.0, max_wait_s: float = 180.0) -> float | None:
    """Wait (bounded) until other processes use less than ``threshold`` of the CPU; the last share seen."""
    deadline = time.monotonic() + max_wait_s
    share = None
    while True:
        with CpuWatch() as watch:
            time.sleep(window_s)
        share = watch.foreign_share
        if share is None or share < threshold or time.monotonic() > deadline:
            if share is not None and share >= threshold:
                print(f"warning: other processes still use {share:.0%} of the CPU; measuring anyway")
            return share
        print(f"other processes use {share:.0%} of the CPU; waiting for a quieter machine")


def spread(values: list[float]) -> dict:
    """Median and spread of repeated measurements (seconds or any unit)."""
    ordered = sorted(values)
    return {
        "median": statistics.median(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "n": len(ordered),
    }


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def chunks(items: list, size: int) -> list[list]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def load_test_split(data_dir: Path, split: str = "test") -> list[dict]:
    """The split's samples as a client would send them: id, PNG bytes, caption, label, kind."""
    from models.data.manifest import read_split

    return [
        {"id": s.id, "png": s.image_path.read_bytes(), "text": s.text, "label": s.label, "kind": s.kind}
        for s in read_split(Path(data_dir), split)
    ]


def decoded_inputs(pipeline, samples: list[dict], route: str = "auto") -> list:
    """PipelineInputs of the samples, decoded and preprocessed the way the server does it."""
    import io

    from PIL import Image

    from export.pipeline import PipelineInput
    from models.preprocess import to_rgb

    inputs = []
    for sample in samples:
        with Image.open(io.BytesIO(sample["png"])) as image:
            image.load()
            rgb = to_rgb(image)
        inputs.append(
            PipelineInput(
                token_ids=pipeline.prepare_text(sample["text"]), image=pipeline.prepare_image(rgb), route=route
            )
        )
    return inputs


# -- a real `dynfuse serve` in a subprocess ----------------------------------------------------------
def server_processes(pid: int) -> tuple[int, ...]:
    """The server and its worker processes (``dynfuse serve --workers N`` spawns N children)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return (pid, *sorted(children))


def proc_status(pids: tuple[int, ...]) -> dict:
    """Resident memory now and at its peak (MiB), from /proc/<pid>/status, summed over the processes
    (with several, the sum of their peaks bounds the peak of the whole from above)."""
    fields = {"VmRSS": 0.0, "VmHWM": 0.0}
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in fields:
                fields[key] += int(value.split()[0]) / 1024
    return {key: round(value, 1) for key, value in fields.items()}


def cpu_seconds(pids: tuple[int, ...]) -> float:
    ticks = 0
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(stat[11]) + int(stat[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """Ports free on loopback now, all different (held open together while they are chosen)."""
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def start_server(
    store: Path, log: Path, workers: int = 1, settings: dict | None = None
) -> tuple[subprocess.Popen, str]:
    """A ready ``dynfuse serve`` on a free loopback port; ``settings`` become DYNFUSE_<NAME> variables."""
    port = free_port()
    serve = ["serve", "--store", str(store), "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    command = [sys.executable, "-m", "service.cli", *serve]
    env = {**os.environ, "DYNFUSE_LOG_LEVEL": "warning", "PYTHONUNBUFFERED": "1"}
    env |= {f"DYNFUSE_{name.upper()}": str(value) for name, value in (settings or {}).items()}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"dynfuse serve exited {process.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=1) as response:
                if response.status == 200:
                    return process, base
        except OSError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("dynfuse serve was not ready after 120 s")


def worker_processes(pid: int) -> list[int]:
    """The worker processes ``dynfuse serve --workers N`` spawned (not multiprocessing's resource tracker beside
    them); none when the server serves in its own process."""
    workers = []
    for child in server_processes(pid)[1:]:
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                workers.append(child)
        except OSError:
            continue  # gone meanwhile
    return workers


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def batch_counters(url: str) -> tuple[float, float]:
    """(sum, count) of the server's dynfuse_batch_size histogram, from /metrics."""
    base = url.split("/v1/", 1)[0]
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        for suffix in ("sum", "count"):
            if line.startswith(f"dynfuse_batch_size_{suffix}{{"):
                values[suffix] = float(line.rsplit(" ", 1)[1])
    return values.get("sum", 0.0), values.get("count", 0.0)
