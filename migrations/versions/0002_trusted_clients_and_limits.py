"""trusted static clients, rate-limit counters, failed metadata-document fetches

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 06:05:00

Additive only: the previous release ignores the new column and tables.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import broker.db

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("clients") as batch_op:
        batch_op.add_column(
            sa.Column("trusted", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
    op.create_table(
        "rate_limit_counters",
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("expires_at", broker.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_rate_limit_counters")),
    )
    op.create_index(
        op.f("ix_rate_limit_counters_expires_at"),
        "rate_limit_counters",
        ["expires_at"],
        unique=False,
    )
    op.create_table(
        "client_metadata_failures",
        sa.Column("client_id", sa.String(length=2048), nullable=False),
        sa.Column("reason", sa.String(length=64), nullable=False),
        sa.Column("failed_at", broker.db.UTCDateTime(timezone=True), nullable=False),
        sa.Column("retry_at", broker.db.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("client_id", name=op.f("pk_client_metadata_failures")),
    )
    op.create_index(
        op.f("ix_client_metadata_failures_retry_at"),
        "client_metadata_failures",
        ["retry_at"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index(
        op.f("ix_client_metadata_failures_retry_at"), table_name="client_metadata_failures"
    )
    op.drop_table("client_metadata_failures")
    op.drop_index(op.f("ix_rate_limit_counters_expires_at"), table_name="rate_limit_counters")
    op.drop_table("rate_limit_counters")
    with op.batch_alter_table("clients") as batch_op:
        batch_op.drop_column("trusted")
