"""Events to the sender's application (README "Events"), read from the history tables that
worker/event_log.py writes: one write serves both the history and the stream.

Each destination (a webhook, a Celery task) has a cursor in ``receipts_event_cursors`` (this
module owns it and ``receipts_parked_event_batches``): every event with an id up to
``delivered_id`` was delivered, or parked. A delivery round takes the cursor under a lease
(a claim token, ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, like worker/webhooks.py's outbox),
reads the next batch of events after it, sends it with no transaction open, and moves the
cursor past the batch only after the destination acknowledged it (a 2xx, or the broker took
the task). A failed batch is tried again with exponential backoff; after failing for
``RECEIPTS_EVENTS_RETRY_WINDOW`` it is parked (kept, counted, alerted on) and the stream goes
on after it. At least once: a receiver deduplicates on ``id``.

The horizon. Ids come from a sequence and commit out of order (worker/models.py,
EVENT_IDS): a cursor that moved past the highest id it saw could skip an id taken earlier by a
transaction still running. So a round delivers only up to ``safe_id``, an id below which every
event has committed or never will, found as models.py says: having seen the highest visible
id M in a snapshot, M becomes safe once every transaction in progress in that snapshot has
ended. Every writer takes its transaction id (by locking a session's row) before its event
id, and a sequence hands out increasing values, so any id up to M was taken by a transaction
that had committed before the snapshot or was in progress in it. The snapshot is kept in the
cursor (``pending_id``, ``pending_snapshot``) until those transactions have ended, checked
with ``pg_xact_status``; a transaction that runs in another database of the server (its
backend or prepared transaction says so) cannot have written here and is not waited for, so
a long transaction elsewhere does not hold the stream back. SQLite has one writer at a
time, and a round holds the write lock: every visible id is safe there.

Within a session events are in id order, which is their commit order: its writers hold its
row lock until they commit. Batches are in id order, and a batch is sent only after the one
before it was acknowledged (or parked), so a receiver sees each session's events in order.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import secrets
import time
from collections.abc import Callable, Collection, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Final

import orjson
import requests
import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.domain import FINAL_RESULTS, EventType
from worker.errors import ParkedBatchError
from worker.models import (
    event_cursors_table,
    parked_batches_table,
    receipt_events_table,
    session_events_table,
    sessions_table,
)
from worker.signing import WEBHOOK_SIGNATURE_HEADER, webhook_signature
from worker.webhooks import backoff, post_once

log = logging.getLogger(__name__)

C = event_cursors_table
P = parked_batches_table
E = receipt_events_table
SE = session_events_table
S = sessions_table

FINALS = sorted(r.value for r in FINAL_RESULTS)
RECEIPT_TYPES = frozenset({EventType.RECEIPT_FINAL, EventType.RECEIPT_UPDATED})
SESSION_TYPES = frozenset({EventType.SESSION_RESOLVED, EventType.SESSION_ESCALATED})
# How long a round waits for the transactions that hold its horizon back (writers' transactions
# last milliseconds) before leaving the events to the next round.
HORIZON_WAIT = 0.5
HORIZON_STEP = 0.02

SessionFactory = Callable[[], AbstractContextManager[Session]]
# Sends one batch ({"events": [...]}) claimed at the given instant: None when acknowledged,
# else the error's text.
Sender = Callable[[dict[str, Any], datetime], str | None]


class ParkedState(StrEnum):
    """``receipts_parked_event_batches.state``."""

    PARKED = "parked"  # open: waits for an operator
    REPLAY = "replay"  # open: to be sent again by the destination's next delivery round
    REPLAYED = "replayed"  # closed: the destination acknowledged it
    DISMISSED = "dismissed"  # closed: an operator let it go


OPEN_STATES = (ParkedState.PARKED.value, ParkedState.REPLAY.value)


@dataclass(frozen=True, slots=True)
class Claimed:
    """A destination's cursor, held by one deliverer under ``token``."""

    destination: str
    token: str
    delivered_id: int
    safe_id: int
    waiting: bool  # a horizon beyond safe_id waits for transactions to end
    attempts: int
    first_failed_at: datetime | None


@dataclass(frozen=True, slots=True)
class Batch:
    """The events with ``after_id < id <= through_id`` (of the types selected)."""

    after_id: int
    through_id: int
    events: list[dict[str, Any]]


