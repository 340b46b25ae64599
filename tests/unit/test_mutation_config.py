"""``make mutation`` names real modules and real tests: a file renamed or moved fails here, not silently there."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_runner():
    spec = importlib.util.spec_from_file_location("mutation_run", ROOT / "tests" / "mutation" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_module_under_mutation_and_every_test_it_runs_exist():
    runner = load_runner()
    assert runner.MODULES
    for module, tests in runner.MODULES.items():
        assert (ROOT / module).is_file(), module
        assert tests, module
        for test in tests:
            path = test.removeprefix("--deselect=").split("::")[0]
            assert (ROOT / path).is_file(), (module, test)


def test_every_survivor_listed_as_equivalent_names_a_module_under_mutation():
    runner = load_runner()
    listed = (ROOT / "tests" / "mutation" / "EQUIVALENT.md").read_text()
    for line in listed.splitlines():
        if line.startswith("| `") and "__mutmut_" in line:
            name = line.split("`")[1]  # models.policy.x_calibrate__mutmut_7, service.degrade.xǁDegradeControllerǁ...
            parts = name.split(".")
            first = next(i for i, part in enumerate(parts) if part.startswith(("x_", "xǁ")))
            assert "/".join(parts[:first]) + ".py" in runner.MODULES, name


def test_every_survivor_of_the_recorded_readings_is_reviewed():
    """Each mutant that survived a module's last reading (bench/results/mutation.json) is named in EQUIVALENT.md, with
    why it is equivalent, or why it is left: a survivor nobody reviewed is a missing test."""
    import json

    recorded = json.loads((ROOT / "bench" / "results" / "mutation.json").read_text())
    listed = (ROOT / "tests" / "mutation" / "EQUIVALENT.md").read_text()
    runner = load_runner()
    for module, reading in recorded.items():
        assert module in runner.MODULES, module
        for name in reading["survivors"]:
            assert f"`{name}`" in listed, (module, name)
