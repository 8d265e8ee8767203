"""Credentials that go bad under a running ``receipts worker`` and ``receipts beat`` (the key is
revoked at Uspeedo: the simulator comes back on the same port with another secret), on both
backends: the worker logs the refusal as an ERROR line with the hint (at most once a minute
per pool process, however many polls are refused), ``receipts_credentials_failing`` is 1, and
``receipts stale`` and the ``stale_sessions`` view show a ``credentials`` row. The sessions keep
being polled; once the key works again they resolve, and the row and the metric clear."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support.cli import invoke, ok
from tests.support.databases import FAST_TIMINGS, Configure
from tests.support.factories import stored_sessions
from tests.support.processes import processes, wait_for
from tests.support.servers import free_port
from tests.support.views import credentials_refused, gauge
from worker import db, track_many
from worker.models import heartbeats_table
from worker.simulator import Simulator

pytestmark = [pytest.mark.slow, pytest.mark.redis]

RIGHT = "demo-secret"
REVOKED = "rotated-at-uspeedo"
HINT = (
    "the AccessKey id/secret is wrong or expired: check RECEIPTS_ACCESS_KEY_ID and "
    "RECEIPTS_ACCESS_KEY_SECRET"
)
CONCURRENCY = 2
# Three accounts: three polls an interval, so that refusals outnumber the ERROR lines.
SESSIONS = [(account, f"CRED-{account}") for account in (1, 2, 3)]
PHONE = "(852)55311111"


class Api:
    """The simulator on one port, started again with another secret as a key is revoked or
    restored (sessions registered again, with the times they were sent at)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.sent_at: float | None = None
        self.sim = self._start(RIGHT)

    @property
    def url(self) -> str:
        return self.sim.url

    def _start(self, secret: str) -> Simulator:
        sim = Simulator(port=self.port, access_key_secret=secret, step=0.2, seed=9)
        if self.sent_at is not None:
            sim.register(
                {
                    "account_id": account,
                    "session_no": number,
                    "phones": [PHONE],
                    "scenario": "quick_success",
                    "sent_at": self.sent_at,
                }
                for account, number in SESSIONS
            )
        return sim.start()

    def restart(self, secret: str) -> None:
        self.sim.stop()
        self.sim = self._start(secret)

    def refused(self) -> int:
        return sum(1 for call in self.sim.calls() if call["outcome"] == "auth")


@contextmanager
def _api() -> Iterator[Api]:
    api = Api()
    try:
        yield api
    finally:
        api.sim.stop()


def _ticked() -> bool:
    with db.session_scope() as session:
        query = sa.select(heartbeats_table.c.beat_at).where(heartbeats_table.c.name == "tick")
        return session.scalar(query) is not None


def _states() -> dict[str, str]:
    return {number: row["state"] for number, row in stored_sessions().items()}


def _stale_kinds() -> list[str]:
    return sorted(r["kind"] for r in json.loads(ok(invoke("stale", "--json")).stdout))


def test_credentials_that_go_bad_while_running_show_until_they_work_again(
    database: str, broker: str, configure: Configure, tmp_path: Path
) -> None:
    with _api() as api:
        env = {
            **FAST_TIMINGS,
            "RECEIPTS_CUTOFF": "60",
            "RECEIPTS_POLL_BUDGET": "2",
            "RECEIPTS_API_CONNECT_TIMEOUT": "1",
            "RECEIPTS_API_READ_TIMEOUT": "1",
            "RECEIPTS_DATABASE_URL": database,
            "RECEIPTS_BROKER_URL": broker,
            "RECEIPTS_API_URL": api.url,
            "RECEIPTS_ACCESS_KEY_ID": "demo",
            "RECEIPTS_ACCESS_KEY_SECRET": RIGHT,
        }
        configure(**env)
        with processes(env, tmp_path) as group:
            group.worker(concurrency=CONCURRENCY)
            group.beat()
            wait_for(_ticked, timeout=60, describe=group.logs)

            # The key is revoked at Uspeedo, then sessions are sent.
            api.sent_at = time.time()
            api.restart(REVOKED)
            track_many(
                {
                    "account_id": account,
                    "session_no": number,
                    "phones": [PHONE],
                    "sent_at": datetime.fromtimestamp(api.sent_at, UTC),
                }
                for account, number in SESSIONS
            )
            wait_for(
                lambda: api.refused() >= 4 * CONCURRENCY,
                timeout=40,
                describe=lambda: f"{api.refused()} refused\n{group.logs()}",
            )
            [row] = credentials_refused()
            assert "RetCode 215398 'Failed to parse token'" in row["last_error"]
            assert _stale_kinds() == ["credentials"]
            assert gauge("receipts_credentials_failing") == 1
            sessions = stored_sessions()
            assert {r["state"] for r in sessions.values()} == {"pending"}
            assert max(r["poll_count"] for r in sessions.values()) >= 2, "polled again"
            group.check_alive()

            # The key works again: every session resolves, the refusal clears.
            api.restart(RIGHT)
            wait_for(
                lambda: set(_states().values()) == {"resolved"},
                timeout=40,
                describe=lambda: f"{_states()}\n{group.logs()}",
            )
            assert credentials_refused() == []
            assert _stale_kinds() == []
            assert gauge("receipts_credentials_failing") == 0
            log = group.tail("worker", chars=1_000_000)
    refusals = [
        line for line in log.splitlines() if "ERROR/" in line and "refused the credentials" in line
    ]
    # Once a minute per pool process at most, however many polls were refused.
    assert 1 <= len(refusals) <= CONCURRENCY, "\n".join(refusals)
    assert all(HINT in line for line in refusals)
    assert "WARNING/ForkPoolWorker" in log  # the client's attempt lines, each with its uuid
    assert not [line for line in log.splitlines() if "poll of " in line and "215398" in line]
    assert REVOKED not in log and RIGHT not in log