@dataclass(frozen=True, kw_only=True, slots=True)
class DeliveryReport:
    delivered: int = 0  # events acknowledged
    batches: int = 0
    failed: int = 0
    parked: int = 0  # batches parked
    lost: int = 0  # outcomes not recorded: the lease had been taken over
    # The round moved the cursor and stopped with events still after it that it could not
    # wait for (``max_batches`` reached, or committed while it ran): run another at once.
    more: bool = False
    replayed: int = 0  # parked batches sent again at an operator's request, acknowledged


# --- destinations and their cursors -------------------------------------------------------


def sync_destinations(session: Session, destinations: Collection[str]) -> None:
    """Make a cursor for each configured destination (from the start of the history) and mark
    which ones are configured (the exporter reports only those)."""
    names = sorted(destinations)
    if names:
        existing = set(session.scalars(sa.select(C.c.destination)))
        missing = [name for name in names if name not in existing]
        if missing:
            session.execute(sa.insert(C), [{"destination": name} for name in missing])
    configured = C.c.destination.in_(names) if names else sa.false()
    session.execute(
        sa.update(C).where(C.c.active != configured).values(active=configured),
        execution_options={"synchronize_session": False},
    )


def last_event_id(session: Session) -> int:
    """The highest event id this transaction sees (two probes of the primary keys)."""
    top = sa.select(
        sa.func.coalesce(sa.select(sa.func.max(E.c.id)).scalar_subquery(), 0),
        sa.func.coalesce(sa.select(sa.func.max(SE.c.id)).scalar_subquery(), 0),
    )
    receipts, sessions = session.execute(top).one()
    return max(int(receipts), int(sessions))


def waiting(session: Session, destinations: Collection[str], *, now: datetime) -> list[str]:
    """The configured destinations with events after their cursor or a parked batch to
    replay, not backing off and not held by a deliverer: the clock queues a delivery task for
    each."""
    if not destinations:
        return []
    top = last_event_id(session)
    to_replay = sa.exists().where(
        P.c.destination == C.c.destination, P.c.state == ParkedState.REPLAY.value
    )
    rows = session.execute(
        sa.select(C.c.destination).where(
            C.c.destination.in_(sorted(destinations)),
            sa.or_(C.c.delivered_id < top, to_replay),
            sa.or_(C.c.next_attempt_at.is_(None), C.c.next_attempt_at <= now),
            sa.or_(C.c.leased_until.is_(None), C.c.leased_until <= now),
        )
    )
    return sorted(rows.scalars())


def claim(
    session: Session, destination: str, *, now: datetime, lease: timedelta, token: str
) -> Claimed | None:
    """Take the destination's cursor for ``lease`` unless another deliverer holds it or its
    batch is backing off, and move its horizon as far as it can go."""
    free = sa.select(C.c.destination).where(
        C.c.destination == destination,
        sa.or_(C.c.leased_until.is_(None), C.c.leased_until <= now),
        sa.or_(C.c.next_attempt_at.is_(None), C.c.next_attempt_at <= now),
    )
    if session.get_bind().dialect.name == "postgresql":
        free = free.with_for_update(skip_locked=True)
    row = session.execute(
        sa.update(C)
        .where(C.c.destination.in_(free.scalar_subquery()))
        .values(claim_token=token, leased_until=now + lease)
        .returning(C.c.delivered_id, C.c.attempts, C.c.first_failed_at)
    ).first()
    if row is None:
        return None
    safe, waiting_ = advance_horizon(session, destination, token)
    return Claimed(
        destination=destination,
        token=token,
        delivered_id=int(row.delivered_id),
        safe_id=safe,
        waiting=waiting_,
        attempts=int(row.attempts),
        first_failed_at=row.first_failed_at,
    )


# --- the horizon --------------------------------------------------------------------------

# The highest visible id and the snapshot it was seen in, in one statement (one snapshot).
_SNAPSHOT = sa.text(
    "SELECT pg_current_snapshot()::text AS snapshot, GREATEST("
    "(SELECT COALESCE(max(id), 0) FROM sms_receipt_events), "
    "(SELECT COALESCE(max(id), 0) FROM sms_session_events)) AS top"
)
# The transactions of a snapshot that may still write event ids below its top: in progress
# and not known to run in another database. Not our own (a deliverer writes no event). NOT
# EXISTS, not NOT IN: a NULL backend_xid must not make every row pass.
_BLOCKING = sa.text(
    "SELECT count(*) FROM pg_snapshot_xip(CAST(:snapshot AS pg_snapshot)) AS x(xid) "
    "WHERE x.xid IS DISTINCT FROM pg_current_xact_id_if_assigned() "
    "AND pg_xact_status(x.xid) = 'in progress' "
    "AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.backend_xid = x.xid::xid "
    "AND a.datname IS NOT NULL AND a.datname <> current_database()) "
    "AND NOT EXISTS (SELECT 1 FROM pg_prepared_xacts p WHERE p.transaction = x.xid::xid "
    "AND p.database <> current_database())"
)


