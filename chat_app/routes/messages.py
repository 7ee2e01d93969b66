"""Posting messages (the push trigger), history, and delivery reports."""
from __future__ import annotations

import logging

from bottle import request, response

from chat_app import store, validation
from chat_app.errors import ApiError, forbidden, not_found
from chat_app.routes.chats import load_chat_as_member, member_caller
from notifier import delivery_report

logger = logging.getLogger(__name__)


def register(app, ctx) -> None:
    """Add the message routes to `app`."""

    @app.post("/v1/chats/<chat_id:id>/messages")
    def post_message(chat_id):
        user = member_caller(ctx, chat_id)
        body = validation.read_json_object(request, ctx.max_body)
        text = validation.text(body, "text", 4000)
        client_id = validation.text(body, "client_id", 64, required=False)
        status, message = _store(ctx, chat_id, user["id"], text, client_id)
        if status == 201:
            _wake(ctx)
        response.status = status
        response.set_header("Location", f"/v1/messages/{message['id']}")
        return message

    @app.get("/v1/chats/<chat_id:id>/messages")
    def history(chat_id):
        with ctx.lookup() as conn:
            user = ctx.user(conn)
            chat = load_chat_as_member(ctx, conn, chat_id, user["id"])
            before = validation.query_id(request.query, "before")
            after = validation.query_id(request.query, "after")
            limit = validation.query_limit(request.query, 50, 200)
            return {"messages": store.list_messages(conn, chat.id, before, after, limit)}

    @app.get("/v1/messages/<message_id:id>")
    def show_message(message_id):
        with ctx.read() as conn:
            user = ctx.user(conn)
            return _message_for_member(conn, message_id, user["id"])

    @app.get("/v1/messages/<message_id:id>/deliveries")
    def deliveries(message_id):
        with ctx.read() as conn:
            user = ctx.user(conn)
            message = _message_for_member(conn, message_id, user["id"])
            if message["sender_id"] != user["id"]:
                raise forbidden("only the sender may see a message's deliveries")
            return {"message_id": message["id"], **delivery_report(conn, message["id"])}


def _store(ctx, chat_id: str, sender_id: int, text: str, client_id: str | None) -> tuple[int, dict]:
    """Insert the message and its push job in one transaction that only writes; a known client_id
    returns the first message (200)."""
    number = validation.path_id(chat_id)
    for _ in range(2):
        with ctx.write() as conn:
            message = store.insert_message_with_job(conn, number, sender_id, text, client_id, ctx.clock())
        if message is not None:
            return 201, message
        # nothing inserted: the sender left the chat since the check (403), or used this client_id before
        with ctx.read() as conn:
            load_chat_as_member(ctx, conn, chat_id, sender_id)
            existing = store.message_by_client_id(conn, number, sender_id, client_id) if client_id else None
        if existing is not None:
            return 200, existing
        # the first request with this client_id rolled back meanwhile: this one may go in now
    raise ApiError(409, "conflict", "a request with this client_id is being processed; retry")


def _wake(ctx) -> None:
    """Nudge the dispatcher. The message is already durable: a failed wake-up only delays its pushes."""
    try:
        ctx.wake()
    except Exception:  # noqa: BLE001 - the outbox keeps the job; the next wake-up or start takes it
        logger.exception("chat_app: could not wake the dispatcher; the push job stays queued")


def _message_for_member(conn, message_id: str, user_id: int) -> dict:
    number = validation.path_id(message_id)
    message = store.get_message(conn, number) if number else None
    if message is None:
        raise not_found("message")
    if not store.is_member(conn, message["chat_id"], user_id):
        raise forbidden("you are not a member of this message's chat")
    return message
