"""Alembic environment: always run from ``cds_service.store.migrate`` with a live connection.

The caller holds the connection (and the migration lock); this file only configures Alembic
on it. There is no ``alembic.ini``: see ``migrations/README.md``.
"""

from __future__ import annotations

from alembic import context

from cds_service.store.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through cds_service.store.migrate (it passes a connection)")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite cannot ALTER most things; batch mode copies the table instead.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