def _settled(session: Session, snapshot: str) -> bool:
    return int(session.execute(_BLOCKING, {"snapshot": snapshot}).scalar_one()) == 0


def advance_horizon(session: Session, destination: str, token: str) -> tuple[int, bool]:
    """Move the cursor's ``safe_id`` as far as it may go (see the module's docstring), under
    the lease ``token``: (safe_id, whether a further horizon still waits)."""
    row = session.execute(
        sa.select(C.c.safe_id, C.c.pending_id, C.c.pending_snapshot).where(
            C.c.destination == destination, C.c.claim_token == token
        )
    ).first()
    if row is None:
        return 0, False
    safe, pending_id, snapshot = int(row.safe_id), row.pending_id, row.pending_snapshot
    if session.get_bind().dialect.name != "postgresql":
        # One writer at a time, and this transaction holds the write lock: all committed.
        top = last_event_id(session)
        if top != safe:
            session.execute(sa.update(C).where(C.c.destination == destination).values(safe_id=top))
        return top, False
    if pending_id is not None and _settled(session, snapshot):
        safe, pending_id, snapshot = max(safe, int(pending_id)), None, None
    if pending_id is None:
        seen = session.execute(_SNAPSHOT).one()
        if int(seen.top) > safe:
            if _settled(session, seen.snapshot):
                safe = int(seen.top)
            else:
                pending_id, snapshot = int(seen.top), seen.snapshot
    session.execute(
        _held(destination, token).values(
            safe_id=safe, pending_id=pending_id, pending_snapshot=snapshot
        )
    )
    return safe, pending_id is not None


# --- reading a batch ----------------------------------------------------------------------


# A batch reads at most this many times its size of the history's rows, in key order, to
# find its events among them: rows that are no events (a receipt not final, or not applied,
# with receipt.updated not selected; a session event of a type not selected) are passed over.
SCAN_FACTOR: Final = 2


def _scanned(table: sa.Table) -> sa.Subquery:
    """The next ``scan`` rows of a history table after the cursor (``after``), in key order.

    The scan is the primary key's walk from the cursor, with nothing inside it but the key and
    the limit, so that no statistics can turn it into something else:

    - with the horizon and the joins inside, a plan from the history's statistics (stale
      while it grows) read, joined and sorted every event up to the horizon for each batch:
      20 ms for a batch of 100 behind 15,000 events (EXPLAIN ANALYZE);
    - with the filter of events inside (applied, a final result), statistics from an emptier
      table made that filter look rare, and PostgreSQL read and sorted the whole table rather
      than walk the key to find enough matches: 52 ms for a batch of 100 among 120,000 rows,
      growing with the table until its next ANALYZE.
    """
    return (
        sa.select(table)
        .where(table.c.id > sa.bindparam("after"))
        .order_by(table.c.id)
        .limit(sa.bindparam("scan"))
        .subquery("scanned_rows")
    )


def _windowed(
    table: sa.Table, columns: Callable[[Any], list[Any]], wanted: Callable[[Any], Any]
) -> sa.Select[Any]:
    """The next events of a history table after ``after``, up to the horizon (``upto``), at
    most ``limit`` of them, found among the next ``scan`` rows (:func:`_scanned`). The outer
    limit stops the walk once ``limit`` events are found: a batch all events reads no more."""
    raw = _scanned(table)
    return (
        sa.select(*columns(raw))
        .select_from(
            raw.outerjoin(
                S, sa.and_(S.c.account_id == raw.c.account_id, S.c.session_no == raw.c.session_no)
            )
        )
        .where(raw.c.id <= sa.bindparam("upto"), wanted(raw))
        .order_by(raw.c.id)
        .limit(sa.bindparam("limit"))
    )


@functools.cache
def _scan_extent(table: sa.Table) -> sa.Select[int, Any]:
    """How many rows :func:`_scanned` holds and the last one's id: where the cursor may move
    when fewer than a batch of them were events (asked then only: once a round)."""
    raw = _scanned(table)
    return sa.select(sa.func.count(), sa.func.max(raw.c.id))


