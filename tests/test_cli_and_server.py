"""The commands a user and the Docker image run: real processes, real sockets."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import uuid
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from processes import CDS, Served, demo_env, free_port, run_cds, wait_until_up
from test_hostile_input import ciprofloxacin_with, update_offered

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MG_REQUEST = ROOT / "fixtures" / "requests" / "mg-pyridostigmine.order-select.json"
MG_NO_PREFETCH = ROOT / "fixtures" / "requests" / "mg-pyridostigmine.order-select.noprefetch.json"


@pytest.fixture(scope="module")
def fixture_server_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("fixture-server") / "fixture-server.log"
    command = ["fixture-server", "--host", "127.0.0.1", "--port", str(port)]
    with run_cds(command, {}, log, port=port, probe="/metadata") as served:
        yield served.url


@pytest.fixture(scope="module")
def gunicorn_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    port = free_port()
    directory = tmp_path_factory.mktemp("gunicorn")
    env = {
        "CDS_AUTH": "off",
        "CDS_WORKERS": "2",
        "CDS_THREADS": "2",
        "CDS_DATABASE_URL": f"sqlite:///{directory / 'cds.sqlite3'}",
    }
    command = ["serve", "--host", "127.0.0.1", "--port", str(port)]
    with run_cds(command, env, directory / "serve.log", port=port, workers=2) as served:
        yield served


def test_serve_runs_gunicorn_with_the_configured_workers(gunicorn_service: Served) -> None:
    assert len(gunicorn_service.workers()) == 2  # CDS_WORKERS=2 workers under the master
    url = gunicorn_service.url
    assert requests.get(f"{url}/readyz", timeout=5).json()["status"] == "ready"
    services = requests.get(f"{url}/cds-services", timeout=5).json()["services"]
    assert len(services) == 5


def test_gunicorn_answers_the_myasthenia_request_with_its_card(
    gunicorn_service: Served,
) -> None:
    url = gunicorn_service.url
    body = json.loads(MG_REQUEST.read_text())
    response = requests.post(f"{url}/cds-services/magnesium-order-select", json=body, timeout=15)
    assert response.status_code == 200
    [card] = response.json()["cards"]
    assert card["indicator"] == "warning"
    assert card["suggestions"][0]["actions"][0]["type"] == "delete"


def test_fixture_server_command_serves_fhir(fixture_server_process: str) -> None:
    metadata = requests.get(f"{fixture_server_process}/metadata", timeout=5).json()
    assert metadata["resourceType"] == "CapabilityStatement"
    patient = requests.get(f"{fixture_server_process}/Patient/mg-pyridostigmine", timeout=5).json()
    assert patient["id"] == "mg-pyridostigmine"


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CDS, *args], capture_output=True, text=True, timeout=60, check=False)


def test_evaluate_prints_the_cards_without_a_server() -> None:
    result = run_cli("evaluate", str(MG_REQUEST))
    assert result.returncode == 0, result.stderr
    [card] = json.loads(result.stdout)["cards"]
    assert card["indicator"] == "warning"


def test_evaluate_writes_utf8_json_whatever_the_locale(tmp_path: Path) -> None:
    # The card's "m²" (eGFR in mL/min/1.73 m²) reads as written, not as a \\u escape; an
    # ASCII locale cannot make the output fail.
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONIOENCODING": "ascii"}
    request = MG_REQUEST.parent / "ckd4-low-egfr.order-select.json"
    done = subprocess.run(
        [CDS, "evaluate", str(request)], capture_output=True, timeout=60, check=False, env=env
    )
    assert done.returncode == 0, done.stderr
    text = done.stdout.decode("utf-8")
    assert "1.73 m²" in text and "\\u" not in text
    assert json.loads(text)["cards"][0]["source"]["topic"]["code"] == "renal-magnesium"


def test_evaluate_writes_a_lone_surrogate_from_a_draft_as_its_json_escape(
    tmp_path: Path,
) -> None:
    # UTF-8 cannot hold it; its escape is valid JSON and means the same character, which the
    # update suggestion sends back as the EHR wrote it.
    request = tmp_path / "request.json"
    request.write_text(ciprofloxacin_with("note", '[{"text": "\\ud800 x"}]'))
    done = subprocess.run([CDS, "evaluate", str(request)], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout.decode("utf-8"))
    assert update_offered(answer)
    notes = [
        action["resource"]["note"]
        for card in answer["cards"]
        for suggestion in card.get("suggestions", [])
        for action in suggestion["actions"]
        if action["type"] == "update"
    ]
    assert notes and all(note == [{"text": "\ud800 x"}] for note in notes)


def test_evaluate_fetches_from_a_fhir_server_when_asked(fixture_server_process: str) -> None:
    result = run_cli("evaluate", str(MG_NO_PREFETCH), "--fhir-server", fixture_server_process)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["cards"][0]["indicator"] == "warning"


def test_evaluate_reports_unavailable_data_and_invalid_files(tmp_path: Path) -> None:
    unreachable = run_cli("evaluate", str(MG_NO_PREFETCH), "--fhir-server", "http://127.0.0.1:9")
    assert unreachable.returncode == 3
    assert "required data unavailable: conditions" in unreachable.stderr
    broken = tmp_path / "broken.json"
    broken.write_text('{"hook": "order-select"}')
    invalid = run_cli("evaluate", str(broken))
    assert invalid.returncode == 2
    assert "$.hookInstance" in invalid.stderr
    missing = run_cli("evaluate", str(tmp_path / "nope.json"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr


def _http_answer(tmp_path: Path, service_id: str, data: bytes) -> dict[str, Any]:
    """What the HTTP endpoint answers for the same body (in process, authentication off)."""
    from cds_service.app import create_app
    from cds_service.settings import Settings

    app = create_app(Settings(auth="off", database_url=f"sqlite:///{tmp_path / 'http.sqlite3'}"))
    response = app.test_client().post(
        f"/cds-services/{service_id}", data=data, content_type="application/json"
    )
    assert response.status_code == 400, response.get_json()
    answer: dict[str, Any] = response.get_json()
    return answer


def _assert_same_problems(stderr: str, answer: dict[str, Any]) -> None:
    assert answer["message"] in stderr, stderr
    for item in answer.get("problems", []):
        assert f"{item['path']}: {item['message']}" in stderr, stderr


def test_evaluate_refuses_a_request_for_another_hook_as_http_does(tmp_path: Path) -> None:
    # The order-select request sent to the patient-view service: HTTP answers 400 wrong-hook.
    answer = _http_answer(tmp_path, "magnesium-patient-view", MG_REQUEST.read_bytes())
    assert answer["error"] == "wrong-hook"
    result = run_cli("evaluate", str(MG_REQUEST), "--service", "magnesium-patient-view")
    assert result.returncode == 2, result.stdout[:500]
    assert result.stdout == ""
    _assert_same_problems(result.stderr, answer)
    assert "wrong-hook" in result.stderr
    # The right service for the hook still answers.
    ok = run_cli("evaluate", str(MG_REQUEST), "--service", "magnesium-order-select")
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize(
    "replacement",
    [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"9" * 5000],
    ids=["nan", "inf", "-inf", "1e400", "5000-digit-int"],
)
def test_evaluate_parses_json_exactly_as_http_does(tmp_path: Path, replacement: bytes) -> None:
    body = json.loads(MG_REQUEST.read_text())
    resource = body["context"]["draftOrders"]["entry"][0]["resource"]
    resource["dosageInstruction"] = [{"doseAndRate": [{"doseQuantity": {"value": "@@"}}]}]
    data = json.dumps(body).encode().replace(b'"@@"', replacement)
    answer = _http_answer(tmp_path, "magnesium-order-select", data)
    assert answer["error"] == "invalid-json"
    request = tmp_path / "request.json"
    request.write_bytes(data)
    result = run_cli("evaluate", str(request))
    assert result.returncode == 2, result.stdout[:500]
    _assert_same_problems(result.stderr, answer)


@pytest.mark.parametrize(
    "data", [b'{"hook": "\xe9"}', b"", b"[1,"], ids=["latin-1", "empty", "truncated"]
)
def test_evaluate_refuses_what_http_refuses(tmp_path: Path, data: bytes) -> None:
    answer = _http_answer(tmp_path, "magnesium-order-select", data)
    request = tmp_path / "request.json"
    request.write_bytes(data)
    result = run_cli("evaluate", str(request))
    assert result.returncode == 2
    _assert_same_problems(result.stderr, answer)


def test_knowledge_command_lists_rules_and_versions() -> None:
    result = run_cli("knowledge")
    assert result.returncode == 0, result.stderr
    assert "myasthenia-magnesium" in result.stdout
    # Each interaction with its figures, status and sources (issue 20's corrections among them).
    def line(start: str) -> str:
        return next(ln for ln in result.stdout.splitlines() if ln.startswith(f"  {start} "))

    assert "2 h before / 6 h after   secondary" in line("delafloxacin")
    assert "4 h before / 4 h after" in line("omadacycline")
    assert "not together" in line("mycophenolate (group)")
    assert "look-back 90 days" in line("egfr")


def test_invalid_setting_is_a_clear_error() -> None:
    result = subprocess.run(
        [CDS, "knowledge"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "CDS_PORT": "eighty"},
    )
    assert result.returncode == 2 and "CDS_PORT" in result.stderr


# --- packaging ------------------------------------------------------------------------------


def test_dockerfile_refers_to_things_that_exist() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", dockerfile, re.M)
    copies = re.findall(r"^COPY (?!--from=)(.+)$", dockerfile, re.M)
    assert copies
    for paths in copies:
        for path in paths.split()[:-1]:  # the last is where they go
            assert (ROOT / path).exists(), f"Dockerfile copies {path}, which does not exist"
    user = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert user and user[-1] not in ("root", "0")
    assert re.search(rf"useradd .*\b{user[-1]}\b", dockerfile)
    cmd = json.loads(re.search(r"^CMD (\[.*\])", dockerfile, re.M).group(1))  # type: ignore[union-attr]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert cmd[0] in scripts and cmd[1] == "serve"
    assert "/healthz" in re.search(r"^HEALTHCHECK .*(?:\n\s+.*)*", dockerfile, re.M).group(0)  # type: ignore[union-attr]
    assert "CDS_AUTH=off" not in dockerfile


def _build_wheel(tmp_path: Path) -> tuple[Path, set[str]]:
    """A wheel built from a copy of the project (a build writes into its source tree)."""
    if shutil.which("pip", path=str(BIN)) is None:
        pytest.skip("pip not available in this environment")
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__")
    for name in ("cds_service", "schemas", "fixtures"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    done = subprocess.run(
        [
            str(BIN / "pip"),
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [wheel] = tmp_path.glob("*.whl")
    return wheel, set(zipfile.ZipFile(wheel).namelist())


def test_wheel_is_pure_python_and_carries_schemas_and_fixtures(tmp_path: Path) -> None:
    wheel, names = _build_wheel(tmp_path)
    assert wheel.name.endswith("-py3-none-any.whl")
    assert "cds_service/_bundled/schemas/hook-request.schema.json" in names
    assert "cds_service/_bundled/fixtures/patients/mg-pyridostigmine.json" in names
    assert any(name.startswith("cds_service/knowledge/data/") for name in names)
    assert "cds_service/context/normalise.py" in names
    assert not [name for name in names if name.endswith(".so")]


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)\n```", readme, re.S)
    run_command, test_command = blocks[0].strip(), blocks[1].strip()
    assert readme.index(run_command) < readme.index("##")  # before any section
    assert run_command.endswith("cds-service demo")
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_demo_runs_service_and_fixture_server_together_without_auth(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the README's first command starts: the noprefetch request is answered end to end."""
    port, fhir_port = free_port(), free_port()
    env = demo_env(tmp_path, port, fhir_port)
    monkeypatch.delenv("CDS_AUTH", raising=False)  # the demo's own default applies
    with run_cds(["demo"], env, tmp_path / "demo.log", port=port) as served:
        wait_until_up(f"http://127.0.0.1:{fhir_port}/metadata", served.process)
        body = json.loads(MG_NO_PREFETCH.read_text())
        body["fhirServer"] = f"http://127.0.0.1:{fhir_port}"
        response = requests.post(
            f"{served.url}/cds-services/magnesium-order-select", json=body, timeout=15
        )
        assert response.status_code == 200, response.text
        assert response.json()["cards"][0]["indicator"] == "warning"
        assert any("AUTHENTICATION IS OFF" in line for line in served.log_lines())


