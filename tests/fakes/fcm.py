"""A loopback fake of Google's FCM HTTP v1 API and of the OAuth2 token endpoint it needs.

Two listeners on 127.0.0.1, each on its own free port:
- HTTPS HTTP/1.1 (keep-alive), `http.server.ThreadingHTTPServer` + `ssl`, one thread per
  connection: `/token` and `messages:send` (`base_url`, `token_uri`, `send_url()`).
- HTTP/2 over TLS (ALPN "h2" only), served with `h2` on an asyncio loop in a thread of its
  own: `messages:send` only (`base_url_h2`, `send_url_h2()`); `http2=False` does not start it.

Google's behaviour: fcm.googleapis.com speaks HTTP/1.1 and HTTP/2 (chosen by ALPN) on one
port, and its front-ends advertise SETTINGS_MAX_CONCURRENT_STREAMS=100; the token endpoint
is another host (oauth2.googleapis.com), which google-auth reaches over `requests`
(HTTP/1.1). The fake's behaviour: one port per protocol (the h2 one offers only "h2"),
`/token` on HTTP/1.1 only; MAX_CONCURRENT_STREAMS = `max_streams` (100), enforced once the
client has acknowledged the fake's SETTINGS (streams opened before that are served, as RFC
9113 allows): a stream past it gets RST_STREAM REFUSED_STREAM, counted in `refused_streams`.
Received DATA is acknowledged as soon as it is read (h2 hands the window back in steps of
half of it: 32 KiB). `delay` holds each answer back on a timer of its own, so one delayed
stream never holds up another stream or connection. Both listeners judge, script, delay and
record messages:send through one code path, and answer the same status, JSON body and
headers (content-type, content-length, vary, retry-after). Bodies of 404 (unknown path) and
405 (a send path without POST) are the fake's. CPU on this project's 2-core machine: about
170 us per HTTP/2 request (~6,000/s from bench.ceiling's h2 client), about 360 us per
HTTP/1.1 request (~2,600/s from 32 keep-alive `http.client` connections).

- `POST /token`: OAuth2 JWT-bearer grant (`grant_type=urn:ietf:params:oauth:grant-type:
  jwt-bearer&assertion=<JWT>`) as google-auth sends it for a service account: RS256, iss ==
  a registered service account's client_email, aud == "https://oauth2.googleapis.com/token"
  (google-auth always signs for that audience, whatever token_uri says; the fake's own
  token_uri is accepted too), short-lived iat/exp, a scope. Answers `{"access_token",
  "expires_in", "token_type": "Bearer"}`; problems are 400 `{"error": "invalid_grant" |
  "invalid_scope" | ..., "error_description"}`.
- `POST /v1/projects/<project>/messages:send` with `Authorization: Bearer <access token the
  fake issued>`: validated like Google does (recipient set, token format, data values are
  strings, reserved data keys, unknown fields, size) and answered with Google's error JSON
  shape: `{"error": {"code", "message", "status", "details": [...FcmError / BadRequest /
  ErrorInfo...]}}`; success is `{"name": "projects/<p>/messages/<id>"}` (`validate_only`
  answers `.../messages/fake_message_id` like Google's dry run).

Where Google's exact wording is unknown the message text is the fake's, but code, status and
the FcmError errorCode / ErrorInfo reason follow Google's documentation. A project the
service account may not send for is 403 PERMISSION_DENIED with an ErrorInfo
(IAM_PERMISSION_DENIED) and *no* FcmError — that is what Google answers; SENDER_ID_MISMATCH
(an FcmError) only comes from a script.

Scripting/recording: see `tests.fakes.ScriptedRecorder` (script, set_default, delay,
received, wait_for, sent_tokens) plus `connections_opened` (both listeners),
`h2_connections`, `refused_streams`, `max_concurrent_seen`, `tokens_issued`,
`expire_access_tokens()`, `stats()`.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import socket
import socketserver
import ssl
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography.hazmat.primitives import serialization
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    RequestReceived,
    SettingsAcknowledged,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import SettingCodes

from tests.fakes import Scripted, ScriptedRecorder, stop_loop_thread
from tests.fakes.h2server import UNLIMITED, AdvertisedSettings, H2Writing, install_huffman_memo, serve_forever
from tests.fakes.tls import TLSMaterial

__all__ = ["FCMFake", "FCMRequest", "FCM_ERRORS", "GOOGLE_TOKEN_AUDIENCE", "point_pyfcm_at"]

GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
FCM_SCOPES = ("https://www.googleapis.com/auth/firebase.messaging", "https://www.googleapis.com/auth/cloud-platform")
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"
ERROR_INFO_TYPE = "type.googleapis.com/google.rpc.ErrorInfo"
MAX_MESSAGE = 4096
MAX_TOPIC_MESSAGE = 2048
MAX_BODY = 1 << 20  # request bodies past this are refused before they are judged
#: Google's front-ends advertise this SETTINGS_MAX_CONCURRENT_STREAMS.
GOOGLE_MAX_STREAMS = 100

#: FcmError errorCode -> (HTTP status, canonical status, message)
FCM_ERRORS: Dict[str, Tuple[int, str, str]] = {
    "UNREGISTERED": (404, "NOT_FOUND", "Requested entity was not found."),
    "INVALID_ARGUMENT": (400, "INVALID_ARGUMENT", "The registration token is not a valid FCM registration token"),
    "SENDER_ID_MISMATCH": (403, "PERMISSION_DENIED", "SenderId mismatch"),
    "QUOTA_EXCEEDED": (429, "RESOURCE_EXHAUSTED", "Quota exceeded for sending messages."),
    "UNAVAILABLE": (503, "UNAVAILABLE", "The service is currently unavailable."),
    "INTERNAL": (500, "INTERNAL", "Internal error encountered."),
    "THIRD_PARTY_AUTH_ERROR": (401, "UNAUTHENTICATED", "Auth error from APNS or Web Push Service"),
    "UNSPECIFIED_ERROR": (500, "INTERNAL", "Internal error encountered."),
}
#: error code used when a script gives only a status
DEFAULT_ERROR_CODES = {
    400: "INVALID_ARGUMENT",
    401: "THIRD_PARTY_AUTH_ERROR",
    403: "SENDER_ID_MISMATCH",
    404: "UNREGISTERED",
    429: "QUOTA_EXCEEDED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}
_CANONICAL = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    501: "NOT_IMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_MESSAGE_FIELDS = frozenset(
    {"name", "data", "notification", "android", "webpush", "apns", "fcm_options", "fcmOptions", "token", "topic", "condition"}
)
_REQUEST_FIELDS = frozenset({"message", "validate_only", "validateOnly"})
_RESERVED_DATA_KEYS = frozenset({"from", "gcm", "message_type", "notification"})
_SEND_RE = re.compile(r"/v1/projects/([^/]+)/messages:send")
_FCM_TOKEN_RE = re.compile(r"[A-Za-z0-9_:.\-]{1,4096}")
_UNAUTHENTICATED_MSG = (
    "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie "
    "or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project."
)
_MISSING_CREDENTIALS_MSG = (
    "Request is missing required authentication credential. Expected OAuth 2 access token, login "
    "cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project."
)


@dataclass
class FCMRequest:
    """One answered messages:send request (token-endpoint calls are not recorded here)."""

    token: Optional[str]
    message: Dict[str, Any]
    status: int
    at: float  # time.time() when answered
    error_code: Optional[str] = None  # FcmError errorCode, else the canonical status
    validate_only: bool = False
    project: Optional[str] = None


@dataclass
class _ServiceAccount:
    client_email: str
    public_key: Any
    private_key_id: Optional[str]


@dataclass
class _AccessToken:
    client_email: str
    scopes: Tuple[str, ...]
    expires_at: float  # time.monotonic()


def google_error(
    status: int, message: str, details: Optional[List[Dict[str, Any]]] = None, canonical: Optional[str] = None
) -> Dict[str, Any]:
    error: Dict[str, Any] = {"code": status, "message": message, "status": canonical or _CANONICAL.get(status, "UNKNOWN")}
    if details:
        error["details"] = details
    return {"error": error}


def fcm_error(code: str, status: Optional[int] = None, message: Optional[str] = None) -> Tuple[int, Dict[str, Any]]:
    """Google's body for an FcmError errorCode (status/message default from FCM_ERRORS)."""
    known = FCM_ERRORS.get(code)
    http_status = status or (known[0] if known else 500)
    if known and known[0] == http_status:
        canonical, text = known[1], known[2]
    else:
        canonical, text = _CANONICAL.get(http_status, "UNKNOWN"), (known[2] if known else "Unknown error.")
    body = google_error(http_status, message or text, [{"@type": FCM_ERROR_TYPE, "errorCode": code}], canonical)
    return http_status, body


