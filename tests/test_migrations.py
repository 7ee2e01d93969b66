"""Alembic migrations: a database of the last release (65147a6) is upgraded in place, rows and all.

The last release's schema is frozen in tests/data/schema_65147a6_<dialect>.sql (its DDL, generated
once from that commit), so these tests need no git. Each runs on a SQLite file and on a throw-away
PostgreSQL database (skipped, with the reason, when the server is not reachable).
"""
from __future__ import annotations

import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from chat_app.app import create_app
from chat_app import store
from notifier import db, schema
from notifier.config import Settings
from tests.pg import require_postgres, temporary_database
from tests.webapp import ContractTestApp

DATA = Path(__file__).parent / "data"
HEAD = ScriptDirectory(str(db.MIGRATIONS)).get_current_head()
FIRST_REVISION = "0001"
NOW = 1_800_000_000.0
# the tables of release 65147a6 and the columns it had, in its order (the rows are compared on these)
RELEASE_TABLES = {
    "users": ("id", "name", "token_hash", "created_at"),
    "devices": ("id", "user_id", "platform", "token", "app", "enabled", "disabled_reason", "created_at"),
    "chats": ("id", "name", "creator_id", "created_at"),
    "members": ("chat_id", "user_id", "muted_until", "joined_at"),
    "messages": ("id", "chat_id", "sender_id", "text", "client_id", "created_at"),
    "push_jobs": ("id", "message_id", "state", "cursor_user", "cursor_device", "created_at"),
    "deliveries": ("id", "message_id", "device_id", "platform", "state", "attempts", "next_attempt_at",
                   "lease_owner", "lease_until", "last_status", "last_reason", "sent_at", "handled_by",
                   "created_at"),
    "dispatchers": ("id", "host_id", "pid", "started_at", "heartbeat_at", "stopped_at"),
}
PROCESS_TIMEOUT = 60  # seconds for a migrating child process to finish


# ---------------------------------------------------------------- databases

@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    """An empty database: a new SQLite file, or a PostgreSQL database created for this test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/chat.sqlite3"
        return
    require_postgres()
    with temporary_database() as pg_url:
        yield pg_url


@pytest.fixture
def engine(url):
    """An engine on the empty database, made the way the service makes it."""
    engine = db.make_engine(url)
    yield engine
    engine.dispose()


def release_statements(dialect: str) -> list[str]:
    """The DDL of release 65147a6 for `dialect`, one statement per item."""
    text = (DATA / f"schema_65147a6_{dialect}.sql").read_text()
    body = "\n".join(line for line in text.splitlines() if not line.startswith("--"))
    return [statement.strip() for statement in body.split("\n;\n") if statement.strip(" \n;")]


def create_release_database(engine: sa.Engine) -> None:
    """What release 65147a6's create_schema left: its tables, and schema_version=1 in `meta`."""
    with db.writer(engine).begin() as conn:
        for statement in release_statements(engine.dialect.name):
            conn.exec_driver_sql(statement)
        conn.exec_driver_sql("INSERT INTO meta VALUES ('schema_version', '1')")


def insert(conn: sa.Connection, table: str, **values) -> int | None:
    """Insert one row with plain SQL (the old schema, not today's metadata); its id when it has one."""
    columns = ", ".join(values)
    params = ", ".join(f":{name}" for name in values)
    returning = " RETURNING id" if "id" in RELEASE_TABLES[table] else ""
    result = conn.execute(sa.text(f"INSERT INTO {table} ({columns}) VALUES ({params}){returning}"), values)
    return result.scalar_one() if returning else None


