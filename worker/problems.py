"""One line for people for any error a command meets: what failed, and what to do about it.

The command line's top level (``worker/cli.py``) hands every exception a command did not
handle itself to :func:`explain`, which recognises the problems of a setup (a database that
does not exist, tables not created yet, a server that does not answer, a permission, a broker
transport or a driver that is not installed) and says each in one line, with the exit code it
means (README "Exit codes"). Anything else is an unexpected error: one line too, naming it and
pointing at ``--debug``, which shows the traceback.

Nothing here shows a password (URLs go through :func:`worker.logs.mask_password`), an SQL
statement or its parameters (phones): database errors are reduced to the driver's primary
message (:func:`worker.db.error_text`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Final

# Exit codes of every command (README "Exit codes").
EXIT_OK: Final = 0
# The command ran and the answer is no: not found, refused, some of the work failed, an alert.
EXIT_NO: Final = 1
# A usage or settings error, or a setup to fix before running again (a database to create,
# `receipts migrate` to run, a permission to grant, a package to install).
EXIT_SETUP: Final = 2
# A server did not answer or failed for now (database, broker, Uspeedo): later may work.
EXIT_UNAVAILABLE: Final = 3
# An unexpected error, a bug (sysexits.h EX_SOFTWARE): `--debug` shows the traceback.
EXIT_BUG: Final = 70

DEBUG_HINT: Final = "run again with --debug (or RECEIPTS_DEBUG=1) for the traceback"
MIGRATE: Final = "run receipts migrate"


@dataclass(frozen=True)
class Problem:
    """What to print (without the ``error:`` prefix) and the exit code."""

    line: str
    exit_code: int


def explain(
    exc: BaseException, *, database_url: str | None = None, broker_url: str | None = None
) -> Problem:
    """``exc`` in one line for the person who ran the command. ``database_url`` and
    ``broker_url`` (the settings', when they could be read) name the servers in the line."""
    for cause in _chain(exc):
        problem = (
            _database(cause, database_url)
            or _broker(cause, broker_url)
            or _migrations(cause)
            or _missing_module(cause)
            or _file(cause)
        )
        if problem is not None:
            return problem
    return Problem(f"unexpected error: {_summary(exc)} ({DEBUG_HINT})", EXIT_BUG)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it was raised from, outermost first (a failed import's database error,
    kombu's library error wrapping redis's): the outermost one that is recognised is reported.
    Not an exception merely being handled when ``exc`` happened (``__context__``): that one
    did not cause it, and naming it would hide a bug."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 10:
        seen.append(current)
        current = current.__cause__
    return seen


def _summary(exc: BaseException) -> str:
    from worker.logs import scrub

    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return scrub(text[:300])


# --- databases ----------------------------------------------------------------------------------

# The problems of a database, each a pattern of the driver's message (psycopg gives no SQLSTATE
# for a failed connection, only libpq's text) or a SQLSTATE, the exit code, and the line, which
# may name the database server ({server}), the URL's user ({user}), the pattern's "name" group
# ({name}) and the message's first line ({message}). The first that matches is reported.
_DATABASE_RULES: Final[tuple[tuple[re.Pattern[str], tuple[str, ...], int, str], ...]] = (
    (
        re.compile(r'no such table: (?P<name>\S+)|relation "(?P<pg>[^"]+)" does not exist'),
        ("42P01",),
        EXIT_SETUP,
        "the database has no table {name} (never migrated, or by an older version): " + MIGRATE,
    ),
    (
        re.compile(
            r'no such column: \S+|column "?[^" ]+"? (?:of relation "[^"]+" )?does not exist'
        ),
        ("42703",),
        EXIT_SETUP,
        "the database's tables are older than this version of receipts ({message}): " + MIGRATE,
    ),
    (
        re.compile(r'database "(?P<name>[^"]*)" does not exist'),
        ("3D000",),
        EXIT_SETUP,
        'database "{name}" does not exist on {server}: create it (e.g. createdb {name}) or fix '
        "RECEIPTS_DATABASE_URL, then " + MIGRATE,
    ),
    (
        re.compile(r'role "(?P<name>[^"]*)" does not exist'),
        (),
        EXIT_SETUP,
        'PostgreSQL on {server} has no user (role) "{name}": fix the user in '
        "RECEIPTS_DATABASE_URL, or create that role",
    ),
    (
        re.compile(r'password authentication failed for user "(?P<name>[^"]*)"'),
        ("28P01",),
        EXIT_SETUP,
        'PostgreSQL on {server} refused the password of user "{name}": fix the password in '
        "RECEIPTS_DATABASE_URL",
    ),
    (
        re.compile(r"no password supplied"),
        (),
        EXIT_SETUP,
        "PostgreSQL on {server} asks {user} for a password: put it in RECEIPTS_DATABASE_URL "
        "(postgresql://user:password@host/db) or in ~/.pgpass",
    ),
    (
        re.compile(r"no pg_hba\.conf entry"),
        (),
        EXIT_SETUP,
        "PostgreSQL on {server} does not let {user} connect from this host (no pg_hba.conf "
        "entry): ask its administrator to allow it",
    ),
    (
        re.compile(r"permission denied|attempt to write a readonly database", re.IGNORECASE),
        ("42501",),
        EXIT_SETUP,
        "the database refused {user}: {message}: grant it access to the receipts tables (and "
        "a SQLite file's folder), or set RECEIPTS_DATABASE_URL to the user that ran receipts "
        "migrate",
    ),
    (
        re.compile(r"Connection refused", re.IGNORECASE),
        (),
        EXIT_UNAVAILABLE,
        "cannot reach the database server at {server}: connection refused (is PostgreSQL "
        "running there? check RECEIPTS_DATABASE_URL)",
    ),
    (
        re.compile(r"failed to resolve host|could not translate host name", re.IGNORECASE),
        (),
        EXIT_UNAVAILABLE,
        "cannot reach the database server at {server}: the host name does not resolve (check "
        "RECEIPTS_DATABASE_URL)",
    ),
    (
        re.compile(r"timeout expired|timed out", re.IGNORECASE),
        (),
        EXIT_UNAVAILABLE,
        "the database server at {server} did not answer in time: check that it runs and that "
        "the network lets this host reach it",
    ),
    (
        re.compile(
            r"the database system is (?:starting up|shutting down|in recovery mode)"
            r"|terminating connection due to administrator command|server closed the connection"
            r"|too many clients|remaining connection slots",
            re.IGNORECASE,
        ),
        ("57P01", "57P03", "53300"),
        EXIT_UNAVAILABLE,
        "the database server at {server} is not taking connections now ({message}): try "
        "again in a moment",
    ),
)


def _database(exc: BaseException, url: str | None) -> Problem | None:
    import sqlalchemy as sa

    from worker.errors import DatabaseMissing

    if isinstance(exc, sa.exc.DBAPIError):
        orig: BaseException = exc.orig or exc
    elif isinstance(exc, DatabaseMissing):
        orig = exc
    else:
        return None
    if isinstance(orig, DatabaseMissing):
        return _missing_file(orig.path)
    text = str(orig)
    sqlstate = str(getattr(orig, "sqlstate", None) or "")
    for pattern, sqlstates, exit_code, line in _DATABASE_RULES:
        match = pattern.search(text)
        if match is None and sqlstate not in sqlstates:
            continue
        groups = {k: v for k, v in (match.groupdict() if match else {}).items() if v}
        return Problem(
            line.format(
                name=groups.get("name") or groups.get("pg") or "?",
                server=_pg_server(url),
                user=_user(url),
                message=_first_line(text),
            ),
            exit_code,
        )
    sqlite = _sqlite(text, url)
    if sqlite is not None:
        return sqlite
    from worker.db import error_text, is_transient

    if isinstance(exc, sa.exc.DBAPIError) and is_transient(exc):
        return Problem(f"the database is unavailable: {error_text(exc)}", EXIT_UNAVAILABLE)
    return Problem(f"the database refused: {error_text(exc)}", EXIT_SETUP)


def _missing_file(path: str) -> Problem:
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        return Problem(
            f"the database {path} does not exist, nor its folder {folder}: check "
            "RECEIPTS_DATABASE_URL (receipts migrate creates the file, not its folder)",
            EXIT_SETUP,
        )
    return Problem(
        f"the database {path} does not exist: {MIGRATE} to create it "
        "(or set RECEIPTS_DATABASE_URL to another one)",
        EXIT_SETUP,
    )


def _sqlite(text: str, url: str | None) -> Problem | None:
    path = _sqlite_path(url)
    if path is None:
        return None
    if "unable to open database file" in text:
        folder = os.path.dirname(path) or "."
        if not os.path.isdir(folder):
            reason = f"its folder {folder} does not exist"
        elif not os.access(folder, os.W_OK | os.X_OK):
            reason = f"this user may not write in its folder {folder}"
        else:
            reason = "sqlite cannot open it"
        return Problem(
            f"cannot open the database {path}: {reason} (check RECEIPTS_DATABASE_URL)",
            EXIT_SETUP,
        )
    if "database is locked" in text:
        return Problem(
            f"the database {path} stayed locked by another process for 30 s: try again "
            "(for many concurrent writers, use PostgreSQL)",
            EXIT_UNAVAILABLE,
        )
    if "file is not a database" in text:
        return Problem(
            f"{path} is not a SQLite database: point RECEIPTS_DATABASE_URL at another file",
            EXIT_SETUP,
        )
    return None


def _first_line(text: str) -> str:
    from worker.logs import scrub

    line = text.strip().splitlines()[0] if text.strip() else ""
    return scrub(" ".join(line.split())[:200])


def _parsed(url: str | None) -> object | None:
    if not url:
        return None
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url)
    except ArgumentError:
        return None


