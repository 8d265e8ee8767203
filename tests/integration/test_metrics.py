"""The Prometheus exporter on real PostgreSQL and SQLite: every metric's exact value from rows
written directly, with an injected clock; scrape errors; and `receipts exporter` for real."""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import socket
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
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from tests.support.databases import Configure
from tests.support.servers import free_port
from worker import db
from worker.cli import main
from worker.masking import MASKED_TABLES
from worker.metrics import LATENCY_BUCKETS, make_registry, render
from worker.models import (
    api_calls_table,
    event_cursors_table,
    heartbeats_table,
    outbox_table,
    receipts_table,
    sessions_table,
)
from worker.purge import PURGED_TABLES

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
NAN = "NaN"  # NaN never equals itself; samples carry this marker instead so dicts compare

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float | str]


def parse(text: str) -> tuple[Samples, dict[str, str]]:
    """Every sample by (name, sorted labels), and every family's type."""
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = NAN if math.isnan(sample.value) else sample.value
    return samples, types


def scrape(now: datetime = NOW) -> Samples:
    """One scrape of a fresh exporter registry whose clock reads ``now``."""
    samples, types = parse(render(make_registry(lambda: now)).decode())
    # A counter (rate() works on it); everything else is a gauge.
    kinds = {
        "receipts_api_calls": "counter",
        "receipts_push_requests": "counter",
        "receipts_events_delivered": "counter",
        "receipts_purged_rows": "counter",
        "receipts_masked_rows": "counter",
        "receipts_push_receipts": "counter",
        "receipts_push_commit_seconds": "histogram",
        "receipts_receipt_latency_seconds": "histogram",
    }
    assert all(t == kinds.get(n, "gauge") for n, t in types.items()), types
    return samples


def expected(
    *,
    sessions: tuple[int, int, int] = (0, 0, 0),
    unacknowledged: int = 0,
    oldest_pending: float = 0.0,
    tick_age: float | str = NAN,
    overdue: int = 0,
    api_calls: dict[tuple[str, str], int] | None = None,
    webhooks_pending: int = 0,
    webhook_failures: int = 0,
    receipts: dict[str, int] | None = None,
    rejected: dict[str, int] | None = None,
    credentials_failing: int = 0,
    oldest_session: float = 0.0,
    purged: dict[str, int] | None = None,
    masked: dict[str, int] | None = None,
) -> Samples:
    """The full exposition of a successful scrape: every metric, nothing else."""
    pending, resolved, escalated = sessions
    counts = {"Success": 0, "Fail": 0, "Unknow": 0, "SubmitFail": 0, **(receipts or {})}
    samples: Samples = {
        ("receipts_sessions", (("state", "pending"),)): pending,
        ("receipts_sessions", (("state", "resolved"),)): resolved,
        ("receipts_sessions", (("state", "escalated"),)): escalated,
        ("receipts_escalations_unacknowledged", ()): unacknowledged,
        ("receipts_oldest_pending_age_seconds", ()): oldest_pending,
        ("receipts_last_tick_age_seconds", ()): tick_age,
        ("receipts_overdue_sessions", ()): overdue,
        ("receipts_webhooks_pending", ()): webhooks_pending,
        ("receipts_webhook_delivery_failures", ()): webhook_failures,
        ("receipts_credentials_failing", ()): credentials_failing,
        # A fresh registry counts the history totals at its first scrape: they are current.
        ("receipts_totals_age_seconds", ()): 0,
        ("receipts_scrape_error", ()): 0,
        ("receipts_oldest_session_age_seconds", ()): oldest_session,
        ("receipts_retention_seconds", ()): 0,
    }
    for table in PURGED_TABLES:
        samples["receipts_purged_rows_total", (("table", table),)] = (purged or {}).get(table, 0)
    for table in MASKED_TABLES:
        samples["receipts_masked_rows_total", (("table", table),)] = (masked or {}).get(table, 0)
    for result, count in counts.items():
        samples["receipts_receipts", (("result", result),)] = count
    refused = {"open": 0, "resubmitted": 0, "dismissed": 0, **(rejected or {})}
    for state, count in refused.items():
        samples["receipts_rejected_tracks", (("state", state),)] = count
    for (outcome, ret_code), calls in (api_calls or {}).items():
        labels = (("outcome", outcome), ("ret_code", ret_code))
        samples["receipts_api_calls_total", labels] = calls
    # No push yet: every outcome and fate at 0, an empty histogram, no last push, an empty
    # inbox; every receipt was polled.
    for outcome in ("ok", "ignored", "bad_request", "too_large", "unavailable"):
        samples["receipts_push_requests_total", (("outcome", outcome),)] = 0
    for fate in ("stored", "parked", "skipped", "refused"):
        samples["receipts_push_receipts_total", (("fate", fate),)] = 0
    samples["receipts_push_commit_seconds_bucket", (("le", "+Inf"),)] = 0
    samples["receipts_push_commit_seconds_count", ()] = 0
    samples["receipts_push_commit_seconds_sum", ()] = 0
    samples["receipts_push_last_seen_age_seconds", ()] = NAN
    samples["receipts_inbox_oldest_age_seconds", ()] = 0
    samples["receipts_inbox_receipts", ()] = 0
    by_source = {"poll": sum(counts.values()), "push": 0, "repoll": 0}
    for source, count in by_source.items():
        samples["receipts_receipts_by_source", (("source", source),)] = count
    # No receipt here has a receipt_time: an empty latency histogram for every final result
    # (tests/integration/test_metrics_latency.py fills it).
    for result in ("Success", "Fail", "SubmitFail"):
        for bound in [*map(float, LATENCY_BUCKETS), "+Inf"]:
            labels = (("le", str(bound)), ("result", result))
            samples["receipts_receipt_latency_seconds_bucket", labels] = 0
        samples["receipts_receipt_latency_seconds_count", (("result", result),)] = 0
        samples["receipts_receipt_latency_seconds_sum", (("result", result),)] = 0
    return samples