def test_under_gunicorn_every_call_gets_one_whole_request_line(tmp_path: Path) -> None:
    # Two workers, four threads each, sixteen clients at once: the JSON request lines of both
    # processes share one log file and are written without a lock (LineWriteHandler).
    port = free_port()
    env = {"CDS_AUTH": "off", "CDS_WORKERS": "2", "CDS_THREADS": "4",
           "CDS_DATABASE_URL": f"sqlite:///{tmp_path / 'cds.sqlite3'}"}
    command = ["serve", "--host", "127.0.0.1", "--port", str(port)]
    template = json.loads(MG_REQUEST.read_text())
    sent = [str(uuid.uuid4()) for _ in range(240)]

    def call(hook_instance: str) -> int:
        with requests.Session() as session:
            body = {**template, "hookInstance": hook_instance}
            return session.post(
                f"http://127.0.0.1:{port}/cds-services/magnesium-order-select",
                json=body, timeout=30,
            ).status_code

    with run_cds(command, env, tmp_path / "serve.log", port=port, workers=2) as served:
        with ThreadPoolExecutor(max_workers=16) as clients:
            assert set(clients.map(call, sent)) == {200}
        log_lines = served.log_lines()
    entries = [json.loads(line) for line in log_lines if line.startswith("{")]  # whole JSON
    calls = [e for e in entries if e.get("event") == "request" and e["method"] == "POST"]
    assert sorted(e["hookInstance"] for e in calls) == sorted(sent)  # one line each, none lost
    assert {e["status"] for e in calls} == {200}
    assert {tuple(e["ruleIds"]) for e in calls} == {("myasthenia-magnesium",)}
