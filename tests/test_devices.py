"""POST/GET /v1/devices and DELETE /v1/devices/{id}: the caller's push devices."""
import pytest
import sqlalchemy as sa

from notifier import schema
from tests.conftest import APNS_TOPIC
from tests.webapp import assert_error, row_counts

APNS_TOKEN = "a1b2c3d4" * 8
FCM_TOKEN = "fcm:APA91b-token_with.all/sorts~of!printable?ASCII"


def register(client, user, status, **body):
    return client.post_json("/v1/devices", body, headers=user.headers, status=status)


def device_rows(engine):
    with engine.connect() as conn:
        return conn.execute(sa.select(schema.devices).order_by(schema.devices.c.id)).all()


def test_apns_device_is_201_with_the_configured_topic_as_app(app, signup):
    ann = signup()

    res = register(app, ann, 201, platform="apns", token=APNS_TOKEN)

    assert res.json == {"id": res.json["id"], "platform": "apns", "token": APNS_TOKEN, "app": APNS_TOPIC}
    assert app.get("/v1/devices", headers=ann.headers).json == {"devices": [res.json]}


def test_apns_token_is_case_insensitive_and_stored_lower_case(app, app_engine, signup):
    ann = signup()

    first = register(app, ann, 201, platform="apns", token=APNS_TOKEN.upper()).json
    again = register(app, ann, 200, platform="apns", token=APNS_TOKEN).json

    assert first["token"] == APNS_TOKEN
    assert again == first
    assert [row.token for row in device_rows(app_engine)] == [APNS_TOKEN]


def test_apns_app_can_be_given(app, signup):
    res = register(app, signup(), 201, platform="apns", token=APNS_TOKEN, app="com.other.app")

    assert res.json["app"] == "com.other.app"


def test_fcm_device_keeps_its_token_and_has_no_default_app(app, signup):
    res = register(app, signup(), 201, platform="fcm", token=FCM_TOKEN)

    assert res.json == {"id": res.json["id"], "platform": "fcm", "token": FCM_TOKEN, "app": None}


@pytest.mark.parametrize("token", ["x", "~" * 4096, "!" + "A" * 4094 + "~"])
def test_fcm_tokens_of_1_to_4096_printable_characters_are_accepted(app, signup, token):
    assert register(app, signup(), 201, platform="fcm", token=token).json["token"] == token


def test_same_user_same_token_is_200_with_the_same_body_and_no_new_row(app, app_engine, signup):
    ann = signup()
    first = register(app, ann, 201, platform="fcm", token=FCM_TOKEN, app="com.example").json

    again = register(app, ann, 200, platform="fcm", token=FCM_TOKEN, app="com.example")

    assert again.json == first
    assert len(device_rows(app_engine)) == 1


def test_a_token_registered_by_another_user_moves_to_the_caller(app, signup):
    ann, bob = signup("ann"), signup("bob")
    anns = register(app, ann, 201, platform="apns", token=APNS_TOKEN).json

    bobs = register(app, bob, 201, platform="apns", token=APNS_TOKEN).json

    assert bobs == anns  # the same device row, now bob's
    assert app.get("/v1/devices", headers=ann.headers).json == {"devices": []}
    assert app.get("/v1/devices", headers=bob.headers).json == {"devices": [bobs]}


def test_same_user_same_token_other_platform_is_409_conflict(app, app_engine, signup):
    ann = signup()
    register(app, ann, 201, platform="fcm", token=APNS_TOKEN)
    before = row_counts(app_engine), device_rows(app_engine)

    res = app.post_json("/v1/devices", {"platform": "apns", "token": APNS_TOKEN}, headers=ann.headers,
                        expect_errors=True)

    assert_error(res, 409, "conflict")
    assert (row_counts(app_engine), device_rows(app_engine)) == before


def test_list_shows_only_the_callers_enabled_devices_oldest_first(app, signup):
    ann, bob = signup("ann"), signup("bob")
    one = register(app, ann, 201, platform="apns", token=APNS_TOKEN).json
    two = register(app, ann, 201, platform="fcm", token=FCM_TOKEN).json
    gone = register(app, ann, 201, platform="fcm", token="deleted-token").json
    register(app, bob, 201, platform="fcm", token="bobs-token")
    app.delete(f"/v1/devices/{gone['id']}", headers=ann.headers, status=204)

    assert app.get("/v1/devices", headers=ann.headers, status=200).json == {"devices": [one, two]}


def test_no_devices_is_an_empty_list(app, signup):
    assert app.get("/v1/devices", headers=signup().headers, status=200).json == {"devices": []}


