"""Build hook: compile the per-resource hot path with mypyc (a C extension per module).

Reading the context is most of a typical call's own CPU (README, Performance); compiled, the
same code reads it in about 60 % of the time. The modules stay plain Python source: the
extension is a faster build of exactly that source, and ``cds_service.native`` uses it only
while it matches the sources it was built from (else the sources run, as on a machine
without a C compiler). ``CDS_PURE_PYTHON=1`` at install time skips compiling.

Editable installs (the README's) get the extensions next to the sources, as setuptools does;
a regular wheel carries them. ``cds_service/native-manifest.json`` records the SHA-256 of
every file the extensions were built from: the compiled modules and every ``cds_service``
module they import, directly or not, since mypyc builds those modules' types into them. With
the toolchain (mypy, setuptools and Python versions, C compiler settings, this file's SHA-256)
and each extension's SHA-256 it also tells an editable reinstall that the extensions in the
tree are still what compiling would give, so they are not compiled again.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

# Kept in step with cds_service.native (a test checks they agree).
COMPILED_MODULES = ("cds_service.context.normalise", "cds_service.context.builder")
GROUP = "cds_service.native_group"  # the shared mypyc runtime lands inside the package
MANIFEST = Path("cds_service") / "native-manifest.json"
PURE_PYTHON_ENV = "CDS_PURE_PYTHON"
PACKAGE = "cds_service"
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})  # as cds_service.settings reads booleans


def _extension_paths(root: Path) -> list[Path]:
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    paths = []
    for name in (*COMPILED_MODULES, f"{GROUP}__mypyc"):
        *package, module = name.split(".")
        paths.append(root.joinpath(*package, module + suffix))
    return paths


def _module_file(root: Path, module: str) -> Path | None:
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None  # a name imported from a module, not a module


def _imported(path: Path, module: str) -> Iterator[str]:
    """The first-party names a module imports (absolute or relative), and their packages."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_bytes())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        for name in names:
            parts = name.split(".")
            if parts[0] == PACKAGE:
                yield from (".".join(parts[:end]) for end in range(1, len(parts) + 1))


def built_from(root: Path) -> list[Path]:
    """Every file whose content the extensions depend on: what mypy reads of ours."""
    seen: dict[str, Path] = {}
    todo = list(COMPILED_MODULES)
    while todo:
        module = todo.pop()
        if module in seen or (path := _module_file(root, module)) is None:
            continue
        seen[module] = path
        todo.extend(_imported(path, module))
    return sorted(seen.values())


def _digests(root: Path, files: list[Path]) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in files
    }


# The environment variables through which setuptools changes how the C code is compiled.
COMPILER_ENVIRONMENT = ("CC", "CFLAGS", "CPPFLAGS", "LDFLAGS", "LDSHARED")


