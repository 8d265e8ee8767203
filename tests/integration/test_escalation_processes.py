"""Escalation with real ``receipts worker`` and ``receipts beat`` processes on PostgreSQL and a
private Redis, timings scaled to seconds: escalations reach a real receiver once each (down at
first, or up), and a stopped beat shows in the stale view within two ticks."""

from __future__ import annotations

import itertools
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.support.databases import Configure
from tests.support.factories import queued_webhooks, stored_sessions
from tests.support.processes import processes, wait_for
from tests.support.receiver import SECRET, Hit, Receiver
from tests.support.views import clock_stopped, tick_heartbeat
from worker import db, track_many
from worker.models import sessions_table
from worker.simulator import Simulator

# --- real processes ---------------------------------------------------------------------

TICK = 1.0
CUTOFF = 5.0
SLACK = 1.0  # scheduling and network latency on loopback
RECEIVER_DOWN_FOR = 3.0  # seconds after the cutoff
PROCESS_TIMINGS = {
    "RECEIPTS_TICK": "1",
    "RECEIPTS_FIRST_POLL_DELAY": "1",
    "RECEIPTS_POLL_INTERVAL_MIN": "1",
    "RECEIPTS_POLL_INTERVAL_MAX": "2",
    "RECEIPTS_CUTOFF": "5",
    "RECEIPTS_POLL_BUDGET": "2",
    "RECEIPTS_WEBHOOK_TIMEOUT": "1",
}


def _process_env(pg: str, broker: str, api_url: str, **extra: str) -> dict[str, str]:
    return {
        **PROCESS_TIMINGS,
        "RECEIPTS_DATABASE_URL": pg,
        "RECEIPTS_BROKER_URL": broker,
        "RECEIPTS_API_URL": api_url,
        "RECEIPTS_ACCESS_KEY_ID": "demo",
        "RECEIPTS_ACCESS_KEY_SECRET": "demo-secret",
        **extra,
    }


def _count_pending() -> int:
    with db.session_scope() as session:
        query = sa.select(sa.func.count()).where(sessions_table.c.state == "pending")
        return session.scalar(query) or 0


@contextmanager
def _clock_running(configure: Configure, env: dict[str, str], folder: Path) -> Iterator[Any]:
    """One worker and one beat, yielded once the first tick has been processed."""
    configure(**env)
    with processes(env, folder) as group:
        group.worker()
        group.beat()
        wait_for(lambda: tick_heartbeat() is not None, timeout=20, describe=group.logs)
        yield group


