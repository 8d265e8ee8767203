"""worker/problems.py: each problem of a setup in one line with what to do, and its exit code;
anything else an unexpected error pointing at --debug. The exceptions are built as the drivers
raise them (psycopg's messages are libpq's text, without a SQLSTATE, for a failed connection).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from alembic.util.exc import CommandError
from kombu.exceptions import OperationalError as KombuOperationalError
from psycopg import errors as pg_errors

from worker.errors import DatabaseMissing, TrackInterrupted
from worker.problems import (
    DEBUG_HINT,
    EXIT_BUG,
    EXIT_SETUP,
    EXIT_UNAVAILABLE,
    Problem,
    explain,
)

PG = "postgresql://receipts:hunter2@db.internal:6543/receipts"
CONNECTION = 'connection failed: connection to server at "10.0.0.5", port 6543 failed: '


def _wrapped(orig: Exception) -> sa.exc.DBAPIError:
    """``orig`` as SQLAlchemy raises it, the statement and parameters (phones) attached."""
    return sa.exc.OperationalError("SELECT 1 WHERE phone = %s", ("85255311111",), orig)


@pytest.mark.parametrize(
    ("orig", "line", "code"),
    [
        (
            psycopg.OperationalError(CONNECTION + 'FATAL:  database "receipts" does not exist'),
            'database "receipts" does not exist on db.internal:6543: create it (e.g. createdb '
            "receipts) or fix RECEIPTS_DATABASE_URL, then run receipts migrate",
            EXIT_SETUP,
        ),
        (
            psycopg.OperationalError(CONNECTION + 'FATAL:  role "receipts" does not exist'),
            'PostgreSQL on db.internal:6543 has no user (role) "receipts": fix the user in '
            "RECEIPTS_DATABASE_URL, or create that role",
            EXIT_SETUP,
        ),
        (
            psycopg.OperationalError(
                CONNECTION + 'FATAL:  password authentication failed for user "receipts"'
            ),
            'PostgreSQL on db.internal:6543 refused the password of user "receipts": fix the '
            "password in RECEIPTS_DATABASE_URL",
            EXIT_SETUP,
        ),
        (
            psycopg.OperationalError(
                CONNECTION + "Connection refused\n\tIs the server running on that host and "
                "accepting TCP/IP connections?"
            ),
            "cannot reach the database server at db.internal:6543: connection refused (is "
            "PostgreSQL running there? check RECEIPTS_DATABASE_URL)",
            EXIT_UNAVAILABLE,
        ),
        (
            psycopg.OperationalError(
                "failed to resolve host 'db.internal': [Errno -2] Name or service not known"
            ),
            "cannot reach the database server at db.internal:6543: the host name does not "
            "resolve (check RECEIPTS_DATABASE_URL)",
            EXIT_UNAVAILABLE,
        ),
        (
            psycopg.OperationalError("connection timeout expired"),
            "the database server at db.internal:6543 did not answer in time: check that it "
            "runs and that the network lets this host reach it",
            EXIT_UNAVAILABLE,
        ),
        (
            psycopg.OperationalError(CONNECTION + "FATAL:  the database system is starting up"),
            "the database server at db.internal:6543 is not taking connections now",
            EXIT_UNAVAILABLE,
        ),
        (
            pg_errors.UndefinedTable('relation "sms_sessions" does not exist'),
            "the database has no table sms_sessions (never migrated, or by an older version): "
            "run receipts migrate",
            EXIT_SETUP,
        ),
        (
            pg_errors.UndefinedColumn('column "source" does not exist'),
            "the database's tables are older than this version of receipts",
            EXIT_SETUP,
        ),
        (
            pg_errors.InsufficientPrivilege("permission denied for table sms_sessions"),
            'the database refused user "receipts": permission denied for table sms_sessions: '
            "grant it access",
            EXIT_SETUP,
        ),
    ],
)
def test_postgresql_problems(orig: Exception, line: str, code: int) -> None:
    problem = explain(_wrapped(orig), database_url=PG)
    assert problem.line.startswith(line), problem.line
    assert problem.exit_code == code
    _one_clean_line(problem)


@pytest.mark.parametrize(
    ("message", "line", "code"),
    [
        (
            "no such table: sms_sessions",
            "the database has no table sms_sessions (never migrated, or by an older version): "
            "run receipts migrate",
            EXIT_SETUP,
        ),
        (
            "no such column: sms_receipts.source",
            "the database's tables are older than this version of receipts",
            EXIT_SETUP,
        ),
        (
            "database is locked",
            "the database /srv/receipts.db stayed locked by another process for 30 s",
            EXIT_UNAVAILABLE,
        ),
        (
            "file is not a database",
            "/srv/receipts.db is not a SQLite database",
            EXIT_SETUP,
        ),
        (
            "attempt to write a readonly database",
            "the database refused this user: attempt to write a readonly database",
            EXIT_SETUP,
        ),
    ],
)
def test_sqlite_problems(message: str, line: str, code: int) -> None:
    problem = explain(
        _wrapped(sqlite3.OperationalError(message)), database_url="sqlite:////srv/receipts.db"
    )
    assert problem.line.startswith(line), problem.line
    assert problem.exit_code == code


def test_a_sqlite_file_that_does_not_exist(tmp_path: Path) -> None:
    path = f"{tmp_path}/receipts.db"
    line = (
        f"the database {path} does not exist: run receipts migrate to create it (or set "
        "RECEIPTS_DATABASE_URL to another one)"
    )
    assert explain(DatabaseMissing(path)) == Problem(line, EXIT_SETUP)
    assert explain(_wrapped(DatabaseMissing(path))) == Problem(line, EXIT_SETUP)
    # An import stopped by it: the cause is what is explained.
    stopped = TrackInterrupted("could not record", recorded=0, total=1)
    stopped.__cause__ = _wrapped(DatabaseMissing(path))
    assert explain(stopped) == Problem(line, EXIT_SETUP)


def test_a_missing_sqlite_file_is_not_retried_as_transient() -> None:
    from worker.db import is_transient

    assert not is_transient(_wrapped(DatabaseMissing("/srv/receipts.db")))


def test_an_unreachable_broker_shows_its_url_without_the_password() -> None:
    url = "redis://:s3cret-pass@redis.internal:6379/0"
    problem = explain(
        KombuOperationalError("Error 111 connecting to redis.internal:6379. Connection refused."),
        broker_url=url,
    )
    assert problem.exit_code == EXIT_UNAVAILABLE
    assert problem.line == (
        "cannot reach the broker at redis://:***@redis.internal:6379/0: Error 111 connecting "
        "to redis.internal:6379. Connection refused. (is it running? check RECEIPTS_BROKER_URL)"
    )


def test_a_misspelt_broker_transport_gets_kombus_suggestion() -> None:
    problem = explain(KeyError("No such transport: redsi.  Did you mean redis?"))
    assert problem.line.startswith(
        "RECEIPTS_BROKER_URL names a transport kombu does not know (redsi; did you mean redis?)"
    )


def test_a_broker_transport_that_does_not_exist() -> None:
    problem = explain(KeyError("No such transport: nosuch"))
    assert problem == Problem(
        "RECEIPTS_BROKER_URL names a transport kombu does not know (nosuch): use e.g. "
        "redis://host:6379/0, or unset it for the embedded broker",
        EXIT_SETUP,
    )


def test_a_database_migrated_by_a_newer_version() -> None:
    problem = explain(CommandError("Can't locate revision identified by 'f00dcafe1234'"))
    assert problem == Problem(
        "the database was migrated by a newer version of receipts (its revision f00dcafe1234 "
        "is unknown to this one): upgrade uspeedo-receipts",
        EXIT_SETUP,
    )


def test_a_module_that_is_not_installed() -> None:
    problem = explain(ModuleNotFoundError("No module named 'boto3'", name="boto3"))
    assert problem.exit_code == EXIT_SETUP
    assert "python -m pip install boto3" in problem.line


def test_anything_else_is_unexpected_in_one_line_pointing_at_debug() -> None:
    problem = explain(ValueError("bad value for (852)55311111\nsecond line"))
    assert problem.exit_code == EXIT_BUG
    assert problem.line == (
        f"unexpected error: ValueError: bad value for *******1111 second line ({DEBUG_HINT})"
    )


def _one_clean_line(problem: Problem) -> None:
    """No line break, no SQL, no parameters, no password."""
    assert "\n" not in problem.line
    for hidden in ("SELECT", "85255311111", "hunter2", "sqlalche.me"):
        assert hidden not in problem.line


def test_an_error_raised_while_handling_another_is_not_explained_by_it() -> None:
    """Only what an error was raised from explains it: a bug in code handling a database
    error is a bug, not the database's problem."""
    try:
        try:
            raise _wrapped(sqlite3.OperationalError("no such table: sms_sessions"))
        except sa.exc.DBAPIError:
            raise RuntimeError("bug in the handler")  # noqa: B904 - the point of the test
    except RuntimeError as bug:
        problem = explain(bug)
    assert problem.exit_code == EXIT_BUG
    assert problem.line.startswith("unexpected error: RuntimeError: bug in the handler")
