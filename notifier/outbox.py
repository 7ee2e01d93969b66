"""The outbox: push jobs queued with their message, expanded chunk by chunk into deliveries,
claimed with leases, sent, recorded; its depth and the per-message report."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from notifier import db
from notifier.model import DeliveryState, Platform, Push, iso
from notifier.schema import Id, chats, deliveries, devices, members, messages, push_jobs, users


MAX_DEVICE_ID = 2**63 - 1  # above any id either database can hold
ID_CHUNK = 5_000  # ids per IN (...) list: under SQLite's 32,766 bound parameters, and small for PostgreSQL


NOTIFY_CHANNEL = "chat_push_jobs"  # PostgreSQL LISTEN/NOTIFY channel that wakes dispatchers on every host


def message_deliveries(conn: Connection, message_id: int) -> list[dict]:
    """Every delivery of a message, by device."""
    rows = conn.execute(
        sa.select(deliveries).where(deliveries.c.message_id == message_id).order_by(deliveries.c.device_id)
    )
    return [
        {"device_id": r.device_id, "platform": r.platform, "state": r.state, "attempts": r.attempts,
         "last_status": r.last_status, "last_reason": r.last_reason, "sent_at": iso(r.sent_at)}
        for r in rows
    ]


def job_expanded(conn: Connection, message_id: int) -> bool:
    """Whether the message's push job has been turned into deliveries yet."""
    state = conn.execute(sa.select(push_jobs.c.state).where(push_jobs.c.message_id == message_id)).scalar()
    return state in (None, "expanded", "completed")


def _claimable(table: sa.Table, now: float):
    return sa.or_(table.c.lease_until.is_(None), table.c.lease_until <= now)


def _claim_ids(conn: Connection, table: sa.Table, where, order, owner: str, now: float, lease: float,
               limit: int) -> list[int]:
    """Lease up to `limit` rows matching `where`; return their ids. SKIP LOCKED on PostgreSQL."""
    candidates = sa.select(table.c.id).where(where, _claimable(table, now)).order_by(*order).limit(limit)
    if conn.dialect.name == "postgresql":
        candidates = candidates.with_for_update(skip_locked=True)
    result = conn.execute(
        table.update().where(table.c.id.in_(candidates.scalar_subquery()))
        .values(lease_owner=owner, lease_until=now + lease).returning(table.c.id)
    )
    return sorted(result.scalars())


@dataclass(frozen=True)
class Claim:
    """What claim_batch leased, and the messages whose expansion it finished."""

    ids: list[int]
    expanded: list[int]


def claim_batch(conn: Connection, owner: str, now: float, lease: float, size: int) -> Claim:
    """Lease up to `size` deliveries to `owner`: first those already due (retries, rows another
    dispatcher expanded and let go: oldest due first), then new ones, made from pending jobs already
    leased (expand_pending_jobs). A new delivery is written twice in its life (inserted leased, then
    its outcome) instead of three times (inserted, leased, outcome)."""
    ids = claim_delivery_ids(conn, owner, now, lease, size)
    expanded: list[int] = []
    if len(ids) < size:
        ids += _expand(conn, now, size - len(ids), owner, now + lease, expanded)
    return Claim(sorted(ids), expanded)


def expand_pending_jobs(conn: Connection, now: float, budget: int | None = None) -> int:
    """Turn pending push jobs, oldest first, into about `budget` pending deliveries (None: all of them).

    Recipients: members other than the sender, not muted at `now`, with enabled devices, taken in
    (user, device) order from the job's cursor on. Each job is locked for the caller's transaction
    only (FOR UPDATE SKIP LOCKED on PostgreSQL: a job another dispatcher is expanding right now is
    passed over, not waited for), and its cursor moves in the same transaction as the rows it
    covers. So a big chat is expanded a chunk at a time by whichever dispatchers are free, no
    transaction holds SQLite's write lock for long, a first batch leaves before the last recipients
    are inserted, and a 100,000-device message never sits in one transaction. ON CONFLICT DO NOTHING
    keeps a replayed chunk harmless. Returns the number of deliveries created.
    """
    return len(_expand(conn, now, budget, None, None, []))


