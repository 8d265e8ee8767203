"""Who decides a session while its poll is in flight, on both backends: a phone tracked
meanwhile keeps it open, only the poll still holding it reschedules it, a session deleted
meanwhile costs its neighbours nothing, a row the database refuses is isolated, and a bulk
re-track racing the answers never deadlocks."""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from tests.support.clock import IN_FLIGHT, LEASE, POLICY, T0
from tests.support.factories import (
    P1,
    P2,
    P3,
    answer,
    receipt,
    started,
    stored_receipts,
    stored_sessions,
    track,
)
from worker import db, poller, store, workers
from worker.domain import Result
from worker.models import sessions_table
from worker.receipts import Receipt, ReceiptBatch

POLLED = T0 + POLICY.first_delay


def _results() -> dict[tuple[str, str], str]:
    return {key: row["result"] for key, row in stored_receipts().items()}


@pytest.mark.usefixtures("database")
def test_a_phone_tracked_while_its_poll_is_in_flight_keeps_the_session_open() -> None:
    track({"account_id": 1, "session_no": "S", "phones": [P1, P2]})
    targets = started(1, POLLED)
    assert [t.phones for t in targets] == [(P1, P2)]
    # The sender tracks a third phone while the API is being asked about the first two.
    track({"account_id": 1, "session_no": "S", "phones": [P3]}, now=POLLED)

    outcome = answer(
        targets,
        [receipt("S", P1, Result.SUCCESS, POLLED), receipt("S", P2, Result.SUCCESS, POLLED)],
        POLLED + timedelta(seconds=2),
    )

    assert outcome.resolved == ()
    row = stored_sessions()["S"]
    assert row["state"] == "pending", "the third phone has no receipt yet"
    assert row["phones"] == [P1, P2, P3]
    assert row["next_poll_at"] >= POLLED + timedelta(seconds=2) + POLICY.interval_min
    assert row["claim_token"] is None and row["held_by"] is None
    # The next poll reports the third phone, and only then is the session resolved.
    later = row["next_poll_at"]
    targets = started(1, later)
    assert [t.phones for t in targets] == [(P1, P2, P3)]
    assert answer(targets, [receipt("S", P3, Result.FAIL, later)], later).resolved == ("S",)
    assert stored_sessions()["S"]["state"] == "resolved"


@pytest.mark.usefixtures("database")
def test_an_answer_that_outlived_its_hold_stores_receipts_but_not_the_schedule() -> None:
    """A poll slower than its hold: the session was claimed and polled again meanwhile. The
    late answer's receipts are stored (the guard keeps the newest), but the schedule, the
    error and the hold belong to the poll that holds the session now."""
    track({"account_id": 1, "session_no": "S", "phones": [P1, P2]})
    slow = started(1, POLLED, worker="w1")
    overtaking_at = POLLED + IN_FLIGHT
    fresh = started(1, overtaking_at, worker="w2")
    assert [t.token for t in fresh] != [t.token for t in slow]
    before = stored_sessions()["S"]
    assert before["held_by"] == "w2"

    outcome = answer(slow, [receipt("S", P1, Result.UNKNOW, POLLED)], overtaking_at)

    assert outcome.receipts_written == 1 and outcome.rescheduled == 0
    assert _results() == {("S", P1): "Unknow"}
    after = stored_sessions()["S"]
    for column in ("next_poll_at", "last_polled_at", "claim_token", "held_by", "last_error"):
        assert after[column] == before[column], column
    # The poll holding it decides.
    outcome = answer(fresh, [receipt("S", P1, Result.UNKNOW, POLLED)], overtaking_at)
    assert outcome.rescheduled == 1
    row = stored_sessions()["S"]
    assert row["claim_token"] is None and row["held_by"] is None
    assert row["next_poll_at"] >= overtaking_at + POLICY.interval_min


@pytest.mark.usefixtures("database")
def test_an_answer_that_settles_a_session_resolves_it_even_after_its_hold_ended() -> None:
    track({"account_id": 1, "session_no": "S", "phones": [P1]})
    slow = started(1, POLLED, worker="w1")
    started(1, POLLED + IN_FLIGHT, worker="w2")
    outcome = answer(slow, [receipt("S", P1, Result.SUCCESS, POLLED)], POLLED + IN_FLIGHT)
    assert outcome.resolved == ("S",)
    row = stored_sessions()["S"]
    assert row["state"] == "resolved" and row["next_poll_at"] is None
    assert row["claim_token"] is None and row["held_by"] is None


