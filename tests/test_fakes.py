"""The protocol fakes behave like APNs and FCM v1, shown with the real clients over real sockets.

aioapns 4.0 and pyfcm 2.1.1 talk to the fakes unmodified except for where they connect:
- aioapns: `point_aioapns_at(client, fake)` swaps the pool's protocol class for a subclass
  with APNS_SERVER/APNS_PORT = the fake (one test also shows the class-attribute
  monkeypatch); trust comes from APNs(ssl_context=fake.tls.client_context()).
- pyfcm: `point_pyfcm_at(client, fake)` sets FCM_END_POINT_BASE on the instance; the
  service account's token_uri is the fake's; REQUESTS_CA_BUNDLE trusts the test CA.
A raw `h2` client checks what the clients hide: SETTINGS, RST_STREAM, GOAWAY, headers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import jwt
import pytest
import requests
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
)
from h2.settings import SettingCodes, Settings
from hpack import Decoder, Encoder, HeaderTuple, NeverIndexedHeaderTuple

from tests.conftest import APNS_TOPIC, FCM_PROJECT, APNsKey
from tests.fakes.apns import APNsFake, _RequestDecoder, _ResponseEncoder, point_aioapns_at
from tests.fakes.fcm import FCM_ERROR_TYPE, FCMFake, point_pyfcm_at
from tests.fakes.tls import TLSMaterial, make_apns_key, make_service_account

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parent.parent
TOKEN_A = "a1" * 32
TOKEN_B = "b2" * 32
TOKEN_C = "c3" * 32


# -- helpers -----------------------------------------------------------------------------------


def provider_token(
    key: APNsKey,
    *,
    iat: Optional[int] = None,
    kid: Optional[str] = None,
    iss: Optional[str] = None,
    p8_path: Optional[Path] = None,
) -> str:
    return jwt.encode(
        {"iss": iss or key.team_id, "iat": int(time.time()) if iat is None else iat},
        (p8_path or key.p8_path).read_text(),
        algorithm="ES256",
        headers={"kid": kid or key.key_id},
    )


class _UnlimitedRemoteSettings(Settings):
    """Lets the raw client open streams past the server's limit, to see the server refuse."""

    @property
    def max_concurrent_streams(self) -> int:  # type: ignore[override]
        return 2**31 - 1


@dataclass
class RawResponse:
    headers: Dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    ended: bool = False
    reset: Optional[int] = None

    @property
    def status(self) -> int:
        return int(self.headers[":status"])

    @property
    def json(self) -> Dict[str, Any]:
        return json.loads(self.body)

    @property
    def done(self) -> bool:
        return self.ended or self.reset is not None


class RawH2:
    """A minimal blocking HTTP/2 client over TLS, for what aioapns does not show."""

    def __init__(
        self,
        fake: APNsFake,
        key: Optional[APNsKey] = None,
        *,
        client_cert: bool = False,
        ignore_limit: bool = False,
    ) -> None:
        self.key = key
        ctx = fake.tls.client_context(alpn=("h2",), with_client_cert=client_cert)
        raw = socket.create_connection((fake.host, fake.port), timeout=5)
        self.sock = ctx.wrap_socket(raw, server_hostname=fake.host)
        self.alpn = self.sock.selected_alpn_protocol()
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        if ignore_limit:
            self.conn.remote_settings.__class__ = _UnlimitedRemoteSettings
        self.conn.initiate_connection()
        self.flush()
        #: MAX_CONCURRENT_STREAMS of each server SETTINGS that carried it, in order
        self.stream_limits: List[int] = []
        self.responses: Dict[int, RawResponse] = {}
        self.goaway: Optional[ConnectionTerminated] = None
        self.eof = False
        self.auth = f"bearer {provider_token(key)}" if key is not None else None

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(
        self,
        token: str = TOKEN_A,
        payload: Any = None,
        *,
        headers: Optional[Dict[str, Optional[str]]] = None,
        body: Optional[bytes] = None,
        method: str = "POST",
        path: Optional[str] = None,
        end: bool = True,
        flush: bool = True,
    ) -> int:
        """Open a stream; `headers` entries override the defaults (None drops one)."""
        merged: Dict[str, Optional[str]] = {
            "apns-topic": APNS_TOPIC,
            "apns-push-type": "alert",
            "authorization": self.auth,
        }
        merged.update(headers or {})
        stream_id = self.conn.get_next_available_stream_id()
        h = [
            (":method", method),
            (":scheme", "https"),
            (":path", path if path is not None else f"/3/device/{token}"),
            (":authority", "api.push.apple.com"),
        ]
        h += [(k, v) for k, v in merged.items() if v is not None]
        if body is None:
            body = json.dumps(payload if payload is not None else {"aps": {"alert": "hi"}}).encode()
        self.conn.send_headers(stream_id, h, end_stream=end and not body)
        if body:
            self.conn.send_data(stream_id, body, end_stream=end)
        self.responses[stream_id] = RawResponse()
        if flush:
            self.flush()
        return stream_id

    def end_stream(self, stream_id: int) -> None:
        self.conn.end_stream(stream_id)
        self.flush()

    def pump(self, until: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            if self.eof:
                raise ConnectionError("server closed the connection")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("condition not reached")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except ssl.SSLEOFError:
                data = b""
            if not data:
                self.eof = True
                continue
            for event in self.conn.receive_data(data):
                self._on_event(event)
            self.flush()

    def _on_event(self, event: Any) -> None:
        if isinstance(event, RemoteSettingsChanged):
            changed = event.changed_settings.get(SettingCodes.MAX_CONCURRENT_STREAMS)
            if changed is not None:
                self.stream_limits.append(changed.new_value)
        elif isinstance(event, ResponseReceived):
            self.responses[event.stream_id].headers = dict(event.headers)
        elif isinstance(event, DataReceived):
            self.responses[event.stream_id].body += event.data
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, StreamEnded):
            self.responses[event.stream_id].ended = True
        elif isinstance(event, StreamReset):
            self.responses[event.stream_id].reset = event.error_code
        elif isinstance(event, ConnectionTerminated):
            self.goaway = event

    def wait(self, *stream_ids: int, timeout: float = 5.0) -> List[RawResponse]:
        self.pump(lambda: all(self.responses[s].done for s in stream_ids), timeout)
        return [self.responses[s] for s in stream_ids]

    def wait_settings(self, count: int, timeout: float = 5.0) -> List[int]:
        self.pump(lambda: len(self.stream_limits) >= count, timeout)
        return self.stream_limits

    def send_and_wait(self, *args: Any, timeout: float = 5.0, **kwargs: Any) -> RawResponse:
        return self.wait(self.request(*args, **kwargs), timeout=timeout)[0]

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


