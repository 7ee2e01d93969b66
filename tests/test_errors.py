"""Bad input across every route: each answer is API.md's JSON error, and nothing is written."""
import io
import json
import logging

import pytest
from webtest import TestRequest

from chat_app import store
from tests.webapp import ContractTestApp, assert_error, row_counts

KIB_64 = 64 * 1024


@pytest.fixture
def world(signup, make_chat):
    """ann, a member of chat 1; bob, who is not."""
    ann, bob = signup("ann"), signup("bob")
    return ann, bob, make_chat(ann)


# Every route that reads a body, with a body it accepts; "{chat}" is ann's chat.
BODY_ROUTES = [
    ("POST", "/v1/users", {"name": "cat"}),
    ("POST", "/v1/devices", {"platform": "fcm", "token": "tok"}),
    ("POST", "/v1/chats", {"name": "c", "member_ids": []}),
    ("POST", "/v1/chats/{chat}/members", {"user_id": 2}),
    ("PUT", "/v1/chats/{chat}/mute", {"until": None}),
    ("POST", "/v1/chats/{chat}/messages", {"text": "hi"}),
]
BODY_IDS = [f"{method} {path}" for method, path, _ in BODY_ROUTES]

# Every route behind the bearer token.
AUTHED_ROUTES = [
    ("GET", "/v1/me"), ("POST", "/v1/devices"), ("GET", "/v1/devices"), ("DELETE", "/v1/devices/1"),
    ("POST", "/v1/chats"), ("GET", "/v1/chats"), ("GET", "/v1/chats/{chat}"),
    ("POST", "/v1/chats/{chat}/members"), ("DELETE", "/v1/chats/{chat}/members/1"),
    ("PUT", "/v1/chats/{chat}/mute"), ("POST", "/v1/chats/{chat}/messages"), ("GET", "/v1/chats/{chat}/messages"),
    ("GET", "/v1/messages/1"), ("GET", "/v1/messages/1/deliveries"),
]
AUTHED_IDS = [f"{method} {path}" for method, path in AUTHED_ROUTES]


def send(client, method, path, body: bytes = b"", content_type="application/json", headers=None):
    """A raw request: these bytes, this content type (None: no Content-Type header)."""
    req = TestRequest.blank(path, method=method, headers=headers or {})
    if method in ("POST", "PUT"):
        req.body = body
        if content_type is None:
            req.environ.pop("CONTENT_TYPE", None)
        else:
            req.content_type = content_type
    return client.do_request(req, status="*")


def sent_by(world, method, path, body, content_type="application/json", headers=None, app=None):
    ann, _, chat = world
    headers = ann.headers if headers is None else headers
    return send(app, method, path.format(chat=chat["id"]), body, content_type, headers)


# ---------------------------------------------------------------- bodies

BAD_JSON = {
    "malformed": b'{"name": ',
    "trailing-comma": b'{"name": "x",}',
    "single-quotes": b"{'name': 'x'}",
    "empty": b"",
    "whitespace": b"  \n ",
    "array": b'[{"name": "x"}]',
    "empty-array": b"[]",
    "string": b'"name"',
    "number": b"42",
    "null": b"null",
    "true": b"true",
    "nan": b'{"name": NaN}',
    "infinity": b'{"user_id": Infinity}',
    "not-utf8": b'{"name": "\xff\xfe"}',
    "latin1": '{"name": "Zo\u00eb"}'.encode("latin-1"),
    "utf16": '{"name": "x"}'.encode("utf-16"),
    "bom": b'\xef\xbb\xbf{"name": "x"}',
    "too-deep": b"[" * 30_000 + b"]" * 30_000,  # valid JSON, but deeper than the parser recurses
    "huge-integer": b'{"user_id": ' + b"9" * 5000 + b"}",
}


@pytest.mark.parametrize("body", BAD_JSON.values(), ids=BAD_JSON.keys())
def test_a_body_that_is_not_a_json_object_is_400_invalid_json(app, app_engine, world, body):
    before = row_counts(app_engine)

    res = sent_by(world, "POST", "/v1/users", body, app=app)

    assert_error(res, 400, "invalid_json")
    assert row_counts(app_engine) == before


