"""Feedback stored once per card, outcome and outcome time: a retried report adds no row.

Rows already repeated are reduced to the first one received.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-08
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    feedback = sa.table(
        "feedback",
        sa.column("id", sa.Integer),
        sa.column("card_uuid", sa.String),
        sa.column("outcome", sa.String),
        sa.column("outcome_at", sa.DateTime),
    )
    first_of_each = (
        sa.select(sa.func.min(feedback.c.id))
        .group_by(feedback.c.card_uuid, feedback.c.outcome, feedback.c.outcome_at)
        .scalar_subquery()
    )
    op.execute(sa.delete(feedback).where(feedback.c.id.not_in(first_of_each)))
    op.create_index(
        "ux_feedback_card_outcome_at",
        "feedback",
        ["card_uuid", "outcome", "outcome_at"],
        unique=True,
    )


def downgrade() -> None:
    op.drop_index("ux_feedback_card_outcome_at", table_name="feedback")
