"""The storage modules called directly (notifier.db, schema, outbox, devices, registry; chat_app.store),
against SQLite and PostgreSQL: the schema, the outbox and its leases.

PostgreSQL: TEST_DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/test) names a server on which
this session creates a database of its own and drops it at the end; the tests skip when it cannot connect.
Times are explicit `now` values: nothing sleeps.
"""
from __future__ import annotations

import os
import uuid
from collections import Counter
from dataclasses import dataclass

import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory
from sqlalchemy.pool import NullPool

from chat_app.app import create_app
from chat_app import store
from notifier import db, devices, model, outbox, registry, schema
from notifier.config import Settings
from notifier.model import DeliveryState, Platform
from tests.webapp import ContractTestApp

PG_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
NOW = 1_800_000_000.0
LEASE = 60.0
TABLES = list(schema.metadata.tables)


# ---------------------------------------------------------------- engines

def _psycopg(url: str) -> sa.URL:
    parsed = sa.make_url(url)
    return parsed.set(drivername="postgresql+psycopg") if parsed.drivername == "postgresql" else parsed


@pytest.fixture(scope="session")
def postgres_engine():
    """An engine on a uniquely named database created for this session on the test server, then dropped."""
    server = _psycopg(PG_URL)
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT", poolclass=NullPool,
                             connect_args={"connect_timeout": 5})
    try:
        admin.connect().close()
    except sa.exc.OperationalError as exc:
        first_line = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else type(exc.orig).__name__
        shown = sa.make_url(PG_URL).render_as_string(hide_password=True)
        pytest.skip(f"PostgreSQL not reachable at {shown}: {first_line}")
    name = f"chat_test_{uuid.uuid4().hex[:16]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    engine = db.make_engine(server.set(database=name).render_as_string(hide_password=False))
    try:
        db.migrate(engine)
        yield engine
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path):
    """An empty database with the schema: a new SQLite file, or the session's PostgreSQL database emptied."""
    if request.param == "sqlite":
        engine = db.make_engine(f"sqlite:///{tmp_path}/storage.sqlite3")
        db.migrate(engine)
        yield engine
        engine.dispose()
        return
    engine = request.getfixturevalue("postgres_engine")
    with engine.begin() as conn:
        conn.execute(sa.text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    db.migrate(engine)
    yield engine


def write(engine):
    return db.writer(engine).begin()


def count(engine, table: sa.Table, *where) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(table).where(*where)).scalar_one()


def rows(engine, table: sa.Table, order=None):
    with engine.connect() as conn:
        return conn.execute(sa.select(table).order_by(order if order is not None else table.c.id)).all()


# ---------------------------------------------------------------- a chat with every kind of recipient

@dataclass
class World:
    ann: int   # the sender, with a device
    bob: int   # member: an APNs device, and a disabled FCM device
    cat: int   # member muted until after NOW, with a device
    dan: int   # member whose mute ended before NOW, with an FCM device
    eve: int   # not a member, with a device
    fay: int   # member without devices
    chat: int
    devices: dict  # name -> device id


def add_user(conn, name: str) -> int:
    return store.create_user(conn, name, store.hash_token(f"{name}-{uuid.uuid4()}"), NOW)["id"]


def add_device(conn, user_id: int, platform: str, token: str) -> int:
    return devices.insert_device(conn, user_id, platform, token, "com.example" if platform == "apns" else None,
                                 NOW)["id"]


@pytest.fixture
def world(engine) -> World:
    with write(engine) as conn:
        ids = {name: add_user(conn, name) for name in ("ann", "bob", "cat", "dan", "eve", "fay")}
        phones = {
            "ann": add_device(conn, ids["ann"], "fcm", "ann-token"),
            "bob-apns": add_device(conn, ids["bob"], "apns", "b0" * 32),
            "bob-fcm": add_device(conn, ids["bob"], "fcm", "bob-old-phone"),
            "cat": add_device(conn, ids["cat"], "fcm", "cat-token"),
            "dan": add_device(conn, ids["dan"], "fcm", "dan-token"),
            "eve": add_device(conn, ids["eve"], "fcm", "eve-token"),
        }
        devices.disable_devices(conn, [phones["bob-fcm"]], "unregistered")
        chat = store.create_chat(conn, "trip", ids["ann"], [ids[n] for n in ("bob", "cat", "dan", "fay")], NOW)
        store.set_muted_until(conn, chat, ids["cat"], NOW + 3600)
        store.set_muted_until(conn, chat, ids["dan"], NOW - 1)
    return World(chat=chat, devices=phones, **ids)


def post(engine, world: World, text: str = "hello", client_id: str | None = None, now: float = NOW) -> dict:
    with write(engine) as conn:
        return store.insert_message_with_job(conn, world.chat, world.ann, text, client_id, now)


def expand_all(engine, now: float = NOW, budget: int | None = None) -> int:
    with write(engine) as conn:
        return outbox.expand_pending_jobs(conn, now, budget)


def claim(engine, owner: str, now: float, limit: int = 100) -> list[outbox.Claimed]:
    with write(engine) as conn:
        return outbox.claim_deliveries(conn, owner, now, LEASE, limit)


