"""The dispatcher's decisions, one drain at a time, with a controlled clock.

The providers here are scripted stand-ins of the Provider interface (send -> Result): this module
tests what the dispatcher does with each classified outcome. The real aioapns and pyfcm clients
against the protocol fakes are exercised in test_providers.py and the end-to-end tests.
"""
from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa

from chat_app import store
from notifier import db, devices, outbox, schema
from notifier.config import Settings
from notifier.dispatcher import AUTH_PAUSE, Dispatcher
from notifier.model import Outcome, Platform, Result

pytestmark = pytest.mark.timeout(30)
T0 = 1_800_000_000.0


class ScriptedProvider:
    """Answers each token with the next scripted Result, then SENT."""

    def __init__(self, platform, scripts=None):
        self.platform = platform
        self.scripts = {token: list(results) for token, results in (scripts or {}).items()}
        self.sent = []

    async def send(self, push):
        self.sent.append(push)
        queue = self.scripts.get(push.token)
        return queue.pop(0) if queue else Result(Outcome.SENT, 200, None)

    async def close(self):
        pass


class Clock:
    def __init__(self, now=T0):
        self.now = now

    def __call__(self):
        return self.now


@pytest.fixture
def world(tmp_path):
    """A chat of alice (sender, one phone), bob (two phones) and carol (muted, one phone)."""
    engine = db.make_engine(f"sqlite:///{tmp_path}/chat.sqlite3")
    db.migrate(engine)
    with db.writer(engine).begin() as conn:
        alice = store.create_user(conn, "alice", "h-a", T0)["id"]
        bob = store.create_user(conn, "bob", "h-b", T0)["id"]
        carol = store.create_user(conn, "carol", "h-c", T0)["id"]
        devices.insert_device(conn, alice, "apns", "a" * 64, "app", T0)
        bob_apns = devices.insert_device(conn, bob, "apns", "b" * 64, "app", T0)["id"]
        bob_fcm = devices.insert_device(conn, bob, "fcm", "bob-fcm", None, T0)["id"]
        devices.insert_device(conn, carol, "fcm", "carol-fcm", None, T0)
        chat = store.create_chat(conn, "team", alice, [bob, carol], T0)
        store.set_muted_until(conn, chat, carol, T0 + 3600)
    yield {"engine": engine, "alice": alice, "chat": chat, "bob_apns": bob_apns, "bob_fcm": bob_fcm}
    engine.dispose()


def post(world, text="hello", now=T0):
    with db.writer(world["engine"]).begin() as conn:
        return store.insert_message_with_job(conn, world["chat"], world["alice"], text, None, now)["id"]


def make_dispatcher(world, clock, apns=None, fcm=None, **settings):
    providers = {Platform.APNS: apns or ScriptedProvider(Platform.APNS),
                 Platform.FCM: fcm or ScriptedProvider(Platform.FCM)}
    config = Settings(database_url="sqlite://", push_retry_base=1.0, push_retry_max=10.0, **settings)
    return Dispatcher(config, world["engine"], providers, clock=clock, owner="test-owner"), providers


def deliveries(world, message_id):
    with world["engine"].connect() as conn:
        return {d["device_id"]: d for d in outbox.message_deliveries(conn, message_id)}


def test_sends_to_every_device_of_every_other_unmuted_member(world):
    message = post(world)
    dispatcher, providers = make_dispatcher(world, Clock())
    tally = asyncio.run(dispatcher.drain())
    assert tally.claimed == 2
    assert [p.token for p in providers[Platform.APNS].sent] == ["b" * 64]
    assert [p.token for p in providers[Platform.FCM].sent] == ["bob-fcm"]
    rows = deliveries(world, message)
    assert {r["state"] for r in rows.values()} == {"sent"}
    assert all(r["attempts"] == 1 and r["sent_at"] for r in rows.values())


def test_dead_token_fails_the_delivery_and_disables_the_device(world):
    message = post(world)
    apns = ScriptedProvider(Platform.APNS, {"b" * 64: [Result(Outcome.DEAD_TOKEN, 410, "Unregistered")]})
    dispatcher, _ = make_dispatcher(world, Clock(), apns=apns)
    asyncio.run(dispatcher.drain())
    row = deliveries(world, message)[world["bob_apns"]]
    assert (row["state"], row["last_status"], row["last_reason"]) == ("failed", 410, "Unregistered")
    with world["engine"].connect() as conn:
        assert [d["platform"] for d in devices.list_devices(conn, 2)] == ["fcm"]
    # a later message skips the dead device entirely
    later = post(world, "again")
    asyncio.run(dispatcher.drain())
    assert set(deliveries(world, later)) == {world["bob_fcm"]}


def test_transient_failure_is_retried_after_backoff_honouring_retry_after(world):
    message = post(world)
    fcm = ScriptedProvider(Platform.FCM, {"bob-fcm": [Result(Outcome.TRANSIENT, 429, "QUOTA_EXCEEDED", 7.0)]})
    clock = Clock()
    dispatcher, _ = make_dispatcher(world, clock, fcm=fcm)
    asyncio.run(dispatcher.drain())
    row = deliveries(world, message)[world["bob_fcm"]]
    assert (row["state"], row["attempts"], row["last_status"]) == ("pending", 1, 429)
    with world["engine"].connect() as conn:
        due = conn.execute(sa.select(schema.deliveries.c.next_attempt_at)
                           .where(schema.deliveries.c.device_id == world["bob_fcm"])).scalar_one()
    assert due >= T0 + 7.0  # never before Retry-After
    assert asyncio.run(dispatcher.drain()).claimed == 0  # not due yet
    clock.now = due
    asyncio.run(dispatcher.drain())
    row = deliveries(world, message)[world["bob_fcm"]]
    assert (row["state"], row["attempts"]) == ("sent", 2)


