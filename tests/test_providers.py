"""The real aioapns and pyfcm clients, through our providers, against the protocol fakes (TLS, 127.0.0.1).

The providers trust the fakes' CA through PUSH_CA_FILE only, exactly as in production.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import socket
import time
from collections import Counter
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from notifier.config import ConfigError, Settings
from notifier.model import Outcome, Platform, Push, Result
from notifier.payload import apns_id
from notifier.providers import build_providers, shorten_token
from notifier.providers.apns import APNsProvider
from notifier.providers.dryrun import DryRunProvider
from notifier.providers.fcm import FCMProvider, error_reason
from notifier.retry import parse_retry_after
from tests.conftest import APNS_TOPIC, FCM_PROJECT, APNsKey
from tests.fakes.apns import APNsFake
from tests.fakes.fcm import FCMFake
from tests.fakes.tls import TLSMaterial, make_apns_key

pytestmark = pytest.mark.timeout(60)

SENT, DEAD, REJECTED, TRANSIENT, AUTH = (
    Outcome.SENT, Outcome.DEAD_TOKEN, Outcome.REJECTED, Outcome.TRANSIENT, Outcome.AUTH)


def apns_token() -> str:
    return secrets.token_hex(32)


def fcm_token() -> str:
    return "fcm-" + secrets.token_urlsafe(60)


def make_push(token: str, platform: Platform = Platform.APNS, *, message_id: int = 42,
              device_id: int = 9, text: str = "hello there", app: str | None = None) -> Push:
    return Push(delivery_id=message_id * 1000 + device_id, message_id=message_id, chat_id=7,
                chat_name="Friends", sender_id=3, sender_name="alice", text=text,
                device_id=device_id, platform=platform, token=token, app=app)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def apns_settings(fake_endpoint: str, tls: TLSMaterial, key: APNsKey, **overrides) -> Settings:
    values = dict(apns_key_file=str(key.p8_path), apns_key_id=key.key_id, apns_team_id=key.team_id,
                  apns_topic=APNS_TOPIC, apns_endpoint=fake_endpoint, push_ca_file=str(tls.ca_cert),
                  push_ttl=3600)
    values.update(overrides)
    return Settings(**values)


def fcm_settings(fake: FCMFake, service_account: Path, **overrides) -> Settings:
    values = dict(fcm_service_account_file=str(service_account), fcm_project_id=FCM_PROJECT,
                  fcm_endpoint=fake.base_url_h2, push_ca_file=str(fake.tls.ca_cert), push_fcm_connections=4,
                  push_ttl=3600)
    values.update(overrides)
    return Settings(**values)


def run(coroutine):
    return asyncio.run(coroutine)


async def send_all(provider, pushes, concurrency: int | None = None) -> list[Result]:
    if concurrency is None:
        return list(await asyncio.gather(*(provider.send(p) for p in pushes)))
    limit = asyncio.Semaphore(concurrency)

    async def one(push):
        async with limit:
            return await provider.send(push)
    return list(await asyncio.gather(*(one(p) for p in pushes)))


async def with_provider(provider, action):
    try:
        return await action(provider)
    finally:
        await provider.close()


# --- APNs ---------------------------------------------------------------------------------

def test_apns_success_sends_headers_and_payload(apns_fake: APNsFake, tls_material, apns_key):
    token = apns_token()
    provider = APNsProvider(apns_settings(apns_fake.endpoint, tls_material, apns_key))
    before = int(time.time())
    result = run(with_provider(provider, lambda p: p.send(make_push(token))))

    assert result == Result(SENT, 200, None, None)
    [request] = apns_fake.received
    headers = request.headers
    assert request.token == token and headers[":path"] == f"/3/device/{token}"
    assert headers["apns-push-type"] == "alert"
    assert headers["apns-topic"] == APNS_TOPIC
    assert headers["apns-priority"] == "10"
    assert headers["apns-collapse-id"] == "msg-42"
    assert headers["apns-id"] == apns_id(42, 9) == request.apns_id
    assert before + 3600 <= int(headers["apns-expiration"]) <= int(time.time()) + 3600
    assert headers["authorization"].startswith("bearer ")
    assert request.payload == {
        "aps": {"alert": {"title": "Friends", "body": "alice: hello there"},
                "thread-id": "chat-7", "sound": "default"},
        "chat_id": 7, "message_id": 42,
    }


def test_apns_push_app_overrides_the_topic(apns_fake: APNsFake, tls_material, apns_key):
    provider = APNsProvider(apns_settings(apns_fake.endpoint, tls_material, apns_key))
    result = run(with_provider(provider, lambda p: p.send(make_push(apns_token(), app="com.example.other"))))
    assert apns_fake.received[0].headers["apns-topic"] == "com.example.other"
    assert (result.outcome, result.status, result.reason) == (REJECTED, 400, "TopicDisallowed")


@pytest.mark.parametrize("status, reason, expected", [
    (410, "Unregistered", DEAD),
    (410, "ExpiredToken", DEAD),
    (400, "BadDeviceToken", DEAD),
    (400, "DeviceTokenNotForTopic", DEAD),
    (403, "InvalidProviderToken", AUTH),
    (403, "ExpiredProviderToken", AUTH),
    (403, "BadCertificateEnvironment", AUTH),
    (429, "TooManyRequests", TRANSIENT),
    (500, "InternalServerError", TRANSIENT),
    (503, "ServiceUnavailable", TRANSIENT),
    (413, "PayloadTooLarge", REJECTED),
    (400, "BadTopic", REJECTED),
    (400, "BadExpirationDate", REJECTED),
])
def test_apns_error_maps_to_outcome(apns_fake: APNsFake, tls_material, apns_key, status, reason, expected):
    token = apns_token()
    apns_fake.script(token, [(status, reason)])
    provider = APNsProvider(apns_settings(apns_fake.endpoint, tls_material, apns_key))

    async def scenario(p):
        return await p.send(make_push(token)), await p.send(make_push(token))
    first, second = run(with_provider(provider, scenario))
    assert first == Result(expected, status, reason, None)
    assert second.outcome is SENT  # the script is consumed: the provider itself did not retry
    assert apns_fake.answered == 2


def test_apns_retry_after_is_carried(apns_fake: APNsFake, tls_material, apns_key):
    token = apns_token()
    apns_fake.script(token, [(429, "TooManyRequests", 17)])
    provider = APNsProvider(apns_settings(apns_fake.endpoint, tls_material, apns_key))
    result = run(with_provider(provider, lambda p: p.send(make_push(token))))
    assert result == Result(TRANSIENT, 429, "TooManyRequests", 17.0)


def test_apns_real_bad_token_is_dead(apns_fake: APNsFake, tls_material, apns_key):
    provider = APNsProvider(apns_settings(apns_fake.endpoint, tls_material, apns_key))
    result = run(with_provider(provider, lambda p: p.send(make_push("not-a-hex-token"))))
    assert (result.outcome, result.status, result.reason) == (DEAD, 400, "BadDeviceToken")


def test_apns_key_unknown_to_apple_is_auth(apns_fake: APNsFake, tls_material, apns_key, tmp_path):
    other_p8, _ = make_apns_key(tmp_path, key_id=apns_key.key_id)
    settings = apns_settings(apns_fake.endpoint, tls_material, apns_key, apns_key_file=str(other_p8))
    result = run(with_provider(APNsProvider(settings), lambda p: p.send(make_push(apns_token()))))
    assert (result.outcome, result.status, result.reason) == (AUTH, 403, "InvalidProviderToken")


def test_apns_1000_sends_multiplex_on_few_connections(apns_fake: APNsFake, tls_material, apns_key, caplog):
    caplog.set_level(logging.DEBUG)
    provider = APNsProvider(apns_settings(apns_fake.endpoint, tls_material, apns_key))
    pushes = [make_push(apns_token(), message_id=1000 + i, device_id=i) for i in range(1000)]
    results = run(with_provider(provider, lambda p: send_all(p, pushes)))

    assert Counter(r.outcome for r in results) == {SENT: 1000}
    assert apns_fake.connections_opened <= 4
    assert apns_fake.max_concurrent_seen > 100
    assert apns_fake.refused_streams == 0
    assert "completely busy" not in caplog.text
    assert len({r.headers["apns-id"] for r in apns_fake.received}) == 1000


def test_apns_goaway_mid_run_is_transient_then_recovers(apns_fake: APNsFake, tls_material, apns_key):
    apns_fake.goaway_after(150)
    provider = APNsProvider(apns_settings(apns_fake.endpoint, tls_material, apns_key))
    pushes = [make_push(apns_token(), message_id=2000 + i, device_id=i) for i in range(600)]

    async def scenario(p):
        first = await send_all(p, pushes, concurrency=300)
        apns_fake.goaway_after(None)
        failed = [push for push, result in zip(pushes, first) if result.outcome is not SENT]
        second = await send_all(p, failed, concurrency=300)
        return first, failed, second, p.stats()
    first, failed, second, stats = run(with_provider(provider, scenario))

    outcomes = Counter(r.outcome for r in first)
    assert set(outcomes) <= {SENT, TRANSIENT}
    assert outcomes[TRANSIENT] > 0 and outcomes[SENT] >= 150
    assert all(r.status is None and r.reason in ("goaway", "connection_error")
               for r in first if r.outcome is TRANSIENT)
    assert all(r.outcome is SENT for r in second)
    assert apns_fake.goaways_sent >= 1
    assert apns_fake.connections_opened >= 2
    assert stats["open_connections"] <= 4
    assert apns_fake.sent_tokens().keys() == {p.token for p in pushes}


def test_apns_limit_lowered_after_rejections_is_followed(tls_material, apns_key):
    # Apple lowers the stream limit to 1 after a rejected notification, raises it again after
    # the next accepted one: the provider must follow without streams being refused
    fake = APNsFake(tls_material, topic=APNS_TOPIC, key_id=apns_key.key_id, team_id=apns_key.team_id,
                    public_key_pem=apns_key.public_key_pem, lower_on_reject=True)
    with fake:
        pushes = [make_push(apns_token(), device_id=i) for i in range(400)]
        dead = {p.token for p in pushes[::10]}
        for token in dead:
            fake.script(token, [(410, "Unregistered")])
        provider = APNsProvider(apns_settings(fake.endpoint, tls_material, apns_key))
        results = run(with_provider(provider, lambda p: send_all(p, pushes, concurrency=200)))
        assert [r.outcome for r in results] == [DEAD if p.token in dead else SENT for p in pushes]
        assert fake.refused_streams == 0
        assert fake.settings_changes >= 2
        assert fake.connections_opened <= 4


def test_apns_certificate_auth(apns_cert_fake: APNsFake, tls_material):
    settings = Settings(apns_cert_file=str(tls_material.client_pem), apns_topic=APNS_TOPIC,
                        apns_endpoint=apns_cert_fake.endpoint, push_ca_file=str(tls_material.ca_cert))
    pushes = [make_push(apns_token(), device_id=i) for i in range(50)]
    results = run(with_provider(APNsProvider(settings), lambda p: send_all(p, pushes)))
    assert all(r.outcome is SENT for r in results)
    assert all("authorization" not in r.headers for r in apns_cert_fake.received)


def test_apns_timeout_is_transient_and_the_next_send_works(apns_fake: APNsFake, tls_material, apns_key):
    provider = APNsProvider(apns_settings(apns_fake.endpoint, tls_material, apns_key), request_timeout=0.5)

    async def scenario(p):
        await p.send(make_push(apns_token()))  # warm connection
        apns_fake.delay = 3.0
        started = time.monotonic()
        slow = await p.send(make_push(apns_token()))
        elapsed = time.monotonic() - started
        apns_fake.delay = 0.0
        return slow, elapsed, await p.send(make_push(apns_token()))
    slow, elapsed, after = run(with_provider(provider, scenario))
    assert slow == Result(TRANSIENT, None, "timeout", None)
    assert elapsed < 2.0
    assert after.outcome is SENT
    assert apns_fake.connections_opened == 1  # slow is not dead: the PING was answered


def test_apns_silent_server_times_out_and_the_connection_is_dropped(tls_material, apns_key):
    # a server that completes TLS, then never sends a byte (a black-holed connection)
    accepted = []

    async def scenario():
        async def swallow(reader, writer):
            accepted.append(writer)
            while await reader.read(65536):
                pass
        server = await asyncio.start_server(swallow, "127.0.0.1", 0,
                                            ssl=tls_material.server_context(alpn=("h2",)))
        port = server.sockets[0].getsockname()[1]
        provider = APNsProvider(apns_settings(f"127.0.0.1:{port}", tls_material, apns_key),
                                request_timeout=0.5)
        try:
            started = time.monotonic()
            result = await provider.send(make_push(apns_token()))
            elapsed = time.monotonic() - started
            for _ in range(40):  # the PING goes unanswered too: the connection is dropped
                if provider.stats()["open_connections"] == 0:
                    break
                await asyncio.sleep(0.05)
            return result, elapsed, provider.stats()
        finally:
            await provider.close()
            for writer in accepted:
                writer.close()
            server.close()
            await server.wait_closed()
    result, elapsed, stats = run(scenario())
    assert result == Result(TRANSIENT, None, "timeout", None)
    assert elapsed < 2.0
    assert stats["open_connections"] == 0 and stats["connections_opened"] == 1


def test_apns_unreachable_endpoint_is_transient(tls_material, apns_key):
    settings = apns_settings(f"127.0.0.1:{free_port()}", tls_material, apns_key)
    started = time.monotonic()
    results = run(with_provider(APNsProvider(settings),
                                lambda p: send_all(p, [make_push(apns_token()) for _ in range(20)])))
    assert all(r == Result(TRANSIENT, None, "connection_error", None) for r in results)
    assert time.monotonic() - started < 5


def test_apns_untrusted_server_is_transient_not_silently_accepted(apns_fake: APNsFake, tls_material, apns_key):
    settings = apns_settings(apns_fake.endpoint, tls_material, apns_key, push_ca_file=None)
    result = run(with_provider(APNsProvider(settings), lambda p: p.send(make_push(apns_token()))))
    assert result == Result(TRANSIENT, None, "connection_error", None)
    assert apns_fake.answered == 0


def test_apns_error_bodies_do_not_stall_a_long_lived_connection(apns_fake: APNsFake, tls_material, apns_key):
    # aioapns never re-opens its receive window: ~65 KB of error bodies and the connection stalls
    apns_fake.set_default(410, "Unregistered")
    provider = APNsProvider(apns_settings(apns_fake.endpoint, tls_material, apns_key))
    pushes = [make_push(apns_token(), device_id=i) for i in range(3000)]
    results = run(with_provider(provider, lambda p: send_all(p, pushes, concurrency=200)))
    assert Counter(r.outcome for r in results) == {DEAD: 3000}
    assert apns_fake.connections_opened == 1


# --- FCM ----------------------------------------------------------------------------------

def test_fcm_success_sends_googles_message(fcm_fake: FCMFake, fcm_service_account):
    token = fcm_token()
    provider = FCMProvider(fcm_settings(fcm_fake, fcm_service_account))
    result = run(with_provider(provider, lambda p: p.send(make_push(token, Platform.FCM))))

    assert result == Result(SENT, 200, None, None)
    [request] = fcm_fake.received
    assert request.token == token and request.project == FCM_PROJECT
    assert request.message["notification"] == {"title": "Friends", "body": "alice: hello there"}
    assert request.message["data"] == {"chat_id": "7", "message_id": "42", "sender_id": "3"}
    assert request.message["android"] == {"priority": "high", "ttl": "3600s",
                                          "notification": {"tag": "msg-42"}}


@pytest.mark.parametrize("status, code, expected, reason", [
    (404, "UNREGISTERED", DEAD, "UNREGISTERED"),
    (400, "INVALID_ARGUMENT", DEAD, "INVALID_ARGUMENT:token"),
    (403, "SENDER_ID_MISMATCH", DEAD, "SENDER_ID_MISMATCH"),
    (401, "THIRD_PARTY_AUTH_ERROR", AUTH, "THIRD_PARTY_AUTH_ERROR"),
    (503, "UNAVAILABLE", TRANSIENT, "UNAVAILABLE"),
    (500, "INTERNAL", TRANSIENT, "INTERNAL"),
    (502, None, TRANSIENT, "UNKNOWN"),   # no documented code: google status, classified by HTTP status
])
def test_fcm_error_maps_to_outcome_without_library_retries(fcm_fake: FCMFake, fcm_service_account,
                                                           status, code, expected, reason):
    token = fcm_token()
    fcm_fake.script(token, [(status, code)] if code else [status])
    provider = FCMProvider(fcm_settings(fcm_fake, fcm_service_account))
    result = run(with_provider(provider, lambda p: p.send(make_push(token, Platform.FCM))))
    assert (result.outcome, result.status, result.reason) == (expected, status, reason)
    assert fcm_fake.answered == 1  # neither pyfcm's adapter nor its send_request retried


def test_fcm_retry_after_is_carried_not_slept(fcm_fake: FCMFake, fcm_service_account):
    token = fcm_token()
    fcm_fake.script(token, [(429, "QUOTA_EXCEEDED", 30)])
    provider = FCMProvider(fcm_settings(fcm_fake, fcm_service_account))
    started = time.monotonic()
    result = run(with_provider(provider, lambda p: p.send(make_push(token, Platform.FCM))))
    assert result == Result(TRANSIENT, 429, "QUOTA_EXCEEDED", 30.0)
    assert time.monotonic() - started < 10
    assert fcm_fake.answered == 1


def test_fcm_real_invalid_token_is_dead(fcm_fake: FCMFake, fcm_service_account):
    provider = FCMProvider(fcm_settings(fcm_fake, fcm_service_account))
    result = run(with_provider(provider, lambda p: p.send(make_push("not a token!", Platform.FCM))))
    assert (result.outcome, result.status, result.reason) == (DEAD, 400, "INVALID_ARGUMENT:token")


def test_fcm_wrong_project_is_auth_not_dead(fcm_fake: FCMFake, fcm_service_account):
    provider = FCMProvider(fcm_settings(fcm_fake, fcm_service_account, fcm_project_id="other-project"))
    result = run(with_provider(provider, lambda p: p.send(make_push(fcm_token(), Platform.FCM))))
    assert (result.outcome, result.status, result.reason) == (AUTH, 403, "PERMISSION_DENIED")


def test_fcm_expired_access_token_is_auth_then_refreshed(fcm_fake: FCMFake, fcm_service_account):
    provider = FCMProvider(fcm_settings(fcm_fake, fcm_service_account, push_fcm_connections=1))

    async def scenario(p):
        first = await p.send(make_push(fcm_token(), Platform.FCM))
        fcm_fake.expire_access_tokens()
        rejected = await p.send(make_push(fcm_token(), Platform.FCM))
        return first, rejected, await p.send(make_push(fcm_token(), Platform.FCM))
    first, rejected, after = run(with_provider(provider, scenario))
    assert first.outcome is SENT
    assert (rejected.outcome, rejected.status, rejected.reason) == (AUTH, 401, "UNAUTHENTICATED")
    assert after.outcome is SENT
    assert fcm_fake.tokens_issued == 2


def test_fcm_concurrent_sends_share_one_access_token(fcm_fake: FCMFake, fcm_service_account):
    provider = FCMProvider(fcm_settings(fcm_fake, fcm_service_account, push_fcm_connections=4))
    pushes = [make_push(fcm_token(), Platform.FCM, device_id=i) for i in range(200)]
    results = run(with_provider(provider, lambda p: send_all(p, pushes)))
    assert all(r.outcome is SENT for r in results)
    assert fcm_fake.tokens_issued == 1
    # multiplexed: at most PUSH_FCM_CONNECTIONS connections of HTTP/2, plus the token endpoint's
    assert 1 <= fcm_fake.stats()["h2_connections"] <= 4
    assert fcm_fake.connections_opened <= 4 + 1


def test_fcm_endpoint_without_http2_is_transient_and_says_why(fcm_fake: FCMFake, fcm_service_account, caplog):
    """Google's endpoint speaks HTTP/2; one that offers only HTTP/1.1 (the fake's other listener)
    is a misconfiguration: every send is a transient connection error, logged with the reason."""
    provider = FCMProvider(fcm_settings(fcm_fake, fcm_service_account, fcm_endpoint=fcm_fake.base_url))
    with caplog.at_level(logging.WARNING, logger="notifier.providers.fcm"):
        result = run(with_provider(provider, lambda p: p.send(make_push(fcm_token(), Platform.FCM))))
    assert result == Result(TRANSIENT, None, "connection_error", None)
    assert fcm_fake.answered == 0
    assert any("does not speak HTTP/2" in record.getMessage() for record in caplog.records)


def test_fcm_unreachable_endpoint_is_transient(fcm_fake: FCMFake, fcm_service_account):
    settings = fcm_settings(fcm_fake, fcm_service_account,
                            fcm_endpoint=f"https://127.0.0.1:{free_port()}/v1/projects")
    result = run(with_provider(FCMProvider(settings), lambda p: p.send(make_push(fcm_token(), Platform.FCM))))
    assert result == Result(TRANSIENT, None, "connection_error", None)


def test_fcm_untrusted_server_is_transient_and_logged_once(fcm_fake: FCMFake, fcm_service_account, caplog):
    settings = fcm_settings(fcm_fake, fcm_service_account, push_ca_file=None)
    pushes = [make_push(fcm_token(), Platform.FCM, device_id=i) for i in range(20)]
    results = run(with_provider(FCMProvider(settings), lambda p: send_all(p, pushes)))
    assert all(r.outcome is TRANSIENT and r.status is None for r in results)
    assert fcm_fake.answered == 0
    warnings = [r for r in caplog.records if r.name == "notifier.providers.fcm" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1


def test_fcm_token_endpoint_refusing_the_key_is_auth(fcm_fake: FCMFake, fcm_service_account, tmp_path):
    info = json.loads(fcm_service_account.read_text())
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    info["private_key"] = other.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()).decode()
    path = tmp_path / "wrong-key.json"
    path.write_text(json.dumps(info))
    provider = FCMProvider(fcm_settings(fcm_fake, path))
    result = run(with_provider(provider, lambda p: p.send(make_push(fcm_token(), Platform.FCM))))
    assert result.outcome is AUTH and result.reason == "OAUTH_REFRESH_FAILED"
    assert fcm_fake.answered == 0


def test_fcm_error_reason_parsing():
    def error(status, message="", details=()):
        return {"error": {"code": 400, "message": message, "status": status, "details": list(details)}}
    fcm_error = lambda code: {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}
    bad_request = lambda field: {"@type": "type.googleapis.com/google.rpc.BadRequest",
                                 "fieldViolations": [{"field": field, "description": "x"}]}
    assert error_reason(error("NOT_FOUND", details=[fcm_error("UNREGISTERED")])) == "UNREGISTERED"
    assert error_reason(error("INVALID_ARGUMENT", "The registration token is not a valid FCM registration token",
                              [fcm_error("INVALID_ARGUMENT")])) == "INVALID_ARGUMENT:token"
    assert error_reason(error("INVALID_ARGUMENT", "Invalid value", [bad_request("message.token")])) \
        == "INVALID_ARGUMENT:token"
    assert error_reason(error("INVALID_ARGUMENT", "Invalid value at 'message.data[0].value'",
                              [bad_request("message.data[0].value")])) == "INVALID_ARGUMENT"
    assert error_reason(error("PERMISSION_DENIED")) == "PERMISSION_DENIED"
    assert error_reason(error("INTERNAL", details=[fcm_error("UNSPECIFIED_ERROR")])) == "INTERNAL"
    assert error_reason({"unexpected": True}) is None and error_reason(None) is None
    assert parse_retry_after("12") == 12.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now=1445412500.0) == 10.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


# --- configuration ------------------------------------------------------------------------

def test_build_providers_picks_real_or_dry_run(tls_material, apns_key, fcm_fake: FCMFake, fcm_service_account):
    dry = build_providers(Settings())
    assert isinstance(dry[Platform.APNS], DryRunProvider) and isinstance(dry[Platform.FCM], DryRunProvider)
    settings = apns_settings("127.0.0.1:1", tls_material, apns_key,
                             fcm_service_account_file=str(fcm_service_account), fcm_project_id=FCM_PROJECT)
    real = build_providers(settings)
    assert isinstance(real[Platform.APNS], APNsProvider) and isinstance(real[Platform.FCM], FCMProvider)


def test_dry_run_skips_and_logs_the_payload_with_a_short_token(caplog):
    caplog.set_level(logging.INFO)
    providers = build_providers(Settings())
    apns_tok, fcm_tok = apns_token(), fcm_token()

    async def scenario():
        return (await providers[Platform.APNS].send(make_push(apns_tok)),
                await providers[Platform.FCM].send(make_push(fcm_tok, Platform.FCM)))
    results = run(scenario())
    assert all(r == Result(Outcome.SKIPPED, None, "dry_run", None) for r in results)
    assert shorten_token(apns_tok) in caplog.text and shorten_token(fcm_tok) in caplog.text
    assert apns_tok not in caplog.text and fcm_tok not in caplog.text
    assert "alice: hello there" in caplog.text


@pytest.mark.parametrize("problem", ["missing", "garbage", "rsa", "encrypted"])
def test_bad_apns_key_is_a_config_error_naming_the_variable(tmp_path, tls_material, apns_key, problem):
    path = tmp_path / "AuthKey.p8"
    if problem == "garbage":
        path.write_text("-----BEGIN PRIVATE KEY-----\nnot base64 at all\n-----END PRIVATE KEY-----\n")
    elif problem == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    elif problem == "encrypted":
        key = serialization.load_pem_private_key(apns_key.p8_path.read_bytes(), None)
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.BestAvailableEncryption(b"secret")))
    settings = apns_settings("127.0.0.1:1", tls_material, apns_key, apns_key_file=str(path))
    with pytest.raises(ConfigError, match="^APNS_KEY_FILE: ") as info:
        APNsProvider(settings)
    assert "BEGIN" not in str(info.value)


def test_bad_apns_certificate_is_a_config_error(tmp_path, tls_material):
    path = tmp_path / "cert.pem"
    path.write_text("not a certificate")
    settings = Settings(apns_cert_file=str(path), apns_topic=APNS_TOPIC)
    with pytest.raises(ConfigError, match="^APNS_CERT_FILE: "):
        APNsProvider(settings)
    only_cert = Settings(apns_cert_file=str(tls_material.client_cert), apns_topic=APNS_TOPIC)
    with pytest.raises(ConfigError, match="^APNS_CERT_FILE: "):
        APNsProvider(only_cert)


def test_bad_ca_file_and_endpoint_are_config_errors(tmp_path, tls_material, apns_key):
    bad_ca = tmp_path / "ca.pem"
    bad_ca.write_text("nope")
    with pytest.raises(ConfigError, match="^PUSH_CA_FILE: "):
        APNsProvider(apns_settings("127.0.0.1:1", tls_material, apns_key, push_ca_file=str(bad_ca)))
    with pytest.raises(ConfigError, match="^APNS_ENDPOINT: "):
        APNsProvider(apns_settings("no-port", tls_material, apns_key))
    with pytest.raises(ConfigError, match="^APNS_TOPIC: "):
        APNsProvider(apns_settings("127.0.0.1:1", tls_material, apns_key, apns_topic=None))
    with pytest.raises(ConfigError, match="^APNS_KEY_ID: "):
        APNsProvider(apns_settings("127.0.0.1:1", tls_material, apns_key, apns_key_id=None))


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not a JSON object"),
    (json.dumps({"type": "service_account", "client_email": "a@b"}), "lacks private_key, token_uri"),
    (json.dumps({"type": "service_account", "client_email": "a@b", "token_uri": "https://x/token",
                 "private_key": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"}),
     "not a valid service account"),
])
def test_bad_service_account_is_a_config_error(tmp_path, content, message):
    path = tmp_path / "sa.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match="^FCM_SERVICE_ACCOUNT_FILE: ") as info:
        FCMProvider(Settings(fcm_service_account_file=str(path), fcm_project_id=FCM_PROJECT))
    assert message in str(info.value) and "AAAA" not in str(info.value)
    with pytest.raises(ConfigError, match="^FCM_SERVICE_ACCOUNT_FILE: "):
        FCMProvider(Settings(fcm_service_account_file=str(tmp_path / "missing.json"),
                             fcm_project_id=FCM_PROJECT))


# --- secrets stay out of logs ------------------------------------------------------------

def test_no_token_key_or_bearer_in_logs(apns_fake: APNsFake, fcm_fake: FCMFake, fcm_service_account,
                                        tls_material, apns_key, caplog):
    caplog.set_level(logging.DEBUG)
    apns_tokens = [apns_token() for _ in range(6)]
    fcm_tokens = [fcm_token() for _ in range(6)]
    for token, answer in zip(apns_tokens, [(410, "Unregistered"), (403, "ExpiredProviderToken"),
                                           (500, None), (400, "BadTopic")]):
        apns_fake.script(token, [answer])
    for token, answer in zip(fcm_tokens, [(404, "UNREGISTERED"), (401, "THIRD_PARTY_AUTH_ERROR"),
                                          (400, "INVALID_ARGUMENT"), (503, "UNAVAILABLE")]):
        fcm_fake.script(token, [answer])
    settings = apns_settings(apns_fake.endpoint, tls_material, apns_key,
                             fcm_service_account_file=str(fcm_service_account), fcm_project_id=FCM_PROJECT,
                             fcm_endpoint=fcm_fake.base_url_h2)

    async def scenario():
        providers = build_providers(settings)
        try:
            await send_all(providers[Platform.APNS], [make_push(t) for t in apns_tokens])
            await send_all(providers[Platform.FCM], [make_push(t, Platform.FCM) for t in fcm_tokens])
            fcm_fake.expire_access_tokens()
            await providers[Platform.FCM].send(make_push(fcm_tokens[-1], Platform.FCM))
        finally:
            for provider in providers.values():
                await provider.close()
    run(scenario())

    text = caplog.text + "".join(str(r.args) for r in caplog.records)
    for token in apns_tokens + fcm_tokens:
        assert token not in text
    key_body = "".join(apns_key.p8_path.read_text().splitlines()[1:-1])
    assert key_body[:40] not in text
    sa = json.loads(fcm_service_account.read_text())
    assert sa["private_key"].splitlines()[1] not in text
    assert "bearer ey" not in text.lower() and "ya29." not in text
    assert "completely busy" not in text