@pytest.mark.parametrize("method, path, _", BODY_ROUTES[1:], ids=BODY_IDS[1:])
@pytest.mark.parametrize("case", ["malformed", "array", "empty", "not-utf8"])
def test_every_body_route_answers_400_invalid_json(app, app_engine, world, method, path, _, case):
    before = row_counts(app_engine)

    res = sent_by(world, method, path, BAD_JSON[case], app=app)

    assert_error(res, 400, "invalid_json")
    assert row_counts(app_engine) == before


NOT_JSON = ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
            "application/jsonx", "application/json-patch+json", "text/json", None]


@pytest.mark.parametrize("content_type", NOT_JSON)
def test_a_body_that_is_not_application_json_is_415(app, app_engine, world, content_type):
    before = row_counts(app_engine)

    res = sent_by(world, "POST", "/v1/users", b'{"name": "ann"}', content_type, app=app)

    assert_error(res, 415, "unsupported_media_type")
    assert row_counts(app_engine) == before


@pytest.mark.parametrize("method, path, good", BODY_ROUTES[1:], ids=BODY_IDS[1:])
@pytest.mark.parametrize("content_type", ["text/plain", None])
def test_every_body_route_answers_415(app, app_engine, world, method, path, good, content_type):
    before = row_counts(app_engine)

    res = sent_by(world, method, path, json.dumps(good).encode(), content_type, app=app)

    assert_error(res, 415, "unsupported_media_type")
    assert row_counts(app_engine) == before


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON",
                                          " application/json ;charset=UTF-8"])
def test_application_json_with_parameters_or_any_case_is_accepted(app, content_type):
    res = send(app, "POST", "/v1/users", b'{"name": "ann"}', content_type)

    assert res.status_int == 201


@pytest.mark.parametrize("method, path, good", BODY_ROUTES, ids=BODY_IDS)
def test_a_body_over_64_kib_is_413_too_large(app, app_engine, world, method, path, good):
    body = json.dumps(good).encode()
    body = body[:-1] + b" " * (KIB_64 + 1 - len(body)) + b"}"
    assert len(body) == KIB_64 + 1
    before = row_counts(app_engine)

    res = sent_by(world, method, path, body, app=app)

    assert_error(res, 413, "too_large")
    assert row_counts(app_engine) == before


def test_a_body_of_exactly_64_kib_is_accepted(app):
    body = b'{"name": "ann"' + b" " * (KIB_64 - 15) + b"}"
    assert len(body) == KIB_64

    assert send(app, "POST", "/v1/users", body).status_int == 201


def test_an_over_long_content_length_is_413_before_the_body_is_read(app, app_engine):
    before = row_counts(app_engine)
    req = TestRequest.blank("/v1/users", method="POST", content_type="application/json")
    req.environ["wsgi.input"] = io.BytesIO(b'{"name": "ann"}')
    req.environ["CONTENT_LENGTH"] = str(10 * 1024 * 1024)

    assert_error(app.do_request(req, status="*"), 413, "too_large")
    assert row_counts(app_engine) == before


@pytest.mark.parametrize("content_length", ["abc", "1e3", "0x10", ""])
def test_a_content_length_that_is_not_a_number_is_400(app, app_engine, content_length):
    client = ContractTestApp(app.app, lint=False)  # WebTest's lint refuses such a request itself
    before = row_counts(app_engine)
    req = TestRequest.blank("/v1/users", method="POST", content_type="application/json")
    req.environ["wsgi.input"] = io.BytesIO(b'{"name": "ann"}')
    req.environ["CONTENT_LENGTH"] = content_length

    res = client.do_request(req, status="*")

    assert_error(res, 400, "invalid_json")  # "": no length and not chunked, so no body (PEP 3333)
    assert row_counts(app_engine) == before


