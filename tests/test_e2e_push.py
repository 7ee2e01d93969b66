"""Pushes end to end: the real uWSGI, the real aioapns and pyfcm clients, the protocol fakes."""
from __future__ import annotations

import pytest

from tests.e2e import TOPIC, apns_token, delivery_states, make_chat, post_message, wait_complete
from tests.harness import UwsgiServer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def server(tmp_path, fakes):
    server = UwsgiServer(tmp_path / "server", env={**fakes.env, "PUSH_RETRY_BASE": "0.2", "PUSH_RETRY_MAX": "1"})
    server.start()
    yield server
    server.close()


def test_message_reaches_every_device_of_every_other_member_with_exact_payloads(server, fakes):
    chat = make_chat(server, {
        "bob": [("apns", apns_token(1)), ("fcm", "bob-android")],
        "carol": [("apns", apns_token(2))],
        "dave": [("fcm", "dave-android")],
    })
    message = post_message(server, chat, "lunch at noon?")
    report = wait_complete(server, chat, message, 30)
    assert report["summary"] == {"pending": 0, "sent": 4, "failed": 0, "skipped": 0}
    assert all(d["sent_at"] and d["last_status"] == 200 for d in report["deliveries"])

    assert fakes.apns.sent_tokens() == {apns_token(1): 1, apns_token(2): 1}  # not the sender's phone
    apns = {r.token: r for r in fakes.apns.received}
    request = apns[apns_token(1)]
    assert request.payload == {
        "aps": {"alert": {"title": "team", "body": "sender: lunch at noon?"}, "thread-id": f"chat-{chat.chat_id}",
                "sound": "default"},
        "chat_id": chat.chat_id, "message_id": message,
    }
    assert request.headers["apns-topic"] == TOPIC
    assert request.headers["apns-push-type"] == "alert"
    assert request.headers["apns-collapse-id"]
    assert int(request.headers["apns-expiration"]) > 0

    assert fakes.fcm.sent_tokens() == {"bob-android": 1, "dave-android": 1}
    sent = {r.token: r.message for r in fakes.fcm.received}["dave-android"]
    assert sent["notification"] == {"title": "team", "body": "sender: lunch at noon?"}
    assert sent["data"] == {"chat_id": str(chat.chat_id), "message_id": str(message),
                            "sender_id": str(chat.sender_id)}
    assert sent["android"]["priority"] == "high"
    assert sent["android"]["ttl"].endswith("s")


def test_dead_tokens_are_disabled_and_skipped_by_later_messages(server, fakes):
    fakes.apns.script(apns_token(1), [(410, "Unregistered")])
    fakes.fcm.script("bob-android", [(404, "UNREGISTERED")])
    chat = make_chat(server, {"bob": [("apns", apns_token(1)), ("fcm", "bob-android"), ("fcm", "bob-tablet")]})
    first = post_message(server, chat)
    report = wait_complete(server, chat, first, 30)
    assert report["summary"] == {"pending": 0, "sent": 1, "failed": 2, "skipped": 0}
    reasons = {d["last_reason"] for d in report["deliveries"] if d["state"] == "failed"}
    assert reasons == {"Unregistered", "UNREGISTERED"}
    devices = server.get("/v1/devices", token=chat.member_tokens["bob"]).body["devices"]
    assert [d["token"] for d in devices] == ["bob-tablet"]

    second = post_message(server, chat, "again")
    report = wait_complete(server, chat, second, 30)
    assert [d["platform"] for d in report["deliveries"]] == ["fcm"]
    assert fakes.apns.sent_tokens()[apns_token(1)] == 0


def test_transient_failures_are_retried_and_end_sent(server, fakes):
    fakes.apns.script(apns_token(1), [(503, "ServiceUnavailable"), (429, "TooManyRequests")])
    fakes.fcm.script("bob-android", [(503, "UNAVAILABLE"), (500, "INTERNAL")])
    chat = make_chat(server, {"bob": [("apns", apns_token(1)), ("fcm", "bob-android")]})
    message = post_message(server, chat)
    report = wait_complete(server, chat, message, 60)
    assert report["summary"]["sent"] == 2
    assert sorted(d["attempts"] for d in report["deliveries"]) == [3, 3]
    assert fakes.apns.sent_tokens() == {apns_token(1): 1}
    assert fakes.fcm.sent_tokens() == {"bob-android": 1}


def test_a_muted_member_gets_nothing(server, fakes):
    chat = make_chat(server, {"bob": [("apns", apns_token(1))], "carol": [("fcm", "carol-android")]})
    muted = server.request("PUT", f"/v1/chats/{chat.chat_id}/mute", {"until": "2099-01-01T00:00:00Z"},
                           token=chat.member_tokens["carol"])
    assert muted.status == 200
    message = post_message(server, chat)
    report = wait_complete(server, chat, message, 30)
    assert report["summary"]["sent"] == 1
    assert fakes.fcm.received == []
    assert fakes.apns.sent_tokens() == {apns_token(1): 1}


def test_provider_outage_ends_with_everything_sent_once(server, fakes):
    fakes.apns.set_default(503, "ServiceUnavailable")
    fakes.fcm.set_default(503, "UNAVAILABLE")
    chat = make_chat(server, {f"user{i}": [("apns", apns_token(i)), ("fcm", f"android-{i}")] for i in range(1, 11)})
    message = post_message(server, chat)
    assert fakes.apns.wait_for(10, timeout=20) and fakes.fcm.wait_for(10, timeout=20)
    fakes.apns.set_default(None)
    fakes.fcm.set_default(None)
    report = wait_complete(server, chat, message, 60)
    assert report["summary"] == {"pending": 0, "sent": 20, "failed": 0, "skipped": 0}
    assert set(fakes.apns.sent_tokens().values()) == {1}  # no device got it twice
    assert set(fakes.fcm.sent_tokens().values()) == {1}
    assert delivery_states(server, message) == {"sent": 20}


def test_metrics_and_healthz_report_the_dispatcher(server, fakes):
    chat = make_chat(server, {"bob": [("apns", apns_token(1)), ("fcm", "bob-android")]})
    wait_complete(server, chat, post_message(server, chat), 30)
    health = server.get("/healthz").body
    assert health["dispatcher"]["alive"] is True
    assert health["dispatcher"]["pending_deliveries"] == 0
    text = server.get("/metrics").body
    assert 'chat_push_deliveries{platform="apns",state="sent"} 1.0' in text
    assert 'chat_push_attempts_total{outcome="sent",platform="fcm"} 1.0' in text
    assert "chat_push_provider_latency_seconds_bucket" in text
    assert "chat_push_queue_oldest_pending_age_seconds 0.0" in text
    assert "chat_push_dispatcher_starts_total 1.0" in text
    # no secret in what the service logged
    log = server.log_path.read_text()
    assert apns_token(1) not in log and "bob-android" not in log
    assert "PRIVATE KEY" not in log and chat.sender_token not in log
