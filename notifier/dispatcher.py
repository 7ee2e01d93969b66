"""The dispatcher: claim from the outbox, send through the providers, record every outcome.

The one place that wires the outbox, the providers and the retry policy together.
`notifier.runner.Runner` drives it (inside PushProcess on demand, or `python -m notifier`).
Database calls are blocking SQLAlchemy calls: on a worker thread for PostgreSQL, so the event
loop keeps every provider stream moving while a batch is claimed or recorded; inline for SQLite
(see `Dispatcher.db`). Pushes go out through a SendPool: at most PUSH_CONCURRENCY in flight.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from dataclasses import dataclass, field

import sqlalchemy as sa

from notifier import completion, db, devices, events, minutes, outbox
from notifier.config import Settings
from notifier.metrics import DispatcherMetrics
from notifier.model import DeliveryState, Outcome, Platform, Result
from notifier.retry import RetryPolicy
from notifier.sendpool import SendPool

logger = logging.getLogger(__name__)

AUTH_PAUSE = 30.0        # how long a provider that rejected our credentials is left alone
LANES = 2                # batches in flight at once: one lane's DB work overlaps the other's sends
SEND_TIMEOUT = 30.0      # a provider call that takes longer counts as a transient failure
FIRST_BATCH = 50         # each lane's first claim of a pass (then PUSH_BATCH): a quick first push
DB_RETRY_INTERVAL = 0.5  # how often to try again while the database is unreachable
# where an operator fixes credentials a provider refused
SETTINGS_PREFIX = {Platform.APNS: "APNS", Platform.FCM: "FCM", Platform.WEBPUSH: "VAPID"}
DEVICE_DISABLED = "device.disabled"  # the webhook event of a device whose provider said its token is dead


def short(token: str) -> str:
    """A push token fit for a log line."""
    return token[:8] + "…"


@dataclass
class Tally:
    """What one drain did, for logs and tests."""

    claimed: int = 0
    by_outcome: dict = field(default_factory=dict)

    def add(self, outcome: Outcome) -> None:
        self.by_outcome[outcome.value] = self.by_outcome.get(outcome.value, 0) + 1


class Dispatcher:
    """Claims due work and sends it. `now` comes from `clock`, so tests can drive time."""

    def __init__(self, settings: Settings, engine, providers: dict, metrics: DispatcherMetrics | None = None,
                 clock=time.time, owner: str | None = None):
        self.settings = settings
        self.engine = engine
        self.writer = db.writer(engine)
        self.providers = providers
        self.metrics = metrics
        self.clock = clock
        self.owner = owner or f"{settings.push_host_id}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.policy = RetryPolicy.from_settings(settings)
        self.paused_until: dict[Platform, float] = {}
        self.stopping = False
        self._pool = SendPool(settings.push_concurrency, self._send_one, SEND_TIMEOUT, self._send_timed_out)
        self._db_inline = engine.dialect.name == "sqlite"
        # deliveries leased to us: in flight (the heartbeat renews these), or lost before they were
        # sent or recorded (the database failed in between: released at the next pass)
        self.in_flight: set[int] = set()
        self._lost: set[int] = set()
        # set when a transaction of ours wrote webhook events, so the sender looks at once
        self.events_written = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def db(self, call, *args):
        """Run a blocking database call of the send path.

        PostgreSQL: on a worker thread, so the event loop keeps the provider streams moving while
        the call waits on the network. SQLite: right here, on the loop's thread. SQLite's work is
        CPU under the GIL, and each row it steps releases and re-takes the GIL: on a worker thread,
        against a busy event loop, a 1,000-row claim held SQLite's only write lock for 250 ms on
        average (850 ms at worst), and every POST waited behind it. Inline it holds it for a few ms.
        """
        if self._db_inline:
            return call(*args)
        return await asyncio.to_thread(call, *args)

    # ------------------------------------------------------------ one pass

    async def drain(self) -> Tally:
        """Expand pending jobs, then send due deliveries until none is left. Returns what was done."""
        tally = Tally()
        self._loop = asyncio.get_running_loop()
        if self._lost:  # nothing of ours is in flight between passes: give lost claims back
            lost = set(self._lost)
            await self.db(self._release, lost)
            self._lost -= lost
        size = min(FIRST_BATCH, self.settings.push_batch)  # small first: the first pushes leave at once
        first = await self.db(self._claim, size)
        if not first:
            return tally
        lanes = [self._lane(tally, first, size)]
        if len(first) == size:  # more is due: more lanes, so one's database work overlaps another's sends
            lanes += [self._lane(tally, None, size) for _ in range(LANES - 1)]
        # let every lane end (a batch in flight is recorded) before reporting a failure of any
        try:
            outcomes = await asyncio.gather(*lanes, return_exceptions=True)
        finally:
            self._pool.cancel()  # nothing is left to send unless the drain itself was cancelled
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return tally

    async def _lane(self, tally: Tally, claimed: list | None, size: int) -> None:
        """Send batch after batch. A batch smaller than asked for means nothing else was due when it
        was claimed: the lane ends after it (work that arrives later nudges the dispatcher), instead of
        spending one more write transaction on an empty claim."""
        while True:
            if claimed is None:
                if self.stopping:
                    return
                claimed = await self.db(self._claim, size)
                if not claimed:
                    return
            tally.claimed += len(claimed)
            full = len(claimed) == size
            ids = {c.push.delivery_id for c in claimed}
            message_ids = {c.push.message_id for c in claimed}
            try:
                updates, dead = await self._send_batch(claimed, tally)
                await self._record_until_done(updates, dead, message_ids)
            except BaseException:
                self._lost |= ids
                raise
            finally:
                self.in_flight -= ids
            if not full:
                return
            claimed, size = None, self.settings.push_batch

    def _claim(self, size: int) -> list[outbox.Claimed]:
        """One write transaction (lease what is due, then expand new deliveries already leased to
        us, a batch in all), then a read to load it. Expanding no more than is claimed keeps the
        outbox lazy: a message's recipients become rows about as fast as they are sent, by
        whichever dispatcher is free."""
        now = self.clock()
        with self.writer.begin() as conn:
            claim = outbox.claim_batch(conn, self.owner, now, self.settings.push_lease, size)
            # a message with no recipient device is complete as soon as it is expanded
            completed = completion.complete_fanouts(conn, claim.expanded, now, self.settings.webhooks_enabled)
        self._events_written(len(completed))
        ids = claim.ids
        if not ids:
            return []
        self.in_flight.update(ids)
        try:
            with self.engine.connect() as conn:
                return outbox.load_claimed(conn, ids)
        except BaseException:
            self.in_flight.difference_update(ids)
            self._lost.update(ids)
            raise

    async def _record_until_done(self, updates: list[outbox.Update], dead_devices: list[tuple[int, str | None]],
                                 message_ids: set[int]) -> None:
        """Record a sent batch, waiting out a database outage: giving up would re-send the whole
        batch once the leases expire. Past the lease, another dispatcher may have taken the rows
        (at least once), so stop trying then."""
        await self.persist("a batch", self.settings.push_lease, self._record, updates, dead_devices, message_ids)

    async def persist(self, what: str, within: float, call, *args) -> None:
        """Run the write `call(*args)` (as db() does), waiting out a database outage for `within`
        seconds (a lease's length: after that another dispatcher may redo the work), then raise."""
        deadline = time.monotonic() + within
        while True:
            try:
                await self.db(call, *args)
                return
            except sa.exc.DBAPIError as exc:
                if time.monotonic() > deadline:
                    raise
                logger.warning("notifier: database unavailable while recording %s (%s); retrying",
                               what, type(exc.orig).__name__)
                await asyncio.sleep(DB_RETRY_INTERVAL)

    def _record(self, updates: list[outbox.Update], dead_devices: list[tuple[int, str | None]],
                message_ids: set[int]) -> None:
        """Record a batch's outcomes, disable the dead devices, complete the fan-outs this batch
        finished; with webhooks on, their events in the same transaction."""
        now = self.clock()
        with_events = self.settings.webhooks_enabled
        with self.writer.begin() as conn:
            written = outbox.record_updates(conn, self.owner, updates, self.settings.push_host_id)
            if written:  # the dashboard's per-minute counters, committed with the outcomes they count
                minutes.count_outcomes(conn, [u.delivery_id for u in updates], now)
            disabled = devices.disable_dead_devices(conn, dead_devices)
            if with_events:
                for device in disabled:
                    events.add_event(conn, DEVICE_DISABLED, device, now)
            completed = completion.complete_fanouts(conn, message_ids, now, with_events)
        self._events_written(len(completed) + len(disabled))
        if written < len(updates):
            logger.warning("notifier: %d result(s) not recorded: their lease passed to another dispatcher",
                           len(updates) - written)

    async def _send_batch(self, claimed: list[outbox.Claimed], tally: Tally):
        now = self.clock()
        sends = []
        updates: list[outbox.Update] = []
        for item in claimed:
            push = item.push
            if not item.device_enabled:
                updates.append(outbox.Update(push.delivery_id, DeliveryState.SKIPPED, push.attempts, now,
                                              None, "device_disabled"))
            elif self.paused_until.get(push.platform, 0) > now:
                updates.append(self._postpone(push, self.paused_until[push.platform]))
            else:
                sends.append(push)
        results = await self._pool.run(sends)
        dead: list[tuple[int, str | None]] = []
        now = self.clock()
        for push, result in results:
            tally.add(result.outcome)
            update = self._decide(push, result, now)
            updates.append(update)
            if result.outcome is Outcome.DEAD_TOKEN:
                dead.append((push.device_id, result.reason))
        return updates, dead

    async def _send_one(self, push):
        provider = self.providers[push.platform]
        started = time.perf_counter()
        try:
            result = await provider.send(push)  # past SEND_TIMEOUT, the pool cancels it: _send_timed_out
        except Exception as exc:  # noqa: BLE001 - a provider bug must not lose the batch
            logger.exception("notifier: %s provider raised for device %s", push.platform.value, push.device_id)
            result = Result(Outcome.TRANSIENT, None, type(exc).__name__)
        elapsed = time.perf_counter() - started
        if self.metrics is not None:
            self.metrics.observe(push.platform.value, result.outcome.value,
                                 elapsed if result.status is not None else None)
        return push, result

    def _send_timed_out(self, push):
        """The pool's result for a send cancelled after SEND_TIMEOUT (a provider that forgot its own)."""
        if self.metrics is not None:
            self.metrics.observe(push.platform.value, Outcome.TRANSIENT.value, None)
        return push, Result(Outcome.TRANSIENT, None, "timeout")

    def _decide(self, push, result: Result, now: float) -> outbox.Update:
        """Turn a classified provider answer into the delivery's next state."""
        outcome = result.outcome
        attempts = push.attempts + 1
        if outcome is Outcome.SENT:
            return outbox.Update(push.delivery_id, DeliveryState.SENT, attempts, now, result.status,
                                  result.reason, sent_at=now)
        if outcome is Outcome.SKIPPED:
            return outbox.Update(push.delivery_id, DeliveryState.SKIPPED, push.attempts, now, result.status,
                                  result.reason)
        if outcome in (Outcome.DEAD_TOKEN, Outcome.REJECTED):
            return outbox.Update(push.delivery_id, DeliveryState.FAILED, attempts, now, result.status,
                                  result.reason)
        if outcome is Outcome.AUTH:
            until = now + AUTH_PAUSE
            if self.paused_until.get(push.platform, 0) < until:
                logger.error("notifier: %s rejected OUR credentials (%s %s): pausing it for %.0f s; "
                             "deliveries stay pending. Check the %s_* settings.", push.platform.value,
                             result.status, result.reason, AUTH_PAUSE, SETTINGS_PREFIX[push.platform])
                self.paused_until[push.platform] = until
            return self._postpone(push, until, result)
        # transient
        if self.policy.exhausted(attempts):
            return outbox.Update(push.delivery_id, DeliveryState.FAILED, attempts, now, result.status,
                                  f"{result.reason or 'no answer'} (out of attempts)")
        delay = self.policy.delay_for(attempts, result.retry_after)
        return outbox.Update(push.delivery_id, DeliveryState.PENDING, attempts, now + delay, result.status,
                              result.reason)

    @staticmethod
    def _postpone(push, until: float, result: Result | None = None) -> outbox.Update:
        """Keep the delivery pending, attempts unchanged (it was not the device's fault)."""
        return outbox.Update(push.delivery_id, DeliveryState.PENDING, push.attempts, until,
                              result.status if result else None, result.reason if result else "provider_paused")

    def _events_written(self, count: int) -> None:
        """Wake the webhook sender (from the loop's thread or a worker thread)."""
        if count and self.settings.webhooks_enabled and self._loop is not None:
            self._loop.call_soon_threadsafe(self.events_written.set)

    def next_wakeup(self) -> float | None:
        """Epoch time at which there is next something to do (a push, or with webhooks on an event),
        None when there is nothing left to do."""
        with self.engine.connect() as conn:
            times = [outbox.next_wakeup(conn, self.clock())]
            if self.settings.webhooks_enabled:
                times.append(events.next_due(conn))
        times = [t for t in times if t is not None]
        return min(times) if times else None

    def release(self) -> None:
        """Give back every lease we hold (on a clean stop), so others can take the rows at once."""
        self._release(self.in_flight | self._lost)

    def _release(self, ids: set[int]) -> None:
        if ids:
            with self.writer.begin() as conn:
                outbox.release_leases(conn, self.owner, ids)
