"""Helpers for the in-process tests of the web layer: a WebTest app that checks every answer
against /openapi.json, the error assertion, and row counts to prove a failed request wrote nothing."""
from __future__ import annotations

import re
from dataclasses import dataclass

import sqlalchemy as sa
from openapi_schema_validator import OAS30Validator
from webtest import TestApp

from chat_app.openapi import DOCUMENT
from notifier import schema

API_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@dataclass(frozen=True)
class User:
    """A signed-up user as the tests see it."""

    id: int
    name: str
    token: str

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}


def assert_error(res, status: int, code: str, field: str | None = None) -> None:
    """The answer is API.md's error: this status and code, JSON, and (for invalid_field) naming the field."""
    assert res.status_int == status, res.body[:300]
    assert res.content_type == "application/json", res.content_type
    body = res.json
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    if field is not None:
        assert body["error"]["message"].startswith(f"{field}:"), body


def row_counts(engine: sa.Engine) -> dict[str, int]:
    """Rows in every table, to compare before and after a request that must not write."""
    with engine.connect() as conn:
        return {name: conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
                for name, table in schema.metadata.tables.items()}


def schema_validator(schema: dict) -> OAS30Validator:
    """A validator for a schema of the document (its $refs resolve against the document's components)."""
    return OAS30Validator({**schema, "components": DOCUMENT["components"]},
                          format_checker=OAS30Validator.FORMAT_CHECKER)


def _operations() -> list[tuple[re.Pattern, str, dict]]:
    operations = []
    for path, item in DOCUMENT["paths"].items():
        pattern = re.compile("^" + re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(path)) + "$")
        for method, operation in item.items():
            operations.append((pattern, method.upper(), operation))
    return operations


OPERATIONS = _operations()


def check_against_openapi(method: str, path: str, res) -> None:
    """Fail unless the answer is one the OpenAPI document describes for this operation.

    Requests outside the document (unknown route, wrong method) must still get the JSON error shape.
    """
    method = "GET" if method == "HEAD" else method
    operation = next((op for pattern, m, op in OPERATIONS if m == method and pattern.match(path)), None)
    if operation is None:
        if res.status_int >= 400 and method != "HEAD":
            assert_error(res, res.status_int, res.json["error"]["code"])
        return
    where = f"{method} {path} -> {res.status}"
    response = operation["responses"].get(str(res.status_int))
    assert response is not None, f"{where}: status not in /openapi.json"
    if "$ref" in response:
        response = DOCUMENT["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    for name, header in response.get("headers", {}).items():
        if header.get("required"):
            assert name in res.headers, f"{where}: no {name} header"
    if "content" not in response:
        assert res.body == b"", f"{where}: a body where none is documented"
        return
    (media_type, content), = response["content"].items()
    assert res.content_type == media_type, f"{where}: {res.content_type}, documented {media_type}"
    if media_type == "application/json" and method != "HEAD":
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in schema_validator(content["schema"]).iter_errors(res.json)]
        assert not errors, f"{where}: the body does not match /openapi.json: {errors}"


class ContractTestApp(TestApp):
    """A WebTest app whose every answer is checked against the OpenAPI document."""

    def do_request(self, req, status=None, expect_errors=None):
        method, path = req.method, req.path_info  # before Bottle rewrites the environ's PATH_INFO
        res = super().do_request(req, status=status, expect_errors=expect_errors)
        check_against_openapi(method, path, res)
        return res
