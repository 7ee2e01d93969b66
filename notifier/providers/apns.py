"""APNs provider: Apple's HTTP/2 provider API through notifier.providers.h2client, token
(.p8, ES256 JWT made with PyJWT) or certificate auth.

Why not aioapns, as before: stock aioapns mis-tracks Apple's stream limit (one stream on a new
token-auth connection until a request with a valid provider token is accepted, then raised by
SETTINGS: it was left with 2-3 usable streams of 1000, opened up to max_connections connections
and polled every 10 ms), retries inside its send with 1 s sleeps, never acknowledged received
DATA, ignored RST_STREAM, and wrote each request separately. The previous release fixed all of it
by subclassing its protocol and pool, which tied us to its private names (``_create_connection``,
``_wake``, ...). The same fixes now live in our own small client (h2client: stream limits
followed exactly, no other connection opened while one has not answered yet, waits without
polling, received DATA acknowledged, flow control, writes coalesced per loop pass, plain HPACK,
PING liveness, GOAWAY), which FCM uses too. Measured in bench.fanout (`make bench` of 2026-12-01
13:32 UTC: 10,000 devices, beside a lean raw-h2 client against the same fake in the same run):
11,327 pushes/s on one connection against the lean client's 16,770/s on four (0.68x), 74 against
45 us of CPU per push (aioapns with the previous release's fixes: 0.31-0.37x at about 234 us).

What this module adds for Apple: the request headers (apns-id, apns-topic, apns-push-type,
apns-priority, apns-expiration, apns-collapse-id; per-request values never indexed by HPACK so
they do not evict the provider token), one provider JWT per provider reused for 30 minutes (Apple:
refresh no more often than every 20, no less than every 60) and re-signed after
ExpiredProviderToken, the exact payload bytes notifier.payload sized to 4096, and the outcome of
each answer (notifier.classify).
"""
from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from functools import lru_cache
from pathlib import Path
from urllib.parse import quote

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from hpack import NeverIndexedHeaderTuple

from notifier.classify import REASON_CONNECTION, REASON_GOAWAY, REASON_STREAM_RESET, REASON_TIMEOUT, classify
from notifier.config import ConfigError, Settings
from notifier.model import Outcome, Platform, Push, Result
from notifier.payload import apns_collapse_id, apns_id, apns_payload
from notifier.providers.base import shorten_token, tls_context
from notifier.retry import parse_retry_after
from notifier.providers.h2client import (
    ClientError,
    ConnectFailed,
    GoAway,
    H2Client,
    RequestTimeout,
    StreamRefused,
    StreamReset,
)

logger = logging.getLogger(__name__)

PRODUCTION_HOST = "api.push.apple.com"
SANDBOX_HOST = "api.development.push.apple.com"
DEFAULT_MAX_CONNECTIONS = 4
DEFAULT_REQUEST_TIMEOUT = 10.0
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_MAX_STREAMS = 1000       # our own ceiling per connection, whatever the server allows
_JWT_TTL = 30 * 60               # reuse one provider token this long
_JWT_MIN_AGE = 20 * 60           # Apple: do not refresh the provider token more often than this
_CONSTANT = (b"apns-push-type", b"alert"), (b"apns-priority", b"10")