def _session(
    session_no: str,
    state: str,
    *,
    sent_at: datetime,
    next_poll_at: datetime | None = None,
    acknowledged_at: datetime | None = None,
) -> dict[str, Any]:
    return {
        "account_id": 1,
        "session_no": session_no,
        "state": state,
        "phones": ["(852)55311111"],
        "sent_at": sent_at,
        "next_poll_at": next_poll_at,
        "escalated_at": sent_at + timedelta(hours=12) if state == "escalated" else None,
        "resolved_at": sent_at + timedelta(minutes=5) if state == "resolved" else None,
        "acknowledged_at": acknowledged_at,
        "poll_count": 1,
        "created_at": sent_at,
        "updated_at": sent_at,
    }


def _receipt(session_no: str, phone: str, result: str) -> dict[str, Any]:
    return {
        "account_id": 1,
        "session_no": session_no,
        "phone": phone,
        "phone_key": phone,
        "result": result,
        "first_seen_at": NOW,
        "updated_at": NOW,
    }


def _outbox(delivery_id: str, *, attempts: int, delivered: bool) -> dict[str, Any]:
    return {
        "delivery_id": delivery_id,
        "event": "session.escalated",
        "account_id": 1,
        "session_no": "e1",
        "payload": {"session_no": "e1"},
        "attempts": attempts,
        "next_attempt_at": NOW,
        "delivered_at": NOW if delivered else None,
        "created_at": NOW,
    }


def _heartbeat(*, beat_at: datetime, interval_max: float = 600.0) -> None:
    with db.session_scope() as session:
        session.execute(sa.delete(heartbeats_table))
        session.execute(
            sa.insert(heartbeats_table).values(
                name="tick",
                beat_at=beat_at,
                tick_seconds=30.0,
                poll_interval_max_seconds=interval_max,
            )
        )


