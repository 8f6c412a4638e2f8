"""A per-process background writer for issued cards.

Recording the cards of every service call inside the request made each call wait for the
database's write lock; on SQLite that lock is shared by every gunicorn worker, so throughput
plateaued at one commit at a time. The request now only enqueues; one daemon thread per
process takes whatever has accumulated and writes it in one transaction per batch (one lock
per batch, not per call).

Group commit: once work arrives the thread waits up to ``GROUP_COMMIT_WINDOW_S`` for more before
it writes. Without that window a worker serving one call at a time committed once per call,
and each commit's Python work (SQLAlchemy, the driver) ran in this thread while the request
threads waited for the GIL: over HTTP that cost more CPU per call than reading the patient.

The cost: cards reach the database up to a window (plus a commit) after the answer, and a crash
of the process (not a normal exit: ``atexit`` flushes) can lose the cards not yet written.
Feedback for a card that is still queued is handled by the feedback endpoint (flush, which
skips the window, then a short grace period that is longer than the window).

A database outage does not lose cards: a batch that could not be written goes back to the head
of the queue and the thread tries again, waiting longer each time (up to ``RETRY_MAX_S``). The
queue holds at most ``max_cards``; what arrives beyond that while the database is down is
dropped, with an ERROR line and a metric (a process's memory is the bound).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from cds_service.metrics import CARD_WRITER_DROPPED, CARD_WRITER_QUEUE

if TYPE_CHECKING:  # store.py imports this module
    from cds_service.store.store import CardRecord

log = logging.getLogger(__name__)

# Cards waiting to be written, per process. Far above what a worker issues between two
# commits; when full, a request writes its own cards (slower, never lost).
QUEUE_MAX_CARDS = 10_000
# How long process exit waits for the last batch before giving up on it.
EXIT_FLUSH_TIMEOUT_S = 5.0
# How long the thread gathers calls into one transaction. Well under the feedback endpoint's
# grace period for cards another worker has not yet written (UNKNOWN_CARD_GRACE_S).
GROUP_COMMIT_WINDOW_S = 0.025
# A batch this large is written without waiting for the window to end.
GROUP_COMMIT_MAX_CARDS = 500
# After a failed write: wait this long before the next try, doubling up to RETRY_MAX_S.
RETRY_FIRST_S = 0.25
RETRY_MAX_S = 5.0


@dataclass(frozen=True)
class CardBatch:
    """The cards of one service call, as queued."""

    service_id: str
    hook_instance: str
    cards: tuple[CardRecord, ...]
    issued_at: datetime  # when the answer was made, not when the row is written


WriteBatches = Callable[[Sequence[CardBatch]], object]


class CardWriter:
    """Queues card batches; a daemon thread of the recording process writes them.

    ``write_batches`` writes a list of batches in ONE transaction, idempotently per card uuid
    (``FeedbackStore.record_card_batches``), and raises when the database cannot be reached.
    """

    def __init__(
        self,
        write_batches: WriteBatches,
        *,
        max_cards: int = QUEUE_MAX_CARDS,
        window_s: float = GROUP_COMMIT_WINDOW_S,
    ) -> None:
        self._write_batches = write_batches
        self.max_cards = max_cards
        self.window_s = window_s
        self._reset()
        _WRITERS.add(self)

    def _reset(self) -> None:
        # Also run in a freshly forked child (see _after_fork): the parent's lock may have
        # been held by one of its threads at fork time, and its queue is the parent's to write.
        self._lock = threading.Lock()
        self._has_work = threading.Condition(self._lock)
        self._progress = threading.Condition(self._lock)
        self._queue: list[tuple[int, CardBatch]] = []
        self._queued_cards = 0
        self._enqueued = 0  # sequence number of the last batch queued
        self._done = 0  # every batch up to this sequence number is written (or failed)
        self._hurry = False  # a flush is waiting: write now, do not wait out the window
        self._failing_since: float | None = None  # the database refused the last write
        self._retry_delay = RETRY_FIRST_S
        self._drops_logged = False
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self.batches_written = 0  # transactions committed by the thread (tests, diagnostics)

    def submit(self, service_id: str, hook_instance: str, cards: Sequence[CardRecord]) -> None:
        """Queue the cards of one call; never touches the database unless the queue is full."""
        if not cards:
            return
        batch = CardBatch(service_id, hook_instance, tuple(cards), datetime.now(UTC))
        with self._lock:
            if self._queued_cards + len(batch.cards) <= self.max_cards:
                self._ensure_thread()
                self._enqueued += 1
                was_empty = not self._queue
                self._queue.append((self._enqueued, batch))
                self._queued_cards += len(batch.cards)
                CARD_WRITER_QUEUE.set(self._queued_cards)
                # Wake the thread only when it waits for a first batch or when the batch is
                # big enough to write; within the window it wakes on its own.
                if was_empty or self._queued_cards >= GROUP_COMMIT_MAX_CARDS:
                    self._has_work.notify()
                return
            failing = self._failing_since is not None
        if failing:
            # The database is down and the queue is full: holding more would grow without bound.
            CARD_WRITER_DROPPED.inc(len(batch.cards))
            if not self._drops_logged:  # once per outage; the metric counts every card
                self._drops_logged = True
                log.error(
                    "issued cards not recorded: the queue is full (%d cards) and the database "
                    "unavailable; cards issued from now on until it is back are not recorded",
                    self.max_cards,
                )
            return
        # Queue full (the database is slower than the calls): this request pays for its own
        # write rather than dropping the cards. Raises like record_cards; the caller logs.
        log.warning("issued-card queue full (%d cards): writing in the request", self.max_cards)
        self._write_batches([batch])

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued before this call is written; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._pid != os.getpid():
                return True  # nothing was queued in this process
            target = self._enqueued
            if self._done < target:
                self._hurry = True
                self._has_work.notify()
            while self._done < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._thread is None or not self._thread.is_alive():
                    return False
                if self._failing_since is not None:
                    return False  # the database is down: waiting would not help
                self._progress.wait(remaining)
            return True

    @property
    def failing(self) -> bool:
        """True while the database refuses the writes (the cards are held and retried)."""
        return self._failing_since is not None

    def pending_cards(self) -> int:
        with self._lock:
            return self._queued_cards

    def drain_here(self) -> None:
        """Write what is still queued from the calling thread (exit, after a failed flush)."""
        with self._lock:
            if self._pid != os.getpid() or not self._queue:
                return
            taken, self._queue, self._queued_cards = self._queue, [], 0
        if not self._write(taken):
            log.error("issued cards not recorded at exit: the database is unavailable")

    def _ensure_thread(self) -> None:
        # Started lazily, in the process that records: gunicorn forks its workers from a master
        # that loaded the app, and threads do not survive a fork.
        if self._pid == os.getpid() and self._thread is not None and self._thread.is_alive():
            return
        self._pid = os.getpid()
        self._thread = threading.Thread(
            target=self._run, name="issued-card-writer", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue:
                    self._has_work.wait()
                window_ends = time.monotonic() + self.window_s
                while not self._hurry and self._queued_cards < GROUP_COMMIT_MAX_CARDS:
                    remaining = window_ends - time.monotonic()
                    if remaining <= 0:
                        break
                    self._has_work.wait(remaining)
                self._hurry = False
                taken, self._queue, self._queued_cards = self._queue, [], 0
                CARD_WRITER_QUEUE.set(0)
            # drain_here (exit) may have taken the queue during the window
            if taken and not self._write(taken):
                time.sleep(self._retry_delay)  # the database is down: the cards wait, queued
                self._retry_delay = min(self._retry_delay * 2, RETRY_MAX_S)

    def _write(self, taken: list[tuple[int, CardBatch]]) -> bool:
        """Write ``taken``; False when the database was unavailable (they are queued again)."""
        from cds_service.store.store import StoreUnavailable  # store.py imports this module

        batches = [batch for _, batch in taken]
        cards = sum(len(batch.cards) for batch in batches)
        try:
            self._write_batches(batches)
        except StoreUnavailable as exc:
            with self._lock:
                # Back at the head of the queue, in order; the bound applies to new calls only.
                self._queue = taken + self._queue
                self._queued_cards += cards
                CARD_WRITER_QUEUE.set(self._queued_cards)
                first = self._failing_since is None
                if first:
                    self._failing_since = time.monotonic()
                self._progress.notify_all()  # a waiting flush gives up: the database is down
            if first:
                log.error(
                    "issued cards not written yet (%d): database unavailable (%s); they are "
                    "held and written when it is back", cards, exc,
                )
            return False
        except Exception as exc:  # a bug, not an outage: never kill the writer, never loop
            log.error("issued cards not recorded (%d): %s", cards, type(exc).__name__)
            written = False
        else:
            written = True
        with self._lock:
            if written:
                self.batches_written += 1
            if self._failing_since is not None and written:
                log.warning(
                    "issued cards written again after %.1f s of database outage",
                    time.monotonic() - self._failing_since,
                )
                self._failing_since = None
                self._retry_delay = RETRY_FIRST_S
                self._drops_logged = False
            # Failed batches count as done too: flush() waits for the attempt, not for success
            # (the feedback endpoint then flags those cards unknown, as before).
            self._done = max(self._done, taken[-1][0])
            self._progress.notify_all()
        return True


_WRITERS: weakref.WeakSet[CardWriter] = weakref.WeakSet()


def _after_fork() -> None:
    # Runs in the child while it has a single thread, so resetting cannot race a request.
    for writer in list(_WRITERS):
        writer._reset()


def flush_writers_at_exit(timeout: float = EXIT_FLUSH_TIMEOUT_S) -> None:
    """The ``atexit`` hook: write what this process still has queued before it ends."""
    for writer in list(_WRITERS):
        if not writer.flush(timeout):
            # The thread is gone or stuck: try once more from here rather than lose the cards.
            writer.drain_here()


os.register_at_fork(after_in_child=_after_fork)
atexit.register(flush_writers_at_exit)
