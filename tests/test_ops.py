"""Operations routes: /healthz, /metrics and /openapi.json (which must describe the app truly)."""
import re
import shutil

import pytest
from openapi_spec_validator import validate

from chat_app.app import create_app
from chat_app.openapi import DOCUMENT
from chat_app.validation import MAX_ID
from notifier.config import Settings
from tests.webapp import ContractTestApp, assert_error, schema_validator

PUBLIC = {("POST", "/v1/users"), ("GET", "/healthz"), ("GET", "/metrics"), ("GET", "/openapi.json"),
          ("GET", "/v1/webpush/key")}


# ---------------------------------------------------------------- /healthz and /metrics

def test_healthz_is_200_ok_with_the_queue_and_no_dispatcher(app):
    res = app.get("/healthz", status=200)

    assert res.json["status"] == "ok"
    assert res.json["db"] == "ok"
    dispatcher = res.json["dispatcher"]
    assert dispatcher["alive"] is False
    assert dispatcher["instances"] == []
    assert (dispatcher["pending_jobs"], dispatcher["pending_deliveries"]) == (0, 0)


def test_healthz_counts_a_queued_message(app, signup, make_chat):
    ann = signup()
    chat = make_chat(ann)
    app.post_json(f"/v1/chats/{chat['id']}/messages", {"text": "hi"}, headers=ann.headers, status=201)

    assert app.get("/healthz", status=200).json["dispatcher"]["pending_jobs"] == 1


@pytest.fixture
def lost_database(tmp_path):
    """An app whose SQLite database disappears after start-up."""
    folder = tmp_path / "db"
    client = ContractTestApp(create_app(Settings(database_url=f"sqlite:///{folder}/chat.sqlite3",
                                                 push_run_dir=str(tmp_path / "run")), wake=lambda: None))
    shutil.rmtree(folder)
    client.app.config["chat.context"].engine.dispose()
    return client


def test_healthz_is_503_with_the_same_shape_when_the_database_is_unreachable(lost_database):
    res = lost_database.get("/healthz", status=503)

    assert res.content_type == "application/json"
    assert (res.json["status"], res.json["db"]) == ("unavailable", "unreachable")
    assert "dispatcher" in res.json


@pytest.mark.parametrize("method, path, body", [
    ("GET", "/v1/me", None),
    ("POST", "/v1/users", {"name": "ann"}),
])
def test_api_routes_are_503_unavailable_with_retry_after_when_the_database_is_unreachable(
        lost_database, method, path, body):
    headers = {"Authorization": "Bearer some-token"}
    if body is None:
        res = lost_database.request(path, method=method, headers=headers, expect_errors=True)
    else:
        res = lost_database.post_json(path, body, headers=headers, expect_errors=True)

    assert_error(res, 503, "unavailable")
    assert res.headers["Retry-After"] == "1"


def test_metrics_is_prometheus_text(app, signup, make_chat):
    ann = signup()
    chat = make_chat(ann)
    app.post_json(f"/v1/chats/{chat['id']}/messages", {"text": "hi"}, headers=ann.headers, status=201)

    res = app.get("/metrics", status=200)

    assert res.content_type == "text/plain"
    assert re.search(r"^chat_push_queue_pending_jobs 1\.0$", res.text, re.M)
    assert re.search(r"^chat_push_queue_pending_deliveries 0\.0$", res.text, re.M)
    assert "# TYPE chat_push_deliveries gauge" in res.text


# ---------------------------------------------------------------- /openapi.json

def test_openapi_json_is_a_valid_openapi_3_0_document(app):
    res = app.get("/openapi.json", status=200)

    assert res.content_type == "application/json"
    assert res.json["openapi"] == "3.0.3"
    validate(res.json)
    assert res.json == DOCUMENT


def route_set(bottle_app) -> set[tuple[str, str]]:
    return {(route.method, re.sub(r"<(\w+)(:[^>]*)?>", r"{\1}", route.rule)) for route in bottle_app.routes}


def test_openapi_describes_exactly_the_routes_the_app_serves(app):
    document = app.get("/openapi.json").json

    described = {(method.upper(), path) for path, item in document["paths"].items() for method in item}

    assert described == route_set(app.app)


def test_every_path_parameter_is_described_as_an_id(app):
    for path, item in DOCUMENT["paths"].items():
        for operation in item.values():
            in_path = {p["name"]: p for p in operation.get("parameters", []) if p["in"] == "path"}
            assert set(in_path) == set(re.findall(r"\{(\w+)\}", path)), path
            for parameter in in_path.values():
                assert parameter["required"] is True
                assert parameter["schema"] == {"type": "integer", "format": "int64", "minimum": 1,
                                               "maximum": MAX_ID}


def test_bearer_auth_is_global_and_only_the_public_routes_opt_out():
    assert DOCUMENT["security"] == [{"bearerAuth": []}]
    assert DOCUMENT["components"]["securitySchemes"]["bearerAuth"] == {"type": "http", "scheme": "bearer"}
    public = {(method.upper(), path) for path, item in DOCUMENT["paths"].items()
              for method, operation in item.items() if operation.get("security") == []}
    assert public == PUBLIC
    for path, item in DOCUMENT["paths"].items():
        for method, operation in item.items():
            if (method.upper(), path) not in PUBLIC:
                assert "security" not in operation and "401" in operation["responses"], (method, path)


def test_every_error_status_uses_the_shared_error_shape():
    for path, item in DOCUMENT["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if int(status) >= 400 and path != "/healthz":
                    assert response["$ref"].startswith("#/components/responses/"), (method, path, status)
    for response in DOCUMENT["components"]["responses"].values():
        assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}