def _pg_server(url: str | None) -> str:
    parsed = _parsed(url)
    host = getattr(parsed, "host", None) or "localhost"
    port = getattr(parsed, "port", None) or 5432
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _user(url: str | None) -> str:
    name = getattr(_parsed(url), "username", None)
    return f'user "{name}"' if name else "this user"


def _sqlite_path(url: str | None) -> str | None:
    parsed = _parsed(url)
    if parsed is None or getattr(parsed, "drivername", "").split("+")[0] != "sqlite":
        return None
    database = getattr(parsed, "database", None) or ""
    return os.path.abspath(database) if database and database != ":memory:" else database


# --- brokers ------------------------------------------------------------------------------------


def _broker_shown(url: str | None) -> str:
    from worker.logs import mask_password

    return mask_password(url) if url else "the embedded broker"


# kombu's KeyError for a URL's scheme it has no transport for, with its own suggestion.
_NO_TRANSPORT = re.compile(
    r"No such transport: (?P<scheme>[^\s.'\"]+)(?:.*Did you mean (?P<close>\w+))?"
)


def _broker(exc: BaseException, url: str | None) -> Problem | None:
    from kombu.exceptions import OperationalError as KombuOperationalError

    text = str(exc)
    if isinstance(exc, KeyError) and (match := _NO_TRANSPORT.search(text)):
        scheme, close = match.group("scheme"), match.group("close")
        named = f"{scheme}; did you mean {close}?" if close else scheme
        return Problem(
            f"RECEIPTS_BROKER_URL names a transport kombu does not know ({named}): use e.g. "
            "redis://host:6379/0, or unset it for the embedded broker",
            EXIT_SETUP,
        )
    broken = isinstance(exc, KombuOperationalError)
    if not broken:
        try:
            from redis.exceptions import ConnectionError as RedisConnectionError
            from redis.exceptions import TimeoutError as RedisTimeoutError
        except ImportError:  # pragma: no cover - redis comes with the project
            return None
        broken = isinstance(exc, RedisConnectionError | RedisTimeoutError)
    if not broken:
        return None
    from worker.logs import scrub

    reason = scrub(" ".join(text.split())[:200]) or type(exc).__name__
    return Problem(
        f"cannot reach the broker at {_broker_shown(url)}: {reason} (is it running? check "
        "RECEIPTS_BROKER_URL)",
        EXIT_UNAVAILABLE,
    )


