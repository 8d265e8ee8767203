"""The poll path in-process, without Celery: one ``worker.poller.tick`` claims a backlog (its
claims collected instead of dispatched), then ``worker.poller.poll`` runs each claim in turn
with a real ``UspeedoClient`` against the simulator. Half the claims are timed plain (the
single-process ceiling of the worker code), the other half under cProfile for a breakdown.

The simulator shares this process's GIL, so the plain rate is a little pessimistic; cProfile
sees this thread only, and counts the simulator's share as time waiting on the socket.
"""

from __future__ import annotations

import cProfile
import pstats
import random
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.env import (
    ACCESS_KEY_ID,
    ACCESS_KEY_SECRET,
    BenchDatabase,
    copy_sessions,
    log,
    make_sessions,
    register,
)
from worker import db, poller, store
from worker.client import UspeedoClient
from worker.config import get_settings
from worker.db import session_scope
from worker.receipts import parse_receipts
from worker.simulator import Simulator
from worker.store import Claim

ROOT = Path(__file__).resolve().parents[1]

# Steps whose cumulative time per poll is reported, by code object (names repeat: poll).
BREAKDOWN: tuple[tuple[str, Callable[..., Any]], ...] = (
    ("poll (total)", poller.poll),
    ("start_poll", store.start_poll),
    ("API call (client.get_send_receipts)", UspeedoClient.get_send_receipts),
    ("  parse_receipts", parse_receipts),
    ("record_answer", store.record_answer),
    ("  receipt_rows", store.receipt_rows),
    ("  upsert_receipts", store.upsert_receipts),
    ("  results_by_session", store.results_by_session),
    ("  _update_many (resolve + reschedule)", store._update_many),
    ("count_api_calls", store.count_api_calls),
    ("session_scope (checkout, begin, commit)", db.session_scope.__wrapped__),  # type: ignore[attr-defined]
)


_PREFIX = re.compile(r"^.*/(?:site-packages|lib/python3\.\d+)/|^" + re.escape(str(ROOT)) + "/")


def _utcnow() -> datetime:
    return datetime.now(UTC)


def run(database: BenchDatabase, sim: Simulator, *, sessions: int, phones: int) -> dict[str, Any]:
    """Needs :func:`bench.env.configure_process` done with the simulator's URL."""
    database.reset()
    sim.reset()
    specs = make_sessions(sessions, phones=phones, accounts=1, prefix="ip-")
    sent_at = time.time() - 60
    register(sim, specs, sent_at=sent_at)
    copy_sessions(database, specs, sent_at=datetime.fromtimestamp(sent_at, UTC))

    settings = get_settings()
    policy = settings.poll_policy()
    client = UspeedoClient(
        api_url=settings.api_url, access_key_id=ACCESS_KEY_ID, access_key_secret=ACCESS_KEY_SECRET
    )
    claims: list[Claim] = []
    started = time.perf_counter()
    poller.tick(
        session_factory=session_scope,
        clock=_utcnow,
        policy=policy,
        dispatch=claims.append,
        lease=settings.lease,
        tick_every=settings.tick,
    )
    tick_seconds = time.perf_counter() - started
    rng = random.Random(1)

    def poll(claim: Claim) -> poller.PollReport:
        return poller.poll(
            claim,
            session_factory=session_scope,
            client=client,
            clock=_utcnow,
            policy=policy,
            rng=rng,
            budget=settings.poll_budget,
            in_flight=settings.poll_in_flight,
        )

    half = len(claims) // 2
    started = time.perf_counter()
    receipts = sum(poll(claim).receipts_written for claim in claims[:half])
    plain_seconds = time.perf_counter() - started

    profiler = cProfile.Profile()
    profiler.enable()
    for claim in claims[half:]:
        poll(claim)
    profiler.disable()
    client.close()
    stats = pstats.Stats(profiler)
    profiled_polls = len(claims) - half

    with database.connect() as conn:
        row = conn.execute("SELECT count(*) FROM sms_sessions WHERE state = 'pending'").fetchone()
    if row is None or row[0] != 0:
        raise RuntimeError(f"in-process polls left {row} sessions pending")
    database.reset()
    result = {
        "sessions": sessions,
        "phones_per_session": phones,
        "tick_claim_seconds": round(tick_seconds, 3),
        "tick_sessions_claimed_per_s": round(sessions / tick_seconds),
        "polls_timed": half,
        "ms_per_poll": round(plain_seconds / half * 1000, 2),
        "receipts_per_s_one_process": round(receipts / plain_seconds),
        "profiled_polls": profiled_polls,
        "breakdown_ms_per_poll": _breakdown(stats, profiled_polls),
        "top_self": _top_self(stats, profiled_polls),
    }
    log(
        f"in-process poll: {result['ms_per_poll']} ms per poll of 100 sessions, "
        f"{result['receipts_per_s_one_process']:,} receipts/s in one process"
    )
    return result


def _entries(stats: pstats.Stats) -> dict[tuple[str, int, str], tuple[Any, ...]]:
    return stats.stats  # type: ignore[attr-defined, no-any-return]


def _breakdown(stats: pstats.Stats, polls: int) -> dict[str, dict[str, float]]:
    """Cumulative time per poll of each step, and its share of the whole poll (cProfile slows
    Python code down about threefold: the shares are the figures to read, not the ms)."""
    entries = _entries(stats)
    out: dict[str, dict[str, float]] = {}
    for label, function in BREAKDOWN:
        code = function.__code__
        value = entries.get((code.co_filename, code.co_firstlineno, code.co_name))
        out[label] = {"ms": round(value[3] / polls * 1000, 2) if value else 0.0}
    total = out[BREAKDOWN[0][0]]["ms"] or 1.0
    for step in out.values():
        step["pct"] = round(step["ms"] / total * 100, 1)
    return out


def _top_self(stats: pstats.Stats, polls: int, count: int = 15) -> list[dict[str, Any]]:
    entries = _entries(stats)
    total = sum(value[2] for value in entries.values()) or 1.0
    ranked = sorted(entries.items(), key=lambda item: item[1][2], reverse=True)[:count]
    return [
        {
            "function": f"{_short(filename)}:{line}({name})",
            "self_pct": round(value[2] / total * 100, 1),
            "ms_per_poll": round(value[2] / polls * 1000, 3),
            "calls_per_poll": round(value[1] / polls, 1),
        }
        for (filename, line, name), value in ranked
    ]


def _short(filename: str) -> str:
    return _PREFIX.sub("", filename)