def record(engine, owner: str, updates) -> int:
    with write(engine) as conn:
        return outbox.record_updates(conn, owner, updates)


def sent(delivery_id: int, now: float = NOW) -> outbox.Update:
    return outbox.Update(delivery_id, DeliveryState.SENT, 1, now, 200, None, sent_at=now)


# ---------------------------------------------------------------- schema

def test_migrate_is_idempotent_and_records_the_head_revision(engine):
    db.migrate(engine)
    db.migrate(engine)

    with engine.connect() as conn:
        assert db.schema_revision(conn) == ScriptDirectory(str(db.MIGRATIONS)).get_current_head()
        db.ping(conn)
    tables = set(sa.inspect(engine).get_table_names())
    assert set(TABLES) <= tables
    assert "meta" not in tables  # the first release's version row: alembic_version replaced it


def test_migrate_keeps_existing_rows(engine, world):
    db.migrate(engine)

    assert count(engine, schema.users) == 6


def test_migrate_refuses_a_database_newer_than_the_code(engine):
    with write(engine) as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = 'ffff_from_a_newer_release'"))

    try:
        with pytest.raises(RuntimeError, match="ffff_from_a_newer_release is newer than this code"):
            db.migrate(engine)
    finally:  # the PostgreSQL database lives for the session: leave it migratable
        with write(engine) as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = :head"),
                         {"head": ScriptDirectory(str(db.MIGRATIONS)).get_current_head()})


# ---------------------------------------------------------------- the message and its job: one write

def test_insert_message_with_job_writes_the_message_and_its_pending_job(engine, world):
    message = post(engine, world, "hi", "c-1")

    assert message == {"id": message["id"], "chat_id": world.chat, "sender_id": world.ann, "text": "hi",
                       "client_id": "c-1", "created_at": model.iso(NOW)}
    job, = rows(engine, schema.push_jobs)
    assert (job.message_id, job.state, job.cursor_user, job.created_at) == (message["id"], "pending", None, NOW)
    with engine.connect() as conn:
        assert store.get_message(conn, message["id"]) == message
        assert store.message_by_client_id(conn, world.chat, world.ann, "c-1") == message
        assert store.message_by_client_id(conn, world.chat, world.bob, "c-1") is None


def test_a_transaction_that_fails_after_the_insert_leaves_neither_message_nor_job(engine, world):
    with pytest.raises(RuntimeError):
        with write(engine) as conn:
            store.insert_message_with_job(conn, world.chat, world.ann, "lost", None, NOW)
            raise RuntimeError("the request failed later")

    assert count(engine, schema.messages) == 0
    assert count(engine, schema.push_jobs) == 0


def test_a_message_to_a_missing_chat_writes_nothing(engine, world):
    with write(engine) as conn:
        assert store.insert_message_with_job(conn, 999, world.ann, "nowhere", None, NOW) is None

    assert (count(engine, schema.messages), count(engine, schema.push_jobs)) == (0, 0)


def test_a_sender_who_is_not_a_member_writes_nothing(engine, world):
    with write(engine) as conn:  # eve is no member of the chat: the check is part of the insert
        assert store.insert_message_with_job(conn, world.chat, world.eve, "intruder", None, NOW) is None

    assert (count(engine, schema.messages), count(engine, schema.push_jobs)) == (0, 0)


def test_a_duplicate_client_id_writes_nothing(engine, world):
    first = post(engine, world, "one", "same")

    assert post(engine, world, "two", "same") is None  # the unique index, not a lookup, says so

    assert [m.id for m in rows(engine, schema.messages)] == [first["id"]]
    assert [j.message_id for j in rows(engine, schema.push_jobs)] == [first["id"]]


def test_messages_without_client_id_never_collide(engine, world):
    post(engine, world, "one")
    post(engine, world, "two")

    assert count(engine, schema.messages) == 2


# ---------------------------------------------------------------- jobs: claim and expand

def test_expand_job_makes_one_pending_delivery_per_recipient_device(engine, world):
    message = post(engine, world)

    assert expand_all(engine) == 2

    deliveries = rows(engine, schema.deliveries, schema.deliveries.c.device_id)
    assert [(d.device_id, d.platform) for d in deliveries] == [
        (world.devices["bob-apns"], "apns"), (world.devices["dan"], "fcm")]
    for d in deliveries:
        assert (d.message_id, d.state, d.attempts, d.next_attempt_at) == (message["id"], "pending", 0, NOW)
        assert (d.lease_owner, d.last_status, d.sent_at) == (None, None, None)
    job, = rows(engine, schema.push_jobs)
    assert job.state == "expanded"
    with engine.connect() as conn:
        assert outbox.job_expanded(conn, message["id"]) is True


def test_the_sender_muted_members_disabled_devices_and_non_members_get_nothing(engine, world):
    post(engine, world)
    expand_all(engine)

    targets = {d.device_id for d in rows(engine, schema.deliveries)}
    for excluded in ("ann", "bob-fcm", "cat", "eve"):
        assert world.devices[excluded] not in targets


