"""The cost of the history on ingestion: ``worker.store.upsert_receipts`` (the receipts upsert
and its ``sms_receipt_events`` rows, one statement on PostgreSQL) against the receipts upsert
alone (``store._upsert_statement``, the same statement without the history), on the same
number of receipts, batch by batch.

History is always on (there is no setting to turn it off), so the baseline is the statement it
extends. Each batch is one poll's worth (100 sessions of one account, every phone), in its own
transaction, as the worker writes them. The two sides take turns batch by batch, each on its
own sessions, alternating which goes first, so that whatever else the machine does weighs on
both alike. Four passes over the same phones:

- ``insert``: first receipts (``Unknow``): every row inserted and recorded;
- ``update``: the final receipts (``Success``, newer): every row updated and recorded;
- ``repeat``: the same final receipts again (every poll of a session that stays unresolved, or
  a push of what a poll found): nothing to record;
- ``stale``: the first ``Unknow`` again: refused by the guard, recorded as not applied.

The target is on the ``insert`` and ``update`` passes together, where every receipt is a
change and costs a history row: the worst case for the history.

Then the same comparison on the whole poll path (:func:`polls`): ``worker.poller.poll`` of
one tick's claims against the simulator, each claim's sessions answered with final receipts
(a history row per receipt, a session event per session), every other claim with the history
left out (the receipts upsert alone, no session events), so both halves share the API call,
the parsing, the locks, the session updates and the commit, as ingestion does.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.env import (
    ACCESS_KEY_ID,
    ACCESS_KEY_SECRET,
    BenchDatabase,
    SessionSpec,
    copy_sessions,
    log,
    make_sessions,
    register,
)
from worker import event_log, poller, store
from worker.client import UspeedoClient
from worker.config import get_settings
from worker.db import json_document, session_scope
from worker.simulator import Simulator
from worker.store import Claim

BATCH_SESSIONS = 100
WARM_UP_POLLS = 2
PASSES = ("insert", "update", "repeat", "stale")
TARGET_PASSES = ("insert", "update")


def _rows(
    sessions: Sequence[SessionSpec], *, result: str, at: datetime, code: str
) -> list[dict[str, Any]]:
    return [
        {
            "session_no": s.session_no,
            "phone": phone,
            "phone_key": phone.lstrip("+"),
            "result": result,
            "receipt_code": code,
            "receipt_desc": "bench",
            "receipt_time": at,
            "cost_count": 1,
            "user_id": None,
            "country_code": "86",
            "source": "poll",
        }
        for s in sessions
        for phone in s.phones
    ]


def _with_history(rows: list[dict[str, Any]], now: datetime) -> None:
    with session_scope() as session:
        store.upsert_receipts(session, rows, account_id=1, now=now)


def _upsert_alone(rows: list[dict[str, Any]], now: datetime) -> None:
    with session_scope() as session:
        session.execute(
            store._upsert_statement("postgresql"),
            {"account_id": 1, "now": now, **json_document(rows)},
        )


def _warm_up() -> None:
    """Both statements compiled, and prepared by psycopg (after 5 executions), before any
    timing: with no rows, neither writes anything."""
    empty = {"account_id": 1, "now": datetime.now(UTC), **json_document([])}
    for _ in range(6):
        with session_scope() as session:
            session.execute(store._recorded_upsert_statement(), empty)
            session.execute(store._upsert_statement("postgresql"), empty)


def run(database: BenchDatabase, *, sessions: int, phones: int) -> dict[str, Any]:
    """Needs :func:`bench.env.configure_process` done (the worker's engine)."""
    database.reset()
    sent_at = datetime.now(UTC) - timedelta(minutes=10)
    sides: dict[str, tuple[Callable[[list[dict[str, Any]], datetime], None], list[SessionSpec]]]
    sides = {
        "history": (
            _with_history,
            make_sessions(sessions, phones=phones, accounts=1, prefix="hh-"),
        ),
        "baseline": (
            _upsert_alone,
            make_sessions(sessions, phones=phones, accounts=1, prefix="hb-"),
        ),
    }
    for _, specs in sides.values():
        copy_sessions(database, specs, sent_at=sent_at)
    t1, t2 = sent_at + timedelta(seconds=30), sent_at + timedelta(seconds=90)
    contents: dict[str, dict[str, Any]] = {
        "insert": {"result": "Unknow", "at": t1, "code": "UNKNOWN"},
        "update": {"result": "Success", "at": t2, "code": "DELIVRD"},
        "repeat": {"result": "Success", "at": t2, "code": "DELIVRD"},
        "stale": {"result": "Unknow", "at": t1, "code": "UNKNOWN"},
    }
    seconds = {side: dict.fromkeys(PASSES, 0.0) for side in sides}
    receipts = sessions * phones
    _warm_up()
    for number, name in enumerate(PASSES):
        batches = {
            side: [
                _rows(specs[i : i + BATCH_SESSIONS], **contents[name])
                for i in range(0, len(specs), BATCH_SESSIONS)
            ]
            for side, (_, specs) in sides.items()
        }
        now = datetime.now(UTC)
        for index in range(len(batches["history"])):
            order = ["history", "baseline"] if (index + number) % 2 else ["baseline", "history"]
            for side in order:
                write = sides[side][0]
                started = time.perf_counter()
                write(batches[side][index], now)
                seconds[side][name] += time.perf_counter() - started
    with database.connect() as conn:
        recorded = conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE NOT applied) FROM sms_receipt_events "
            "WHERE session_no LIKE 'hh-%'"
        ).fetchone()
    expected = (2 * receipts + receipts, receipts)  # insert + update + stale, stale not applied
    if recorded is None or tuple(recorded) != expected:
        raise RuntimeError(f"history bench: expected {expected} history rows, found {recorded}")
    database.reset()

    def rate(side: str, names: Sequence[str]) -> float:
        return len(names) * receipts / sum(seconds[side][n] for n in names)

    result: dict[str, Any] = {
        "sessions": sessions,
        "phones_per_session": phones,
        "receipts_per_pass": receipts,
        "batch_receipts": BATCH_SESSIONS * phones,
        "passes": {
            name: {
                "history_receipts_per_s": round(rate("history", [name])),
                "baseline_receipts_per_s": round(rate("baseline", [name])),
                "ratio": round(rate("history", [name]) / rate("baseline", [name]), 3),
            }
            for name in PASSES
        },
        "changes_history_receipts_per_s": round(rate("history", TARGET_PASSES)),
        "changes_baseline_receipts_per_s": round(rate("baseline", TARGET_PASSES)),
        "changes_ratio": round(rate("history", TARGET_PASSES) / rate("baseline", TARGET_PASSES), 3),
    }
    log(
        "history: "
        + ", ".join(
            f"{name} {p['history_receipts_per_s']:,} vs {p['baseline_receipts_per_s']:,} "
            f"receipts/s ({p['ratio']}x)"
            for name, p in result["passes"].items()
        )
    )
    return result


