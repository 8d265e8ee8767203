"""Minimisation: masking the phone numbers of finished sessions past
``RECEIPTS_MASK_PHONES_AFTER`` (README "Masking phone numbers"). Irreversible.

A session is masked once it is finished (resolved or escalated: not pending) and was sent
before ``now - older_than``. Its rows are kept for reporting, but every phone number it holds
is replaced by a masked form keeping the last four digits (``*******1111``):

- ``sms_sessions``: ``phones`` (tracked phones), the phones of ``escalation_detail``, and any
  of the session's phones spelled in ``last_error``;
- ``sms_receipts`` and ``sms_receipt_events`` (history): ``phone``;
- ``escalation_outbox``: the phones of the webhook's payload and its ``text``.

and every ``phone_key`` of it (receipts, history) becomes a keyed hash of the digits,
``h:<key id>:`` + hex HMAC-SHA256 under ``RECEIPTS_PHONE_HASH_KEY`` (:class:`PhoneHash`).
The session remembers the hashes of its tracked phones (``masked_phone_keys``) and when it
was masked (``phones_masked_at``).
A late receipt (a push, an operator's repoll) for a masked session is hashed the same way on
the write path (worker/store.py, ``receipt_rows``), so it still matches its row: one row per
phone, the guard (final never downgraded) unchanged, the session resolved when it settles.

Why a keyed hash and not a plain one: phone numbers are few enough (about 10^10 per country
code) that anyone holding the database could hash them all and read the plain hashes back. The
key lives only in the workers' environment, so the database alone tells nothing but the last
four digits. Lose the key (or change it) and late receipts of masked sessions cannot be matched
any more: they are dropped (and logged) rather than stored in clear, or under a second key.

Why only finished sessions: a pending session is still being polled, and masking it would
gain little (its cutoff is far shorter than any sensible masking age; the settings refuse an
age not longer than ``RECEIPTS_CUTOFF``). The keyed hash would keep it matching anyway. An
escalated session is masked whether or not it was acknowledged: its detail stays for support,
with the last four digits, and a repoll can still resolve it. A re-track of a masked session
changes nothing (worker/tracking.py): its phones cannot be compared with new ones in clear.

The pushed receipts waiting in ``sms_receipt_inbox`` are not masked: they are deleted by the
inbox's own expiry after ``RECEIPTS_CUTOFF`` (worker/push.py), before any masking age.

Work goes like the purge's (worker/purge.py): batches of at most ``batch_size`` sessions, each
its own transaction, walked in ``(account_id, session_no)`` order, the writers' lock order; on
PostgreSQL ``FOR UPDATE SKIP LOCKED``, so a session a push or a repoll holds is left for the
next run and the masking never waits for them (a push for a session a batch holds waits for
that batch, under a second: BATCH_SIZE). ``phones_masked_at IS NULL`` picks the
sessions, so a rerun after a crash (which rolls back its batch whole) or a second run at once
masks each session exactly once. Masking a masked form again changes nothing anyway
(:func:`masked_phone`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.db import json_document, json_rows
from worker.domain import SessionState, phone_key
from worker.models import (
    outbox_table,
    receipt_events_table,
    receipts_table,
    sessions_table,
)
from worker.purge import add_counts, in_batches

S = sessions_table
R = receipts_table
E = receipt_events_table
OUTBOX = outbox_table

# Sessions per transaction. A session's every receipt and history row is rewritten (the
# purge's deletes are cheaper): 2000 sessions of two phones took 1.3 s a batch on PostgreSQL
# (2 shared cores), 1000 keep a batch's locks, which a late push for one of them waits on,
# under a second.
BATCH_SIZE = 1000
MAX_PER_RUN = 1_000_000
# What marks a phone_key as a keyed hash: never digits, so never equal to a clear key.
HASH_PREFIX = "h:"
# What the masking rewrites, as receipts_purge_counts.masked and the exporter name them.
MASKED_TABLES = tuple(t.name for t in (S, R, E, OUTBOX))

SessionFactory = Callable[[], AbstractContextManager[Session]]


# --- the pure rules ---------------------------------------------------------------------


def masked_phone(phone: str) -> str:
    """A phone as masking leaves it: its last four digits, a ``*`` for each other digit
    (the form the logs show, worker/logs.py), and always at least one, so that a masked form
    is recognisable as one and kept as it is."""
    if phone.startswith("*"):
        return phone
    digits = phone_key(phone)
    return "*" * max(len(digits) - 4, 1) + digits[-4:]


def is_hashed(key: str) -> bool:
    return key.startswith(HASH_PREFIX)


@dataclass(frozen=True, slots=True)
class PhoneHash:
    """The keyed hash of a phone's digits (its :func:`worker.domain.phone_key`):
    ``h:<key id>:<hex HMAC-SHA256>``. The key id (the first 8 hex digits of the key's HMAC of a
    constant, which tells nothing of any phone) shows which key made a hash, so that a late
    receipt hashed under another key is refused rather than stored as a second row."""

    key: bytes
    prefix: str = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        key_id = hmac.new(self.key, b"uspeedo-receipts key id", hashlib.sha256).hexdigest()[:8]
        object.__setattr__(self, "prefix", f"{HASH_PREFIX}{key_id}:")

    def __call__(self, digits: str) -> str:
        if is_hashed(digits):
            return digits
        return self.prefix + hmac.new(self.key, digits.encode("ascii"), hashlib.sha256).hexdigest()

    def made(self, key: str) -> bool:
        """Whether ``key`` is a hash under this key."""
        return key.startswith(self.prefix)

    def __repr__(self) -> str:  # never the key
        return f"PhoneHash({self.prefix!r})"

    @classmethod
    def of(cls, key: str) -> PhoneHash:
        return cls(key.strip().encode("utf-8"))


def configured_hash() -> PhoneHash | None:
    """The hash of ``RECEIPTS_PHONE_HASH_KEY``, or None when it is not set. The write path asks
    for it only when it meets a masked session, so a deployment that never masks never reads
    it."""
    from worker.config import get_settings

    key = get_settings().phone_hash_key
    return PhoneHash.of(key.get_secret_value()) if key is not None else None


def replace_phones(text: str | None, phones: Iterable[str]) -> str | None:
    """``text`` with each of ``phones`` (as spelled there) replaced by its masked form, the
    longest first so that a phone containing another is masked whole."""
    if not text:
        return text
    for phone in sorted(set(phones), key=len, reverse=True):
        if phone and not phone.startswith("*"):
            text = text.replace(phone, masked_phone(phone))
    return text


def masked_detail(detail: Mapping[str, Any] | None, phones: Iterable[str]) -> Any:
    """``escalation_detail`` (or a webhook's payload) with its phones masked: the ``phone``
    of each entry of ``phones``/``unresolved_phones``, and every known phone spelled in its
    ``text`` and ``last_error``."""
    if detail is None:
        return None
    known = set(phones)
    out = dict(detail)
    for field in ("phones", "unresolved_phones"):
        entries = out.get(field)
        if isinstance(entries, list):
            for entry in entries:
                if isinstance(entry, dict) and isinstance(entry.get("phone"), str):
                    known.add(entry["phone"])
            out[field] = [
                {**entry, "phone": masked_phone(entry["phone"])}
                if isinstance(entry, dict) and isinstance(entry.get("phone"), str)
                else entry
                for entry in entries
            ]
    for field in ("text", "last_error"):
        if isinstance(out.get(field), str):
            out[field] = replace_phones(out[field], known)
    return out


# --- the batches ------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class MaskReport:
    sessions: int = 0
    receipts: int = 0
    history: int = 0  # rows of sms_receipt_events
    outbox: int = 0
    batches: int = 0
    bounded: bool = False  # stopped at max_sessions: more may be left
    skipped: int = 0  # picked, then found no longer maskable once locked

    def __add__(self, other: MaskReport) -> MaskReport:
        return MaskReport(
            sessions=self.sessions + other.sessions,
            receipts=self.receipts + other.receipts,
            history=self.history + other.history,
            outbox=self.outbox + other.outbox,
            batches=self.batches + other.batches,
            bounded=self.bounded or other.bounded,
            skipped=self.skipped + other.skipped,
        )


def maskable(*, cutoff: datetime) -> sa.ColumnElement[bool]:
    """The sessions a masking at ``cutoff`` takes: finished, sent before it, not masked yet."""
    return sa.and_(
        S.c.state != SessionState.PENDING.value,
        S.c.sent_at < cutoff,
        S.c.phones_masked_at.is_(None),
    )


def _rows_of(table: sa.Table, ids: Sequence[int], *columns: str) -> sa.Select[Any]:
    """``columns`` of the rows of ``table`` belonging to the sessions with these ids. A join
    on the session's key, so that each session's rows are found through the table's index on
    ``(account_id, session_no, …)``: a row-value ``IN`` of a batch's 2000 keys was checked
    against every row instead (8 s a batch over 16,000 history rows)."""
    return (
        sa.select(*(table.c[name] for name in columns))
        .join(
            S,
            sa.and_(table.c.account_id == S.c.account_id, table.c.session_no == S.c.session_no),
        )
        .where(S.c.id.in_(list(ids)))
        .order_by(table.c.id)
    )


def _bound(column: sa.Column[Any]) -> Any:
    """The type a value of ``column`` is bound with: a JSON column's None is SQL NULL (no
    escalation detail), not the JSON ``null`` SQLAlchemy's JSON type writes by default."""
    if isinstance(column.type, sa.JSON):
        return sa.JSON(none_as_null=True)
    return column.type


