"""The application factory: builds a Bottle app around one Settings and one Engine."""
from __future__ import annotations

import functools
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import sqlalchemy as sa
from bottle import Bottle, HTTPResponse, request

from chat_app import store
from chat_app.errors import ApiError, error_body, error_response, internal_error_response, unknown_token
from chat_app.routes import chats, dashboard, devices, messages, ops, users
import notifier
from notifier import Settings, Waker, resolve_database_url

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024


@dataclass
class Context:
    """What every route needs: the engine, the settings, the clock and the dispatcher's wake-up."""

    engine: sa.Engine
    settings: Settings
    wake: Callable[[], None]
    clock: Callable[[], float] = time.time
    max_body: int = MAX_BODY_BYTES

    @contextmanager
    def read(self) -> Iterator[sa.Connection]:
        """A read-only transaction."""
        with self.engine.connect() as conn:
            yield conn

    @contextmanager
    def lookup(self) -> Iterator[sa.Connection]:
        """Reads that need no snapshot across statements (the request path's checks and a history
        page): on PostgreSQL without a transaction around them, one round trip per statement
        instead of three (BEGIN, the query, ROLLBACK). On SQLite, read() already is that when the
        statements run on the driver (store's DriverStatements)."""
        with notifier.autocommit(self.engine) as conn:
            yield conn

    def __post_init__(self):
        self._writer = notifier.writer(self.engine)  # once: a Writer is safe across forks (Writer.begin)

    @contextmanager
    def write(self) -> Iterator[sa.Connection]:
        """A write transaction: committed when the block ends, rolled back when it raises."""
        with self._writer.begin() as conn:
            yield conn

    def user(self, conn: sa.Connection) -> dict:
        """The authenticated caller, or a 401."""
        user = store.user_by_token_hash(conn, self.token_hash())
        if user is None:
            raise unknown_token()
        return user

    @staticmethod
    def token_hash() -> str:
        """The stored form of the request's bearer token, or a 401 when there is none."""
        header = request.get_header("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "unauthorized", "missing or malformed bearer token",
                           {"WWW-Authenticate": "Bearer"})
        return store.hash_token(token.strip())


def create_app(settings: Settings, wake: Callable[[], None] | None = None,
               engine: sa.Engine | None = None) -> Bottle:
    """Build the app; first upgrades the database to the newest schema (creating it when empty).

    `wake` defaults to the notifier's waker. Under uWSGI this runs once, in the master, before the
    workers fork; several hosts starting at once take turns (notifier.migrate).
    """
    engine = engine or notifier.make_engine(resolve_database_url(settings.database_url))
    notifier.migrate(engine)
    engine.dispose()  # uWSGI may fork workers from here: let each open its own connections
    app = Bottle(catchall=True, autojson=True)
    if wake is None:
        waker = Waker(settings, engine)
        wake = waker.wake
        # a dispatcher this worker started and that has exited is reaped on the next request,
        # whatever its route, so it never lingers as a zombie
        app.add_hook("after_request", waker.reap)
        app.config["chat.waker"] = waker  # the WSGI entry point runs its watchdog on a timer
    ctx = Context(engine=engine, settings=settings, wake=wake)

    app.config["chat.context"] = ctx
    app.install(_json_errors)
    # `<name:id>`: ASCII digits, handed to the route as text for validation.path_id (Bottle's `int`
    # also takes '-1' and non-ASCII digits, and answers an HTML 400 to more than 4300 digits)
    app.router.add_filter("id", lambda _conf: (r"[0-9]+", None, None))
    for module in (users, devices, chats, messages, ops, dashboard):
        module.register(app, ctx)
    for status, code, message in (
        (400, "invalid_json", "the request body could not be read"),  # Bottle's own: a malformed chunked body
        (404, "not_found", "no such route"),
        (405, "method_not_allowed", "method not allowed on this route"),
        (413, "too_large", "request body over the limit"),
    ):
        app.error_handler[status] = _static_error(code, message)
    app.error_handler[500] = _unhandled
    return app


def _json_errors(callback):
    """Plugin: ApiError -> its JSON; a database that does not answer -> 503; anything else -> 500."""
    @functools.wraps(callback)
    def wrapper(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except HTTPResponse:
            raise
        except ApiError as exc:
            return error_response(exc)
        except sa.exc.OperationalError as exc:
            logger.warning("chat_app: database unavailable: %s", type(exc.orig).__name__)
            return error_response(ApiError(503, "unavailable", "the database is unavailable, retry later",
                                           {"Retry-After": "1"}))
        except sa.exc.DBAPIError as exc:
            if exc.connection_invalidated:
                return error_response(ApiError(503, "unavailable", "the database connection was lost, retry later",
                                               {"Retry-After": "1"}))
            return internal_error_response(exc)
        except Exception as exc:  # noqa: BLE001 - the one place that turns surprises into a 500
            return internal_error_response(exc)
    return wrapper


def _static_error(code: str, message: str):
    def handler(error):
        error.content_type = "application/json"
        return error_body(code, message)
    return handler


def _unhandled(error):
    response = internal_error_response(error.exception)
    error.content_type = "application/json"
    return response.body