@pytest.mark.usefixtures("database")
def test_a_session_deleted_while_its_poll_is_in_flight_costs_its_neighbours_nothing() -> None:
    track(*({"account_id": 1, "session_no": f"S{i}", "phones": [P1]} for i in range(5)))
    targets = started(1, POLLED)
    with db.session_scope() as session:
        session.execute(sa.delete(sessions_table).where(sessions_table.c.session_no == "S2"))

    outcome = answer(
        targets, [receipt(f"S{i}", P1, Result.SUCCESS, POLLED) for i in range(5)], POLLED
    )

    assert sorted(outcome.resolved) == ["S0", "S1", "S3", "S4"]
    assert sorted(stored_sessions()) == ["S0", "S1", "S3", "S4"]
    assert sorted(_results()) == [(f"S{i}", P1) for i in (0, 1, 3, 4)]


class _Answering:
    """An API client that answers every call with the given receipts."""

    def __init__(self, receipts: list[Receipt]) -> None:
        self.receipts = receipts
        self.calls: list[list[str]] = []

    def deadline_in(self, seconds: float) -> float:
        return seconds

    def get_send_receipts(
        self, account_id: int, session_nos: Sequence[str], *, deadline: float | None = None
    ) -> ReceiptBatch:
        self.calls.append(list(session_nos))
        asked = set(session_nos)
        return ReceiptBatch(
            receipts=tuple(r for r in self.receipts if r.session_no in asked),
            problems=(),
            request_uuid="uuid-1",
        )


class _Refused:
    """A result value that the table's CHECK constraint refuses on every backend, standing in
    for any row the database will never take (an index row too large, a value out of range)."""

    value = "Unstorable"


@pytest.mark.usefixtures("database")
def test_a_receipt_the_database_refuses_is_isolated_and_the_others_are_stored() -> None:
    track(*({"account_id": 1, "session_no": f"S{i:02d}", "phones": [P1]} for i in range(10)))
    receipts = [receipt(f"S{i:02d}", P1, Result.SUCCESS, POLLED) for i in range(10)]
    bad = receipts[6]
    receipts[6] = Receipt(**{**{f: getattr(bad, f) for f in bad.__slots__}, "result": _Refused()})  # type: ignore[arg-type]
    with db.session_scope() as session:
        claim = store.claim_batch(
            session, account_id=1, now=POLLED, policy=POLICY, lease_until=POLLED + LEASE, limit=100
        )
    assert claim is not None
    client = _Answering(receipts)
    sleeps: list[float] = []

    report = poller.poll(
        claim,
        session_factory=db.session_scope,
        client=client,  # type: ignore[arg-type]
        clock=lambda: POLLED,
        policy=POLICY,
        rng=random.Random(1),
        budget=timedelta(seconds=60),
        in_flight=IN_FLIGHT,
    )

    assert sleeps == []
    assert report.api_calls == 1, "the database's refusal costs no API call"
    assert report.resolved == 9 and report.failed == 1
    sessions = stored_sessions()
    assert sessions["S06"]["state"] == "pending"
    assert "the database refused this session's receipts" in sessions["S06"]["last_error"]
    error = sessions["S06"]["last_error"]
    assert "check constraint" in error.lower()
    # Neither the SQL nor the failing row (which holds the phone) reaches the column.
    assert "55311111" not in error and "INSERT" not in error
    assert sessions["S06"]["next_poll_at"] >= POLLED + POLICY.interval_min
    assert all(sessions[f"S{i:02d}"]["state"] == "resolved" for i in range(10) if i != 6)