def _populate(now: datetime = NOW) -> None:
    """Three pending (one overdue by the default rule), two resolved (sent before any
    pending one), three escalated (one acknowledged), receipts, API counts, webhooks."""
    minute, day = timedelta(minutes=1), timedelta(days=1)
    sessions = [
        # Overdue: its poll was due 25 min ago, more than 2 x 600 s.
        _session("p1", "pending", sent_at=now - 120 * minute, next_poll_at=now - 25 * minute),
        # Late by 15 min: overdue only when the longest interval is under 7.5 min.
        _session("p2", "pending", sent_at=now - 30 * minute, next_poll_at=now - 15 * minute),
        _session("p3", "pending", sent_at=now - 10 * minute, next_poll_at=now + 5 * minute),
        _session("r1", "resolved", sent_at=now - 3 * day),
        _session("r2", "resolved", sent_at=now - 3 * day),
        _session("e1", "escalated", sent_at=now - 2 * day),
        _session("e2", "escalated", sent_at=now - 2 * day),
        _session("e3", "escalated", sent_at=now - 2 * day, acknowledged_at=now),
    ]
    receipts = [
        _receipt("r1", "85255311111", "Success"),
        _receipt("r1", "85255311112", "Success"),
        _receipt("r2", "85255311111", "Fail"),
        _receipt("r2", "85255311112", "SubmitFail"),
        _receipt("p1", "85255311111", "Unknow"),
    ]
    api_calls = [
        {"outcome": "ok", "ret_code": 0, "calls": 120},
        {"outcome": "retcode", "ret_code": 215398, "calls": 3},
        {"outcome": "http", "ret_code": 503, "calls": 2},
    ]
    outbox = [
        _outbox("d1", attempts=1, delivered=True),
        _outbox("d2", attempts=0, delivered=False),
        _outbox("d3", attempts=2, delivered=False),
    ]
    with db.session_scope() as session:
        session.execute(sa.insert(sessions_table), sessions)
        session.execute(sa.insert(receipts_table), receipts)
        session.execute(sa.insert(api_calls_table), api_calls)
        session.execute(sa.insert(outbox_table), outbox)


def populated(*, overdue: int, tick_age: float | str = NAN) -> Samples:
    """What a scrape reports for `_populate()`'s rows."""
    return expected(
        sessions=(3, 2, 3),
        unacknowledged=2,
        oldest_pending=7200.0,
        tick_age=tick_age,
        overdue=overdue,
        api_calls={("ok", "0"): 120, ("retcode", "215398"): 3, ("http", "503"): 2},
        webhooks_pending=2,
        webhook_failures=1,
        receipts={"Success": 2, "Fail": 1, "SubmitFail": 1, "Unknow": 1},
        oldest_session=3 * 86400.0,
    )


@pytest.mark.usefixtures("database")
def test_empty_database_reports_every_metric_as_zero_and_the_tick_as_nan() -> None:
    assert scrape() == expected()


@pytest.mark.usefixtures("database")
def test_every_metric_is_computed_from_the_tables() -> None:
    _populate()
    # No heartbeat yet: the tick's age is NaN and "overdue" uses the default 600 s interval.
    assert scrape() == populated(overdue=1)

    _heartbeat(beat_at=NOW - timedelta(seconds=42.5))
    assert scrape() == populated(overdue=1, tick_age=42.5)

    # The heartbeat's own longest interval decides what is overdue (2 x 300 s < 15 min).
    _heartbeat(beat_at=NOW - timedelta(seconds=42.5), interval_max=300.0)
    assert scrape() == populated(overdue=2, tick_age=42.5)


@pytest.mark.usefixtures("database")
def test_purged_rows_are_counted_by_table() -> None:
    from worker import purge

    _populate()
    # r1 and r2 (resolved, 3 days old) go with their 4 receipts, and e3 (escalated and
    # acknowledged); pending and unacknowledged sessions stay.
    report = purge.purge(db.session_scope, now=NOW, older_than=timedelta(days=1), destinations=())
    assert (report.sessions, report.receipts) == (3, 4)
    samples = scrape()
    purged = {
        table: samples["receipts_purged_rows_total", (("table", table),)] for table in PURGED_TABLES
    }
    assert purged == {**dict.fromkeys(PURGED_TABLES, 0), "sms_sessions": 3, "sms_receipts": 4}
    # The oldest left is escalated, sent 2 days ago.
    assert samples["receipts_oldest_session_age_seconds", ()] == 2 * 86400.0


