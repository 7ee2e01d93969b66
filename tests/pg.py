"""PostgreSQL for tests: a throw-away database on the shared server, or a private server of our own.

TEST_DATABASE_URL (default postgresql://postgres@127.0.0.1:5432/test) names the shared server; each
test run creates its own uniquely named database there and drops it afterwards. TempPostgres runs a
server from the installed binaries in a temporary folder on a free port, for tests that must stop
and restart it: the machine's shared server is never restarted.
"""
from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.harness import free_port, wait_until

PG_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _connect(url: str):
    import psycopg
    return psycopg.connect(url, autocommit=True, connect_timeout=3)


def unreachable_reason(url: str = PG_URL) -> str | None:
    """None when PostgreSQL answers at `url`, else why not (for pytest.skip)."""
    try:
        with _connect(url):
            return None
    except Exception as exc:  # noqa: BLE001 - any failure means: skip, and say why
        return f"PostgreSQL not reachable at {url}: {type(exc).__name__}: {str(exc).strip()[:200]}"


def require_postgres(url: str = PG_URL) -> None:
    """Skip the calling test, with the reason, when no PostgreSQL is reachable."""
    reason = unreachable_reason(url)
    if reason:
        pytest.skip(reason)


@contextlib.contextmanager
def temporary_database(server_url: str = PG_URL):
    """Create a uniquely named database on the server; yield its URL; drop it (closing its sessions)."""
    base, _, _ = server_url.rpartition("/")
    name = f"chat_test_{uuid.uuid4().hex[:12]}"
    with _connect(server_url) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{base}/{name}"
    finally:
        with _connect(server_url) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


class TempPostgres:
    """A PostgreSQL server of our own: initdb in `directory`, on a free loopback port, trust auth."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.data = self.directory / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.log = self.directory / "postgres.log"

    @staticmethod
    def unavailable_reason() -> str | None:
        """None when initdb and pg_ctl are installed, else why the test must skip."""
        if not (_pg_bin("initdb") and _pg_bin("pg_ctl")):
            return "PostgreSQL server binaries (initdb, pg_ctl) are not installed"
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                return "running as root and there is no 'postgres' user to run initdb as"
        return None

    def _run(self, *args: str, timeout: float = 60) -> None:
        command = list(args)
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, timeout=timeout, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def init(self) -> "TempPostgres":
        """Create the cluster."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            for path in [self.directory, *self.directory.parents]:
                if path == Path("/"):
                    break
                os.chmod(path, os.stat(path).st_mode | 0o711)  # let postgres reach its folder
            os.chown(self.directory, entry.pw_uid, entry.pw_gid)
        self._run(_pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        return self

    def start(self) -> "TempPostgres":
        """Start the server and wait until it accepts connections."""
        options = f"-p {self.port} -h 127.0.0.1 -k {self.directory} -c fsync=off"
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")
        wait_until(lambda: unreachable_reason(self.url) is None, 30, interval=0.1, message="PostgreSQL to start")
        return self

    def stop(self) -> None:
        """Stop the server at once (fast mode: open sessions are cut, as in a crash or a restart)."""
        if (self.data / "postmaster.pid").exists():
            self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def database(self, name: str = "chat") -> str:
        """Create a database on this server; return its URL."""
        with _connect(self.url) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url.rsplit("/", 1)[0] + f"/{name}"
