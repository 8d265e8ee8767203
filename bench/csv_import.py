"""``receipts track --csv`` of a big file on SQLite, beside the other writers it must share the
file with: how long the import held SQLite's write lock (each transaction, timed inside the
importing process), how long the others waited for it, whether a concurrent ``receipts track``
or a worker tick failed ("database is locked"), and the import's peak RSS.

    python -m bench.csv_import --rows 400000 [--rows 1000000]

Runs in a temporary folder with its own SQLite file; touches no shared server. Exits 1 when a
concurrent writer failed, or waited longer than ``--max-wait`` seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from worker import db, poller, runtime
from worker.config import get_settings
from worker.migrate import upgrade

ROOT = Path(__file__).resolve().parents[1]
# The worker's tick runs every 30 s by default; the probes run far more often to see every hold.
PROBE_EVERY = 0.05
TRACK_EVERY = 1.0
TICK_EVERY = 1.0


@dataclass(kw_only=True)
class Writers:
    """What the other writers saw while the import ran."""

    lock_waits: list[float] = field(default_factory=list)
    lock_failures: int = 0
    tracks_ok: int = 0
    tracks_failed: list[str] = field(default_factory=list)
    track_seconds_max: float = 0.0
    ticks_ok: int = 0
    ticks_failed: list[str] = field(default_factory=list)
    tick_seconds_max: float = 0.0


def write_csv(path: Path, rows: int) -> None:
    """``rows`` valid sessions, sent now (empty ``sent_at``): with a first poll hours away,
    none falls due during the run and the ticks only write their heartbeat."""
    with path.open("w", encoding="utf-8") as handle:
        handle.write("account_id,session_no,phones,sent_at\n")
        for i in range(rows):
            handle.write(f'{1 + i % 8},CSV-{i:09d},"(852)5{i % 10_000_000:07d}",\n')


def _child(csv_path: str, holds_path: str) -> int:
    """The import itself: ``receipts track --csv`` in this process, timing each hold of the
    write lock (from BEGIN IMMEDIATE granted to COMMIT) into ``holds_path``."""
    from worker import cli

    holds: list[float] = []
    begin = db._sqlite_begin

    def timed_begin(connection: sa.Connection) -> None:
        begin(connection)  # returns once SQLite granted the write lock
        connection.info["locked_at"] = time.perf_counter()

    def released(connection: sa.Connection) -> None:
        locked_at = connection.info.pop("locked_at", None)
        if locked_at is not None:
            holds.append(time.perf_counter() - locked_at)

    db._sqlite_begin = timed_begin  # read when the engine is created, below
    sa.event.listen(sa.engine.Engine, "commit", released)
    sa.event.listen(sa.engine.Engine, "rollback", released)
    try:
        cli.main(["track", "--csv", csv_path], standalone_mode=False)
    finally:
        holds.sort()
        Path(holds_path).write_text(
            json.dumps(
                {
                    "transactions": len(holds),
                    "longest_hold_s": round(holds[-1], 3) if holds else 0.0,
                    "p99_hold_s": round(holds[int(len(holds) * 0.99)], 3) if holds else 0.0,
                    "total_hold_s": round(sum(holds), 1),
                }
            )
        )
    return 0


def _probe_lock(url: str, stop: threading.Event, seen: Writers) -> None:
    """Take and release the write lock (BEGIN IMMEDIATE, as every unit of work does) over and
    over; the wait is how long the importer held it."""
    engine = db.create_engine(url, poolclass=sa.pool.NullPool)
    while not stop.is_set():
        started = time.perf_counter()
        try:
            with engine.begin():
                pass
        except sa.exc.OperationalError:
            seen.lock_failures += 1
        seen.lock_waits.append(time.perf_counter() - started)
        time.sleep(PROBE_EVERY)
    engine.dispose()


def _concurrent_tracks(env: dict[str, str], stop: threading.Event, seen: Writers) -> None:
    number = 0
    while not stop.is_set():
        number += 1
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "worker.cli", "track", "--account-id", "99", f"SIDE-{number}"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        seen.track_seconds_max = max(seen.track_seconds_max, time.perf_counter() - started)
        if done.returncode == 0:
            seen.tracks_ok += 1
        else:
            seen.tracks_failed.append(done.stderr.strip()[-200:])
        stop.wait(TRACK_EVERY)


def _ticks(stop: threading.Event, seen: Writers) -> None:
    settings = get_settings()
    while not stop.is_set():
        started = time.perf_counter()
        try:
            poller.tick(
                session_factory=db.session_scope,
                clock=runtime.utcnow,
                policy=settings.poll_policy(),
                dispatch=lambda _claim: None,
                lease=settings.lease,
                tick_every=settings.tick,
            )
        except sa.exc.OperationalError as exc:
            seen.ticks_failed.append(db.error_text(exc))
        else:
            seen.ticks_ok += 1
        seen.tick_seconds_max = max(seen.tick_seconds_max, time.perf_counter() - started)
        stop.wait(TICK_EVERY)


def run(rows: int, folder: Path) -> dict[str, Any]:
    url = f"sqlite:///{folder / 'receipts.db'}"
    upgrade(url)
    csv_path = folder / "sessions.csv"
    write_csv(csv_path, rows)
    # No session falls due during the run, however long it takes: the ticks measure the lock,
    # not the claiming of 400k sessions.
    settings = {"RECEIPTS_DATABASE_URL": url, "RECEIPTS_FIRST_POLL_DELAY": "6h"}
    env = {**os.environ, **settings}
    os.environ.update(settings)
    get_settings.cache_clear()
    db.reset_engine()

    seen = Writers()
    stop = threading.Event()
    threads = [
        threading.Thread(target=_probe_lock, args=(url, stop, seen), daemon=True),
        threading.Thread(target=_concurrent_tracks, args=(env, stop, seen), daemon=True),
        threading.Thread(target=_ticks, args=(stop, seen), daemon=True),
    ]
    output, holds = folder / "import.out", folder / "holds.json"
    started = time.perf_counter()
    with output.open("wb") as sink:
        # To a file, not a pipe: nobody reads a pipe while we wait, and a full one would block.
        importer = subprocess.Popen(
            [sys.executable, "-m", "bench.csv_import", "--child", str(csv_path), str(holds)],
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    for thread in threads:
        thread.start()
    # wait4 gives the importer's own peak RSS (ru_maxrss, in KiB on Linux).
    _, status, usage = os.wait4(importer.pid, 0)
    seconds = time.perf_counter() - started
    importer.returncode = os.waitstatus_to_exitcode(status)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    waits = seen.lock_waits
    return {
        "rows": rows,
        "import_exit_code": importer.returncode,
        "import_output": output.read_text(errors="replace")[-300:].strip(),
        "import_seconds": round(seconds, 1),
        "import_peak_rss_mb": round(usage.ru_maxrss / 1024),
        "import_lock_holds": json.loads(holds.read_text()) if holds.exists() else None,
        "longest_lock_wait_s": round(max(waits, default=0.0), 3),
        "lock_probes": len(waits),
        "lock_probe_failures": seen.lock_failures,
        "concurrent_tracks_ok": seen.tracks_ok,
        "concurrent_tracks_failed": len(seen.tracks_failed),
        "concurrent_track_longest_s": round(seen.track_seconds_max, 2),
        "ticks_ok": seen.ticks_ok,
        "ticks_failed": len(seen.ticks_failed),
        "tick_longest_s": round(seen.tick_seconds_max, 2),
        "failures": sorted(set(seen.tracks_failed + seen.ticks_failed))[:3],
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, action="append", help="rows per run (repeatable)")
    parser.add_argument("--max-wait", type=float, default=5.0, help="seconds; a miss exits 1")
    parser.add_argument("--child", nargs=2, metavar=("CSV", "HOLDS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(*args.child)
    ok = True
    for rows in args.rows or [400_000]:
        with tempfile.TemporaryDirectory(prefix="receipts-csv-") as folder:
            result = run(rows, Path(folder))
        print(json.dumps(result), flush=True)
        ok &= (
            result["import_exit_code"] == 0
            and not result["concurrent_tracks_failed"]
            and not result["ticks_failed"]
            and result["longest_lock_wait_s"] <= args.max_wait
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
