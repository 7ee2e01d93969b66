"""A loopback fake of Apple's APNs provider API: HTTP/2 over TLS, served with `h2` on asyncio.

What it does like Apple (developer.apple.com, "Sending notification requests to APNs",
"Handling notification responses from APNs", "Establishing a connection to APNs"):

- `POST /3/device/<token>`, JSON payload; 200 with an `apns-id` header (the request's, or a
  new UUID), errors as `{"reason": ...}` (+ `"timestamp"` in ms for 410) with `apns-id`.
- Token auth: `authorization: bearer <JWT>`, ES256, header kid == key id, claim iss == team
  id, iat less than an hour old, signature checked with the public key. Certificate auth:
  the TLS client certificate must chain to the test CA.
- Stream limit: with token auth every connection's first SETTINGS says
  MAX_CONCURRENT_STREAMS=1; once a request with a valid provider token arrives the fake
  sends SETTINGS raising it to `max_streams`. With certificate auth it starts there.
  Streams opened past the limit in force (acknowledged by the client) get RST_STREAM
  REFUSED_STREAM (a stream error, as RFC 9113 5.1.2 allows) and are counted in
  `refused_streams`; streams the client opened before it could have seen a lower limit are
  served.

Fake-specific behaviour, not Apple's (documented so nobody mistakes it for Apple's):
- A payload that is not a JSON object gets 400 "BadPayload" (Apple documents no reason).
- `apns-topic` other than the configured topic: 400 DeviceTokenNotForTopic when listed in
  `other_topics` (topics the team owns but the token isn't for), else 400 TopicDisallowed.
- Missing `apns-push-type` is 400 InvalidPushType unless `require_push_type=False` (Apple
  only requires it for watchOS; it is recommended everywhere else).

Scripting/recording: see `tests.fakes.ScriptedRecorder` (script, set_default, delay,
received, wait_for, sent_tokens) plus `goaway_after`, `connections_opened`,
`max_concurrent_seen`, `refused_streams`, `flow_control_stalls`, `stats()`.

Cost: about 60 us of CPU per request with `validate_headers=False` (as `python -m
bench.fakes apns` runs it), about 90 us with h2's inbound header checks on (the default),
measured on this project's 2-core machine with bench.ceiling's lean client (4 connections x
250 streams, 20,000 requests: ~14,500 requests/s; it was ~150 us and ~6,500/s before the
cuts below). Nearly all of it is h2's frame and stream machinery. Cut, with the same bytes
accepted and the same answers: HPACK decoding inlined for the usual representations
(`_RequestDecoder`), the 200 answer's header block built directly (`_ResponseEncoder`), h2's
scan of every stream on each new one made occasional (`_ServerH2Connection`), our own answer
headers not re-checked by h2, each distinct provider token verified once per fake (its age
still checked on every request). `start()` memoizes hpack's Huffman decoder process-wide
(same results, see `install_huffman_memo`). A read carries up to hundreds of requests and
their answers go out in one write (or once per loop iteration for delayed answers), so the
event loop and TLS are a small share: uvloop measured no gain.
A fake is started once: start(), stop(), done.

Also runnable as a process for benchmarks: `python -m tests.fakes.apns --help`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Deque, Dict, List, Optional, Sequence, Set, Tuple

import hpack.hpack as hpack_module
import jwt
from cryptography.hazmat.primitives import serialization
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    SettingsAcknowledged,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import SettingCodes
from hpack import Decoder, Encoder, HeaderTuple, NeverIndexedHeaderTuple
from hpack.exceptions import HPACKDecodingError, OversizedHeaderListError

from tests.fakes import Scripted, ScriptedRecorder, stop_loop_thread
from tests.fakes.h2server import UNLIMITED, AdvertisedSettings, H2Writing, install_huffman_memo, serve_forever
from tests.fakes.tls import TLSMaterial

__all__ = ["APNsFake", "APNsRequest", "PUSH_TYPES", "DEFAULT_REASONS", "point_aioapns_at"]

PUSH_TYPES = frozenset(
    {
        "alert",
        "background",
        "location",
        "voip",
        "complication",
        "fileprovider",
        "mdm",
        "liveactivity",
        "pushtotalk",
        "widgets",
        "controls",
    }
)

#: Reason used when a script or default gives a status without one.
DEFAULT_REASONS = {
    400: "BadDeviceToken",
    403: "Forbidden",
    404: "BadPath",
    405: "MethodNotAllowed",
    410: "Unregistered",
    413: "PayloadTooLarge",
    429: "TooManyRequests",
    500: "InternalServerError",
    503: "ServiceUnavailable",
}

MAX_PAYLOAD = 4096
MAX_VOIP_PAYLOAD = 5120
PROVIDER_TOKEN_TTL = 3600  # Apple rejects provider tokens older than one hour
_BODY_CAP = 64 * 1024  # stop buffering a request body past this (it is rejected anyway)
_TOKEN_RE = re.compile(rb"[0-9a-fA-F]{64}")
_UUID_RE = re.compile(rb"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_PATH_PREFIX = b"/3/device/"


@dataclass
class APNsRequest:
    """One answered request. `headers` has str names (lower case) and values, pseudo-headers
    included; `payload` is the decoded JSON object (None when it was not one)."""

    token: str
    headers: Dict[str, str]
    payload: Optional[Dict[str, Any]]
    status: int
    connection_id: int
    at: float  # time.time() when answered
    reason: Optional[str] = None
    apns_id: Optional[str] = None


class _ResponseEncoder(Encoder):
    """hpack's Encoder, with the fake's usual answer (200 + apns-id) built without it.

    That block is `:status: 200` from the static table plus `apns-id` as a literal without
    indexing and without Huffman coding: valid HPACK that leaves the dynamic table alone, so
    it mixes freely with the blocks hpack encodes (error answers). hpack would Huffman-code
    each (unique) apns-id and index it, evicting entry after entry, for nothing.
    """

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        if type(headers) is list and len(headers) == 2 and not self.header_table.resized:
            (name0, value0), (name1, value1) = headers
            if name0 == b":status" and value0 == b"200" and name1 == b"apns-id" and len(value1) < 127:
                return b"\x88\x00\x07apns-id" + bytes((len(value1),)) + value1
        return super().encode(headers, huffman)


class _RequestDecoder(Decoder):
    """hpack's Decoder, with decode(raw=True) (what h2 calls) inlined for the common cases.

    hpack decodes a block one Python call chain per field and copies the rest of the block
    for every literal: a third of the fake's CPU per request. Here indexed fields and
    literals without indexing (what clients send per request: :path, apns-id, ...) with
    short lengths are decoded in place; every other representation (literals that index,
    table size updates, long integers) is handed, field by field, to hpack's own methods.
    Same headers, same tuple types, same errors (HPACKDecodingError and subclasses).
    """

    def decode(self, data: Any, raw: bool = False) -> Any:
        if not raw:
            return super().decode(data, raw)
        if type(data) is not bytes:
            data = bytes(data)
        view = memoryview(data)
        get = self.header_table.get_by_index
        decode_huffman = hpack_module.decode_huffman  # looked up here: install_huffman_memo
        new_tuple = tuple.__new__
        headers: List[Any] = []
        inflated = 0
        limit = self.max_header_list_size
        pos = 0
        end = len(data)
        try:
            while pos < end:
                first = data[pos]
                if first & 0x80:  # indexed field
                    index = first & 0x7F
                    if index == 0x7F:
                        header, consumed = self._decode_indexed(view[pos:])
                        pos += consumed
                    else:
                        header = new_tuple(HeaderTuple, get(index))
                        pos += 1
                elif first & 0xE0:  # literal with incremental indexing, or table size update
                    if first & 0x40:
                        header, consumed = self._decode_literal_index(view[pos:])
                    else:
                        if headers:
                            raise HPACKDecodingError("Table size update not at the start of the block")
                        consumed = self._update_encoding_context(view[pos:])
                        header = None
                    pos += consumed
                else:  # literal without indexing (0000) or never indexed (0001)
                    start = pos
                    name_index = first & 0x0F
                    pos += 1
                    if name_index == 0x0F:
                        name = None
                    elif name_index:
                        name = get(name_index)[0]
                    else:
                        octet = data[pos]
                        length = octet & 0x7F
                        if length == 0x7F:
                            name = None
                        else:
                            pos += 1
                            name = data[pos : pos + length]
                            if len(name) != length:
                                raise HPACKDecodingError("Truncated header block")
                            if octet & 0x80:
                                name = decode_huffman(name)
                            pos += length
                    if name is not None:
                        octet = data[pos]
                        length = octet & 0x7F
                        if length == 0x7F:
                            name = None
                        else:
                            pos += 1
                            value = data[pos : pos + length]
                            if len(value) != length:
                                raise HPACKDecodingError("Truncated header block")
                            if octet & 0x80:
                                value = decode_huffman(value)
                            pos += length
                    if name is None:  # a length or index past the prefix: hpack's way
                        header, consumed = self._decode_literal(view[start:], should_index=False)
                        pos = start + consumed
                    else:
                        kind = NeverIndexedHeaderTuple if first & 0x10 else HeaderTuple
                        header = new_tuple(kind, (name, value))
                if header is not None:
                    headers.append(header)
                    inflated += 32 + len(header[0]) + len(header[1])
                    if inflated > limit:
                        raise OversizedHeaderListError(f"A header list larger than {limit} has been received")
        except IndexError as err:
            raise HPACKDecodingError(f"Truncated header block {data!r}") from err
        self._assert_valid_table_size()
        return headers


class _ServerH2Connection(H2Connection):
    """h2's connection, minus a scan of every stream on each new stream.

    h2 counts the open inbound streams (and purges closed ones) on every HEADERS that opens
    a stream, only to enforce our own MAX_CONCURRENT_STREAMS, which AdvertisedSettings turns
    off (the fake enforces it). With hundreds of streams in flight that scan was a tenth of
    the fake's CPU, so it runs once the stream table has doubled since the last purge.
    """

    _purge_at = 64

    def __init__(self, config: H2Configuration) -> None:
        super().__init__(config)
        self.encoder = _ResponseEncoder()
        decoder = _RequestDecoder(self.decoder.max_header_list_size)
        decoder.max_allowed_table_size = self.decoder.max_allowed_table_size
        self.decoder = decoder

    @property
    def open_inbound_streams(self) -> int:
        """An upper bound of the open inbound streams (h2 compares it to a limit it does not
        enforce here); purges closed streams now and then, as h2's exact count does."""
        streams = self.streams
        if len(streams) >= self._purge_at:
            self._open_streams(int(not self.config.client_side))
            self._purge_at = max(64, 2 * len(streams))
        return len(streams)


