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
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.env import BenchDatabase, SessionSpec, copy_sessions, log, make_sessions
from worker import store
from worker.db import json_document, session_scope

BATCH_SESSIONS = 100
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
