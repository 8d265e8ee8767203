"""Recording sessions to poll: validation of every way a SessionNo reaches us (Python call,
Celery task, CLI, CSV) and the idempotent bulk write."""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from worker.db import json_document, json_rows
from worker.domain import (
    MAX_PHONE_DIGITS,
    MAX_SESSION_NO_LENGTH,
    MIN_PHONE_DIGITS,
    SESSION_NO_CHARACTERS,
    SessionState,
    phone_key,
)
from worker.errors import TrackError
from worker.models import sessions_table
from worker.push import apply_inbox
from worker.schedule import PollPolicy

log = logging.getLogger(__name__)

MAX_USER_REF_LENGTH = 256
MAX_ACCOUNT_ID = 2**63 - 1
# A sender's clock may run a little ahead of ours; more than this is a wrong timestamp.
FUTURE_TOLERANCE = timedelta(minutes=5)
# Enough rows per statement to amortise round trips, few enough for SQLite's bound-parameter cap.
CHUNK = 2_000
# PostgreSQL takes a whole chunk as one JSON document (worker.db.json_rows), so chunks can be
# larger.
PG_CHUNK = 10_000

# \d is any Unicode decimal digit, which is what domain.phone_key reads (in ASCII).
_PHONE = re.compile(r"\+?[\d()\- ]+")
# The full-width forms of that punctuation, as CJK input methods type it with the digits.
_WIDE_PUNCTUATION = str.maketrans("\uff0b\uff08\uff09\uff0d\u3000", "+()- ")


@dataclass(frozen=True, kw_only=True, slots=True)
class TrackRequest:
    """One validated session to track."""

    account_id: int
    session_no: str
    phones: tuple[str, ...] = ()
    sent_at: datetime
    user_ref: str | None = None


@dataclass(kw_only=True, slots=True)
class TrackResult:
    """What a track call did: new sessions, sessions merged with new data, repeats."""

    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    keys: list[tuple[int, str]] = field(default_factory=list, repr=False)

    @property
    def total(self) -> int:
        return self.inserted + self.updated + self.unchanged


def parse_account_id(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"account_id must be a positive integer, got {value!r}")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if not isinstance(value, int):
        raise ValueError(f"account_id must be a positive integer, got {value!r}")
    if not 0 < value <= MAX_ACCOUNT_ID:
        raise ValueError(f"account_id must be a positive 64-bit integer, got {value}")
    return value


def parse_session_no(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"session_no must be a string, got {type(value).__name__}")
    text = value.strip()
    if not text:
        raise ValueError("session_no is empty")
    if len(text) > MAX_SESSION_NO_LENGTH:
        raise ValueError(
            f"session_no is {len(text)} characters long (at most {MAX_SESSION_NO_LENGTH})"
        )
    if not SESSION_NO_CHARACTERS.fullmatch(text):
        raise ValueError(f"session_no {text!r} must be printable ASCII without spaces")
    return text


def parse_phones(value: Any) -> tuple[str, ...]:
    """Phones as a list or one comma-separated string; duplicates (same digits) dropped."""
    if value is None or value == "":
        return ()
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, Iterable) or isinstance(items, bytes | Mapping):
        raise ValueError(
            f"phones must be a list of strings or a comma-separated string, got {value!r}"
        )
    phones: list[str] = []
    seen: set[str] = set()
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"phone {item!r} is not a string")
        phone = item.strip()
        if not phone:
            raise ValueError("phones contains an empty entry")
        digits = phone_key(phone)
        if (
            not _PHONE.fullmatch(phone.translate(_WIDE_PUNCTUATION))
            or not MIN_PHONE_DIGITS <= len(digits) <= MAX_PHONE_DIGITS
        ):
            raise ValueError(
                f"phone {phone!r} is malformed (digits, spaces, +, - and parentheses; "
                f"{MIN_PHONE_DIGITS} to {MAX_PHONE_DIGITS} digits)"
            )
        if digits not in seen:
            seen.add(digits)
            phones.append(phone)
    return tuple(phones)