class _Stream:
    __slots__ = ("headers", "duplicate", "body", "oversize", "done", "timer")

    def __init__(self, headers: Sequence[Tuple[bytes, bytes]]) -> None:
        hdrs: Dict[bytes, bytes] = {}
        duplicate = False
        for name, value in headers:
            if name in hdrs:
                duplicate = True
            hdrs[name] = value
        self.headers = hdrs
        self.duplicate = duplicate
        self.body = bytearray()
        self.oversize = False
        self.done = False
        self.timer: Optional[asyncio.TimerHandle] = None


@dataclass
class _Verdict:
    status: int
    reason: Optional[str]
    token: str
    apns_id: str
    retry_after: Optional[int] = None
    payload: Optional[Dict[str, Any]] = None
    authenticated: bool = False


class _Connection(H2Writing, asyncio.Protocol):
    """One client connection: h2 state, stream bookkeeping, the limit in force."""

    def __init__(self, fake: "APNsFake") -> None:
        self.fake = fake
        self.id = 0
        self.transport: Optional[asyncio.Transport] = None
        self.h2: Optional[H2Connection] = None
        self.streams: Dict[int, _Stream] = {}
        self.in_flight = 0
        self.advertised = 1
        self.limit = UNLIMITED  # in force: RFC default until the client acks our SETTINGS
        self.pending_limits: Deque[int] = deque()
        self.processed = 0
        self.last_processed = 0
        self.draining = False  # goaway_after reached: answer what we took, then GOAWAY
        self.closed = False
        self.flush_scheduled = False
        self.pending_bodies: Dict[int, bytes] = {}
        self.alpn: Optional[str] = None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        fake = self.fake
        self.id = fake._register(self)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.alpn = ssl_object.selected_alpn_protocol()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        initial = fake.max_streams if fake.client_cert_auth else 1
        self.h2 = _ServerH2Connection(
            H2Configuration(
                client_side=False,
                header_encoding=None,
                validate_inbound_headers=fake.validate_headers,
                # our own answers, built right: checking and lower-casing them again is waste
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self.h2.local_settings = AdvertisedSettings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: initial,
                SettingCodes.MAX_HEADER_LIST_SIZE: H2Connection.DEFAULT_MAX_HEADER_LIST_SIZE,
            },
        )
        self.h2.initiate_connection()
        self.advertised = initial
        self.pending_limits.append(initial)
        self._flush_now()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        h2c = self.h2
        assert h2c is not None
        try:
            events = h2c.receive_data(data)
        except ProtocolError:
            self._flush_now()
            self._close()
            return
        for event in events:
            kind = type(event)
            if kind is RequestReceived:
                self._on_request(event.stream_id, event.headers)
            elif kind is DataReceived:
                self._on_data(event.stream_id, event.data, event.flow_controlled_length)
            elif kind is StreamEnded:
                self._on_stream_ended(event.stream_id)
            elif kind is SettingsAcknowledged:
                if self.pending_limits:
                    self.limit = self.pending_limits.popleft()
            elif kind is WindowUpdated:
                if self.pending_bodies:
                    self._send_pending_bodies()
            elif kind is StreamReset:
                self._on_reset(event.stream_id)
            elif kind is ConnectionTerminated:
                self._flush_now()
                self._close()
                return
        self._flush_now()

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.closed = True
        for stream in self.streams.values():
            if stream.timer is not None:
                stream.timer.cancel()
        self.streams.clear()
        self.fake._unregister(self)

    # -- streams -----------------------------------------------------------------------------

    def _on_request(self, stream_id: int, headers: Sequence[Tuple[bytes, bytes]]) -> None:
        h2c = self.h2
        assert h2c is not None
        if self.draining:
            return  # past goaway_after's count: not processed, left out of GOAWAY's last id
        if self.in_flight >= self.limit:
            h2c.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            self.fake.refused_streams += 1
            return
        self.streams[stream_id] = _Stream(headers)
        self.in_flight += 1
        if self.in_flight > self.fake.max_concurrent_seen:
            self.fake.max_concurrent_seen = self.in_flight

    def _on_data(self, stream_id: int, data: bytes, flow_controlled_length: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None and not stream.oversize:
            if len(stream.body) + len(data) > _BODY_CAP:
                stream.oversize = True
            else:
                stream.body += data
        if flow_controlled_length:
            assert self.h2 is not None
            self.h2.acknowledge_received_data(flow_controlled_length, stream_id)

    def _on_reset(self, stream_id: int) -> None:
        stream = self.streams.pop(stream_id, None)
        self.pending_bodies.pop(stream_id, None)
        if stream is not None and not stream.done:
            stream.done = True
            if stream.timer is not None:
                stream.timer.cancel()
            self.in_flight -= 1
            self._maybe_goaway()

    def _on_stream_ended(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or stream.done:
            return
        fake = self.fake
        self.processed += 1
        if stream_id > self.last_processed:
            self.last_processed = stream_id
        verdict = fake._evaluate(self, stream)
        self._adjust_limit(verdict)
        limit = fake._goaway_after
        if limit is not None and self.processed >= limit:
            self.draining = True
        delay = fake.delay
        if delay > 0:
            loop = asyncio.get_running_loop()
            stream.timer = loop.call_later(delay, self._answer_later, stream_id, verdict)
        else:
            self._answer(stream_id, verdict)

    def _adjust_limit(self, verdict: _Verdict) -> None:
        fake = self.fake
        if fake.client_cert_auth:
            return
        target = self.advertised
        if verdict.authenticated:
            target = fake.max_streams
        if fake.lower_on_reject and verdict.status != 200:
            target = 1
        if target != self.advertised:
            assert self.h2 is not None
            self.h2.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: target})
            self.pending_limits.append(target)
            if target > self.limit:
                self.limit = target  # a raise may be used as soon as the client reads it
            self.advertised = target
            fake.settings_changes += 1

    def _answer_later(self, stream_id: int, verdict: _Verdict) -> None:
        if self.closed:
            return
        self._answer(stream_id, verdict)
        self._schedule_flush()

    def _answer(self, stream_id: int, verdict: _Verdict) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is None or stream.done:
            return
        stream.done = True
        self.in_flight -= 1
        h2c = self.h2
        assert h2c is not None
        status = verdict.status
        headers = [(b":status", str(status).encode()), (b"apns-id", verdict.apns_id.encode())]
        body = b""
        if status != 200:
            reason = verdict.reason or DEFAULT_REASONS.get(status, "InternalServerError")
            verdict.reason = reason
            doc: Dict[str, Any] = {"reason": reason}
            if status == 410:
                doc["timestamp"] = int(time.time() * 1000)
            body = json.dumps(doc, separators=(",", ":")).encode()
            headers.append((b"content-type", b"application/json; charset=utf-8"))
            headers.append((b"content-length", str(len(body)).encode()))
            if verdict.retry_after is not None:
                headers.append((b"retry-after", str(verdict.retry_after).encode()))
        try:
            h2c.send_headers(stream_id, headers, end_stream=not body)
            if body:
                self._send_body(stream_id, body)
        except StreamClosedError:
            pass
        self.fake._record_answer(self, stream, verdict)
        self._maybe_goaway()

    def _send_body(self, stream_id: int, body: bytes) -> None:
        """Send a response body, or park it until the client opens its flow-control window."""
        h2c = self.h2
        assert h2c is not None
        if h2c.local_flow_control_window(stream_id) >= len(body):
            h2c.send_data(stream_id, body, end_stream=True)
        else:
            self.pending_bodies[stream_id] = body
            self.fake.flow_control_stalls += 1

    def _send_pending_bodies(self) -> None:
        h2c = self.h2
        assert h2c is not None
        for stream_id, body in list(self.pending_bodies.items()):
            try:
                window = h2c.local_flow_control_window(stream_id)
            except StreamClosedError:
                del self.pending_bodies[stream_id]
                continue
            if window >= len(body):
                del self.pending_bodies[stream_id]
                h2c.send_data(stream_id, body, end_stream=True)
        self._maybe_goaway()

    def _maybe_goaway(self) -> None:
        if self.draining and self.in_flight == 0 and not self.pending_bodies and not self.closed:
            assert self.h2 is not None
            self.h2.close_connection(error_code=ErrorCodes.NO_ERROR, last_stream_id=self.last_processed)
            self.fake.goaways_sent += 1
            self._flush_now()
            self._close()