def test_a_mute_ends_at_its_time(engine, world):
    post(engine, world)

    expand_all(engine, now=NOW + 3600)

    assert world.devices["cat"] in {d.device_id for d in rows(engine, schema.deliveries)}


def test_expanding_a_job_again_adds_nothing_twice(engine, world):
    post(engine, world)
    expand_all(engine)
    before = rows(engine, schema.deliveries)
    with write(engine) as conn:  # as if the "expanded" mark had been lost
        conn.execute(schema.push_jobs.update().values(state="pending", cursor_user=None, cursor_device=None))

    assert expand_all(engine, now=NOW + 100) == 0

    assert rows(engine, schema.deliveries) == before


def test_expansion_goes_a_chunk_at_a_time_and_resumes_from_the_cursor_in_the_row(engine, world):
    post(engine, world)

    assert expand_all(engine, budget=1) == 1
    job, = rows(engine, schema.push_jobs)
    first, = rows(engine, schema.deliveries)
    assert (job.state, job.cursor_device) == ("pending", first.device_id)  # committed with the row it covers
    with engine.connect() as conn:
        assert outbox.job_expanded(conn, job.message_id) is False

    assert expand_all(engine, budget=1) == 1  # another transaction, as another dispatcher would
    assert expand_all(engine, budget=1) == 0  # nothing left: the job is marked done
    assert rows(engine, schema.push_jobs)[0].state == "expanded"
    assert sorted(d.device_id for d in rows(engine, schema.deliveries)) == sorted(
        [world.devices["bob-apns"], world.devices["dan"]])


def test_a_rolled_back_chunk_leaves_the_cursor_where_it_was(engine, world):
    post(engine, world)
    with pytest.raises(RuntimeError):
        with write(engine) as conn:
            outbox.expand_pending_jobs(conn, NOW, 1)
            raise RuntimeError("the dispatcher dies before committing")

    job, = rows(engine, schema.push_jobs)
    assert (job.state, job.cursor_user, job.cursor_device) == ("pending", None, None)
    assert expand_all(engine) == 2


def test_expansion_takes_the_oldest_job_first_within_the_budget(engine, world):
    ids = [post(engine, world, f"m{i}")["id"] for i in range(5)]  # 2 recipients each

    assert expand_all(engine, budget=5) == 5

    by_message = Counter(d.message_id for d in rows(engine, schema.deliveries))
    assert by_message == {ids[0]: 2, ids[1]: 2, ids[2]: 1}
    assert [j.state for j in rows(engine, schema.push_jobs)] == ["expanded"] * 2 + ["pending"] * 3


def test_a_job_without_recipients_is_marked_done_without_using_the_budget(engine, world):
    with write(engine) as conn:
        solo = store.create_chat(conn, "solo", world.ann, [], NOW)
        store.insert_message_with_job(conn, solo, world.ann, "note to self", None, NOW)
    post(engine, world)

    assert expand_all(engine, budget=2) == 2

    assert [j.state for j in rows(engine, schema.push_jobs)] == ["expanded", "expanded"]


def test_expanded_jobs_are_not_expanded_again(engine, world):
    post(engine, world)
    expand_all(engine)

    assert expand_all(engine, now=NOW + 10 * LEASE) == 0


# ---------------------------------------------------------------- deliveries: claim, record

def test_claim_deliveries_loads_everything_a_push_needs(engine, world):
    message = post(engine, world, "see you at 8")
    expand_all(engine)

    claimed = claim(engine, "d1", NOW)

    by_device = {c.push.device_id: c for c in claimed}
    assert set(by_device) == {world.devices["bob-apns"], world.devices["dan"]}
    apns = by_device[world.devices["bob-apns"]]
    assert apns.device_enabled is True
    push = apns.push
    assert (push.message_id, push.chat_id, push.chat_name, push.sender_id, push.sender_name, push.text) == (
        message["id"], world.chat, "trip", world.ann, "ann", "see you at 8")
    assert (push.platform, push.token, push.app, push.attempts) == (Platform.APNS, "b0" * 32, "com.example", 0)
    assert by_device[world.devices["dan"]].push.platform is Platform.FCM


def test_a_leased_delivery_is_claimed_by_nobody_else_until_the_lease_expires(engine, world):
    post(engine, world)
    expand_all(engine)
    assert len(claim(engine, "d1", NOW)) == 2

    assert claim(engine, "d2", NOW + LEASE - 0.001) == []
    taken = claim(engine, "d2", NOW + LEASE)

    assert len(taken) == 2
    assert {d.lease_owner for d in rows(engine, schema.deliveries)} == {"d2"}


def test_claim_deliveries_respects_the_limit_and_the_due_time(engine, world):
    post(engine, world)
    expand_all(engine)
    first, = claim(engine, "d1", NOW, limit=1)
    record(engine, "d1", [outbox.Update(first.push.delivery_id, DeliveryState.PENDING, 1, NOW + 100, 503,
                                         "Unavailable")])

    second, = claim(engine, "d1", NOW + 1)
    assert second.push.delivery_id != first.push.delivery_id
    record(engine, "d1", [sent(second.push.delivery_id)])
    assert claim(engine, "d2", NOW + 99) == []
    retried, = claim(engine, "d2", NOW + 100)
    assert (retried.push.delivery_id, retried.push.attempts) == (first.push.delivery_id, 1)


