"""POST /v1/users (sign-up) and GET /v1/me."""
import hashlib

import pytest
import sqlalchemy as sa

from notifier import schema
from tests.webapp import assert_error, row_counts


def test_signup_returns_201_with_id_name_and_a_token(app):
    res = app.post_json("/v1/users", {"name": "ann"}, status=201)

    assert res.content_type == "application/json"
    assert set(res.json) == {"id", "name", "token"}
    assert isinstance(res.json["id"], int) and res.json["id"] >= 1
    assert res.json["name"] == "ann"
    assert isinstance(res.json["token"], str) and len(res.json["token"]) >= 32


def test_only_the_hash_of_the_token_is_stored(app, app_engine):
    token = app.post_json("/v1/users", {"name": "ann"}, status=201).json["token"]

    with app_engine.connect() as conn:
        row = conn.execute(sa.select(schema.users)).one()
    assert row.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert token not in [str(value) for value in row]


def test_each_signup_is_a_new_user_with_its_own_token(signup):
    first, second = signup("ann"), signup("ann")

    assert first.id != second.id
    assert first.token != second.token


def test_me_returns_the_caller(app, signup):
    ann, bob = signup("ann"), signup("bob")

    assert app.get("/v1/me", headers=ann.headers, status=200).json == {"id": ann.id, "name": "ann"}
    assert app.get("/v1/me", headers=bob.headers, status=200).json == {"id": bob.id, "name": "bob"}


def test_the_bearer_scheme_is_case_insensitive(app, signup):
    ann = signup()

    res = app.get("/v1/me", headers={"Authorization": f"bearer {ann.token}"}, status=200)

    assert res.json["id"] == ann.id


@pytest.mark.parametrize("name", ["a", "x" * 64, "\U0001F600" * 64, "Zoë O'Brien", "  padded  ", "line\nbreak"])
def test_names_of_1_to_64_characters_are_kept_as_given(app, name):
    res = app.post_json("/v1/users", {"name": name}, status=201)

    assert res.json["name"] == name
    token = res.json["token"]
    assert app.get("/v1/me", headers={"Authorization": f"Bearer {token}"}).json["name"] == name


@pytest.mark.parametrize("body", [
    {},
    {"name": None},
    {"name": ""},
    {"name": "   "},
    {"name": "\t\n\u3000"},
    {"name": "x" * 65},
    {"name": 7},
    {"name": True},
    {"name": ["ann"]},
    {"name": {"first": "ann"}},
    {"nom": "ann"},
], ids=["missing", "null", "empty", "spaces", "unicode-whitespace", "65-chars", "int", "bool", "list",
        "object", "misspelt"])
def test_a_bad_name_is_400_invalid_field_and_creates_no_user(app, app_engine, body):
    before = row_counts(app_engine)

    res = app.post_json("/v1/users", body, expect_errors=True)

    assert_error(res, 400, "invalid_field", "name")
    assert row_counts(app_engine) == before


def test_unknown_fields_are_ignored(app):
    res = app.post_json("/v1/users", {"name": "ann", "admin": True}, status=201)

    assert set(res.json) == {"id", "name", "token"}
