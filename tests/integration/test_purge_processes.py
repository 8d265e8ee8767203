"""The purge racing real worker processes (issue #12): `receipts worker` and `receipts beat` on
PostgreSQL and Redis, `receipts run` (embedded broker) on SQLite, polling the simulator,
escalating, delivering events and escalation webhooks to receivers that fail for a while,
while the test acknowledges escalations and purges with a retention of one second, batch
after batch, over and over. A first `receipts purge` process, working through a history of
finished sessions, is killed mid-batch.

What the purge deleted is recorded by triggers the test adds to its own database (a row
deleted by a transaction that rolls back leaves no record), and every event the workers
write is recorded too. Then the four rules: no deleted session was pending, or escalated
and not acknowledged; no deleted escalation webhook was undelivered; every event is still
in the history or reached the receiver; and the killed purge lost nothing it had to keep
(every session it did not delete is whole, no row lost its session), and a purge run
afterwards takes all that may go.
"""

from __future__ import annotations

import os
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.support.clock import POLICY
from tests.support.databases import Configure, pg_url
from tests.support.factories import answer, claim_due, escalate, receipt, start
from tests.support.processes import Processes, processes, wait_for
from tests.support.receiver import SECRET, Receiver
from tests.support.shared import PG_ADMIN_URL
from tests.support.views import tick_heartbeat
from worker import db, events, purge, store, track_many
from worker.config import get_settings
from worker.domain import Result
from worker.migrate import upgrade
from worker.models import (
    event_cursors_table,
    outbox_table,
    purge_counts_table,
    receipt_events_table,
    receipts_table,
    session_events_table,
    sessions_table,
)
from worker.simulator import Simulator
from worker.tracking import parse_requests, track_requests

pytestmark = [pytest.mark.slow]

OLDER_THAN = timedelta(seconds=1)  # a live session is past the retention a second after sending
# The killed purge commits a batch or more, not all of them: its batches take milliseconds, and
# the test takes a while to notice the first commit and hold the next.
OLD_SESSIONS = 40 * purge.BATCH_SIZE
OLD_ESCALATIONS = 12
LIVE = {"quick_success": 16, "submit_fail": 4, "slow_final": 4, "never": 8}
APP = "purge-under-test"  # the killed purge's connections, as pg_stat_activity names them
HISTORY = (receipts_table, receipt_events_table, session_events_table, outbox_table)

