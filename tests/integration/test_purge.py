"""Retention: ``worker/purge.py`` and ``receipts purge``, at function level with an injected
clock, on PostgreSQL and SQLite (two purges at once on PostgreSQL, which has row locks). What is
never deleted (pending, unacknowledged escalations, undelivered events and webhooks), the dry
run, batches, a purge interrupted between batches, and the command's one-line errors."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from tests.support.cli import invoke, ok
from tests.support.clock import POLICY, T0
from tests.support.factories import P1, escalate, poll, receipt, track
from tests.support.threads import at_once
from worker import db, events, purge, store
from worker.domain import Result
from worker.models import (
    event_cursors_table,
    inbox_table,
    outbox_table,
    parked_batches_table,
    receipt_events_table,
    receipts_table,
    session_events_table,
    sessions_table,
)

FIRST = T0 + POLICY.first_delay
MINUTE = timedelta(minutes=1)
LATE = T0 + POLICY.cutoff + timedelta(minutes=1)
RETENTION = timedelta(days=90)
NOW = T0 + timedelta(days=91)
TABLES = (
    sessions_table,
    receipts_table,
    receipt_events_table,
    session_events_table,
    inbox_table,
    outbox_table,
)


def resolved(*session_nos: str, account_id: int = 1) -> None:
    """Sessions of one phone each, resolved by one poll (history: a receipt change and a
    session event each)."""
    track(*({"account_id": account_id, "session_no": s, "phones": [P1]} for s in session_nos))
    poll(account_id, [receipt(s, P1, Result.SUCCESS, FIRST) for s in session_nos], FIRST)


def escalated(*session_nos: str, acknowledged: bool, delivered: bool = True) -> None:
    """Sessions escalated at LATE (webhook queued, and delivered unless told), acknowledged
    or not."""
    track(*({"account_id": 2, "session_no": s, "phones": [P1]} for s in session_nos))
    escalate(LATE)
    with db.session_scope() as session:
        if delivered:
            session.execute(sa.update(outbox_table).values(delivered_at=LATE))
        if acknowledged:
            store.acknowledge(session, list(session_nos), now=LATE, account_id=2)


def rows(*session_nos: str) -> dict[str, int]:
    """Rows of these sessions in each table."""
    counts = {}
    with db.session_scope() as session:
        for table in TABLES:
            counts[table.name] = int(
                session.scalar(
                    sa.select(sa.func.count())
                    .select_from(table)
                    .where(table.c.session_no.in_(session_nos))
                )
                or 0
            )
    return counts


def remaining() -> set[str]:
    with db.session_scope() as session:
        return set(session.scalars(sa.select(sessions_table.c.session_no)))


def run(
    *, destinations: tuple[str, ...] = (), batch_size: int = 1000, now: Any = NOW
) -> purge.PurgeReport:
    return purge.purge(
        db.session_scope,
        now=now,
        older_than=RETENTION,
        destinations=destinations,
        batch_size=batch_size,
    )


def set_cursor(destination: str, delivered_id: int) -> None:
    with db.session_scope() as session:
        events.sync_destinations(session, [destination])
        session.execute(
            sa.update(event_cursors_table)
            .where(event_cursors_table.c.destination == destination)
            .values(delivered_id=delivered_id)
        )


def top_event_id(*session_nos: str) -> int:
    with db.session_scope() as session:
        return max(
            int(
                session.scalar(
                    sa.select(sa.func.coalesce(sa.func.max(t.c.id), 0)).where(
                        t.c.session_no.in_(session_nos)
                    )
                )
                or 0
            )
            for t in (receipt_events_table, session_events_table)
        )


@pytest.mark.usefixtures("database")
class TestWhatGoes:
    def test_a_finished_session_goes_with_everything_it_left(self) -> None:
        resolved("R")
        escalated("E", acknowledged=True)
        with db.session_scope() as session:
            for account_id, sn in ((1, "R"), (2, "E"), (3, "R")):
                session.execute(
                    sa.insert(inbox_table).values(
                        session_no=sn,
                        account_id=account_id,
                        phone=P1,
                        phone_key="85255311111",
                        result="Success",
                        reason="untracked",
                        received_at=FIRST,
                    )
                )
        before = rows("R", "E")
        assert before["sms_receipt_events"] and before["sms_session_events"]
        assert before["escalation_outbox"] and before["sms_receipts"]
        report = run()
        assert report.sessions == 2
        assert remaining() == set()
        after = rows("R", "E")
        # The inbox row of another account's "R" is not this session's.
        assert after == {**dict.fromkeys(after, 0), "sms_receipt_inbox": 1}
        assert report.history == before["sms_receipt_events"] + before["sms_session_events"]
        assert run().sessions == 0  # idempotent

    def test_not_before_the_retention(self) -> None:
        resolved("R")
        assert run(now=T0 + timedelta(days=89)).sessions == 0
        assert remaining() == {"R"}

    def test_never_a_pending_session(self) -> None:
        track({"account_id": 1, "session_no": "P", "phones": [P1]})
        resolved("R")
        run()
        assert remaining() == {"P"}

    def test_never_an_unacknowledged_escalation(self) -> None:
        escalated("U", acknowledged=False)
        run()
        assert remaining() == {"U"}

    def test_never_an_undelivered_escalation_webhook(self) -> None:
        escalated("W", acknowledged=True, delivered=False)
        run()
        assert remaining() == {"W"}

    def test_never_an_event_a_destination_has_not_delivered(self) -> None:
        resolved("A")
        a_top = top_event_id("A")
        resolved("B", account_id=3)
        b_top = top_event_id("B")
        assert b_top > a_top
        # The webhook has delivered A's events only; the task has no cursor yet.
        set_cursor("webhook", a_top)
        run(destinations=("webhook", "task"))
        assert remaining() == {"A", "B"}
        set_cursor("task", b_top)
        run(destinations=("webhook", "task"))
        assert remaining() == {"B"}
        # A destination no longer configured holds nothing back.
        run(destinations=("task",))
        assert remaining() == set()

    def test_never_an_event_of_an_open_parked_batch(self) -> None:
        resolved("A")
        top = top_event_id("A")
        set_cursor("webhook", top)
        with db.session_scope() as session:
            session.execute(
                sa.insert(parked_batches_table).values(
                    destination="webhook",
                    after_id=0,
                    through_id=top,
                    events=2,
                    attempts=9,
                    first_failed_at=FIRST,
                    parked_at=FIRST,
                )
            )
        run(destinations=("webhook",))
        assert remaining() == {"A"}
        with db.session_scope() as session:
            session.execute(sa.update(parked_batches_table).values(state="dismissed"))
        run(destinations=("webhook",))
        assert remaining() == set()


@pytest.fixture
def cli_now(monkeypatch: pytest.MonkeyPatch) -> None:
    """The command's now (the database's clock) is NOW: no test depends on today's date."""
    monkeypatch.setattr("worker.runtime.utcnow", lambda: NOW)


