"""Database operations of the poll cycle: claim, start, record, reschedule, escalate.

Each function does its work in a few set-based statements (never a query per row) inside the
caller's unit of work, and takes the current time as an argument.
"""

from __future__ import annotations

import functools
import logging
import random
import secrets
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker import event_log, event_nudge, masking
from worker.db import json_document, json_rows, upsert_insert
from worker.domain import (
    FINAL_RESULTS,
    RECEIPT_FACTS,
    ReceiptSource,
    ReceiptVersion,
    SessionEventType,
    SessionState,
    is_resolved,
    phone_key,
    pick_latest_by,
    settled_by_answer,
    unresolved_phones,
)
from worker.errors import AckError
from worker.masking import PhoneHash, masked_phone
from worker.models import (
    UTCDateTime,
    api_calls_table,
    heartbeats_table,
    receipts_table,
    sessions_table,
)
from worker.receipts import Receipt
from worker.schedule import PollPolicy

log = logging.getLogger(__name__)

S = sessions_table
R = receipts_table
# Sessions escalated per statement; the tick repeats until a batch comes back short.
ESCALATION_BATCH = 1000
PENDING = SessionState.PENDING.value
RESOLVED = SessionState.RESOLVED.value
ESCALATED = SessionState.ESCALATED.value


