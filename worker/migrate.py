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
