"""classify(): every documented provider answer maps to the right Outcome (one table)."""
import pytest

from notifier.classify import FCM_INVALID_TOKEN, REASON_OAUTH, classify
from notifier.model import Outcome, Platform

APNS, FCM = Platform.APNS, Platform.FCM
SENT, DEAD, REJECTED, TRANSIENT, AUTH = (
    Outcome.SENT, Outcome.DEAD_TOKEN, Outcome.REJECTED, Outcome.TRANSIENT, Outcome.AUTH)

TABLE = [
    # --- APNs: accepted
    (APNS, 200, None, SENT),
    (APNS, 200, "", SENT),
    # --- APNs: the token is dead
    (APNS, 410, "Unregistered", DEAD),
    (APNS, 410, "ExpiredToken", DEAD),
    (APNS, 410, None, DEAD),
    (APNS, 400, "BadDeviceToken", DEAD),
    (APNS, 400, "DeviceTokenNotForTopic", DEAD),
    # --- APNs: our credentials
    (APNS, 403, "InvalidProviderToken", AUTH),
    (APNS, 403, "ExpiredProviderToken", AUTH),
    (APNS, 403, "MissingProviderToken", AUTH),
    (APNS, 403, "BadCertificate", AUTH),
    (APNS, 403, "BadCertificateEnvironment", AUTH),
    (APNS, 403, "Forbidden", AUTH),
    (APNS, 403, "SomethingNew", AUTH),
    # --- APNs: transient
    (APNS, 429, "TooManyRequests", TRANSIENT),
    (APNS, 429, "TooManyProviderTokenUpdates", TRANSIENT),
    (APNS, 500, "InternalServerError", TRANSIENT),
    (APNS, 500, None, TRANSIENT),
    (APNS, 503, "ServiceUnavailable", TRANSIENT),
    (APNS, 503, "Shutdown", TRANSIENT),
    (APNS, 502, None, TRANSIENT),
    (APNS, 400, "IdleTimeout", TRANSIENT),
    (APNS, None, None, TRANSIENT),          # timeout / connection loss
    (APNS, None, "goaway", TRANSIENT),
    (APNS, None, "BadDeviceToken", TRANSIENT),  # no status: nothing was decided
    # --- APNs: this notification is rejected
    (APNS, 413, "PayloadTooLarge", REJECTED),
    (APNS, 400, "BadTopic", REJECTED),
    (APNS, 400, "TopicDisallowed", REJECTED),
    (APNS, 400, "MissingTopic", REJECTED),
    (APNS, 400, "BadExpirationDate", REJECTED),
    (APNS, 400, "BadCollapseId", REJECTED),
    (APNS, 400, "BadMessageId", REJECTED),
    (APNS, 400, "BadPriority", REJECTED),
    (APNS, 400, "DuplicateHeaders", REJECTED),
    (APNS, 400, "PayloadEmpty", REJECTED),
    (APNS, 400, "MissingDeviceToken", REJECTED),
    (APNS, 400, "InvalidPushType", REJECTED),
    (APNS, 404, "BadPath", REJECTED),
    (APNS, 405, "MethodNotAllowed", REJECTED),
    (APNS, 400, "UnknownReason", REJECTED),
    (APNS, 400, None, REJECTED),
    (APNS, 418, None, REJECTED),
    # --- FCM: accepted
    (FCM, 200, None, SENT),
    # --- FCM: the token is dead
    (FCM, 404, "UNREGISTERED", DEAD),
    (FCM, 400, FCM_INVALID_TOKEN, DEAD),
    (FCM, 403, "SENDER_ID_MISMATCH", DEAD),
    # --- FCM: our credentials
    (FCM, 401, "THIRD_PARTY_AUTH_ERROR", AUTH),
    (FCM, 401, "UNAUTHENTICATED", AUTH),
    (FCM, 403, "PERMISSION_DENIED", AUTH),
    (FCM, 401, None, AUTH),
    (FCM, 403, None, AUTH),
    (FCM, 404, "NOT_FOUND", AUTH),          # wrong project id / endpoint, not the device
    (FCM, None, REASON_OAUTH, TRANSIENT),   # no HTTP answer at all: transient...
    (FCM, 401, REASON_OAUTH, AUTH),         # ...the token endpoint refused us: credentials
    # --- FCM: transient
    (FCM, 429, "QUOTA_EXCEEDED", TRANSIENT),
    (FCM, 429, "RESOURCE_EXHAUSTED", TRANSIENT),
    (FCM, 429, None, TRANSIENT),
    (FCM, 503, "UNAVAILABLE", TRANSIENT),
    (FCM, 500, "INTERNAL", TRANSIENT),
    (FCM, 502, None, TRANSIENT),
    (FCM, 504, "DEADLINE_EXCEEDED", TRANSIENT),
    (FCM, None, None, TRANSIENT),
    (FCM, None, "timeout", TRANSIENT),
    # --- FCM: this message is rejected
    (FCM, 400, "INVALID_ARGUMENT", REJECTED),
    (FCM, 400, "UNSPECIFIED_ERROR", REJECTED),
    (FCM, 400, None, REJECTED),
    (FCM, 413, None, REJECTED),
]


@pytest.mark.parametrize("platform, status, reason, expected", TABLE,
                         ids=[f"{p.value}-{s}-{r}" for p, s, r, _ in TABLE])
def test_classify_maps_provider_answer_to_outcome(platform, status, reason, expected):
    assert classify(platform, status, reason) is expected


def test_classify_accepts_platform_values():
    assert classify("apns", 410, "Unregistered") is DEAD
    assert classify("fcm", 404, "UNREGISTERED") is DEAD


def test_classify_rejects_unknown_platform():
    with pytest.raises(ValueError):
        classify("wns", 200, None)