def _ticks_after(mark: datetime, ticks: int) -> Callable[[], bool]:
    def passed() -> bool:
        beat = tick_heartbeat()
        return beat is not None and beat >= mark + timedelta(seconds=ticks * TICK)

    return passed


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.parametrize("receiver_down_first", [True, False], ids=["receiver-down", "receiver-up"])
def test_escalations_reach_a_real_receiver_once_each(
    configure: Configure, pg: str, broker: str, tmp_path: Path, receiver_down_first: bool
) -> None:
    with Simulator(step=0.5, seed=5) as sim, Receiver() as receiver:
        env = _process_env(
            pg,
            broker,
            sim.url,
            RECEIPTS_ESCALATION_WEBHOOK_URL=receiver.url,
            RECEIPTS_WEBHOOK_SECRET=SECRET,
        )
        with _clock_running(configure, env, tmp_path) as group:
            # Sent once the clock runs, so that every time below is measured from the cutoff.
            sent = time.time()
            cutoff = sent + CUTOFF
            up_at = cutoff + RECEIVER_DOWN_FOR if receiver_down_first else sent
            receiver.up_at = up_at
            sessions = {f"NEVER-{i:02d}": "never" for i in range(10)}
            sessions |= {f"QUICK-{i:02d}": "quick_success" for i in range(10)}
            phones = {no: [f"+8525531{i:04d}"] for i, no in enumerate(sessions)}
            sim.register(
                {
                    "account_id": 1,
                    "session_no": no,
                    "phones": phones[no],
                    "scenario": scenario,
                    "sent_at": sent,
                }
                for no, scenario in sessions.items()
            )
            track_many(
                {
                    "account_id": 1,
                    "session_no": no,
                    "phones": phones[no],
                    "sent_at": datetime.fromtimestamp(sent, UTC),
                }
                for no in sessions
            )
            never = {f"escalation-1-{no}" for no, s in sessions.items() if s == "never"}

            def delivered() -> set[str | None]:
                return {h.delivery_id for h in receiver.hits() if h.ok}

            wait_for(
                lambda: _count_pending() == 0 and delivered() >= never,
                timeout=25,
                describe=lambda: (
                    f"{_count_pending()} pending, delivered {sorted(map(str, delivered()))}\n"
                    f"{group.logs()}"
                ),
            )
            # Two more ticks, each followed by a delivery run: time for a duplicate to show.
            mark = tick_heartbeat()
            assert mark is not None
            wait_for(_ticks_after(mark, 2), timeout=10, describe=group.logs)

    states = {no: row["state"] for no, row in stored_sessions().items()}
    assert states == {
        no: ("escalated" if s == "never" else "resolved") for no, s in sessions.items()
    }
    hits = receiver.hits()
    by_id: dict[str, list[Hit]] = defaultdict(list)
    for hit in hits:
        # Signed by the database's clock at the attempt's claim, just before it arrived.
        assert hit.signed(), hit
        assert hit.signed_at is not None and abs(hit.signed_at - hit.at) < 30, hit
        assert hit.event == "session.escalated"
        assert hit.payload["delivery_id"] == hit.delivery_id
        by_id[str(hit.delivery_id)].append(hit)
    assert set(by_id) == never, "one delivery per escalated session, none for resolved ones"
    outbox = queued_webhooks()
    for delivery_id, attempts in by_id.items():
        assert [h.ok for h in attempts].count(True) == 1, (delivery_id, attempts)
        assert attempts[-1].ok, "nothing is sent after the 2xx"
        row = outbox[delivery_id]
        assert row["delivered_at"] is not None
        assert row["attempts"] == len(attempts)
        assert attempts[0].at >= cutoff, "not before the cutoff"
        failures = attempts[:-1]
        success = attempts[-1]
        if not receiver_down_first:
            assert failures == []
            assert success.at <= cutoff + 2 * TICK + SLACK, (delivery_id, success.at - cutoff)
            continue
        # Attempts made while the receiver was down failed; each retry waited out its backoff
        # (one tick, doubling: worker.tasks gives it the tick as its base). Once the receiver
        # is up, the delivery comes with the first round the backoff allows: within two
        # ticks of the receiver coming up for a webhook that was not in backoff then.
        assert all(h.at < up_at for h in failures) and success.at >= up_at
        for n, (before, after) in enumerate(itertools.pairwise(attempts), 1):
            backoff = TICK * 2 ** (n - 1)
            assert after.at - before.at >= backoff - 0.01, (delivery_id, n, after.at - before.at)
        next_allowed = failures[-1].at + TICK * 2 ** (len(failures) - 1) if failures else up_at
        latest = max(up_at, next_allowed) + 2 * TICK + SLACK
        assert success.at <= latest, (delivery_id, success.at - up_at, len(failures))
    if receiver_down_first:
        assert any(len(a) > 1 for a in by_id.values()), "the receiver was really down for some"


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_a_stopped_beat_shows_in_the_stale_view_within_two_ticks(
    configure: Configure, pg: str, broker: str, tmp_path: Path
) -> None:
    # Nothing is tracked: the API is never called.
    env = _process_env(pg, broker, "http://127.0.0.1:9/api")
    with _clock_running(configure, env, tmp_path) as group:
        first = tick_heartbeat()
        assert first is not None
        ticked = _ticks_after(first, 2)

        def running_and_never_reported_stopped() -> bool:
            assert clock_stopped() == [], group.logs()
            return ticked()

        wait_for(running_and_never_reported_stopped, timeout=10, interval=0.1, describe=group.logs)

        beat = next(p for name, p in group.running if name == "beat")
        killed = time.monotonic()
        group.stop(beat, kill=True)
        deadline = killed + 2 * TICK + SLACK
        # Polled a little past the bound, so that a miss reports how late it was.
        wait_for(lambda: clock_stopped() != [], timeout=2 * TICK + SLACK + 3, interval=0.05)
        noticed = time.monotonic()
        assert noticed <= deadline, f"clock_stopped after {noticed - killed:.2f}s"
        stopped = clock_stopped()
        assert len(stopped) == 1
        assert stopped[0]["last_error"].startswith("no tick processed since")
