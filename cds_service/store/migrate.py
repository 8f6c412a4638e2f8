"""Versioned schema migrations (Alembic), run programmatically at start-up.

Several gunicorn workers or a fleet of instances may start at once: the whole upgrade runs in
one transaction that first takes a lock (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: a
transaction-scoped advisory lock), so the first process migrates and the others then find the
schema at head and do nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text

from cds_service.store.engine import WRITE, make_engine
from cds_service.store.models import Base

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

log = logging.getLogger(__name__)
# Alembic's INFO lines ("Will assume non-transactional DDL", …) mislead here: we run it inside
# our own locked transaction. We log what changed ourselves.
logging.getLogger("alembic").setLevel(logging.WARNING)
# Any constant, as long as every instance of this service uses the same one.
_PG_ADVISORY_LOCK_KEY = 0x6D61676E6573


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, "no migration scripts found"
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision``; safe to call from many processes at once."""
    with engine.connect().execution_options(**{WRITE: True}) as connection, connection.begin():
        if connection.dialect.name == "postgresql":
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_ADVISORY_LOCK_KEY}
            )
        before = MigrationContext.configure(connection).get_current_revision()
        command.upgrade(alembic_config(connection), revision)
        after = MigrationContext.configure(connection).get_current_revision()
    if before != after:
        log.info("feedback store schema migrated from %s to %s", before or "empty", after)


def downgrade(engine: Engine, revision: str) -> None:
    with engine.connect().execution_options(**{WRITE: True}) as connection, connection.begin():
        command.downgrade(alembic_config(connection), revision)


def schema_differences(engine: Engine) -> list[object]:
    """What Alembic's autogenerate would change: empty when migrations match the models."""
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))


def autogenerate(database_url: str, message: str) -> None:
    """Draft a new revision against a database at the current head (developers only)."""
    engine = make_engine(database_url)
    upgrade(engine)
    with engine.connect() as connection, connection.begin():
        command.revision(alembic_config(connection), message=message, autogenerate=True)
