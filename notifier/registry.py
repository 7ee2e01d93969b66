"""The dispatcher registry: who started, who is alive (heartbeats), and taking over the leases
of a dispatcher that is gone."""
from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from notifier.model import DeliveryState, iso
from notifier.schema import deliveries, dispatchers


def register_dispatcher(conn: Connection, host_id: str, pid: int, now: float) -> int:
    """Record a dispatcher start; return its row id (counted as a restart by the metrics)."""
    return conn.execute(
        dispatchers.insert().values(host_id=host_id, pid=pid, started_at=now, heartbeat_at=now).returning(dispatchers.c.id)
    ).scalar_one()


def heartbeat(conn: Connection, dispatcher_id: int, now: float, stopped: bool = False) -> None:
    """Mark the dispatcher alive at `now` (or stopped)."""
    # alive again after a takeover declared it dead (its heartbeat was stalled, not stopped):
    # clear the mark, so a later death of it is noticed too
    values = {"heartbeat_at": now, "stopped_at": now if stopped else None}
    conn.execute(dispatchers.update().where(dispatchers.c.id == dispatcher_id).values(**values))


def dispatcher_status(conn: Connection, now: float, stale_after: float) -> dict:
    """Dispatchers seen alive within `stale_after` seconds, and how many ever started."""
    alive = conn.execute(
        sa.select(dispatchers.c.host_id, dispatchers.c.pid, dispatchers.c.heartbeat_at)
        .where(dispatchers.c.stopped_at.is_(None), dispatchers.c.heartbeat_at >= now - stale_after)
        .order_by(dispatchers.c.id)
    ).all()
    starts = conn.execute(sa.select(sa.func.count()).select_from(dispatchers)).scalar_one()
    return {
        "alive": [{"host_id": r.host_id, "pid": r.pid, "last_seen": iso(r.heartbeat_at)} for r in alive],
        "starts": starts,
    }


def lease_owner(host_id: str, pid: int, dispatcher_id: int) -> str:
    """The lease owner name of a registered dispatcher: derivable from its registry row, so a
    successor can release exactly the leases of a dispatcher it knows to be dead."""
    return f"{host_id}:{pid}:{dispatcher_id}"


def take_over(conn: Connection, own_id: int, now: float, host_id: str | None = None,
              stale_before: float | None = None) -> list[tuple[str, int]]:
    """Declare dead, and release the leases of, every other dispatcher still registered as running
    that is of `host_id` (the caller proved them dead: it could bind the host's wake-up name) or
    whose heartbeat is older than `stale_before`. Their rows become claimable at once, instead of
    when the leases run out. Returns (owner, leases released) per dispatcher taken over."""
    suspects = sa.false()
    if host_id is not None:
        suspects = sa.or_(suspects, dispatchers.c.host_id == host_id)
    if stale_before is not None:
        suspects = sa.or_(suspects, dispatchers.c.heartbeat_at < stale_before)
    query = sa.select(dispatchers.c.id, dispatchers.c.host_id, dispatchers.c.pid).where(
        dispatchers.c.stopped_at.is_(None), dispatchers.c.id != own_id, suspects)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)  # two survivors: one takes each over
    taken = []
    for row in conn.execute(query).all():
        owner = lease_owner(row.host_id, row.pid, row.id)
        released = conn.execute(
            deliveries.update().where(deliveries.c.state == DeliveryState.PENDING.value,
                                      deliveries.c.lease_owner == owner)
            .values(lease_owner=None, lease_until=None)
        ).rowcount
        conn.execute(dispatchers.update().where(dispatchers.c.id == row.id).values(stopped_at=now))
        taken.append((owner, released))
    return taken


def dispatchers_alive(conn: Connection, now: float, stale_after: float) -> list[dict]:
    """Dispatchers seen alive within `stale_after` seconds, on every host: who, since when, last seen."""
    rows = conn.execute(
        sa.select(dispatchers.c.host_id, dispatchers.c.pid, dispatchers.c.started_at, dispatchers.c.heartbeat_at)
        .where(dispatchers.c.stopped_at.is_(None), dispatchers.c.heartbeat_at >= now - stale_after)
        .order_by(dispatchers.c.host_id, dispatchers.c.id)
    ).all()
    return [{"host_id": r.host_id, "pid": r.pid, "started": iso(r.started_at), "last_heartbeat": iso(r.heartbeat_at),
             "heartbeat_age": round(now - r.heartbeat_at, 1)} for r in rows]
