"""Webhook events in the database: written in the transaction of the change they report (the
outbox pattern), claimed with a lease by a dispatcher, each attempt recorded.

Storage only: what an event says is decided by its writers (notifier.completion, the dispatcher),
how it is sent by notifier.webhooks.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from notifier.model import iso
from notifier.schema import webhook_attempts, webhook_events

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
ERROR_LENGTH = 255  # the column's width


def add_event(conn: Connection, event_type: str, data: dict, now: float) -> str:
    """Queue an event in the caller's transaction; returns its webhook-id. The body is fixed here,
    once: every attempt sends (and signs) the same bytes."""
    webhook_id = f"msg_{uuid.uuid4().hex}"
    body = json.dumps({"type": event_type, "timestamp": iso(now), "data": data}, separators=(",", ":"))
    conn.execute(webhook_events.insert().values(
        webhook_id=webhook_id, type=event_type, body=body, state=PENDING, attempts=0, next_attempt_at=now,
        created_at=now))
    return webhook_id


@dataclass(frozen=True)
class ClaimedEvent:
    """An event leased for one attempt."""

    id: int
    webhook_id: str
    type: str
    body: str
    attempts: int  # made before this one


def claim_events(conn: Connection, owner: str, now: float, lease: float, limit: int) -> list[ClaimedEvent]:
    """Lease up to `limit` due events (oldest due first) to `owner`. SKIP LOCKED on PostgreSQL."""
    if limit <= 0:
        return []
    candidates = (
        sa.select(webhook_events.c.id)
        .where(webhook_events.c.state == PENDING, webhook_events.c.next_attempt_at <= now,
               sa.or_(webhook_events.c.lease_until.is_(None), webhook_events.c.lease_until <= now))
        .order_by(webhook_events.c.next_attempt_at, webhook_events.c.id).limit(limit)
    )
    if conn.dialect.name == "postgresql":
        candidates = candidates.with_for_update(skip_locked=True)
    rows = conn.execute(
        webhook_events.update().where(webhook_events.c.id.in_(candidates.scalar_subquery()))
        .values(lease_owner=owner, lease_until=now + lease)
        .returning(webhook_events.c.id, webhook_events.c.webhook_id, webhook_events.c.type,
                   webhook_events.c.body, webhook_events.c.attempts)
    ).all()
    return sorted((ClaimedEvent(*row) for row in rows), key=lambda event: event.id)


def record_attempt(conn: Connection, owner: str, event_id: int, now: float, seconds: float, status: int | None,
                   error: str | None, state: str, next_attempt_at: float) -> bool:
    """Record one attempt and the event's new state (PENDING with its next time, DELIVERED or
    FAILED), releasing the lease. False when the lease had passed to another dispatcher: then the
    attempt is still recorded, the state is theirs to decide."""
    error = error[:ERROR_LENGTH] if error else None
    conn.execute(webhook_attempts.insert().values(
        event_id=event_id, attempted_at=now, status=status, error=error, seconds=seconds))
    finished = now if state != PENDING else None
    return conn.execute(
        webhook_events.update()
        .where(webhook_events.c.id == event_id, webhook_events.c.lease_owner == owner)
        .values(state=state, attempts=webhook_events.c.attempts + 1, next_attempt_at=next_attempt_at,
                last_status=status, last_error=error, finished_at=finished, lease_owner=None, lease_until=None)
    ).rowcount == 1


def release_events(conn: Connection, owner: str) -> None:
    """Give back every event `owner` leases (a clean stop)."""
    conn.execute(webhook_events.update().where(webhook_events.c.lease_owner == owner)
                 .values(lease_owner=None, lease_until=None))


def next_due(conn: Connection) -> float | None:
    """When the next pending event is due (its lease's end, if it is leased), None when there is none."""
    return conn.execute(
        sa.select(sa.func.min(sa.case(
            (webhook_events.c.lease_until > webhook_events.c.next_attempt_at, webhook_events.c.lease_until),
            else_=webhook_events.c.next_attempt_at)))
        .where(webhook_events.c.state == PENDING)
    ).scalar()


def backlog(conn: Connection, now: float) -> dict:
    """Events not yet delivered (nor given up on), and the age of the oldest."""
    count, oldest = conn.execute(
        sa.select(sa.func.count(), sa.func.min(webhook_events.c.created_at)).where(webhook_events.c.state == PENDING)
    ).one()
    return {"pending": count, "oldest_pending_age": round(now - oldest, 3) if oldest is not None else 0.0}



def any_pending(conn: Connection) -> bool:
    """Whether any event is still to be delivered (due or not): then a dispatcher must run."""
    return bool(conn.execute(sa.select(sa.exists().where(webhook_events.c.state == PENDING))).scalar())
