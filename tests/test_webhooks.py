"""Result webhooks and retention end to end: the real uWSGI, the push fakes, a receiver on 127.0.0.1."""
from __future__ import annotations

import base64
import os
import signal
import subprocess
import time

import pytest
import sqlalchemy as sa
from standardwebhooks import Webhook, WebhookVerificationError

from notifier import schema
from tests.e2e import apns_token, make_chat, post_message, wait_complete
from tests.fakes.webhook import WebhookReceiver
from tests.harness import ROOT, UWSGI, UwsgiServer, wait_until

pytestmark = pytest.mark.timeout(120)

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
FANOUT = "message.fanout_completed"
DISABLED = "device.disabled"


@pytest.fixture
def receiver():
    receiver = WebhookReceiver().start()
    yield receiver
    receiver.stop()


def webhook_env(receiver: WebhookReceiver, **extra) -> dict:
    """The service's settings for webhooks to `receiver`, retried quickly."""
    return {"WEBHOOK_URL": receiver.url, "WEBHOOK_SECRET": SECRET, "WEBHOOK_RETRY_BASE": "0.2", **extra}


@pytest.fixture
def server(tmp_path, fakes, receiver):
    server = UwsgiServer(tmp_path / "server", env={**fakes.env, **webhook_env(receiver), "PUSH_RETRY_BASE": "0.2"})
    server.start()
    yield server
    server.close()


def device_id(server: UwsgiServer, token: str) -> tuple[int, int]:
    """(device id, owner id) of the device holding `token`."""
    with server.engine.connect() as conn:
        row = conn.execute(sa.select(schema.devices.c.id, schema.devices.c.user_id)
                           .where(schema.devices.c.token == token)).one()
    return row.id, row.user_id


def wait_events(receiver: WebhookReceiver, event_type: str, count: int, timeout: float = 30) -> list:
    """Wait until `count` events of `event_type` were received; return them."""
    return wait_until(lambda: (lambda got: got if len(got) >= count else None)(receiver.events(event_type)),
                      timeout, interval=0.05, message=f"{count} {event_type} event(s)")


def event_rows(server: UwsgiServer) -> list:
    """Every webhook event row, oldest first."""
    with server.engine.connect() as conn:
        return conn.execute(sa.select(schema.webhook_events).order_by(schema.webhook_events.c.id)).all()


def attempts_of(server: UwsgiServer, webhook_id: str) -> list:
    """The recorded attempts' statuses of one event, oldest first."""
    events, attempts = schema.webhook_events, schema.webhook_attempts
    with server.engine.connect() as conn:
        return conn.execute(
            sa.select(attempts.c.status).join(events, events.c.id == attempts.c.event_id)
            .where(events.c.webhook_id == webhook_id).order_by(attempts.c.id)).scalars().all()


def test_the_fanout_and_the_dead_token_are_posted_signed(server, fakes, receiver):
    fakes.fcm.script("cat-android", [(404, "UNREGISTERED")])
    chat = make_chat(server, {"bob": [("apns", apns_token(1))], "cat": [("fcm", "cat-android")]})
    message = post_message(server, chat, "lunch?")
    cat_device, cat_id = device_id(server, "cat-android")
    bob_device, _ = device_id(server, apns_token(1))

    (completed,) = wait_events(receiver, FANOUT, 1)
    (disabled,) = wait_events(receiver, DISABLED, 1)

    verifier = Webhook(SECRET)
    for request in (completed, disabled):
        assert verifier.verify(request.body, request.headers) == request.event  # raises when the signature is wrong
        assert request.headers["content-type"] == "application/json"
        assert request.headers["webhook-id"].startswith("msg_")
        assert abs(int(request.headers["webhook-timestamp"]) - time.time()) < 60
        assert request.path == "/hooks/chat"
    with pytest.raises(WebhookVerificationError, match="signature"):
        Webhook("whsec_" + base64.b64encode(b"x" * 32).decode()).verify(completed.body, completed.headers)
    assert completed.event["type"] == FANOUT and completed.event["timestamp"].endswith("Z")
    assert completed.event["data"] == {
        "message_id": message, "chat_id": chat.chat_id, "sender_id": chat.sender_id,
        "summary": {"sent": 1, "failed": 1, "skipped": 0},
        "failed": [{"device_id": cat_device, "platform": "fcm", "last_status": 404, "last_reason": "UNREGISTERED"}],
        "deliveries_url": f"/v1/messages/{message}/deliveries",
    }
    assert disabled.event["data"] == {"device_id": cat_device, "user_id": cat_id, "platform": "fcm",
                                      "reason": "UNREGISTERED"}
    assert bob_device != cat_device
    # the summary the event carries is the report's
    report = wait_complete(server, chat, message, 10)
    assert report["summary"] == {"pending": 0, "sent": 1, "failed": 1, "skipped": 0} and report["pruned"] is False

    health = wait_until(lambda: (lambda h: h if h["webhooks"]["backlog"] == 0 else None)(server.get("/healthz").body),
                        10, message="an empty webhook backlog")
    assert health["webhooks"]["enabled"] is True
    metrics = server.get("/metrics").body
    assert 'chat_webhook_attempts_total{outcome="delivered"} 2.0' in metrics
    assert "chat_webhook_backlog 0.0" in metrics
    assert SECRET not in server.log_path.read_text(errors="replace")
    assert SECRET[len("whsec_"):] not in server.log_path.read_text(errors="replace")


