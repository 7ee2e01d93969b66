"""The naive ways to push from a Bottle handler, for comparison: `module = bench.baselines:application`.

Same app, same storage, same provider classes as the service; only `POST /v1/chats/{id}/messages`
is replaced (BENCH_BASELINE picks the variant):

- ``inline``: the handler looks up the recipients, sends every push, records the outcomes, then
  answers. Each worker keeps one event loop and its providers across requests, so connections are
  reused (the strongest form of inline sending, not a strawman).
- ``thread``: the handler stores the message, starts a `threading.Thread` that does the same
  fan-out, and answers. Each thread runs its own event loop, so it opens its own APNs connection
  (an asyncio client belongs to one loop); the FCM provider (a thread pool) is shared per worker.
- ``process``: the handler stores the message, starts a new `multiprocessing.Process` (fork) that
  opens its own database and provider connections (new TLS, new APNs JWT, new OAuth token), sends,
  records and exits; the handler does not wait for it (shared/UWSGI.md lists what that breaks).

The outcome of each delivery is recorded in `deliveries` in one bulk insert, as the service does.
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import threading
import time

import sqlalchemy as sa
from bottle import request, response

from chat_app import validation
from chat_app.app import create_app
from chat_app.routes.chats import load_chat_as_member
from notifier import db, model, schema
from notifier.config import load_settings, resolve_database_url
from notifier.model import DeliveryState, Outcome, Platform, Push
from notifier.providers import apns as _apns, fcm as _fcm  # noqa: F401 - imported once, before uWSGI forks

logger = logging.getLogger("bench.baselines")
logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s")

VARIANT = os.environ.get("BENCH_BASELINE", "inline")
if VARIANT not in ("inline", "thread", "process"):
    raise SystemExit(f"BENCH_BASELINE must be inline, thread or process, not {VARIANT!r}")

_STATE = {Outcome.SENT: DeliveryState.SENT, Outcome.SKIPPED: DeliveryState.SKIPPED}


def recipients(conn, message: dict, now: float) -> list[Push]:
    """Every enabled device of every other, unmuted member: the service's expansion, done in Python."""
    m, d, u, c = schema.members, schema.devices, schema.users, schema.chats
    chat_name = conn.execute(sa.select(c.c.name).where(c.c.id == message["chat_id"])).scalar_one()
    sender_name = conn.execute(sa.select(u.c.name).where(u.c.id == message["sender_id"])).scalar_one()
    rows = conn.execute(
        sa.select(d.c.id, d.c.platform, d.c.token, d.c.app)
        .join(m, m.c.user_id == d.c.user_id)
        .where(m.c.chat_id == message["chat_id"], m.c.user_id != message["sender_id"], d.c.enabled.is_(True),
               sa.or_(m.c.muted_until.is_(None), m.c.muted_until <= now))
    )
    return [Push(delivery_id=0, message_id=message["id"], chat_id=message["chat_id"], chat_name=chat_name,
                 sender_id=message["sender_id"], sender_name=sender_name, text=message["text"], device_id=r.id,
                 platform=Platform(r.platform), token=r.token, app=r.app) for r in rows]


async def send_all(providers: dict, pushes: list[Push], concurrency: int) -> list:
    limit = asyncio.Semaphore(concurrency)

    async def one(push):
        async with limit:
            return push, await providers[push.platform].send(push)

    return await asyncio.gather(*(one(p) for p in pushes))


def record(engine, results, now: float) -> None:
    rows = [{"message_id": p.message_id, "device_id": p.device_id, "platform": p.platform.value,
             "state": _STATE.get(r.outcome, DeliveryState.FAILED).value, "attempts": 1, "next_attempt_at": now,
             "last_status": r.status, "last_reason": r.reason,
             "sent_at": now if r.outcome is Outcome.SENT else None, "created_at": now} for p, r in results]
    if rows:
        with db.writer(engine).begin() as conn:
            conn.execute(schema.deliveries.insert(), rows)


