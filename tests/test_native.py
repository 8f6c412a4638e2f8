"""The compiled hot path (hatch_build.py, cds_service/native.py).

An extension runs only while it matches the source it was compiled from, and it answers every
request exactly as the source does.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import hatch_build
from cds_service import native, settings

ROOT = Path(__file__).resolve().parent.parent
EXTENSION_SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def test_the_build_hook_and_the_guard_name_the_same_modules() -> None:
    assert hatch_build.COMPILED_MODULES == native.COMPILED_MODULES
    assert f"{hatch_build.GROUP}__mypyc" == native.GROUP_RUNTIME
    assert hatch_build.MANIFEST.name == native.MANIFEST_NAME
    assert hatch_build.PURE_PYTHON_ENV == native.PURE_PYTHON_ENV
    assert hatch_build.TRUE_WORDS == settings.TRUE_WORDS


def test_the_manifest_covers_every_module_of_ours_the_compiled_ones_import() -> None:
    files = {path.relative_to(ROOT).as_posix() for path in hatch_build.built_from(ROOT)}
    # mypyc builds the types of what they import into the extensions: an edit there counts.
    assert {
        "cds_service/__init__.py",
        "cds_service/native.py",
        "cds_service/settings.py",
        "cds_service/context/__init__.py",
        "cds_service/context/builder.py",
        "cds_service/context/normalise.py",
        "cds_service/context/model.py",
        "cds_service/context/fhir_client.py",
        "cds_service/context/prefetch.py",
    } <= files
    assert all(name.startswith("cds_service/") and name.endswith(".py") for name in files)
    assert "cds_service/rules/engine.py" not in files  # not imported by them


DEPENDENCY = "cds_service/context/model.py"


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in package: the compiled modules' sources and a dependency, no extension yet."""
    for module in native.COMPILED_MODULES:
        source = tmp_path.joinpath(*module.split(".")).with_suffix(".py")
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text(f"NAME = {module!r}\n")
    (tmp_path / DEPENDENCY).write_text("WITHDRAWN = frozenset()\n")
    monkeypatch.setattr(native, "PACKAGE_DIR", tmp_path / "cds_service")
    return tmp_path


def _extension(tree: Path, module: str) -> Path:
    *package, name = module.split(".")
    return tree.joinpath(*package, name + EXTENSION_SUFFIX)


def _compile(tree: Path, modules: tuple[str, ...] = native.COMPILED_MODULES) -> None:
    """What the build hook leaves behind: the extensions, the group runtime, the manifest."""
    for module in (*modules, native.GROUP_RUNTIME):
        _extension(tree, module).write_bytes(b"\x7fELF")
    files = [tree.joinpath(*m.split(".")).with_suffix(".py") for m in native.COMPILED_MODULES]
    files.append(tree / DEPENDENCY)
    sources = {
        path.relative_to(tree).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in files
    }
    manifest = {"compiled": list(native.COMPILED_MODULES), "sources": sources}
    (tree / "cds_service" / native.MANIFEST_NAME).write_text(json.dumps(manifest))


def test_without_extensions_the_sources_run(tree: Path) -> None:
    assert native.decide({}) == (False, "pure Python (not compiled at install)")


def test_extensions_that_match_their_sources_run(tree: Path) -> None:
    _compile(tree)
    use, why = native.decide({})
    assert use, why
    assert why.startswith("compiled (mypyc)")


@pytest.mark.parametrize("edited", ["cds_service/context/builder.py", DEPENDENCY])
def test_a_file_edited_after_the_build_makes_the_sources_run(tree: Path, edited: str) -> None:
    # A dependency counts: e.g. a frozenset turned tuple there fails a compiled type check.
    _compile(tree)
    path = tree / edited
    path.write_text(path.read_text() + "EDITED = True\n")
    use, why = native.decide({})
    assert not use
    assert f"{edited} changed since the context layer was compiled" in why


def test_a_file_removed_after_the_build_makes_the_sources_run(tree: Path) -> None:
    _compile(tree)
    (tree / DEPENDENCY).unlink()
    assert not native.decide({})[0]


