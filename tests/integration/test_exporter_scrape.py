"""`receipts exporter` stays cheap and private as the tables grow.

- It listens on loopback unless told otherwise (its metrics have no authentication).
- A scrape reads only the work in progress (pending sessions, unacknowledged escalations,
  undelivered webhooks) through partial indexes: on PostgreSQL no statement of a scrape can
  scan ``sms_sessions`` or ``sms_receipts`` whole, checked on the plans with sequential scans
  disabled (a plan that still scans has no index to use).
- The totals that grow with history (resolved and escalated sessions, receipts by result) are
  counted at most every ``RECEIPTS_EXPORTER_TOTALS_INTERVAL``, in the background, and served
  from a cache whose age is a metric of its own.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from tests.support.databases import Configure
from tests.support.plans import seq_scans
from worker import db
from worker.metrics import make_registry, render
from worker.models import receipts_table, sessions_table

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
INTERVAL = timedelta(minutes=5)


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _sessions(prefix: str, state: str, count: int, **values: Any) -> None:
    rows = [
        {
            "account_id": 1,
            "session_no": f"{prefix}{i}",
            "state": state,
            "phones": ["(852)55311111"],
            "sent_at": NOW - timedelta(hours=1),
            "next_poll_at": NOW + timedelta(minutes=5) if state == "pending" else None,
            "poll_count": 1,
            "created_at": NOW,
            "updated_at": NOW,
            **values,
        }
        for i in range(count)
    ]
    receipts = [
        {
            "account_id": 1,
            "session_no": f"{prefix}{i}",
            "phone": "(852)55311111",
            "phone_key": "85255311111",
            "result": "Success",
            "first_seen_at": NOW,
            "updated_at": NOW,
        }
        for i in range(count)
        if state == "resolved"
    ]
    with db.session_scope() as session:
        session.execute(sa.insert(sessions_table), rows)
        if receipts:
            session.execute(sa.insert(receipts_table), receipts)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


def _wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s")


RESOLVED = ("receipts_sessions", (("state", "resolved"),))
ESCALATED = ("receipts_sessions", (("state", "escalated"),))
PENDING = ("receipts_sessions", (("state", "pending"),))
SUCCESS = ("receipts_receipts", (("result", "Success"),))
UNACKNOWLEDGED = ("receipts_escalations_unacknowledged", ())
AGE = ("receipts_totals_age_seconds", ())


@pytest.mark.usefixtures("database")
def test_history_totals_come_from_a_cache_refreshed_every_interval() -> None:
    _sessions("r", "resolved", 3)
    clock = Clock()
    registry = make_registry(clock, totals_interval=INTERVAL)
    first = _samples(render(registry).decode())
    assert (first[RESOLVED], first[SUCCESS], first[PENDING], first[AGE]) == (3, 3, 0, 0)

    # History grows; work in progress too.
    _sessions("r2-", "resolved", 2)
    _sessions("p", "pending", 4)
    _sessions("e", "escalated", 1, escalated_at=NOW)
    clock.now = NOW + INTERVAL - timedelta(seconds=1)
    cached = _samples(render(registry).decode())
    # The totals are the cached ones, and say how old they are...
    assert (cached[RESOLVED], cached[ESCALATED], cached[SUCCESS]) == (3, 0, 3)
    assert cached[AGE] == INTERVAL.total_seconds() - 1
    # ...while the work in progress is read on every scrape.
    assert (cached[PENDING], cached[UNACKNOWLEDGED]) == (4, 1)

    # Once the cache is an interval old, a scrape starts a refresh in the background.
    clock.now = NOW + INTERVAL
    render(registry)

    def refreshed() -> bool:
        samples = _samples(render(registry).decode())
        return samples[RESOLVED] == 5 and samples[ESCALATED] == 1 and samples[SUCCESS] == 5

    _wait_for(refreshed)
    assert _samples(render(registry).decode())[AGE] == 0


@pytest.mark.usefixtures("database")
def test_a_failed_refresh_keeps_the_last_totals_and_their_age_grows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker import metrics

    _sessions("r", "resolved", 2)
    clock = Clock()
    registry = make_registry(clock, totals_interval=INTERVAL)
    assert _samples(render(registry).decode())[RESOLVED] == 2

    def broken(*_: Any) -> Any:
        raise sa.exc.OperationalError("SELECT", {}, Exception("canceling statement"))

    monkeypatch.setattr(metrics, "read_totals", broken)
    clock.now = NOW + 2 * INTERVAL
    render(registry)  # starts the refresh that fails
    time.sleep(0.2)
    samples = _samples(render(registry).decode())
    assert samples[RESOLVED] == 2
    assert samples[AGE] == 2 * INTERVAL.total_seconds()
    assert samples["receipts_scrape_error", ()] == 0  # the work in progress is still right


@pytest.mark.usefixtures("database")
def test_no_totals_yet_is_nan_not_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker import metrics

    def broken(*_: Any) -> Any:
        raise sa.exc.OperationalError("SELECT", {}, Exception("canceling statement"))

    monkeypatch.setattr(metrics, "read_totals", broken)
    samples = _samples(render(make_registry(Clock(), totals_interval=INTERVAL)).decode())
    assert math.isnan(samples[AGE])
    assert RESOLVED not in samples and SUCCESS not in samples, "unknown, not zero"
    assert samples[PENDING] == 0


def _scrape_statements(registry: Any) -> list[tuple[str, Any]]:
    """Every statement one scrape sends, with its parameters."""
    sent: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if not statement.lstrip().upper().startswith(("SET", "SHOW", "SELECT PG_", "BEGIN")):
            sent.append((statement, parameters))

    engine = db.get_engine()
    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        render(registry)
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)
    return sent


@pytest.mark.postgres
@pytest.mark.usefixtures("pg")
def test_a_scrape_reads_no_table_whole() -> None:
    _sessions("r", "resolved", 50)
    _sessions("e", "escalated", 5, escalated_at=NOW)
    _sessions("a", "escalated", 5, escalated_at=NOW, acknowledged_at=NOW)
    _sessions("p", "pending", 5)
    registry = make_registry(Clock(), totals_interval=INTERVAL)
    render(registry)  # the first scrape also counts the totals (once per interval)
    statements = _scrape_statements(registry)
    assert statements, "a scrape reads the database"
    engine = db.get_engine()
    with engine.connect() as conn:
        conn.exec_driver_sql("SET enable_seqscan = off")  # a scan left is one no index avoids
        for statement, parameters in statements:
            plan = conn.exec_driver_sql(
                f"EXPLAIN (FORMAT JSON) {statement}", parameters
            ).scalar_one()
            plan = json.loads(plan) if isinstance(plan, str) else plan
            scanned = {r for r in seq_scans(plan) if r in ("sms_sessions", "sms_receipts")}
            assert not scanned, f"{statement} scans {scanned}"


@pytest.fixture
def exporter_without_host(
    configure: Configure, sqlite_database: str, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    configure(RECEIPTS_DATABASE_URL=sqlite_database)
    root = str(Path(__file__).resolve().parents[2])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }
    log = tmp_path / "exporter.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "exporter", "--port", "0"],
            env=env,
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process, log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)


def test_the_exporter_listens_on_loopback_by_default(
    exporter_without_host: tuple[subprocess.Popen[bytes], Path],
) -> None:
    process, log = exporter_without_host
    deadline = time.monotonic() + 15
    url = None
    while url is None and time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("serving metrics on "):
                url = line.removeprefix("serving metrics on ")
        assert process.poll() is None, log.read_text()
        time.sleep(0.05)
    assert url is not None, log.read_text()
    assert url.startswith("http://127.0.0.1:"), url
    response = requests.get(url, timeout=10)
    assert response.status_code == 200
    assert "receipts_scrape_error 0.0" in response.text
