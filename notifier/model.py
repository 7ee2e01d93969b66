"""The small vocabulary shared by the storage modules, the providers and the dispatcher.

A leaf module: it imports nothing from the project.
"""
from __future__ import annotations

from datetime import datetime, timezone
from enum import Enum
from typing import NamedTuple


class Platform(str, Enum):
    """A push platform; the value is what the API and the database store."""

    APNS = "apns"
    FCM = "fcm"
    WEBPUSH = "webpush"


class DeliveryState(str, Enum):
    """State of one push to one device, as stored and as shown by the API."""

    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"
    SKIPPED = "skipped"


FINAL_STATES = frozenset({DeliveryState.SENT, DeliveryState.FAILED, DeliveryState.SKIPPED})


class Outcome(str, Enum):
    """What a provider's answer means for the delivery; decided once, by notifier.classify."""

    SENT = "sent"                # accepted by the provider
    DEAD_TOKEN = "dead_token"    # the device token will never work again: fail it, disable the device
    REJECTED = "rejected"        # this notification can never be delivered (bad payload, ...): fail it
    TRANSIENT = "transient"      # try again later (5xx, 429, timeouts, connection loss)
    AUTH = "auth"                # the provider rejects OUR credentials: pause the provider, keep pending
    SKIPPED = "skipped"          # not sent on purpose (dry run)


class Push(NamedTuple):
    """One notification to one device: everything a provider needs, nothing it must look up.

    A named tuple, as Result and the outbox's records are: immutable like a frozen dataclass, and
    built in a third of the time (a frozen dataclass sets each field through object.__setattr__),
    which counts at one Push, Result and Update per delivery.
    """

    delivery_id: int
    message_id: int
    chat_id: int
    chat_name: str
    sender_id: int
    sender_name: str
    text: str
    device_id: int
    platform: Platform
    token: str
    app: str | None
    attempts: int = 0
    # a Web Push subscription's keys (RFC 8291): the browser's P-256 public key and auth secret
    p256dh: str | None = None
    auth: str | None = None


class Result(NamedTuple):
    """A provider's answer to one Push, already classified."""

    outcome: Outcome
    status: int | None = None        # HTTP status, None when no answer came (connection loss, dry run)
    reason: str | None = None        # provider reason (BadDeviceToken, UNREGISTERED, dry_run, ...)
    retry_after: float | None = None  # seconds the provider asked us to wait, if it did


def iso(epoch: float | None) -> str | None:
    """Render an epoch time as API.md's ISO 8601 UTC string with a Z suffix."""
    if epoch is None:
        return None
    text = datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")
