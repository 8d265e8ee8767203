"""Typed, read-only records of a tracked session and its receipts: what ``worker.status()``
returns to an application and what ``receipts status`` prints, read by one query
(:func:`read_status`), and the session's history, what ``worker.history()`` returns and
``receipts history`` prints (:func:`read_history`), so that an application never reaches into
the tables or the reports.

Records are frozen dataclasses with slots; every datetime is timezone-aware, in UTC.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.domain import (
    FINAL_RESULTS,
    ReceiptSource,
    Result,
    SessionEventType,
    SessionState,
    phone_key,
)
from worker.errors import SessionNotFound
from worker.models import (
    receipt_events_table,
    receipts_table,
    session_events_table,
    sessions_table,
)

S = sessions_table
R = receipts_table
E = receipt_events_table
SE = session_events_table


@dataclass(frozen=True, slots=True, kw_only=True)
class PhoneReceipt:
    """The latest known receipt of one phone of a session (a row of ``sms_receipts``).

    - ``account_id``, ``session_no``: the session it belongs to.
    - ``phone``: as the session was tracked with it, or as Uspeedo spelled it when untracked.
    - ``phone_key``: the phone's digits, which is what phones are matched on.
    - ``result``: ``Success``, ``Fail``, ``Unknow`` or ``SubmitFail`` (:class:`Result`).
    - ``receipt_code``, ``receipt_desc``: Uspeedo's status report code and description.
    - ``receipt_time``: when Uspeedo got the receipt; None when it did not say.
    - ``cost_count``: SMS segments charged, when reported.
    - ``user_id``: the UserId given at send time, when reported.
    - ``country_code``: when Uspeedo reports it.
    - ``source``: where it came from: a poll, Uspeedo's push, or an operator's repoll
      (:class:`ReceiptSource`).
    - ``first_seen_at``: when a receipt for this phone was first stored.
    - ``updated_at``: when the stored receipt last changed.
    """

    account_id: int
    session_no: str
    phone: str
    phone_key: str
    result: Result
    receipt_code: str | None
    receipt_desc: str | None
    receipt_time: datetime | None
    cost_count: int | None
    user_id: str | None
    country_code: str | None
    source: ReceiptSource
    first_seen_at: datetime
    updated_at: datetime

    @property
    def final(self) -> bool:
        """Whether this receipt is final (``Unknow`` may still change)."""
        return self.result in FINAL_RESULTS

    @classmethod
    def from_row(cls, row: sa.RowMapping) -> PhoneReceipt:
        values = {f.name: row[f.name] for f in dataclasses.fields(cls)}
        return cls(
            **{**values, "result": Result(row["result"]), "source": ReceiptSource(row["source"])}
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class UnresolvedPhone:
    """A phone of an escalated session without a final receipt.

    - ``phone``: as tracked.
    - ``last_result``: its last known result (``Unknow``), or None when it never reported.
    """

    phone: str
    last_result: Result | None


@dataclass(frozen=True, slots=True, kw_only=True)
class EscalationDetail:
    """What support needs about an escalated session (``sms_sessions.escalation_detail``).

    - ``phones``: the phones without a final receipt at the cutoff.
    - ``poll_count``: polls started by then.
    - ``last_error``: the last poll's error by then, if any.
    """

    phones: tuple[UnresolvedPhone, ...]
    poll_count: int
    last_error: str | None

    @classmethod
    def from_json(cls, detail: Mapping[str, Any]) -> EscalationDetail:
        return cls(
            phones=tuple(
                UnresolvedPhone(
                    phone=p["phone"],
                    last_result=Result(p["last_result"]) if p.get("last_result") else None,
                )
                for p in detail.get("phones", ())
            ),
            poll_count=detail.get("poll_count", 0),
            last_error=detail.get("last_error"),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionStatus:
    """A tracked session, where its polling stands, and every phone's receipt.

    - ``account_id``, ``session_no``: the session (unique together).
    - ``state``: ``pending`` (still polling), ``resolved`` (every phone final) or ``escalated``
      (the cutoff passed unresolved), as :class:`SessionState`.
    - ``phones``: the phones it was tracked with, as spelled then; empty when tracked without.
    - ``user_ref``: the sender's own reference, if given.
    - ``sent_at``: when the SMS was sent (when tracked, if the sender did not say).
    - ``next_poll_at``: when it is next due; None once resolved or escalated.
    - ``last_polled_at``: when the last poll was answered (or failed).
    - ``resolved_at``: when it became resolved (late resolutions included).
    - ``escalated_at``: when the cutoff passed unresolved; kept if it resolves later.
    - ``poll_count``: polls started.
    - ``last_error``: the last poll's error; None after a clean poll.
    - ``escalation_detail``: for an escalated session, what support needs; else None.
    - ``acknowledged_at``, ``ack_note``: an operator marked the escalation handled.
    - ``created_at``, ``updated_at``: when the row was created and last changed.
    - ``receipts``: the latest receipt of each phone that reported, ordered by phone.
    """

    account_id: int
    session_no: str
    state: SessionState
    phones: tuple[str, ...]
    user_ref: str | None
    sent_at: datetime
    next_poll_at: datetime | None
    last_polled_at: datetime | None
    resolved_at: datetime | None
    escalated_at: datetime | None
    poll_count: int
    last_error: str | None
    escalation_detail: EscalationDetail | None
    acknowledged_at: datetime | None
    ack_note: str | None
    created_at: datetime
    updated_at: datetime
    receipts: tuple[PhoneReceipt, ...]

    def receipt_for(self, phone: str) -> PhoneReceipt | None:
        """The receipt of ``phone``, matched on its digits as the worker matches them
        (``+852 5531 1111`` finds ``(852)55311111``); None when it has not reported."""
        key = phone_key(phone)
        return next((r for r in self.receipts if r.phone_key == key), None)

    def as_dict(self) -> dict[str, Any]:
        """Plain dicts and lists (datetimes and enums kept as they are), e.g. to encode as
        JSON: ``receipts status --json`` prints this."""
        found = dataclasses.asdict(self)
        found["phones"] = list(self.phones)
        found["receipts"] = [dataclasses.asdict(r) for r in self.receipts]
        if self.escalation_detail is not None:
            found["escalation_detail"]["phones"] = [
                dataclasses.asdict(p) for p in self.escalation_detail.phones
            ]
        return found


_SESSION_COLUMNS = [
    S.c[f.name]
    for f in dataclasses.fields(SessionStatus)
    if f.name not in ("receipts", "escalation_detail")
]


def _one_session(
    session: Session, columns: Sequence[Any], session_no: str, account_id: int | None
) -> sa.RowMapping:
    """``columns`` of the session ``session_no`` (of ``account_id``, when given); raises
    :class:`SessionNotFound` for a SessionNo that is not tracked, or ambiguous."""
    query = sa.select(*columns).where(S.c.session_no == session_no)
    if account_id is not None:
        query = query.where(S.c.account_id == account_id)
    rows = list(session.execute(query).mappings())
    if not rows:
        raise SessionNotFound(f"session {session_no!r} is not tracked")
    if len(rows) > 1:
        accounts = ", ".join(str(a) for a in sorted(r["account_id"] for r in rows))
        raise SessionNotFound(
            f"session {session_no!r} exists in accounts {accounts}: "
            "give its account_id (--account-id)"
        )
    return rows[0]


def read_status(
    session: Session, session_no: str, *, account_id: int | None = None
) -> SessionStatus:
    """The session ``session_no`` (of ``account_id``, needed only when two accounts share the
    SessionNo) with its receipts, read in the caller's transaction. Raises
    :class:`SessionNotFound` for a SessionNo that is not tracked, or ambiguous."""
    row = _one_session(session, [*_SESSION_COLUMNS, S.c.escalation_detail], session_no, account_id)
    receipts = session.execute(
        sa.select(R)
        .where(R.c.account_id == row["account_id"], R.c.session_no == session_no)
        .order_by(R.c.phone)
    ).mappings()
    detail = row["escalation_detail"]
    values = {c.name: row[c.name] for c in _SESSION_COLUMNS}
    return SessionStatus(
        **{
            **values,
            "state": SessionState(row["state"]),
            "phones": tuple(row["phones"] or ()),
            "escalation_detail": EscalationDetail.from_json(detail) if detail else None,
            "receipts": tuple(PhoneReceipt.from_row(r) for r in receipts),
        }
    )


# --- history ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceiptChange:
    """An observed change of one phone's receipt (a row of ``sms_receipt_events``): a receipt
    that said something other than the stored one when it came in.

    - ``id``: increasing, shared with :class:`SessionChange`; orders the timeline.
    - ``account_id``, ``session_no``, ``phone``, ``phone_key``, ``result``, ``receipt_code``,
      ``receipt_desc``, ``receipt_time``, ``cost_count``, ``user_id``: the receipt as observed,
      as in :class:`PhoneReceipt`.
    - ``source``: where it came from: a poll, Uspeedo's push, or an operator's repoll.
    - ``observed_at``: when it came in.
    - ``applied``: whether it became the stored receipt; False when the stored one won (it was
      final and this one not, or this one was older).
    """

    id: int
    account_id: int
    session_no: str
    phone: str
    phone_key: str
    result: Result
    receipt_code: str | None
    receipt_desc: str | None
    receipt_time: datetime | None
    cost_count: int | None
    user_id: str | None
    source: ReceiptSource
    observed_at: datetime
    applied: bool

    @property
    def final(self) -> bool:
        """Whether this receipt is final (``Unknow`` may still change)."""
        return self.result in FINAL_RESULTS

    @property
    def at(self) -> datetime:
        """When it happened (``observed_at``), as for :class:`SessionChange`."""
        return self.observed_at

    @classmethod
    def from_row(cls, row: sa.RowMapping) -> ReceiptChange:
        values = {f.name: row[f.name] for f in dataclasses.fields(cls)}
        return cls(
            **{
                **values,
                "result": Result(row["result"]),
                "source": ReceiptSource(row["source"]),
                "applied": bool(row["applied"]),
            }
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionChange:
    """A session became resolved or escalated (a row of ``sms_session_events``).

    - ``id``: increasing, shared with :class:`ReceiptChange`.
    - ``account_id``, ``session_no``: the session.
    - ``type``: ``session.resolved`` or ``session.escalated`` (:class:`SessionEventType`).
    - ``source``: what resolved it (a poll, a push, a repoll); None for an escalation.
    - ``occurred_at``: when.
    """

    id: int
    account_id: int
    session_no: str
    type: SessionEventType
    source: ReceiptSource | None
    occurred_at: datetime

    @property
    def at(self) -> datetime:
        """When it happened (``occurred_at``), as for :class:`ReceiptChange`."""
        return self.occurred_at

    @classmethod
    def from_row(cls, row: sa.RowMapping) -> SessionChange:
        return cls(
            id=row["id"],
            account_id=row["account_id"],
            session_no=row["session_no"],
            type=SessionEventType(row["type"]),
            source=ReceiptSource(row["source"]) if row["source"] else None,
            occurred_at=row["occurred_at"],
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionHistory:
    """Everything observed of one session, oldest first.

    - ``account_id``, ``session_no``: the session.
    - ``receipts``: every observed change of its phones' receipts (:class:`ReceiptChange`).
    - ``events``: its resolutions and escalations (:class:`SessionChange`).
    - ``timeline``: both, in the order they happened (by ``id``).
    """

    account_id: int
    session_no: str
    receipts: tuple[ReceiptChange, ...]
    events: tuple[SessionChange, ...]

    @property
    def timeline(self) -> tuple[ReceiptChange | SessionChange, ...]:
        merged: list[ReceiptChange | SessionChange] = [*self.receipts, *self.events]
        return tuple(sorted(merged, key=lambda change: change.id))

    def for_phone(self, phone: str) -> tuple[ReceiptChange, ...]:
        """The changes of ``phone``'s receipt, matched on its digits."""
        key = phone_key(phone)
        return tuple(change for change in self.receipts if change.phone_key == key)

    def as_dict(self) -> dict[str, Any]:
        """Plain data (datetimes and enums kept as they are): the session's keys and its
        ``timeline``, each entry with its ``type`` (``receipt`` for a receipt change)."""
        return {
            "account_id": self.account_id,
            "session_no": self.session_no,
            "timeline": [
                {"type": "receipt", **dataclasses.asdict(change)}
                if isinstance(change, ReceiptChange)
                else dataclasses.asdict(change)
                for change in self.timeline
            ],
        }


def read_history(
    session: Session, session_no: str, *, account_id: int | None = None
) -> SessionHistory:
    """The history of the session ``session_no`` (of ``account_id``, needed only when two
    accounts share the SessionNo), read in the caller's transaction. Raises
    :class:`SessionNotFound` for a SessionNo that is not tracked, or ambiguous."""
    row = _one_session(session, [S.c.account_id], session_no, account_id)
    account = row["account_id"]
    receipts = session.execute(
        sa.select(E).where(E.c.account_id == account, E.c.session_no == session_no).order_by(E.c.id)
    ).mappings()
    events = session.execute(
        sa.select(SE)
        .where(SE.c.account_id == account, SE.c.session_no == session_no)
        .order_by(SE.c.id)
    ).mappings()
    return SessionHistory(
        account_id=account,
        session_no=session_no,
        receipts=tuple(ReceiptChange.from_row(r) for r in receipts),
        events=tuple(SessionChange.from_row(e) for e in events),
    )
