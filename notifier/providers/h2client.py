"""A small HTTP/2 client on the `h2` library for the providers' one job: many small requests to
one origin, multiplexed on a few connections, from the dispatcher's event loop.

Why our own rather than httpx (measured against the FCM fake in its own process, 3,000 pushes,
500 in flight, this project's 2-core machine): httpx's HTTP/2 (httpcore) cost 865-975 us of CPU
per push, in anyio locks, per-request socket writes and per-stream bookkeeping; a lean raw-`h2`
client sending the same requests costs about 75 us. This client keeps the lean client's few
tricks and adds what a service needs around them:

- at most `max_connections` TLS connections (ALPN "h2" required); a request takes the open
  connection with the most free streams; another connection is opened only when every open one is
  full, and never while one is still connecting;
- the peer's SETTINGS_MAX_CONCURRENT_STREAMS is respected (capped by `max_streams`); a request
  with no free stream anywhere waits for one, first come first served, without polling; no other
  connection is opened while one has not answered anything yet (APNs allows one stream on a new
  connection until its first answer, then raises the limit);
- liveness: when a request times out and nothing at all came back on its connection since it was
  sent, the connection is sent a PING; unanswered within `ping_timeout`, the connection is
  dropped (a black-holed connection would otherwise swallow every request routed to it);
- a connection nearing the last stream id (2^31) takes no new streams and closes when drained;
- frames of every request started in one pass of the event loop go out in one write; a body
  that fits the window rides in one DATA frame with END_STREAM; one deadline timer per connection
  (not one per request) fails the requests past their timeout;
- header blocks are HPACK-encoded without Huffman coding (about 20 us per request saved;
  Huffman shrinks headers by a fifth, which matters little next to the payload), and indexed as
  given: h2's header normalisation, which would mark ``authorization`` never-indexed, is off, so
  a bearer token constant for many minutes (about 1 KB for Google's) crosses each connection once,
  then as a one-byte index. (A compression side channel would need an attacker who both chooses
  header values in this context and sees the compressed sizes between us and the provider.)
- flow control: received DATA is acknowledged at once; a body larger than the send window waits
  for WINDOW_UPDATE;
- failures are exceptions of one family, each saying whether the request may have reached the
  server: `ConnectFailed` (it did not), `StreamRefused` (REFUSED_STREAM, or above a GOAWAY's
  last stream id: it did not), `StreamReset`, `ConnectionLost`, `RequestTimeout` (it may have).

A GOAWAY stops new streams on that connection; h2 reads no frame after it, so streams at or
below its last stream id cannot be answered any more and fail as `ConnectionLost`.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from dataclasses import dataclass

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingAckReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset as StreamResetEvent,
    WindowUpdated,
)
from h2.exceptions import H2Error
from hpack import Encoder, HeaderTuple, NeverIndexedHeaderTuple

logger = logging.getLogger(__name__)


def _quiet_hpack() -> None:
    """hpack logs every header it encodes or decodes at DEBUG, the bearer token and the device
    token included: keep its logger (and h2's, which logs frames) at WARNING, unless the operator
    configured them, so a DEBUG root logger never writes a secret."""
    for name in ("hpack", "h2"):
        library_logger = logging.getLogger(name)
        if library_logger.level == logging.NOTSET:
            library_logger.setLevel(logging.WARNING)


_quiet_hpack()

MAX_BODY = 1 << 20  # an answer body larger than this is cut: providers' answers are ~100 bytes
CONNECT_FAILURE_HOLD = 1.0  # after a failed connect, requests fail at once for this long
RETIRE_AT_STREAM_ID = 2**31 - 1 - 20_000  # stop opening streams on a connection past this id


class ClientError(Exception):
    """A request that got no HTTP answer. `sent`: whether it may have reached the server."""

    sent = True


class ConnectFailed(ClientError):
    """No connection could be made (refused, TLS, no HTTP/2, timeout)."""

    sent = False


class StreamRefused(ClientError):
    """The server says it did not process the request (REFUSED_STREAM, or past a GOAWAY)."""

    sent = False


class StreamReset(ClientError):
    """The server reset the stream with another error code."""


class ConnectionLost(ClientError):
    """The connection closed before the answer came."""


class GoAway(ConnectionLost):
    """The server sent GOAWAY before the answer came (h2 reads no frame after it)."""


class RequestTimeout(ClientError):
    """No answer within the request's timeout."""


@dataclass
class Response:
    """An HTTP answer: status, headers (names lower-case bytes, last value wins), body."""

    status: int
    headers: dict
    body: bytes


class PlainEncoder(Encoder):
    """HPACK without Huffman coding, reusing what it encoded while the table is unchanged.

    h2 asks for Huffman on every header, which costs more CPU than the few bytes it saves here.
    The constant fields (the bearer token, the topic, the content type) are indexed by a
    connection's first request; from then on the dynamic table no longer changes (the per-request
    fields are never indexed), so each constant field encodes to the same bytes every time, and
    a never-indexed field to the same name part followed by its value. hpack's per-field work
    (table search, integer coding, debug-log calls) was most of the 8.6 us a request's header
    block took. Both caches are dropped whenever the table changes: a field added (a new bearer
    token every 30 minutes moves the indices) or the table resized.
    """

    def __init__(self) -> None:
        super().__init__()
        self._fields: dict = {}  # indexable (name, value) -> its bytes
        self._names: dict = {}   # name -> the never-indexed literal's bytes before the value's length

    def encode(self, headers, huffman=True):
        if self.header_table.resized or isinstance(headers, dict):
            # a table size update evicts entries: indices move; hpack emits the update
            self._fields.clear()
            self._names.clear()
            return super().encode(headers, huffman=False)
        # h2 hands over (name, value) pairs of bytes, NeverIndexedHeaderTuple for the sensitive ones
        block = []
        for header in headers:
            if isinstance(header, HeaderTuple) and not header.indexable:
                block.append(self._never_indexed(header[0], header[1]))
            else:
                block.append(self.add(header, False))
        return b"".join(block)

    def _never_indexed(self, name: bytes, value: bytes) -> bytes:
        prefix = self._names.get(name)
        if prefix is None:
            empty = super().add((name, b""), True, False)
            if empty[0] & 0xF0 != 0x10 or empty[-1] != 0:  # not a never-indexed literal: no shortcut
                return super().add((name, value), True, False)
            prefix = self._names[name] = empty[:-1]
        if len(value) >= 127:  # the length takes more than the prefix byte
            return super().add((name, value), True, False)
        return prefix + bytes((len(value),)) + value

    def add(self, to_add, sensitive, huffman=False):
        if sensitive:  # never indexed: a literal each time
            return super().add(to_add, sensitive, huffman)
        encoded = self._fields.get(to_add)
        if encoded is None:
            encoded = super().add(to_add, sensitive, huffman)
            if encoded[0] & 0xC0 == 0x40:  # a literal with incremental indexing: the table changed
                self._fields.clear()
                self._names.clear()
            else:
                self._fields[to_add] = encoded
        return encoded


class _CountedH2Connection(H2Connection):
    """h2's connection, told the number of open outbound streams instead of scanning for them.

    h2 recounts open streams, iterating over every stream it knows, each time one is opened: with
    1,000 streams in flight (APNs allows that many) the scan cost about 230 us per request. The
    connection knows the exact count (`counted_open`, its streams awaiting an answer); h2's own
    scan still runs once per 1,024 new streams, because it is also what forgets closed streams.
    """

    _PRUNE_EVERY = 1024

    def __init__(self, config: H2Configuration) -> None:
        super().__init__(config=config)
        self.counted_open = 0
        self._until_prune = self._PRUNE_EVERY

    @property
    def open_outbound_streams(self) -> int:
        self._until_prune -= 1
        if self._until_prune <= 0:
            self._until_prune = self._PRUNE_EVERY
            return H2Connection.open_outbound_streams.fget(self)
        return self.counted_open


class _Stream:
    __slots__ = ("future", "status", "headers", "body", "unsent", "sent_at", "deadline")

    def __init__(self, future: asyncio.Future, unsent: bytes, sent_at: float, deadline: float) -> None:
        self.future = future
        self.status = 0
        self.headers: dict = {}
        self.body = bytearray()
        self.unsent = unsent
        self.sent_at = sent_at
        self.deadline = deadline


class _Connection(asyncio.Protocol):
    """One HTTP/2 connection: h2's state, its streams, the writes of this loop pass."""

    def __init__(self, client: "H2Client") -> None:
        self.client = client
        self.loop = client.loop
        config = H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=False,
                                 normalize_outbound_headers=False, validate_inbound_headers=False)
        self.h2 = _CountedH2Connection(config)
        self.h2.encoder = PlainEncoder()
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _Stream] = {}
        self._unsent: set[int] = set()  # streams whose body waits for the peer's flow-control window
        self._timer: asyncio.TimerHandle | None = None  # fires at the earliest deadline in flight (or later)
        self._timer_at = float("inf")
        self.usable = False   # connected, not going away, not closed
        self.closed = False
        self.answered = False  # anything answered yet (a new APNs connection allows one stream until then)
        self.last_received = 0.0
        self._ping_sent_at: float | None = None
        self._flush_scheduled = False

    # --- capacity -----------------------------------------------------------------

    @property
    def free(self) -> int:
        limit = min(self.h2.remote_settings.max_concurrent_streams, self.client.max_streams)
        return limit - len(self.streams)

    # --- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.h2.initiate_connection()
        self.transport.write(self.h2.data_to_send())
        self.usable = True

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self.usable = False
        if self._timer is not None:
            self._timer.cancel()
        for stream_id in list(self.streams):
            self._fail(stream_id, ConnectionLost("the connection closed"))
        self.client._forget(self)

    def data_received(self, data: bytes) -> None:
        self.last_received = self.loop.time()
        try:
            events = self.h2.receive_data(data)
        except H2Error as exc:
            logger.warning("HTTP/2: protocol error from %s, closing the connection: %s",
                           self.client.origin, type(exc).__name__)
            self._write_pending()
            self.close()
            return
        woken = 0
        for event in events:
            kind = type(event)
            if kind is DataReceived:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                stream = self.streams.get(event.stream_id)
                if stream is not None and len(stream.body) < MAX_BODY:
                    stream.body += event.data
            elif kind is ResponseReceived:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    for name, value in event.headers:
                        if name == b":status":
                            stream.status = int(value)
                        else:
                            stream.headers[name] = value
            elif kind is StreamEnded:
                stream = self.streams.pop(event.stream_id, None)
                if stream is not None:
                    woken += 1
                    if not self.answered:
                        self.answered = True
                        self.client._wake_all()  # the pool may open more connections now
                    if not stream.future.done():
                        stream.future.set_result(Response(stream.status, stream.headers, bytes(stream.body)))
            elif kind is StreamResetEvent:
                if event.stream_id in self.streams:
                    woken += 1
                    error = (StreamRefused("the server refused the stream")
                             if event.error_code == ErrorCodes.REFUSED_STREAM
                             else StreamReset(f"the server reset the stream ({event.error_code!r})"))
                    self._fail(event.stream_id, error, wake=False)
            elif kind is WindowUpdated:
                self._send_unsent()
            elif kind is RemoteSettingsChanged:
                self._send_unsent()
                self.client._wake_all()
            elif kind is PingAckReceived:
                self._ping_sent_at = None
            elif kind is ConnectionTerminated:
                self._on_goaway(event)
                break  # h2 reads nothing after a GOAWAY
        self._write_pending()
        if woken:
            if not self.usable and not self.streams and not self.closed:
                self.close()  # retired and drained
            self.client._wake(woken)

    # --- requests -----------------------------------------------------------------

    def start(self, headers: list, body: bytes, deadline: float) -> tuple[int, asyncio.Future]:
        """Open a stream for the request; its frames go out at the end of this loop pass. Unanswered
        at `deadline` (loop time), it fails with RequestTimeout."""
        stream_id = self.h2.get_next_available_stream_id()
        if stream_id >= RETIRE_AT_STREAM_ID:
            self.retire("stream ids nearly exhausted")
        future = self.loop.create_future()
        self.h2.counted_open = len(self.streams)
        self.h2.send_headers(stream_id, headers, end_stream=not body)
        stream = self.streams[stream_id] = _Stream(future, body, self.loop.time(), deadline)
        if body:
            h2 = self.h2
            if len(body) <= min(h2.outbound_flow_control_window, h2.remote_settings.initial_window_size,
                                h2.max_outbound_frame_size):
                h2.send_data(stream_id, body, end_stream=True)  # fits a new stream's window and one frame
                stream.unsent = b""
            else:
                self._send_body(stream_id, stream)
        if deadline < self._timer_at:
            self._arm(deadline)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)
        return stream_id, future

    def cancel(self, stream_id: int, error: ClientError | None = None) -> None:
        """Give up on the stream (the caller did, or its deadline passed: `error` for its future):
        reset it, free its slot."""
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            return
        if error is not None and not stream.future.done():
            stream.future.set_exception(error)
        try:
            self.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
        except H2Error:
            pass
        self._write_pending()
        self.client._wake(1)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = self.loop.call_at(when, self._expire), when

    def _expire(self) -> None:
        """Fail the streams past their deadline; wake again at the earliest one left.

        One timer per connection, not one per request: a timer per request (asyncio.timeout) was
        about 5 % of the dispatcher's CPU in an APNs fan-out. The timer fires at the oldest
        request's deadline; by then that request is normally long answered, so this scans the
        streams in flight about once per timeout, not once per request.
        """
        self._timer, self._timer_at = None, float("inf")
        now = self.loop.time()
        expired = [(stream_id, stream) for stream_id, stream in self.streams.items() if stream.deadline <= now]
        for stream_id, stream in expired:
            self.cancel(stream_id, RequestTimeout(f"no answer from {self.client.origin} within "
                                                  f"{stream.deadline - stream.sent_at:g} s"))
        if expired:
            self._suspect(max(stream.sent_at for _, stream in expired))
        if self.streams and not self.closed:
            self._arm(min(stream.deadline for stream in self.streams.values()))

    def _suspect(self, sent_at: float) -> None:
        """A request sent at `sent_at` timed out: if nothing came back since, ask with a PING
        whether the connection is alive, and drop it if the PING goes unanswered too."""
        if self.closed or self.last_received >= sent_at or self._ping_sent_at is not None:
            return
        try:
            self.h2.ping(b"h2-alive")
        except H2Error:
            return
        self._ping_sent_at = self.loop.time()
        self._write_pending()
        self.loop.call_later(self.client.ping_timeout, self._check_ping, self._ping_sent_at)

    def _check_ping(self, sent_at: float) -> None:
        if self._ping_sent_at == sent_at and not self.closed:
            logger.warning("HTTP/2: no answer from %s, not even to a PING: dropping the connection",
                           self.client.origin)
            self.usable = False
            self.client._forget(self)
            if self.transport is not None:
                self.transport.abort()

    def retire(self, why: str) -> None:
        """Take no new stream; close once the streams in flight are answered."""
        if self.usable:
            logger.info("HTTP/2: retiring a connection to %s: %s", self.client.origin, why)
        self.usable = False
        self.client._forget(self)
        if not self.streams:
            self.loop.call_soon(self.close)

    def close(self) -> None:
        """Close the connection; its streams fail with ConnectionLost."""
        self.usable = False
        if self.transport is not None and not self.closed:
            self.transport.close()

    # --- internals ----------------------------------------------------------------

    def _send_body(self, stream_id: int, stream: _Stream) -> None:
        data = stream.unsent
        window = min(self.h2.local_flow_control_window(stream_id), len(data))
        frame = self.h2.max_outbound_frame_size
        sent = 0
        while sent < window:
            size = min(frame, window - sent)
            sent += size
            # END_STREAM rides on the last DATA frame: one frame less per request than end_stream()
            self.h2.send_data(stream_id, data[sent - size:sent], end_stream=sent == len(data))
        stream.unsent = data[sent:]
        if stream.unsent:
            self._unsent.add(stream_id)
        else:
            self._unsent.discard(stream_id)

    def _send_unsent(self) -> None:
        """More send window: go on with the bodies that waited for it (only those: this runs on
        every WINDOW_UPDATE, with up to a thousand streams in flight)."""
        for stream_id in list(self._unsent):
            stream = self.streams.get(stream_id)
            if stream is None:
                self._unsent.discard(stream_id)
                continue
            try:
                self._send_body(stream_id, stream)
            except H2Error:
                self._unsent.discard(stream_id)
                self._fail(stream_id, ConnectionLost("the stream could not be written"))

    def _on_goaway(self, event: ConnectionTerminated) -> None:
        self.usable = False
        level = logging.INFO if event.error_code == ErrorCodes.NO_ERROR else logging.WARNING
        logger.log(level, "HTTP/2: GOAWAY from %s (%r, last stream %s, %d in flight)", self.client.origin,
                   event.error_code, event.last_stream_id, len(self.streams))
        last = event.last_stream_id if event.last_stream_id is not None else 0
        for stream_id in list(self.streams):
            error = (StreamRefused("past the server's GOAWAY") if stream_id > last
                     else GoAway("GOAWAY before the answer"))
            self._fail(stream_id, error, wake=False)
        self.client._forget(self)
        self.client._wake_all()
        self.loop.call_soon(self.close)

    def _fail(self, stream_id: int, error: ClientError, wake: bool = True) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is not None and not stream.future.done():
            stream.future.set_exception(error)
        if stream is not None and wake:
            self.client._wake(1)

    def _flush(self) -> None:
        self._flush_scheduled = False
        self._write_pending()

    def _write_pending(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)