@functools.cache
def _receipt_query(types: frozenset[EventType]) -> sa.Select[Any]:
    finals_only = EventType.RECEIPT_UPDATED not in types

    def wanted(raw: Any) -> Any:
        applied = raw.c.applied.is_(True)
        return sa.and_(applied, raw.c.result.in_(FINALS)) if finals_only else applied

    def columns(raw: Any) -> list[Any]:
        earlier = E.alias("earlier")
        first_final = sa.and_(
            raw.c.result.in_(FINALS),
            ~sa.exists().where(
                earlier.c.account_id == raw.c.account_id,
                earlier.c.session_no == raw.c.session_no,
                earlier.c.phone_key == raw.c.phone_key,
                earlier.c.applied.is_(True),
                earlier.c.result.in_(FINALS),
                earlier.c.id < raw.c.id,
            ),
        )
        return [
            raw.c.id,
            raw.c.account_id,
            raw.c.session_no,
            raw.c.phone,
            raw.c.result,
            raw.c.receipt_code,
            raw.c.receipt_desc,
            raw.c.receipt_time,
            raw.c.cost_count,
            raw.c.user_id,
            raw.c.source,
            raw.c.observed_at,
            S.c.user_ref,
            first_final.label("first_final"),
        ]

    return _windowed(E, columns, wanted)


@functools.cache
def _session_query(types: frozenset[EventType]) -> sa.Select[Any]:
    selected = sorted(t.value for t in types if t in SESSION_TYPES)
    return _windowed(
        SE,
        lambda raw: [
            raw.c.id,
            raw.c.account_id,
            raw.c.session_no,
            raw.c.type,
            raw.c.source,
            raw.c.occurred_at,
            S.c.user_ref,
        ],
        lambda raw: raw.c.type.in_(selected),
    )


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


_FINAL = EventType.RECEIPT_FINAL.value
_UPDATED = EventType.RECEIPT_UPDATED.value


def _receipt_event(row: Any, types: Collection[str]) -> dict[str, Any] | None:
    """``types``: the selected types' values (a set, built once a batch: this runs per event).
    ``row``: :func:`_receipt_query`'s columns, unpacked by position (by name, a Row's
    attribute lookups were a tenth of a batch's CPU)."""
    (
        event_id,
        account_id,
        session_no,
        phone,
        result,
        receipt_code,
        receipt_desc,
        receipt_time,
        cost_count,
        user_id,
        source,
        observed_at,
        user_ref,
        first_final,
    ) = row
    if first_final and _FINAL in types:
        kind = _FINAL
    elif _UPDATED in types:
        kind = _UPDATED
    else:
        return None  # a later change of a final receipt, and receipt.updated not selected
    return {
        "id": int(event_id),
        "type": kind,
        "occurred_at": _iso(observed_at),
        "account_id": int(account_id),
        "session_no": session_no,
        "phone": phone,
        "result": result,
        "receipt_code": receipt_code,
        "receipt_desc": receipt_desc,
        "receipt_time": _iso(receipt_time),
        "cost_count": cost_count,
        "user_id": user_id,
        "user_ref": user_ref,
        "source": source,
    }


def _session_event(row: Any) -> dict[str, Any]:
    event_id, account_id, session_no, kind, source, occurred_at, user_ref = row
    return {
        "id": int(event_id),
        "type": kind,
        "occurred_at": _iso(occurred_at),
        "account_id": int(account_id),
        "session_no": session_no,
        "user_ref": user_ref,
        "source": source,
    }


def read_batch(
    session: Session, *, after: int, upto: int, limit: int, types: Collection[EventType]
) -> Batch:
    """The next events after ``after``, up to ``upto`` (the horizon), among at most ``limit``
    of the history's rows, in id order. ``through_id`` is where the cursor may move once they
    are delivered: past rows that are no events (of types not selected) too."""
    if upto <= after:
        return Batch(after_id=after, through_id=after, events=[])
    params = {"after": after, "upto": upto, "limit": limit, "scan": limit * SCAN_FACTOR}
    fetched: list[tuple[int, bool, Any]] = []  # (id, is_receipt, the event's columns)
    through = upto
    for is_receipt, wanted, query in (
        (True, RECEIPT_TYPES, _receipt_query),
        (False, SESSION_TYPES, _session_query),
    ):
        if not (wanted & set(types)):
            continue
        rows = session.execute(query(frozenset(types)), params).all()
        found = [(int(row[0]), is_receipt, row) for row in rows]
        # More may follow: only ids up to this query's last event, or its last row scanned,
        # are known from both queries.
        if len(found) == limit:
            through = min(through, found[-1][0])
        else:
            table = E if is_receipt else SE
            scanned, last = session.execute(_scan_extent(table), params).one()
            if scanned == params["scan"]:
                through = min(through, int(last))
        fetched += found
    fetched = sorted((f for f in fetched if f[0] <= through), key=lambda f: f[0])
    if len(fetched) > limit:
        fetched = fetched[:limit]
        through = fetched[-1][0]
    events = []
    selected = {t.value for t in types}
    for _id, is_receipt, columns in fetched:
        event = _receipt_event(columns, selected) if is_receipt else _session_event(columns)
        if event is not None:
            events.append(event)
    return Batch(after_id=after, through_id=through, events=events)