_PG_AUDIT = (
    "CREATE TABLE audit_deleted_sessions (account_id bigint, session_no text, state text, "
    "acknowledged_at timestamptz, sent_at timestamptz, deleted_at timestamptz)",
    "CREATE TABLE audit_deleted_outbox (session_no text, delivered_at timestamptz)",
    "CREATE TABLE audit_events (id bigint, session_no text)",
    """CREATE FUNCTION audit_session() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
       INSERT INTO audit_deleted_sessions VALUES (OLD.account_id, OLD.session_no, OLD.state,
           OLD.acknowledged_at, OLD.sent_at, clock_timestamp());
       RETURN OLD; END $$""",
    """CREATE FUNCTION audit_outbox() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
       INSERT INTO audit_deleted_outbox VALUES (OLD.session_no, OLD.delivered_at);
       RETURN OLD; END $$""",
    """CREATE FUNCTION audit_event() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
       INSERT INTO audit_events VALUES (NEW.id, NEW.session_no); RETURN NEW; END $$""",
    "CREATE TRIGGER audit_session BEFORE DELETE ON sms_sessions "
    "FOR EACH ROW EXECUTE FUNCTION audit_session()",
    "CREATE TRIGGER audit_outbox BEFORE DELETE ON escalation_outbox "
    "FOR EACH ROW EXECUTE FUNCTION audit_outbox()",
    # Only the receipt changes that are sent (a change that lost to the stored receipt is not).
    "CREATE TRIGGER audit_receipt_event AFTER INSERT ON sms_receipt_events "
    "FOR EACH ROW WHEN (NEW.applied) EXECUTE FUNCTION audit_event()",
    "CREATE TRIGGER audit_session_event AFTER INSERT ON sms_session_events "
    "FOR EACH ROW EXECUTE FUNCTION audit_event()",
)
_SQLITE_AUDIT = (
    "CREATE TABLE audit_deleted_sessions (account_id, session_no, state, acknowledged_at, "
    "sent_at, deleted_at)",
    "CREATE TABLE audit_deleted_outbox (session_no, delivered_at)",
    "CREATE TABLE audit_events (id, session_no)",
    # The stored form of worker.models.UTCDateTime on SQLite: naive UTC text.
    """CREATE TRIGGER audit_session BEFORE DELETE ON sms_sessions BEGIN
       INSERT INTO audit_deleted_sessions VALUES (OLD.account_id, OLD.session_no, OLD.state,
           OLD.acknowledged_at, OLD.sent_at, strftime('%Y-%m-%d %H:%M:%f', 'now')); END""",
    """CREATE TRIGGER audit_outbox BEFORE DELETE ON escalation_outbox BEGIN
       INSERT INTO audit_deleted_outbox VALUES (OLD.session_no, OLD.delivered_at); END""",
    """CREATE TRIGGER audit_receipt_event AFTER INSERT ON sms_receipt_events
       WHEN NEW.applied BEGIN INSERT INTO audit_events VALUES (NEW.id, NEW.session_no); END""",
    """CREATE TRIGGER audit_session_event AFTER INSERT ON sms_session_events BEGIN
       INSERT INTO audit_events VALUES (NEW.id, NEW.session_no); END""",
)


@pytest.fixture(
    params=[
        pytest.param("postgres", marks=[pytest.mark.postgres, pytest.mark.redis]),
        "sqlite",
    ]
)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(backend, URL) of a database of this test's own, migrated, with the audit triggers:
    they stay out of the run's shared databases."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'receipts.db'}"
        upgrade(url)
        _audit(url, _SQLITE_AUDIT)
        yield "sqlite", url
        return
    name = f"receipts_test_purge_{secrets.token_hex(4)}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        url = pg_url(name)
        upgrade(url)
        _audit(url, _PG_AUDIT)
        yield "postgres", url
    finally:
        db.reset_engine()
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _audit(url: str, statements: tuple[str, ...]) -> None:
    engine = db.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.begin() as connection:
        for statement in statements:
            connection.exec_driver_sql(statement)
    engine.dispose()


def _utc(value: Any) -> datetime | None:
    """A timestamp the audit tables hold: a datetime (PostgreSQL) or naive UTC text (SQLite)."""
    if value is None:
        return None
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _rows(query: str) -> list[Any]:
    with db.read_scope() as session:
        return list(session.execute(sa.text(query)))


def _scalar(query: Any) -> int:
    # Reads take no write lock: on SQLite they do not wait for a purge's batch.
    with db.read_scope() as session:
        return int(session.scalar(query) or 0)


