"""Refused intake: ``receipts.track`` tasks that failed validation, kept in ``rejected_tracks``
until an operator resubmits them (with corrections) or dismisses them (README "Refused tasks").

Only the task records here. A Python caller (``worker.track``) and the command line
(``receipts track``) get the :class:`worker.TrackError` back at once, with nothing recorded, and
fix their own input; a task's sender shares only the broker and hears nothing back (there is no
result backend), so the worker is the one place where its refusal can be kept.

The arguments are stored as received, phones in clear, as ``sms_sessions.phones`` holds them: a
row must be resubmittable as it stands, and a masked phone could never be sent again. What people
see of a row (``receipts rejected``, the worker's log) shows phones masked to their last four
digits unless ``RECEIPTS_LOG_PHONES`` is set (:func:`for_display`).

Functions take a SQLAlchemy ``Session`` and the time ``now``; callers own the transaction
(CONTRIBUTING, "Who takes what").
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.db import upsert_insert
from worker.errors import RejectedTrackError, show
from worker.logs import scrub
from worker.models import rejected_table

T = rejected_table

# One argument's JSON may be this long; a longer one is stored as a note of its size (a real
# session's phones, even thousands of them, fit many times over).
MAX_VALUE_BYTES = 1 << 20
# The refusal's text names the bad value, which can be anything a sender sent.
MAX_REASON_CHARS = 2_000
# Beyond a signed 64-bit integer no JSON reader agrees on the value: kept as its digits.
_MAX_INT_BITS = 63
# Unpaired UTF-16 surrogates: Python strings can hold them, no database's JSON can.
_SURROGATE = re.compile("[\ud800-\udfff]")
REPLACEMENT = "\ufffd"
# The fields of receipts.track whose values are never phone numbers, shown whole.
_SHOWN_WHOLE = frozenset({"session_no", "account_id", "sent_at"})


class RejectionState(enum.StrEnum):
    OPEN = "open"  # waiting for someone
    RESUBMITTED = "resubmitted"  # recorded as a session, with the corrections it needed
    DISMISSED = "dismissed"  # closed without recording anything


@dataclass(frozen=True, slots=True, kw_only=True)
class RejectedTrack:
    """One refused ``receipts.track`` task, as ``rejected_tracks`` holds it.

    - ``id``: the row's id, which ``receipts rejected resubmit|dismiss`` take.
    - ``received_at``: when the worker refused it (the database's clock).
    - ``task_id``: the Celery task id, None when run outside a worker.
    - ``origin``: the sending app's Celery node name (e.g. ``gen42@host``), when it said.
    - ``arguments``: the arguments as received, phones in clear.
    - ``reason``: why it was refused: the first bad field and value.
    - ``state``: open, resubmitted or dismissed.
    - ``resolved_at``: when it was resubmitted or dismissed.
    - ``corrections``: the changes it was resubmitted with (``None`` as a value: dropped).
    - ``note``: what the operator said when closing it.
    """

    id: int
    received_at: datetime
    task_id: str | None
    origin: str | None
    arguments: Mapping[str, Any]
    reason: str
    state: RejectionState
    resolved_at: datetime | None
    corrections: Mapping[str, Any] | None
    note: str | None

    @classmethod
    def from_row(cls, row: sa.RowMapping) -> RejectedTrack:
        return cls(
            id=row["id"],
            received_at=row["received_at"],
            task_id=row["task_id"],
            origin=row["origin"],
            arguments=row["arguments"],
            reason=row["reason"],
            state=RejectionState(row["state"]),
            resolved_at=row["resolved_at"],
            corrections=row["corrections"],
            note=row["note"],
        )


# --- what is stored ---------------------------------------------------------------------------


def storable(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """``arguments`` as a JSON document that PostgreSQL's ``jsonb`` and SQLite both take.

    Only values that could never pass validation are changed, so a row stays resubmittable:
    NUL characters and unpaired surrogates become U+FFFD (jsonb refuses both), NaN and the
    infinities become their names (JSON has no such numbers), an integer past 64 bits its digits,
    and an argument longer than :data:`MAX_VALUE_BYTES` of JSON a note of its size.
    """
    stored: dict[str, Any] = {}
    for key, value in arguments.items():
        clean = _storable(value)
        size = len(json.dumps(clean))
        stored[_clean_text(str(key))] = (
            clean if size <= MAX_VALUE_BYTES else f"<{size} bytes of JSON, not stored>"
        )
    return stored


def _storable(value: Any) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _clean_text(value)
    if isinstance(value, int):
        return value if value.bit_length() <= _MAX_INT_BITS else show(value, limit=100)
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, Mapping):
        return {_clean_text(str(k)): _storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_storable(v) for v in value]
    # Not from a JSON message (a direct call): kept readable.
    return _clean_text(show(value, limit=1000))


def _clean_text(text: str) -> str:
    return _SURROGATE.sub(REPLACEMENT, text.replace("\x00", REPLACEMENT))


def record_rejection(
    session: Session,
    *,
    arguments: Mapping[str, Any],
    reason: str,
    now: datetime,
    task_id: str | None = None,
    origin: str | None = None,
) -> int:
    """Keep a refused task; returns its row's id. A message delivered again (the same Celery
    task id: a worker lost mid-task, or Redis' visibility timeout) is kept once: ``ON CONFLICT
    DO NOTHING`` absorbs a second delivery refused at the same moment by another worker."""
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[: MAX_REASON_CHARS - 1] + "…"
    statement = (
        upsert_insert(session, T)
        .values(
            received_at=now,
            task_id=task_id,
            origin=origin,
            arguments=storable(arguments),
            reason=_clean_text(reason),
            state=RejectionState.OPEN.value,
        )
        .on_conflict_do_nothing(index_elements=["task_id"])
        .returning(T.c.id)
    )
    inserted = session.execute(statement).scalar_one_or_none()
    if inserted is not None:
        return int(inserted)
    return int(session.execute(sa.select(T.c.id).where(T.c.task_id == task_id)).scalar_one())


# --- reading and closing ----------------------------------------------------------------------


def list_rejections(session: Session, *, include_closed: bool = False) -> list[RejectedTrack]:
    """Open rows (through the partial index ix_rejected_tracks_open), or every row, in the
    order they were received."""
    query = sa.select(T).order_by(T.c.received_at, T.c.id)
    if not include_closed:
        query = query.where(T.c.state == RejectionState.OPEN.value)
    return [RejectedTrack.from_row(row) for row in session.execute(query).mappings()]


def lock_open(session: Session, ids: Sequence[int]) -> list[RejectedTrack]:
    """The open rows ``ids``, locked until the transaction ends (so that two operators cannot
    both resubmit one), in id order. All or none: an unknown id or a closed row raises
    :class:`RejectedTrackError` naming each, and nothing is locked for long."""
    wanted = list(dict.fromkeys(ids))
    query = sa.select(T).where(T.c.id.in_(wanted)).order_by(T.c.id).with_for_update()
    found = {row["id"]: RejectedTrack.from_row(row) for row in session.execute(query).mappings()}
    problems = []
    for row_id in wanted:
        row = found.get(row_id)
        if row is None:
            problems.append(f"rejected track {row_id} does not exist")
        elif row.state != RejectionState.OPEN:
            when = row.resolved_at.isoformat(timespec="seconds") if row.resolved_at else "?"
            problems.append(f"rejected track {row_id} was {row.state} at {when}")
    if problems:
        raise RejectedTrackError("nothing was changed: " + "; ".join(problems))
    return [found[row_id] for row_id in wanted]


def close(
    session: Session,
    ids: Sequence[int],
    *,
    state: RejectionState,
    now: datetime,
    corrections: Mapping[str, Any] | None = None,
    note: str | None = None,
) -> None:
    """Mark locked open rows (:func:`lock_open`) resubmitted or dismissed."""
    session.execute(
        sa.update(T)
        .where(T.c.id.in_(list(ids)), T.c.state == RejectionState.OPEN.value)
        .values(
            state=state.value,
            resolved_at=now,
            corrections=dict(corrections) if corrections else sa.null(),
            note=note,
        )
    )


# --- corrections ------------------------------------------------------------------------------


def parse_corrections(items: Sequence[str]) -> dict[str, str | None]:
    """``FIELD=VALUE`` strings as a correction; an empty value drops the field (an argument the
    task does not know, or an optional one back to its default). ValueError on a malformed one."""
    corrections: dict[str, str | None] = {}
    for item in items:
        field, equals, value = item.partition("=")
        if not equals or not field.strip():
            raise ValueError(f"{item!r} is not FIELD=VALUE (an empty VALUE drops the field)")
        corrections[field.strip()] = value or None
    return corrections


def corrected(arguments: Mapping[str, Any], corrections: Mapping[str, Any]) -> dict[str, Any]:
    """``arguments`` with ``corrections`` applied: a value replaces, ``None`` drops."""
    result = dict(arguments)
    for field, value in corrections.items():
        if value is None:
            result.pop(field, None)
        else:
            result[field] = value
    return result


# --- what people see --------------------------------------------------------------------------


def for_display(row: RejectedTrack, *, show_phones: bool) -> dict[str, Any]:
    """A row as ``receipts rejected`` shows it (JSON-ready but for its datetimes): phones
    masked to their last four digits unless ``show_phones``, wherever they are (in ``phones``,
    in a misspelt ``phone``, in the reason's text). The SessionNo, account and sent_at are
    identifiers and times, never phones: shown whole."""

    def masked(field: str, value: Any) -> Any:
        if show_phones or field in _SHOWN_WHOLE:
            return value
        return _masked(value)

    return {
        "id": row.id,
        "received_at": row.received_at,
        "state": row.state.value,
        "origin": row.origin,
        "task_id": row.task_id,
        "arguments": {k: masked(k, v) for k, v in row.arguments.items()},
        "reason": row.reason if show_phones else scrub(row.reason),
        "resolved_at": row.resolved_at,
        "corrections": (
            None
            if row.corrections is None
            else {k: masked(k, v) for k, v in row.corrections.items()}
        ),
        "note": row.note,
    }


def _masked(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int | float):
        shown = scrub(str(value))
        return value if shown == str(value) else shown
    if isinstance(value, Mapping):
        return {k: _masked(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(v) for v in value]
    return value
