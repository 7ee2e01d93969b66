"""APNs provider: aioapns 4.0 over HTTP/2, with its stream accounting fixed by subclassing.

Why subclass aioapns (measured, see the team's PROVIDERS.md notes, and read in
aioapns/connection.py):

* Apple allows ONE concurrent stream on a new token-auth connection until a
  request with a valid provider token is accepted, then raises
  MAX_CONCURRENT_STREAMS with a SETTINGS frame (and may lower it to 1 again after
  a rejected notification). aioapns tracks that limit with a "dynamic bounded
  semaphore" whose arithmetic goes wrong when the limit changes while streams are
  in flight: its counter is cut to 1, then "raised" by release() calls that are
  clamped to the old bound, leaving 2-3 usable slots out of 1000. Its pool then
  opens up to max_connections connections and, when all are "busy", polls every
  10 ms, logging "Pool is completely busy..." on each pass.
  -> _APNsProtocol keeps an explicit count: in_flight streams vs the peer's
     current MAX_CONCURRENT_STREAMS (from RemoteSettingsChanged), starting at 1
     as Apple documents; _PoolMixin waits on futures woken when a slot frees or
     the limit rises (no polling), picks the connection with the most free
     slots, and does not open another connection while one is still waiting for
     its first answer (it is about to be raised to ~1000 streams).
* aioapns's pool retries inside send_notification with 1 s sleeps (connection
  errors, flow-control errors), even with max_connection_attempts=1, and waits
  without bound for a free connection. -> one attempt, no sleep, bounded by the
  request timeout; the dispatcher owns retries.
* aioapns never acknowledges received DATA (the connection's receive window
  shrinks with every error body until the server can no longer answer), raises
  FlowControlError instead of waiting for the send window when many requests
  are written at once, ignores RST_STREAM (the slot is never released), keys
  pending requests by apns-id (our apns-id is deterministic, so a duplicate would
  collide) and leaks one dict entry per successful request. -> requests are kept
  per stream id; DATA is acknowledged; bodies wait for WINDOW_UPDATE; resets
  resolve the request.
* aioapns writes each request separately and re-arms a timer per write. ->
  writes are coalesced once per event-loop iteration; one idle timer and one
  timeout sweep per connection.
* CPU per request (profiled at 500 in flight, ~530 us per send before): h2
  counts open streams by scanning every stream on each new one (~230 us), and
  Huffman-codes every header in pure Python, the ~200-byte provider JWT
  included because h2 marks `authorization` never-indexed (~190 us). -> the
  H2Connection takes the open-stream count from our exact counter (pruning
  closed streams with h2's own scan once per 1024 streams); headers are sent as
  plain literals, the constant ones (JWT included: it is a constant for 30
  minutes and no attacker-chosen header shares the compression context) indexed
  once per connection, the per-request ones (:path, apns-id, ...) not indexed so
  they do not evict the JWT from the HPACK table.
* aioapns re-serialises the payload with spaces; we send the exact bytes that
  notifier.payload sized to fit 4096 bytes.
* aioapns signs one provider JWT per connection. -> one JWT per provider,
  shared by all connections and reused for 30 minutes (Apple: refresh no more
  often than every 20 minutes, no less than every 60).

What is kept from aioapns: its connection pools (TLS set-up, certificate auth,
connect), its protocol class hierarchy and its APNS_SERVER/APNS_PORT class
attributes (the endpoint override is a subclass with other values, no global is
touched), its JWT provider, its H2Connection set-up.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import ssl
import time
from collections import deque
from functools import lru_cache, partial
from pathlib import Path
from urllib.parse import quote

from aioapns.connection import (
    APNsCertConnectionPool,
    APNsKeyConnectionPool,
    APNsTLSClientProtocol,
    JWTAuthorizationHeaderProvider,
)
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import H2Error
from hpack import Encoder, NeverIndexedHeaderTuple

from notifier.classify import (
    REASON_CONNECTION,
    REASON_GOAWAY,
    REASON_STREAM_RESET,
    REASON_TIMEOUT,
    classify,
)
from notifier.config import ConfigError, Settings
from notifier.model import Outcome, Platform, Push, Result
from notifier.payload import apns_collapse_id, apns_id, apns_payload
from notifier.providers.base import shorten_token, tls_context

logger = logging.getLogger(__name__)

PRODUCTION_HOST = "api.push.apple.com"
SANDBOX_HOST = "api.development.push.apple.com"
DEFAULT_MAX_CONNECTIONS = 4
DEFAULT_REQUEST_TIMEOUT = 10.0
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_MAX_STREAMS = 1000       # our own ceiling per connection, whatever the server allows
DEFAULT_IDLE_TIMEOUT = 600.0     # close a connection after this long without traffic
FLUSH_EVERY = 32                 # write to the socket after this many new streams, or at the end of the loop pass
_MAX_BODY = 64 * 1024            # an APNs error body is ~100 bytes; never buffer more than this
_LAST_STREAM_ID = 2**31 - 1
_RETIRE_AT_STREAM_ID = _LAST_STREAM_ID - 20_000  # open a fresh connection well before ids run out
_JWT_MIN_AGE = 20 * 60           # Apple: do not refresh the provider token more often than this
_connection_ids = itertools.count(1)


class _Answer:
    """What came back for one request: HTTP status (None: no answer), reason, Retry-After."""

    __slots__ = ("status", "reason", "retry_after")

    def __init__(self, status: int | None, reason: str | None, retry_after: float | None = None):
        self.status = status
        self.reason = reason
        self.retry_after = retry_after


class _Request:
    """One notification as the protocol writes it."""

    __slots__ = ("token", "topic", "apns_id", "collapse_id", "expiration", "payload")

    def __init__(self, token: str, topic: str, apns_id: str, collapse_id: str,
                 expiration: int, payload: bytes):
        self.token = token
        self.topic = topic
        self.apns_id = apns_id
        self.collapse_id = collapse_id
        self.expiration = expiration
        self.payload = payload


class _Stream:
    """A request in flight on one HTTP/2 stream."""

    __slots__ = ("future", "deadline", "sent_at", "unsent", "status", "retry_after", "body")

    def __init__(self, future: asyncio.Future, now: float, timeout: float, payload: bytes):
        self.future = future
        self.sent_at = now
        self.deadline = now + timeout
        self.unsent = payload          # body bytes still waiting for flow-control window
        self.status: int | None = None
        self.retry_after: float | None = None
        self.body = b""


class _SharedJWT(JWTAuthorizationHeaderProvider):
    """aioapns's provider-token signer, shared by every connection of a provider.

    Same claims and TTL as aioapns (iss=team, iat, kid header, ES256, 30 minutes),
    plus ``invalidate()`` for ExpiredProviderToken, which respects Apple's 20-minute
    minimum between refreshes.
    """

    def __init__(self, key: str, key_id: str, team_id: str) -> None:
        super().__init__(key=key, key_id=key_id, team_id=team_id)
        self._header: str | None = None
        self._issued_at = 0.0

    def get_header(self) -> str:
        now = time.time()
        if self._header is None or now - self._issued_at >= self.TOKEN_TTL:
            import jwt  # aioapns depends on PyJWT
            self._issued_at = int(now)
            token = jwt.encode(payload={"iss": self.team_id, "iat": self._issued_at},
                               key=self.key, algorithm="ES256", headers={"kid": self.key_id})
            self._header = f"bearer {token}"
        return self._header

    def invalidate(self) -> None:
        if time.time() - self._issued_at >= _JWT_MIN_AGE:
            self._header = None


class _PlainEncoder(Encoder):
    """HPACK without Huffman coding: hpack's pure-Python Huffman coder costs ~40 us per value."""

    def encode(self, headers, huffman: bool = True) -> bytes:
        return super().encode(headers, huffman=False)