@dataclass(frozen=True, kw_only=True, slots=True)
class Claim:
    """Sessions of one account claimed for one poll, under a token only their poll may use."""

    account_id: int
    token: str
    session_ids: tuple[int, ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class PollTarget:
    """A session whose poll has started."""

    id: int
    account_id: int
    session_no: str
    phones: tuple[str, ...]  # as tracked when the poll started; re-read when it is recorded
    sent_at: datetime
    polled_at: datetime
    # The claim token the poll started under, or None for an operator's repoll: only while the
    # session still carries it does the answer decide the session's schedule.
    token: str | None = None
    # The worker process that holds the session while the poll is in flight (None: no
    # heartbeating process, e.g. a test or an operator's command).
    held_by: str | None = None
    # Of a session whose phones were masked (worker/masking.py): the keyed hashes of its
    # tracked phones, in the order of ``phones`` (which are masked forms). None: not masked.
    phone_keys: tuple[str, ...] | None = None

    @property
    def masked(self) -> bool:
        return self.phone_keys is not None

    def tracked_keys(self) -> tuple[str, ...]:
        """The phone keys of its tracked phones: their digits, or of a masked session their
        keyed hashes (the masked forms' four digits identify nothing)."""
        if self.phone_keys is not None:
            return self.phone_keys
        return tuple(phone_key(phone) for phone in self.phones)

    @classmethod
    def from_row(
        cls, row: Any, polled_at: datetime, *, token: str | None = None, held_by: str | None = None
    ) -> PollTarget:
        return cls(
            id=row.id,
            account_id=row.account_id,
            session_no=row.session_no,
            phones=tuple(row.phones or ()),
            sent_at=row.sent_at,
            polled_at=polled_at,
            token=token,
            held_by=held_by,
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class PollOutcome:
    receipts_written: int
    resolved: tuple[str, ...]
    rescheduled: int


def _is_pg(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


# --- claiming -------------------------------------------------------------------------------


def _due(now: datetime, policy: PollPolicy) -> tuple[sa.ColumnElement[bool], ...]:
    return (S.c.state == PENDING, S.c.next_poll_at <= now, S.c.sent_at > now - policy.cutoff)


def due_accounts(session: Session, *, now: datetime, policy: PollPolicy) -> list[int]:
    """Accounts with sessions due for a poll, read from the partial index of pending sessions,
    the account whose oldest due session has waited longest first: a tick that may claim only
    so much (see :func:`worker.poller.tick`) serves sessions in the order they fell due, and
    no account waits behind others that keep falling due."""
    query = (
        sa.select(S.c.account_id)
        .where(*_due(now, policy))
        .group_by(S.c.account_id)
        .order_by(sa.func.min(S.c.next_poll_at), S.c.account_id)
    )
    return list(session.scalars(query))


def count_due(session: Session, *, now: datetime, policy: PollPolicy) -> int:
    """How many sessions are due for a poll and not claimed."""
    return session.scalar(sa.select(sa.func.count()).where(*_due(now, policy))) or 0


def claim_batch(
    session: Session,
    *,
    account_id: int,
    now: datetime,
    policy: PollPolicy,
    lease_until: datetime,
    limit: int,
) -> Claim | None:
    """Claim up to ``limit`` due sessions of one account, oldest due first.

    ``FOR UPDATE SKIP LOCKED`` lets any number of ticks (two beats by mistake, overlapping
    ticks) claim side by side without waiting on or double-claiming each other's rows. The
    claim moves ``next_poll_at`` to ``lease_until``: if the poll task is lost (worker killed,
    broker emptied) the sessions fall due again then; the token stops a stale poll task from
    polling a session that has been claimed again since.
    """
    token = secrets.token_hex(16)
    params = {
        "account": account_id,
        "now": now,
        "limit": limit,
        "token": token,
        "lease_until": lease_until,
    }
    statement = _claim_statement(session.get_bind().dialect.name)
    ids = tuple(sorted(session.scalars(statement, params)))
    if not ids:
        return None
    return Claim(account_id=account_id, token=token, session_ids=ids)


@functools.cache
def _claim_statement(dialect: str) -> Any:
    """:func:`claim_batch`'s statement, built once per dialect: its text never changes."""
    now = sa.bindparam("now", type_=S.c.updated_at.type)
    due = (
        sa.select(S.c.id)
        # Exactly the partial index's columns and order: the planner then walks the index
        # and stops after ``limit`` rows. An extra filter here (sent_at before the cutoff)
        # made it underestimate the due rows and read and sort all of them instead, so the
        # cutoff is left to start_poll, and the tick escalates before it claims.
        .where(
            S.c.state == PENDING,
            S.c.account_id == sa.bindparam("account", type_=S.c.account_id.type),
            S.c.next_poll_at <= now,
        )
        .order_by(S.c.next_poll_at)
        .limit(sa.bindparam("limit", type_=sa.Integer()))
    )
    if dialect == "postgresql":
        due = due.with_for_update(skip_locked=True)
    return (
        sa.update(S)
        .where(S.c.id.in_(due.scalar_subquery()))
        .values(
            claim_token=sa.bindparam("token", type_=sa.Text()),
            claimed_at=now,
            next_poll_at=sa.bindparam("lease_until", type_=S.c.next_poll_at.type),
            updated_at=now,
        )
        .returning(S.c.id)
    )


def start_poll(
    session: Session,
    *,
    claim: Claim,
    now: datetime,
    policy: PollPolicy,
    busy_until: datetime,
    worker: str | None = None,
) -> list[PollTarget]:
    """Turn a claim into a poll about to be sent, for the sessions that may still be polled.

    This is the one place that decides a poll happens, in one statement, so the rules hold
    however the task got here (redelivered, duplicated, late): the claim token must still be
    ours, the session pending, ``now`` inside ``[first poll, cutoff)`` and at least
    ``interval_min`` after the previous answer. Until the answer is recorded the session is
    held until ``busy_until`` (the longest a poll can be in flight, plus ``interval_min``), so
    a slow poll is never overtaken by a second one and a crashed poll loses nothing; ``worker``
    names the process holding it, so that the hold ends sooner if that process dies. The
    session keeps the claim token, which its answer must still find to reschedule it.
    """
    params = {
        "ids": list(claim.session_ids),
        "token": claim.token,
        "cutoff_sent_after": now - policy.cutoff,
        "first_poll_sent_before": now - policy.first_delay,
        "answered_before": now - policy.interval_min,
        "now": now,
        "busy_until": busy_until,
        "worker": worker,
    }
    rows = session.execute(_start_poll_statement(session.get_bind().dialect.name), params)
    targets = [PollTarget.from_row(row, now, token=claim.token, held_by=worker) for row in rows]
    targets.sort(key=lambda t: t.id)
    return targets


def _ids_param(dialect: str) -> Any:
    """The id list of a statement built once: one array parameter on PostgreSQL rather than an
    IN list of 100 parameters rendered per call."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import ARRAY

        return sa.any_(sa.bindparam("ids", type_=ARRAY(sa.BigInteger())))
    return None


def _in_ids(dialect: str) -> sa.ColumnElement[bool]:
    ids = _ids_param(dialect)
    return S.c.id == ids if ids is not None else S.c.id.in_(sa.bindparam("ids", expanding=True))


@functools.cache
def _start_poll_statement(dialect: str) -> Any:
    """:func:`start_poll`'s statement, built once per dialect: its text never changes.

    The rows are locked in (account_id, session_no) order, as on every path that locks several
    sessions, so that two transactions never wait on each other's rows in opposite orders.
    """
    timestamp = S.c.updated_at.type
    now = sa.bindparam("now", type_=timestamp)
    startable = (
        sa.select(S.c.id)
        .where(
            _in_ids(dialect),
            S.c.claim_token == sa.bindparam("token", type_=sa.Text()),
            S.c.state == PENDING,
            S.c.sent_at > sa.bindparam("cutoff_sent_after", type_=timestamp),
            S.c.sent_at <= sa.bindparam("first_poll_sent_before", type_=timestamp),
            sa.or_(
                S.c.last_polled_at.is_(None),
                S.c.last_polled_at <= sa.bindparam("answered_before", type_=timestamp),
            ),
        )
        .order_by(S.c.account_id, S.c.session_no)
    )
    if dialect == "postgresql":
        startable = startable.with_for_update()
    return (
        sa.update(S)
        .where(S.c.id.in_(startable.scalar_subquery()))
        .values(
            last_polled_at=now,
            poll_count=S.c.poll_count + 1,
            next_poll_at=sa.bindparam("busy_until", type_=timestamp),
            held_by=sa.bindparam("worker", type_=sa.Text()),
            updated_at=now,
        )
        .returning(S.c.id, S.c.account_id, S.c.session_no, S.c.phones, S.c.sent_at)
    )


def escalated_targets(
    session: Session,
    session_nos: Sequence[str] = (),
    *,
    account_id: int | None,
    now: datetime,
    ids: Sequence[int] = (),
) -> list[PollTarget]:
    """Escalated sessions among ``session_nos`` (or among ``ids``), as targets of a repoll."""
    query = sa.select(S.c.id, S.c.account_id, S.c.session_no, S.c.phones, S.c.sent_at).where(
        S.c.session_no.in_(list(session_nos)) if session_nos else S.c.id.in_(list(ids)),
        S.c.state == ESCALATED,
    )
    if account_id is not None:
        query = query.where(S.c.account_id == account_id)
    return [
        PollTarget.from_row(row, now)
        for row in session.execute(query.order_by(S.c.account_id, S.c.id))
    ]


# --- recording an answer ----------------------------------------------------------------


def receipt_guard(existing: Any, incoming: Any) -> sa.ColumnElement[bool]:
    """SQL twin of :func:`worker.domain.should_replace`, evaluated against the stored row, so
    that the rule holds even against a writer we did not see (tests prove the two agree)."""
    # Inline constants rather than bound lists: executemany cannot expand IN parameters.
    finals: list[sa.ColumnElement[str]] = [
        sa.literal_column(f"'{r.value}'") for r in sorted(FINAL_RESULTS)
    ]
    old_final = existing.result.in_(finals)
    new_final = incoming.result.in_(finals)
    # Same kind: a timeless receipt only replaces a timeless one; a timed one replaces a
    # timeless one or one not newer than itself.
    not_below = sa.or_(
        sa.and_(incoming.receipt_time.is_(None), existing.receipt_time.is_(None)),
        sa.and_(
            incoming.receipt_time.is_not(None),
            sa.or_(
                existing.receipt_time.is_(None),
                incoming.receipt_time >= existing.receipt_time,
            ),
        ),
    )
    return sa.or_(
        sa.and_(sa.not_(old_final), new_final),
        sa.and_(old_final == new_final, not_below),
    )


RECEIPT_COLUMNS = (
    "session_no",
    "phone",
    "phone_key",
    *RECEIPT_FACTS,
    "country_code",
    "source",
)


def receipt_rows(
    targets: Sequence[PollTarget],
    receipts: Iterable[Receipt],
    *,
    source: ReceiptSource = ReceiptSource.POLL,
    phone_hash: PhoneHash | None = None,
) -> list[dict[str, Any]]:
    """One row (:data:`RECEIPT_COLUMNS`) per (session, phone digits), the winning version when
    an answer repeats a phone, marked as coming from ``source``.

    The stored ``phone`` is the tracked spelling when the receipt matches a tracked phone.
    Of a masked session (worker/masking.py) the key is the keyed hash of the digits
    (``phone_hash``, which such targets need) and the phone is stored masked: a late receipt
    matches the masked row and brings no phone number back.
    """
    asked = {t.session_no: t for t in targets}
    tracked_spelling = {
        (t.session_no, key): phone
        for t in targets
        for phone, key in zip(t.phones, t.tracked_keys(), strict=True)
    }
    candidates: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for receipt in receipts:
        key = phone_key(receipt.phone)
        target = asked.get(receipt.session_no)
        # The parser refuses a phone without digits and names it in the session's last_error;
        # a Receipt built elsewhere without one has no key to be stored under.
        if target is None or not key:
            continue
        phone = receipt.phone
        if target.masked:
            if phone_hash is None:
                raise ValueError(f"session {target.session_no!r} is masked: a phone hash is needed")
            key, phone = phone_hash(key), masked_phone(phone)
        candidates[(receipt.session_no, key)].append(
            {
                "session_no": receipt.session_no,
                "phone": tracked_spelling.get((receipt.session_no, key), phone),
                "phone_key": key,
                "result": receipt.result.value,
                "receipt_code": receipt.receipt_code,
                "receipt_desc": receipt.receipt_desc,
                "receipt_time": receipt.receipt_time,
                "cost_count": receipt.cost_count,
                "user_id": receipt.user_id,
                "country_code": receipt.country_code,
                "source": source.value,
            }
        )
    return [
        rows[0] if len(rows) == 1 else pick_latest_by(rows, _version)
        for rows in candidates.values()
    ]


def _version(row: Mapping[str, Any]) -> ReceiptVersion:
    return ReceiptVersion(result=row["result"], receipt_time=row["receipt_time"])


@functools.cache
def _upsert_statement(dialect: str) -> Any:
    """The receipts upsert alone, built once per dialect (its text never changes); on SQLite
    it returns the (session_no, phone_key) it wrote. :func:`upsert_receipts` writes the
    history with it (on PostgreSQL in the same statement, :func:`_recorded_upsert_statement`);
    the benchmark measures the cost of that against this statement alone.

    On PostgreSQL it reads every row from one JSON document (:func:`worker.db.json_rows`): one
    round trip for a whole answer instead of one per receipt (see README "Performance"). The
    time, the same for every row, travels once, as a parameter, and so does the account of an
    answer's rows (:func:`_incoming`).
    """
    if dialect == "postgresql":
        return _on_conflict(_insert_from(_incoming().subquery()))
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    # SQLite >= 3.35 returns the rows an upsert inserted or updated, and only those: a row
    # the guard refused is not returned (worker.config refuses an older SQLite).
    return _on_conflict(sqlite_insert(R)).returning(R.c.session_no, R.c.phone_key)


@functools.cache
def _recorded_upsert_statement() -> Any:
    """PostgreSQL: the receipts upsert and its history in one statement::

        WITH incoming AS (SELECT … FROM json_to_recordset(:json_rows)),
             applied AS (INSERT INTO sms_receipts … SELECT … FROM incoming
                         ON CONFLICT … DO UPDATE … WHERE <guard> AND NOT <repeat>
                         RETURNING account_id, session_no, phone, phone_key, result, …)
        INSERT INTO sms_receipt_events …
            SELECT …, true FROM applied
            UNION ALL
            SELECT …, false FROM incoming WHERE <not written, not a repeat, not lost before>

    The upsert reports the rows it wrote (RETURNING), so which receipts were applied is the
    guard's own verdict, never worked out again; worker.event_log says which of the others
    are kept. Still one round trip per answer, and per group of pushes whatever their accounts.
    """
    incoming = _incoming().cte("incoming")
    upsert = _on_conflict(_insert_from(incoming)).returning(
        R.c.account_id, *(R.c[name] for name in event_log.EVENT_COLUMNS)
    )
    return event_log.receipt_history_statement(incoming, upsert.cte("applied"), _NOW_PARAM)


_ACCOUNT_PARAM = sa.bindparam("account_id", type_=R.c.account_id.type)
_NOW_PARAM = sa.bindparam("now", type_=R.c.updated_at.type)


def _incoming() -> sa.Select[Any]:
    """PostgreSQL: the rows to upsert, from the JSON document, with their account: a row's own
    ``account_id`` (rows of several accounts: pushes recorded together), else the one bound for
    all (an answer's rows, of one account, which then need not repeat it)."""
    rows = json_rows(
        {"account_id": R.c.account_id.type, **{name: R.c[name].type for name in RECEIPT_COLUMNS}}
    ).subquery()
    return sa.select(
        sa.func.coalesce(rows.c.account_id, _ACCOUNT_PARAM).label("account_id"),
        *(rows.c[name] for name in RECEIPT_COLUMNS),
    )


def _insert_from(source: Any) -> Any:
    """PostgreSQL: INSERT INTO sms_receipts the rows of ``source`` (:func:`_incoming`), at one
    time (the bound ``now``)."""
    from sqlalchemy.dialects.postgresql import insert as pg_insert

    select = sa.select(
        source.c.account_id, *(source.c[name] for name in RECEIPT_COLUMNS), _NOW_PARAM, _NOW_PARAM
    )
    columns = ["account_id", *RECEIPT_COLUMNS, "first_seen_at", "updated_at"]
    return pg_insert(R).from_select(columns, select)


def _on_conflict(statement: Any) -> Any:
    excluded = statement.excluded
    return statement.on_conflict_do_update(
        index_elements=["account_id", "session_no", "phone_key"],
        set_={
            "phone": excluded.phone,
            "result": excluded.result,
            "receipt_code": excluded.receipt_code,
            "receipt_desc": excluded.receipt_desc,
            "receipt_time": excluded.receipt_time,
            "cost_count": excluded.cost_count,
            "user_id": excluded.user_id,
            "country_code": sa.func.coalesce(excluded.country_code, R.c.country_code),
            "source": excluded.source,
            "updated_at": excluded.updated_at,
        },
        # A receipt that says what the stored one says changes nothing, not even updated_at
        # or source: the upsert leaves it alone, and its RETURNING names only real changes.
        where=sa.and_(
            receipt_guard(R.c, excluded), sa.not_(event_log.is_repeat_sql(R.c, excluded))
        ),
    )


def upsert_receipts(
    session: Session, rows: Sequence[Mapping[str, Any]], *, account_id: int | None, now: datetime
) -> int:
    """Write receipts seen at ``now`` in one ``INSERT … ON CONFLICT DO UPDATE`` statement, and
    each observed change in ``sms_receipt_events`` (worker.event_log): every receipt that
    differs from the stored one, applied or not. The rows are of ``account_id``; without it
    (PostgreSQL only) each row names its own ``account_id``.

    Rows (see :func:`receipt_rows`) must be unique per (account, session, phone_key):
    PostgreSQL refuses to update one row twice in one statement. The conflict update only
    applies when the incoming receipt wins under the domain rule, so two pollers racing on the
    same phone (or a backfill) can never put a stale or non-final receipt over a final one.
    Callers lock the rows' sessions first (:func:`lock_sessions`), which the history's reading
    of the stored receipts relies on.
    """
    if not rows:
        return 0
    if session.get_bind().dialect.name == "postgresql":
        # Whether any history row was written is known only to the statement: a repeat-only
        # batch nudges a delivery round that finds nothing, which is cheap.
        event_nudge.mark_written(session)
        session.execute(
            _recorded_upsert_statement(),
            {"account_id": account_id, "now": now, **json_document(rows)},
        )
        return len(rows)
    if account_id is None:
        raise ValueError("SQLite upserts the receipts of one account at a time")
    common = {"account_id": account_id, "first_seen_at": now, "updated_at": now}
    written = session.connection().execute(
        _upsert_statement("sqlite"), [{**row, **common} for row in rows]
    )
    event_log.record_observed(
        session,
        rows,
        account_id=account_id,
        now=now,
        applied={(row.session_no, row.phone_key) for row in written},
    )
    return len(rows)


def results_by_session(
    session: Session, account_id: int, session_nos: Sequence[str]
) -> dict[str, dict[str, str]]:
    """The latest result per phone key of each session, as stored."""
    found: dict[str, dict[str, str]] = defaultdict(dict)
    if not session_nos:
        return found
    query = sa.select(R.c.session_no, R.c.phone_key, R.c.result).where(
        R.c.account_id == account_id, R.c.session_no.in_(session_nos)
    )
    for row in session.execute(query):
        found[row.session_no][row.phone_key] = row.result
    return found


def answered_results(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, str]]:
    """The result per phone key of each session in an answer's receipt rows."""
    found: dict[str, dict[str, str]] = defaultdict(dict)
    for row in rows:
        found[row["session_no"]][row["phone_key"]] = row["result"]
    return found


def _update_many(
    session: Session, kind: str, rows: Sequence[Mapping[str, Any]], **common: Any
) -> None:
    """``UPDATE sms_sessions`` row by row values, matched on ``id``: the columns of
    :data:`_UPDATES` ``[kind]``, and ``common`` values bound once for every row.

    On PostgreSQL one ``UPDATE … FROM json_to_recordset(…)`` statement; elsewhere an
    executemany. The statements are built once: building this one and the push's
    match-and-lock (their subquery's columns, their cache keys) was about 1.1 ms of Python per
    push transaction, more than PostgreSQL took to run them (README "Uspeedo's push").
    """
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    statement = _update_statement(dialect, kind)
    if dialect == "postgresql":
        session.execute(statement, {**common, **json_document(rows)})
        return
    session.connection().execute(
        statement,
        [{**common, **{f"b_{name}": value for name, value in row.items()}} for row in rows],
    )


@functools.cache
def _update_statement(dialect: str, kind: str) -> sa.Update:
    types, values = _UPDATES[kind]
    if dialect == "postgresql":
        source = json_rows(types).subquery("rows")
        columns: dict[str, Any] = {name: source.c[name] for name in types}
    else:
        columns = {name: sa.bindparam(f"b_{name}", type_=type_) for name, type_ in types.items()}
    return sa.update(S).where(S.c.id == columns["id"]).values(**values(columns))


@dataclass(frozen=True, kw_only=True, slots=True)
class Locked:
    """A session as it stands when an answer is recorded, its row locked until the commit."""

    phones: tuple[str, ...]
    phone_keys: tuple[str, ...] | None  # of a masked session (PollTarget.phone_keys)
    state: str
    claim_token: str | None
    held_by: str | None
    next_poll_at: datetime | None
    last_polled_at: datetime | None
    resolved_at: datetime | None
    last_error: str | None

    def holds(self, target: PollTarget) -> bool:
        """Whether ``target``'s poll still decides the session's schedule: its claim token is
        still the session's (a poll that outlived its hold, or a session escalated meanwhile,
        no longer is). An operator's repoll (no token) holds a session no poll holds."""
        return self.claim_token == target.token


def lock_sessions(session: Session, ids: Sequence[int]) -> dict[int, Locked]:
    """The sessions ``ids`` as they stand now, their rows locked until the commit, in
    (account_id, session_no) order: the order every path that locks several sessions uses, so
    that a bulk track and a recorded answer never deadlock. Deleted sessions are absent."""
    if not ids:
        return {}
    dialect = session.get_bind().dialect.name
    rows = session.execute(_lock_statement(dialect), {"ids": list(ids)})
    return {row.id: locked_row(row) for row in rows}


# What :func:`locked_row` reads of a session (with its id).
LOCKED_COLUMNS = (
    S.c.id,
    S.c.phones,
    S.c.masked_phone_keys,
    S.c.state,
    S.c.claim_token,
    S.c.held_by,
    S.c.next_poll_at,
    S.c.last_polled_at,
    S.c.resolved_at,
    S.c.last_error,
)


def locked_row(row: Any) -> Locked:
    """A session's row (:data:`LOCKED_COLUMNS`), read under its lock."""
    return Locked(
        phones=tuple(row.phones or ()),
        phone_keys=None if row.masked_phone_keys is None else tuple(row.masked_phone_keys),
        state=row.state,
        claim_token=row.claim_token,
        held_by=row.held_by,
        next_poll_at=row.next_poll_at,
        last_polled_at=row.last_polled_at,
        resolved_at=row.resolved_at,
        last_error=row.last_error,
    )


@functools.cache
def _lock_statement(dialect: str) -> Any:
    query = (
        sa.select(*LOCKED_COLUMNS).where(_in_ids(dialect)).order_by(S.c.account_id, S.c.session_no)
    )
    # SQLite has no row locks: its units of work begin with the write lock (worker.db).
    return query.with_for_update() if dialect == "postgresql" else query


_SESSION_UPDATE_TYPES: dict[str, Any] = {
    "id": sa.BigInteger(),
    "state": sa.Text(),
    "resolved_at": UTCDateTime(),
    "next_poll_at": UTCDateTime(),
    "last_polled_at": UTCDateTime(),
    "last_error": sa.Text(),
    "claim_token": sa.Text(),
    "held_by": sa.Text(),
}


_ESCALATION_DETAIL_TYPES: dict[str, Any] = {
    "id": sa.BigInteger(),
    "detail": S.c.escalation_detail.type,
}

# What :func:`_update_many` sets, by kind: the per-row columns' types, and the SET clause from
# those columns (PostgreSQL: the JSON rows'; SQLite: bound parameters).
_UPDATES: dict[str, tuple[dict[str, Any], Callable[[Mapping[str, Any]], dict[str, Any]]]] = {
    "sessions": (
        _SESSION_UPDATE_TYPES,
        lambda row: {
            **{name: row[name] for name in _SESSION_UPDATE_TYPES if name != "id"},
            "updated_at": sa.bindparam("now", type_=S.c.updated_at.type),
        },
    ),
    "escalation_detail": (
        _ESCALATION_DETAIL_TYPES,
        lambda row: {"escalation_detail": row["detail"]},
    ),
}


def _write_sessions(session: Session, rows: Sequence[Mapping[str, Any]], now: datetime) -> None:
    """Set each locked session's columns to the values computed for it."""
    _update_many(session, "sessions", rows, now=now)


def record_answer(
    session: Session,
    *,
    targets: Sequence[PollTarget],
    receipts: Iterable[Receipt],
    problems: Mapping[str, str],
    now: datetime,
    policy: PollPolicy,
    rng: random.Random,
    source: ReceiptSource = ReceiptSource.POLL,
) -> PollOutcome:
    """Store an API answer received at ``now``: upsert receipts, resolve the sessions that now
    qualify, and reschedule the rest ``interval_min``…``interval_max`` after this answer.

    The sessions are locked and read again first, so the decision uses the phones they have
    now (a phone tracked while the poll was in flight keeps the session open) and only a poll
    still holding a session reschedules it. Receipts are facts and are always stored; a
    session the answer settles is resolved whoever holds it; one escalated while its poll was
    in flight becomes resolved (keeping ``escalated_at``) if they settle it. A session deleted
    meanwhile is skipped with its receipts.
    """
    return record_receipts(
        session,
        targets=targets,
        receipts=receipts,
        now=now,
        source=source,
        schedule=_Schedule(problems=problems, policy=policy, rng=rng),
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class _Schedule:
    """What a poll's answer needs to reschedule the sessions it still holds."""

    problems: Mapping[str, str]
    policy: PollPolicy
    rng: random.Random


def record_receipts(
    session: Session,
    *,
    targets: Sequence[PollTarget],
    receipts: Iterable[Receipt],
    now: datetime,
    source: ReceiptSource,
    schedule: _Schedule | None = None,
    already_locked: Mapping[int, Locked] | None = None,
    phone_hash: PhoneHash | None = None,
) -> PollOutcome:
    """Store receipts of sessions seen at ``now`` and resolve the sessions they settle; with
    ``schedule`` (a poll's answer), also reschedule the sessions that poll still holds.
    ``targets`` are one account's sessions (a poll's), or sessions of several accounts whose
    SessionNos all differ (a push's: receipts are matched on the SessionNo): the sessions are
    locked and updated in one statement each whatever their accounts, the receipts upserted
    per account. Without it (a push, an inbox applied when tracking) no schedule, last_polled_at or
    last_error is touched: a session a push leaves unresolved keeps its schedule, and a poll
    in flight for it records its own answer.

    Both the poll and the push go through here, so the same rules hold for both: the upsert's
    guard (final never downgraded, older never wins), phones matched on digits, and the phones
    each session has now (read under its row lock, in the global lock order). A caller that
    locked the sessions already, in that order (a push, matching and locking in one statement:
    worker.push), passes what it read as ``already_locked``.

    A session whose phones were masked meanwhile (worker/masking.py) has its receipts keyed
    by ``phone_hash`` (else ``RECEIPTS_PHONE_HASH_KEY``'s); without either, its receipts are
    dropped and logged, never stored in clear.
    """
    if not targets:
        return PollOutcome(receipts_written=0, resolved=(), rescheduled=0)
    current = (
        lock_sessions(session, [t.id for t in targets])
        if already_locked is None
        else already_locked
    )
    live = [
        # The phones as they are now (a phone may have been tracked, or the session masked,
        # since the target was read).
        t
        if (t.phones, t.phone_keys) == (current[t.id].phones, current[t.id].phone_keys)
        else replace(t, phones=current[t.id].phones, phone_keys=current[t.id].phone_keys)
        for t in targets
        if t.id in current
    ]
    live, phone_hash = _hashable(session, live, phone_hash)
    keys = {t.id: t.tracked_keys() for t in live}
    rows = receipt_rows(live, receipts, source=source, phone_hash=phone_hash)
    account_of = {t.session_no: t.account_id for t in live}
    if len(account_of) != len(live):
        raise ValueError("targets of several accounts must have distinct SessionNos")
    written = _upsert_accounts(session, rows, account_of, now)
    answered = answered_results(rows)
    # Sessions the answer alone settles need no read-back (most of them, on a first poll).
    unsettled: dict[int, list[str]] = defaultdict(list)
    for t in live:
        if not settled_by_answer(keys[t.id], answered.get(t.session_no, {})):
            unsettled[t.account_id].append(t.session_no)
    settled = {t.session_no for t in live} - {no for nos in unsettled.values() for no in nos}
    stored: dict[str, dict[str, str]] = {}
    for account_id, session_nos in sorted(unsettled.items()):
        stored.update(results_by_session(session, account_id, session_nos))
    updates: list[dict[str, Any]] = []
    resolved_nos: list[str] = []
    events: list[dict[str, Any]] = []
    rescheduled = 0
    for target in live:
        locked = current[target.id]
        results = (answered if target.session_no in settled else stored).get(target.session_no, {})
        settles = is_resolved(keys[target.id], results)
        resolved = locked.state != RESOLVED and settles
        if settles:
            resolved_nos.append(target.session_no)
        if resolved:
            events.append(
                event_log.session_event(
                    target.account_id, target.session_no, SessionEventType.RESOLVED, source
                )
            )
        held = schedule is not None and locked.holds(target)
        ours = schedule is not None and bool(target.held_by) and locked.held_by == target.held_by
        if not (held or resolved or ours):
            continue  # the poll holding this session decides its schedule
        next_poll_at = locked.next_poll_at
        if resolved:
            next_poll_at = None
        elif held and schedule is not None and locked.state == PENDING:
            next_poll_at = schedule.policy.next_poll_at(target.sent_at, now, schedule.rng)
            rescheduled += 1
        updates.append(
            {
                "id": target.id,
                "state": RESOLVED if resolved else locked.state,
                "resolved_at": now if resolved else locked.resolved_at,
                "next_poll_at": next_poll_at,
                "last_polled_at": now if held else locked.last_polled_at,
                "last_error": (
                    schedule.problems.get(target.session_no)
                    if held and schedule is not None
                    else locked.last_error
                ),
                "claim_token": None if held or resolved else locked.claim_token,
                # This poll is over; another process's hold stays, unless nothing is left to
                # poll.
                "held_by": None if held or resolved else _held_after(locked, target),
            }
        )
    _write_sessions(session, updates, now)
    event_log.record_session_events(session, events, now=now)
    return PollOutcome(
        receipts_written=written,
        resolved=tuple(resolved_nos),
        rescheduled=rescheduled,
    )


def _upsert_accounts(
    session: Session, rows: list[dict[str, Any]], account_of: Mapping[str, int], now: datetime
) -> int:
    """Upsert receipt rows of sessions of several accounts (``account_of`` by SessionNo)."""
    if _is_pg(session):
        # One statement for every account (a group of pushes spans several): each row names
        # its own.
        for row in rows:
            row["account_id"] = account_of[row["session_no"]]
        return upsert_receipts(session, rows, account_id=None, now=now)
    by_account: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_account[account_of[row["session_no"]]].append(row)
    return sum(
        upsert_receipts(session, its, account_id=account_id, now=now)
        for account_id, its in sorted(by_account.items())
    )


def _stored_keys(session: Session, target: PollTarget) -> list[str]:
    """The phone keys of a session's stored receipts (a masked session tracked without
    phones: rare, and small)."""
    return list(
        session.scalars(
            sa.select(R.c.phone_key).where(
                R.c.account_id == target.account_id, R.c.session_no == target.session_no
            )
        )
    )


def _hashable(
    session: Session, live: list[PollTarget], phone_hash: PhoneHash | None
) -> tuple[list[PollTarget], PhoneHash | None]:
    """The targets whose receipts can be keyed, and the hash that keys the masked ones: the
    one given, else the configured one, else none and the masked sessions are left out."""
    if not any(t.masked for t in live):
        return live, phone_hash
    phone_hash = phone_hash or masking.configured_hash()
    if phone_hash is None:
        why = "RECEIPTS_PHONE_HASH_KEY is not set"
        unkeyable = [t for t in live if t.masked]
    else:
        # Hashed under another key (RECEIPTS_PHONE_HASH_KEY changed): a receipt hashed under
        # this one would never match its row, and would add a second one. A session tracked
        # without phones tells by its stored receipts' keys.
        why = "they were masked under another RECEIPTS_PHONE_HASH_KEY"
        unkeyable = [
            t
            for t in live
            if t.masked
            and not all(map(phone_hash.made, t.tracked_keys() or _stored_keys(session, t)))
        ]
    if unkeyable:
        log.warning(
            "receipts of %d masked session(s) dropped (%s): %s, so they cannot be matched to "
            "their masked rows",
            len(unkeyable),
            ", ".join(sorted(t.session_no for t in unkeyable)[:10]),
            why,
        )
        dropped = {t.id for t in unkeyable}
        live = [t for t in live if t.id not in dropped]
    return live, phone_hash


def _held_after(locked: Locked, target: PollTarget) -> str | None:
    """Who holds a session after ``target``'s poll, which no longer decides its schedule,
    ended: nobody if it was this poll's process (its answer is in), else the holder."""
    return None if locked.held_by == target.held_by else locked.held_by


def record_failure(
    session: Session,
    *,
    targets: Sequence[PollTarget],
    error: str,
    now: datetime,
    policy: PollPolicy,
    rng: random.Random,
) -> None:
    """A poll that got no usable answer by ``now``: keep the error, try again in the normal
    window after ``now`` (a failed attempt may still have reached the API). Only the sessions
    this poll still holds are touched."""
    current = lock_sessions(session, [t.id for t in targets])
    updates: list[dict[str, Any]] = []
    for target in targets:
        locked = current.get(target.id)
        if locked is None:
            continue
        held = locked.holds(target)
        if not held and not (target.held_by and locked.held_by == target.held_by):
            continue
        updates.append(
            {
                "id": target.id,
                "state": locked.state,
                "resolved_at": locked.resolved_at,
                "next_poll_at": (
                    policy.next_poll_at(target.sent_at, now, rng)
                    if held and locked.state == PENDING
                    else locked.next_poll_at
                ),
                "last_polled_at": now if held else locked.last_polled_at,
                "last_error": error if held else locked.last_error,
                "claim_token": None if held else locked.claim_token,
                "held_by": None if held else _held_after(locked, target),
            }
        )
    _write_sessions(session, updates, now)


# --- escalation -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Escalation:
    """An escalated session and what support needs to act on it."""

    id: int
    account_id: int
    session_no: str
    sent_at: datetime
    escalated_at: datetime
    poll_count: int
    last_error: str | None
    unresolved: tuple[tuple[str, str | None], ...]  # (phone, last known result or None)

    def detail(self) -> dict[str, Any]:
        return {
            "phones": [
                {"phone": phone, "last_result": result} for phone, result in self.unresolved
            ],
            "poll_count": self.poll_count,
            "last_error": self.last_error,
        }


def escalate_due(
    session: Session,
    *,
    now: datetime,
    policy: PollPolicy,
    limit: int = ESCALATION_BATCH,
) -> list[Escalation]:
    """Escalate pending sessions whose cutoff has passed, at most ``limit`` per call.

    The state change is one conditional UPDATE, so a session is escalated exactly once however
    many ticks run it at the same time; the caller logs and alerts from the returned rows only,
    and queues their webhooks (:func:`worker.webhooks.queue_escalations`) in the same
    transaction, so that an escalation never exists without its delivery, nor the other way
    round.
    """
    due = (
        sa.select(S.c.id)
        .where(S.c.state == PENDING, S.c.sent_at <= now - policy.cutoff)
        .order_by(S.c.sent_at)
        .limit(limit)
    )
    if _is_pg(session):
        due = due.with_for_update(skip_locked=True)
    statement = (
        sa.update(S)
        .where(S.c.id.in_(due.scalar_subquery()), S.c.state == PENDING)
        .values(
            state=ESCALATED,
            escalated_at=now,
            next_poll_at=None,
            claim_token=None,
            updated_at=now,
            # A session escalated again (resolved late, then reopened by a new phone) is a
            # new alert: the acknowledgement of its previous escalation does not cover it.
            acknowledged_at=None,
            ack_note=None,
        )
        .returning(
            S.c.id,
            S.c.account_id,
            S.c.session_no,
            S.c.phones,
            S.c.sent_at,
            S.c.poll_count,
            S.c.last_error,
        )
    )
    rows = list(session.execute(statement))
    if not rows:
        return []
    by_account: dict[int, list[Any]] = defaultdict(list)
    for row in rows:
        by_account[row.account_id].append(row)
    escalations: list[Escalation] = []
    for account_id, account_rows in by_account.items():
        stored = results_by_session(session, account_id, [r.session_no for r in account_rows])
        for row in account_rows:
            escalations.append(
                Escalation(
                    id=row.id,
                    account_id=row.account_id,
                    session_no=row.session_no,
                    sent_at=row.sent_at,
                    escalated_at=now,
                    poll_count=row.poll_count,
                    last_error=row.last_error,
                    unresolved=tuple(
                        unresolved_phones(row.phones or (), stored.get(row.session_no, {}))
                    ),
                )
            )
    _update_many(
        session, "escalation_detail", [{"id": e.id, "detail": e.detail()} for e in escalations]
    )
    event_log.record_session_events(
        session,
        [
            event_log.session_event(e.account_id, e.session_no, SessionEventType.ESCALATED)
            for e in sorted(escalations, key=lambda e: (e.account_id, e.session_no))
        ],
        now=now,
    )
    return escalations


# --- operators and observers ------------------------------------------------------------


def acknowledge(
    session: Session,
    session_nos: Sequence[str],
    *,
    now: datetime,
    note: str | None = None,
    account_id: int | None = None,
) -> list[tuple[int, str]]:
    """Mark escalations handled. All or none: an unknown, ambiguous or not escalated
    SessionNo refuses the whole call, naming each. Acknowledging twice keeps the first time."""
    query = sa.select(S.c.id, S.c.account_id, S.c.session_no, S.c.state).where(
        S.c.session_no.in_(list(session_nos))
    )
    if account_id is not None:
        query = query.where(S.c.account_id == account_id)
    found: dict[str, list[Any]] = defaultdict(list)
    for row in session.execute(query.with_for_update()):
        found[row.session_no].append(row)
    problems = []
    for session_no in dict.fromkeys(session_nos):
        rows = found.get(session_no, [])
        if not rows:
            problems.append(f"{session_no!r} is not tracked")
        elif len(rows) > 1:
            accounts = ", ".join(str(r.account_id) for r in rows)
            problems.append(f"{session_no!r} exists in accounts {accounts}: give --account-id")
        elif rows[0].state != ESCALATED:
            problems.append(f"{session_no!r} is {rows[0].state}, not escalated")
    if problems:
        raise AckError("nothing was acknowledged: " + "; ".join(problems))
    ids = [rows[0].id for rows in found.values()]
    session.execute(
        sa.update(S)
        .where(S.c.id.in_(ids), S.c.acknowledged_at.is_(None))
        .values(acknowledged_at=now, ack_note=note, updated_at=now)
    )
    return [(rows[0].account_id, rows[0].session_no) for rows in found.values()]


def record_heartbeat(
    session: Session, *, name: str, now: datetime, tick: timedelta, interval_max: timedelta
) -> None:
    """Upsert when a periodic job last ran (beat liveness for the views and the exporter)."""
    values = {
        "name": name,
        "beat_at": now,
        "tick_seconds": tick.total_seconds(),
        "poll_interval_max_seconds": interval_max.total_seconds(),
    }
    statement = upsert_insert(session, heartbeats_table).values(values)
    session.execute(
        statement.on_conflict_do_update(
            index_elements=["name"],
            set_={k: statement.excluded[k] for k in values if k != "name"},
        )
    )


def count_api_calls(session: Session, counts: Mapping[tuple[str, int], int]) -> None:
    """Add to the per-outcome API call counters (one upsert per outcome seen)."""
    if not counts:
        return
    statement = upsert_insert(session, api_calls_table)
    statement = statement.on_conflict_do_update(
        index_elements=["outcome", "ret_code"],
        set_={"calls": api_calls_table.c.calls + statement.excluded.calls},
    )
    session.connection().execute(
        statement,
        [
            {"outcome": outcome, "ret_code": ret_code, "calls": calls}
            for (outcome, ret_code), calls in sorted(counts.items())
        ],
    )
