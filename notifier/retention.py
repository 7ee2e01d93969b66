"""Retention: finished work deleted PUSH_RETENTION seconds after it finished, in small batches.

What goes: the delivery rows and the push job of a message whose fan-out completed before the
cutoff (its summary stays in `fanouts`, marked pruned), and webhook events delivered or given up
on before it, with their attempts, and the dashboard's per-minute counters and queue samples (kept
for an hour at least, the dashboard's window). What stays: messages (the chat history), devices, summaries,
and anything unfinished, however old.

Each batch is one short write transaction of at most BATCH rows: SQLite has a single write lock
and a POST waits for it, so a pass of 100,000 rows is a few hundred small waits, never one long one.
"""
from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from notifier import events, minutes
from notifier.schema import (deliveries, delivery_minutes, fanouts, push_jobs, queue_samples, webhook_attempts,
                             webhook_events)

BATCH = 500  # rows deleted per transaction


def prune_deliveries(conn: Connection, cutoff: float, now: float) -> int:
    """One batch: delete up to BATCH delivery rows of fan-outs completed before `cutoff`. When
    none is left, mark those fan-outs pruned and delete their jobs. Returns the rows deleted (0:
    nothing left of this kind). A batch with fewer rows than BATCH took every row left of every
    such fan-out, so those fan-outs are then empty."""
    old = sa.and_(fanouts.c.pruned_at.is_(None), fanouts.c.completed_at < cutoff)
    batch = (sa.select(deliveries.c.id).join(fanouts, fanouts.c.message_id == deliveries.c.message_id)
             .where(old).limit(BATCH))
    deleted = conn.execute(deliveries.delete().where(deliveries.c.id.in_(batch.scalar_subquery()))).rowcount
    if deleted < BATCH:
        done = sa.select(fanouts.c.message_id).where(old).limit(BATCH)
        message_ids = conn.execute(done).scalars().all()
        if message_ids:
            conn.execute(push_jobs.delete().where(push_jobs.c.message_id.in_(message_ids),
                                                  push_jobs.c.state == "completed"))
            conn.execute(fanouts.update().where(fanouts.c.message_id.in_(message_ids)).values(pruned_at=now))
        deleted += len(message_ids)
    return deleted


def prune_events(conn: Connection, cutoff: float) -> int:
    """One batch: delete up to BATCH webhook events finished before `cutoff`, with their attempts.
    Returns the events deleted."""
    ids = conn.execute(
        sa.select(webhook_events.c.id)
        .where(webhook_events.c.finished_at < cutoff, webhook_events.c.state != events.PENDING).limit(BATCH)
    ).scalars().all()
    if ids:
        conn.execute(webhook_attempts.delete().where(webhook_attempts.c.event_id.in_(ids)))
        conn.execute(webhook_events.delete().where(webhook_events.c.id.in_(ids)))
    return len(ids)


MINUTES_PER_BATCH = 10  # of per-minute rows per transaction: a few hundred rows at most


def prune_minutes(conn: Connection, cutoff: float, now: float) -> int:
    """One batch: delete the dashboard's per-minute counters and queue samples of up to
    MINUTES_PER_BATCH minutes before `cutoff`, never of the hour the dashboard shows (however short
    PUSH_RETENTION is). Returns the rows deleted. A maintenance pass every minute deletes far more
    minutes than one more minute adds, so one call per pass keeps up."""
    before = minutes.minute_of(min(cutoff, now - minutes.WINDOW * 60))
    deleted = 0
    for table in (delivery_minutes, queue_samples):
        first = conn.execute(sa.select(sa.func.min(table.c.minute))).scalar()
        if first is not None and first < before:
            upto = min(before, first + MINUTES_PER_BATCH)
            deleted += conn.execute(table.delete().where(table.c.minute < upto)).rowcount
    return deleted
