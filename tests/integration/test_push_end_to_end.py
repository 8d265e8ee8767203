"""Uspeedo's push and the poll together, on real parts: `receipts worker`, `receipts beat` and
`receipts receiver` processes, Redis, PostgreSQL, and the simulator pushing every report as
Uspeedo does, with a fifth of them lost and the receiver killed and restarted mid-run.

Every session must end in the state, with the receipts, that what the simulator answered and
what the receiver was given imply; a session whose every report was pushed before its first
poll is never polled and its receipts say `push`; and a session tracked only after its push
came is resolved by it all the same (the push waited in the inbox).
"""

from __future__ import annotations

import math
import socket
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.support.databases import Configure
from tests.support.e2e import LATENCY, assert_logs_clean, check, run_plan
from tests.support.processes import Processes, wait_for
from tests.support.scenarios import Planned, expected_outcome, plan
from tests.support.servers import free_port
from worker import track_many
from worker.domain import phone_key
from worker.simulator import Simulator

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

TOKEN = "e2e-push-token-0123456789abcdef"
STEP = 0.75  # scenario reports at 0.75 s (most), 2.25 s, 3 s and 4.5 s after sending
FIRST_POLL_DELAY = 4.0
TIMINGS = {
    "RECEIPTS_FIRST_POLL_DELAY": str(FIRST_POLL_DELAY),
    "RECEIPTS_POLL_INTERVAL_MIN": "1",
    "RECEIPTS_POLL_INTERVAL_MAX": "2",
    "RECEIPTS_CUTOFF": "12",
    "RECEIPTS_CALLBACK_TOKEN": TOKEN,
}
LOSS = 0.2
KILL_AT = 1.5  # after the first reports were pushed
# Restarted at once: its start (seconds) is the outage, which the reports of 2.25 s and 3 s
# meet; later ones, their retries and the sessions sent once it listens meet the restarted one.
DOWN_FOR = 0.3
LATE_AFTER = 2.0  # the late sessions are tracked once their reports were pushed


