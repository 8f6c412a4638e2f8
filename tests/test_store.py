"""The feedback store on SQLite and PostgreSQL: migrations, idempotent card records,
flags, UTC timestamps, concurrent writers and an unreachable database."""

from __future__ import annotations

import sqlite3
import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import func, inspect, select
from sqlalchemy.orm import Session

from cds_service.store import CardRecord, FeedbackEntry, FeedbackStore, StoreUnavailable, migrate
from cds_service.store.engine import make_engine
from cds_service.store.models import Feedback, IssuedCard
from cds_service.store.store import check_reportable

CARD = "0b7f4c4e-8d1a-4e3f-9c55-1f2a3b4c5d6e"
OTHER_CARD = "5d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d6"
NEVER_ISSUED = "99999999-9999-4999-8999-999999999999"


def count(store: FeedbackStore, model: type[IssuedCard] | type[Feedback]) -> int:
    with store.engine.connect() as connection:
        return int(connection.scalar(select(func.count()).select_from(model)) or 0)


def test_migrations_create_the_schema_on_an_empty_database(store_url: str) -> None:
    store = FeedbackStore.open(store_url)
    tables = set(inspect(store.engine).get_table_names())
    assert {"issued_cards", "feedback", "alembic_version"} <= tables
    assert migrate.current_revision(store.engine) == migrate.head_revision()
    # The migration scripts and the models describe the same schema.
    assert migrate.schema_differences(store.engine) == []
    columns = {c["name"] for c in inspect(store.engine).get_columns("issued_cards")}
    assert columns == {"id", "card_uuid", "service_id", "rule_id", "indicator", "hook_instance",
                       "issued_at"}  # nothing that identifies a patient or a user
    store.close()


def test_migrations_are_idempotent_and_keep_data(store_url: str) -> None:
    store = FeedbackStore.open(store_url)
    store.record_cards("magnesium-order-select", "hook-1", [CardRecord(CARD, "rule-a", "critical")])
    store.close()
    again = FeedbackStore.open(store_url)
    migrate.upgrade(again.engine)
    assert migrate.current_revision(again.engine) == migrate.head_revision()
    assert count(again, IssuedCard) == 1
    again.close()


def test_downgrade_to_base_and_back(store_url: str) -> None:
    store = FeedbackStore.open(store_url)
    migrate.downgrade(store.engine, "base")
    assert not {"issued_cards", "feedback"} & set(inspect(store.engine).get_table_names())
    migrate.upgrade(store.engine)
    assert migrate.schema_differences(store.engine) == []
    store.close()


def test_many_processes_starting_at_once_migrate_once(store_url: str) -> None:
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def open_store() -> None:
        try:
            start.wait()
            FeedbackStore.open(store_url).close()
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    store = FeedbackStore.open(store_url)
    assert migrate.current_revision(store.engine) == migrate.head_revision()
    store.close()


def test_a_new_sqlite_store_waits_for_a_writer_that_holds_the_file(tmp_path: Path) -> None:
    # Switching a new file to WAL needs an exclusive lock, and while another connection holds
    # a pending write SQLite says "database is locked" at once, without its busy timeout:
    # processes opening a new store together failed so about one time in ten.
    path = tmp_path / "store.sqlite3"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE other_app (x)")
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO other_app VALUES (1)")
    release = threading.Timer(0.3, lambda: holder.execute("COMMIT"))
    release.start()
    try:
        store = FeedbackStore.open(f"sqlite:///{path}")
    finally:
        release.join()
        holder.close()
    with store.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    assert migrate.current_revision(store.engine) == migrate.head_revision()
    store.close()


def test_cards_are_recorded_once_per_uuid(store_url: str) -> None:
    store = FeedbackStore.open(store_url)
    cards = [
        CardRecord(CARD.upper(), "rule-a", "critical"), CardRecord(OTHER_CARD, "rule-b", "info")
    ]
    assert store.record_cards("magnesium-order-select", "hook-1", cards) == 2
    # A client retrying the same hookInstance gets the same uuids: nothing new is stored.
    assert store.record_cards("magnesium-order-select", "hook-1", cards) == 0
    with Session(store.engine) as session:
        rows = session.scalars(select(IssuedCard).order_by(IssuedCard.rule_id)).all()
        assert [(r.card_uuid, r.rule_id, r.indicator) for r in rows] == [
            (CARD, "rule-a", "critical"), (OTHER_CARD, "rule-b", "info")
        ]
        assert all(r.issued_at.tzinfo is not None for r in rows)
    store.close()


def test_feedback_is_stored_and_flagged_when_it_matches_no_card_of_ours(store_url: str) -> None:
    store = FeedbackStore.open(store_url)
    store.record_cards("magnesium-order-select", "hook-1", [CardRecord(CARD, "rule-a", "critical")])
    store.record_cards("magnesium-order-sign", "hook-2", [CardRecord(OTHER_CARD, "rule-a", "info")])
    paris = timezone(timedelta(hours=2))
    receipt = store.store_feedback("magnesium-order-select", [
        FeedbackEntry(CARD, "accepted", datetime(2025, 3, 1, 12, 0, tzinfo=paris), ("sugg-1",)),
        FeedbackEntry(OTHER_CARD, "overridden", datetime(2025, 3, 1, 10, 0, tzinfo=UTC),
                      reason_system="urn:x", reason_code="benefit", user_comment="why not"),
        FeedbackEntry(NEVER_ISSUED, "overridden", datetime(2025, 3, 1, 10, 0, tzinfo=UTC)),
    ])
    assert receipt.stored == 3
    assert receipt.unknown_cards == (NEVER_ISSUED,)
    assert receipt.other_service_cards == (OTHER_CARD,)
    with Session(store.engine) as session:
        rows = {r.card_uuid: r for r in session.scalars(select(Feedback))}
    assert rows[CARD].flag is None
    assert rows[CARD].accepted_suggestions == ["sugg-1"]
    assert rows[CARD].outcome_at == datetime(2025, 3, 1, 10, 0, tzinfo=UTC)  # kept as UTC
    assert rows[OTHER_CARD].flag == "other-service"
    assert (rows[OTHER_CARD].override_reason_code, rows[OTHER_CARD].user_comment) == (
        "benefit", "why not"
    )
    assert rows[OTHER_CARD].accepted_suggestions is None
    assert rows[NEVER_ISSUED].flag == "unknown-card"
    store.close()