# --- recording the outcome ----------------------------------------------------------------


def _held(destination: str, token: str) -> sa.Update:
    """An update of the destination's cursor that applies only while ``token`` holds it."""
    return sa.update(C).where(C.c.destination == destination, C.c.claim_token == token)


def _release(destination: str, token: str) -> sa.Update:
    return _held(destination, token).values(claim_token=None, leased_until=None)


def record_delivered(
    session: Session,
    claimed: Claimed,
    batch: Batch,
    *,
    now: datetime,
    keep_until: datetime | None = None,
) -> bool:
    """Move the cursor past an acknowledged batch (or one with no event to send); False when
    the lease had been taken over (nothing recorded). With ``keep_until`` the round keeps the
    cursor, its lease renewed until then, for its next batch; else the cursor is released."""
    done = session.connection().execute(
        _delivered_statement(keep=keep_until is not None, sent=bool(batch.events)),
        {
            "b_destination": claimed.destination,
            "b_token": claimed.token,
            "b_through_id": batch.through_id,
            "b_events": len(batch.events),
            "b_now": now,
            "b_keep_until": keep_until,
        },
    )
    return bool(done.rowcount)


@functools.cache
def _delivered_statement(*, keep: bool, sent: bool) -> sa.Update:
    """:func:`record_delivered`'s statement, built once (a batch's cost is mostly per batch:
    building it was a fifth of a batch of 100's CPU)."""
    timestamp = C.c.delivered_at.type
    statement = (
        sa.update(C)
        .where(
            C.c.destination == sa.bindparam("b_destination", type_=sa.Text()),
            C.c.claim_token == sa.bindparam("b_token", type_=sa.Text()),
        )
        .values(
            delivered_id=sa.bindparam("b_through_id", type_=sa.BigInteger()),
            attempts=0,
            first_failed_at=None,
            next_attempt_at=None,
            last_error=None,
        )
    )
    if sent:
        statement = statement.values(
            delivered_events=C.c.delivered_events + sa.bindparam("b_events", type_=sa.Integer()),
            delivered_at=sa.bindparam("b_now", type_=timestamp),
        )
    if keep:
        return statement.values(leased_until=sa.bindparam("b_keep_until", type_=timestamp))
    return statement.values(claim_token=None, leased_until=None)


def record_failure(
    session: Session,
    claimed: Claimed,
    batch: Batch,
    *,
    error: str,
    now: datetime,
    retry_base: timedelta,
    retry_cap: timedelta,
    window: timedelta,
) -> bool | None:
    """A batch the destination did not acknowledge: try it again after a backoff, or, once
    it has failed for ``window``, park it and move the cursor past it. True when parked,
    False when it will be retried, None when the lease had been taken over."""
    attempts = claimed.attempts + 1
    first = claimed.first_failed_at or now
    parked = now - first >= window
    if parked:
        values: dict[str, Any] = {
            "delivered_id": batch.through_id,
            "attempts": 0,
            "first_failed_at": None,
            "next_attempt_at": None,
            "last_error": error,
        }
    else:
        values = {
            "attempts": attempts,
            "first_failed_at": first,
            "next_attempt_at": now + backoff(attempts, base=retry_base, cap=retry_cap),
            "last_error": error,
        }
    done = session.connection().execute(
        _release(claimed.destination, claimed.token).values(**values)
    )
    if not done.rowcount:
        return None
    if parked:
        session.execute(
            sa.insert(P).values(
                destination=claimed.destination,
                after_id=batch.after_id,
                through_id=batch.through_id,
                events=len(batch.events),
                attempts=attempts,
                first_failed_at=first,
                parked_at=now,
                last_error=error,
            )
        )
    return parked


# --- a delivery round ---------------------------------------------------------------------