def _upsert_without_history(
    session: Any, rows: Sequence[dict[str, Any]], *, account_id: int, now: datetime
) -> int:
    if rows:
        session.execute(
            store._upsert_statement("postgresql"),
            {"account_id": account_id, "now": now, **json_document(rows)},
        )
    return len(rows)


@contextlib.contextmanager
def _history_left_out() -> Iterator[None]:
    """The poll path as it would be without the history: the receipts upsert alone, and no
    session events (store calls both through module globals, looked up at each call)."""
    upsert, events = store.upsert_receipts, event_log.record_session_events
    store.upsert_receipts = _upsert_without_history  # type: ignore[assignment]
    event_log.record_session_events = lambda *_a, **_k: None
    try:
        yield
    finally:
        store.upsert_receipts = upsert
        event_log.record_session_events = events


def polls(database: BenchDatabase, sim: Simulator, *, sessions: int, phones: int) -> dict[str, Any]:
    """Needs :func:`bench.env.configure_process` done with the simulator's URL."""
    database.reset()
    sim.reset()
    specs = make_sessions(sessions, phones=phones, accounts=1, prefix="hp-")
    sent_at = time.time() - 60
    register(sim, specs, sent_at=sent_at)
    copy_sessions(database, specs, sent_at=datetime.fromtimestamp(sent_at, UTC))
    settings = get_settings()
    policy = settings.poll_policy()
    client = UspeedoClient(
        api_url=settings.api_url, access_key_id=ACCESS_KEY_ID, access_key_secret=ACCESS_KEY_SECRET
    )
    claims: list[Claim] = []
    poller.tick(
        session_factory=session_scope,
        clock=lambda: datetime.now(UTC),
        policy=policy,
        dispatch=claims.append,
        lease=settings.lease,
        tick_every=settings.tick,
    )
    rng = random.Random(1)
    seconds = {"history": 0.0, "baseline": 0.0}
    receipts = {"history": 0, "baseline": 0}
    written = {"history": 0, "baseline": 0}
    _warm_up()
    try:
        for index, claim in enumerate(claims):
            side = "history" if index % 2 == 0 else "baseline"
            context = contextlib.nullcontext() if side == "history" else _history_left_out()
            with context:
                started = time.perf_counter()
                report = poller.poll(
                    claim,
                    session_factory=session_scope,
                    client=client,
                    clock=lambda: datetime.now(UTC),
                    policy=policy,
                    rng=rng,
                    budget=settings.poll_budget,
                    in_flight=settings.poll_in_flight,
                )
            written[side] += report.receipts_written
            # The first poll of each side warms what both share (statements, connections).
            if index >= WARM_UP_POLLS:
                seconds[side] += time.perf_counter() - started
                receipts[side] += report.receipts_written
    finally:
        client.close()
    with database.connect() as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM sms_sessions WHERE session_no LIKE 'hp-%' "
            "AND state = 'pending'), (SELECT count(*) FROM sms_receipt_events)"
        ).fetchone()
    if row is None or row[0] != 0 or row[1] != written["history"]:
        raise RuntimeError(f"history polls: pending sessions and history rows {row}, {written}")
    database.reset()
    rates = {side: receipts[side] / seconds[side] for side in seconds}
    result = {
        "sessions": sessions,
        "polls_timed": len(claims) - WARM_UP_POLLS,
        "history_receipts_per_s": round(rates["history"]),
        "baseline_receipts_per_s": round(rates["baseline"]),
        "ratio": round(rates["history"] / rates["baseline"], 3),
    }
    log(
        f"history, whole polls: {result['history_receipts_per_s']:,} vs "
        f"{result['baseline_receipts_per_s']:,} receipts/s ({result['ratio']}x)"
    )
    return result