def test_owner_deletes_a_device_with_204_and_it_is_disabled(app, app_engine, signup):
    ann = signup()
    device = register(app, ann, 201, platform="fcm", token=FCM_TOKEN).json

    res = app.delete(f"/v1/devices/{device['id']}", headers=ann.headers, status=204)

    assert res.body == b""
    row, = device_rows(app_engine)
    assert (row.enabled, row.disabled_reason) == (False, "deleted")
    assert app.get("/v1/devices", headers=ann.headers).json == {"devices": []}


def test_deleting_a_deleted_device_again_is_404(app, signup):
    ann = signup()
    device = register(app, ann, 201, platform="fcm", token=FCM_TOKEN).json
    app.delete(f"/v1/devices/{device['id']}", headers=ann.headers, status=204)

    res = app.delete(f"/v1/devices/{device['id']}", headers=ann.headers, expect_errors=True)

    assert_error(res, 404, "not_found")


def test_a_deleted_token_registered_again_is_enabled_again(app, signup):
    ann = signup()
    device = register(app, ann, 201, platform="fcm", token=FCM_TOKEN).json
    app.delete(f"/v1/devices/{device['id']}", headers=ann.headers, status=204)

    again = register(app, ann, 201, platform="fcm", token=FCM_TOKEN).json

    assert again["id"] == device["id"]
    assert app.get("/v1/devices", headers=ann.headers).json == {"devices": [again]}


def test_only_the_owner_deletes_a_device(app, app_engine, signup):
    ann, bob = signup("ann"), signup("bob")
    device = register(app, ann, 201, platform="fcm", token=FCM_TOKEN).json
    before = device_rows(app_engine)

    res = app.delete(f"/v1/devices/{device['id']}", headers=bob.headers, expect_errors=True)

    assert_error(res, 403, "forbidden")
    assert device_rows(app_engine) == before
    assert app.get("/v1/devices", headers=ann.headers).json == {"devices": [device]}


@pytest.mark.parametrize("device_id", ["999", "0", str(2**63), str(2**70), "9" * 5000])
def test_deleting_an_unknown_device_is_404(app, signup, device_id):
    res = app.delete(f"/v1/devices/{device_id}", headers=signup().headers, expect_errors=True)

    assert_error(res, 404, "not_found")


@pytest.mark.parametrize("body, field", [
    ({"token": APNS_TOKEN}, "platform"),
    ({"platform": None, "token": APNS_TOKEN}, "platform"),
    ({"platform": "APNS", "token": APNS_TOKEN}, "platform"),
    ({"platform": "gcm", "token": FCM_TOKEN}, "platform"),
    ({"platform": 1, "token": FCM_TOKEN}, "platform"),
    ({"platform": ["fcm"], "token": FCM_TOKEN}, "platform"),
    ({"platform": "apns"}, "token"),
    ({"platform": "apns", "token": None}, "token"),
    ({"platform": "apns", "token": ""}, "token"),
    ({"platform": "apns", "token": 12345}, "token"),
    ({"platform": "apns", "token": [APNS_TOKEN]}, "token"),
    ({"platform": "apns", "token": APNS_TOKEN[:63]}, "token"),
    ({"platform": "apns", "token": APNS_TOKEN + "a"}, "token"),
    ({"platform": "apns", "token": "g" * 64}, "token"),
    ({"platform": "apns", "token": APNS_TOKEN[:62] + " a"}, "token"),
    ({"platform": "apns", "token": APNS_TOKEN + "\n"}, "token"),
    ({"platform": "fcm"}, "token"),
    ({"platform": "fcm", "token": ""}, "token"),
    ({"platform": "fcm", "token": "has space"}, "token"),
    ({"platform": "fcm", "token": "tab\there"}, "token"),
    ({"platform": "fcm", "token": "newline\n"}, "token"),
    ({"platform": "fcm", "token": "del\x7f"}, "token"),
    ({"platform": "fcm", "token": "nul\x00"}, "token"),
    ({"platform": "fcm", "token": "caf\u00e9"}, "token"),
    ({"platform": "fcm", "token": "x" * 4097}, "token"),
    ({"platform": "fcm", "token": True}, "token"),
    ({"platform": "fcm", "token": FCM_TOKEN, "app": ""}, "app"),
    ({"platform": "fcm", "token": FCM_TOKEN, "app": "   "}, "app"),
    ({"platform": "fcm", "token": FCM_TOKEN, "app": "x" * 256}, "app"),
    ({"platform": "fcm", "token": FCM_TOKEN, "app": 3}, "app"),
    ({"platform": "apns", "token": APNS_TOKEN, "app": ["com.example"]}, "app"),
])
def test_a_bad_device_is_400_invalid_field_naming_the_field(app, app_engine, signup, body, field):
    ann = signup()
    before = row_counts(app_engine)

    res = app.post_json("/v1/devices", body, headers=ann.headers, expect_errors=True)

    assert_error(res, 400, "invalid_field", field)
    assert row_counts(app_engine) == before