def chunked(data: bytes, size: int = 4096) -> bytes:
    out = b"".join(b"%x\r\n%s\r\n" % (len(data[i:i + size]), data[i:i + size]) for i in range(0, len(data), size))
    return out + b"0\r\n\r\n"


def send_chunked(client, wire: bytes):
    """POST /v1/users with Transfer-Encoding: chunked and no Content-Length."""
    req = TestRequest.blank("/v1/users", method="POST", content_type="application/json",
                            headers={"Transfer-Encoding": "chunked"})
    req.environ["wsgi.input"] = io.BytesIO(wire)
    req.environ.pop("CONTENT_LENGTH", None)
    return client.do_request(req, status="*")


def test_a_chunked_body_is_read(app):
    res = send_chunked(app, chunked(b'{"name": "ann"}', size=5))

    assert res.status_int == 201
    assert res.json["name"] == "ann"


def test_a_chunked_body_over_64_kib_is_413_too_large(app, app_engine):
    before = row_counts(app_engine)

    res = send_chunked(app, chunked(b'{"name": "ann"' + b" " * KIB_64 + b"}"))

    assert_error(res, 413, "too_large")
    assert row_counts(app_engine) == before


def test_a_malformed_chunked_body_is_a_json_400(app, app_engine):
    before = row_counts(app_engine)

    res = send_chunked(app, b'zz\r\n{"name": "ann"}\r\n0\r\n\r\n')

    assert_error(res, 400, "invalid_json")
    assert row_counts(app_engine) == before


# Every string field, with a body for the route it belongs to; "{}" is where the bad value goes.
STRING_FIELDS = [
    ("POST", "/v1/users", "name", '{"name": "%s"}'),
    ("POST", "/v1/chats", "name", '{"name": "%s", "member_ids": []}'),
    ("POST", "/v1/devices", "app", '{"platform": "fcm", "token": "tok", "app": "%s"}'),
    ("POST", "/v1/devices", "token", '{"platform": "fcm", "token": "%s"}'),
    ("POST", "/v1/chats/{chat}/messages", "text", '{"text": "%s"}'),
    ("POST", "/v1/chats/{chat}/messages", "client_id", '{"text": "hi", "client_id": "%s"}'),
]
STRING_IDS = [f"{path} {field}" for _, path, field, _ in STRING_FIELDS]


@pytest.mark.parametrize("method, path, field, template", STRING_FIELDS, ids=STRING_IDS)
@pytest.mark.parametrize("value", [r"a\u0000b", r"\ud800", r"a\udfffb", r"\udc00\ud800"],
                         ids=["nul", "lone-high", "lone-low", "reversed-pair"])
def test_nul_and_lone_surrogates_are_400_invalid_field(app, app_engine, world, method, path, field, template,
                                                       value):
    before = row_counts(app_engine)

    res = sent_by(world, method, path, (template % value).encode(), app=app)

    assert_error(res, 400, "invalid_field", field)
    assert row_counts(app_engine) == before


def test_an_escaped_surrogate_pair_is_a_real_character(app):
    res = send(app, "POST", "/v1/users", rb'{"name": "\ud83d\ude00"}')

    assert res.status_int == 201
    assert res.json["name"] == "\U0001F600"


# ---------------------------------------------------------------- authentication

AUTH_BODY = json.dumps({"name": "x", "member_ids": [], "user_id": 2, "until": None, "text": "t", "platform": "fcm",
                        "token": "t"}).encode()


def assert_unauthorized(app, app_engine, world, method, path, headers):
    before = row_counts(app_engine)

    res = sent_by(world, method, path, AUTH_BODY, headers=headers, app=app)

    assert_error(res, 401, "unauthorized")
    assert res.headers["WWW-Authenticate"] == "Bearer"
    assert row_counts(app_engine) == before


@pytest.mark.parametrize("method, path", AUTHED_ROUTES, ids=AUTHED_IDS)
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer unknown-token"}], ids=["missing", "unknown"])
def test_every_v1_route_but_signup_is_401_without_a_known_bearer_token(app, app_engine, world, method, path,
                                                                         headers):
    assert_unauthorized(app, app_engine, world, method, path, headers)


