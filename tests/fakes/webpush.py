"""A loopback fake of a browser push service: RFC 8030 Web Push, RFC 8291 message encryption
(aes128gcm, RFC 8188), RFC 8292 VAPID; it plays the browser's part too.

HTTPS HTTP/1.1 (keep-alive) on 127.0.0.1, served by aiohttp's low-level server on an asyncio
loop in a thread of its own (one loop, no thread per connection, so hundreds of idle
keep-alive connections cost next to nothing).

- `subscribe()` does what a browser does for `pushManager.subscribe()`: a fresh P-256 key pair
  and a 16-byte auth secret, kept by the fake, and returns `PushSubscription.toJSON()`:
  `{"endpoint": "https://127.0.0.1:<port>/push/<id>", "keys": {"p256dh", "auth"}}`.
- `POST /push/<id>` is judged in this order, first failure wins (answers follow Mozilla
  autopush, whose error body is `{"code", "errno", "error", "message", "more_info"}`;
  `errno` is autopush's where it has one, else null):

  =====================================================================  ======  =====
  check                                                                  status  errno
  =====================================================================  ======  =====
  unknown id                                                             404     102
  id marked gone by `expire()` (with `Cache-Control: max-age=86400`)     410     106
  `Authorization` missing, not the RFC 8292 `vapid` scheme, no `t`/`k`   401     109
  `k` not a base64url uncompressed P-256 point                           401     109
  `k` is not the subscription's applicationServerKey (when it has one)   403     109
  JWT not ES256, malformed, or its signature does not verify under `k`   401     109
  `exp` missing / not a number / not in the future                       401     109
  `exp` more than 24 h ahead                                             401     109
  `aud` other than the endpoint's origin `https://127.0.0.1:<port>`      401     109
  `sub` missing or not starting with `mailto:` / `https:`                401     109
  `TTL` missing or not an integer                                        400     111
  `TTL` negative                                                         400     114
  body without `Content-Encoding`, or one other than `aes128gcm`         400     110
  aes128gcm with `Encryption: salt=` or `Crypto-Key: dh=` headers        400     110
  `Urgency` not very-low / low / normal / high                           400     null
  `Topic` empty, over 32 characters or outside the base64url alphabet    400     113
  body over 4096 bytes                                                   413     104
  body that does not decrypt with the subscription's keys               400     110
  a scripted answer (see below)                                          script
  otherwise: `201 Created`, `Location: https://127.0.0.1:<port>/m/<id>`,
  `TTL: <ttl>` (capped at 60 days, like autopush), empty body            201
  =====================================================================  ======  =====

  A body-less push (RFC 8030 allows it) skips the encoding and decryption checks and is
  recorded with `payload=None`. Other paths are 404, other methods on a push path 405.

Fake-specific behaviour, not a push service's (documented so nobody mistakes it for one's):
- A real push service cannot decrypt; it answers 201 and the browser drops what it cannot
  decrypt. The fake is the browser as well, so such a message is refused 400 instead, for
  the sender's tests to see. Likewise it insists on RFC 8291's framing: one record, a 65-byte
  key id that is a P-256 point.
- Only the RFC 8292 `vapid` scheme is accepted (autopush still takes the draft `WebPush` and
  `Bearer` schemes with `Crypto-Key: p256ecdsa=`).
- A key mismatch with a restricted subscription is 403, as FCM's web push answers (autopush
  answers 401).

Scripting: `script(endpoint, [(status, reason), ...])` answers the next requests to that
endpoint that pass every check above (so a scripted 429 still needs valid VAPID, TTL and
encryption) with these, in order, then 201 again. An entry is a bare status, `(status,
reason)`, `(status, reason, retry_after_seconds)` or `(status, reason, {"Header": "value"})`
(extra answer headers, e.g. `{"Retry-After": "1"}`). A 429 that gives no Retry-After gets
`Retry-After: <quota_retry_after>` (1 s; None leaves it out). A scripted 410 gets autopush's
Cache-Control but does not mark the subscription gone (`expire()` does). A scripted 2xx is
counted as accepted. `set_default(...)` answers every valid request the same way (an
outage) until `set_default(None)`. `expire(endpoint)`: 410 from then on.

Recording: `received` (every answered POST, in answer order, as `WebPushRequest`),
`sent_endpoints()`, `statuses()`, `wait_for(n, timeout)` (accepted pushes),
`wait_answered(n, timeout)`, `connections` (TLS connections accepted, to check reuse),
`server_errors`.

CPU: the JWT signature check is done once per distinct (JWT, key) pair (its claims are still
checked on every request); each message costs one ECDH, three HKDFs and one AES-GCM
decryption. Measured on this project's 2-core machine with an aiohttp client in the same
process (so sharing the GIL with the fake), 3,000 pre-encrypted pushes to 20 subscriptions:
~1,800 requests/s over 50 keep-alive connections, ~1,270/s over 500 (handshakes included),
~1,000/s over 500 when every push carries a JWT of its own.

A fake is started once: start(), stop(), done.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
import socket
import struct
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Deque, Dict, Iterable, List, Mapping, NamedTuple, Optional, Tuple, Union

import http_ece
import jwt
from aiohttp import web
from aiohttp.web_exceptions import HTTPRequestEntityTooLarge
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.fakes import stop_loop_thread
from tests.fakes.h2server import serve_forever
from tests.fakes.tls import TLSMaterial

__all__ = ["WebPushFake", "WebPushRequest", "WebPushScripted", "MAX_PAYLOAD", "MAX_VAPID_EXPIRY"]

#: Largest body accepted (RFC 8030 7.2: a push service must take at least 4096 octets; autopush
#: and FCM take no more).
MAX_PAYLOAD = 4096
#: RFC 8292 4.2 / autopush: a VAPID JWT may not expire more than 24 h from now.
MAX_VAPID_EXPIRY = 24 * 60 * 60
#: autopush caps the TTL it echoes at 60 days (it does not refuse larger ones).
MAX_TTL = 60 * 24 * 60 * 60
#: Bodies are read into memory up to this; past it the fake answers 413 without judging.
MAX_READ = 1 << 20
URGENCIES = frozenset({"very-low", "low", "normal", "high"})
MORE_INFO = "http://autopush.readthedocs.io/en/latest/http.html#error-codes"
_TOPIC_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
_PUSH_RE = re.compile(r"/push/([A-Za-z0-9_-]+)")
_SUB_SCHEMES = ("mailto:", "https:")
_AES128GCM_HEADER = 21  # salt(16) + rs(4) + idlen(1)
_P256_POINT = 65  # uncompressed: 0x04 || X || Y
_TAG = 16
_JWT_CACHE_MAX = 4096


class WebPushScripted(NamedTuple):
    """One scripted answer: HTTP status, reason text (the body's `message`), extra headers."""

    status: int
    reason: Optional[str] = None
    headers: Tuple[Tuple[str, str], ...] = ()


@dataclass
class WebPushRequest:
    """One answered `POST` (errors included), as the fake judged it."""

    endpoint: str  # the endpoint URL the request was for (https://127.0.0.1:<port>/push/<id>)
    headers: Dict[str, str]  # lower-case names
    payload: Any  # decrypted body, parsed when it is JSON, else bytes; None if none/undecrypted
    claims: Optional[Dict[str, Any]]  # the VAPID JWT's claims once its signature verified
    status: int  # what the fake answered
    reason: Optional[str]  # the error message answered (None for 201)
    at: float  # time.time() when answered
    body_size: int = 0  # bytes of the (encrypted) body
    plaintext: Optional[bytes] = None  # the decrypted body as bytes
    message_id: Optional[str] = None  # the id in the 201's Location


@dataclass
class _Subscription:
    sub_id: str
    endpoint: str
    private_key: ec.EllipticCurvePrivateKey
    public_raw: bytes  # 65-byte uncompressed point (p256dh)
    auth: bytes  # 16 bytes
    server_key: Optional[bytes]  # applicationServerKey the subscription is restricted to
    gone: bool = False


class _Rejected(Exception):
    """A check failed: answer `status` with autopush's error body."""

    def __init__(self, status: int, message: str, errno: Optional[int] = None,
                 headers: Tuple[Tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.errno = errno
        self.headers = headers


def b64url_encode(data: bytes) -> str:
    """base64url without padding (how Web Push writes keys and secrets)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode base64url with or without padding; ValueError if it is not base64url."""
    if not re.fullmatch(r"[A-Za-z0-9_-]*={0,2}", text):
        raise ValueError("not base64url")
    text = text.rstrip("=")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _as_scripted(entry: Any) -> WebPushScripted:
    if isinstance(entry, WebPushScripted):
        return entry
    if isinstance(entry, int):
        entry = (entry,)
    entry = tuple(entry)
    if not 1 <= len(entry) <= 3:
        raise ValueError(f"a scripted answer is (status[, reason[, retry_after | headers]]), got {entry!r}")
    status = int(entry[0])
    if not 200 <= status <= 599:
        raise ValueError(f"bad HTTP status {status!r}")
    reason = entry[1] if len(entry) > 1 else None
    extra: Tuple[Tuple[str, str], ...] = ()
    if len(entry) == 3 and entry[2] is not None:
        if isinstance(entry[2], Mapping):
            extra = tuple((str(k), str(v)) for k, v in entry[2].items())
        else:
            extra = (("Retry-After", str(int(entry[2]))),)
    return WebPushScripted(status, reason, extra)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _error_body(status: int, message: str, errno: Optional[int]) -> bytes:
    """autopush's error JSON (autoendpoint/src/error.rs, `impl Serialize for ApiError`)."""
    doc = {"code": status, "errno": errno, "error": _phrase(status), "message": message, "more_info": MORE_INFO}
    return json.dumps(doc).encode("utf-8")


class _CountingServer(web.Server):
    """aiohttp's low-level server, counting connections once their TLS handshake is done
    (asyncio calls the protocol's connection_made only then)."""

    def __init__(self, fake: "WebPushFake", *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fake = fake

    def connection_made(self, handler: Any, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self._fake._count_connection()


class WebPushFake:
    """HTTPS fake of a Web Push service (and of the browsers subscribed to it) on 127.0.0.1.

    `port=0` (the default) takes a free port at `start()`; `quota_retry_after` is the
    Retry-After (s) of a scripted 429 that gives none (None: no header).
    """

    def __init__(
        self,
        tls: TLSMaterial,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        quota_retry_after: Optional[int] = 1,
        record: bool = True,
    ) -> None:
        self.tls = tls
        self.host = host
        self._requested_port = port
        self.port: Optional[int] = None
        self.quota_retry_after = quota_retry_after
        self._record_requests = record
        #: Every answered POST, in answer order (errors included). Empty when record=False.
        self.received: List[WebPushRequest] = []
        #: Exceptions raised while handling a request (answered 500), as text.
        self.server_errors: List[str] = []
        self._cond = threading.Condition()
        self._subs: Dict[str, _Subscription] = {}
        self._scripts: Dict[str, Deque[WebPushScripted]] = {}
        self._default: Optional[WebPushScripted] = None
        self._accepted = 0
        self._answered = 0
        self._sent: Counter = Counter()
        self._statuses: Counter = Counter()
        self._connections = 0
        # (JWT, k) -> claims, for JWTs whose signature verified; the claims are re-checked on
        # every request (exp moves on), the signature is not (it cannot change)
        self._verified: Dict[Tuple[str, str], Dict[str, Any]] = {}
        self._ssl_ctx = tls.server_context(alpn=("http/1.1",))
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._origin = ""

    # -- control (test thread) -----------------------------------------------------------

    @property
    def origin(self) -> str:
        """`https://127.0.0.1:<port>`: what a VAPID JWT's `aud` must be."""
        if self.port is None:
            raise RuntimeError("WebPushFake not started")
        return self._origin

    @property
    def connections(self) -> int:
        """TLS connections accepted so far (handshake completed)."""
        return self._connections

    def start(self) -> "WebPushFake":
        """Listen on `host:port` and serve on a loop thread of its own; a fake starts once."""
        if self._thread is not None:
            raise RuntimeError("WebPushFake already started")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self._requested_port))
            sock.listen(1024)  # 500+ clients may connect at once
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        self._origin = f"https://{self.host}:{self.port}"
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: List[BaseException] = []
        self._thread = threading.Thread(
            target=self._run, args=(sock, ready, failure), name=f"WebPushFake-{self.port}", daemon=True
        )
        self._thread.start()
        if not ready.wait(10):
            self.stop()
            raise RuntimeError("WebPushFake did not start within 10 s")
        if failure:
            self.stop()
            raise RuntimeError("WebPushFake failed to start") from failure[0]
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every connection, join the loop thread (bounded)."""
        stop_loop_thread(self._loop, self._thread, timeout)
        self._loop = None

    def __enter__(self) -> "WebPushFake":
        """`with WebPushFake(tls) as fake:` starts it..."""
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        """...and stops it."""
        self.stop()

    def subscribe(self, *, application_server_key: Union[bytes, str, None] = None) -> Dict[str, Any]:
        """A new subscription, made as a browser makes one; returns PushSubscription.toJSON().

        `application_server_key` (65-byte point, raw or base64url) restricts it to that VAPID
        key, as `pushManager.subscribe({applicationServerKey})` does: a push signed with
        another key is 403.
        """
        if self.port is None:
            raise RuntimeError("WebPushFake not started: the endpoint needs its port")
        server_key: Optional[bytes] = None
        if application_server_key is not None:
            raw = application_server_key
            server_key = b64url_decode(raw) if isinstance(raw, str) else bytes(raw)
            ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), server_key)  # must be a point
        private_key = ec.generate_private_key(ec.SECP256R1())
        public_raw = private_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        auth = secrets.token_bytes(16)
        sub_id = secrets.token_urlsafe(24)
        endpoint = f"{self._origin}/push/{sub_id}"
        with self._cond:
            self._subs[sub_id] = _Subscription(sub_id, endpoint, private_key, public_raw, auth, server_key)
        return {"endpoint": endpoint, "keys": {"p256dh": b64url_encode(public_raw), "auth": b64url_encode(auth)}}

    def expire(self, endpoint: Union[str, Mapping[str, Any]]) -> None:
        """Mark a subscription gone (the user unsubscribed): 410 from now on."""
        with self._cond:
            self._sub_for(endpoint).gone = True

    def decrypt(self, endpoint: Union[str, Mapping[str, Any]], body: bytes) -> bytes:
        """Decrypt an aes128gcm body as the subscription's browser would (ECEException if not)."""
        with self._cond:
            sub = self._sub_for(endpoint)
        return http_ece.decrypt(body, private_key=sub.private_key, auth_secret=sub.auth, version="aes128gcm")

    # -- scripting (test thread) -----------------------------------------------------------

    def script(self, endpoint: Union[str, Mapping[str, Any]], responses: Iterable[Any]) -> None:
        """Answer the next valid requests to `endpoint` with `responses` in order, then 201.

        Each entry: a bare status, (status, reason), (status, reason, retry_after_seconds) or
        (status, reason, {"Header": "value", ...}). Appends to what is already scripted.
        Requests failing a check are answered for that and consume nothing.
        """
        entries = [_as_scripted(e) for e in responses]
        with self._cond:
            key = self._sub_for(endpoint).endpoint
            self._scripts.setdefault(key, deque()).extend(entries)

    def set_default(self, status: Optional[int], reason: Optional[str] = None, extra: Any = None) -> None:
        """Answer every valid request this way (an outage) until `set_default(None)`;
        `extra` is a Retry-After in seconds or a dict of headers."""
        with self._cond:
            self._default = None if status is None else _as_scripted((status, reason, extra))

    def reset(self) -> None:
        """Forget scripts, the default and the recordings (subscriptions stay)."""
        with self._cond:
            self._scripts.clear()
            self._default = None
            self.received.clear()
            self._accepted = self._answered = 0
            self._sent.clear()
            self._statuses.clear()

    # -- observation (test thread) ---------------------------------------------------------

    def wait_for(self, count: int, timeout: float = 10.0) -> bool:
        """Block until at least `count` pushes have been accepted (2xx); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._accepted >= count, timeout)

    def wait_answered(self, count: int, timeout: float = 10.0) -> bool:
        """Block until at least `count` requests have been answered, errors included."""
        with self._cond:
            return self._cond.wait_for(lambda: self._answered >= count, timeout)

    def sent_endpoints(self) -> Counter:
        """Counter of endpoints answered 201 (or a scripted 2xx)."""
        with self._cond:
            return Counter(self._sent)

    def statuses(self) -> Counter:
        """Counter of HTTP statuses answered."""
        with self._cond:
            return Counter(self._statuses)

    @property
    def accepted(self) -> int:
        """Pushes answered 2xx."""
        return self._accepted

    @property
    def answered(self) -> int:
        """Requests answered (== len(received) when recording)."""
        return self._answered

    def stats(self) -> Dict[str, Any]:
        """Counts for a bench or a failure message."""
        return {
            "answered": self._answered,
            "accepted": self._accepted,
            "statuses": {str(k): v for k, v in sorted(self.statuses().items())},
            "connections": self._connections,
        }

    # -- the loop thread -------------------------------------------------------------------

    def _run(self, sock: socket.socket, ready: threading.Event, failure: List[BaseException]) -> None:
        loop = self._loop
        assert loop is not None
        web_server = _CountingServer(
            self,
            self._handle,
            loop=loop,
            access_log=None,  # a log line per request would cost more than the request
            auto_decompress=False,  # the body is judged as sent, whatever Content-Encoding says
            keepalive_timeout=60,  # idle keep-alive connections are dropped after this
        )

        async def shutdown() -> None:  # aiohttp's own close: its handlers, then their connections
            try:
                web_server.pre_shutdown()
                await web_server.shutdown(0.5)
            except BaseException as exc:  # noqa: BLE001 - stopping anyway
                self.server_errors.append(f"shutdown: {exc!r}")

        serve_forever(loop, web_server, sock, self._ssl_ctx, ready, failure, tuple,
                      lambda loop, context: loop.default_exception_handler(context), shutdown)

    def _count_connection(self) -> None:
        with self._cond:
            self._connections += 1

    def _sub_for(self, endpoint: Union[str, Mapping[str, Any]]) -> _Subscription:
        """The subscription of an endpoint URL or a subscription dict (lock held)."""
        url = endpoint["endpoint"] if isinstance(endpoint, Mapping) else endpoint
        match = _PUSH_RE.search(url)
        sub = self._subs.get(match.group(1)) if match else None
        if sub is None or sub.endpoint != url:
            raise KeyError(f"not a subscription of this fake: {url!r}")
        return sub

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            return await self._answer(request)
        except Exception as exc:  # noqa: BLE001 - a fake's bug must show, not hang the client
            self.server_errors.append(repr(exc))
            return web.Response(status=500, body=_error_body(500, f"fake error: {exc!r}", None),
                                content_type="application/json")

    async def _answer(self, request: web.BaseRequest) -> web.StreamResponse:
        match = _PUSH_RE.fullmatch(request.path)
        endpoint = f"{self._origin}{request.path}"
        if match is None:
            return self._respond(None, endpoint, request, _Rejected(404, "Not Found", None))
        if request.method != "POST":
            return self._respond(None, endpoint, request, _Rejected(405, "Method not allowed", None),
                                 extra=(("Allow", "POST"),))
        body = b""
        too_big = request.content_length is not None and request.content_length > MAX_READ
        if not too_big:
            try:
                body = await request.read()
            except HTTPRequestEntityTooLarge:
                too_big = True
        if too_big:
            rejected = _Rejected(413, f"Payload too large: the limit is {MAX_PAYLOAD} bytes", 104)
            response = self._respond(None, endpoint, request, rejected)
            response.force_close()  # the rest of the body was not read
            return response
        return self._respond(match.group(1), endpoint, request, None, body)

    def _respond(
        self,
        sub_id: Optional[str],
        endpoint: str,
        request: web.BaseRequest,
        rejected: Optional[_Rejected],
        body: bytes = b"",
        extra: Tuple[Tuple[str, str], ...] = (),
    ) -> web.Response:
        """Judge (unless already rejected), record, and build the answer."""
        headers = {k.lower(): v for k, v in request.headers.items()}
        record = WebPushRequest(endpoint, headers, None, None, 0, None, 0.0, len(body))
        ttl: int = 0
        scripted: Optional[WebPushScripted] = None
        if rejected is None:
            try:
                ttl, scripted = self._judge(sub_id, headers, body, record)
            except _Rejected as exc:
                rejected = exc
        out_headers: List[Tuple[str, str]] = list(extra)
        if rejected is not None:
            status, message, payload = rejected.status, rejected.message, _error_body(
                rejected.status, rejected.message, rejected.errno)
            out_headers.extend(rejected.headers)
        elif scripted is not None and not 200 <= scripted.status < 300:
            status = scripted.status
            message = scripted.reason or _phrase(status)
            payload = _error_body(status, message, None)
            names = {name.lower() for name, _ in scripted.headers}
            out_headers.extend(scripted.headers)
            if status == 429 and "retry-after" not in names and self.quota_retry_after is not None:
                out_headers.append(("Retry-After", str(self.quota_retry_after)))
            if status == 410 and "cache-control" not in names:
                out_headers.append(("Cache-Control", "max-age=86400"))
        else:
            status = scripted.status if scripted is not None else 201
            message = None
            payload = b""
            record.message_id = secrets.token_urlsafe(16)
            out_headers.append(("Location", f"{self._origin}/m/{record.message_id}"))
            out_headers.append(("TTL", str(min(ttl, MAX_TTL))))
            if scripted is not None:
                out_headers.extend(scripted.headers)
        record.status, record.reason = status, message
        self._record(record)
        response = web.Response(status=status, body=payload, headers=out_headers)
        if payload:
            response.content_type = "application/json"
        return response

    def _judge(
        self, sub_id: Optional[str], headers: Dict[str, str], body: bytes, record: WebPushRequest
    ) -> Tuple[int, Optional[WebPushScripted]]:
        """Run every check in order (raising _Rejected); returns (TTL, scripted answer or None)."""
        with self._cond:
            sub = self._subs.get(sub_id or "")
        if sub is None:
            raise _Rejected(404, "Request did not validate invalid token", 102)
        if sub.gone:
            raise _Rejected(410, "No such subscription", 106, (("Cache-Control", "max-age=86400"),))

        record.claims = self._check_vapid(sub, headers.get("authorization"))

        raw_ttl = headers.get("ttl")
        if raw_ttl is None:
            raise _Rejected(400, "Missing TTL value", 111)
        if not re.fullmatch(r"\s*-?[0-9]+\s*", raw_ttl):
            raise _Rejected(400, f"Invalid TTL value {raw_ttl!r}: not an integer", 111)
        ttl = int(raw_ttl)
        if ttl < 0:
            raise _Rejected(400, "TTL must be greater than 0", 114)
        if body:
            encoding = headers.get("content-encoding")
            if encoding is None:
                raise _Rejected(400, "Missing Content-Encoding header", 110)
            if encoding.strip().lower() != "aes128gcm":
                raise _Rejected(400, f"Unknown Content-Encoding header {encoding!r}: only aes128gcm (RFC 8291)", 110)
            if re.search(r"(^|[;,\s])salt=", headers.get("encryption", "")):
                raise _Rejected(400, "Do not include 'salt' header in aes128gcm Encryption header", 110)
            if re.search(r"(^|[;,\s])dh=", headers.get("crypto-key", "")):
                raise _Rejected(400, "Do not include 'dh' header in aes128gcm Crypto-Key header", 110)
        urgency = headers.get("urgency")
        if urgency is not None and urgency not in URGENCIES:
            raise _Rejected(400, f"Invalid Urgency {urgency!r}: one of very-low, low, normal, high", None)
        topic = headers.get("topic")
        if topic is not None:
            if len(topic) > 32:
                raise _Rejected(400, "Topic must be no greater than 32 characters", 113)
            if not _TOPIC_RE.fullmatch(topic):
                raise _Rejected(400, "Topic must be URL and Filename safe Base64 alphabet", 113)
        if len(body) > MAX_PAYLOAD:
            raise _Rejected(413, f"Payload too large: {len(body)} bytes, the limit is {MAX_PAYLOAD}", 104)
        if body:
            plaintext = self._decrypt(sub, body)
            record.plaintext = plaintext
            try:
                record.payload = json.loads(plaintext)
            except ValueError:
                record.payload = plaintext
        return ttl, self._scripted_answer(sub.endpoint)

    def _check_vapid(self, sub: _Subscription, authorization: Optional[str]) -> Dict[str, Any]:
        """RFC 8292: `vapid t=<JWT>, k=<key>`; returns the JWT's claims or raises _Rejected."""
        if not authorization:
            raise _Rejected(401, "Missing Authorization header: VAPID (RFC 8292) is required", 109)
        scheme, _, params = authorization.strip().partition(" ")
        if scheme.lower() != "vapid":
            raise _Rejected(401, f"Unknown auth scheme {scheme!r}: only 'vapid' (RFC 8292)", 109)
        values: Dict[str, str] = {}
        for part in params.split(","):
            name, eq, value = part.strip().partition("=")
            if eq:
                values[name.strip().lower()] = value.strip().strip('"')
        token, key = values.get("t"), values.get("k")
        if not token:
            raise _Rejected(401, "Missing VAPID token", 109)
        if not key:
            raise _Rejected(401, "Missing VAPID public key", 109)
        with self._cond:
            cached = self._verified.get((token, key))
        if cached is None:
            try:
                key_raw = b64url_decode(key)
                if len(key_raw) != _P256_POINT or key_raw[0] != 4:
                    raise ValueError("not an uncompressed point")
                public_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), key_raw)
            except ValueError:
                raise _Rejected(401, "Invalid VAPID public key", 109) from None
        else:
            key_raw = b64url_decode(key)
        if sub.server_key is not None and key_raw != sub.server_key:
            raise _Rejected(403, "VAPID public key mismatch: not the subscription's applicationServerKey", 109)
        if cached is None:
            try:
                header = jwt.get_unverified_header(token)
            except jwt.InvalidTokenError as exc:
                raise _Rejected(401, f"Invalid VAPID token: {exc}", 109) from None
            if header.get("alg") != "ES256":
                raise _Rejected(401, f"Invalid VAPID token: alg {header.get('alg')!r}, not ES256", 109)
            try:
                claims = jwt.decode(
                    token, public_key, algorithms=["ES256"],
                    options={"verify_exp": False, "verify_aud": False, "verify_iat": False, "verify_nbf": False},
                )
            except jwt.InvalidSignatureError:
                raise _Rejected(401, "Invalid VAPID signature: the JWT does not verify under k", 109) from None
            except jwt.InvalidTokenError as exc:
                raise _Rejected(401, f"Invalid VAPID token: {exc}", 109) from None
            if not isinstance(claims, dict):
                raise _Rejected(401, "Invalid VAPID token: claims are not a JSON object", 109)
            with self._cond:
                if len(self._verified) >= _JWT_CACHE_MAX:
                    self._verified.clear()
                self._verified[(token, key)] = claims
        else:
            claims = cached
        exp = claims.get("exp")
        if isinstance(exp, bool) or not isinstance(exp, (int, float)):
            raise _Rejected(401, "Invalid VAPID expiry: exp missing or not a number", 109)
        now = int(time.time())  # whole seconds, as autopush's sec_since_epoch()
        if exp <= now:
            raise _Rejected(401, "Invalid VAPID expiry: the token has expired", 109)
        if exp > now + MAX_VAPID_EXPIRY:
            raise _Rejected(401, "The VAPID token expiration is too long (over 24 hours)", 109)
        aud = claims.get("aud")
        if aud != self._origin:
            raise _Rejected(401, f"Invalid VAPID audience {aud!r}: expected {self._origin!r}", 109)
        sub_claim = claims.get("sub")
        if not isinstance(sub_claim, str) or not sub_claim.startswith(_SUB_SCHEMES):
            raise _Rejected(401, "Invalid VAPID subject: sub must be a mailto: or https: URI", 109)
        return dict(claims)

    def _decrypt(self, sub: _Subscription, body: bytes) -> bytes:
        """RFC 8291 as a browser does it: one aes128gcm record, keyid = the sender's P-256 point."""
        if len(body) < _AES128GCM_HEADER:
            raise _Rejected(400, "Invalid aes128gcm body: shorter than its header", 110)
        rs = struct.unpack("!L", body[16:20])[0]
        idlen = body[20]
        if idlen != _P256_POINT:
            raise _Rejected(400, f"Invalid aes128gcm body: keyid is {idlen} bytes, not a 65-byte P-256 key", 110)
        content = body[_AES128GCM_HEADER + idlen:]
        if rs < 18:
            raise _Rejected(400, f"Invalid aes128gcm body: record size {rs} under 18", 110)
        if len(content) > rs:
            raise _Rejected(400, "Invalid aes128gcm body: more than one record (RFC 8291 4)", 110)
        if len(content) <= _TAG:
            raise _Rejected(400, "Invalid aes128gcm body: record too short", 110)
        try:
            return http_ece.decrypt(body, private_key=sub.private_key, auth_secret=sub.auth, version="aes128gcm")
        except Exception as exc:  # noqa: BLE001 - whatever http_ece raises, it did not decrypt
            detail = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            raise _Rejected(400, f"Message does not decrypt with the subscription's keys: {detail}", 110) from None

    def _scripted_answer(self, endpoint: str) -> Optional[WebPushScripted]:
        with self._cond:
            if self._default is not None:
                return self._default
            queue = self._scripts.get(endpoint)
            if queue:
                answer = queue.popleft()
                if not queue:
                    del self._scripts[endpoint]
                return answer
        return None

    def _record(self, record: WebPushRequest) -> None:
        record.at = time.time()
        ok = 200 <= record.status < 300
        with self._cond:
            if self._record_requests:
                self.received.append(record)
            self._answered += 1
            self._statuses[record.status] += 1
            if ok:
                self._accepted += 1
                self._sent[record.endpoint] += 1
            self._cond.notify_all()