@pytest.fixture
def raw_clients():
    """Factory of RawH2 connections, all closed after the test."""
    made: List[RawH2] = []

    def make(*args: Any, **kwargs: Any) -> RawH2:
        client = RawH2(*args, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def aioapns_token_client(fake: APNsFake, key: APNsKey, **kwargs: Any):
    """A real aioapns 4.0 client (token auth) aimed at the fake. Build it inside the loop."""
    from aioapns import APNs

    kwargs.setdefault("max_connection_attempts", 1)  # no hidden 1 s retry sleeps in tests
    client = APNs(
        key=kwargs.pop("key_text", key.p8_text),
        key_id=key.key_id,
        team_id=key.team_id,
        topic=APNS_TOPIC,
        use_sandbox=False,
        ssl_context=fake.tls.client_context(),
        **kwargs,
    )
    point_aioapns_at(client, fake)
    return client


def alert(token: str, message: Optional[Dict[str, Any]] = None, **kwargs: Any):
    from aioapns import NotificationRequest, PushType

    kwargs.setdefault("push_type", PushType.ALERT)
    return NotificationRequest(device_token=token, message=message or {"aps": {"alert": "hello"}}, **kwargs)


def run(coro_fn: Callable[[], Any]) -> Any:
    return asyncio.run(coro_fn())


@pytest.fixture(autouse=True)
def _quiet_aioapns():
    # aioapns logs every non-200 at ERROR; the tests below produce them on purpose
    logger = logging.getLogger("aioapns")
    previous = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(previous)


# -- APNs with the real aioapns client -------------------------------------------------------------


def test_aioapns_token_auth_delivers_and_apns_id_is_echoed(apns_fake: APNsFake, apns_key: APNsKey) -> None:
    async def main():
        client = aioapns_token_client(apns_fake, apns_key)
        try:
            return [await client.send_notification(alert(t)) for t in (TOKEN_A, TOKEN_B, TOKEN_A)]
        finally:
            client.pool.close()

    results = run(main)
    assert [r.status for r in results] == ["200", "200", "200"]
    assert apns_fake.wait_for(3, 5)
    assert apns_fake.sent_tokens() == {TOKEN_A: 2, TOKEN_B: 1}
    first = apns_fake.received[0]
    assert first.token == TOKEN_A and first.status == 200
    assert first.payload == {"aps": {"alert": "hello"}}
    assert first.headers["apns-topic"] == APNS_TOPIC
    assert first.headers["apns-push-type"] == "alert"
    assert first.headers["authorization"].startswith("bearer ")
    assert [r.apns_id for r in apns_fake.received] == [r.notification_id for r in results]
    assert apns_fake.connections_opened == 1
    assert apns_fake.loop_errors == []


def test_aioapns_endpoint_can_also_be_redirected_by_class_attributes(
    apns_fake: APNsFake, apns_key: APNsKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aioapns import APNs
    from aioapns.connection import APNsProductionClientProtocol

    monkeypatch.setattr(APNsProductionClientProtocol, "APNS_SERVER", apns_fake.host)
    monkeypatch.setattr(APNsProductionClientProtocol, "APNS_PORT", apns_fake.port)

    async def main():
        client = APNs(
            key=apns_key.p8_text,
            key_id=apns_key.key_id,
            team_id=apns_key.team_id,
            topic=APNS_TOPIC,
            use_sandbox=False,
            ssl_context=apns_fake.tls.client_context(),
            max_connection_attempts=1,
        )
        try:
            return await client.send_notification(alert(TOKEN_A))
        finally:
            client.pool.close()

    assert run(main).status == "200"
    assert apns_fake.received[0].headers["host"] == "127.0.0.1"  # aioapns sends host = APNS_SERVER


def test_aioapns_scripted_errors_are_consumed_in_order_then_200(apns_fake: APNsFake, apns_key: APNsKey) -> None:
    script = [
        (410, "Unregistered"),
        (400, "BadDeviceToken"),
        (400, "DeviceTokenNotForTopic"),
        (429, "TooManyRequests"),
        (500, "InternalServerError"),
        (503, "ServiceUnavailable"),
    ]
    apns_fake.script(TOKEN_A, script)

    async def main():
        client = aioapns_token_client(apns_fake, apns_key)
        try:
            out = [await client.send_notification(alert(TOKEN_A)) for _ in range(len(script) + 1)]
            out.append(await client.send_notification(alert(TOKEN_B)))
            return out
        finally:
            client.pool.close()

    before_ms = int(time.time() * 1000)
    results = run(main)
    got = [(int(r.status), r.description) for r in results]
    assert got == script + [(200, None), (200, None)]
    assert before_ms <= results[0].timestamp <= int(time.time() * 1000)  # 410 carries ms timestamp
    assert all(r.timestamp is None for r in results[1:])
    assert [r.status for r in apns_fake.received] == [s for s, _ in script] + [200, 200]
    assert apns_fake.sent_tokens() == {TOKEN_A: 1, TOKEN_B: 1}


def test_aioapns_outage_default_answers_everything_until_cleared(apns_fake: APNsFake, apns_key: APNsKey) -> None:
    apns_fake.script(TOKEN_A, [(410, "Unregistered")])  # the outage wins over scripts, keeps them
    apns_fake.set_default(503, "ServiceUnavailable", retry_after=30)

    async def main():
        client = aioapns_token_client(apns_fake, apns_key)
        try:
            during = await asyncio.gather(*(client.send_notification(alert(t)) for t in (TOKEN_A, TOKEN_B, TOKEN_C)))
            apns_fake.set_default(None)
            after = [await client.send_notification(alert(t)) for t in (TOKEN_A, TOKEN_A)]
            return during, after
        finally:
            client.pool.close()

    during, after = run(main)
    assert {(r.status, r.description) for r in during} == {("503", "ServiceUnavailable")}
    assert [(r.status, r.description) for r in after] == [("410", "Unregistered"), ("200", None)]
    assert apns_fake.received[0].status == 503


def test_aioapns_with_a_key_the_fake_does_not_know_gets_invalid_provider_token(
    apns_fake: APNsFake, apns_key: APNsKey, tmp_path: Path
) -> None:
    other_p8, _ = make_apns_key(tmp_path, key_id=apns_key.key_id)

    async def main():
        client = aioapns_token_client(apns_fake, apns_key, key_text=other_p8.read_text())
        try:
            return await client.send_notification(alert(TOKEN_A))
        finally:
            client.pool.close()

    result = run(main)
    assert (result.status, result.description) == ("403", "InvalidProviderToken")
    assert apns_fake.sent_tokens() == {}


def test_aioapns_oversize_payload_gets_413(apns_fake: APNsFake, apns_key: APNsKey) -> None:
    async def main():
        client = aioapns_token_client(apns_fake, apns_key)
        try:
            big = await client.send_notification(alert(TOKEN_A, {"aps": {"alert": "x" * 4100}}))
            fits = await client.send_notification(alert(TOKEN_A, {"aps": {"alert": "x" * 4000}}))
            return big, fits
        finally:
            client.pool.close()

    big, fits = run(main)
    assert (big.status, big.description) == ("413", "PayloadTooLarge")
    assert fits.status == "200"


def test_aioapns_without_push_type_gets_invalid_push_type(apns_fake: APNsFake, apns_key: APNsKey) -> None:
    # aioapns sends no apns-push-type unless NotificationRequest(push_type=...) is given
    async def main():
        client = aioapns_token_client(apns_fake, apns_key)
        try:
            return await client.send_notification(alert(TOKEN_A, push_type=None))
        finally:
            client.pool.close()

    result = run(main)
    assert (result.status, result.description) == ("400", "InvalidPushType")
    assert "apns-push-type" not in apns_fake.received[0].headers


def test_aioapns_certificate_auth(apns_cert_fake: APNsFake, tls_material: TLSMaterial) -> None:
    from aioapns import APNs

    async def main():
        # no topic: aioapns reads it from the certificate's subject UID, as for Apple's certs
        client = APNs(
            client_cert=str(tls_material.client_pem),
            use_sandbox=False,
            ssl_context=tls_material.client_context(),
            max_connection_attempts=1,
        )
        point_aioapns_at(client, apns_cert_fake)
        try:
            return await asyncio.gather(*(client.send_notification(alert(t)) for t in (TOKEN_A, TOKEN_B)))
        finally:
            client.pool.close()

    results = run(main)
    assert [r.status for r in results] == ["200", "200"]
    request = apns_cert_fake.received[0]
    assert request.headers["apns-topic"] == APNS_TOPIC
    assert "authorization" not in request.headers


def test_aioapns_fan_out_with_delay(apns_fake: APNsFake, apns_key: APNsKey) -> None:
    apns_fake.delay = 0.05
    tokens = [f"{i:064x}" for i in range(150)]

    async def main():
        client = aioapns_token_client(apns_fake, apns_key, max_connections=4)
        try:
            return await asyncio.gather(*(client.send_notification(alert(t)) for t in tokens))
        finally:
            client.pool.close()

    started = time.monotonic()
    results = run(main)
    assert {r.status for r in results} == {"200"}
    assert apns_fake.sent_tokens() == {t: 1 for t in tokens}
    assert 1 <= apns_fake.connections_opened <= 4
    # 150 x 50 ms one at a time would be 7.5 s; some concurrency must have happened
    assert time.monotonic() - started < 7.0, apns_fake.stats()


def test_aioapns_never_reopens_flow_control_window_so_error_bodies_stall(
    apns_fake: APNsFake, apns_key: APNsKey
) -> None:
    """aioapns never calls h2's acknowledge_received_data: after ~64 KB of error bodies on a
    connection the server may not send more DATA, and error results stop arriving (200s,
    headers only, still do). The fake respects flow control like any HTTP/2 server."""
    apns_fake.set_default(400, "BadDeviceToken")
    body_size = len(b'{"reason":"BadDeviceToken"}')

    async def main():
        client = aioapns_token_client(apns_fake, apns_key, max_connections=1)
        answered = 0
        try:
            for _ in range(3000):
                task = asyncio.ensure_future(client.send_notification(alert(TOKEN_A)))
                waited = 0.0
                while not task.done():
                    await asyncio.wait({task}, timeout=0.2)
                    waited += 0.2
                    if apns_fake.flow_control_stalls and waited >= 1.0:
                        task.cancel()  # the fake has parked this body; aioapns will never see it
                        return answered
                    assert waited < 15, "no answer and no stall"
                answered += 1
        finally:
            client.pool.close()
        return answered

    answered = run(main)
    assert answered == 65535 // body_size  # the client's connection window, never reopened
    assert apns_fake.flow_control_stalls == 1
    assert apns_fake.answered == answered + 1


# -- APNs at the HTTP/2 level ----------------------------------------------------------------------


def test_token_auth_connection_starts_at_one_stream_and_is_raised_after_a_valid_token(
    apns_fake: APNsFake, apns_key: APNsKey, raw_clients
) -> None:
    client = raw_clients(apns_fake, apns_key)
    assert client.alpn == "h2"
    assert client.wait_settings(1) == [1]  # the server's first SETTINGS
    response = client.send_and_wait(TOKEN_A)
    assert response.status == 200 and response.body == b""
    assert client.wait_settings(2) == [1, 1000]
    assert apns_fake.settings_changes == 1
    client.send_and_wait(TOKEN_B)
    assert client.stream_limits == [1, 1000]  # raised once per connection


def test_rejected_provider_token_keeps_the_limit_at_one(
    apns_fake: APNsFake, apns_key: APNsKey, raw_clients, tmp_path: Path
) -> None:
    other_p8, _ = make_apns_key(tmp_path)
    client = raw_clients(apns_fake)
    client.wait_settings(1)
    bad = client.send_and_wait(TOKEN_A, headers={"authorization": f"bearer {provider_token(apns_key, p8_path=other_p8)}"})
    assert (bad.status, bad.json) == (403, {"reason": "InvalidProviderToken"})
    missing = client.send_and_wait(TOKEN_A)
    assert missing.json == {"reason": "MissingProviderToken"}
    assert client.stream_limits == [1]
    good = client.send_and_wait(TOKEN_A, headers={"authorization": f"bearer {provider_token(apns_key)}"})
    assert good.status == 200
    assert client.wait_settings(2) == [1, 1000]


def test_streams_past_the_acknowledged_limit_are_refused(apns_fake: APNsFake, apns_key: APNsKey, raw_clients) -> None:
    client = raw_clients(apns_fake, apns_key, ignore_limit=True)
    client.wait_settings(1)  # our ACK of it goes out before the streams below
    first = client.request(TOKEN_A, end=False)  # stays open: one stream in flight
    second = client.request(TOKEN_B)
    (refused,) = client.wait(second)
    assert refused.reset == ErrorCodes.REFUSED_STREAM
    client.end_stream(first)
    (ok,) = client.wait(first)
    assert ok.status == 200
    assert apns_fake.refused_streams == 1
    assert [r.token for r in apns_fake.received] == [TOKEN_A]


def test_streams_opened_before_the_first_settings_is_acknowledged_are_served(
    apns_fake: APNsFake, apns_key: APNsKey, raw_clients
) -> None:
    # like aioapns: several requests written before the server's SETTINGS has been read
    client = raw_clients(apns_fake, apns_key)
    ids = [client.request(t, flush=False) for t in (TOKEN_A, TOKEN_B, TOKEN_C)]
    client.flush()
    assert [r.status for r in client.wait(*ids)] == [200, 200, 200]
    assert apns_fake.refused_streams == 0


def test_lower_on_reject_drops_the_limit_to_one_until_the_next_valid_request(
    tls_material: TLSMaterial, apns_key: APNsKey, raw_clients
) -> None:
    with APNsFake(
        tls_material,
        topic=APNS_TOPIC,
        key_id=apns_key.key_id,
        team_id=apns_key.team_id,
        public_key_pem=apns_key.public_key_pem,
        max_streams=500,
        lower_on_reject=True,
    ) as fake:
        fake.script(TOKEN_B, [(410, "Unregistered")])
        client = raw_clients(fake, apns_key)
        assert client.send_and_wait(TOKEN_A).status == 200
        assert client.wait_settings(2) == [1, 500]
        assert client.send_and_wait(TOKEN_B).status == 410
        assert client.wait_settings(3) == [1, 500, 1]
        assert client.send_and_wait(TOKEN_A).status == 200
        assert client.wait_settings(4) == [1, 500, 1, 500]


def test_certificate_auth_starts_at_max_streams_and_needs_no_bearer(apns_cert_fake: APNsFake, raw_clients) -> None:
    client = raw_clients(apns_cert_fake, client_cert=True)
    assert client.wait_settings(1) == [1000]
    assert client.send_and_wait(TOKEN_A).status == 200
    assert client.send_and_wait(TOKEN_A, headers={"apns-topic": None}).status == 200  # cert implies topic
    assert client.stream_limits == [1000]


def test_certificate_auth_refuses_a_client_without_certificate(apns_cert_fake: APNsFake) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError)):  # alert or close, depending on timing
        client = RawH2(apns_cert_fake)
        try:
            client.send_and_wait(TOKEN_A, timeout=3)
        finally:
            client.close()
    assert apns_cert_fake.received == []
    assert apns_cert_fake.connections_opened == 0  # the TLS handshake never completed


