"""POST /cds-services/{id}/feedback over real HTTP: what the sandbox and the spec send, what
is refused and why, what is flagged, and that concurrent clients (threads, then a real
gunicorn with two workers) lose nothing."""

from __future__ import annotations

import copy
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from processes import free_port, run_cds
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cds_service.app import create_app
from cds_service.fixture_server import serve_in_background
from cds_service.protocol.feedback import STORE_EXTENSION
from cds_service.settings import Settings
from cds_service.store import CardRecord, FeedbackStore
from cds_service.store.engine import make_engine
from cds_service.store.models import Feedback, IssuedCard

ROOT = Path(__file__).resolve().parent.parent
MG_REQUEST = ROOT / "fixtures" / "requests" / "mg-pyridostigmine.order-select.json"
SELECT = "magnesium-order-select"
SIGN = "magnesium-order-sign"
STAMP = "2025-03-01T10:05:31Z"


def new_uuid() -> str:
    return str(uuid.uuid4())


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Flask:
    database = tmp_path_factory.mktemp("feedback") / "cds.sqlite3"
    return create_app(Settings(auth="off", database_url=f"sqlite:///{database}"))


@pytest.fixture(scope="module")
def base_url(app: Flask) -> Iterator[str]:
    with serve_in_background(app) as url:
        yield url


def store_of(app: Flask) -> FeedbackStore:
    return app.extensions[STORE_EXTENSION]  # type: ignore[no-any-return]


def issue(app: Flask, service_id: str = SELECT, rule_id: str = "myasthenia-magnesium") -> str:
    card = new_uuid()
    store_of(app).record_cards(service_id, new_uuid(), [CardRecord(card, rule_id, "critical")])
    return card


def post(base_url: str, service_id: str, body: Any, **kwargs: Any) -> requests.Response:
    return requests.post(f"{base_url}/cds-services/{service_id}/feedback", json=body, timeout=30,
                         **kwargs)


def stored(app: Flask, card: str) -> list[Feedback]:
    with Session(store_of(app).engine) as session:
        return list(session.scalars(select(Feedback).where(Feedback.card_uuid == card)))


def test_accepted_and_overridden_feedback_as_the_sandbox_sends_it(
    app: Flask, base_url: str
) -> None:
    accepted, overridden = issue(app), issue(app)
    suggestion = new_uuid()
    response = post(base_url, SELECT, {"feedback": [
        {"card": accepted, "outcome": "accepted", "outcomeTimestamp": STAMP,
         "acceptedSuggestions": [{"id": suggestion}]},
        # The sandbox sends the reason's code and system, without display.
        {"card": overridden.upper(), "outcome": "overridden", "outcomeTimestamp": STAMP,
         "overrideReason": {"reason": {"code": "benefit-outweighs-risk",
                                       "system": "http://example.org/override"},
                            "userComment": "discussed with neurology"}},
    ]})
    assert response.status_code == 200, response.text
    assert response.json() == {"extension": {"org.magnesium-cds": {"stored": 2}}}
    [row] = stored(app, accepted)
    assert (row.outcome, row.accepted_suggestions, row.flag) == ("accepted", [suggestion], None)
    [row] = stored(app, overridden)  # the uuid is matched whatever its case
    assert (row.outcome, row.override_reason_code, row.override_reason_display, row.flag) == (
        "overridden", "benefit-outweighs-risk", None, None
    )
    assert row.user_comment == "discussed with neurology"
    assert row.outcome_at.isoformat() == "2025-03-01T10:05:31+00:00"


def test_overridden_without_any_reason_is_fine(app: Flask, base_url: str) -> None:
    card = issue(app)
    response = post(base_url, SELECT, {"feedback": [
        {"card": card, "outcome": "overridden", "outcomeTimestamp": "2020-12-11T00:00:00.52+01:00"}
    ]})
    assert response.status_code == 200, response.text
    [row] = stored(app, card)
    assert row.outcome_at.isoformat() == "2020-12-10T23:00:00.520000+00:00"


