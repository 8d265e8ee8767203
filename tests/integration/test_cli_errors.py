"""Every command meets a database that is not there yet, or not reachable, with one line that
says what to do, an exit code that means something, and no traceback (``--debug`` shows it);
a command that cannot work on a SQLite file that does not exist does not create one.

Before: in an empty folder, `receipts status X` printed 30 lines of SQLAlchemy traceback ending
`no such table: sms_sessions` and left an empty `receipts.db` behind; `receipts migrate` on a
PostgreSQL database that does not exist printed 130 lines of psycopg traceback.

A few tests run real `receipts` processes (what they leave on screen and on disk); the rest run
the command in-process (tests/support/cli.py), which is much faster.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support.cli import invoke, receipts, receipts_all
from tests.support.databases import Configure, pg_url
from tests.support.servers import free_port
from tests.support.shared import PG_ADMIN_URL
from worker import db
from worker.migrate import upgrade

# Commands that need the tables, each with the table it meets first.
NEED_TABLES = {
    ("status", "S1"): "sms_sessions",
    ("stale",): "stale_sessions",
    ("rejected",): "rejected_tracks",
    ("events", "parked"): "receipts_parked_event_batches",
    ("ack", "S1"): "sms_sessions",
    ("track", "--account-id", "1", "S1"): "sms_sessions",
    ("purge", "--older-than", "90d"): "sms_sessions",
    ("purge", "--older-than", "90d", "--dry-run"): "sms_sessions",
}
MIGRATE_FIRST = "run receipts migrate"


def _one_line(done: object) -> str:
    """The single line a failed command printed, after checking it printed nothing else."""
    stdout, stderr = getattr(done, "stdout", ""), getattr(done, "stderr", "")
    assert "Traceback" not in stderr, stderr
    assert stdout == "", stdout
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_an_empty_folder_says_run_migrate_and_creates_no_database(tmp_path: Path) -> None:
    folder = tmp_path.resolve()
    results = receipts_all(
        folder, [("status", "S1"), ("stale",), ("track", "--account-id", "1", "S1")]
    )
    for done in results:
        assert done.returncode == 2, (done.args, done.stderr)
        assert _one_line(done) == (
            f"error: the database {folder / 'receipts.db'} does not exist: run receipts "
            "migrate to create it (or set RECEIPTS_DATABASE_URL to another one)"
        ), done.args
    assert list(folder.iterdir()) == [], "a command that cannot work created a file"


@pytest.mark.parametrize("args", list(NEED_TABLES), ids=" ".join)
def test_no_command_creates_a_sqlite_file(
    args: tuple[str, ...], configure: Configure, tmp_path: Path
) -> None:
    path = tmp_path.resolve() / "receipts.db"
    configure(RECEIPTS_DATABASE_URL=f"sqlite:///{path}")
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"error: the database {path} does not exist: run receipts migrate to create it (or "
        "set RECEIPTS_DATABASE_URL to another one)\n"
    )
    assert not path.exists()


def test_a_sqlite_file_in_a_folder_that_does_not_exist(
    configure: Configure, tmp_path: Path
) -> None:
    path = tmp_path.resolve() / "missing" / "receipts.db"
    configure(RECEIPTS_DATABASE_URL=f"sqlite:///{path}")
    status, migrate = invoke("status", "S1"), invoke("migrate")
    assert status.exit_code == migrate.exit_code == 2
    assert status.stderr == (
        f"error: the database {path} does not exist, nor its folder {path.parent}: check "
        "RECEIPTS_DATABASE_URL (receipts migrate creates the file, not its folder)\n"
    )
    assert migrate.stderr == (
        f"error: cannot open the database {path}: its folder {path.parent} does not exist "
        "(check RECEIPTS_DATABASE_URL)\n"
    )
    assert not path.parent.exists()


@pytest.fixture
def empty_pg_database() -> Iterator[str]:
    """A PostgreSQL database of this test's own, never migrated; dropped afterwards."""
    name = f"receipts_test_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield pg_url(name)
    db.reset_engine()
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _no_tables(table: str) -> str:
    return (
        f"error: the database has no table {table} (never migrated, or by an older version): "
        f"{MIGRATE_FIRST}"
    )