@pytest.mark.usefixtures("database")
def test_masked_rows_are_counted_by_table() -> None:
    from worker import masking

    _populate()
    # r1, r2 (resolved, 3 days old) and e1..e3 (escalated, 2 days old) with their 4 receipts;
    # pending sessions stay in clear.
    report = masking.mask(
        db.session_scope,
        now=NOW,
        older_than=timedelta(days=1),
        phone_hash=masking.PhoneHash.of("k" * 32),
    )
    assert (report.sessions, report.receipts) == (5, 4)
    samples = scrape()
    masked = {
        table: samples["receipts_masked_rows_total", (("table", table),)] for table in MASKED_TABLES
    }
    assert masked == {**dict.fromkeys(MASKED_TABLES, 0), "sms_sessions": 5, "sms_receipts": 4}
    # The purge's counts are apart.
    assert all(
        samples["receipts_purged_rows_total", (("table", table),)] == 0 for table in PURGED_TABLES
    )


@pytest.mark.usefixtures("database")
def test_the_retention_is_served_for_the_purge_alert(configure: Configure) -> None:
    """0 while RECEIPTS_RETENTION is unset; else its seconds, which ReceiptsPurgeBehind
    compares the oldest session's age with."""
    assert scrape()["receipts_retention_seconds", ()] == 0
    configure(RECEIPTS_RETENTION="90d")
    assert scrape()["receipts_retention_seconds", ()] == 90 * 86400.0


@pytest.mark.usefixtures("database")
def test_ages_follow_the_injected_clock() -> None:
    _populate()
    _heartbeat(beat_at=NOW - timedelta(seconds=30))
    later = NOW + timedelta(seconds=100)
    samples = scrape(later)
    assert samples["receipts_oldest_pending_age_seconds", ()] == 7300.0
    assert samples["receipts_last_tick_age_seconds", ()] == 130.0


@pytest.mark.usefixtures("database")
def test_a_pending_session_sent_in_the_future_has_no_negative_age() -> None:
    with db.session_scope() as session:
        session.execute(
            sa.insert(sessions_table),
            [_session("f1", "pending", sent_at=NOW + timedelta(minutes=1), next_poll_at=NOW)],
        )
    assert scrape() == expected(sessions=(1, 0, 0))


@pytest.mark.usefixtures("database")
def test_acknowledging_an_escalation_lowers_the_unacknowledged_count() -> None:
    _populate()
    assert scrape()["receipts_escalations_unacknowledged", ()] == 2
    with db.session_scope() as session:
        session.execute(
            sa.update(sessions_table)
            .where(sessions_table.c.session_no == "e1")
            .values(acknowledged_at=NOW)
        )
    samples = scrape()
    assert samples["receipts_escalations_unacknowledged", ()] == 1
    # Still escalated: acknowledging silences the alert, not the history.
    assert samples["receipts_sessions", (("state", "escalated"),)] == 3


@pytest.mark.usefixtures("database")
def test_every_metric_the_alert_rules_name_is_exported() -> None:
    rules = (Path(__file__).resolve().parents[2] / "deploy" / "prometheus-alerts.yml").read_text()
    named = set(re.findall(r"\breceipts_[a-z_]+", rules)) - {"receipts_api_calls_total"}
    # A configured event destination, so that the event streams have their series.
    with db.session_scope() as session:
        session.execute(sa.insert(event_cursors_table), [{"destination": "webhook"}])
    exported = {name for name, _labels in scrape()} | {"receipts_api_calls"}
    assert "receipts_credentials_failing" in named
    assert named <= exported, named - exported


