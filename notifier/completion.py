"""The end of a message's fan-out: noticed in the transaction that makes it complete, its summary
stored (what the deliveries report answers once the rows are pruned), its job marked `completed`,
and, with webhooks on, its `message.fanout_completed` event written beside them.

A fan-out is complete when its job is expanded and none of its deliveries is pending. The two
transactions that can make it so check it: the one that finishes the expansion (a message with no
recipient device is complete there) and the one that records a batch of its deliveries.
"""
from __future__ import annotations

from typing import Iterable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from notifier import db, events, outbox
from notifier.model import DeliveryState
from notifier.schema import deliveries, fanouts, messages, push_jobs

FAILED_LISTED = 100  # failed devices named in a fanout_completed event
FANOUT_COMPLETED = "message.fanout_completed"


def complete_fanouts(conn: Connection, message_ids: Iterable[int], now: float, with_events: bool) -> list[int]:
    """Complete, in the caller's transaction, the fan-outs of these messages that are complete now;
    returns their ids. Safe to call for any message, any number of times: a fan-out completes once."""
    return [message_id for message_id in sorted(set(message_ids))
            if _complete(conn, message_id, now, with_events)]


def sweep(conn: Connection, now: float, with_events: bool, limit: int = 100) -> list[int]:
    """Complete fan-outs that are complete but were not noticed (a safety net the dispatcher runs
    now and then; the transactions above notice every one the code knows of)."""
    pending = sa.exists().where(deliveries.c.message_id == push_jobs.c.message_id,
                                deliveries.c.state == DeliveryState.PENDING.value)
    candidates = conn.execute(
        sa.select(push_jobs.c.message_id).where(push_jobs.c.state == "expanded", ~pending)
        .order_by(push_jobs.c.id).limit(limit)
    ).scalars().all()
    return complete_fanouts(conn, candidates, now, with_events)


def _complete(conn: Connection, message_id: int, now: float, with_events: bool) -> bool:
    params = {"message_id": message_id}
    job = _JOB_STATE.first(conn, params)
    if job is None or job.state != "expanded":
        return False
    if _ANY_PENDING.first(conn, params)[0]:
        return False
    counts = dict(_COUNTS.all(conn, params))
    summary = {state.value: counts.get(state.value, 0)
               for state in (DeliveryState.SENT, DeliveryState.FAILED, DeliveryState.SKIPPED)}
    _MARK_COMPLETED.execute(conn, params).close()
    _INSERT_FANOUT.execute(conn, {**params, "completed_at": now, **summary}).close()
    if with_events:
        events.add_event(conn, FANOUT_COMPLETED, _event_data(conn, message_id, summary), now)
    return True


# Statements of every message's completion, built and compiled once and run on the driver
# (db.DriverStatement): built per message with Core, they cost 100-200 us of CPU for a message
# (most of the dispatcher's work per message without devices), much of it inside the transaction
# that holds SQLite's write lock.
_MESSAGE = sa.bindparam("message_id")
# PostgreSQL: the job row locked whatever its state: two transactions that each finish part of
# this fan-out (its last batches recorded by two dispatchers, or the last batch and the end of the
# expansion) take turns here, and the second sees the first's rows final. Without it, each could
# see the other's rows still pending, and the fan-out would never be reported complete. (SQLite
# renders no FOR UPDATE: its write transactions never interleave.)
_JOB_STATE = db.DriverStatement(
    sa.select(push_jobs.c.state).where(push_jobs.c.message_id == _MESSAGE).with_for_update())
_ANY_PENDING = db.DriverStatement(
    sa.select(sa.exists().where(deliveries.c.message_id == _MESSAGE,
                                deliveries.c.state == sa.literal_column(f"'{DeliveryState.PENDING.value}'"))))
_COUNTS = db.DriverStatement(
    sa.select(deliveries.c.state, sa.func.count()).where(deliveries.c.message_id == _MESSAGE)
    .group_by(deliveries.c.state))
_MARK_COMPLETED = db.DriverStatement(
    push_jobs.update().where(push_jobs.c.message_id == _MESSAGE)
    .values(state=sa.literal_column("'completed'")))
_INSERT_FANOUT = db.DriverStatement(fanouts.insert().values(
    message_id=_MESSAGE, completed_at=sa.bindparam("completed_at"), sent=sa.bindparam("sent"),
    failed=sa.bindparam("failed"), skipped=sa.bindparam("skipped")))


def _event_data(conn: Connection, message_id: int, summary: dict) -> dict:
    message = conn.execute(
        sa.select(messages.c.chat_id, messages.c.sender_id).where(messages.c.id == message_id)).one()
    failed = conn.execute(
        sa.select(deliveries.c.device_id, deliveries.c.platform, deliveries.c.last_status, deliveries.c.last_reason)
        .where(deliveries.c.message_id == message_id, deliveries.c.state == DeliveryState.FAILED.value)
        .order_by(deliveries.c.device_id).limit(FAILED_LISTED)
    ).all()
    return {
        "message_id": message_id, "chat_id": message.chat_id, "sender_id": message.sender_id,
        "summary": summary,
        "failed": [{"device_id": r.device_id, "platform": r.platform, "last_status": r.last_status,
                    "last_reason": r.last_reason} for r in failed],
        "deliveries_url": f"/v1/messages/{message_id}/deliveries",
    }


def delivery_report(conn: Connection, message_id: int) -> dict:
    """What GET /v1/messages/{id}/deliveries answers: `complete`, `summary`, `deliveries`, `pruned`.
    Once the rows are pruned, the summary stored at completion stands in for them."""
    fanout = conn.execute(sa.select(fanouts).where(fanouts.c.message_id == message_id)).first()
    if fanout is not None and fanout.pruned_at is not None:
        summary = {DeliveryState.PENDING.value: 0, DeliveryState.SENT.value: fanout.sent,
                   DeliveryState.FAILED.value: fanout.failed, DeliveryState.SKIPPED.value: fanout.skipped}
        return {"complete": True, "summary": summary, "deliveries": [], "pruned": True}
    rows = outbox.message_deliveries(conn, message_id)
    summary = {state.value: 0 for state in DeliveryState}
    for row in rows:
        summary[row["state"]] += 1
    complete = outbox.job_expanded(conn, message_id) and summary[DeliveryState.PENDING.value] == 0
    return {"complete": complete, "summary": summary, "deliveries": rows, "pruned": False}