# The request schemas must accept exactly what chat_app.validation accepts: for each sample body the
# document's verdict (valid or not) must be the app's (2xx or 400).
APNS = "0123456789abcdef" * 4
BODY_SAMPLES = [
    ("UserCreate", {"name": "ann"}), ("UserCreate", {"name": "x" * 64}), ("UserCreate", {"name": "x" * 65}),
    ("UserCreate", {"name": ""}), ("UserCreate", {"name": " \u3000\u2028"}), ("UserCreate", {"name": " a "}),
    ("UserCreate", {"name": "\x1c\x85a"}), ("UserCreate", {"name": "\x1c\x85"}), ("UserCreate", {"name": "\ufeff"}),
    ("UserCreate", {"name": "a\x00"}), ("UserCreate", {"name": None}), ("UserCreate", {}),
    ("UserCreate", {"name": 1}), ("UserCreate", {"name": "ann", "extra": [1]}), ("UserCreate", {"name": "a\n"}),
    ("DeviceCreate", {"platform": "apns", "token": APNS}),
    ("DeviceCreate", {"platform": "apns", "token": APNS.upper()}),
    ("DeviceCreate", {"platform": "apns", "token": APNS + "\n"}),
    ("DeviceCreate", {"platform": "apns", "token": APNS[1:]}),
    ("DeviceCreate", {"platform": "apns", "token": APNS, "app": None}),
    ("DeviceCreate", {"platform": "apns", "token": APNS, "app": "x" * 255}),
    ("DeviceCreate", {"platform": "apns", "token": APNS, "app": "x" * 256}),
    ("DeviceCreate", {"platform": "apns", "token": APNS, "app": " "}),
    ("DeviceCreate", {"platform": "fcm", "token": "t"}), ("DeviceCreate", {"platform": "fcm", "token": "t\n"}),
    ("DeviceCreate", {"platform": "fcm", "token": "t t"}), ("DeviceCreate", {"platform": "fcm", "token": "~" * 4096}),
    ("DeviceCreate", {"platform": "fcm", "token": "~" * 4097}), ("DeviceCreate", {"platform": "fcm", "token": ""}),
    ("DeviceCreate", {"platform": "fcm", "token": APNS}), ("DeviceCreate", {"platform": "fcm", "token": "\u00e9"}),
    ("DeviceCreate", {"platform": "web", "token": "t"}), ("DeviceCreate", {"token": "t"}),
    ("ChatCreate", {"name": "c", "member_ids": []}), ("ChatCreate", {"name": "c", "member_ids": [1]}),
    ("ChatCreate", {"name": "c", "member_ids": [0]}), ("ChatCreate", {"name": "c", "member_ids": [True]}),
    ("ChatCreate", {"name": "c", "member_ids": [1.0]}), ("ChatCreate", {"name": "c", "member_ids": [2**63]}),
    ("ChatCreate", {"name": "c", "member_ids": None}), ("ChatCreate", {"name": "c"}),
    ("ChatCreate", {"name": "", "member_ids": []}),
    ("MemberAdd", {"user_id": 1}), ("MemberAdd", {"user_id": "1"}), ("MemberAdd", {"user_id": 0}),
    ("MemberAdd", {"user_id": 2**63}), ("MemberAdd", {"user_id": 2**63 - 1}), ("MemberAdd", {"user_id": False}),
    ("MemberAdd", {}),
    ("MuteSet", {"until": None}), ("MuteSet", {"until": "2030-01-01T00:00:00Z"}),
    ("MuteSet", {"until": "2030-01-01T00:00:00.5+05:30"}), ("MuteSet", {"until": "2030-01-01T00:00:00"}),
    ("MuteSet", {"until": "soon"}), ("MuteSet", {"until": 5}), ("MuteSet", {}),
    ("MuteSet", {"until": "2030-01-01T00:00:60Z"}), ("MuteSet", {"until": "2030-02-30T00:00:00Z"}),
    ("MessageCreate", {"text": "hi"}), ("MessageCreate", {"text": "x" * 4000}), ("MessageCreate", {"text": "x" * 4001}),
    ("MessageCreate", {"text": "\t"}), ("MessageCreate", {"text": "hi", "client_id": None}),
    ("MessageCreate", {"text": "hi", "client_id": "c" * 64}), ("MessageCreate", {"text": "hi", "client_id": "c" * 65}),
    ("MessageCreate", {"text": "hi", "client_id": ""}), ("MessageCreate", {"text": "hi", "client_id": 1}),
    ("MessageCreate", {"client_id": "c"}), ("MessageCreate", {"text": ["hi"]}),
]


@pytest.mark.parametrize("schema, body", BODY_SAMPLES, ids=[f"{s}-{i}" for i, (s, _) in enumerate(BODY_SAMPLES)])
def test_request_schemas_accept_exactly_what_the_app_accepts(app, signup, make_chat, schema, body):
    ann = signup()
    chat = make_chat(ann)
    path = {"UserCreate": "/v1/users", "DeviceCreate": "/v1/devices", "ChatCreate": "/v1/chats",
            "MemberAdd": f"/v1/chats/{chat['id']}/members", "MuteSet": f"/v1/chats/{chat['id']}/mute",
            "MessageCreate": f"/v1/chats/{chat['id']}/messages"}[schema]
    send = app.put_json if schema == "MuteSet" else app.post_json

    res = send(path, body, headers=ann.headers, expect_errors=True)

    documented_valid = not list(schema_validator({"$ref": f"#/components/schemas/{schema}"}).iter_errors(body))
    assert res.status_int in (200, 201, 400, 404), res.body  # 404: a valid id of no user
    assert documented_valid == (res.status_int != 400), res.json
