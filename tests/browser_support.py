"""Headless Chromium for the explanation-page tests: Debian's package, driven by Playwright.

``scripts/install-test-browser.sh`` installs the browser (idempotent, as
``scripts/start-test-postgres.sh`` does PostgreSQL). Without it the tests skip, saying why,
except in CI (``CI=true``), where a missing browser fails them: CI must run them.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
INSTALL_SCRIPT = ROOT / "scripts" / "install-test-browser.sh"
# What the project's brief asks for: no sandbox (containers), nothing phoning home.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Screenshots and PDFs land here (git-ignored); CDS_TEST_ARTIFACTS moves them.
ARTIFACTS = Path(os.environ.get("CDS_TEST_ARTIFACTS", ROOT / "test-artifacts"))


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"browser tests must run in CI: {reason}")
    pytest.skip(f"no headless browser: {reason} (run bash scripts/install-test-browser.sh)")


def chromium_path() -> str:
    """The installed Chromium (installing it when root may); skips or fails as above."""
    try:
        done = subprocess.run(
            ["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=900
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        _unavailable(f"{INSTALL_SCRIPT.name} could not run: {exc}")
    if done.returncode != 0:
        _unavailable(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed")
    return done.stdout.strip()


@contextmanager
def chromium() -> Iterator[Any]:
    """A launched Playwright Browser on Debian's Chromium."""
    executable = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is missing (pip install -e '.[test]')")
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
