"""The ceiling: lean clients that send the dispatcher's requests straight to the same fakes.

APNs: raw `h2` on asyncio, N connections x M streams. Each connection sends one request first
(the fake, like Apple, allows one stream until a request with a valid provider token is accepted),
then keeps up to M streams in flight, opening as many as it may at once and writing all of their
frames in one write (several streams per flush). Headers are HPACK literals without Huffman coding;
the constant ones (topic, JWT, ...) are indexed once per connection (their encoded bytes then reused),
the per-request ones are not (the dispatcher's own encoder, notifier.providers.h2client.PlainEncoder:
the leanest HPACK encoding this project has, for both).

FCM: the same kind of raw `h2` client, N connections x M streams, to the fake's HTTP/2 listener
(FCM_ENDPOINT_H2 / send_url in bench.fakes' info), with one OAuth access token fetched first from the
token endpoint (HTTP/1.1, as google-auth does). A connection opens no stream before the server's first
SETTINGS has arrived, then keeps min(M, its MAX_CONCURRENT_STREAMS) in flight (Google: 100). Headers
as for APNs: literals without Huffman, the constant ones (path, authority, bearer token, content type)
indexed once per connection, content-length not indexed.

Web Push: asyncio + one aiohttp session with the provider's connection limit (100 per push service,
notifier.providers.webpush.CONNECTIONS_PER_HOST), as many workers as connections, each doing per push
what the provider does: `WebPusher(subscription).encode(payload)` (RFC 8291: a fresh ECDH key, an ECDH
with the browser's key, HKDFs, AES-GCM) and the POST with the provider's headers and one VAPID
`Authorization` signed before the clock (the provider signs one per push service and reuses it). Here
the encryption is part of the per-push work, so it is inside the clock; only the payload bytes and the
headers are built before it. The connections are opened before the clock too (a warm-up of one push
per connection), as the dispatcher's are warm.

Requests are built before the clock starts: this measures what the fake and the wire allow.
"""
from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import ssl
import time
from collections import deque
from urllib.parse import quote, urlsplit

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import ConnectionTerminated, DataReceived, RemoteSettingsChanged, ResponseReceived, StreamEnded, \
    StreamReset
from hpack import NeverIndexedHeaderTuple

from bench.common import cpu_seconds
from notifier.model import Platform, Push
from notifier.providers.h2client import PlainEncoder
from notifier.payload import apns_collapse_id, apns_id, apns_payload, fcm_message, webpush_payload, webpush_topic


def sample_push(platform: Platform, token: str, index: int, message_id: int = 1) -> Push:
    return Push(delivery_id=index, message_id=message_id, chat_id=1, chat_name="bench", sender_id=1,
                sender_name="sender", text="ceiling message", device_id=index, platform=platform, token=token,
                app=None)


# ------------------------------------------------------------------ APNs over raw h2

class _Conn(H2Connection):
    """h2 told the open-stream count (h2 rescans every stream on each new one otherwise)."""

    def __init__(self):
        super().__init__(H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=False,
                                         normalize_outbound_headers=False, validate_inbound_headers=False))
        self.encoder = PlainEncoder()
        self.counted = 0

    @property
    def open_outbound_streams(self):
        return self.counted


