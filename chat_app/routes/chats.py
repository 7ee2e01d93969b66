"""Chats, their members, and muting."""
from __future__ import annotations

from bottle import request, response

from chat_app import store, validation
from chat_app.errors import forbidden, invalid_field, not_found, unknown_token
from notifier import iso


def load_chat_as_member(ctx, conn, chat_id: str, user_id: int):
    """The chat row when it exists and the user is a member; else 404 or 403."""
    number = validation.path_id(chat_id)
    chat = store.get_chat(conn, number) if number else None
    if chat is None:
        raise not_found("chat")
    if not store.is_member(conn, chat.id, user_id):
        raise forbidden("you are not a member of this chat")
    return chat


def member_caller(ctx, chat_id: str) -> dict:
    """The authenticated caller, checked in one short read to be a member of the chat (401, 404 or
    403 otherwise): what a route that writes to a chat establishes before it reads the body."""
    token_hash = ctx.token_hash()
    number = validation.path_id(chat_id)
    with ctx.lookup() as conn:
        row = store.caller_in_chat(conn, token_hash, number or 0)
    if row is None:
        raise unknown_token()
    if not number or row.chat is None:
        raise not_found("chat")
    if row.member is None:
        raise forbidden("you are not a member of this chat")
    return {"id": row.id, "name": row.name}


def chat_body(conn, chat) -> dict:
    """The API's representation of a chat with its members."""
    return {"id": chat.id, "name": chat.name, "members": store.chat_members(conn, chat.id)}


def register(app, ctx) -> None:
    """Add the chat routes to `app`."""

    @app.post("/v1/chats")
    def create_chat():
        with ctx.read() as conn:
            user = ctx.user(conn)
        body = validation.read_json_object(request, ctx.max_body)
        name = validation.text(body, "name", 64)
        member_ids = validation.id_list(body, "member_ids", validation.MAX_INITIAL_MEMBERS)
        with ctx.write() as conn:
            unknown = set(member_ids) - store.existing_user_ids(conn, member_ids)
            if unknown:
                raise invalid_field("member_ids", f"unknown user ids: {sorted(unknown)[:10]}")
            chat_id = store.create_chat(conn, name, user["id"], member_ids, ctx.clock())
            result = chat_body(conn, store.get_chat(conn, chat_id))
        response.status = 201
        response.set_header("Location", f"/v1/chats/{chat_id}")
        return result

    @app.get("/v1/chats")
    def my_chats():
        with ctx.read() as conn:
            user = ctx.user(conn)
            return {"chats": store.list_chats(conn, user["id"])}

    @app.get("/v1/chats/<chat_id:id>")
    def show_chat(chat_id):
        with ctx.read() as conn:
            user = ctx.user(conn)
            return chat_body(conn, load_chat_as_member(ctx, conn, chat_id, user["id"]))

    @app.post("/v1/chats/<chat_id:id>/members")
    def add_member(chat_id):
        user = member_caller(ctx, chat_id)
        body = validation.read_json_object(request, ctx.max_body)
        new_id = validation.integer_id(body, "user_id")
        with ctx.write() as conn:
            chat = load_chat_as_member(ctx, conn, chat_id, user["id"])
            if not store.existing_user_ids(conn, [new_id]):
                raise not_found("user")
            added = store.add_member(conn, chat.id, new_id, ctx.clock())
            result = chat_body(conn, chat)
        response.status = 201 if added else 200
        return result

    @app.delete("/v1/chats/<chat_id:id>/members/<user_id:id>")
    def remove_member(chat_id, user_id):
        with ctx.write() as conn:
            user = ctx.user(conn)
            chat = load_chat_as_member(ctx, conn, chat_id, user["id"])
            target = validation.path_id(user_id)
            if target != user["id"] and user["id"] != chat.creator_id:
                raise forbidden("only the chat's creator may remove other members")
            if target is None or not store.remove_member(conn, chat.id, target):
                raise not_found("member")
        response.status = 204
        return ""

    @app.put("/v1/chats/<chat_id:id>/mute")
    def mute(chat_id):
        user = member_caller(ctx, chat_id)
        body = validation.read_json_object(request, ctx.max_body)
        until = validation.timestamp_or_null(body, "until")
        with ctx.write() as conn:
            chat = load_chat_as_member(ctx, conn, chat_id, user["id"])
            store.set_muted_until(conn, chat.id, user["id"], until)
        return {"chat_id": chat.id, "muted_until": iso(until)}
