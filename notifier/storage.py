"""The schema and every query of the service, on SQLAlchemy Core 2.x.

One module owns the tables so the web layer and the dispatcher agree on them.
It imports nothing from either: chat_app -> notifier -> storage, never back.

Times are stored as UTC epoch seconds (float): they compare the same way on
SQLite and PostgreSQL, and the dispatcher's `now` stays a plain number.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import threading
import weakref
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from notifier.model import DeliveryState, Platform, Push

logger = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().with_name("migrations")  # Alembic's env.py and versions/
# the newest revision in migrations/versions/: a database already there starts without importing
# Alembic (0.15-0.2 s of every start and reload); migrate() refuses to run if this is stale
SCHEMA_HEAD = "0002"
MIGRATION_LOCK = 7311001  # PostgreSQL advisory lock key for schema changes (the first release's, kept)
ID_CHUNK = 5_000  # ids per IN (...) list: under SQLite's 32,766 bound parameters, and small for PostgreSQL
WAL_SAFETY_PAGES = 10_000  # SQLite checkpoints inside a commit only past this (40 MB of WAL)
NOTIFY_CHANNEL = "chat_push_jobs"  # PostgreSQL LISTEN/NOTIFY channel that wakes dispatchers on every host

# the tables as the code uses them; notifier/migrations/ changes a database to match, one revision at a time
metadata = sa.MetaData()
# 64-bit ids on PostgreSQL (a busy service passes 2**31 deliveries); on SQLite an INTEGER primary
# key is the 64-bit rowid already, and must stay INTEGER to be one
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

users = sa.Table(
    "users", metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("created_at", sa.Double, nullable=False),
)

devices = sa.Table(
    "devices", metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("user_id", Id, sa.ForeignKey("users.id"), nullable=False, index=True),
    sa.Column("platform", sa.String(8), nullable=False),
    sa.Column("token", sa.String(4096), nullable=False),
    sa.Column("app", sa.String(255)),
    sa.Column("enabled", sa.Boolean, nullable=False, default=True),
    # why the device stopped receiving: "unregistered" (the provider said so), "deleted" (the user)
    sa.Column("disabled_reason", sa.String(64)),
    sa.Column("created_at", sa.Double, nullable=False),
    # a token identifies one phone whatever the platform: it can belong to one user at a time
    sa.UniqueConstraint("token", name="uq_devices_token"),
)

chats = sa.Table(
    "chats", metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("creator_id", Id, sa.ForeignKey("users.id"), nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
)

members = sa.Table(
    "members", metadata,
    sa.Column("chat_id", Id, sa.ForeignKey("chats.id"), primary_key=True),
    sa.Column("user_id", Id, sa.ForeignKey("users.id"), primary_key=True),
    sa.Column("muted_until", sa.Double),
    sa.Column("joined_at", sa.Double, nullable=False),
    sa.Index("ix_members_user", "user_id", "chat_id"),
)

messages = sa.Table(
    "messages", metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("chat_id", Id, sa.ForeignKey("chats.id"), nullable=False),
    sa.Column("sender_id", Id, sa.ForeignKey("users.id"), nullable=False),
    sa.Column("text", sa.Text, nullable=False),
    sa.Column("client_id", sa.String(64)),
    sa.Column("created_at", sa.Double, nullable=False),
    # history pages walk (chat_id, id); retried POSTs look up (chat_id, sender_id, client_id)
    sa.Index("ix_messages_chat", "chat_id", "id"),
    sa.UniqueConstraint("chat_id", "sender_id", "client_id", name="uq_messages_client_id"),
)

push_jobs = sa.Table(
    "push_jobs", metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("message_id", Id, sa.ForeignKey("messages.id"), nullable=False, unique=True),
    sa.Column("state", sa.String(16), nullable=False),  # pending -> expanded
    # where the chunked expansion stands: the last (user_id, device_id) turned into a delivery. Kept
    # in the row, committed with the deliveries it covers, so any dispatcher on any host can expand
    # the next chunk, and a crash loses nothing
    sa.Column("cursor_user", Id),
    sa.Column("cursor_device", Id),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Index("ix_push_jobs_state", "state", "id"),
)

deliveries = sa.Table(
    "deliveries", metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("message_id", Id, sa.ForeignKey("messages.id"), nullable=False),
    sa.Column("device_id", Id, sa.ForeignKey("devices.id"), nullable=False),
    sa.Column("platform", sa.String(8), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("next_attempt_at", sa.Double, nullable=False),
    sa.Column("lease_owner", sa.String(128)),
    sa.Column("lease_until", sa.Double),
    sa.Column("last_status", sa.Integer),
    sa.Column("last_reason", sa.String(255)),
    sa.Column("sent_at", sa.Double),
    # the host whose dispatcher made the last attempt (shows how several hosts share the work)
    sa.Column("handled_by", sa.String(128)),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.UniqueConstraint("message_id", "device_id", name="uq_deliveries_message_device"),
    # the claim query: pending rows in due order
    sa.Index("ix_deliveries_due", "state", "next_attempt_at"),
)

dispatchers = sa.Table(
    "dispatchers", metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("host_id", sa.String(128), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started_at", sa.Double, nullable=False),
    sa.Column("heartbeat_at", sa.Double, nullable=False),
    sa.Column("stopped_at", sa.Double),
    sa.Index("ix_dispatchers_host", "host_id", "heartbeat_at"),
)


# ---------------------------------------------------------------- engine and schema

def make_engine(url: str, **kwargs) -> Engine:
    """An Engine for `url`; SQLite gets WAL, foreign keys, a busy timeout and IMMEDIATE writes."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    if url.startswith("postgresql"):
        kwargs.setdefault("pool_pre_ping", True)  # reconnect after the server restarts
        kwargs.setdefault("pool_size", 4)
        kwargs.setdefault("max_overflow", 4)
    engine = sa.create_engine(url, **kwargs)
    _never_share_across_fork(engine)
    if engine.dialect.name == "sqlite":
        _tune_sqlite(engine)
        _sqlite_engines.add(engine)
    return engine


