"""The shell and Python examples of README.md and docs/*.md, run as a reader runs them, against the shipped model.

Each page's examples run in order, in a fresh copy of the repository (the reader's checkout, `.venv` linked),
against a real ``dynfuse serve`` of ``store/`` on free ports (``localhost:8000`` in a page means that server,
and ``localhost:8001`` its gRPC port, as `make run GRPC_PORT=8001` serves it). Shell blocks (```bash, ```sh)
run under ``/bin/sh``, so a bashism fails; Python blocks run with ``.venv/bin/python``. When a ```json or
```text block follows an example (before the next example or heading), it is what the example prints, and the
run is compared with it: JSON by structure and value (floats within a tolerance; ids, timings and other
volatile fields only by type; a string ending in "…" by its prefix), text line by line.

A block that cannot run here says why on the line before it: ``<!-- not run: REASON -->``.

    python -m bench.doc_examples            # run every page, print what differs (exit 1 if anything does)
    python -m bench.doc_examples --update   # write what the examples print now into the pages (make figures)

tests/e2e/test_doc_examples.py runs the first form.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import free_ports

REPO = Path(__file__).resolve().parents[1]
PAGES = ("README.md", "docs/*.md")
RUNNABLE = {"bash": "sh", "sh": "sh", "shell": "sh", "python": "python"}
OUTPUTS = ("json", "text")
NOT_RUN = re.compile(r"<!--\s*not run:\s*(?P<reason>.+?)\s*-->")
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+|~~~+)(?P<info>[^`\n]*)$")
PORT_IN_PAGES = 8000
GRPC_PORT_IN_PAGES = 8001
# Fields whose values change from run to run: compared by type only.
VOLATILE = {"id", "timing_ms", "queue", "inference", "total", "load_seconds", "created"}
FLOAT_TOLERANCE = 2e-3  # absolute: probabilities and ratios printed to 6 digits; runtimes may differ in the last ones
TIMEOUT_S = 120


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    start: int  # index of the first content line in the page's lines
    end: int  # index of the closing fence
    not_run: str | None = None
    output: Block | None = None


@dataclass
class Result:
    block: Block
    stdout: str
    stderr: str
    returncode: int
    problems: list[str] = field(default_factory=list)


def pages(repo: Path = REPO) -> list[Path]:
    return sorted({p for pattern in PAGES for p in repo.glob(pattern)})


def parse(page: Path) -> list[Block]:
    """The page's fenced blocks, each runnable one with its output block (if any) attached."""
    lines = page.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, lang = opening["fence"], opening["info"].strip().split(" ")[0].lower()
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        before = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        not_run = NOT_RUN.search(before)
        code = "\n".join(lines[i + 1 : j]) + "\n"
        blocks.append(Block(page, i + 1, lang, code, i + 1, j, not_run["reason"] if not_run else None))
        i = j + 1
    attached = []
    for position, block in enumerate(blocks):
        if block.lang not in RUNNABLE:
            continue
        for later in blocks[position + 1 :]:
            between = lines[block.end + 1 : later.start - 1]
            if later.lang in RUNNABLE or any(line.startswith("#") for line in between):
                break
            if later.lang in OUTPUTS:
                block.output = later
                attached.append(later)
                break
    return blocks


def runnable(blocks: list[Block]) -> list[Block]:
    return [b for b in blocks if b.lang in RUNNABLE and b.not_run is None]