def test_a_claimed_delivery_to_a_since_disabled_device_says_so(engine, world):
    post(engine, world)
    expand_all(engine)
    with write(engine) as conn:
        devices.disable_devices(conn, [world.devices["dan"]], "deleted")

    claimed = {c.push.device_id: c.device_enabled for c in claim(engine, "d1", NOW)}

    assert claimed == {world.devices["bob-apns"]: True, world.devices["dan"]: False}


def test_record_updates_writes_only_for_the_lease_owner_and_releases_the_lease(engine, world):
    post(engine, world)
    expand_all(engine)
    claimed = claim(engine, "d1", NOW)
    updates = [sent(c.push.delivery_id, NOW + 1) for c in claimed]
    before = rows(engine, schema.deliveries)

    assert record(engine, "d2", updates) == 0
    assert rows(engine, schema.deliveries) == before

    assert record(engine, "d1", updates) == 2
    for d in rows(engine, schema.deliveries):
        assert (d.state, d.attempts, d.last_status, d.sent_at) == ("sent", 1, 200, NOW + 1)
        assert (d.lease_owner, d.lease_until) == (None, None)


def test_a_dispatcher_that_lost_its_lease_cannot_overwrite_the_new_owner(engine, world):
    post(engine, world)
    expand_all(engine)
    stale = claim(engine, "d1", NOW)
    claim(engine, "d2", NOW + LEASE)

    assert record(engine, "d1", [sent(c.push.delivery_id) for c in stale]) == 0
    assert {(d.state, d.lease_owner) for d in rows(engine, schema.deliveries)} == {("pending", "d2")}


def test_final_deliveries_are_not_claimed_again(engine, world):
    post(engine, world)
    expand_all(engine)
    record(engine, "d1", [sent(c.push.delivery_id) for c in claim(engine, "d1", NOW)])

    assert claim(engine, "d2", NOW + 10 * LEASE) == []


def test_release_leases_lets_another_dispatcher_take_over_at_once(engine, world):
    post(engine, world)
    expand_all(engine)
    assert len(claim(engine, "d1", NOW)) == 2
    assert claim(engine, "d2", NOW + 1) == []  # leased

    with write(engine) as conn:
        outbox.release_leases(conn, "d1")

    assert len(claim(engine, "d2", NOW + 1)) == 2


def test_message_deliveries_lists_them_by_device(engine, world):
    message = post(engine, world)
    expand_all(engine)
    first = claim(engine, "d1", NOW)[0]
    record(engine, "d1", [outbox.Update(first.push.delivery_id, DeliveryState.FAILED, 1, NOW, 410,
                                         "Unregistered")])

    with engine.connect() as conn:
        listed = outbox.message_deliveries(conn, message["id"])

    assert [d["device_id"] for d in listed] == sorted([world.devices["bob-apns"], world.devices["dan"]])
    failed = next(d for d in listed if d["device_id"] == first.push.device_id)
    assert failed == {"device_id": first.push.device_id, "platform": first.push.platform.value, "state": "failed",
                      "attempts": 1, "last_status": 410, "last_reason": "Unregistered", "sent_at": None}


# ---------------------------------------------------------------- queue depth and next wake-up

def test_queue_depth_counts_pending_jobs_and_deliveries_and_the_oldest_age(engine, world):
    with engine.connect() as conn:
        assert outbox.queue_depth(conn, NOW) == {"pending_jobs": 0, "pending_deliveries": 0,
                                                   "oldest_pending_age": 0.0}
    post(engine, world, now=NOW)
    post(engine, world, now=NOW + 10)
    with engine.connect() as conn:
        assert outbox.queue_depth(conn, NOW + 12.5) == {"pending_jobs": 2, "pending_deliveries": 0,
                                                         "oldest_pending_age": 12.5}

    expand_all(engine, now=NOW + 20)

    with engine.connect() as conn:
        assert outbox.queue_depth(conn, NOW + 30) == {"pending_jobs": 0, "pending_deliveries": 4,
                                                       "oldest_pending_age": 10.0}
    record(engine, "d1", [sent(c.push.delivery_id) for c in claim(engine, "d1", NOW + 30)])
    with engine.connect() as conn:
        assert outbox.queue_depth(conn, NOW + 40) == {"pending_jobs": 0, "pending_deliveries": 0,
                                                       "oldest_pending_age": 0.0}


def test_next_wakeup_is_none_without_work(engine, world):
    with engine.connect() as conn:
        assert outbox.next_wakeup(conn, NOW) is None


def test_next_wakeup_is_now_while_a_job_is_left_to_expand(engine, world):
    post(engine, world)
    with engine.connect() as conn:
        assert outbox.next_wakeup(conn, NOW + 5) == NOW + 5


