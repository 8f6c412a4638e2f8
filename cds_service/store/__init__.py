"""Feedback persistence: issued cards, clinicians' feedback, and the reports built on them."""

from cds_service.store.store import (
    CardRecord,
    FeedbackEntry,
    FeedbackReceipt,
    FeedbackStore,
    StoreUnavailable,
)

__all__ = ["CardRecord", "FeedbackEntry", "FeedbackReceipt", "FeedbackStore", "StoreUnavailable"]