def parse_sent_at(value: Any, *, now: datetime) -> datetime:
    if value is None or value == "":
        return now
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(f"sent_at {value!r} is not an ISO 8601 timestamp") from None
    if not isinstance(value, datetime):
        raise ValueError(f"sent_at must be an ISO 8601 string or a datetime, got {value!r}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"sent_at {value.isoformat()} has no UTC offset (e.g. +00:00)")
    try:
        in_utc = value.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"sent_at {value.isoformat()} is out of range") from None
    if in_utc > now + FUTURE_TOLERANCE:
        raise ValueError(f"sent_at {value.isoformat()} is in the future")
    return in_utc


def parse_user_ref(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"user_ref must be a string, got {type(value).__name__}")
    if len(value) > MAX_USER_REF_LENGTH:
        raise ValueError(f"user_ref is longer than {MAX_USER_REF_LENGTH} characters")
    # Refused here, with the row named, rather than by the database for the whole call.
    if "\x00" in value:
        raise ValueError("user_ref contains a NUL character, which cannot be stored")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("user_ref is not valid Unicode (it holds a lone surrogate)") from None
    return value


_FIELDS = ("account_id", "session_no", "phones", "sent_at", "user_ref")


def parse_request(raw: Mapping[str, Any], *, now: datetime) -> TrackRequest:
    """Validate one session; ValueError names the first bad field."""
    unknown = set(raw) - set(_FIELDS)
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(sorted(unknown))}")
    parsed: dict[str, Any] = {}
    for name, parse in (
        ("account_id", parse_account_id),
        ("session_no", parse_session_no),
        ("phones", parse_phones),
        ("user_ref", parse_user_ref),
    ):
        if name in ("account_id", "session_no") and name not in raw:
            raise ValueError(f"{name} is missing")
        try:
            parsed[name] = parse(raw.get(name))
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    try:
        parsed["sent_at"] = parse_sent_at(raw.get("sent_at"), now=now)
    except ValueError as exc:
        raise ValueError(f"sent_at: {exc}") from None
    return TrackRequest(**parsed)


def parse_requests(
    rows: Iterable[Mapping[str, Any] | TrackRequest],
    *,
    now: datetime,
    label: str = "row",
    first_number: int = 1,
) -> list[TrackRequest]:
    """Validate all rows; raise one TrackError listing every bad row (numbered from
    ``first_number``) if any is bad.

    A ``TrackRequest`` is validated like the dict of its fields, with the same messages:
    nothing but its type says it was validated, and anyone can build one.
    """
    requests: list[TrackRequest] = []
    problems: list[str] = []
    for number, raw in enumerate(rows, start=first_number):
        try:
            requests.append(parse_row(raw, now=now, label=label, number=number))
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise TrackError(problems, valid_rows=len(requests))
    return requests


def parse_row(
    raw: Mapping[str, Any] | TrackRequest, *, now: datetime, label: str, number: int
) -> TrackRequest:
    """Validate one row; ValueError names the row (``label`` ``number``, and its SessionNo
    when it has one) and its first bad field."""
    fields = _fields_of(raw) if isinstance(raw, TrackRequest) else raw
    try:
        return parse_request(fields, now=now)
    except ValueError as exc:
        session = fields.get("session_no") if isinstance(fields, Mapping) else None
        where = f"{label} {number}" + (f" (session_no {session!r})" if session else "")
        raise ValueError(f"{where}: {exc}") from None


def _fields_of(request: TrackRequest) -> dict[str, Any]:
    return {name: getattr(request, name) for name in _FIELDS}


def _merge(requests: Iterable[TrackRequest]) -> dict[tuple[int, str], TrackRequest]:
    """Fold repeats of one session within a call, as tracking twice would."""
    merged: dict[tuple[int, str], TrackRequest] = {}
    for request in requests:
        key = (request.account_id, request.session_no)
        previous = merged.get(key)
        merged[key] = request if previous is None else _combine(previous, request)
    return merged


def _combine(old: TrackRequest, new: TrackRequest) -> TrackRequest:
    return TrackRequest(
        account_id=old.account_id,
        session_no=old.session_no,
        phones=parse_phones([*old.phones, *new.phones]),
        sent_at=min(old.sent_at, new.sent_at),
        user_ref=new.user_ref or old.user_ref,
    )


