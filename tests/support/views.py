"""The views and heartbeat as users read them, in plain SQL, and the metrics as Prometheus
reads them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from worker import db
from worker.metrics import make_registry, render
from worker.models import heartbeats_table


def stale() -> list[tuple[str, int | None, str | None]]:
    """``stale_sessions``: (kind, account_id, session_no), sorted."""
    with db.session_scope() as session:
        rows = session.execute(
            sa.text(
                "SELECT kind, account_id, session_no FROM stale_sessions ORDER BY kind, session_no"
            )
        )
        return [(r.kind, r.account_id, r.session_no) for r in rows]


def clock_stopped() -> list[dict[str, Any]]:
    """The ``clock_stopped`` rows of ``stale_sessions`` (one at most)."""
    with db.session_scope() as session:
        rows = session.execute(
            sa.text("SELECT * FROM stale_sessions WHERE kind = 'clock_stopped'")
        ).mappings()
        return [dict(r) for r in rows]


def credentials_refused() -> list[dict[str, Any]]:
    """The ``credentials`` rows of ``stale_sessions`` (one at most)."""
    with db.session_scope() as session:
        rows = session.execute(
            sa.text("SELECT * FROM stale_sessions WHERE kind = 'credentials'")
        ).mappings()
        return [dict(r) for r in rows]


SUMMARY_COLUMNS = (
    "phones_tracked",
    "phones_reported",
    "phones_final",
    "phones_successful",
    "cost",
    "resolved_late",
)


def summaries() -> dict[str, tuple[int, ...]]:
    """``session_summary`` by SessionNo; SQLite's booleans are 0/1, hence the int()."""
    with db.session_scope() as session:
        rows = session.execute(
            sa.text(f"SELECT session_no, {', '.join(SUMMARY_COLUMNS)} FROM session_summary")
        ).mappings()
        return {r["session_no"]: tuple(int(r[c]) for c in SUMMARY_COLUMNS) for r in rows}


def tick_heartbeat() -> datetime | None:
    """When a worker last processed a tick."""
    with db.session_scope() as session:
        return session.scalar(
            sa.select(heartbeats_table.c.beat_at).where(heartbeats_table.c.name == "tick")
        )


def gauge(name: str) -> float:
    """One unlabelled gauge of a scrape of ``receipts exporter``'s metrics, now."""
    text = render(make_registry(lambda: datetime.now(UTC))).decode()
    for family in text_string_to_metric_families(text):
        if family.name == name:
            [sample] = family.samples
            return float(sample.value)
    raise AssertionError(f"no {name} in\n{text}")
