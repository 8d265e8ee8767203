"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-27

The types are spelled out here rather than imported from worker.models, so that later model
changes cannot rewrite history.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMPTZ = sa.DateTime(timezone=True)
JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "sms_sessions",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("session_no", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), server_default="pending", nullable=False),
        sa.Column("phones", JSON, server_default=sa.text("'[]'"), nullable=False),
        sa.Column("user_ref", sa.Text(), nullable=True),
        sa.Column("sent_at", TIMESTAMPTZ, nullable=False),
        sa.Column("next_poll_at", TIMESTAMPTZ, nullable=True),
        sa.Column("last_polled_at", TIMESTAMPTZ, nullable=True),
        sa.Column("resolved_at", TIMESTAMPTZ, nullable=True),
        sa.Column("escalated_at", TIMESTAMPTZ, nullable=True),
        sa.Column("poll_count", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("escalation_detail", JSON, nullable=True),
        sa.Column("claim_token", sa.Text(), nullable=True),
        sa.Column("claimed_at", TIMESTAMPTZ, nullable=True),
        sa.Column(
            "created_at", TIMESTAMPTZ, server_default=sa.text("CURRENT_TIMESTAMP"), nullable=False
        ),
        sa.Column(
            "updated_at", TIMESTAMPTZ, server_default=sa.text("CURRENT_TIMESTAMP"), nullable=False
        ),
        sa.CheckConstraint(
            "state IN ('pending', 'resolved', 'escalated')", name=op.f("ck_sms_sessions_state")
        ),
        sa.CheckConstraint("account_id > 0", name=op.f("ck_sms_sessions_account_id_positive")),
        sa.PrimaryKeyConstraint("id", name=op.f("sms_sessions_pkey")),
        sa.UniqueConstraint(
            "account_id", "session_no", name=op.f("sms_sessions_account_id_session_no_key")
        ),
    )
    op.create_index(
        "ix_sms_sessions_due",
        "sms_sessions",
        ["account_id", "next_poll_at"],
        unique=False,
        postgresql_where=sa.text("state = 'pending'"),
        sqlite_where=sa.text("state = 'pending'"),
    )
    op.create_index(
        "ix_sms_sessions_pending_sent_at",
        "sms_sessions",
        ["sent_at"],
        unique=False,
        postgresql_where=sa.text("state = 'pending'"),
        sqlite_where=sa.text("state = 'pending'"),
    )
    op.create_table(
        "sms_receipts",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("account_id", sa.BigInteger(), nullable=False),
        sa.Column("session_no", sa.Text(), nullable=False),
        sa.Column("phone", sa.Text(), nullable=False),
        sa.Column("phone_key", sa.Text(), nullable=False),
        sa.Column("result", sa.Text(), nullable=False),
        sa.Column("receipt_code", sa.Text(), nullable=True),
        sa.Column("receipt_desc", sa.Text(), nullable=True),
        sa.Column("receipt_time", TIMESTAMPTZ, nullable=True),
        sa.Column("cost_count", sa.Integer(), nullable=True),
        sa.Column("user_id", sa.Text(), nullable=True),
        sa.Column("country_code", sa.Text(), nullable=True),
        sa.Column(
            "first_seen_at",
            TIMESTAMPTZ,
            server_default=sa.text("CURRENT_TIMESTAMP"),
            nullable=False,
        ),
        sa.Column(
            "updated_at", TIMESTAMPTZ, server_default=sa.text("CURRENT_TIMESTAMP"), nullable=False
        ),
        sa.CheckConstraint(
            "result IN ('Success', 'Fail', 'Unknow', 'SubmitFail')",
            name=op.f("ck_sms_receipts_result"),
        ),
        sa.ForeignKeyConstraint(
            ["account_id", "session_no"],
            ["sms_sessions.account_id", "sms_sessions.session_no"],
            name=op.f("sms_receipts_account_id_session_no_fkey"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("sms_receipts_pkey")),
        sa.UniqueConstraint(
            "account_id",
            "session_no",
            "phone_key",
            name=op.f("sms_receipts_account_id_session_no_phone_key_key"),
        ),
    )


def downgrade() -> None:
    op.drop_table("sms_receipts")
    op.drop_index(
        "ix_sms_sessions_pending_sent_at",
        table_name="sms_sessions",
        postgresql_where=sa.text("state = 'pending'"),
        sqlite_where=sa.text("state = 'pending'"),
    )
    op.drop_index(
        "ix_sms_sessions_due",
        table_name="sms_sessions",
        postgresql_where=sa.text("state = 'pending'"),
        sqlite_where=sa.text("state = 'pending'"),
    )
    op.drop_table("sms_sessions")
