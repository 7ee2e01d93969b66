"""FCM provider: pyfcm 2.1 (HTTP v1) on a thread pool, with pyfcm's retries turned off.

What is kept from pyfcm: its payload building (``parse_payload`` / ``json_dumps``),
its per-thread ``requests`` sessions and their Authorization header, its
service-account credentials (google-auth), its endpoint layout.

What is not used, and why:
* ``notify()`` / ``send_request()``: ``send_request`` sleeps inside the call on
  Retry-After and then calls itself again, without limit, and recurses on a 401.
  We POST with the thread's ``requests_session`` ourselves, once, and hand the
  Retry-After to the dispatcher (one retry layer).
* pyfcm's default adapter retries 502/503 (POST included) with back-off: we
  pass ``adapter=`` a plain HTTPAdapter with ``max_retries=0`` and a pool as large
  as the thread pool (all threads share it).
* ``parse_response`` only maps the HTTP status to exception classes; it loses
  Google's ``FcmError.errorCode`` (UNREGISTERED, SENDER_ID_MISMATCH, ...) and
  Retry-After, which the classification needs, so the error JSON is read here.
* ``_get_access_token`` refreshes the OAuth token on every call (once per thread
  every 30 minutes) through a fresh session that trusts only the default CAs:
  here one refresh serves all threads (under a lock, while google-auth says the
  token is valid), through a session that also trusts PUSH_CA_FILE.
* the project id: pyfcm prefers the service account's ``project_id`` over the one
  given; FCM_PROJECT_ID wins here.

google-auth itself retries a failing token endpoint up to 3 times with ~1-2 s
sleeps; that happens at most once per token lifetime (an hour), not per push.
"""
from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timezone
from pathlib import Path

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

logger = logging.getLogger(__name__)

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_READ_TIMEOUT = 30.0
_REQUIRED_FIELDS = ("client_email", "private_key", "token_uri")


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


class _PyFCM(FCMNotification):
    """pyfcm's client with our endpoint, one shared OAuth token and a CA-aware token session."""

    def __init__(self, *, credentials, project_id: str, endpoint_base: str, adapter: HTTPAdapter,
                 token_adapter: HTTPAdapter, timeout: tuple[float, float]) -> None:
        super().__init__(credentials=credentials, project_id=project_id, adapter=adapter)
        self.FCM_END_POINT_BASE = endpoint_base
        self._endpoint = f"{endpoint_base}/{project_id}/messages:send"
        self._token_lock = threading.Lock()
        self._stale_token: str | None = None
        self._failure: _TokenFailed | None = None
        self._failed_at = 0.0
        self._token_session = requests.Session()
        self._token_session.mount("https://", token_adapter)
        self._token_session.mount("http://", token_adapter)
        self._timeout = timeout
        # with trust_env, requests re-reads the proxy variables and ~/.netrc on every request (~15% of
        # a send's CPU); read the environment once here, pass it explicitly, turn trust_env off per session
        self._env_settings = self._token_session.merge_environment_settings(self._endpoint, {}, None, None, None)
        # kept for the provider's lifetime: google-auth's Request closes its session when collected
        self._token_request = _TimedRequest(self._token_session, timeout)

    @property
    def fcm_end_point(self) -> str:
        return self._endpoint

    _FAILURE_HOLD = 5.0  # after a failed refresh, fail fast for this long instead of queueing on the lock

    def _get_access_token(self) -> str:
        credentials = self.credentials
        with self._token_lock:
            if not credentials.valid or credentials.token == self._stale_token:
                if self._failure is not None and time.monotonic() - self._failed_at < self._FAILURE_HOLD:
                    raise self._failure
                try:
                    credentials.refresh(self._token_request)
                except google.auth.exceptions.RefreshError as exc:
                    failure = _TokenFailed(retryable=bool(exc.retryable), cause=_describe(exc))
                except Exception as exc:  # TransportError, anything unexpected: try again later
                    failure = _TokenFailed(retryable=True, cause=_describe(exc))
                else:
                    self._stale_token = self._failure = None
                    return credentials.token
                self._failure, self._failed_at = failure, time.monotonic()
                raise failure
            return credentials.token

    def token_rejected(self) -> None:
        """FCM answered 401: refresh the shared token once, and every thread's header."""
        with self._token_lock:
            self._stale_token = self.credentials.token

    def post(self, body: bytes) -> requests.Response:
        """One POST of a payload built by parse_payload, on this thread's session; no retry."""
        session = self.requests_session  # pyfcm's per-thread session (sets its header when due)
        token = self._get_access_token()  # the shared token: refreshed when expiring or rejected
        if getattr(self.thread_local, "token", None) != token:
            session.headers["Authorization"] = "Bearer " + token
            session.trust_env = False  # self._env_settings instead
            self.thread_local.token = token
        return session.post(self._endpoint, data=body, timeout=self._timeout, **self._env_settings)

    def close(self) -> None:
        self._token_session.close()


