"""Group commit in the receiver (worker/push_writer.py), on PostgreSQL and SQLite, with an
injected clock: pushes that pile up while a transaction is under way are committed together in
the next one, each push is settled only once that transaction committed, a group the database
fails answers every push in it with the error and stores none of them, and a receipt refused
for good costs neither the other pushes of its group nor the other receipts of its push."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from tests.support.clock import T0
from tests.support.databases import Configure
from tests.support.factories import stored_receipts, stored_sessions, track
from tests.support.processes import wait_for
from tests.support.push_receiver import TOKEN, Running, report
from tests.support.servers import free_port
from worker import db, push
from worker.config import load_settings
from worker.models import push_counts_table, receipts_table
from worker.push_writer import PushWriter
from worker.receipts import Receipt
from worker.receiver import create_app

pytestmark = pytest.mark.usefixtures("database")

PUSHED = T0 + timedelta(seconds=20)
POISON = "85200000666"  # a phone whose receipt the database "refuses" (test_a_permanent_...)
WAIT = 20.0
WRITER_THREAD = "receipts-push-writer"


def _receipts(*reports: tuple[str, str]) -> tuple[Receipt, ...]:
    data = [{"SessionNo": no, "Phone": phone, "ReceiptResult": "Success"} for no, phone in reports]
    batch = push.parse_push({"MsgType": 2, "Data": data}, received_at=PUSHED)
    assert batch.skipped == ()
    return batch.receipts


def _committed() -> set[str]:
    """SessionNos with a receipt, as another connection sees them (a read that waits for no
    writer, so that it can look while the writer's transaction is open)."""
    with db.read_scope() as session:
        return set(session.scalars(sa.select(receipts_table.c.session_no)))


class Gate:
    """The writer's unit of work, which can be held open just before its commit (and made to
    fail there), recording what each transaction held."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.open.set()
        self.holding = threading.Event()
        self.transactions = 0
        # The error to raise, before its commit, in the transaction of this number (from 0).
        self.fail: tuple[int, sa_exc.DBAPIError] | None = None
        self.watched: list[Future[Counter[str]]] = []
        # Per transaction: whether each watched push was settled before the commit.
        self.settled_before_commit: list[list[bool]] = []

    @contextmanager
    def __call__(self) -> Iterator[Session]:
        if threading.current_thread().name != WRITER_THREAD:
            # A receiver's other units of work (its probe, its counts) pass straight through.
            with db.session_scope() as session:
                yield session
            return
        with db.session_scope() as session:
            yield session
            # The transaction's work is done; its commit follows this block.
            self.settled_before_commit.append([f.done() for f in self.watched])
            self.holding.set()
            assert self.open.wait(WAIT), "the test never opened the gate"
            self.holding.clear()
            number, self.transactions = self.transactions, self.transactions + 1
            if self.fail is not None and self.fail[0] == number:
                raise self.fail[1]


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The SessionNos each call of record_push recorded (one call per transaction), in order;
    a receipt for :data:`POISON` is refused for good, as a database's constraint would."""
    calls: list[list[str]] = []
    real = push.record_push

    def recording(session: Session, receipts: Any, **kwargs: Any) -> push.PushOutcome:
        calls.append(sorted({r.session_no for r in receipts}))
        if any(r.phone == POISON for r in receipts):
            raise sa_exc.IntegrityError("INSERT", {}, Exception("refused for good"))
        return real(session, receipts, **kwargs)

    monkeypatch.setattr(push, "record_push", recording)
    return calls


@pytest.fixture
def writer() -> Iterator[tuple[PushWriter, Gate]]:
    gate = Gate()
    writer = PushWriter(session_factory=gate, clock=lambda: PUSHED)
    writer.start()
    try:
        yield writer, gate
    finally:
        gate.open.set()
        writer.stop()


def _hold_first(writer: PushWriter, gate: Gate, session_no: str) -> Future[Counter[str]]:
    """A first push, its transaction held open before the commit while others pile up."""
    gate.open.clear()
    first = writer.submit(_receipts((session_no, "85255311111")), account_id=None)
    assert gate.holding.wait(WAIT)
    return first


def _results(futures: list[Future[Counter[str]]]) -> list[dict[str, int]]:
    return [{k: v for k, v in f.result(WAIT).items() if v} for f in futures]


def test_pushes_that_pile_up_are_committed_together_each_settled_after_the_commit(
    writer: tuple[PushWriter, Gate], recorded: list[list[str]]
) -> None:
    pusher, gate = writer
    track(*({"account_id": 1, "session_no": f"S{i}"} for i in range(5)))
    first = _hold_first(pusher, gate, "S0")
    assert not first.done(), "answered before its commit"
    assert _committed() == set()
    rest = [
        pusher.submit(
            _receipts((f"S{i}", "85255311111"), (f"S{i}", "85255312222")), account_id=None
        )
        for i in range(1, 4)
    ]
    # One push for a SessionNo nobody tracked: parked, and counted as such for its push alone.
    rest.append(pusher.submit(_receipts(("NOT-YET", "85255311111")), account_id=None))
    wait_for(lambda: pusher.waiting() == len(rest), timeout=WAIT)
    assert not any(f.done() for f in [first, *rest])
    gate.watched = rest
    gate.open.set()
    assert _results([first, *rest]) == [
        {"stored": 1},
        {"stored": 2},
        {"stored": 2},
        {"stored": 2},
        {"parked": 1},
    ]
    # Two transactions: the first push alone (the writer waited for nothing), then the four
    # that piled up meanwhile, in one; none of them was settled before that commit.
    assert recorded == [["S0"], ["NOT-YET", "S1", "S2", "S3"]]
    assert gate.settled_before_commit[-1] == [False] * 4
    assert _committed() == {"S0", "S1", "S2", "S3"}
    assert {s["state"] for n, s in stored_sessions().items() if n != "S4"} == {"resolved"}


def test_a_group_names_one_account_and_stays_under_its_bound(recorded: list[list[str]]) -> None:
    track(*({"account_id": a, "session_no": f"A{a}-{i}"} for a in (1, 2) for i in range(3)))
    gate = Gate()
    pusher = PushWriter(session_factory=gate, clock=lambda: PUSHED, max_receipts=2)
    try:
        first = _hold_first(pusher, gate, "A1-0")
        waiting = [
            pusher.submit(_receipts(("A1-1", "85255311111")), account_id=1),
            pusher.submit(_receipts(("A2-0", "85255311111")), account_id=2),
            pusher.submit(_receipts(("A1-2", "85255311111")), account_id=1),
            pusher.submit(_receipts(("A2-1", "85255311111")), account_id=2),
            pusher.submit(_receipts(("A2-2", "85255311111")), account_id=2),
        ]
        wait_for(lambda: pusher.waiting() == len(waiting), timeout=WAIT)
        gate.open.set()
        assert _results([first, *waiting]) == [{"stored": 1}] * 6
    finally:
        gate.open.set()
        pusher.stop()
    # Account 1's two pushes together, then account 2's, two receipts at most per group.
    assert recorded == [["A1-0"], ["A1-1", "A1-2"], ["A2-0", "A2-1"], ["A2-2"]]


def test_a_group_the_database_fails_answers_each_of_its_pushes_and_loses_nothing_else(
    writer: tuple[PushWriter, Gate], recorded: list[list[str]]
) -> None:
    pusher, gate = writer
    track(*({"account_id": 1, "session_no": f"S{i}"} for i in range(5)))
    first = _hold_first(pusher, gate, "S0")
    group = [pusher.submit(_receipts((f"S{i}", "85255311111")), account_id=None) for i in (1, 2, 3)]
    wait_for(lambda: pusher.waiting() == len(group), timeout=WAIT)
    # The group's transaction is lost before its commit (a transient error: Uspeedo retries).
    lost = sa_exc.OperationalError("COMMIT", {}, Exception("server closed the connection"))
    gate.fail = (1, lost)
    gate.open.set()
    assert _results([first]) == [{"stored": 1}]
    for pending in group:
        with pytest.raises(sa_exc.OperationalError):
            pending.result(WAIT)
    assert _committed() == {"S0"}, "nothing of the failed group is stored, the rest kept"
    # The writer goes on: Uspeedo's retries of the group, and a new push, are all stored.
    again = [pusher.submit(_receipts((f"S{i}", "85255311111")), account_id=None) for i in (1, 2, 3)]
    again.append(pusher.submit(_receipts(("S4", "85255311111")), account_id=None))
    assert _results(again) == [{"stored": 1}] * 4
    assert _committed() == {"S0", "S1", "S2", "S3", "S4"}


def test_a_receipt_refused_for_good_costs_no_other_push_of_its_group(
    writer: tuple[PushWriter, Gate], recorded: list[list[str]]
) -> None:
    pusher, gate = writer
    track(*({"account_id": 1, "session_no": f"S{i}"} for i in range(4)))
    first = _hold_first(pusher, gate, "S0")
    group = [
        pusher.submit(_receipts(("S1", "85255311111")), account_id=None),
        pusher.submit(_receipts(("S2", "85255311111"), ("S2", POISON)), account_id=None),
        pusher.submit(_receipts(("S3", "85255311111")), account_id=None),
    ]
    wait_for(lambda: pusher.waiting() == len(group), timeout=WAIT)
    gate.open.set()
    assert _results([first, *group]) == [
        {"stored": 1},
        {"stored": 1},
        {"stored": 1, "refused": 1},
        {"stored": 1},
    ]
    assert set(stored_receipts()) == {(f"S{i}", "85255311111") for i in range(4)}
    # The group, refused; then each push alone, the refused one halved to its bad receipt.
    assert recorded[1] == ["S1", "S2", "S3"]
    assert recorded[2:] == [["S1"], ["S2"], ["S2"], ["S2"], ["S3"]]


def test_stopping_writes_what_was_handed_over(recorded: list[list[str]]) -> None:
    track({"account_id": 1, "session_no": "S0"}, {"account_id": 1, "session_no": "S1"})
    gate = Gate()
    pusher = PushWriter(session_factory=gate, clock=lambda: PUSHED)
    first = _hold_first(pusher, gate, "S0")
    second = pusher.submit(_receipts(("S1", "85255311111")), account_id=None)
    stopping = threading.Thread(target=pusher.stop)
    stopping.start()
    gate.open.set()
    stopping.join(WAIT)
    assert not stopping.is_alive()
    assert _results([first, second]) == [{"stored": 1}] * 2
    assert _committed() == {"S0", "S1"}


def test_over_http_a_failed_group_is_answered_503_to_each_push_and_the_others_200(
    database: str, configure: Configure
) -> None:
    track(*({"account_id": 1, "session_no": f"S{i}"} for i in range(4)))
    configure(RECEIPTS_DATABASE_URL=database, RECEIPTS_CALLBACK_TOKEN=TOKEN)
    gate = Gate()
    app = create_app(load_settings(), session_factory=gate, clock=lambda: PUSHED)
    running = Running(app, free_port()).start()
    writer = app.state.receiver.writer

    at = int(PUSHED.timestamp())

    def send(session_no: str) -> tuple[int, int]:
        answer = running.post(
            {"MsgType": 2, "Data": [report(session_no, "85255311111", "Success", ReceiptTime=at)]}
        )
        return answer.status_code, answer.json()["code"]

    try:
        with ThreadPoolExecutor(4) as pool:
            gate.open.clear()
            first = pool.submit(send, "S0")
            assert gate.holding.wait(WAIT)
            group = [pool.submit(send, f"S{i}") for i in (1, 2, 3)]
            wait_for(lambda: writer.waiting() == len(group), timeout=WAIT)
            assert not any(f.done() for f in [first, *group]), "answered before the commit"
            lost = sa_exc.OperationalError("COMMIT", {}, Exception("server closed the connection"))
            gate.fail = (1, lost)
            gate.open.set()
            assert first.result(WAIT) == (200, 0)
            assert [f.result(WAIT) for f in group] == [(503, 503)] * 3
            assert _committed() == {"S0"}
            # Uspeedo's retries of the three are taken.
            assert list(pool.map(send, ["S1", "S2", "S3"])) == [(200, 0)] * 3
        assert _committed() == {"S0", "S1", "S2", "S3"}
        running.flush()
        with db.read_scope() as session:
            counts = {
                (r.metric, r.label): r.value for r in session.execute(sa.select(push_counts_table))
            }
        assert (counts[("requests", "ok")], counts[("requests", "unavailable")]) == (4, 3)
        assert counts[("receipts", "stored")] == 4
        assert counts[("latency_count", "")] == 4
    finally:
        gate.open.set()
        running.stop()


def test_under_load_the_writer_waits_a_moment_for_the_pushes_on_their_way(
    recorded: list[list[str]],
) -> None:
    """A push that arrives within the linger after a transaction ended joins the next group
    instead of being written alone; an idle writer writes a push at once, whatever its
    linger."""
    track(*({"account_id": 1, "session_no": f"L{i}"} for i in range(4)))
    gate = Gate()
    # A long linger (the writer waits it out: the group is not full), so that the test's own
    # submit lands within it however slow the machine.
    pusher = PushWriter(session_factory=gate, clock=lambda: PUSHED, linger=3.0, busy_within=WAIT)
    try:
        first = _hold_first(pusher, gate, "L0")
        second = pusher.submit(_receipts(("L1", "85255311111")), account_id=None)
        wait_for(lambda: pusher.waiting() == 1, timeout=WAIT)
        gate.open.set()
        assert _results([first]) == [{"stored": 1}]
        # The writer now lingers with L1 waiting: L2 joins it.
        third = pusher.submit(_receipts(("L2", "85255311111")), account_id=None)
        assert _results([second, third]) == [{"stored": 1}] * 2
    finally:
        gate.open.set()
        pusher.stop()
    assert recorded == [["L0"], ["L1", "L2"]]

    idle = PushWriter(session_factory=gate, clock=lambda: PUSHED, linger=60.0, busy_within=0.0)
    try:
        # Settled well before the linger would have ended: written at once.
        settled = idle.submit(_receipts(("L3", "85255311111")), account_id=None).result(WAIT)
        assert settled["stored"] == 1
    finally:
        idle.stop()