def test_feedback_on_a_card_from_a_real_service_call(app: Flask, base_url: str) -> None:
    request = json.loads(MG_REQUEST.read_text(encoding="utf-8"))
    request["hookInstance"] = new_uuid()
    answer = requests.post(f"{base_url}/cds-services/{SELECT}", json=request, timeout=30)
    assert answer.status_code == 200, answer.text
    card = answer.json()["cards"][0]
    # Cards are written by a background thread: wait for it before reading the table.
    assert store_of(app).flush_recorder()
    with Session(store_of(app).engine) as session:
        issued = session.scalars(
            select(IssuedCard).where(IssuedCard.card_uuid == card["uuid"])
        ).one()
    assert issued.hook_instance == request["hookInstance"] and issued.service_id == SELECT
    assert issued.indicator == card["indicator"]
    reason = card["overrideReasons"][0]
    response = post(base_url, SELECT, {"feedback": [{
        "card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": STAMP,
        "overrideReason": {"reason": {"code": reason["code"], "system": reason["system"]}},
    }]})
    assert response.json() == {"extension": {"org.magnesium-cds": {"stored": 1}}}
    assert stored(app, card["uuid"])[0].flag is None


@pytest.mark.parametrize(("item", "path"), [
    ({"outcome": "accepted"}, "$.feedback[0].acceptedSuggestions"),  # required when accepted
    ({"outcome": "overridden", "acceptedSuggestions": [{"id": "s"}]},
     "$.feedback[0].acceptedSuggestions"),
    ({"outcome": "accepted", "acceptedSuggestions": [{"id": "s"}],
      "overrideReason": {"userComment": "no"}}, "$.feedback[0].overrideReason"),
    ({"outcome": "overridden", "overrideReason": {"reason": {"system": "x"}}},
     "$.feedback[0].overrideReason.reason.code"),
    ({"outcome": "dismissed"}, "$.feedback[0].outcome"),
    ({"outcome": "overridden", "outcomeTimestamp": "yesterday"}, "$.feedback[0].outcomeTimestamp"),
    ({"outcome": "overridden", "card": "card-1"}, "$.feedback[0].card"),
])
def test_invalid_feedback_is_400_naming_the_problem(
    base_url: str, item: dict[str, Any], path: str
) -> None:
    body = {"feedback": [{"card": new_uuid(), "outcomeTimestamp": STAMP, **item}]}
    response = post(base_url, SELECT, body)
    assert response.status_code == 400, response.text
    problems = response.json()["problems"]
    assert path in [p["path"] for p in problems], problems


def test_other_malformed_requests(base_url: str) -> None:
    assert post(base_url, SELECT, {"feedback": []}).status_code == 400
    assert post(base_url, SELECT, {"cards": []}).json()["problems"][0]["path"] == "$.feedback"
    not_json = requests.post(f"{base_url}/cds-services/{SELECT}/feedback", data="feedback",
                             headers={"Content-Type": "text/plain"}, timeout=10)
    assert not_json.status_code == 415
    assert not_json.json()["error"] == "unsupported-media-type"
    unknown = post(base_url, "no-such-service", {"feedback": []})
    assert unknown.status_code == 404 and unknown.json()["error"] == "unknown-service"


def test_feedback_for_cards_we_never_issued_is_stored_and_flagged(
    app: Flask, base_url: str
) -> None:
    stranger, elsewhere, ours = new_uuid(), issue(app, SIGN), issue(app, SELECT)
    items = [{"card": card, "outcome": "overridden", "outcomeTimestamp": STAMP}
             for card in (stranger, elsewhere, ours)]
    response = post(base_url, SELECT, {"feedback": items})
    assert response.status_code == 200
    assert response.json()["extension"]["org.magnesium-cds"] == {
        "stored": 3, "unknownCards": [stranger], "otherServiceCards": [elsewhere]
    }
    assert [r.flag for r in stored(app, stranger)] == ["unknown-card"]
    assert [r.flag for r in stored(app, elsewhere)] == ["other-service"]
    assert [r.flag for r in stored(app, ours)] == [None]