class _LeanClient(asyncio.Protocol):
    """One connection of a lean HTTP/2 client: sends the shared `work` queue's (headers, body)
    requests on as many streams as `allowed()` says, counts the answers, sets `done` when the
    queue is empty and nothing is in flight. Recording stays out of the way: a status count."""

    def __init__(self, work: deque, max_streams: int, done: asyncio.Future, stats: dict):
        self.work = work
        self.max_streams = max_streams
        self.done = done
        self.stats = stats
        self.conn = _Conn()
        self.transport = None
        self.in_flight = 0
        self.settled = False  # the server's first SETTINGS (its stream limit) has arrived
        self.statuses: dict = {}

    def allowed(self) -> int:
        """Streams that may be open at once: ours and the server's limit."""
        return min(self.max_streams, self.conn.remote_settings.max_concurrent_streams)

    def ready(self) -> bool:
        """Whether requests may go now (before the server's SETTINGS: only if the protocol allows)."""
        return self.settled

    def answered(self) -> None:
        """A stream ended (subclasses learn from it)."""

    def connection_made(self, transport):
        self.transport = transport
        self.conn.initiate_connection()
        self.fill() if self.ready() else self.flush()

    def fill(self):
        conn = self.conn
        while self.in_flight < self.allowed() and self.work:
            if conn.outbound_flow_control_window < len(self.work[0][1]):
                break  # the connection's send window is spent: the next WINDOW_UPDATE calls fill() again
            headers, body = self.work.popleft()
            stream_id = conn.get_next_available_stream_id()
            conn.counted = self.in_flight
            conn.send_headers(stream_id, headers)
            conn.send_data(stream_id, body, end_stream=True)
            self.in_flight += 1
        self.flush()
        if not self.work and self.in_flight == 0 and not self.done.done():
            self.done.set_result(None)

    def flush(self):
        data = self.conn.data_to_send()
        if data:
            self.transport.write(data)

    def data_received(self, data):
        conn = self.conn
        for event in conn.receive_data(data):
            kind = type(event)
            if kind is ResponseReceived:
                for name, value in event.headers:
                    if name == b":status":
                        self.statuses[value] = self.statuses.get(value, 0) + 1
            elif kind is DataReceived:
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif kind is StreamEnded or kind is StreamReset:
                if kind is StreamReset:
                    self.statuses[b"RST_STREAM"] = self.statuses.get(b"RST_STREAM", 0) + 1
                self.in_flight -= 1
                self.stats["answered"] += 1
                if self.stats["first"] is None:
                    self.stats["first"] = time.perf_counter()
                self.answered()
            elif kind is RemoteSettingsChanged:
                self.settled = True
            elif kind is ConnectionTerminated:
                if not self.done.done():
                    self.done.set_exception(ConnectionError(f"GOAWAY {event.error_code!r}"))
        self.fill() if self.ready() else self.flush()

    def connection_lost(self, exc):
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"lost: {exc}"))


class _APNsClient(_LeanClient):
    """Apple's rule for token auth: one stream until the first answer, then the server's limit."""

    def __init__(self, work: deque, max_streams: int, done: asyncio.Future, stats: dict):
        super().__init__(work, max_streams, done, stats)
        self.authenticated = False

    def allowed(self) -> int:
        return super().allowed() if self.authenticated else 1

    def ready(self) -> bool:
        return True  # the first request goes with the preface, as the dispatcher's does

    def answered(self) -> None:
        self.authenticated = True


def apns_requests(tokens, key_file: str, key_id: str, team_id: str, topic: str, host: str, message_id: int = 1):
    """(headers, body) per token, as the provider builds them."""
    import jwt
    key = open(key_file).read()
    bearer = "bearer " + jwt.encode({"iss": team_id, "iat": int(time.time())}, key, algorithm="ES256",
                                    headers={"kid": key_id})
    expiration = str(int(time.time()) + 86400).encode()
    constant = [(b"host", host.encode()), (b"apns-topic", topic.encode()), (b"apns-push-type", b"alert"),
                (b"apns-priority", b"10"), (b"authorization", bearer.encode())]
    out = []
    for index, token in enumerate(tokens):
        push = sample_push(Platform.APNS, token, index, message_id)
        headers = [(b":method", b"POST"), (b":scheme", b"https"),
                   NeverIndexedHeaderTuple(b":path", b"/3/device/" + quote(token, safe="").encode()),
                   NeverIndexedHeaderTuple(b"apns-id", apns_id(message_id, index).encode()),
                   NeverIndexedHeaderTuple(b"apns-expiration", expiration),
                   NeverIndexedHeaderTuple(b"apns-collapse-id", apns_collapse_id(message_id).encode()),
                   *constant]
        out.append((headers, apns_payload(push)))
    return out


async def _run_apns(requests, host: str, port: int, ca_file: str, connections: int, streams: int) -> dict:
    loop = asyncio.get_running_loop()
    context = ssl.create_default_context(cafile=ca_file)
    context.set_alpn_protocols(["h2"])
    work = deque(requests)
    stats = {"answered": 0, "first": None}
    started = time.perf_counter()
    clients = []
    for _ in range(connections):
        done = loop.create_future()
        _, client = await loop.create_connection(lambda d=done: _APNsClient(work, streams, d, stats), host, port,
                                                 ssl=context, server_hostname=host)
        clients.append(client)
    await asyncio.gather(*(c.done for c in clients))
    elapsed = time.perf_counter() - started
    for client in clients:
        client.transport.close()
    statuses: dict = {}
    for client in clients:
        for status, count in client.statuses.items():
            statuses[status.decode()] = statuses.get(status.decode(), 0) + count
    return {"requests": len(requests), "seconds": elapsed, "rate": len(requests) / elapsed,
            "first_ms": (stats["first"] - started) * 1000 if stats["first"] else None, "statuses": statuses,
            "connections": connections, "streams": streams}


