"""Build hook: compile the per-resource hot path with mypyc (a C extension per module).

Reading the context is most of a typical call's own CPU (README, Performance); compiled, the
same code reads it in about 60 % of the time. The modules stay plain Python source: the
extension is a faster build of exactly that source, and ``cds_service.native`` uses it only
while it matches the source it was built from (else the source runs, as on a machine
without a C compiler). ``CDS_PURE_PYTHON=1`` at install time skips compiling altogether.

Editable installs (the README's) build the extensions next to the sources, as setuptools
does; a regular wheel carries them. Either way ``cds_service/native-manifest.json`` records
the SHA-256 of each source that was compiled.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

# Kept in step with cds_service.native.COMPILED_MODULES (a test checks they agree).
COMPILED_MODULES = ("cds_service.context.normalise", "cds_service.context.builder")
GROUP = "cds_service.native_group"  # the shared mypyc runtime lands inside the package
MANIFEST = Path("cds_service") / "native-manifest.json"
PURE_PYTHON_ENV = "CDS_PURE_PYTHON"


def _source(module: str) -> Path:
    return Path(*module.split(".")).with_suffix(".py")


def _extension_paths(root: Path) -> list[Path]:
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    paths = []
    for name in (*COMPILED_MODULES, f"{GROUP}__mypyc"):
        *package, module = name.split(".")
        paths.append(root.joinpath(*package, module + suffix))
    return paths


class MypycBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        root = Path(self.root)
        manifest = root / MANIFEST
        if os.environ.get(PURE_PYTHON_ENV, "").strip().lower() in {"1", "true", "yes"}:
            # Extensions an earlier build left in the tree stay, with the manifest that says
            # what they were built from (cds_service.native checks it).
            self.app.display_info(f"{PURE_PYTHON_ENV} is set: not compiling; pure Python")
            return
        if not self._compile(root):
            manifest.unlink(missing_ok=True)
            return
        manifest.write_text(
            json.dumps(
                {
                    module: hashlib.sha256((root / _source(module)).read_bytes()).hexdigest()
                    for module in COMPILED_MODULES
                },
                indent=2,
            )
            + "\n"
        )
        if version == "standard":
            # A regular wheel carries the extensions (editable ones find them in the tree).
            for path in _extension_paths(root):
                build_data["force_include"][str(path)] = str(path.relative_to(root))
            build_data["force_include"][str(manifest)] = str(MANIFEST)
            build_data["pure_python"] = False
            build_data["infer_tag"] = True

    def _compile(self, root: Path) -> bool:
        from mypyc.build import mypycify
        from setuptools import Distribution
        from setuptools.errors import BaseError, CCompilerError

        sources = [str(_source(module)) for module in COMPILED_MODULES]
        build_lib = root / "build" / "mypyc-lib"
        shutil.rmtree(build_lib, ignore_errors=True)
        with _working_directory(root):
            # Type errors stop the build (sys.exit inside mypycify): they are bugs to fix.
            extensions = mypycify(
                [*sources, "--ignore-missing-imports"], opt_level="3", group_name=GROUP
            )
            distribution = Distribution({"name": "magnesium-cds-native", "ext_modules": extensions})
            command = distribution.get_command_obj("build_ext")
            command.build_lib = str(build_lib)  # type: ignore[attr-defined]
            command.build_temp = str(root / "build" / "mypyc-temp")  # type: ignore[attr-defined]
            try:
                distribution.run_command("build_ext")
            except (CCompilerError, BaseError, OSError) as exc:
                # No C compiler or headers here: the same code runs as plain Python.
                self.app.display_warning(
                    f"mypyc: could not compile ({type(exc).__name__}: {exc}); pure Python"
                )
                for path in _extension_paths(root):
                    path.unlink(missing_ok=True)
                return False
        for path in _extension_paths(root):
            # Renamed into place, never rewritten: a running process keeps the file it mapped.
            os.replace(build_lib / path.relative_to(root), path)
        self.app.display_info(f"mypyc: compiled {', '.join(COMPILED_MODULES)}")
        return True


@contextlib.contextmanager
def _working_directory(path: Path) -> Any:
    previous = Path.cwd()
    os.chdir(path)
    sys.path.insert(0, str(path))
    try:
        yield
    finally:
        sys.path.remove(str(path))
        os.chdir(previous)