# every SQLite engine of this process, so a fork can close their connections first
_sqlite_engines: "weakref.WeakSet[Engine]" = weakref.WeakSet()


def close_sqlite_before_fork() -> bool:
    """Close every pooled SQLite connection of this process; False if one is in use right now.

    No SQLite state may cross a fork. SQLite keeps, per process, a table of the POSIX locks its
    connections hold on each file; fork() copies the table but not the locks. A child that opens
    the same database then believes it holds locks it does not, and the parent's last connection to
    close, seeing no other user, checkpoints and deletes the WAL under the child (measured: after a
    uWSGI reload the surviving dispatcher wrote into a deleted -wal and saw no new message). With
    every connection closed, SQLite frees that table, and the child starts from nothing. Reopening
    costs the worker one connect on its next request (about 0.8 ms), only when it forks.
    """
    clean = True
    for engine in list(_sqlite_engines):
        checked_out = getattr(engine.pool, "checkedout", lambda: 0)()
        if checked_out:
            clean = False
        engine.dispose()  # closes the idle connections; one in use stays open until returned
    return clean


def _never_share_across_fork(engine: Engine) -> None:
    """A forked process (uWSGI worker, PushProcess) never uses a connection its parent opened.

    SQLAlchemy's documented recipe: remember the pid that opened each connection; on checkout in
    another process, drop the connection without closing it (closing would end the parent's
    session on a PostgreSQL socket both share) and open a new one.
    """
    @event.listens_for(engine, "connect")
    def on_connect(_dbapi_connection, record):
        record.info["pid"] = os.getpid()

    @event.listens_for(engine, "checkout")
    def on_checkout(_dbapi_connection, record, proxy):
        if record.info.get("pid") != os.getpid():
            record.dbapi_connection = proxy.dbapi_connection = None
            raise sa.exc.DisconnectionError("connection opened by another process; reconnecting")