def _bad_request(message: str, field: Optional[str] = None, fcm_code: Optional[str] = None) -> Tuple[int, Dict[str, Any]]:
    violation: Dict[str, str] = {"description": message}
    if field is not None:
        violation = {"field": field, "description": message}
    details: List[Dict[str, Any]] = [{"@type": BAD_REQUEST_TYPE, "fieldViolations": [violation]}]
    if fcm_code:
        details.append({"@type": FCM_ERROR_TYPE, "errorCode": fcm_code})
    return 400, google_error(400, message, details)


def _auth_error(status: int, message: str, reason: str) -> Tuple[int, Dict[str, Any]]:
    return status, google_error(
        status,
        message,
        [
            {
                "@type": ERROR_INFO_TYPE,
                "reason": reason,
                "domain": "googleapis.com",
                "metadata": {"service": "fcm.googleapis.com", "method": "google.firebase.fcm.v1.FcmService.SendMessage"},
            }
        ],
    )


def _encode_answer(
    doc: Dict[str, Any], retry_after: Optional[int] = None, cache_control: Optional[str] = None
) -> Tuple[bytes, List[Tuple[str, str]]]:
    """Body and headers (status aside) of one answer, as Google writes them; both listeners use it."""
    body = json.dumps(doc, indent=2).encode("utf-8")
    headers = [
        ("Content-Type", "application/json; charset=UTF-8"),
        ("Content-Length", str(len(body))),
        ("Vary", "Origin, X-Origin, Referer"),
    ]
    if retry_after is not None:
        headers.append(("Retry-After", str(retry_after)))
    if cache_control:
        headers.append(("Cache-Control", cache_control))
    return body, headers


