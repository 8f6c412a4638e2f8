"""`ruff` and `mypy` are part of the test suite, so a lint or type error fails CI like any
other test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_is_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean() -> None:
    # The package and the benchmark, with pyproject.toml's [tool.mypy]. mypyc type-checks
    # the compiled modules at install time too, but only those and what they import.
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "cds_service", "bench"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