class H2Client:
    """Requests to one origin over at most `max_connections` HTTP/2 connections. Use it from one
    event loop (the one it is first used on); `close()` it when done."""

    def __init__(self, host: str, port: int, ssl_context: ssl.SSLContext, *, max_connections: int = 4,
                 max_streams: int = 1000, connect_timeout: float = 10.0, ping_timeout: float = 2.0) -> None:
        self.host, self.port = host, port
        self.origin = f"{host}:{port}"
        self.authority = host.encode() if port == 443 else f"{host}:{port}".encode()
        self.ssl_context = ssl_context
        self.max_connections = max_connections
        self.max_streams = max_streams
        self.connect_timeout = connect_timeout
        self.ping_timeout = ping_timeout
        self.connections_opened = 0
        self._connections: list[_Connection] = []
        self._connecting: asyncio.Future | None = None
        self._waiters: deque[asyncio.Future] = deque()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failure: ConnectFailed | None = None  # the last connect's, while it is fresh
        self._failed_at = 0.0

    @property
    def bound_loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the client's connections belong to (None before its first request)."""
        return self._loop

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    async def request(self, method: bytes, path: bytes, headers: list, body: bytes = b"",
                      timeout: float = 30.0) -> Response:
        """Send one request, wait for its whole answer. `headers`: (name, value) bytes pairs
        beyond the pseudo-headers, names lower-case. Raises a ClientError without an answer."""
        # :path differs per request for most APIs (a device token in it): never indexed, so it does
        # not evict the constant headers (the bearer token) from the HPACK table
        pseudo = [(b":method", method), (b":scheme", b"https"), (b":authority", self.authority),
                  NeverIndexedHeaderTuple(b":path", path)]
        if body:
            headers = [*headers, (b"content-length", str(len(body)).encode())]
        loop = self.loop
        deadline = loop.time() + timeout
        connection = self._pick()
        if connection is None:  # every stream taken, or no connection yet: wait, within the timeout
            try:
                async with asyncio.timeout_at(deadline):
                    connection = await self._acquire()
            except TimeoutError:
                raise RequestTimeout(f"no answer from {self.origin} within {timeout:g} s") from None
        try:
            stream_id, future = connection.start(pseudo + headers, body, deadline)
        except H2Error as exc:  # the connection broke while the request was being written
            connection.close()
            raise ConnectionLost(f"HTTP/2 error: {type(exc).__name__}") from None
        try:
            return await future  # the connection fails it past the deadline (RequestTimeout)
        except asyncio.CancelledError:
            connection.cancel(stream_id)
            raise

    def stats(self) -> dict:
        """Open connections, connections opened so far, streams in flight, each connection's limit."""
        return {"open_connections": len(self._connections), "connections_opened": self.connections_opened,
                "in_flight": sum(len(c.streams) for c in self._connections),
                "stream_limits": [min(c.h2.remote_settings.max_concurrent_streams, self.max_streams)
                                  for c in self._connections]}

    async def close(self) -> None:
        """Close every connection; requests in flight fail with ConnectionLost."""
        self._closed = True
        for connection in list(self._connections):
            connection.close()
        self._connections.clear()
        self._wake_all()

    # --- connections ---------------------------------------------------------------

    def _pick(self) -> _Connection | None:
        """The usable connection with the most free streams, if it has one free (else None)."""
        best = None
        for connection in self._connections:
            if connection.usable and (best is None or connection.free > best.free):
                best = connection
        return best if best is not None and best.free > 0 and not self._closed else None

    async def _acquire(self) -> _Connection:
        while True:
            if self._closed:
                raise ConnectionLost("the client is closed")
            best = self._pick()
            if best is not None:
                return best
            best = next((c for c in self._connections if c.usable), None)
            if self._connecting is not None:
                await asyncio.shield(self._connecting)
                continue
            warming = any(not c.answered for c in self._connections if c.usable)
            if len(self._connections) < self.max_connections and not warming:
                if best is None and self._failure is not None and \
                        self.loop.time() - self._failed_at < CONNECT_FAILURE_HOLD:
                    # every request of a burst would try again, one after another
                    raise ConnectFailed(str(self._failure))
                await self._connect()
                continue
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                raise

    async def _connect(self) -> None:
        """Open one connection (the only one being opened); raise ConnectFailed if it cannot be."""
        self._connecting = self.loop.create_future()
        try:
            try:
                async with asyncio.timeout(self.connect_timeout):
                    transport, connection = await self.loop.create_connection(
                        lambda: _Connection(self), self.host, self.port, ssl=self.ssl_context,
                        server_hostname=self.host)
            except (OSError, TimeoutError) as exc:
                raise ConnectFailed(f"cannot connect to {self.origin}: {_describe(exc)}") from None
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
                transport.close()
                raise ConnectFailed(f"{self.origin} does not speak HTTP/2 (ALPN)")
            self.connections_opened += 1
            self._connections.append(connection)
            self._failure = None
        except ConnectFailed as exc:
            self._failure, self._failed_at = exc, self.loop.time()
            raise
        finally:
            connecting, self._connecting = self._connecting, None
            connecting.set_result(None)
            self._wake_all()

    def _forget(self, connection: _Connection) -> None:
        if connection in self._connections:
            self._connections.remove(connection)
            self._wake_all()

    def _wake(self, count: int) -> None:
        while count > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                count -= 1

    def _wake_all(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)


def http2_context(context: ssl.SSLContext) -> ssl.SSLContext:
    """`context` set to offer HTTP/2 (ALPN "h2") only."""
    context.set_alpn_protocols(["h2"])
    return context


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)
    return type(exc).__name__
