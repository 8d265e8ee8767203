"""Bulk tracking: ``worker.track_many`` of N new sessions (validation and write, one unit of
work: the figure with a target), then, on a slice of them, a repeat of the same call (every
session already tracked: the merge path) and the two halves on their own (``parse_requests``
alone, ``track_requests`` alone on an empty table)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.env import BenchDatabase, SessionSpec, log, make_sessions
from worker import track_many
from worker.config import get_settings
from worker.db import session_scope
from worker.tracking import parse_requests, track_requests


def _raw(sessions: list[SessionSpec], sent_at: datetime) -> list[dict[str, Any]]:
    return [
        {
            "account_id": s.account_id,
            "session_no": s.session_no,
            "phones": list(s.phones),
            "sent_at": sent_at,
        }
        for s in sessions
    ]


def run(
    database: BenchDatabase, *, sessions: int, phones: int, repeat: bool, breakdown: int
) -> dict[str, Any]:
    """Needs :func:`bench.env.configure_process` done (track_many reads the settings)."""
    sent_at = datetime.now(UTC) - timedelta(minutes=1)
    raw = _raw(make_sessions(sessions, phones=phones, accounts=4, prefix="trk-"), sent_at)
    database.truncate()

    started = time.perf_counter()
    result = track_many(raw)
    full = time.perf_counter() - started
    if result.inserted != sessions:
        raise RuntimeError(f"track_many inserted {result.inserted} of {sessions}")
    log(f"track_many: {sessions / full:,.0f} sessions/s ({full:.2f}s for {sessions:,})")
    out: dict[str, Any] = {
        "sessions": sessions,
        "phones_per_session": phones,
        "track_many_seconds": round(full, 3),
        "track_many_sessions_per_s": round(sessions / full),
    }

    # The breakdown and the repeat run on a slice: the full figure above is the one that counts.
    part = raw[:breakdown]
    if repeat:
        started = time.perf_counter()
        again = track_many(part)
        seconds = time.perf_counter() - started
        out["repeat_sessions"] = len(part)
        out["repeat_sessions_per_s"] = round(len(part) / seconds)
        out["repeat_unchanged"] = again.unchanged
        log(f"track_many again ({len(part):,} tracked already): {len(part) / seconds:,.0f}/s")

    now = datetime.now(UTC)
    started = time.perf_counter()
    requests = parse_requests(part, now=now)
    parse_seconds = time.perf_counter() - started
    database.truncate()
    started = time.perf_counter()
    with session_scope() as session:
        track_requests(session, requests, policy=get_settings().poll_policy(), now=now)
    write_seconds = time.perf_counter() - started
    out.update(
        breakdown_sessions=len(part),
        parse_sessions_per_s=round(len(part) / parse_seconds),
        write_sessions_per_s=round(len(part) / write_seconds),
    )
    log(
        f"  of which parse_requests {len(part) / parse_seconds:,.0f}/s, "
        f"track_requests {len(part) / write_seconds:,.0f}/s ({len(part):,} sessions)"
    )
    database.truncate()
    return out