def _timed(run):
    """Add the CPU seconds this process spent (all threads) to run()'s result."""
    before = sum(os.times()[:2])
    result = run()
    result["client_cpu_s"] = round(sum(os.times()[:2]) - before, 3)
    return result


def apns_ceiling(requests, host: str, port: int, ca_file: str, connections: int = 4, streams: int = 250) -> dict:
    """Send prepared APNs requests; requests/s and the statuses seen."""
    return _timed(lambda: asyncio.run(_run_apns(requests, host, port, ca_file, connections, streams)))


# ------------------------------------------------------------------ FCM over raw h2

def fcm_access_token(account_file: str, ca_file: str) -> str:
    """An OAuth access token from the fake's token endpoint (the JWT-bearer grant google-auth makes)."""
    import jwt
    from urllib.parse import urlencode
    account = json.loads(open(account_file).read())
    now = int(time.time())
    assertion = jwt.encode({"iss": account["client_email"], "aud": "https://oauth2.googleapis.com/token",
                            "scope": "https://www.googleapis.com/auth/firebase.messaging", "iat": now,
                            "exp": now + 3600}, account["private_key"], algorithm="RS256")
    url = urlsplit(account["token_uri"])
    connection = http.client.HTTPSConnection(url.hostname, url.port,
                                             context=ssl.create_default_context(cafile=ca_file), timeout=30)
    try:
        connection.request("POST", url.path, body=urlencode({
            "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": assertion}),
            headers={"Content-Type": "application/x-www-form-urlencoded"})
        return json.loads(connection.getresponse().read())["access_token"]
    finally:
        connection.close()


def fcm_requests(tokens, message_id: int = 1, ttl: int = 86400):
    """Bodies as pyfcm's parse_payload builds them from notifier.payload.fcm_message."""
    from pyfcm.baseapi import BaseAPI
    api = BaseAPI.__new__(BaseAPI)  # parse_payload needs no credentials
    api.json_encoder = None
    return [api.parse_payload(**fcm_message(sample_push(Platform.FCM, token, i, message_id), ttl))
            for i, token in enumerate(tokens)]


FCM_CONNECTIONS = 4
FCM_STREAMS = 100  # what Google's front-ends (and the fake) advertise as MAX_CONCURRENT_STREAMS


def fcm_h2_requests(bodies, send_url: str, access_token: str):
    """(headers, body) per message body, for HTTP/2 POSTs to `send_url` with the bearer token."""
    url = urlsplit(send_url)
    constant = [(b":method", b"POST"), (b":scheme", b"https"), (b":path", url.path.encode()),
                (b":authority", url.netloc.encode()), (b"authorization", f"Bearer {access_token}".encode()),
                (b"content-type", b"application/json; UTF-8")]
    return [(constant + [NeverIndexedHeaderTuple(b"content-length", str(len(body)).encode())], body)
            for body in bodies]


class _FCMClient(_LeanClient):
    """Google's front-ends: the server's stream limit, from its first SETTINGS on."""


async def _run_fcm(requests, send_url: str, ca_file: str, connections: int, streams: int) -> dict:
    loop = asyncio.get_running_loop()
    url = urlsplit(send_url)
    context = ssl.create_default_context(cafile=ca_file)
    context.set_alpn_protocols(["h2"])
    work = deque(requests)
    stats = {"answered": 0, "first": None}
    started = time.perf_counter()
    clients = []
    for _ in range(connections):
        done = loop.create_future()
        transport, client = await loop.create_connection(lambda d=done: _FCMClient(work, streams, d, stats),
                                                         url.hostname, url.port or 443, ssl=context,
                                                         server_hostname=url.hostname)
        if transport.get_extra_info("ssl_object").selected_alpn_protocol() != "h2":
            transport.close()
            raise ConnectionError(f"{send_url} does not speak HTTP/2 (ALPN h2 not negotiated)")
        clients.append(client)
    await asyncio.gather(*(c.done for c in clients))
    elapsed = time.perf_counter() - started
    for client in clients:
        client.transport.close()
    statuses: dict = {}
    for client in clients:
        for status, count in client.statuses.items():
            statuses[status.decode()] = statuses.get(status.decode(), 0) + count
    return {"requests": len(requests), "seconds": elapsed, "rate": len(requests) / elapsed,
            "first_ms": (stats["first"] - started) * 1000 if stats["first"] else None, "statuses": statuses,
            "connections": connections, "streams": streams}


