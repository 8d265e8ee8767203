"""Uspeedo's push of status reports ("Callback API", ``MsgType`` 2): parsing a push body,
recording its receipts through the same rules as a poll's, and the inbox of receipts pushed for
a SessionNo that is not tracked (yet), which this module owns (``sms_receipt_inbox``).

A push carries no AccountId. Its receipts are matched to tracked sessions on the SessionNo
alone, or within the account the push URL names (``?account_id=``). A SessionNo tracked in no
account (the sender has not tracked it yet) or in several (no account named) is parked in the
inbox, and applied when the session is tracked, as long as its cutoff allows; the tick expires
what is older than the cutoff and keeps the inbox under its bound.

The push is fast but lossy (Uspeedo retries a failed push three times, a second apart, then
drops it): the poll stays the source of truth and finds what a push missed.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, cast

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker import store
from worker.db import json_document, json_rows
from worker.domain import (
    MAX_SESSION_NO_LENGTH,
    RECEIPT_FACTS,
    SESSION_NO_CHARACTERS,
    ReceiptSource,
    ReceiptVersion,
    Result,
    phone_key,
    pick_latest_by,
)
from worker.errors import show
from worker.models import inbox_table, sessions_table
from worker.receipts import Receipt
from worker.store import PollTarget

INBOX = inbox_table
S = sessions_table

RECEIPT_MSG_TYPE: Final = 2
# A push names no account; the inbox keeps the account its URL named, or this.
NO_ACCOUNT: Final = 0
UNTRACKED: Final = "untracked"
AMBIGUOUS: Final = "ambiguous"


class NotAPush(ValueError):
    """A body that is not a push at all (the receiver answers 400)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class PushBatch:
    """What one push request carried."""

    msg_type: int
    receipts: tuple[Receipt, ...]
    # One line per item skipped (malformed), naming where; the rest are stored.
    skipped: tuple[str, ...]


def parse_push(payload: Any, *, received_at: datetime) -> PushBatch:
    """A decoded push body: ``{"MsgType": 2, "Data": [{"SessionNo", "Phone", ...}]}``.

    Only the shape of the whole is fatal (:class:`NotAPush`); a malformed item is skipped and
    named, so that one odd report cannot cost the others. Each item is parsed and bounded as a
    receipt of an answer is (worker/receipts.py); ``ReceiptResult`` ``UNKNOWN`` is ``Unknow``.
    """
    if not isinstance(payload, Mapping):
        raise NotAPush(f"the body is not a JSON object: {show(payload)}")
    msg_type = payload.get("MsgType")
    if isinstance(msg_type, bool) or not isinstance(msg_type, int):
        raise NotAPush(f"MsgType is missing or not an integer: {show(msg_type)}")
    if msg_type != RECEIPT_MSG_TYPE:
        # An uplink reply (MsgType 0) or a kind not known yet: nothing of ours to store.
        return PushBatch(msg_type=msg_type, receipts=(), skipped=())
    data = payload.get("Data")
    if not isinstance(data, list):
        raise NotAPush(f"Data is not a list: {show(data)}")
    receipts: list[Receipt] = []
    skipped: list[str] = []
    for index, item in enumerate(data):
        where = f"Data[{index}]"
        if not isinstance(item, Mapping):
            skipped.append(f"{where}: not an object: {show(item)}")
            continue
        session_no = item.get("SessionNo")
        if not isinstance(session_no, str) or not session_no.strip():
            skipped.append(f"{where}: SessionNo: expected a string, got {show(session_no)}")
            continue
        session_no = session_no.strip()
        if len(session_no) > MAX_SESSION_NO_LENGTH:
            skipped.append(f"{where}: SessionNo: {len(session_no)} characters long")
            continue
        if not SESSION_NO_CHARACTERS.fullmatch(session_no):
            # No tracked session has such a SessionNo (NUL, a lone surrogate, a space), and
            # the database could not even look one up: a lone surrogate is no UTF-8.
            skipped.append(f"{where}: SessionNo {show(session_no)}: not printable ASCII")
            continue
        try:
            receipts.append(Receipt.from_payload(session_no, item, received_at=received_at))
        except ValueError as exc:
            skipped.append(f"{where} (SessionNo {show(session_no)}): {exc}")
    return PushBatch(msg_type=msg_type, receipts=tuple(receipts), skipped=tuple(skipped))


