"""Notification payloads for APNs and FCM, and the ids that make re-sends idempotent.

Pure functions of a :class:`~notifier.model.Push`: no I/O, no clock.

Both payloads show the chat name as the title and ``"sender: text"`` as the
body. The text is cut so that the encoded payload fits the providers' 4096-byte
limit: the cut is on a character boundary (Python slices code points, so the
UTF-8 is never cut mid-character), it does not separate a character from the
combining marks / joiners that follow it, and it ends with "…". The cut point
is found by bisection over the encoded size (about a dozen encodings for a
4000-character text), not one character at a time.
"""
from __future__ import annotations

import functools
import json
import unicodedata
import uuid
from typing import Callable

from notifier.model import Push

MAX_PAYLOAD_BYTES = 4096
ELLIPSIS = "…"
# PUSH_CONTENT=ids: what the phone shows until the app's notification service extension has
# fetched the message (keys of the app's Localizable.strings)
APNS_GENERIC_TITLE_KEY = "NEW_MESSAGE_TITLE"
APNS_GENERIC_BODY_KEY = "NEW_MESSAGE_BODY"
# RFC 8291 aes128gcm adds a 86-byte header (salt, record size, key id length, the sender's 65-byte
# key), a 16-byte tag and a 1-byte padding delimiter; push services take at most 4096 bytes
WEBPUSH_MAX_PLAINTEXT = MAX_PAYLOAD_BYTES - 86 - 16 - 1

# A fixed namespace: apns-id = uuid5(namespace, "message:device"), so a re-send of
# the same delivery (after a crash, a lease expiry, a retry) carries the same id.
APNS_ID_NAMESPACE = uuid.UUID("6f0d3c1e-5b8a-4f2e-9c47-2d1e8a7b9c30")


def apns_id(message_id: int, device_id: int) -> str:
    """The apns-id of one delivery: a UUID derived from (message, device), lowercase canonical form.

    The message's name-based UUID (version 5) with the device id as its last 48 bits: one hash
    per message rather than one per device (the SHA-1 and the UUID object were 2 % of the
    dispatcher's CPU in an APNs fan-out). Past 2**48 devices, a hash of both.
    """
    device_id = int(device_id)
    if 0 <= device_id < 1 << 48:
        return f"{_message_uuid_prefix(int(message_id))}{device_id:012x}"
    return str(uuid.uuid5(APNS_ID_NAMESPACE, f"{int(message_id)}:{device_id}"))


@functools.lru_cache(maxsize=256)
def _message_uuid_prefix(message_id: int) -> str:
    return str(uuid.uuid5(APNS_ID_NAMESPACE, f"message:{message_id}"))[:24]


def apns_collapse_id(message_id: int) -> str:
    """apns-collapse-id (and FCM notification tag): one per message, so a duplicate replaces the first copy."""
    return f"msg-{int(message_id)}"


def thread_id(chat_id: int) -> str:
    """APNs thread-id: groups a chat's notifications on the phone."""
    return f"chat-{int(chat_id)}"


def apns_payload(push: Push, *, limit: int = MAX_PAYLOAD_BYTES, content: str = "full") -> bytes:
    """The APNs JSON body for ``push`` (compact UTF-8, at most ``limit`` bytes).

    ``{"aps": {"alert": {"title": chat, "body": "sender: text"}, "thread-id": "chat-<id>",
    "sound": "default"}, "chat_id": <id>, "message_id": <id>}``. The TTL is not part
    of the body: it travels in the ``apns-expiration`` header. With ``content="ids"`` the
    alert is generic and localizable (``title-loc-key``, ``loc-key``) with ``mutable-content``,
    and only ids travel: the app's notification service extension fetches the message.
    """
    if content == "ids":
        return _encode({
            "aps": {
                "alert": {"title-loc-key": APNS_GENERIC_TITLE_KEY, "loc-key": APNS_GENERIC_BODY_KEY},
                "mutable-content": 1,
                "thread-id": thread_id(push.chat_id),
                "sound": "default",
            },
            "chat_id": int(push.chat_id),
            "message_id": int(push.message_id),
            "sender_id": int(push.sender_id),
        })

    def build(title: str, sender: str, text: str) -> dict:
        return {
            "aps": {
                "alert": {"title": title, "body": f"{sender}: {text}"},
                "thread-id": thread_id(push.chat_id),
                "sound": "default",
            },
            "chat_id": int(push.chat_id),
            "message_id": int(push.message_id),
        }

    _, encoded = _fit(build, push, limit)
    return encoded


def fcm_message(push: Push, ttl: int, *, limit: int = MAX_PAYLOAD_BYTES, content: str = "full") -> dict:
    """Keyword arguments for pyfcm's ``parse_payload`` (and ``notify``) for ``push``.

    notification title/body, ``data`` with chat_id/message_id/sender_id as strings,
    ``android.priority`` high, ``android.ttl`` "<ttl>s", ``android.notification.tag``
    per message so a duplicate replaces the first copy. The text is cut so that the
    whole ``{"message": ...}`` request body stays within ``limit`` bytes. With
    ``content="ids"``: a data-only message (no notification: the app fetches the message
    and shows it), ``android.collapse_key`` per message instead of the notification's tag.
    """
    if ttl < 0:
        raise ValueError("ttl must not be negative")
    collapse = apns_collapse_id(push.message_id)
    data = {
        "chat_id": str(int(push.chat_id)),
        "message_id": str(int(push.message_id)),
        "sender_id": str(int(push.sender_id)),
    }
    if content == "ids":
        return {"fcm_token": push.token, "data_payload": data,
                "android_config": {"priority": "high", "ttl": f"{int(ttl)}s", "collapse_key": collapse}}
    android = {
        "priority": "high",
        "ttl": f"{int(ttl)}s",
        "notification": {"tag": collapse},
    }

    def build(title: str, sender: str, text: str) -> dict:
        return {
            "fcm_token": push.token,
            "notification_title": title,
            "notification_body": f"{sender}: {text}",
            "data_payload": data,
            "android_config": android,
        }

    def measure(kwargs: dict) -> dict:
        # the same structure pyfcm's parse_payload serialises
        return {
            "message": {
                "token": kwargs["fcm_token"],
                "data": kwargs["data_payload"],
                "android": kwargs["android_config"],
                "notification": {"title": kwargs["notification_title"],
                                 "body": kwargs["notification_body"]},
            },
            "validate_only": False,
        }

    kwargs, _ = _fit(build, push, limit, measure=measure)
    return kwargs


