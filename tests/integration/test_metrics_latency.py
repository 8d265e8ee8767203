"""The receipt latency histogram (``receipts_receipt_latency_seconds``): receipt time minus
sent time of the final receipts, bucketed by SQL on both backends exactly as the pure rule
(``metrics.latency_of``) buckets them, and exported as a Prometheus histogram by result."""

from __future__ import annotations

import math
import random
import re
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from worker import db
from worker.metrics import LATENCY_BUCKETS, Latency, latency_of, make_registry, read_latency, render
from worker.models import receipts_table, sessions_table

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
SENT = NOW - timedelta(days=1)


def _write(receipts: list[tuple[str, str, float | None]]) -> None:
    """One session per receipt, sent at SENT (with microseconds, as a sender may give it);
    each receipt (result, phone, latency in seconds or None for no receipt_time)."""
    sent_at = SENT.replace(microsecond=250_000)
    sessions, rows = [], []
    for i, (result, phone, latency) in enumerate(receipts):
        session_no = f"L{i}"
        sessions.append(
            {
                "account_id": 1 + i % 2,
                "session_no": session_no,
                "state": "resolved",
                "phones": [phone],
                "sent_at": sent_at,
                "poll_count": 1,
                "created_at": sent_at,
                "updated_at": sent_at,
            }
        )
        rows.append(
            {
                "account_id": 1 + i % 2,
                "session_no": session_no,
                "phone": phone,
                "phone_key": phone,
                "result": result,
                "receipt_time": None if latency is None else sent_at + timedelta(seconds=latency),
                "first_seen_at": NOW,
                "updated_at": NOW,
            }
        )
    with db.session_scope() as session:
        session.execute(sa.insert(sessions_table), sessions)
        session.execute(sa.insert(receipts_table), rows)


def _read() -> dict[str, Latency]:
    with db.read_scope() as session:
        return read_latency(session)


def _same(got: Latency, want: Latency) -> bool:
    return (got.buckets, got.count) == (want.buckets, want.count) and math.isclose(
        got.seconds, want.seconds, rel_tol=1e-9, abs_tol=1e-3
    )


@pytest.mark.usefixtures("database")
def test_the_sql_buckets_latencies_as_the_rule_does() -> None:
    rng = random.Random(7)
    # Every bound exactly, a millisecond either side of it, negatives (a receipt time before
    # sent_at), past the cutoff, and random ones at millisecond resolution.
    edges = [b + d for b in LATENCY_BUCKETS for d in (-0.001, 0.0, 0.001)]
    values = [*edges, 0.0, -30.0, -0.5, 43_200.001, 90_000.0]
    values += [rng.randrange(-60_000, 50_000_000) / 1000 for _ in range(150)]
    results = ["Success", "Fail", "SubmitFail"]
    receipts: list[tuple[str, str, float | None]] = [
        (results[i % 3], f"8525531{i:04d}", value) for i, value in enumerate(values)
    ]
    # Not in the histogram: a receipt without a receipt time, and non-final ones.
    receipts += [("Success", "85255300001", None), ("Unknow", "85255300002", 12.0)]
    _write(receipts)

    by_result: dict[str, list[float]] = defaultdict(list)
    for result, _phone, latency in receipts:
        if latency is not None and result != "Unknow":
            by_result[result].append(latency)
    got = _read()
    assert set(got) == set(results)
    for result in results:
        assert _same(got[result], latency_of(by_result[result])), result


def test_the_rule() -> None:
    histogram = latency_of([-5.0, 0.5, 1.0, 1.001, 60.0, 43_200.0, 50_000.0])
    counts = dict(zip(LATENCY_BUCKETS, histogram.buckets, strict=True))
    assert counts[1] == 3  # the negative one counts as 0 s
    assert counts[5] == 4 and counts[30] == 4
    assert counts[60] == 5 and counts[21600] == 5
    assert counts[43200] == 6
    assert histogram.count == 7  # +Inf: the late one too
    assert histogram.seconds == 0.5 + 1.0 + 1.001 + 60.0 + 43_200.0 + 50_000.0


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("receipts_receipt_latency_seconds")
    }


@pytest.mark.usefixtures("database")
def test_the_exporter_serves_it_as_a_histogram_by_result() -> None:
    _write([("Success", "1", 3.0), ("Success", "2", 400.0), ("Fail", "3", 50_000.0)])
    text = render(make_registry(lambda: NOW)).decode()
    assert "# TYPE receipts_receipt_latency_seconds histogram" in text
    samples = _samples(text)

    def bucket(result: str, le: str) -> float:
        return samples["receipts_receipt_latency_seconds_bucket", (("le", le), ("result", result))]

    assert [bucket("Success", le) for le in ("1.0", "5.0", "300.0", "600.0", "+Inf")] == [
        0,
        1,
        1,
        2,
        2,
    ]
    assert samples["receipts_receipt_latency_seconds_sum", (("result", "Success"),)] == 403.0
    assert bucket("Fail", "43200.0") == 0 and bucket("Fail", "+Inf") == 1
    # Every final result always, 0 when none.
    assert bucket("SubmitFail", "+Inf") == 0
    assert samples["receipts_receipt_latency_seconds_count", (("result", "SubmitFail"),)] == 0
    assert not any(dict(labels).get("result") == "Unknow" for _name, labels in samples)
    buckets_per_result = len(LATENCY_BUCKETS) + 1
    assert len(samples) == 3 * (buckets_per_result + 2)


@pytest.mark.usefixtures("database")
def test_a_scrape_leaves_the_latency_to_the_totals_count() -> None:
    """The histogram reads every final receipt (seconds at 1M receipts): it is counted with
    the history totals, at most once per interval, never by the scrape itself."""
    _write([("Success", "1", 3.0)])
    registry = make_registry(lambda: NOW)
    render(registry)  # the first scrape also has the totals counted
    sent: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        sent.append(statement)

    engine = db.get_engine()
    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        text = render(registry).decode()
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)
    assert 'receipts_receipt_latency_seconds_count{result="Success"} 1.0' in text
    assert sent, "a scrape reads the database"
    assert not [s for s in sent if re.search(r"\bsms_receipts\b", s)], sent