@pytest.mark.usefixtures("database", "cli_now")
def test_dry_run_counts_by_state_and_month_and_deletes_nothing() -> None:
    resolved("R1", "R2")
    october = T0 - timedelta(days=40)
    track({"account_id": 1, "session_no": "OCT", "phones": [P1], "sent_at": october}, now=october)
    first = october + POLICY.first_delay
    poll(1, [receipt("OCT", P1, Result.FAIL, first)], first)
    escalated("E", acknowledged=True)
    escalated("U", acknowledged=False)
    before = rows("R1", "R2", "OCT", "E", "U")
    with db.read_scope() as session:
        lines = purge.dry_run(session, now=NOW, older_than=RETENTION, destinations=())
    assert [(x.state, x.month, x.sessions) for x in lines] == [
        ("resolved", "2026-10", 1),
        ("escalated", "2026-11", 1),
        ("resolved", "2026-11", 2),
    ]
    assert rows("R1", "R2", "OCT", "E", "U") == before
    result = ok(invoke("purge", "--older-than", "90d", "--dry-run"))
    assert "total: 4 session(s) would be purged" in result.output
    assert "resolved   2026-11  2 session(s)" in result.output
    assert rows("R1", "R2", "OCT", "E", "U") == before


@pytest.mark.usefixtures("database")
def test_batches_each_their_own_transaction() -> None:
    names = [f"S{i}" for i in range(7)]
    resolved(*names)
    report = run(batch_size=3)
    assert report.sessions == 7
    assert report.batches == 3
    assert remaining() == set()