def webpush_payload(push: Push, *, limit: int = WEBPUSH_MAX_PLAINTEXT, content: str = "full") -> bytes:
    """The Web Push plaintext for ``push`` (compact UTF-8 JSON, at most ``limit`` bytes, so that
    once encrypted it fits the push services' 4096 bytes): ``{"title": chat, "body": "sender:
    text", "chat_id", "message_id", "sender_id"}``; with ``content="ids"`` only the ids."""
    ids = {"chat_id": int(push.chat_id), "message_id": int(push.message_id), "sender_id": int(push.sender_id)}
    if content == "ids":
        return _encode(ids)

    def build(title: str, sender: str, text: str) -> dict:
        return {"title": title, "body": f"{sender}: {text}", **ids}

    _, encoded = _fit(build, push, limit)
    return encoded


def webpush_topic(message_id: int) -> str:
    """The Topic header of a message's pushes (at most 32 base64url characters): a re-send
    replaces the first copy while it waits on the push service."""
    return f"msg-{int(message_id)}"


def encoded_size(document: dict) -> int:
    """Bytes of ``document`` as compact UTF-8 JSON (what is sent on the wire)."""
    return len(_encode(document))


# --- internals ----------------------------------------------------------------

def _encode(document: dict) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _fit(build: Callable[[str, str, str], dict], push: Push, limit: int,
         measure: Callable[[dict], dict] = lambda d: d) -> tuple[dict, bytes]:
    """build(title, sender, text) with the text (then, if ever needed, the names) cut to fit;
    returns the document and the encoding of measure(document)."""
    title = _clean(push.chat_name)
    sender = _clean(push.sender_name)
    text = _clean(push.text)

    def size(t: str, s: str, x: str) -> int:
        return encoded_size(measure(build(t, s, x)))

    document = build(title, sender, text)
    encoded = _encode(measure(document))
    if len(encoded) <= limit:
        return document, encoded
    # Cut the text. If even an empty text does not fit (absurd names), cut the
    # sender name, then the title, the same way.
    if size(title, sender, ELLIPSIS) <= limit:
        text = _cut(text, lambda x: size(title, sender, x) <= limit)
    elif size(title, ELLIPSIS, ELLIPSIS) <= limit:
        sender = _cut(sender, lambda x: size(title, x, ELLIPSIS) <= limit)
        text = ELLIPSIS
    else:
        title = _cut(title, lambda x: size(x, ELLIPSIS, ELLIPSIS) <= limit)
        sender = text = ELLIPSIS
    document = build(title, sender, text)
    encoded = _encode(measure(document))
    if len(encoded) > limit:
        raise ValueError(f"a payload cannot fit in {limit} bytes")
    return document, encoded


def _cut(value: str, fits: Callable[[str], bool]) -> str:
    """The longest ``value[:k] + "…"`` that fits, k found by bisection, then moved
    back so the cut does not separate a character from its combining marks or joiners."""
    low, high = 0, len(value)  # fits(value[:low] + …) holds; value[:high + 1] + … never fits
    while low < high:
        middle = (low + high + 1) // 2
        if fits(value[:middle] + ELLIPSIS):
            low = middle
        else:
            high = middle - 1
    cut = _grapheme_boundary(value, low)
    return value[:cut] + ELLIPSIS


_JOINERS = {"\u200d", "\u034f"}  # ZERO WIDTH JOINER, COMBINING GRAPHEME JOINER


def _extends(char: str) -> bool:
    """True for characters that belong to the character before them."""
    code = ord(char)
    return (
        unicodedata.combining(char) != 0
        or unicodedata.category(char) in ("Mn", "Me", "Mc")
        or 0xFE00 <= code <= 0xFE0F          # variation selectors
        or 0xE0100 <= code <= 0xE01EF        # variation selectors supplement
        or 0x1F3FB <= code <= 0x1F3FF        # emoji skin-tone modifiers
        or 0xE0020 <= code <= 0xE007F        # emoji tag sequences
        or char in _JOINERS
    )


_MAX_CLUSTER = 32  # longer "clusters" (zalgo text) are cut anyway: still valid UTF-8


def _grapheme_boundary(value: str, cut: int) -> int:
    """Move ``cut`` back until value[cut] starts a new character cluster and value[cut - 1]
    is not a joiner; give up (keep ``cut``) after _MAX_CLUSTER characters."""
    position = cut
    while 0 < position < len(value) and (_extends(value[position]) or value[position - 1] in _JOINERS):
        position -= 1
        if cut - position > _MAX_CLUSTER:
            return cut
    return position


def _clean(value: str) -> str:
    """Text that encodes to UTF-8: lone surrogates (possible from JSON input) become U+FFFD."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return value