def test_a_message_without_recipients_completes_with_an_empty_summary(server, receiver):
    chat = make_chat(server, {"bob": []})
    message = post_message(server, chat, "anyone?")

    (completed,) = wait_events(receiver, FANOUT, 1)

    assert completed.event["data"]["message_id"] == message
    assert completed.event["data"]["summary"] == {"sent": 0, "failed": 0, "skipped": 0}
    assert completed.event["data"]["failed"] == []
    assert receiver.events(DISABLED) == []


def test_a_500_is_retried_with_the_same_id_and_every_attempt_recorded(server, receiver):
    receiver.script(500, 503)
    chat = make_chat(server, {"bob": [("apns", apns_token(1))]})
    post_message(server, chat)

    first, second, third = wait_events(receiver, FANOUT, 3)

    assert [r.status for r in (first, second, third)] == [500, 503, 204]
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == third.headers["webhook-id"]
    assert first.body == second.body == third.body
    for request in (first, second, third):
        Webhook(SECRET).verify(request.body, request.headers)
    webhook_id = first.headers["webhook-id"]
    wait_until(lambda: attempts_of(server, webhook_id) == [500, 503, 204], 10, message="three recorded attempts")
    (row,) = event_rows(server)
    assert (row.state, row.attempts, row.last_status) == ("delivered", 3, 204)


def test_a_410_stops_the_event_at_once(server, receiver):
    receiver.script(410)
    chat = make_chat(server, {"bob": [("apns", apns_token(1))]})
    post_message(server, chat)

    (gone,) = wait_events(receiver, FANOUT, 1)

    wait_until(lambda: event_rows(server)[0].state == "failed", 10, message="the event given up")
    (row,) = event_rows(server)
    assert (row.attempts, row.last_status, row.finished_at is not None) == (1, 410, True)
    assert attempts_of(server, gone.headers["webhook-id"]) == [410]
    time.sleep(1.0)  # several retry intervals (WEBHOOK_RETRY_BASE=0.2): nothing more may come
    assert len(receiver.events(FANOUT)) == 1


def test_events_survive_a_stop_and_start_while_the_receiver_is_down(tmp_path, fakes):
    receiver = WebhookReceiver()  # not listening yet: connections are refused
    server = UwsgiServer(tmp_path / "server", env={**fakes.env, **webhook_env(receiver, WEBHOOK_RETRY_BASE="0.5")})
    try:
        server.start()
        chat = make_chat(server, {"bob": [("apns", apns_token(1))], "cat": []})
        message = post_message(server, chat)
        wait_complete(server, chat, message, 30)
        # tried, failed, recorded
        wait_until(lambda: (lambda rows: rows and rows[0].attempts >= 1 and rows[0].last_error)(event_rows(server)),
                   30, message="a failed attempt recorded")
        server.stop()
        # the dispatcher outlives uWSGI (it keeps retrying the event): stop it too, as systemd
        # stopping the service's cgroup would
        server.kill_dispatchers(signal.SIGTERM, timeout=10)
        (row,) = event_rows(server)
        assert row.state == "pending" and row.last_status is None
        receiver.start()

        server.start()  # no new message: the watchdog starts a dispatcher for the pending event

        (completed,) = wait_events(receiver, FANOUT, 1, timeout=40)
        assert completed.headers["webhook-id"] == row.webhook_id
        assert completed.event["data"]["message_id"] == message
        wait_until(lambda: event_rows(server)[0].state == "delivered", 10, message="the event delivered")
    finally:
        server.close()
        receiver.stop()