def _update_by_id(session: Session, table: sa.Table, rows: Sequence[Mapping[str, Any]]) -> int:
    """Set each row's columns (the same in every row) to its values, matched on ``id``: on
    PostgreSQL one ``UPDATE … FROM json_to_recordset(…)`` (one round trip for a batch's
    thousands of rows, as every bulk write here), elsewhere an executemany."""
    if not rows:
        return 0
    columns = [name for name in rows[0] if name != "id"]
    if session.get_bind().dialect.name == "postgresql":
        types = {"id": sa.BigInteger(), **{name: table.c[name].type for name in columns}}
        source = json_rows(types).subquery("rows")
        session.execute(
            sa.update(table)
            .where(table.c.id == source.c.id)
            .values({name: source.c[name] for name in columns}),
            json_document(rows),
        )
        return len(rows)
    statement = (
        sa.update(table)
        .where(table.c.id == sa.bindparam("b_id"))
        .values({name: sa.bindparam(f"b_{name}", type_=_bound(table.c[name])) for name in columns})
    )
    session.connection().execute(
        statement, [{f"b_{name}": value for name, value in row.items()} for row in rows]
    )
    return len(rows)


def mask_batch(
    session: Session,
    *,
    now: datetime,
    older_than: timedelta,
    phone_hash: PhoneHash,
    after: tuple[int, str] | None,
    limit: int,
) -> tuple[MaskReport, tuple[int, str] | None]:
    """Mask the next ``limit`` maskable sessions after the key ``after``: (what was masked,
    the key to go on after, or None when nothing is left)."""
    cutoff = now - older_than
    pick = (
        sa.select(S.c.id, S.c.account_id, S.c.session_no)
        .where(maskable(cutoff=cutoff))
        .order_by(S.c.account_id, S.c.session_no)
        .limit(limit)
    )
    if after is not None:
        pick = pick.where(sa.tuple_(S.c.account_id, S.c.session_no) > sa.tuple_(*after))
    if session.get_bind().dialect.name == "postgresql":
        pick = pick.with_for_update(of=S, skip_locked=True)
    picked = session.execute(pick).all()
    if not picked:
        return MaskReport(), None
    last = (int(picked[-1].account_id), str(picked[-1].session_no))
    # Read again now that they are locked: a re-track may have reopened one between the
    # pick's snapshot and its lock (PostgreSQL rechecks the locked row itself, but reading it
    # again costs nothing and holds on SQLite too).
    sessions = session.execute(
        sa.select(
            S.c.id,
            S.c.account_id,
            S.c.session_no,
            S.c.phones,
            S.c.escalation_detail,
            S.c.last_error,
        )
        .where(S.c.id.in_([int(row.id) for row in picked]), maskable(cutoff=cutoff))
        .order_by(S.c.account_id, S.c.session_no)
    ).all()
    skipped = len(picked) - len(sessions)
    if not sessions:
        return MaskReport(batches=1, skipped=skipped), last
    keys = [(int(row.account_id), str(row.session_no)) for row in sessions]
    ids = [int(row.id) for row in sessions]

    # Every phone a session's rows spell, so that free text (a webhook's, an error) loses
    # them too.
    spelled: dict[tuple[int, str], set[str]] = {key: set() for key in keys}
    for row in sessions:
        spelled[(row.account_id, row.session_no)].update(row.phones or ())

    def rekeyed(table: sa.Table) -> list[dict[str, Any]]:
        found = session.execute(
            _rows_of(table, ids, "id", "account_id", "session_no", "phone", "phone_key")
        )
        out = []
        for row in found:
            spelled[(row.account_id, row.session_no)].add(row.phone)
            phone, key = masked_phone(row.phone), phone_hash(row.phone_key)
            out.append({"id": row.id, "phone": phone, "phone_key": key})
        return out

    receipt_rows, history_rows = rekeyed(R), rekeyed(E)
    # Only the webhooks whose payload named a phone are rewritten (and counted).
    outbox_rows = []
    for row in session.execute(_rows_of(OUTBOX, ids, "id", "account_id", "session_no", "payload")):
        payload = masked_detail(row.payload, spelled[row.account_id, row.session_no])
        if payload != row.payload:
            outbox_rows.append({"id": row.id, "payload": payload})
    session_rows = []
    for row in sessions:
        phones = list(row.phones or ())
        session_rows.append(
            {
                "id": row.id,
                "phones": [masked_phone(p) for p in phones],
                "masked_phone_keys": [phone_hash(phone_key(p)) for p in phones],
                "escalation_detail": masked_detail(
                    row.escalation_detail, spelled[(row.account_id, row.session_no)]
                ),
                "last_error": replace_phones(
                    row.last_error, spelled[(row.account_id, row.session_no)]
                ),
                "phones_masked_at": now,
                "updated_at": now,
            }
        )
    counts = {
        R.name: _update_by_id(session, R, receipt_rows),
        E.name: _update_by_id(session, E, history_rows),
        OUTBOX.name: _update_by_id(session, OUTBOX, outbox_rows),
        S.name: _update_by_id(session, S, session_rows),
    }
    add_counts(session, counts, now=now, kind="masked")
    report = MaskReport(
        sessions=counts[S.name],
        receipts=counts[R.name],
        history=counts[E.name],
        outbox=counts[OUTBOX.name],
        batches=1,
        skipped=skipped,
    )
    return report, last