def fcm_ceiling(bodies, send_url: str, access_token: str, ca_file: str, connections: int = FCM_CONNECTIONS,
                streams: int = FCM_STREAMS) -> dict:
    """POST prepared FCM bodies over HTTP/2 (`send_url` must be the fake's h2 listener: info["send_url"] of
    `python -m bench.fakes fcm`); requests/s, first answer, statuses, client CPU (client_cpu_s).
    Concurrency is `connections` x min(`streams`, the server's MAX_CONCURRENT_STREAMS).
    """
    requests = fcm_h2_requests(bodies, send_url, access_token)
    return _timed(lambda: asyncio.run(_run_fcm(requests, send_url, ca_file, connections, streams)))


def mixed_ceiling(apns_reqs, fcm_bodies, apns_args: dict, fcm_args: dict) -> dict:
    """Both at once, on one event loop (two loops in two threads would contend for the GIL)."""
    fcm = dict(fcm_args)
    fcm.pop("threads", None)
    fcm_reqs = fcm_h2_requests(fcm_bodies, fcm["send_url"], fcm.pop("access_token"))
    return _timed(lambda: asyncio.run(_mixed_ceiling(apns_reqs, fcm_reqs, apns_args, fcm)))


async def _mixed_ceiling(apns_reqs, fcm_reqs, apns_args: dict, fcm_args: dict) -> dict:
    fcm_args = {"connections": FCM_CONNECTIONS, "streams": FCM_STREAMS, **fcm_args}
    started = time.perf_counter()
    apns, fcm = await asyncio.gather(_run_apns(apns_reqs, **apns_args), _run_fcm(fcm_reqs, **fcm_args))
    elapsed = time.perf_counter() - started
    total = len(apns_reqs) + len(fcm_reqs)
    return {"requests": total, "seconds": elapsed, "rate": total / elapsed, "apns": apns, "fcm": fcm}


# ------------------------------------------------------------------ Web Push over aiohttp

WEBPUSH_CONNECTIONS = 100  # notifier.providers.webpush.CONNECTIONS_PER_HOST
VAPID_LIFETIME = 12 * 3600  # the provider's JWT_LIFETIME


def webpush_authorization(key_file: str, subject: str, origin: str) -> str:
    """`vapid t=<JWT>, k=<key>` for one push service origin, signed by py_vapid as the provider does."""
    from py_vapid import Vapid02
    vapid = Vapid02.from_file(key_file)
    return vapid.sign({"aud": origin, "exp": int(time.time()) + VAPID_LIFETIME, "sub": subject})["Authorization"]


def webpush_message(authorization: str, message_id: int = 1, ttl: int = 86400) -> tuple[bytes, dict]:
    """(plaintext, headers) of one message's pushes, as notifier.providers.webpush builds them; the
    plaintext is the same for every subscription (it is encrypted per subscription)."""
    payload = webpush_payload(sample_push(Platform.WEBPUSH, "", 0, message_id))
    headers = {"TTL": str(ttl), "Urgency": "high", "Topic": webpush_topic(message_id),
               "Content-Encoding": "aes128gcm", "Content-Type": "application/octet-stream",
               "Authorization": authorization}
    return payload, headers


def webpush_encode(subscription: dict, payload: bytes) -> bytes:
    """The provider's encryption, call for call."""
    from pywebpush import WebPusher
    return WebPusher(subscription).encode(payload)["body"]


