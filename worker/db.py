"""Engine and unit-of-work sessions.

One engine per process, created lazily and thrown away after ``fork()`` (Celery's prefork pool),
because pooled connections must never be shared between processes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from worker.config import get_settings

_engine: Engine | None = None
_engine_pid: int | None = None
_sessionmaker: sessionmaker[Session] | None = None
# The engine of :func:`retried_scope`, and the process it was made in.
_unpinged: tuple[Engine, int] | None = None


def normalize_url(url: str) -> str:
    """Use psycopg 3 for PostgreSQL URLs that name no driver (with psycopg2, SQLAlchemy turns
    off its batching of ``INSERT … ON CONFLICT``: about 7x slower upserts)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def create_engine(url: str, *, create: bool = True, **kwargs: Any) -> Engine:
    """An engine for ``url``. With ``create=False`` a SQLite file that does not exist is not
    created: connecting raises :class:`worker.errors.DatabaseMissing` instead."""
    url = normalize_url(url)
    if make_url(url).get_backend_name() == "sqlite":
        # Several worker processes share one SQLite file: wait for the writer lock instead of
        # failing at once, and let readers run beside the writer (WAL).
        engine = sa.create_engine(url, connect_args={"timeout": 30}, **kwargs)
        if not create:
            event.listen(engine, "do_connect", _sqlite_file_must_exist)
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    kwargs.setdefault("pool_pre_ping", True)  # survive a PostgreSQL restart without a failed task
    if "poolclass" not in kwargs:
        kwargs.setdefault("pool_size", 5)
        kwargs.setdefault("max_overflow", 5)
    return sa.create_engine(url, **kwargs)


def _sqlite_file_must_exist(
    _dialect: Any, _record: Any, cargs: list[Any], _cparams: dict[str, Any]
) -> None:
    """Refuse to open a SQLite file that does not exist, rather than let sqlite3 create an
    empty one: ``receipts status`` in an empty folder used to leave ``receipts.db`` behind and
    then fail on a missing table. In-memory databases and ``file:`` URIs are the caller's."""
    from worker.errors import DatabaseMissing

    path = str(cargs[0]) if cargs else ""
    if path and path != ":memory:" and not path.startswith("file:") and not os.path.exists(path):
        raise DatabaseMissing(path)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
    # The driver would begin transactions lazily, before the first write only; we begin them
    # ourselves (see _sqlite_begin).
    dbapi_connection.isolation_level = None


READ_ONLY = "receipts_read_only"


def _sqlite_begin(connection: sa.Connection) -> None:
    """Begin each unit of work with the write lock taken (``BEGIN IMMEDIATE``), waiting for it
    up to the busy timeout. A deferred transaction that read and then writes fails at once
    ("database is locked") when another process wrote in between, which no busy timeout
    helps; read-only units of work (:func:`read_scope`) begin deferred, beside any writer."""
    read_only = connection.get_execution_options().get(READ_ONLY, False)
    connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


def get_engine() -> Engine:
    global _engine, _engine_pid, _sessionmaker  # noqa: PLW0603 - the per-process singleton
    if _engine is None or _engine_pid != os.getpid():
        if _engine is not None:
            # Inherited across fork: drop the parent's connections without closing them.
            _engine.dispose(close=False)
        # Only the migrations create a SQLite file (`receipts migrate`, `receipts run`).
        _engine = create_engine(get_settings().database_url, create=False)
        _engine_pid = os.getpid()
        _sessionmaker = sessionmaker(_engine, expire_on_commit=False)
    return _engine


def reset_engine() -> None:
    """Forget the process's engines (after fork, or when tests change the database URL)."""
    global _engine, _engine_pid, _sessionmaker, _unpinged  # noqa: PLW0603
    if _engine is not None:
        _engine.dispose(close=_engine_pid == os.getpid())
    if _unpinged is not None:
        _unpinged[0].dispose(close=_unpinged[1] == os.getpid())
    _engine = _engine_pid = _sessionmaker = _unpinged = None


def _unpinged_engine() -> Engine:
    global _unpinged  # noqa: PLW0603 - the per-process singleton
    if _unpinged is None or _unpinged[1] != os.getpid():
        if _unpinged is not None:
            _unpinged[0].dispose(close=False)  # inherited across fork
        engine = create_engine(get_settings().database_url, create=False, pool_pre_ping=False)
        _unpinged = (engine, os.getpid())
    return _unpinged[0]


