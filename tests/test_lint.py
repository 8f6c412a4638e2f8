"""`ruff` and `mypy` are part of the test suite, so a lint or type error fails CI like any
other test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tool_output_if_it_fails(*command: str, timeout: float) -> str | None:
    """Runs ``python -m <command>`` in the checkout; its output if it exits non-zero."""
    result = subprocess.run(
        [sys.executable, "-m", *command],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )
    return None if result.returncode == 0 else result.stdout + result.stderr


def test_ruff_is_clean() -> None:
    failure = _tool_output_if_it_fails("ruff", "check", "--no-cache", str(ROOT), timeout=120)
    assert failure is None, failure


def test_mypy_is_clean() -> None:
    # The package and the benchmark, with pyproject.toml's [tool.mypy].
    failure = _tool_output_if_it_fails("mypy", "cds_service", "bench", timeout=600)
    assert failure is None, failure
