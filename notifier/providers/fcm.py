"""FCM provider: FCM HTTP v1 over HTTP/2, on the dispatcher's event loop.

Why not pyfcm's transport, as before: pyfcm sends with ``requests``, one blocking HTTP/1.1
request per thread. Measured on this project's 2-core machine (bench.fanout, 10,000 devices):
697-980 deliveries/s at ~1.1-1.4 ms of dispatcher CPU per push on 32 threads, against a lean
client's 3,500/s (HTTP/1.1) or 6,155/s (HTTP/2): the threads fight over the GIL, and each request
is a connection's only request. Google's v1 endpoint speaks HTTP/2, so every send is multiplexed
on a few connections from the dispatcher's own event loop, with no thread per request, by
``notifier.providers.h2client`` (the ``h2`` library). httpx's HTTP/2 was tried first and cost
865-975 us of CPU per push (see h2client's docstring).

What is kept from pyfcm: ``parse_payload``, which builds the v1 message document from the fields
``notifier.payload.fcm_message`` gives it. What is not, and why:
* ``notify()`` / ``send_request()``: ``send_request`` sleeps on Retry-After and calls itself again
  without limit, and recurses on a 401. We POST once and hand the Retry-After to the dispatcher
  (one retry layer); a 401 marks the token stale, the next send refreshes it.
* ``parse_response`` loses Google's ``FcmError.errorCode`` (UNREGISTERED, SENDER_ID_MISMATCH, ...)
  and Retry-After, which the classification needs: the error JSON is read here.
* ``_get_access_token`` refreshes per thread: here one OAuth token (google-auth's service-account
  credentials) is shared by every send and refreshed once, by one task, on a worker thread (the
  token endpoint is a blocking ``requests`` call, once an hour), ahead of its expiry (google-auth
  counts a token as expired a few minutes early), through a session that also trusts PUSH_CA_FILE.
* the project id: pyfcm prefers the service account's ``project_id``; FCM_PROJECT_ID wins here.

google-auth itself retries a failing token endpoint up to 3 times with ~1-2 s sleeps; that happens
at most once per token lifetime (an hour), not per push.
"""
from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from pathlib import Path

from urllib.parse import urlsplit

import google.auth.exceptions
import google.auth.transport.requests
import requests
from google.oauth2 import service_account
from pyfcm import FCMNotification
from requests.adapters import HTTPAdapter

from notifier.classify import FCM_INVALID_TOKEN, REASON_CONNECTION, REASON_OAUTH, REASON_TIMEOUT, classify
from notifier.config import ConfigError, Settings
from notifier.model import Outcome, Platform, Push, Result
from notifier.payload import fcm_message
from notifier.providers.base import shorten_token, tls_context
from notifier.providers.h2client import ClientError, H2Client, RequestTimeout, http2_context
from notifier.retry import parse_retry_after

logger = logging.getLogger(__name__)

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 30.0
_REQUIRED_FIELDS = ("client_email", "private_key", "token_uri")
_FAILURE_HOLD = 5.0  # after a failed token refresh, fail fast for this long instead of asking again per push
_MAX_STREAMS = 1000  # our own ceiling per connection; Google's front-ends allow 100


class _TrustingAdapter(HTTPAdapter):
    """An HTTPAdapter without retries whose TLS context trusts the system CAs plus an extra bundle."""

    def __init__(self, ssl_context: ssl.SSLContext, **kwargs) -> None:
        self._ssl_context = ssl_context
        super().__init__(max_retries=0, **kwargs)

    def init_poolmanager(self, connections, maxsize, block=False, **pool_kwargs):
        pool_kwargs["ssl_context"] = self._ssl_context
        super().init_poolmanager(connections, maxsize, block=block, **pool_kwargs)


class _TimedRequest(google.auth.transport.requests.Request):
    """google-auth's transport with our timeout (its default is 120 s) on our CA-aware session."""

    def __init__(self, session: requests.Session, timeout: tuple[float, float]) -> None:
        super().__init__(session=session)
        self._timeout = timeout

    def __call__(self, url, method="GET", body=None, headers=None, timeout=None, **kwargs):
        return super().__call__(url, method, body, headers, timeout=timeout or self._timeout, **kwargs)


class _TokenFailed(Exception):
    """The OAuth access token could not be obtained."""

    def __init__(self, retryable: bool, cause: str = "") -> None:
        super().__init__("OAuth token refresh failed")
        self.retryable = retryable
        self.cause = cause