@dataclass(frozen=True, kw_only=True, slots=True)
class PushOutcome:
    """What recording one push did."""

    applied: int  # receipts matched to a tracked session (stored or outranked)
    parked: int  # receipts waiting in the inbox
    resolved: tuple[str, ...]  # SessionNos the push settled
    # SessionNos matched to a tracked session (their receipts applied; the others parked): what
    # tells each of several pushes recorded together (worker/push_writer.py) its own counts.
    matched: frozenset[str] = frozenset()


def record_push(
    session: Session,
    receipts: Sequence[Receipt],
    *,
    now: datetime,
    account_id: int | None = None,
) -> PushOutcome:
    """Store pushed receipts received at ``now``: each SessionNo tracked in exactly one account
    (``account_id``'s, when given) gets them through :func:`worker.store.record_receipts`, the
    poll's own path; the others are parked in the inbox.

    A push racing a poll of the same session loses nothing and downgrades nothing: both lock
    the session first (one global order), and the upsert's guard decides between receipts. A
    session the push settles is resolved and never polled again; one it leaves unresolved
    keeps its schedule.
    """
    if not receipts:
        return PushOutcome(applied=0, parked=0, resolved=())
    by_no: dict[str, list[Receipt]] = defaultdict(list)
    for receipt in receipts:
        by_no[receipt.session_no].append(receipt)
    tracked, locked = _lock_tracked(session, sorted(by_no), account_id)
    parked: list[tuple[Receipt, str]] = []
    # Each SessionNo matched in exactly one account: distinct SessionNos, which one call
    # records whatever their accounts (a push spans accounts; one pass, not one per account).
    targets = [found[0] for found in tracked.values() if len(found) == 1]
    for session_no, its in by_no.items():
        found = tracked.get(session_no, [])
        if len(found) != 1:
            parked.extend((r, AMBIGUOUS if found else UNTRACKED) for r in its)
    names = {t.session_no for t in targets}
    mine = [r for r in receipts if r.session_no in names]
    outcome = store.record_receipts(
        session,
        targets=targets,
        receipts=mine,
        now=now,
        source=ReceiptSource.PUSH,
        already_locked=locked,
    )
    park(session, parked, account_id=account_id or NO_ACCOUNT, now=now)
    return PushOutcome(
        applied=len(mine), parked=len(parked), resolved=outcome.resolved, matched=frozenset(names)
    )


@functools.cache
def _matching(dialect: str, *, in_account: bool, lock: bool) -> sa.Select[Any]:
    """The tracked sessions of the SessionNos bound as ``session_nos`` (within the bound
    ``account_id`` when ``in_account``), in the (account_id, session_no) order every path that
    locks several sessions uses; with ``lock``, read as :func:`worker.store.lock_sessions`
    reads them, and locked (PostgreSQL). Built once, the SessionNos an expanding parameter:
    building it each time cost a push more than PostgreSQL took to run it."""
    columns = store.LOCKED_COLUMNS if lock else (S.c.id, S.c.phones)
    query = sa.select(S.c.account_id, S.c.session_no, S.c.sent_at, *columns).where(
        S.c.session_no.in_(sa.bindparam("session_nos", expanding=True))
    )
    if in_account:
        query = query.where(S.c.account_id == sa.bindparam("account_id", type_=sa.BigInteger()))
    query = query.order_by(S.c.account_id, S.c.session_no)
    # SQLite has no row locks: its units of work begin with the write lock (worker.db).
    return query.with_for_update() if lock and dialect == "postgresql" else query