def fill_release_database(engine: sa.Engine) -> dict:
    """A row or more in every table, as the last release wrote them: a chat of three, a message sent to
    one phone and pending for another, a dispatcher; returns the tokens and ids the app checks use."""
    with db.writer(engine).begin() as conn:
        ann = insert(conn, "users", name="ann", token_hash=store.hash_token("ann-token"), created_at=NOW)
        bob = insert(conn, "users", name="bob", token_hash=store.hash_token("bob-token"), created_at=NOW)
        cat = insert(conn, "users", name="cat", token_hash=store.hash_token("cat-token"), created_at=NOW)
        bob_phone = insert(conn, "devices", user_id=bob, platform="apns", token="b0" * 32, app="com.example.chat",
                           enabled=True, disabled_reason=None, created_at=NOW)
        cat_phone = insert(conn, "devices", user_id=cat, platform="fcm", token="cat-fcm-token", app=None,
                           enabled=True, disabled_reason=None, created_at=NOW)
        insert(conn, "devices", user_id=cat, platform="fcm", token="cat-old-phone", app=None,
               enabled=False, disabled_reason="unregistered", created_at=NOW)
        chat = insert(conn, "chats", name="trip", creator_id=ann, created_at=NOW)
        for user, muted_until in ((ann, None), (bob, None), (cat, NOW + 3600)):
            insert(conn, "members", chat_id=chat, user_id=user, muted_until=muted_until, joined_at=NOW)
        message = insert(conn, "messages", chat_id=chat, sender_id=ann, text="before the upgrade",
                         client_id="c-1", created_at=NOW)
        insert(conn, "push_jobs", message_id=message, state="expanded", cursor_user=cat, cursor_device=cat_phone,
               created_at=NOW)
        insert(conn, "deliveries", message_id=message, device_id=bob_phone, platform="apns", state="sent",
               attempts=1, next_attempt_at=NOW, lease_owner=None, lease_until=None, last_status=200,
               last_reason=None, sent_at=NOW + 1, handled_by="host-a", created_at=NOW)
        insert(conn, "deliveries", message_id=message, device_id=cat_phone, platform="fcm", state="pending",
               attempts=2, next_attempt_at=NOW + 30, lease_owner="host-a:41:1", lease_until=NOW + 60,
               last_status=503, last_reason="Unavailable", sent_at=None, handled_by="host-a", created_at=NOW)
        insert(conn, "dispatchers", host_id="host-a", pid=41, started_at=NOW, heartbeat_at=NOW + 5,
               stopped_at=None)
    return {"ann": ann, "bob": bob, "chat": chat, "message": message}


