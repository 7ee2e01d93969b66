"""Chats: create, list, show, members (add, remove) and mute."""
import pytest
import sqlalchemy as sa

from notifier import model, schema
from tests.webapp import API_TIME, assert_error, row_counts


def members_of(user_list):
    return [{"id": user.id, "name": user.name} for user in sorted(user_list, key=lambda u: u.id)]


def muted_until(engine, chat_id, user_id):
    with engine.connect() as conn:
        return conn.execute(
            sa.select(schema.members.c.muted_until)
            .where(schema.members.c.chat_id == chat_id, schema.members.c.user_id == user_id)
        ).scalar_one()


# ---------------------------------------------------------------- create, list, show

def test_create_chat_is_201_with_the_members_and_the_creator_and_a_location(app, signup):
    ann, bob, cat = signup("ann"), signup("bob"), signup("cat")

    res = app.post_json("/v1/chats", {"name": "trip", "member_ids": [cat.id, bob.id]}, headers=ann.headers,
                        status=201)

    assert res.json == {"id": res.json["id"], "name": "trip", "members": members_of([ann, bob, cat])}
    assert res.headers["Location"] == f"/v1/chats/{res.json['id']}"


def test_a_chat_of_the_creator_alone_and_duplicate_ids_are_fine(app, signup):
    ann, bob = signup("ann"), signup("bob")

    alone = app.post_json("/v1/chats", {"name": "notes", "member_ids": []}, headers=ann.headers, status=201)
    twice = app.post_json("/v1/chats", {"name": "two", "member_ids": [bob.id, bob.id, ann.id]},
                          headers=ann.headers, status=201)

    assert alone.json["members"] == members_of([ann])
    assert twice.json["members"] == members_of([ann, bob])


def test_unknown_member_ids_are_400_invalid_field_and_create_nothing(app, app_engine, signup):
    ann, bob = signup("ann"), signup("bob")
    before = row_counts(app_engine)

    res = app.post_json("/v1/chats", {"name": "x", "member_ids": [bob.id, 999]}, headers=ann.headers,
                        expect_errors=True)

    assert_error(res, 400, "invalid_field", "member_ids")
    assert "999" in res.json["error"]["message"]
    assert row_counts(app_engine) == before


@pytest.mark.parametrize("body, field", [
    ({"member_ids": []}, "name"),
    ({"name": "", "member_ids": []}, "name"),
    ({"name": " \t ", "member_ids": []}, "name"),
    ({"name": "x" * 65, "member_ids": []}, "name"),
    ({"name": 5, "member_ids": []}, "name"),
    ({"name": ["x"], "member_ids": []}, "name"),
    ({"name": "x"}, "member_ids"),
    ({"name": "x", "member_ids": None}, "member_ids"),
    ({"name": "x", "member_ids": 2}, "member_ids"),
    ({"name": "x", "member_ids": "2"}, "member_ids"),
    ({"name": "x", "member_ids": {"2": True}}, "member_ids"),
    ({"name": "x", "member_ids": ["2"]}, "member_ids"),
    ({"name": "x", "member_ids": [True]}, "member_ids"),
    ({"name": "x", "member_ids": [2.0]}, "member_ids"),
    ({"name": "x", "member_ids": [None]}, "member_ids"),
    ({"name": "x", "member_ids": [0]}, "member_ids"),
    ({"name": "x", "member_ids": [-1]}, "member_ids"),
    ({"name": "x", "member_ids": [2**63]}, "member_ids"),
    ({"name": "x", "member_ids": [2**63]}, "member_ids"),
    ({"name": "x", "member_ids": [2**70]}, "member_ids"),
    ({"name": "x", "member_ids": list(range(1, 10_002))}, "member_ids"),
])
def test_a_bad_chat_is_400_invalid_field_naming_the_field(app, app_engine, signup, body, field):
    ann = signup()
    before = row_counts(app_engine)

    res = app.post_json("/v1/chats", body, headers=ann.headers, expect_errors=True)

    assert_error(res, 400, "invalid_field", field)
    assert row_counts(app_engine) == before


def test_list_shows_only_the_chats_of_the_caller_oldest_first(app, signup, make_chat):
    ann, bob, cat = signup("ann"), signup("bob"), signup("cat")
    first = make_chat(ann, bob, name="first")
    make_chat(bob, cat, name="not ann's")
    second = make_chat(cat, ann, name="second")

    res = app.get("/v1/chats", headers=ann.headers, status=200)

    assert res.json == {"chats": [{"id": first["id"], "name": "first"}, {"id": second["id"], "name": "second"}]}


def test_no_chats_is_an_empty_list(app, signup):
    assert app.get("/v1/chats", headers=signup().headers, status=200).json == {"chats": []}


def test_a_member_reads_the_chat(app, signup, make_chat):
    ann, bob = signup("ann"), signup("bob")
    chat = make_chat(ann, bob, name="trip")

    res = app.get(f"/v1/chats/{chat['id']}", headers=bob.headers, status=200)

    assert res.json == {"id": chat["id"], "name": "trip", "members": members_of([ann, bob])}


