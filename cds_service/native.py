"""Which build of the compiled hot path runs: the mypyc extensions, or their Python sources.

``hatch_build.py`` compiles ``COMPILED_MODULES`` at install time and records in
``native-manifest.json`` the SHA-256 of every file they were built from: they and every module
of ours they import (mypyc builds those modules' types into them). Python imports an
extension in preference to the ``.py`` beside it, so an extension built from older sources
would silently run old code (an editable install keeps its extensions in the work tree).
``install()``, run when ``cds_service`` is first imported, therefore checks every recorded
file and, unless all match, has the sources imported instead: a module edited since the
install runs as edited, only slower, until the next ``pip install``. The compiled modules
call one another directly, so they are used all together or not at all.

``CDS_PURE_PYTHON=1`` runs the sources even where the extensions match (to compare, or to
debug with Python tools).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Mapping, Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

from cds_service.settings import TRUE_WORDS  # standard library only: safe this early

# Kept in step with hatch_build (a test checks they agree).
COMPILED_MODULES = ("cds_service.context.normalise", "cds_service.context.builder")
GROUP_RUNTIME = "cds_service.native_group__mypyc"  # mypyc's shared runtime for the group
PURE_PYTHON_ENV = "CDS_PURE_PYTHON"
MANIFEST_NAME = "native-manifest.json"
PACKAGE_DIR = Path(__file__).resolve().parent

# What install() decided, for the start-up log, the benchmark and the tests.
status: str = "not checked"
compiled: bool = False


def source_path(module: str) -> Path:
    return PACKAGE_DIR.parent.joinpath(*module.split(".")).with_suffix(".py")


def extension_path(module: str) -> Path | None:
    *package, name = module.split(".")
    folder = PACKAGE_DIR.parent.joinpath(*package)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = folder / (name + suffix)
        if candidate.is_file():
            return candidate
    return None


def decide(environ: Mapping[str, str] = os.environ) -> tuple[bool, str]:
    """``(use the extensions, why)``."""
    wanted = (*COMPILED_MODULES, GROUP_RUNTIME)
    built = [module for module in wanted if extension_path(module) is not None]
    if not built:
        return False, "pure Python (not compiled at install)"
    if environ.get(PURE_PYTHON_ENV, "").strip().lower() in TRUE_WORDS:
        return False, f"pure Python ({PURE_PYTHON_ENV} is set)"
    if len(built) != len(wanted):
        missing = [module for module in wanted if module not in built]
        return False, f"pure Python (no extension for {', '.join(missing)})"
    try:
        recorded = json.loads((PACKAGE_DIR / MANIFEST_NAME).read_text())
        sources = recorded["sources"]
        usable = recorded["compiled"] == list(COMPILED_MODULES) and isinstance(sources, dict)
    except (OSError, ValueError, TypeError, KeyError):
        usable = False
    if not usable:
        return False, f"pure Python ({MANIFEST_NAME} missing or unreadable)"
    root = PACKAGE_DIR.parent
    for module in COMPILED_MODULES:
        if source_path(module).relative_to(root).as_posix() not in sources:
            return False, f"pure Python ({MANIFEST_NAME} does not cover {module})"
    # The compiled modules and everything of ours they import: mypyc built in their types.
    for name, digest in sources.items():
        try:
            current = hashlib.sha256((root / name).read_bytes()).hexdigest()
        except OSError:
            current = None
        if current != digest:
            return False, (
                f"pure Python ({name} changed since the context layer was compiled; "
                "pip install again to compile it)"
            )
    return True, "compiled (mypyc): " + ", ".join(COMPILED_MODULES)


class _SourcesFirst(MetaPathFinder):
    """Imports the listed modules from their ``.py`` files, never from an extension."""

    def __init__(self, modules: Sequence[str]) -> None:
        self.modules = frozenset(modules)

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None = None,
        target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        if fullname not in self.modules:
            return None
        return importlib.util.spec_from_file_location(fullname, source_path(fullname))


def install() -> None:
    global status, compiled
    if any(isinstance(finder, _SourcesFirst) for finder in sys.meta_path):
        return
    compiled, status = decide()
    if not compiled:
        sys.meta_path.insert(0, _SourcesFirst(COMPILED_MODULES))