def snapshot(engine: sa.Engine) -> dict[str, list[tuple]]:
    """Every row of the last release's tables, on its columns, in primary-key order."""
    with engine.connect() as conn:
        return {table: [tuple(row) for row in conn.execute(
                    sa.text(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {columns[0]}, {columns[1]}"))]
                for table, columns in RELEASE_TABLES.items()}


def describe(engine: sa.Engine) -> dict:
    """The schema as the database reports it: columns, keys, uniques and indexes of every table."""
    inspector = sa.inspect(engine)
    schema = {}
    for table in sorted(inspector.get_table_names()):
        schema[table] = {
            "columns": [(c["name"], str(c["type"]), c["nullable"], c.get("default"))
                        for c in inspector.get_columns(table)],
            "primary_key": inspector.get_pk_constraint(table)["constrained_columns"],
            "foreign_keys": sorted((tuple(fk["constrained_columns"]), fk["referred_table"],
                                    tuple(fk["referred_columns"])) for fk in inspector.get_foreign_keys(table)),
            "unique": sorted((u["name"] or "", tuple(u["column_names"]))
                             for u in inspector.get_unique_constraints(table)),
            "indexes": sorted((i["name"], tuple(i["column_names"]), i["unique"])
                              for i in inspector.get_indexes(table)),
        }
    return schema


def revision(engine: sa.Engine) -> str | None:
    """The Alembic revision the database is at (None before the first upgrade)."""
    with engine.connect() as conn:
        return db.schema_revision(conn)


# ---------------------------------------------------------------- the last release's database, upgraded

def test_schema_head_names_the_newest_revision():
    # start-up compares the database with this constant, so an up-to-date start imports no Alembic
    assert db.SCHEMA_HEAD == HEAD


def test_an_up_to_date_start_does_not_import_alembic(tmp_path):
    url = f"sqlite:///{tmp_path}/chat.sqlite3"
    engine = db.make_engine(url)
    db.migrate(engine)
    engine.dispose()
    code = ("import sys; from notifier import db; db.migrate(db.make_engine(sys.argv[1])); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'alembic'))")

    result = subprocess.run([sys.executable, "-c", code, url], capture_output=True, text=True,
                            timeout=PROCESS_TIMEOUT, cwd=Path(__file__).parent.parent)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"  # Alembic's import is 0.15-0.2 s of every start and reload


def test_the_fixture_is_a_database_of_the_last_release(engine):
    create_release_database(engine)

    tables = set(sa.inspect(engine).get_table_names())
    assert tables == set(RELEASE_TABLES) | {"meta"}
    assert revision(engine) is None


def test_upgrade_keeps_every_row_of_the_last_release(engine):
    create_release_database(engine)
    fill_release_database(engine)
    before = snapshot(engine)
    assert all(before.values()), {table: len(rows) for table, rows in before.items()}

    db.migrate(engine)

    assert snapshot(engine) == before
    assert revision(engine) == HEAD
    assert "meta" not in sa.inspect(engine).get_table_names()  # revision 0002: alembic_version replaces it


def test_the_app_works_on_an_upgraded_database(url, engine, tmp_path):
    create_release_database(engine)
    ids = fill_release_database(engine)
    engine.dispose()
    wakes = []

    settings = Settings(database_url=url, apns_topic="com.example.chat", push_run_dir=str(tmp_path / "run"))
    app = ContractTestApp(create_app(settings, wake=lambda: wakes.append(True)))
    ann = {"Authorization": "Bearer ann-token"}
    bob = {"Authorization": "Bearer bob-token"}

    assert app.get("/v1/me", headers=ann).json["name"] == "ann"
    assert [chat["id"] for chat in app.get("/v1/chats", headers=bob).json["chats"]] == [ids["chat"]]
    history = app.get(f"/v1/chats/{ids['chat']}/messages", headers=bob).json["messages"]
    assert [m["text"] for m in history] == ["before the upgrade"]
    report = app.get(f"/v1/messages/{ids['message']}/deliveries", headers=ann).json
    assert report["summary"]["sent"] == 1 and report["summary"]["pending"] == 1
    # a retried POST of the old message finds it (the unique client_id survived the upgrade) ...
    again = app.post_json(f"/v1/chats/{ids['chat']}/messages", {"text": "before the upgrade", "client_id": "c-1"},
                          headers=ann)
    assert again.json["id"] == ids["message"]
    # ... and new rows get new ids after the old ones
    posted = app.post_json(f"/v1/chats/{ids['chat']}/messages", {"text": "after the upgrade"}, headers=bob,
                           status=201)
    assert posted.json["id"] > ids["message"]
    assert wakes
    created = app.post_json("/v1/users", {"name": "dan"}, status=201).json
    assert created["id"] > ids["bob"]
    assert app.get("/healthz").status_int == 200
    app.app.config["chat.context"].engine.dispose()


def test_upgrading_twice_is_a_no_op(engine):
    create_release_database(engine)
    fill_release_database(engine)
    db.migrate(engine)
    rows, schema = snapshot(engine), describe(engine)

    db.migrate(engine)

    assert snapshot(engine) == rows
    assert describe(engine) == schema
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all() == [HEAD]


def test_an_upgraded_database_has_the_schema_of_a_new_one(engine):
    create_release_database(engine)
    db.migrate(engine)
    upgraded = describe(engine)
    with engine.begin() as conn:
        for table in reversed(schema.metadata.sorted_tables):
            conn.execute(sa.text(f"DROP TABLE {table.name}"))
        conn.execute(sa.text("DROP TABLE alembic_version"))

    db.migrate(engine)  # from nothing, as `make run` on a new machine

    assert describe(engine) == upgraded


def test_the_migrations_make_the_tables_the_code_declares(engine):
    db.migrate(engine)

    with engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), schema.metadata)
    assert differences == []


def test_revision_0001_makes_exactly_the_last_release_schema(engine):
    create_release_database(engine)
    release = describe(engine)
    with engine.begin() as conn:
        for table in [*reversed(schema.metadata.sorted_tables), sa.table("meta")]:
            if table.name in release:  # today's schema has tables the release had not
                conn.execute(sa.text(f"DROP TABLE {table.name}"))

    with db.migration_transaction(engine) as conn:
        command.upgrade(db.alembic_config(conn), FIRST_REVISION)

    made = describe(engine)
    assert made.pop("alembic_version")
    assert made == release


# ---------------------------------------------------------------- refusals and concurrency

def test_a_meta_table_of_an_unknown_version_is_refused(engine):
    create_release_database(engine)
    with db.writer(engine).begin() as conn:
        conn.exec_driver_sql("UPDATE meta SET value = '7'")

    with pytest.raises(RuntimeError, match="schema_version='7'"):
        db.migrate(engine)
    assert revision(engine) is None  # the failed start-up changed nothing


def _migrate_in_child(url: str, barrier) -> None:
    """A process starting the service: wait for the other, then migrate the same database."""
    engine = db.make_engine(url)
    barrier.wait(timeout=PROCESS_TIMEOUT)
    db.migrate(engine)
    engine.dispose()


@pytest.mark.parametrize("from_release", [False, True], ids=["new", "last-release"])
def test_two_processes_upgrading_at_once_both_succeed(url, engine, from_release):
    if from_release:
        create_release_database(engine)
        fill_release_database(engine)
    before = snapshot(engine) if from_release else None
    engine.dispose()
    # forked, as uWSGI forks: each child opens its own engine after the fork (spawn would cost
    # seconds of imports per child and test nothing more)
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2)
    children = [context.Process(target=_migrate_in_child, args=(url, barrier)) for _ in range(2)]
    for child in children:
        child.start()
    try:
        for child in children:
            child.join(PROCESS_TIMEOUT)
        assert [child.exitcode for child in children] == [0, 0]
    finally:
        for child in children:
            if child.is_alive():
                child.kill()
                child.join(5)

    assert revision(engine) == HEAD
    if from_release:
        assert snapshot(engine) == before
    assert set(sa.inspect(engine).get_table_names()) == set(schema.metadata.tables) | {"alembic_version"}


