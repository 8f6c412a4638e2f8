"""Where the bundled schemas and fixtures live, in a checkout and in an installed wheel.

The repository keeps ``schemas/`` and ``fixtures/`` at its top level (they are reviewed as
contracts, not code); the wheel carries copies under ``cds_service/_bundled/``.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

_PACKAGE_DIR = Path(__file__).resolve().parent


@cache
def bundled_dir(name: str) -> Path:
    """``bundled_dir("schemas")`` or ``bundled_dir("fixtures")``."""
    for candidate in (_PACKAGE_DIR / "_bundled" / name, _PACKAGE_DIR.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"bundled directory {name!r} not found next to {_PACKAGE_DIR}")


@cache
def load_schema(file_name: str) -> dict[str, Any]:
    """A JSON Schema from ``schemas/`` (parsed once per process)."""
    with (bundled_dir("schemas") / file_name).open(encoding="utf-8") as handle:
        return json.load(handle)