def _toolchain() -> dict[str, Any]:
    """What decides the extensions besides the sources: mypyc's version, how this hook calls
    it (this file; mypy reads no configuration file), the C compiler's settings, and the
    interpreter (its version and extension ABI) they were built for."""
    versions = {}
    for name in ("mypy", "setuptools"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:  # then nothing compiles either
            versions[name] = ""
    return {
        **versions,
        "build_hook": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        "compiler_environment": {name: os.environ.get(name) for name in COMPILER_ENVIRONMENT},
        "python": sys.version,
        "extension_suffix": sysconfig.get_config_var("EXT_SUFFIX") or "",
    }


def _manifest(root: Path, sources: dict[str, str]) -> dict[str, Any]:
    return {
        "compiled": list(COMPILED_MODULES),
        "sources": sources,
        "toolchain": _toolchain(),
        "extensions": _digests(root, [p for p in _extension_paths(root) if p.is_file()]),
    }


def _up_to_date(root: Path, manifest: Path, sources: dict[str, str]) -> bool:
    """True when the tree's extensions are what compiling ``sources`` now would give: the
    manifest names these modules, sources and toolchain, and every extension it records is
    still there, byte for byte."""
    try:
        recorded = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    if not all(path.is_file() for path in _extension_paths(root)):
        return False
    return isinstance(recorded, dict) and recorded == _manifest(root, sources)


class MypycBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        root = Path(self.root)
        manifest = root / MANIFEST
        if os.environ.get(PURE_PYTHON_ENV, "").strip().lower() in TRUE_WORDS:
            # Extensions an earlier build left in the tree stay, with the manifest that says
            # what they were built from: cds_service.native runs them only while that holds.
            self.app.display_info(f"{PURE_PYTHON_ENV} is set: not compiling; pure Python")
            return
        # Hashed before compiling, checked after: a file saved meanwhile (an editor, a
        # checkout) must not be vouched for by extensions built from its older content.
        sources = _digests(root, built_from(root))
        if version == "editable" and _up_to_date(root, manifest, sources):
            # The README's test command reinstalls before every run: a minute saved each time.
            # A wheel, which may be shipped, is always compiled afresh.
            self.app.display_info(
                "mypyc: the extensions in the tree were built from these sources with this "
                "toolchain; not recompiling"
            )
        else:
            # Until the new set is complete, no manifest vouches for the extensions: a process
            # starting meanwhile must not run a mix of old and new ones.
            manifest.unlink(missing_ok=True)
            if not self._compile(root):
                return
            if _digests(root, built_from(root)) != sources:
                self.app.display_warning(
                    "mypyc: sources changed while compiling; the extensions will not be used "
                    "until the next install"
                )
                return
            manifest.write_text(json.dumps(_manifest(root, sources), indent=2) + "\n")
        if version == "standard":
            # A regular wheel carries the extensions (editable ones find them in the tree).
            for path in _extension_paths(root):
                build_data["force_include"][str(path)] = path.relative_to(root).as_posix()
            build_data["force_include"][str(manifest)] = MANIFEST.as_posix()
            build_data["pure_python"] = False
            build_data["infer_tag"] = True

    def _compile(self, root: Path) -> bool:
        try:
            from mypyc.build import mypycify
            from setuptools import Distribution
            from setuptools.errors import BaseError, CCompilerError
        except ImportError as exc:  # a build without isolation, in an environment without them
            self.app.display_warning(f"mypyc: {exc}; pure Python")
            return False

        modules = [
            _module_file(root, module).relative_to(root).as_posix()  # type: ignore[union-attr]
            for module in COMPILED_MODULES
        ]
        (root / "build").mkdir(exist_ok=True)
        # Its own directory per build: two builds of one tree must not share C files.
        scratch = Path(tempfile.mkdtemp(prefix="mypyc-", dir=root / "build"))
        try:
            with _working_directory(root):
                # Type errors stop the build (sys.exit in mypycify): they are bugs to fix.
                extensions = mypycify(
                    # No configuration file (mypy.ini, setup.cfg, the user's): the manifest's
                    # toolchain is all that decides how the sources compile.
                    [*modules, "--ignore-missing-imports", "--config-file="],
                    opt_level="3",
                    group_name=GROUP,
                    target_dir=str(scratch / "c"),
                )
                distribution = Distribution(
                    {"name": "magnesium-cds-native", "ext_modules": extensions}
                )
                command = distribution.get_command_obj("build_ext")
                command.build_lib = str(scratch / "lib")  # type: ignore[attr-defined]
                command.build_temp = str(scratch / "temp")  # type: ignore[attr-defined]
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
                # Renamed into place, never rewritten: a running process keeps the file it
                # mapped (same file system: scratch is inside the tree).
                os.replace(scratch / "lib" / path.relative_to(root), path)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        self.app.display_info(f"mypyc: compiled {', '.join(COMPILED_MODULES)}")
        return True


@contextlib.contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    previous = Path.cwd()
    os.chdir(path)
    sys.path.insert(0, str(path))
    try:
        yield
    finally:
        sys.path.remove(str(path))
        os.chdir(previous)