def fan_out(engine, providers: dict, message: dict, concurrency: int, loop=None) -> None:
    """Look up recipients, send, record: the whole naive fan-out of one message."""
    now = time.time()
    with engine.connect() as conn:
        pushes = recipients(conn, message, now)
    coroutine = send_all(providers, pushes, concurrency)
    results = loop.run_until_complete(coroutine) if loop is not None else asyncio.run(coroutine)
    record(engine, results, time.time())


class Worker:
    """Per-process state, built lazily after uWSGI forked the worker."""

    def __init__(self, settings):
        self.settings = settings
        self.pid = None
        self.loop = None
        self.providers = None
        self.fcm = None

    def ensure(self):
        if self.pid != os.getpid():
            self.pid = os.getpid()
            self.loop = self.providers = self.fcm = None
        return self

    def inline_providers(self) -> dict:
        from notifier.providers import build_providers
        if self.loop is None:
            self.loop = asyncio.new_event_loop()
            self.providers = build_providers(self.settings)
        return self.providers

    def shared_fcm(self):
        from notifier.providers import build_providers
        if self.fcm is None:
            self.fcm = build_providers(self.settings)[Platform.FCM]
        return self.fcm


def _thread_fan_out(engine, settings, worker: Worker, message: dict) -> None:
    try:
        # an asyncio APNs client belongs to one event loop: this thread's; pyfcm's is thread-safe
        providers = {Platform.APNS: _apns.APNsProvider(settings), Platform.FCM: worker.shared_fcm()}

        async def run():
            try:
                return await send_all(providers, pushes, settings.push_concurrency)
            finally:
                await providers[Platform.APNS].close()

        now = time.time()
        with engine.connect() as conn:
            pushes = recipients(conn, message, now)
        results = asyncio.run(run())
        record(engine, results, time.time())
    except Exception:  # noqa: BLE001 - a naive thread has nobody to report to
        logger.exception("baseline thread: fan-out of message %s failed", message["id"])


def _process_fan_out(settings, message: dict) -> None:
    from notifier.providers import build_providers
    engine = db.make_engine(resolve_database_url(settings.database_url))
    providers = build_providers(settings)

    async def run():
        try:
            return await send_all(providers, pushes, settings.push_concurrency)
        finally:
            for provider in providers.values():
                await provider.close()

    now = time.time()
    with engine.connect() as conn:
        pushes = recipients(conn, message, now)
    results = asyncio.run(run())
    record(engine, results, time.time())
    engine.dispose()


def build():
    settings = load_settings()
    app = create_app(settings, wake=lambda: None)
    ctx = app.config["chat.context"]
    worker = Worker(settings)

    @app.post("/v1/chats/<chat_id:id>/messages")
    def post_message(chat_id):
        with ctx.read() as conn:
            user = ctx.user(conn)
            load_chat_as_member(ctx, conn, chat_id, user["id"])
        body = validation.read_json_object(request, ctx.max_body)
        text = validation.text(body, "text", 4000)
        client_id = validation.text(body, "client_id", 64, required=False)
        with ctx.write() as conn:
            chat = load_chat_as_member(ctx, conn, chat_id, user["id"])
            row = conn.execute(schema.messages.insert().values(
                chat_id=chat.id, sender_id=user["id"], text=text, client_id=client_id, created_at=time.time(),
            ).returning(*schema.messages.c)).one()
        message = {"id": row.id, "chat_id": row.chat_id, "sender_id": row.sender_id, "text": row.text,
                   "client_id": row.client_id, "created_at": model.iso(row.created_at)}
        state = worker.ensure()
        if VARIANT == "inline":
            providers = state.inline_providers()
            fan_out(ctx.engine, providers, message, settings.push_concurrency, loop=state.loop)
        elif VARIANT == "thread":
            threading.Thread(target=_thread_fan_out, args=(ctx.engine, settings, state, message),
                             daemon=True).start()
        else:
            multiprocessing.Process(target=_process_fan_out, args=(settings, message)).start()
        response.status = 201
        response.set_header("Location", f"/v1/messages/{message['id']}")
        return message

    return app


application = build()
