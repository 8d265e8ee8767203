"""push: sms_receipts.source, the inbox of unmatched pushed receipts, the receivers' counts

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30

Receipts now come from polls, Uspeedo's push and operators' repolls (``sms_receipts.source``);
pushed receipts for a SessionNo not tracked yet wait in ``sms_receipt_inbox``; the receiver
processes add what they counted to ``receipts_push_counts`` for the exporter.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMPTZ = sa.DateTime(timezone=True)
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
RESULTS = "('Success', 'Fail', 'Unknow', 'SubmitFail')"
SOURCES = "('poll', 'push', 'repoll')"


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        # ADD COLUMN with its CHECK inline: a batch rebuild of sms_receipts would be refused
        # while the views read it.
        op.execute(
            "ALTER TABLE sms_receipts ADD COLUMN source TEXT DEFAULT 'poll' NOT NULL "
            f"CONSTRAINT ck_sms_receipts_source CHECK (source IN {SOURCES})"
        )
    else:
        op.add_column(
            "sms_receipts",
            sa.Column("source", sa.Text(), server_default="poll", nullable=False),
        )
        op.create_check_constraint("ck_sms_receipts_source", "sms_receipts", f"source IN {SOURCES}")
    op.create_table(
        "sms_receipt_inbox",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("session_no", sa.Text(), nullable=False),
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("phone", sa.Text(), nullable=False),
        sa.Column("phone_key", sa.Text(), nullable=False),
        sa.Column("result", sa.Text(), nullable=False),
        sa.Column("receipt_code", sa.Text(), nullable=True),
        sa.Column("receipt_desc", sa.Text(), nullable=True),
        sa.Column("receipt_time", TIMESTAMPTZ, nullable=True),
        sa.Column("cost_count", sa.Integer(), nullable=True),
        sa.Column("user_id", sa.Text(), nullable=True),
        sa.Column("country_code", sa.Text(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("received_at", TIMESTAMPTZ, nullable=False),
        sa.CheckConstraint(f"result IN {RESULTS}", name=op.f("ck_sms_receipt_inbox_result")),
        sa.PrimaryKeyConstraint("id", name=op.f("sms_receipt_inbox_pkey")),
        sa.UniqueConstraint(
            "session_no",
            "account_id",
            "phone_key",
            name=op.f("sms_receipt_inbox_session_no_account_id_phone_key_key"),
        ),
    )
    op.create_index(
        "ix_sms_receipt_inbox_received_at", "sms_receipt_inbox", ["received_at"], unique=False
    )
    op.create_table(
        "receipts_push_counts",
        sa.Column("metric", sa.Text(), nullable=False),
        sa.Column("label", sa.Text(), nullable=False),
        sa.Column("value", sa.Float(), server_default=sa.text("0"), nullable=False),
        sa.PrimaryKeyConstraint("metric", "label", name=op.f("receipts_push_counts_pkey")),
    )


def downgrade() -> None:
    op.drop_table("receipts_push_counts")
    op.drop_index("ix_sms_receipt_inbox_received_at", table_name="sms_receipt_inbox")
    op.drop_table("sms_receipt_inbox")
    if op.get_bind().dialect.name != "sqlite":
        op.drop_constraint("ck_sms_receipts_source", "sms_receipts", type_="check")
    op.drop_column("sms_receipts", "source")