def deliver(
    *,
    session_factory: SessionFactory,
    destination: str,
    send: Sender,
    now: Callable[[], datetime],
    types: Collection[EventType],
    lease: timedelta,
    batch_size: int,
    retry_base: timedelta,
    retry_cap: timedelta,
    window: timedelta,
    max_batches: int = 50,
    horizon_wait: float = HORIZON_WAIT,
) -> DeliveryReport:
    """Deliver the destination's events, batch after batch, until it is caught up, a batch
    fails, another deliverer holds it, or ``max_batches`` were sent."""
    replayed = _replay(
        session_factory=session_factory,
        destination=destination,
        send=send,
        now=now,
        types=types,
        lease=lease,
        max_batches=max_batches,
    )
    delivered = batches = failed = parked = lost = 0
    waited = moved = caught_up = False
    cursor = 0
    # The batch read while the round holds the cursor: read with the claim, or, while the
    # horizon reaches past the batch just delivered, in the transaction that recorded it.
    # A batch's cost is then one transaction, not a claim, a read and a release: the
    # deliverer's cost is mostly per batch (README "Events").
    held: tuple[Claimed, Batch, datetime] | None = None
    while batches < max_batches:
        if held is None:
            taken = _take(
                session_factory,
                destination,
                now=now,
                lease=lease,
                batch_size=batch_size,
                types=types,
                waited=waited,
                horizon_wait=horizon_wait,
            )
            if taken is None:
                break
            held, waited = taken[:3], waited or taken[3]
        claimed, batch, claimed_at = held
        held = None
        error = send({"events": batch.events}, claimed_at) if batch.events else None
        finished = now()
        # The horizon reaches past this batch: keep the cursor and read the next one.
        going_on = batches + 1 < max_batches and batch.through_id < claimed.safe_id
        with session_factory() as session:
            if error is None:
                outcome: bool | None = record_delivered(
                    session,
                    claimed,
                    batch,
                    now=finished,
                    keep_until=finished + lease if going_on else None,
                )
                if outcome and going_on:
                    claimed = dataclasses.replace(claimed, delivered_id=batch.through_id)
                    held = (claimed, _read(session, claimed, batch_size, types), finished)
            else:
                outcome = record_failure(
                    session,
                    claimed,
                    batch,
                    error=error,
                    now=finished,
                    retry_base=retry_base,
                    retry_cap=retry_cap,
                    window=window,
                )
        if outcome is None or (error is None and outcome is False):
            log.warning(
                "events to %s: another deliverer took the cursor over during this batch "
                "(ids %d..%d); its outcome is left to it",
                destination,
                batch.after_id + 1,
                batch.through_id,
            )
            lost += 1
            break
        if error is None:
            delivered += len(batch.events)
            batches += 1 if batch.events else 0
            moved = moved or batch.through_id > batch.after_id
            cursor = batch.through_id
            if batch.through_id >= claimed.safe_id:
                if claimed.waiting and not waited:
                    continue
                caught_up = True
                break
            continue
        if outcome:
            parked += 1
            log.error(
                "events to %s: batch of %d event(s) (ids %d..%d) parked after failing for "
                "%s (%d attempts): %s; see receipts_parked_event_batches",
                destination,
                len(batch.events),
                batch.after_id + 1,
                batch.through_id,
                window,
                claimed.attempts + 1,
                error,
            )
            continue
        failed += 1
        log.warning(
            "events to %s: batch of %d event(s) failed (attempt %d): %s",
            destination,
            len(batch.events),
            claimed.attempts + 1,
            error,
        )
        break
    more = (
        moved
        and not (failed or lost)
        and (batches >= max_batches or (caught_up and _committed_after(session_factory, cursor)))
    )
    return DeliveryReport(
        delivered=delivered,
        batches=batches,
        failed=failed,
        parked=parked,
        lost=lost,
        more=more,
        replayed=replayed,
    )


def _take(
    session_factory: SessionFactory,
    destination: str,
    *,
    now: Callable[[], datetime],
    lease: timedelta,
    batch_size: int,
    types: Collection[EventType],
    waited: bool,
    horizon_wait: float,
) -> tuple[Claimed, Batch, datetime, bool] | None:
    """Claim the cursor and read its next batch, in one transaction unless the horizon waits
    for transactions still running: (the claim, its batch, when it was claimed, whether it
    waited), or None when another deliverer holds the cursor or it backs off."""
    token = secrets.token_hex(16)
    claimed_at = now()
    with session_factory() as session:
        claimed = claim(session, destination, now=claimed_at, lease=lease, token=token)
        if claimed is None:
            return None
        wait = claimed.safe_id <= claimed.delivered_id and claimed.waiting and not waited
        if not wait:
            return claimed, _read(session, claimed, batch_size, types), claimed_at, False
    # Events wait behind transactions that are still running (they last milliseconds): give
    # them a moment rather than a whole tick.
    claimed = _wait_for_horizon(session_factory, claimed, horizon_wait)
    with session_factory() as session:
        return claimed, _read(session, claimed, batch_size, types), claimed_at, True


