"""A loopback fake of Google's FCM HTTP v1 API and of the OAuth2 token endpoint it needs.

HTTPS (HTTP/1.1, keep-alive) on 127.0.0.1, `http.server.ThreadingHTTPServer` + `ssl`, one
thread per connection.

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
received, wait_for, sent_tokens) plus `connections_opened`, `tokens_issued`,
`expire_access_tokens()`.
"""

from __future__ import annotations

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
from typing import Any, Dict, List, Optional, Set, Tuple
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography.hazmat.primitives import serialization

from tests.fakes import Scripted, ScriptedRecorder
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
        if length < 0 or length > 1 << 20:
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
            self._reply(404, google_error(404, f"The requested URL {path} was not found on this server."))
            return
        status, doc, retry_after, record = fake._send(match.group(1), self.headers.get("Authorization"), body)
        delay = fake.delay
        if delay > 0:
            fake._stopping.wait(delay)
        # recorded before the answer is written: a client holding its answer finds it recorded
        record.at = time.time()
        fake._record(record, record.token, record.status, record.status == 200 and not record.validate_only)
        self._reply(status, doc, retry_after=retry_after)

    def do_GET(self) -> None:  # noqa: N802
        self._reply(405 if _SEND_RE.fullmatch(urlsplit(self.path).path) else 404, google_error(404, "Not found."))

    def _reply(
        self, status: int, doc: Dict[str, Any], retry_after: Optional[int] = None, cache_control: Optional[str] = None
    ) -> None:
        body = json.dumps(doc, indent=2).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Vary", "Origin, X-Origin, Referer")
        if retry_after is not None:
            self.send_header("Retry-After", str(retry_after))
        if cache_control:
            self.send_header("Cache-Control", cache_control)
        self.end_headers()
        self.wfile.write(body)


class FCMFake(ScriptedRecorder[FCMRequest]):
    """HTTPS fake of fcm.googleapis.com (v1) + oauth2.googleapis.com/token on 127.0.0.1."""

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
    ) -> None:
        super().__init__(record=record)
        self.tls = tls
        self.project_id = project_id
        self.access_token_ttl = access_token_ttl
        #: Retry-After (s) sent with a 429 whose script/default gives none.
        self.quota_retry_after = quota_retry_after
        self.host = host
        self._requested_port = port
        self.port: Optional[int] = None
        #: TCP connections accepted (token endpoint and messages:send alike).
        self.connections_opened = 0
        #: Access tokens handed out by /token.
        self.tokens_issued = 0
        #: Exceptions raised in connection threads (TLS handshake failures, resets), as repr.
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
        if self._thread is not None:
            raise RuntimeError("FCMFake already started")
        self._server = _Server((self.host, self._requested_port), self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name=f"FCMFake-{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, drop every open connection, join the threads (bounded)."""
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
        deadline = time.monotonic() + timeout
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
            "tokens_issued": self.tokens_issued,
        }

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

    def _send(
        self, project: str, authorization: Optional[str], body: bytes
    ) -> Tuple[int, Dict[str, Any], Optional[int], FCMRequest]:
        """Judge one send; returns (status, JSON doc, Retry-After, record)."""
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
