"""Engine and unit-of-work sessions.

One engine per process, created lazily and thrown away after ``fork()`` (Celery's prefork pool),
because pooled connections must never be shared between processes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from worker.config import get_settings

_engine: Engine | None = None
_engine_pid: int | None = None
_sessionmaker: sessionmaker[Session] | None = None


def normalize_url(url: str) -> str:
    """Use psycopg 3 for PostgreSQL URLs that name no driver (NOTES.md: psycopg2 loses ON
    CONFLICT batching)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def create_engine(url: str, **kwargs: Any) -> Engine:
    url = normalize_url(url)
    if make_url(url).get_backend_name() == "sqlite":
        # Several worker processes share one SQLite file: wait for the writer lock instead of
        # failing at once, and let readers run beside the writer (WAL).
        engine = sa.create_engine(url, connect_args={"timeout": 30}, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    kwargs.setdefault("pool_pre_ping", True)  # survive a PostgreSQL restart without a failed task
    if "poolclass" not in kwargs:
        kwargs.setdefault("pool_size", 5)
        kwargs.setdefault("max_overflow", 5)
    return sa.create_engine(url, **kwargs)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def get_engine() -> Engine:
    global _engine, _engine_pid, _sessionmaker  # noqa: PLW0603 - the per-process singleton
    if _engine is None or _engine_pid != os.getpid():
        if _engine is not None:
            # Inherited across fork: drop the parent's connections without closing them.
            _engine.dispose(close=False)
        _engine = create_engine(get_settings().database_url)
        _engine_pid = os.getpid()
        _sessionmaker = sessionmaker(_engine, expire_on_commit=False)
    return _engine


def reset_engine() -> None:
    """Forget the process's engine (after fork, or when tests change the database URL)."""
    global _engine, _engine_pid, _sessionmaker  # noqa: PLW0603
    if _engine is not None:
        _engine.dispose(close=_engine_pid == os.getpid())
    _engine = _engine_pid = _sessionmaker = None


def upsert_insert(session: Session, table: sa.Table) -> Any:
    """The dialect's INSERT that knows ``ON CONFLICT`` (PostgreSQL and SQLite spell it alike)."""
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table)


def unnest_rows(rows: Sequence[Mapping[str, Any]], types: Mapping[str, Any]) -> sa.Select[Any]:
    """PostgreSQL: ``rows`` as a SELECT over one array per column (``unnest`` zips them), so
    that one statement with a constant text carries any number of rows in one round trip."""
    from sqlalchemy.dialects.postgresql import ARRAY

    return sa.select(
        *(
            sa.func.unnest(
                sa.bindparam(f"u_{name}", [row[name] for row in rows], type_=ARRAY(type_))
            ).label(name)
            for name, type_ in types.items()
        )
    )


@contextmanager
def session_scope() -> Iterator[Session]:
    """A unit of work: commits on success, rolls back on any error."""
    get_engine()
    if _sessionmaker is None:  # pragma: no cover - get_engine() always sets it
        raise RuntimeError("no session factory")
    with _sessionmaker() as session, session.begin():
        yield session