def reader_checkout(destination: Path, repo: Path = REPO) -> Path:
    """What a reader has after `git clone` and `make run`: the tracked files, and the venv."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, files):
        source = repo / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    shipped = repo / "store" / "shapes" / "1"  # tracked once shipped; `make run` serves it
    if shipped.is_dir() and not (destination / "store" / "shapes" / "1").is_dir():
        shutil.copytree(shipped, destination / "store" / "shapes" / "1")
    venv = repo / ".venv"
    if venv.is_dir():
        (destination / ".venv").symlink_to(venv)
    return destination


def run_block(block: Block, cwd: Path, port: int, grpc_port: int | None = None) -> Result:
    code = block.code
    for in_page, actual in ((PORT_IN_PAGES, port), (GRPC_PORT_IN_PAGES, grpc_port)):
        if actual is not None:
            code = code.replace(f"localhost:{in_page}", f"localhost:{actual}")
            code = code.replace(f"127.0.0.1:{in_page}", f"127.0.0.1:{actual}")
    if RUNNABLE[block.lang] == "sh":
        command = ["/bin/sh", "-e", "-c", code]
    else:
        command = [str(cwd / ".venv" / "bin" / "python"), "-c", code]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYNFUSE_")}
    # The pages ask for the virtual environment to be active (`. .venv/bin/activate`): the same here.
    env |= {"VIRTUAL_ENV": str(cwd / ".venv"), "PATH": f"{cwd / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"}
    completed = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    return Result(block, completed.stdout, completed.stderr, completed.returncode)


def check(result: Result) -> list[str]:
    """What differs between what the block printed and what the page says it prints."""
    where = f"{result.block.page.name}:{result.block.line}"
    if result.returncode != 0:
        return [f"{where}: exited {result.returncode}\n{result.stderr[-2000:]}"]
    output = result.block.output
    if output is None:
        return []
    if output.lang == "json":
        try:
            expected = json.loads(output.code)
        except json.JSONDecodeError as error:
            return [f"{where}: the page's JSON output (line {output.line}) does not parse: {error}"]
        actual = json_values(result.stdout)
        if not actual:
            return [f"{where}: printed no JSON; the page shows some:\n{result.stdout[:500]}"]
        return [f"{where}: {p}" for value in actual for p in compare(expected, value, "")]
    expected_lines = [line.rstrip() for line in output.code.strip("\n").splitlines()]
    actual_lines = [line.rstrip() for line in result.stdout.strip("\n").splitlines()]
    if expected_lines != actual_lines:
        return [f"{where}: prints\n" + "\n".join(actual_lines) + "\nwhere the page shows\n" + "\n".join(expected_lines)]
    return []


def json_values(text: str) -> list:
    """Every JSON value printed, one after another (curl prints each answer with no separator)."""
    decoder, values, position = json.JSONDecoder(), [], 0
    text = text.strip()
    while position < len(text):
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            return values
        values.append(value)
        while position < len(text) and text[position].isspace():
            position += 1
    return values


def compare(expected, actual, path: str) -> list[str]:
    name = path.rsplit(".", 1)[-1]
    if name in VOLATILE:
        same_kind = isinstance(actual, type(expected)) or (_number(expected) and _number(actual))
        return [] if same_kind else [f"{path}: {actual!r} where the page shows a {type(expected).__name__}"]
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{path or 'the answer'}: {actual!r} where the page shows an object"]
        problems = []
        elided = "…" in expected
        missing = [k for k in expected if k != "…" and k not in actual]
        extra = [k for k in actual if k not in expected]
        if missing:
            problems.append(f"{path or 'the answer'}: no {', '.join(missing)} (the page shows them)")
        if extra and not elided:
            problems.append(f"{path or 'the answer'}: has {', '.join(extra)}, which the page does not show")
        for key, value in expected.items():
            if key != "…" and key in actual:
                problems += compare(value, actual[key], f"{path}.{key}" if path else key)
        return problems
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return [f"{path}: {actual!r} where the page shows {expected!r}"]
        return [p for i, (e, a) in enumerate(zip(expected, actual, strict=True)) for p in compare(e, a, f"{path}[{i}]")]
    if isinstance(expected, str) and expected.endswith("…"):
        ok = isinstance(actual, str) and actual.startswith(expected[:-1])
        return [] if ok else [f"{path}: {actual!r} does not start with {expected[:-1]!r}"]
    if _number(expected) and _number(actual) and not isinstance(expected, bool):
        if isinstance(expected, int) and isinstance(actual, int):
            return [] if expected == actual else [f"{path}: {actual} where the page shows {expected}"]
        return [] if math.isclose(expected, actual, abs_tol=FLOAT_TOLERANCE) else [
            f"{path}: {actual} where the page shows {expected}"
        ]  # fmt: skip
    return [] if expected == actual else [f"{path}: {actual!r} where the page shows {expected!r}"]


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def format_json(value, width: int = 104) -> str:
    """An answer the way the pages show one: a key per line at the top, shorter values inline, wrapped."""
    if not isinstance(value, dict):
        return json.dumps(value)
    lines = []
    items = list(value.items())
    for position, (key, item) in enumerate(items):
        prefix = "{" if position == 0 else " "
        suffix = "}" if position == len(items) - 1 else ","
        text = f"{prefix}{json.dumps(key)}: {_inline(item)}{suffix}"
        lines += _wrap(text, width, indent=len(json.dumps(key)) + 4)
    return "\n".join(lines)


def _inline(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def _wrap(text: str, width: int, indent: int) -> list[str]:
    """Break a long line after the commas of its inner objects."""
    if len(text) <= width:
        return [text]
    lines, current, depth, in_string = [], "", 0, False
    for i, char in enumerate(text):
        current += char
        if char == '"' and (i == 0 or text[i - 1] != "\\"):
            in_string = not in_string
        elif not in_string and char in "{[":
            depth += 1
        elif not in_string and char in "}]":
            depth -= 1
        elif char == "," and not in_string and depth >= 1 and len(current) > width - 24:
            lines.append(current)
            current = " " * indent
    lines.append(current)
    return lines


def update(page: Path, results: list[Result]) -> bool:
    """Write each example's output into the page's output block; True when the page changed."""
    lines = page.read_text().splitlines()
    changed = False
    for result in sorted(results, key=lambda r: -r.block.line):  # from the bottom, so indices hold
        output = result.block.output
        if output is None or result.returncode != 0 or not result.problems:
            continue  # an output that still matches stays as it is (its ids and timings too)
        if output.lang == "json":
            values = json_values(result.stdout)
            if not values:
                continue
            new = format_json(values[0]).splitlines()
        else:
            new = [line.rstrip() for line in result.stdout.strip("\n").splitlines()]
        if lines[output.start : output.end] != new:
            lines[output.start : output.end] = new
            changed = True
    if changed:
        page.write_text("\n".join(lines) + "\n")
    return changed


class Server:
    """``dynfuse serve`` of the reader's store on free loopback ports (HTTP and gRPC), as `make run GRPC_PORT=8001`
    starts it."""

    def __init__(self, checkout: Path, store: str = "store"):
        self.port, self.grpc_port = free_ports(2)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DYNFUSE_")}
        command = [str(checkout / ".venv" / "bin" / "dynfuse"), "serve", "--store", store, "--port", str(self.port)]
        self.process = subprocess.Popen(
            [*command, "--grpc-port", str(self.grpc_port)],
            cwd=checkout, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 120.0) -> None:
        import time
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"dynfuse serve exited {self.process.returncode}: {self.process.stdout.read()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"dynfuse serve was not ready within {timeout:.0f} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def run_pages(selected: list[Path], *, repo: Path = REPO) -> list[Result]:
    results = []
    with tempfile.TemporaryDirectory(prefix="dynfuse-docs-") as temporary:
        checkout = reader_checkout(Path(temporary) / "checkout", repo)
        server = Server(checkout)
        try:
            server.wait_ready()
            for page in selected:
                work = Path(temporary) / page.stem
                shutil.copytree(checkout, work, symlinks=True)
                for block in runnable(parse(page)):
                    result = run_block(block, work, server.port, server.grpc_port)
                    result.problems = check(result)
                    results.append(result)
        finally:
            server.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pages", nargs="*", type=Path, help="pages to run (default: README.md and docs/*.md)")
    parser.add_argument("--update", action="store_true", help="write what the examples print into the pages")
    args = parser.parse_args(argv)
    selected = [p.resolve() for p in args.pages] or pages()
    results = run_pages(selected)
    problems = [p for r in results for p in r.problems]
    if args.update:
        for page in selected:
            if update(page, [r for r in results if r.block.page == page]):
                print(f"updated {page.relative_to(REPO)}")
        problems = [p for r in results if r.returncode != 0 for p in r.problems]
    for problem in problems:
        print(problem, file=sys.stderr)
    ran = len(results)
    skipped = [b for page in selected for b in parse(page) if b.lang in RUNNABLE and b.not_run]
    print(f"{ran} examples run, {len(problems)} problems; {len(skipped)} marked not run")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