def _expand(conn: Connection, now: float, budget: int | None, owner: str | None, until: float | None,
            expanded: list[int]) -> list[int]:
    """expand_pending_jobs(), the new rows leased to `owner` until `until` (None: not leased); their
    ids. The messages whose expansion ends here are appended to `expanded`."""
    next_job, chunk_end, expand_rest, expand_upto, move_cursor, job_done = _expansion_statements(
        conn.dialect.name)
    created: list[int] = []
    after_job = 0
    while budget is None or len(created) < budget:
        job = next_job.first(conn, {"after_job": after_job})
        if job is None:
            break
        after_job = job.id
        params = {"message": job.message_id, "now": now, "lease_owner": owner, "lease_until": until,
                  "after_user": -1 if job.cursor_user is None else job.cursor_user,
                  "after_device": -1 if job.cursor_device is None else job.cursor_device}
        end = None
        if budget is not None:  # the chunk's last recipient, and whether any comes after it
            bounds = chunk_end.all(conn, {**params, "skip": budget - len(created) - 1})
            end = bounds[0] if len(bounds) == 2 else None
        if end is None:  # the rest fits in this chunk
            created += _ids(expand_rest.execute(conn, params))
            job_done.execute(conn, {"job": job.id}).close()
            expanded.append(job.message_id)
        else:
            created += _ids(expand_upto.execute(conn, {**params, "end_user": end[0], "end_device": end[1]}))
            move_cursor.execute(conn, {"job": job.id, "end_user": end[0], "end_device": end[1]}).close()
    return created


def _ids(cursor) -> list[int]:
    ids = [row[0] for row in cursor.fetchall()]
    cursor.close()
    return ids


@functools.cache
def _expansion_statements(dialect: str) -> tuple:
    """The chunked expansion's statements, built once per dialect and run on the driver
    (db.DriverStatement): they run inside the write transaction, on every nudge, per job; through
    SQLAlchemy's execute they held SQLite's write queue about 0.3 ms per job."""
    now = sa.bindparam("now", type_=sa.Double)
    after_user, after_device = sa.bindparam("after_user", type_=Id), sa.bindparam("after_device", type_=Id)
    # "after (user, device)" as a range on each member's devices, not an OR: with the OR, SQLite
    # could only look a member's devices up by user, and re-read all of them for every chunk (a
    # member with a million devices: 150-200 ms per chunk, quadratic over the fan-out); with a
    # bound that is constant per member it seeks to the cursor (0.2-0.4 ms at any position)
    after = sa.and_(members.c.user_id >= after_user,
                    devices.c.id > sa.case((members.c.user_id == after_user, after_device), else_=-1))

    def recipients(*columns):
        return (
            sa.select(*columns).select_from(messages)
            .join(members, members.c.chat_id == messages.c.chat_id)
            .join(devices, devices.c.user_id == members.c.user_id)
            .where(messages.c.id == sa.bindparam("message", type_=Id),
                   members.c.user_id != messages.c.sender_id,
                   sa.or_(members.c.muted_until.is_(None), members.c.muted_until <= now),
                   devices.c.enabled.is_(True), after)
        )

    def insert(select):
        return ((postgresql.insert if dialect == "postgresql" else sqlite.insert)(deliveries).from_select(
            ["message_id", "device_id", "platform", "state", "attempts", "next_attempt_at", "created_at",
             "lease_owner", "lease_until"], select)
            .on_conflict_do_nothing().returning(deliveries.c.id))

    # leased to the dispatcher that expands them (claim_batch), or to nobody (lease_owner NULL)
    columns = (messages.c.id, devices.c.id, devices.c.platform, sa.literal(DeliveryState.PENDING.value),
               sa.literal(0), now, now, sa.bindparam("lease_owner", type_=sa.String),
               sa.bindparam("lease_until", type_=sa.Double))
    end_user, end_device = sa.bindparam("end_user", type_=Id), sa.bindparam("end_device", type_=Id)
    upto = sa.and_(members.c.user_id <= end_user,
                   devices.c.id <= sa.case((members.c.user_id == end_user, end_device), else_=MAX_DEVICE_ID))
    next_job = (sa.select(push_jobs.c.id, push_jobs.c.message_id, push_jobs.c.cursor_user, push_jobs.c.cursor_device)
                .where(push_jobs.c.state == "pending", push_jobs.c.id > sa.bindparam("after_job", type_=Id))
                .order_by(push_jobs.c.id).limit(1))
    if dialect == "postgresql":
        next_job = next_job.with_for_update(skip_locked=True)
    this_job = push_jobs.c.id == sa.bindparam("job", type_=Id)
    return tuple(db.DriverStatement(statement) for statement in (
        next_job,
        recipients(members.c.user_id, devices.c.id).order_by(members.c.user_id, devices.c.id)
        .limit(2).offset(sa.bindparam("skip", type_=sa.Integer)),
        insert(recipients(*columns)),
        insert(recipients(*columns).where(upto)),
        push_jobs.update().where(this_job).values(cursor_user=end_user, cursor_device=end_device),
        push_jobs.update().where(this_job).values(state="expanded"),
    ))