def webpush_encryption_cost(subscriptions, payload: bytes) -> dict:
    """CPU per push of the encryption alone, in a loop without I/O: `WebPusher(sub).encode(payload)`
    for each subscription, then the part of it the protocol cannot do without (a fresh P-256 key and
    one ECDH with the browser's key). Returns the bodies too: the fake's own ceiling reuses them."""
    from cryptography.hazmat.primitives.asymmetric import ec
    webpush_encode(subscriptions[0], payload)  # imports pywebpush outside the clock
    started = time.process_time()
    bodies = [webpush_encode(sub, payload) for sub in subscriptions]
    encode = time.process_time() - started
    points = [ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), _b64url(s["keys"]["p256dh"]))
              for s in subscriptions]
    started = time.process_time()
    for point in points:
        ec.generate_private_key(ec.SECP256R1()).exchange(ec.ECDH(), point)
    ecdh = time.process_time() - started
    n = len(subscriptions)
    return {"subscriptions": n, "encode_us": round(encode * 1e6 / n, 1), "ecdh_us": round(ecdh * 1e6 / n, 1),
            "body_bytes": len(bodies[0]) if bodies else None, "plaintext_bytes": len(payload), "bodies": bodies}


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


async def _run_webpush(subscriptions, payload: bytes, headers: dict, ca_file: str, connections: int,
                       bodies=None, requests: int | None = None, fake_pid: int | None = None) -> dict:
    """POST one push per subscription (or `requests` pushes, cycling through them), encrypting each
    unless `bodies` (pre-encrypted, one per subscription) are given. With `fake_pid`, the fake's CPU
    inside the clock too (fake_cpu_s: the warm-up's TLS handshakes are not in it)."""
    import aiohttp  # here: only the Web Push client needs it
    from pywebpush import WebPusher

    connector = aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=ca_file), limit=0,
                                     limit_per_host=connections)
    statuses: dict = {}
    total = requests if requests is not None else len(subscriptions)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        async def push(index: int) -> None:
            sub = subscriptions[index % len(subscriptions)]
            body = bodies[index % len(bodies)] if bodies is not None else WebPusher(sub).encode(payload)["body"]
            async with session.post(sub["endpoint"], data=body, headers=headers, allow_redirects=False) as response:
                await response.read()  # the whole answer, so the connection is reused
                statuses[response.status] = statuses.get(response.status, 0) + 1

        # warm: one push per connection, all at once, so every connection is open before the clock
        await asyncio.gather(*(push(i) for i in range(min(connections, total))))
        warm = dict(statuses)
        statuses.clear()
        work = iter(range(total))
        first = []

        async def worker() -> None:
            for index in work:
                await push(index)
                if not first:
                    first.append(time.perf_counter())

        cpu = sum(os.times()[:2])
        fake_cpu = cpu_seconds(fake_pid) if fake_pid else None
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - started
        cpu = sum(os.times()[:2]) - cpu
        if fake_cpu is not None:
            fake_cpu = round(cpu_seconds(fake_pid) - fake_cpu, 3)
    return {"requests": total, "seconds": elapsed, "rate": total / elapsed,
            "first_ms": (first[0] - started) * 1000 if first else None,
            "statuses": {str(k): v for k, v in statuses.items()}, "warm_up_statuses": {str(k): v for k, v in warm.items()},
            "connections": connections, "client_cpu_s": round(cpu, 3), "fake_cpu_s": fake_cpu,
            "encrypted_in_the_clock": bodies is None}


def webpush_ceiling(subscriptions, payload: bytes, headers: dict, ca_file: str,
                    connections: int = WEBPUSH_CONNECTIONS, fake_pid: int | None = None) -> dict:
    """The lean Web Push client: one encryption and one POST per subscription on `connections`
    keep-alive connections (opened before the clock); requests/s, first answer, statuses, and the
    client's CPU inside the clock (client_cpu_s; the fake's, fake_cpu_s, given its pid)."""
    return asyncio.run(_run_webpush(subscriptions, payload, headers, ca_file, connections, fake_pid=fake_pid))


def webpush_fake_ceiling(subscriptions, bodies, headers: dict, ca_file: str, requests: int,
                         connections: int = WEBPUSH_CONNECTIONS, fake_pid: int | None = None) -> dict:
    """The fake alone: `requests` POSTs of bodies encrypted before the clock (bodies[i] for
    subscriptions[i], cycling), so the client spends nothing on encryption and what is measured is
    how many pushes the fake can judge and decrypt."""
    return asyncio.run(_run_webpush(subscriptions, b"", headers, ca_file, connections, bodies=bodies,
                                    requests=requests, fake_pid=fake_pid))
