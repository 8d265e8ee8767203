"""The ``receipts`` command line, run in-process with click's CliRunner against real
PostgreSQL and SQLite databases (every test using ``database`` runs on both), checking what
each command leaves in the tables."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import Result

from tests.support.cli import invoke, ok
from tests.support.databases import Configure
from worker import db
from worker.models import receipts_table, sessions_table
from worker.reports import STALE_CSV_COLUMNS

COMMANDS = (
    "migrate",
    "track",
    "run",
    "worker",
    "beat",
    "status",
    "stale",
    "simulate",
    "check",
    "events",
)
PHONES = "(852)55311111,(852)55311112"
# Hours before the real time, whatever the date: `track` refuses a sent_at in its clock's future,
# and `stale` (the view, on the database's clock) finds such a session's poll long overdue.
SENT_AT_UTC = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
SENT_AT = SENT_AT_UTC.astimezone(timezone(timedelta(hours=8))).isoformat()  # a sender at +08:00
NAIVE_SENT_AT = SENT_AT_UTC.replace(tzinfo=None).isoformat()
FUTURE_SENT_AT = (SENT_AT_UTC + timedelta(days=1)).isoformat()
FIRST_POLL_DELAY = timedelta(seconds=1)  # RECEIPTS_FIRST_POLL_DELAY in conftest's FAST_TIMINGS
CSV_HEADER = "account_id,session_no,phones,sent_at\n"


def _sessions() -> dict[tuple[int, str], dict[str, Any]]:
    with db.session_scope() as session:
        rows = session.execute(sa.select(sessions_table)).mappings()
        return {(row["account_id"], row["session_no"]): dict(row) for row in rows}


def _track(*args: str, stdin: str | None = None) -> Result:
    return ok(invoke("track", *args, stdin=stdin))


def _escalate(session_no: str, phones: list[dict[str, Any]], *, account_id: int = 7) -> None:
    with db.session_scope() as session:
        session.execute(
            sa.update(sessions_table)
            .where(
                sessions_table.c.account_id == account_id,
                sessions_table.c.session_no == session_no,
            )
            .values(
                state="escalated",
                escalated_at=datetime.now(UTC),
                poll_count=3,
                next_poll_at=None,
                escalation_detail={"phones": phones, "poll_count": 3, "last_error": None},
            )
        )


# --- help ---------------------------------------------------------------------------------


def test_help_lists_every_command() -> None:
    result = ok(invoke("--help"))
    listed = {
        line.split()[0] for line in result.output.split("Commands:")[1].splitlines() if line.strip()
    }
    assert set(COMMANDS) <= listed


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command: str) -> None:
    result = ok(invoke(command, "--help"))
    assert f"Usage: main {command}" in result.output or f"{command} [OPTIONS]" in result.output


# --- migrate ------------------------------------------------------------------------------


def test_migrate_creates_the_tables_on_a_fresh_sqlite_file_and_can_run_again(
    configure: Configure, tmp_path: Path
) -> None:
    path = tmp_path / "fresh.db"
    url = f"sqlite:///{path}"
    configure(RECEIPTS_DATABASE_URL=url)
    for _ in range(2):
        assert "newest schema" in ok(invoke("migrate")).output
        engine = db.create_engine(url, poolclass=sa.pool.NullPool)
        tables = set(sa.inspect(engine).get_table_names())
        with engine.connect() as connection:
            versions = connection.execute(sa.text("SELECT version_num FROM alembic_version")).all()
        engine.dispose()
        assert {"sms_sessions", "sms_receipts", "alembic_version"} <= tables
        assert len(versions) == 1
    # The migrated file is usable straight away.
    _track("--account-id", "7", "S1")
    assert list(_sessions()) == [(7, "S1")]


# --- track --------------------------------------------------------------------------------


@pytest.mark.usefixtures("database")
def test_track_records_pending_sessions_and_is_idempotent() -> None:
    args = ("--account-id", "7", "--phones", PHONES, "--sent-at", SENT_AT, "S1", "S2")
    result = _track(*args)
    assert "tracked 2 session(s): 2 new, 0 merged, 0 unchanged" in result.output
    sessions = _sessions()
    assert set(sessions) == {(7, "S1"), (7, "S2")}
    for row in sessions.values():
        assert row["phones"] == ["(852)55311111", "(852)55311112"]
        assert row["sent_at"] == SENT_AT_UTC
        assert row["sent_at"].utcoffset() == timedelta(0)
        assert row["state"] == "pending"
        assert row["next_poll_at"] == SENT_AT_UTC + FIRST_POLL_DELAY
        assert row["poll_count"] == 0
        assert row["user_ref"] is None
        assert row["resolved_at"] is None
        assert row["escalated_at"] is None

    result = _track(*args)
    assert "tracked 2 session(s): 0 new, 0 merged, 2 unchanged" in result.output
    assert _sessions() == sessions

    # The same phone spelled differently is no news; a new phone merges into the session.
    result = _track("--account-id", "7", "--phones", "+852 5531 1111", "S1")
    assert "0 new, 0 merged, 1 unchanged" in result.output
    result = _track("--account-id", "7", "--phones", "(852)55311113", "--sent-at", SENT_AT, "S1")
    assert "tracked 1 session(s): 0 new, 1 merged, 0 unchanged" in result.output
    after = _sessions()
    assert len(after) == 2
    assert after[(7, "S1")]["phones"] == ["(852)55311111", "(852)55311112", "(852)55311113"]
    assert after[(7, "S1")]["sent_at"] == SENT_AT_UTC
    assert after[(7, "S1")]["next_poll_at"] == SENT_AT_UTC + FIRST_POLL_DELAY
    assert after[(7, "S2")] == sessions[(7, "S2")]


@pytest.mark.usefixtures("database")
def test_track_without_sent_at_uses_now() -> None:
    before = datetime.now(UTC)
    _track("--account-id", "7", "S1")
    after = datetime.now(UTC)
    row = _sessions()[(7, "S1")]
    assert before <= row["sent_at"] <= after
    assert row["phones"] == []
    assert row["next_poll_at"] == row["sent_at"] + FIRST_POLL_DELAY


@pytest.mark.usefixtures("database")
def test_track_reads_session_nos_from_stdin() -> None:
    stdin = "S1\n\n  S2  \n\n\nS3\n"
    result = _track("--account-id", "7", "--sent-at", SENT_AT, "S0", "-", stdin=stdin)
    assert "tracked 4 session(s): 4 new" in result.output
    sessions = _sessions()
    assert set(sessions) == {(7, "S0"), (7, "S1"), (7, "S2"), (7, "S3")}
    assert all(row["sent_at"] == SENT_AT_UTC for row in sessions.values())


@pytest.mark.usefixtures("database")
def test_track_from_stdin_with_nothing_is_a_usage_error() -> None:
    result = invoke("track", "--account-id", "7", "-", stdin="\n\n")
    assert result.exit_code == 2
    assert "SESSION_NO" in result.stderr
    assert _sessions() == {}


@pytest.mark.usefixtures("database")
def test_track_csv_records_every_row(tmp_path: Path) -> None:
    path = tmp_path / "sessions.csv"
    path.write_text(
        CSV_HEADER
        + f'7,C1,"{PHONES}",{SENT_AT}\n'
        + f"7,C2,,{SENT_AT_UTC - timedelta(hours=1):%Y-%m-%dT%H:%M:%S}Z\n"
        + "8,C3,(852)55311113,\n"
        + f"8,C1,,{(SENT_AT_UTC - timedelta(minutes=30)).isoformat()}\n",
        encoding="utf-8",
    )
    before = datetime.now(UTC)
    result = _track("--csv", str(path))
    after = datetime.now(UTC)
    assert "tracked 4 session(s): 4 new, 0 merged, 0 unchanged" in result.output
    sessions = _sessions()
    assert set(sessions) == {(7, "C1"), (7, "C2"), (8, "C3"), (8, "C1")}
    assert sessions[(7, "C1")]["phones"] == ["(852)55311111", "(852)55311112"]
    assert sessions[(7, "C1")]["sent_at"] == SENT_AT_UTC
    assert sessions[(7, "C2")]["phones"] == []
    assert sessions[(7, "C2")]["sent_at"] == SENT_AT_UTC - timedelta(hours=1)
    assert sessions[(8, "C3")]["phones"] == ["(852)55311113"]
    assert before <= sessions[(8, "C3")]["sent_at"] <= after
    assert sessions[(8, "C1")]["sent_at"] == SENT_AT_UTC - timedelta(minutes=30)
    for row in sessions.values():
        assert row["state"] == "pending"
        assert row["next_poll_at"] == row["sent_at"] + FIRST_POLL_DELAY

    # Again: nothing new.
    result = _track("--csv", str(path))
    assert "tracked 4 session(s): 0 new, 0 merged, 4 unchanged" in result.output
    assert _sessions() == sessions


@pytest.mark.usefixtures("database")
def test_track_csv_with_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_text(CSV_HEADER + "7,C1,,\n", encoding="utf-8-sig")
    _track("--csv", str(path))
    assert list(_sessions()) == [(7, "C1")]


@pytest.mark.usefixtures("database")
@pytest.mark.parametrize(
    ("bad_row", "field"),
    [
        ("0,B1,,", "account_id"),
        ("7,B1,(852)5531x111,", "phone"),
        (f"7,B1,,{NAIVE_SENT_AT}", "sent_at"),
        ("7,B1,,,surplus", "extra"),
        ("7,,,", "session_no"),
    ],
    ids=["account-id-zero", "malformed-phone", "naive-sent-at", "extra-field", "no-session-no"],
)
def test_track_csv_with_a_bad_row_records_nothing(tmp_path: Path, bad_row: str, field: str) -> None:
    _track("--account-id", "7", "--phones", "(852)55311111", "--sent-at", SENT_AT, "P1")
    before = _sessions()
    path = tmp_path / "bad.csv"
    path.write_text(
        CSV_HEADER
        # A good row that would merge a phone into the pre-recorded session...
        + f"7,P1,(852)55311119,{SENT_AT}\n"
        + bad_row
        + "\n"
        # ...and one that would add a session: neither may be recorded.
        + "7,G1,,\n",
        encoding="utf-8",
    )
    result = invoke("track", "--csv", str(path))
    assert result.exit_code == 2, result.output
    assert "CSV line 3" in result.stderr
    assert field in result.stderr
    assert "nothing was recorded" in result.stderr
    assert "CSV line 2" not in result.stderr
    assert "CSV line 4" not in result.stderr
    assert result.stdout == ""
    assert _sessions() == before


@pytest.mark.usefixtures("database")
def test_track_csv_names_every_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(CSV_HEADER + "0,B1,,\n7,B2,,\n7,B3,12,\n", encoding="utf-8")
    result = invoke("track", "--csv", str(path))
    assert result.exit_code == 2
    assert "2 problems" in result.stderr
    assert "CSV line 2 (session_no 'B1'): account_id" in result.stderr
    assert "CSV line 4 (session_no 'B3'): phones" in result.stderr
    assert "nothing was recorded" in result.stderr
    assert _sessions() == {}


@pytest.mark.usefixtures("database")
def test_track_csv_line_numbers_count_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "gaps.csv"
    path.write_text(CSV_HEADER + "7,A,,\n\n7,B,,\n\n0,C,,\n", encoding="utf-8")
    result = invoke("track", "--csv", str(path))
    assert result.exit_code == 2
    assert "CSV line 6 (session_no 'C'): account_id" in result.stderr
    assert "the 2 valid row(s) were not recorded either" in result.stderr
    assert _sessions() == {}

    path.write_text(CSV_HEADER + "\n7,A,,\n\n7,B,,\n\n", encoding="utf-8")
    assert "2 new" in _track("--csv", str(path)).output
    assert set(_sessions()) == {(7, "A"), (7, "B")}


@pytest.mark.usefixtures("database")
def test_track_csv_with_only_a_header_tracks_nothing(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text(CSV_HEADER, encoding="utf-8")
    assert "tracked 0 session(s)" in _track("--csv", str(path)).output
    assert _sessions() == {}


@pytest.mark.usefixtures("database")
@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("account_id,phones,sent_at\n7,,\n", "session_no"),
        ("session_no,phones\nS1,\n", "account_id"),
        ("", "account_id"),
        ("account_id,session_no,phone\n7,S1,\n", "unknown column"),
    ],
    ids=["no-session-no", "no-account-id", "empty-file", "misspelled-column"],
)
def test_track_csv_with_a_bad_header_is_a_usage_error(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "header.csv"
    path.write_text(content, encoding="utf-8")
    result = invoke("track", "--csv", str(path))
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert _sessions() == {}


@pytest.mark.usefixtures("database")
def test_track_csv_and_arguments_together_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text(CSV_HEADER + "7,C1,,\n", encoding="utf-8")
    result = invoke("track", "--csv", str(path), "S1")
    assert result.exit_code == 2
    assert "--csv" in result.stderr
    assert _sessions() == {}


@pytest.mark.usefixtures("database")
@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("S1",), "--account-id"),
        (("--account-id", "abc", "S1"), "account_id"),
        (("--account-id", "0", "S1"), "account_id"),
        (("--account-id", "7", ""), "session_no"),
        (("--account-id", "7", "X" * 200), "session_no"),
        (("--account-id", "7", "S 1"), "session_no"),
        (("--account-id", "7", "--sent-at", "yesterday", "S1"), "sent_at"),
        (("--account-id", "7", "--sent-at", NAIVE_SENT_AT, "S1"), "sent_at"),
        (("--account-id", "7", "--sent-at", FUTURE_SENT_AT, "S1"), "sent_at"),
        (("--account-id", "7", "--phones", "(852)55311111,,", "S1"), "phones"),
        (("--account-id", "7", "--phones", "call me", "S1"), "phones"),
        (("--account-id", "7"), "SESSION_NO"),
    ],
    ids=[
        "no-account-id",
        "account-id-abc",
        "account-id-zero",
        "empty-session-no",
        "long-session-no",
        "session-no-with-space",
        "sent-at-yesterday",
        "naive-sent-at",
        "future-sent-at",
        "empty-phone",
        "malformed-phone",
        "no-session-no",
    ],
)
def test_track_refuses_bad_input(args: tuple[str, ...], field: str) -> None:
    result = invoke("track", *args)
    assert result.exit_code == 2, result.output
    assert field in result.stderr
    assert result.stdout == ""
    assert _sessions() == {}


@pytest.mark.usefixtures("database")
def test_track_names_the_bad_argument_among_good_ones() -> None:
    result = invoke("track", "--account-id", "7", "S1", "X" * 200, "S3")
    assert result.exit_code == 2
    assert "SESSION_NO 2" in result.stderr
    assert "200 characters" in result.stderr
    assert "the 2 valid row(s) were not recorded either" in result.stderr
    assert _sessions() == {}


@pytest.mark.usefixtures("database")
@pytest.mark.parametrize(
    "args",
    [("track", "--account-id", "7", "S1"), ("status", "S1"), ("stale",), ("migrate",)],
    ids=["track", "status", "stale", "migrate"],
)
def test_bad_settings_are_reported_naming_the_variable(
    configure: Configure, args: tuple[str, ...]
) -> None:
    configure(RECEIPTS_POLL_INTERVAL_MIN="10", RECEIPTS_POLL_INTERVAL_MAX="5")
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert "RECEIPTS_POLL_INTERVAL_MIN" in result.stderr
    assert "Traceback" not in result.output
    configure(RECEIPTS_POLL_INTERVAL_MIN="1", RECEIPTS_POLL_INTERVAL_MAX="2")
    assert _sessions() == {}


# --- status -------------------------------------------------------------------------------


def _insert_receipt(session_no: str, phone: str, result: str, *, account_id: int = 7) -> None:
    now = datetime.now(UTC)
    with db.session_scope() as session:
        session.execute(
            sa.insert(receipts_table).values(
                account_id=account_id,
                session_no=session_no,
                phone=phone,
                phone_key="85255311111",
                result=result,
                receipt_code="DELIVRD",
                receipt_desc="delivered",
                receipt_time=SENT_AT_UTC + timedelta(seconds=5),
                cost_count=1,
                user_id="u-1",
                first_seen_at=now,
                updated_at=now,
            )
        )


@pytest.mark.usefixtures("database")
def test_status_shows_state_phones_and_receipts() -> None:
    _track("--account-id", "7", "--phones", PHONES, "--sent-at", SENT_AT, "S1")
    result = ok(invoke("status", "S1"))
    assert "pending" in result.output
    assert "(852)55311111, (852)55311112" in result.output
    assert "DELIVRD" not in result.output

    _insert_receipt("S1", "(852)55311111", "Success")
    result = ok(invoke("status", "S1"))
    assert "Success" in result.output
    assert "DELIVRD" in result.output

    found = json.loads(ok(invoke("status", "S1", "--json")).stdout)
    assert found["state"] == "pending"
    assert found["account_id"] == 7
    assert found["session_no"] == "S1"
    assert found["phones"] == ["(852)55311111", "(852)55311112"]
    assert found["sent_at"] == SENT_AT_UTC.isoformat()
    assert found["next_poll_at"] == (SENT_AT_UTC + FIRST_POLL_DELAY).isoformat()
    assert "id" not in found
    assert "claim_token" not in found
    assert found["receipts"] == [
        {
            "account_id": 7,
            "session_no": "S1",
            "phone": "(852)55311111",
            "phone_key": "85255311111",
            "result": "Success",
            "receipt_code": "DELIVRD",
            "receipt_desc": "delivered",
            "receipt_time": (SENT_AT_UTC + timedelta(seconds=5)).isoformat(),
            "cost_count": 1,
            "user_id": "u-1",
            "country_code": None,
            "source": "poll",
            "first_seen_at": found["receipts"][0]["first_seen_at"],
            "updated_at": found["receipts"][0]["updated_at"],
        }
    ]


@pytest.mark.usefixtures("database")
def test_status_of_an_unknown_session_exits_1() -> None:
    _track("--account-id", "7", "S1")
    result = invoke("status", "NOPE")
    assert result.exit_code == 1
    assert "'NOPE' is not tracked" in result.stderr
    result = invoke("status", "S1", "--account-id", "8")
    assert result.exit_code == 1
    assert "not tracked" in result.stderr


@pytest.mark.usefixtures("database")
def test_status_of_a_session_no_in_two_accounts_needs_the_account() -> None:
    _track("--account-id", "7", "--phones", "(852)55311111", "S1")
    _track("--account-id", "8", "--phones", "(852)55311112", "S1")
    result = invoke("status", "S1")
    assert result.exit_code == 1
    assert "--account-id" in result.stderr
    assert "7" in result.stderr
    assert "8" in result.stderr

    found = json.loads(ok(invoke("status", "S1", "--account-id", "8", "--json")).stdout)
    assert found["account_id"] == 8
    assert found["phones"] == ["(852)55311112"]
    assert "(852)55311111" in ok(invoke("status", "S1", "--account-id", "7")).output


# --- stale --------------------------------------------------------------------------------


@pytest.mark.usefixtures("database")
def test_stale_with_nothing_stale() -> None:
    _track("--account-id", "7", "S1")  # sent now, first poll still ahead
    assert "no stale sessions" in ok(invoke("stale")).output
    assert json.loads(ok(invoke("stale", "--json")).stdout) == []
    rows = list(csv.reader(io.StringIO(ok(invoke("stale", "--csv")).stdout)))
    assert rows == [list(STALE_CSV_COLUMNS)]
    assert "no stale sessions" in ok(invoke("stale", "--fail")).output


@pytest.mark.usefixtures("database")
def test_stale_lists_escalated_sessions_and_fails_on_them() -> None:
    _track("--account-id", "7", "--phones", PHONES, "--sent-at", SENT_AT, "S1")
    _track("--account-id", "7", "--phones", PHONES, "S2")  # sent now: neither escalated nor overdue
    detail = [
        {"phone": "(852)55311111", "last_result": "Unknow"},
        {"phone": "(852)55311112", "last_result": None},
    ]
    _escalate("S1", detail)

    table = ok(invoke("stale")).output
    assert "1 stale session(s)" in table
    assert "escalated" in table
    assert "S1" in table
    assert "S2" not in table
    assert "(852)55311111=Unknow" in table
    assert "(852)55311112=none" in table

    rows = json.loads(ok(invoke("stale", "--json")).stdout)
    assert len(rows) == 1
    row = rows[0]
    assert row["kind"] == "escalated"
    assert row["state"] == "escalated"
    assert (row["account_id"], row["session_no"]) == (7, "S1")
    assert row["phones"] == detail
    assert row["poll_count"] == 3
    assert row["next_poll_at"] is None
    assert row["sent_at"] == SENT_AT_UTC.isoformat()
    assert row["escalated_at"]

    lines = list(csv.DictReader(io.StringIO(ok(invoke("stale", "--csv")).stdout)))
    assert [(r["kind"], r["session_no"], r["phone"], r["last_result"]) for r in lines] == [
        ("escalated", "S1", "(852)55311111", "Unknow"),
        ("escalated", "S1", "(852)55311112", ""),
    ]
    assert all(r["account_id"] == "7" and r["poll_count"] == "3" for r in lines)

    result = invoke("stale", "--fail")
    assert result.exit_code == 1
    assert "S1" in result.output
    result = invoke("stale", "--json", "--fail")
    assert result.exit_code == 1
    assert json.loads(result.stdout)[0]["session_no"] == "S1"


@pytest.mark.usefixtures("database")
def test_stale_lists_overdue_sessions_without_failing() -> None:
    # Sent hours ago with a one-second first delay: its poll is long overdue.
    _track("--account-id", "7", "--phones", PHONES, "--sent-at", SENT_AT, "OLD")
    # Due soon, and due a little ago (within 2 x RECEIPTS_POLL_INTERVAL_MAX): neither is overdue.
    _track("--account-id", "7", "SOON", "RECENT")
    now = datetime.now(UTC)
    with db.session_scope() as session:
        for session_no, due in (("SOON", now + timedelta(hours=1)), ("RECENT", now)):
            session.execute(
                sa.update(sessions_table)
                .where(sessions_table.c.session_no == session_no)
                .values(next_poll_at=due)
            )

    rows = json.loads(ok(invoke("stale", "--json")).stdout)
    assert [(r["kind"], r["session_no"], r["phones"]) for r in rows] == [("overdue", "OLD", [])]
    assert rows[0]["next_poll_at"] == (SENT_AT_UTC + FIRST_POLL_DELAY).isoformat()

    table = ok(invoke("stale", "--fail")).output
    assert "overdue" in table
    assert "OLD" in table

    lines = list(csv.DictReader(io.StringIO(ok(invoke("stale", "--csv")).stdout)))
    assert [(r["kind"], r["session_no"], r["phone"]) for r in lines] == [("overdue", "OLD", "")]

    # Overdue and escalated together: the escalation makes --fail fail.
    _track("--account-id", "7", "--sent-at", SENT_AT, "ESC")
    _escalate("ESC", [{"phone": "(852)55311111", "last_result": "Unknow"}])
    result = invoke("stale", "--json", "--fail")
    assert result.exit_code == 1
    assert sorted((r["kind"], r["session_no"]) for r in json.loads(result.stdout)) == [
        ("escalated", "ESC"),
        ("overdue", "OLD"),
    ]