def test_a_database_without_tables_says_run_migrate(tmp_path: Path, empty_pg_database: str) -> None:
    # What the versions before this one left behind after `receipts status`: an empty file.
    (tmp_path / "receipts.db").touch()
    sqlite = receipts(tmp_path, "status", "S1")
    postgres = receipts(tmp_path, "stale", env={"RECEIPTS_DATABASE_URL": empty_pg_database})
    assert sqlite.returncode == postgres.returncode == 2
    assert _one_line(sqlite) == _no_tables("sms_sessions")
    assert _one_line(postgres) == _no_tables("stale_sessions")


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
@pytest.mark.parametrize("args", list(NEED_TABLES), ids=" ".join)
def test_every_command_on_a_database_without_tables_says_run_migrate(
    backend: str,
    args: tuple[str, ...],
    configure: Configure,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    if backend == "sqlite":
        (tmp_path / "receipts.db").touch()
        url = f"sqlite:///{tmp_path / 'receipts.db'}"
    else:
        url = request.getfixturevalue("empty_pg_database")
    configure(RECEIPTS_DATABASE_URL=url)
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert result.stderr == _no_tables(NEED_TABLES[args]) + "\n"


def test_a_postgresql_database_that_does_not_exist(tmp_path: Path) -> None:
    name = f"receipts_test_missing_{uuid.uuid4().hex[:8]}"
    url = sa.engine.make_url(pg_url(name))
    server = f"{url.host}:{url.port or 5432}"
    results = receipts_all(
        tmp_path,
        [("migrate",), ("status", "S1")],
        env={"RECEIPTS_DATABASE_URL": url.render_as_string(False)},
    )
    for done in results:
        assert done.returncode == 2, (done.args, done.stderr)
        assert _one_line(done) == (
            f'error: database "{name}" does not exist on {server}: create it (e.g. createdb '
            f"{name}) or fix RECEIPTS_DATABASE_URL, then {MIGRATE_FIRST}"
        ), done.args


@pytest.mark.parametrize("args", [("migrate",), ("stale",), ("track", "--account-id", "1", "S1")])
def test_a_database_server_that_does_not_answer_exits_3(
    args: tuple[str, ...], configure: Configure
) -> None:
    port = free_port()
    configure(RECEIPTS_DATABASE_URL=f"postgresql://postgres@127.0.0.1:{port}/receipts")
    result = invoke(*args)
    assert result.exit_code == 3, result.output
    assert result.stderr == (
        f"error: cannot reach the database server at 127.0.0.1:{port}: connection refused "
        "(is PostgreSQL running there? check RECEIPTS_DATABASE_URL)\n"
    )


def test_debug_shows_the_traceback(configure: Configure, tmp_path: Path) -> None:
    (tmp_path / "receipts.db").touch()
    configure(RECEIPTS_DATABASE_URL=f"sqlite:///{tmp_path / 'receipts.db'}")
    for result in (invoke("--debug", "stale"), invoke("stale", env={"RECEIPTS_DEBUG": "1"})):
        # Not turned into a line: the exception itself, which Python prints with its traceback.
        assert isinstance(result.exception, sa.exc.OperationalError), result.output
        assert "no such table: stale_sessions" in str(result.exception)
    assert invoke("stale").stderr.startswith("error: the database has no table stale_sessions")


def test_a_broker_that_does_not_exist_stops_a_worker_in_one_line(tmp_path: Path) -> None:
    env = {"RECEIPTS_BROKER_URL": "nosuch://somewhere", "RECEIPTS_DATABASE_URL": "sqlite://"}
    beat = receipts(tmp_path, "beat", env=env)
    assert beat.returncode == 2
    assert _one_line(beat) == (
        "error: RECEIPTS_BROKER_URL names a transport kombu does not know (nosuch): use e.g. "
        "redis://host:6379/0, or unset it for the embedded broker"
    )


@pytest.mark.parametrize(
    ("revision", "line"),
    [
        (None, "error: not starting: the database has no tables yet: run receipts migrate"),
        (
            "0001",
            "error: not starting: the database's tables are older than this version of "
            "receipts: run receipts migrate",
        ),
    ],
)
def test_a_worker_does_not_start_on_a_database_not_migrated(
    revision: str | None, line: str, configure: Configure, tmp_path: Path
) -> None:
    """`receipts worker` does not migrate (`receipts run` does): on an older schema every tick
    and poll failed, each with a traceback in the log."""
    path = tmp_path / "receipts.db"
    path.touch()
    if revision is not None:
        upgrade(f"sqlite:///{path}", revision)
    configure(
        RECEIPTS_DATABASE_URL=f"sqlite:///{path}",
        RECEIPTS_API_URL=f"http://127.0.0.1:{free_port()}/api",
        RECEIPTS_ACCESS_KEY_ID="demo",
        RECEIPTS_ACCESS_KEY_SECRET="demo-secret",
    )
    result = invoke("worker")
    assert result.exit_code == 2, result.output
    # After the credentials check's line (nothing answers at the API's address).
    assert result.stderr.splitlines()[1:] == [line]
