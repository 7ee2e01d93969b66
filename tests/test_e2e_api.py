"""The real uWSGI with the project's uwsgi.ini, driven over HTTP: the API end to end."""
from __future__ import annotations

import re
import signal

import pytest

from tests.harness import UwsgiServer, port_is_free, wait_until

pytestmark = pytest.mark.timeout(90)
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def server(tmp_path):
    server = UwsgiServer(tmp_path).start()
    yield server
    server.close()


def test_chat_session_over_http_under_uwsgi(server):
    alice = server.post("/v1/users", {"name": "alice"})
    bob = server.post("/v1/users", {"name": "bob"})
    assert alice.status == bob.status == 201
    a_token, b_token = alice.body["token"], bob.body["token"]

    assert server.get("/v1/me", token=b_token).body == {"id": bob.body["id"], "name": "bob"}
    device = server.post("/v1/devices", {"platform": "fcm", "token": "bob-phone-1"}, token=b_token)
    assert device.status == 201 and device.body["platform"] == "fcm"

    chat = server.post("/v1/chats", {"name": "lunch", "member_ids": [bob.body["id"]]}, token=a_token)
    assert chat.status == 201
    assert [m["name"] for m in chat.body["members"]] == ["alice", "bob"]

    message = server.post(f"/v1/chats/{chat.body['id']}/messages", {"text": "noon?", "client_id": "c1"},
                          token=a_token)
    assert message.status == 201
    assert message.headers["Location"] == f"/v1/messages/{message.body['id']}"
    assert ISO.match(message.body["created_at"])
    retry = server.post(f"/v1/chats/{chat.body['id']}/messages", {"text": "noon?", "client_id": "c1"},
                        token=a_token)
    assert retry.status == 200 and retry.body == message.body

    history = server.get(f"/v1/chats/{chat.body['id']}/messages", token=b_token)
    assert [m["text"] for m in history.body["messages"]] == ["noon?"]
    assert server.get(f"/v1/messages/{message.body['id']}/deliveries", token=b_token).status == 403

    # no credentials configured: the dispatcher records a dry run for bob's phone
    def delivered():
        report = server.get(f"/v1/messages/{message.body['id']}/deliveries", token=a_token).body
        return report if report["complete"] else None

    report = wait_until(delivered, 20, message="the dry-run delivery")
    assert report["summary"] == {"pending": 0, "sent": 0, "failed": 0, "skipped": 1}
    assert report["deliveries"][0]["last_reason"] == "dry_run"

    bad = server.request("POST", "/v1/users", {"name": ""})
    assert bad.status == 400 and bad.body["error"]["code"] == "invalid_field"
    assert server.get("/nowhere").body["error"]["code"] == "not_found"


def test_sigterm_stops_cleanly_and_frees_the_port(server):
    assert server.post("/v1/users", {"name": "x"}).status == 201
    took = server.stop(signal.SIGTERM)
    assert server.process.returncode == 0, server.log_tail()
    assert took < 5
    assert port_is_free(server.port)


def test_bad_configuration_stops_start_up_naming_the_variable(tmp_path):
    server = UwsgiServer(tmp_path, env={"PUSH_TTL": "soon"})
    with pytest.raises(AssertionError):
        server.start(timeout=15)
    server.close()
    assert "PUSH_TTL" in server.log_path.read_text()


def test_an_unusable_apns_key_stops_start_up_naming_the_variable(tmp_path):
    key = tmp_path / "AuthKey.p8"
    key.write_text("not a key")
    env = {"APNS_KEY_FILE": str(key), "APNS_KEY_ID": "K", "APNS_TEAM_ID": "T", "APNS_TOPIC": "com.example"}
    server = UwsgiServer(tmp_path, env=env)
    with pytest.raises(AssertionError):
        server.start(timeout=15)
    server.close()
    log = server.log_path.read_text()
    assert "APNS_KEY_FILE" in log and "not a key" not in log
