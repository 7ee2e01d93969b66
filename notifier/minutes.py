"""The operator dashboard's history, one row per minute: deliveries recorded by platform and
outcome (`delivery_minutes`), and the queue as a dispatcher saw it (`queue_samples`).

A minute is epoch seconds // 60. The counters are written by the transaction that records a
batch's outcomes, so they count exactly what was committed; the samples by a dispatcher's
heartbeat, at most one per minute for all hosts. Nothing here is written by a read.
"""
from __future__ import annotations

import functools
from typing import Iterable

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from notifier import outbox
from notifier.model import DeliveryState
from notifier.schema import deliveries, delivery_minutes, queue_samples

WINDOW = 60  # minutes the dashboard shows
OUTCOMES = ("sent", "failed", "skipped", "retried")  # "retried": the attempt failed, another is due
ID_CHUNK = 5_000  # ids per IN (...) list: under SQLite's 32,766 bound parameters


def minute_of(epoch: float) -> int:
    """The epoch minute that `epoch` (seconds) falls in."""
    return int(epoch // 60)


def count_outcomes(conn: Connection, delivery_ids: Iterable[int], now: float) -> None:
    """Add the outcomes just recorded for `delivery_ids` to the counters of `now`'s minute, in the
    caller's transaction (the one that recorded them).

    One INSERT .. SELECT .. GROUP BY .. ON CONFLICT DO UPDATE per batch: the rows are read back by
    primary key, as the recorded outcomes carry no platform. A row whose lease another dispatcher
    took meanwhile (its result was not written) still holds that lease and is not counted.
    """
    ids = sorted(delivery_ids)
    statement = _count_statement(conn.dialect.name)
    for start in range(0, len(ids), ID_CHUNK):
        conn.execute(statement, {"minute": minute_of(now), "ids": ids[start:start + ID_CHUNK]})


@functools.cache
def _count_statement(dialect: str):
    # literal_column, not bound values: PostgreSQL must see the same expression in the SELECT and
    # the GROUP BY, and two bind parameters of the same value are not the same expression to it
    state = deliveries.c.state
    outcome = sa.case((state == sa.literal_column(f"'{DeliveryState.PENDING.value}'"),
                       sa.literal_column("'retried'")), else_=state)
    reason = sa.case((state == sa.literal_column(f"'{DeliveryState.FAILED.value}'"),
                      sa.func.coalesce(deliveries.c.last_reason, sa.literal_column("''"))),
                     else_=sa.literal_column("''"))
    rows = (sa.select(sa.bindparam("minute", type_=sa.Integer), deliveries.c.platform, outcome, reason,
                      sa.func.count())
            .where(deliveries.c.id.in_(sa.bindparam("ids", expanding=True)), deliveries.c.lease_owner.is_(None))
            .group_by(deliveries.c.platform, outcome, reason))
    insert = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(delivery_minutes)
    insert = insert.from_select(["minute", "platform", "outcome", "reason", "count"], rows)
    return insert.on_conflict_do_update(
        index_elements=["minute", "platform", "outcome", "reason"],
        set_={"count": delivery_minutes.c.count + insert.excluded["count"]},
    )


def sample_queue(conn: Connection, now: float) -> bool:
    """Record the queue once for `now`'s minute (a heartbeat calls this every few seconds: only
    the first call of a minute, on any host, measures and writes). True when it wrote."""
    minute = minute_of(now)
    if conn.execute(sa.select(queue_samples.c.minute).where(queue_samples.c.minute == minute)).first():
        return False
    depth = outbox.queue_depth(conn, now)
    insert = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(queue_samples)
    conn.execute(insert.values(minute=minute, **depth).on_conflict_do_nothing(index_elements=["minute"]))
    return True


def per_minute(conn: Connection, first: int) -> dict[tuple[int, str], int]:
    """Deliveries recorded from minute `first` on: {(minute, outcome): count}, all platforms."""
    rows = conn.execute(
        sa.select(delivery_minutes.c.minute, delivery_minutes.c.outcome, sa.func.sum(delivery_minutes.c.count))
        .where(delivery_minutes.c.minute >= first)
        .group_by(delivery_minutes.c.minute, delivery_minutes.c.outcome)
    )
    return {(minute, outcome): int(count) for minute, outcome, count in rows}


def failures(conn: Connection, first: int, limit: int = 50) -> list[dict]:
    """Failed deliveries from minute `first` on, by platform and reason, most frequent first."""
    total = sa.func.sum(delivery_minutes.c.count)
    rows = conn.execute(
        sa.select(delivery_minutes.c.platform, delivery_minutes.c.reason, total)
        .where(delivery_minutes.c.minute >= first, delivery_minutes.c.outcome == DeliveryState.FAILED.value)
        .group_by(delivery_minutes.c.platform, delivery_minutes.c.reason)
        .order_by(total.desc(), delivery_minutes.c.platform, delivery_minutes.c.reason)
        .limit(limit)
    )
    return [{"platform": platform, "reason": reason, "count": int(count)} for platform, reason, count in rows]


def queue_history(conn: Connection, first: int) -> dict[int, dict]:
    """The queue samples from minute `first` on, by minute."""
    rows = conn.execute(sa.select(queue_samples).where(queue_samples.c.minute >= first))
    return {row.minute: {"pending_jobs": row.pending_jobs, "pending_deliveries": row.pending_deliveries,
                         "oldest_pending_age": row.oldest_pending_age} for row in rows}