class _AccessToken:
    """One OAuth access token for every send: refreshed by one task at a time, on a thread."""

    def __init__(self, credentials, ssl_context: ssl.SSLContext, timeout: tuple[float, float]) -> None:
        self.credentials = credentials
        self._session = requests.Session()
        self._adapter = _TrustingAdapter(ssl_context, pool_connections=1, pool_maxsize=1)
        self._session.mount("https://", self._adapter)
        self._session.mount("http://", self._adapter)
        # kept for the provider's lifetime: google-auth's Request closes its session when collected
        self._request = _TimedRequest(self._session, timeout)
        self._lock: asyncio.Lock | None = None  # made on the loop that sends
        self._stale: str | None = None
        self._failure: _TokenFailed | None = None
        self._failed_at = 0.0

    async def get(self) -> str:
        """The current token; refreshed first when google-auth says it expires soon or FCM rejected it."""
        credentials = self.credentials
        if credentials.valid and credentials.token != self._stale:
            return credentials.token
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # one refresh; the other sends wait for it
            if credentials.valid and credentials.token != self._stale:
                return credentials.token
            if self._failure is not None and time.monotonic() - self._failed_at < _FAILURE_HOLD:
                raise self._failure
            try:
                await asyncio.to_thread(credentials.refresh, self._request)
            except google.auth.exceptions.RefreshError as exc:
                failure = _TokenFailed(retryable=bool(exc.retryable), cause=_describe(exc))
            except Exception as exc:  # noqa: BLE001 - TransportError, anything unexpected: try again later
                failure = _TokenFailed(retryable=True, cause=_describe(exc))
            else:
                self._stale = self._failure = None
                return credentials.token
            self._failure, self._failed_at = failure, time.monotonic()
            raise failure

    def rejected(self, token: str) -> None:
        """FCM answered 401 to this token: the next send refreshes it (once, whoever comes first)."""
        self._stale = token

    def close(self) -> None:
        self._session.close()


class FCMProvider:
    """Sends pushes through FCM HTTP v1 over HTTP/2, on at most ``push_fcm_connections`` connections."""

    platform = Platform.FCM

    def __init__(self, settings: Settings, *, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 read_timeout: float = DEFAULT_READ_TIMEOUT) -> None:
        if not settings.fcm_service_account_file:
            raise ConfigError("FCM_SERVICE_ACCOUNT_FILE: required for the FCM provider")
        info = _load_service_account(settings.fcm_service_account_file)
        project_id = settings.fcm_project_id or info.get("project_id")
        if not project_id:
            raise ConfigError("FCM_PROJECT_ID: required (the service account file names no project)")
        try:
            credentials = service_account.Credentials.from_service_account_info(info, scopes=[FCM_SCOPE])
        except Exception:
            raise ConfigError(f"FCM_SERVICE_ACCOUNT_FILE: {settings.fcm_service_account_file}: "
                              "the private key or the fields are not a valid service account") from None
        self._token = _AccessToken(credentials, _ssl_context(settings.push_ca_file), (connect_timeout, read_timeout))
        # pyfcm builds the v1 message document; its transport is not used (see the module docstring)
        self._builder = FCMNotification(credentials=credentials, project_id=project_id)
        self.endpoint = f"{settings.fcm_endpoint.rstrip('/')}/{project_id}/messages:send"
        url = urlsplit(self.endpoint)
        if url.scheme != "https" or not url.hostname:
            raise ConfigError(f"FCM_ENDPOINT: {settings.fcm_endpoint} is not an https:// URL")
        self._path = url.path.encode()
        # made now, connects on first use, inside the sending loop (never before a fork)
        self._client = H2Client(url.hostname, url.port or 443, http2_context(_ssl_context(settings.push_ca_file)),
                                max_connections=settings.push_fcm_connections, max_streams=_MAX_STREAMS,
                                connect_timeout=connect_timeout)
        self._timeout = read_timeout
        self._ttl = settings.push_ttl
        self._content = settings.push_content
        self._closed = False
        self._warned_at = 0.0

    # --- the provider interface -----------------------------------------------

    async def send(self, push: Push) -> Result:
        if self._closed:
            return Result(Outcome.TRANSIENT, None, "provider_closed")
        body = self._builder.parse_payload(**fcm_message(push, self._ttl, content=self._content))
        result = await self._post(body)
        if result.outcome is not Outcome.SENT and logger.isEnabledFor(logging.DEBUG):
            logger.debug("FCM: delivery %s to %s: %s %s -> %s", push.delivery_id,
                         shorten_token(push.token), result.status, result.reason, result.outcome.value)
        return result

    async def close(self) -> None:
        self._closed = True
        await self._client.close()
        self._token.close()

    @property
    def connections_opened(self) -> int:
        """HTTP/2 connections opened to FCM so far (the token endpoint's not counted)."""
        return self._client.connections_opened

    # --- one request ------------------------------------------------------------

    def _warn(self, message: str, *args) -> None:
        """Network trouble is logged at most every 10 s, not once per push of an outage."""
        now = time.monotonic()
        if now - self._warned_at >= 10.0:
            self._warned_at = now
            logger.warning(message, *args)

    async def _post(self, body: bytes) -> Result:
        try:
            token = await self._token.get()
        except _TokenFailed as exc:
            if exc.retryable:
                self._warn("FCM: could not obtain an OAuth access token (will retry): %s", exc.cause)
                return Result(Outcome.TRANSIENT, None, REASON_OAUTH)
            logger.error("FCM: the token endpoint rejected the service account: %s", exc.cause)
            # reported as a 401: Google refused to authenticate us (the endpoint says 400 invalid_grant)
            return Result(classify(Platform.FCM, 401, REASON_OAUTH), 401, REASON_OAUTH)
        headers = [(b"content-type", b"application/json; UTF-8"), (b"authorization", b"Bearer " + token.encode())]
        try:
            response = await self._client.request(b"POST", self._path, headers, body.encode()
                                                  if isinstance(body, str) else body, timeout=self._timeout)
        except RequestTimeout:
            self._warn("FCM: no answer within the timeout from %s", self.endpoint)
            return Result(Outcome.TRANSIENT, None, REASON_TIMEOUT)
        except ClientError as exc:  # connect refused, TLS, no HTTP/2, reset, GOAWAY, closed
            self._warn("FCM: cannot reach %s: %s", self.endpoint, exc)
            return Result(Outcome.TRANSIENT, None, REASON_CONNECTION)
        status = response.status
        if status == 200:
            return Result(Outcome.SENT, 200, None)
        reason = error_reason(_json(response.body))
        retry_after = parse_retry_after(_text(response.headers.get(b"retry-after")))
        if status == 401:
            self._token.rejected(token)
        return Result(classify(Platform.FCM, status, reason), status, reason, retry_after)


