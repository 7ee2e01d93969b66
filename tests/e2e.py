"""Shared set-up for end-to-end push tests: protocol fakes, credentials, and a populated chat."""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from notifier import db, schema
from tests.fakes.apns import APNsFake
from tests.fakes.fcm import FCMFake
from tests.fakes.tls import make_apns_key, make_service_account, make_tls_material
from tests.harness import UwsgiServer, wait_until

TOPIC = "com.example.chat"
KEY_ID = "KEYID12345"
TEAM_ID = "TEAMID1234"
PROJECT = "chat-test"


@dataclass
class Fakes:
    """Both protocol fakes and the environment that points the service at them."""

    apns: APNsFake
    fcm: FCMFake
    env: dict = field(default_factory=dict)

    def stop(self) -> None:
        """Stop both fakes."""
        self.apns.stop()
        self.fcm.stop()


@contextlib.contextmanager
def running_fakes(directory: Path, apns_class=APNsFake, fcm_class=FCMFake, **apns_options):
    """Start an APNs fake (token auth) and an FCM fake (of these classes: subclasses may record
    more); yield Fakes; always stop them."""
    directory.mkdir(parents=True, exist_ok=True)
    tls = make_tls_material(directory / "tls")
    key_path, public_key = make_apns_key(directory / "apns", key_id=KEY_ID)
    apns = apns_class(tls, topic=TOPIC, key_id=KEY_ID, team_id=TEAM_ID, public_key_pem=public_key, **apns_options)
    fcm = fcm_class(tls, project_id=PROJECT)
    fakes = Fakes(apns, fcm)
    try:
        apns.start()
        fcm.start()
        account_path, account_key = make_service_account(directory / "fcm", fcm.token_uri, project_id=PROJECT)
        fcm.add_service_account(_client_email(account_path), account_key)
        fakes.env = {
            "APNS_KEY_FILE": str(key_path), "APNS_KEY_ID": KEY_ID, "APNS_TEAM_ID": TEAM_ID,
            "APNS_TOPIC": TOPIC, "APNS_ENDPOINT": apns.endpoint,
            "FCM_SERVICE_ACCOUNT_FILE": str(account_path), "FCM_PROJECT_ID": PROJECT,
            "FCM_ENDPOINT": fcm.base_url_h2, "PUSH_CA_FILE": str(tls.ca_cert),
        }
        yield fakes
    finally:
        fakes.stop()


def _client_email(path: Path) -> str:
    return json.loads(Path(path).read_text())["client_email"]


def apns_token(n: int) -> str:
    """A distinct valid APNs token."""
    return f"{n:064x}"


@dataclass
class Chat:
    """A chat created over HTTP: the sender's token, the chat id, and the recipients' device tokens."""

    chat_id: int
    sender_token: str
    sender_id: int
    member_tokens: dict  # user name -> bearer token


def make_chat(server: UwsgiServer, members: dict) -> Chat:
    """Sign up a sender and `members` ({name: [(platform, token), ...]}) over HTTP, register devices, create the chat."""
    sender = server.post("/v1/users", {"name": "sender"}).body
    server.post("/v1/devices", {"platform": "apns", "token": apns_token(10**6)}, token=sender["token"])
    ids, tokens = [], {}
    for name, devices in members.items():
        user = server.post("/v1/users", {"name": name}).body
        ids.append(user["id"])
        tokens[name] = user["token"]
        for platform, token in devices:
            answer = server.post("/v1/devices", {"platform": platform, "token": token}, token=user["token"])
            assert answer.status == 201, answer.body
    chat = server.post("/v1/chats", {"name": "team", "member_ids": ids}, token=sender["token"])
    assert chat.status == 201, chat.body
    return Chat(chat.body["id"], sender["token"], sender["id"], tokens)


def add_bulk_member(server: UwsgiServer, chat: Chat, apns_devices: int = 0, fcm_devices: int = 0,
                    start: int = 0) -> list[str]:
    """One member with many devices, inserted straight into the database (thousands of POSTs would
    only slow the test down; the fan-out under test reads the same rows). Returns the tokens."""
    user = server.post("/v1/users", {"name": f"bulk{start}"}).body
    assert server.post(f"/v1/chats/{chat.chat_id}/members", {"user_id": user["id"]},
                       token=chat.sender_token).status == 201
    rows = [{"user_id": user["id"], "platform": "apns", "token": apns_token(start + i), "app": TOPIC,
             "enabled": True, "created_at": 0.0} for i in range(apns_devices)]
    rows += [{"user_id": user["id"], "platform": "fcm", "token": f"fcm-{start + i}", "app": None,
              "enabled": True, "created_at": 0.0} for i in range(fcm_devices)]
    with db.writer(server.engine).begin() as conn:
        conn.execute(schema.devices.insert(), rows)
    return [row["token"] for row in rows]


def post_message(server: UwsgiServer, chat: Chat, text: str = "hello") -> int:
    """POST a message as the sender; return its id."""
    answer = server.post(f"/v1/chats/{chat.chat_id}/messages", {"text": text}, token=chat.sender_token)
    assert answer.status == 201, answer.body
    return answer.body["id"]


def delivery_states(server: UwsgiServer, message_id: int | None = None) -> dict:
    """Count of deliveries by state, read from the database."""
    query = sa.select(schema.deliveries.c.state, sa.func.count()).group_by(schema.deliveries.c.state)
    if message_id is not None:
        query = query.where(schema.deliveries.c.message_id == message_id)
    with server.engine.connect() as conn:
        return dict(conn.execute(query).all())


def wait_complete(server: UwsgiServer, chat: Chat, message_id: int, timeout: float) -> dict:
    """Wait until the message's delivery report says complete; return it."""
    def report():
        body = server.get(f"/v1/messages/{message_id}/deliveries", token=chat.sender_token).body
        return body if body["complete"] else None
    return wait_until(report, timeout, interval=0.2, message=f"deliveries of message {message_id} to complete")