def _read(session: Session, claimed: Claimed, limit: int, types: Collection[EventType]) -> Batch:
    return read_batch(
        session, after=claimed.delivered_id, upto=claimed.safe_id, limit=limit, types=types
    )


def _committed_after(session_factory: SessionFactory, cursor: int) -> bool:
    """Whether events after ``cursor`` are visible now that the round released the cursor:
    committed while the round held it, their writers' nudges found it held
    (worker/event_nudge.py), so the round answers for them. Asked only by a round that moved
    the cursor: one that moved nothing waits for a transaction still running, which the tick
    comes back for, rather than asking again and again."""
    with session_factory() as session:
        return last_event_id(session) > cursor


def _wait_for_horizon(session_factory: SessionFactory, claimed: Claimed, within: float) -> Claimed:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        time.sleep(HORIZON_STEP)
        with session_factory() as session:
            safe, still = advance_horizon(session, claimed.destination, claimed.token)
        if safe > claimed.delivered_id or not still:
            return Claimed(
                destination=claimed.destination,
                token=claimed.token,
                delivered_id=claimed.delivered_id,
                safe_id=safe,
                waiting=still,
                attempts=claimed.attempts,
                first_failed_at=claimed.first_failed_at,
            )
    return claimed


# --- parked batches: an operator's replay or dismissal ------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class ParkedBatch:
    """One row of ``receipts_parked_event_batches`` (README "Tables")."""

    id: int
    destination: str
    after_id: int  # the events with after_id < id <= through_id
    through_id: int
    events: int
    attempts: int
    first_failed_at: datetime
    parked_at: datetime
    last_error: str | None
    state: ParkedState
    closed_at: datetime | None

    @classmethod
    def from_row(cls, row: sa.RowMapping) -> ParkedBatch:
        return cls(
            id=int(row["id"]),
            destination=row["destination"],
            after_id=int(row["after_id"]),
            through_id=int(row["through_id"]),
            events=int(row["events"]),
            attempts=int(row["attempts"]),
            first_failed_at=row["first_failed_at"],
            parked_at=row["parked_at"],
            last_error=row["last_error"],
            state=ParkedState(row["state"]),
            closed_at=row["closed_at"],
        )


def parked_batches(session: Session, *, include_closed: bool = False) -> list[ParkedBatch]:
    """The open batches (parked, or waiting to be replayed), or every one, oldest first."""
    query = sa.select(P).order_by(P.c.id)
    if not include_closed:
        query = query.where(P.c.state.in_(OPEN_STATES))
    return [ParkedBatch.from_row(row) for row in session.execute(query).mappings()]


def _lock(session: Session, ids: Sequence[int], allowed: Collection[str]) -> list[int]:
    """The batches ``ids``, locked, each in one of the ``allowed`` states; else raise naming
    every one that is not."""
    wanted = list(dict.fromkeys(ids))
    rows = {
        int(row.id): row
        for row in session.execute(
            sa.select(P.c.id, P.c.state, P.c.closed_at)
            .where(P.c.id.in_(wanted))
            .order_by(P.c.id)
            .with_for_update()
        )
    }
    problems = []
    for batch_id in wanted:
        row = rows.get(batch_id)
        if row is None:
            problems.append(f"parked batch {batch_id} does not exist")
        elif row.state not in allowed:
            when = f" at {row.closed_at.isoformat(timespec='seconds')}" if row.closed_at else ""
            problems.append(f"parked batch {batch_id} is {row.state}{when}")
    if problems:
        raise ParkedBatchError("nothing was changed: " + "; ".join(problems))
    return wanted


def mark_for_replay(session: Session, ids: Sequence[int]) -> list[int]:
    """Ask for parked batches to be sent again: the destination's next delivery round sends
    them before the stream (all or none). A batch already marked may be marked again."""
    wanted = _lock(session, ids, OPEN_STATES)
    session.execute(
        sa.update(P).where(P.c.id.in_(wanted)).values(state=ParkedState.REPLAY.value),
        execution_options={"synchronize_session": False},
    )
    return wanted


def dismiss(session: Session, ids: Sequence[int], *, now: datetime) -> list[int]:
    """Let open batches go (all or none): no longer counted, alerted on or replayed, and their
    sessions no longer kept from the purge for them."""
    wanted = _lock(session, ids, OPEN_STATES)
    session.execute(
        sa.update(P)
        .where(P.c.id.in_(wanted))
        .values(state=ParkedState.DISMISSED.value, closed_at=now),
        execution_options={"synchronize_session": False},
    )
    return wanted


