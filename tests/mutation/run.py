"""``make mutation``: mutmut over the decision code, each module with the tests that cover it.

Each module runs in its own copy of the checkout (``build/mutation/<module>/``: every file git knows, so the tests that
read a top-level file find it, and mutmut's ``also_copy`` names every top-level entry), with a ``[tool.mutmut]`` of its
own. The score of each module and its surviving mutants are printed, and written to ``bench/results/mutation.json``;
tests/mutation/EQUIVALENT.md lists the survivors reviewed as equivalent, and why. ``nice -n 10``: the machine is shared.

    .venv/bin/python tests/mutation/run.py [MODULE ...]     # default: every module below
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORK = ROOT / "build" / "mutation"
PYTHON = Path(sys.executable)

# The decision code, and the tests that cover each module without training a model (mutmut runs them once per mutant).
MODULES: dict[str, list[str]] = {
    "models/policy.py": ["tests/unit/test_policy.py", "tests/unit/test_evaluation.py"],
    "service/degrade.py": ["tests/unit/test_degrade.py", "tests/unit/test_batcher.py"],
    "service/batcher.py": [
        "tests/unit/test_batcher.py",
        "tests/unit/test_batcher_states.py",
        "tests/unit/test_batcher_faults.py",
        "tests/unit/test_batcher_health.py",
        "tests/unit/test_batcher_deferred.py",  # outputs settled after their batch (a Ray expert still computing)
        "tests/unit/test_spare_work.py",  # the spare lane (shadow audits)
    ],
    # The fuzzer (150 mutants of 21 files) runs for every mutant of the decoder: minutes each on 2 cores. The
    # tests of what each step decides (formats, limits, orientation, reduction, pixels) cover the same code.
    "service/decode.py": [
        "tests/unit/test_decode.py",
        "tests/unit/test_decode_refusals.py",
        "tests/unit/test_decode_plain_open.py",  # the plain PNG checked from its IHDR
        "tests/unit/test_decode_cost.py",  # Pillow's opens, the plain-PNG walks, copies, strips: counted
        "--deselect=tests/unit/test_decode.py::test_every_mutant_of_every_accepted_format_decodes_or_is_a_4xx",
    ],
    "service/admission.py": ["tests/unit/test_admission_unit.py", "tests/unit/test_admission_edges.py"],
    # The pipeline and its execution on the scripted model (no trained weights), its attribution path included.
    "export/execution.py": [
        "tests/unit/test_pipeline_decisions.py",
        "tests/unit/test_pipeline_answers.py",
        "tests/unit/test_pipeline_attribution.py",
        "tests/unit/test_batch_execution.py",
    ],
    "export/pipeline.py": [
        "tests/unit/test_pipeline_decisions.py",
        "tests/unit/test_pipeline_answers.py",
        "tests/unit/test_pipeline_attribution.py",
        "tests/unit/test_pipeline_specs.py",  # experts that bring their own preprocessing
        "tests/unit/test_attribution_batched.py",  # answers' probabilities and importance, batched
    ],
    # Importance (issue 21): the attribution of an answer to each modality, its Shapley arithmetic and its checks,
    # and the served path on a scripted model whose full path is a fusion head of known weights.
    "export/attribution.py": [
        "tests/unit/test_attribution_math.py",
        "tests/unit/test_pipeline_attribution.py",
        "tests/unit/test_attribution_batched.py",
    ],
    # Routing safety (issue 22): the guard's engage/release decisions and the validation figures it compares with.
    "service/guard.py": [
        "tests/unit/test_guard.py",
        "tests/unit/test_guard_report.py",
        "tests/unit/test_audit_inputs.py",
    ],
    "service/cusum.py": ["tests/unit/test_cusum.py", "tests/unit/test_guard.py"],
    "models/safety.py": ["tests/unit/test_safety.py", "tests/unit/test_safety_section.py"],
}
PYTEST_ARGS = ["-p", "no:randomly", "-p", "no:cacheprovider", "-q", "-x"]
# pytest-timeout's limit per test (a failure: the mutant is killed). A mutant that makes a test wait on a condition
# that never comes sleeps, spending no CPU time, so mutmut's own CPU-time limit never ends it: this one does.
TEST_TIMEOUT_S = 120
# The batcher's tests each take about a second; a hung mutant otherwise waits out their 15-60 s deadlines.
TEST_TIMEOUTS_S = {"service/batcher.py": 20}


def checkout_copy(target: Path) -> None:
    """Every file git tracks or would track (untracked, not ignored), copied to ``target``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    if target.exists():
        shutil.rmtree(target)
    for name in filter(None, listed):
        source = ROOT / name.decode()
        if source.is_file():
            destination = target / name.decode()
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination)


