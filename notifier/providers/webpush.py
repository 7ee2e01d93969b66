"""Web Push (RFC 8030) to the browsers' push services: RFC 8291 `aes128gcm`, RFC 8292 VAPID.

What does what, and why:
- Encryption: pywebpush's `WebPusher(subscription).encode(payload)` (on http_ece). One ephemeral
  ECDH key per push is the protocol's floor: each subscription has its own keys.
- VAPID: a `py_vapid` key signs one JWT per push-service origin (`aud`), valid 12 h and reused
  until an hour before it expires. pywebpush's `webpush()` and `WebPusher.send_async` sign a new
  JWT per call (an ECDSA signature per push), so they are not used for sending.
- Transport: one aiohttp session on the dispatcher's event loop, kept open, connections pooled
  per push service (keep-alive), 10 s per request; the dispatcher bounds the pushes in flight.
  Redirects are never followed, and every endpoint is checked against WEBPUSH_ALLOWED_HOSTS again
  right before the POST (it was checked at registration; the list may have changed since).
- Headers: `TTL` (PUSH_TTL), `Urgency: high`, `Topic` per message (a re-send replaces the first
  copy while it waits on the push service), `Content-Encoding: aes128gcm`.
- Outcomes (notifier.classify): 201 sent; 404/410 dead (the device is disabled); 413 and other
  4xx rejected; 401/403 our VAPID credentials; 429 (Retry-After honoured) and 5xx retried.
"""
from __future__ import annotations

import asyncio
import base64
import logging
import time
import urllib.parse

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from notifier.classify import REASON_CONNECTION, REASON_TIMEOUT, classify
from notifier.config import ConfigError, Settings
from notifier.endpoints import check_endpoint, parse_allowed_hosts
from notifier.model import Outcome, Platform, Push, Result
from notifier.payload import webpush_payload, webpush_topic
from notifier.providers.base import shorten_token, tls_context
from notifier.retry import parse_retry_after

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT = 10.0
JWT_LIFETIME = 12 * 3600      # RFC 8292: at most 24 h; push services reject more
JWT_REFRESH_BEFORE = 3600     # a new JWT this long before the current one expires
CONNECTIONS_PER_HOST = 100    # keep-alive connections to one push service, at most
CHECKED_ENDPOINTS = 20_000    # endpoint verdicts remembered (a few MB at most)
REASON_ENDPOINT = "endpoint_not_allowed"
REASON_KEYS = "bad_subscription_keys"


def vapid_public_key(path: str) -> str:
    """The VAPID public key of the PEM private key at `path`, as browsers take it in
    `applicationServerKey`: base64url (no padding) of the 65-byte uncompressed P-256 point."""
    key = _load_key(path)
    point = key.public_key().public_bytes(serialization.Encoding.X962,
                                          serialization.PublicFormat.UncompressedPoint)
    return base64.urlsafe_b64encode(point).rstrip(b"=").decode()


