"""Web Push end to end, and private push content: the real uWSGI, the real provider (pywebpush's
encryption, py_vapid's JWT, aiohttp), a strict fake push service over TLS on 127.0.0.1 that checks
the VAPID JWT and decrypts what it gets, and the APNs and FCM fakes for PUSH_CONTENT=ids."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.e2e import apns_token, make_chat, post_message, wait_complete
from tests.fakes.webpush import WebPushFake
from tests.harness import UwsgiServer

pytestmark = pytest.mark.timeout(120)

SUBJECT = "mailto:ops@example.com"


def vapid_key(directory: Path) -> tuple[Path, ec.EllipticCurvePrivateKey]:
    """A VAPID key pair, the private half as the PEM file the service reads."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    path = directory / "vapid.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path, key


@pytest.fixture
def webpush(fakes):
    """The fake push service, on the same test CA as the other fakes (PUSH_CA_FILE trusts it)."""
    fake = WebPushFake(fakes.apns.tls)
    fake.start()
    yield fake
    fake.stop()


def webpush_env(tmp_path: Path, fakes, webpush: WebPushFake, **extra) -> dict:
    path, _ = vapid_key(tmp_path / "vapid")
    return {**fakes.env, "VAPID_PRIVATE_KEY_FILE": str(path), "VAPID_SUBJECT": SUBJECT,
            "WEBPUSH_ALLOWED_HOSTS": f"127.0.0.1:{webpush.port}", "PUSH_RETRY_BASE": "0.2",
            "PUSH_RETRY_MAX": "1", **extra}


@pytest.fixture
def server(tmp_path, fakes, webpush):
    server = UwsgiServer(tmp_path / "server", env=webpush_env(tmp_path, fakes, webpush))
    server.start()
    yield server
    server.close()


def register_browser(server: UwsgiServer, token: str, subscription: dict) -> dict:
    answer = server.post("/v1/devices", {"platform": "webpush", "subscription": subscription}, token=token)
    assert answer.status == 201, answer.body
    return answer.body


def browser_chat(server: UwsgiServer, webpush: WebPushFake, browsers: int = 1, phones: list | None = None):
    """A chat whose member `bob` has `browsers` subscriptions (and `phones`); returns (chat, subscriptions)."""
    chat = make_chat(server, {"bob": phones or []})
    subscriptions = [webpush.subscribe() for _ in range(browsers)]
    for subscription in subscriptions:
        register_browser(server, chat.member_tokens["bob"], subscription)
    return chat, subscriptions


def test_a_message_reaches_a_browser_encrypted_signed_and_exact(server, webpush):
    chat, (subscription,) = browser_chat(server, webpush)

    message = post_message(server, chat, "lunch at noon?")

    report = wait_complete(server, chat, message, 30)
    assert report["summary"] == {"pending": 0, "sent": 1, "failed": 0, "skipped": 0}
    assert report["deliveries"][0]["platform"] == "webpush" and report["deliveries"][0]["last_status"] == 201
    (got,) = webpush.received
    assert got.endpoint == subscription["endpoint"]
    assert got.payload == {"title": "team", "body": "sender: lunch at noon?", "chat_id": chat.chat_id,
                           "message_id": message, "sender_id": chat.sender_id}
    assert got.headers["ttl"] == "86400" and got.headers["urgency"] == "high"
    assert got.headers["topic"] == f"msg-{message}"
    assert got.headers["content-encoding"] == "aes128gcm"
    assert got.claims["aud"] == f"https://127.0.0.1:{webpush.port}" and got.claims["sub"] == SUBJECT
    key = server.get("/v1/webpush/key").body["public_key"]
    assert f"k={key}" in got.headers["authorization"].replace(" ", "")


def test_the_vapid_jwt_is_reused_and_connections_kept(server, webpush):
    chat, subscriptions = browser_chat(server, webpush, browsers=3)

    for n in range(3):
        wait_complete(server, chat, post_message(server, chat, f"m{n}"), 30)

    assert len(webpush.received) == 9
    tokens = {r.headers["authorization"] for r in webpush.received}
    assert len(tokens) == 1, "one JWT per push service origin, not one per push"
    assert webpush.connections <= 3


@pytest.mark.parametrize("status, state, disabled", [(410, "failed", True), (404, "failed", True),
                                                     (413, "failed", False)])