def test_fanouts_complete_before_the_upgrade_get_their_summary_and_no_event(engine):
    create_release_database(engine)
    ids = fill_release_database(engine)  # its message: one delivery sent, one pending
    with db.writer(engine).begin() as conn:
        done = insert(conn, "messages", chat_id=ids["chat"], sender_id=ids["ann"], text="all sent",
                      client_id=None, created_at=NOW)
        insert(conn, "push_jobs", message_id=done, state="expanded", cursor_user=None, cursor_device=None,
               created_at=NOW)
        bob_phone = conn.execute(sa.text("SELECT id FROM devices WHERE user_id = :u"), {"u": ids["bob"]}).scalar()
        insert(conn, "deliveries", message_id=done, device_id=bob_phone, platform="apns", state="sent",
               attempts=1, next_attempt_at=NOW, lease_owner=None, lease_until=None, last_status=200,
               last_reason=None, sent_at=NOW, handled_by="host-a", created_at=NOW)

    db.migrate(engine)

    with engine.connect() as conn:
        fanouts = conn.execute(sa.select(schema.fanouts)).all()
        jobs = dict(conn.execute(sa.select(schema.push_jobs.c.message_id, schema.push_jobs.c.state)).all())
        events = conn.execute(sa.select(sa.func.count()).select_from(schema.webhook_events)).scalar()
    assert [(f.message_id, f.sent, f.failed, f.skipped, f.pruned_at) for f in fanouts] == [(done, 1, 0, 0, None)]
    assert jobs == {ids["message"]: "expanded", done: "completed"}  # the one still pending is left to the dispatcher
    assert events == 0