def _execute_matching(
    session: Session, session_nos: Sequence[str], account_id: int | None, *, lock: bool
) -> Any:
    query = _matching(session.get_bind().dialect.name, in_account=account_id is not None, lock=lock)
    return session.execute(query, {"session_nos": list(session_nos), "account_id": account_id})


def _lock_tracked(
    session: Session, session_nos: Sequence[str], account_id: int | None
) -> tuple[dict[str, list[PollTarget]], dict[int, store.Locked]]:
    """:func:`_tracked`, the sessions locked and read as :func:`worker.store.lock_sessions`
    does, in the same statement: a push pays one round trip to match and lock. A SessionNo
    tracked in several accounts is locked too, and parked: a lock held a moment longer costs
    nothing."""
    found: dict[str, list[PollTarget]] = defaultdict(list)
    locked: dict[int, store.Locked] = {}
    for row in _execute_matching(session, session_nos, account_id, lock=True):
        found[row.session_no].append(PollTarget.from_row(row, row.sent_at))
        locked[row.id] = store.locked_row(row)
    return found, locked


def _tracked(
    session: Session, session_nos: Sequence[str], account_id: int | None
) -> dict[str, list[PollTarget]]:
    """The tracked sessions of ``session_nos`` (within ``account_id`` when given)."""
    found: dict[str, list[PollTarget]] = defaultdict(list)
    for row in _execute_matching(session, session_nos, account_id, lock=False):
        found[row.session_no].append(PollTarget.from_row(row, row.sent_at))
    return found


# --- the inbox ----------------------------------------------------------------------------

INBOX_COLUMNS = (
    "session_no",
    "account_id",
    "phone",
    "phone_key",
    *RECEIPT_FACTS,
    "country_code",
    "reason",
    "received_at",
)


def park(
    session: Session, parked: Iterable[tuple[Receipt, str]], *, account_id: int, now: datetime
) -> int:
    """Keep pushed receipts no single tracked session could take, one row per (SessionNo,
    account, phone) holding the winning version (the receipts' own guard, as in
    ``sms_receipts``), so that Uspeedo's retries of one push add nothing."""
    candidates: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for receipt, reason in parked:
        key = phone_key(receipt.phone)
        if not key:
            continue
        candidates[(receipt.session_no, key)].append(
            {
                "session_no": receipt.session_no,
                "account_id": account_id,
                "phone": receipt.phone,
                "phone_key": key,
                "result": receipt.result.value,
                "receipt_code": receipt.receipt_code,
                "receipt_desc": receipt.receipt_desc,
                "receipt_time": receipt.receipt_time,
                "cost_count": receipt.cost_count,
                "user_id": receipt.user_id,
                "country_code": receipt.country_code,
                "reason": reason,
                "received_at": now,
            }
        )
    rows = {key: pick_latest_by(versions, _version) for key, versions in candidates.items()}
    if not rows:
        return 0
    ordered = [rows[k] for k in sorted(rows)]
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        session.execute(_park_statement(dialect), json_document(ordered))
    else:
        session.connection().execute(_park_statement(dialect), ordered)
    return len(ordered)


@functools.cache
def _park_statement(dialect: str) -> Any:
    statement: Any
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        source = json_rows({name: INBOX.c[name].type for name in INBOX_COLUMNS}).subquery()
        statement = pg_insert(INBOX).from_select(
            list(INBOX_COLUMNS), sa.select(*(source.c[name] for name in INBOX_COLUMNS))
        )
    else:
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        statement = sqlite_insert(INBOX)
    excluded = statement.excluded
    return statement.on_conflict_do_update(
        index_elements=["session_no", "account_id", "phone_key"],
        set_={
            name: excluded[name]
            for name in INBOX_COLUMNS
            if name not in ("session_no", "account_id", "phone_key")
        },
        where=store.receipt_guard(INBOX.c, excluded),
    )


