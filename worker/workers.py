"""Worker processes: each heartbeats in ``receipts_workers`` while it lives, and the tick
releases the polls of one that stopped.

A poll in flight holds its sessions (``sms_sessions.held_by``) for as long as it can take,
budget and timeouts included: minutes with the defaults. A process killed mid-poll would keep
them that long, and a session near its cutoff would be escalated although its answer was
waiting at the API. So every process that polls beats every half tick, and a tick that finds
one silent for two ticks releases its holds at once (as procrastinate does for stalled jobs):
a pending session falls due again, never sooner than ``interval_min`` after the lost poll
started (that poll may have reached the API); one whose cutoff passed while its last poll was
lost (escalated already, or by the same tick) gets one reconciliation poll.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.db import upsert_insert
from worker.domain import SessionState
from worker.models import sessions_table, workers_table
from worker.schedule import PollPolicy

log = logging.getLogger(__name__)

S = sessions_table
W = workers_table
# A process is taken for dead after this many ticks without a heartbeat; it beats every half
# tick, so a live one misses four beats in a row before that happens.
DEAD_AFTER_TICKS = 2
BEATS_PER_TICK = 2


def new_worker_id() -> str:
    """hostname:pid:random: unique per process start, and readable in the table."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def beat(session: Session, *, worker_id: str, now: datetime) -> None:
    """Record that ``worker_id`` is alive at ``now`` (registering it on its first beat)."""
    hostname, pid, _ = worker_id.rsplit(":", 2)
    values = {
        "id": worker_id,
        "hostname": hostname,
        "pid": int(pid),
        "started_at": now,
        "beat_at": now,
    }
    statement = upsert_insert(session, W).values(values)
    session.execute(
        statement.on_conflict_do_update(
            index_elements=["id"], set_={"beat_at": statement.excluded.beat_at}
        )
    )


def leave(session: Session, *, worker_id: str) -> None:
    """A process that stops cleanly leaves; its polls, if any, end by themselves."""
    session.execute(sa.delete(W).where(W.c.id == worker_id))


@dataclass(frozen=True, kw_only=True, slots=True)
class Released:
    """What one release did: dead processes forgotten, pending sessions due again, and the
    escalated sessions (per account) owed a reconciliation poll."""

    workers: tuple[str, ...]
    pending: int
    reconcile: dict[int, list[int]]


def release_dead(
    session: Session, *, now: datetime, tick: timedelta, policy: PollPolicy
) -> Released:
    """Forget the processes silent for :data:`DEAD_AFTER_TICKS` ticks and release every hold
    no live process has (a dead one's, or a process that never beat at all).

    Two ticks running this at once are harmless: the DELETE takes each dead process once.
    """
    dead = tuple(
        session.scalars(
            sa.delete(W).where(W.c.beat_at < now - tick * DEAD_AFTER_TICKS).returning(W.c.id)
        )
    )
    query = (
        sa.select(S.c.id, S.c.account_id, S.c.state, S.c.sent_at, S.c.last_polled_at)
        .where(S.c.held_by.is_not(None), S.c.held_by.not_in(sa.select(W.c.id)))
        .order_by(S.c.account_id, S.c.session_no)  # the global lock order (store.lock_sessions)
    )
    if session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update()
    released: list[dict[str, object]] = []
    reconcile: dict[int, list[int]] = defaultdict(list)
    pending = 0
    for row in session.execute(query):
        update: dict[str, object] = {"b_id": row.id, "b_due": None, "b_release": False}
        if row.state == SessionState.PENDING.value:
            # The lost poll may have reached the API when it started (last_polled_at): the
            # next one keeps interval_min from it, as any poll must.
            earliest = (row.last_polled_at or now) + policy.interval_min
            update.update(b_due=max(now, earliest), b_release=True)
            pending += 1
            if row.sent_at <= now - policy.cutoff:
                # Its cutoff passed while its poll was lost (no tick ran to escalate it): the
                # tick escalates it next, and it is owed the same reconciliation.
                reconcile[row.account_id].append(row.id)
        elif row.state == SessionState.ESCALATED.value:
            reconcile[row.account_id].append(row.id)
        released.append(update)
    if released:
        statement = (
            sa.update(S)
            .where(S.c.id == sa.bindparam("b_id"))
            .values(
                held_by=None,
                # Only a pending session gets a new due time and loses its claim; an
                # escalated or resolved one keeps what it has.
                claim_token=sa.case((sa.bindparam("b_release"), None), else_=S.c.claim_token),
                next_poll_at=sa.case(
                    (sa.bindparam("b_release"), sa.bindparam("b_due", type_=S.c.next_poll_at.type)),
                    else_=S.c.next_poll_at,
                ),
                updated_at=sa.bindparam("b_now", type_=S.c.updated_at.type),
            )
        )
        session.connection().execute(statement, [{**r, "b_now": now} for r in released])
    return Released(workers=dead, pending=pending, reconcile=dict(reconcile))


SessionFactory = Callable[[], AbstractContextManager[Session]]


class Heartbeat:
    """A daemon thread that beats for one process every half tick until stopped."""

    def __init__(
        self,
        *,
        worker_id: str,
        session_factory: SessionFactory,
        clock: Callable[[], datetime],
        tick: timedelta,
    ) -> None:
        self.worker_id = worker_id
        self._session_factory = session_factory
        self._clock = clock
        self._period = tick.total_seconds() / BEATS_PER_TICK
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="receipts-heartbeat", daemon=True)

    def start(self) -> None:
        """Beat once now (so the process is known before it takes a task), then keep beating."""
        self.beat_once()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self._period + 5)
        try:
            with self._session_factory() as session:
                leave(session, worker_id=self.worker_id)
        except sa.exc.DBAPIError as exc:
            log.warning("could not remove worker %s: %s", self.worker_id, exc.orig)

    def beat_once(self) -> bool:
        try:
            with self._session_factory() as session:
                beat(session, worker_id=self.worker_id, now=self._clock())
        except sa.exc.DBAPIError as exc:
            # Missing beats only release this process's holds early, which is safe.
            log.warning("heartbeat of %s failed: %s", self.worker_id, exc.orig)
            return False
        return True

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            self.beat_once()
