"""Scrape cost of ``receipts exporter`` against history: one exporter registry scraped over and
over (as Prometheus does) while ``sms_sessions`` and ``sms_receipts`` hold a large history.

``python -m bench.scrape [--sessions N]`` runs it against its own fresh
``receipts_bench_<random>`` database (dropped at the end), apart from ``python -m bench``:
writing the history takes about 40 s at 1M sessions. The history is written with
``generate_series`` in SQL: 97% resolved sessions, 2% escalated (half of them acknowledged),
1% pending, and one receipt per session (2 s to 15 min after its session's sent_at). The
figures: the median wall time of a scrape (the exposition text a scrape returns) over
``rounds`` scrapes of one registry after a first one, the first scrape (which also counts the
history totals), and one count of those totals alone.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from bench.env import BenchDatabase, bench_database, configure_process, log
from worker.clock import database_now
from worker.db import read_scope
from worker.metrics import make_registry, read_totals, render

HISTORY_SQL = """
INSERT INTO sms_sessions (account_id, session_no, state, phones, sent_at, next_poll_at,
                          resolved_at, escalated_at, acknowledged_at, poll_count, last_polled_at,
                          created_at, updated_at)
SELECT 1 + g %% 20, 'scrape-' || g,
       CASE WHEN g %% 100 = 0 THEN 'pending'
            WHEN g %% 100 IN (1, 2) THEN 'escalated'
            ELSE 'resolved' END,
       '["+8613800000000"]'::jsonb,
       now() - g * interval '1 second',
       CASE WHEN g %% 100 = 0 THEN now() + interval '5 minutes' END,
       CASE WHEN g %% 100 > 2 THEN now() - g * interval '1 second' + interval '5 minutes' END,
       CASE WHEN g %% 100 IN (1, 2) THEN now() - g * interval '1 second' + interval '12 hours'
            END,
       CASE WHEN g %% 100 = 1 THEN now() END,
       2, now() - g * interval '1 second', now(), now()
FROM generate_series(1, %(n)s::bigint) AS g
"""
RECEIPTS_SQL = """
INSERT INTO sms_receipts (account_id, session_no, phone, phone_key, result, receipt_code,
                          receipt_time, cost_count, first_seen_at, updated_at)
SELECT 1 + g %% 20, 'scrape-' || g, '+8613800000000', '8613800000000',
       (ARRAY['Success', 'Success', 'Success', 'Fail', 'Unknow', 'SubmitFail'])[1 + g %% 6],
       'DELIVRD', now() - g * interval '1 second' + (2 + g %% 900) * interval '1 second', 1,
       now(), now()
FROM generate_series(1, %(n)s::bigint) AS g
"""


def seed(database: BenchDatabase, sessions: int) -> float:
    started = time.perf_counter()
    database.truncate()
    with database.connect() as conn:
        conn.execute(HISTORY_SQL, {"n": sessions})
        conn.execute(RECEIPTS_SQL, {"n": sessions})
    database.vacuum_analyze()
    return time.perf_counter() - started


def run(database: BenchDatabase, *, sessions: int, rounds: int = 20) -> dict[str, Any]:
    """Seeds ``sessions`` sessions (and as many receipts), then times scrapes of one registry
    (the first one also counts the history totals) and, apart, one count of those totals
    (which the exporter runs in the background at most every RECEIPTS_EXPORTER_TOTALS_INTERVAL).
    """
    seeded = seed(database, sessions)
    log(f"seeded {sessions:,} sessions and {sessions:,} receipts in {seeded:.1f}s")
    registry = make_registry()
    started = time.perf_counter()
    first = render(registry)
    first_ms = (time.perf_counter() - started) * 1000
    if b"receipts_scrape_error 0.0" not in first:
        raise RuntimeError(f"the scrape failed:\n{first.decode()[-2000:]}")
    durations = []
    for _ in range(rounds):
        started = time.perf_counter()
        render(registry)
        durations.append((time.perf_counter() - started) * 1000)
    counts = []
    for _ in range(3):
        started = time.perf_counter()
        with read_scope() as session:
            read_totals(session, database_now())
        counts.append((time.perf_counter() - started) * 1000)
    result = {
        "sessions": sessions,
        "receipts": sessions,
        "first_scrape_ms": round(first_ms, 1),
        "scrape_ms_median": round(statistics.median(durations), 1),
        "scrape_ms_max": round(max(durations), 1),
        "totals_count_ms": round(min(counts), 1),
        "rounds": rounds,
    }
    log(f"scrape: {result}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scrape", description=__doc__)
    parser.add_argument("--sessions", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    with bench_database() as database:
        configure_process({"RECEIPTS_DATABASE_URL": database.url})
        print(run(database, sessions=args.sessions, rounds=args.rounds))


if __name__ == "__main__":
    main()