def apply_inbox(
    session: Session, keys: Sequence[tuple[int, str]], *, now: datetime, cutoff: timedelta
) -> PushOutcome:
    """Apply the parked receipts of sessions just tracked (``keys``: (account_id, SessionNo)),
    in the tracking's transaction: a receipt parked for the SessionNo (for its account, or for
    none) reaches the session if the SessionNo is tracked in that one account only, and was
    received within the cutoff of the session's sending. Applied rows leave the inbox."""
    if not keys or not session.scalar(sa.select(sa.exists().where(INBOX.c.id.is_not(None)))):
        # The common case: nothing parked, one probe of the primary key.
        return PushOutcome(applied=0, parked=0, resolved=())
    session_nos = sorted({no for _, no in keys})
    query = (
        sa.select(INBOX)
        .where(INBOX.c.session_no.in_(session_nos))
        .order_by(INBOX.c.session_no, INBOX.c.id)
    )
    waiting = [dict(row) for row in session.execute(query).mappings()]
    if not waiting:
        return PushOutcome(applied=0, parked=0, resolved=())
    tracked = _tracked(session, sorted({row["session_no"] for row in waiting}), None)
    applied = 0
    resolved: list[str] = []
    done: list[int] = []
    per_target: dict[int, tuple[PollTarget, list[Receipt]]] = {}
    for row in waiting:
        found = tracked.get(row["session_no"], [])
        if row["account_id"] != NO_ACCOUNT:
            found = [t for t in found if t.account_id == row["account_id"]]
        if len(found) != 1:
            continue  # still ambiguous, or not this call's: it waits or expires
        target = found[0]
        if row["received_at"] > target.sent_at + cutoff:
            continue
        per_target.setdefault(target.id, (target, []))[1].append(_receipt(row))
        done.append(row["id"])
    by_account: dict[int, list[tuple[PollTarget, list[Receipt]]]] = defaultdict(list)
    for target, its in per_target.values():
        by_account[target.account_id].append((target, its))
    for _account, items in sorted(by_account.items()):
        outcome = store.record_receipts(
            session,
            targets=[target for target, _ in items],
            receipts=[r for _, its in items for r in its],
            now=now,
            source=ReceiptSource.PUSH,
        )
        applied += sum(len(its) for _, its in items)
        resolved.extend(outcome.resolved)
    if done:
        session.execute(sa.delete(INBOX).where(INBOX.c.id.in_(done)))
    return PushOutcome(applied=applied, parked=0, resolved=tuple(resolved))


def _version(row: Mapping[str, Any]) -> ReceiptVersion:
    return ReceiptVersion(result=row["result"], receipt_time=row["receipt_time"])


def _receipt(row: Mapping[str, Any]) -> Receipt:
    return Receipt(
        session_no=row["session_no"],
        phone=row["phone"],
        result=Result(row["result"]),
        receipt_code=row["receipt_code"] or "",
        receipt_desc=row["receipt_desc"] or "",
        receipt_time=row["receipt_time"],
        cost_count=row["cost_count"],
        user_id=row["user_id"],
        country_code=row["country_code"],
    )


def expire_inbox(session: Session, *, now: datetime, cutoff: timedelta, max_rows: int) -> int:
    """Drop parked receipts older than the cutoff (no session tracked now could take them) and,
    past ``max_rows``, the oldest: the inbox is bounded whatever is pushed at it."""
    expired = _deleted(session, sa.delete(INBOX).where(INBOX.c.received_at < now - cutoff))
    # Ids only grow: every row below (newest id - max_rows) is one of the oldest, and keeping
    # at most max_rows ids' worth keeps at most max_rows rows (deletions only leave fewer).
    newest = session.scalar(sa.select(sa.func.max(INBOX.c.id)))
    if newest is not None and newest > max_rows:
        expired += _deleted(session, sa.delete(INBOX).where(INBOX.c.id <= newest - max_rows))
    return expired


def _deleted(session: Session, statement: sa.Delete) -> int:
    result = cast("sa.CursorResult[Any]", session.execute(statement))
    return result.rowcount or 0