@pytest.mark.usefixtures("database")
def test_bounded_run_leaves_the_rest_for_the_next() -> None:
    resolved(*(f"S{i}" for i in range(5)))
    report = purge.purge(
        db.session_scope,
        now=NOW,
        older_than=RETENTION,
        destinations=(),
        batch_size=2,
        max_sessions=3,
    )
    assert (report.sessions, report.bounded) == (3, True)
    assert len(remaining()) == 2


@pytest.mark.usefixtures("database")
def test_the_oldest_sessions_go_first() -> None:
    """A bounded run (the daily task's) leaves the newest for the next, whatever the order of
    their SessionNos: the purge walks finished sessions by sent_at (migration 0014)."""
    names = [f"S{i}" for i in range(5)]  # S0 sent last, S4 first
    track(
        *(
            {"account_id": 1, "session_no": name, "phones": [P1], "sent_at": T0 - i * MINUTE}
            for i, name in enumerate(names)
        )
    )
    poll(1, [receipt(name, P1, Result.SUCCESS, FIRST) for name in names], FIRST)
    report = purge.purge(
        db.session_scope,
        now=NOW,
        older_than=RETENTION,
        destinations=(),
        batch_size=1,
        max_sessions=3,
    )
    assert (report.sessions, report.batches) == (3, 3)
    assert remaining() == {"S0", "S1"}


@pytest.mark.usefixtures("database")
def test_a_purge_interrupted_in_its_second_batch_keeps_the_rest_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    names = [f"S{i}" for i in range(6)]
    resolved(*names)
    before = rows(*names)
    real = purge.purge_batch
    calls = 0

    def crashing(session: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        result = real(session, **kwargs)
        if calls == 2:  # after its deletions, before its commit
            raise RuntimeError("killed")
        return result

    monkeypatch.setattr(purge, "purge_batch", crashing)
    with pytest.raises(RuntimeError):
        run(batch_size=2)
    # The first batch went whole; the second rolled back whole; the rest untouched.
    assert remaining() == set(names[2:])
    assert rows(*names[2:]) == {table: count * 4 // 6 for table, count in before.items()}
    assert rows(*names[:2]) == dict.fromkeys(before, 0)
    monkeypatch.setattr(purge, "purge_batch", real)
    assert run(batch_size=2).sessions == 4
    assert remaining() == set()


def test_two_purges_at_once_delete_each_session_once(pg: str) -> None:
    names = [f"S{i:02d}" for i in range(40)]
    resolved(*names)
    track({"account_id": 1, "session_no": "P", "phones": [P1]})
    escalated("U", acknowledged=False)
    reports = at_once(lambda: run(batch_size=3), lambda: run(batch_size=3))
    assert sum(r.sessions for r in reports) == 40
    assert sum(r.receipts for r in reports) == 40
    assert remaining() == {"P", "U"}
    assert rows("P", "U")["sms_receipts"] + rows("P", "U")["sms_sessions"] == 2


def test_a_locked_session_is_skipped_not_waited_for(pg: str) -> None:
    resolved("A", "B")
    engine = db.get_engine()
    with engine.connect() as holder, holder.begin():
        holder.execute(
            sa.select(sessions_table.c.id)
            .where(sessions_table.c.session_no == "A")
            .with_for_update()
        )
        report = run()
        assert report.sessions == 1
    assert remaining() == {"A"}
    assert run().sessions == 1


@pytest.mark.usefixtures("database")
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("soon", "error: --older-than: 'soon' is not a duration"),
        ("-3d", "error: --older-than: '-3d' is not a duration"),
        ("0", "error: --older-than: '0': a duration must be positive"),
        ("99999d", "error: --older-than: '99999d' is longer than the maximum, 36500d"),
    ],
)
def test_a_bad_older_than_is_one_line(value: str, expected: str) -> None:
    result = invoke("purge", "--older-than", value)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), result.output