@pytest.mark.parametrize(
    "manifest",
    [
        None,
        "not json",
        "[]",
        "{}",
        '{"compiled": [], "sources": {}}',
        json.dumps({"compiled": list(native.COMPILED_MODULES), "sources": []}),
        # Does not cover a compiled module: nothing vouches for it.
        json.dumps({"compiled": list(native.COMPILED_MODULES), "sources": {}}),
    ],
)
def test_without_a_usable_manifest_the_sources_run(tree: Path, manifest: str | None) -> None:
    _compile(tree)
    path = tree / "cds_service" / native.MANIFEST_NAME
    if manifest is None:
        path.unlink()
    else:
        path.write_text(manifest)
    use, why = native.decide({})
    assert not use
    assert why.startswith("pure Python (")


@pytest.mark.parametrize("missing", [native.COMPILED_MODULES[1], native.GROUP_RUNTIME])
def test_a_missing_extension_means_none_is_used(tree: Path, missing: str) -> None:
    # The compiled modules call one another directly, through the group runtime: all or none.
    _compile(tree)
    _extension(tree, missing).unlink()
    use, why = native.decide({})
    assert not use
    assert f"no extension for {missing}" in why


@pytest.mark.parametrize("value", ["1", "true", " YES ", "on"])
def test_the_environment_can_ask_for_the_sources(tree: Path, value: str) -> None:
    _compile(tree)
    assert native.decide({native.PURE_PYTHON_ENV: value}) == (
        False,
        f"pure Python ({native.PURE_PYTHON_ENV} is set)",
    )
    assert native.decide({native.PURE_PYTHON_ENV: "0"})[0]


class _Messages:
    """hatchling's Application, as far as the hook uses it."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def display_info(self, message: str) -> None:
        pass

    def display_warning(self, message: str) -> None:
        self.warnings.append(message)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the package's sources (no extension, no manifest) to run the hook in."""
    ignore = shutil.ignore_patterns("__pycache__", "*.so", native.MANIFEST_NAME)
    shutil.copytree(ROOT / "cds_service", tmp_path / "cds_service", ignore=ignore)
    return tmp_path


def _run_hook(
    project: Path, monkeypatch: pytest.MonkeyPatch, compile_step: object, version: str
) -> tuple[dict[str, object], _Messages]:
    """The hook's bookkeeping around a stand-in for the (minute-long) compile."""
    messages = _Messages()
    hook = hatch_build.MypycBuildHook(
        str(project), {}, None, None, str(project / "dist"), "wheel", app=messages
    )
    monkeypatch.setattr(hook, "_compile", compile_step)
    build_data: dict[str, object] = {"force_include": {}}
    hook.initialize(version, build_data)
    return build_data, messages