def test_goaway_after_n_requests_names_the_last_processed_stream(
    apns_fake: APNsFake, apns_key: APNsKey, raw_clients
) -> None:
    apns_fake.goaway_after(3)
    client = raw_clients(apns_fake, apns_key)
    first = client.send_and_wait(TOKEN_A)
    client.wait_settings(2)
    later = [client.request(TOKEN_B, flush=False) for _ in range(4)]
    client.flush()
    client.pump(lambda: client.goaway is not None)
    assert client.goaway.error_code == ErrorCodes.NO_ERROR
    assert client.goaway.last_stream_id == later[1]
    assert first.status == 200
    assert [client.responses[s].status for s in later[:2]] == [200, 200]
    assert not any(client.responses[s].done for s in later[2:])  # not processed: safe to retry
    with pytest.raises(ConnectionError):
        client.pump(lambda: False, timeout=3)  # and the server closes the connection
    assert apns_fake.answered == 3
    # a new connection works (and gets its own count)
    again = raw_clients(apns_fake, apns_key)
    assert again.send_and_wait(TOKEN_C).status == 200
    assert apns_fake.connections_opened == 2
    assert {r.connection_id for r in apns_fake.received} == {1, 2}


def _rel(seconds: int) -> int:
    return int(time.time()) + seconds