def test_concurrent_posts_from_eight_threads_are_all_stored(app: Flask, base_url: str) -> None:
    threads_n, per_thread = 8, 25
    cards = [[issue(app) for _ in range(per_thread)] for _ in range(threads_n)]
    failures: list[str] = []
    start = threading.Barrier(threads_n)

    def client(mine: list[str]) -> None:
        with requests.Session() as session:
            start.wait()
            for card in mine:
                response = session.post(
                    f"{base_url}/cds-services/{SELECT}/feedback", timeout=30,
                    json={"feedback": [{"card": card, "outcome": "overridden",
                                        "outcomeTimestamp": STAMP}]},
                )
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {response.text}")

    threads = [threading.Thread(target=client, args=(mine,)) for mine in cards]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert failures == []
    everything = [card for mine in cards for card in mine]
    with Session(store_of(app).engine) as session:
        rows = session.scalars(select(Feedback).where(Feedback.card_uuid.in_(everything))).all()
    assert sorted(r.card_uuid for r in rows) == sorted(everything)
    assert all(r.flag is None for r in rows)


def test_database_down_feedback_503_but_cards_still_answered(tmp_path: Path) -> None:
    broken = FeedbackStore(make_engine("sqlite:////nonexistent-dir/for/sure/cds.sqlite3"))
    client = create_app(Settings(auth="off"), store=broken).test_client()
    response = client.post(f"/cds-services/{SELECT}/feedback", json={"feedback": [
        {"card": new_uuid(), "outcome": "overridden", "outcomeTimestamp": STAMP}
    ]})
    assert response.status_code == 503
    assert response.get_json()["error"] == "store-unavailable"
    # The clinical answer comes first: the cards are returned; only their record is lost.
    answer = client.post(f"/cds-services/{SELECT}", json=json.loads(MG_REQUEST.read_text()))
    assert answer.status_code == 200 and answer.get_json()["cards"]
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.get_json()["checks"]["store"].startswith("unavailable")
    # The database is back: the card held meanwhile is written, and feedback is stored.
    working = FeedbackStore.open(f"sqlite:///{tmp_path / 'back.sqlite3'}")
    broken.engine = working.engine
    deadline = time.monotonic() + 10
    while broken.card_writer.failing or broken.card_writer.pending_cards():
        assert time.monotonic() < deadline, "the held card was not written"
        time.sleep(0.05)
    card = answer.get_json()["cards"][0]["uuid"]
    response = client.post(f"/cds-services/{SELECT}/feedback", json={"feedback": [
        {"card": card, "outcome": "overridden", "outcomeTimestamp": STAMP}
    ]})
    assert response.status_code == 200
    assert response.get_json()["extension"]["org.magnesium-cds"] == {"stored": 1}
    working.close()


def test_feedback_needs_a_jwt_when_auth_is_on(auth_app_factory: Any, jwt_issuer: Any) -> None:
    app = auth_app_factory()
    client = app.test_client()
    card = issue(app)
    body = {"feedback": [{"card": card, "outcome": "overridden", "outcomeTimestamp": STAMP}]}
    url = f"http://localhost/cds-services/{SELECT}/feedback"
    assert client.post(url, json=body).status_code == 401
    assert stored(app, card) == []
    response = client.post(url, json=body, headers=jwt_issuer.auth(url))
    assert response.status_code == 200, response.get_data(as_text=True)
    assert [r.flag for r in stored(app, card)] == [None]


# --- a real `cds-service serve`: gunicorn, two workers, one SQLite file ------------------------


