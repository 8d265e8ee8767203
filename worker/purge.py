"""Retention: deleting finished sessions past ``RECEIPTS_RETENTION`` with everything they left
behind (README "Retention and purge").

A session may go when it is finished (resolved, or escalated and acknowledged), was sent
before ``now - older_than``, and nothing of it is still owed to anyone:

- no event of its history is after the cursor of a configured event destination
  (``receipts_event_cursors.delivered_id``, worker/events.py), nor inside a parked batch still
  open (``parked``/``replay``: an operator may replay it from the history). A configured
  destination without a cursor yet has delivered nothing. With no destination configured
  there is nothing to deliver;
- no escalation webhook of it is still undelivered (``escalation_outbox``).

So a pending session, an unacknowledged escalation and a session with an undelivered event
are never deleted.

Work goes in batches of at most ``batch_size`` sessions, each its own transaction, walking
the finished sessions oldest first, ``(sent_at, id)``, on an index of finished sessions alone
(migration 0014): a run reads only what it deletes, and what it deletes was written together,
so it empties pages rather than touching a row on each. On PostgreSQL a batch locks its
sessions ``FOR UPDATE SKIP LOCKED``: a session a poll, push or acknowledgement holds is skipped
(the next run takes it), never waited for, so the purge never blocks them, and since it never
waits for a session it needs no lock order. Once locked, the rules are checked again in a new
statement: every writer of history locks the session before writing, so what that check sees
is all the session will ever have until the purge commits. The history tables have no
foreign key (worker/models.py): their rows are deleted explicitly, like the receipts, the
inbox rows of the same (SessionNo, account) and the escalation webhooks, then the session.

A crash loses at most the batch in progress, which rolls back whole; a rerun starts again
from the beginning and finds only what is left. Two purges at once: a session locked by one
is skipped by the other, and one deleted is no longer found, so each is deleted once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol, Self, TypeVar

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.db import json_document, json_rows, upsert_insert
from worker.domain import SessionState
from worker.models import (
    event_cursors_table,
    inbox_table,
    outbox_table,
    parked_batches_table,
    purge_counts_table,
    receipt_events_table,
    receipts_table,
    session_events_table,
    sessions_table,
)

log = logging.getLogger(__name__)

S = sessions_table
R = receipts_table
E = receipt_events_table
SE = session_events_table
C = event_cursors_table
P = parked_batches_table
OUTBOX = outbox_table
INBOX = inbox_table

# Sessions per transaction. Small, for the polls beside the purge more than for its locks: a
# purge writes its deletions' WAL as fast as it runs (1.5 kB a session, most of it the first
# image of each page it empties), and every commit of a poll must flush the WAL written before
# it. A batch's commit flushes its own, so the smaller the batch, the less a poll's commit can
# find waiting. Claim p99 during a purge of a million against without (python -m bench --only
# purge,purge_polls, README "Performance"): 1.44x at 250 a batch, 1.32x at 100, for a purge
# of 8,300 and 7,500 sessions/s; at 2,000 a batch, 2.9x over 300,000.
BATCH_SIZE = 100
# What the daily task purges at most in one run: the rest waits for the next day, so that a
# first purge of years of history does not hold a worker for hours.
MAX_PER_RUN = 1_000_000
OPEN_PARKED = ("parked", "replay")
FINISHED = (SessionState.RESOLVED.value, SessionState.ESCALATED.value)
# What a purge deletes from, as receipts_purge_counts and the exporter name them.
PURGED_TABLES = tuple(t.name for t in (S, R, E, SE, INBOX, OUTBOX))

SessionFactory = Callable[[], AbstractContextManager[Session]]
# Where a batch ended (the purge: sent_at and id; masking: account_id and session_no): the
# next one starts after it.
Position = tuple[Any, Any]


@dataclass(frozen=True, kw_only=True, slots=True)
class PurgeReport:
    sessions: int = 0
    receipts: int = 0
    history: int = 0  # rows of sms_receipt_events and sms_session_events
    inbox: int = 0
    outbox: int = 0
    batches: int = 0
    bounded: bool = False  # stopped at max_sessions: more may be left

    def __add__(self, other: PurgeReport) -> PurgeReport:
        return PurgeReport(
            sessions=self.sessions + other.sessions,
            receipts=self.receipts + other.receipts,
            history=self.history + other.history,
            inbox=self.inbox + other.inbox,
            outbox=self.outbox + other.outbox,
            batches=self.batches + other.batches,
            bounded=self.bounded or other.bounded,
        )


@dataclass(frozen=True, slots=True)
class DryRunLine:
    state: str
    month: str  # YYYY-MM of sent_at (UTC)
    sessions: int


def delivered_through(session: Session, destinations: Collection[str]) -> int | None:
    """The highest event id every configured destination has delivered (or parked); None when
    no destination is configured (nothing to deliver)."""
    if not destinations:
        return None
    names = sorted(str(d) for d in destinations)
    rows = session.execute(
        sa.select(C.c.destination, C.c.delivered_id).where(C.c.destination.in_(names))
    )
    cursors = {str(row.destination): int(row.delivered_id) for row in rows}
    return min(cursors.get(name, 0) for name in names)


def _of_session(table: sa.Table) -> sa.ColumnElement[bool]:
    return sa.and_(table.c.account_id == S.c.account_id, table.c.session_no == S.c.session_no)


def purgeable(*, cutoff: datetime, through: int | None) -> sa.ColumnElement[bool]:
    """The rules (see the module's docstring) as a condition on ``sms_sessions``."""
    conditions: list[sa.ColumnElement[bool]] = [
        sa.or_(
            S.c.state == SessionState.RESOLVED.value,
            sa.and_(S.c.state == SessionState.ESCALATED.value, S.c.acknowledged_at.is_not(None)),
        ),
        S.c.sent_at < cutoff,
        ~sa.exists().where(_of_session(OUTBOX), OUTBOX.c.delivered_at.is_(None)),
    ]
    if through is not None:
        for history in (E, SE):
            conditions.append(~sa.exists().where(_of_session(history), history.c.id > through))
            conditions.append(
                ~sa.exists().where(
                    _of_session(history),
                    P.c.state.in_(OPEN_PARKED),
                    history.c.id > P.c.after_id,
                    history.c.id <= P.c.through_id,
                )
            )
    return sa.and_(*conditions)


def _delete_of_sessions(
    session: Session, table: sa.Table, ids: Sequence[int], keys: Sequence[Mapping[str, Any]]
) -> int:
    """Delete the rows of ``table`` that belong to the sessions ``ids``, whose
    (account_id, session_no) are ``keys``; the count deleted.

    On PostgreSQL the keys come as one JSON document joined to the table's
    (account_id, session_no) index. Through the sessions' ids instead, the planner hashed the
    batch's sessions and read the whole of the larger tables for every batch (a sequential
    scan of ``sms_session_events`` per batch: a purge slower the more history there is)."""
    if session.get_bind().dialect.name == "postgresql":
        source = json_rows({"account_id": sa.BigInteger(), "session_no": sa.Text()}).subquery()
        statement = sa.delete(table).where(
            table.c.account_id == source.c.account_id,
            table.c.session_no == source.c.session_no,
        )
        return int(session.connection().execute(statement, json_document(keys)).rowcount)
    where = sa.exists().where(_of_session(table), S.c.id.in_(ids))
    return int(session.connection().execute(sa.delete(table).where(where)).rowcount)


def purge_batch(
    session: Session,
    *,
    now: datetime,
    older_than: timedelta,
    destinations: Collection[str],
    after: Position | None,
    limit: int,
) -> tuple[PurgeReport, Position | None]:
    """Delete the next ``limit`` purgeable sessions after the position ``after`` (sent_at,
    id): (what was deleted, the position to go on after, or None when nothing is left)."""
    cutoff = now - older_than
    through = delivered_through(session, destinations)
    pick = (
        sa.select(S.c.id, S.c.account_id, S.c.session_no, S.c.sent_at)
        # The index's own condition, so that the planner can take it (migration 0014).
        .where(S.c.state.in_(FINISHED), purgeable(cutoff=cutoff, through=through))
        .order_by(S.c.sent_at, S.c.id)
        .limit(limit)
    )
    if after is not None:
        # A row comparison: PostgreSQL starts its index scan there (an OR of the two would
        # walk the index from the start, over what earlier batches deleted, every batch).
        after_sent_at, after_id = after
        position = sa.tuple_(
            sa.bindparam(None, after_sent_at, type_=S.c.sent_at.type),
            sa.bindparam(None, after_id, type_=S.c.id.type),
        )
        pick = pick.where(sa.tuple_(S.c.sent_at, S.c.id) > position)
    if session.get_bind().dialect.name == "postgresql":
        pick = pick.with_for_update(of=S, skip_locked=True)
    picked = session.execute(pick).all()
    if not picked:
        return PurgeReport(), None
    last = (picked[-1].sent_at, int(picked[-1].id))
    # Checked again now that they are locked: a writer may have committed between the
    # snapshot of the pick and its lock (PostgreSQL rechecks only the row itself then).
    ids = set(
        session.scalars(
            sa.select(S.c.id).where(
                S.c.id.in_([int(row.id) for row in picked]),
                purgeable(cutoff=cutoff, through=through),
            )
        )
    )
    if not ids:
        return PurgeReport(batches=1), last
    keys = [
        {"account_id": int(row.account_id), "session_no": str(row.session_no)}
        for row in picked
        if row.id in ids
    ]
    counts = {
        table.name: _delete_of_sessions(session, table, sorted(ids), keys)
        for table in (E, SE, R, INBOX, OUTBOX)
    }
    counts[S.name] = int(session.connection().execute(sa.delete(S).where(S.c.id.in_(ids))).rowcount)
    add_counts(session, counts, now=now)
    history = counts[E.name] + counts[SE.name]
    receipts, inbox, outbox, sessions = (counts[t.name] for t in (R, INBOX, OUTBOX, S))
    report = PurgeReport(
        sessions=sessions,
        receipts=receipts,
        history=history,
        inbox=inbox,
        outbox=outbox,
        batches=1,
    )
    return report, last


def add_counts(
    session: Session, counts: Mapping[str, int], *, now: datetime, kind: str = "purged"
) -> None:
    """Add a batch's rows by table to ``receipts_purge_counts``'s ``kind`` column (``purged``
    by the purge, ``masked`` by worker/masking.py), and stamp ``last_<kind>_at``, in the
    batch's own transaction, so that the totals never count a batch that rolled back. Two runs
    at once queue on these few rows until commit, which slows only them."""
    table = purge_counts_table
    stamp = f"last_{kind}_at"
    statement = upsert_insert(session, table)
    statement = statement.on_conflict_do_update(
        index_elements=["table_name"],
        set_={kind: table.c[kind] + statement.excluded[kind], stamp: statement.excluded[stamp]},
    )
    session.connection().execute(
        statement,
        [{"table_name": name, kind: count, stamp: now} for name, count in sorted(counts.items())],
    )


def purge(
    session_factory: SessionFactory,
    *,
    now: datetime,
    older_than: timedelta,
    destinations: Collection[str],
    batch_size: int = BATCH_SIZE,
    max_sessions: int | None = None,
) -> PurgeReport:
    """Purge batch after batch, each in its own transaction, until nothing is left or
    ``max_sessions`` were deleted."""
    return in_batches(
        session_factory,
        lambda session, after, limit: purge_batch(
            session,
            now=now,
            older_than=older_than,
            destinations=destinations,
            after=after,
            limit=limit,
        ),
        empty=PurgeReport(),
        bounded=PurgeReport(bounded=True),
        batch_size=batch_size,
        max_sessions=max_sessions,
    )


class BatchReport(Protocol):
    """What one batch of a purge or a masking (worker/masking.py) did; batches add up."""

    @property
    def sessions(self) -> int: ...

    def __add__(self, other: Self) -> Self: ...


Report = TypeVar("Report", bound=BatchReport)


def in_batches(
    session_factory: SessionFactory,
    batch: Callable[[Session, Position | None, int], tuple[Report, Position | None]],
    *,
    empty: Report,
    bounded: Report,
    batch_size: int,
    max_sessions: int | None,
) -> Report:
    """Run ``batch`` (session, after, limit) in a transaction of its own after another, each
    from where the last ended, until one says nothing is left (None) or ``max_sessions`` were
    taken (the total then has ``bounded`` added: more may be left)."""
    total = empty
    after: Position | None = None
    while True:
        if max_sessions is not None and total.sessions >= max_sessions:
            return total + bounded
        limit = batch_size
        if max_sessions is not None:
            limit = min(limit, max_sessions - total.sessions)
        with session_factory() as session:
            report, after = batch(session, after, limit)
        total = total + report
        if after is None:
            return total


def _month(session: Session) -> sa.ColumnElement[str]:
    if session.get_bind().dialect.name == "postgresql":
        return sa.func.to_char(sa.func.timezone("UTC", S.c.sent_at), "YYYY-MM")
    # SQLite keeps UTC text, "YYYY-MM-DD HH:MM:SS..." (worker/models.py, UTCDateTime).
    return sa.func.substr(S.c.sent_at, 1, 7)


def dry_run(
    session: Session, *, now: datetime, older_than: timedelta, destinations: Collection[str]
) -> list[DryRunLine]:
    """What a purge at ``now`` would delete, by state and month of ``sent_at``."""
    through = delivered_through(session, destinations)
    month = _month(session).label("month")
    rows = session.execute(
        sa.select(S.c.state, month, sa.func.count())
        .where(purgeable(cutoff=now - older_than, through=through))
        .group_by(S.c.state, month)
        .order_by(month, S.c.state)
    )
    return [DryRunLine(state=str(s), month=str(m), sessions=int(n)) for s, m, n in rows]
