"""SQLAlchemy engines for the feedback store: SQLite by default, any URL for a fleet.

SQLite is made fit for several gunicorn workers writing at once: WAL (readers never block
the writer), a busy timeout (a writer waits for the lock instead of failing) and
``BEGIN IMMEDIATE`` for write transactions (the write lock is taken up front, so a
transaction never has to upgrade a read snapshot, which SQLite refuses without waiting).
"""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Any

from sqlalchemy import Engine, create_engine, event, exc
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import StaticPool

# How long a SQLite writer waits for another process's write lock. Writes are tiny, so this
# only matters under heavy contention; it stays below gunicorn's default worker timeout.
SQLITE_BUSY_TIMEOUT_MS = 15_000
# A database server that does not answer must not hold a request for long.
CONNECT_TIMEOUT_S = 5
# Execution option: a write transaction (on SQLite it starts with BEGIN IMMEDIATE).
WRITE = "cds_write"


def make_engine(database_url: str | URL) -> Engine:
    url = make_url(database_url)
    # A server connection can die between requests; a local SQLite file cannot, so it skips
    # the extra round trip on every checkout.
    kwargs: dict[str, Any] = {"pool_pre_ping": url.get_backend_name() != "sqlite"}
    if url.get_backend_name() == "sqlite":
        kwargs["connect_args"] = {
            "check_same_thread": False,  # the pool hands connections to gunicorn's threads
            "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000,
        }
        if url.database in (None, "", ":memory:"):
            # One shared connection, or every thread would see its own empty database.
            kwargs["poolclass"] = StaticPool
    elif url.get_backend_name() == "postgresql":
        kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    engine = create_engine(url, **kwargs)
    if url.get_backend_name() == "sqlite":
        _configure_sqlite(engine, in_memory=url.database in (None, "", ":memory:"))
    _discard_connections_inherited_across_fork(engine)
    return engine


def _configure_sqlite(engine: Engine, *, in_memory: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # We issue BEGIN ourselves (below); pysqlite's own implicit BEGIN is deferred and
        # skips DDL, which breaks both write locking and transactional migrations.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            if not in_memory:
                _switch_to_wal(cursor)
                # In WAL mode, NORMAL syncs at checkpoints rather than at every commit: a
                # crash of the service loses nothing; a power cut may lose the last commits
                # of an audit trail, not clinical data. It halves the cost of every call.
                cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.execute("PRAGMA foreign_keys = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        immediate = connection.get_execution_options().get(WRITE, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _switch_to_wal(cursor: Any) -> None:
    """``PRAGMA journal_mode = WAL``, waiting for the lock it needs like any other writer.

    Switching a new database to WAL takes an exclusive lock, and while another connection
    holds a pending write SQLite answers "database is locked" at once, without its busy
    timeout: several processes opening a new store together failed that way. Once the file
    is in WAL mode (it stays so), the statement needs no lock.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    pause = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as error:
            busy = error.sqlite_errorname.startswith("SQLITE_BUSY")  # Python 3.11+
            if not busy or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


def _discard_connections_inherited_across_fork(engine: Engine) -> None:
    """gunicorn preloads the app, then forks: a pooled connection must never cross a fork.

    SQLAlchemy's documented recipe: a connection checked out in a process other than the one
    that opened it is invalidated and a fresh one opened.
    """

    @event.listens_for(engine, "connect")
    def _remember_pid(_dbapi_connection: Any, record: Any) -> None:
        record.info["pid"] = os.getpid()

    @event.listens_for(engine, "checkout")
    def _check_pid(_dbapi_connection: Any, record: Any, proxy: Any) -> None:
        if record.info.get("pid") != os.getpid():
            record.dbapi_connection = proxy.dbapi_connection = None
            raise exc.DisconnectionError("connection opened in another process")


def redacted(url: str | URL) -> str:
    """The URL without its password, for logs and messages."""
    return make_url(url).render_as_string(hide_password=True)
