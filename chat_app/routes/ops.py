"""Operations routes: /healthz, /metrics, /openapi.json."""
from __future__ import annotations

import logging

import sqlalchemy as sa
from bottle import response

from chat_app.openapi import openapi_document
import notifier

logger = logging.getLogger(__name__)


def register(app, ctx) -> None:
    """Add the operations routes to `app`."""

    @app.get("/healthz")
    def healthz():
        now = ctx.clock()
        try:
            with ctx.read() as conn:
                notifier.ping(conn)
                depth = notifier.queue_depth(conn, now)
                status = notifier.dispatcher_status(conn, now, stale_after=notifier.HEARTBEAT_STALE_AFTER)
                webhooks = notifier.webhook_backlog(conn, now)
        except sa.exc.DBAPIError as exc:
            logger.warning("healthz: database unreachable: %s", type(exc.orig).__name__)
            response.status = 503
            return {"status": "unavailable", "db": "unreachable", "dispatcher": {"alive": None},
                    "error": {"code": "unavailable", "message": "the database is unreachable"}}
        host = ctx.settings.push_host_id
        on_this_host = [d for d in status["alive"] if d["host_id"] == host]
        return {
            "status": "ok",
            "db": "ok",
            "dispatcher": {"alive": bool(on_this_host), "host_id": host, "instances": status["alive"],
                           "starts": status["starts"], **depth},
            "webhooks": {"enabled": ctx.settings.webhooks_enabled, "backlog": webhooks["pending"],
                         "oldest_pending_age": webhooks["oldest_pending_age"]},
        }

    @app.get("/metrics")
    def prometheus():
        body, content_type = notifier.render_metrics(ctx.engine, ctx.settings, ctx.clock())
        response.content_type = content_type
        return body

    @app.get("/openapi.json")
    def openapi():
        return openapi_document()
