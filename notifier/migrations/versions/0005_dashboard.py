"""The operator dashboard: per-minute delivery counters and per-minute queue samples.

Both start empty: the dashboard shows what happens from the upgrade on.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: Union[str, Sequence[str], None] = "0004"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Create `delivery_minutes` and `queue_samples`."""
    op.create_table(
        "delivery_minutes",
        sa.Column("minute", sa.Integer, nullable=False),
        sa.Column("platform", sa.String(8), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(255), nullable=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("minute", "platform", "outcome", "reason"),
    )
    op.create_table(
        "queue_samples",
        sa.Column("minute", sa.Integer, nullable=False, autoincrement=False),
        sa.Column("pending_jobs", sa.Integer, nullable=False),
        sa.Column("pending_deliveries", sa.Integer, nullable=False),
        sa.Column("oldest_pending_age", sa.Double, nullable=False),
        sa.PrimaryKeyConstraint("minute"),
    )


def downgrade() -> None:
    """Drop both tables (the counters are derived data)."""
    op.drop_table("queue_samples")
    op.drop_table("delivery_minutes")
