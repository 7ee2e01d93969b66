"""The serving loop without uWSGI: a Runner given its engine, providers, clocks and listener, driven
one step at a time. Idle exit, the race for the host's name, takeover of the dead, a database outage,
a warm stop and a cold one."""
from __future__ import annotations

import asyncio
import uuid

import pytest
import sqlalchemy as sa

from notifier import db, outbox, registry, schema
from notifier.config import Settings
from notifier.dispatcher import DB_RETRY_INTERVAL
from notifier.model import Platform
from notifier.runner import Runner
from notifier.wakeup import Listener, someone_listens
from tests.test_dispatcher import T0, Clock, ScriptedProvider, deliveries, post, world  # noqa: F401 - fixture

pytestmark = pytest.mark.timeout(30)
HOST = "host-a"


class Monotonic:
    """A monotonic clock the test moves by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class BlockingProvider(ScriptedProvider):
    """Holds every send until `release` is set: a batch in flight for as long as the test wants."""

    def __init__(self, platform):
        super().__init__(platform)
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    async def send(self, push):
        self.started.set()
        await self.release.wait()
        return await super().send(push)


def settings_for(world, **extra) -> Settings:
    # a database URL of its own makes the host's socket name unique to this test
    url = str(world["engine"].url)
    return Settings(database_url=url, push_host_id=extra.pop("push_host_id", HOST), push_retry_base=1.0, **extra)


def make_runner(world, clock=None, monotonic=None, apns=None, fcm=None, idle_exit=5.0, **extra) -> Runner:
    providers = {Platform.APNS: apns or ScriptedProvider(Platform.APNS),
                 Platform.FCM: fcm or ScriptedProvider(Platform.FCM)}
    settings = settings_for(world, **extra)
    return Runner(settings, world["engine"], lambda: providers, Listener(settings), idle_exit=idle_exit,
                  clock=clock or Clock(), monotonic=monotonic or Monotonic())


def register_dead(world, host_id: str, heartbeat_at: float = T0, lease_until: float = T0 + 60) -> str:
    """A dispatcher registered as running that claimed every delivery and then died."""
    with db.writer(world["engine"]).begin() as conn:
        row = registry.register_dispatcher(conn, host_id, 4242, heartbeat_at)
        owner = registry.lease_owner(host_id, 4242, row)
        outbox.expand_pending_jobs(conn, T0)
        outbox.claim_delivery_ids(conn, owner, T0, lease_until - T0, 100)
    return owner


def lease_owners(world) -> set:
    with world["engine"].connect() as conn:
        return set(conn.execute(sa.select(schema.deliveries.c.lease_owner)).scalars())


async def close(runner):
    await runner._close(cold=False)


def test_an_idle_runner_gives_the_name_back_and_exits(world):
    async def scenario():
        monotonic = Monotonic()
        runner = make_runner(world, monotonic=monotonic, idle_exit=5.0)
        assert await runner.start()
        assert someone_listens(runner.settings)
        assert 0 < await runner.step() <= 1.0  # nothing to do: wait, at most the poll interval
        monotonic.now += 5.0
        assert await runner.step() is None  # idle long enough: exit
        assert not someone_listens(runner.settings)
        await close(runner)

    asyncio.run(scenario())


def test_a_message_committed_while_the_idle_runner_lets_go_keeps_it_serving(world):
    async def scenario():
        monotonic = Monotonic()
        runner = make_runner(world, monotonic=monotonic, idle_exit=5.0)
        assert await runner.start()
        real_next_wakeup = runner.dispatcher.next_wakeup
        calls = []

        def committed_in_between():  # a message commits just as the name is given back
            held = someone_listens(runner.settings)
            calls.append(held)
            if not held:
                post(world, "just in time")
            return real_next_wakeup()

        monotonic.now += 5.0
        runner.dispatcher.next_wakeup = committed_in_between
        assert await runner.step() == 0.0  # stays, with the name bound again
        assert calls == [True, False], "one look while idle, one after giving the name back"
        assert someone_listens(runner.settings)
        runner.dispatcher.next_wakeup = real_next_wakeup
        assert (await runner.dispatcher.drain()).claimed == 2
        await close(runner)

    asyncio.run(scenario())


def test_a_second_runner_finds_the_name_taken_nudges_the_holder_and_gives_up(world):
    async def scenario():
        first, second = make_runner(world), make_runner(world)
        assert await first.start()
        assert not await second.start()
        assert first.listener.sock.recv(64) == b"!"  # told to look at what second's starter committed
        assert second.registry_id is None  # never registered, took nothing over
        await close(first)
        assert await second.start()  # the name is free again
        await close(second)

    asyncio.run(scenario())


def test_the_leases_of_a_dead_dispatcher_of_this_host_are_taken_over_at_start_not_after_the_lease(world):
    message = post(world)
    owner = register_dead(world, HOST)
    assert lease_owners(world) == {owner}

    async def scenario():
        runner = make_runner(world)  # the clock stays at T0: the dead one's leases run 60 s more
        assert await runner.start()  # holding the name proves every earlier one of this host dead
        assert (await runner.dispatcher.drain()).claimed == 2
        await close(runner)

    asyncio.run(scenario())
    assert {r["state"] for r in deliveries(world, message).values()} == {"sent"}
    with world["engine"].connect() as conn:
        assert conn.execute(sa.select(schema.dispatchers.c.stopped_at)
                            .where(schema.dispatchers.c.pid == 4242)).scalar_one() == T0


def test_a_dispatcher_of_another_host_is_taken_over_only_once_its_heartbeat_is_three_intervals_old(world):
    post(world)
    owner = register_dead(world, "host-b", heartbeat_at=T0)
    clock = Clock()

    async def scenario():
        runner = make_runner(world, clock=clock)
        assert await runner.start()
        assert (await runner.dispatcher.drain()).claimed == 0  # another host: not proven dead
        clock.now = T0 + 3 * 2.0 - 0.1
        assert runner.beat(2.0) == []
        clock.now = T0 + 3 * 2.0 + 0.1
        assert runner.beat(2.0) == [(owner, 2)]
        assert (await runner.dispatcher.drain()).claimed == 2
        await close(runner)

    asyncio.run(scenario())


def test_a_database_outage_is_waited_out_and_is_not_idleness(world, monkeypatch):
    post(world)

    async def scenario():
        monotonic = Monotonic()
        runner = make_runner(world, monotonic=monotonic, idle_exit=5.0)
        assert await runner.start()
        real_claim = outbox.claim_delivery_ids

        def database_down(*args, **kwargs):
            raise sa.exc.OperationalError("UPDATE deliveries ...", {}, Exception("unable to open database file"))

        monkeypatch.setattr(outbox, "claim_delivery_ids", database_down)
        for _ in range(3):
            monotonic.now += 10.0  # far past idle_exit, but it was an outage, not idleness
            assert await runner.step() == DB_RETRY_INTERVAL
        monkeypatch.setattr(outbox, "claim_delivery_ids", real_claim)
        assert await runner.step() == 0.0  # back: the work goes out
        assert someone_listens(runner.settings)
        await close(runner)

    asyncio.run(scenario())


def test_the_first_stop_finishes_the_batch_in_hand_and_records_it(world):
    message = post(world)

    async def scenario():
        apns = BlockingProvider(Platform.APNS)
        runner = make_runner(world, apns=apns, idle_exit=None)
        serving = asyncio.create_task(runner.run())
        await asyncio.wait_for(apns.started.wait(), 5)
        runner.request_stop()  # warm: the batch in flight is finished, nothing more is claimed
        await asyncio.sleep(0.1)
        assert not serving.done()
        apns.release.set()
        assert await asyncio.wait_for(serving, 5) == 0
        assert not someone_listens(runner.settings)

    asyncio.run(scenario())
    assert {r["state"] for r in deliveries(world, message).values()} == {"sent"}
    assert lease_owners(world) == {None}


def test_a_second_stop_stops_at_once_and_gives_the_leases_back(world):
    message = post(world)

    async def scenario():
        apns = BlockingProvider(Platform.APNS)  # never released: a send that hangs
        runner = make_runner(world, apns=apns, idle_exit=None)
        serving = asyncio.create_task(runner.run())
        await asyncio.wait_for(apns.started.wait(), 5)
        runner.request_stop()
        await asyncio.sleep(0.1)
        assert not serving.done()  # warm: waits for the hanging send
        runner.request_stop()  # cold
        await asyncio.wait_for(asyncio.shield(serving), 3)
        assert not someone_listens(runner.settings)

    asyncio.run(scenario())
    # the hanging APNs push is pending again and claimable by the next dispatcher at once
    states = {r["platform"]: r["state"] for r in deliveries(world, message).values()}
    assert states["apns"] == "pending"
    assert lease_owners(world) == {None}


def test_the_heartbeat_renews_only_the_leases_in_flight(world):
    post(world)

    async def scenario():
        clock = Clock()
        runner = make_runner(world, clock=clock)
        assert await runner.start()
        with db.writer(world["engine"]).begin() as conn:
            outbox.expand_pending_jobs(conn, T0)
            ids = outbox.claim_delivery_ids(conn, runner.dispatcher.owner, T0, 60, 100)
        runner.dispatcher.in_flight.update(ids[:1])
        clock.now = T0 + 30
        runner.beat()
        with world["engine"].connect() as conn:
            until = dict(conn.execute(sa.select(schema.deliveries.c.id, schema.deliveries.c.lease_until)).all())
        assert until == {ids[0]: T0 + 30 + runner.settings.push_lease, ids[1]: T0 + 60}
        await close(runner)

    asyncio.run(scenario())


def test_runners_of_two_tests_never_share_a_name(world):
    settings = settings_for(world)
    other = Settings(database_url=settings.database_url, push_host_id=f"host-{uuid.uuid4().hex}")
    first, second = Listener(settings), Listener(other)
    try:
        assert first.bind() and second.bind()  # the host id is part of the name
    finally:
        first.close()
        second.close()


def test_a_nudge_right_after_a_pass_waits_for_the_spacing_one_after_an_idle_spell_does_not(world, monkeypatch):
    """Every POST nudges: under a stream of them a pass runs at most every NUDGE_SPACING, so one
    write transaction expands several messages; a nudge after a quiet spell is served at once,
    and a stop request ends the wait."""
    import notifier.runner

    monkeypatch.setattr(notifier.runner, "NUDGE_SPACING", 30.0)  # far longer than the test may take

    async def scenario():
        monotonic = Monotonic()
        runner = make_runner(world, monotonic=monotonic)
        assert await runner.start()
        # a pass that started just now: the next one waits
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(runner._space_out(started=monotonic.now), 0.2)
        # a pass that started longer ago than the spacing: no wait at all
        await asyncio.wait_for(runner._space_out(started=monotonic.now - 31.0), 1.0)
        # a stop request cuts the wait short
        waiting = asyncio.create_task(runner._space_out(started=monotonic.now))
        await asyncio.sleep(0.05)
        runner.request_stop()
        await asyncio.wait_for(waiting, 1.0)
        await close(runner)

    asyncio.run(scenario())