def test_next_wakeup_follows_the_earliest_due_or_leased_delivery(engine, world):
    post(engine, world)
    expand_all(engine)
    with engine.connect() as conn:
        assert outbox.next_wakeup(conn, NOW + 1) == NOW  # due since NOW
    first, second = claim(engine, "d1", NOW)
    record(engine, "d1", [outbox.Update(first.push.delivery_id, DeliveryState.PENDING, 1, NOW + 300, 503, None),
                          outbox.Update(second.push.delivery_id, DeliveryState.PENDING, 1, NOW + 30, 429, None)])
    with engine.connect() as conn:
        assert outbox.next_wakeup(conn, NOW + 1) == NOW + 30
    claim(engine, "d1", NOW + 30)  # leases the second until NOW + 30 + LEASE
    with engine.connect() as conn:
        assert outbox.next_wakeup(conn, NOW + 31) == NOW + 30 + LEASE
    record(engine, "d1", [sent(second.push.delivery_id)])
    with engine.connect() as conn:
        assert outbox.next_wakeup(conn, NOW + 31) == NOW + 300


# ---------------------------------------------------------------- users, devices, chats

def test_users_are_found_by_token_hash_only(engine):
    with write(engine) as conn:
        user = store.create_user(conn, "ann", store.hash_token("secret"), NOW)
    with engine.connect() as conn:
        assert store.user_by_token_hash(conn, store.hash_token("secret")) == user
        assert store.user_by_token_hash(conn, store.hash_token("other")) is None
        assert store.user_by_token_hash(conn, "secret") is None
        assert store.existing_user_ids(conn, [user["id"], user["id"], 999]) == {user["id"]}
        assert store.existing_user_ids(conn, []) == set()


def test_a_token_is_one_device_row_that_can_change_hands(engine, world):
    with write(engine) as conn:
        moved = devices.rebind_device(conn, world.devices["eve"], world.bob, "fcm", "com.x")
    with engine.connect() as conn:
        assert moved == {"id": world.devices["eve"], "platform": "fcm", "token": "eve-token", "app": "com.x"}
        assert devices.device_owner(conn, world.devices["eve"]) == world.bob
        assert [d["id"] for d in devices.list_devices(conn, world.bob)] == [world.devices["bob-apns"],
                                                                             world.devices["eve"]]
        assert devices.list_devices(conn, world.eve) == []
        assert devices.device_owner(conn, world.devices["bob-fcm"]) is None  # disabled
    with pytest.raises(sa.exc.IntegrityError):
        with write(engine) as conn:
            add_device(conn, world.ann, "fcm", "eve-token")


def test_members_are_added_once_and_removed_once(engine, world):
    with write(engine) as conn:
        assert store.add_member(conn, world.chat, world.eve, NOW) is True
        assert store.add_member(conn, world.chat, world.eve, NOW) is False
    with engine.connect() as conn:
        assert store.is_member(conn, world.chat, world.eve)
        assert [m["id"] for m in store.chat_members(conn, world.chat)] == sorted(
            [world.ann, world.bob, world.cat, world.dan, world.eve, world.fay])
    with write(engine) as conn:
        assert store.remove_member(conn, world.chat, world.eve) is True
        assert store.remove_member(conn, world.chat, world.eve) is False
    with engine.connect() as conn:
        assert not store.is_member(conn, world.chat, world.eve)
        assert store.list_chats(conn, world.eve) == []
        assert store.list_chats(conn, world.bob) == [{"id": world.chat, "name": "trip"}]


def test_list_messages_pages_by_id(engine, world):
    ids = [post(engine, world, f"m{i}")["id"] for i in range(6)]

    with engine.connect() as conn:
        newest = store.list_messages(conn, world.chat, None, None, 3)
        before = store.list_messages(conn, world.chat, ids[3], None, 10)
        after = store.list_messages(conn, world.chat, None, ids[3], 10)
        between = store.list_messages(conn, world.chat, ids[4], ids[1], 10)

    assert [m["id"] for m in newest] == ids[:2:-1]
    assert [m["id"] for m in before] == ids[2::-1]
    assert [m["id"] for m in after] == ids[4:]
    assert [m["id"] for m in between] == ids[2:4]


def test_dispatchers_are_alive_while_their_heartbeat_is_fresh(engine):
    with write(engine) as conn:
        first = registry.register_dispatcher(conn, "host-a", 100, NOW)
        second = registry.register_dispatcher(conn, "host-b", 200, NOW)
        registry.heartbeat(conn, first, NOW + 10)
        registry.heartbeat(conn, second, NOW + 10, stopped=True)

    with engine.connect() as conn:
        status = registry.dispatcher_status(conn, NOW + 15, stale_after=6)
        stale = registry.dispatcher_status(conn, NOW + 17, stale_after=6)

    assert status == {"alive": [{"host_id": "host-a", "pid": 100, "last_seen": model.iso(NOW + 10)}], "starts": 2}
    assert stale == {"alive": [], "starts": 2}


@pytest.mark.parametrize("epoch, text", [
    (0.0, "1970-01-01T00:00:00.000Z"),
    (1_795_400_963.1234, "2026-11-23T02:29:23.123Z"),
    (None, None),
])
def test_iso_is_utc_with_milliseconds_and_z(epoch, text):
    assert model.iso(epoch) == text


