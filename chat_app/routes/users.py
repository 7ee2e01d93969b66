"""POST /v1/users (sign-up) and GET /v1/me."""
from __future__ import annotations

import secrets

from bottle import request, response

from chat_app import store, validation


def register(app, ctx) -> None:
    """Add the user routes to `app`."""

    @app.post("/v1/users")
    def sign_up():
        body = validation.read_json_object(request, ctx.max_body)
        name = validation.text(body, "name", 64)
        token = secrets.token_urlsafe(32)  # shown once; only its hash is kept
        with ctx.write() as conn:
            user = store.create_user(conn, name, store.hash_token(token), ctx.clock())
        response.status = 201
        return {**user, "token": token}

    @app.get("/v1/me")
    def me():
        with ctx.read() as conn:
            return ctx.user(conn)
