"""Result webhooks: the events of notifier.events POSTed to WEBHOOK_URL, signed per Standard Webhooks.

Sent by the dispatcher, on its event loop, beside the pushes and never in their way: one aiohttp
session kept open, at most WEBHOOK_CONCURRENCY requests at once, 10 s each. An event is leased
while it is being sent (several dispatchers share the backlog), and every attempt is recorded.
A 2xx ends the event; 410 Gone ends it at once (the receiver asked us to stop); anything else,
a timeout or a connection error is retried with exponential back-off and full jitter
(WEBHOOK_RETRY_BASE, default 10 s, doubling to 6 h; honouring Retry-After) until
WEBHOOK_MAX_ATTEMPTS (default 18: the 17 waits add up to about 21 h on average, 42 h at most). Redirects are not followed. The signature is the `standardwebhooks` package's: the
body, the webhook-id and the attempt's timestamp under HMAC-SHA256 with the secret's bytes.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Awaitable, Callable

import sqlalchemy as sa
from standardwebhooks import Webhook

from notifier import db, events
from notifier.config import Settings
from notifier.dispatcher import DB_RETRY_INTERVAL
from notifier.retry import RetryPolicy, parse_retry_after

if TYPE_CHECKING:  # imported for real when the sender starts (see WebhookSender.run)
    import aiohttp

logger = logging.getLogger(__name__)

TIMEOUT = 10.0           # a receiver that has not answered by then is retried later
LEASE = 60.0             # an event's lease while it is being sent: well over TIMEOUT
RETRY_CAP = 6 * 3600.0   # the back-off doubles from WEBHOOK_RETRY_BASE up to six hours
POLL_INTERVAL = 1.0      # look for due events at least this often
MIN_PAUSE = 0.01         # the shortest wait between two looks
USER_AGENT = "chat-notifier-webhooks"


@dataclass(frozen=True)
class Answer:
    """What one attempt got: an HTTP status, or no answer and why."""

    status: int | None
    error: str | None = None
    retry_after: float | None = None


def outcome_of(answer: Answer) -> str:
    """`delivered` (2xx), `gone` (410: stop), or `retry` (anything else, or no answer)."""
    if answer.status is not None and 200 <= answer.status < 300:
        return "delivered"
    if answer.status == 410:
        return "gone"
    return "retry"


def signed_headers(signer: Webhook, webhook_id: str, body: str, now: float) -> dict:
    """The Standard Webhooks headers of one attempt: the id, this attempt's timestamp, the signature."""
    timestamp = int(now)
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signer.sign(webhook_id, datetime.fromtimestamp(timestamp, timezone.utc), body),
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
    }


def _retry_after_within_cap(value: str | None) -> float | None:
    """Retry-After in seconds, ignored beyond the back-off's cap (a receiver cannot park an event
    for longer than the retries last)."""
    seconds = parse_retry_after(value)
    return seconds if seconds is not None and seconds <= RETRY_CAP else None