ERROR_CASES = [
    # (case id, request kwargs builder(key) -> dict, status, reason)
    ("missing-topic", lambda k: {"headers": {"apns-topic": None}}, 400, "MissingTopic"),
    ("foreign-topic", lambda k: {"headers": {"apns-topic": "com.other.app"}}, 400, "TopicDisallowed"),
    ("token-not-for-topic", lambda k: {"headers": {"apns-topic": "com.example.chat.voip"}}, 400, "DeviceTokenNotForTopic"),
    ("missing-push-type", lambda k: {"headers": {"apns-push-type": None}}, 400, "InvalidPushType"),
    ("unknown-push-type", lambda k: {"headers": {"apns-push-type": "shout"}}, 400, "InvalidPushType"),
    ("short-token", lambda k: {"token": "abcd"}, 400, "BadDeviceToken"),
    ("non-hex-token", lambda k: {"token": "zz" * 32}, 400, "BadDeviceToken"),
    ("no-token", lambda k: {"path": "/3/device/"}, 400, "MissingDeviceToken"),
    ("bad-path", lambda k: {"path": "/2/device/" + TOKEN_A}, 404, "BadPath"),
    ("get", lambda k: {"method": "GET", "body": b""}, 405, "MethodNotAllowed"),
    ("oversize", lambda k: {"payload": {"aps": {"alert": "x" * 4096}}}, 413, "PayloadTooLarge"),
    ("voip-limit", lambda k: {"payload": {"aps": {}, "x": "y" * 5200}, "headers": {"apns-push-type": "voip"}}, 413, "PayloadTooLarge"),
    ("empty-payload", lambda k: {"body": b""}, 400, "PayloadEmpty"),
    ("not-json", lambda k: {"body": b"not json"}, 400, "BadPayload"),
    ("bad-apns-id", lambda k: {"headers": {"apns-id": "not-a-uuid"}}, 400, "BadMessageId"),
    ("bad-priority", lambda k: {"headers": {"apns-priority": "7"}}, 400, "BadPriority"),
    ("bad-expiration", lambda k: {"headers": {"apns-expiration": "tomorrow"}}, 400, "BadExpirationDate"),
    ("long-collapse-id", lambda k: {"headers": {"apns-collapse-id": "c" * 65}}, 400, "BadCollapseId"),
    ("missing-jwt", lambda k: {"headers": {"authorization": None}}, 403, "MissingProviderToken"),
    ("not-bearer", lambda k: {"headers": {"authorization": "basic abc"}}, 403, "InvalidProviderToken"),
    ("garbage-jwt", lambda k: {"headers": {"authorization": "bearer abc.def.ghi"}}, 403, "InvalidProviderToken"),
    ("wrong-kid", lambda k: {"headers": {"authorization": "bearer " + provider_token(k, kid="OTHERKEY01")}}, 403, "InvalidProviderToken"),
    ("wrong-team", lambda k: {"headers": {"authorization": "bearer " + provider_token(k, iss="OTHERTEAM1")}}, 403, "InvalidProviderToken"),
    ("iat-in-future", lambda k: {"headers": {"authorization": "bearer " + provider_token(k, iat=_rel(600))}}, 403, "InvalidProviderToken"),
    ("expired-iat", lambda k: {"headers": {"authorization": "bearer " + provider_token(k, iat=_rel(-3700))}}, 403, "ExpiredProviderToken"),
]