def check_broker(url: str | None, *, timeout: float = 3.0) -> Problem | None:
    """One attempt to connect to the broker ``url`` (None: the embedded one, nothing to
    reach), bounded by ``timeout``: None when it answers, else the problem."""
    if not url:
        return None
    from kombu.connection import Connection

    try:
        # kombu's Connection carries no annotations.
        with Connection(url, connect_timeout=timeout) as connection:  # type: ignore[no-untyped-call]
            connection.ensure_connection(max_retries=0, timeout=timeout)
    except Exception as exc:  # every failure is reported in one line
        return explain(exc, broker_url=url)
    return None


# --- migrations, modules, files -----------------------------------------------------------------

_UNKNOWN_REVISION = re.compile(r"Can't locate revision identified by '(?P<revision>[^']+)'")


def _migrations(exc: BaseException) -> Problem | None:
    try:
        from alembic.util.exc import CommandError
    except ImportError:  # pragma: no cover - alembic comes with the project
        return None
    if not isinstance(exc, CommandError):
        return None
    if match := _UNKNOWN_REVISION.search(str(exc)):
        return Problem(
            "the database was migrated by a newer version of receipts (its revision "
            f"{match.group('revision')} is unknown to this one): upgrade uspeedo-receipts",
            EXIT_SETUP,
        )
    return Problem(f"the migration failed: {_first_line(str(exc))}", EXIT_SETUP)


def _missing_module(exc: BaseException) -> Problem | None:
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    package = exc.name.split(".")[0]
    return Problem(
        f"the Python module {package} is not installed, and this setup needs it: "
        f"python -m pip install {package}",
        EXIT_SETUP,
    )


def _file(exc: BaseException) -> Problem | None:
    if not isinstance(exc, PermissionError | FileNotFoundError | IsADirectoryError):
        return None
    where = f" {exc.filename}" if exc.filename else ""
    return Problem(f"cannot use{where}: {exc.strerror or exc}", EXIT_SETUP)
