"""Payloads: exact content for short texts, the 4096-byte bound for long ones, clean cuts."""
import json
import unicodedata
import uuid

import pytest
from pyfcm import FCMNotification

from notifier.model import Platform, Push
from notifier.payload import (ELLIPSIS, MAX_PAYLOAD_BYTES, apns_collapse_id, apns_id,
                              apns_payload, fcm_message)

CHAT_NAME_64 = "Ç" * 32 + "群" * 32  # 64 characters, 2- and 3-byte


def make_push(text="hello", chat_name="Friends", sender_name="alice", **overrides):
    values = dict(delivery_id=1, message_id=42, chat_id=7, chat_name=chat_name, sender_id=3,
                  sender_name=sender_name, text=text, device_id=9, platform=Platform.APNS,
                  token="a" * 64, app=None)
    values.update(overrides)
    return Push(**values)


def pyfcm_body(kwargs):
    """What pyfcm will actually POST for these kwargs."""
    return FCMNotification(credentials=object(), project_id="p").parse_payload(**kwargs)


# --- exact content ------------------------------------------------------------

def test_apns_payload_short_text_is_exact():
    body = apns_payload(make_push(text="hi there"))
    assert json.loads(body) == {
        "aps": {"alert": {"title": "Friends", "body": "alice: hi there"},
                "thread-id": "chat-7", "sound": "default"},
        "chat_id": 7, "message_id": 42,
    }
    assert b" " not in body.replace(b"hi there", b"").replace(b"alice: ", b"")  # compact JSON


def test_apns_payload_keeps_non_ascii_unescaped():
    body = apns_payload(make_push(text="ça va? 👋"))
    assert "ça va? 👋".encode() in body
    assert json.loads(body)["aps"]["alert"]["body"] == "alice: ça va? 👋"


def test_fcm_message_short_text_is_exact():
    kwargs = fcm_message(make_push(text="hi", platform=Platform.FCM, token="tok"), ttl=3600)
    assert kwargs == {
        "fcm_token": "tok",
        "notification_title": "Friends",
        "notification_body": "alice: hi",
        "data_payload": {"chat_id": "7", "message_id": "42", "sender_id": "3"},
        "android_config": {"priority": "high", "ttl": "3600s",
                           "notification": {"tag": "msg-42"}},
    }
    message = json.loads(pyfcm_body(kwargs))["message"]
    assert message["android"]["notification"]["tag"] == "msg-42"
    assert all(isinstance(v, str) for v in message["data"].values())


def test_fcm_message_rejects_negative_ttl():
    with pytest.raises(ValueError):
        fcm_message(make_push(), ttl=-1)


# --- the size bound -----------------------------------------------------------

ALPHABETS = {
    "ascii": "abcdefghij",
    "2-byte": "éçñßøåäöüÿ",
    "3-byte": "漢字仮名交じり文日本",
    "4-byte": "😀🎉🚀🌍🔥💬🙂👍🐍🍕",
    "combining": "e\u0301a\u0300o\u0308u\u0302n\u0303",
    "zwj-emoji": "👨\u200d👩\u200d👧\u200d👦👍🏽",
    "json-escapes": 'a"b\\c\nd\te\x01',
}


@pytest.mark.parametrize("alphabet", ALPHABETS.values(), ids=list(ALPHABETS))
@pytest.mark.parametrize("length", [4000, 4096, 10000])
def test_apns_payload_fits_4096_bytes(alphabet, length):
    text = (alphabet * (length // len(alphabet) + 1))[:length]
    push = make_push(text=text, chat_name=CHAT_NAME_64, sender_name="Bob the sender")
    body = apns_payload(push)
    assert len(body) <= MAX_PAYLOAD_BYTES
    alert = json.loads(body.decode("utf-8", errors="strict"))["aps"]["alert"]
    assert alert["title"] == CHAT_NAME_64
    assert alert["body"].startswith("Bob the sender: ")
    assert alert["body"].endswith(ELLIPSIS)
    kept = alert["body"][len("Bob the sender: "):-1]
    assert text.startswith(kept)
    assert len(body) > MAX_PAYLOAD_BYTES - 64   # the cut is tight, not wasteful
    # the cut does not split a character from its combining marks / joiners
    following = text[len(kept)]
    assert unicodedata.combining(following) == 0
    assert following not in "\u200d\U0001F3FD"
    assert not kept.endswith("\u200d")


@pytest.mark.parametrize("alphabet", ALPHABETS.values(), ids=list(ALPHABETS))
def test_fcm_request_fits_4096_bytes(alphabet):
    text = (alphabet * (4000 // len(alphabet) + 1))[:4000]
    push = make_push(text=text, chat_name=CHAT_NAME_64, platform=Platform.FCM, token="t" * 163)
    body = pyfcm_body(fcm_message(push, ttl=86400))
    assert len(body) <= MAX_PAYLOAD_BYTES
    notification = json.loads(body.decode("utf-8"))["message"]["notification"]
    assert notification["body"].endswith(ELLIPSIS)
    assert text.startswith(notification["body"][len("alice: "):-1])


def test_text_that_fits_exactly_is_not_cut():
    push = make_push(text="")
    room = MAX_PAYLOAD_BYTES - len(apns_payload(push))
    body = apns_payload(make_push(text="x" * room))
    assert len(body) == MAX_PAYLOAD_BYTES
    assert json.loads(body)["aps"]["alert"]["body"] == "alice: " + "x" * room


def test_huge_names_are_cut_too():
    push = make_push(text="hello", chat_name="C" * 5000, sender_name="S" * 5000)
    body = apns_payload(push)
    assert len(body) <= MAX_PAYLOAD_BYTES
    alert = json.loads(body)["aps"]["alert"]
    assert alert["title"].endswith(ELLIPSIS)


def test_lone_surrogates_do_not_break_encoding():
    body = apns_payload(make_push(text="bad \ud83d half"))
    assert json.loads(body)["aps"]["alert"]["body"] == "alice: bad \ufffd half"


def test_truncation_is_a_bisection_not_a_loop(monkeypatch):
    import notifier.payload as payload
    calls = []
    real = payload.encoded_size
    monkeypatch.setattr(payload, "encoded_size", lambda doc: calls.append(1) or real(doc))
    apns_payload(make_push(text="😀" * 4000))
    assert len(calls) < 30


# --- ids ------------------------------------------------------------------------

def test_apns_id_is_a_deterministic_uuid_per_message_and_device():
    first = apns_id(42, 9)
    assert first == apns_id(42, 9)
    assert first != apns_id(42, 10) and first != apns_id(43, 9)
    parsed = uuid.UUID(first)
    assert str(parsed) == first and parsed.version == 5


def test_collapse_id_is_per_message():
    assert apns_collapse_id(42) == "msg-42"
    assert len(apns_collapse_id(2**63).encode()) <= 64