@contextmanager
def retried_scope() -> Iterator[Session]:
    """A unit of work for a caller that answers its failure by having the work sent again
    (the receiver's push writer: a 503, which Uspeedo retries a second later). Its connections
    are not pinged before each transaction: the ping was a round trip per transaction, 7.6% of
    a receiver process's time at load. After a database restart the first transaction on a
    stale connection fails, as transient (:func:`is_transient`), and the pool replaces it."""
    with Session(_unpinged_engine(), expire_on_commit=False) as session, session.begin():
        yield session


def upsert_insert(session: Session, table: sa.Table) -> Any:
    """The dialect's INSERT that knows ``ON CONFLICT`` (PostgreSQL and SQLite spell it alike)."""
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table)


JSON_ROWS = "json_rows"


def json_rows(types: Mapping[str, Any]) -> sa.Select[Any]:
    """PostgreSQL: a SELECT of rows with columns ``types`` from ``json_to_recordset`` over one
    JSON document, bound at execution as the ``json_rows`` parameter (:func:`json_document`).

    One statement whose text never changes carries any number of rows in one round trip. One
    JSON text parameter, encoded in C, replaced one array parameter per column, whose
    element-by-element quoting in psycopg was the worker's top cost (see README "Performance").
    """
    from sqlalchemy.dialects.postgresql import JSON

    record = (
        sa.func.json_to_recordset(sa.cast(sa.bindparam(JSON_ROWS, type_=sa.Text()), JSON))
        .table_valued(*(sa.column(name, type_) for name, type_ in types.items()))
        .render_derived(name=JSON_ROWS, with_types=True)
    )
    return sa.select(*record.c)


def json_document(rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """The execution parameters of a :func:`json_rows` statement for ``rows`` (keys that are
    not among its columns are ignored by PostgreSQL).

    orjson writes datetimes itself (RFC 3339, with their offset): ``json.dumps`` needed a
    Python callback per timestamp, and was a tenth of a poll's CPU. That also means these
    values skip :class:`worker.models.UTCDateTime`, which refuses naive datetimes; here a naive
    one is taken as UTC (every time in this code is UTC) rather than in the server's time zone.
    """
    return {JSON_ROWS: orjson.dumps(list(rows), option=orjson.OPT_NAIVE_UTC).decode()}


# SQLSTATEs worth retrying: the server went away or is restarting (08, 57P), ran out of
# connections or memory (53), or picked this transaction as the loser of a race (40001, 40P01,
# 55P03 lock_not_available). Anything else, such as an index row too large or a foreign key
# violation, fails the same way however often it is sent: psycopg raises some of those as
# OperationalError too, so the exception class cannot decide.
_TRANSIENT_SQLSTATE_PREFIXES = ("08", "53", "57P", "40001", "40P01", "55P03")
# SQLite: another process holds the lock (SQLITE_BUSY, SQLITE_LOCKED, with extended codes).
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6


def is_transient(error: sa.exc.DBAPIError) -> bool:
    """Whether a database error may go away if the same work is tried again shortly."""
    if error.connection_invalidated:
        return True
    orig = error.orig
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate is not None:
        return str(sqlstate).startswith(_TRANSIENT_SQLSTATE_PREFIXES)
    code = getattr(orig, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)
    # psycopg without a SQLSTATE: no answer from the server at all (refused, reset, timed out).
    return isinstance(error, sa.exc.OperationalError | sa.exc.InterfaceError)


def error_text(error: BaseException) -> str:
    """A database error in one line, without the SQL statement, its parameters or the failing
    row (which hold phone numbers): the driver's primary message, phone-like numbers masked."""
    from worker.logs import scrub

    orig = getattr(error, "orig", None) or error
    diag = getattr(orig, "diag", None)
    # psycopg's str() appends DETAIL lines such as "Failing row contains (...)".
    primary = getattr(diag, "message_primary", None) if diag is not None else None
    text = " ".join(str(primary or orig).split())
    return f"{type(orig).__name__}: {scrub(text)[:300]}"


@contextmanager
def session_scope() -> Iterator[Session]:
    """A unit of work: commits on success, rolls back on any error."""
    get_engine()
    if _sessionmaker is None:  # pragma: no cover - get_engine() always sets it
        raise RuntimeError("no session factory")
    with _sessionmaker() as session, session.begin():
        yield session


@contextmanager
def read_scope() -> Iterator[Session]:
    """A unit of work that only reads (reports, metrics): on SQLite it takes no write lock, so
    it never waits behind a writer nor holds one up."""
    engine = get_engine()
    with (
        Session(engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False) as session,
        session.begin(),
    ):
        yield session
