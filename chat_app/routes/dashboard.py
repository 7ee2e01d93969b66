"""The operator dashboard: GET /ops/, its static files and /ops/api/summary, for the people who run
the service (API.md, "Operator dashboard").

Registered only when OPS_PASSWORD is set: without it, /ops/ and everything under it is the app's
JSON 404, as for any unknown route. Everything under /ops/ asks for HTTP Basic authentication
(user `ops`) and is read-only: only GET routes exist, so Bottle answers 405 to any other method.
The page, its script and style, and the chart library (uPlot, from the pinned `uplot-python`
wheel) are served by the app itself, read once at start-up: nothing is loaded from another
origin, and the Content-Security-Policy says so to the browser.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

import sqlalchemy as sa
from bottle import HTTPResponse, request, response

from chat_app.errors import ApiError
import notifier

logger = logging.getLogger(__name__)

USER = b"ops"
CHALLENGE = 'Basic realm="ops"'
SUMMARY_TTL = 3.0  # seconds a worker reuses its last summary: open dashboards cost the database ~nothing
STATIC = Path(__file__).resolve().parent.parent / "static" / "ops"
PAGE_FILES = ("index.html", "dashboard.js", "dashboard.css")
# the chart library: uPlot's browser build and style sheet, as the uplot-python wheel installs them
CHART_DISTRIBUTION = "uplot-python"
CHART_FILES = {"uPlot.iife.js": "uplot/static/uPlot.iife.js", "uPlot.min.css": "uplot/static/uPlot.min.css"}
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".json": "application/json"}

# on every answer under /ops/: nothing cached, nothing but this origin's files run or load, never framed
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def register(app, ctx) -> None:
    """Add the dashboard's routes to `app`, when OPS_PASSWORD is set."""
    if not ctx.settings.ops_enabled:
        return
    password = ctx.settings.ops_password.encode()
    assets = load_assets()
    summary = SummaryCache(SUMMARY_TTL, lambda: _summary_json(ctx))

    def authenticate() -> None:
        if not authorized(request.get_header("Authorization", ""), password):
            raise ApiError(401, "unauthorized", "the dashboard needs the ops user's password",
                           {**SECURITY_HEADERS, "WWW-Authenticate": CHALLENGE})

    @app.get("/ops")
    def bare():
        # the address an operator types: no information in it, so no password asked for yet
        raise HTTPResponse(status=308, headers={**SECURITY_HEADERS, "Location": "/ops/"})

    @app.get("/ops/")
    def page():
        authenticate()
        return _asset(assets, "index.html")

    @app.get("/ops/static/<name>")
    def static(name):
        authenticate()
        if name not in assets or name == "index.html":
            raise _not_found()
        return _asset(assets, name)

    @app.get("/ops/api/summary")
    def api_summary():
        authenticate()
        try:
            body = summary.get()
        except sa.exc.DBAPIError as exc:
            logger.warning("dashboard: database unavailable: %s", type(exc.orig).__name__)
            raise ApiError(503, "unavailable", "the database is unavailable, retry later",
                           {**SECURITY_HEADERS, "Retry-After": "1"}) from None
        return _answer(body, CONTENT_TYPES[".json"])

    @app.get("/ops/<rest:path>")
    def elsewhere(rest):
        authenticate()  # an unauthenticated caller learns nothing, not even which paths exist
        raise _not_found()


def authorized(header: str, password: bytes) -> bool:
    """Whether an Authorization header carries HTTP Basic credentials of the ops user.

    Both the user and the password are compared in constant time (hmac.compare_digest), and both
    always: how long the answer takes says nothing about which part was wrong."""
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    user, colon, given = decoded.partition(b":")
    user_ok = hmac.compare_digest(user, USER)
    password_ok = hmac.compare_digest(given, password)
    return bool(colon) and user_ok and password_ok


def load_assets() -> dict[str, tuple[bytes, str]]:
    """The page's files and the chart library's: {name: (bytes, content type)}. Read once, so a
    missing file stops the start-up (uWSGI's need-app) instead of breaking the page later."""
    assets = {name: (STATIC.joinpath(name).read_bytes(), _content_type(name)) for name in PAGE_FILES}
    for name, data in chart_library().items():
        assets[name] = (data, _content_type(name))
    return assets


def chart_library() -> dict[str, bytes]:
    """uPlot's files from the installed `uplot-python` distribution, found through its record of
    installed files (importlib.metadata): the package itself is not imported (its Python wrapper
    imports numpy, which the service does not need)."""
    installed = {str(path): path for path in metadata.files(CHART_DISTRIBUTION) or ()}
    missing = [path for path in CHART_FILES.values() if path not in installed]
    if missing:
        raise RuntimeError(f"{CHART_DISTRIBUTION} {metadata.version(CHART_DISTRIBUTION)} lacks {missing}: "
                           "install the version pinned in requirements-assets.txt")
    return {name: installed[path].read_binary() for name, path in CHART_FILES.items()}


class SummaryCache:
    """This worker's last summary, reused for `ttl` seconds: ten dashboards polling every 5 s cost
    each worker one set of queries per `ttl`, not one per poll, and the POSTs do not feel them."""

    def __init__(self, ttl: float, build: Callable[[], bytes], monotonic: Callable[[], float] = time.monotonic):
        self.ttl = ttl
        self.build = build
        self.monotonic = monotonic
        self._lock = threading.Lock()
        self._value: bytes | None = None
        self._built_at = 0.0

    def get(self) -> bytes:
        """The cached summary, rebuilt when older than `ttl`."""
        with self._lock:
            if self._value is None or self.monotonic() - self._built_at >= self.ttl:
                self._value = self.build()
                self._built_at = self.monotonic()
            return self._value


def _summary_json(ctx) -> bytes:
    with ctx.read() as conn:
        data = notifier.dashboard_summary(conn, ctx.clock(), notifier.HEARTBEAT_STALE_AFTER,
                                          ctx.settings.webhooks_enabled)
    return json.dumps(data, separators=(",", ":")).encode()


def _asset(assets: dict, name: str) -> bytes:
    data, content_type = assets[name]
    return _answer(data, content_type)


def _answer(body: bytes, content_type: str) -> bytes:
    response.content_type = content_type
    for name, value in SECURITY_HEADERS.items():
        response.set_header(name, value)
    return body


def _not_found() -> ApiError:
    return ApiError(404, "not_found", "no such route", SECURITY_HEADERS)


def _content_type(name: str) -> str:
    return CONTENT_TYPES[Path(name).suffix]
