"""The bare floor of bench.floor: `module = bench.floor_app:application` under the project's uwsgi.ini.

The least a correct POST /v1/chats/{id}/messages can do on this schema, written by hand: Bottle and
the driver, nothing of ours (no SQLAlchemy, no pool, no write queue, no dispatcher). Per request:
the bearer token's SHA-256 looked up, the membership checked, then BEGIN IMMEDIATE, the message and
its one outbox row (a `push_jobs` row) inserted, COMMIT, 201 with the message as JSON. GET reads a
page of history the same way (auth, membership, SELECT ... LIMIT, JSON).

DATABASE_URL picks the driver: `sqlite:///path` (the standard library's sqlite3: WAL,
synchronous=NORMAL, foreign keys on, a 10 s busy timeout, as notifier.db sets them) or
`postgresql://...` (psycopg 3, autocommit, one transaction per write). One connection per worker,
opened on the worker's first request (uWSGI loads this module in the master, then forks). The
database must exist with the product's schema (bench.floor migrates and seeds it).
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from datetime import datetime, timezone

from bottle import Bottle, HTTPResponse, request, response

DATABASE_URL = os.environ["DATABASE_URL"]
POSTGRES = DATABASE_URL.startswith("postgresql")

if POSTGRES:
    import psycopg  # imported in the master, before the fork; connections are opened in the workers

_connection = {"pid": None, "conn": None}


def _connect():
    if POSTGRES:
        return psycopg.connect(DATABASE_URL, autocommit=True)
    conn = sqlite3.connect(DATABASE_URL[len("sqlite:///"):], isolation_level=None, timeout=10.0)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def connection():
    """This worker's one connection (never one opened by another process)."""
    if _connection["pid"] != os.getpid():
        _connection["conn"], _connection["pid"] = _connect(), os.getpid()
    return _connection["conn"]


def _sql(text: str) -> str:
    return text.replace("?", "%s") if POSTGRES else text


USER = _sql("SELECT id FROM users WHERE token_hash = ?")
MEMBER = _sql("SELECT 1 FROM members WHERE chat_id = ? AND user_id = ?")
INSERT_MESSAGE = _sql("INSERT INTO messages (chat_id, sender_id, text, client_id, created_at) "
                      "VALUES (?, ?, ?, NULL, ?) RETURNING id")
INSERT_JOB = _sql("INSERT INTO push_jobs (message_id, state, created_at) VALUES (?, 'pending', ?)")
PAGE = _sql("SELECT id, chat_id, sender_id, text, client_id, created_at FROM messages "
            "WHERE chat_id = ? ORDER BY id DESC LIMIT ?")


def _error(status: int, code: str, message: str) -> HTTPResponse:
    return HTTPResponse(json.dumps({"error": {"code": code, "message": message}}), status,
                        {"Content-Type": "application/json"})


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _member(conn, chat_id: int) -> int:
    """The caller's user id, checked to be a member of the chat (401 or 403 otherwise)."""
    scheme, _, token = request.get_header("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise _error(401, "unauthorized", "missing or malformed bearer token")
    row = conn.execute(USER, (hashlib.sha256(token.strip().encode()).hexdigest(),)).fetchone()
    if row is None:
        raise _error(401, "unauthorized", "unknown bearer token")
    if conn.execute(MEMBER, (chat_id, row[0])).fetchone() is None:
        raise _error(403, "forbidden", "you are not a member of this chat")
    return row[0]


def _message(row) -> dict:
    return {"id": row[0], "chat_id": row[1], "sender_id": row[2], "text": row[3], "client_id": row[4],
            "created_at": _iso(row[5])}


def _post(chat_id: int):
    conn = connection()
    user_id = _member(conn, chat_id)
    try:
        body = json.loads(request.body.read(64 * 1024 + 1))
        text = body["text"]
    except (ValueError, TypeError, KeyError):
        raise _error(400, "invalid_json", "a JSON object with a text is required") from None
    if not isinstance(text, str) or not 0 < len(text) <= 4000:
        raise _error(400, "invalid", "text must be 1 to 4000 characters")
    now = time.time()
    if POSTGRES:
        with conn.transaction():
            message_id = conn.execute(INSERT_MESSAGE, (chat_id, user_id, text, now)).fetchone()[0]
            conn.execute(INSERT_JOB, (message_id, now))
    else:
        conn.execute("BEGIN IMMEDIATE")
        try:
            message_id = conn.execute(INSERT_MESSAGE, (chat_id, user_id, text, now)).fetchone()[0]
            conn.execute(INSERT_JOB, (message_id, now))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    response.status = 201
    response.set_header("Location", f"/v1/messages/{message_id}")
    return _message((message_id, chat_id, user_id, text, None, now))


def _history(chat_id: int):
    conn = connection()
    _member(conn, chat_id)
    limit = min(max(int(request.query.get("limit", 50)), 1), 200)
    return {"messages": [_message(row) for row in conn.execute(PAGE, (chat_id, limit)).fetchall()]}


def create_app() -> Bottle:
    app = Bottle(autojson=True)
    app.route("/v1/chats/<chat_id:int>/messages", "POST", _post)
    app.route("/v1/chats/<chat_id:int>/messages", "GET", _history)
    app.route("/healthz", "GET", lambda: {"status": "ok"})
    return app


application = create_app()
