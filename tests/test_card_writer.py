"""The background writer of issued cards (``cds_service/store/writer.py``): a service call only
queues its cards; a thread of the process writes them in batches, one transaction each; the
queue is flushed on exit and for feedback, which also waits briefly for cards another worker
or instance is still writing."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest
from flask import Flask
from sqlalchemy import Engine, event, func, insert, select

from cds_service.app import create_app
from cds_service.protocol.feedback import UNKNOWN_CARD_GRACE_S
from cds_service.settings import Settings
from cds_service.store import CardRecord, FeedbackStore
from cds_service.store.engine import make_engine
from cds_service.store.models import IssuedCard
from cds_service.store.writer import CardBatch, CardWriter, flush_writers_at_exit

ROOT = Path(__file__).resolve().parent.parent
MG_REQUEST = json.loads(
    (ROOT / "fixtures" / "requests" / "mg-pyridostigmine.order-select.json").read_text("utf-8")
)
SELECT = "magnesium-order-select"
STAMP = "2025-03-01T10:05:31Z"


def new_uuid() -> str:
    return str(uuid.uuid4())


def card_count(store: FeedbackStore) -> int:
    with store.engine.connect() as connection:
        return int(connection.scalar(select(func.count()).select_from(IssuedCard)) or 0)


def card_uuids(store: FeedbackStore) -> set[str]:
    with store.engine.connect() as connection:
        return set(connection.scalars(select(IssuedCard.card_uuid)))


def service_call(app: Flask) -> str:
    """One order-select call through the test client; the uuid of its first card."""
    request = {**MG_REQUEST, "hookInstance": new_uuid()}
    answer = app.test_client().post(f"/cds-services/{SELECT}", json=request)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    return str(answer.get_json()["cards"][0]["uuid"])


class GatedStore(FeedbackStore):
    """A store whose background writes wait for ``gate`` (a database holding its lock)."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        self.gate = threading.Event()
        self.writing = threading.Event()
        self.batch_sizes: list[int] = []

    def record_card_batches(self, batches: Sequence[CardBatch]) -> int:
        self.writing.set()
        self.gate.wait(30)
        self.batch_sizes.append(len(batches))
        return super().record_card_batches(batches)


class SlowStore(FeedbackStore):
    """A store whose writer commits 100 ms late: another worker, busy."""

    def record_card_batches(self, batches: Sequence[CardBatch]) -> int:
        time.sleep(0.1)
        return super().record_card_batches(batches)


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'cds.sqlite3'}"


def test_a_service_call_never_touches_the_database_to_record(database_url: str) -> None:
    store = FeedbackStore.open(database_url)
    app = create_app(Settings(auth="off"), store=store)
    checkouts: list[int] = []
    event.listen(store.engine, "checkout", lambda *_: checkouts.append(threading.get_ident()))
    card = service_call(app)  # the test client runs the request in this thread
    assert store.flush_recorder()
    # Every connection was taken by the writer's thread, none by the request's.
    assert checkouts and threading.get_ident() not in checkouts
    assert card in card_uuids(store)


def test_a_blocked_database_does_not_hold_the_answer(database_url: str) -> None:
    store = GatedStore.open(database_url)
    app = create_app(Settings(auth="off"), store=store)
    try:
        started = time.perf_counter()
        card = service_call(app)
        assert time.perf_counter() - started < 5  # the write waits 30 s for the gate
        assert store.writing.wait(5)  # the writer has the batch and is stuck on the "lock"
        assert card not in card_uuids(store)
    finally:
        store.gate.set()
    assert store.flush_recorder()
    assert card in card_uuids(store)