class _ProviderToken:
    """The provider JWT (ES256; kid header, iss=team, iat), shared by every connection and request."""

    def __init__(self, key, key_id: str, team_id: str) -> None:
        self.key, self.key_id, self.team_id = key, key_id, team_id
        self._header: bytes | None = None
        self._issued_at = 0.0

    def header(self) -> bytes:
        """b"bearer <jwt>", signed again once it is 30 minutes old."""
        now = time.time()
        if self._header is None or now - self._issued_at >= _JWT_TTL:
            self._issued_at = int(now)
            token = jwt.encode({"iss": self.team_id, "iat": self._issued_at}, self.key, algorithm="ES256",
                               headers={"kid": self.key_id})
            self._header = b"bearer " + token.encode("ascii")
        return self._header

    def invalidate(self) -> None:
        """Apple said ExpiredProviderToken: sign a new one, unless ours is under 20 minutes old."""
        if time.time() - self._issued_at >= _JWT_MIN_AGE:
            self._header = None


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
                 max_streams_per_connection: int = DEFAULT_MAX_STREAMS) -> None:
        if max_connections < 1 or max_streams_per_connection < 1:
            raise ValueError("max_connections and max_streams_per_connection must be >= 1")
        if not settings.apns_configured:
            raise ConfigError("APNS_KEY_FILE or APNS_CERT_FILE: required for the APNs provider")
        if settings.apns_key_file and settings.apns_cert_file:
            raise ConfigError("APNS_KEY_FILE and APNS_CERT_FILE: set one of them, not both")
        if not settings.apns_topic:
            raise ConfigError("APNS_TOPIC: required when APNs credentials are set")
        self._topic = settings.apns_topic
        self._ttl = settings.push_ttl
        self._content = settings.push_content
        self._request_timeout = request_timeout
        self._host, self._port = _endpoint(settings)
        self.endpoint = f"{self._host}:{self._port}"
        self._token: _ProviderToken | None = None
        if settings.apns_key_file:
            for name in ("apns_key_id", "apns_team_id"):
                if not getattr(settings, name):
                    raise ConfigError(f"{name.upper()}: required with APNS_KEY_FILE")
            self._token = _ProviderToken(_load_p8(settings.apns_key_file), settings.apns_key_id,
                                         settings.apns_team_id)
            try:
                self._token.header()
            except Exception:
                raise ConfigError("APNS_KEY_FILE: the key cannot sign an ES256 provider token") from None
        else:
            _check_certificate(settings.apns_cert_file)
        self._ssl_context = _ssl_context(settings.push_ca_file, settings.apns_cert_file)
        self._client_options = dict(max_connections=max_connections, max_streams=max_streams_per_connection,
                                    connect_timeout=connect_timeout, ping_timeout=max(0.5, min(2.0, request_timeout)))
        self._client: H2Client | None = None
        self._closed = False
        self._shared_headers: dict = {}

    # --- the provider interface -----------------------------------------------

    async def send(self, push: Push) -> Result:
        if self._closed:
            return Result(Outcome.TRANSIENT, None, "provider_closed")
        shared = self._message_headers(push.app or self._topic, push.message_id)
        if shared is None:
            # our data (push.app), not Apple's answer: a header value with spaces, control or
            # non-ASCII characters cannot be sent; never deliverable as is
            return Result(Outcome.REJECTED, None, "BadTopic")
        headers = [*shared, NeverIndexedHeaderTuple(b"apns-id",
                                                    apns_id(push.message_id, push.device_id).encode("ascii"))]
        path = b"/3/device/" + quote(push.token, safe="").encode("ascii")
        payload = _message_payload(push.message_id, push.chat_id, push.chat_name, push.sender_id, push.sender_name,
                                   push.text, self._content)
        status, reason, retry_after = await self._post(path, headers, payload)
        outcome = classify(Platform.APNS, status, reason)
        if outcome is Outcome.AUTH:
            if reason == "ExpiredProviderToken" and self._token is not None:
                self._token.invalidate()
        elif outcome is not Outcome.SENT and logger.isEnabledFor(logging.DEBUG):
            logger.debug("APNs: delivery %s to %s: %s %s -> %s", push.delivery_id,
                         shorten_token(push.token), status, reason, outcome.value)
        return Result(outcome, status, reason, retry_after)

    def _message_headers(self, topic: str, message_id: int) -> list | None:
        """The headers every push of a message shares (topic, push type, priority, expiration,
        collapse id, provider token), None for a topic that cannot be a header value. Built once
        per message and second, not once per device: the expiration counts whole seconds, the
        provider token changes every 30 minutes."""
        now = int(time.time())
        bearer = self._token.header() if self._token is not None else None
        key = (topic, message_id)
        cached = self._shared_headers.get(key)
        if cached is not None and cached[0] == now and cached[1] is bearer:
            return cached[2]
        if not _valid_header_value(topic):
            return None
        headers = [
            (b"apns-topic", topic.encode("ascii")), *_CONSTANT,
            NeverIndexedHeaderTuple(b"apns-expiration", str(now + self._ttl).encode("ascii")),
            NeverIndexedHeaderTuple(b"apns-collapse-id", apns_collapse_id(message_id).encode("ascii")),
        ]
        if bearer is not None:
            headers.append((b"authorization", bearer))
        if len(self._shared_headers) >= 64:  # a batch holds a few messages; older ones are done
            self._shared_headers.clear()
        self._shared_headers[key] = (now, bearer, headers)
        return headers

    async def close(self) -> None:
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    # --- introspection (benchmarks, tests, metrics) ----------------------------

    def stats(self) -> dict:
        """Open connections, connections opened, streams in flight, each connection's stream limit."""
        if self._client is None:
            return {"open_connections": 0, "connections_opened": 0, "in_flight": 0, "stream_limits": []}
        return self._client.stats()

    # --- internals --------------------------------------------------------------

    async def _post(self, path: bytes, headers: list, payload: bytes) -> tuple[int | None, str | None, float | None]:
        """One attempt: (status, reason, retry_after); status None when no answer came."""
        try:
            response = await self._http().request(b"POST", path, headers, payload, timeout=self._request_timeout)
        except RequestTimeout:
            return None, REASON_TIMEOUT, None
        except (GoAway, StreamRefused):
            return None, REASON_GOAWAY, None
        except StreamReset:
            return None, REASON_STREAM_RESET, None
        except ConnectFailed as exc:
            _warn_once(f"APNs: cannot connect to {self.endpoint}: {exc}")
            return None, REASON_CONNECTION, None
        except ClientError:
            return None, REASON_CONNECTION, None
        retry_after = response.headers.get(b"retry-after")
        return (response.status, _reason(response.body),
                parse_retry_after(retry_after.decode("latin-1")) if retry_after is not None else None)

    def _http(self) -> H2Client:
        client = self._client
        if client is not None and client.bound_loop not in (None, asyncio.get_running_loop()):
            client = None  # connections belong to the loop that opened them: a new loop, a new client
        if client is None:
            client = self._client = H2Client(self._host, self._port, self._ssl_context, **self._client_options)
        return client


