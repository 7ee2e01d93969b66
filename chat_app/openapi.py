"""The OpenAPI 3.0.3 description of the API, served at /openapi.json.

Plain data, built once at import (no I/O). It must stay true: the request schemas say exactly what
chat_app.validation accepts, and tests check the responses of every route against it and that its
(method, path) pairs are the app's routes. Change it together with the routes.
"""
from __future__ import annotations

from chat_app.validation import MAX_ID, MAX_INITIAL_MEMBERS

# ------------------------------------------------------------------ small schema helpers

# What str.isspace() calls whitespace (the characters validation.text() strips), as a regex class body.
_SPACE = r"\t-\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# validation.text(): no NUL anywhere, and at least one character that is not whitespace
_NOT_BLANK = rf"^[^\x00]*[^\x00{_SPACE}][^\x00]*$"
# an ISO time as the API writes it (model.iso)
_API_TIME = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"
# validation.timestamp_or_null() takes times whose UTC instant is in [0001-01-01, 9999-12-31): with an
# offset of up to 23:59, every time written with a date from 0001-01-02 to 9999-12-29 is, and some
# written on 0001-01-01, 9999-12-30 or 9999-12-31 are not (0001-01-01T00:00:00+01:00). Comparing the
# time with the offset is beyond a readable regex, so the date alone decides: years 0002..9998, or
# year 0001 but not January 1st, or year 9999 before December 30th (format: date-time checks the rest).
_MUTE_DATES = (r"^(?:(?:000[2-9]|00[1-9]\d|0[1-9]\d\d|[1-8]\d{3}|9[0-8]\d\d|99[0-8]\d|999[0-8])-"
               r"|0001-(?:01-(?:0[2-9]|[1-3])|0[2-9]|1[0-2])"
               r"|9999-(?:0\d|1[01]|12-[0-2]))")


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(properties: dict, required: list[str] | None = None, **extra) -> dict:
    """An object schema; every listed property is required unless `required` says otherwise."""
    return {"type": "object", "required": list(properties) if required is None else required,
            "properties": properties, **extra}


def _text(max_chars: int, nullable: bool = False) -> dict:
    """A string accepted by validation.text(): 1..max_chars characters, not blank, no NUL."""
    schema = {"type": "string", "minLength": 1, "maxLength": max_chars, "pattern": _NOT_BLANK}
    if nullable:
        schema["nullable"] = True
    return schema


def _time(nullable: bool = False) -> dict:
    schema = {"type": "string", "format": "date-time", "pattern": _API_TIME,
              "example": "2026-11-23T02:09:23.123Z"}
    if nullable:
        schema["nullable"] = True
    return schema


def _count() -> dict:
    return {"type": "integer", "minimum": 0}


ID = {"type": "integer", "format": "int64", "minimum": 1, "maximum": MAX_ID}


# ------------------------------------------------------------------ components

