"""Fault injection on the real processes: workers killed mid-batch, Redis emptied and
restarted, PostgreSQL restarted, two beats with several workers. After each run, every session
must have ended in the right state with the right receipts (compared with what the simulator
answered), no rule of the poll schedule broken, and no webhook delivered twice.

Each case is bounded (the run waits at most 90 s). They restart the machine's own Redis and
PostgreSQL with the commands from CONTRACT.md.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from tests.conftest import REDIS_URL, Configure
from tests.integration.e2e import check, run_plan
from tests.integration.harness import Processes, wait_for
from tests.integration.scenarios import Planned, plan
from worker import db
from worker.models import sessions_table
from worker.simulator import Simulator

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

STEP = 1.0
# A longer cutoff than the plain end-to-end run: every fault below happens early enough that
# a poll lost to it (held for poll budget + timeouts + interval = 6 s) is retried in time.
TIMINGS = {"RECEIPTS_CUTOFF": "16"}


class Receiver:
    """A webhook receiver on loopback that answers 200 and remembers every delivery."""

    def __init__(self) -> None:
        self.deliveries: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                outer.deliveries.append(
                    {"id": self.headers.get("X-Receipts-Delivery"), "body": json.loads(body)}
                )
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


def _durable_plan(count: int, seed: int) -> list[Planned]:
    """Every kind except ``stale_unknow``: its Success is visible for two steps only, so a
    poll that saw it and was then killed cannot be made good by a later poll; the API itself
    no longer says it. Every other scenario keeps answering what it answered."""
    return [p for p in plan(count, accounts=3, seed=seed) if p.scenario != "stale_unknow"]


def _run_and_check(
    configure: Configure,
    pg: str,
    tmp_path: Path,
    receiver: Receiver,
    planned: list[Planned],
    during: Any,
    *,
    workers: int = 2,
    beats: int = 1,
) -> tuple[Simulator, dict[str, dict[str, Any]]]:
    env = {**TIMINGS, "RECEIPTS_ESCALATION_WEBHOOK_URL": receiver.url}

    def delivered() -> bool:
        """Every escalation so far has reached the receiver (checked while workers run)."""
        with db.session_scope() as session:
            escalated = set(
                session.scalars(
                    sa.select(sessions_table.c.session_no).where(
                        sessions_table.c.state == "escalated"
                    )
                )
            )
        return {d["body"]["session_no"] for d in receiver.deliveries} >= escalated

    with Simulator(step=STEP, seed=5) as sim:
        sessions, receipts = run_plan(
            configure,
            pg,
            tmp_path,
            sim,
            planned,
            workers=workers,
            beats=beats,
            env_extra=env,
            during=during,
            settled=delivered,
            timeout=90,
        )
        check(planned, sim, sessions, receipts, env_extra=env)
        escalated = {n for n, row in sessions.items() if row["state"] == "escalated"}
        counts = Counter(d["id"] for d in receiver.deliveries)
        assert max(counts.values(), default=1) == 1, [k for k, v in counts.items() if v > 1]
        assert {d["body"]["session_no"] for d in receiver.deliveries} == escalated
    return sim, sessions


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(10)


def test_workers_killed_mid_batch_repeatedly(
    configure: Configure, pg: str, tmp_path: Path, receiver: Receiver
) -> None:
    """SIGKILL a whole worker (main process and pool children, mid-batch) every 1.5 s for the
    first 7 s, starting a fresh one each time; then let the run finish."""
    rng = random.Random(1)
    kills: list[float] = []

    def during(group: Processes, elapsed: float) -> None:
        if elapsed < 7 and elapsed > 1.5 * (len(kills) + 1):
            workers = [(n, p) for n, p in group.running if n.startswith("w") and p.poll() is None]
            _name, victim = rng.choice(workers)
            _kill_group(victim)
            kills.append(elapsed)
            group.worker(f"w-replacement-{len(kills)}")

    _run_and_check(configure, pg, tmp_path, receiver, _durable_plan(150, seed=7), during)
    assert len(kills) >= 3


def _redis_command(*args: str) -> None:
    subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", "6379", *args],
        check=False,
        capture_output=True,
        timeout=10,
    )


def _start_redis() -> None:
    os.makedirs("/var/lib/redis", exist_ok=True)
    os.makedirs("/var/log/redis", exist_ok=True)
    subprocess.run(
        [
            "redis-server",
            "--daemonize",
            "yes",
            "--bind",
            "127.0.0.1",
            "-::1",
            "--port",
            "6379",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            "/var/lib/redis",
            "--logfile",
            "/var/log/redis/ci.log",
        ],
        check=True,
        timeout=10,
    )
    wait_for(lambda: redis.Redis.from_url(REDIS_URL).ping(), timeout=15)


def test_redis_emptied_and_restarted_mid_run(
    configure: Configure, pg: str, tmp_path: Path, receiver: Receiver
) -> None:
    """FLUSHALL at 2 s (every queued poll and tick vanishes), then a restart of Redis with its
    data gone at 4 s. The database holds the schedule, so claims come back after their lease."""
    done: list[str] = []

    def during(group: Processes, elapsed: float) -> None:
        if elapsed > 2 and "flush" not in done:
            _redis_command("FLUSHALL")
            done.append("flush")
        if elapsed > 4 and "restart" not in done:
            _redis_command("SHUTDOWN", "NOSAVE")
            wait_for(_redis_down, timeout=10)
            _start_redis()
            done.append("restart")

    try:
        _run_and_check(configure, pg, tmp_path, receiver, _durable_plan(150, seed=8), during)
    finally:
        if not _redis_up():
            _start_redis()
    assert done == ["flush", "restart"]


def _redis_up() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def _redis_down() -> bool:
    return not _redis_up()


def _pg_ctl(action: str) -> None:
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action],
        check=True,
        capture_output=True,
        timeout=60,
    )


def test_postgres_restarted_mid_run(
    configure: Configure, pg: str, tmp_path: Path, receiver: Receiver
) -> None:
    """A fast restart of PostgreSQL at 3 s: every pooled connection breaks. Workers must
    reconnect on their own; answers in hand are written once the database is back."""
    done: list[float] = []

    def during(group: Processes, elapsed: float) -> None:
        if elapsed > 3 and not done:
            _pg_ctl("restart")
            done.append(elapsed)

    _run_and_check(configure, pg, tmp_path, receiver, _durable_plan(150, seed=9), during)
    assert done


def test_two_beats_and_four_workers(
    configure: Configure, pg: str, tmp_path: Path, receiver: Receiver
) -> None:
    """A second beat started by mistake doubles every tick; four workers claim side by side.
    Still no session polled twice inside the interval and no webhook sent twice."""
    _run_and_check(
        configure,
        pg,
        tmp_path,
        receiver,
        plan(200, accounts=3, seed=10),
        None,
        workers=4,
        beats=2,
    )