class WebhookSender:
    """Sends due events until cancelled. `db` runs a blocking database call the way the dispatcher
    runs its own (inline on SQLite, on a thread on PostgreSQL); `wake` is set when events are written."""

    def __init__(self, settings: Settings, engine, run_db: Callable[..., Awaitable],
                 persist: Callable[..., Awaitable], owner: str, wake: asyncio.Event,
                 observe: Callable[[str], None] | None = None, clock: Callable[[], float] = time.time):
        self.url = settings.webhook_url
        self.signer = Webhook(settings.webhook_secret)
        self.policy = RetryPolicy(base=settings.webhook_retry_base, cap=max(RETRY_CAP, settings.webhook_retry_base), max_attempts=settings.webhook_max_attempts)
        self.concurrency = settings.webhook_concurrency
        self.engine = engine
        self.writer = db.writer(engine)
        self.db = run_db
        self.persist = persist
        self.owner = owner
        self.wake = wake
        self.observe = observe
        self.clock = clock
        self.in_flight: set[asyncio.Task] = set()
        self._client_error: type[Exception] = OSError  # aiohttp.ClientError once run() has imported it

    async def run(self) -> None:
        """Claim due events and send them, forever (the runner cancels it). In-flight attempts are
        cancelled with it; their leases are released by the runner, and the events sent again."""
        # imported here, not at the top: aiohttp costs 0.2-0.25 s to import, which every uWSGI worker
        # start and reload would pay (they import the runner so a forked dispatcher starts warm),
        # while only a dispatcher with webhooks on needs it, and its first event is not in a hurry
        import aiohttp

        self._client_error = aiohttp.ClientError
        timeout = aiohttp.ClientTimeout(total=TIMEOUT)
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            try:
                while True:
                    self.wake.clear()
                    delay = await self._pump(session)
                    # always a real wait: on SQLite the database calls run inline and never yield,
                    # so a loop that did not wait here would starve the pushes on the same loop
                    try:
                        await asyncio.wait_for(self.wake.wait(), max(delay, MIN_PAUSE))
                    except asyncio.TimeoutError:
                        pass
            finally:
                for task in self.in_flight:
                    task.cancel()
                await asyncio.gather(*self.in_flight, return_exceptions=True)

    async def _pump(self, session: aiohttp.ClientSession) -> float:
        """Start attempts for the due events that fit; returns how long to wait before looking again."""
        free = self.concurrency - len(self.in_flight)
        if free <= 0:
            return POLL_INTERVAL  # every slot busy: a finished attempt sets `wake`
        try:
            claimed = await self.db(self._claim, free)
            for event in claimed:
                task = asyncio.create_task(self._attempt(session, event))
                self.in_flight.add(task)
                task.add_done_callback(self._done)
            if len(claimed) == free:
                return POLL_INTERVAL  # more may be due: looked at again as soon as a slot frees
            due = await self.db(self._next_due)
        except sa.exc.DBAPIError as exc:
            logger.warning("webhooks: database unavailable (%s); retrying", type(exc.orig).__name__)
            return DB_RETRY_INTERVAL
        if due is None:
            return POLL_INTERVAL
        return max(0.0, min(POLL_INTERVAL, due - self.clock()))

    def _done(self, task: asyncio.Task) -> None:
        self.in_flight.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("webhooks: an attempt failed unexpectedly", exc_info=task.exception())
        self.wake.set()  # a slot is free

    def _claim(self, limit: int) -> list[events.ClaimedEvent]:
        with self.writer.begin() as conn:
            return events.claim_events(conn, self.owner, self.clock(), LEASE, limit)

    def _next_due(self) -> float | None:
        with self.engine.connect() as conn:
            return events.next_due(conn)

    async def _attempt(self, session: aiohttp.ClientSession, event: events.ClaimedEvent) -> None:
        started = time.monotonic()
        answer = await self._post(session, event)
        seconds = time.monotonic() - started
        outcome = outcome_of(answer)
        attempts = event.attempts + 1
        now = self.clock()
        next_at = now
        if outcome == "delivered":
            state = events.DELIVERED
        elif outcome == "gone":
            state = events.FAILED
            logger.warning("webhooks: event %s (%s): the receiver answered 410 Gone; not sending it again",
                           event.webhook_id, event.type)
        elif self.policy.exhausted(attempts):
            state = events.FAILED
            logger.error("webhooks: event %s (%s): giving up after %d attempts (last: %s)", event.webhook_id,
                         event.type, attempts, answer.status or answer.error)
        else:
            state = events.PENDING
            next_at = now + self.policy.delay_for(attempts, answer.retry_after)
            logger.warning("webhooks: event %s (%s) attempt %d: %s; next attempt in %.0f s", event.webhook_id,
                           event.type, attempts, answer.status or answer.error, next_at - now)
        if self.observe is not None:
            self.observe(outcome if outcome != "retry" or state == events.PENDING else "gave_up")
        # waiting out a database outage for as long as the lease lasts (after that another
        # dispatcher may send the event again: at least once)
        await self.persist("a webhook attempt", LEASE, self._write, event.id, now, seconds, answer, state, next_at)

    async def _post(self, session: aiohttp.ClientSession, event: events.ClaimedEvent) -> Answer:
        headers = signed_headers(self.signer, event.webhook_id, event.body, self.clock())
        try:
            async with session.post(self.url, data=event.body.encode(), headers=headers,
                                    allow_redirects=False) as response:
                await response.read()  # the whole answer, so the connection is reused
                return Answer(response.status, None, _retry_after_within_cap(response.headers.get("Retry-After")))
        except asyncio.TimeoutError:
            return Answer(None, "timeout")
        except self._client_error as exc:
            # the class only: some aiohttp messages quote the URL, which may hold credentials
            return Answer(None, type(exc).__name__)

    def _write(self, event_id: int, now: float, seconds: float, answer: Answer, state: str,
               next_at: float) -> None:
        with self.writer.begin() as conn:
            events.record_attempt(conn, self.owner, event_id, now, round(seconds, 4), answer.status,
                                  answer.error, state, next_at)
