"""Fuzzing: hook requests and FHIR resources with missing, extra, null and wrong-typed fields.

Whatever arrives, the answer is one of 200/400/401/404/412/413/415, always strict JSON (no
NaN or Infinity), a 200 always passes the response schema, and (against real gunicorn) no
worker dies. Numbers include the extremes: integers far beyond a double (10**400), doubles
near their limits, and number literals no double holds (``1e400``).
"""

from __future__ import annotations

import copy
import json
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from processes import free_port, run_cds, worker_pids

from cds_service.app import create_app
from cds_service.context.builder import client_config
from cds_service.context.fhir_client import FhirClient
from cds_service.protocol.services import SERVICES
from cds_service.resources import load_schema
from cds_service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
ALLOWED = {200, 400, 401, 404, 412, 413, 415}
RESPONSE_SCHEMA = Draft202012Validator(
    load_schema("response.schema.json"), format_checker=Draft202012Validator.FORMAT_CHECKER
)
# Port 9 (discard) on loopback: the FHIR fallback is exercised and refused at once, offline.
DEAD_FHIR_SERVER = "http://127.0.0.1:9"
SERVICE_IDS = [service.id for service in SERVICES]


def _bases() -> list[dict[str, Any]]:
    bases = []
    for path in sorted((ROOT / "fixtures" / "requests").glob("*.json")):
        body = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(body, dict):
            if "fhirServer" in body:
                body["fhirServer"] = DEAD_FHIR_SERVER
            bases.append(body)
    if not bases:  # the request fixtures are generated; keep the fuzzer useful without them
        bases.append(
            {
                "hook": "patient-view",
                "hookInstance": "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea",
                "context": {"userId": "Practitioner/1", "patientId": "p1"},
                "prefetch": {"patient": {"resourceType": "Patient", "id": "p1"}},
            }
        )
    return bases


BASES = _bases()

# --- strategies ----------------------------------------------------------------------------

# A string leaf that ``encode`` writes as a bare number literal: JSON a double cannot hold.
RAW_NUMBER = "raw-json-number:"
_RAW_NUMBER_RE = re.compile(rb'"' + RAW_NUMBER.encode() + rb'([-+.eE0-9]+)"')

extreme_numbers = st.one_of(
    # Integers past a double's range (float() raises OverflowError), bounded to stay fast.
    st.integers(min_value=309, max_value=1000).flatmap(
        lambda digits: st.sampled_from([10**digits, -(10**digits), 10**digits - 1])
    ),
    st.sampled_from([2**63, -(2**63) - 1, 2**64, 2**1024, 10**308]),
    # Finite doubles at the edges: products and quotients of them overflow to inf.
    st.floats(min_value=1e300, allow_infinity=False),
    st.floats(max_value=-1e300, allow_infinity=False),
    st.sampled_from([1.7976931348623157e308, 5e-324, 1e-308, -1e-308]),
    st.sampled_from(["1e400", "-1e400", "1E999", "2.5e-400", "1e308", "1e-400"]).map(
        lambda literal: RAW_NUMBER + literal
    ),
)
json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    extreme_numbers,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=24),
    st.sampled_from(["", "Patient/p1", "active", "draft", "mg", "http://loinc.org", "19123-9"]),
)
json_values = st.recursive(
    json_leaves,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=16,
)
RESOURCE_TYPES = [
    "Patient",
    "Condition",
    "MedicationRequest",
    "MedicationStatement",
    "MedicationOrder",
    "Observation",
    "Bundle",
    "OperationOutcome",
    "Medication",
    "Unknown",
    "",
]


