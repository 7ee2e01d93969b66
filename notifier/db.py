"""The database plumbing: engines and their fork safety, the SQLite write queue, checkpoints, and
migrations to the current schema at start-up. Imports nothing of ours but the schema."""
from __future__ import annotations

import collections
import contextlib
import fcntl
import functools
import logging
import os
import sqlite3
import threading
import time
import weakref
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine


logger = logging.getLogger(__name__)


MIGRATIONS = Path(__file__).resolve().with_name("migrations")  # Alembic's env.py and versions/


# the newest revision in migrations/versions/: a database already there starts without importing
# Alembic (0.15-0.2 s of every start and reload); migrate() refuses to run if this is stale
SCHEMA_HEAD = "0005"


MIGRATION_LOCK = 7311001  # PostgreSQL advisory lock key for schema changes (the first release's, kept)


WAL_SAFETY_PAGES = 10_000  # SQLite checkpoints inside a commit only past this (40 MB of WAL)


# a writer checkpoints the WAL after every this many of its process's commits, once out of the
# write queue: with 4 workers, every ~100 commits on the host, a few hundred pages at a time
CHECKPOINT_EVERY = 400


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
        cursor.execute("PRAGMA busy_timeout=10000")
        _use_wal(cursor)
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")  # WAL stays durable against process crashes
        # SQLite copies the WAL back into the database inside whichever commit crosses its threshold,
        # while that writer still holds the write queue: every other writer waited for it (15-20 ms
        # for 2,600 pages here, far longer when the dispatcher, at low priority, was the one; the
        # POST p99 was 24-27 ms with it, 9-18 ms without). Writers checkpoint outside the queue
        # instead (Writer.begin, checkpoint()); this is a safety net.
        cursor.execute(f"PRAGMA wal_autocheckpoint={WAL_SAFETY_PAGES}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(conn):
        _execute_on_driver(conn, "BEGIN IMMEDIATE" if conn.get_execution_options().get("write") else "BEGIN", {})


def _use_wal(cursor, timeout: float = 10.0) -> None:
    """Put the database in WAL mode: once in its life, so first look whether it is already.

    Connections are opened outside the write queue, and switching a new database to WAL needs it
    alone: SQLite answers "locked" at once, without its busy wait, to a switch that loses the race
    with another process's. So retry for a while, as the busy timeout would."""
    if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL").fetchall()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


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
        # the pool checkout and return happen outside the queue: it holds nothing but the transaction
        with self.engine.connect() as conn:
            queue = _write_queue(self._database)
            with queue:
                with conn.begin():
                    yield conn
                queue.commits += 1
            if queue.commits % CHECKPOINT_EVERY == 0:
                # now that the other writers can go on: this request alone pays for the copy
                _checkpoint_quietly(conn.connection.dbapi_connection)


class _WriteQueue:
    """An exclusive flock on `path`, for the threads of one process one at a time."""

    def __init__(self, path: str):
        self.path = path
        self.pid = os.getpid()
        self._thread_lock = threading.Lock()  # flock does not exclude threads sharing one open file
        self._fd: int | None = None
        self.commits = 0  # by this process, through this queue: when to checkpoint

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


class DriverStatement:
    """A Core statement compiled once per dialect, run on the connection's own DBAPI cursor.

    For the request path's few statements. There, SQLAlchemy's execute() costs 30-90 us of CPU per
    statement (events, cache lookup, result set-up) where the driver's own execute costs about 8 us,
    and on SQLite the write statements run while every other writer waits in the write queue
    (measured in-process: the POST's write transaction 156 -> 76 us). The statement is still defined
    with Core against the schema; only its execution skips the engine. It runs in the caller's
    transaction (the SQLAlchemy Connection's: begun, committed and rolled back as usual), and a
    driver error is raised as SQLAlchemy would raise it (a sa.exc.DBAPIError subclass, the
    connection invalidated when it is lost), so callers and the web layer's error handling see the
    same exceptions as from conn.execute(). Rows are named tuples (row.id, row._asdict()).

    Only plain bind parameters: values go to the driver as they are (int, float, str, None), with
    no type processing, and expanding parameters (IN lists) are refused at compile time.
    """

    def __init__(self, statement: sa.Executable):
        self.statement = statement
        self._compiled: dict[str, tuple[str, dict, type | None]] = {}

    def execute(self, conn: Connection, params: dict):
        """Run the statement in `conn`'s transaction; return the driver's cursor."""
        sql, defaults, _ = self._compile(conn.dialect)
        return _execute_on_driver(conn, sql, {**defaults, **params})

    def first(self, conn: Connection, params: dict):
        """The first row as a named tuple, or None."""
        cursor = self.execute(conn, params)
        row = cursor.fetchone()
        row = None if row is None else self._row_type(conn, cursor)._make(row)
        cursor.close()
        return row

    def all(self, conn: Connection, params: dict) -> list:
        """Every row, as named tuples."""
        cursor = self.execute(conn, params)
        rows = cursor.fetchall()
        if rows:
            make = self._row_type(conn, cursor)._make
            rows = [make(row) for row in rows]
        cursor.close()
        return rows

    def _compile(self, dialect: sa.Dialect) -> tuple[str, dict, type | None]:
        compiled = self._compiled.get(dialect.name)
        if compiled is None:
            if dialect.paramstyle not in ("named", "pyformat"):  # pysqlite's default is qmark
                dialect = type(dialect)(paramstyle="named")
            statement = self.statement.compile(dialect=dialect)
            if "POSTCOMPILE" in statement.string:
                raise ValueError("DriverStatement takes plain bind parameters only, not IN lists")
            compiled = self._compiled[dialect.name] = (statement.string, dict(statement.params), None)
        return compiled

    def _row_type(self, conn: Connection, cursor) -> type:
        sql, defaults, row_type = self._compiled[conn.dialect.name]
        if row_type is None:
            row_type = collections.namedtuple("Row", [column[0] for column in cursor.description])
            self._compiled[conn.dialect.name] = (sql, defaults, row_type)
        return row_type


@contextlib.contextmanager
def autocommit(engine: Engine):
    """A connection for reads that need no snapshot across statements: `with autocommit(engine) as conn:`.

    PostgreSQL: the driver's autocommit is on while the block runs, so each statement is one round
    trip, not three (BEGIN, the query, ROLLBACK on return to the pool). Set on the driver, not with
    SQLAlchemy's isolation_level option, which cost more round trips than it saved (measured
    in-process: 12 -> 16 waits per POST). SQLite's connections already are in autocommit between
    our explicit BEGINs."""
    with engine.connect() as conn:
        if conn.dialect.name != "postgresql":
            yield conn
            return
        conn.connection.dbapi_connection.autocommit = True
        try:
            yield conn
        finally:
            if not conn.invalidated and not conn.connection.dbapi_connection.closed:
                conn.connection.dbapi_connection.autocommit = False


def _execute_on_driver(conn: Connection, sql: str, params: dict):
    """Execute on the DBAPI connection under `conn`; driver errors become SQLAlchemy's (classified
    once, here, with the engine's own rules: a lost connection is invalidated)."""
    dbapi_connection = conn.connection.dbapi_connection
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(sql, params)
    except conn.dialect.loaded_dbapi.Error as exc:
        lost = conn.dialect.is_disconnect(exc, dbapi_connection, cursor)
        if lost:
            conn.invalidate(exc)
        # hide_parameters: the values are message texts and token hashes, kept out of logs
        raise sa.exc.DBAPIError.instance(sql, params, exc, conn.dialect.loaded_dbapi.Error,
                                         hide_parameters=True, connection_invalidated=lost,
                                         dialect=conn.dialect) from exc
    return cursor


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


def _checkpoint_quietly(dbapi_connection) -> None:
    """A PASSIVE checkpoint after a commit: the write is done, so a failure is only logged (the
    next checkpoint, or SQLite's safety net, copies what this one did not)."""
    try:
        dbapi_connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    except sqlite3.Error as exc:  # never fail a committed write over its clean-up
        logger.warning("db: WAL checkpoint failed: %s", exc)


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
        raise RuntimeError(f"db.SCHEMA_HEAD is {SCHEMA_HEAD!r} but the newest revision is {head!r}: update it")
    config = alembic_config(conn)
    first_release = _first_release_revision(conn)
    if first_release is not None:
        logger.info("db: a database of the first release: stamping revision %s", first_release)
        command.stamp(config, first_release)
    current = _recorded_revisions(conn)
    unknown = current - {revision.revision for revision in script.walk_revisions()}
    if unknown:
        raise RuntimeError(f"database schema revision {', '.join(sorted(unknown))} is newer than this code "
                           f"(head {head})")
    if current == {head}:
        return
    logger.info("db: upgrading the schema from %s to %s", ", ".join(sorted(current)) or "nothing", head)
    command.upgrade(config, "head")


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
