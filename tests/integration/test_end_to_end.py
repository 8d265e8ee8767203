"""The whole product on real parts: `receipts worker` and `receipts beat` processes, Redis,
PostgreSQL, and the project's simulator, with timings scaled to seconds.

A few hundred sessions of every kind must end in the right state with every phone's receipt
right, and the simulator's call log must show that no rule of the poll schedule was broken.
"""

from __future__ import annotations

import itertools
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.conftest import REDIS_URL, Configure
from tests.integration.harness import flush_redis, processes, wait_for
from tests.integration.scenarios import Planned, answered_calls, expected_outcome, plan
from worker import db, track_many
from worker.domain import phone_key
from worker.models import receipts_table, sessions_table
from worker.simulator import Simulator

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

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


def _run(
    configure: Configure,
    pg: str,
    tmp_path: Path,
    sim: Simulator,
    planned: list[Planned],
    *,
    workers: int = 1,
    beats: int = 1,
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, dict[str, Any]]]]:
    flush_redis(REDIS_URL)
    env = {
        **TIMINGS,
        "RECEIPTS_DATABASE_URL": pg,
        "RECEIPTS_BROKER_URL": REDIS_URL,
        "RECEIPTS_API_URL": sim.url,
        "RECEIPTS_ACCESS_KEY_ID": "demo",
        "RECEIPTS_ACCESS_KEY_SECRET": "demo-secret",
    }
    configure(**env)
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
    from datetime import UTC, datetime

    track_many(
        {
            "account_id": p.account_id,
            "session_no": p.session_no,
            "phones": p.tracked_phones,
            "sent_at": datetime.fromtimestamp(p.sent_at, UTC),
        }
        for p in planned
    )
    with processes(env, tmp_path) as group:
        for n in range(workers):
            group.worker(f"w{n + 1}")
        for n in range(beats):
            group.beat(f"beat{n + 1}")

        def pending() -> int:
            with db.session_scope() as session:
                return (
                    session.scalar(
                        sa.select(sa.func.count()).where(sessions_table.c.state == "pending")
                    )
                    or 0
                )

        wait_for(
            lambda: pending() == 0,
            timeout=60,
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


def _check(
    planned: list[Planned],
    sim: Simulator,
    sessions: dict[str, dict[str, Any]],
    receipts: dict[str, dict[str, dict[str, Any]]],
) -> dict[str, int]:
    calls = sim.calls()
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
        if times and times[0] < p.sent_at + 1:
            early = times[0] - p.sent_at
            problems.append(f"{p.session_no}: polled {early:.3f}s after sending, before the delay")
        if times and times[-1] > p.sent_at + 12 + LATENCY:
            late = times[-1] - p.sent_at
            problems.append(f"{p.session_no}: polled {late:.3f}s after sending, past the cutoff")
        for a, b in itertools.pairwise(times):
            if b - a < 1 - LATENCY:
                history = [
                    (round(c["t"] - p.sent_at, 3), c["outcome"], len(c["session_nos"]))
                    for c in calls
                    if p.session_no in c["session_nos"]
                ]
                problems.append(f"{p.session_no}: polled twice {b - a:.3f}s apart: {history}")
        state, expected = expected_outcome(p, STEP)
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


def test_hundreds_of_sessions_of_every_kind_end_right(
    configure: Configure, pg: str, tmp_path: Path
) -> None:
    planned = plan(300, accounts=3)
    with Simulator(step=STEP, seed=3) as sim:
        sessions, receipts = _run(configure, pg, tmp_path, sim, planned)
        states = _check(planned, sim, sessions, receipts)
    # Without faults every session that can resolve does: the expectation is not just "what
    # the polls saw" but the scenario's real outcome.
    resolvable = {
        "quick_success",
        "slow_final",
        "late_failure",
        "submit_fail",
        "respelled",
        "chinese",
    }
    for p in planned:
        if p.scenario in resolvable:
            assert sessions[p.session_no]["state"] == "resolved", p.session_no
        if p.scenario == "stale_unknow":
            assert {r["result"] for r in receipts[p.session_no].values()} == {"Success"}, (
                p.session_no
            )
    assert states["resolved"] > 100 and states["escalated"] > 50


def test_the_same_holds_when_the_api_misbehaves(
    configure: Configure, pg: str, tmp_path: Path
) -> None:
    """Faults on a third of the calls, and two beats and two workers running at once (the
    second beat by mistake): still no rule broken and nothing wrong."""
    planned = plan(200, accounts=2, seed=2)
    with Simulator(step=STEP, seed=4) as sim:
        sim.set_faults(
            http_500=0.08,
            http_429=0.03,
            retcode_server=0.08,
            retcode_unknown=0.03,
            truncated=0.06,
            slow=0.06,
            slow_seconds=1.5,
            extra_sessions=0.05,
            string_receipt_time=0.1,
        )
        sessions, receipts = _run(configure, pg, tmp_path, sim, planned, workers=2, beats=2)
        _check(planned, sim, sessions, receipts)
        outcomes = {c["outcome"] for c in sim.calls()}
    # The faults really happened.
    assert {"http_500", "retcode_server", "truncated", "slow"} <= outcomes