# ---------------------------------------------------------------- the web layer on both engines

@pytest.fixture
def client(engine, tmp_path):
    """The web app on this engine."""
    app = create_app(Settings(push_run_dir=str(tmp_path / "run")), wake=lambda: None, engine=engine)
    return ContractTestApp(app)


def test_the_app_answers_201_then_200_when_adding_a_member_on_both_engines(client):
    ann = client.post_json("/v1/users", {"name": "ann"}).json
    bob = client.post_json("/v1/users", {"name": "bob"}).json
    headers = {"Authorization": f"Bearer {ann['token']}"}
    chat = client.post_json("/v1/chats", {"name": "c", "member_ids": []}, headers=headers).json

    client.post_json(f"/v1/chats/{chat['id']}/members", {"user_id": bob["id"]}, headers=headers, status=201)
    client.post_json(f"/v1/chats/{chat['id']}/members", {"user_id": bob["id"]}, headers=headers, status=200)


@pytest.mark.parametrize("big", [2**31 - 1, 2**31, 2**40, 2**63 - 1, 2**63, 2**70])
def test_ids_too_big_for_the_id_columns_are_404_or_400_never_500(client, big):
    ann = client.post_json("/v1/users", {"name": "ann"}).json
    headers = {"Authorization": f"Bearer {ann['token']}"}
    chat = client.post_json("/v1/chats", {"name": "c", "member_ids": []}, headers=headers).json

    for path in (f"/v1/chats/{big}", f"/v1/messages/{big}", f"/v1/messages/{big}/deliveries"):
        assert client.get(path, headers=headers, status="*").status_int == 404
    assert client.delete(f"/v1/devices/{big}", headers=headers, status="*").status_int == 404
    assert client.delete(f"/v1/chats/{chat['id']}/members/{big}", headers=headers, status="*").status_int == 404
    assert client.post_json(f"/v1/chats/{chat['id']}/members", {"user_id": big}, headers=headers,
                            status="*").status_int in (400, 404)
    assert client.post_json("/v1/chats", {"name": "c", "member_ids": [big]}, headers=headers,
                            status="*").status_int == 400
    history = client.get(f"/v1/chats/{chat['id']}/messages?before={big}", headers=headers, status="*")
    assert history.status_int in (200, 400)


# ---------------------------------------------------------------- SQLite: writers queue on a file lock

def _write_in_child(url: str, ready, go, done) -> None:
    engine = db.make_engine(url)
    ready.set()
    go.wait(10)
    with db.writer(engine).begin() as conn:  # the queue object inherited from the parent by fork
        store.create_user(conn, "child", "child-hash", NOW)
    done.set()


def test_sqlite_writers_of_forked_processes_queue_on_the_lock_file(tmp_path):
    import multiprocessing

    url = f"sqlite:///{tmp_path}/queue.sqlite3"
    engine = db.make_engine(url)
    db.migrate(engine)  # a write: this process's queue is open when it forks
    fork = multiprocessing.get_context("fork")
    ready, go, done = fork.Event(), fork.Event(), fork.Event()
    # forked outside any transaction, as uWSGI forks workers and workers fork the dispatcher
    child = fork.Process(target=_write_in_child, args=(url, ready, go, done))
    child.start()
    try:
        assert ready.wait(10)
        # the parent holds the queue only, not SQLite's lock: what the child waits on is the queue, and
        # only because it opened the lock file itself (an inherited descriptor shares our lock)
        with db._write_queue(str(tmp_path / "queue.sqlite3")):
            go.set()
            assert not done.wait(0.3), "the child wrote while the parent held the queue"
        assert done.wait(10), "the child was not let in when the parent committed"
        child.join(10)
    finally:
        if child.is_alive():
            child.kill()
            child.join(5)
    assert child.exitcode == 0
    assert (tmp_path / "queue.sqlite3-writers.lock").exists()
    with engine.connect() as conn:
        names = conn.execute(sa.select(schema.users.c.name).order_by(schema.users.c.id)).scalars().all()
    assert names == ["child"]
    engine.dispose()


def test_sqlite_write_queue_holds_across_a_fork_made_in_c_as_uwsgi_forks_its_workers(tmp_path):
    import ctypes
    import select

    engine = db.make_engine(f"sqlite:///{tmp_path}/cfork.sqlite3")
    db.migrate(engine)  # the queue is open in this process, as in uWSGI's master
    path = str(tmp_path / "cfork.sqlite3")
    read_end, write_end = os.pipe()
    libc_fork = ctypes.PyDLL(None).fork  # fork(2) itself: no Python at-fork hook runs, as under uWSGI
    with db._write_queue(path):
        pid = libc_fork()
        if pid == 0:  # the child: take the queue, say so, leave at once
            try:
                with db._write_queue(path):
                    os.write(write_end, b"in")
            finally:
                os._exit(0)
        try:
            ready, _, _ = select.select([read_end], [], [], 0.3)
            assert ready == [], "the child took the queue while the parent held it"
        except BaseException:
            os.kill(pid, 9)
            raise
    try:
        ready, _, _ = select.select([read_end], [], [], 10)
        assert ready == [read_end] and os.read(read_end, 2) == b"in"
    finally:
        os.kill(pid, 9)  # a child stuck on a lock it inherited must not outlive the test (a no-op on an exited one)
        os.waitpid(pid, 0)
        os.close(read_end)
        os.close(write_end)
    engine.dispose()


