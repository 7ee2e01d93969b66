"""Web Push registration and the VAPID key route, in-process: the subscription checked as API.md says,
the endpoint above all (the server will POST to it)."""
from __future__ import annotations

import base64
import dataclasses

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from chat_app.app import create_app
from notifier import schema
from tests.webapp import ContractTestApp, assert_error, row_counts

ENDPOINT = "https://fcm.googleapis.com/fcm/send/dGVzdA:APA91bHun4MxP5egoKMwt2KZFBaFUH-1RYqx"


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def browser_keys() -> dict:
    """A browser's subscription keys: a P-256 public point and a 16-byte auth secret."""
    point = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    return {"p256dh": b64url(point), "auth": b64url(bytes(range(16)))}


def subscribe(client, user, status, endpoint=ENDPOINT, keys=None, **extra):
    subscription = {"endpoint": endpoint, "keys": keys or browser_keys(), **extra}
    return client.post_json("/v1/devices", {"platform": "webpush", "subscription": subscription},
                            headers=user.headers, status=status)


def test_a_subscription_is_registered_and_its_keys_never_echoed(app, app_engine, signup):
    ann = signup()
    keys = browser_keys()

    res = subscribe(app, ann, 201, keys=keys, expirationTime=None)
    again = subscribe(app, ann, 200, keys=keys)

    assert res.json == {"id": res.json["id"], "platform": "webpush", "token": ENDPOINT, "app": None}
    assert again.json == res.json
    assert app.get("/v1/devices", headers=ann.headers).json == {"devices": [res.json]}
    with app_engine.connect() as conn:
        row = conn.execute(sa.select(schema.devices)).one()
    assert (row.p256dh, row.auth) == (keys["p256dh"], keys["auth"])


def test_new_keys_for_the_same_endpoint_replace_the_old_ones(app, app_engine, signup):
    ann = signup()
    subscribe(app, ann, 201)
    fresh = browser_keys()

    subscribe(app, ann, 200, keys=fresh)

    with app_engine.connect() as conn:
        assert conn.execute(sa.select(schema.devices.c.p256dh)).scalar_one() == fresh["p256dh"]


@pytest.mark.parametrize("endpoint", [
    "http://fcm.googleapis.com/fcm/send/x",                    # not https
    "https://169.254.169.254/latest/meta-data/",                # the cloud metadata service
    "https://localhost/push",
    "https://127.0.0.1:8443/push",
    "https://[::1]/push",
    "https://fcm.googleapis.com@evil.example/push",             # userinfo
    "https://user:pw@fcm.googleapis.com/fcm/send/x",
    "https://fcm.googleapis.com:8443/fcm/send/x",               # another port
    "https://fcm.googleapis.com./fcm/send/x",                   # trailing dot
    "https://fcm.googleapis.com.evil.example/fcm/send/x",
    "https://push.apple.com/x",                                 # *.push.apple.com is subdomains only
    "https://fcm.g\u043eogleapis.com/fcm/send/x",               # a Cyrillic o
    "https://fcm.googleapis.com/" + "x" * 2048,                 # over 2048 characters
    "ftp://fcm.googleapis.com/x",
    "",
])
def test_an_endpoint_outside_the_allowlist_is_400_and_nothing_is_stored(app, app_engine, signup, endpoint):
    ann = signup()
    before = row_counts(app_engine)

    res = subscribe(app, ann, 400, endpoint=endpoint)

    assert_error(res, 400, "invalid_field")
    assert "subscription.endpoint" in res.json["error"]["message"]
    assert endpoint[8:40] not in res.json["error"]["message"] or not endpoint
    assert row_counts(app_engine) == before


@pytest.mark.parametrize("keys, field", [
    ({"p256dh": b64url(b"\x04" + bytes(64)), "auth": b64url(bytes(16))}, "p256dh"),    # not on the curve
    ({"p256dh": b64url(b"\x04" + bytes(30)), "auth": b64url(bytes(16))}, "p256dh"),    # too short
    ({"auth": b64url(bytes(16))}, "p256dh"),
    ({"p256dh": "not base64url!", "auth": b64url(bytes(16))}, "p256dh"),
    ({"p256dh": None, "auth": b64url(bytes(16))}, "p256dh"),
    ("p256dh-and-auth", "keys"),
])
def test_bad_keys_are_400_naming_the_field(app, signup, keys, field):
    ann = signup()
    res = app.post_json("/v1/devices", {"platform": "webpush", "subscription": {"endpoint": ENDPOINT, "keys": keys}},
                        headers=ann.headers, status=400)
    assert_error(res, 400, "invalid_field")
    assert field in res.json["error"]["message"]


@pytest.mark.parametrize("auth", [b64url(bytes(15)), b64url(bytes(17)), "", "a=b"])
def test_an_auth_secret_that_is_not_16_bytes_is_400(app, signup, auth):
    ann = signup()
    keys = {**browser_keys(), "auth": auth}
    assert_error(subscribe(app, ann, 400, keys=keys), 400, "invalid_field")


def test_a_missing_subscription_is_400(app, signup):
    ann = signup()
    res = app.post_json("/v1/devices", {"platform": "webpush", "token": ENDPOINT}, headers=ann.headers, status=400)
    assert_error(res, 400, "invalid_field")
    assert "subscription" in res.json["error"]["message"]


def test_the_vapid_key_route_is_404_without_a_key(app):
    assert_error(app.get("/v1/webpush/key", status=404), 404, "not_found")


def test_the_vapid_key_route_gives_the_public_point_and_an_allowlist_admits_its_hosts(app_settings, tmp_path, wakes):
    private = ec.generate_private_key(ec.SECP256R1())
    pem = tmp_path / "vapid.pem"
    pem.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    settings = dataclasses.replace(app_settings, vapid_private_key_file=str(pem),
                                   vapid_subject="mailto:ops@example.com",
                                   webpush_allowed_hosts="push.example.com,127.0.0.1:8443")
    client = ContractTestApp(create_app(settings, wake=lambda: wakes.append(True)))

    key = client.get("/v1/webpush/key", status=200).json["public_key"]

    expected = private.public_key().public_bytes(serialization.Encoding.X962,
                                                 serialization.PublicFormat.UncompressedPoint)
    assert base64.urlsafe_b64decode(key + "==") == expected and len(expected) == 65
    user = client.post_json("/v1/users", {"name": "ann"}, status=201).json
    headers = {"Authorization": f"Bearer {user['token']}"}
    for endpoint, status in (("https://push.example.com/p/1", 201), ("https://127.0.0.1:8443/push/2", 201),
                             ("https://127.0.0.1/push/3", 400), (ENDPOINT, 400)):
        client.post_json("/v1/devices", {"platform": "webpush",
                                         "subscription": {"endpoint": endpoint, "keys": browser_keys()}},
                         headers=headers, status=status)