def test_concurrent_writers_lose_nothing(store_url: str) -> None:
    store = FeedbackStore.open(store_url)
    threads_n, per_thread = 8, 25
    errors: list[BaseException] = []
    start = threading.Barrier(threads_n)

    def work(t: int) -> None:
        try:
            start.wait()
            for i in range(per_thread):
                card = f"{t:08x}-0000-4000-8000-{i:012x}"
                store.record_cards("magnesium-order-select", f"hook-{t}-{i}",
                                   [CardRecord(card, "rule-a", "warning")])
                store.store_feedback("magnesium-order-select", [
                    FeedbackEntry(card, "overridden", datetime.now(UTC), reason_code="x")
                ])
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert count(store, IssuedCard) == threads_n * per_thread
    assert count(store, Feedback) == threads_n * per_thread
    with store.engine.connect() as connection:
        assert connection.scalar(select(func.count()).where(Feedback.flag.is_not(None))) == 0
    store.close()


def test_an_unreachable_database_is_reported_not_raised() -> None:
    store = FeedbackStore(make_engine("sqlite:////nonexistent-dir/for/sure/cds.sqlite3"))
    assert (store.readiness() or "").startswith("unavailable")
    with pytest.raises(StoreUnavailable):
        store.store_feedback("magnesium-order-select", [
            FeedbackEntry(CARD, "overridden", datetime.now(UTC))
        ])
    with pytest.raises(StoreUnavailable):
        store.record_cards("magnesium-order-select", "h", [CardRecord(CARD, "rule-a", "info")])
    down = FeedbackStore(make_engine("postgresql+psycopg://u:secret@127.0.0.1:9/db"))
    assert (down.readiness() or "").startswith("unavailable")
    problem = check_reportable("postgresql+psycopg://u:secret@127.0.0.1:9/db")
    assert problem is not None and "secret" not in problem  # never print the password


def test_a_report_never_creates_or_migrates_a_database(tmp_path: Path) -> None:
    missing = tmp_path / "missing.sqlite3"
    assert "no feedback database" in (check_reportable(f"sqlite:///{missing}") or "")
    assert not missing.exists()
    empty = tmp_path / "empty.sqlite3"
    FeedbackStore(make_engine(f"sqlite:///{empty}")).ping()
    assert "start the service once" in (check_reportable(f"sqlite:///{empty}") or "")


def test_the_same_feedback_is_stored_once(store_url: str) -> None:
    store = FeedbackStore.open(store_url)
    store.record_cards("magnesium-order-select", "hook-1", [CardRecord(CARD, "rule-a", "info")])
    at = datetime(2025, 3, 1, 10, 0, tzinfo=UTC)
    entry = FeedbackEntry(CARD, "overridden", at, reason_code="benefit", user_comment="first")
    first = store.store_feedback("magnesium-order-select", [entry, entry])
    assert (first.stored, first.duplicates) == (1, 1)
    # The same instant written in another offset is the same report: stored once.
    paris = datetime(2025, 3, 1, 11, 0, tzinfo=timezone(timedelta(hours=1)))
    again = store.store_feedback("magnesium-order-select", [
        FeedbackEntry(CARD, "overridden", paris, user_comment="second"),
        FeedbackEntry(CARD, "overridden", at + timedelta(seconds=1)),  # a later override
    ])
    assert (again.stored, again.duplicates) == (1, 1)
    with Session(store.engine) as session:
        rows = session.scalars(select(Feedback).order_by(Feedback.outcome_at)).all()
    assert [(r.outcome_at, r.user_comment) for r in rows] == [
        (at, "first"), (at + timedelta(seconds=1), None)
    ]
    store.close()


def test_the_migration_to_feedback_stored_once_keeps_the_first_of_repeated_rows(
    store_url: str,
) -> None:
    engine = make_engine(store_url)
    migrate.upgrade(engine, "0002")
    at = datetime(2025, 3, 1, 10, 0, tzinfo=UTC)
    rows = [
        {"card_uuid": CARD, "service_id": "s", "outcome": "overridden", "outcome_at": at,
         "received_at": at, "user_comment": comment, "flag": None}
        for comment in ("kept", "repeat", "repeat again")
    ]
    rows.append({**rows[0], "card_uuid": OTHER_CARD, "user_comment": "other card"})
    with engine.begin() as connection:
        for row in rows:
            connection.execute(Feedback.__table__.insert(), row)
    migrate.upgrade(engine)
    with Session(engine) as session:
        comments = sorted(r.user_comment or "" for r in session.scalars(select(Feedback)))
    assert comments == ["kept", "other card"]
    engine.dispose()
