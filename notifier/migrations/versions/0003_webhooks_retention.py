"""Result webhooks and retention: fan-out summaries, webhook events and their attempts, and the
partial index that tells when a message's fan-out is complete.

Messages whose fan-out was already complete when this runs get their summary (and their job the
`completed` state) here, from their delivery rows, without an event: webhooks report what happens
from now on, not the past.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: Union[str, Sequence[str], None] = "0002"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
PENDING = sa.text("state = 'pending'")


def upgrade() -> None:
    """Create the tables and the index; summarise the fan-outs already complete."""
    op.create_index("ix_deliveries_pending_message", "deliveries", ["message_id"],
                    sqlite_where=PENDING, postgresql_where=PENDING)
    op.create_table(
        "fanouts",
        sa.Column("message_id", Id, sa.ForeignKey("messages.id"), primary_key=True),
        sa.Column("sent", sa.Integer, nullable=False),
        sa.Column("failed", sa.Integer, nullable=False),
        sa.Column("skipped", sa.Integer, nullable=False),
        sa.Column("completed_at", sa.Double, nullable=False),
        sa.Column("pruned_at", sa.Double),
    )
    op.create_index("ix_fanouts_prune", "fanouts", ["pruned_at", "completed_at"])
    op.create_table(
        "webhook_events",
        sa.Column("id", Id, primary_key=True),
        sa.Column("webhook_id", sa.String(64), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", sa.Double, nullable=False),
        sa.Column("lease_owner", sa.String(128)),
        sa.Column("lease_until", sa.Double),
        sa.Column("last_status", sa.Integer),
        sa.Column("last_error", sa.String(255)),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("finished_at", sa.Double),
        sa.UniqueConstraint("webhook_id"),
    )
    op.create_index("ix_webhook_events_due", "webhook_events", ["state", "next_attempt_at"])
    op.create_index("ix_webhook_events_finished", "webhook_events", ["finished_at"])
    op.create_table(
        "webhook_attempts",
        sa.Column("id", Id, primary_key=True),
        sa.Column("event_id", Id, sa.ForeignKey("webhook_events.id"), nullable=False),
        sa.Column("attempted_at", sa.Double, nullable=False),
        sa.Column("status", sa.Integer),
        sa.Column("error", sa.String(255)),
        sa.Column("seconds", sa.Double, nullable=False),
    )
    op.create_index("ix_webhook_attempts_event_id", "webhook_attempts", ["event_id"])
    # fan-outs complete already: expanded, nothing pending. Their summary from their rows
    op.execute("""
        INSERT INTO fanouts (message_id, sent, failed, skipped, completed_at)
        SELECT j.message_id,
               (SELECT count(*) FROM deliveries d WHERE d.message_id = j.message_id AND d.state = 'sent'),
               (SELECT count(*) FROM deliveries d WHERE d.message_id = j.message_id AND d.state = 'failed'),
               (SELECT count(*) FROM deliveries d WHERE d.message_id = j.message_id AND d.state = 'skipped'),
               j.created_at
        FROM push_jobs j
        WHERE j.state = 'expanded'
          AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.message_id = j.message_id AND d.state = 'pending')
    """)
    op.execute("UPDATE push_jobs SET state = 'completed' WHERE message_id IN (SELECT message_id FROM fanouts)")


def downgrade() -> None:
    """Drop what upgrade() made; completed jobs go back to `expanded`."""
    op.execute("UPDATE push_jobs SET state = 'expanded' WHERE state = 'completed'")
    op.drop_index("ix_webhook_attempts_event_id", "webhook_attempts")
    op.drop_table("webhook_attempts")
    op.drop_index("ix_webhook_events_finished", "webhook_events")
    op.drop_index("ix_webhook_events_due", "webhook_events")
    op.drop_table("webhook_events")
    op.drop_index("ix_fanouts_prune", "fanouts")
    op.drop_table("fanouts")
    op.drop_index("ix_deliveries_pending_message", "deliveries")
