"""The feedback store's tables. Migrations in ``migrations/versions`` must match these
(``tests/test_store.py`` compares them), so a change here needs a new revision there.

Nothing here identifies a patient or a clinician: a card is kept by its uuid, the rule that
produced it and the hookInstance it answered, never with the context or prefetch data.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import CHAR, JSON, DateTime, Index, Integer, MetaData, String, Text, TypeDecorator
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Stable constraint names, so later migrations (and SQLite batch mode) can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Feedback flags: why an entry could not be joined cleanly to a card we issued.
FLAG_UNKNOWN_CARD = "unknown-card"  # no card with this uuid was ever issued here
FLAG_OTHER_SERVICE = "other-service"  # the card was issued by another service id


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out, whatever the backend keeps (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: the store keeps UTC instants only")
        value = value.astimezone(UTC)
        # SQLite stores the wall time as text; keep it UTC and zone-less so it sorts.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class IssuedCard(Base):
    """One card this service returned. The uuid is derived from hookInstance and finding,
    so a client retrying the same hookInstance gets the same card, stored once."""

    __tablename__ = "issued_cards"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    card_uuid: Mapped[str] = mapped_column(String(36), unique=True)
    service_id: Mapped[str] = mapped_column(String(100))
    rule_id: Mapped[str] = mapped_column(String(100))
    indicator: Mapped[str] = mapped_column(String(16))
    hook_instance: Mapped[str] = mapped_column(String(64))
    issued_at: Mapped[datetime] = mapped_column(UtcDateTime())

    __table_args__ = (
        Index("ix_issued_cards_issued_at", "issued_at"),
        Index("ix_issued_cards_rule_id", "rule_id"),
    )


class Feedback(Base):
    """One feedback entry as a CDS client sent it; kept even when it matches no card."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # Not a foreign key: feedback for a card we never issued is stored too (and flagged).
    card_uuid: Mapped[str] = mapped_column(String(36))
    service_id: Mapped[str] = mapped_column(String(100))  # the endpoint it was posted to
    outcome: Mapped[str] = mapped_column(String(16))  # accepted | overridden
    outcome_at: Mapped[datetime] = mapped_column(UtcDateTime())
    received_at: Mapped[datetime] = mapped_column(UtcDateTime())
    accepted_suggestions: Mapped[list[str] | None] = mapped_column(
        JSON(none_as_null=True), nullable=True
    )
    override_reason_system: Mapped[str | None] = mapped_column(Text, nullable=True)
    override_reason_code: Mapped[str | None] = mapped_column(Text, nullable=True)
    override_reason_display: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Free text typed by the clinician: kept as sent, never printed by the reports.
    user_comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    flag: Mapped[str | None] = mapped_column(String(32), nullable=True)

    __table_args__ = (
        Index("ix_feedback_card_uuid", "card_uuid"),
        # The same report sent again (a client retrying) is one row, not many.
        Index("ux_feedback_card_outcome_at", "card_uuid", "outcome", "outcome_at", unique=True),
    )


class SeenToken(Base):
    """A JWT already accepted, kept until it expires: the replay cache shared by every worker
    and instance. Only a digest of its ``iss`` and ``jti`` is kept, never the jti or token."""

    __tablename__ = "seen_tokens"

    # sha256 hex of iss + "\n" + jti: the primary key makes a second insert collide.
    token_key: Mapped[str] = mapped_column(CHAR(64), primary_key=True)
    # exp + leeway: until then the same iss/jti is a replay.
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())

    __table_args__ = (Index("ix_seen_tokens_expires_at", "expires_at"),)