def test_the_hook_records_what_it_compiled(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build_data, messages = _run_hook(project, monkeypatch, lambda root: True, "standard")
    manifest = json.loads((project / "cds_service" / native.MANIFEST_NAME).read_text())
    assert manifest["compiled"] == list(native.COMPILED_MODULES)
    model = (project / "cds_service/context/model.py").read_bytes()
    assert manifest["sources"]["cds_service/context/model.py"] == hashlib.sha256(model).hexdigest()
    carried = set(build_data["force_include"].values())  # type: ignore[attr-defined]
    assert f"cds_service/{native.MANIFEST_NAME}" in carried
    assert native.GROUP_RUNTIME.replace(".", "/") + EXTENSION_SUFFIX in carried
    assert build_data["pure_python"] is False
    assert not messages.warnings


def test_a_file_saved_while_compiling_leaves_no_manifest(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The extensions hold the content from before the save: nothing may vouch for them.
    def compile_while_an_editor_saves(root: Path) -> bool:
        model = root / "cds_service/context/model.py"
        model.write_text(model.read_text() + "SAVED = True\n")
        return True

    saving = compile_while_an_editor_saves
    build_data, messages = _run_hook(project, monkeypatch, saving, "editable")
    assert not (project / "cds_service" / native.MANIFEST_NAME).exists()
    assert messages.warnings and "changed while compiling" in messages.warnings[0]
    assert build_data == {"force_include": {}}


def test_a_failed_compile_removes_the_old_manifest(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = project / "cds_service" / native.MANIFEST_NAME
    manifest.write_text('{"compiled": [], "sources": {}}')
    build_data, _ = _run_hook(project, monkeypatch, lambda root: False, "standard")
    assert not manifest.exists()
    assert build_data == {"force_include": {}}  # a pure-Python wheel


def test_compiling_can_be_skipped_at_install(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(native.PURE_PYTHON_ENV, "on")
    manifest = project / "cds_service" / native.MANIFEST_NAME
    manifest.write_text("{}")  # an earlier build's: left for the guard to judge

    def must_not_compile(root: Path) -> bool:
        raise AssertionError("compiled although CDS_PURE_PYTHON is set")

    build_data, _ = _run_hook(project, monkeypatch, must_not_compile, "editable")
    assert manifest.read_text() == "{}"
    assert build_data == {"force_include": {}}


def _compile_into_tree(root: Path) -> bool:
    """Stands in for mypyc: puts an extension file (made-up bytes) where each one goes."""
    for path in hatch_build._extension_paths(root):
        path.write_bytes(b"compiled from " + path.name.encode())
    return True


def _counting_compile() -> tuple[list[Path], Callable[[Path], bool]]:
    """A stand-in compile that records each tree it compiled."""
    compiled: list[Path] = []

    def compile_step(root: Path) -> bool:
        compiled.append(root)
        return _compile_into_tree(root)

    return compiled, compile_step


def _must_not_compile(root: Path) -> bool:
    raise AssertionError("compiled although the extensions in the tree were up to date")


def test_extensions_built_from_the_same_sources_are_not_compiled_again(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The README's test command reinstalls before every run: a minute saved every time.
    _run_hook(project, monkeypatch, _compile_into_tree, "editable")
    manifest = project / "cds_service" / native.MANIFEST_NAME
    first = manifest.read_text()
    assert json.loads(first)["extensions"].keys() == {
        path.relative_to(project).as_posix() for path in hatch_build._extension_paths(project)
    }
    build_data, messages = _run_hook(project, monkeypatch, _must_not_compile, "editable")
    assert manifest.read_text() == first and not messages.warnings
    assert build_data == {"force_include": {}}


def test_a_wheel_is_always_compiled_afresh(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A wheel may be shipped: nothing the tree holds is vouched for without compiling.
    _run_hook(project, monkeypatch, _compile_into_tree, "editable")
    compiled, compile_again = _counting_compile()
    build_data, messages = _run_hook(project, monkeypatch, compile_again, "standard")
    assert compiled == [project] and not messages.warnings
    carried = set(build_data["force_include"].values())  # type: ignore[attr-defined]
    assert carried == {
        f"cds_service/{native.MANIFEST_NAME}",
        *(path.relative_to(project).as_posix() for path in hatch_build._extension_paths(project)),
    }
    assert build_data["pure_python"] is False and build_data["infer_tag"] is True


def test_no_manifest_vouches_for_the_extensions_while_they_are_replaced(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Swapped in one by one: a process starting meanwhile must run the sources, not a mix.
    _run_hook(project, monkeypatch, _compile_into_tree, "editable")
    _recorded("mypy", "0.0.1")(project)
    manifest = project / "cds_service" / native.MANIFEST_NAME

    def compile_checking(root: Path) -> bool:
        assert not manifest.exists()
        return _compile_into_tree(root)

    _run_hook(project, monkeypatch, compile_checking, "editable")
    assert json.loads(manifest.read_text())["toolchain"] == hatch_build._toolchain()


def test_other_compiler_settings_compile_again(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _run_hook(project, monkeypatch, _compile_into_tree, "editable")
    monkeypatch.setenv("CFLAGS", "-O0 -g")
    compiled, compile_again = _counting_compile()
    _run_hook(project, monkeypatch, compile_again, "editable")
    assert compiled == [project]
    recorded = json.loads((project / "cds_service" / native.MANIFEST_NAME).read_text())
    assert recorded["toolchain"]["compiler_environment"]["CFLAGS"] == "-O0 -g"


def _edit_a_source(project: Path) -> None:
    model = project / "cds_service/context/model.py"  # imported by the compiled modules
    model.write_text(model.read_text() + "EDITED = True\n")


def _edit_an_extension(project: Path) -> None:
    hatch_build._extension_paths(project)[0].write_bytes(b"something else")


def _remove_the_runtime(project: Path) -> None:
    hatch_build._extension_paths(project)[-1].unlink()


def _recorded(field: str, value: str) -> Callable[[Path], None]:
    """A change: the manifest says the extensions were built with another ``field``."""

    def change(project: Path) -> None:
        manifest = project / "cds_service" / native.MANIFEST_NAME
        recorded = json.loads(manifest.read_text())
        recorded["toolchain"][field] = value
        manifest.write_text(json.dumps(recorded))

    change.__name__ = f"another_{field}"
    return change


def _an_older_manifest(project: Path) -> None:
    # A manifest from before the toolchain was recorded: nothing says what built them.
    manifest = project / "cds_service" / native.MANIFEST_NAME
    recorded = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({k: recorded[k] for k in ("compiled", "sources")}))


@pytest.mark.parametrize(
    "change",
    [
        _edit_a_source,
        _edit_an_extension,
        _remove_the_runtime,
        _recorded("mypy", "0.0.1"),
        # e.g. another opt_level: the same sources compile differently.
        _recorded("build_hook", "0" * 64),
        _recorded("python", "3.11.0 (another build)"),
        _an_older_manifest,
    ],
)
def test_anything_changed_since_the_build_compiles_again(
    project: Path, monkeypatch: pytest.MonkeyPatch, change: Callable[[Path], None]
) -> None:
    _run_hook(project, monkeypatch, _compile_into_tree, "editable")
    change(project)
    compiled, compile_again = _counting_compile()
    _run_hook(project, monkeypatch, compile_again, "editable")
    assert compiled == [project]
    recorded = json.loads((project / "cds_service" / native.MANIFEST_NAME).read_text())
    assert recorded["toolchain"] == hatch_build._toolchain()


# Every request fixture and the benchmark's workloads, through the service in a fresh
# process; prints which files the compiled modules came from and every response.
_ANSWER_ALL = r"""
import json, sys, tempfile
from pathlib import Path
from cds_service import native
from cds_service.app import create_app
from cds_service.context import builder, normalise
from cds_service.protocol.services import SERVICES
from cds_service.settings import Settings
from bench.workloads import large, typical

database = Path(tempfile.mkdtemp()) / "native.sqlite3"
app = create_app(Settings(auth="off", database_url=f"sqlite:///{database}", fhir_read_timeout=1))
client = app.test_client()
files = sorted(Path("fixtures/requests").glob("*.json"))
bodies = {p.name: json.loads(p.read_text()) for p in files}
bodies.update({w.name: w.request for w in (typical(), large())})
answers = {}
for name, body in bodies.items():
    service = next((s for s in SERVICES if s.hook == body.get("hook")), SERVICES[0])
    response = client.post(f"/cds-services/{service.id}", json=body)
    answers[name] = [response.status_code, response.get_json()]
print(json.dumps({
    "compiled": native.compiled,
    "files": [Path(builder.__file__).name, Path(normalise.__file__).name],
    "answers": answers,
}, sort_keys=True))
"""


def _answer_all(pure: bool) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDS_")}
    if pure:
        env[native.PURE_PYTHON_ENV] = "1"
    done = subprocess.run(
        [sys.executable, "-c", _ANSWER_ALL],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.skipif(not native.compiled, reason=f"this install runs the sources: {native.status}")
def test_the_compiled_modules_answer_exactly_as_their_sources() -> None:
    compiled = _answer_all(pure=False)
    source = _answer_all(pure=True)
    assert compiled["compiled"] is True
    assert all(name.endswith(EXTENSION_SUFFIX) for name in compiled["files"])  # type: ignore[attr-defined]
    assert source["compiled"] is False
    assert source["files"] == ["builder.py", "normalise.py"]
    assert len(source["answers"]) > 40  # type: ignore[arg-type]
    assert compiled["answers"] == source["answers"]


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="only CI is sure to install afresh")
def test_a_fresh_install_runs_compiled() -> None:
    # CI's machines have a C compiler (as every machine of ours does): a build that fell back
    # to pure Python there is a broken build, not a slow one.
    assert native.compiled, native.status