@pytest.mark.usefixtures("database")
def test_without_older_than_or_retention_it_says_what_to_give() -> None:
    result = invoke("purge")
    assert result.exit_code == 2
    assert result.output.strip() == (
        "error: give --older-than (e.g. 90d) or set RECEIPTS_RETENTION"
    )


@pytest.mark.usefixtures("cli_now")
def test_retention_from_the_setting_and_the_beat_schedule(database: str, configure: Any) -> None:
    from worker.celery import beat_schedule
    from worker.config import get_settings

    assert "receipts-purge" not in beat_schedule(get_settings())
    configure(RECEIPTS_RETENTION="90d")
    settings = get_settings()
    assert settings.retention == RETENTION
    assert beat_schedule(settings)["receipts-purge"]["task"] == "receipts.purge"
    resolved("R")
    result = ok(invoke("purge"))
    assert result.output.startswith("purged 1 session(s)")
    assert remaining() == set()


@pytest.mark.usefixtures("cli_now")
def test_the_daily_task_purges_only_with_a_retention(database: str, configure: Any) -> None:
    from worker import tasks

    resolved("R")
    assert tasks.purge_finished() == {"sessions": 0, "masked": 0}
    assert remaining() == {"R"}
    configure(RECEIPTS_RETENTION="90d")
    assert tasks.purge_finished() == {"sessions": 1, "masked": 0}
    assert remaining() == set()


def test_a_purge_racing_pushes_never_deletes_an_undelivered_event(pg: str) -> None:
    """Late receipts pushed to resolved sessions while a purge runs: every session whose push
    committed first keeps its new, undelivered event; one purged first takes its whole history
    with it; no history row is ever left without its session."""
    from worker import push

    names = [f"S{i:02d}" for i in range(20)]
    resolved(*names)
    delivered = top_event_id(*names)
    set_cursor("webhook", delivered)
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def pushes() -> None:
        try:
            start.wait(timeout=10)
            # From the end, while the purge walks from the start: they meet in between.
            for name in reversed(names):
                late = receipt(name, P1, Result.FAIL, FIRST + timedelta(minutes=1))
                with db.session_scope() as session:
                    push.record_push(session, [late], now=NOW, account_id=1)
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    def purging() -> None:
        try:
            start.wait(timeout=10)
            run(destinations=("webhook",), batch_size=2)
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=pushes), threading.Thread(target=purging)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    with db.session_scope() as session:
        for history in (receipt_events_table, session_events_table, receipts_table):
            orphans = session.scalar(
                sa.select(sa.func.count())
                .select_from(history)
                .where(
                    ~sa.exists().where(
                        sessions_table.c.account_id == history.c.account_id,
                        sessions_table.c.session_no == history.c.session_no,
                    )
                )
            )
            assert orphans == 0, history.name
        undelivered = set(
            session.scalars(
                sa.select(receipt_events_table.c.session_no).where(
                    receipt_events_table.c.id > delivered
                )
            )
        )
    assert undelivered <= remaining()
    # Every session is either kept whole or gone whole, and a rerun keeps what is undelivered.
    run(destinations=("webhook",))
    assert remaining() == undelivered