class _CountedH2Connection(H2Connection):
    """h2's connection, told the number of open outbound streams instead of scanning for it.

    h2 recounts open streams (iterating over all of them) each time a stream is
    opened; the protocol keeps the exact count (``counted_open``: streams not yet
    ended, reset or timed out). h2's own scan still runs once per 1024 new
    streams, because it is also what forgets closed streams.
    """

    _PRUNE_EVERY = 1024

    def __init__(self) -> None:
        # headers are built by us, already lower-case, validated bytes: skip h2's per-header
        # normalisation (it would also force `authorization` out of the HPACK table)
        super().__init__(H2Configuration(client_side=True, header_encoding=None,
                                         validate_outbound_headers=False,
                                         normalize_outbound_headers=False,
                                         # we read :status, retry-after and the body; h2's checks of
                                         # every response header's syntax cost ~5% of a send
                                         validate_inbound_headers=False))
        self.encoder = _PlainEncoder()
        self.counted_open = 0
        self._until_prune = self._PRUNE_EVERY

    @property
    def open_outbound_streams(self) -> int:
        self._until_prune -= 1
        if self._until_prune <= 0:
            self._until_prune = self._PRUNE_EVERY
            return H2Connection.open_outbound_streams.fget(self)
        return self.counted_open


class _APNsProtocol(APNsTLSClientProtocol):
    """aioapns's client protocol with correct stream accounting (see the module docstring).

    The pool builds subclasses of this with APNS_SERVER / APNS_PORT set to the
    endpoint, the way aioapns's own Production/Development classes do.
    """

    APNS_SERVER = PRODUCTION_HOST
    APNS_PORT = 443
    INACTIVITY_TIME = DEFAULT_IDLE_TIMEOUT
    MAX_STREAMS = DEFAULT_MAX_STREAMS

    def __init__(self, apns_topic, loop, on_connection_lost, auth_provider=None, *,
                 pool: "_PoolMixin", request_timeout: float) -> None:
        super().__init__(apns_topic, loop, on_connection_lost, auth_provider)
        self.conn = _CountedH2Connection()  # replaces aioapns's H2Connection() before any use
        self._host_header = (b"host", self.APNS_SERVER.encode("ascii"))
        self.pool = pool
        self.request_timeout = request_timeout
        self.connection_id = next(_connection_ids)
        self.bound = 1                 # Apple: one stream on a new connection until SETTINGS say more
        self.in_flight = 0
        self.answered = False          # has any response come back on this connection
        self.closing = False           # no new streams (GOAWAY, retired, closed)
        self.streams: dict[int, _Stream] = {}   # insertion order == stream id order == deadline order
        self.unsent: deque[int] = deque()       # streams whose body waits for window
        self.last_received = 0.0
        self.last_activity = self.loop.time()
        self.closed = self.loop.create_future()
        self._flush_scheduled = False
        self._unflushed = 0            # streams written to h2 since the last flush to the socket
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._ping_sent_at: float | None = None
        self._ping_timeout = min(5.0, request_timeout)

    def __repr__(self) -> str:
        return f"<APNs connection {self.connection_id} to {self.APNS_SERVER}:{self.APNS_PORT}>"

    # --- capacity, as the pool sees it -------------------------------------

    @property
    def free(self) -> int:
        """Streams this connection can open now."""
        return 0 if self.closing else self.bound - self.in_flight

    @property
    def is_busy(self) -> bool:
        return self.free <= 0

    @property
    def warming(self) -> bool:
        """Open, but no answer yet: its stream limit is about to be raised."""
        return not self.answered and not self.closing

    # --- aioapns hooks replaced -----------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.conn.initiate_connection()
        self.flush()
        self.inactivity_timer = self.loop.call_later(self.INACTIVITY_TIME, self._idle_check)

    def refresh_inactivity_timer(self) -> None:
        # aioapns re-creates a TimerHandle on every write; a timestamp is enough
        self.last_activity = self.loop.time()

    def flush(self) -> None:
        self._flush_scheduled = False
        self._unflushed = 0
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        data = self.conn.data_to_send()
        if data:
            transport.write(data)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)

    async def send_notification(self, request):  # pragma: no cover - aioapns API, unused
        raise NotImplementedError("use send()")

    # --- sending --------------------------------------------------------------

    def send(self, request: _Request) -> tuple[int, asyncio.Future]:
        """Open a stream for ``request`` (the caller saw ``free > 0``); return (stream id, future of _Answer)."""
        conn = self.conn
        stream_id = conn.get_next_available_stream_id()
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"https"),
            _unindexed(b":path", b"/3/device/" + quote(request.token, safe="").encode("ascii")),
            self._host_header,
            _unindexed(b"apns-id", request.apns_id.encode("ascii")),
            (b"apns-topic", request.topic.encode("ascii")),
            (b"apns-push-type", b"alert"),
            (b"apns-priority", b"10"),
            _unindexed(b"apns-expiration", str(request.expiration).encode("ascii")),
            _unindexed(b"apns-collapse-id", request.collapse_id.encode("ascii")),
        ]
        if self.auth_provider is not None:
            headers.append((b"authorization", self.auth_provider.get_header().encode("ascii")))
        conn.counted_open = self.in_flight
        conn.send_headers(stream_id, headers)
        now = self.loop.time()
        self.last_activity = now
        future = self.loop.create_future()
        stream = _Stream(future, now, self.request_timeout, request.payload)
        self.streams[stream_id] = stream
        self.in_flight += 1
        if not self._send_body(stream_id, stream):
            self.unsent.append(stream_id)
        self._unflushed += 1
        if self._unflushed >= FLUSH_EVERY:
            self.flush()  # do not let the first streams of a big batch wait for the whole batch
        else:
            self._schedule_flush()
        if self._sweep_handle is None:
            self._sweep_handle = self.loop.call_later(self._sweep_interval(), self._sweep)
        if stream_id >= _RETIRE_AT_STREAM_ID:
            self._retire("stream ids nearly exhausted")
        return stream_id, future

    def _send_body(self, stream_id: int, stream: _Stream) -> bool:
        """Send as much of the body as the flow-control window allows; True when all is sent."""
        conn = self.conn
        data = stream.unsent
        while data:
            size = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size, len(data))
            if size <= 0:
                break
            chunk, data = data[:size], data[size:]
            conn.send_data(stream_id, chunk, end_stream=not data)
        stream.unsent = data
        return not data

    def _send_unsent(self) -> None:
        while self.unsent:
            stream_id = self.unsent[0]
            stream = self.streams.get(stream_id)
            if stream is not None and stream.unsent:
                try:
                    if not self._send_body(stream_id, stream):
                        return  # window exhausted: wait for the next WINDOW_UPDATE
                except H2Error:
                    self._finish(stream_id, _Answer(None, REASON_STREAM_RESET), reset=True)
            self.unsent.popleft()

    # --- receiving ------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        now = self.loop.time()
        self.last_received = self.last_activity = now
        try:
            events = self.conn.receive_data(data)
        except H2Error as exc:
            logger.warning("APNs: protocol error on %r, closing it: %s", self, type(exc).__name__)
            self.flush()
            self.close()
            return
        window_opened = False
        for event in events:
            kind = type(event)
            if kind is ResponseReceived:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    for name, value in event.headers:
                        if name == b":status":
                            stream.status = int(value)
                        elif name == b"retry-after":
                            stream.retry_after = _parse_retry_after(value)
            elif kind is DataReceived:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                stream = self.streams.get(event.stream_id)
                if stream is not None and len(stream.body) < _MAX_BODY:
                    stream.body += event.data
            elif kind is StreamEnded:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    self._finish(event.stream_id, _Answer(stream.status, _reason(stream.body),
                                                          stream.retry_after),
                                 reset=bool(stream.unsent))
            elif kind is WindowUpdated:
                window_opened = True
            elif kind is RemoteSettingsChanged:
                self._on_settings(event.changed_settings)
                window_opened = True
            elif kind is StreamReset:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    self._finish(event.stream_id, _Answer(stream.status, REASON_STREAM_RESET))
            elif kind is ConnectionTerminated:
                self._on_goaway(event)
                break  # h2 delivers nothing after a GOAWAY
        if window_opened and self.unsent:
            self._send_unsent()
        self.flush()
        if self.closing and not self.streams:
            self.close()

    def _on_settings(self, changed) -> None:
        limit = min(self.conn.remote_settings.max_concurrent_streams, self.MAX_STREAMS)
        if limit != self.bound:
            logger.debug("APNs: %r allows %d concurrent streams (was %d)", self, limit, self.bound)
            raised = limit - self.bound
            self.bound = limit
            if raised > 0:
                self.pool._wake(raised)

    def _on_goaway(self, event: ConnectionTerminated) -> None:
        reason = _reason(event.additional_data or b"")
        log = logger.info if event.error_code in (ErrorCodes.NO_ERROR, 0) else logger.warning
        log("APNs: GOAWAY on %r: code=%s reason=%s last_stream_id=%s in_flight=%d", self,
            event.error_code, reason, event.last_stream_id, self.in_flight)
        self._retire("GOAWAY")
        # Streams above last_stream_id were not processed. Those below may still be answered
        # by the server, but h2 refuses every frame after a GOAWAY (its connection state is
        # CLOSED), so no answer could be read: all are transient now. A re-send of one that
        # Apple did deliver carries the same apns-id / collapse-id and replaces it on the phone.
        for stream_id in list(self.streams):
            self._finish(stream_id, _Answer(None, REASON_GOAWAY))

    def _finish(self, stream_id: int, answer: _Answer, reset: bool = False) -> None:
        """Resolve one stream's request and free its slot (exactly once per stream)."""
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        self.in_flight -= 1
        if reset:
            try:
                self.conn.reset_stream(stream_id, ErrorCodes.CANCEL)
            except H2Error:
                pass
            self._schedule_flush()
        if answer.status is not None and not self.answered:
            self.answered = True
            self.pool._wake_all()
        if not stream.future.done():
            stream.future.set_result(answer)
        self.pool._wake(1)

    def abandon(self, stream_id: int) -> None:
        """The caller gave up on a stream (cancelled): reset it and free the slot."""
        self._finish(stream_id, _Answer(None, REASON_TIMEOUT), reset=True)
        if self.closing and not self.streams:
            self.close()

    # --- timers -----------------------------------------------------------------

    def _sweep_interval(self) -> float:
        return max(0.05, min(1.0, self.request_timeout / 4))

    def _sweep(self) -> None:
        """Time out requests past their deadline (oldest first: the dict is in deadline order)."""
        self._sweep_handle = None
        now = self.loop.time()
        expired = []
        for stream_id, stream in self.streams.items():
            if stream.deadline > now:
                break
            expired.append((stream_id, stream.sent_at))
        if expired:
            silent = self.last_received < expired[0][1]
            for stream_id, _ in expired:
                self._finish(stream_id, _Answer(None, REASON_TIMEOUT), reset=True)
            if silent and self._ping_sent_at is None and not self.closing:
                # nothing at all came back since the oldest of them was sent: is the
                # connection dead (a silent network drop) or is the server just slow?
                try:
                    self.conn.ping(b"apns-liv")
                    self._ping_sent_at = now
                    self.flush()
                except H2Error:
                    pass
            if self.closing and not self.streams:
                self.close()
                return
        if self._ping_sent_at is not None:
            if self.last_received >= self._ping_sent_at:
                self._ping_sent_at = None  # something came back: alive
            elif now - self._ping_sent_at >= self._ping_timeout:
                logger.warning("APNs: no answer on %r, not even to a PING, for %.1f s: dropping it",
                               self, now - self.last_received if self.last_received else now - self._ping_sent_at)
                self._retire("unresponsive")
                self.close(abort=True)
                return
        if self.streams or self._ping_sent_at is not None:
            self._sweep_handle = self.loop.call_later(self._sweep_interval(), self._sweep)

    def _idle_check(self) -> None:
        self.inactivity_timer = None
        if self.closing:
            return
        idle_for = self.loop.time() - self.last_activity
        if idle_for >= self.INACTIVITY_TIME and not self.streams:
            logger.debug("APNs: closing idle %r", self)
            self._retire("idle")
            self.close()
            return
        delay = max(1.0, self.INACTIVITY_TIME - idle_for)
        self.inactivity_timer = self.loop.call_later(delay, self._idle_check)

    # --- closing ----------------------------------------------------------------

    def _retire(self, why: str) -> None:
        """Stop opening streams on this connection; the pool forgets it."""
        if not self.closing:
            logger.debug("APNs: retiring %r (%s)", self, why)
            self.closing = True
            self.pool.discard_connection(self)
            self.pool._wake_all()

    def _fail_open_streams(self) -> None:
        """Cancel the timers and answer every open stream with a connection error (retried later)."""
        for handle in (self.inactivity_timer, self._sweep_handle):
            if handle is not None:
                handle.cancel()
        self.inactivity_timer = self._sweep_handle = None
        for stream_id in list(self.streams):
            self._finish(stream_id, _Answer(None, REASON_CONNECTION))

    def close(self, abort: bool = False) -> None:
        self._retire("closed")
        self._fail_open_streams()
        if self.transport is not None and not self.transport.is_closing():
            if abort:
                self.transport.abort()
            else:
                try:
                    self.conn.close_connection()
                    self.flush()
                except H2Error:
                    pass
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        logger.debug("APNs: %r lost: %s", self, exc)
        self._retire("lost")
        self._fail_open_streams()
        self.pool.live.discard(self)
        if not self.closed.done():
            self.closed.set_result(None)


