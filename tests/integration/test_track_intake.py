"""Tracking through the public entry points, on both backends: ``track_many`` validates
``TrackRequest`` instances like dicts, and ``receipts track`` streams big inputs in short
transactions after validating them whole."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

import worker
from tests.support.databases import Configure
from worker import api, db, poller, runtime
from worker.api import MAX_NAMED_PROBLEMS, track_stream
from worker.cli import main
from worker.config import get_settings
from worker.errors import TrackError, TrackInterrupted
from worker.migrate import upgrade
from worker.models import sessions_table
from worker.tracking import TrackRequest

SENT_AT = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)


def _sessions() -> dict[tuple[int, str], dict[str, Any]]:
    with db.session_scope() as session:
        rows = session.execute(sa.select(sessions_table)).mappings()
        return {(row["account_id"], row["session_no"]): dict(row) for row in rows}


# --- track_many and TrackRequest instances (issue 13, item 14) ---------------------------------


@pytest.mark.usefixtures("database")
@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"session_no": "S 1"}, "session_no"),
        ({"phones": ("not a phone",)}, "phones"),
        ({"sent_at": SENT_AT.replace(tzinfo=None)}, "sent_at"),
        ({"user_ref": "r" * 5000}, "user_ref"),
    ],
    ids=["session-no-with-space", "non-phone", "naive-sent-at", "5000-char-user-ref"],
)
def test_track_many_refuses_an_invalid_track_request_and_records_nothing(
    overrides: dict[str, Any], field: str
) -> None:
    good = TrackRequest(account_id=1, session_no="GOOD", sent_at=SENT_AT)
    bad = TrackRequest(**{"account_id": 1, "session_no": "BAD", "sent_at": SENT_AT, **overrides})
    with pytest.raises(TrackError) as info:
        worker.track_many([good, bad])
    message = str(info.value)
    assert message.startswith("1 problem: row 2")
    assert f": {field}" in message
    assert "nothing was recorded" in message
    assert _sessions() == {}


@pytest.mark.usefixtures("database")
def test_track_many_stores_a_valid_track_request_normalized() -> None:
    request = TrackRequest(
        account_id=1,
        session_no="S1",
        phones=("(852)55311111", "+852 5531 1111"),
        sent_at=SENT_AT.astimezone(timezone(timedelta(hours=8))),
    )
    assert worker.track_many([request]).inserted == 1
    row = _sessions()[(1, "S1")]
    assert row["phones"] == ["(852)55311111"], "the same phone spelled twice is one phone"
    assert row["sent_at"] == SENT_AT
    assert row["sent_at"].utcoffset() == timedelta(0)


# --- streamed imports: receipts track (issue 13, item 11) ---------------------------------------

ROOT = Path(__file__).resolve().parents[2]
CSV_HEADER = "account_id,session_no,phones,sent_at\n"


def _csv(rows: int, *, bad_line: int | None = None, prefix: str = "C") -> str:
    """A CSV of ``rows`` sessions of account 7; the row on ``bad_line`` (the header is line 1)
    has account_id 0."""
    lines = [CSV_HEADER]
    for i in range(rows):
        account = 0 if bad_line == i + 2 else 7
        lines.append(f'{account},{prefix}{i:06d},"(852)5{i:07d}",\n')
    return "".join(lines)


def _count(prefix: str) -> int:
    with db.read_scope() as session:
        return (
            session.scalar(
                sa.select(sa.func.count())
                .select_from(sessions_table)
                .where(sessions_table.c.session_no.like(f"{prefix}%"))
            )
            or 0
        )


def _invoke(*args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=stdin)


@pytest.mark.usefixtures("database")
def test_track_csv_reads_the_file_from_stdin() -> None:
    result = _invoke("track", "--csv", "-", stdin="\ufeff" + _csv(3))
    assert result.exit_code == 0, result.output
    assert "tracked 3 session(s): 3 new" in result.output
    assert _count("C") == 3


@pytest.mark.usefixtures("database")
def test_a_bad_row_past_the_first_chunks_records_nothing(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    path.write_text(_csv(5_000, bad_line=4_500), encoding="utf-8")
    result = _invoke("track", "--csv", str(path))
    assert result.exit_code == 2, result.output
    assert "1 problem: CSV line 4500 (session_no 'C004498'): account_id" in result.stderr
    assert "the 4999 valid row(s) were not recorded either" in result.stderr
    assert _count("C") == 0


@pytest.mark.usefixtures("database")
def test_bad_rows_are_named_up_to_a_cap_and_counted_beyond_it() -> None:
    rows = [(n, {"account_id": 0, "session_no": f"B{n}"}) for n in range(1, 2_501)]
    with pytest.raises(TrackError) as info:
        track_stream(lambda: iter(rows), label="item")
    error = info.value
    assert len(error.problems) == MAX_NAMED_PROBLEMS
    assert error.omitted == 2_500 - MAX_NAMED_PROBLEMS
    message = str(error)
    assert message.startswith("2500 problems: item 1 (session_no 'B1'): account_id")
    assert f"; and {2_500 - MAX_NAMED_PROBLEMS} more bad row(s); nothing was recorded" in message


@pytest.mark.usefixtures("database")
def test_an_import_is_recorded_in_chunks_each_its_own_transaction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = api.track_requests
    seen: list[tuple[int, int]] = []

    def spy(session: Any, requests: Any, **kwargs: Any) -> Any:
        # What another connection sees as each chunk starts: the chunks committed before it.
        seen.append((len(requests), _count("C")))
        return real(session, requests, **kwargs)

    monkeypatch.setattr(api, "track_requests", spy)
    rows = [(n, {"account_id": 7, "session_no": f"C{n:06d}"}) for n in range(1, 1_051)]
    result = track_stream(lambda: iter(rows), chunk_size=100)
    assert (result.inserted, result.total) == (1_050, 1_050)
    assert seen == [(100, 100 * k) for k in range(10)] + [(50, 1_000)]
    assert _count("C") == 1_050


@pytest.mark.usefixtures("database")
def test_an_import_tells_its_progress() -> None:
    """What `receipts track` draws its progress bar from: rows validated every 1,000, then
    rows recorded after each chunk, out of the valid rows."""
    told: list[tuple[str, int, int | None]] = []
    rows = [(n, {"account_id": 7, "session_no": f"P{n:06d}"}) for n in range(1, 2_501)]
    track_stream(lambda: iter(rows), chunk_size=1_000, progress=lambda *p: told.append(p))
    assert told == [
        ("validating", 1_000, None),
        ("validating", 2_000, None),
        ("validating", 2_500, 2_500),
        ("recording", 1_000, 2_500),
        ("recording", 2_000, 2_500),
        ("recording", 2_500, 2_500),
    ]


def test_no_progress_bar_where_stderr_is_no_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from worker.cli import _import_progress

    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a pipe, a log file
    monkeypatch.delenv("FORCE_COLOR", raising=False)  # which rich reads as "a terminal"
    with _import_progress() as progress:
        assert progress is None


@pytest.mark.usefixtures("database")
def test_a_database_failure_part_way_keeps_the_recorded_chunks_and_a_rerun_completes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rows = [(n, {"account_id": 7, "session_no": f"C{n:06d}"}) for n in range(1, 501)]
    real = api.track_requests
    calls = 0

    def failing_third_chunk(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise sa.exc.OperationalError("INSERT ...", {}, Exception("disk I/O error"))
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "track_requests", failing_third_chunk)
    with pytest.raises(TrackInterrupted) as info:
        track_stream(lambda: iter(rows), chunk_size=100)
    assert (info.value.recorded, info.value.total) == (200, 500)
    message = str(info.value)
    assert "disk I/O error" in message
    assert "200 of 500 row(s) were recorded before it" in message
    assert "running the same command again completes the import" in message
    assert "INSERT" not in message
    assert _count("C") == 200

    monkeypatch.setattr(api, "track_requests", real)
    again = track_stream(lambda: iter(rows), chunk_size=100)
    assert (again.inserted, again.unchanged) == (300, 200)
    assert _count("C") == 500


@pytest.mark.usefixtures("database")
def test_memory_stays_flat_whatever_the_number_of_rows() -> None:
    """Neither pass keeps the rows: four times the rows, about the same peak."""

    def peak(rows: int, prefix: str) -> int:
        def source() -> Iterator[tuple[int, dict[str, Any]]]:
            for n in range(1, rows + 1):
                yield (
                    n,
                    {"account_id": 7, "session_no": f"{prefix}{n:07d}", "phones": "85255310001"},
                )

        tracemalloc.start()
        try:
            assert track_stream(source, chunk_size=500).inserted == rows
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peak(1_000, "W")  # compiles and caches the statements first
    small, large = peak(2_000, "S"), peak(8_000, "L")
    assert large < small * 1.5, (small, large)


@pytest.mark.usefixtures("configure")
def test_a_concurrent_track_and_tick_interleave_with_a_big_import_on_sqlite(
    tmp_path: Path, configure: Configure
) -> None:
    """SQLite has one write lock for the whole file. An import used to hold it for its whole
    length (over 30 s for 400k rows, and writers waiting longer failed with "database is
    locked"); each chunk now holds it briefly, and other writers get in between chunks."""
    url = f"sqlite:///{tmp_path / 'receipts.db'}"
    upgrade(url)
    configure(RECEIPTS_DATABASE_URL=url)
    rows = 20_000
    out_path, err_path = tmp_path / "import.out", tmp_path / "import.err"
    with out_path.open("w") as out_file, err_path.open("w") as err_file:
        importer = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "track", "--csv", "-"],
            cwd=ROOT,
            env={**os.environ, "RECEIPTS_DATABASE_URL": url},
            stdin=subprocess.PIPE,
            stdout=out_file,
            stderr=err_file,
            text=True,
        )
    assert importer.stdin is not None
    # Through a pipe, which cannot be read twice: the command keeps a temporary copy.
    importer.stdin.write(_csv(rows, prefix="I"))
    importer.stdin.close()

    settings = get_settings()
    seen_mid_import: list[int] = []
    failures: list[str] = []
    # A reader beside the writers (WAL: never blocked) sees the chunks commit one by one.
    stop = threading.Event()

    def read_counts() -> None:
        while not stop.is_set():
            seen_mid_import.append(_count("I"))
            time.sleep(0.01)

    reader = threading.Thread(target=read_counts)
    reader.start()
    deadline = time.monotonic() + 300
    number = 0
    while importer.poll() is None and time.monotonic() < deadline:
        number += 1
        try:
            worker.track(f"SIDE-{number}", 99)
            poller.tick(
                session_factory=db.session_scope,
                clock=runtime.utcnow,
                policy=settings.poll_policy(),
                dispatch=lambda _claim: None,
                lease=settings.lease,
                tick_every=settings.tick,
            )
        except sa.exc.OperationalError as exc:
            failures.append(db.error_text(exc))
        time.sleep(0.02)
    importer.wait(timeout=60)
    stop.set()
    reader.join(timeout=10)
    out, err = out_path.read_text(), err_path.read_text()
    assert importer.returncode == 0, err
    assert f"tracked {rows} session(s): {rows} new" in out
    assert failures == []
    assert _count("I") == rows
    # The import committed in chunks: it was seen half done. (Our writers got in between
    # chunks when the machine was quiet; SQLite's lock is not fair, so a busy machine can
    # starve them until the end, which the assertion above shows costs them no failure.)
    assert any(0 < count < rows for count in seen_mid_import), seen_mid_import[-20:]
