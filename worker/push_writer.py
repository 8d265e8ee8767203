"""Committing pushes in groups: one writer per ``receipts receiver`` process.

A push carries few receipts (Uspeedo's batches; 50 in the benchmark) where a poll records 500,
and when each push paid its own transaction the receiver spent its time on commits (0.18x the
raw upsert limit). So the pushes a process receives concurrently are handed to one writer thread,
which takes whatever is waiting (up to :data:`MAX_GROUP_RECEIPTS` receipts) and records it in
ONE transaction through :func:`worker.push.record_push`, the poll's own rules. A push arriving
while the writer is idle is recorded at once, and what piles up while a transaction is under way
is grouped into the next one, so latency at low load stays that of a single push. Under load
only, the writer waits a moment (:data:`LINGER`) for the pushes on their way before it begins a
transaction.

Each push's future is settled only after the transaction holding its receipts committed (the
receiver answers 200 then), or with the error that rolled it back: a transient database error
fails every push of the group (each answered 503, Uspeedo retries each), and nothing of the
group is stored. A permanent refusal must not cost the other pushes: the group is recorded again
one push at a time, each through :func:`store_push`, which isolates the refused receipt.

Pushes grouped together name the same ``?account_id=`` (one ``record_push`` per transaction), so
a transaction locks its sessions once, in the global order (worker/store.py ``lock_sessions``),
and two processes' writers never wait on each other in opposite orders.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from worker import db, push
from worker.receipts import Receipt

log = logging.getLogger(__name__)

# The most receipts one group commits (a single larger push is still taken, alone): large
# enough for many pushers' batches at once, small enough that a transaction holds its locks no
# longer than two polls' answers would.
MAX_GROUP_RECEIPTS: Final = 1000
STOP_TIMEOUT: Final = 30.0
# Under load, that is when the last transaction ended less than BUSY_WITHIN ago, the writer
# waits up to LINGER for more pushes before it begins the next one (PostgreSQL's commit_delay,
# for the same reason): the pushes answered by the last commit come back a moment later, and
# without the wait each group held one or two of them. An idle writer still writes a push at
# once. Measured with python -m bench --only raw,push: 4 pushers 4.3k -> 6.8k receipts/s and
# push-to-commit p50 45 -> 29 ms; 16 pushers 10.0k -> 10.4k.
LINGER: Final = 0.002
BUSY_WITHIN: Final = 0.005

SessionFactory = Callable[[], AbstractContextManager[Session]]
Clock = Callable[[], datetime]


def store_push(
    receipts: Sequence[Receipt],
    *,
    account_id: int | None,
    session_factory: SessionFactory,
    clock: Clock,
) -> Counter[str]:
    """Commit one push's receipts (or park them) in a transaction of their own; a receipt the
    database refuses for good is isolated by halving and skipped, so that it cannot cost the
    others. Raises a transient database error (the caller answers 503 and Uspeedo retries)."""
    fates: Counter[str] = Counter()
    try:
        with session_factory() as session:
            outcome = push.record_push(session, receipts, now=clock(), account_id=account_id)
    except sa_exc.DBAPIError as exc:
        if db.is_transient(exc):
            raise
        if len(receipts) == 1:
            log.warning("a pushed receipt was refused by the database: %s", db.error_text(exc))
            fates["refused"] += 1
            return fates
        middle = len(receipts) // 2
        for half in (receipts[:middle], receipts[middle:]):
            fates.update(
                store_push(
                    half, account_id=account_id, session_factory=session_factory, clock=clock
                )
            )
        return fates
    fates["stored"] += outcome.applied
    fates["parked"] += outcome.parked
    return fates


@dataclass(frozen=True, slots=True)
class _Push:
    receipts: tuple[Receipt, ...]
    account_id: int | None
    # Settled with the receipts' fates (stored, parked, refused) once committed.
    done: Future[Counter[str]]


class PushWriter:
    """The one thread of a receiver process that writes pushes, a group per transaction."""

    def __init__(
        self,
        *,
        session_factory: SessionFactory,
        clock: Clock,
        max_receipts: int = MAX_GROUP_RECEIPTS,
        linger: float = LINGER,
        busy_within: float = BUSY_WITHIN,
    ) -> None:
        self._session_factory = session_factory
        self._clock = clock
        self._max_receipts = max_receipts
        self._linger = linger
        self._busy_within = busy_within
        # When the writer's last transaction ended (time.monotonic; the writer thread's alone).
        self._last_write_ended = -math.inf
        self._queue: queue.SimpleQueue[_Push | None] = queue.SimpleQueue()
        # Taken from the queue, not yet written (the writer thread's alone): pushes of another
        # account than the group's, or past its bound, wait here in their order for the next.
        self._pending: deque[_Push] = deque()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def submit(
        self, receipts: Sequence[Receipt], *, account_id: int | None
    ) -> Future[Counter[str]]:
        """Hand a push's receipts to the writer: the future is settled once they are committed
        (with their fates), or with the error that kept them from it."""
        self.start()
        done: Future[Counter[str]] = Future()
        self._queue.put(_Push(tuple(receipts), account_id, done))
        return done

    def start(self) -> None:
        """Start the writer thread (also done by the first push, for an application served
        without its lifespan)."""
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(
                    target=self._run, name="receipts-push-writer", daemon=True
                )
                self._thread.start()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Write what was handed over already, then end the thread."""
        with self._start_lock:
            thread = self._thread
        if thread is None:
            return
        self._queue.put(None)
        thread.join(timeout)

    def waiting(self) -> int:
        """Pushes handed over and not yet taken into a transaction (approximate: for tests)."""
        return self._queue.qsize() + len(self._pending)

    # --- the writer thread ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            if not self._pending:
                if self._stopping:
                    return
                # Nothing waiting: block until a push comes, and write it at once (no timer).
                first = self._queue.get()
                if first is None:
                    return
                self._pending.append(first)
            if time.monotonic() - self._last_write_ended < self._busy_within:
                self._wait_for_more()
            self._take_waiting()
            group = self._group()
            try:
                self._write(group)
            except Exception as exc:  # pragma: no cover - _write settles every push itself
                log.exception("the push writer failed")
                for item in group:
                    if not item.done.done():
                        item.done.set_exception(exc)
            self._last_write_ended = time.monotonic()

    def _wait_for_more(self) -> None:
        """Take the pushes that arrive within the linger into ``_pending``, or until a group's
        worth of receipts waits (or a stop)."""
        deadline = time.monotonic() + self._linger
        size = sum(len(item.receipts) for item in self._pending)
        while size < self._max_receipts:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                item = self._queue.get(timeout=remaining)
            except queue.Empty:
                return
            if item is None:
                self._stopping = True
                return
            self._pending.append(item)
            size += len(item.receipts)

    def _take_waiting(self) -> None:
        """Everything that piled up meanwhile, into ``_pending`` (a stop is noted, and honoured
        once what came before it is written)."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is None:
                self._stopping = True
            else:
                self._pending.append(item)

    def _group(self) -> list[_Push]:
        """The next transaction's pushes: the oldest waiting, and those after it naming the same
        account, up to the bound of receipts (the oldest is taken whatever its size). A push
        whose request was abandoned meanwhile is dropped (it was answered nothing)."""
        group: list[_Push] = []
        kept: deque[_Push] = deque()
        size = 0
        while self._pending:
            item = self._pending.popleft()
            fits = not group or (
                item.account_id == group[0].account_id
                and size + len(item.receipts) <= self._max_receipts
            )
            if not fits:
                kept.append(item)
            elif item.done.set_running_or_notify_cancel():
                group.append(item)
                size += len(item.receipts)
        self._pending = kept
        return group

    def _write(self, group: list[_Push]) -> None:
        """Record a group in one transaction and settle each push's future after the commit."""
        if not group:
            return
        if len(group) == 1:
            self._alone(group[0])
            return
        receipts = [r for item in group for r in item.receipts]
        try:
            with self._session_factory() as session:
                outcome = push.record_push(
                    session, receipts, now=self._clock(), account_id=group[0].account_id
                )
        except sa_exc.DBAPIError as exc:
            if db.is_transient(exc):
                for item in group:
                    item.done.set_exception(exc)
                return
            log.info(
                "a group of %d pushes was refused by the database; recording each alone: %s",
                len(group),
                db.error_text(exc),
            )
            for item in group:
                self._alone(item)
            return
        except Exception:
            # Not the database's refusal: a push the code cannot record. Recording each alone
            # confines the failure to the push that causes it.
            log.exception("a group of %d pushes failed; recording each alone", len(group))
            for item in group:
                self._alone(item)
            return
        for item in group:
            stored = sum(1 for r in item.receipts if r.session_no in outcome.matched)
            fates: Counter[str] = Counter(stored=stored, parked=len(item.receipts) - stored)
            item.done.set_result(fates)

    def _alone(self, item: _Push) -> None:
        try:
            fates = store_push(
                item.receipts,
                account_id=item.account_id,
                session_factory=self._session_factory,
                clock=self._clock,
            )
        except Exception as exc:  # settled, never left hanging: its request answers it
            item.done.set_exception(exc)
        else:
            item.done.set_result(fates)