@pytest.mark.parametrize("method, path", [("GET", "/v1/me"), ("POST", "/v1/chats/{chat}/messages")])
@pytest.mark.parametrize("authorization", [
    "", "Bearer", "Bearer ", "Bearer    ", "Basic YW5uOnNlY3JldA==", "Token {token}", "Bearer{token}",
    "Bearer {token} extra", "Bearer {token}x", "{token}",
], ids=["empty", "scheme-only", "scheme-space", "blank-token", "basic", "other-scheme", "no-space",
        "token-and-more", "longer-token", "token-only"])
def test_a_malformed_authorization_header_is_401(app, app_engine, world, method, path, authorization):
    ann, _, _ = world
    headers = {"Authorization": authorization.format(token=ann.token)}

    assert_unauthorized(app, app_engine, world, method, path, headers)


def test_signup_needs_no_token(app):
    res = send(app, "POST", "/v1/users", b'{"name": "ann"}', headers={"Authorization": "Bearer junk"})

    assert res.status_int == 201


# ---------------------------------------------------------------- routes, methods, ids

@pytest.mark.parametrize("method, path", [
    ("GET", "/"), ("GET", "/nope"), ("GET", "/v1"), ("GET", "/v1/"), ("GET", "/v1/me/"), ("GET", "/V1/me"),
    ("GET", "/v1/users/1"), ("GET", "/v1/chats/abc"), ("GET", "/v1/chats/-1"), ("GET", "/v1/chats/1.5"),
    ("GET", "/v1/chats/\u0661"), ("GET", "/v1/chats/1/nope"), ("POST", "/v1/messages"), ("DELETE", "/v1/chats/x"),
    ("GET", "/openapi.yaml"),
])
def test_an_unknown_route_is_404_not_found(app, world, method, path):
    ann, _, _ = world

    req = TestRequest.blank("/", method=method, headers=ann.headers)
    req.environ["PATH_INFO"] = path.encode().decode("latin-1")  # as a WSGI server passes UTF-8 paths

    assert_error(app.do_request(req, status="*"), 404, "not_found")


@pytest.mark.parametrize("method, path, allowed", [
    ("GET", "/v1/users", {"POST"}), ("PUT", "/v1/users", {"POST"}),
    ("POST", "/v1/me", {"GET"}), ("DELETE", "/v1/me", {"GET"}),
    ("PUT", "/v1/devices", {"GET", "POST"}), ("GET", "/v1/devices/1", {"DELETE"}),
    ("DELETE", "/v1/chats", {"GET", "POST"}), ("PATCH", "/v1/chats/1", {"GET"}),
    ("GET", "/v1/chats/1/members", {"POST"}), ("GET", "/v1/chats/1/members/1", {"DELETE"}),
    ("POST", "/v1/chats/1/mute", {"PUT"}), ("GET", "/v1/chats/1/mute", {"PUT"}),
    ("DELETE", "/v1/chats/1/messages", {"GET", "POST"}), ("POST", "/v1/messages/1", {"GET"}),
    ("DELETE", "/v1/messages/1/deliveries", {"GET"}), ("POST", "/healthz", {"GET"}),
    ("POST", "/metrics", {"GET"}), ("PUT", "/openapi.json", {"GET"}), ("OPTIONS", "/v1/me", {"GET"}),
])
def test_a_wrong_method_is_405_with_an_allow_header(app, app_engine, world, method, path, allowed):
    ann, _, _ = world
    before = row_counts(app_engine)

    res = app.request(path, method=method, headers=ann.headers, expect_errors=True)

    assert_error(res, 405, "method_not_allowed")
    assert set(res.headers["Allow"].split(",")) >= allowed
    assert set(res.headers["Allow"].split(",")) <= allowed | {"HEAD"}
    assert row_counts(app_engine) == before


