"""Schema migrations (Alembic), callable from code: `receipts migrate`, `receipts run` and tests."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

import worker


def migrations_dir() -> Path:
    """Installed, the migrations ship inside the package; in a checkout they sit at the top."""
    package_dir = Path(worker.__file__).resolve().parent
    for candidate in (package_dir / "migrations", package_dir.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError("the migrations folder is missing from this installation")


def alembic_config(database_url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    if database_url:
        # ConfigParser treats % as interpolation; URLs may contain escaped characters.
        config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str | None = None, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str | None = None, revision: str = "base") -> None:
    command.downgrade(alembic_config(database_url), revision)


def schema_problem() -> str | None:
    """Why the configured database cannot serve this version yet, or None when it is at the
    newest schema: a worker started on it would fail on every tick. Connecting raises the
    database's own error (a SQLite file that does not exist, a server that does not answer),
    which the command line reports in one line (worker/problems.py)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from worker.db import get_engine

    with get_engine().connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    script = ScriptDirectory.from_config(alembic_config())
    head = script.get_current_head()
    if current == head:
        return None
    if current is None:
        return "the database has no tables yet: run receipts migrate"
    if current not in {revision.revision for revision in script.walk_revisions()}:
        return (
            f"the database was migrated by a newer version of receipts (its revision {current} "
            "is unknown to this one): upgrade uspeedo-receipts"
        )
    return "the database's tables are older than this version of receipts: run receipts migrate"