class Claimed(NamedTuple):
    """A leased delivery: the Push to send, or a device that is no longer enabled."""

    push: Push
    device_enabled: bool


def claim_deliveries(conn: Connection, owner: str, now: float, lease: float, limit: int) -> list[Claimed]:
    """Lease up to `limit` due pending deliveries and load what sending them needs, in two queries."""
    return load_claimed(conn, claim_delivery_ids(conn, owner, now, lease, limit))


def claim_delivery_ids(conn: Connection, owner: str, now: float, lease: float, limit: int) -> list[int]:
    """Lease up to `limit` due pending deliveries (oldest due first); return their ids."""
    return _claim_ids(
        conn, deliveries,
        sa.and_(deliveries.c.state == DeliveryState.PENDING.value, deliveries.c.next_attempt_at <= now),
        [deliveries.c.next_attempt_at, deliveries.c.id], owner, now, lease, limit,
    )


def load_claimed(conn: Connection, ids: Sequence[int]) -> list[Claimed]:
    """What sending these (leased) deliveries needs. A read: the dispatcher runs it after the claim
    commits, so SQLite's write lock is not held while a thousand rows become Push objects.

    Two queries: the deliveries with their devices, then their messages (usually one) with the
    chat's and the sender's names, rather than one join repeating a message's text on each of a
    thousand rows."""
    if not ids:
        return []
    rows = conn.execute(_load_claimed_statement(), {"ids": list(ids)}).all()
    message_ids = {row[1] for row in rows}  # the statement's second column
    messages_by_id = {r.id: r for r in conn.execute(_load_messages_statement(), {"ids": list(message_ids)})}
    claimed = []
    # rows unpacked as tuples: a Row's attribute access by name cost more than building the Push
    for delivery_id, message_id, attempts, device_id, platform, token, app, enabled, p256dh, auth in rows:
        m = messages_by_id.get(message_id)
        if m is None:  # as the inner join it replaces: no message, nothing to send
            continue
        push = Push(delivery_id=delivery_id, message_id=message_id, chat_id=m.chat_id, chat_name=m.chat_name,
                    sender_id=m.sender_id, sender_name=m.sender_name, text=m.text, device_id=device_id,
                    platform=_PLATFORMS[platform], token=token, app=app, attempts=attempts, p256dh=p256dh, auth=auth)
        claimed.append(Claimed(push, bool(enabled)))
    return claimed


_PLATFORMS = {platform.value: platform for platform in Platform}