def configure(copy: Path, module: str, tests: list[str]) -> None:
    also_copy = sorted(p.name for p in copy.iterdir() if p.name not in ("mutants",))
    settings = {
        "source_paths": [module],
        "also_copy": also_copy,
        "pytest_add_cli_args": [*PYTEST_ARGS, "--timeout", str(TEST_TIMEOUTS_S.get(module, TEST_TIMEOUT_S))],
        "pytest_add_cli_args_test_selection": tests,
        "use_setproctitle": False,
    }
    lines = ["", "[tool.mutmut]"] + [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    with (copy / "pyproject.toml").open("a") as pyproject:
        pyproject.write("\n".join(lines) + "\n")


def results(copy: Path) -> dict[str, str]:
    """Mutant name -> status (killed, survived, timeout, ...), as ``mutmut results --all true`` lists them."""
    listed = subprocess.run(
        [str(PYTHON), "-m", "mutmut", "results", "--all", "true"],
        cwd=copy,
        capture_output=True,
        encoding="utf-8",
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},  # mutants of methods are named with "ǁ"
        check=True,
    ).stdout
    statuses = {}
    for line in listed.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if name:
            statuses[name] = status
    return statuses


def checkout_state(module: str) -> dict:
    """The commit measured, and whether the module or its tests differed from it (uncommitted changes): a reading is
    stale once ``git log <commit>..main -- <module>`` lists a change."""
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    paths = [module, *(test for test in MODULES[module] if not test.startswith("-"))]
    changed = subprocess.run([*git, "status", "--porcelain", "--", *paths], capture_output=True, text=True, check=True)
    return {"commit": commit, "uncommitted_changes": bool(changed.stdout.strip())}


def run(module: str, children: int) -> dict:
    copy = WORK / module.replace("/", "_").removesuffix(".py")
    state = checkout_state(module)
    checkout_copy(copy)
    configure(copy, module, MODULES[module])
    started = time.monotonic()
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"}
    command = ["nice", "-n", "10", str(PYTHON), "-m", "mutmut", "run", "--max-children", str(children)]
    with (copy / "mutmut.log").open("w") as log:  # mutmut draws progress on its output: kept out of ours
        subprocess.run(command, cwd=copy, env=environment, stdout=log, stderr=subprocess.STDOUT, check=False)
    statuses = results(copy)
    counts: dict[str, int] = {}
    for status in statuses.values():
        counts[status] = counts.get(status, 0) + 1
    scored = sum(counts.values()) - counts.get("not checked", 0) - counts.get("skipped", 0)
    killed = counts.get("killed", 0) + counts.get("timeout", 0) + counts.get("segfault", 0)
    return {
        "module": module,
        **state,
        "tests": MODULES[module],
        "mutants": sum(counts.values()),
        "counts": counts,
        "killed_ratio": round(killed / scored, 4) if scored else None,
        "survivors": sorted(name for name, status in statuses.items() if status == "survived"),
        "seconds": round(time.monotonic() - started, 1),
        "loadavg": os.getloadavg(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", default=list(MODULES), choices=list(MODULES), metavar="MODULE")
    parser.add_argument("--children", type=int, default=2, help="mutants tested at once (default: 2)")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    out = ROOT / "bench" / "results" / "mutation.json"
    for module in args.modules:
        result = run(module, args.children)
        recorded = json.loads(out.read_text()) if out.exists() else {}  # read now: another run may have written
        recorded[module] = result
        out.write_text(json.dumps(recorded, indent=1) + "\n")
        ratio = "no mutant scored" if result["killed_ratio"] is None else f"killed {result['killed_ratio']:.1%}"
        print(f"{module}: {result['counts']} {ratio} in {result['seconds']:.0f} s", flush=True)
        for name in result["survivors"]:
            print(f"  survived: {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