def test_a_non_member_cannot_read_the_chat(app, signup, make_chat):
    ann, eve = signup("ann"), signup("eve")
    chat = make_chat(ann)

    assert_error(app.get(f"/v1/chats/{chat['id']}", headers=eve.headers, expect_errors=True), 403, "forbidden")


@pytest.mark.parametrize("chat_id", ["999", "0", str(2**31 - 1), str(2**31), str(2**63 - 1), str(2**63), str(2**70),
                                     "1" * 5000])
def test_an_unknown_chat_is_404(app, signup, make_chat, chat_id):
    ann = signup()
    make_chat(ann)

    assert_error(app.get(f"/v1/chats/{chat_id}", headers=ann.headers, expect_errors=True), 404, "not_found")


# ---------------------------------------------------------------- members

def test_adding_a_member_is_201_with_the_chat_then_200_when_already_one(app, signup, make_chat):
    ann, bob = signup("ann"), signup("bob")
    chat = make_chat(ann)

    added = app.post_json(f"/v1/chats/{chat['id']}/members", {"user_id": bob.id}, headers=ann.headers, status=201)
    again = app.post_json(f"/v1/chats/{chat['id']}/members", {"user_id": bob.id}, headers=ann.headers, status=200)

    expected = {"id": chat["id"], "name": chat["name"], "members": members_of([ann, bob])}
    assert added.json == expected
    assert again.json == expected
    assert app.get(f"/v1/chats/{chat['id']}", headers=bob.headers, status=200).json == expected


def test_any_member_may_add_members(app, signup, make_chat):
    ann, bob, cat = signup("ann"), signup("bob"), signup("cat")
    chat = make_chat(ann, bob)

    res = app.post_json(f"/v1/chats/{chat['id']}/members", {"user_id": cat.id}, headers=bob.headers, status=201)

    assert res.json["members"] == members_of([ann, bob, cat])


def test_a_non_member_cannot_add_members(app, app_engine, signup, make_chat):
    ann, eve = signup("ann"), signup("eve")
    chat = make_chat(ann)
    before = row_counts(app_engine)

    res = app.post_json(f"/v1/chats/{chat['id']}/members", {"user_id": eve.id}, headers=eve.headers,
                        expect_errors=True)

    assert_error(res, 403, "forbidden")
    assert row_counts(app_engine) == before


def test_adding_an_unknown_user_is_404(app, app_engine, signup, make_chat):
    ann = signup()
    chat = make_chat(ann)
    before = row_counts(app_engine)

    res = app.post_json(f"/v1/chats/{chat['id']}/members", {"user_id": 999}, headers=ann.headers,
                        expect_errors=True)

    assert_error(res, 404, "not_found")
    assert row_counts(app_engine) == before


@pytest.mark.parametrize("body", [
    {}, {"user_id": None}, {"user_id": "2"}, {"user_id": True}, {"user_id": 2.0}, {"user_id": 2.5},
    {"user_id": 0}, {"user_id": -2}, {"user_id": 2**63}, {"user_id": 2**70}, {"user_id": [2]},
])
def test_a_bad_user_id_is_400_invalid_field(app, app_engine, signup, make_chat, body):
    ann = signup()
    signup("bob")
    chat = make_chat(ann)
    before = row_counts(app_engine)

    res = app.post_json(f"/v1/chats/{chat['id']}/members", body, headers=ann.headers, expect_errors=True)

    assert_error(res, 400, "invalid_field", "user_id")
    assert row_counts(app_engine) == before


def test_a_member_removes_itself_and_loses_access(app, signup, make_chat):
    ann, bob = signup("ann"), signup("bob")
    chat = make_chat(ann, bob)

    res = app.delete(f"/v1/chats/{chat['id']}/members/{bob.id}", headers=bob.headers, status=204)

    assert res.body == b""
    assert_error(app.get(f"/v1/chats/{chat['id']}", headers=bob.headers, expect_errors=True), 403, "forbidden")
    assert app.get(f"/v1/chats/{chat['id']}", headers=ann.headers).json["members"] == members_of([ann])


def test_the_creator_removes_anyone(app, signup, make_chat):
    ann, bob, cat = signup("ann"), signup("bob"), signup("cat")
    chat = make_chat(ann, bob, cat)

    app.delete(f"/v1/chats/{chat['id']}/members/{bob.id}", headers=ann.headers, status=204)

    assert app.get(f"/v1/chats/{chat['id']}", headers=cat.headers).json["members"] == members_of([ann, cat])


def test_only_the_creator_removes_others(app, app_engine, signup, make_chat):
    ann, bob, cat = signup("ann"), signup("bob"), signup("cat")
    chat = make_chat(ann, bob, cat)
    before = row_counts(app_engine)

    for target in (ann, cat):
        res = app.delete(f"/v1/chats/{chat['id']}/members/{target.id}", headers=bob.headers, expect_errors=True)
        assert_error(res, 403, "forbidden")
    assert row_counts(app_engine) == before


