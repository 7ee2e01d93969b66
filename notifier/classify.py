"""What a provider's answer means for a delivery, decided once, from data tables.

``classify(platform, status, reason) -> Outcome`` is a pure function: the
providers call it with the HTTP status (``None`` when no answer came: timeout,
connection loss, GOAWAY) and the provider's reason string, and everything
downstream acts on the returned :class:`~notifier.model.Outcome`, never on raw
status codes.

The rules are data, as in Sygnal's pushkins: an exact table of the reasons each
provider documents, then a fallback by HTTP status for anything not listed.

Sources:
- Apple, "Handling notification responses from APNs" (status codes and the
  ``reason`` strings of the JSON body; a 403 is always about the certificate or
  the provider token; "don't retry BadDeviceToken, DeviceTokenNotForTopic,
  ExpiredToken, Unregistered, PayloadTooLarge; retry TooManyRequests with a
  delay"; 5xx may be retried with back-off).
- Google, FCM HTTP v1 ``ErrorCode`` reference: UNREGISTERED (404), INVALID_ARGUMENT
  (400), SENDER_ID_MISMATCH (403: the token belongs to another sender, so it can
  never work with our credentials), QUOTA_EXCEEDED (429), UNAVAILABLE (503),
  INTERNAL (500), THIRD_PARTY_AUTH_ERROR (401: the APNs certificate or web push
  key configured in Firebase is invalid).

- RFC 8030 and the browsers' push services for Web Push: no shared reason strings, the status
  decides (201 accepted, 404/410 the subscription is gone, 413 too large, 429 and 5xx retried,
  401/403 our VAPID credentials).

FCM's INVALID_ARGUMENT covers both a bad registration token and a bad message.
The FCM provider looks at Google's error message and passes the reason
``"INVALID_ARGUMENT:token"`` when the token is what Google rejected, so this
function stays pure and table-driven.
"""
from __future__ import annotations

from notifier.model import Outcome, Platform

SENT = Outcome.SENT
DEAD_TOKEN = Outcome.DEAD_TOKEN
REJECTED = Outcome.REJECTED
TRANSIENT = Outcome.TRANSIENT
AUTH = Outcome.AUTH

# Reasons the providers produce themselves (no provider answer behind them).
REASON_TIMEOUT = "timeout"                    # no answer within the request timeout
REASON_CONNECTION = "connection_error"        # could not connect, or the connection was lost
REASON_GOAWAY = "goaway"                      # the server closed the connection before answering
REASON_STREAM_RESET = "stream_reset"          # the server reset the HTTP/2 stream
REASON_OAUTH = "OAUTH_REFRESH_FAILED"         # Google's token endpoint refused our service account
FCM_INVALID_TOKEN = "INVALID_ARGUMENT:token"  # INVALID_ARGUMENT about the registration token

# --- APNs -------------------------------------------------------------------
# (status, reason) -> outcome, for every reason Apple documents.
APNS_REASONS: dict[tuple[int, str], Outcome] = {
    # the token will never work again
    (400, "BadDeviceToken"): DEAD_TOKEN,
    (400, "DeviceTokenNotForTopic"): DEAD_TOKEN,
    (410, "Unregistered"): DEAD_TOKEN,
    (410, "ExpiredToken"): DEAD_TOKEN,
    # Apple rejects OUR credentials: not the device's fault
    (403, "InvalidProviderToken"): AUTH,
    (403, "ExpiredProviderToken"): AUTH,
    (403, "MissingProviderToken"): AUTH,
    (403, "BadCertificate"): AUTH,
    (403, "BadCertificateEnvironment"): AUTH,
    (403, "Forbidden"): AUTH,
    # try again later
    (429, "TooManyRequests"): TRANSIENT,
    (429, "TooManyProviderTokenUpdates"): TRANSIENT,
    (500, "InternalServerError"): TRANSIENT,
    (503, "ServiceUnavailable"): TRANSIENT,
    (503, "Shutdown"): TRANSIENT,
    (400, "IdleTimeout"): TRANSIENT,
    # this notification can never be delivered as built
    (400, "BadCollapseId"): REJECTED,
    (400, "BadExpirationDate"): REJECTED,
    (400, "BadMessageId"): REJECTED,
    (400, "BadPriority"): REJECTED,
    (400, "BadTopic"): REJECTED,
    (400, "DuplicateHeaders"): REJECTED,
    (400, "InvalidPushType"): REJECTED,
    (400, "MissingDeviceToken"): REJECTED,
    (400, "MissingTopic"): REJECTED,
    (400, "PayloadEmpty"): REJECTED,
    (400, "TopicDisallowed"): REJECTED,
    (404, "BadPath"): REJECTED,
    (405, "MethodNotAllowed"): REJECTED,
    (413, "PayloadTooLarge"): REJECTED,
}