def test_out_of_attempts_ends_failed(world):
    message = post(world)
    failures = [Result(Outcome.TRANSIENT, 503, "Unavailable")] * 3
    apns = ScriptedProvider(Platform.APNS, {"b" * 64: failures})
    clock = Clock()
    dispatcher, _ = make_dispatcher(world, clock, apns=apns, push_max_attempts=3)
    for _ in range(3):
        asyncio.run(dispatcher.drain())
        clock.now += 60
    row = deliveries(world, message)[world["bob_apns"]]
    assert (row["state"], row["attempts"]) == ("failed", 3)
    assert "out of attempts" in row["last_reason"]


def test_rejected_credentials_pause_the_provider_and_keep_deliveries_pending(world):
    message = post(world)
    apns = ScriptedProvider(Platform.APNS, {"b" * 64: [Result(Outcome.AUTH, 403, "ExpiredProviderToken")]})
    clock = Clock()
    dispatcher, _ = make_dispatcher(world, clock, apns=apns)
    asyncio.run(dispatcher.drain())
    row = deliveries(world, message)[world["bob_apns"]]
    assert (row["state"], row["attempts"], row["last_reason"]) == ("pending", 0, "ExpiredProviderToken")
    assert deliveries(world, message)[world["bob_fcm"]]["state"] == "sent"  # FCM is not paused
    clock.now += AUTH_PAUSE + 1
    asyncio.run(dispatcher.drain())
    assert deliveries(world, message)[world["bob_apns"]]["state"] == "sent"


def test_dry_run_records_skipped(world):
    message = post(world)
    skip = Result(Outcome.SKIPPED, None, "dry_run")
    apns = ScriptedProvider(Platform.APNS, {"b" * 64: [skip]})
    dispatcher, _ = make_dispatcher(world, Clock(), apns=apns)
    asyncio.run(dispatcher.drain())
    row = deliveries(world, message)[world["bob_apns"]]
    assert (row["state"], row["last_reason"]) == ("skipped", "dry_run")


def test_a_lease_held_by_a_dead_dispatcher_is_taken_over_after_it_expires(world):
    message = post(world)
    clock = Clock()
    first, first_providers = make_dispatcher(world, clock)
    with first.writer.begin() as conn:  # the first dispatcher claims, then "dies" before sending
        outbox.expand_pending_jobs(conn, clock())
        assert len(outbox.claim_deliveries(conn, first.owner, clock(), 60, 100)) == 2
    second, providers = make_dispatcher(world, clock)
    second.owner = "second"
    assert asyncio.run(second.drain()).claimed == 0  # leases hold
    clock.now += 61
    assert asyncio.run(second.drain()).claimed == 2
    assert {r["state"] for r in deliveries(world, message).values()} == {"sent"}


def _leases(world):
    with world["engine"].connect() as conn:
        return conn.execute(sa.select(schema.deliveries.c.id, schema.deliveries.c.lease_owner,
                                      schema.deliveries.c.state)).all()


def test_a_claim_lost_before_sending_is_given_back_at_the_next_pass_not_renewed(world, monkeypatch):
    message = post(world)
    dispatcher, providers = make_dispatcher(world, Clock())
    real_load = outbox.load_claimed

    def database_gone(conn, ids):  # the claim committed; the database fails before the batch is read
        raise sa.exc.OperationalError("SELECT ...", {}, Exception("server closed the connection"))

    monkeypatch.setattr(outbox, "load_claimed", database_gone)
    with pytest.raises(sa.exc.OperationalError):
        asyncio.run(dispatcher.drain())
    assert {owner for _, owner, _ in _leases(world)} == {"test-owner"}  # leased to us, not in flight
    assert dispatcher.in_flight == set()
    with dispatcher.writer.begin() as conn:  # what the heartbeat renews: nothing of a lost batch
        assert outbox.renew_leases(conn, dispatcher.owner, set(dispatcher.in_flight), T0 + 600) == 0

    monkeypatch.setattr(outbox, "load_claimed", real_load)
    tally = asyncio.run(dispatcher.drain())  # the database is back

    assert tally.claimed == 2  # given back first, then claimed and sent at once, not after PUSH_LEASE
    assert {r["state"] for r in deliveries(world, message).values()} == {"sent"}
    assert {owner for _, owner, _ in _leases(world)} == {None}
    assert len(providers[Platform.APNS].sent) == len(providers[Platform.FCM].sent) == 1


def test_a_provider_send_that_never_returns_is_cut_off_and_retried_later(world, monkeypatch):
    """A provider that forgot its own timeout must not hold the batch (nor its leases) forever."""
    import notifier.dispatcher as dispatcher_module

    class Hanging(ScriptedProvider):
        async def send(self, push):
            self.sent.append(push)
            await asyncio.sleep(3600)

    monkeypatch.setattr(dispatcher_module, "SEND_TIMEOUT", 0.2)
    message = post(world)
    dispatcher, _ = make_dispatcher(world, Clock(), apns=Hanging(Platform.APNS))
    tally = asyncio.run(asyncio.wait_for(dispatcher.drain(), 10))
    assert tally.by_outcome == {"transient": 1, "sent": 1}
    rows = deliveries(world, message)
    assert rows[world["bob_apns"]]["state"] == "pending"
    assert rows[world["bob_apns"]]["last_reason"] == "timeout" and rows[world["bob_apns"]]["attempts"] == 1
    assert rows[world["bob_fcm"]]["state"] == "sent"
