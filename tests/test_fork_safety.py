"""No SQLite state crosses a fork: the parent closes its connections before it forks a dispatcher."""
from __future__ import annotations

import os

import pytest

from notifier import db

pytestmark = pytest.mark.timeout(30)


def open_database_files(database: str, pid: str = "self") -> list[str]:
    """The database, -wal and -shm files that process `pid` has open."""
    found = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith(database) and not target.endswith("-writers.lock"):
            found.append(target)
    return found


def child_sees(database: str) -> int:
    """Fork; the child exits with the number of database files it inherited open."""
    pid = os.fork()
    if pid == 0:  # the child: report, and leave without running the parent's cleanup
        os._exit(min(len(open_database_files(database)), 100))
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.fixture
def engine(tmp_path):
    engine = db.make_engine(f"sqlite:///{tmp_path}/chat.sqlite3")
    db.migrate(engine)
    with engine.connect() as conn:  # a pooled connection, as a worker has after a request
        db.ping(conn)
    yield engine
    engine.dispose()


def test_a_worker_holds_the_database_open_between_requests(engine):
    assert open_database_files(engine.url.database), "the pool keeps a connection (so the test means something)"


def test_closing_before_the_fork_leaves_the_child_nothing_of_sqlite(engine):
    assert db.close_sqlite_before_fork() is True
    assert open_database_files(engine.url.database) == []
    assert child_sees(engine.url.database) == 0
    with engine.connect() as conn:  # the parent reopens on its next use
        db.ping(conn)


def test_a_connection_in_use_makes_the_fork_unsafe_and_says_so(engine):
    with engine.connect() as conn:
        db.ping(conn)
        assert db.close_sqlite_before_fork() is False  # the Waker then does not fork now
    assert db.close_sqlite_before_fork() is True
