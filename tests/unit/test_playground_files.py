"""The playground's static files: consistent with each other, and shipped inside the package."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STATIC = REPO / "service" / "static"


def test_every_element_the_scripts_look_up_exists_in_the_page():
    page = (STATIC / "index.html").read_text()
    ids_in_page = set(re.findall(r'\bid="([^"]+)"', page))
    looked_up = {name for path in STATIC.glob("*.js") for name in re.findall(r'\$\("([\w-]+)"\)', path.read_text())}

    assert looked_up, "the scripts look elements up with $(id)"
    assert looked_up - ids_in_page == set()


def test_pyproject_ships_every_static_file_as_package_data():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the dev extra installs tomli, the same parser
        import tomli as tomllib
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["service"]
    files = [p.relative_to(REPO / "service").as_posix() for p in STATIC.iterdir()]

    assert files
    for file in files:
        assert any(fnmatch.fnmatch(file, pattern) for pattern in patterns), file


@pytest.mark.slow
def test_a_built_wheel_carries_the_static_files(tmp_path):
    source = tmp_path / "src"  # a copy: building in the work tree would leave build/ and *.egg-info there
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in ("models", "export", "service"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    # No build isolation: the venv's setuptools builds it, nothing is downloaded.
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*pip_wheel, "-w", str(tmp_path), str(source)], check=True, capture_output=True, timeout=240)
    [wheel] = tmp_path.glob("dynfuse-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"service/static/{p.name}" for p in STATIC.iterdir()} <= names
