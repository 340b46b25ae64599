"""How long a newcomer waits: from ``git clone`` to the first 200 of a classify request, with ``make run``.

Clones the repository (its committed HEAD) into a fresh directory, starts ``make run`` there (which creates
``.venv`` with the serving core and serves the shipped model), and sends the README's request until it answers
200. The machine's load goes in the result: the wait is mostly installing the dependencies.

    python -m bench.first_answer [--repo .] [--port 18723] [--out bench/results/first_answer.json]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from bench.common import REPO, RESULTS, free_port, write_result

EXAMPLE = "store/shapes/1/examples/04.png"


def classify(port: int, image: bytes) -> int:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="text"\r\n\r\nwhat is this?\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="example.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/classify", body, {"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=REPO)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--out", type=Path, default=RESULTS / "first_answer.json")
    args = parser.parse_args(argv)
    port = args.port or free_port()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=args.repo, capture_output=True, text=True).stdout.strip()

    work = Path(tempfile.mkdtemp(prefix="dynfuse-first-answer-"))
    load_before = os.getloadavg()
    started = time.monotonic()
    subprocess.run(["git", "clone", "-q", str(args.repo), str(work / "clone")], check=True)
    cloned = time.monotonic() - started
    log = open(work / "make-run.log", "w")  # noqa: SIM115 (open for the server's whole life)
    server = subprocess.Popen(
        ["make", "run", f"PORT={port}"],
        cwd=work / "clone",
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    image = (work / "clone" / EXAMPLE).read_bytes()
    status = 0
    try:
        while status != 200:
            if server.poll() is not None:
                raise SystemExit(f"make run exited {server.returncode}; see {work / 'make-run.log'}")
            if time.monotonic() - started > args.timeout:
                raise SystemExit(f"no 200 within {args.timeout:.0f} s; see {work / 'make-run.log'}")
            status = classify(port, image)
            if status != 200:
                time.sleep(0.25)
        seconds = time.monotonic() - started
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
    torch_installed = any((work / "clone" / ".venv").glob("lib/python*/site-packages/torch"))
    shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()
    print(f"first 200 after {seconds:.1f} s (clone {cloned:.1f} s), load average {load_before[0]:.1f} -> "
          f"{load_after[0]:.1f}, torch installed: {torch_installed}, commit {commit[:7]}")  # fmt: skip
    write_result(
        args.out,
        {
            "figure": "from git clone to the first 200 of make run",
            "seconds": round(seconds, 1),
            "clone_seconds": round(cloned, 1),
            "cloned_commit": commit,
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in load_after],
            "torch_installed": torch_installed,
            "pip_find_links": os.environ.get("PIP_FIND_LINKS"),  # a local wheel directory makes installs faster
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