def _quick(count: int, prefix: str, digit: int) -> list[Planned]:
    """``quick_success`` sessions of one or two phones."""
    sessions = []
    for i in range(count):
        phones = [f"(852){digit}{i:05d}0{k}" for k in range(1 + i % 2)]
        sessions.append(Planned(1, f"{prefix}-{i:03d}", "quick_success", phones, list(phones)))
    return sessions


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_pushed_lost_and_polled_receipts_all_end_right(
    configure: Configure, pg: str, redis_url: str, tmp_path: Path
) -> None:
    # Tracked only after Uspeedo pushed their reports.
    late = _quick(20, "late", 7)
    # Sent once the restarted receiver listens, however long its start took on a busy
    # machine: their reports are pushed to it.
    after = _quick(10, "after", 8)
    planned = plan(120, accounts=2, seed=5) + late
    port = free_port()
    receiver: dict[str, Any] = {}
    late_tracked: list[float] = []
    after_sent: list[float] = []

    def start_receiver(group: Processes) -> None:
        receiver["process"] = group.receiver(port=port)
        wait_for(lambda: _listening(port), timeout=60, describe=group.logs)

    def during(group: Processes, elapsed: float) -> None:
        if elapsed >= KILL_AT and "killed_at" not in receiver and _quiet(sim):
            group.stop(receiver["process"], kill=True)
            receiver["killed_at"] = time.time()
        down_until = receiver.get("killed_at", math.inf) + DOWN_FOR
        if time.time() >= down_until and "restarted_at" not in receiver:
            receiver["process"] = group.receiver(port=port)
            receiver["restarted_at"] = time.time()
        if not late_tracked and elapsed >= LATE_AFTER and _all_fated(sim, late):
            track_many(
                {
                    "account_id": p.account_id,
                    "session_no": p.session_no,
                    "phones": p.tracked_phones,
                    "sent_at": datetime.fromtimestamp(p.sent_at, UTC),
                }
                for p in late
            )
            late_tracked.append(time.time())
        if "restarted_at" in receiver and not after_sent and _listening(port):
            now = time.time()
            for p in after:
                p.sent_at = now
            sim.register(
                {"account_id": p.account_id, "session_no": p.session_no,
                 "phones": p.sim_phones, "scenario": p.scenario, "sent_at": now}
                for p in after
            )  # fmt: skip
            track_many(
                {"account_id": p.account_id, "session_no": p.session_no,
                 "phones": p.tracked_phones, "sent_at": datetime.fromtimestamp(now, UTC)}
                for p in after
            )  # fmt: skip
            after_sent.append(now)

    with Simulator(step=STEP, seed=7) as sim:
        callback = f"http://127.0.0.1:{port}/uspeedo/callback/{TOKEN}"
        sim.configure_push(url=callback, enabled=True, loss=LOSS, batch=50)
        sessions, receipts = run_plan(
            configure,
            pg,
            redis_url,
            tmp_path,
            sim,
            planned,
            env_extra=TIMINGS,
            before_sending=start_receiver,
            during=during,
            untracked={p.session_no for p in late},
            settled=lambda: bool(late_tracked and after_sent),
            timeout=90,
        )
        planned += after
        fates = sim.pushes()
        pushed: dict[str, list[tuple[float, str, str]]] = defaultdict(list)
        for fate in fates:
            if fate["fate"] == "delivered":
                pushed[fate["session_no"]].append((fate["t"], fate["phone"], fate["result"]))
        states = check(
            planned, sim, sessions, receipts, env_extra=TIMINGS, step=STEP, pushed=pushed
        )
        polled = {no for call in sim.calls() for no in call["session_nos"]}

    # The run really had all it claims: lost reports, pushes that met the dead receiver and
    # were retried or dropped, and pushes taken by the restarted one.
    by_fate = defaultdict(int)
    for fate in fates:
        by_fate[fate["fate"]] += 1
    assert by_fate["lost"] > 0.1 * len(fates), by_fate
    assert any(fate["attempts"] > 1 for fate in fates), "no push met the dead receiver"
    assert any(
        fate["fate"] == "delivered" and fate["t"] > receiver["restarted_at"] for fate in fates
    ), f"the restarted receiver took no push: {by_fate}"
    assert states["resolved"] > 50 and states["escalated"] > 10

    # Every report pushed before the first poll: never polled, and the receipts say so.
    fates_of: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for fate in fates:
        fates_of[fate["session_no"]].append(fate)
    never_polled = []
    for p in planned:
        its = fates_of[p.session_no]
        before_first_poll = p.sent_at + FIRST_POLL_DELAY - LATENCY
        if not its or any(
            f["fate"] != "delivered" or f["answered"] > before_first_poll for f in its
        ):
            continue
        reports = [(f["t"], f["phone"], f["result"]) for f in its]
        if expected_outcome(_unpolled(p), STEP, reports)[0] != "resolved":
            continue  # e.g. unknow_forever: every report pushed, but polled all the same
        never_polled.append(p.session_no)
        assert p.session_no not in polled, f"{p.session_no} was polled"
        sources = {r["source"] for r in receipts[p.session_no].values()}
        assert sources == {"push"}, (p.session_no, sources)
    assert len(never_polled) >= 20, never_polled

    # Tracked only after the push came: resolved by it from the inbox, never polled.
    late_by_push = [p.session_no for p in late if p.session_no in never_polled]
    assert late_by_push, "no late session was resolved by its push"
    for number in late_by_push:
        assert sessions[number]["state"] == "resolved"
        phones = {phone_key(x) for x in next(p for p in late if p.session_no == number).sim_phones}
        assert set(receipts[number]) == phones
    assert late_tracked[0] > max(f["answered"] for f in fates if f["session_no"] in late_by_push), (
        "tracked after the push was taken"
    )

    assert_logs_clean(tmp_path, planned)
    logs = "\n".join(path.read_text(errors="replace") for path in tmp_path.glob("*.log"))
    assert TOKEN not in logs


def _all_fated(sim: Simulator, late: list[Planned]) -> bool:
    """Whether every report of the late sessions was delivered, lost or dropped."""
    numbers = {p.session_no for p in late}
    done = {(f["session_no"], f["phone"]) for f in sim.pushes() if f["session_no"] in numbers}
    return len(done) == sum(len(p.sim_phones) for p in late)


def _quiet(sim: Simulator) -> bool:
    """No push under way or due in the next moment: a kill now cuts no push off mid-commit
    (one the receiver committed but never answered would be stored, yet recorded as failed)."""
    due = sim.pusher.next_due()
    return sim.pusher.unsettled() == 0 and (due is None or due > time.time() + 0.2)


def _unpolled(p: Planned) -> Planned:
    return Planned(
        p.account_id, p.session_no, p.scenario, p.sim_phones, p.tracked_phones, p.sent_at
    )
