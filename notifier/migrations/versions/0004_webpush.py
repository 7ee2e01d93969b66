"""Web Push: a device may be a browser's push subscription, with its two keys.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: Union[str, Sequence[str], None] = "0003"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Add the subscription keys to `devices` (NULL for APNs and FCM devices)."""
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("p256dh", sa.String(100)))
        batch.add_column(sa.Column("auth", sa.String(32)))


def downgrade() -> None:
    """Drop the Web Push devices and the columns."""
    op.execute("UPDATE devices SET enabled = false, disabled_reason = 'downgraded' WHERE platform = 'webpush'")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("auth")
        batch.drop_column("p256dh")
