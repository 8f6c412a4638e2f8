"""The compiled hot path (hatch_build.py, cds_service/native.py).

An extension runs only while it matches the source it was compiled from, and it answers every
request exactly as the source does.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import hatch_build
from cds_service import native

ROOT = Path(__file__).resolve().parent.parent
EXTENSION_SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def test_the_build_hook_and_the_guard_name_the_same_modules() -> None:
    assert hatch_build.COMPILED_MODULES == native.COMPILED_MODULES
    assert hatch_build.MANIFEST.name == native.MANIFEST_NAME
    assert hatch_build.PURE_PYTHON_ENV == native.PURE_PYTHON_ENV


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in package: the compiled modules' sources, no extension yet."""
    package = tmp_path / "cds_service"
    for module in native.COMPILED_MODULES:
        source = tmp_path.joinpath(*module.split(".")).with_suffix(".py")
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text(f"NAME = {module!r}\n")
    monkeypatch.setattr(native, "PACKAGE_DIR", package)
    return tmp_path


def _compile(tree: Path, modules: tuple[str, ...] = native.COMPILED_MODULES) -> None:
    """What the build hook leaves behind: an extension per module and the manifest."""
    for module in modules:
        tree.joinpath(*module.split(".")).with_name(
            module.split(".")[-1] + EXTENSION_SUFFIX
        ).write_bytes(b"\x7fELF")
    digests = {
        module: hashlib.sha256(
            tree.joinpath(*module.split(".")).with_suffix(".py").read_bytes()
        ).hexdigest()
        for module in native.COMPILED_MODULES
    }
    (tree / "cds_service" / native.MANIFEST_NAME).write_text(json.dumps(digests))


def test_without_extensions_the_sources_run(tree: Path) -> None:
    assert native.decide({}) == (False, "pure Python (not compiled at install)")


def test_extensions_that_match_their_sources_run(tree: Path) -> None:
    _compile(tree)
    use, why = native.decide({})
    assert use, why
    assert why.startswith("compiled (mypyc)")


def test_a_source_edited_after_the_build_runs_as_source(tree: Path) -> None:
    _compile(tree)
    edited = tree / "cds_service" / "context" / "builder.py"
    edited.write_text(edited.read_text() + "EDITED = True\n")
    use, why = native.decide({})
    assert not use
    assert "cds_service.context.builder changed since it was compiled" in why


@pytest.mark.parametrize("manifest", [None, "not json", "[]", "{}"])
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


def test_a_missing_extension_means_none_is_used(tree: Path) -> None:
    # The compiled modules call one another directly: all of them or none.
    _compile(tree, modules=native.COMPILED_MODULES[:1])
    use, why = native.decide({})
    assert not use
    assert native.COMPILED_MODULES[1] in why


@pytest.mark.parametrize("value", ["1", "true", " YES "])
def test_the_environment_can_ask_for_the_sources(tree: Path, value: str) -> None:
    _compile(tree)
    assert native.decide({native.PURE_PYTHON_ENV: value}) == (
        False,
        f"pure Python ({native.PURE_PYTHON_ENV} is set)",
    )
    assert native.decide({native.PURE_PYTHON_ENV: "0"})[0]


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