def _unindexed(name: bytes, value: bytes) -> NeverIndexedHeaderTuple:
    """A header whose value changes per request: kept out of the HPACK dynamic table."""
    return NeverIndexedHeaderTuple(name, value)


class _ConnectFailed(Exception):
    """Could not open a connection to APNs."""


class _PoolMixin:
    """Replaces aioapns's pool scheduling: pick, open, wait (woken, never polling), send once."""

    def _init_scheduler(self, protocol_class: type, request_timeout: float,
                        connect_timeout: float, auth_provider) -> None:
        # aioapns chose a protocol class from use_sandbox; ours carries the endpoint
        self.protocol_class = protocol_class
        self.auth_provider = auth_provider
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.loop = asyncio.get_running_loop()
        self._waiters: deque[asyncio.Future] = deque()
        self._opening = False
        self._closed = False
        self.connections_opened = 0
        self.live: set[_APNsProtocol] = set()  # opened and not yet lost (retired ones included)

    # --- aioapns API ------------------------------------------------------------

    async def create_connection(self) -> _APNsProtocol:
        factory = partial(self.protocol_class, self.apns_topic, self.loop, self.discard_connection,
                          self.auth_provider, pool=self, request_timeout=self.request_timeout)
        # aioapns's _create_connection: loop.create_connection(host=APNS_SERVER, port=APNS_PORT, ssl=...)
        return await self._create_connection(factory)

    def discard_connection(self, connection) -> None:
        if connection in self.connections:
            self.connections.remove(connection)
            logger.debug("APNs: %r left the pool (%d open)", connection, len(self.connections))

    def close(self) -> None:
        self._closed = True
        for connection in list(self.connections):
            connection.close()
        self._fail_waiters(_ConnectFailed("closed"))

    async def send_notification(self, request):  # pragma: no cover - aioapns API, unused
        raise NotImplementedError("use send()")

    # --- scheduling -------------------------------------------------------------

    def _pick(self) -> _APNsProtocol | None:
        best, best_free = None, 0
        for connection in self.connections:
            free = connection.free
            if free > best_free:
                best, best_free = connection, free
        return best

    def _may_open(self) -> bool:
        if self._opening or self._closed or len(self.connections) >= self.max_connections:
            return False
        return not any(connection.warming for connection in self.connections)

    async def acquire(self, deadline: float) -> _APNsProtocol:
        """A connection with a free stream slot. The caller must use it before awaiting anything."""
        while True:
            connection = self._pick()
            if connection is not None:
                return connection
            if self._may_open():
                return await self._open()
            if self._closed:
                raise _ConnectFailed("pool closed")
            await self._wait(deadline)

    async def _open(self) -> _APNsProtocol:
        self._opening = True
        try:
            connection = await asyncio.wait_for(self.create_connection(), self.connect_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.warning("APNs: could not connect to %s:%s: %s", self.protocol_class.APNS_SERVER,
                           self.protocol_class.APNS_PORT, _describe(exc))
            if not self.connections:
                self._fail_waiters(_ConnectFailed(_describe(exc)))
            raise _ConnectFailed(_describe(exc)) from None
        finally:
            self._opening = False
            self._wake_all()
        if connection.closing:  # the server closed it straight away
            logger.warning("APNs: %r was closed by the server as soon as it opened", connection)
            raise _ConnectFailed("closed at once")
        self.connections.append(connection)
        self.live.add(connection)
        self.connections_opened += 1
        logger.info("APNs: opened %r (%d open)", connection, len(self.connections))
        return connection

    async def _wait(self, deadline: float) -> None:
        remaining = deadline - self.loop.time()
        if remaining <= 0:
            raise asyncio.TimeoutError()
        waiter = self.loop.create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, remaining)
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._wake(1)  # pass the wake-up on
            raise

    def _wake(self, count: int) -> None:
        waiters = self._waiters
        while count > 0 and waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                count -= 1

    def _wake_all(self) -> None:
        self._wake(len(self._waiters))

    def _fail_waiters(self, exc: Exception) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(exc)

    async def send(self, request: _Request) -> _Answer:
        """One attempt: a slot, a stream, an answer. Never raises for network trouble."""
        deadline = self.loop.time() + self.request_timeout
        try:
            connection = await self.acquire(deadline)
        except asyncio.TimeoutError:
            return _Answer(None, REASON_TIMEOUT)
        except _ConnectFailed:
            return _Answer(None, REASON_CONNECTION)
        try:
            stream_id, future = connection.send(request)
        except H2Error as exc:
            logger.warning("APNs: cannot open a stream on %r (%s), closing it", connection,
                           type(exc).__name__)
            connection.close()
            return _Answer(None, REASON_CONNECTION)
        try:
            return await future
        except asyncio.CancelledError:
            connection.abandon(stream_id)
            raise


