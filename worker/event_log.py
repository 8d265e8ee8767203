"""The append-only event log, which this module owns: ``sms_receipt_events`` (every observed
change of a phone's receipt), ``sms_session_events`` (resolutions and escalations) and the one
series of ids they share. ``worker.history()`` and ``receipts history`` read it
(worker/records.py); an event stream to the sender's application can be derived from it.

Nothing here opens a transaction: the receipts upsert (:func:`worker.store.upsert_receipts`)
and the state changes of sessions (:func:`worker.store.record_receipts`,
:func:`worker.store.escalate_due`) write their history in their own unit of work, so that a
change and its history commit together or not at all. On PostgreSQL the receipt history is
written by the upsert's own statement (:func:`receipt_history_statement`); on SQLite, whose
statements cannot both upsert and insert elsewhere, by :func:`record_observed` right after it.

Ids: PostgreSQL draws them from ``receipts_event_id_seq`` (the column default); SQLite from the
one row of ``receipts_event_ids`` (:func:`take_ids`), inside the writing transaction. See
:data:`worker.models.EVENT_IDS` for why a reader of the stream cannot simply remember the last
id it saw on PostgreSQL.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.db import json_document, json_rows
from worker.domain import RECEIPT_FACTS, ReceiptSource, SessionEventType, is_repeat
from worker.event_nudge import mark_written
from worker.models import (
    event_ids_table,
    receipt_events_table,
    receipts_table,
    session_events_table,
)

E = receipt_events_table
SE = session_events_table
R = receipts_table

# The columns of a receipt row (worker.store.receipt_rows) that its history row keeps; with
# account_id, observed_at and applied, all of sms_receipt_events but its id.
EVENT_COLUMNS = (
    "session_no",
    "phone",
    "phone_key",
    *RECEIPT_FACTS,
    "source",
)

Key = tuple[str, str]  # (session_no, phone_key)


def _key(row: Mapping[str, Any]) -> Key:
    return (row["session_no"], row["phone_key"])


def is_repeat_sql(stored: Any, new: Any) -> sa.ColumnElement[bool]:
    """SQL twin of :func:`worker.domain.is_repeat` for a stored row that exists: every fact
    equal, NULL equal to NULL."""
    return sa.and_(*(stored[fact].is_not_distinct_from(new[fact]) for fact in RECEIPT_FACTS))


# --- ids (SQLite) -------------------------------------------------------------------------


def take_ids(session: Session, count: int) -> int:
    """The first of ``count`` new consecutive event ids (SQLite). The counter's row is written
    by the caller's transaction, which holds SQLite's one write lock from its first statement
    (worker/db.py), so ids are handed out, and committed, in order."""
    last = session.execute(
        sa.update(event_ids_table)
        .where(event_ids_table.c.id == 1)
        .values(last_id=event_ids_table.c.last_id + count)
        .returning(event_ids_table.c.last_id)
    ).scalar_one()
    return int(last) - count + 1


# --- receipt history ----------------------------------------------------------------------


def receipt_history_statement(incoming: Any, applied: Any, now: Any) -> sa.Insert:
    """PostgreSQL: the INSERT of the history rows of one upsert, the final part of its
    statement (:func:`worker.store.upsert_receipts`).

    ``incoming`` is the CTE of the upserted rows (each with its ``account_id``) and ``applied``
    the CTE of the upsert itself, whose RETURNING gives the rows it wrote (``account_id`` and
    :data:`EVENT_COLUMNS`). The upsert writes a receipt
    when it wins and is not a repeat of the stored one (its guard), so:

    - a row it wrote is a change, recorded as applied straight from the RETURNING: no join, no
      lookup, which is nearly every row (a first receipt, a newer one, a final one);
    - a row it did not write is either a repeat of the stored receipt (nothing to record) or a
      receipt that lost to it (recorded, not applied, unless the same losing receipt was
      recorded before: a stale report that a poll or a push keeps repeating). Only these rows
      look at ``sms_receipts`` and ``sms_receipt_events``, one index probe each.

    The upsert left those stored rows as they were, so this statement's snapshot reads them as
    the guard saw them. No other writer can change them meanwhile: the sessions were locked by
    an earlier statement of the transaction (worker.store.lock_sessions).
    """
    columns = ["account_id", *EVENT_COLUMNS, "observed_at", "applied"]
    account_id = incoming.c.account_id
    written = sa.select(
        applied.c.account_id, *(applied.c[name] for name in EVENT_COLUMNS), now, sa.true()
    )
    is_written = sa.exists().where(
        applied.c.account_id == account_id,
        applied.c.session_no == incoming.c.session_no,
        applied.c.phone_key == incoming.c.phone_key,
    )
    repeats_stored = sa.exists().where(
        R.c.account_id == account_id,
        R.c.session_no == incoming.c.session_no,
        R.c.phone_key == incoming.c.phone_key,
        is_repeat_sql(R.c, incoming.c),
    )
    lost_before = sa.exists().where(
        E.c.account_id == account_id,
        E.c.session_no == incoming.c.session_no,
        E.c.phone_key == incoming.c.phone_key,
        E.c.applied.is_(False),
        is_repeat_sql(E.c, incoming.c),
    )
    count = sa.func.count()
    unwritten = sa.select(
        account_id, *(incoming.c[name] for name in EVENT_COLUMNS), now, sa.false()
    ).where(
        # Evaluated once: when the upsert wrote every row, the rest of this branch never runs.
        sa.select(count).select_from(applied).scalar_subquery()
        < sa.select(count).select_from(incoming).scalar_subquery(),
        sa.not_(is_written),
        sa.not_(repeats_stored),
        sa.not_(lost_before),
    )
    return sa.insert(E).from_select(columns, sa.union_all(written, unwritten))


def record_observed(
    session: Session,
    rows: Sequence[Mapping[str, Any]],
    *,
    account_id: int,
    now: datetime,
    applied: Collection[Key],
) -> int:
    """SQLite, after the upsert: the history rows of one upsert, the same ones the PostgreSQL
    statement writes (:func:`receipt_history_statement`), given the keys it ``applied`` (its
    RETURNING). Returns how many were written."""
    observed = list(rows)
    unwritten = [row for row in rows if _key(row) not in applied]
    if unwritten:
        # Repeats and losers: the upsert left their stored receipts as they were.
        sessions = {row["session_no"] for row in unwritten}
        stored = _stored_receipts(session, account_id, sessions)
        lost = _lost_receipts(session, account_id, sessions)
        dropped = {
            _key(row)
            for row in unwritten
            if is_repeat(stored.get(_key(row)), row)
            or any(is_repeat(old, row) for old in lost[_key(row)])
        }
        observed = [row for row in rows if _key(row) not in dropped]
    if not observed:
        return 0
    mark_written(session)
    # In the order the PostgreSQL statement gives them ids: the applied ones, then the others.
    observed.sort(key=lambda row: _key(row) not in applied)
    first = take_ids(session, len(observed))
    observed_at = _sqlite_time(now)
    # Straight to the driver: SQLAlchemy's processing of each row's parameters (two
    # timestamps through their types) cost more than SQLite's own insert of the row.
    session.connection().exec_driver_sql(
        _SQLITE_INSERT,
        [
            (
                first + offset,
                account_id,
                *(row[name] for name in _PLAIN_COLUMNS),
                _sqlite_time(row["receipt_time"]),
                row["cost_count"],
                row["user_id"],
                row["source"],
                observed_at,
                _key(row) in applied,
            )
            for offset, row in enumerate(observed)
        ],
    )
    return len(observed)


_PLAIN_COLUMNS = ("session_no", "phone", "phone_key", "result", "receipt_code", "receipt_desc")
_SQLITE_COLUMNS = (
    "id",
    "account_id",
    *_PLAIN_COLUMNS,
    "receipt_time",
    "cost_count",
    "user_id",
    "source",
    "observed_at",
    "applied",
)
_SQLITE_INSERT = (
    f"INSERT INTO sms_receipt_events ({', '.join(_SQLITE_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(_SQLITE_COLUMNS))})"
)


def _sqlite_time(value: datetime | None) -> str | None:
    """A timestamp as worker.models.UTCDateTime stores it on SQLite: UTC text
    ``YYYY-MM-DD HH:MM:SS.ffffff`` (README "Tables")."""
    if value is None:
        return None
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value!r}: timestamps must carry a time zone")
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def _stored_receipts(
    session: Session, account_id: int, session_nos: Iterable[str]
) -> dict[Key, dict[str, Any]]:
    query = sa.select(R.c.session_no, R.c.phone_key, *(R.c[f] for f in RECEIPT_FACTS)).where(
        R.c.account_id == account_id, R.c.session_no.in_(sorted(session_nos))
    )
    return {(row.session_no, row.phone_key): row._asdict() for row in session.execute(query)}


def _lost_receipts(
    session: Session, account_id: int, session_nos: Iterable[str]
) -> defaultdict[Key, list[dict[str, Any]]]:
    query = sa.select(E.c.session_no, E.c.phone_key, *(E.c[f] for f in RECEIPT_FACTS)).where(
        E.c.account_id == account_id,
        E.c.session_no.in_(sorted(session_nos)),
        E.c.applied.is_(False),
    )
    found: defaultdict[Key, list[dict[str, Any]]] = defaultdict(list)
    for row in session.execute(query):
        found[(row.session_no, row.phone_key)].append(row._asdict())
    return found


# --- session events -----------------------------------------------------------------------


def session_event(
    account_id: int,
    session_no: str,
    kind: SessionEventType,
    source: ReceiptSource | None = None,
) -> dict[str, Any]:
    """One row of ``sms_session_events`` to write with :func:`record_session_events`."""
    return {
        "account_id": account_id,
        "session_no": session_no,
        "type": kind.value,
        "source": source.value if source is not None else None,
    }


_SESSION_EVENT_TYPES: dict[str, Any] = {
    "account_id": sa.BigInteger(),
    "session_no": sa.Text(),
    "type": sa.Text(),
    "source": sa.Text(),
}


def record_session_events(
    session: Session, events: Sequence[Mapping[str, Any]], *, now: datetime
) -> None:
    """Append ``events`` (:func:`session_event`) that occurred at ``now``, in their order, in
    one statement (PostgreSQL) or one executemany (SQLite)."""
    if not events:
        return
    mark_written(session)
    if session.get_bind().dialect.name == "postgresql":
        session.execute(_session_events_statement(), {"now": now, **json_document(events)})
        return
    first = take_ids(session, len(events))
    session.connection().execute(
        sa.insert(SE),
        [
            {**event, "id": first + offset, "occurred_at": now}
            for offset, event in enumerate(events)
        ],
    )


@functools.cache
def _session_events_statement() -> sa.Insert:
    """PostgreSQL: the session events of one step of a transaction, from one JSON document;
    their ids come from the sequence (the column's default)."""
    source = json_rows(_SESSION_EVENT_TYPES).subquery("events")
    now = sa.bindparam("now", type_=SE.c.occurred_at.type)
    return sa.insert(SE).from_select(
        [*_SESSION_EVENT_TYPES, "occurred_at"],
        sa.select(*(source.c[name] for name in _SESSION_EVENT_TYPES), now),
    )