def _schemas() -> dict:
    platform = {"type": "string", "enum": ["apns", "fcm", "webpush"]}
    base64url = {"type": "string", "pattern": "^[A-Za-z0-9_-]+$"}
    app = dict(_text(255, nullable=True),
               description="APNs topic (bundle id) or app id; defaults to the configured APNS_TOPIC for apns")
    return {
        "Error": _obj({"error": _obj({"code": {"type": "string"}, "message": {"type": "string"}})}),
        "User": _obj({"id": ID, "name": {"type": "string"}}),
        "NewUser": _obj({"id": ID, "name": {"type": "string"},
                         "token": {"type": "string", "description": "the bearer token; shown only once"}}),
        "Device": _obj({"id": ID, "platform": platform, "token": {"type": "string"},
                        "app": {"type": "string", "nullable": True}}),
        "DeviceList": _obj({"devices": {"type": "array", "items": _ref("Device")}}),
        "ChatSummary": _obj({"id": ID, "name": {"type": "string"}}),
        "ChatList": _obj({"chats": {"type": "array", "items": _ref("ChatSummary")}}),
        "Chat": _obj({"id": ID, "name": {"type": "string"}, "members": {"type": "array", "items": _ref("User")}}),
        "Mute": _obj({"chat_id": ID, "muted_until": _time(nullable=True)}),
        "Message": _obj({"id": ID, "chat_id": ID, "sender_id": ID, "text": {"type": "string"},
                         "client_id": {"type": "string", "nullable": True}, "created_at": _time()}),
        "MessageList": _obj({"messages": {"type": "array", "items": _ref("Message")}}),
        "Delivery": _obj({
            "device_id": ID, "platform": platform,
            "state": {"type": "string", "enum": ["pending", "sent", "failed", "skipped"]},
            "attempts": _count(),
            "last_status": {"type": "integer", "nullable": True},
            "last_reason": {"type": "string", "nullable": True},
            "sent_at": _time(nullable=True),
        }),
        "Deliveries": _obj({
            "message_id": ID,
            "complete": {"type": "boolean", "description": "true once every delivery is in a final state"},
            "summary": _obj({"pending": _count(), "sent": _count(), "failed": _count(), "skipped": _count()}),
            "deliveries": {"type": "array", "items": _ref("Delivery")},
            "pruned": {"type": "boolean",
                       "description": "true once the delivery rows were deleted after PUSH_RETENTION: "
                                      "`deliveries` is then empty and `summary` is the one stored at completion"},
        }),
        "Health": _obj({
            "status": {"type": "string", "enum": ["ok", "unavailable"]},
            "db": {"type": "string", "enum": ["ok", "unreachable"]},
            "dispatcher": {"type": "object"},
            "webhooks": _obj({"enabled": {"type": "boolean"}, "backlog": _count(),
                              "oldest_pending_age": {"type": "number"}}),
            "error": _obj({"code": {"type": "string"}, "message": {"type": "string"}}),
        }, required=["status", "db", "dispatcher"]),
        # request bodies: exactly chat_app.validation's rules; unknown properties are ignored
        "UserCreate": _obj({"name": _text(64)}),
        "DeviceCreate": {
            "oneOf": [
                _obj({"platform": {"type": "string", "enum": ["apns"]},
                      "token": {"type": "string", "minLength": 64, "maxLength": 64,
                                "pattern": "^[0-9a-fA-F]{64}$",
                                "description": "64 hex characters, any case; stored lower-case"},
                      "app": app}, required=["platform", "token"]),
                _obj({"platform": {"type": "string", "enum": ["fcm"]},
                      # (?!\n): Python's `$` also matches before a final newline
                      "token": {"type": "string", "minLength": 1, "maxLength": 4096,
                                "pattern": "^[!-~]+$(?!\\n)",
                                "description": "1..4096 printable ASCII characters, no space"},
                      "app": app}, required=["platform", "token"]),
                _obj({"platform": {"type": "string", "enum": ["webpush"]},
                      "subscription": _obj({
                          "endpoint": {"type": "string", "format": "uri", "maxLength": 2048,
                                       "description": "https URL of a push service allowed by "
                                                      "WEBPUSH_ALLOWED_HOSTS (no userinfo, port 443 unless "
                                                      "the pattern names one)"},
                          "keys": _obj({"p256dh": dict(base64url, minLength=87, maxLength=87,
                                                       description="base64url of a 65-byte P-256 point"),
                                        "auth": dict(base64url, minLength=22, maxLength=22,
                                                     description="base64url of 16 bytes")}),
                      }, required=["endpoint", "keys"],
                          description="the browser's PushSubscription.toJSON(); expirationTime is ignored")},
                     required=["platform", "subscription"]),
            ],
        },
        "WebPushKey": _obj({"public_key": dict(base64url, description="the VAPID public key: base64url of "
                                                                      "a 65-byte uncompressed P-256 point")}),
        "ChatCreate": _obj({"name": _text(64),
                            "member_ids": {"type": "array", "maxItems": MAX_INITIAL_MEMBERS, "items": ID,
                                           "description": "ids of existing users to add (an id of no user is "
                                                          "400 invalid_field); the creator is always a member"}}),
        "MemberAdd": _obj({"user_id": ID}),
        "MuteSet": _obj({"until": {
            "type": "string", "format": "date-time", "maxLength": 64, "nullable": True, "pattern": _MUTE_DATES,
            "description": "an ISO 8601 time with a zone, whose UTC time is from 0001-01-01 to 9999-12-30 "
                           "(no leap seconds); null unmutes. The pattern leaves out the first and last days' "
                           "dates as written, which an offset can move out of that range",
        }}),
        "MessageCreate": _obj({"text": _text(4000), "client_id": _text(64, nullable=True)}, required=["text"]),
    }