# --- Google's error JSON ---------------------------------------------------------

def error_reason(document) -> str | None:
    """The reason classify() needs from an FCM v1 error body.

    ``error.details[]`` of @type FcmError -> its ``errorCode``, else ``error.status``;
    an INVALID_ARGUMENT about the registration token becomes "INVALID_ARGUMENT:token".
    """
    if not isinstance(document, dict) or not isinstance(document.get("error"), dict):
        return None
    error = document["error"]
    details = error.get("details") if isinstance(error.get("details"), list) else []
    reason = None
    token_field = False
    for detail in details:
        if not isinstance(detail, dict):
            continue
        if detail.get("@type") == FCM_ERROR_TYPE and isinstance(detail.get("errorCode"), str):
            reason = reason or detail["errorCode"]
        elif detail.get("@type") == BAD_REQUEST_TYPE:
            for violation in detail.get("fieldViolations") or []:
                if isinstance(violation, dict) and violation.get("field") == "message.token":
                    token_field = True
    if reason is None or reason == "UNSPECIFIED_ERROR":
        reason = error.get("status") if isinstance(error.get("status"), str) else reason
    if reason == "INVALID_ARGUMENT":
        message = error.get("message") if isinstance(error.get("message"), str) else ""
        if token_field or "registration token" in message.lower():
            reason = FCM_INVALID_TOKEN
    return reason


def _describe(exc: BaseException) -> str:
    """A short cause for logs: the innermost exception's class (refused, timed out) or the TLS
    reason (CERTIFICATE_VERIFY_FAILED); never a message that could quote a request or a key."""
    if isinstance(exc, google.auth.exceptions.RefreshError) and exc.args:
        detail = exc.args[0]
        # google-auth: "invalid_grant: Invalid JWT Signature." (the token endpoint's own words)
        return str(detail).split("\n")[0][:200] if isinstance(detail, str) else type(exc).__name__
    seen = 0
    while exc.__context__ is not None and not isinstance(exc, ssl.SSLError) and seen < 10:
        exc, seen = exc.__context__, seen + 1
    text = exc.reason if isinstance(exc, ssl.SSLError) and exc.reason else type(exc).__name__
    return str(text)[:200]


def _json(body: bytes):
    try:
        return json.loads(body)
    except ValueError:
        return None


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


# --- configuration helpers ----------------------------------------------------------

def _load_service_account(path: str) -> dict:
    try:
        text = Path(path).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"FCM_SERVICE_ACCOUNT_FILE: cannot read {path} "
                          f"({getattr(exc, 'strerror', None) or type(exc).__name__})") from None
    try:
        info = json.loads(text)
    except ValueError:
        raise ConfigError(f"FCM_SERVICE_ACCOUNT_FILE: {path} is not valid JSON") from None
    if not isinstance(info, dict):
        raise ConfigError(f"FCM_SERVICE_ACCOUNT_FILE: {path} is not a JSON object")
    missing = [name for name in _REQUIRED_FIELDS if not isinstance(info.get(name), str) or not info[name]]
    if missing:
        raise ConfigError(f"FCM_SERVICE_ACCOUNT_FILE: {path} lacks {', '.join(missing)}")
    if info.get("type", "service_account") != "service_account":
        raise ConfigError(f"FCM_SERVICE_ACCOUNT_FILE: {path} is not a service account key "
                          f"(type {info.get('type')!r})")
    return info


def _ssl_context(ca_file: str | None) -> ssl.SSLContext:
    return tls_context(ca_file)
