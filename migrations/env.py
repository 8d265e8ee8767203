"""Alembic environment wired to the package's metadata.

Migrations run one transaction per revision, with a lock timeout and (on PostgreSQL) an
advisory lock, so that several `receipts migrate` started together (one per container) take
turns instead of failing halfway.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from worker.db import create_engine
from worker.models import metadata

MIGRATION_LOCK_ID = 0x5EED_0001  # arbitrary, constant: all migrators agree on it

config = context.config


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from worker.config import get_settings

    return get_settings().database_url


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=metadata,
        literal_binds=True,
        compare_server_default=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connectable = config.attributes.get("connection")
    if connectable is not None:
        _run(connectable)
        return
    engine = create_engine(_url(), poolclass=sa.pool.NullPool)
    with engine.connect() as connection:
        _run(connection)
    engine.dispose()


def _run(connection: sa.Connection) -> None:
    is_pg = connection.dialect.name == "postgresql"
    if is_pg:
        connection.execute(sa.text("SET lock_timeout = '10s'"))
        connection.execute(sa.text(f"SELECT pg_advisory_lock({MIGRATION_LOCK_ID})"))
        connection.commit()
    try:
        context.configure(
            connection=connection,
            target_metadata=metadata,
            compare_server_default=True,
            transaction_per_migration=True,
            # SQLite cannot ALTER most things; batch mode rebuilds tables instead.
            render_as_batch=not is_pg,
        )
        with context.begin_transaction():
            context.run_migrations()
    finally:
        if is_pg:
            connection.execute(sa.text(f"SELECT pg_advisory_unlock({MIGRATION_LOCK_ID})"))
            connection.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