@functools.cache
def _load_claimed_statement():
    return (
        sa.select(deliveries.c.id, deliveries.c.message_id, deliveries.c.attempts, deliveries.c.device_id,
                  devices.c.platform, devices.c.token, devices.c.app, devices.c.enabled, devices.c.p256dh,
                  devices.c.auth)
        .select_from(deliveries)
        .join(devices, devices.c.id == deliveries.c.device_id)
        .where(deliveries.c.id.in_(sa.bindparam("ids", expanding=True)))
        .order_by(deliveries.c.id)
    )


@functools.cache
def _load_messages_statement():
    sender = users.alias("sender")
    return (
        sa.select(messages.c.id, messages.c.chat_id, messages.c.sender_id, messages.c.text,
                  chats.c.name.label("chat_name"), sender.c.name.label("sender_name"))
        .select_from(messages)
        .join(chats, chats.c.id == messages.c.chat_id)
        .join(sender, sender.c.id == messages.c.sender_id)
        .where(messages.c.id.in_(sa.bindparam("ids", expanding=True)))
    )


class Update(NamedTuple):
    """The new state of one delivery after an attempt (or a decision not to attempt)."""

    delivery_id: int
    state: DeliveryState
    attempts: int
    next_attempt_at: float
    last_status: int | None
    last_reason: str | None
    sent_at: float | None = None


def record_updates(conn: Connection, owner: str, updates: Sequence[Update], host_id: str | None = None) -> int:
    """Write attempt results, only for rows we still lease; release the leases.

    Updates with the same values (a batch's `sent` rows share them all) are written by one
    `UPDATE ... WHERE id IN (...)`: a handful of statements per batch instead of one per row, so the
    transaction, and SQLite's write lock, ends sooner.
    Returns the number of rows written (fewer than given when a lease was lost to another dispatcher).
    """
    groups: dict[tuple, list[int]] = {}
    for u in updates:
        key = (u.state.value, u.attempts, u.next_attempt_at, u.last_status, u.last_reason, u.sent_at)
        groups.setdefault(key, []).append(u.delivery_id)
    written = 0
    for (state, attempts, next_at, status, reason, sent_at), ids in groups.items():
        written += conn.execute(_record_statement(), {
            "ids": ids, "owner": owner, "b_state": state, "b_attempts": attempts, "b_next": next_at,
            "b_status": status, "b_reason": reason, "b_sent": sent_at, "b_host": host_id,
        }).rowcount
    return written


@functools.cache
def _record_statement():
    return (
        deliveries.update()
        .where(deliveries.c.id.in_(sa.bindparam("ids", expanding=True)),
               deliveries.c.lease_owner == sa.bindparam("owner"))
        .values(state=sa.bindparam("b_state"), attempts=sa.bindparam("b_attempts"),
                next_attempt_at=sa.bindparam("b_next"), last_status=sa.bindparam("b_status"),
                last_reason=sa.bindparam("b_reason"), sent_at=sa.bindparam("b_sent"),
                handled_by=sa.bindparam("b_host"), lease_owner=None, lease_until=None)
    )


def renew_leases(conn: Connection, owner: str, ids: Iterable[int], until: float) -> int:
    """Extend `owner`'s leases on the deliveries `ids` (the batches in flight) to `until`.

    By id, not every row `owner` leases: a claim whose batch was lost before it was sent (the
    database failed between the claim and loading it) must expire, not be renewed forever, and a
    lookup by primary key does not scan the deliveries table every heartbeat."""
    renewed = 0
    ids = sorted(ids)
    for start in range(0, len(ids), ID_CHUNK):
        renewed += conn.execute(
            deliveries.update().where(deliveries.c.id.in_(ids[start:start + ID_CHUNK]),
                                      deliveries.c.lease_owner == owner).values(lease_until=until)
        ).rowcount
    return renewed


def release_leases(conn: Connection, owner: str, ids: Iterable[int] | None = None) -> None:
    """Give back `owner`'s leases (on the deliveries `ids`; None: all of them, which scans the
    table), so another dispatcher can take the rows at once."""
    if ids is None:
        conn.execute(deliveries.update().where(deliveries.c.lease_owner == owner)
                     .values(lease_owner=None, lease_until=None))
        return
    ids = sorted(ids)
    for start in range(0, len(ids), ID_CHUNK):
        conn.execute(deliveries.update().where(deliveries.c.id.in_(ids[start:start + ID_CHUNK]),
                                               deliveries.c.lease_owner == owner)
                     .values(lease_owner=None, lease_until=None))


