"""The Python API for senders: ``worker.track`` and ``worker.track_many``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from worker import store
from worker.clock import database_now
from worker.config import get_settings
from worker.db import session_scope
from worker.tracking import TrackRequest, TrackResult, parse_requests, track_requests


def track(
    session_no: str,
    account_id: int,
    *,
    phones: Sequence[str] | str | None = None,
    sent_at: datetime | str | None = None,
    user_ref: str | None = None,
) -> TrackResult:
    """Record one session to poll. Tracking it again merges (phones are added), never
    duplicates. Raises :class:`worker.TrackError` naming the bad field."""
    return track_many(
        [
            {
                "session_no": session_no,
                "account_id": account_id,
                "phones": phones,
                "sent_at": sent_at,
                "user_ref": user_ref,
            }
        ],
        label="argument",
    )


def acknowledge(
    session_nos: Sequence[str], *, note: str | None = None, account_id: int | None = None
) -> list[tuple[int, str]]:
    """Mark escalations as handled; they stop counting as alerts. All or none: raises
    :class:`worker.AckError` naming each SessionNo that is unknown or not escalated."""
    with session_scope() as session:
        return store.acknowledge(
            session, list(session_nos), now=database_now(), note=note, account_id=account_id
        )


def track_many(
    sessions: Iterable[Mapping[str, Any] | TrackRequest],
    *,
    label: str = "row",
    first_number: int = 1,
) -> TrackResult:
    """Record many sessions at once: all of them, or none if any row is invalid (the error
    names every bad row and field)."""
    now = database_now()
    requests = parse_requests(sessions, now=now, label=label, first_number=first_number)
    with session_scope() as session:
        return track_requests(session, requests, policy=get_settings().poll_policy(), now=now)
