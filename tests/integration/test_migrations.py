"""The migrations build exactly the declared schema, on both backends, and unwind cleanly."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from tests.support.databases import pg_url
from tests.support.shared import PG_ADMIN_URL
from worker.db import create_engine
from worker.migrate import downgrade, upgrade
from worker.models import metadata


@pytest.fixture(params=["postgres", "sqlite"])
def empty_url(request: pytest.FixtureRequest, tmp_path) -> str:  # type: ignore[no-untyped-def]
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'm.db'}"
        return
    name = f"receipts_migr_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield pg_url(name)
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()


def _diff(url: str) -> list[object]:
    engine = create_engine(url, poolclass=sa.pool.NullPool)
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_server_default": True, "compare_type": True}
        )
        diff = compare_metadata(context, metadata)
    engine.dispose()
    return list(diff)


def _tables(url: str) -> set[str]:
    engine = create_engine(url, poolclass=sa.pool.NullPool)
    names = set(sa.inspect(engine).get_table_names())
    engine.dispose()
    return names


def test_upgrade_head_matches_models_and_downgrade_base_unwinds(empty_url: str) -> None:
    upgrade(empty_url)
    assert _diff(empty_url) == []
    assert {"sms_sessions", "sms_receipts"} <= _tables(empty_url)
    downgrade(empty_url)
    assert _tables(empty_url) <= {"alembic_version"}
    # And back up again: downgrade left nothing behind that blocks a new upgrade.
    upgrade(empty_url)
    assert _diff(empty_url) == []


def test_upgrade_is_idempotent(empty_url: str) -> None:
    upgrade(empty_url)
    upgrade(empty_url)
    assert _diff(empty_url) == []


def _stale_kinds(url: str) -> list[str]:
    engine = create_engine(url, poolclass=sa.pool.NullPool)
    with engine.connect() as connection:
        kinds = list(connection.scalars(sa.text("SELECT DISTINCT kind FROM stale_sessions")))
    engine.dispose()
    return kinds


def test_the_credentials_row_of_the_stale_view_comes_and_goes_with_0005(empty_url: str) -> None:
    upgrade(empty_url)
    engine = create_engine(empty_url, poolclass=sa.pool.NullPool)
    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO receipts_credentials (name, refused_at, refusal) "
                "VALUES ('api', CURRENT_TIMESTAMP, 'RetCode 215398')"
            )
        )
    engine.dispose()
    assert _stale_kinds(empty_url) == ["credentials"]
    downgrade(empty_url, "0004")
    assert "receipts_credentials" not in _tables(empty_url)
    assert _stale_kinds(empty_url) == [], "the view of 0002 again, still readable"
    upgrade(empty_url)
    assert _diff(empty_url) == []