def test_sqlite_writer_threads_of_one_process_take_turns(tmp_path):
    import threading

    engine = db.make_engine(f"sqlite:///{tmp_path}/threads.sqlite3")
    db.migrate(engine)
    inside, overlaps = [], []

    def write(i):
        for j in range(20):
            with db.writer(engine).begin() as conn:
                inside.append(i)
                if len(inside) > 1:
                    overlaps.append(list(inside))
                store.create_user(conn, f"u{i}-{j}", f"h{i}-{j}", NOW)
                inside.remove(i)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert overlaps == []
    assert count(engine, schema.users) == 80
    engine.dispose()


def test_sqlite_commits_leave_the_wal_for_checkpoint_to_copy_outside_the_write_queue(tmp_path):
    import sqlite3

    path = tmp_path / "wal.sqlite3"
    engine = db.make_engine(f"sqlite:///{path}")
    db.migrate(engine)
    db.checkpoint(engine)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == db.WAL_SAFETY_PAGES
    with db.writer(engine).begin() as conn:
        for i in range(50):
            store.create_user(conn, f"u{i}", f"h{i}", NOW)

    def users_in_the_database_file() -> int:  # immutable: the main file only, the WAL ignored
        with sqlite3.connect(f"file:{path}?immutable=1", uri=True) as raw:
            return raw.execute("SELECT count(*) FROM users").fetchone()[0]

    assert users_in_the_database_file() == 0  # the commit left its pages in the WAL
    db.checkpoint(engine)
    assert users_in_the_database_file() == 50
    engine.dispose()


def test_renew_leases_extends_only_the_given_deliveries_of_their_owner(engine, world):
    post(engine, world)
    expand_all(engine)
    first, second = (c.push.delivery_id for c in claim(engine, "d1", NOW))

    with write(engine) as conn:
        assert outbox.renew_leases(conn, "d1", {first}, NOW + 500) == 1
        assert outbox.renew_leases(conn, "d2", {second}, NOW + 500) == 0  # not d2's

    until = {d.id: d.lease_until for d in rows(engine, schema.deliveries)}
    assert until == {first: NOW + 500, second: NOW + LEASE}
    with write(engine) as conn:
        outbox.release_leases(conn, "d1", {second})
    assert {d.id: d.lease_owner for d in rows(engine, schema.deliveries)} == {first: "d1", second: None}


def test_a_writer_made_before_a_fork_queues_with_the_childs_own_lock_file(tmp_path):
    import ctypes
    import select

    engine = db.make_engine(f"sqlite:///{tmp_path}/early.sqlite3")
    db.migrate(engine)
    early = db.writer(engine)  # as the app made in uWSGI's master, before the workers fork
    read_end, write_end = os.pipe()
    with db._write_queue(str(tmp_path / "early.sqlite3")):
        pid = ctypes.PyDLL(None).fork()
        if pid == 0:  # the child writes through the Writer it inherited
            try:
                with early.begin() as conn:
                    conn.execute(sa.select(1))
                    os.write(write_end, b"in")
            finally:
                os._exit(0)
        try:
            ready, _, _ = select.select([read_end], [], [], 0.3)
            assert ready == [], "the child's inherited Writer used the parent's open file"
        except BaseException:
            os.kill(pid, 9)
            raise
    try:
        ready, _, _ = select.select([read_end], [], [], 10)
        assert ready == [read_end] and os.read(read_end, 2) == b"in"
    finally:
        os.kill(pid, 9)  # a no-op on an exited child; a stuck one must not outlive the test
        os.waitpid(pid, 0)
        os.close(read_end)
        os.close(write_end)
    engine.dispose()


# ---------------------------------------------------------------- statements run on the driver

def test_a_driver_statement_runs_in_the_callers_transaction_and_rolls_back_with_it(engine, world):
    before = count(engine, schema.messages)
    with pytest.raises(RuntimeError):
        with write(engine) as conn:
            assert store.insert_message_with_job(conn, world.chat, world.ann, "gone", None, NOW) is not None
            raise RuntimeError("after the insert")
    assert count(engine, schema.messages) == before
    assert count(engine, schema.push_jobs) == 0


def test_a_driver_error_is_raised_as_sqlalchemy_raises_it_with_the_values_hidden(engine, world):
    duplicate = db.DriverStatement(schema.users.insert().values(
        name=sa.bindparam("name"), token_hash=sa.bindparam("token_hash"), created_at=sa.bindparam("created_at")))
    with write(engine) as conn:
        taken = store.user_by_token_hash(conn, store.hash_token("nobody")) or {}
        assert taken == {}
        secret_hash = conn.execute(sa.select(schema.users.c.token_hash).where(schema.users.c.id == world.ann)).scalar()
    with pytest.raises(sa.exc.IntegrityError) as caught:
        with write(engine) as conn:
            duplicate.execute(conn, {"name": "again", "token_hash": secret_hash, "created_at": NOW})
    assert "parameters hidden" in str(caught.value)  # our values (texts, hashes) stay out of logs
    assert not caught.value.connection_invalidated