def test_final_answers_fail_the_delivery_and_dead_subscriptions_are_disabled(server, webpush, status, state,
                                                                             disabled):
    chat, (subscription,) = browser_chat(server, webpush)
    webpush.script(subscription["endpoint"], [(status, "scripted")])

    report = wait_complete(server, chat, post_message(server, chat), 30)

    assert [(d["state"], d["last_status"]) for d in report["deliveries"]] == [(state, status)]
    devices = server.get("/v1/devices", token=chat.member_tokens["bob"]).body["devices"]
    assert (devices == []) is disabled


@pytest.mark.parametrize("status", [429, 500, 503])
def test_throttling_and_server_errors_are_retried_until_sent(server, webpush, status):
    chat, (subscription,) = browser_chat(server, webpush)
    webpush.script(subscription["endpoint"], [(status, "scripted", {"Retry-After": "1"})])

    report = wait_complete(server, chat, post_message(server, chat), 30)

    assert [(d["state"], d["attempts"], d["last_status"]) for d in report["deliveries"]] == [("sent", 2, 201)]
    assert webpush.sent_endpoints()[subscription["endpoint"]] == 1


def test_without_a_vapid_key_web_push_is_a_dry_run(tmp_path, fakes):
    server = UwsgiServer(tmp_path / "server", env=fakes.env)
    try:
        server.start()
        assert server.get("/v1/webpush/key").status == 404
        chat = make_chat(server, {"bob": []})
        point = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
        subscription = {"endpoint": "https://updates.push.services.mozilla.com/wpush/v2/gAAAAABh",
                        "keys": {"p256dh": base64.urlsafe_b64encode(point).rstrip(b"=").decode(),
                                 "auth": base64.urlsafe_b64encode(bytes(16)).rstrip(b"=").decode()}}
        register_browser(server, chat.member_tokens["bob"], subscription)

        report = wait_complete(server, chat, post_message(server, chat), 30)

        assert [(d["state"], d["last_reason"]) for d in report["deliveries"]] == [("skipped", "dry_run")]
    finally:
        server.close()


def test_private_content_sends_ids_only_on_every_platform(tmp_path, fakes, webpush):
    server = UwsgiServer(tmp_path / "server", env=webpush_env(tmp_path, fakes, webpush, PUSH_CONTENT="ids"))
    try:
        server.start()
        chat, _ = browser_chat(server, webpush, phones=[("apns", apns_token(1)), ("fcm", "bob-android")])
        message = post_message(server, chat, "the secret plan")

        assert wait_complete(server, chat, message, 30)["summary"]["sent"] == 3

        ids = {"chat_id": chat.chat_id, "message_id": message, "sender_id": chat.sender_id}
        (browser,) = webpush.received
        assert browser.payload == ids
        (phone,) = fakes.apns.received
        assert phone.payload["aps"]["alert"] == {"title-loc-key": "NEW_MESSAGE_TITLE", "loc-key": "NEW_MESSAGE_BODY"}
        assert phone.payload["aps"]["mutable-content"] == 1
        assert {k: phone.payload[k] for k in ids} == ids
        (android,) = fakes.fcm.received
        assert "notification" not in android.message
        assert android.message["data"] == {k: str(v) for k, v in ids.items()}
        everything = json.dumps([browser.payload, phone.payload, android.message])
        assert "secret plan" not in everything and "team" not in everything and "sender" not in everything.replace(
            "sender_id", "")
    finally:
        server.close()


def test_a_bad_vapid_setting_stops_the_start_naming_the_variable(tmp_path, fakes):
    not_a_key = tmp_path / "not-a-key.pem"
    not_a_key.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    for env, variable in (({"VAPID_PRIVATE_KEY_FILE": str(not_a_key), "VAPID_SUBJECT": SUBJECT},
                           "VAPID_PRIVATE_KEY_FILE"),
                          ({"VAPID_PRIVATE_KEY_FILE": str(vapid_key(tmp_path / "k")[0])}, "VAPID_SUBJECT"),
                          ({"WEBPUSH_ALLOWED_HOSTS": "*"}, "WEBPUSH_ALLOWED_HOSTS")):
        server = UwsgiServer(tmp_path / f"server-{variable}", env={**fakes.env, **env})
        with pytest.raises(AssertionError, match="uWSGI exited"):
            server.start(timeout=30)
        server.close()
        assert f"{variable}:" in server.log_path.read_text(errors="replace")