class _KeyPool(_PoolMixin, APNsKeyConnectionPool):
    """aioapns's token-auth pool with our scheduler and one shared provider JWT."""


class _CertPool(_PoolMixin, APNsCertConnectionPool):
    """aioapns's certificate-auth pool with our scheduler."""


class APNsProvider:
    """Sends pushes to APNs over a few long-lived HTTP/2 connections (token or certificate auth).

    ``send(push) -> Result`` is safe to call from many tasks at once; hundreds of
    concurrent requests share one or two connections. Nothing is opened before the
    first ``send``; construction validates the configuration (ConfigError naming
    the variable).
    """

    platform = Platform.APNS

    def __init__(self, settings: Settings, *, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 max_streams_per_connection: int = DEFAULT_MAX_STREAMS,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT) -> None:
        if max_connections < 1 or max_streams_per_connection < 1:
            raise ValueError("max_connections and max_streams_per_connection must be >= 1")
        if not settings.apns_configured:
            raise ConfigError("APNS_KEY_FILE or APNS_CERT_FILE: required for the APNs provider")
        if settings.apns_key_file and settings.apns_cert_file:
            raise ConfigError("APNS_KEY_FILE and APNS_CERT_FILE: set one of them, not both")
        if not settings.apns_topic:
            raise ConfigError("APNS_TOPIC: required when APNs credentials are set")
        self._settings = settings
        self._topic = settings.apns_topic
        self._ttl = settings.push_ttl
        self._max_connections = max_connections
        self._request_timeout = request_timeout
        self._connect_timeout = connect_timeout
        host, port = _endpoint(settings)
        self.endpoint = f"{host}:{port}"
        # aioapns reads the endpoint from class attributes of the pool's protocol class:
        # give the pool a subclass carrying ours instead of changing aioapns's classes
        self._protocol_class = type("APNsEndpointProtocol", (_APNsProtocol,), {
            "APNS_SERVER": host, "APNS_PORT": port, "MAX_STREAMS": max_streams_per_connection,
            "INACTIVITY_TIME": idle_timeout,
        })
        self._ssl_context = _ssl_context(settings.push_ca_file)
        self._jwt: _SharedJWT | None = None
        if settings.apns_key_file:
            for name in ("apns_key_id", "apns_team_id"):
                if not getattr(settings, name):
                    raise ConfigError(f"{name.upper()}: required with APNS_KEY_FILE")
            key = _load_p8(settings.apns_key_file)
            self._jwt = _SharedJWT(key, settings.apns_key_id, settings.apns_team_id)
            try:
                self._jwt.get_header()
            except Exception:
                raise ConfigError("APNS_KEY_FILE: the key cannot sign an ES256 provider token") from None
        else:
            _check_certificate(settings.apns_cert_file)
        self._pool: _PoolMixin | None = None
        self._closed = False
        _quiet_aioapns()

    # --- the provider interface -----------------------------------------------

    async def send(self, push: Push) -> Result:
        if self._closed:
            return Result(Outcome.TRANSIENT, None, "provider_closed")
        topic = push.app or self._topic
        if not _valid_header_value(topic):
            # our data (push.app), not Apple's answer: a header value with spaces, control or
            # non-ASCII characters cannot be sent; never deliverable as is
            return Result(Outcome.REJECTED, None, "BadTopic")
        request = _Request(
            token=push.token,
            topic=topic,
            apns_id=apns_id(push.message_id, push.device_id),
            collapse_id=apns_collapse_id(push.message_id),
            expiration=int(time.time()) + self._ttl,
            payload=_message_payload(dataclasses.replace(push, delivery_id=0, device_id=0, token="", attempts=0)),
        )
        answer = await self._get_pool().send(request)
        outcome = classify(Platform.APNS, answer.status, answer.reason)
        if outcome is Outcome.AUTH:
            if answer.reason == "ExpiredProviderToken" and self._jwt is not None:
                self._jwt.invalidate()
        elif outcome is not Outcome.SENT and logger.isEnabledFor(logging.DEBUG):
            logger.debug("APNs: delivery %s to %s: %s %s -> %s", push.delivery_id,
                         shorten_token(push.token), answer.status, answer.reason, outcome.value)
        return Result(outcome, answer.status, answer.reason, answer.retry_after)

    async def close(self) -> None:
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is None:
            return
        pool.close()
        pending = [c.closed for c in pool.live if not c.closed.done()]
        if pending:
            await asyncio.wait(pending, timeout=2.0)

    # --- introspection (benchmarks, tests, metrics) ----------------------------

    def stats(self) -> dict:
        pool = self._pool
        if pool is None:
            return {"open_connections": 0, "connections_opened": 0, "in_flight": 0, "stream_limits": []}
        return {
            "open_connections": len(pool.connections),
            "connections_opened": pool.connections_opened,
            "in_flight": sum(c.in_flight for c in pool.connections),
            "stream_limits": [c.bound for c in pool.connections],
        }

    # --- internals --------------------------------------------------------------

    def _get_pool(self) -> _PoolMixin:
        if self._pool is not None and self._pool.loop is not asyncio.get_running_loop():
            # connections belong to the loop that opened them; a new loop gets a new pool
            self._pool = None
        if self._pool is None:
            common = dict(topic=self._topic, max_connections=self._max_connections,
                          max_connection_attempts=1, use_sandbox=self._settings.apns_sandbox,
                          ssl_context=self._ssl_context)
            if self._jwt is not None:
                pool = _KeyPool(key=self._jwt.key, key_id=self._jwt.key_id,
                                team_id=self._jwt.team_id, **common)
            else:
                pool = _CertPool(cert_file=self._settings.apns_cert_file, **common)
            pool._init_scheduler(self._protocol_class, self._request_timeout,
                                 self._connect_timeout, self._jwt)
            self._pool = pool
        return self._pool