def _error(description: str, header: str | None = None) -> dict:
    response = {"description": description,
                "content": {"application/json": {"schema": _ref("Error")}}}
    if header:
        response["headers"] = {header: {"schema": {"type": "string"}, "required": True}}
    return response


ERRORS = {
    "400": ("BadRequest", _error("invalid_json (body not a JSON object) or invalid_field (message names the field)")),
    "401": ("Unauthorized", _error("unauthorized: missing, malformed or unknown bearer token",
                                   "WWW-Authenticate")),
    "403": ("Forbidden", _error("forbidden: not a member of the chat, not the sender, not the owner")),
    "404": ("NotFound", _error("not_found: no such chat, message, device, user or member")),
    "409": ("Conflict", _error("conflict: the token is registered by this user with another platform")),
    "413": ("TooLarge", _error("too_large: request body over 64 KiB")),
    "415": ("UnsupportedMediaType", _error("unsupported_media_type: the body is not application/json")),
    "500": ("Internal", _error("internal: never expected; the message carries a request id")),
    "503": ("Unavailable", _error("unavailable: the database does not answer, retry later", "Retry-After")),
}
# errors particular to one operation, in place of the shared one for that status
SPECIFIC_ERRORS = {
    "UnknownMembers": _error("invalid_json (body not a JSON object) or invalid_field (message names the field); "
                             "also invalid_field for member_ids naming a user that does not exist, so a body "
                             "that matches the schema can get this 400"),
}


# ------------------------------------------------------------------ operations

def _json(schema_name: str, description: str, location: bool = False) -> dict:
    response = {"description": description,
                "content": {"application/json": {"schema": _ref(schema_name)}}}
    if location:
        response["headers"] = {"Location": {"schema": {"type": "string"}, "required": True,
                                            "description": "the path of the resource"}}
    return response


def _op(operation_id: str, summary: str, responses: dict, errors: str, body: str | None = None,
        params: list | None = None, public: bool = False, specific: dict | None = None) -> dict:
    """One operation; `errors` lists the error statuses it can answer besides 500 and 503.

    `specific` maps a status to a SPECIFIC_ERRORS name that replaces the shared answer for it.
    """
    codes = errors.split() + ["500", "503"]
    if body:
        codes += ["400", "413", "415"]
    if not public:
        codes.append("401")
    operation = {"operationId": operation_id, "summary": summary, "responses": dict(responses)}
    for code in sorted(set(codes)):
        name = (specific or {}).get(code, ERRORS[code][0])
        operation["responses"][code] = {"$ref": f"#/components/responses/{name}"}
    if params:
        operation["parameters"] = params
    if body:
        operation["requestBody"] = {"required": True,
                                    "content": {"application/json": {"schema": _ref(body)}}}
    if public:
        operation["security"] = []
    return operation


def _path_id(name: str) -> dict:
    return {"name": name, "in": "path", "required": True, "schema": ID}


def _query(name: str, schema: dict, description: str) -> dict:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


NO_CONTENT = {"204": {"description": "done"}}