def test_a_broken_database_still_answers_and_the_cards_wait_for_it(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    broken = FeedbackStore(make_engine("sqlite:////nonexistent-dir/for/sure/cds.sqlite3"))
    app = create_app(Settings(auth="off"), store=broken)
    caplog.set_level(logging.ERROR)
    started = time.perf_counter()
    cards = [service_call(app) for _ in range(3)]
    assert time.perf_counter() - started < 5
    deadline = time.monotonic() + 5
    while not broken.card_writer.failing:
        assert time.monotonic() < deadline, "the writer never tried the database"
        time.sleep(0.01)
    started = time.perf_counter()
    assert not broken.flush_recorder()  # the database is down: a flush does not wait for it
    assert time.perf_counter() - started < 0.5
    assert broken.card_writer.pending_cards() == 3  # held, not dropped
    failures = [r for r in caplog.records if r.getMessage().startswith("issued cards not")]
    assert [r.threadName for r in failures] == ["issued-card-writer"]  # once per outage
    # The database is back: the writer's next try writes every held card.
    working = FeedbackStore.open(f"sqlite:///{tmp_path / 'back.sqlite3'}")
    broken.engine = working.engine
    deadline = time.monotonic() + 10
    while broken.card_writer.failing or broken.card_writer.pending_cards():
        assert time.monotonic() < deadline, "held cards not written after the database came back"
        time.sleep(0.05)
    assert set(cards) <= card_uuids(working)
    assert broken.flush_recorder()
    working.close()


def test_beyond_the_bound_cards_are_dropped_while_the_database_is_down(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    broken = FeedbackStore(make_engine("sqlite:////nonexistent-dir/for/sure/cds.sqlite3"))
    writer = broken.card_writer
    writer.max_cards = 2
    held = [new_uuid(), new_uuid()]
    writer.submit(SELECT, "hook-1", [CardRecord(held[0], "rule-a", "info")])
    deadline = time.monotonic() + 5
    while not writer.failing:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    writer.submit(SELECT, "hook-2", [CardRecord(held[1], "rule-a", "info")])
    dropped = new_uuid()
    started = time.perf_counter()
    writer.submit(SELECT, "hook-3", [CardRecord(dropped, "rule-a", "info")])  # over the bound
    assert time.perf_counter() - started < 0.5  # not written in the request: the database is down
    assert any("the queue is full" in r.getMessage() for r in caplog.records)
    working = FeedbackStore.open(f"sqlite:///{tmp_path / 'back.sqlite3'}")
    broken.engine = working.engine
    deadline = time.monotonic() + 10
    while writer.failing or writer.pending_cards():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    recorded = card_uuids(working)
    assert recorded == set(held)  # the two within the bound, not the one beyond
    working.close()


def test_cards_queued_while_a_batch_is_written_go_in_one_transaction(database_url: str) -> None:
    store = GatedStore.open(database_url)
    commits: list[int] = []
    event.listen(store.engine, "commit", lambda *_: commits.append(1))
    writer = store.card_writer
    try:
        writer.submit(SELECT, "hook-0", [CardRecord(new_uuid(), "rule-a", "warning")])
        assert store.writing.wait(5)  # the first batch is taken; the next ones accumulate
        for n in range(1, 51):
            writer.submit(SELECT, f"hook-{n}", [CardRecord(new_uuid(), "rule-a", "warning"),
                                                 CardRecord(new_uuid(), "rule-b", "info")])
        assert writer.pending_cards() == 100
    finally:
        store.gate.set()
    assert store.flush_recorder()
    assert store.batch_sizes == [1, 50]
    assert len(commits) == 2 and writer.batches_written == 2
    assert card_count(store) == 101


def test_a_batch_is_idempotent_per_card_uuid(database_url: str) -> None:
    store = FeedbackStore.open(database_url)
    card = new_uuid()
    # A client retrying a hookInstance gets the same uuids: recorded once, the first wins.
    now = datetime.now(UTC)
    first = CardBatch(SELECT, "hook-1", (CardRecord(card, "rule-a", "warning"),), now)
    retry = CardBatch(SELECT, "hook-1", (CardRecord(card.upper(), "rule-a", "warning"),), now)
    assert store.record_card_batches([first, retry]) == 1
    assert store.record_card_batches([retry]) == 0
    assert card_uuids(store) == {card}


def test_batched_rows_read_back_as_recorded_and_stored_as_core_stores_them(
    database_url: str,
) -> None:
    # SQLite's batch insert is driver SQL: it must store exactly what Core's insert stores.
    store = FeedbackStore.open(database_url)
    issued_at = datetime(2026, 11, 25, 13, 5, 9, 120034, tzinfo=UTC)
    cards = [CardRecord(new_uuid(), f"rule-{i}", "warning") for i in range(3)]
    assert store.record_card_batches([CardBatch(SELECT, "hook-9", tuple(cards), issued_at)]) == 3
    with store.engine.begin() as connection:
        connection.execute(
            insert(IssuedCard),
            {"card_uuid": new_uuid(), "service_id": SELECT, "rule_id": "rule-core",
             "indicator": "info", "hook_instance": "hook-9", "issued_at": issued_at},
        )
    with store.engine.connect() as connection:
        rows = connection.execute(
            select(
                IssuedCard.card_uuid, IssuedCard.service_id, IssuedCard.rule_id,
                IssuedCard.indicator, IssuedCard.hook_instance, IssuedCard.issued_at,
            ).where(IssuedCard.rule_id != "rule-core").order_by(IssuedCard.rule_id)
        ).all()
        stored = connection.exec_driver_sql(
            "SELECT DISTINCT issued_at FROM issued_cards WHERE hook_instance = 'hook-9'"
        ).scalars().all()
    assert [tuple(row) for row in rows] == [
        (card.card_uuid, SELECT, card.rule_id, "warning", "hook-9", issued_at) for card in cards
    ]
    assert stored == ["2026-11-25 13:05:09.120034"]  # one text for the instant, both ways


def test_a_full_queue_writes_in_the_request_rather_than_dropping(database_url: str) -> None:
    store = GatedStore.open(database_url)
    writer = store.card_writer
    writer.max_cards = 2
    try:
        writer.submit(SELECT, "hook-0", [CardRecord(new_uuid(), "rule-a", "warning")])
        assert store.writing.wait(5)
        queued = [new_uuid(), new_uuid()]
        writer.submit(SELECT, "hook-1", [CardRecord(c, "rule-a", "warning") for c in queued])
        overflow = new_uuid()
        done = threading.Event()

        def submit_overflow() -> None:
            writer.submit(SELECT, "hook-2", [CardRecord(overflow, "rule-a", "warning")])
            done.set()

        # The synchronous write goes through the same (gated) store: it too waits for "the
        # database", in the request's thread.
        threading.Thread(target=submit_overflow, daemon=True).start()
        assert not done.wait(0.3)
        assert writer.pending_cards() == 2  # not queued beyond the bound
    finally:
        store.gate.set()
    assert done.wait(10)
    assert store.flush_recorder()
    assert {*queued, overflow} <= card_uuids(store)


def test_exit_hook_writes_what_is_still_queued(database_url: str) -> None:
    store = FeedbackStore.open(database_url)
    cards = [new_uuid() for _ in range(20)]
    for n, card in enumerate(cards):
        store.card_writer.submit(SELECT, f"hook-{n}", [CardRecord(card, "rule-a", "info")])
    flush_writers_at_exit()  # what atexit runs when a worker ends
    assert set(cards) <= card_uuids(store)


def test_exit_hook_writes_from_its_own_thread_when_the_writer_is_stuck(database_url: str) -> None:
    stuck = GatedStore.open(database_url)
    healthy = FeedbackStore.open(database_url)
    stuck.card_writer.submit(SELECT, "hook-0", [CardRecord(new_uuid(), "rule-a", "info")])
    assert stuck.writing.wait(5)  # the thread holds this batch and does not come back
    late = new_uuid()
    stuck.card_writer.submit(SELECT, "hook-1", [CardRecord(late, "rule-a", "info")])
    # The exit hook cannot wait for the writer, so it writes the queue itself: through the
    # gated store too, so open the gate for that call only once the flush has timed out.
    threading.Timer(0.5, stuck.gate.set).start()
    flush_writers_at_exit(timeout=0.2)
    assert late in card_uuids(healthy)
    assert stuck.card_writer.pending_cards() == 0


def test_a_forked_process_starts_its_own_writer(database_url: str) -> None:
    store = FeedbackStore.open(database_url)
    parent_card, child_card = new_uuid(), new_uuid()
    store.card_writer.submit(SELECT, "hook-parent", [CardRecord(parent_card, "rule-a", "info")])
    assert store.flush_recorder()
    pid = os.fork()
    if pid == 0:  # the child: the parent's thread did not survive the fork
        status = 1
        try:
            store.card_writer.submit(SELECT, "hook-child", [CardRecord(child_card, "r", "info")])
            status = 0 if store.flush_recorder(10) else 2
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert {parent_card, child_card} <= card_uuids(store)


def test_feedback_right_after_a_call_on_another_instance_is_joined(database_url: str) -> None:
    # Two instances (two gunicorn workers) on one database; the one that issued the card
    # writes it 100 ms after answering, and the feedback goes to the other at once.
    issuer = create_app(Settings(auth="off"), store=SlowStore.open(database_url))
    other_store = FeedbackStore.open(database_url)
    other = create_app(Settings(auth="off"), store=other_store)
    card = service_call(issuer)
    assert other_store.issued_by([card]) == {}  # not yet written: only the grace period joins it
    started = time.perf_counter()
    response = other.test_client().post(f"/cds-services/{SELECT}/feedback", json={"feedback": [
        {"card": card, "outcome": "overridden", "outcomeTimestamp": STAMP}
    ]})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.get_json() == {"extension": {"org.magnesium-cds": {"stored": 1}}}
    assert time.perf_counter() - started < 5


def test_feedback_for_a_card_never_issued_waits_the_grace_period_then_flags_it(
    database_url: str,
) -> None:
    app = create_app(Settings(auth="off", database_url=database_url))
    stranger = new_uuid()
    started = time.perf_counter()
    response = app.test_client().post(f"/cds-services/{SELECT}/feedback", json={"feedback": [
        {"card": stranger, "outcome": "overridden", "outcomeTimestamp": STAMP}
    ]})
    assert time.perf_counter() - started >= UNKNOWN_CARD_GRACE_S
    assert response.get_json()["extension"]["org.magnesium-cds"] == {
        "stored": 1, "unknownCards": [stranger]
    }


def test_writer_without_a_thread_flushes_at_once() -> None:
    writer = CardWriter(lambda batches: None)
    assert writer.flush(0.01)  # nothing was ever queued in this process



def test_calls_within_the_group_commit_window_share_one_transaction() -> None:
    # One call at a time (a worker at concurrency 1): without the window every call would be
    # its own commit, whose Python work competes with the requests for the GIL.
    written: list[list[str]] = []
    wrote = threading.Event()

    def write(batches: Sequence[CardBatch]) -> None:
        written.append([batch.hook_instance for batch in batches])
        wrote.set()

    writer = CardWriter(write, window_s=0.3)
    started = time.monotonic()
    for n in range(3):
        writer.submit(SELECT, f"hook-{n}", [CardRecord(new_uuid(), "rule-a", "info")])
        time.sleep(0.02)
    assert wrote.wait(5)
    assert time.monotonic() - started >= 0.25  # the thread waited out the window
    assert written == [["hook-0", "hook-1", "hook-2"]]


def test_a_flush_does_not_wait_out_the_window() -> None:
    written: list[list[str]] = []
    writer = CardWriter(
        lambda batches: written.append([b.hook_instance for b in batches]), window_s=30
    )
    writer.submit(SELECT, "hook-0", [CardRecord(new_uuid(), "rule-a", "info")])
    started = time.monotonic()
    assert writer.flush(5)
    assert time.monotonic() - started < 2  # the feedback endpoint flushes before it looks
    assert written == [["hook-0"]]


def test_the_writer_survives_the_exit_drain_taking_its_queue_mid_window() -> None:
    written: list[list[str]] = []
    writer = CardWriter(
        lambda batches: written.append([b.hook_instance for b in batches]), window_s=0.3
    )
    writer.submit(SELECT, "hook-0", [CardRecord(new_uuid(), "rule-a", "info")])
    time.sleep(0.05)  # the thread is waiting out the window
    writer.drain_here()  # what the exit hook does after a failed flush
    time.sleep(0.4)  # the window ends with nothing left to take
    assert written == [["hook-0"]]
    thread = writer._thread
    assert thread is not None and thread.is_alive()
    writer.submit(SELECT, "hook-1", [CardRecord(new_uuid(), "rule-a", "info")])
    assert writer.flush(5) and written[-1] == ["hook-1"]
    assert writer._thread is thread  # the same thread, not a restarted one


def test_the_group_commit_window_fits_well_inside_the_feedback_grace_period() -> None:
    # Feedback sent to another worker waits UNKNOWN_CARD_GRACE_S for the issuing worker's
    # write, which can start a whole window after the answer (plus a commit).
    from cds_service.store.writer import GROUP_COMMIT_WINDOW_S

    assert GROUP_COMMIT_WINDOW_S * 4 <= UNKNOWN_CARD_GRACE_S