@pytest.fixture(scope="module")
def gunicorn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(base URL, database URL) of `cds-service serve` with 2 workers on a fresh SQLite file."""
    directory = tmp_path_factory.mktemp("gunicorn-feedback")
    database_url = f"sqlite:///{directory / 'cds.sqlite3'}"
    port = free_port()
    env = {"CDS_AUTH": "off", "CDS_WORKERS": "2", "CDS_THREADS": "4",
           "CDS_DATABASE_URL": database_url, "CDS_LOG_LEVEL": "WARNING"}
    command = ["serve", "--host", "127.0.0.1", "--port", str(port)]
    with run_cds(command, env, directory / "serve.log", port=port, probe="/readyz") as served:
        yield served.url, database_url


def test_gunicorn_workers_lose_no_card_and_no_feedback(gunicorn: tuple[str, str]) -> None:
    url, database_url = gunicorn
    template = json.loads(MG_REQUEST.read_text(encoding="utf-8"))
    threads_n, rounds = 6, 8
    issued: list[str] = []
    failures: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(threads_n)

    def clinician() -> None:
        with requests.Session() as session:
            start.wait()
            for _ in range(rounds):
                request = copy.deepcopy(template)
                request["hookInstance"] = new_uuid()
                answer = session.post(f"{url}/cds-services/{SELECT}", json=request, timeout=30)
                if answer.status_code != 200:
                    failures.append(f"service {answer.status_code}")
                    continue
                cards = [card["uuid"] for card in answer.json()["cards"]]
                with lock:
                    issued.extend(cards)
                response = session.post(f"{url}/cds-services/{SELECT}/feedback", timeout=30, json={
                    "feedback": [{"card": card, "outcome": "overridden", "outcomeTimestamp": STAMP}
                                 for card in cards]
                })
                if response.status_code != 200 or "unknownCards" in response.text:
                    failures.append(f"feedback {response.status_code} {response.text}")

    threads = [threading.Thread(target=clinician) for _ in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert failures == []
    assert len(issued) >= threads_n * rounds  # every call answered with the myasthenia card
    engine = make_engine(database_url)
    with engine.connect() as connection:
        cards = set(connection.scalars(select(IssuedCard.card_uuid)))
        feedback = connection.scalar(select(func.count()).select_from(Feedback))
        flagged = connection.scalar(select(func.count()).where(Feedback.flag.is_not(None)))
    engine.dispose()
    assert cards == set(issued)
    assert (feedback, flagged) == (len(issued), 0)


def test_feedback_bounds_are_refused_with_the_reason(app: Flask, base_url: str) -> None:
    card = issue(app)
    entry = {"card": card, "outcome": "overridden", "outcomeTimestamp": STAMP}
    too_many = post(base_url, SELECT, {"feedback": [entry] * 101})
    assert too_many.status_code == 400
    assert too_many.json()["problems"] == [
        {"path": "$.feedback", "message": "101 entries; send at most 100 per request"}
    ]
    long_comment = {**entry, "overrideReason": {"userComment": "é" * 2001}}
    too_long = post(base_url, SELECT, {"feedback": [long_comment]})
    assert too_long.status_code == 400
    assert too_long.json()["problems"][0]["path"] == "$.feedback[0].overrideReason.userComment"
    assert stored(app, card) == []
    # At the bounds: accepted, the comment kept whole.
    at_bound = {**entry, "overrideReason": {"userComment": "é" * 2000}}
    response = post(base_url, SELECT, {"feedback": [at_bound] + [
        {**entry, "outcomeTimestamp": f"2025-03-01T10:{n // 60:02d}:{n % 60:02d}Z"}
        for n in range(99)
    ]})
    assert response.status_code == 200, response.text
    assert response.json()["extension"]["org.magnesium-cds"] == {"stored": 100}
    assert "é" * 2000 in [row.user_comment for row in stored(app, card)]


def test_the_same_feedback_posted_again_is_stored_once(app: Flask, base_url: str) -> None:
    card = issue(app)
    body = {"feedback": [{"card": card, "outcome": "overridden", "outcomeTimestamp": STAMP,
                          "overrideReason": {"userComment": "renal function is stable"}}]}
    first = post(base_url, SELECT, body)
    assert first.json() == {"extension": {"org.magnesium-cds": {"stored": 1}}}
    for _ in range(15):
        again = post(base_url, SELECT, body)
        assert again.status_code == 200
        assert again.json() == {"extension": {"org.magnesium-cds": {"stored": 0, "duplicates": 1}}}
    assert len(stored(app, card)) == 1
    # Another outcome time is another report.
    later = copy.deepcopy(body)
    later["feedback"][0]["outcomeTimestamp"] = "2025-03-01T10:06:00Z"
    assert post(base_url, SELECT, later).json()["extension"]["org.magnesium-cds"]["stored"] == 1
    assert len(stored(app, card)) == 2