# status -> outcome, for reasons not in the table above.
APNS_STATUSES: dict[int, Outcome] = {
    200: SENT,
    403: AUTH,         # "an error with the certificate or with the provider's authentication token"
    410: DEAD_TOKEN,   # "the device token is no longer active for the topic"
    429: TRANSIENT,
}

# --- FCM --------------------------------------------------------------------
# reason (FcmError errorCode, else the google.rpc status) -> outcome.
FCM_REASONS: dict[str, Outcome] = {
    # the token will never work again (for us)
    "UNREGISTERED": DEAD_TOKEN,
    FCM_INVALID_TOKEN: DEAD_TOKEN,
    "SENDER_ID_MISMATCH": DEAD_TOKEN,
    # Google rejects OUR credentials (or the APNs/web push credentials stored in Firebase)
    "THIRD_PARTY_AUTH_ERROR": AUTH,
    "UNAUTHENTICATED": AUTH,
    "PERMISSION_DENIED": AUTH,
    REASON_OAUTH: AUTH,
    # a 404 without UNREGISTERED is a wrong project id or endpoint: our configuration
    "NOT_FOUND": AUTH,
    # try again later
    "QUOTA_EXCEEDED": TRANSIENT,
    "RESOURCE_EXHAUSTED": TRANSIENT,
    "UNAVAILABLE": TRANSIENT,
    "INTERNAL": TRANSIENT,
    "DEADLINE_EXCEEDED": TRANSIENT,
    # this message can never be delivered as built
    "INVALID_ARGUMENT": REJECTED,
    "FAILED_PRECONDITION": REJECTED,
}

FCM_STATUSES: dict[int, Outcome] = {
    200: SENT,
    401: AUTH,
    403: AUTH,
    404: AUTH,
    429: TRANSIENT,
}

# --- Web Push (RFC 8030 and the push services' documentation) ----------------
# The services give no machine-readable reason everyone shares: the status decides.
WEBPUSH_STATUSES: dict[int, Outcome] = {
    200: SENT,
    201: SENT,          # RFC 8030 5: "201 (Created)" when the push service accepted the message
    202: SENT,          # accepted, with a receipt requested
    404: DEAD_TOKEN,    # the subscription is gone (expired, unsubscribed)
    410: DEAD_TOKEN,
    401: AUTH,          # our VAPID JWT or key was refused
    403: AUTH,
    413: REJECTED,      # the payload is too large: it will never fit
    429: TRANSIENT,
}

_REASONS = {Platform.APNS: APNS_REASONS, Platform.FCM: FCM_REASONS}
_STATUSES = {Platform.APNS: APNS_STATUSES, Platform.FCM: FCM_STATUSES, Platform.WEBPUSH: WEBPUSH_STATUSES}


def classify(platform: Platform, status: int | None, reason: str | None) -> Outcome:
    """Map a provider's answer to an Outcome.

    ``status`` is the HTTP status, ``None`` when no answer came (timeout,
    connection loss, GOAWAY): always TRANSIENT. A 200 is SENT whatever the
    reason. Otherwise the documented reason decides; an unknown reason falls
    back on the status: 403/401 AUTH, 410 (APNs) DEAD_TOKEN, 429 and 5xx
    TRANSIENT, other 4xx REJECTED, anything else TRANSIENT.
    """
    platform = Platform(platform)
    if status is None:
        return TRANSIENT
    if status == 200:
        return SENT
    if reason and platform in _REASONS:
        if platform is Platform.APNS:
            outcome = APNS_REASONS.get((status, reason))
        else:
            outcome = FCM_REASONS.get(reason)
        if outcome is not None:
            return outcome
    outcome = _STATUSES[platform].get(status)
    if outcome is not None:
        return outcome
    if 400 <= status < 500:
        return REJECTED
    return TRANSIENT