def _paths() -> dict:
    chat, user, device, message = (_path_id(n) for n in ("chat_id", "user_id", "device_id", "message_id"))
    page_id = {"type": "integer", "format": "int64", "minimum": 0, "maximum": MAX_ID}
    return {
        "/v1/users": {"post": _op(
            "createUser", "Sign up; the answer carries the bearer token, once",
            {"201": _json("NewUser", "created")}, "", body="UserCreate", public=True)},
        "/v1/me": {"get": _op("getMe", "The caller", {"200": _json("User", "the caller")}, "")},
        "/v1/devices": {
            "post": _op("registerDevice", "Register a push device of the caller",
                        {"201": _json("Device", "registered (or moved from another user)"),
                         "200": _json("Device", "this user already had it")},
                        "409", body="DeviceCreate"),
            "get": _op("listDevices", "The caller's enabled devices",
                       {"200": _json("DeviceList", "the devices")}, ""),
        },
        "/v1/webpush/key": {"get": _op(
            "webPushKey", "The VAPID public key browsers subscribe with (404 without Web Push)",
            {"200": _json("WebPushKey", "the key")}, "404", public=True)},
        "/v1/devices/{device_id}": {"delete": _op(
            "deleteDevice", "Delete a device (only its owner)", NO_CONTENT, "403 404", params=[device])},
        "/v1/chats": {
            "post": _op("createChat", "Create a chat; the creator is always a member",
                        {"201": _json("Chat", "created", location=True)}, "", body="ChatCreate",
                        specific={"400": "UnknownMembers"}),
            "get": _op("listChats", "Chats the caller is a member of",
                       {"200": _json("ChatList", "the chats")}, ""),
        },
        "/v1/chats/{chat_id}": {"get": _op(
            "getChat", "A chat and its members (members only)", {"200": _json("Chat", "the chat")},
            "403 404", params=[chat])},
        "/v1/chats/{chat_id}/members": {"post": _op(
            "addMember", "Add a member (members only)",
            {"201": _json("Chat", "added; the chat"), "200": _json("Chat", "already a member; the chat")},
            "403 404", body="MemberAdd", params=[chat])},
        "/v1/chats/{chat_id}/members/{user_id}": {"delete": _op(
            "removeMember", "Remove a member: oneself, or anyone for the chat's creator", NO_CONTENT,
            "403 404", params=[chat, user])},
        "/v1/chats/{chat_id}/mute": {"put": _op(
            "muteChat", "Mute the chat's pushes for the caller until a time; null unmutes",
            {"200": _json("Mute", "the mute")}, "403 404", body="MuteSet", params=[chat])},
        "/v1/chats/{chat_id}/messages": {
            "post": _op("postMessage", "Post a message (members only); a known client_id returns the first one",
                        {"201": _json("Message", "posted", location=True),
                         "200": _json("Message", "this client_id was posted already: the first message",
                                      location=True)},
                        "403 404", body="MessageCreate", params=[chat]),
            "get": _op("listMessages", "A page of history (members only): newest first, oldest first with `after`",
                       {"200": _json("MessageList", "the page")}, "400 403 404",
                       params=[chat,
                               _query("before", page_id, "only messages with a smaller id"),
                               _query("after", page_id, "only messages with a greater id (oldest first)"),
                               _query("limit", {"type": "integer", "minimum": 1, "maximum": 200, "default": 50},
                                      "page size")]),
        },
        "/v1/messages/{message_id}": {"get": _op(
            "getMessage", "A message (members only)", {"200": _json("Message", "the message")},
            "403 404", params=[message])},
        "/v1/messages/{message_id}/deliveries": {"get": _op(
            "getDeliveries", "The pushes of a message (the sender only)",
            {"200": _json("Deliveries", "the deliveries")}, "403 404", params=[message])},
        "/healthz": {"get": {
            "operationId": "healthz", "summary": "Liveness of the database and the dispatcher",
            "security": [],
            "responses": {"200": _json("Health", "healthy"), "503": _json("Health", "the database is unreachable"),
                          "500": {"$ref": "#/components/responses/Internal"}},
        }},
        "/metrics": {"get": {
            "operationId": "metrics", "summary": "Prometheus text format", "security": [],
            "responses": {"200": {"description": "the metrics",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}},
                          "500": {"$ref": "#/components/responses/Internal"},
                          "503": {"$ref": "#/components/responses/Unavailable"}},
        }},
        "/openapi.json": {"get": {
            "operationId": "openapi", "summary": "This document", "security": [],
            "responses": {"200": {"description": "the OpenAPI document",
                                  "content": {"application/json": {"schema": {"type": "object"}}}}},
        }},
    }


def _build() -> dict:
    return {
        "openapi": "3.0.3",
        "info": {"title": "chat", "version": "1",
                 "description": "Group chat with push notifications. Errors are "
                                '`{"error": {"code", "message"}}`; times are ISO 8601 UTC with a Z suffix.'},
        "security": [{"bearerAuth": []}],
        "paths": _paths(),
        "components": {
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
            "schemas": _schemas(),
            "responses": {**{name: response for name, response in ERRORS.values()}, **SPECIFIC_ERRORS},
        },
    }


DOCUMENT = _build()


def openapi_document() -> dict:
    """The OpenAPI document served at /openapi.json (shared: do not modify it)."""
    return DOCUMENT
