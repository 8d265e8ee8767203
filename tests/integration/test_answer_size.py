"""A huge answer costs a worker no more memory than its cap: an API answer past
RECEIPTS_API_MAX_ANSWER_BYTES is refused as malformed, and of a webhook receiver's answer only
an excerpt is ever read.

Each measurement runs in a fresh process (the code under test, set up as a worker sets itself
up), whose peak RSS is read before and after the one call that meets the huge answer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from tests.support.slow_http import EMPTY_ANSWER, SlowServer, receipts_answer
from worker import db
from worker.migrate import upgrade
from worker.models import outbox_table

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parents[2]

# Peak RSS in KiB (Linux' unit for ru_maxrss).
_PEAK = "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss"

API_SCRIPT = f"""
import json, resource
from worker import runtime
from worker.errors import UspeedoError

client = runtime.api_client()
client.get_send_receipts(1, ["s1"])  # the warm-up: a small answer
before = {_PEAK}
try:
    batch = client.get_send_receipts(1, ["s1"])
    outcome = f"ok: {{len(batch.receipts)}} receipts"
except UspeedoError as exc:
    outcome = f"{{type(exc).__name__}}: {{exc}}"
print(json.dumps({{"before": before, "after": {_PEAK}, "outcome": outcome}}))
"""

WEBHOOK_SCRIPT = f"""
import json, resource
import sqlalchemy as sa
from worker import db, runtime
from worker.models import outbox_table
from worker.tasks import deliver_webhooks

deliver_webhooks.run()  # the warm-up: the only row, acknowledged at once
now = runtime.utcnow()
with db.session_scope() as session:
    session.execute(sa.insert(outbox_table).values(
        delivery_id="escalation-1-HUGE", event="session.escalated", account_id=1,
        session_no="HUGE", payload={{"session_no": "HUGE"}}, attempts=0,
        next_attempt_at=now, created_at=now,
    ))
before = {_PEAK}
report = deliver_webhooks.run()
print(json.dumps({{"before": before, "after": {_PEAK}, "outcome": report}}))
"""


def run_measured(script: str, env: dict[str, str]) -> dict[str, Any]:
    """Run ``script`` in a fresh interpreter importing this checkout; its JSON line, with the
    peak RSS growth in bytes as ``growth``."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RECEIPTS_")}
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={**clean, **env, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["growth"] = (result["after"] - result["before"]) * 1024
    return result


def measure_api_answer(size: int, cap: int | None, *, declared: bool = True) -> dict[str, Any]:
    with SlowServer(
        stream=receipts_answer(size), first=(200, EMPTY_ANSWER), undeclared=not declared
    ) as api:
        env = {
            "RECEIPTS_API_URL": api.url,
            "RECEIPTS_ACCESS_KEY_ID": "demo",
            "RECEIPTS_ACCESS_KEY_SECRET": "demo-secret",
            "RECEIPTS_API_READ_TIMEOUT": "120",
        }
        if cap is not None:
            env["RECEIPTS_API_MAX_ANSWER_BYTES"] = str(cap)
        return run_measured(API_SCRIPT, env)


def measure_webhook_answer(size: int, status: int, folder: Path) -> dict[str, Any]:
    url = f"sqlite:///{folder / 'receipts.db'}"
    upgrade(url)
    engine = db.create_engine(url, poolclass=sa.pool.NullPool)
    now = datetime.now(UTC)
    with engine.begin() as connection:
        connection.execute(
            sa.insert(outbox_table),
            [
                {
                    "delivery_id": f"escalation-1-{name}",
                    "event": "session.escalated",
                    "account_id": 1,
                    "session_no": name,
                    "payload": {"event": "session.escalated", "session_no": name},
                    "attempts": 0,
                    "next_attempt_at": now,
                    "created_at": now,
                }
                for name in ("WARMUP",)
            ],
        )
    engine.dispose()
    block = (b"x" * 1023 + b"\n") * 64
    blocks = size // len(block)
    stream = (len(block) * blocks, lambda: iter([block] * blocks))
    with SlowServer(
        status=status, stream=stream, content_type="text/plain; charset=utf-8", first=(200, b"ok")
    ) as receiver:
        result = run_measured(
            WEBHOOK_SCRIPT,
            {
                "RECEIPTS_DATABASE_URL": url,
                "RECEIPTS_ESCALATION_WEBHOOK_URL": receiver.url,
                "RECEIPTS_WEBHOOK_TIMEOUT": "60",
            },
        )
    engine = db.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.connect() as connection:
        row = (
            connection.execute(sa.select(outbox_table).where(outbox_table.c.session_no == "HUGE"))
            .mappings()
            .one()
        )
    engine.dispose()
    result["row"] = dict(row)
    return result


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "until-close"])
def test_an_api_answer_past_the_cap_is_refused_without_reading_it_whole(declared: bool) -> None:
    # Declared, it is refused unread; undeclared, read up to the cap.
    result = measure_api_answer(64 * MiB, cap=1 * MiB, declared=declared)
    assert result["growth"] < 24 * MiB, result
    assert result["outcome"].startswith("AnswerTooLarge"), result
    assert "1048576 bytes" in result["outcome"], result


def test_an_api_answer_within_the_cap_is_read(tmp_path: Path) -> None:
    # ~5,000 receipts: the same machinery, well under the default cap.
    result = measure_api_answer(1 * MiB, cap=None)
    assert result["outcome"].startswith("ok: "), result
    assert int(result["outcome"].split()[1]) > 4000


def test_a_huge_webhook_answer_costs_no_memory(tmp_path: Path) -> None:
    result = measure_webhook_answer(64 * MiB, 500, tmp_path)
    assert result["growth"] < 8 * MiB, result
    row = result["row"]
    assert row["delivered_at"] is None and row["attempts"] == 1
    assert row["last_error"].startswith("HTTP 500: xxx"), row["last_error"][:100]
    assert len(row["last_error"]) <= 300
