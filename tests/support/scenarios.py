"""What the worker must end up with, worked out independently from the simulator's scenario
timelines and the calls it actually answered (so the expectation is exact even when faults
made some polls fail)."""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from worker.domain import phone_key
from worker.simulator import SCENARIOS

FINAL = {"Success", "Fail", "SubmitFail"}


# Visible result per phone at ``t`` steps after sending, for each scenario (None: no receipt).
# Mirrors the scenario plans in worker/simulator/scenarios.py, written out by hand.
def visible(scenario: str, phone_index: int, phone_count: int, t: float) -> str | None:
    if t < 1 or scenario in ("never", "poison"):
        return None
    if scenario in ("quick_success", "respelled", "chinese"):
        return "Success"
    if scenario == "submit_fail":
        return "SubmitFail"
    if scenario == "slow_final":
        return "Success" if t >= 4 else "Unknow"
    if scenario == "late_failure":
        return "Fail" if t >= 6 else "Unknow"
    if scenario == "unknow_forever":
        return "Unknow"
    if scenario == "silent_phone":
        return None if phone_index == phone_count - 1 else "Success"
    if scenario == "stale_unknow":
        return "Success" if t < 3 else "Unknow"
    raise ValueError(scenario)


@dataclass
class Planned:
    account_id: int
    session_no: str
    scenario: str
    sim_phones: list[str]
    tracked_phones: list[str]
    sent_at: float = 0.0
    calls: list[float] = field(default_factory=list)  # answered poll times (unix)


def plan(count: int, accounts: int, seed: int = 1) -> list[Planned]:
    """Sessions of every kind: the scenarios, some tracked without phones, a tracked phone the
    API never reports, phones spelled as Uspeedo takes them."""
    rng = random.Random(seed)
    # Every scenario the simulator plays; poison is placed at fixed positions below instead.
    kinds = [scenario for scenario in SCENARIOS if scenario != "poison"]
    planned = []
    for i in range(count):
        scenario = "poison" if i in (7, count // 2) else kinds[i % len(kinds)]
        phones = [f"(852)5{i:05d}{k:02d}" for k in range(rng.randint(1, 3))]
        tracked = list(phones)
        if scenario == "stale_unknow":
            # An extra tracked phone that never reports keeps the session polling after its
            # Success, so the stale Unknow that follows really reaches the worker.
            tracked.append(f"(852)6{i:05d}99")
        elif i % 4 == 3:
            tracked = []
        planned.append(
            Planned(
                account_id=1 + i % accounts,
                session_no=f"{scenario}-{i:04d}",
                scenario=scenario,
                sim_phones=phones,
                tracked_phones=tracked,
            )
        )
    return planned


# How a pushed result reads once stored (Uspeedo's push spells a pending result UNKNOWN).
_PUSHED = {"Success": "Success", "Fail": "Fail", "UNKNOWN": "Unknow"}


def expected_outcome(
    p: Planned, step: float, pushed: list[tuple[float, str, str]] | None = None
) -> tuple[str, dict[str, str]]:
    """(state, {phone_key: stored result}) after the answered polls in ``p.calls`` and the
    reports ``pushed`` to the receiver ((time, phone digits, result as pushed)), in time order.

    A final result is never replaced by a non-final one; otherwise the later one stands (the
    scenarios never show two versions of one kind that the receipt time would order otherwise).
    The session is resolved from the first moment its phones are all final: no poll comes
    after that, but later pushes are still stored.
    """
    stored: dict[str, str] = {}
    tracked = {phone_key(x) for x in p.tracked_phones}
    events: list[tuple[float, dict[str, str]]] = []
    for call in p.calls:
        t = (call - p.sent_at) / step
        shown = {
            phone_key(phone): result
            for index, phone in enumerate(p.sim_phones)
            for result in [visible(p.scenario, index, len(p.sim_phones), t)]
            if result is not None
        }
        events.append((call, shown))
    for at, phone, result in pushed or ():
        events.append((at, {phone: _PUSHED[result]}))
    resolved = False
    for _, shown in sorted(events, key=lambda event: event[0]):
        for key, result in shown.items():
            if not (stored.get(key) in FINAL and result not in FINAL):
                stored[key] = result
        if tracked:
            resolved = resolved or all(stored.get(k) in FINAL for k in tracked)
        else:
            resolved = resolved or (bool(stored) and all(r in FINAL for r in stored.values()))
    return ("resolved" if resolved else "escalated"), stored


def answered_calls(calls: list[dict[str, Any]]) -> dict[str, list[float]]:
    by_session: dict[str, list[float]] = defaultdict(list)
    for call in calls:
        if call["action"] == "GetUSMSSendReceipt" and call["outcome"] in (
            "ok",
            "string_receipt_time",
            "extra_sessions",
        ):
            for session_no in call["session_nos"]:
                by_session[session_no].append(call["t"])
    return by_session
