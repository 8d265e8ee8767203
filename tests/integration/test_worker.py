"""The worker as other services and a newcomer meet it: `receipts.track` sent through the
broker by an app that shares nothing else, and `receipts run` on the embedded defaults."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from celery import Celery

from tests.support.databases import FAST_TIMINGS, Configure
from tests.support.processes import processes, wait_for
from worker import db
from worker.models import receipts_table, sessions_table
from worker.simulator import Simulator

pytestmark = [pytest.mark.slow]


def _sessions() -> dict[str, dict[str, object]]:
    with db.session_scope() as session:
        rows = session.execute(sa.select(sessions_table)).mappings()
        return {row["session_no"]: dict(row) for row in rows}


@pytest.mark.postgres
@pytest.mark.redis
def test_track_task_sent_by_another_codebase(
    configure: Configure, pg: str, redis_url: str, tmp_path: Path
) -> None:
    env = {
        **FAST_TIMINGS,
        "RECEIPTS_DATABASE_URL": pg,
        "RECEIPTS_BROKER_URL": redis_url,
        "RECEIPTS_API_URL": "http://127.0.0.1:9/api",
        "RECEIPTS_ACCESS_KEY_ID": "demo",
        "RECEIPTS_ACCESS_KEY_SECRET": "demo-secret",
        # Nothing here is due during the test: keep the clock out of the way.
        "RECEIPTS_FIRST_POLL_DELAY": "1h",
        "RECEIPTS_CUTOFF": "12h",
    }
    configure(**env)
    # A minute ago by the real clock: the worker refuses a sent_at in its future, and nothing
    # is due before the first poll delay.
    sent_at = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    sender = Celery("someone-else", broker=redis_url)
    with processes(env, tmp_path) as group:
        group.worker()
        sender.send_task(
            "receipts.track",
            kwargs={"session_no": "BAD", "account_id": "not-a-number", "phones": ["x"]},
        )
        sender.send_task(
            "receipts.track",
            kwargs={
                "session_no": "S1",
                "account_id": 42,
                "phones": ["(852)55311111"],
                "sent_at": sent_at.astimezone(timezone(timedelta(hours=8))).isoformat(),
                "user_ref": "order-7",
            },
        )
        sender.send_task(
            "receipts.track",
            kwargs={"session_no": "S1", "account_id": 42, "phones": ["(852)55311112"]},
        )
        wait_for(
            lambda: len(_sessions().get("S1", {}).get("phones", []) or []) == 2,  # type: ignore[arg-type]
            timeout=30,
            describe=group.logs,
        )
        logs = group.logs()
    sessions = _sessions()
    assert set(sessions) == {"S1"}, "the malformed request recorded nothing"
    row = sessions["S1"]
    assert row["account_id"] == 42 and row["user_ref"] == "order-7"
    assert row["sent_at"] == sent_at
    # Two worker processes may take the two S1 tasks in either order (Celery does not order
    # tasks across processes), so only the set of phones is promised, not their order.
    assert sorted(row["phones"]) == ["(852)55311111", "(852)55311112"]
    assert "account_id must be a positive integer" in logs


def test_receipts_run_on_the_embedded_defaults(configure: Configure, tmp_path: Path) -> None:
    """No database server, no broker server: SQLite file and the filesystem broker, created on
    first run, polling the simulator until every session has its answer."""
    with Simulator(step=0.5, seed=11) as sim:
        env = {
            **FAST_TIMINGS,
            "RECEIPTS_CUTOFF": "6",
            "RECEIPTS_API_URL": sim.url,
            "RECEIPTS_ACCESS_KEY_ID": "demo",
            "RECEIPTS_ACCESS_KEY_SECRET": "demo-secret",
        }
        with processes(env, tmp_path) as group:
            group.start("run", "run", "--concurrency", "2")
            database = tmp_path / "receipts.db"
            wait_for(database.exists, timeout=30, describe=group.logs)
            configure(**env, RECEIPTS_DATABASE_URL=f"sqlite:///{database}")
            wait_for(
                lambda: "sms_sessions" in sa.inspect(db.get_engine()).get_table_names(),
                timeout=30,
                describe=group.logs,
            )
            now = time.time()
            scenarios = ["quick_success", "slow_final", "submit_fail", "never", "unknow_forever"]
            sim.register(
                {
                    "account_id": 1,
                    "session_no": f"{s}-{i}",
                    "phones": [f"+8525531{i:04d}"],
                    "scenario": s,
                    "sent_at": now,
                }
                for i, s in enumerate(scenarios * 4)
            )
            # Tracked the way a newcomer would: a CSV handed to `receipts track`.
            csv_file = tmp_path / "sessions.csv"
            sent = datetime.fromtimestamp(now, UTC).isoformat()
            csv_file.write_text(
                "account_id,session_no,phones,sent_at\n"
                + "".join(
                    f'1,{s}-{i},"+8525531{i:04d}",{sent}\n' for i, s in enumerate(scenarios * 4)
                )
            )
            tracked = subprocess.run(
                [sys.executable, "-m", "worker.cli", "track", "--csv", str(csv_file)],
                env=group.env,
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert tracked.returncode == 0, tracked.stderr
            assert "20 new" in tracked.stdout

            def pending() -> int:
                return sum(1 for r in _sessions().values() if r["state"] == "pending")

            wait_for(
                lambda: pending() == 0,
                timeout=40,
                describe=lambda: f"{pending()} pending\n{group.logs()}",
            )
    sessions = _sessions()
    for number, row in sessions.items():
        scenario = number.rsplit("-", 1)[0]
        want = "escalated" if scenario in ("never", "unknow_forever") else "resolved"
        assert row["state"] == want, (number, row)
    with db.session_scope() as session:
        results = dict(
            session.execute(sa.select(receipts_table.c.session_no, receipts_table.c.result)).all()
        )
    assert results["submit_fail-2"] == "SubmitFail"
    assert results["slow_final-1"] == "Success"
    assert "never-3" not in results
    # The embedded broker keeps all its folders inside RECEIPTS_BROKER_DIR (kombu's exchange
    # tables included, which it would otherwise write to ./control).
    assert not (tmp_path / "control").exists()
    broker = tmp_path / "receipts-broker"
    assert sorted(p.name for p in broker.iterdir()) == ["control", "processed", "queue"]