class APNsFake(ScriptedRecorder[APNsRequest]):
    """HTTP/2 + TLS fake of api.push.apple.com on 127.0.0.1 (a free port unless `port`)."""

    def __init__(
        self,
        tls: TLSMaterial,
        *,
        topic: str,
        key_id: Optional[str] = None,
        team_id: Optional[str] = None,
        public_key_pem: Optional[bytes | str] = None,
        client_cert_auth: bool = False,
        max_streams: int = 1000,
        lower_on_reject: bool = False,
        require_push_type: bool = True,
        other_topics: Sequence[str] = (),
        validate_headers: bool = True,
        record: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(record=record)
        if not topic:
            raise ValueError("topic is required")
        if client_cert_auth:
            if tls.ca_cert is None:
                raise ValueError("client_cert_auth needs tls.ca_cert to verify client certificates")
        elif not (key_id and team_id and public_key_pem):
            raise ValueError("token auth needs key_id, team_id and public_key_pem")
        if not 1 <= max_streams <= UNLIMITED:
            raise ValueError(f"max_streams out of range: {max_streams}")
        self.tls = tls
        self.topic = topic
        self._topic_b = topic.encode()
        self._other_topics = frozenset(t.encode() for t in other_topics)
        self.key_id = key_id
        self.team_id = team_id
        self._public_key = (
            serialization.load_pem_public_key(
                public_key_pem.encode() if isinstance(public_key_pem, str) else public_key_pem
            )
            if public_key_pem
            else None
        )
        self.client_cert_auth = client_cert_auth
        self.max_streams = max_streams
        self.lower_on_reject = lower_on_reject
        self.require_push_type = require_push_type
        #: h2's checks of inbound header blocks (pseudo-headers, lower-case names, illegal
        #: characters, connection headers): a bad block is a stream/connection error, like a
        #: real server. About a third of the fake's CPU per request; benchmarks turn it off.
        self.validate_headers = validate_headers
        self.host = host
        self._requested_port = port
        self.port: Optional[int] = None

        #: TCP+TLS connections established since start.
        self.connections_opened = 0
        #: Most streams in flight at once on one connection.
        self.max_concurrent_seen = 0
        #: Streams refused (RST_STREAM REFUSED_STREAM) for exceeding the limit in force.
        self.refused_streams = 0
        #: SETTINGS frames sent after the first one (raises and lowers of the stream limit).
        self.settings_changes = 0
        self.goaways_sent = 0
        #: Error bodies that had to wait for the client to open its flow-control window.
        self.flow_control_stalls = 0
        #: Exceptions the event loop reported (e.g. failed TLS handshakes), as strings.
        self.loop_errors: List[str] = []
        self._goaway_after: Optional[int] = None
        # authorization header value -> its JWT's iat, for tokens whose signature, alg, kid and iss
        # checked out: a client reuses one token for up to an hour, on every connection, so each is
        # verified once; its age is still checked on every request (ExpiredProviderToken).
        # Touched by the loop thread only.
        self._valid_tokens: Dict[bytes, int] = {}
        self._connections: Set[_Connection] = set()
        self._requests_per_connection: Counter = Counter()
        self._next_connection_id = 0
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._started_at = 0.0

    # -- control (test thread) ---------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise RuntimeError("APNsFake not started")
        return f"{self.host}:{self.port}"

    def goaway_after(self, n: Optional[int]) -> None:
        """Send GOAWAY (NO_ERROR, last stream id = last processed) after `n` requests on each
        connection, then close it. None turns it off. Applies to connections as they count."""
        if n is not None and n < 1:
            raise ValueError("goaway_after needs n >= 1")
        self._goaway_after = n

    def start(self) -> "APNsFake":
        if self._thread is not None:
            raise RuntimeError("APNsFake already started")
        ssl_ctx = self.tls.server_context(alpn=("h2",), require_client_cert=self.client_cert_auth)
        install_huffman_memo()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self._requested_port))
            sock.listen(1024)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: List[BaseException] = []
        self._thread = threading.Thread(
            target=self._run,
            args=(sock, ssl_ctx, ready, failure),
            name=f"APNsFake-{self.port}",
            daemon=True,
        )
        self._started_at = time.monotonic()
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("APNsFake did not start within 10 s")
        if failure:
            self._thread.join(5)
            raise RuntimeError("APNsFake failed to start") from failure[0]
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listener and every connection, stop the loop, join the thread."""
        stop_loop_thread(self._loop, self._thread, timeout)
        self._loop = None

    def __enter__(self) -> "APNsFake":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stats(self) -> Dict[str, Any]:
        return {
            "answered": self.answered,
            "statuses": {str(k): v for k, v in sorted(self.statuses().items())},
            "connections_opened": self.connections_opened,
            "requests_per_connection": dict(self._requests_per_connection),
            "max_concurrent_seen": self.max_concurrent_seen,
            "refused_streams": self.refused_streams,
            "settings_changes": self.settings_changes,
            "goaways_sent": self.goaways_sent,
            "flow_control_stalls": self.flow_control_stalls,
            "elapsed_s": round(time.monotonic() - self._started_at, 3) if self._started_at else 0.0,
        }

    def reset(self) -> None:
        super().reset()
        self._goaway_after = None

    # -- the loop thread ---------------------------------------------------------------------

    def _run(self, sock: socket.socket, ssl_ctx: Any, ready: threading.Event, failure: List[BaseException]) -> None:
        assert self._loop is not None
        serve_forever(self._loop, lambda: _Connection(self), sock, ssl_ctx, ready, failure,
                      lambda: self._connections, self._on_loop_exception)

    def _on_loop_exception(self, loop: asyncio.AbstractEventLoop, context: Dict[str, Any]) -> None:
        exc = context.get("exception")
        self.loop_errors.append(f"{context.get('message')}: {exc!r}")

    def _register(self, conn: _Connection) -> int:
        self._next_connection_id += 1
        self.connections_opened += 1
        self._connections.add(conn)
        return self._next_connection_id

    def _unregister(self, conn: _Connection) -> None:
        self._connections.discard(conn)

    # -- judging a request (loop thread) -----------------------------------------------------

    def _check_provider_token(self, conn: _Connection, auth: bytes) -> Optional[str]:
        now = time.time()
        iat = self._valid_tokens.get(auth)
        if iat is None:
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not token.strip():
                return "InvalidProviderToken"
            token = token.strip()
            try:
                header = jwt.get_unverified_header(token)
                if header.get("alg") != "ES256" or header.get("kid") != self.key_id:
                    return "InvalidProviderToken"
                claims = jwt.decode(
                    token,
                    self._public_key,
                    algorithms=["ES256"],
                    options={
                        "verify_signature": True,
                        "verify_exp": False,
                        "verify_nbf": False,
                        "verify_iat": False,
                        "verify_aud": False,
                        "verify_iss": False,
                    },
                )
            except jwt.InvalidTokenError:
                return "InvalidProviderToken"
            iat = claims.get("iat")
            if claims.get("iss") != self.team_id or not isinstance(iat, int) or isinstance(iat, bool):
                return "InvalidProviderToken"
            if iat > now + 60:
                return "InvalidProviderToken"
            if len(self._valid_tokens) > 64:
                self._valid_tokens.clear()
            self._valid_tokens[auth] = iat
        if now - iat > PROVIDER_TOKEN_TTL:
            return "ExpiredProviderToken"
        return None

    def _evaluate(self, conn: _Connection, stream: _Stream) -> _Verdict:
        h = stream.headers
        raw_id = h.get(b"apns-id")
        apns_id = raw_id.decode("latin-1") if raw_id and _UUID_RE.fullmatch(raw_id) else str(uuid.uuid4())
        path = h.get(b":path", b"")
        token_b = path[len(_PATH_PREFIX):].split(b"?", 1)[0] if path.startswith(_PATH_PREFIX) else b""
        token = token_b.decode("latin-1")

        def reject(status: int, reason: str, authenticated: bool = False) -> _Verdict:
            return _Verdict(status, reason, token, apns_id, authenticated=authenticated)

        if h.get(b":method") != b"POST":
            return reject(405, "MethodNotAllowed")
        if not path.startswith(_PATH_PREFIX):
            return reject(404, "BadPath")
        if not self.client_cert_auth:
            auth = h.get(b"authorization")
            if not auth:
                return reject(403, "MissingProviderToken")
            problem = self._check_provider_token(conn, auth)
            if problem is not None:
                return reject(403, problem)
        authed = True
        if stream.duplicate:
            return reject(400, "DuplicateHeaders", authed)
        topic = h.get(b"apns-topic")
        if topic is None:
            if not self.client_cert_auth:  # a single-topic certificate implies its topic
                return reject(400, "MissingTopic", authed)
        elif topic != self._topic_b:
            if topic in self._other_topics:
                return reject(400, "DeviceTokenNotForTopic", authed)
            return reject(400, "TopicDisallowed", authed)
        if not token_b:
            return reject(400, "MissingDeviceToken", authed)
        if not _TOKEN_RE.fullmatch(token_b):
            return reject(400, "BadDeviceToken", authed)
        push_type = h.get(b"apns-push-type")
        if push_type is None:
            if self.require_push_type:
                return reject(400, "InvalidPushType", authed)
        elif push_type.decode("latin-1") not in PUSH_TYPES:
            return reject(400, "InvalidPushType", authed)
        if raw_id is not None and not _UUID_RE.fullmatch(raw_id):
            return reject(400, "BadMessageId", authed)
        priority = h.get(b"apns-priority")
        if priority is not None and priority not in (b"1", b"5", b"10"):
            return reject(400, "BadPriority", authed)
        expiration = h.get(b"apns-expiration")
        if expiration is not None and not expiration.isdigit():
            return reject(400, "BadExpirationDate", authed)
        collapse = h.get(b"apns-collapse-id")
        if collapse is not None and len(collapse) > 64:
            return reject(400, "BadCollapseId", authed)
        body = stream.body
        if not body and not stream.oversize:
            return reject(400, "PayloadEmpty", authed)
        limit = MAX_VOIP_PAYLOAD if push_type == b"voip" else MAX_PAYLOAD
        if stream.oversize or len(body) > limit:
            return reject(413, "PayloadTooLarge", authed)
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            return reject(400, "BadPayload", authed)
        scripted: Optional[Scripted] = self._scripted_answer(token)
        if scripted is not None and scripted.status != 200:
            return _Verdict(
                scripted.status,
                scripted.reason or DEFAULT_REASONS.get(scripted.status),
                token,
                apns_id,
                retry_after=scripted.retry_after,
                payload=payload,
                authenticated=authed,
            )
        return _Verdict(200, None, token, apns_id, payload=payload, authenticated=authed)

    def _record_answer(self, conn: _Connection, stream: _Stream, verdict: _Verdict) -> None:
        self._requests_per_connection[conn.id] += 1
        request = None
        if self._record_requests:
            payload = verdict.payload
            if payload is None and stream.body and not stream.oversize:
                try:
                    decoded = json.loads(stream.body)
                    payload = decoded if isinstance(decoded, dict) else None
                except ValueError:
                    payload = None
            request = APNsRequest(
                token=verdict.token,
                headers={k.decode("latin-1"): v.decode("latin-1") for k, v in stream.headers.items()},
                payload=payload,
                status=verdict.status,
                connection_id=conn.id,
                at=time.time(),
                reason=verdict.reason,
                apns_id=verdict.apns_id,
            )
        self._record(request, verdict.token, verdict.status, verdict.status == 200)  # type: ignore[arg-type]


def point_aioapns_at(client: Any, fake: APNsFake) -> None:
    """Send one `aioapns.APNs` client's connections to `fake` instead of Apple.

    aioapns takes host and port from class attributes (APNS_SERVER / APNS_PORT) of the
    protocol class its pool uses (`pool.protocol_class`, chosen from use_sandbox). This
    swaps in a subclass for this client only, so nothing global changes. The TLS trust is a
    separate matter: pass `ssl_context=fake.tls.client_context()` to APNs(...).
    """
    if fake.port is None:
        raise RuntimeError("start the fake first")
    base = client.pool.protocol_class
    client.pool.protocol_class = type(
        f"{base.__name__}ToFake", (base,), {"APNS_SERVER": fake.host, "APNS_PORT": fake.port}
    )


# -- process entry point (benchmarks) ---------------------------------------------------------


def _main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fakes.apns",
        description="Run the APNs fake until SIGTERM/SIGINT or stdin closes; print stats as JSON.",
    )
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on start)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--cert", required=True, type=Path, help="server certificate PEM")
    parser.add_argument("--key", required=True, type=Path, help="server private key PEM")
    parser.add_argument("--ca", type=Path, help="CA PEM (needed with --client-cert-auth)")
    parser.add_argument("--topic", required=True)
    parser.add_argument("--public-key", type=Path, help="PEM public key verifying provider tokens")
    parser.add_argument("--key-id")
    parser.add_argument("--team-id")
    parser.add_argument("--client-cert-auth", action="store_true")
    parser.add_argument("--max-streams", type=int, default=1000)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument(
        "--no-header-validation", action="store_true", help="skip h2's inbound header checks (~1/3 less CPU)"
    )
    parser.add_argument("--ignore-stdin", action="store_true", help="stop on signals only")
    args = parser.parse_args(argv)

    tls = TLSMaterial(directory=args.cert.parent, ca_cert=args.ca, server_cert=args.cert, server_key=args.key)
    fake = APNsFake(
        tls,
        topic=args.topic,
        key_id=args.key_id,
        team_id=args.team_id,
        public_key_pem=args.public_key.read_bytes() if args.public_key else None,
        client_cert_auth=args.client_cert_auth,
        max_streams=args.max_streams,
        validate_headers=not args.no_header_validation,
        record=False,  # the stats only need counters
        host=args.host,
        port=args.port,
    )
    fake.delay = args.delay
    done = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    fake.start()
    print(json.dumps({"event": "ready", "port": fake.port, "endpoint": fake.endpoint}), flush=True)
    if not args.ignore_stdin:

        def watch_stdin() -> None:
            try:
                while sys.stdin.buffer.read1(65536):
                    pass
            except (OSError, ValueError):
                pass
            done.set()

        threading.Thread(target=watch_stdin, name="stdin-watch", daemon=True).start()
    while not done.wait(0.5):
        pass
    stats = fake.stats()
    fake.stop()
    print(json.dumps({"event": "stats", **stats}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())