def _not_found(path: str) -> Tuple[int, Dict[str, Any]]:
    return 404, google_error(404, f"The requested URL {path} was not found on this server.")


def _method_not_allowed() -> Tuple[int, Dict[str, Any]]:
    return 405, google_error(405, "Method not allowed.", canonical="UNIMPLEMENTED")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: Tuple[str, int], fake: "FCMFake") -> None:
        self.fake = fake
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a DNS lookup; not needed here.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = host
        self.server_port = port

    def verify_request(self, request: Any, client_address: Any) -> bool:
        self.fake._count_connection()
        return True

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        exc = sys.exc_info()[1]
        self.fake.server_errors.append(repr(exc))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ESF"
    sys_version = ""
    disable_nagle_algorithm = True
    timeout = 60  # idle keep-alive connections are dropped after this
    server: _Server

    def setup(self) -> None:
        fake = self.server.fake
        raw: socket.socket = self.request
        raw.settimeout(10)
        tls_sock = fake._ssl_ctx.wrap_socket(raw, server_side=True)  # handshake in this thread
        self.request = tls_sock
        fake._track(tls_sock, threading.current_thread())
        super().setup()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.fake._untrack(self.request, threading.current_thread())
            try:
                self.request.close()
            except OSError:
                pass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        fake = self.server.fake
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self._reply(411, google_error(411, "Length required."))
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY:
            self._reply(400, google_error(400, "Bad Content-Length."))
            return
        body = self.rfile.read(length) if length else b""
        path = urlsplit(self.path).path
        if path == "/token":
            status, doc = fake._token_endpoint(body)
            self._reply(status, doc, cache_control="no-cache, no-store, max-age=0, must-revalidate")
            return
        match = _SEND_RE.fullmatch(path)
        if match is None:
            self._reply(*_not_found(path))
            return
        status, doc, retry_after, record, delay = fake._judge(match.group(1), self.headers.get("Authorization"), body)
        if delay > 0:
            fake._stopping.wait(delay)
        fake._record_send(record)
        self._reply(status, doc, retry_after=retry_after)

    def do_GET(self) -> None:  # noqa: N802
        path = urlsplit(self.path).path
        self._reply(*(_method_not_allowed() if _SEND_RE.fullmatch(path) else _not_found(path)))

    def _reply(
        self, status: int, doc: Dict[str, Any], retry_after: Optional[int] = None, cache_control: Optional[str] = None
    ) -> None:
        body, headers = _encode_answer(doc, retry_after, cache_control)
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)


# -- HTTP/2 listener (asyncio loop thread) ------------------------------------------------------


class _H2Stream:
    __slots__ = ("method", "path", "authorization", "body", "oversize", "done", "timer")

    def __init__(self, headers: Sequence[Tuple[bytes, bytes]]) -> None:
        self.method = b""
        self.path = b""
        self.authorization: Optional[bytes] = None
        for name, value in headers:
            if name == b":method":
                self.method = value
            elif name == b":path":
                self.path = value
            elif name == b"authorization":
                self.authorization = value
        self.body = bytearray()
        self.oversize = False
        self.done = False
        self.timer: Optional[asyncio.TimerHandle] = None


