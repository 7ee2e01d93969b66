"""The serving loop: one host's dispatcher, from taking the wake-up name to giving it back.

`Runner` is given everything it works with (engine, a providers factory, the listener, the clocks),
so tests drive it one `step()` at a time without uWSGI: idle exit, the race for the name, a
database outage, a warm stop and a cold one. `PushProcess` (on demand) and `python -m notifier`
(supervised) both build one and call `run()`.

Life cycle (rq's warm and cold shutdown):
- start: bind the host's name (else another dispatcher serves: nudge it, exit), register, and take
  over at once the leases of every earlier dispatcher of this host, which the free name proves dead;
- serve: drain the outbox, sleep until nudged, due, or the poll interval; the heartbeat renews our
  leases and takes over those of dispatchers (any host) whose heartbeat is older than three intervals;
- idle exit: give the name back, look once more, exit or bind again;
- first stop request: claim nothing more, finish and record the batches in hand, release, exit;
- second stop request: cancel everything at once; leases are released if the database answers
  within a moment, else the successor takes them over.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Callable

import sqlalchemy as sa

from notifier import completion, db, events, minutes, outbox, registry, retention
from notifier.dispatcher import DB_RETRY_INTERVAL, Dispatcher
from notifier.metrics import HEARTBEAT_INTERVAL, DispatcherMetrics
from notifier.webhooks import WebhookSender
from notifier.wakeup import Listener, nudge

logger = logging.getLogger(__name__)

POLL_INTERVAL = 1.0       # safety net: look at the outbox at least this often, nudged or not
STALE_HEARTBEATS = 3      # a dispatcher silent for this many heartbeat intervals is taken over
COLD_STOP_GRACE = 2.0     # on a cold stop, how long to try to release our leases
NUDGE_SPACING = 0.005     # under a stream of nudges (one per POST), a pass at most this often
MAINTENANCE_INTERVAL = 60.0  # retention and the completion sweep: at least this often (or PUSH_RETENTION)
PRUNE_PAUSE = 0.005       # between two pruning batches: the POSTs waiting for SQLite's write lock go first


class Runner:
    """This host's dispatcher loop. `clock` is epoch time (the outbox's), `monotonic` measures idleness."""

    def __init__(self, settings, engine, providers: Callable[[], dict], listener: Listener, *,
                 metrics: DispatcherMetrics | None = None, idle_exit: float | None = None,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.engine = engine
        self.make_providers = providers
        self.listener = listener
        self.metrics = metrics
        self.idle_exit = idle_exit
        self.clock = clock
        self.monotonic = monotonic
        self.dispatcher: Dispatcher | None = None
        self.registry_id: int | None = None
        self.stopping = False
        self.woken = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._last_work = monotonic()
        self._listening = False

    # ------------------------------------------------------------------ start

    async def start(self) -> bool:
        """Take the host's name, register, take over the dead's leases. False: another one serves."""
        if not self.listener.bind():
            # it holds the name; make sure it looks at what our starter committed
            nudge(self.settings)
            logger.info("notifier: a dispatcher is already running on this host; exiting")
            return False
        host, pid = self.settings.push_host_id, os.getpid()
        while True:
            try:
                self.registry_id, taken = self._register(host, pid)
                break
            except sa.exc.DBAPIError as exc:
                logger.warning("notifier: database unavailable at start (%s); retrying", type(exc.orig).__name__)
                if await self._sleep(DB_RETRY_INTERVAL) == "stop":
                    self.listener.close()
                    return False
        owner = registry.lease_owner(host, pid, self.registry_id)
        self.dispatcher = Dispatcher(self.settings, self.engine, self.make_providers(), self.metrics,
                                     clock=self.clock, owner=owner)
        self._log_takeover(taken)
        self._last_work = self.monotonic()
        logger.info("notifier: dispatcher %s started", owner)
        return True

    def _register(self, host: str, pid: int):
        now = self.clock()
        with db.writer(self.engine).begin() as conn:
            registry_id = registry.register_dispatcher(conn, host, pid, now)
            # we hold the name, so every other dispatcher of this host registered as running is dead
            taken = registry.take_over(conn, registry_id, now, host_id=host)
        return registry_id, taken

    @staticmethod
    def _log_takeover(taken) -> None:
        for owner, released in taken:
            logger.warning("notifier: dispatcher %s is gone; took over its %d leased deliveries", owner, released)

    # ------------------------------------------------------------------ one step

    async def step(self) -> float | None:
        """One look at the outbox. Returns how long to wait before the next (a nudge cuts it short),
        or None when the dispatcher has been idle long enough to exit."""
        dispatcher = self.dispatcher
        try:
            tally = await dispatcher.drain()
            due = None if tally.claimed else await asyncio.to_thread(dispatcher.next_wakeup)
        except sa.exc.DBAPIError as exc:
            # the database restarts or is unreachable: the outbox is safe in it; wait and resume
            logger.warning("notifier: database unavailable (%s); retrying in %.1f s",
                           type(exc.orig).__name__, DB_RETRY_INTERVAL)
            self._last_work = self.monotonic()  # an outage is not idleness
            return DB_RETRY_INTERVAL
        if tally.claimed:
            self._last_work = self.monotonic()
            logger.info("notifier: sent batch: %d deliveries %s", tally.claimed, tally.by_outcome)
            return 0.0
        idle_for = self.monotonic() - self._last_work
        if due is None and self.idle_exit is not None and idle_for >= self.idle_exit:
            return await self._leave_or_stay()
        timeout = POLL_INTERVAL
        if due is not None:
            timeout = max(0.0, min(timeout, due - self.clock()))
        if self.idle_exit is not None:
            timeout = min(timeout, max(0.0, self.idle_exit - idle_for))
        return timeout

    async def _leave_or_stay(self) -> float | None:
        """Idle: give the name back first, then look once more. A message committed before we let
        go is visible to that look; one committed after finds no listener and starts a new
        dispatcher. So no wake-up falls between the two."""
        self._unlisten()
        self.listener.close()
        if await asyncio.to_thread(self.dispatcher.next_wakeup) is None or not self.listener.bind():
            return None
        self._listen()
        return 0.0

    # ------------------------------------------------------------------ stopping

    def request_stop(self) -> None:
        """First call: warm stop (finish the batches in hand, claim nothing more). Second: cold."""
        if not self.stopping:
            self.stopping = True
            if self.dispatcher is not None:
                self.dispatcher.stopping = True
            self._stop.set()
            logger.info("notifier: stopping after the batches in hand (again to stop at once)")
            return
        logger.warning("notifier: stopping at once")
        if self._task is not None:
            self._task.cancel()

    # ------------------------------------------------------------------ the loop

    async def run(self) -> int:
        """Serve until stopped, or idle for `idle_exit` seconds. Returns an exit code."""
        self._task = asyncio.current_task()
        try:
            if not await self.start():
                return 0
        except asyncio.CancelledError:
            self.listener.close()
            return 1
        self._listen()
        helpers = [asyncio.create_task(self._heartbeat()), asyncio.create_task(self._maintenance())]
        if self.settings.webhooks_enabled:
            dispatcher = self.dispatcher
            sender = WebhookSender(self.settings, self.engine, dispatcher.db, dispatcher.persist, dispatcher.owner,
                                   dispatcher.events_written,
                                   self.metrics.observe_webhook if self.metrics is not None else None,
                                   clock=self.clock)
            helpers.append(asyncio.create_task(sender.run()))
        if self.engine.dialect.name == "postgresql":
            helpers.append(asyncio.create_task(_listen_for_jobs(self.settings.database_url, self.woken)))
        cold = False
        try:
            while not self.stopping:
                self.woken.clear()
                started = self.monotonic()
                delay = await self.step()
                if delay is None:
                    break
                if delay > 0 and await self._sleep(delay) == "nudge":
                    await self._space_out(started)
        except asyncio.CancelledError:
            cold = True
        finally:
            for helper in helpers:
                helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            await self._close(cold)
        return 0

    async def _sleep(self, delay: float) -> str:
        """Wait until nudged, stopped or `delay` passes; says which."""
        nudged = asyncio.create_task(self.woken.wait())
        stopped = asyncio.create_task(self._stop.wait())
        try:
            done, _ = await asyncio.wait({nudged, stopped}, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            nudged.cancel()
            stopped.cancel()
        return "stop" if stopped in done else "nudge" if nudged in done else "timeout"

    async def _space_out(self, started: float) -> None:
        """Nudged right after a pass: let a few more POSTs commit first, so one write transaction
        expands them all. Every POST nudges; taking each alone, the dispatcher's write transactions
        outnumbered the requests' and the POSTs queued behind them (measured with bench.floor's
        on-demand round). A nudge after an idle spell is served at once."""
        rest = NUDGE_SPACING - (self.monotonic() - started)
        if rest > 0:
            try:
                await asyncio.wait_for(self._stop.wait(), rest)
            except asyncio.TimeoutError:
                pass

    def _listen(self) -> None:
        def on_nudge():
            self.listener.drain_nudges()
            self.woken.set()

        asyncio.get_running_loop().add_reader(self.listener.fileno(), on_nudge)
        self._listening = True

    def _unlisten(self) -> None:
        if self._listening:
            asyncio.get_running_loop().remove_reader(self.listener.fileno())
            self._listening = False

    async def _close(self, cold: bool) -> None:
        """Release what we hold. The name last: while we hold it, no successor takes our leases."""
        dispatcher = self.dispatcher
        dispatcher.stopping = True
        grace = COLD_STOP_GRACE if cold else None
        providers = asyncio.gather(*(p.close() for p in dispatcher.providers.values()), return_exceptions=True)
        try:
            await asyncio.wait_for(providers, grace)
        except asyncio.TimeoutError:
            pass
        try:
            await asyncio.wait_for(asyncio.to_thread(self._release_all), grace)
        except Exception:  # noqa: BLE001 - the database may be gone; the successor takes the leases over
            logger.warning("notifier: could not release leases on exit; the next dispatcher takes them over",
                           exc_info=not cold)
        self._unlisten()
        self.listener.close()
        logger.info("notifier: dispatcher %s stopped%s", dispatcher.owner, " (cold)" if cold else "")

    def _release_all(self) -> None:
        self.dispatcher.release()
        with db.writer(self.engine).begin() as conn:
            events.release_events(conn, self.dispatcher.owner)
            registry.heartbeat(conn, self.registry_id, self.clock(), stopped=True)

    # ------------------------------------------------------------------ heartbeat

    async def _heartbeat(self) -> None:
        """Mark us alive, renew our leases well before they expire (a batch may take longer to send
        than a lease lasts), and take over dispatchers whose heartbeat stopped."""
        interval = min(HEARTBEAT_INTERVAL, self.settings.push_lease / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                # like every write of the send path: on SQLite on this thread (a worker thread fighting
                # the busy event loop for the GIL held the write queue 35-60 ms for this 1 ms update)
                taken = await self.dispatcher.db(self.beat, interval)
                self._log_takeover(taken)
                # SQLite's WAL, copied back while nobody waits for it: outside the queue, off the loop
                await asyncio.to_thread(db.checkpoint, self.engine)
            except Exception:  # noqa: BLE001 - leases then expire or are taken over, at least once
                logger.warning("notifier: heartbeat failed", exc_info=True)

    # ------------------------------------------------------------------ maintenance

    async def _maintenance(self) -> None:
        """Now and then: complete the fan-outs nobody noticed were complete (a safety net), and
        prune finished work older than PUSH_RETENTION."""
        interval = min(MAINTENANCE_INTERVAL, self.settings.push_retention)
        while True:
            try:
                await self.maintain()
            except Exception:  # noqa: BLE001 - the next pass tries again; nothing is half-deleted
                logger.warning("notifier: maintenance pass failed", exc_info=True)
            await asyncio.sleep(interval)

    async def maintain(self) -> dict:
        """One maintenance pass: the completion sweep, then retention in small batches (each its own
        short write transaction, with a pause between them). Returns what it did."""
        dispatcher = self.dispatcher
        now = self.clock()
        cutoff = now - self.settings.push_retention
        with_events = self.settings.webhooks_enabled
        done = {"completed": len(await dispatcher.db(self._in_transaction, completion.sweep, now, with_events)),
                "deliveries": 0, "events": 0}
        for kind, prune, args in (("deliveries", retention.prune_deliveries, (cutoff, now)),
                                  ("events", retention.prune_events, (cutoff,))):
            while not self.stopping:
                deleted = await dispatcher.db(self._in_transaction, prune, *args)
                if not deleted:
                    break
                done[kind] += deleted
                await asyncio.sleep(PRUNE_PAUSE)
        # the dashboard's per-minute history: a few hundred rows at most per pass
        await dispatcher.db(self._in_transaction, retention.prune_minutes, cutoff, now)
        if done["completed"]:
            dispatcher.events_written.set()
            logger.warning("notifier: %d complete fan-out(s) had not been noticed; completed now", done["completed"])
        if done["deliveries"] or done["events"]:
            logger.info("notifier: pruned %d delivery rows and %d webhook events finished over %.0f s ago",
                        done["deliveries"], done["events"], self.settings.push_retention)
        return done

    def _in_transaction(self, call, *args):
        with db.writer(self.engine).begin() as conn:
            return call(conn, *args)

    def beat(self, interval: float = HEARTBEAT_INTERVAL) -> list[tuple[str, int]]:
        """One heartbeat: alive, leases in flight renewed, silent dispatchers taken over."""
        dispatcher = self.dispatcher
        now = self.clock()
        with db.writer(self.engine).begin() as conn:
            registry.heartbeat(conn, self.registry_id, now)
            minutes.sample_queue(conn, now)  # the dashboard's queue history: once a minute, any host
            outbox.renew_leases(conn, dispatcher.owner, set(dispatcher.in_flight), now + self.settings.push_lease)
            return registry.take_over(conn, self.registry_id, now,
                                     stale_before=now - STALE_HEARTBEATS * interval)


async def _listen_for_jobs(database_url: str, woken: asyncio.Event) -> None:
    """PostgreSQL LISTEN: wake up for messages committed on any host. Reconnects forever; the
    periodic look at the outbox covers the gaps."""
    import psycopg

    dsn = database_url.replace("postgresql+psycopg://", "postgresql://", 1)
    while True:
        try:
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True, connect_timeout=5) as conn:
                await conn.execute(f"LISTEN {outbox.NOTIFY_CHANNEL}")
                woken.set()  # anything committed while we were not listening
                async for _ in conn.notifies():
                    woken.set()
        except psycopg.Error as exc:
            logger.warning("notifier: LISTEN connection lost (%s); reconnecting", type(exc).__name__)
            await asyncio.sleep(POLL_INTERVAL)