def _replay(
    *,
    session_factory: SessionFactory,
    destination: str,
    send: Sender,
    now: Callable[[], datetime],
    types: Collection[EventType],
    lease: timedelta,
    max_batches: int,
) -> int:
    """Send the destination's batches marked for replay, oldest first, under the cursor's
    lease (so that two deliverers do not both send them): each acknowledged one is closed as
    replayed; the first that fails keeps its mark and its error, and is tried again by the
    next round. Returns how many were replayed. The events are read again from the history,
    so their order is kept within each batch, but the batch arrives after the events that
    followed it: receivers deduplicate on ``id`` and should not assume a replay is recent."""
    with session_factory() as session:
        todo = [
            ParkedBatch.from_row(row)
            for row in session.execute(
                sa.select(P)
                .where(P.c.destination == destination, P.c.state == ParkedState.REPLAY.value)
                .order_by(P.c.id)
                .limit(max_batches)
            ).mappings()
        ]
    if not todo:
        return 0
    token = secrets.token_hex(16)
    claimed_at = now()
    with session_factory() as session:
        if claim(session, destination, now=claimed_at, lease=lease, token=token) is None:
            return 0
    replayed = 0
    try:
        for parked_batch in todo:
            with session_factory() as session:
                batch = read_batch(
                    session,
                    after=parked_batch.after_id,
                    upto=parked_batch.through_id,
                    limit=max(1, parked_batch.through_id - parked_batch.after_id),
                    types=types,
                )
            error = send({"events": batch.events}, claimed_at) if batch.events else None
            ours = sa.exists().where(C.c.destination == destination, C.c.claim_token == token)
            values: dict[str, Any] = {"attempts": P.c.attempts + 1, "last_error": error}
            if error is None:
                values = {"state": ParkedState.REPLAYED.value, "closed_at": now()}
            with session_factory() as session:
                session.execute(
                    sa.update(P)
                    .where(
                        P.c.id == parked_batch.id,
                        P.c.state == ParkedState.REPLAY.value,
                        ours,
                    )
                    .values(**values),
                    execution_options={"synchronize_session": False},
                )
            if error is not None:
                log.warning(
                    "events to %s: replay of parked batch %d failed: %s",
                    destination,
                    parked_batch.id,
                    error,
                )
                break
            replayed += 1
            log.info(
                "events to %s: parked batch %d replayed (%d event(s))",
                destination,
                parked_batch.id,
                len(batch.events),
            )
    finally:
        with session_factory() as session:
            session.execute(_release(destination, token))
    return replayed


# --- senders ------------------------------------------------------------------------------


def webhook_sender(
    http: requests.Session, url: str, secret: str | None, *, timeout: float
) -> Sender:
    """POST each batch to ``url``, signed like every webhook (worker/signing.py), bounded as a
    whole, following no redirect (worker/webhooks.py: post_once)."""

    def send(payload: dict[str, Any], claimed_at: datetime) -> str | None:
        try:
            body = orjson.dumps(payload)  # compact, as json.dumps with separators, in C
        except orjson.JSONEncodeError:  # text orjson refuses (a lone surrogate): escaped
            body = json.dumps(payload, separators=(",", ":")).encode()
        events: Sequence[dict[str, Any]] = payload["events"]
        headers = {
            "Content-Type": "application/json",
            "X-Receipts-Event": "events",
            "X-Receipts-Delivery": f"events-{events[0]['id']}-{events[-1]['id']}",
        }
        if secret:
            headers[WEBHOOK_SIGNATURE_HEADER] = webhook_signature(
                body, secret, timestamp=int(claimed_at.timestamp())
            )
        return post_once(http, url, body, headers, timeout)

    return send


def task_sender(app: Any, name: str, queue: str) -> Sender:
    """Send each batch as the single argument of the Celery task ``name`` on ``queue``: the
    batch counts as delivered once the broker took the message."""
    from worker.logs import mask_password

    def send(payload: dict[str, Any], _claimed_at: datetime) -> str | None:
        try:
            app.send_task(
                name,
                args=[payload],
                queue=queue,
                retry=True,
                retry_policy={
                    "max_retries": 2,
                    "interval_start": 0.2,
                    "interval_step": 0.5,
                    "interval_max": 1,
                },
            )
        except Exception as exc:  # whatever the transport raises: the broker did not take it
            return mask_password(f"{type(exc).__name__}: {exc}")[:200]
        return None

    return send