def mask(
    session_factory: SessionFactory,
    *,
    now: datetime,
    older_than: timedelta,
    phone_hash: PhoneHash,
    batch_size: int = BATCH_SIZE,
    max_sessions: int | None = None,
) -> MaskReport:
    """Mask batch after batch, each in its own transaction, until nothing is left or
    ``max_sessions`` were masked."""
    return in_batches(
        session_factory,
        lambda session, after, limit: mask_batch(
            session,
            now=now,
            older_than=older_than,
            phone_hash=phone_hash,
            after=after,
            limit=limit,
        ),
        empty=MaskReport(),
        bounded=MaskReport(bounded=True),
        batch_size=batch_size,
        max_sessions=max_sessions,
    )


@dataclass(frozen=True, slots=True)
class DryRunLine:
    state: str
    month: str  # YYYY-MM of sent_at (UTC)
    sessions: int


def _month(session: Session) -> sa.ColumnElement[str]:
    # As worker/purge.py's: PostgreSQL's month in UTC, SQLite's UTC text.
    if session.get_bind().dialect.name == "postgresql":
        return sa.func.to_char(sa.func.timezone("UTC", S.c.sent_at), "YYYY-MM")
    return sa.func.substr(S.c.sent_at, 1, 7)


def dry_run(session: Session, *, now: datetime, older_than: timedelta) -> list[DryRunLine]:
    """What a masking at ``now`` would mask, by state and month of ``sent_at``."""
    month = _month(session).label("month")
    rows = session.execute(
        sa.select(S.c.state, month, sa.func.count())
        .where(maskable(cutoff=now - older_than))
        .group_by(S.c.state, month)
        .order_by(month, S.c.state)
    )
    return [DryRunLine(state=str(s), month=str(m), sessions=int(n)) for s, m, n in rows]