def maybe(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the right shape, sometimes anything."""
    return st.one_of(good, good, json_values)


coding = st.fixed_dictionaries(
    {},
    optional={
        "system": maybe(
            st.sampled_from(
                [
                    "http://snomed.info/sct",
                    "http://www.nlm.nih.gov/research/umls/rxnorm",
                    "http://loinc.org",
                    "http://hl7.org/fhir/sid/icd-10-cm",
                ]
            )
        ),
        "code": maybe(st.sampled_from(["91637004", "G70.00", "198741", "19123-9", "33914-3"])),
        "display": maybe(st.text(max_size=20)),
    },
)
codeable = st.fixed_dictionaries(
    {},
    optional={
        "coding": maybe(st.lists(maybe(coding), max_size=3)),
        "text": maybe(st.text(max_size=20)),
    },
)
quantity = st.fixed_dictionaries(
    {},
    optional={
        "value": maybe(
            st.one_of(st.floats(allow_nan=False, allow_infinity=False, width=32), extreme_numbers)
        ),
        "unit": maybe(st.sampled_from(["mg", "mg/dL", "mmol/L", "mL/min/{1.73_m2}", "{pill}"])),
        "code": maybe(st.sampled_from(["mg", "mg/dL", "mmol/L"])),
    },
)
number = st.one_of(st.integers(min_value=-5, max_value=48), st.floats(0.01, 100), extreme_numbers)
timing = st.fixed_dictionaries(
    {},
    optional={
        "repeat": maybe(
            st.fixed_dictionaries(
                {},
                optional={
                    "frequency": maybe(number),
                    "frequencyMax": maybe(number),
                    "period": maybe(number),
                    "periodUnit": maybe(st.sampled_from(["s", "min", "h", "d", "wk", "mo"])),
                },
            )
        )
    },
)
reference = st.fixed_dictionaries(
    {},
    optional={
        "reference": maybe(
            st.sampled_from(
                ["Patient/p1", "Patient/mg-pyridostigmine", "Patient/other", "Medication/m1"]
            )
        )
    },
)
fhir_resources = st.fixed_dictionaries(
    {"resourceType": maybe(st.sampled_from(RESOURCE_TYPES))},
    optional={
        "id": maybe(st.text(max_size=12)),
        "status": maybe(
            st.sampled_from(["active", "draft", "final", "completed", "entered-in-error"])
        ),
        "intent": maybe(st.sampled_from(["order", "plan", "proposal"])),
        "subject": maybe(reference),
        "patient": maybe(reference),
        "code": maybe(codeable),
        "clinicalStatus": maybe(codeable),
        "verificationStatus": maybe(codeable),
        "category": maybe(st.one_of(codeable, st.lists(codeable, max_size=2))),
        "medicationCodeableConcept": maybe(codeable),
        "medicationReference": maybe(reference),
        "dosageInstruction": maybe(
            st.lists(
                maybe(
                    st.fixed_dictionaries(
                        {},
                        optional={
                            "doseAndRate": maybe(
                                st.lists(
                                    maybe(
                                        st.fixed_dictionaries(
                                            {}, optional={"doseQuantity": maybe(quantity)}
                                        )
                                    ),
                                    max_size=2,
                                )
                            ),
                            "route": maybe(codeable),
                            "timing": maybe(timing),
                        },
                    )
                ),
                max_size=2,
            )
        ),
        "valueQuantity": maybe(quantity),
        "effectiveDateTime": maybe(st.sampled_from(["2026-11-01", "2026-11-24T10:00:00Z", "x"])),
        "birthDate": maybe(st.sampled_from(["1978-04-12", "2020", "not-a-date"])),
        "gender": maybe(st.sampled_from(["female", "male", "other"])),
        "entry": maybe(
            st.lists(
                maybe(
                    st.fixed_dictionaries(
                        {}, optional={"resource": json_values, "fullUrl": json_values}
                    )
                ),
                max_size=2,
            )
        ),
        "extension": json_values,
    },
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from _paths(child, (*prefix, index))


@st.composite
def hook_requests(draw: st.DrawFn) -> Any:
    # An index, not sampled_from(BASES): hypothesis would repr the whole list of requests.
    body: Any = copy.deepcopy(BASES[draw(st.integers(min_value=0, max_value=len(BASES) - 1))])
    for _ in range(draw(st.integers(min_value=0, max_value=4))):
        paths = list(_paths(body))
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["delete", "null", "replace", "extra", "resource"]))
        if not path:
            if op in {"replace", "null"}:
                body = None if op == "null" else draw(json_values)
            continue
        parent = body
        for part in path[:-1]:
            parent = parent[part]
        key = path[-1]
        if op == "delete":
            del parent[key]
        elif op == "null":
            parent[key] = None
        elif op == "replace":
            parent[key] = draw(json_values)
        elif op == "extra" and isinstance(parent[key], dict):
            parent[key][draw(st.text(max_size=12))] = draw(json_values)
        elif op == "resource":
            parent[key] = draw(fhir_resources)
    return body


service_ids = st.one_of(
    st.sampled_from(SERVICE_IDS), st.sampled_from(SERVICE_IDS), st.text(min_size=1, max_size=12)
)


def encode(body: Any) -> bytes:
    data = json.dumps(body, allow_nan=True).encode("utf-8", errors="surrogatepass")
    return _RAW_NUMBER_RE.sub(rb"\1", data)


def _not_json(name: str) -> Any:
    raise AssertionError(f"the answer holds {name}, which JSON (RFC 8259) does not have")


def check_answer(status: int, content_type: str, data: bytes) -> None:
    assert status in ALLOWED, (status, data[:300])
    assert content_type.startswith("application/json"), (status, content_type)
    answer = json.loads(data, parse_constant=_not_json)
    if status == 200:
        errors = [f"{e.json_path}: {e.message}" for e in RESPONSE_SCHEMA.iter_errors(answer)]
        assert not errors, errors


def test_encode_writes_extreme_number_literals() -> None:
    # The fuzzer's 1e400 must reach the service as a bare literal, not as a string.
    body = {"a": RAW_NUMBER + "1e400", "b": [RAW_NUMBER + "-1E999"], "c": 10**400}
    assert encode(body) == b'{"a": 1e400, "b": [-1E999], "c": 1' + b"0" * 400 + b"}"


# --- in-process: fast, many examples -------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_client(tmp_path_factory: pytest.TempPathFactory) -> Any:
    database = tmp_path_factory.mktemp("fuzz") / "cds.sqlite3"
    config = client_config(Settings(fhir_connect_timeout=0.5, fhir_read_timeout=0.5))

    def offline_client(base_url: str, token: str | None, issuer: str | None) -> FhirClient:
        return FhirClient(DEAD_FHIR_SERVER, config, access_token=token)

    app = create_app(
        Settings(auth="off", database_url=f"sqlite:///{database}", max_request_bytes=200_000),
        client_factory=offline_client,
    )
    return app.test_client()


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)
@given(body=hook_requests(), service_id=service_ids)
def test_fuzzed_hook_requests_get_deliberate_json_answers(
    fuzz_client: Any, body: Any, service_id: str
) -> None:
    response = fuzz_client.post(
        f"/cds-services/{quote(service_id, safe='')}",
        data=encode(body),
        content_type="application/json",
    )
    check_answer(response.status_code, response.headers.get("Content-Type", ""), response.data)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)
@given(
    resources=st.lists(fhir_resources, min_size=1, max_size=4),
    key=st.sampled_from(
        [
            "patient",
            "conditions",
            "medicationRequests",
            "medicationStatements",
            "observations",
            "draftOrders",
        ]
    ),
    as_bundle=st.booleans(),
)
def test_fuzzed_fhir_resources_get_deliberate_json_answers(
    fuzz_client: Any, resources: list[dict[str, Any]], key: str, as_bundle: bool
) -> None:
    body = copy.deepcopy(
        next(b for b in BASES if b.get("hook") == "order-select")
        if any(b.get("hook") == "order-select" for b in BASES)
        else BASES[0]
    )
    value: Any = (
        {
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [{"resource": r} for r in resources],
        }
        if as_bundle or key == "draftOrders"
        else resources[0]
    )
    if key == "draftOrders":
        body.setdefault("context", {})["draftOrders"] = value
    else:
        body.setdefault("prefetch", {})[key] = value
    service = next((s.id for s in SERVICES if s.hook == body.get("hook")), SERVICE_IDS[0])
    response = fuzz_client.post(
        f"/cds-services/{service}", data=encode(body), content_type="application/json"
    )
    check_answer(response.status_code, response.headers.get("Content-Type", ""), response.data)


# --- real gunicorn: the workers survive ----------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def gunicorn_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int, Path]]:
    """(base URL, master pid, log file) of ``cds-service serve`` under real gunicorn."""
    if not Path("/proc/self/task").exists():
        pytest.skip("needs /proc to find gunicorn's workers")
    port = free_port()
    directory = tmp_path_factory.mktemp("fuzz-gunicorn")
    env = {
        "CDS_AUTH": "off",
        "CDS_WORKERS": "2",
        "CDS_THREADS": "4",
        "CDS_DATABASE_URL": f"sqlite:///{directory / 'cds.sqlite3'}",
        "CDS_MAX_REQUEST_BYTES": "1000000",
        "CDS_FHIR_CONNECT_TIMEOUT": "0.5",
        "CDS_FHIR_READ_TIMEOUT": "0.5",
        "CDS_LOG_LEVEL": "WARNING",
    }
    command = ["serve", "--host", "127.0.0.1", "--port", str(port)]
    log_path = directory / "gunicorn.log"
    with run_cds(command, env, log_path, port=port, workers=2, seconds=30) as served:
        yield served.url, served.process.pid, log_path


def _hostile_bodies() -> Iterator[tuple[str, bytes, str]]:
    """(service id, raw body, content type): what a fuzzer finds by chance, on purpose."""
    base = encode(BASES[0])
    yield SERVICE_IDS[0], b"[" * 200_000 + b"]" * 200_000, "application/json"
    yield SERVICE_IDS[0], b'{"a":' * 990 + b"1" + b"}" * 990, "application/json"
    yield SERVICE_IDS[0], b'{"hook": ' + b"9" * 100_000 + b"}", "application/json"
    yield SERVICE_IDS[0], b'{"hook": NaN}', "application/json"
    yield SERVICE_IDS[0], b'{"hook": 1e400}', "application/json"
    yield SERVICE_IDS[0], b'{"hook": ' + str(10**400).encode() + b"}", "application/json"
    yield SERVICE_IDS[0], b"\xff\xfe" + base, "application/json"
    yield SERVICE_IDS[0], base[: len(base) // 2], "application/json"
    yield SERVICE_IDS[0], b"x" * 2_000_000, "application/json"
    yield SERVICE_IDS[0], base, "text/plain"
    yield SERVICE_IDS[0], b"", "application/json"
    yield "no-such-service", base, "application/json"
    yield SERVICE_IDS[0] + "/feedback", b'{"feedback": [{"card": null}]}', "application/json"
    yield (
        SERVICE_IDS[0] + "/feedback",
        b'{"feedback": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        "application/json",
    )
    item = (
        b'{"card": "0b7f4c4e-8d1a-4e3f-9c55-1f2a3b4c5d6e", "outcome": "overridden", '
        b'"outcomeTimestamp": "%s"%s}'
    )
    for timestamp in (b"9999-12-31T23:59:59-23:59", b"0001-01-01T00:00:00+23:59"):
        body = b'{"feedback": [' + item % (timestamp, b"") + b"]}"
        yield SERVICE_IDS[0] + "/feedback", body, "application/json"
    surrogate = item % (b"2025-03-01T10:00:00Z", b', "overrideReason": {"userComment": "\\ud800"}')
    yield SERVICE_IDS[0] + "/feedback", b'{"feedback": [' + surrogate + b"]}", "application/json"
    many = b",".join([item % (b"2025-03-01T10:00:00Z", b"")] * 60_000)
    yield SERVICE_IDS[0] + "/feedback", b'{"feedback": [' + many + b"]}", "application/json"


def test_gunicorn_workers_survive_hostile_traffic(gunicorn_url: tuple[str, int, Path]) -> None:
    url, master, log_path = gunicorn_url
    workers = worker_pids(master)
    assert len(workers) == 2
    # A fresh connection per request: after a 413 gunicorn drains at most 64 KiB of the unread
    # body and then closes the connection, so a reused one can be gone (not a dead worker).

    def send(service_id: str, data: bytes, content_type: str) -> None:
        response = requests.post(
            f"{url}/cds-services/{service_id}",
            data=data,
            headers={"Content-Type": content_type},
            timeout=30,
        )
        try:
            check_answer(
                response.status_code, response.headers.get("Content-Type", ""), response.content
            )
        except AssertionError as exc:
            errors = [line for line in log_path.read_text().splitlines() if "ERROR" in line]
            raise AssertionError(
                f"{exc}; request {service_id!r} {data[:2000]!r}; server errors: {errors[-5:]}"
            ) from None

    for service_id, data, content_type in _hostile_bodies():
        send(service_id, data, content_type)

    # A chunked body over the limit, streamed.
    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b"x" * 50_000

    response = requests.post(
        f"{url}/cds-services/{SERVICE_IDS[0]}",
        data=chunks(),
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    check_answer(response.status_code, response.headers.get("Content-Type", ""), response.content)
    assert response.status_code == 413

    # A malformed chunk size, as a raw request (no client library sends one): gunicorn finds it
    # while the application reads the body.
    for size_line in (b"zz", b"-1", b"0x5", b"5;\x00"):
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), 10) as raw:
            raw.sendall(
                b"POST /cds-services/" + SERVICE_IDS[0].encode() + b"/feedback HTTP/1.1\r\n"
                b"Host: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n" + size_line + b"\r\n{}\r\n0\r\n\r\n"
            )
            answer = b""
            while chunk := raw.recv(65536):
                answer += chunk
        head, _, data = answer.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        content_type = next(
            (line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
             if line.lower().startswith(b"content-type:")), "",
        )
        check_answer(status, content_type, data)
        assert status == 400, answer

    @settings(
        max_examples=250,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(body=hook_requests(), service_id=service_ids)
    def fuzz(body: Any, service_id: str) -> None:
        send(quote(service_id, safe=""), encode(body), "application/json")

    fuzz()

    assert requests.get(f"{url}/healthz", timeout=5).status_code == 200
    assert worker_pids(master) == workers, "a gunicorn worker died and was replaced"
    assert all(_alive(pid) for pid in workers)
