"""The tables: the one contract the web layer and the dispatcher share, on SQLAlchemy Core 2.x.

Times are stored as UTC epoch seconds (float): they compare the same way on SQLite and PostgreSQL,
and the dispatcher's `now` stays a plain number. The database gets these tables through the
revisions in notifier/migrations/ (notifier.db.migrate), never from this metadata directly.
"""
from __future__ import annotations

import sqlalchemy as sa



# the tables as the code uses them; notifier/migrations/ changes a database to match, one revision at a time
metadata = sa.MetaData()


# 64-bit ids on PostgreSQL (a busy service passes 2**31 deliveries); on SQLite an INTEGER primary
# key is the 64-bit rowid already, and must stay INTEGER to be one
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


users = sa.Table(
    "users", metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.Double, nullable=False),
)


devices = sa.Table(
    "devices", metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("user_id", Id, sa.ForeignKey("users.id"), nullable=False, index=True),
    sa.Column("platform", sa.String(8), nullable=False),
    sa.Column("token", sa.String(4096), nullable=False),
    sa.Column("app", sa.String(255)),
    sa.Column("enabled", sa.Boolean, nullable=False, default=True),
    # why the device stopped receiving: "unregistered" (the provider said so), "deleted" (the user)
    sa.Column("disabled_reason", sa.String(64)),
    sa.Column("created_at", sa.Double, nullable=False),
    # Web Push only: the subscription's keys, base64url (a 65-byte P-256 point, a 16-byte secret);
    # the token is then the subscription's endpoint
    sa.Column("p256dh", sa.String(100)),
    sa.Column("auth", sa.String(32)),
    # a token identifies one phone whatever the platform: it can belong to one user at a time
    sa.UniqueConstraint("token", name="uq_devices_token"),
)