class FCMProvider:
    """Sends pushes through FCM HTTP v1 with pyfcm, ``push_fcm_threads`` requests at a time."""

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
        threads = settings.push_fcm_threads
        context = _ssl_context(settings.push_ca_file)
        self._adapter = _TrustingAdapter(context, pool_connections=4, pool_maxsize=threads)
        self._token_adapter = _TrustingAdapter(context, pool_connections=1, pool_maxsize=1)
        self._client = _PyFCM(credentials=credentials, project_id=project_id,
                              endpoint_base=settings.fcm_endpoint.rstrip("/"),
                              adapter=self._adapter, token_adapter=self._token_adapter,
                              timeout=(connect_timeout, read_timeout))
        self._ttl = settings.push_ttl
        self._threads = threads
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        self._warned_at = 0.0
        self.endpoint = self._client.fcm_end_point

    # --- the provider interface -----------------------------------------------

    async def send(self, push: Push) -> Result:
        if self._closed:
            return Result(Outcome.TRANSIENT, None, "provider_closed")
        body = self._client.parse_payload(**fcm_message(push, self._ttl))
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=self._threads, thread_name_prefix="fcm-send")
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(self._executor, self._send_blocking, body)
        if result.outcome is not Outcome.SENT and logger.isEnabledFor(logging.DEBUG):
            logger.debug("FCM: delivery %s to %s: %s %s -> %s", push.delivery_id,
                         shorten_token(push.token), result.status, result.reason, result.outcome.value)
        return result

    async def close(self) -> None:
        self._closed = True
        executor, self._executor = self._executor, None
        if executor is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, lambda: executor.shutdown(wait=True, cancel_futures=True))
        self._adapter.close()
        self._client.close()

    # --- the blocking part, on a pool thread -------------------------------------

    def _warn(self, message: str, *args) -> None:
        """Network trouble is logged at most every 10 s, not once per push of an outage."""
        now = time.monotonic()
        if now - self._warned_at >= 10.0:
            self._warned_at = now
            logger.warning(message, *args)

    def _send_blocking(self, body: bytes) -> Result:
        try:
            response = self._client.post(body)
        except _TokenFailed as exc:
            if exc.retryable:
                self._warn("FCM: could not obtain an OAuth access token (will retry): %s", exc.cause)
                return Result(Outcome.TRANSIENT, None, REASON_OAUTH)
            logger.error("FCM: the token endpoint rejected the service account: %s", exc.cause)
            # reported as a 401: Google refused to authenticate us (the endpoint says 400 invalid_grant)
            return Result(classify(Platform.FCM, 401, REASON_OAUTH), 401, REASON_OAUTH)
        except requests.Timeout:
            self._warn("FCM: no answer within the timeout from %s", self.endpoint)
            return Result(Outcome.TRANSIENT, None, REASON_TIMEOUT)
        except requests.RequestException as exc:
            self._warn("FCM: cannot reach %s: %s", self.endpoint, _describe(exc))
            return Result(Outcome.TRANSIENT, None, REASON_CONNECTION)
        status = response.status_code
        if status == 200:
            return Result(Outcome.SENT, 200, None)
        reason = error_reason(_json(response))
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        if status == 401:
            self._client.token_rejected()
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


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date), None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = when.timestamp() - (time.time() if now is None else now)
        return max(0.0, seconds)
    return seconds if seconds >= 0 and seconds == seconds else None


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


def _json(response: requests.Response):
    try:
        return response.json()
    except ValueError:
        return None


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