ID_ROUTES = [
    ("GET", "/v1/chats/{id}"), ("POST", "/v1/chats/{id}/members"), ("DELETE", "/v1/chats/{id}/members/1"),
    ("PUT", "/v1/chats/{id}/mute"), ("POST", "/v1/chats/{id}/messages"), ("GET", "/v1/chats/{id}/messages"),
    ("GET", "/v1/messages/{id}"), ("GET", "/v1/messages/{id}/deliveries"), ("DELETE", "/v1/devices/{id}"),
]


@pytest.mark.parametrize("method, path", ID_ROUTES, ids=[f"{m} {p}" for m, p in ID_ROUTES])
@pytest.mark.parametrize("bad_id", ["0", str(2**31 - 1), str(2**70), "1" * 5000])
def test_an_id_that_names_nothing_is_404(app, app_engine, world, method, path, bad_id):
    body = b'{"user_id": 2, "until": null, "text": "hi"}'
    before = row_counts(app_engine)

    res = sent_by(world, method, path.replace("{id}", bad_id), body, app=app)

    assert_error(res, 404, "not_found")
    assert row_counts(app_engine) == before


@pytest.mark.parametrize("body", [
    b'{"user_id": 1180591620717411303424}', b'{"user_id": -1180591620717411303424}', b'{"user_id": 1e300}',
    b'{"user_id": 3.0}', b'{"user_id": "3"}', b'{"user_id": true}',
])
def test_a_huge_or_non_integer_id_in_a_body_is_400_invalid_field(app, app_engine, world, body):
    _, _, chat = world
    before = row_counts(app_engine)

    res = sent_by(world, "POST", f"/v1/chats/{chat['id']}/members", body, app=app)

    assert_error(res, 400, "invalid_field", "user_id")
    assert row_counts(app_engine) == before


# ---------------------------------------------------------------- another user's chat

CHAT_ROUTES = [
    ("GET", "/v1/chats/{chat}", None),
    ("POST", "/v1/chats/{chat}/members", {"user_id": 2}),
    ("DELETE", "/v1/chats/{chat}/members/1", None),
    ("PUT", "/v1/chats/{chat}/mute", {"until": None}),
    ("POST", "/v1/chats/{chat}/messages", {"text": "hi"}),
    ("GET", "/v1/chats/{chat}/messages", None),
    ("GET", "/v1/messages/{message}", None),
    ("GET", "/v1/messages/{message}/deliveries", None),
]


@pytest.mark.parametrize("method, path, body", CHAT_ROUTES, ids=[f"{m} {p}" for m, p, _ in CHAT_ROUTES])
def test_another_users_chat_is_403_forbidden(app, app_engine, world, wakes, method, path, body):
    ann, bob, chat = world
    message = app.post_json(f"/v1/chats/{chat['id']}/messages", {"text": "x"}, headers=ann.headers).json
    wakes.clear()
    before = row_counts(app_engine)

    res = send(app, method, path.format(chat=chat["id"], message=message["id"]), json.dumps(body).encode(),
               headers=bob.headers)

    assert_error(res, 403, "forbidden")
    assert row_counts(app_engine) == before
    assert wakes == []


# ---------------------------------------------------------------- the unexpected

def test_an_unexpected_error_is_500_internal_with_a_request_id_and_no_stack_trace(app, world, monkeypatch, caplog):
    ann, _, _ = world

    def broken(*_args):
        raise RuntimeError("secret detail")

    monkeypatch.setattr(store, "list_chats", broken)
    with caplog.at_level(logging.ERROR, logger="chat_app.errors"):
        res = app.get("/v1/chats", headers=ann.headers, expect_errors=True)

    assert_error(res, 500, "internal")
    assert "request id" in res.json["error"]["message"]
    assert b"secret" not in res.body and b"Traceback" not in res.body
    request_id = res.json["error"]["message"].rsplit(" ", 1)[1].rstrip(")")
    assert any(request_id in record.getMessage() and record.exc_info for record in caplog.records)
