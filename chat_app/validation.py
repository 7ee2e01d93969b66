"""Reading request bodies and checking fields; every failure is an ApiError with API.md's code."""
from __future__ import annotations

import base64
import binascii
import json
import re
from datetime import datetime, timezone

from cryptography.hazmat.primitives.asymmetric import ec

from chat_app.errors import ApiError, invalid_field
import notifier

# The largest id both databases can hold (64-bit); binding a bigger value would fail ("integer out of
# range") instead of finding nothing. Bigger ones cannot exist.
MAX_ID = 2**63 - 1
MAX_INITIAL_MEMBERS = 10_000  # member_ids of one POST /v1/chats
APNS_TOKEN = re.compile(r"[0-9a-fA-F]{64}")
PRINTABLE_ASCII = re.compile(r"[\x21-\x7e]+")
ASCII_DIGITS = re.compile(r"[0-9]+")
# times that round-trip through epoch seconds and back to an ISO string (datetime stops at year 9999)
EARLIEST_TIME = datetime(1, 1, 1, tzinfo=timezone.utc)
LATEST_TIME = datetime(9999, 12, 31, tzinfo=timezone.utc)


def read_json_object(request, max_bytes: int) -> dict:
    """The request body as a JSON object, or the API's 413 / 415 / 400 error."""
    try:
        length = request.content_length
    except ValueError:  # a Content-Length header that is not a number
        raise ApiError(400, "invalid_json", "the body cannot be read: bad Content-Length") from None
    if length > max_bytes:
        raise ApiError(413, "too_large", f"request body over the limit of {max_bytes} bytes")
    media_type = (request.content_type or "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(415, "unsupported_media_type", "the body must be application/json")
    raw = request.body.read(max_bytes + 1)
    if len(raw) > max_bytes:  # chunked bodies carry no Content-Length
        raise ApiError(413, "too_large", f"request body over the limit of {max_bytes} bytes")
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
    if not isinstance(value, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    return value


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def text(body: dict, field: str, max_chars: int, required: bool = True) -> str | None:
    """A string field of 1..max_chars characters that is not blank, or None when optional and absent."""
    if field not in body or body[field] is None:
        if required:
            raise invalid_field(field, "is required")
        return None
    value = body[field]
    if not isinstance(value, str):
        raise invalid_field(field, "must be a string")
    if not value.strip():
        raise invalid_field(field, "must not be empty")
    if len(value) > max_chars:
        raise invalid_field(field, f"must be at most {max_chars} characters")
    check_storable(field, value)
    return value


def check_storable(field: str, value: str) -> None:
    """Reject what no database can store: NUL characters and lone surrogates (invalid UTF-8)."""
    if "\x00" in value:
        raise invalid_field(field, "must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise invalid_field(field, "must be valid Unicode text") from None


def integer_id(body: dict, field: str) -> int:
    """A required id field: a positive JSON integer (not a bool, not a float)."""
    if field not in body:
        raise invalid_field(field, "is required")
    return id_value(field, body[field])


def id_value(field: str, value) -> int:
    """Check one id value."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid_field(field, "must be an integer id")
    if not 1 <= value <= MAX_ID:
        raise invalid_field(field, "is out of range")
    return value


def id_list(body: dict, field: str, max_items: int) -> list[int]:
    """A required list of ids, at most max_items long."""
    if field not in body:
        raise invalid_field(field, "is required")
    value = body[field]
    if not isinstance(value, list):
        raise invalid_field(field, "must be a list of integer ids")
    if len(value) > max_items:
        raise invalid_field(field, f"must have at most {max_items} items")
    return [id_value(field, item) for item in value]


def digits_value(raw: str) -> int | None:
    """The number a string of ASCII digits spells, anything above MAX_ID as MAX_ID + 1; None if not digits.

    Not str.isdigit() + int(): isdigit() accepts '²', which int() refuses, and int() refuses
    more than 4300 digits; both would be a 500.
    """
    if not ASCII_DIGITS.fullmatch(raw):
        return None
    digits = raw.lstrip("0") or "0"
    return int(digits) if len(digits) <= len(str(MAX_ID)) else MAX_ID + 1


def path_id(value: str) -> int | None:
    """An id from the path, or None when it cannot name a row (so the route answers 404)."""
    number = digits_value(value)
    return number if number is not None and 1 <= number <= MAX_ID else None


def query_id(query, name: str) -> int | None:
    """An optional id query parameter (`before`, `after`)."""
    raw = query.get(name)
    if raw is None:
        return None
    number = digits_value(raw)
    if number is None:
        raise invalid_field(name, "must be a positive integer id")
    if number > MAX_ID:
        raise invalid_field(name, "is out of range")
    return number


def query_limit(query, default: int, maximum: int) -> int:
    """The `limit` query parameter, 1..maximum."""
    raw = query.get("limit")
    if raw is None:
        return default
    number = digits_value(raw)
    if number is None or not 1 <= number <= maximum:
        raise invalid_field("limit", f"must be an integer from 1 to {maximum}")
    return number


def timestamp_or_null(body: dict, field: str) -> float | None:
    """A required field holding an ISO 8601 time with a zone (e.g. ...Z), or null; as epoch seconds."""
    if field not in body:
        raise invalid_field(field, "is required (a time, or null)")
    value = body[field]
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 64:
        raise invalid_field(field, "must be an ISO 8601 time or null")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise invalid_field(field, "must be an ISO 8601 time such as 2026-11-23T02:09:23Z") from None
    if parsed.tzinfo is None:
        raise invalid_field(field, "must carry a time zone (use the Z suffix for UTC)")
    if not EARLIEST_TIME <= parsed < LATEST_TIME:
        raise invalid_field(field, "must be a time from 0001-01-01 to 9999-12-30")
    return parsed.timestamp()


def device_token(platform: str, token) -> str:
    """A push token checked for its platform; APNs tokens come back lower-case."""
    if not isinstance(token, str) or not token:
        raise invalid_field("token", "is required and must be a string")
    if platform == "apns":
        if not APNS_TOKEN.fullmatch(token):
            raise invalid_field("token", "an APNs token is 64 hexadecimal characters")
        return token.lower()
    if len(token) > 4096 or not PRINTABLE_ASCII.fullmatch(token):
        raise invalid_field("token", "an FCM token is 1 to 4096 printable ASCII characters")
    return token


BASE64URL = re.compile(r"[A-Za-z0-9_-]+")


def webpush_subscription(body: dict, allowed) -> tuple[str, str, str]:
    """A browser's PushSubscription (`subscription`: endpoint and keys) checked: the endpoint against
    WEBPUSH_ALLOWED_HOSTS (`allowed`: the server POSTs to it, so it must never be an address of the
    caller's choosing), p256dh a P-256 point, auth 16 bytes. Returns (endpoint, p256dh, auth)."""
    subscription = body.get("subscription")
    if not isinstance(subscription, dict):
        raise invalid_field("subscription", "is required: the browser's PushSubscription (endpoint and keys)")
    endpoint = subscription.get("endpoint")
    if not isinstance(endpoint, str):
        raise invalid_field("subscription.endpoint", "is required and must be a string")
    try:
        endpoint = notifier.check_endpoint(endpoint, allowed)
    except ValueError as exc:
        raise invalid_field("subscription.endpoint", f"is not an allowed push service endpoint: {exc}") from None
    keys = subscription.get("keys")
    if not isinstance(keys, dict):
        raise invalid_field("subscription.keys", "is required: an object with p256dh and auth")
    p256dh = _base64url(keys.get("p256dh"), "subscription.keys.p256dh", 65)
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), p256dh[1])
    except ValueError:
        raise invalid_field("subscription.keys.p256dh", "is not a point on the P-256 curve") from None
    auth = _base64url(keys.get("auth"), "subscription.keys.auth", 16)
    return endpoint, p256dh[0], auth[0]


def _base64url(value, field: str, size: int) -> tuple[str, bytes]:
    """A base64url string (no padding) of exactly `size` bytes: (the text, the bytes)."""
    if not isinstance(value, str) or not BASE64URL.fullmatch(value):
        raise invalid_field(field, "must be base64url without padding")
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise invalid_field(field, "must be base64url without padding") from None
    if len(raw) != size:
        raise invalid_field(field, f"must encode {size} bytes")
    return value, raw