def _load_key(path: str) -> ec.EllipticCurvePrivateKey:
    try:
        with open(path, "rb") as handle:
            key = serialization.load_pem_private_key(handle.read(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"VAPID_PRIVATE_KEY_FILE: {path} is not an unencrypted PEM private key "
                          f"({type(exc).__name__})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ConfigError(f"VAPID_PRIVATE_KEY_FILE: {path} must hold an EC P-256 (prime256v1) private key")
    return key


class WebPushProvider:
    """Sends Web Push notifications; see the module docstring."""

    platform = Platform.WEBPUSH

    def __init__(self, settings: Settings) -> None:
        # imported here, not at the top: pywebpush and py_vapid pull in aiohttp and requests
        # (0.3 s of every uWSGI worker start and reload); only a process that sends Web Push needs them
        from py_vapid import Vapid02
        from pywebpush import WebPusher, WebPushException

        if not settings.vapid_private_key_file or not settings.vapid_subject:
            raise ConfigError("VAPID_PRIVATE_KEY_FILE and VAPID_SUBJECT: required for Web Push")
        key = _load_key(settings.vapid_private_key_file)
        self._vapid = Vapid02(private_key=key)
        self._public_key = vapid_public_key(settings.vapid_private_key_file)
        self._subject = settings.vapid_subject
        self._allowed = parse_allowed_hosts(settings.webpush_allowed_hosts)
        self._ttl = settings.push_ttl
        self._content = settings.push_content
        self._ssl = tls_context(settings.push_ca_file)
        self._pusher, self._pusher_error = WebPusher, WebPushException
        self._jwts: dict[str, tuple[str, float]] = {}  # origin -> (Authorization header, refresh at)
        self._checked: dict[str, bool] = {}  # endpoint -> allowed (bounded: cleared when full)
        self._last_payload: tuple = (None, b"")  # a fan-out sends one message to many devices in a row
        self._session = None
        self._client_error: type[Exception] = OSError

    # --- the provider interface -----------------------------------------------

    async def send(self, push: Push) -> Result:
        if not self._allowed_endpoint(push.token):
            logger.warning("Web Push: delivery %s: endpoint %s is not allowed by WEBPUSH_ALLOWED_HOSTS; not sent",
                           push.delivery_id, shorten_token(push.token))
            return Result(Outcome.REJECTED, None, REASON_ENDPOINT)
        try:
            subscription = {"endpoint": push.token, "keys": {"p256dh": push.p256dh, "auth": push.auth}}
            body = self._pusher(subscription).encode(self._payload(push))["body"]
        except (self._pusher_error, ValueError, TypeError):
            return Result(Outcome.REJECTED, None, REASON_KEYS)
        headers = {
            "TTL": str(self._ttl),
            "Urgency": "high",
            "Topic": webpush_topic(push.message_id),
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
            "Authorization": self._authorization(push.token),
        }
        return await self._post(push.token, body, headers)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- internals ------------------------------------------------------------

    def _allowed_endpoint(self, endpoint: str) -> bool:
        """check_endpoint, remembered per endpoint (a subscription gets a push per message; the
        check was 6 % of the loop's time per push)."""
        verdict = self._checked.get(endpoint)
        if verdict is None:
            try:
                check_endpoint(endpoint, self._allowed)
                verdict = True
            except ValueError:
                verdict = False
            if len(self._checked) >= CHECKED_ENDPOINTS:
                self._checked.clear()
            self._checked[endpoint] = verdict
        return verdict

    def _payload(self, push: Push) -> bytes:
        """The plaintext depends on the message only: built once per message, not once per device."""
        key = (push.message_id, push.chat_id, push.chat_name, push.sender_id, push.sender_name, push.text)
        if self._last_payload[0] != key:
            self._last_payload = (key, webpush_payload(push, content=self._content))
        return self._last_payload[1]

    def _authorization(self, endpoint: str) -> str:
        """`vapid t=<JWT>, k=<public key>` for the endpoint's origin, signed once per origin and
        reused until JWT_REFRESH_BEFORE ahead of its expiry."""
        parts = urllib.parse.urlsplit(endpoint)
        origin = f"{parts.scheme}://{parts.netloc}"
        now = time.time()
        cached = self._jwts.get(origin)
        if cached is not None and now < cached[1]:
            return cached[0]
        claims = {"aud": origin, "exp": int(now + JWT_LIFETIME), "sub": self._subject}
        header = self._vapid.sign(claims)["Authorization"]
        self._jwts[origin] = (header, now + JWT_LIFETIME - JWT_REFRESH_BEFORE)
        return header

    def _open_session(self):
        import aiohttp  # see __init__: already imported by pywebpush by now

        self._client_error = aiohttp.ClientError
        connector = aiohttp.TCPConnector(ssl=self._ssl, limit=0, limit_per_host=CONNECTIONS_PER_HOST)
        self._session = aiohttp.ClientSession(connector=connector,
                                              timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT))
        return self._session

    async def _post(self, endpoint: str, body: bytes, headers: dict) -> Result:
        session = self._session or self._open_session()
        try:
            async with session.post(endpoint, data=body, headers=headers, allow_redirects=False) as response:
                await response.read()  # the whole answer, so the connection is reused
                status, reason = response.status, response.reason
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
        except asyncio.TimeoutError:
            return Result(Outcome.TRANSIENT, None, REASON_TIMEOUT)
        except self._client_error:
            return Result(Outcome.TRANSIENT, None, REASON_CONNECTION)
        return Result(classify(Platform.WEBPUSH, status, reason), status, reason, retry_after)