@pytest.mark.parametrize("build,status,reason", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_each_error_reason(
    tls_material: TLSMaterial, apns_key: APNsKey, raw_clients, build: Callable, status: int, reason: str
) -> None:
    with APNsFake(
        tls_material,
        topic=APNS_TOPIC,
        key_id=apns_key.key_id,
        team_id=apns_key.team_id,
        public_key_pem=apns_key.public_key_pem,
        other_topics=["com.example.chat.voip"],
    ) as fake:
        client = raw_clients(fake, apns_key)
        apns_id = str(uuid.uuid4())
        kwargs = build(apns_key)
        kwargs["headers"] = {"apns-id": apns_id, **kwargs.get("headers", {})}
        response = client.send_and_wait(**kwargs)
        assert response.status == status
        assert response.json == {"reason": reason}
        assert response.headers["content-type"].startswith("application/json")
        if kwargs["headers"]["apns-id"] == apns_id:
            assert response.headers["apns-id"] == apns_id
        else:
            assert uuid.UUID(response.headers["apns-id"])  # a malformed apns-id is replaced
        assert fake.received[0].status == status and fake.received[0].reason == reason
        assert fake.sent_tokens() == {}


def test_retry_after_is_sent_with_429_and_503_when_scripted(apns_fake: APNsFake, apns_key: APNsKey, raw_clients) -> None:
    client = raw_clients(apns_fake, apns_key)
    apns_fake.set_default(429, "TooManyRequests", retry_after=7)
    r429 = client.send_and_wait(TOKEN_A)
    apns_fake.set_default(503, None, retry_after=30)
    r503 = client.send_and_wait(TOKEN_A)
    apns_fake.set_default(None)
    apns_fake.script(TOKEN_A, [(500, "InternalServerError")])
    r500 = client.send_and_wait(TOKEN_A)
    assert (r429.status, r429.json, r429.headers["retry-after"]) == (429, {"reason": "TooManyRequests"}, "7")
    assert (r503.status, r503.json, r503.headers["retry-after"]) == (503, {"reason": "ServiceUnavailable"}, "30")
    assert r500.status == 500 and "retry-after" not in r500.headers


def test_apns_id_is_generated_when_the_request_has_none(apns_fake: APNsFake, apns_key: APNsKey, raw_clients) -> None:
    client = raw_clients(apns_fake, apns_key)
    response = client.send_and_wait(TOKEN_A)
    assert uuid.UUID(response.headers["apns-id"])
    assert apns_fake.received[0].apns_id == response.headers["apns-id"]


def test_delay_keeps_many_streams_in_flight_on_one_connection(
    apns_fake: APNsFake, apns_key: APNsKey, raw_clients
) -> None:
    client = raw_clients(apns_fake, apns_key)
    client.send_and_wait(TOKEN_A)
    client.wait_settings(2)
    apns_fake.delay = 0.3
    started = time.monotonic()
    ids = [client.request(f"{i:064x}", flush=False) for i in range(200)]
    client.flush()
    assert not apns_fake.wait_for(201, 0.1)  # nothing answered before the delay
    responses = client.wait(*ids, timeout=10)
    assert {r.status for r in responses} == {200}
    assert time.monotonic() - started < 3.0  # answered together, not one after another
    assert apns_fake.max_concurrent_seen == 200
    assert apns_fake.wait_for(201, 1)


def test_thousands_of_requests_on_multiplexed_connections(apns_fake: APNsFake, apns_key: APNsKey, raw_clients) -> None:
    clients = [raw_clients(apns_fake, apns_key) for _ in range(2)]
    for client in clients:
        client.send_and_wait(TOKEN_A)
        client.wait_settings(2)
    total, window = 3000, 100
    started = time.monotonic()
    sent = 0
    while sent < total:
        batches = []
        for client in clients:
            ids = [client.request(f"{(sent + i):064x}", flush=False) for i in range(window)]
            client.flush()
            batches.append((client, ids))
            sent += window
        for client, ids in batches:
            assert {r.status for r in client.wait(*ids, timeout=20)} == {200}
    elapsed = time.monotonic() - started
    assert apns_fake.wait_for(total + 2, 5)
    assert apns_fake.max_concurrent_seen <= window
    assert elapsed < 20, f"{total} requests took {elapsed:.1f}s"
    # h2 still forgets closed streams (the fake only made its scan for them occasional)
    assert all(len(conn.h2.streams) <= 2 * window + 64 for conn in list(apns_fake._connections))


def _hpack_outcome(decoder: Decoder, block: bytes) -> Any:
    try:
        headers = decoder.decode(block, raw=True)
    except Exception as exc:  # noqa: BLE001 - the exception's type is what is compared
        return ("error", type(exc).__name__)
    table = decoder.header_table
    return (
        "ok",
        [(type(h).__name__, bytes(h[0]), bytes(h[1])) for h in headers],
        list(table.dynamic_entries),
        table.maxsize,
    )


def test_request_decoder_decodes_like_hpack() -> None:
    """The fake's inlined HPACK decoder: same headers, tuple types, table and errors as hpack's,
    over blocks from hpack's encoder (indexed, literal, never-indexed, Huffman, long lengths,
    table size updates) and damaged ones."""
    rng = random.Random(20261201)
    names = [b":path", b":method", b"apns-id", b"authorization", b"host", b"x-long-" + b"n" * 130, b"x-a"]
    for _ in range(400):
        encoder, expected, actual = Encoder(), Decoder(), _RequestDecoder()
        if rng.random() < 0.3:
            size = rng.choice([0, 100, 4096, 8192])
            encoder.header_table_size = size
            expected.max_allowed_table_size = actual.max_allowed_table_size = rng.choice([size, 4096])
        if rng.random() < 0.2:
            expected.max_header_list_size = actual.max_header_list_size = rng.choice([50, 200, 1000])
        for _ in range(rng.randint(1, 5)):
            headers = []
            for _ in range(rng.randint(0, 12)):
                name = rng.choice(names)
                value = bytes(rng.choice(b"abcxyz0123456789-/: \xff") for _ in range(rng.choice([0, 3, 36, 127, 300])))
                kind = rng.choice([HeaderTuple, NeverIndexedHeaderTuple])
                headers.append(kind(name, value))
            block = bytearray(encoder.encode(headers, huffman=rng.random() < 0.5))
            if block and rng.random() < 0.2:
                where = rng.randrange(len(block))
                if rng.random() < 0.5:
                    del block[where:]
                else:
                    block[where] = rng.randrange(256)
            outcome = _hpack_outcome(expected, bytes(block))
            assert _hpack_outcome(actual, bytes(block)) == outcome, bytes(block)
            if outcome[0] == "error":
                break


def test_response_encoder_writes_200_blocks_that_leave_the_table_alone() -> None:
    encoder, decoder = _ResponseEncoder(), Decoder()
    apns_id = str(uuid.uuid4()).encode()
    error = [(b":status", b"400"), (b"apns-id", apns_id), (b"content-type", b"application/json")]
    for block_headers in ([(b":status", b"200"), (b"apns-id", apns_id)], error, [(b":status", b"200"), (b"apns-id", apns_id)]):
        assert decoder.decode(encoder.encode(block_headers), raw=True) == block_headers
    ok_block = encoder.encode([(b":status", b"200"), (b"apns-id", apns_id)])
    assert ok_block == b"\x88\x00\x07apns-id\x24" + apns_id  # indexed status, literal never added to the table
    assert list(decoder.header_table.dynamic_entries) == list(encoder.header_table.dynamic_entries)


def test_wait_for_returns_false_on_timeout(apns_fake: APNsFake) -> None:
    started = time.monotonic()
    assert apns_fake.wait_for(1, 0.2) is False
    assert 0.15 < time.monotonic() - started < 2


def test_runs_as_a_process_and_prints_stats(tls_material: TLSMaterial, apns_key: APNsKey, tmp_path: Path) -> None:
    public_key = tmp_path / "apns-public.pem"
    public_key.write_bytes(apns_key.public_key_pem)
    cmd = [
        sys.executable, "-m", "tests.fakes.apns", "--port", "0",
        "--cert", str(tls_material.server_cert), "--key", str(tls_material.server_key),
        "--topic", APNS_TOPIC, "--public-key", str(public_key),
        "--key-id", apns_key.key_id, "--team-id", apns_key.team_id,
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        assert ready, "no ready line"
        line = json.loads(proc.stdout.readline())
        assert line["event"] == "ready"

        @dataclass
        class _Endpoint:
            host: str
            port: int
            tls: TLSMaterial

        client = RawH2(_Endpoint("127.0.0.1", line["port"], tls_material), apns_key)  # type: ignore[arg-type]
        try:
            assert client.send_and_wait(TOKEN_A).status == 200
            assert client.send_and_wait("nothex").status == 400
        finally:
            client.close()
        out, err = proc.communicate(timeout=15)  # closes stdin, which stops it
        stats = json.loads(out.strip().splitlines()[-1])
        assert stats["event"] == "stats"
        assert stats["answered"] == 2 and stats["statuses"] == {"200": 1, "400": 1}
        assert stats["connections_opened"] == 1
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def test_process_stops_on_sigterm(tls_material: TLSMaterial, apns_key: APNsKey, tmp_path: Path) -> None:
    public_key = tmp_path / "apns-public.pem"
    public_key.write_bytes(apns_key.public_key_pem)
    cmd = [
        sys.executable, "-m", "tests.fakes.apns", "--cert", str(tls_material.server_cert),
        "--key", str(tls_material.server_key), "--topic", APNS_TOPIC, "--public-key", str(public_key),
        "--key-id", apns_key.key_id, "--team-id", apns_key.team_id, "--ignore-stdin",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        assert ready and json.loads(proc.stdout.readline())["event"] == "ready"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
        assert json.loads(out.strip().splitlines()[-1])["answered"] == 0
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


# -- FCM with the real pyfcm client ------------------------------------------------------------------


def pyfcm_without_retries(fake: FCMFake, service_account: Path):
    """pyfcm with a plain adapter: its default one retries 502/503 with backoff."""
    from pyfcm import FCMNotification
    from requests.adapters import HTTPAdapter

    client = FCMNotification(
        service_account_file=str(service_account), project_id=FCM_PROJECT, adapter=HTTPAdapter(max_retries=0)
    )
    point_pyfcm_at(client, fake)
    return client


def access_token(fake: FCMFake, service_account: Path, scopes: Optional[List[str]] = None) -> str:
    from google.auth.transport.requests import Request
    from google.oauth2 import service_account as sa

    credentials = sa.Credentials.from_service_account_file(
        str(service_account), scopes=scopes or ["https://www.googleapis.com/auth/firebase.messaging"]
    )
    credentials.refresh(Request())
    return credentials.token


def test_pyfcm_delivers_reusing_one_access_token_and_one_connection(pyfcm_client, fcm_fake: FCMFake) -> None:
    results = [
        pyfcm_client.notify(fcm_token="tok-1", notification_title="Hi", notification_body="there", data_payload={"room": "42"}),
        pyfcm_client.notify(fcm_token="tok-2", data_payload={"room": "42"}),
        pyfcm_client.notify(fcm_token="tok-1", notification_title="Again"),
    ]
    assert all(r["name"].startswith(f"projects/{FCM_PROJECT}/messages/") for r in results)
    assert len({r["name"] for r in results}) == 3
    assert fcm_fake.sent_tokens() == {"tok-1": 2, "tok-2": 1}
    assert fcm_fake.tokens_issued == 1
    assert fcm_fake.connections_opened == 2  # one for /token (google-auth), one kept alive for sends
    first = fcm_fake.received[0]
    assert first.message == {
        "token": "tok-1",
        "notification": {"title": "Hi", "body": "there"},
        "data": {"room": "42"},
    }
    assert first.status == 200 and first.validate_only is False and first.project == FCM_PROJECT


SCRIPTED_FCM = [
    (404, "UNREGISTERED", "NOT_FOUND", "FCMNotRegisteredError"),
    (400, "INVALID_ARGUMENT", "INVALID_ARGUMENT", "InvalidDataError"),
    (403, "SENDER_ID_MISMATCH", "PERMISSION_DENIED", "FCMSenderIdMismatchError"),
    (401, "THIRD_PARTY_AUTH_ERROR", "UNAUTHENTICATED", "AuthenticationError"),
    (429, "QUOTA_EXCEEDED", "RESOURCE_EXHAUSTED", None),
    (500, "INTERNAL", "INTERNAL", "FCMServerError"),
    (503, "UNAVAILABLE", "UNAVAILABLE", "FCMServerError"),
]


@pytest.mark.parametrize("status,code,canonical,pyfcm_error", SCRIPTED_FCM, ids=[c[1] for c in SCRIPTED_FCM])
def test_scripted_fcm_errors_have_googles_shape(
    fcm_fake: FCMFake, fcm_service_account: Path, fcm_trust: None, status: int, code: str, canonical: str, pyfcm_error: Optional[str]
) -> None:
    import pyfcm.errors

    fcm_fake.script("tok-1", [(status, code, 0 if status == 429 else None)])
    bearer = access_token(fcm_fake, fcm_service_account)
    raw = requests.post(
        fcm_fake.send_url(),
        json={"message": {"token": "tok-1", "notification": {"title": "x"}}},
        headers={"Authorization": f"Bearer {bearer}"},
        timeout=5,
    )
    assert raw.status_code == status
    assert raw.headers["Content-Type"] == "application/json; charset=UTF-8"
    error = raw.json()["error"]
    assert (error["code"], error["status"]) == (status, canonical)
    assert error["details"] == [{"@type": FCM_ERROR_TYPE, "errorCode": code}]
    assert isinstance(error["message"], str) and error["message"]
    assert fcm_fake.received[-1].error_code == code

    if pyfcm_error is not None:  # and the real client maps it
        fcm_fake.script("tok-1", [(status, code)])
        client = pyfcm_without_retries(fcm_fake, fcm_service_account)
        with pytest.raises(getattr(pyfcm.errors, pyfcm_error)):
            client.notify(fcm_token="tok-1", notification_title="x")
        assert client.notify(fcm_token="tok-1", notification_title="x")["name"]  # script used up


def test_unregistered_body_is_exactly_googles(fcm_fake: FCMFake, fcm_service_account: Path, fcm_trust: None) -> None:
    fcm_fake.script("gone", [(404, "UNREGISTERED")])
    raw = requests.post(
        fcm_fake.send_url(),
        json={"message": {"token": "gone", "data": {"a": "b"}}},
        headers={"Authorization": f"Bearer {access_token(fcm_fake, fcm_service_account)}"},
        timeout=5,
    )
    assert raw.json() == {
        "error": {
            "code": 404,
            "message": "Requested entity was not found.",
            "status": "NOT_FOUND",
            "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "UNREGISTERED"}],
        }
    }


def test_quota_exceeded_carries_retry_after(fcm_fake: FCMFake, fcm_service_account: Path, fcm_trust: None) -> None:
    fcm_fake.script("tok-1", [(429, "QUOTA_EXCEEDED", 7), (429, "QUOTA_EXCEEDED")])
    fcm_fake.set_default(None)
    headers = {"Authorization": f"Bearer {access_token(fcm_fake, fcm_service_account)}"}
    body = {"message": {"token": "tok-1", "data": {"a": "b"}}}
    first = requests.post(fcm_fake.send_url(), json=body, headers=headers, timeout=5)
    second = requests.post(fcm_fake.send_url(), json=body, headers=headers, timeout=5)
    assert (first.status_code, first.headers["Retry-After"]) == (429, "7")
    assert (second.status_code, second.headers["Retry-After"]) == (429, str(fcm_fake.quota_retry_after))
    fcm_fake.set_default(503, "UNAVAILABLE", retry_after=12)
    third = requests.post(fcm_fake.send_url(), json=body, headers=headers, timeout=5)
    assert (third.status_code, third.headers["Retry-After"]) == (503, "12")


def test_pyfcm_sleeps_on_retry_after_and_sends_again(pyfcm_client, fcm_fake: FCMFake) -> None:
    fcm_fake.script("tok-1", [(429, "QUOTA_EXCEEDED", 1)])
    started = time.monotonic()
    assert pyfcm_client.notify(fcm_token="tok-1", notification_title="x")["name"]
    assert time.monotonic() - started >= 1.0  # pyfcm slept inside notify()
    assert [r.status for r in fcm_fake.received] == [429, 200]


def test_pyfcm_default_adapter_retries_a_503_silently(pyfcm_client, fcm_fake: FCMFake) -> None:
    fcm_fake.script("tok-1", [(503, "UNAVAILABLE")])
    assert pyfcm_client.notify(fcm_token="tok-1", notification_title="x")["name"]
    assert [r.status for r in fcm_fake.received] == [503, 200]


def test_outage_default_until_cleared(fcm_fake: FCMFake, fcm_service_account: Path, fcm_trust: None) -> None:
    from pyfcm.errors import FCMServerError

    client = pyfcm_without_retries(fcm_fake, fcm_service_account)
    fcm_fake.set_default(500, "INTERNAL")
    for token in ("tok-1", "tok-2", "tok-3"):
        with pytest.raises(FCMServerError):
            client.notify(fcm_token=token, notification_title="x")
    fcm_fake.set_default(None)
    assert client.notify(fcm_token="tok-1", notification_title="x")["name"]
    assert [r.status for r in fcm_fake.received] == [500, 500, 500, 200]
    assert fcm_fake.sent_tokens() == {"tok-1": 1}


def test_pyfcm_with_a_key_the_fake_does_not_know_gets_invalid_grant(
    fcm_fake: FCMFake, fcm_service_account: Path, fcm_trust: None, tmp_path: Path
) -> None:
    from pyfcm import FCMNotification
    from pyfcm.errors import InvalidDataError

    # same client_email as the registered account, different private key
    registered = json.loads(fcm_service_account.read_text())
    rogue, _ = make_service_account(
        tmp_path / "rogue", fcm_fake.token_uri, project_id=FCM_PROJECT, client_email=registered["client_email"]
    )
    client = FCMNotification(service_account_file=str(rogue), project_id=FCM_PROJECT)
    point_pyfcm_at(client, fcm_fake)
    with pytest.raises(InvalidDataError, match="invalid_grant"):
        client.notify(fcm_token="tok-1", notification_title="x")
    assert fcm_fake.tokens_issued == 0
    assert fcm_fake.received == []


def test_token_endpoint_checks_the_assertion(fcm_fake: FCMFake, fcm_service_account: Path, fcm_trust: None) -> None:
    info = json.loads(fcm_service_account.read_text())
    now = int(time.time())

    def grant(claims: Dict[str, Any], **extra: str) -> requests.Response:
        assertion = jwt.encode(claims, info["private_key"], algorithm="RS256", headers={"kid": info["private_key_id"]})
        form = {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": assertion, **extra}
        return requests.post(fcm_fake.token_uri, data=form, timeout=5)

    base = {
        "iss": info["client_email"],
        "aud": "https://oauth2.googleapis.com/token",
        "scope": "https://www.googleapis.com/auth/firebase.messaging",
        "iat": now,
        "exp": now + 3600,
    }
    ok = grant(base)
    assert ok.status_code == 200
    assert set(ok.json()) == {"access_token", "expires_in", "token_type"}
    assert ok.json()["expires_in"] == 3600 and ok.json()["token_type"] == "Bearer"
    assert grant({**base, "aud": fcm_fake.token_uri}).status_code == 200  # its own token_uri is fine too
    for claims, error in [
        ({**base, "aud": "https://example.com/token"}, "invalid_grant"),
        ({**base, "iat": now - 7200, "exp": now - 3600}, "invalid_grant"),
        ({**base, "iss": "nobody@example.iam.gserviceaccount.com"}, "invalid_grant"),
        ({**base, "scope": ""}, "invalid_scope"),
    ]:
        bad = grant(claims)
        assert (bad.status_code, bad.json()["error"]) == (400, error), claims
        assert bad.json()["error_description"]
    assert fcm_fake.tokens_issued == 2


def test_oversize_message_is_rejected(pyfcm_client, fcm_fake: FCMFake) -> None:
    from pyfcm.errors import InvalidDataError

    with pytest.raises(InvalidDataError, match="INVALID_ARGUMENT"):
        pyfcm_client.notify(fcm_token="tok-1", data_payload={"blob": "x" * 4100})
    assert pyfcm_client.notify(fcm_token="tok-1", data_payload={"blob": "x" * 3900})["name"]
    assert [r.status for r in fcm_fake.received] == [400, 200]


def test_non_string_data_values_are_rejected(pyfcm_client, fcm_fake: FCMFake) -> None:
    from pyfcm.errors import InvalidDataError

    with pytest.raises(InvalidDataError) as caught:
        pyfcm_client.notify(fcm_token="tok-1", data_payload={"room": "42", "unread": 12})
    error = json.loads(str(caught.value))["error"]
    assert error["message"] == "Invalid value at 'message.data[1].value' (TYPE_STRING), 12"
    assert error["details"][0]["@type"] == "type.googleapis.com/google.rpc.BadRequest"
    assert error["details"][0]["fieldViolations"][0]["field"] == "message.data[1].value"
    assert fcm_fake.received[0].status == 400


def test_reserved_data_key_and_bad_registration_token_are_invalid_argument(pyfcm_client, fcm_fake: FCMFake) -> None:
    from pyfcm.errors import InvalidDataError

    with pytest.raises(InvalidDataError, match="Invalid data payload key: from"):
        pyfcm_client.notify(fcm_token="tok-1", data_payload={"from": "alice"})
    with pytest.raises(InvalidDataError, match="The registration token is not a valid FCM registration token"):
        pyfcm_client.notify(fcm_token="not a token!", notification_title="x")
    assert [r.error_code for r in fcm_fake.received] == ["INVALID_ARGUMENT", "INVALID_ARGUMENT"]


def test_auth_failures(fcm_fake: FCMFake, fcm_service_account: Path, fcm_trust: None) -> None:
    body = {"message": {"token": "tok-1", "data": {"a": "b"}}}
    missing = requests.post(fcm_fake.send_url(), json=body, timeout=5)
    unknown = requests.post(fcm_fake.send_url(), json=body, headers={"Authorization": "Bearer ya29.nope"}, timeout=5)
    bearer = {"Authorization": f"Bearer {access_token(fcm_fake, fcm_service_account)}"}
    wrong_project = requests.post(fcm_fake.send_url("someone-elses"), json=body, headers=bearer, timeout=5)
    narrow = access_token(fcm_fake, fcm_service_account, scopes=["https://www.googleapis.com/auth/userinfo.email"])
    scope = requests.post(fcm_fake.send_url(), json=body, headers={"Authorization": f"Bearer {narrow}"}, timeout=5)

    def summary(r: requests.Response):
        e = r.json()["error"]
        return r.status_code, e["status"], e["details"][0]["reason"]

    assert summary(missing) == (401, "UNAUTHENTICATED", "CREDENTIALS_MISSING")
    assert summary(unknown) == (401, "UNAUTHENTICATED", "ACCESS_TOKEN_TYPE_UNSUPPORTED")
    assert summary(wrong_project) == (403, "PERMISSION_DENIED", "IAM_PERMISSION_DENIED")
    assert "cloudmessaging.messages.create" in wrong_project.json()["error"]["message"]
    assert summary(scope) == (403, "PERMISSION_DENIED", "ACCESS_TOKEN_SCOPE_INSUFFICIENT")
    assert fcm_fake.sent_tokens() == {}


def test_pyfcm_maps_a_wrong_project_to_sender_id_mismatch(
    fcm_fake: FCMFake, fcm_trust: None, tmp_path: Path
) -> None:
    """pyfcm prefers the service account's project_id over its project_id argument, and
    raises FCMSenderIdMismatchError for every 403, even a permission problem."""
    from pyfcm import FCMNotification
    from pyfcm.errors import FCMSenderIdMismatchError

    path, public_pem = make_service_account(tmp_path, fcm_fake.token_uri, project_id="someone-elses")
    info = json.loads(path.read_text())
    fcm_fake.add_service_account(info["client_email"], public_pem)
    client = FCMNotification(service_account_file=str(path), project_id=FCM_PROJECT)  # argument ignored
    point_pyfcm_at(client, fcm_fake)
    with pytest.raises(FCMSenderIdMismatchError):
        client.notify(fcm_token="tok-1", notification_title="x")
    assert fcm_fake.received[0].project == "someone-elses"
    assert fcm_fake.received[0].error_code == "PERMISSION_DENIED"


def test_expired_access_token_is_refreshed_by_pyfcm(pyfcm_client, fcm_fake: FCMFake) -> None:
    assert pyfcm_client.notify(fcm_token="tok-1", notification_title="x")["name"]
    fcm_fake.expire_access_tokens()
    assert pyfcm_client.notify(fcm_token="tok-1", notification_title="x")["name"]
    assert [r.status for r in fcm_fake.received] == [200, 401, 200]
    assert fcm_fake.tokens_issued == 2


def test_validate_only_is_answered_but_not_sent(pyfcm_client, fcm_fake: FCMFake) -> None:
    result = pyfcm_client.notify(fcm_token="tok-1", notification_title="x", dry_run=True)
    assert result == {"name": f"projects/{FCM_PROJECT}/messages/fake_message_id"}
    assert fcm_fake.received[0].validate_only is True
    assert fcm_fake.sent_tokens() == {}


def test_fcm_delay_and_wait_for_with_concurrent_senders(
    fcm_fake: FCMFake, fcm_service_account: Path, fcm_trust: None
) -> None:
    fcm_fake.delay = 0.3
    bearer = {"Authorization": f"Bearer {access_token(fcm_fake, fcm_service_account)}"}
    statuses: List[int] = []

    def send(i: int) -> None:
        r = requests.post(fcm_fake.send_url(), json={"message": {"token": f"tok-{i}"}}, headers=bearer, timeout=5)
        statuses.append(r.status_code)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
    started = time.monotonic()
    for t in threads:
        t.start()
    assert not fcm_fake.wait_for(8, 0.1)
    assert fcm_fake.wait_for(8, 5)
    for t in threads:
        t.join(5)
    assert statuses == [200] * 8
    assert time.monotonic() - started < 2.0  # the delays overlapped
    assert fcm_fake.connections_opened >= 8


def test_fcm_fake_stop_closes_kept_alive_connections(tls_material: TLSMaterial, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls_material.ca_cert))
    fake = FCMFake(tls_material).start()
    try:
        session = requests.Session()
        assert session.post(fake.send_url(), json={}, timeout=5).status_code == 401  # keep-alive now open
    finally:
        started = time.monotonic()
        fake.stop()
    assert time.monotonic() - started < 2.0
    with pytest.raises(requests.exceptions.ConnectionError):
        session.post(fake.send_url(), json={}, timeout=2)


# -- FCM over HTTP/2 (raw h2 client) ---------------------------------------------------------------


@dataclass
class _H2Endpoint:
    """What RawH2 needs to connect: the FCM fake's HTTP/2 listener."""

    host: str
    port: int
    tls: TLSMaterial


def fcm_h2(fake: FCMFake, raw_clients, **kwargs: Any) -> RawH2:
    """A RawH2 connection to the fake's HTTP/2 listener, past the fake's first SETTINGS (and so
    with the client's ACK sent before any request: the stream limit is in force)."""
    client = raw_clients(_H2Endpoint(fake.host, fake.port_h2, fake.tls), **kwargs)  # type: ignore[arg-type]
    client.wait_settings(1)
    return client


def fcm_h2_send(
    client: RawH2,
    bearer: Optional[str],
    message: Optional[Dict[str, Any]] = None,
    *,
    method: str = "POST",
    path: str = f"/v1/projects/{FCM_PROJECT}/messages:send",
    flush: bool = True,
) -> int:
    """Open one messages:send stream (no APNs headers); returns its stream id."""
    headers: Dict[str, Optional[str]] = {
        "apns-topic": None,
        "apns-push-type": None,
        "authorization": bearer,
        "content-type": "application/json; UTF-8",
    }
    body = json.dumps({"message": message}).encode() if method == "POST" else b""
    return client.request(headers=headers, body=body, method=method, path=path, flush=flush)


@pytest.fixture
def fcm_bearer(fcm_fake: FCMFake, fcm_service_account: Path, fcm_trust: None) -> str:
    return f"Bearer {access_token(fcm_fake, fcm_service_account)}"


def test_fcm_h2_send_is_answered_and_recorded(fcm_fake: FCMFake, fcm_bearer: str, raw_clients) -> None:
    assert fcm_fake.port_h2 not in (None, fcm_fake.port)
    assert fcm_fake.send_url_h2() == f"https://127.0.0.1:{fcm_fake.port_h2}/v1/projects/{FCM_PROJECT}/messages:send"
    opened = fcm_fake.connections_opened  # google-auth's token request already counted
    client = fcm_h2(fcm_fake, raw_clients)
    assert client.alpn == "h2"
    assert client.stream_limits == [100]  # Google's SETTINGS_MAX_CONCURRENT_STREAMS
    (response,) = client.wait(fcm_h2_send(client, fcm_bearer, {"token": "tok-1", "data": {"room": "42"}}))
    assert response.status == 200
    assert response.json["name"].startswith(f"projects/{FCM_PROJECT}/messages/")
    assert response.headers["content-type"] == "application/json; charset=UTF-8"
    assert response.headers["vary"] == "Origin, X-Origin, Referer"
    assert "retry-after" not in response.headers
    record = fcm_fake.received[-1]
    assert (record.token, record.status, record.project, record.message) == (
        "tok-1", 200, FCM_PROJECT, {"token": "tok-1", "data": {"room": "42"}}
    )
    assert fcm_fake.sent_tokens() == {"tok-1": 1}
    stats = fcm_fake.stats()
    assert stats["h2_connections"] == 1 and stats["connections_opened"] == opened + 1


def test_fcm_h2_invalid_token_and_missing_auth_get_googles_errors(
    fcm_fake: FCMFake, fcm_bearer: str, raw_clients
) -> None:
    client = fcm_h2(fcm_fake, raw_clients)
    bad, unauthenticated = client.wait(
        fcm_h2_send(client, fcm_bearer, {"token": "not a token!", "notification": {"title": "x"}}),
        fcm_h2_send(client, None, {"token": "tok-1"}),
    )
    assert bad.status == 400
    assert bad.json == {
        "error": {
            "code": 400,
            "message": "The registration token is not a valid FCM registration token",
            "status": "INVALID_ARGUMENT",
            "details": [{"@type": FCM_ERROR_TYPE, "errorCode": "INVALID_ARGUMENT"}],
        }
    }
    assert unauthenticated.status == 401
    assert unauthenticated.json["error"]["details"][0]["reason"] == "CREDENTIALS_MISSING"
    assert [(r.status, r.error_code) for r in fcm_fake.received] == [(400, "INVALID_ARGUMENT"), (401, "UNAUTHENTICATED")]
    assert fcm_fake.sent_tokens() == {}


def test_fcm_h2_scripted_quota_exceeded_carries_retry_after_and_scripts_are_shared_with_http1(
    fcm_fake: FCMFake, fcm_bearer: str, raw_clients
) -> None:
    fcm_fake.script("tok-1", [(429, "QUOTA_EXCEEDED", 7), (429, "QUOTA_EXCEEDED"), (503, "UNAVAILABLE")])
    client = fcm_h2(fcm_fake, raw_clients)
    (first,) = client.wait(fcm_h2_send(client, fcm_bearer, {"token": "tok-1"}))
    (second,) = client.wait(fcm_h2_send(client, fcm_bearer, {"token": "tok-1"}))
    over_http1 = requests.post(
        fcm_fake.send_url(), json={"message": {"token": "tok-1"}}, headers={"Authorization": fcm_bearer}, timeout=5
    )
    (last,) = client.wait(fcm_h2_send(client, fcm_bearer, {"token": "tok-1"}))
    assert (first.status, first.headers["retry-after"]) == (429, "7")
    assert first.json["error"]["status"] == "RESOURCE_EXHAUSTED"
    assert first.json["error"]["details"] == [{"@type": FCM_ERROR_TYPE, "errorCode": "QUOTA_EXCEEDED"}]
    assert (second.status, second.headers["retry-after"]) == (429, str(fcm_fake.quota_retry_after))
    assert over_http1.status_code == 503  # the same script, consumed over the other listener
    assert last.status == 200
    assert [r.status for r in fcm_fake.received] == [429, 429, 503, 200]


def test_fcm_h2_100_concurrent_streams_are_answered_and_the_101st_refused(
    fcm_fake: FCMFake, fcm_bearer: str, raw_clients
) -> None:
    client = fcm_h2(fcm_fake, raw_clients, ignore_limit=True)
    fcm_fake.delay = 0.5  # all of them in flight at once
    ids = [fcm_h2_send(client, fcm_bearer, {"token": f"tok-{i}"}, flush=False) for i in range(101)]
    client.flush()
    responses = client.wait(*ids, timeout=10)
    assert [r.status for r in responses[:100]] == [200] * 100
    assert responses[100].reset == ErrorCodes.REFUSED_STREAM
    assert fcm_fake.refused_streams == 1 and fcm_fake.max_concurrent_seen == 100
    assert fcm_fake.wait_for(100, 5) and len(fcm_fake.sent_tokens()) == 100


def test_fcm_h2_acknowledges_data_so_a_megabyte_of_requests_flows_on_one_connection(
    fcm_fake: FCMFake, fcm_bearer: str, raw_clients
) -> None:
    client = fcm_h2(fcm_fake, raw_clients)
    pad = "x" * 1000
    # h2 hands window back in steps of half the 64 KiB window, so a batch stays under 32 KiB;
    # the whole megabyte needs the window handed back ~16 times
    total, batch = 1000, 25
    for start in range(0, total, batch):
        ids = [
            fcm_h2_send(client, fcm_bearer, {"token": f"tok-{start + i}", "data": {"pad": pad}}, flush=False)
            for i in range(batch)
        ]
        client.flush()
        assert {r.status for r in client.wait(*ids, timeout=10)} == {200}
    assert fcm_fake.wait_for(total, 5)


class _JudgedFCMFake(FCMFake):
    """Releases `judged` once a send has been judged (its delay is fixed from then on)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.judged = threading.Semaphore(0)

    def _judge(self, *args: Any) -> Any:
        result = super()._judge(*args)
        self.judged.release()
        return result


def test_fcm_h2_a_delayed_stream_holds_back_no_other_stream_or_connection(
    tls_material: TLSMaterial, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raw_clients
) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls_material.ca_cert))
    with _JudgedFCMFake(tls_material, project_id=FCM_PROJECT) as fake:
        account, public_pem = make_service_account(tmp_path, fake.token_uri, project_id=FCM_PROJECT)
        fake.add_service_account(json.loads(account.read_text())["client_email"], public_pem)
        bearer = f"Bearer {access_token(fake, account)}"
        slow_conn, other_conn = fcm_h2(fake, raw_clients), fcm_h2(fake, raw_clients)
        fake.delay = 3.0
        slow = fcm_h2_send(slow_conn, bearer, {"token": "slow"})
        assert fake.judged.acquire(timeout=5)
        fake.delay = 0.0
        same = fcm_h2_send(slow_conn, bearer, {"token": "same-connection"})
        other = fcm_h2_send(other_conn, bearer, {"token": "other-connection"})
        assert other_conn.wait(other, timeout=3)[0].status == 200
        assert slow_conn.wait(same, timeout=3)[0].status == 200
        assert not slow_conn.responses[slow].done  # both answered before the delay ended
        assert slow_conn.wait(slow, timeout=10)[0].status == 200
        assert [r.token for r in fake.received] in (
            ["same-connection", "other-connection", "slow"],
            ["other-connection", "same-connection", "slow"],
        )


def test_fcm_h2_other_paths_are_404_and_other_methods_405(fcm_fake: FCMFake, fcm_bearer: str, raw_clients) -> None:
    client = fcm_h2(fcm_fake, raw_clients)
    get, token, other = client.wait(
        fcm_h2_send(client, fcm_bearer, method="GET"),
        fcm_h2_send(client, fcm_bearer, {"token": "tok-1"}, path="/token"),  # HTTP/1.1 only
        fcm_h2_send(client, fcm_bearer, {"token": "tok-1"}, path=f"/v1/projects/{FCM_PROJECT}/messages"),
    )
    assert (get.status, get.json["error"]["code"]) == (405, 405)
    assert (token.status, other.status) == (404, 404)
    assert token.json["error"]["message"] == "The requested URL /token was not found on this server."
    assert fcm_fake.received == []


def test_fcm_fake_stop_leaves_no_thread_running(tls_material: TLSMaterial, raw_clients, monkeypatch) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls_material.ca_cert))
    before = set(threading.enumerate())
    fake = FCMFake(tls_material).start()
    try:
        client = fcm_h2(fake, raw_clients)
        assert client.wait(fcm_h2_send(client, None, {"token": "tok-1"}))[0].status == 401
        session = requests.Session()
        assert session.post(fake.send_url(), json={}, timeout=5).status_code == 401  # a kept-alive HTTP/1.1 thread
    finally:
        started = time.monotonic()
        fake.stop()
    assert time.monotonic() - started < 2.0
    assert set(threading.enumerate()) - before == set()
    with pytest.raises(ConnectionError):
        client.pump(lambda: False, timeout=2)  # the fake closed the HTTP/2 connection
    session.close()


def test_fcm_fake_without_http2(tls_material: TLSMaterial) -> None:
    with FCMFake(tls_material, http2=False) as fake:
        assert fake.port_h2 is None and fake.stats()["h2_connections"] == 0
        with pytest.raises(RuntimeError):
            fake.base_url_h2
        assert not [t for t in threading.enumerate() if t.name.startswith("FCMFake-h2")]