# --- configuration helpers ------------------------------------------------------

def _endpoint(settings: Settings) -> tuple[str, int]:
    if settings.apns_endpoint:
        host, sep, port = settings.apns_endpoint.strip().rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError("APNS_ENDPOINT: must be host:port")
        return host, int(port)
    return (SANDBOX_HOST if settings.apns_sandbox else PRODUCTION_HOST), 443


def _ssl_context(ca_file: str | None) -> ssl.SSLContext:
    """System CAs plus PUSH_CA_FILE, ALPN h2 (aioapns would build a plain default context)."""
    return tls_context(ca_file, alpn=["h2"])


def _load_p8(path: str) -> str:
    """The .p8 key's contents (aioapns 4 takes the contents), checked to be an EC P-256 key."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"APNS_KEY_FILE: cannot read {path} ({exc.strerror or type(exc).__name__})") from None
    try:
        key = load_pem_private_key(data, password=None)
    except Exception:  # ValueError, TypeError (encrypted), UnsupportedAlgorithm
        raise ConfigError(f"APNS_KEY_FILE: {path} is not an unencrypted PEM private key (.p8)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ConfigError(f"APNS_KEY_FILE: {path} is not an EC P-256 key (APNs signs with ES256)")
    return data.decode("ascii", errors="replace")


class _EncryptedKey(Exception):
    pass


def _refuse_password():
    raise _EncryptedKey()


def _check_certificate(path: str) -> None:
    """Load APNS_CERT_FILE once (PEM certificate + unencrypted key) so a bad file fails at start-up,
    never with an interactive password prompt inside aioapns."""
    try:
        ssl.create_default_context().load_cert_chain(path, password=_refuse_password)
    except _EncryptedKey:
        raise ConfigError(f"APNS_CERT_FILE: the private key in {path} is encrypted; "
                          "provide it unencrypted (PEM)") from None
    except OSError as exc:
        if isinstance(exc, ssl.SSLError):
            raise ConfigError(f"APNS_CERT_FILE: {path} is not a PEM certificate with its private key "
                              f"({exc.reason or 'SSL error'})") from None
        raise ConfigError(f"APNS_CERT_FILE: cannot read {path} ({exc.strerror or type(exc).__name__})") from None


def _quiet_aioapns() -> None:
    """aioapns logs connection churn at INFO and errors per push; keep it to warnings
    unless the operator configured its logger explicitly."""
    aioapns_logger = logging.getLogger("aioapns")
    if aioapns_logger.level == logging.NOTSET:
        aioapns_logger.setLevel(logging.WARNING)


@lru_cache(maxsize=64)
def _message_payload(push: Push) -> bytes:
    """The payload depends on the message only: built once per message, not once per device."""
    return apns_payload(push)


def _valid_header_value(value: str) -> bool:
    return bool(value) and value.isprintable() and value.strip() == value and value.isascii()


def _reason(body: bytes) -> str | None:
    if not body:
        return None
    try:
        value = json.loads(body).get("reason")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


def _parse_retry_after(value: bytes) -> float | None:
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    text = str(exc) if not isinstance(exc, ssl.SSLError) else (exc.reason or str(exc))
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__
