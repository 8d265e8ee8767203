"""Shared machinery of the end-to-end and fault-injection runs: real `receipts worker` and
`receipts beat` processes on PostgreSQL and Redis against the simulator, and the checks that
compare what was stored with what the simulator says happened."""

from __future__ import annotations

import itertools
import re
import time
from collections import defaultdict
from collections.abc import Callable, Collection
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from tests.support.databases import Configure
from tests.support.processes import Processes, processes, wait_for
from tests.support.scenarios import Planned, answered_calls, expected_outcome
from worker import db, track_many
from worker.check import is_check_session
from worker.domain import phone_key
from worker.models import heartbeats_table, receipts_table, sessions_table
from worker.simulator import Simulator

STEP = 1.0  # seconds per simulator step
TIMINGS = {
    "RECEIPTS_FIRST_POLL_DELAY": "1",
    "RECEIPTS_POLL_INTERVAL_MIN": "1",
    "RECEIPTS_POLL_INTERVAL_MAX": "2",
    "RECEIPTS_CUTOFF": "12",
    "RECEIPTS_TICK": "0.5",
    "RECEIPTS_API_READ_TIMEOUT": "1",
    "RECEIPTS_API_CONNECT_TIMEOUT": "1",
    "RECEIPTS_POLL_BUDGET": "3",
}
# The simulator stamps a call when it arrives; the worker decides to poll a moment earlier.
# This bounds the network and scheduling delay between the two on loopback.
LATENCY = 0.3


def _ticked() -> bool:
    with db.session_scope() as session:
        beat = session.scalar(
            sa.select(heartbeats_table.c.beat_at).where(heartbeats_table.c.name == "tick")
        )
    return beat is not None


def run_plan(
    configure: Configure,
    database_url: str,
    broker_url: str,
    tmp_path: Path,
    sim: Simulator,
    planned: list[Planned],
    *,
    workers: int = 1,
    beats: int = 1,
    env_extra: dict[str, str] | None = None,
    during: Callable[[Processes, float], None] | None = None,
    settled: Callable[[], bool] | None = None,
    timeout: float = 60,
    before_sending: Callable[[Processes], None] | None = None,
    untracked: Collection[str] = (),
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, dict[str, Any]]]]:
    """Start real workers and beats on ``database_url`` (migrated, empty) and ``broker_url``
    (an empty Redis db); once the clock ticks, register ``planned`` with the simulator and
    track it; wait until no session is pending, and return the sessions and receipts as
    stored. The test process reads the same database. ``during(group, elapsed)`` is called
    while waiting (``elapsed`` counts from the sending), to inject faults into the running
    processes; the processes keep running until ``settled()`` (e.g. webhooks delivered)
    holds too. ``before_sending(group)`` starts more processes (a receiver) once the workers
    and beats are started; the sessions named in ``untracked`` are registered with the
    simulator but left for ``during`` to track."""
    env = {
        **TIMINGS,
        "RECEIPTS_DATABASE_URL": database_url,
        "RECEIPTS_BROKER_URL": broker_url,
        "RECEIPTS_API_URL": sim.url,
        "RECEIPTS_ACCESS_KEY_ID": "demo",
        "RECEIPTS_ACCESS_KEY_SECRET": "demo-secret",
        **(env_extra or {}),
    }
    configure(**env)
    with processes(env, tmp_path) as group:
        for n in range(workers):
            group.worker(f"w{n + 1}")
        for n in range(beats):
            group.beat(f"beat{n + 1}")
        if before_sending is not None:
            before_sending(group)
        # Sent once a worker has run the beat's first tick: the schedule is measured from a
        # running clock, not from the seconds the processes take to boot on a loaded machine
        # (which would let every first poll miss what a scenario shows only early on).
        wait_for(_ticked, timeout=60, describe=group.logs)
        now = time.time()
        for p in planned:
            p.sent_at = now
        sim.register(
            {
                "account_id": p.account_id,
                "session_no": p.session_no,
                "phones": p.sim_phones,
                "scenario": p.scenario,
                "sent_at": p.sent_at,
            }
            for p in planned
        )
        track_many(
            {
                "account_id": p.account_id,
                "session_no": p.session_no,
                "phones": p.tracked_phones,
                "sent_at": datetime.fromtimestamp(p.sent_at, UTC),
            }
            for p in planned
            if p.session_no not in untracked
        )

        def pending() -> int:
            try:
                with db.session_scope() as session:
                    count = session.scalar(
                        sa.select(sa.func.count()).where(sessions_table.c.state == "pending")
                    )
            except sa.exc.OperationalError:
                return -1  # the database is being restarted by a fault test
            return count or 0

        started = time.monotonic()

        def done() -> bool:
            if during is not None:
                during(group, time.monotonic() - started)
            return pending() == 0 and (settled is None or settled())

        wait_for(
            done,
            timeout=timeout,
            describe=lambda: f"{pending()} still pending\n{group.logs()}",
        )
    with db.session_scope() as session:
        sessions = {
            r["session_no"]: dict(r) for r in session.execute(sa.select(sessions_table)).mappings()
        }
        receipts: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
        for r in session.execute(sa.select(receipts_table)).mappings():
            receipts[r["session_no"]][r["phone_key"]] = dict(r)
    return sessions, receipts