class _H2Connection(H2Writing, asyncio.Protocol):
    """One HTTP/2 client connection: h2 state, its streams, the stream limit in force."""

    def __init__(self, fake: "FCMFake") -> None:
        self.fake = fake
        self.transport: Optional[asyncio.Transport] = None
        self.h2: Optional[H2Connection] = None
        self.streams: Dict[int, _H2Stream] = {}
        self.in_flight = 0
        self.limit = UNLIMITED  # RFC 9113's default until the client acknowledges our SETTINGS
        self.closed = False
        self.flush_scheduled = False
        #: stream id -> the part of its answer's body still waiting for flow-control window
        self.pending_bodies: Dict[int, bytes] = {}
        self.alpn: Optional[str] = None

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.alpn = ssl_object.selected_alpn_protocol()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.fake._h2_register(self)
        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        # h2 would enforce its advertised limit as a connection error, and before the client
        # has acknowledged it; the fake refuses single streams instead (see _on_request).
        self.h2.local_settings = AdvertisedSettings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: self.fake.max_streams,
                SettingCodes.MAX_HEADER_LIST_SIZE: H2Connection.DEFAULT_MAX_HEADER_LIST_SIZE,
            },
        )
        self.h2.initiate_connection()
        self._flush_now()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        h2c = self.h2
        assert h2c is not None
        try:
            events = h2c.receive_data(data)
        except ProtocolError:
            self._flush_now()  # h2 queued a GOAWAY
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
                self.limit = self.fake.max_streams
            elif kind is WindowUpdated or kind is RemoteSettingsChanged:
                if self.pending_bodies:
                    self._send_pending_bodies()
            elif kind is StreamReset:
                self._on_reset(event.stream_id)
            elif kind is ConnectionTerminated:
                self._flush_now()
                self._close()
                return
        # one write per read, however many streams it answered
        self._flush_now()

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.closed = True
        for stream in self.streams.values():
            if stream.timer is not None:
                stream.timer.cancel()
        self.streams.clear()
        self.pending_bodies.clear()
        self.fake._h2_unregister(self)

    # -- streams -------------------------------------------------------------------------------

    def _on_request(self, stream_id: int, headers: Sequence[Tuple[bytes, bytes]]) -> None:
        if self.in_flight >= self.limit:
            assert self.h2 is not None
            self.h2.reset_stream(stream_id, ErrorCodes.REFUSED_STREAM)
            self.fake.refused_streams += 1
            return
        self.streams[stream_id] = _H2Stream(headers)
        self.in_flight += 1
        if self.in_flight > self.fake.max_concurrent_seen:
            self.fake.max_concurrent_seen = self.in_flight

    def _on_data(self, stream_id: int, data: bytes, flow_controlled_length: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None and not stream.oversize:
            if len(stream.body) + len(data) > MAX_BODY:
                stream.oversize = True
                stream.body = bytearray()
            else:
                stream.body += data
        if flow_controlled_length:
            # handed back at once (refused and reset streams too), else the connection's
            # window would close after 64 KiB of requests
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

    def _on_stream_ended(self, stream_id: int) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or stream.done:
            return
        fake = self.fake
        path = urlsplit(stream.path.decode("latin-1")).path
        match = _SEND_RE.fullmatch(path)
        if match is None:
            self._answer(stream_id, *_not_found(path))
            return
        if stream.method != b"POST":
            self._answer(stream_id, *_method_not_allowed())
            return
        if stream.oversize:
            self._answer(stream_id, 400, google_error(400, "Bad Content-Length."))
            return
        authorization = stream.authorization.decode("latin-1") if stream.authorization is not None else None
        status, doc, retry_after, record, delay = fake._judge(match.group(1), authorization, bytes(stream.body))
        if delay > 0:
            # this stream's own timer: the loop keeps serving every other stream meanwhile
            loop = asyncio.get_running_loop()
            stream.timer = loop.call_later(delay, self._answer_later, stream_id, status, doc, retry_after, record)
        else:
            self._answer(stream_id, status, doc, retry_after, record)

    def _answer_later(
        self, stream_id: int, status: int, doc: Dict[str, Any], retry_after: Optional[int], record: FCMRequest
    ) -> None:
        if self.closed:
            return
        self._answer(stream_id, status, doc, retry_after, record)
        self._schedule_flush()

    def _answer(
        self,
        stream_id: int,
        status: int,
        doc: Dict[str, Any],
        retry_after: Optional[int] = None,
        record: Optional[FCMRequest] = None,
    ) -> None:
        stream = self.streams.pop(stream_id, None)
        if stream is None or stream.done:
            return
        stream.done = True
        self.in_flight -= 1
        if record is not None:
            self.fake._record_send(record)
        body, headers = _encode_answer(doc, retry_after)
        h2_headers = [(b":status", str(status).encode())]
        h2_headers += [(name.lower().encode(), value.encode()) for name, value in headers]
        h2c = self.h2
        assert h2c is not None
        try:
            h2c.send_headers(stream_id, h2_headers)
            self._send_body(stream_id, body)
        except StreamClosedError:
            self.pending_bodies.pop(stream_id, None)

    def _send_body(self, stream_id: int, body: bytes) -> None:
        """Send what the flow-control window allows; park the rest until the client opens it."""
        h2c = self.h2
        assert h2c is not None
        window = h2c.local_flow_control_window(stream_id)
        frame = h2c.max_outbound_frame_size
        while body and window > 0:
            chunk = body[: min(window, frame)]
            body = body[len(chunk):]
            window -= len(chunk)
            h2c.send_data(stream_id, chunk, end_stream=not body)
        if body:
            self.pending_bodies[stream_id] = body
            self.fake.flow_control_stalls += 1

    def _send_pending_bodies(self) -> None:
        for stream_id, body in list(self.pending_bodies.items()):
            del self.pending_bodies[stream_id]
            try:
                self._send_body(stream_id, body)
            except StreamClosedError:
                self.pending_bodies.pop(stream_id, None)

class FCMFake(ScriptedRecorder[FCMRequest]):
    """HTTPS fake of fcm.googleapis.com (v1) + oauth2.googleapis.com/token on 127.0.0.1.

    HTTP/1.1 on `port` (free unless given), and, unless `http2=False`, HTTP/2 on `port_h2`
    (free unless `port_h2` is given) advertising `max_streams` concurrent streams.
    """

    def __init__(
        self,
        tls: TLSMaterial,
        *,
        project_id: str = "test-project",
        access_token_ttl: int = 3600,
        quota_retry_after: int = 1,
        record: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
        http2: bool = True,
        max_streams: int = GOOGLE_MAX_STREAMS,
        port_h2: int = 0,
    ) -> None:
        super().__init__(record=record)
        if not 1 <= max_streams <= UNLIMITED:
            raise ValueError(f"max_streams out of range: {max_streams}")
        self.tls = tls
        self.project_id = project_id
        self.access_token_ttl = access_token_ttl
        #: Retry-After (s) sent with a 429 whose script/default gives none.
        self.quota_retry_after = quota_retry_after
        self.host = host
        self._requested_port = port
        self.port: Optional[int] = None
        self.http2 = http2
        self.max_streams = max_streams
        self._requested_port_h2 = port_h2
        self.port_h2: Optional[int] = None
        #: TCP connections accepted, on both listeners (token endpoint and messages:send alike).
        self.connections_opened = 0
        #: HTTP/2 connections accepted (TLS handshake done; also counted in connections_opened).
        self.h2_connections = 0
        #: HTTP/2 streams refused (RST_STREAM REFUSED_STREAM) for exceeding max_streams.
        self.refused_streams = 0
        #: Most HTTP/2 streams in flight at once on one connection.
        self.max_concurrent_seen = 0
        #: HTTP/2 answers whose body had to wait for the client to open its flow-control window.
        self.flow_control_stalls = 0
        #: Access tokens handed out by /token.
        self.tokens_issued = 0
        #: Exceptions raised in connection threads or reported by the HTTP/2 loop (TLS handshake
        #: failures, resets), as text.
        self.server_errors: List[str] = []
        self._accounts: Dict[str, _ServiceAccount] = {}
        self._tokens: Dict[str, _AccessToken] = {}
        self._lock = threading.Lock()
        self._open: Set[ssl.SSLSocket] = set()
        self._threads: Set[threading.Thread] = set()
        self._stopping = threading.Event()
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None
        self._ssl_ctx = tls.server_context(alpn=("http/1.1",))
        self._h2_conns: Set[_H2Connection] = set()
        self._h2_loop: Optional[asyncio.AbstractEventLoop] = None
        self._h2_thread: Optional[threading.Thread] = None

    # -- control ---------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """What pyfcm calls FCM_END_POINT_BASE."""
        return f"https://{self.host}:{self._port()}/v1/projects"

    @property
    def token_uri(self) -> str:
        return f"https://{self.host}:{self._port()}/token"

    def send_url(self, project_id: Optional[str] = None) -> str:
        return f"{self.base_url}/{project_id or self.project_id}/messages:send"

    @property
    def base_url_h2(self) -> str:
        """The HTTP/2 listener's base URL (https://127.0.0.1:<port_h2>/v1/projects)."""
        if self.port_h2 is None:
            raise RuntimeError("FCMFake's HTTP/2 listener is not running (not started, or http2=False)")
        return f"https://{self.host}:{self.port_h2}/v1/projects"

    def send_url_h2(self, project_id: Optional[str] = None) -> str:
        """messages:send on the HTTP/2 listener."""
        return f"{self.base_url_h2}/{project_id or self.project_id}/messages:send"

    def add_service_account(
        self, client_email: str, public_key_pem: bytes | str, private_key_id: Optional[str] = None
    ) -> None:
        """Accept JWT assertions signed by this account's key (kid checked when given)."""
        pem = public_key_pem.encode() if isinstance(public_key_pem, str) else public_key_pem
        account = _ServiceAccount(client_email, serialization.load_pem_public_key(pem), private_key_id)
        with self._lock:
            self._accounts[client_email] = account

    def expire_access_tokens(self) -> None:
        """Make every access token issued so far expired (Google then answers 401
        UNAUTHENTICATED with ErrorInfo reason ACCESS_TOKEN_EXPIRED)."""
        with self._lock:
            for token in self._tokens.values():
                token.expires_at = 0.0

    def start(self) -> "FCMFake":
        """Start the HTTP/1.1 listener and (http2=True) the HTTP/2 one; a fake starts once."""
        if self._thread is not None:
            raise RuntimeError("FCMFake already started")
        self._server = _Server((self.host, self._requested_port), self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name=f"FCMFake-{self.port}", daemon=True
        )
        self._thread.start()
        if self.http2:
            try:
                self._start_h2()
            except BaseException:
                self.stop()
                raise
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, drop every open connection, join the threads (bounded)."""
        deadline = time.monotonic() + timeout
        self._stop_h2(timeout)
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        with self._lock:
            sockets = list(self._open)
            threads = list(self._threads)
        for sock in sockets:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass
        thread.join(max(0.0, deadline - time.monotonic()))
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._server = None

    def __enter__(self) -> "FCMFake":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stats(self) -> Dict[str, Any]:
        return {
            "answered": self.answered,
            "statuses": {str(k): v for k, v in sorted(self.statuses().items())},
            "connections_opened": self.connections_opened,
            "h2_connections": self.h2_connections,
            "refused_streams": self.refused_streams,
            "max_concurrent_seen": self.max_concurrent_seen,
            "tokens_issued": self.tokens_issued,
        }

    # -- the HTTP/2 listener -------------------------------------------------------------------

    def _start_h2(self) -> None:
        ssl_ctx = self.tls.server_context(alpn=("h2",))
        # clients send `authorization` as a never-indexed literal: one Huffman decode per request
        install_huffman_memo()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self._requested_port_h2))
            sock.listen(1024)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        port = sock.getsockname()[1]
        self._h2_loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: List[BaseException] = []
        self._h2_thread = threading.Thread(
            target=self._run_h2, args=(sock, ssl_ctx, ready, failure), name=f"FCMFake-h2-{port}", daemon=True
        )
        self._h2_thread.start()
        if not ready.wait(10):
            raise RuntimeError("FCMFake's HTTP/2 listener did not start within 10 s")
        if failure:
            self._h2_thread.join(5)
            raise RuntimeError("FCMFake's HTTP/2 listener failed to start") from failure[0]
        self.port_h2 = port

    def _stop_h2(self, timeout: float) -> None:
        stop_loop_thread(self._h2_loop, self._h2_thread, timeout)
        self._h2_loop = None

    def _run_h2(
        self, sock: socket.socket, ssl_ctx: ssl.SSLContext, ready: threading.Event, failure: List[BaseException]
    ) -> None:
        assert self._h2_loop is not None
        serve_forever(self._h2_loop, lambda: _H2Connection(self), sock, ssl_ctx, ready, failure,
                      lambda: self._h2_conns, self._on_loop_exception)

    def _on_loop_exception(self, loop: asyncio.AbstractEventLoop, context: Dict[str, Any]) -> None:
        self.server_errors.append(f"{context.get('message')}: {context.get('exception')!r}")

    def _h2_register(self, conn: _H2Connection) -> None:
        with self._lock:
            self.connections_opened += 1
            self.h2_connections += 1
        self._h2_conns.add(conn)

    def _h2_unregister(self, conn: _H2Connection) -> None:
        self._h2_conns.discard(conn)

    # -- connection bookkeeping (handler threads) -------------------------------------------

    def _port(self) -> int:
        if self.port is None:
            raise RuntimeError("FCMFake not started")
        return self.port

    def _count_connection(self) -> None:
        with self._lock:
            self.connections_opened += 1

    def _track(self, sock: ssl.SSLSocket, thread: threading.Thread) -> None:
        with self._lock:
            self._open.add(sock)
            self._threads.add(thread)

    def _untrack(self, sock: Any, thread: threading.Thread) -> None:
        with self._lock:
            self._open.discard(sock)
            self._threads.discard(thread)

    # -- /token -----------------------------------------------------------------------------

    def _token_endpoint(self, body: bytes) -> Tuple[int, Dict[str, Any]]:
        def fail(error: str, description: str) -> Tuple[int, Dict[str, Any]]:
            return 400, {"error": error, "error_description": description}

        form = parse_qs(body.decode("utf-8", "replace"))
        grant_type = (form.get("grant_type") or [""])[0]
        if grant_type != JWT_BEARER:
            return fail("unsupported_grant_type", f"Invalid grant_type: {grant_type}")
        assertion = (form.get("assertion") or [""])[0]
        if not assertion:
            return fail("invalid_request", "Missing required parameter: assertion")
        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.InvalidTokenError:
            return fail("invalid_grant", "Invalid JWT: could not be decoded.")
        with self._lock:
            account = self._accounts.get(unverified.get("iss", ""))
        if account is None:
            return fail("invalid_grant", "Invalid grant: account not found")
        if header.get("alg") != "RS256" or (
            account.private_key_id is not None and header.get("kid") not in (None, account.private_key_id)
        ):
            return fail("invalid_grant", "Invalid JWT Signature.")
        try:
            claims = jwt.decode(
                assertion,
                account.public_key,
                algorithms=["RS256"],
                audience=[GOOGLE_TOKEN_AUDIENCE, self.token_uri],
                options={"require": ["iat", "exp", "iss", "aud"], "verify_exp": False, "verify_iat": False},
            )
        except jwt.InvalidAudienceError:
            return fail(
                "invalid_grant", f"Invalid JWT: Failed audience check. The right audience is {GOOGLE_TOKEN_AUDIENCE}"
            )
        except jwt.InvalidSignatureError:
            return fail("invalid_grant", "Invalid JWT Signature.")
        except jwt.InvalidTokenError as exc:
            return fail("invalid_grant", f"Invalid JWT: {exc}")
        now = time.time()
        iat, exp = claims["iat"], claims["exp"]
        if not (isinstance(iat, (int, float)) and isinstance(exp, (int, float))) or (
            iat > now + 300 or exp < now - 300 or exp - iat > 3600 or exp <= iat
        ):
            return fail(
                "invalid_grant",
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. "
                "Check your iat and exp values in the JWT claim.",
            )
        scopes = tuple(str(claims.get("scope") or "").split())
        if not scopes:
            return fail("invalid_scope", "Empty or missing scope not allowed.")
        token = "ya29.fake-" + secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = _AccessToken(account.client_email, scopes, time.monotonic() + self.access_token_ttl)
            self.tokens_issued += 1
        return 200, {"access_token": token, "expires_in": self.access_token_ttl, "token_type": "Bearer"}

    # -- messages:send ------------------------------------------------------------------------

    # Both listeners answer a messages:send the same way: _judge(), wait `delay` (that request
    # only), _record_send(record), then write status + _encode_answer(doc, retry_after).

    def _judge(
        self, project: str, authorization: Optional[str], body: bytes
    ) -> Tuple[int, Dict[str, Any], Optional[int], FCMRequest, float]:
        """Judge one send: (status, JSON doc, Retry-After, record, delay in seconds).
        Consumes a scripted answer; `delay` is read here, once per request."""
        status, doc, retry_after, record = self._send(project, authorization, body)
        return status, doc, retry_after, record, self.delay

    def _record_send(self, record: FCMRequest) -> None:
        """Record one judged send as answered, just before its answer is written (after any
        delay), so that a client holding its answer finds it recorded."""
        record.at = time.time()
        self._record(record, record.token, record.status, record.status == 200 and not record.validate_only)

    def _send(
        self, project: str, authorization: Optional[str], body: bytes
    ) -> Tuple[int, Dict[str, Any], Optional[int], FCMRequest]:
        """Validate, authenticate and script one send; returns (status, JSON doc, Retry-After, record)."""
        request_doc: Any = None
        try:
            request_doc = json.loads(body) if body else None
        except ValueError:
            pass
        message = request_doc.get("message") if isinstance(request_doc, dict) else None
        if not isinstance(message, dict):
            message = {}
        token = message.get("token") if isinstance(message.get("token"), str) else None
        validate_only = bool(
            isinstance(request_doc, dict) and (request_doc.get("validate_only") or request_doc.get("validateOnly"))
        )

        def answer(status: int, doc: Dict[str, Any], retry_after: Optional[int] = None, code: Optional[str] = None):
            if code is None and status != 200:
                details = doc.get("error", {}).get("details", [])
                fcm = [d.get("errorCode") for d in details if d.get("@type") == FCM_ERROR_TYPE]
                code = fcm[0] if fcm else doc.get("error", {}).get("status")
            record = FCMRequest(token, message, status, time.time(), code, validate_only, project)
            return status, doc, retry_after, record

        # authentication, then authorization
        if not authorization:
            return answer(*_auth_error(401, _MISSING_CREDENTIALS_MSG, "CREDENTIALS_MISSING"))
        scheme, _, bearer = authorization.partition(" ")
        with self._lock:
            access = self._tokens.get(bearer.strip()) if scheme.lower() == "bearer" else None
        if access is None:
            return answer(*_auth_error(401, _UNAUTHENTICATED_MSG, "ACCESS_TOKEN_TYPE_UNSUPPORTED"))
        if access.expires_at <= time.monotonic():
            return answer(*_auth_error(401, _UNAUTHENTICATED_MSG, "ACCESS_TOKEN_EXPIRED"))
        if not any(scope in FCM_SCOPES for scope in access.scopes):
            return answer(
                *_auth_error(403, "Request had insufficient authentication scopes.", "ACCESS_TOKEN_SCOPE_INSUFFICIENT")
            )
        if project != self.project_id:
            return answer(
                *_auth_error(
                    403,
                    f"Permission 'cloudmessaging.messages.create' denied on resource "
                    f"'//cloudresourcemanager.googleapis.com/projects/{project}' (or it may not exist).",
                    "IAM_PERMISSION_DENIED",
                )
            )

        # the request itself
        problem = self._validate(request_doc)
        if problem is not None:
            return answer(*problem)

        scripted: Optional[Scripted] = self._scripted_answer(token)
        if scripted is not None and scripted.status != 200:
            code = scripted.reason or DEFAULT_ERROR_CODES.get(scripted.status, "UNSPECIFIED_ERROR")
            status, doc = fcm_error(code, scripted.status)
            retry_after = scripted.retry_after
            if retry_after is None and status == 429:
                retry_after = self.quota_retry_after
            return answer(status, doc, retry_after, code)
        message_id = "fake_message_id" if validate_only else f"{int(time.time() * 1000)}{secrets.randbelow(10**6):06d}"
        return answer(200, {"name": f"projects/{project}/messages/{message_id}"})

    def _validate(self, request_doc: Any) -> Optional[Tuple[int, Dict[str, Any]]]:
        if not isinstance(request_doc, dict):
            return _bad_request("Invalid JSON payload received. Expected a JSON object.")
        for name in request_doc:
            if name not in _REQUEST_FIELDS:
                return _bad_request(f'Invalid JSON payload received. Unknown name "{name}": Cannot find field.')
        message = request_doc.get("message")
        if not isinstance(message, dict):
            return _bad_request("Recipient of the message is not set.", "message", "INVALID_ARGUMENT")
        for name in message:
            if name not in _MESSAGE_FIELDS:
                return _bad_request(
                    f"Invalid JSON payload received. Unknown name \"{name}\" at 'message': Cannot find field.",
                    "message",
                )
        targets = [k for k in ("token", "topic", "condition") if message.get(k)]
        if not targets:
            return _bad_request("Recipient of the message is not set.", "message", "INVALID_ARGUMENT")
        if len(targets) > 1:
            return _bad_request(
                "Invalid value at 'message' (oneof), oneof field 'target' is already set.", "message"
            )
        token = message.get("token")
        if "token" in targets and (not isinstance(token, str) or not _FCM_TOKEN_RE.fullmatch(token)):
            return fcm_error("INVALID_ARGUMENT", 400)
        data = message.get("data")
        if data is not None:
            if not isinstance(data, dict):
                return _bad_request(
                    "Invalid value at 'message.data' (type.googleapis.com/google.firebase.fcm.v1.Message.DataEntry)",
                    "message.data",
                )
            for index, (key, value) in enumerate(data.items()):
                if not isinstance(value, str):
                    text = f"Invalid value at 'message.data[{index}].value' (TYPE_STRING), {json.dumps(value)}"
                    return _bad_request(text, f"message.data[{index}].value")
                if key in _RESERVED_DATA_KEYS or key.startswith("google"):
                    return _bad_request(f"Invalid data payload key: {key}", f"message.data[{index}].key", "INVALID_ARGUMENT")
        for name in ("notification", "android", "apns", "webpush"):
            if name in message and not isinstance(message[name], dict):
                return _bad_request(f"Invalid value at 'message.{name}'", f"message.{name}")
        sized = {k: v for k, v in message.items() if k not in ("token", "topic", "condition")}
        size = len(json.dumps(sized, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
        if size > (MAX_MESSAGE if "token" in targets else MAX_TOPIC_MESSAGE):
            # Google answers an oversize message with no details at all.
            return 400, google_error(400, "Request contains an invalid argument.")
        return None


def point_pyfcm_at(client: Any, fake: FCMFake) -> None:
    """Send one `pyfcm.FCMNotification`'s messages to `fake` (instance attribute, nothing global).

    pyfcm builds its URL from `FCM_END_POINT_BASE` the first time `fcm_end_point` is read and
    caches it in `_fcm_end_point`; both are reset here. The OAuth token URL comes from the
    service account JSON's token_uri (make_service_account(..., fake.token_uri)). TLS trust:
    pyfcm's session and google-auth's token request are both plain `requests` sessions, so
    set REQUESTS_CA_BUNDLE to fake.tls.ca_cert (per test: monkeypatch.setenv).
    """
    client.FCM_END_POINT_BASE = fake.base_url
    client._fcm_end_point = None