def _tune_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection, _record):
        # Let us issue BEGIN ourselves: pysqlite's implicit BEGIN is DEFERRED, and a deferred
        # transaction that reads then writes fails at once with "database is locked" instead of
        # waiting on the busy timeout when another process writes.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.execute("PRAGMA synchronous=NORMAL")  # WAL stays durable against process crashes
        # SQLite copies the WAL back into the database inside whichever commit crosses its threshold,
        # while that writer still holds the write queue: every other writer waited for it (15-20 ms
        # for 2,600 pages here, far longer when the dispatcher, at low priority, was the one).
        # The dispatcher checkpoints outside the queue instead (checkpoint()); this is a safety net.
        cursor.execute(f"PRAGMA wal_autocheckpoint={WAL_SAFETY_PAGES}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("write") else "BEGIN")


class Writer:
    """Write transactions: `with writer(engine).begin() as conn:`.

    On SQLite the write lock is taken up front (BEGIN IMMEDIATE), and writers first queue on an
    flock of a file beside the database. SQLite's own wait for a busy lock is a sleep-and-retry
    loop (1, 2, 5, 10 ... 100 ms): under a steady stream of short transactions from four uWSGI
    workers and the dispatcher, a POST could sleep through many lock hand-overs and its p99 grew
    with the dispatcher's write rate. A waiter on flock is woken by the kernel the moment the
    holder is done. The flock is only a queue: SQLite's lock still guards the data, so a process
    that does not take it (the sqlite3 shell) is safe, only not queued.
    """

    def __init__(self, engine: Engine):
        self.engine = engine.execution_options(write=True)
        database = engine.url.database if engine.dialect.name == "sqlite" else None
        self._database = database if database and database != ":memory:" else None

    @contextlib.contextmanager
    def begin(self):
        """A write transaction, committed on leaving the block (rolled back on an exception)."""
        if self._database is None:
            with self.engine.begin() as conn:
                yield conn
            return
        # looked up on every transaction: a Writer made before a fork (uWSGI preloads the app in
        # its master) must queue with the current process's own open file, not the master's
        with _write_queue(self._database):
            with self.engine.begin() as conn:
                yield conn


class _WriteQueue:
    """An exclusive flock on `path`, for the threads of one process one at a time."""

    def __init__(self, path: str):
        self.path = path
        self.pid = os.getpid()
        self._thread_lock = threading.Lock()  # flock does not exclude threads sharing one open file
        self._fd: int | None = None

    def __enter__(self):
        self._thread_lock.acquire()
        try:
            if self._fd is None:
                # read-only is enough for flock: a process of another user that may write the
                # database (a supervised `python -m notifier`) can still queue on a file it did not create
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise
        return self

    def __exit__(self, *exc):
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    def close_inherited(self) -> None:
        """In a forked child: close the parent's open file (it shares the parent's lock, so it
        would not exclude us, and kept open here it would keep a lock the parent dies holding)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


_queues: dict[str, _WriteQueue] = {}
_queues_lock = threading.Lock()


def _write_queue(database: str) -> _WriteQueue:
    """This process's queue for the database. A queue made before a fork is not used after it:
    uWSGI forks its workers from C, where no at-fork hook runs, so the pid tells."""
    path = os.path.abspath(database) + "-writers.lock"
    with _queues_lock:
        queue = _queues.get(path)
        if queue is None or queue.pid != os.getpid():
            if queue is not None:
                queue.close_inherited()
            queue = _queues[path] = _WriteQueue(path)
        return queue


def _after_fork_in_child() -> None:
    """After os.fork() (multiprocessing's PushProcess): fresh locks, the parent's files closed."""
    global _queues_lock
    _queues_lock = threading.Lock()  # another thread may have held it at the fork
    for queue in _queues.values():
        queue.close_inherited()
    _queues.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def checkpoint(engine: Engine) -> None:
    """SQLite: copy the WAL back into the database, outside any transaction and the write queue.

    PASSIVE: waits for no reader and blocks no writer (they append to the WAL meanwhile). A no-op
    on PostgreSQL."""
    if engine.dialect.name != "sqlite":
        return
    connection = engine.raw_connection()
    try:
        connection.driver_connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    finally:
        connection.close()


def writer(engine: Engine) -> Writer:
    """What to open transactions that write with: `with writer(engine).begin() as conn:`."""
    return Writer(engine)


@contextlib.contextmanager
def migration_transaction(engine: Engine):
    """A write transaction holding the migration lock: `with migration_transaction(engine) as conn:`.

    One process at a time gets in, on any number of hosts. PostgreSQL: pg_advisory_xact_lock, which
    the server releases at commit or rollback, or when a crashed starter's session ends, so it never
    outlives the change it guards. SQLite: the write queue's flock, then BEGIN IMMEDIATE, SQLite's
    own write lock, which every process of the host takes to write.
    """
    with writer(engine).begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        yield conn


def migrate(engine: Engine) -> None:
    """Upgrade the database in place to the newest revision of notifier/migrations/; create it if empty.

    Safe to run from many processes and hosts at once (they take turns, see migration_transaction),
    and a no-op when the database is up to date. All revisions run in one transaction: on both
    engines DDL is transactional, so a failed upgrade leaves the database as it was. A database of
    the first release (a `meta` row schema_version=1, no alembic_version) is stamped with revision
    0001, which made those same tables, then upgraded. Raises RuntimeError for a database this code
    cannot upgrade: one at a revision it does not know (a newer release's), or a foreign `meta`.
    """
    with migration_transaction(engine) as conn:
        if _recorded_revisions(conn) == {SCHEMA_HEAD}:
            return  # the usual start: up to date
        _upgrade(conn)


def _upgrade(conn: Connection) -> None:
    """migrate() with something to do: stamp a first-release database, refuse an unknown one, upgrade."""
    # imported here, not at the top: Alembic costs 0.15-0.2 s to import, and only a start that has
    # a revision to apply needs it (not the dispatcher, not an up-to-date start or reload)
    from alembic import command

    script = _migration_scripts()
    head = script.get_current_head()  # raises if revisions branched: a merge revision is missing
    if head != SCHEMA_HEAD:
        raise RuntimeError(f"storage.SCHEMA_HEAD is {SCHEMA_HEAD!r} but the newest revision is {head!r}: update it")
    config = alembic_config(conn)
    first_release = _first_release_revision(conn)
    if first_release is not None:
        logger.info("storage: a database of the first release: stamping revision %s", first_release)
        command.stamp(config, first_release)
    current = _recorded_revisions(conn)
    unknown = current - {revision.revision for revision in script.walk_revisions()}
    if unknown:
        raise RuntimeError(f"database schema revision {', '.join(sorted(unknown))} is newer than this code "
                           f"(head {head})")
    if current == {head}:
        return
    logger.info("storage: upgrading the schema from %s to %s", ", ".join(sorted(current)) or "nothing", head)
    command.upgrade(config, "head")


# the name before migrations, for code written against it
create_schema = migrate


def schema_revision(conn: Connection) -> str | None:
    """The Alembic revision the database is at (None: not migrated yet)."""
    revisions = _recorded_revisions(conn)
    if len(revisions) > 1:
        raise RuntimeError(f"database at several revisions: {sorted(revisions)}")
    return next(iter(revisions), None)


# Alembic's own table, read here without importing Alembic
_alembic_version = sa.table("alembic_version", sa.column("version_num"))


def _recorded_revisions(conn: Connection) -> set[str]:
    """What alembic_version holds (several rows only if revisions branched); empty before Alembic."""
    if not sa.inspect(conn).has_table("alembic_version"):
        return set()
    return set(conn.execute(sa.select(_alembic_version.c.version_num)).scalars())


def alembic_config(conn: Connection | None = None):
    """An alembic.config.Config for notifier/migrations/, built in code (no alembic.ini needed).

    With `conn`, env.py runs the revisions on that connection, in its transaction: pass one from
    migration_transaction(), as `command.upgrade(alembic_config(conn), "head")`.
    """
    from alembic.config import Config  # see _upgrade() on why imported here

    config = Config(attributes={"connection": conn} if conn is not None else None)
    config.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))  # ConfigParser syntax
    return config


@functools.lru_cache(maxsize=None)
def _migration_scripts():
    """The revisions on disk, read once per process (every test's fresh database migrates)."""
    from alembic.script import ScriptDirectory  # see _upgrade() on why imported here

    return ScriptDirectory.from_config(alembic_config())


def _first_release_revision(conn: Connection) -> str | None:
    """'0001' for a database the first release made (it kept its version in `meta`), else None."""
    inspector = sa.inspect(conn)
    if inspector.has_table("alembic_version") or not inspector.has_table("meta"):
        return None
    legacy_meta = sa.table("meta", sa.column("key"), sa.column("value"))
    version = conn.execute(sa.select(legacy_meta.c.value).where(legacy_meta.c.key == "schema_version")).scalar()
    if version != "1":
        raise RuntimeError(f"database has a meta table with schema_version={version!r} and no alembic_version: "
                           "not a schema this code knows how to upgrade")
    return "0001"


def ping(conn: Connection) -> None:
    """Raise if the database does not answer."""
    conn.execute(sa.text("SELECT 1")).scalar_one()


def iso(epoch: float | None) -> str | None:
    """Render an epoch time as API.md's ISO 8601 UTC string with a Z suffix."""
    if epoch is None:
        return None
    text = datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def hash_token(token: str) -> str:
    """The stored form of a bearer token: a SHA-256 hex digest (tokens are random, no salt needed)."""
    return hashlib.sha256(token.encode()).hexdigest()


def _insert(conn: Connection, table: sa.Table):
    """A dialect insert, so ON CONFLICT DO NOTHING is available on both engines."""
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)


# ---------------------------------------------------------------- users

def create_user(conn: Connection, name: str, token_hash: str, now: float) -> dict:
    """Insert a user; return {"id", "name"}."""
    user_id = conn.execute(
        users.insert().values(name=name, token_hash=token_hash, created_at=now).returning(users.c.id)
    ).scalar_one()
    return {"id": user_id, "name": name}


def user_by_token_hash(conn: Connection, token_hash: str) -> dict | None:
    """The user owning this token hash, or None."""
    row = conn.execute(sa.select(users.c.id, users.c.name).where(users.c.token_hash == token_hash)).first()
    return dict(row._mapping) if row else None


def existing_user_ids(conn: Connection, ids: Iterable[int]) -> set[int]:
    """The subset of `ids` that are users."""
    ids = list(set(ids))
    if not ids:
        return set()
    return set(conn.execute(sa.select(users.c.id).where(users.c.id.in_(ids))).scalars())


# ---------------------------------------------------------------- devices

def _device_dict(row) -> dict:
    return {"id": row.id, "platform": row.platform, "token": row.token, "app": row.app}


def device_by_token(conn: Connection, token: str):
    """The device row holding this token, or None."""
    return conn.execute(sa.select(devices).where(devices.c.token == token)).first()


def insert_device(conn: Connection, user_id: int, platform: str, token: str, app: str | None, now: float) -> dict:
    """Insert a new enabled device."""
    device_id = conn.execute(
        devices.insert().values(user_id=user_id, platform=platform, token=token, app=app,
                                enabled=True, created_at=now).returning(devices.c.id)
    ).scalar_one()
    return {"id": device_id, "platform": platform, "token": token, "app": app}


def rebind_device(conn: Connection, device_id: int, user_id: int, platform: str, app: str | None) -> dict:
    """Give an existing token row to `user_id` and enable it again (a phone changed hands or came back)."""
    conn.execute(
        devices.update().where(devices.c.id == device_id)
        .values(user_id=user_id, platform=platform, app=app, enabled=True, disabled_reason=None)
    )
    return {"id": device_id, "platform": platform, "token": device_token(conn, device_id), "app": app}


def device_token(conn: Connection, device_id: int) -> str:
    """The token of a device."""
    return conn.execute(sa.select(devices.c.token).where(devices.c.id == device_id)).scalar_one()


def list_devices(conn: Connection, user_id: int) -> list[dict]:
    """The user's enabled devices, oldest first."""
    rows = conn.execute(
        sa.select(devices).where(devices.c.user_id == user_id, devices.c.enabled.is_(True)).order_by(devices.c.id)
    )
    return [_device_dict(row) for row in rows]


def device_owner(conn: Connection, device_id: int) -> int | None:
    """The owner of an enabled device, or None when there is no such device."""
    return conn.execute(
        sa.select(devices.c.user_id).where(devices.c.id == device_id, devices.c.enabled.is_(True))
    ).scalar()


def disable_devices(conn: Connection, device_ids: Sequence[int], reason: str) -> None:
    """Stop pushing to these devices; later messages skip them."""
    if device_ids:
        conn.execute(
            devices.update().where(devices.c.id.in_(list(device_ids)))
            .values(enabled=False, disabled_reason=reason)
        )


# ---------------------------------------------------------------- chats and members

def create_chat(conn: Connection, name: str, creator_id: int, member_ids: Iterable[int], now: float) -> int:
    """Insert a chat with its members (the creator included); return its id."""
    chat_id = conn.execute(
        chats.insert().values(name=name, creator_id=creator_id, created_at=now).returning(chats.c.id)
    ).scalar_one()
    ids = sorted({creator_id, *member_ids})
    conn.execute(members.insert(), [{"chat_id": chat_id, "user_id": uid, "joined_at": now} for uid in ids])
    return chat_id


def get_chat(conn: Connection, chat_id: int):
    """The chat row, or None."""
    return conn.execute(sa.select(chats).where(chats.c.id == chat_id)).first()


def chat_members(conn: Connection, chat_id: int) -> list[dict]:
    """Members of a chat as {"id", "name"}, in id order."""
    rows = conn.execute(
        sa.select(users.c.id, users.c.name).join(members, members.c.user_id == users.c.id)
        .where(members.c.chat_id == chat_id).order_by(users.c.id)
    )
    return [dict(row._mapping) for row in rows]


def is_member(conn: Connection, chat_id: int, user_id: int) -> bool:
    """Whether the user belongs to the chat."""
    return conn.execute(
        sa.select(members.c.user_id).where(members.c.chat_id == chat_id, members.c.user_id == user_id)
    ).first() is not None


def list_chats(conn: Connection, user_id: int) -> list[dict]:
    """Chats the user is a member of, oldest first."""
    rows = conn.execute(
        sa.select(chats.c.id, chats.c.name).join(members, members.c.chat_id == chats.c.id)
        .where(members.c.user_id == user_id).order_by(chats.c.id)
    )
    return [dict(row._mapping) for row in rows]


def add_member(conn: Connection, chat_id: int, user_id: int, now: float) -> bool:
    """Add a member; False when the user already was one."""
    result = conn.execute(
        _insert(conn, members).values(chat_id=chat_id, user_id=user_id, joined_at=now).on_conflict_do_nothing()
        .execution_options(preserve_rowcount=True)  # SQLAlchemy keeps an INSERT's rowcount only when asked
    )
    return result.rowcount == 1


def remove_member(conn: Connection, chat_id: int, user_id: int) -> bool:
    """Remove a member; False when the user was not one."""
    result = conn.execute(members.delete().where(members.c.chat_id == chat_id, members.c.user_id == user_id))
    return result.rowcount == 1


def set_muted_until(conn: Connection, chat_id: int, user_id: int, until: float | None) -> None:
    """Mute the member's pushes for this chat until `until` (None unmutes)."""
    conn.execute(
        members.update().where(members.c.chat_id == chat_id, members.c.user_id == user_id)
        .values(muted_until=until)
    )


# ---------------------------------------------------------------- messages

def _message_dict(row) -> dict:
    return {
        "id": row.id, "chat_id": row.chat_id, "sender_id": row.sender_id, "text": row.text,
        "client_id": row.client_id, "created_at": iso(row.created_at),
    }


def message_by_client_id(conn: Connection, chat_id: int, sender_id: int, client_id: str) -> dict | None:
    """The message this sender already posted to this chat with this client_id, or None."""
    row = conn.execute(
        sa.select(messages).where(messages.c.chat_id == chat_id, messages.c.sender_id == sender_id,
                                  messages.c.client_id == client_id)
    ).first()
    return _message_dict(row) if row else None


def insert_message_with_job(conn: Connection, chat_id: int, sender_id: int, text: str,
                            client_id: str | None, now: float) -> dict:
    """Insert a message and its push job; the caller's transaction makes them one write."""
    row = conn.execute(
        messages.insert().values(chat_id=chat_id, sender_id=sender_id, text=text, client_id=client_id,
                                 created_at=now).returning(*messages.c)
    ).one()
    conn.execute(push_jobs.insert().values(message_id=row.id, state="pending", created_at=now))
    if conn.dialect.name == "postgresql":
        # delivered to every listening dispatcher, on any host, when (and only if) this commits
        conn.execute(sa.text("SELECT pg_notify(:channel, '')"), {"channel": NOTIFY_CHANNEL})
    return _message_dict(row)


def get_message(conn: Connection, message_id: int) -> dict | None:
    """The message, or None."""
    row = conn.execute(sa.select(messages).where(messages.c.id == message_id)).first()
    return _message_dict(row) if row else None


def list_messages(conn: Connection, chat_id: int, before: int | None, after: int | None, limit: int) -> list[dict]:
    """A page of history: newest first, unless `after` is given (then oldest first)."""
    query = sa.select(messages).where(messages.c.chat_id == chat_id)
    if before is not None:
        query = query.where(messages.c.id < before)
    if after is not None:
        query = query.where(messages.c.id > after)
    order = messages.c.id.asc() if after is not None else messages.c.id.desc()
    return [_message_dict(row) for row in conn.execute(query.order_by(order).limit(limit))]


def message_deliveries(conn: Connection, message_id: int) -> list[dict]:
    """Every delivery of a message, by device."""
    rows = conn.execute(
        sa.select(deliveries).where(deliveries.c.message_id == message_id).order_by(deliveries.c.device_id)
    )
    return [
        {"device_id": r.device_id, "platform": r.platform, "state": r.state, "attempts": r.attempts,
         "last_status": r.last_status, "last_reason": r.last_reason, "sent_at": iso(r.sent_at)}
        for r in rows
    ]


def job_expanded(conn: Connection, message_id: int) -> bool:
    """Whether the message's push job has been turned into deliveries yet."""
    state = conn.execute(sa.select(push_jobs.c.state).where(push_jobs.c.message_id == message_id)).scalar()
    return state in (None, "expanded")


# ---------------------------------------------------------------- the outbox (dispatcher side)

def _claimable(table: sa.Table, now: float):
    return sa.or_(table.c.lease_until.is_(None), table.c.lease_until <= now)


def _claim_ids(conn: Connection, table: sa.Table, where, order, owner: str, now: float, lease: float,
               limit: int) -> list[int]:
    """Lease up to `limit` rows matching `where`; return their ids. SKIP LOCKED on PostgreSQL."""
    candidates = sa.select(table.c.id).where(where, _claimable(table, now)).order_by(*order).limit(limit)
    if conn.dialect.name == "postgresql":
        candidates = candidates.with_for_update(skip_locked=True)
    result = conn.execute(
        table.update().where(table.c.id.in_(candidates.scalar_subquery()))
        .values(lease_owner=owner, lease_until=now + lease).returning(table.c.id)
    )
    return sorted(result.scalars())


def expand_pending_jobs(conn: Connection, now: float, budget: int | None = None) -> int:
    """Turn pending push jobs, oldest first, into about `budget` pending deliveries (None: all of them).

    Recipients: members other than the sender, not muted at `now`, with enabled devices, taken in
    (user, device) order from the job's cursor on. Each job is locked for the caller's transaction
    only (FOR UPDATE SKIP LOCKED on PostgreSQL: a job another dispatcher is expanding right now is
    passed over, not waited for), and its cursor moves in the same transaction as the rows it
    covers. So a big chat is expanded a chunk at a time by whichever dispatchers are free, no
    transaction holds SQLite's write lock for long, a first batch leaves before the last recipients
    are inserted, and a 100,000-device message never sits in one transaction. ON CONFLICT DO NOTHING
    keeps a replayed chunk harmless. Returns the number of deliveries created.
    """
    next_job, chunk_end, expand_rest, expand_upto, move_cursor, job_done = _expansion_statements(
        conn.dialect.name)
    created, after_job = 0, 0
    while budget is None or created < budget:
        job = conn.execute(next_job, {"after_job": after_job}).first()
        if job is None:
            break
        after_job = job.id
        params = {"message": job.message_id, "now": now,
                  "after_user": -1 if job.cursor_user is None else job.cursor_user,
                  "after_device": -1 if job.cursor_device is None else job.cursor_device}
        end = None
        if budget is not None:  # the chunk's last recipient, and whether any comes after it
            bounds = conn.execute(chunk_end, {**params, "skip": budget - created - 1}).all()
            end = bounds[0] if len(bounds) == 2 else None
        if end is None:  # the rest fits in this chunk
            created += max(conn.execute(expand_rest, params).rowcount, 0)
            conn.execute(job_done, {"job": job.id})
        else:
            created += max(conn.execute(expand_upto, {**params, "end_user": end[0], "end_device": end[1]})
                           .rowcount, 0)
            conn.execute(move_cursor, {"job": job.id, "end_user": end[0], "end_device": end[1]})
    return created


@functools.cache
def _expansion_statements(dialect: str) -> tuple:
    """The chunked expansion's statements, built once per dialect (SQLAlchemy then reuses their
    compiled form instead of rebuilding and re-hashing the expressions on every call)."""
    now = sa.bindparam("now", type_=sa.Double)
    after_user, after_device = sa.bindparam("after_user", type_=Id), sa.bindparam("after_device", type_=Id)
    after = sa.and_(members.c.user_id >= after_user,
                    sa.or_(members.c.user_id > after_user, devices.c.id > after_device))

    def recipients(*columns):
        return (
            sa.select(*columns).select_from(messages)
            .join(members, members.c.chat_id == messages.c.chat_id)
            .join(devices, devices.c.user_id == members.c.user_id)
            .where(messages.c.id == sa.bindparam("message", type_=Id),
                   members.c.user_id != messages.c.sender_id,
                   sa.or_(members.c.muted_until.is_(None), members.c.muted_until <= now),
                   devices.c.enabled.is_(True), after)
        )

    def insert(select):
        return ((postgresql.insert if dialect == "postgresql" else sqlite.insert)(deliveries).from_select(
            ["message_id", "device_id", "platform", "state", "attempts", "next_attempt_at", "created_at"], select)
            .on_conflict_do_nothing().execution_options(preserve_rowcount=True))

    columns = (messages.c.id, devices.c.id, devices.c.platform, sa.literal(DeliveryState.PENDING.value),
               sa.literal(0), now, now)
    end_user, end_device = sa.bindparam("end_user", type_=Id), sa.bindparam("end_device", type_=Id)
    upto = sa.or_(members.c.user_id < end_user, sa.and_(members.c.user_id == end_user, devices.c.id <= end_device))
    next_job = (sa.select(push_jobs.c.id, push_jobs.c.message_id, push_jobs.c.cursor_user, push_jobs.c.cursor_device)
                .where(push_jobs.c.state == "pending", push_jobs.c.id > sa.bindparam("after_job", type_=Id))
                .order_by(push_jobs.c.id).limit(1))
    if dialect == "postgresql":
        next_job = next_job.with_for_update(skip_locked=True)
    this_job = push_jobs.c.id == sa.bindparam("job", type_=Id)
    return (
        next_job,
        recipients(members.c.user_id, devices.c.id).order_by(members.c.user_id, devices.c.id)
        .limit(2).offset(sa.bindparam("skip", type_=sa.Integer)),
        insert(recipients(*columns)),
        insert(recipients(*columns).where(upto)),
        push_jobs.update().where(this_job).values(cursor_user=end_user, cursor_device=end_device),
        push_jobs.update().where(this_job).values(state="expanded"),
    )


@dataclass(frozen=True)
class Claimed:
    """A leased delivery: the Push to send, or a device that is no longer enabled."""

    push: Push
    device_enabled: bool


def claim_deliveries(conn: Connection, owner: str, now: float, lease: float, limit: int) -> list[Claimed]:
    """Lease up to `limit` due pending deliveries and load what sending them needs, in two queries."""
    return load_claimed(conn, claim_delivery_ids(conn, owner, now, lease, limit))


def claim_delivery_ids(conn: Connection, owner: str, now: float, lease: float, limit: int) -> list[int]:
    """Lease up to `limit` due pending deliveries (oldest due first); return their ids."""
    return _claim_ids(
        conn, deliveries,
        sa.and_(deliveries.c.state == DeliveryState.PENDING.value, deliveries.c.next_attempt_at <= now),
        [deliveries.c.next_attempt_at, deliveries.c.id], owner, now, lease, limit,
    )


def load_claimed(conn: Connection, ids: Sequence[int]) -> list[Claimed]:
    """What sending these (leased) deliveries needs. A read: the dispatcher runs it after the claim
    commits, so SQLite's write lock is not held while a thousand rows become Push objects."""
    if not ids:
        return []
    return [
        Claimed(
            Push(delivery_id=r.id, message_id=r.message_id, chat_id=r.chat_id, chat_name=r.chat_name,
                 sender_id=r.sender_id, sender_name=r.sender_name, text=r.text, device_id=r.device_id,
                 platform=Platform(r.platform), token=r.token, app=r.app, attempts=r.attempts),
            bool(r.enabled),
        )
        for r in conn.execute(_load_claimed_statement(), {"ids": list(ids)})
    ]


@functools.cache
def _load_claimed_statement():
    sender = users.alias("sender")
    return (
        sa.select(deliveries.c.id, deliveries.c.message_id, deliveries.c.attempts, deliveries.c.device_id,
                  devices.c.platform, devices.c.token, devices.c.app, devices.c.enabled,
                  messages.c.chat_id, messages.c.sender_id, messages.c.text, chats.c.name.label("chat_name"),
                  sender.c.name.label("sender_name"))
        .select_from(deliveries)
        .join(devices, devices.c.id == deliveries.c.device_id)
        .join(messages, messages.c.id == deliveries.c.message_id)
        .join(chats, chats.c.id == messages.c.chat_id)
        .join(sender, sender.c.id == messages.c.sender_id)
        .where(deliveries.c.id.in_(sa.bindparam("ids", expanding=True)))
        .order_by(deliveries.c.id)
    )


@dataclass(frozen=True)
class Update:
    """The new state of one delivery after an attempt (or a decision not to attempt)."""

    delivery_id: int
    state: DeliveryState
    attempts: int
    next_attempt_at: float
    last_status: int | None
    last_reason: str | None
    sent_at: float | None = None


def record_updates(conn: Connection, owner: str, updates: Sequence[Update], host_id: str | None = None) -> int:
    """Write attempt results, only for rows we still lease; release the leases.

    Updates with the same values (a batch's `sent` rows share them all) are written by one
    `UPDATE ... WHERE id IN (...)`: a handful of statements per batch instead of one per row, so the
    transaction, and SQLite's write lock, ends sooner.
    Returns the number of rows written (fewer than given when a lease was lost to another dispatcher).
    """
    groups: dict[tuple, list[int]] = {}
    for u in updates:
        key = (u.state.value, u.attempts, u.next_attempt_at, u.last_status, u.last_reason, u.sent_at)
        groups.setdefault(key, []).append(u.delivery_id)
    written = 0
    for (state, attempts, next_at, status, reason, sent_at), ids in groups.items():
        written += conn.execute(_record_statement(), {
            "ids": ids, "owner": owner, "b_state": state, "b_attempts": attempts, "b_next": next_at,
            "b_status": status, "b_reason": reason, "b_sent": sent_at, "b_host": host_id,
        }).rowcount
    return written


@functools.cache
def _record_statement():
    return (
        deliveries.update()
        .where(deliveries.c.id.in_(sa.bindparam("ids", expanding=True)),
               deliveries.c.lease_owner == sa.bindparam("owner"))
        .values(state=sa.bindparam("b_state"), attempts=sa.bindparam("b_attempts"),
                next_attempt_at=sa.bindparam("b_next"), last_status=sa.bindparam("b_status"),
                last_reason=sa.bindparam("b_reason"), sent_at=sa.bindparam("b_sent"),
                handled_by=sa.bindparam("b_host"), lease_owner=None, lease_until=None)
    )


def renew_leases(conn: Connection, owner: str, ids: Iterable[int], until: float) -> int:
    """Extend `owner`'s leases on the deliveries `ids` (the batches in flight) to `until`.

    By id, not every row `owner` leases: a claim whose batch was lost before it was sent (the
    database failed between the claim and loading it) must expire, not be renewed forever, and a
    lookup by primary key does not scan the deliveries table every heartbeat."""
    renewed = 0
    ids = sorted(ids)
    for start in range(0, len(ids), ID_CHUNK):
        renewed += conn.execute(
            deliveries.update().where(deliveries.c.id.in_(ids[start:start + ID_CHUNK]),
                                      deliveries.c.lease_owner == owner).values(lease_until=until)
        ).rowcount
    return renewed


def release_leases(conn: Connection, owner: str, ids: Iterable[int] | None = None) -> None:
    """Give back `owner`'s leases (on the deliveries `ids`; None: all of them, which scans the
    table), so another dispatcher can take the rows at once."""
    if ids is None:
        conn.execute(deliveries.update().where(deliveries.c.lease_owner == owner)
                     .values(lease_owner=None, lease_until=None))
        return
    ids = sorted(ids)
    for start in range(0, len(ids), ID_CHUNK):
        conn.execute(deliveries.update().where(deliveries.c.id.in_(ids[start:start + ID_CHUNK]),
                                               deliveries.c.lease_owner == owner)
                     .values(lease_owner=None, lease_until=None))


def next_wakeup(conn: Connection, now: float) -> float | None:
    """When there is next something to do: now for a job to expand, else the earliest due or lease expiry."""
    job = conn.execute(
        sa.select(sa.literal(now)).where(sa.exists().where(push_jobs.c.state == "pending"))
    ).scalar()
    delivery = conn.execute(
        sa.select(sa.func.min(sa.case(
            (deliveries.c.lease_until > deliveries.c.next_attempt_at, deliveries.c.lease_until),
            else_=deliveries.c.next_attempt_at)))
        .where(deliveries.c.state == DeliveryState.PENDING.value)
    ).scalar()
    candidates = [t for t in (job, delivery) if t is not None]
    return min(candidates) if candidates else None


def queue_depth(conn: Connection, now: float) -> dict:
    """Pending work: unexpanded jobs, pending deliveries and the age of the oldest pending item."""
    jobs, oldest_job = conn.execute(
        sa.select(sa.func.count(), sa.func.min(push_jobs.c.created_at)).where(push_jobs.c.state == "pending")
    ).one()
    pending, oldest_delivery = conn.execute(
        sa.select(sa.func.count(), sa.func.min(deliveries.c.created_at))
        .where(deliveries.c.state == DeliveryState.PENDING.value)
    ).one()
    oldest = min([t for t in (oldest_job, oldest_delivery) if t is not None], default=None)
    return {
        "pending_jobs": jobs,
        "pending_deliveries": pending,
        "oldest_pending_age": round(now - oldest, 3) if oldest is not None else 0.0,
    }


def delivery_counts(conn: Connection) -> list[tuple[str, str, int]]:
    """(platform, state, count) over every delivery: the source of the delivery metrics."""
    rows = conn.execute(
        sa.select(deliveries.c.platform, deliveries.c.state, sa.func.count())
        .group_by(deliveries.c.platform, deliveries.c.state)
    )
    return [tuple(row) for row in rows]


# ---------------------------------------------------------------- dispatcher registry

def register_dispatcher(conn: Connection, host_id: str, pid: int, now: float) -> int:
    """Record a dispatcher start; return its row id (counted as a restart by the metrics)."""
    return conn.execute(
        dispatchers.insert().values(host_id=host_id, pid=pid, started_at=now, heartbeat_at=now).returning(dispatchers.c.id)
    ).scalar_one()


def heartbeat(conn: Connection, dispatcher_id: int, now: float, stopped: bool = False) -> None:
    """Mark the dispatcher alive at `now` (or stopped)."""
    # alive again after a takeover declared it dead (its heartbeat was stalled, not stopped):
    # clear the mark, so a later death of it is noticed too
    values = {"heartbeat_at": now, "stopped_at": now if stopped else None}
    conn.execute(dispatchers.update().where(dispatchers.c.id == dispatcher_id).values(**values))


def dispatcher_status(conn: Connection, now: float, stale_after: float) -> dict:
    """Dispatchers seen alive within `stale_after` seconds, and how many ever started."""
    alive = conn.execute(
        sa.select(dispatchers.c.host_id, dispatchers.c.pid, dispatchers.c.heartbeat_at)
        .where(dispatchers.c.stopped_at.is_(None), dispatchers.c.heartbeat_at >= now - stale_after)
        .order_by(dispatchers.c.id)
    ).all()
    starts = conn.execute(sa.select(sa.func.count()).select_from(dispatchers)).scalar_one()
    return {
        "alive": [{"host_id": r.host_id, "pid": r.pid, "last_seen": iso(r.heartbeat_at)} for r in alive],
        "starts": starts,
    }


def lease_owner(host_id: str, pid: int, dispatcher_id: int) -> str:
    """The lease owner name of a registered dispatcher: derivable from its registry row, so a
    successor can release exactly the leases of a dispatcher it knows to be dead."""
    return f"{host_id}:{pid}:{dispatcher_id}"


def take_over(conn: Connection, own_id: int, now: float, host_id: str | None = None,
              stale_before: float | None = None) -> list[tuple[str, int]]:
    """Declare dead, and release the leases of, every other dispatcher still registered as running
    that is of `host_id` (the caller proved them dead: it could bind the host's wake-up name) or
    whose heartbeat is older than `stale_before`. Their rows become claimable at once, instead of
    when the leases run out. Returns (owner, leases released) per dispatcher taken over."""
    suspects = sa.false()
    if host_id is not None:
        suspects = sa.or_(suspects, dispatchers.c.host_id == host_id)
    if stale_before is not None:
        suspects = sa.or_(suspects, dispatchers.c.heartbeat_at < stale_before)
    query = sa.select(dispatchers.c.id, dispatchers.c.host_id, dispatchers.c.pid).where(
        dispatchers.c.stopped_at.is_(None), dispatchers.c.id != own_id, suspects)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)  # two survivors: one takes each over
    taken = []
    for row in conn.execute(query).all():
        owner = lease_owner(row.host_id, row.pid, row.id)
        released = conn.execute(
            deliveries.update().where(deliveries.c.state == DeliveryState.PENDING.value,
                                      deliveries.c.lease_owner == owner)
            .values(lease_owner=None, lease_until=None)
        ).rowcount
        conn.execute(dispatchers.update().where(dispatchers.c.id == row.id).values(stopped_at=now))
        taken.append((owner, released))
    return taken


def work_pending(conn: Connection) -> bool:
    """Whether the outbox holds anything unfinished (a job to expand, a delivery not yet final),
    due or not, leased or not: then this host needs a live dispatcher."""
    return bool(conn.execute(
        sa.select(sa.or_(sa.exists().where(push_jobs.c.state == "pending"),
                         sa.exists().where(deliveries.c.state == DeliveryState.PENDING.value)))
    ).scalar())