def test_retention_prunes_deliveries_jobs_and_events_and_keeps_summaries_and_history(tmp_path, fakes, receiver):
    server = UwsgiServer(tmp_path / "server", env={**fakes.env, **webhook_env(receiver), "PUSH_RETENTION": "1",
                                                   "PUSH_IDLE_EXIT": "30"})
    try:
        server.start()
        fakes.apns.script(apns_token(2), [(410, "Unregistered")])
        chat = make_chat(server, {"bob": [("apns", apns_token(1)), ("apns", apns_token(2))]})
        message = post_message(server, chat, "keep me")
        report = wait_complete(server, chat, message, 30)
        assert report["pruned"] is False and len(report["deliveries"]) == 2
        wait_events(receiver, FANOUT, 1)

        def pruned():
            body = server.get(f"/v1/messages/{message}/deliveries", token=chat.sender_token).body
            return body if body["pruned"] else None

        after = wait_until(pruned, 20, interval=0.2, message="the deliveries pruned")

        assert after == {"message_id": message, "complete": True, "summary": report["summary"], "deliveries": [],
                         "pruned": True}
        assert after["summary"] == {"pending": 0, "sent": 1, "failed": 1, "skipped": 0}
        history = server.get(f"/v1/chats/{chat.chat_id}/messages", token=chat.sender_token).body["messages"]
        assert [m["id"] for m in history] == [message]
        assert server.get(f"/v1/messages/{message}", token=chat.sender_token).body["text"] == "keep me"
        wait_until(lambda: event_rows(server) == [], 20, message="the delivered events pruned")
        with server.engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(schema.push_jobs)).scalar() == 0
            assert conn.execute(sa.select(sa.func.count()).select_from(schema.webhook_attempts)).scalar() == 0
            assert conn.execute(sa.select(sa.func.count()).select_from(schema.deliveries)).scalar() == 0
            assert conn.execute(sa.select(sa.func.count()).select_from(schema.fanouts)).scalar() == 1

        # a later message still works, and is reported in full until it is pruned in turn
        second = post_message(server, chat, "again")
        assert len(wait_complete(server, chat, second, 30)["deliveries"]) == 1
    finally:
        server.close()


@pytest.mark.parametrize("variable, value", [
    ("WEBHOOK_SECRET", "whsec_" + base64.b64encode(b"short").decode()),
    ("WEBHOOK_SECRET", "not-a-whsec-secret-at-all-0123456789"),
    ("WEBHOOK_URL", "ftp://127.0.0.1/hooks"),
    ("PUSH_RETENTION", "-5"),
])
def test_bad_webhook_and_retention_settings_stop_the_start_naming_the_variable(tmp_path, variable, value):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APNS_", "FCM_", "PUSH_", "WEBHOOK_"))}
    env.update({"WEBHOOK_URL": "http://127.0.0.1:9/hooks", "WEBHOOK_SECRET": SECRET, variable: value,
                "CHAT_HTTP_SOCKET": "127.0.0.1:0", "DATABASE_URL": f"sqlite:///{tmp_path}/chat.sqlite3",
                "PUSH_RUN_DIR": str(tmp_path / "run")})

    result = subprocess.run([str(UWSGI), "--ini", str(ROOT / "uwsgi.ini")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)

    assert result.returncode != 0
    log = result.stdout + result.stderr
    assert f"{variable}:" in log
    assert value not in log or variable != "WEBHOOK_SECRET"  # a secret, even a malformed one, is never printed
    assert SECRET not in log


def test_a_slow_receiver_with_every_slot_busy_does_not_hold_the_pushes(tmp_path, fakes):
    """Events waiting for a free slot while the one slot waits on a receiver that takes 3 s: the
    sender must wait too, not spin (on SQLite its database calls never yield the loop: a sender
    that looked again at once starved the pushes, and a message posted then was never sent)."""
    receiver = WebhookReceiver(delay=3.0).start()
    server = UwsgiServer(tmp_path / "server", env={**fakes.env, **webhook_env(receiver, WEBHOOK_CONCURRENCY="1")})
    try:
        server.start()
        chat = make_chat(server, {"bob": [("apns", apns_token(1))]})
        for n in range(3):
            wait_complete(server, chat, post_message(server, chat, f"queue {n}"), 30)
        assert len(event_rows(server)) == 3 and len(receiver.events()) <= 1  # one in the slot, the others wait

        message = post_message(server, chat, "still pushed")

        assert wait_complete(server, chat, message, 10)["summary"]["sent"] == 1
        assert fakes.apns.sent_tokens()[apns_token(1)] == 4
        wait_events(receiver, FANOUT, 4, timeout=30)  # and the events all arrive, one at a time
    finally:
        server.close()
        receiver.stop()
