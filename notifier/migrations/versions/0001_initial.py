"""The schema of the first release (65147a6), as its create_all made it.

Written out, not derived from notifier.schema.metadata: the metadata follows the code, a revision
stays what it was. A database made by that release (a `meta` row schema_version=1, no
alembic_version table) is stamped with this revision by db.migrate() instead of running it.

Revision ID: 0001
Revises:
Create Date: 2026-12-01
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

# 64-bit ids on PostgreSQL; on SQLite an INTEGER primary key is the 64-bit rowid and must stay INTEGER
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Create every table and index of the first release, in its create_all order."""
    op.create_table(
        "dispatchers",
        sa.Column("id", Id, primary_key=True),
        sa.Column("host_id", sa.String(128), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("started_at", sa.Double, nullable=False),
        sa.Column("heartbeat_at", sa.Double, nullable=False),
        sa.Column("stopped_at", sa.Double),
    )
    op.create_index("ix_dispatchers_host", "dispatchers", ["host_id", "heartbeat_at"])
    op.create_table(
        "meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(255), nullable=False),
    )
    op.create_table(
        "users",
        sa.Column("id", Id, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.UniqueConstraint("token_hash"),
    )
    op.create_table(
        "chats",
        sa.Column("id", Id, primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("creator_id", Id, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.ForeignKeyConstraint(["creator_id"], ["users.id"]),
    )
    op.create_table(
        "devices",
        sa.Column("id", Id, primary_key=True),
        sa.Column("user_id", Id, nullable=False),
        sa.Column("platform", sa.String(8), nullable=False),
        sa.Column("token", sa.String(4096), nullable=False),
        sa.Column("app", sa.String(255)),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("disabled_reason", sa.String(64)),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.UniqueConstraint("token", name="uq_devices_token"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"]),
    )
    op.create_index("ix_devices_user_id", "devices", ["user_id"])
    op.create_table(
        "members",
        sa.Column("chat_id", Id, nullable=False),
        sa.Column("user_id", Id, nullable=False),
        sa.Column("muted_until", sa.Double),
        sa.Column("joined_at", sa.Double, nullable=False),
        sa.PrimaryKeyConstraint("chat_id", "user_id"),
        sa.ForeignKeyConstraint(["chat_id"], ["chats.id"]),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"]),
    )
    op.create_index("ix_members_user", "members", ["user_id", "chat_id"])
    op.create_table(
        "messages",
        sa.Column("id", Id, primary_key=True),
        sa.Column("chat_id", Id, nullable=False),
        sa.Column("sender_id", Id, nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("client_id", sa.String(64)),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.UniqueConstraint("chat_id", "sender_id", "client_id", name="uq_messages_client_id"),
        sa.ForeignKeyConstraint(["chat_id"], ["chats.id"]),
        sa.ForeignKeyConstraint(["sender_id"], ["users.id"]),
    )
    op.create_index("ix_messages_chat", "messages", ["chat_id", "id"])
    op.create_table(
        "deliveries",
        sa.Column("id", Id, primary_key=True),
        sa.Column("message_id", Id, nullable=False),
        sa.Column("device_id", Id, nullable=False),
        sa.Column("platform", sa.String(8), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", sa.Double, nullable=False),
        sa.Column("lease_owner", sa.String(128)),
        sa.Column("lease_until", sa.Double),
        sa.Column("last_status", sa.Integer),
        sa.Column("last_reason", sa.String(255)),
        sa.Column("sent_at", sa.Double),
        sa.Column("handled_by", sa.String(128)),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.UniqueConstraint("message_id", "device_id", name="uq_deliveries_message_device"),
        sa.ForeignKeyConstraint(["message_id"], ["messages.id"]),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"]),
    )
    op.create_index("ix_deliveries_due", "deliveries", ["state", "next_attempt_at"])
    op.create_table(
        "push_jobs",
        sa.Column("id", Id, primary_key=True),
        sa.Column("message_id", Id, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("cursor_user", Id),
        sa.Column("cursor_device", Id),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.UniqueConstraint("message_id"),
        sa.ForeignKeyConstraint(["message_id"], ["messages.id"]),
    )
    op.create_index("ix_push_jobs_state", "push_jobs", ["state", "id"])


def downgrade() -> None:
    """Drop everything: the first revision has nothing before it."""
    for table in ("push_jobs", "deliveries", "messages", "members", "devices", "chats", "users", "meta",
                  "dispatchers"):
        op.drop_table(table)
