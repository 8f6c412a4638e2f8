"""FeedbackStore: records the cards we issue and the feedback clients send about them, and
keeps the JWT replay cache that every worker and instance shares.

Every write is one short transaction; on SQLite it takes the write lock up front (see
``engine.py``), so concurrent writers from several processes queue instead of failing. The
cards of service calls are written by a background thread per process (``writer.py``), many
calls per transaction, so requests do not queue for that lock.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Dialect, Engine, bindparam, delete, insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from cds_service.store import migrate
from cds_service.store.engine import WRITE, make_engine, redacted
from cds_service.store.models import (
    FLAG_OTHER_SERVICE,
    FLAG_UNKNOWN_CARD,
    Feedback,
    IssuedCard,
    SeenToken,
)
from cds_service.store.writer import CardBatch, CardWriter

log = logging.getLogger(__name__)

# What "the database is not there right now" looks like, as opposed to a bug.
_UNAVAILABLE = (OperationalError, InterfaceError, DisconnectionError, PoolTimeoutError)
# Expired replay-cache rows are deleted once every this many tokens (per process): cheap
# enough, and the table stays near the number of tokens live at once.
TOKEN_PURGE_EVERY = 500
# Backends whose INSERT ... ON CONFLICT ... RETURNING decides a token in one statement.
_UPSERT_DIALECTS = frozenset({"sqlite", "postgresql"})


class StoreUnavailable(RuntimeError):
    """The database could not be reached or stayed locked; the write did not happen."""


@dataclass(frozen=True)
class CardRecord:
    """What is kept of one issued card: no patient or user data."""

    card_uuid: str
    rule_id: str
    indicator: str


@dataclass(frozen=True)
class FeedbackEntry:
    """One validated item of a feedback request."""

    card_uuid: str
    outcome: str
    outcome_at: datetime
    accepted_suggestions: tuple[str, ...] = ()
    reason_system: str | None = None
    reason_code: str | None = None
    reason_display: str | None = None
    user_comment: str | None = None


@dataclass(frozen=True)
class FeedbackReceipt:
    stored: int  # rows added
    unknown_cards: tuple[str, ...]  # never issued here
    other_service_cards: tuple[str, ...]  # issued by another service id
    duplicates: int = 0  # entries already on record (same card, outcome and outcome time)


class FeedbackStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.token_purge_every = TOKEN_PURGE_EVERY
        self._tokens_remembered = itertools.count(1)  # next() is atomic under the GIL
        # Service calls queue their cards here; a thread of the calling process writes them.
        self.card_writer = CardWriter(self.record_card_batches)

    @classmethod
    def open(cls, database_url: str, *, migrate_schema: bool = True) -> FeedbackStore:
        """Connect and bring the schema to head (creating the SQLite file if needed)."""
        store = cls(make_engine(database_url))
        if migrate_schema:
            migrate.upgrade(store.engine)
        # gunicorn forks after this: leave no pooled connection behind in the master.
        store.engine.dispose()
        return store

    @property
    def url(self) -> str:
        return redacted(self.engine.url)

    def close(self) -> None:
        self.flush_recorder()
        self.engine.dispose()

    def ping(self) -> None:
        try:
            with self.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(type(exc).__name__) from exc

    def readiness(self) -> str | None:
        """For /readyz: None when the database answers, else why not."""
        try:
            self.ping()
        except StoreUnavailable as exc:
            return f"unavailable: {exc}"
        return None

    def _write(self) -> Connection:
        return self.engine.connect().execution_options(**{WRITE: True})

    def record_cards(
        self,
        service_id: str,
        hook_instance: str,
        cards: Iterable[CardRecord],
        issued_at: datetime | None = None,
    ) -> int:
        """Store each card once; a retried hookInstance yields the same uuids and adds nothing.

        Returns how many rows were new. Synchronous; a service call uses ``card_writer``.
        """
        batch = CardBatch(service_id, hook_instance, tuple(cards), issued_at or datetime.now(UTC))
        return self.record_card_batches([batch])

    def record_card_batches(self, batches: Sequence[CardBatch]) -> int:
        """``record_cards`` for the cards of several calls, in ONE transaction (the background
        writer's batch). Returns how many rows were new."""
        rows: dict[str, dict[str, Any]] = {}
        for batch in batches:
            for card in batch.cards:
                uuid = card.card_uuid.lower()
                # The first wins, as in the table: a retry repeats the same uuid.
                rows.setdefault(uuid, {
                    "card_uuid": uuid,
                    "service_id": batch.service_id,
                    "rule_id": card.rule_id,
                    "indicator": card.indicator,
                    "hook_instance": batch.hook_instance,
                    "issued_at": batch.issued_at,
                })
        if not rows:
            return 0
        try:
            with self._write() as connection, connection.begin():
                return _insert_cards_once(connection, list(rows.values()))
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(type(exc).__name__) from exc

    def flush_recorder(self, timeout: float = 5.0) -> bool:
        """Wait until the cards this process queued so far are written; False on timeout."""
        return self.card_writer.flush(timeout)

    def issued_by(self, card_uuids: Iterable[str]) -> dict[str, str]:
        """Card uuid (lower case) → the service id that issued it, for those on record."""
        uuids = sorted({uuid.lower() for uuid in card_uuids})
        found: dict[str, str] = {}
        try:
            with self.engine.connect() as connection:
                for chunk in _chunks(uuids, 500):
                    found.update(_issued_by(connection, chunk))
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(type(exc).__name__) from exc
        return found

    def store_feedback(
        self, service_id: str, entries: Sequence[FeedbackEntry], received_at: datetime | None = None
    ) -> FeedbackReceipt:
        """Store every entry in one transaction, flagging those that match no card of ours."""
        received_at = received_at or datetime.now(UTC)
        try:
            return self._store_feedback(service_id, entries, received_at)
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(type(exc).__name__) from exc

    def _store_feedback(
        self, service_id: str, entries: Sequence[FeedbackEntry], received_at: datetime
    ) -> FeedbackReceipt:
        uuids = sorted({entry.card_uuid.lower() for entry in entries})
        with self._write() as connection, connection.begin():
            issued_by: dict[str, str] = {}
            for chunk in _chunks(uuids, 500):  # stay under any backend's bound-parameter limit
                issued_by.update(_issued_by(connection, chunk))
            unknown: list[str] = []
            other: list[str] = []
            rows: list[dict[str, Any]] = []
            seen: set[tuple[str, str, datetime]] = set()
            for entry in entries:
                card = entry.card_uuid.lower()
                key = (card, entry.outcome, entry.outcome_at)
                if key in seen:  # repeated within the body: stored once, like a retry
                    continue
                seen.add(key)
                flag = None
                if card not in issued_by:
                    flag = FLAG_UNKNOWN_CARD
                    unknown.append(card)
                elif issued_by[card] != service_id:
                    flag = FLAG_OTHER_SERVICE
                    other.append(card)
                rows.append({
                    "card_uuid": card,
                    "service_id": service_id,
                    "outcome": entry.outcome,
                    "outcome_at": entry.outcome_at,
                    "received_at": received_at,
                    "accepted_suggestions": list(entry.accepted_suggestions) or None,
                    "override_reason_system": entry.reason_system,
                    "override_reason_code": entry.reason_code,
                    "override_reason_display": entry.reason_display,
                    "user_comment": entry.user_comment,
                    "flag": flag,
                })
            added = _insert_feedback_once(connection, rows) if rows else 0
        return FeedbackReceipt(
            added,
            tuple(dict.fromkeys(unknown)),
            tuple(dict.fromkeys(other)),
            duplicates=len(entries) - added,
        )

    def remember_token(
        self, token_key: str, expires_at: datetime, *, now: datetime | None = None
    ) -> bool:
        """Record an accepted JWT until ``expires_at``: True on first use, False on a replay.

        One INSERT on the primary key, so of concurrent calls with the same key (any worker,
        any instance) exactly one gets True. A row already expired at ``now`` is taken over:
        once a token has expired its jti may be used again. StoreUnavailable when the
        database cannot say; the caller must then refuse the token.
        """
        now = now or datetime.now(UTC)
        try:
            with self._write() as connection, connection.begin():
                first_use = _remember_token(connection, token_key, expires_at, now)
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(type(exc).__name__) from exc
        if next(self._tokens_remembered) % self.token_purge_every == 0:
            try:
                self.purge_expired_tokens(now)
            except StoreUnavailable as exc:  # the token is recorded; the next purge catches up
                log.warning("could not purge expired replay-cache rows: %s", exc)
        return first_use

    def purge_expired_tokens(self, now: datetime | None = None) -> int:
        """Delete the replay-cache rows of tokens expired at ``now``; returns how many."""
        now = now or datetime.now(UTC)
        try:
            with self._write() as connection, connection.begin():
                result = connection.execute(delete(SeenToken).where(SeenToken.expires_at < now))
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(type(exc).__name__) from exc
        return int(result.rowcount)


def check_reportable(database_url: str) -> str | None:
    """Why a report cannot be read from this database, or None. Never creates or migrates:
    a report is read-only, and only the service itself upgrades the schema."""
    url = make_url(database_url)
    on_disk = url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:")
    if on_disk and not Path(str(url.database)).exists():
        return f"no feedback database at {url.database} (the service creates it at start-up)"
    engine = make_engine(url)
    try:
        revision = migrate.current_revision(engine)
    except _UNAVAILABLE as exc:
        return f"cannot reach {redacted(url)}: {type(exc).__name__}"
    finally:
        engine.dispose()
    head = migrate.head_revision()
    if revision != head:
        return (
            f"the feedback store at {redacted(url)} has schema revision {revision or 'none'}, "
            f"this version reads {head}: start the service once to migrate it"
        )
    return None


def _insert_cards_once(connection: Connection, rows: list[dict[str, Any]]) -> int:
    dialect = connection.dialect.name
    if dialect == "sqlite":
        # The card writer's every batch: the driver's executemany of one fixed statement costs
        # half what Core's multi-row INSERT ... RETURNING does in Python (which holds the GIL
        # the request threads need). sqlite3 sums the rows each INSERT added into rowcount, and
        # ON CONFLICT DO NOTHING adds none for a uuid already on record.
        sql, columns, processors = _sqlite_card_insert(connection.dialect)
        values = [
            tuple(
                process(row[name]) if process is not None else row[name]
                for name, process in zip(columns, processors, strict=True)
            )
            for row in rows
        ]
        return int(connection.exec_driver_sql(sql, values).rowcount)
    if dialect == "postgresql":
        statement = (
            postgresql_insert(IssuedCard)
            .on_conflict_do_nothing(index_elements=["card_uuid"])
            .returning(IssuedCard.id)  # rowcount is not reliable with RETURNING-capable drivers
        )
        # One executemany: SQLAlchemy sends it as multi-row INSERTs ("insertmanyvalues"),
        # and RETURNING yields a row only for each card that was new.
        return len(connection.execute(statement, rows).all())
    # Other backends: skip what exists; a concurrent insert of the same uuid is a retry of the
    # same hookInstance, so losing that race loses nothing.
    wanted = [row["card_uuid"] for row in rows]
    existing = set(
        connection.scalars(select(IssuedCard.card_uuid).where(IssuedCard.card_uuid.in_(wanted)))
    )
    added = 0
    for row in rows:
        if row["card_uuid"] in existing:
            continue
        try:
            with connection.begin_nested():
                connection.execute(insert(IssuedCard), row)
            added += 1
        except IntegrityError:
            pass
    return added


_FEEDBACK_KEY = ["card_uuid", "outcome", "outcome_at"]


def _insert_feedback_once(connection: Connection, rows: list[dict[str, Any]]) -> int:
    """Insert the rows not yet on record (by card, outcome and outcome time); how many were
    new. A concurrent identical report loses the race on the unique index and adds nothing."""
    dialect = connection.dialect.name
    if dialect in _UPSERT_DIALECTS:
        insert_fn = sqlite_insert if dialect == "sqlite" else postgresql_insert
        statement = (
            insert_fn(Feedback)
            .on_conflict_do_nothing(index_elements=_FEEDBACK_KEY)
            .returning(Feedback.id)
        )
        return len(connection.execute(statement, rows).all())
    added = 0
    for row in rows:
        try:
            with connection.begin_nested():
                connection.execute(insert(Feedback), row)
            added += 1
        except IntegrityError:
            pass
    return added


@lru_cache(maxsize=8)  # per engine's dialect: one in a service, a few in a test session
def _sqlite_card_insert(
    dialect: Dialect,
) -> tuple[str, tuple[str, ...], tuple[Callable[[Any], Any] | None, ...]]:
    """The SQLite card insert as driver SQL, its parameters' column names in order, and each
    column type's bind processor (UtcDateTime stores UTC wall time as text): what Core would
    send, rendered once."""
    statement = sqlite_insert(IssuedCard).on_conflict_do_nothing(index_elements=["card_uuid"])
    columns = tuple(
        column.name for column in IssuedCard.__table__.columns if column.name != "id"
    )
    compiled = statement.values({name: bindparam(name) for name in columns}).compile(
        dialect=dialect
    )
    order = tuple(compiled.positiontup or ())
    assert set(order) == set(columns), order  # one positional parameter per column
    table = IssuedCard.__table__
    processors = tuple(table.c[name].type.bind_processor(dialect) for name in order)
    return str(compiled), order, processors


@cache
def _remember_token_upsert(dialect: str) -> Any:
    """The replay check's one statement, built once per dialect: it runs on every
    authenticated call, and building it each time cost more than executing it."""
    insert_fn = sqlite_insert if dialect == "sqlite" else postgresql_insert
    statement = insert_fn(SeenToken).values(
        token_key=bindparam("token_key"), expires_at=bindparam("expires_at")
    )
    return statement.on_conflict_do_update(
        index_elements=["token_key"],
        set_={"expires_at": statement.excluded.expires_at},
        # A row expiring exactly now still guards a token the verifier would accept (exp is
        # inclusive), so only strictly earlier ones may be taken over.
        where=SeenToken.expires_at < bindparam("now"),
    ).returning(SeenToken.token_key)  # a row back: inserted, or an expired one taken over


def _remember_token(
    connection: Connection, token_key: str, expires_at: datetime, now: datetime
) -> bool:
    row = {"token_key": token_key, "expires_at": expires_at}
    dialect = connection.dialect.name
    if dialect in _UPSERT_DIALECTS:
        statement = _remember_token_upsert(dialect)
        return connection.execute(statement, {**row, "now": now}).first() is not None
    expired = SeenToken.expires_at < now
    # Other backends: the primary key refuses the second insert; the savepoint keeps the
    # transaction usable for taking over an expired row.
    try:
        with connection.begin_nested():
            connection.execute(insert(SeenToken), row)
        return True
    except IntegrityError:
        taken_over = connection.execute(
            update(SeenToken)
            .where(SeenToken.token_key == token_key, expired)
            .values(expires_at=expires_at)
        )
        return taken_over.rowcount == 1


def _issued_by(connection: Connection, uuids: list[str]) -> dict[str, str]:
    query = select(IssuedCard.card_uuid, IssuedCard.service_id).where(
        IssuedCard.card_uuid.in_(uuids)
    )
    return {uuid: service for uuid, service in connection.execute(query).all()}


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
