"""A batch the API refuses as a whole is halved only when one SessionNo can be the cause (a
parameter error that does not blame the call itself, an answer too large), and never beyond a
bounded number of calls per poll.

The simulator answers 215392 "Invalid parameter AccountId" to an AccountId it refuses, and
"Invalid parameter SessionNoSet" to any call naming a poison session.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from tests.support.databases import Configure
from worker import db, poller, track_many
from worker.client import UspeedoClient
from worker.config import get_settings
from worker.models import sessions_table
from worker.receipts import ReceiptBatch
from worker.simulator import Simulator
from worker.store import Claim

# What one poll of 100 sessions may spend on bisection: enough to isolate two bad SessionNos
# (two halvings per level of a 100-session batch, for each of them).
CAP = 4 * math.ceil(math.log2(100))


class RefusedAccount(UspeedoClient):
    """The real client, sending an AccountId the API refuses (as an account the keys do not
    belong to would be)."""

    def get_send_receipts(
        self, account_id: int, session_nos: Sequence[str], *, deadline: float | None = None
    ) -> ReceiptBatch:
        return super().get_send_receipts(0, session_nos, deadline=deadline)


def _track_and_claim(
    sim: Simulator, poison: set[int], count: int = 100, phones: dict[int, int] | None = None
) -> Claim:
    """``count`` sessions of account 1, the ``poison`` ones refused by the API; session i has
    ``phones[i]`` phones (one by default)."""
    sent = time.time() - 2  # due now (the first delay is 1 s), receipts visible
    names = [f"s{i:03d}" for i in range(count)]
    numbers = {
        i: [f"8525{i:03d}{j:04d}" for j in range((phones or {}).get(i, 1))] for i in range(count)
    }
    sim.register(
        {
            "account_id": 1,
            "session_no": name,
            "phones": numbers[i],
            "scenario": "poison" if i in poison else "quick_success",
            "sent_at": sent,
        }
        for i, name in enumerate(names)
    )
    track_many(
        {
            "account_id": 1,
            "session_no": name,
            "phones": numbers[i],
            "sent_at": datetime.fromtimestamp(sent, UTC),
        }
        for i, name in enumerate(names)
    )
    settings = get_settings()
    claims: list[Claim] = []
    poller.tick(
        session_factory=db.session_scope,
        clock=lambda: datetime.now(UTC),
        policy=settings.poll_policy(),
        dispatch=claims.append,
        lease=settings.lease,
        tick_every=settings.tick,
    )
    assert [len(c.session_ids) for c in claims] == [count]
    return claims[0]


def _poll(claim: Claim, client: UspeedoClient) -> poller.PollReport:
    with client:
        return poller.poll(
            claim,
            session_factory=db.session_scope,
            client=client,
            clock=lambda: datetime.now(UTC),
            policy=get_settings().poll_policy(),
            rng=random.Random(1),
            budget=timedelta(seconds=20),
            in_flight=timedelta(seconds=30),
        )


def _sessions() -> dict[str, Any]:
    with db.session_scope() as session:
        return {
            row.session_no: row
            for row in session.execute(
                sa.select(
                    sessions_table.c.session_no,
                    sessions_table.c.state,
                    sessions_table.c.last_error,
                    sessions_table.c.poll_count,
                )
            )
        }


def _receipt_calls(sim: Simulator) -> int:
    return sum(1 for call in sim.calls() if call["action"] == "GetUSMSSendReceipt")


def _options(sim: Simulator) -> dict[str, Any]:
    return {"api_url": sim.url, "access_key_id": "demo", "access_key_secret": "demo-secret"}


@pytest.mark.usefixtures("database")
def test_an_error_naming_the_account_costs_one_call_not_199(configure: Configure) -> None:
    with Simulator(step=0.1, seed=1) as sim:
        configure(RECEIPTS_API_URL=sim.url)
        claim = _track_and_claim(sim, poison=set())
        report = _poll(claim, RefusedAccount(**_options(sim)))
        calls = _receipt_calls(sim)
    assert calls == 1, f"{calls} calls for one refused AccountId"
    assert (report.api_calls, report.polled, report.resolved, report.failed) == (1, 100, 0, 100)
    rows = _sessions()
    assert all(r.state == "pending" for r in rows.values())
    assert all("Invalid parameter AccountId" in r.last_error for r in rows.values())


@pytest.mark.usefixtures("database")
def test_two_poison_sessions_among_100_are_both_isolated(configure: Configure) -> None:
    with Simulator(step=0.1, seed=1) as sim:
        configure(RECEIPTS_API_URL=sim.url)
        claim = _track_and_claim(sim, poison={3, 88})
        report = _poll(claim, UspeedoClient(**_options(sim)))
        calls = _receipt_calls(sim)
    assert calls <= 1 + CAP
    assert (report.polled, report.resolved, report.failed) == (100, 98, 2)
    rows = _sessions()
    assert {n for n, r in rows.items() if r.state != "resolved"} == {"s003", "s088"}
    assert "Invalid parameter SessionNoSet" in rows["s003"].last_error


@pytest.mark.usefixtures("database")
def test_bisection_stops_at_its_cap_and_records_the_rest_as_failed(
    configure: Configure,
) -> None:
    poison = set(range(5, 100, 10))  # one in every ten
    with Simulator(step=0.1, seed=1) as sim:
        configure(RECEIPTS_API_URL=sim.url)
        claim = _track_and_claim(sim, poison=poison)
        report = _poll(claim, UspeedoClient(**_options(sim)))
        calls = _receipt_calls(sim)
    assert calls <= 1 + CAP, f"{calls} calls for one poll of 100 sessions"
    assert report.api_calls == calls
    assert report.polled == 100 and report.resolved + report.failed == 100
    rows = _sessions()
    # Every session was either answered or told why not; no poison one was resolved.
    assert all(r.poll_count == 1 for r in rows.values())
    assert all(r.state == "resolved" or r.last_error for r in rows.values())
    assert all(rows[f"s{i:03d}"].state == "pending" for i in poison)
    unisolated = [r for r in rows.values() if r.last_error and "not isolated" in r.last_error]
    assert unisolated, "the cap was never reached"


@pytest.mark.usefixtures("database")
def test_an_answer_too_large_is_halved_until_each_part_fits(configure: Configure) -> None:
    """99 sessions of 4 phones and one of 600: the whole answer is several times the cap (64
    KiB, about 300 receipts), and the big session's alone is past it."""
    cap = 64 * 1024
    with Simulator(step=0.1, seed=1) as sim:
        configure(RECEIPTS_API_URL=sim.url)
        claim = _track_and_claim(
            sim, poison=set(), phones={i: 600 if i == 42 else 4 for i in range(100)}
        )
        report = _poll(claim, UspeedoClient(**_options(sim), max_answer_bytes=cap))
        calls = _receipt_calls(sim)
    assert 1 < calls <= 1 + CAP
    assert (report.polled, report.resolved, report.failed) == (100, 99, 1)
    rows = _sessions()
    assert rows["s042"].state == "pending"
    assert f"answer larger than {cap} bytes" in rows["s042"].last_error
    assert all(r.state == "resolved" for n, r in rows.items() if n != "s042")