_last_warning = {"text": None, "at": 0.0}


def _warn_once(text: str) -> None:
    """The same connection trouble is logged at most every 10 s, not once per push of an outage."""
    now = time.monotonic()
    if text != _last_warning["text"] or now - _last_warning["at"] >= 10.0:
        _last_warning.update(text=text, at=now)
        logger.warning(text)


# --- configuration helpers ------------------------------------------------------

def _endpoint(settings: Settings) -> tuple[str, int]:
    if settings.apns_endpoint:
        host, sep, port = settings.apns_endpoint.strip().rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError("APNS_ENDPOINT: must be host:port")
        return host, int(port)
    return (SANDBOX_HOST if settings.apns_sandbox else PRODUCTION_HOST), 443


def _ssl_context(ca_file: str | None, cert_file: str | None) -> ssl.SSLContext:
    """System CAs plus PUSH_CA_FILE, ALPN h2, and the client certificate for certificate auth."""
    context = tls_context(ca_file, alpn=["h2"])
    if cert_file:
        context.load_cert_chain(cert_file, password=_refuse_password)
    return context


def _load_p8(path: str):
    """The .p8 key, checked to be an unencrypted EC P-256 key."""
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
    return key


class _EncryptedKey(Exception):
    pass


def _refuse_password():
    raise _EncryptedKey()


def _check_certificate(path: str) -> None:
    """Load APNS_CERT_FILE once (PEM certificate + unencrypted key) so a bad file fails at start-up,
    never with an interactive password prompt."""
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


@lru_cache(maxsize=64)
def _message_payload(message_id: int, chat_id: int, chat_name: str, sender_id: int, sender_name: str, text: str,
                     content: str) -> bytes:
    """The payload depends on the message only: built once per message, not once per device (keyed
    by the message's fields, not by a Push: a Push per device rebuilt only to be hashed cost more
    than the rest of the request's headers)."""
    message = Push(delivery_id=0, message_id=message_id, chat_id=chat_id, chat_name=chat_name, sender_id=sender_id,
                   sender_name=sender_name, text=text, device_id=0, platform=Platform.APNS, token="", app=None)
    return apns_payload(message, content=content)


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