def track_requests(
    session: Session, requests: Sequence[TrackRequest], *, policy: PollPolicy, now: datetime
) -> TrackResult:
    """Record sessions in bulk, idempotently.

    New sessions go in with one multi-row ``INSERT … ON CONFLICT DO NOTHING`` per chunk; a
    session that exists already (tracked before, or inserted concurrently by another caller
    between our statements, the race ON CONFLICT absorbs) is merged instead: phones are
    added, the earliest ``sent_at`` and the newest ``user_ref`` win. A resolved session that
    gains a phone it has no final receipt for is reopened, since it is no longer resolved.
    """
    result = TrackResult()
    merged = _merge(requests)
    # Sorted, so that every chunk takes its locks (new rows' unique index entries included) in
    # the global (account_id, session_no) order.
    items = [merged[key] for key in sorted(merged)]
    is_pg = session.get_bind().dialect.name == "postgresql"
    chunk_size = PG_CHUNK if is_pg else CHUNK
    for start in range(0, len(items), chunk_size):
        chunk = items[start : start + chunk_size]
        if is_pg:
            inserted = _insert_new_pg(session, chunk, policy=policy, now=now)
            result.inserted += len(inserted)
            existing = [r for r in chunk if (r.account_id, r.session_no) not in inserted]
            # Looked up in smaller pieces: a row-value IN list of 10,000 pairs exhausts
            # PostgreSQL's parser stack.
            for piece in range(0, len(existing), CHUNK):
                _merge_existing(
                    session, existing[piece : piece + CHUNK], result, policy=policy, now=now
                )
        else:
            _track_chunk_sqlite(session, chunk, result, policy=policy, now=now)
        # Receipts pushed before the sender tracked these sessions are theirs now.
        apply_inbox(
            session, [(r.account_id, r.session_no) for r in chunk], now=now, cutoff=policy.cutoff
        )
    result.keys = list(merged)
    return result


def _track_chunk_sqlite(
    session: Session,
    chunk: Sequence[TrackRequest],
    result: TrackResult,
    *,
    policy: PollPolicy,
    now: datetime,
) -> None:
    rows = [
        {
            "account_id": r.account_id,
            "session_no": r.session_no,
            "phones": list(r.phones),
            "user_ref": r.user_ref,
            "sent_at": r.sent_at,
            "state": SessionState.PENDING.value,
            "next_poll_at": policy.first_poll_at(r.sent_at),
            "poll_count": 0,
            "created_at": now,
            "updated_at": now,
        }
        for r in chunk
    ]
    inserted = {
        (row.account_id, row.session_no)
        for row in session.execute(_insert_new_statement_sqlite(), rows)
    }
    result.inserted += len(inserted)
    existing = [r for r in chunk if (r.account_id, r.session_no) not in inserted]
    if existing:
        _merge_existing(session, existing, result, policy=policy, now=now)


@functools.cache
def _insert_new_statement_sqlite() -> Any:
    """SQLite: one ``INSERT … ON CONFLICT DO NOTHING RETURNING`` compiled once and executed with
    many rows (SQLAlchemy's "insertmanyvalues" batches them). A multi-row ``.values(rows)``
    was compiled afresh for every chunk: 2,000 rows took seconds to compile, all of them with
    SQLite's write lock held."""
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    table = sessions_table
    return (
        sqlite_insert(table)
        .on_conflict_do_nothing(index_elements=["account_id", "session_no"])
        .returning(table.c.account_id, table.c.session_no)
    )


def _insert_new_pg(
    session: Session, chunk: Sequence[TrackRequest], *, policy: PollPolicy, now: datetime
) -> set[tuple[int, str]]:
    """PostgreSQL: insert the new sessions of a chunk with one ``INSERT … SELECT FROM
    json_to_recordset(…) ON CONFLICT DO NOTHING``, whose text never changes (it is built and
    compiled once) however many rows it carries; returns the keys it inserted."""
    rows = [
        {
            "account_id": r.account_id,
            "session_no": r.session_no,
            "phones": r.phones,
            "user_ref": r.user_ref,
            "sent_at": r.sent_at,
            "next_poll_at": policy.first_poll_at(r.sent_at),
        }
        for r in chunk
    ]
    params = {"now": now, **json_document(rows)}
    return {
        (row.account_id, row.session_no) for row in session.execute(_insert_new_statement(), params)
    }