def check(
    planned: list[Planned],
    sim: Simulator,
    sessions: dict[str, dict[str, Any]],
    receipts: dict[str, dict[str, dict[str, Any]]],
    *,
    env_extra: dict[str, str] | None = None,
    step: float = STEP,
    pushed: dict[str, list[tuple[float, str, str]]] | None = None,
) -> dict[str, int]:
    """Assert every rule held and every session ended right; return the count per state.
    ``pushed``: per SessionNo, the reports the receiver took (time, phone digits, result)."""
    timings = {**TIMINGS, **(env_extra or {})}
    first_delay = float(timings["RECEIPTS_FIRST_POLL_DELAY"])
    cutoff = float(timings["RECEIPTS_CUTOFF"])
    interval_min = float(timings["RECEIPTS_POLL_INTERVAL_MIN"])
    # The start of each worker checks the credentials with a call of its own (worker/check.py).
    calls = [c for c in sim.calls() if not any(map(is_check_session, c["session_nos"]))]
    by_no = {p.session_no: p for p in planned}
    # Every call: at most 100 SessionNos, all of the call's own account.
    for call in calls:
        if call["action"] != "GetUSMSSendReceipt":
            continue
        assert 1 <= len(call["session_nos"]) <= 100, call
        assert {by_no[s].account_id for s in call["session_nos"]} == {call["account_id"]}, call
    answered = answered_calls(calls)
    problems: list[str] = []
    states: dict[str, int] = defaultdict(int)
    for p in planned:
        p.calls = answered.get(p.session_no, [])
        times = sorted(p.calls)
        if times and times[0] < p.sent_at + first_delay:
            early = times[0] - p.sent_at
            problems.append(f"{p.session_no}: polled {early:.3f}s after sending, before the delay")
        if times and times[-1] > p.sent_at + cutoff + LATENCY:
            late = times[-1] - p.sent_at
            problems.append(f"{p.session_no}: polled {late:.3f}s after sending, past the cutoff")
        for a, b in itertools.pairwise(times):
            if b - a < interval_min - LATENCY:
                history = [
                    (round(c["t"] - p.sent_at, 3), c["outcome"], len(c["session_nos"]))
                    for c in calls
                    if p.session_no in c["session_nos"]
                ]
                problems.append(f"{p.session_no}: polled twice {b - a:.3f}s apart: {history}")
        state, expected = expected_outcome(p, step, (pushed or {}).get(p.session_no))
        row = sessions[p.session_no]
        states[row["state"]] += 1
        if row["state"] != state:
            problems.append(f"{p.session_no}: state {row['state']}, expected {state}")
        got = {k: r["result"] for k, r in receipts.get(p.session_no, {}).items()}
        if got != expected:
            problems.append(f"{p.session_no}: receipts {got}, expected {expected}")
        tracked = {phone_key(x): x for x in p.tracked_phones}
        for key, receipt in receipts.get(p.session_no, {}).items():
            if key in tracked and receipt["phone"] != tracked[key]:
                stored_as = receipt["phone"]
                problems.append(f"{p.session_no}: phone {stored_as!r} tracked as {tracked[key]!r}")
        if state == "escalated":
            detail = row["escalation_detail"]
            unresolved = [x["phone"] for x in detail["phones"]]
            if p.tracked_phones:
                want = [
                    x
                    for x in p.tracked_phones
                    if expected.get(phone_key(x)) not in ("Success", "Fail", "SubmitFail")
                ]
                if unresolved != want:
                    problems.append(
                        f"{p.session_no}: escalation lists {unresolved}, expected {want}"
                    )
        if p.scenario == "poison" and not row["last_error"]:
            problems.append(f"{p.session_no}: poison session's last_error is {row['last_error']!r}")
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems[:40])
    return states


def _written_out(digits: str) -> re.Pattern[str]:
    """A phone's digits however a log may spell them ("+852 5000-7701", "(852)50007701"), and
    not inside a longer number: the digits of all the text run together used to find phones
    in a task's runtime ("succeeded in 0.01640852500077017s")."""
    separated = r"[\s().+\-]*".join(digits)
    return re.compile(rf"(?<!\d){separated}(?!\d)")


def assert_logs_clean(folder: Path, planned: list[Planned]) -> int:
    """No process log holds the AccessKeySecret or a whole phone number (masked to its last
    four digits unless RECEIPTS_LOG_PHONES is set). Returns the bytes of log scanned."""
    text = "\n".join(path.read_text(errors="replace") for path in folder.glob("*.log"))
    assert "demo-secret" not in text
    digits = {phone_key(x) for p in planned for x in (*p.sim_phones, *p.tracked_phones)}
    leaked = sorted(d for d in digits if _written_out(d).search(text))
    assert not leaked, f"phones in logs: {leaked[:5]}"
    return len(text)