@pytest.mark.postgres
@pytest.mark.usefixtures("pg")
def test_a_bulk_retrack_racing_recorded_answers_never_deadlocks() -> None:
    """Both paths lock many sessions of one account: a bulk re-track adding a phone to each,
    in a shuffled order, and answers recorded for claimed batches. Locks are taken in one
    global order on both, so PostgreSQL never has to break a deadlock."""
    count = 300
    track(*({"account_id": 1, "session_no": f"S{i:03d}", "phones": [P1]} for i in range(count)))
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def retrack() -> None:
        rng = random.Random(2)
        start.wait()
        for round_ in range(8):
            rows = [
                {
                    "account_id": 1,
                    "session_no": f"S{i:03d}",
                    "phones": [f"(852)6{round_:03d}{i:04d}"],
                }
                for i in range(count)
            ]
            rng.shuffle(rows)
            try:
                track(*rows, now=POLLED)
            except Exception as exc:
                errors.append(exc)

    def record_answers() -> None:
        start.wait()
        for round_ in range(8):
            now = POLLED + round_ * (POLICY.interval_max + IN_FLIGHT)
            with db.session_scope() as session:
                session.execute(
                    sa.update(sessions_table).values(
                        state="pending", next_poll_at=now, last_polled_at=None, claim_token=None
                    )
                )
            try:
                while True:
                    with db.session_scope() as session:
                        claim = store.claim_batch(
                            session,
                            account_id=1,
                            now=now,
                            policy=POLICY,
                            lease_until=now + LEASE,
                            limit=100,
                        )
                    if claim is None:
                        break
                    with db.session_scope() as session:
                        targets = store.start_poll(
                            session, claim=claim, now=now, policy=POLICY, busy_until=now + LEASE
                        )
                    # The answer lists the sessions in the opposite order to the track.
                    receipts = [
                        receipt(t.session_no, P1, Result.SUCCESS, now) for t in reversed(targets)
                    ]
                    answer(targets, receipts, now)
            except Exception as exc:
                errors.append(exc)

    threads = [threading.Thread(target=retrack), threading.Thread(target=record_answers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []


# --- the holds of a worker process that stopped -------------------------------------------

TICK = timedelta(seconds=30)


def _beat(worker_id: str, at: datetime) -> None:
    with db.session_scope() as session:
        workers.beat(session, worker_id=worker_id, now=at)


def _release(now: datetime) -> workers.Released:
    with db.session_scope() as session:
        return workers.release_dead(session, now=now, tick=TICK, policy=POLICY)


@pytest.mark.usefixtures("database")
def test_the_polls_of_a_worker_that_stopped_heartbeating_are_released_within_two_ticks() -> None:
    track(
        {"account_id": 1, "session_no": "DEAD", "phones": [P1]},
        {"account_id": 2, "session_no": "ALIVE", "phones": [P1]},
    )
    dead, alive = "host:1:aaaa", "host:2:bbbb"
    _beat(dead, POLLED)
    _beat(alive, POLLED)
    started(1, POLLED, worker=dead)
    started(2, POLLED, worker=alive)
    # Two ticks later the dead one is still within its grace; the live one beat again.
    _beat(alive, POLLED + 2 * TICK)
    nothing = _release(POLLED + 2 * TICK)
    assert nothing == workers.Released(workers=(), pending=0, reconcile={})
    assert stored_sessions()["DEAD"]["held_by"] == dead

    released = _release(POLLED + 2 * TICK + timedelta(seconds=1))

    assert released.workers == (dead,) and released.pending == 1 and released.reconcile == {}
    sessions = stored_sessions()
    row = sessions["DEAD"]
    assert row["held_by"] is None and row["claim_token"] is None and row["state"] == "pending"
    # Due again at once, but never within interval_min of the lost poll's start.
    assert row["next_poll_at"] == POLLED + POLICY.interval_min
    assert sessions["ALIVE"]["held_by"] == alive
    assert sessions["ALIVE"]["next_poll_at"] == POLLED + IN_FLIGHT, "a live hold stays"
    # Released once: a second tick at the same time finds nothing more.
    assert _release(POLLED + 2 * TICK + timedelta(seconds=1)).pending == 0
    # The released session is claimed and polled again as soon as the rule allows.
    assert started(1, POLLED + POLICY.interval_min)[0].session_no == "DEAD"


@pytest.mark.usefixtures("database")
def test_a_session_escalated_while_its_poll_was_lost_is_reconciled_once() -> None:
    track({"account_id": 3, "session_no": "LOST", "phones": [P1]})
    lost_at = T0 + POLICY.cutoff - timedelta(seconds=10)
    with db.session_scope() as session:
        session.execute(sa.update(sessions_table).values(next_poll_at=lost_at))
    _beat("host:3:cccc", lost_at)
    (target,) = started(3, lost_at, worker="host:3:cccc")
    with db.session_scope() as session:
        assert [
            e.session_no for e in store.escalate_due(session, now=T0 + POLICY.cutoff, policy=POLICY)
        ] == ["LOST"]

    released = _release(lost_at + 3 * TICK)

    assert released.reconcile == {3: [target.id]}
    assert stored_sessions()["LOST"]["held_by"] is None
    assert _release(lost_at + 4 * TICK).reconcile == {}, "once"
    # The reconciliation poll records a late receipt: resolved, keeping escalated_at.
    client = _Answering([receipt("LOST", P1, Result.SUCCESS, lost_at)])
    report = poller.repoll_escalated(
        (),
        account_id=3,
        ids=[target.id],
        session_factory=db.session_scope,
        client=client,  # type: ignore[arg-type]
        clock=lambda: lost_at + 4 * TICK,
        policy=POLICY,
        rng=random.Random(1),
        budget=timedelta(seconds=60),
    )
    assert report.resolved == 1 and client.calls == [["LOST"]]
    row = stored_sessions()["LOST"]
    assert row["state"] == "resolved" and row["escalated_at"] == T0 + POLICY.cutoff


@pytest.mark.usefixtures("database")
def test_an_answer_that_comes_back_clears_its_own_hold_only() -> None:
    track({"account_id": 1, "session_no": "S", "phones": [P1]})
    targets = started(1, POLLED, worker="host:1:aaaa")
    answer(targets, [receipt("S", P1, Result.UNKNOW, POLLED)], POLLED)
    assert stored_sessions()["S"]["held_by"] is None