def _seed_old(sent_at: datetime) -> None:
    """Finished sessions sent a day ago, written by the store as the workers write them:
    tracked, polled once and resolved (two phones each); and escalations, two thirds of them
    acknowledged, a third of those with their webhook still undelivered (the workers deliver
    it during the run). Every event of them is delivered: the cursor is put after them."""
    rows = [
        {
            "account_id": 1 + i % 2,
            "session_no": f"OLD-{i:05d}",
            "phones": [f"+8525531{i:05d}{k}" for k in range(2)],
            "sent_at": sent_at,
        }
        for i in range(OLD_SESSIONS)
    ]
    with db.session_scope() as session:
        track_requests(session, parse_requests(rows, now=sent_at), policy=POLICY, now=sent_at)
    at = sent_at + POLICY.first_delay
    for account_id in (1, 2):
        for _ in range(OLD_SESSIONS):  # bounded: one claim of 100 at a time until none is due
            claimed = claim_due(account_id, at)
            if claimed is None:
                break
            targets = start(claimed, at)
            receipts = [
                receipt(t.session_no, p, Result.SUCCESS, at) for t in targets for p in t.phones
            ]
            answer(targets, receipts, at)
    escalated = [f"OLD-ESC-{i:02d}" for i in range(OLD_ESCALATIONS)]
    with db.session_scope() as session:
        requests = parse_requests(
            [
                {"account_id": 3, "session_no": s, "phones": ["+85255310000"], "sent_at": sent_at}
                for s in escalated
            ],
            now=sent_at,
        )
        track_requests(session, requests, policy=POLICY, now=sent_at)
    escalate(sent_at + POLICY.cutoff + timedelta(minutes=1))
    acknowledged = escalated[: OLD_ESCALATIONS * 2 // 3]
    with db.session_scope() as session:
        store.acknowledge(session, acknowledged, now=sent_at + POLICY.cutoff + timedelta(hours=1))
        session.execute(
            sa.update(outbox_table)
            .where(outbox_table.c.session_no.not_in(acknowledged[: OLD_ESCALATIONS // 3]))
            .values(delivered_at=sent_at + POLICY.cutoff + timedelta(minutes=2))
        )
        events.sync_destinations(session, ["webhook"])
        top = events.last_event_id(session)
        session.execute(sa.update(event_cursors_table).values(delivered_id=top, safe_id=top))
        # Delivered by definition: the events audited are the ones written from now on.
        session.execute(sa.text("DELETE FROM audit_events"))


def _whole_counts() -> dict[str, tuple[int, ...]]:
    """Rows of each session in every table that holds rows of it."""
    counts: dict[str, list[int]] = {}
    with db.read_scope() as session:
        names = list(session.scalars(sa.select(sessions_table.c.session_no)))
        counts = {name: [0] * len(HISTORY) for name in names}
        for index, table in enumerate(HISTORY):
            query = sa.select(table.c.session_no, sa.func.count()).group_by(table.c.session_no)
            for name, count in session.execute(query):
                counts.setdefault(name, [0] * len(HISTORY))[index] = int(count)
    return {name: tuple(values) for name, values in counts.items()}


def _broken(before: dict[str, tuple[int, ...]]) -> list[tuple[str, tuple[int, ...]]]:
    """The sessions still stored whose rows differ from ``before``: part of them deleted."""
    now = _whole_counts()
    return [(name, now[name]) for name, counts in before.items() if now.get(name, counts) != counts]


def _orphans() -> dict[str, int]:
    found = {}
    for table in HISTORY:
        found[table.name] = _scalar(
            sa.select(sa.func.count())
            .select_from(table)
            .where(
                ~sa.exists().where(
                    sessions_table.c.account_id == table.c.account_id,
                    sessions_table.c.session_no == table.c.session_no,
                )
            )
        )
    return found


def _purged_sessions() -> int:
    return _scalar(
        sa.select(purge_counts_table.c.purged).where(
            purge_counts_table.c.table_name == sessions_table.name
        )
    )


@dataclass
class PurgeLoop:
    """Purges (retention one second) one after the other in a thread of the test, until
    stopped: each run's end time and report."""

    destinations: tuple[str, ...]
    runs: list[tuple[float, purge.PurgeReport]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                report = purge.purge(
                    db.session_scope,
                    now=datetime.now(UTC),
                    older_than=OLDER_THAN,
                    destinations=self.destinations,
                    # Small batches: many more transactions interleave with the workers'.
                    batch_size=50,
                )
            except BaseException as exc:  # reported by the test
                self.errors.append(exc)
                return
            self.runs.append((time.monotonic(), report))
            self.stop.wait(0.2)

    def completed_since(self, moment: float) -> int:
        return sum(1 for ended, _ in self.runs if ended > moment)


def _kill_mid_batch(group: Processes, name: str, kind: str) -> None:
    """Start `receipts purge`, and kill it (SIGKILL, its whole group) once a batch has
    committed, in the middle of another. On PostgreSQL, exactly at its last statement, the
    ``DELETE`` of the sessions, after the deletions of their receipts, history and webhooks:
    the test holds a lock on the audit table that statement's trigger writes to. On SQLite
    (one writer, nothing to hold it with) at once after the first commit, while the next
    batch runs."""
    process = group.start(name, "purge", "--older-than", "1", env={"PGAPPNAME": APP})
    wait_for(
        lambda: _purged_sessions() > 0 or process.poll() is not None,
        timeout=60,
        interval=0.02,
        describe=lambda: group.tail(name),
    )
    assert process.poll() is None, f"the purge ended before it could be killed:\n{group.tail(name)}"
    if kind != "postgres":
        os.killpg(process.pid, signal.SIGKILL)
    else:
        with db.get_engine().connect() as holder, holder.begin():
            holder.execute(sa.text("LOCK TABLE audit_deleted_sessions IN EXCLUSIVE MODE"))
            waiting = sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = :app "
                "AND wait_event_type = 'Lock' AND query LIKE 'DELETE FROM sms_sessions%'"
            ).bindparams(app=APP)
            wait_for(
                lambda: _scalar(waiting) > 0 or process.poll() is not None,
                timeout=60,
                interval=0.05,
                describe=lambda: group.tail(name),
            )
            assert process.poll() is None, "the purge ended before its DELETE was held"
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        # Until PostgreSQL has noticed and rolled the batch back.
        gone = sa.text("SELECT count(*) FROM pg_stat_activity WHERE application_name = :app")
        wait_for(lambda: _scalar(gone.bindparams(app=APP)) == 0, timeout=30)
    process.wait(10)
    # Dead on purpose: no longer one of the processes that must stay alive.
    group.running = [(n, p) for n, p in group.running if p is not process]


def test_a_purge_racing_real_workers_keeps_what_it_must(
    backend: tuple[str, str],
    configure: Configure,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    kind, url = backend
    events_receiver = Receiver(status=500)
    webhook_receiver = Receiver(status=500)
    with Simulator(step=0.5, seed=3) as sim:
        env = {
            "RECEIPTS_DATABASE_URL": url,
            "RECEIPTS_API_URL": sim.url,
            "RECEIPTS_ACCESS_KEY_ID": "demo",
            "RECEIPTS_ACCESS_KEY_SECRET": "demo-secret",
            "RECEIPTS_TICK": "0.5",
            "RECEIPTS_FIRST_POLL_DELAY": "1",
            "RECEIPTS_POLL_INTERVAL_MIN": "1",
            "RECEIPTS_POLL_INTERVAL_MAX": "2",
            "RECEIPTS_CUTOFF": "6",
            "RECEIPTS_POLL_BUDGET": "2",
            "RECEIPTS_WEBHOOK_TIMEOUT": "1",
            "RECEIPTS_WEBHOOK_SECRET": SECRET,
            "RECEIPTS_ESCALATION_WEBHOOK_URL": webhook_receiver.url,
            "RECEIPTS_EVENTS_WEBHOOK_URL": events_receiver.url,
            "RECEIPTS_EVENTS": "receipt.final,receipt.updated,session.resolved,session.escalated",
        }
        if kind == "postgres":
            env["RECEIPTS_BROKER_URL"] = request.getfixturevalue("broker")
        configure(**env)
        destinations = tuple(get_settings().event_destinations)
        _seed_old(datetime.now(UTC) - timedelta(days=1))
        old_counts = _whole_counts()
        loop = PurgeLoop(destinations)
        thread = threading.Thread(target=loop.run, name="purge-loop")
        try:
            with processes(env, tmp_path) as group:
                if kind == "postgres":
                    group.worker()
                    group.beat()
                else:
                    group.start("run", "run", "--concurrency", "2")
                wait_for(lambda: tick_heartbeat() is not None, timeout=60, describe=group.logs)
                live = _send_live(sim)

                # A crash mid-purge: the batch in progress rolls back whole.
                _kill_mid_batch(group, "purge-killed", kind)
                assert 0 < _purged_sessions() < OLD_SESSIONS
                assert _orphans() == dict.fromkeys(_orphans(), 0)
                assert _broken(old_counts) == []
                thread.start()
                _race(loop, live, events_receiver, webhook_receiver, group)
                loop.stop.set()
                thread.join(timeout=60)
                assert not thread.is_alive() and not loop.errors, loop.errors
                stopped_at = datetime.now(UTC)
            # A purge run afterwards resumes past the crash and takes all that may go.
            final = purge.purge(
                db.session_scope,
                now=datetime.now(UTC),
                older_than=OLDER_THAN,
                destinations=destinations,
            )
        finally:
            loop.stop.set()
            if thread.is_alive():
                thread.join(timeout=60)
            events_receiver.close()
            webhook_receiver.close()

    received = {
        int(event["id"])
        for hit in events_receiver.hits()
        if hit.ok
        for event in hit.payload["events"]
    }
    _check_the_rules(received)
    assert _orphans() == dict.fromkeys(_orphans(), 0)
    # Whatever was not deleted is whole: no purge, killed or not, took part of a session.
    assert _broken(old_counts) == []
    now_counts = _whole_counts()
    unacknowledged = {
        row.session_no
        for row in _rows(
            "SELECT session_no FROM sms_sessions "
            "WHERE state = 'escalated' AND acknowledged_at IS NULL"
        )
    }
    assert set(now_counts) == unacknowledged, final
    assert unacknowledged >= {
        f"OLD-ESC-{i:02d}" for i in range(OLD_ESCALATIONS * 2 // 3, OLD_ESCALATIONS)
    }
    # The race happened: live sessions went while the workers ran.
    deleted_live = [
        row
        for row in _rows("SELECT session_no, deleted_at FROM audit_deleted_sessions")
        if row.session_no in live and _utc(row.deleted_at) < stopped_at  # type: ignore[operator]
    ]
    assert deleted_live


def _send_live(sim: Simulator) -> dict[str, str]:
    """Register and track the live sessions (accounts 5 and 6), sent now: SessionNo ->
    scenario."""
    live = {
        f"LIVE-{scenario[:5].upper()}-{i:02d}": scenario
        for scenario, count in LIVE.items()
        for i in range(count)
    }
    phones = {no: [f"+8525532{n:03d}{k}" for k in range(1 + n % 2)] for n, no in enumerate(live)}
    sent = time.time()
    sim.register(
        {
            "account_id": 5 + n % 2,
            "session_no": no,
            "phones": phones[no],
            "scenario": scenario,
            "sent_at": sent,
        }
        for n, (no, scenario) in enumerate(live.items())
    )
    track_many(
        {
            "account_id": 5 + n % 2,
            "session_no": no,
            "phones": phones[no],
            "sent_at": datetime.fromtimestamp(sent, UTC),
        }
        for n, no in enumerate(live)
    )
    return live


def _present(names: set[str]) -> set[str]:
    with db.read_scope() as session:
        return set(
            session.scalars(
                sa.select(sessions_table.c.session_no).where(sessions_table.c.session_no.in_(names))
            )
        )


def _race(
    loop: PurgeLoop,
    live: dict[str, str],
    events_receiver: Receiver,
    webhook_receiver: Receiver,
    group: Processes,
) -> None:
    """While the purges run: the events receiver fails until purges have run over resolved
    sessions whose events it has not taken (and kept them); the escalation receiver fails
    until purges have run over acknowledged escalations whose webhook it has not taken (and
    kept them). Half the live escalations are acknowledged, the other half never."""
    never = sorted(no for no, scenario in live.items() if scenario == "never")
    to_acknowledge = never[: len(never) // 2]
    finished = {no for no, scenario in live.items() if scenario in ("quick_success", "submit_fail")}

    def resolved_and_kept() -> bool:
        with db.read_scope() as session:
            resolved = set(
                session.scalars(
                    sa.select(sessions_table.c.session_no).where(
                        sessions_table.c.session_no.in_(finished),
                        sessions_table.c.state == "resolved",
                    )
                )
            )
        return len(resolved) == len(finished)

    wait_for(resolved_and_kept, timeout=30, describe=group.logs)
    moment = time.monotonic()
    wait_for(lambda: loop.completed_since(moment) >= 2, timeout=30, describe=lambda: str(loop))
    # Resolved, past the retention, their events undelivered: every one kept.
    assert _present(finished) == finished
    events_receiver.status = 200

    def escalated() -> bool:
        with db.read_scope() as session:
            count = session.scalar(
                sa.select(sa.func.count()).where(
                    sessions_table.c.session_no.in_(never), sessions_table.c.state == "escalated"
                )
            )
        return count == len(never)

    wait_for(escalated, timeout=30, describe=group.logs)
    with db.session_scope() as session:
        store.acknowledge(session, to_acknowledge, now=datetime.now(UTC))
    moment = time.monotonic()
    wait_for(lambda: loop.completed_since(moment) >= 2, timeout=30, describe=lambda: str(loop))
    # Acknowledged, past the retention, their webhooks undelivered: every one kept.
    assert _present(set(never)) == set(never)
    undelivered = _scalar(
        sa.select(sa.func.count())
        .select_from(outbox_table)
        .where(outbox_table.c.session_no.in_(to_acknowledge), outbox_table.c.delivered_at.is_(None))
    )
    assert undelivered == len(to_acknowledge)
    webhook_receiver.status = 200

    def settled() -> bool:
        pending = _scalar(sa.select(sa.func.count()).where(sessions_table.c.state == "pending"))
        webhooks = _scalar(
            sa.select(sa.func.count())
            .select_from(outbox_table)
            .where(outbox_table.c.delivered_at.is_(None))
        )
        top = max(
            (int(row.id) for row in _rows("SELECT max(id) AS id FROM audit_events") if row.id),
            default=0,
        )
        cursor = _scalar(sa.select(event_cursors_table.c.delivered_id))
        gone = _present(set(to_acknowledge)) == set()
        return pending == 0 and webhooks == 0 and cursor >= top and gone

    wait_for(settled, timeout=40, describe=group.logs)
    group.check_alive()


def _check_the_rules(received: set[int]) -> None:
    # Never a pending session, never an unacknowledged escalation, never a session within
    # the retention.
    for row in _rows(
        "SELECT session_no, state, acknowledged_at, sent_at, deleted_at FROM audit_deleted_sessions"
    ):
        assert row.state == "resolved" or (
            row.state == "escalated" and row.acknowledged_at is not None
        ), row
        assert _utc(row.sent_at) < _utc(row.deleted_at) - OLDER_THAN, row  # type: ignore[operator]
    # Never an undelivered escalation webhook.
    assert [
        tuple(r) for r in _rows("SELECT * FROM audit_deleted_outbox WHERE delivered_at IS NULL")
    ] == []
    # Never an undelivered event: each is still in the history, or its destination has it.
    with db.read_scope() as session:
        kept = set(session.scalars(sa.select(receipt_events_table.c.id))) | set(
            session.scalars(sa.select(session_events_table.c.id))
        )
    written = {int(row.id) for row in _rows("SELECT id FROM audit_events")}
    assert written
    assert written - kept - received == set()
    assert written - kept, "some events were delivered and purged"