def test_a_non_member_cannot_remove_anyone(app, signup, make_chat):
    ann, eve = signup("ann"), signup("eve")
    chat = make_chat(ann)

    for target in (ann, eve):
        res = app.delete(f"/v1/chats/{chat['id']}/members/{target.id}", headers=eve.headers, expect_errors=True)
        assert_error(res, 403, "forbidden")


@pytest.mark.parametrize("user_id", ["999", "0", str(2**70)])
def test_removing_someone_who_is_not_a_member_is_404(app, signup, make_chat, user_id):
    ann = signup()
    chat = make_chat(ann)

    res = app.delete(f"/v1/chats/{chat['id']}/members/{user_id}", headers=ann.headers, expect_errors=True)

    assert_error(res, 404, "not_found")


def test_removing_from_an_unknown_chat_is_404(app, signup):
    ann = signup()

    assert_error(app.delete(f"/v1/chats/999/members/{ann.id}", headers=ann.headers, expect_errors=True),
                 404, "not_found")


# ---------------------------------------------------------------- mute

@pytest.mark.parametrize("until, echoed", [
    ("2031-05-06T07:08:09Z", "2031-05-06T07:08:09.000Z"),
    ("2031-05-06T07:08:09.123Z", "2031-05-06T07:08:09.123Z"),
    ("2031-05-06T07:08:09.123456Z", "2031-05-06T07:08:09.123Z"),
    ("2031-05-06T09:08:09+02:00", "2031-05-06T07:08:09.000Z"),
    ("2031-05-05T22:38:09-08:30", "2031-05-06T07:08:09.000Z"),
])
def test_mute_until_a_time_echoes_it_in_utc_with_milliseconds(app, app_engine, signup, make_chat, until, echoed):
    ann = signup()
    chat = make_chat(ann)

    res = app.put_json(f"/v1/chats/{chat['id']}/mute", {"until": until}, headers=ann.headers, status=200)

    assert res.json == {"chat_id": chat["id"], "muted_until": echoed}
    assert API_TIME.match(res.json["muted_until"])
    assert model.iso(muted_until(app_engine, chat["id"], ann.id)) == echoed


def test_mute_null_unmutes(app, app_engine, signup, make_chat):
    ann = signup()
    chat = make_chat(ann)
    app.put_json(f"/v1/chats/{chat['id']}/mute", {"until": "2031-01-01T00:00:00Z"}, headers=ann.headers)

    res = app.put_json(f"/v1/chats/{chat['id']}/mute", {"until": None}, headers=ann.headers, status=200)

    assert res.json == {"chat_id": chat["id"], "muted_until": None}
    assert muted_until(app_engine, chat["id"], ann.id) is None


def test_mute_is_per_member(app, app_engine, signup, make_chat):
    ann, bob = signup("ann"), signup("bob")
    chat = make_chat(ann, bob)

    app.put_json(f"/v1/chats/{chat['id']}/mute", {"until": "2031-01-01T00:00:00Z"}, headers=bob.headers,
                 status=200)

    assert muted_until(app_engine, chat["id"], ann.id) is None
    assert muted_until(app_engine, chat["id"], bob.id) is not None


@pytest.mark.parametrize("body", [
    {},
    {"until": "2031-05-06T07:08:09"},
    {"until": "2031-05-06"},
    {"until": "tomorrow"},
    {"until": ""},
    {"until": "2031-13-01T00:00:00Z"},
    {"until": "2031-05-06T07:08:60Z"},
    {"until": 1999999999},
    {"until": True},
    {"until": ["2031-05-06T07:08:09Z"]},
    {"until": "2031-05-06T07:08:09Z" + " " * 60},
    {"until": "9999-12-31T23:59:59-14:00"},
    {"until": "0001-01-01T00:00:00+14:00"},
], ids=["missing", "naive", "date-only", "garbage", "empty", "month-13", "second-60", "epoch-number", "bool",
        "list", "too-long", "after-year-9999", "before-year-1"])
def test_a_bad_until_is_400_invalid_field_and_changes_nothing(app, app_engine, signup, make_chat, body):
    ann = signup()
    chat = make_chat(ann)
    app.put_json(f"/v1/chats/{chat['id']}/mute", {"until": "2031-01-01T00:00:00Z"}, headers=ann.headers)
    before = muted_until(app_engine, chat["id"], ann.id)

    res = app.put_json(f"/v1/chats/{chat['id']}/mute", body, headers=ann.headers, expect_errors=True)

    assert_error(res, 400, "invalid_field", "until")
    assert muted_until(app_engine, chat["id"], ann.id) == before


def test_a_non_member_cannot_mute(app, signup, make_chat):
    ann, eve = signup("ann"), signup("eve")
    chat = make_chat(ann)

    res = app.put_json(f"/v1/chats/{chat['id']}/mute", {"until": None}, headers=eve.headers, expect_errors=True)

    assert_error(res, 403, "forbidden")


def test_muting_an_unknown_chat_is_404(app, signup):
    res = app.put_json("/v1/chats/999/mute", {"until": None}, headers=signup().headers, expect_errors=True)

    assert_error(res, 404, "not_found")