def next_wakeup(conn: Connection, now: float) -> float | None:
    """When there is next something to do: now for a job to expand, else the earliest due or lease expiry."""
    if _ANY_JOB_PENDING.first(conn, {})[0]:
        return now
    return _EARLIEST_DELIVERY.first(conn, {})[0]


# asked after every pass of the dispatcher: built once and run on the driver (built per call with
# Core, the two cost about a third of the dispatcher's CPU per message without devices)
_ANY_JOB_PENDING = db.DriverStatement(
    sa.select(sa.exists().where(push_jobs.c.state == sa.literal_column("'pending'"))))
_EARLIEST_DELIVERY = db.DriverStatement(
    sa.select(sa.func.min(sa.case(
        (deliveries.c.lease_until > deliveries.c.next_attempt_at, deliveries.c.lease_until),
        else_=deliveries.c.next_attempt_at)))
    .where(deliveries.c.state == sa.literal_column(f"'{DeliveryState.PENDING.value}'")))


def queue_depth(conn: Connection, now: float) -> dict:
    """Pending work: unexpanded jobs, pending deliveries and the age of the oldest pending item."""
    jobs, oldest_job = conn.execute(
        sa.select(sa.func.count(), sa.func.min(push_jobs.c.created_at)).where(push_jobs.c.state == "pending")
    ).one()
    pending, oldest_delivery = conn.execute(
        sa.select(sa.func.count(), sa.func.min(deliveries.c.created_at))
        .where(deliveries.c.state == DeliveryState.PENDING.value)
    ).one()
    oldest = min([t for t in (oldest_job, oldest_delivery) if t is not None], default=None)
    return {
        "pending_jobs": jobs,
        "pending_deliveries": pending,
        "oldest_pending_age": round(now - oldest, 3) if oldest is not None else 0.0,
    }


def delivery_counts(conn: Connection) -> list[tuple[str, str, int]]:
    """(platform, state, count) over every delivery: the source of the delivery metrics."""
    rows = conn.execute(
        sa.select(deliveries.c.platform, deliveries.c.state, sa.func.count())
        .group_by(deliveries.c.platform, deliveries.c.state)
    )
    return [tuple(row) for row in rows]


def work_pending(conn: Connection) -> bool:
    """Whether the outbox holds anything unfinished (a job to expand, a delivery not yet final),
    due or not, leased or not: then this host needs a live dispatcher."""
    return bool(conn.execute(
        sa.select(sa.or_(sa.exists().where(push_jobs.c.state == "pending"),
                         sa.exists().where(deliveries.c.state == DeliveryState.PENDING.value)))
    ).scalar())


def enqueue(conn: Connection, message_id: int, now: float) -> None:
    """Queue the push job of a message in the caller's transaction (the message's insert), so the
    message and its pushes commit together or not at all."""
    params = {"message_id": message_id, "created_at": now}
    if conn.dialect.name == "postgresql":
        # the notification goes to every listening dispatcher, on any host, when (and only if)
        # this commits; sent by the insert's own statement, one round trip for both
        _ENQUEUE_AND_NOTIFY.execute(conn, params).close()
    else:
        _ENQUEUE.execute(conn, params).close()


# compiled once and run on the driver: the request path runs them on every POST
_ENQUEUE = db.DriverStatement(push_jobs.insert().values(
    message_id=sa.bindparam("message_id"), state="pending", created_at=sa.bindparam("created_at")))
_ENQUEUE_AND_NOTIFY = db.DriverStatement(
    sa.select(sa.func.pg_notify(NOTIFY_CHANNEL, ""))
    .select_from(_ENQUEUE.statement.returning(push_jobs.c.id).cte("job")))