@pytest.mark.parametrize("where", ["missing-sqlite-dir", "unmigrated-sqlite", "closed-pg-port"])
def test_a_database_error_is_reported_not_raised(
    where: str, configure: Configure, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    urls = {
        "missing-sqlite-dir": f"sqlite:///{tmp_path / 'missing' / 'receipts.db'}",
        "unmigrated-sqlite": f"sqlite:///{tmp_path / 'empty.db'}",
        "closed-pg-port": f"postgresql://postgres@127.0.0.1:{free_port()}/receipts",
    }
    configure(RECEIPTS_DATABASE_URL=urls[where])
    with caplog.at_level(logging.ERROR, logger="worker.metrics"):
        # Nothing but the error flag: a zero would pass for "all is well".
        assert scrape() == {("receipts_scrape_error", ()): 1}
        # The collector stays usable: the next scrape tries again.
        assert scrape() == {("receipts_scrape_error", ()): 1}
    assert "metrics scrape failed" in caplog.text
    # What to do, as the commands say it (worker/problems.py).
    assert "RECEIPTS_DATABASE_URL" in caplog.text


def test_a_scrape_recovers_once_the_database_is_back(
    configure: Configure, tmp_path: Path, sqlite_database: str
) -> None:
    registry = make_registry(lambda: NOW)
    configure(RECEIPTS_DATABASE_URL=f"sqlite:///{tmp_path / 'missing' / 'receipts.db'}")
    assert parse(render(registry).decode())[0] == {("receipts_scrape_error", ()): 1}
    configure(RECEIPTS_DATABASE_URL=sqlite_database)
    assert parse(render(registry).decode())[0]["receipts_scrape_error", ()] == 0


# --- the command, for real ----------------------------------------------------------------


@pytest.fixture
def exporter_process(
    database: str, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """`receipts exporter --port 0` on loopback against the test's database (both backends),
    as an operator starts it; killed afterwards if the test did not stop it."""
    root = str(Path(__file__).resolve().parents[2])  # the code under test, installed or not
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }
    log = tmp_path / "exporter.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "exporter", "--port", "0", "--host", "127.0.0.1"],
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


def _announced_url(process: subprocess.Popen[bytes], log: Path, deadline: float) -> str:
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("serving metrics on "):
                return line.removeprefix("serving metrics on ")
        assert process.poll() is None, f"exporter exited early:\n{log.read_text()}"
        time.sleep(0.05)
    pytest.fail(f"exporter announced no URL within 10 s:\n{log.read_text()}")


def test_the_exporter_command_serves_metrics_and_stops_on_sigterm(
    exporter_process: tuple[subprocess.Popen[bytes], Path],
) -> None:
    now = datetime.now(UTC)
    _populate(now)
    _heartbeat(beat_at=now)
    process, log = exporter_process
    deadline = time.monotonic() + 10
    url = _announced_url(process, log, deadline)
    assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")

    response = requests.get(url, timeout=max(deadline - time.monotonic(), 0.1))
    assert response.status_code == 200
    samples, types = parse(response.text)
    assert samples["receipts_scrape_error", ()] == 0
    assert samples["receipts_sessions", (("state", "pending"),)] == 3
    assert samples["receipts_escalations_unacknowledged", ()] == 2
    assert samples["receipts_api_calls_total", (("outcome", "ok"), ("ret_code", "0"))] == 120
    assert types["receipts_api_calls"] == "counter"
    # The real clock: ages are positive and small for the tick just recorded.
    tick_age = samples["receipts_last_tick_age_seconds", ()]
    assert isinstance(tick_age, float) and 0 <= tick_age < 30
    oldest = samples["receipts_oldest_pending_age_seconds", ()]
    assert isinstance(oldest, float) and oldest > 3600
    # Only the database's numbers: no process/python metrics of this one replica.
    assert not any(name.startswith(("process_", "python_")) for name, _ in samples)

    process.send_signal(signal.SIGTERM)
    assert process.wait(5) == 0, log.read_text()


def test_the_exporter_command_fails_clearly_when_the_port_is_taken(
    configure: Configure,
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["exporter", "--host", "127.0.0.1", "--port", str(port)])
    assert result.exit_code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.output