chats = sa.Table(
    "chats", metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("creator_id", Id, sa.ForeignKey("users.id"), nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
)


members = sa.Table(
    "members", metadata,
    sa.Column("chat_id", Id, sa.ForeignKey("chats.id"), primary_key=True),
    sa.Column("user_id", Id, sa.ForeignKey("users.id"), primary_key=True),
    sa.Column("muted_until", sa.Double),
    sa.Column("joined_at", sa.Double, nullable=False),
    sa.Index("ix_members_user", "user_id", "chat_id"),
)


messages = sa.Table(
    "messages", metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("chat_id", Id, sa.ForeignKey("chats.id"), nullable=False),
    sa.Column("sender_id", Id, sa.ForeignKey("users.id"), nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("client_id", sa.String(64)),
    sa.Column("created_at", sa.Double, nullable=False),
    # history pages walk (chat_id, id); retried POSTs look up (chat_id, sender_id, client_id)
    sa.Index("ix_messages_chat", "chat_id", "id"),
    sa.UniqueConstraint("chat_id", "sender_id", "client_id", name="uq_messages_client_id"),
)


push_jobs = sa.Table(
    "push_jobs", metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("message_id", Id, sa.ForeignKey("messages.id"), nullable=False, unique=True),
    sa.Column("state", sa.String(16), nullable=False),  # pending -> expanded -> completed
    # where the chunked expansion stands: the last (user_id, device_id) turned into a delivery. Kept
    # in the row, committed with the deliveries it covers, so any dispatcher on any host can expand
    # the next chunk, and a crash loses nothing
    sa.Column("cursor_user", Id),
    sa.Column("cursor_device", Id),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Index("ix_push_jobs_state", "state", "id"),
)


deliveries = sa.Table(
    "deliveries", metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("message_id", Id, sa.ForeignKey("messages.id"), nullable=False),
    sa.Column("device_id", Id, sa.ForeignKey("devices.id"), nullable=False),
    sa.Column("platform", sa.String(8), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("next_attempt_at", sa.Double, nullable=False),
    sa.Column("lease_owner", sa.String(128)),
    sa.Column("lease_until", sa.Double),
    sa.Column("last_status", sa.Integer),
    sa.Column("last_reason", sa.String(255)),
    sa.Column("sent_at", sa.Double),
    # the host whose dispatcher made the last attempt (shows how several hosts share the work)
    sa.Column("handled_by", sa.String(128)),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.UniqueConstraint("message_id", "device_id", name="uq_deliveries_message_device"),
    # the claim query: pending rows in due order
    sa.Index("ix_deliveries_due", "state", "next_attempt_at"),
    # "is anything of this message still pending?", asked after every recorded batch: a partial
    # index holds only the pending rows, so the answer is one probe, not a walk over the message
    sa.Index("ix_deliveries_pending_message", "message_id",
             sqlite_where=sa.text("state = 'pending'"), postgresql_where=sa.text("state = 'pending'")),
)


# a message's fan-out once it is complete: its summary, kept after its delivery rows are pruned
fanouts = sa.Table(
    "fanouts", metadata,
    sa.Column("message_id", Id, sa.ForeignKey("messages.id"), primary_key=True),
    sa.Column("sent", sa.Integer, nullable=False),
    sa.Column("failed", sa.Integer, nullable=False),
    sa.Column("skipped", sa.Integer, nullable=False),
    sa.Column("completed_at", sa.Double, nullable=False),
    sa.Column("pruned_at", sa.Double),
    # the pruning pass: completed long enough ago, not yet pruned
    sa.Index("ix_fanouts_prune", "pruned_at", "completed_at"),
)


# result webhooks: one row per event, written in the transaction of the change it reports
webhook_events = sa.Table(
    "webhook_events", metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("webhook_id", sa.String(64), nullable=False, unique=True),  # the webhook-id header
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("body", sa.Text, nullable=False),  # sent byte for byte on every attempt (it is signed)
    sa.Column("state", sa.String(16), nullable=False),  # pending -> delivered | failed
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("next_attempt_at", sa.Double, nullable=False),
    sa.Column("lease_owner", sa.String(128)),
    sa.Column("lease_until", sa.Double),
    sa.Column("last_status", sa.Integer),
    sa.Column("last_error", sa.String(255)),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("finished_at", sa.Double),
    sa.Index("ix_webhook_events_due", "state", "next_attempt_at"),
    sa.Index("ix_webhook_events_finished", "finished_at"),
)


# every attempt to send an event: when, what came back, how long it took
webhook_attempts = sa.Table(
    "webhook_attempts", metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("event_id", Id, sa.ForeignKey("webhook_events.id"), nullable=False, index=True),
    sa.Column("attempted_at", sa.Double, nullable=False),
    sa.Column("status", sa.Integer),  # None: no answer (connection error, timeout)
    sa.Column("error", sa.String(255)),
    sa.Column("seconds", sa.Double, nullable=False),
)


dispatchers = sa.Table(
    "dispatchers", metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("host_id", sa.String(128), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started_at", sa.Double, nullable=False),
    sa.Column("heartbeat_at", sa.Double, nullable=False),
    sa.Column("stopped_at", sa.Double),
    sa.Index("ix_dispatchers_host", "host_id", "heartbeat_at"),
)


# the operator dashboard's per-minute counters: deliveries recorded in each minute (epoch seconds
# // 60) by platform and outcome (sent, failed, skipped, retried); `reason` is the provider's for
# failures, '' otherwise. Upserted by the transaction that records a batch, pruned by retention
delivery_minutes = sa.Table(
    "delivery_minutes", metadata,
    sa.Column("minute", sa.Integer, primary_key=True),
    sa.Column("platform", sa.String(8), primary_key=True),
    sa.Column("outcome", sa.String(16), primary_key=True),
    sa.Column("reason", sa.String(255), primary_key=True),
    sa.Column("count", sa.Integer, nullable=False),
)


# the queue as a dispatcher's heartbeat saw it, one row per minute: the dashboard's last hour
queue_samples = sa.Table(
    "queue_samples", metadata,
    sa.Column("minute", sa.Integer, primary_key=True, autoincrement=False),  # a time, not a serial
    sa.Column("pending_jobs", sa.Integer, nullable=False),
    sa.Column("pending_deliveries", sa.Integer, nullable=False),
    sa.Column("oldest_pending_age", sa.Double, nullable=False),
)