def test_a_driver_statement_refuses_an_in_list():
    statement = db.DriverStatement(sa.select(schema.users.c.id).where(schema.users.c.id.in_([1, 2])))
    engine = db.make_engine("sqlite:///:memory:")
    with engine.connect() as conn, pytest.raises(ValueError, match="IN lists"):
        statement.first(conn, {})


def test_a_lost_postgresql_connection_is_invalidated_and_the_next_request_reconnects(postgres_engine):
    engine = postgres_engine
    with engine.connect() as victim:
        pid = victim.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        victim.commit()
        with engine.connect() as killer:
            killer.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            killer.commit()
        with pytest.raises(sa.exc.OperationalError) as caught:
            store.user_by_token_hash(victim, "x")
        assert caught.value.connection_invalidated
    with engine.connect() as conn:  # the pool dropped the dead connection
        assert store.user_by_token_hash(conn, "x") is None


def test_a_write_that_waits_past_sqlites_busy_timeout_is_an_operational_error(tmp_path):
    """BEGIN IMMEDIATE runs on the driver too: a database held by a process that queues nowhere
    (the sqlite3 shell) ends in SQLAlchemy's OperationalError, which the web layer answers 503."""
    import sqlite3
    path = tmp_path / "busy.sqlite3"
    engine = db.make_engine(f"sqlite:///{path}", connect_args={"timeout": 0.05})
    db.migrate(engine)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA busy_timeout=50")
        with pytest.raises(sa.exc.OperationalError, match="locked"):
            with write(engine) as conn:
                store.user_by_token_hash(conn, "x")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        engine.dispose()


def test_autocommit_reads_leave_no_transaction_open_and_hand_back_a_transactional_connection(postgres_engine):
    import psycopg

    engine = postgres_engine
    with db.autocommit(engine) as conn:
        store.user_by_token_hash(conn, "x")
        driver = conn.connection.dbapi_connection
        assert driver.info.transaction_status == psycopg.pq.TransactionStatus.IDLE  # no BEGIN was sent
    assert driver.autocommit is False  # back in the pool as every other connection is
    with pytest.raises(RuntimeError):  # and a write on it still rolls back as a whole
        with write(engine) as conn:
            store.create_user(conn, "rolled-back", "rolled-back-hash", NOW)
            raise RuntimeError("after the insert")
    with db.autocommit(engine) as conn:
        assert store.user_by_token_hash(conn, "rolled-back-hash") is None


# ---------------------------------------------------------------- claim_batch: due rows first, new rows leased

def claim_batch(engine, owner: str, now: float, size: int = 100) -> list[int]:
    with write(engine) as conn:
        return outbox.claim_batch(conn, owner, now, LEASE, size).ids


def test_claim_batch_inserts_new_deliveries_already_leased_to_the_claimer(engine, world):
    post(engine, world)
    ids = claim_batch(engine, "d1", NOW)
    deliveries = rows(engine, schema.deliveries)
    assert sorted(d.id for d in deliveries) == ids and len(ids) == 2
    assert {(d.lease_owner, d.lease_until, d.state) for d in deliveries} == {("d1", NOW + LEASE, "pending")}
    # leased: nobody else takes them before the lease ends, anyone after
    assert claim_batch(engine, "d2", NOW + LEASE - 0.001) == []
    assert claim_batch(engine, "d2", NOW + LEASE) == ids


def test_claim_batch_takes_due_deliveries_before_expanding_new_ones(engine, world):
    post(engine, world, "first")
    retry, other = claim_batch(engine, "d1", NOW)
    record(engine, "d1", [outbox.Update(retry, DeliveryState.PENDING, 1, NOW + 10, 503, "Unavailable"), sent(other)])
    post(engine, world, "second")  # two new deliveries waiting to be expanded

    taken = claim_batch(engine, "d1", NOW + 10, size=2)  # room for the retry and one new delivery
    assert retry in taken and len(taken) == 2
    job, second_job = rows(engine, schema.push_jobs)
    assert second_job.state == "pending"  # the rest of it waits for the next batch
    assert len(claim_batch(engine, "d1", NOW + 10, size=2)) == 1
    assert rows(engine, schema.push_jobs)[1].state == "expanded"


def test_claim_batch_records_outcomes_only_for_its_own_leases(engine, world):
    post(engine, world)
    ids = claim_batch(engine, "d1", NOW)
    assert record(engine, "d2", [sent(i) for i in ids]) == 0  # not d2's
    assert record(engine, "d1", [sent(i) for i in ids]) == 2
    assert {(d.state, d.lease_owner) for d in rows(engine, schema.deliveries)} == {("sent", None)}
