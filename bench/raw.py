"""Raw upsert limits of the database at hand, without any worker code: psycopg 3 ``executemany``
(pipeline mode) of ``INSERT … ON CONFLICT DO UPDATE``, and COPY into a temporary table followed by
one ``INSERT … SELECT … ON CONFLICT``, into a scratch table shaped like ``sms_receipts``.

Each method runs two passes over the same keys: an *insert* pass into the empty table (what the
worker does for new receipts; the headline figure) and an *update* pass where every row
conflicts and the guard lets the newer, final receipt through.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.env import BenchDatabase, log
from worker.store import RECEIPT_COLUMNS

TABLE = "bench_raw_receipts"
# The columns the worker writes, in its order (make_rows below follows it).
COLUMNS = ("account_id", *RECEIPT_COLUMNS, "first_seen_at", "updated_at")
_FINALS = "('Success', 'Fail', 'SubmitFail')"

DDL = f"""
CREATE TABLE {TABLE} (
    id bigserial PRIMARY KEY,
    account_id bigint NOT NULL,
    session_no text NOT NULL,
    phone text NOT NULL,
    phone_key text NOT NULL,
    result text NOT NULL CHECK (result IN ('Success', 'Fail', 'Unknow', 'SubmitFail')),
    receipt_code text,
    receipt_desc text,
    receipt_time timestamptz,
    cost_count integer,
    user_id text,
    country_code text,
    source text NOT NULL DEFAULT 'poll',
    first_seen_at timestamptz NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at timestamptz NOT NULL DEFAULT CURRENT_TIMESTAMP,
    UNIQUE (account_id, session_no, phone_key)
)
"""

# The same conflict clause as worker.store.upsert_receipts, guard included (the worker's also
# leaves a repeat of the stored receipt alone, which no pass here sends).
ON_CONFLICT = f"""
ON CONFLICT (account_id, session_no, phone_key) DO UPDATE SET
    phone = EXCLUDED.phone, result = EXCLUDED.result, receipt_code = EXCLUDED.receipt_code,
    receipt_desc = EXCLUDED.receipt_desc, receipt_time = EXCLUDED.receipt_time,
    cost_count = EXCLUDED.cost_count, user_id = EXCLUDED.user_id,
    country_code = COALESCE(EXCLUDED.country_code, t.country_code),
    source = EXCLUDED.source, updated_at = EXCLUDED.updated_at
WHERE (t.result NOT IN {_FINALS} AND EXCLUDED.result IN {_FINALS})
   OR ((t.result IN {_FINALS}) = (EXCLUDED.result IN {_FINALS})
       AND NOT (t.receipt_time IS NOT NULL AND EXCLUDED.receipt_time IS NOT NULL
                AND EXCLUDED.receipt_time < t.receipt_time))
"""
_COLS = ", ".join(COLUMNS)
INSERT = (
    f"INSERT INTO {TABLE} AS t ({_COLS}) VALUES ({', '.join(['%s'] * len(COLUMNS))}) {ON_CONFLICT}"
)


def make_rows(count: int, *, result: str, at: datetime) -> list[tuple[Any, ...]]:
    """``count`` receipts, five phones per session, spread over four accounts."""
    rows = []
    for i in range(count):
        digits = f"8613{i:09d}"
        rows.append(
            (
                1 + (i // 5) % 4,
                f"raw-{i // 5:08d}",
                f"+{digits}",
                digits,
                result,
                "DELIVRD" if result == "Success" else "UNKNOWN",
                "Delivered",
                at,
                1,
                "",
                "86",
                "poll",
                at,
                at,
            )
        )
    return rows


@dataclass(frozen=True, slots=True)
class Pass:
    rows: int
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds


def executemany_pass(database: BenchDatabase, rows: list[tuple[Any, ...]]) -> Pass:
    with database.connect(autocommit=False) as conn:
        started = time.perf_counter()
        with conn.cursor() as cur, conn.pipeline():
            cur.executemany(INSERT, rows)
        conn.commit()
        return Pass(len(rows), time.perf_counter() - started)


def copy_pass(database: BenchDatabase, rows: list[tuple[Any, ...]]) -> Pass:
    with database.connect(autocommit=False) as conn:
        started = time.perf_counter()
        with conn.cursor() as cur:
            cur.execute(
                f"CREATE TEMP TABLE raw_stage ON COMMIT DROP AS SELECT {_COLS} FROM {TABLE} "
                "WITH NO DATA"
            )
            with cur.copy(f"COPY raw_stage ({_COLS}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            cur.execute(
                f"INSERT INTO {TABLE} AS t ({_COLS}) SELECT {_COLS} FROM raw_stage {ON_CONFLICT}"
            )
        conn.commit()
        return Pass(len(rows), time.perf_counter() - started)


def run(database: BenchDatabase, *, rows: int) -> dict[str, Any]:
    """Both methods, insert then update pass each, on a table emptied between methods."""
    at = datetime.now(UTC) - timedelta(minutes=5)
    first = make_rows(rows, result="Unknow", at=at)
    second = make_rows(rows, result="Success", at=at + timedelta(seconds=30))
    results: dict[str, Any] = {"rows": rows}
    with database.connect() as conn:
        conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
        conn.execute(DDL)
    try:
        for name, method in (("executemany", executemany_pass), ("copy", copy_pass)):
            with database.connect() as conn:
                conn.execute(f"TRUNCATE {TABLE}")
                conn.execute(f"VACUUM ANALYZE {TABLE}")
            inserted = method(database, first)
            updated = method(database, second)
            with database.connect() as conn:
                row = conn.execute(
                    f"SELECT count(*), count(*) FILTER (WHERE result = 'Success') FROM {TABLE}"
                ).fetchone()
            if row is None or row[0] != rows or row[1] != rows:
                raise RuntimeError(f"raw {name}: expected {rows} updated rows, found {row}")
            results[name] = {
                "insert_rows_per_s": round(inserted.rows_per_s),
                "insert_seconds": round(inserted.seconds, 3),
                "update_rows_per_s": round(updated.rows_per_s),
                "update_seconds": round(updated.seconds, 3),
            }
            log(
                f"raw {name}: insert {inserted.rows_per_s:,.0f} rows/s, "
                f"update {updated.rows_per_s:,.0f} rows/s"
            )
    finally:
        with database.connect() as conn:
            conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
    return results
