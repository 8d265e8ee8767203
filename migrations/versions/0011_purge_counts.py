"""purge: rows deleted by table

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30

``receipts purge`` and the daily purge (worker/purge.py) add what they delete to
``receipts_purge_counts``, which the exporter reports as ``receipts_purged_rows_total``.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "receipts_purge_counts",
        sa.Column("table_name", sa.Text(), nullable=False),
        sa.Column("purged", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("last_purged_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("table_name", name=op.f("receipts_purge_counts_pkey")),
    )


def downgrade() -> None:
    op.drop_table("receipts_purge_counts")