@functools.cache
def _insert_new_statement() -> Any:
    table = sessions_table
    source = json_rows(
        {
            "account_id": sa.BigInteger(),
            "session_no": sa.Text(),
            "phones": JSONB(),
            "user_ref": sa.Text(),
            "sent_at": table.c.sent_at.type,
            "next_poll_at": table.c.next_poll_at.type,
        }
    ).subquery("new")
    now_value = sa.bindparam("now", type_=table.c.created_at.type)
    select = sa.select(
        source.c.account_id,
        source.c.session_no,
        source.c.phones,
        source.c.user_ref,
        source.c.sent_at,
        source.c.next_poll_at,
        sa.literal(SessionState.PENDING.value),
        sa.literal(0),
        now_value,
        now_value,
    )
    columns = [
        "account_id",
        "session_no",
        "phones",
        "user_ref",
        "sent_at",
        "next_poll_at",
        "state",
        "poll_count",
        "created_at",
        "updated_at",
    ]
    return (
        pg_insert(table)
        .from_select(columns, select)
        .on_conflict_do_nothing(index_elements=["account_id", "session_no"])
        .returning(table.c.account_id, table.c.session_no)
    )


def _merge_existing(
    session: Session,
    requests: Sequence[TrackRequest],
    result: TrackResult,
    *,
    policy: PollPolicy,
    now: datetime,
) -> None:
    table = sessions_table
    wanted = {(r.account_id, r.session_no): r for r in requests}
    query = (
        sa.select(
            table.c.id,
            table.c.account_id,
            table.c.session_no,
            table.c.phones,
            table.c.sent_at,
            table.c.user_ref,
            table.c.state,
            table.c.phones_masked_at,
        )
        .where(sa.tuple_(table.c.account_id, table.c.session_no).in_(list(wanted)))
        # The global lock order (see worker.store.lock_sessions): a bulk re-track and a
        # recorded answer never wait on each other's rows in opposite orders.
        .order_by(table.c.account_id, table.c.session_no)
        .with_for_update()
    )
    updates: list[dict[str, Any]] = []
    for row in session.execute(query):
        request = wanted[(row.account_id, row.session_no)]
        if row.phones_masked_at is not None:
            # Its phones are masked (worker/masking.py): new phones cannot be told apart from
            # the tracked ones, nor stored in clear beside them. It stays as it is.
            log.warning(
                "track of %s (account %d) ignored: its phones were masked at %s",
                row.session_no,
                row.account_id,
                row.phones_masked_at.isoformat(),
            )
            result.unchanged += 1
            continue
        stored = TrackRequest(
            account_id=row.account_id,
            session_no=row.session_no,
            phones=tuple(row.phones or ()),
            sent_at=row.sent_at,
            user_ref=row.user_ref,
        )
        combined = _combine(stored, request)
        if combined == stored:
            result.unchanged += 1
            continue
        result.updated += 1
        gained_phones = {phone_key(p) for p in combined.phones} - {
            phone_key(p) for p in stored.phones
        }
        reopen = row.state == SessionState.RESOLVED and bool(gained_phones)
        updates.append(
            {
                "_id": row.id,
                "_phones": list(combined.phones),
                "_sent_at": combined.sent_at,
                "_user_ref": combined.user_ref,
                "_state": SessionState.PENDING.value if reopen else row.state,
                "_reopen": reopen,
                "_next_poll_at": now,
                "_now": now,
            }
        )
    if updates:
        bp = sa.bindparam
        statement = (
            sa.update(table)
            .where(table.c.id == bp("_id"))
            .values(
                phones=bp("_phones", type_=table.c.phones.type),
                sent_at=bp("_sent_at", type_=table.c.sent_at.type),
                user_ref=bp("_user_ref"),
                state=bp("_state"),
                next_poll_at=sa.case(
                    (bp("_reopen"), bp("_next_poll_at", type_=table.c.next_poll_at.type)),
                    else_=table.c.next_poll_at,
                ),
                resolved_at=sa.case((bp("_reopen"), sa.null()), else_=table.c.resolved_at),
                updated_at=bp("_now", type_=table.c.updated_at.type),
            )
        )
        session.connection().execute(statement, updates)
