"""The real uWSGI in a subprocess, with the project's uwsgi.ini, for end-to-end tests.

Only the socket (CHAT_HTTP_SOCKET), the database (DATABASE_URL) and the run directory change;
extra uWSGI options may be appended (they override the ini's scalar options). Every process a
test starts is stopped: uWSGI by stop(), and the dispatchers it started (which outlive it on
purpose) by kill_dispatchers(), found through the database's dispatcher registry.
"""
from __future__ import annotations

import ctypes
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from notifier import db, schema

ROOT = Path(__file__).resolve().parent.parent
UWSGI = Path(sys.executable).parent / "uwsgi"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float, interval: float = 0.05, message: str = "condition"):
    """Poll `predicate` until it returns a truthy value; raise AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """True when the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def start_ticks(pid: int) -> int | None:
    """When the process started, in clock ticks since boot (/proc/PID/stat field 22)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def port_is_free(port: int) -> bool:
    """Nobody listens on the port, and a new server could bind it (as uWSGI does, with SO_REUSEADDR)."""
    with socket.socket() as probe:
        try:
            probe.connect(("127.0.0.1", port))
            return False
        except ConnectionRefusedError:
            pass
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            return False
    return True


@dataclass
class Response:
    """A small HTTP answer."""

    status: int
    body: dict | str | None
    headers: dict


_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it


def _terminate_with_parent(parent: int) -> None:
    """Runs in the child between fork and exec: the kernel sends it SIGTERM (uWSGI's die-on-term:
    a clean stop) when the test process dies. A session killed mid-run (SIGKILL, a timeout) then
    leaves no uWSGI behind, re-parented to init and holding ports and files. A parent that died
    before the request was made sends nothing (prctl(2)): then the child exits at once (seen: a
    benchmark killed while it started a server left that uWSGI running)."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(1)


class UwsgiServer:
    """One uWSGI instance on a free loopback port, over its own SQLite file (or a given URL)."""

    def __init__(self, workdir: Path, env: dict | None = None, args: tuple = (), database_url: str | None = None,
                 workers: int = 4):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.database_url = database_url or f"sqlite:///{self.workdir / 'chat.sqlite3'}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("APNS_", "FCM_", "PUSH_", "WEBHOOK_"))},
            "CHAT_HTTP_SOCKET": f"127.0.0.1:{self.port}",
            "DATABASE_URL": self.database_url,
            "PUSH_RUN_DIR": str(self.workdir / "run"),
            "PUSH_IDLE_EXIT": "5",
            **(env or {}),
        }
        self.args = list(args)
        self.workers = workers  # uwsgi.ini's `processes`, unless args change it
        self.log_path = self.workdir / f"uwsgi-{self.port}.log"
        self.process: subprocess.Popen | None = None
        self.started_ticks: int | None = None
        self._engine = None

    # ------------------------------------------------------------------ life cycle

    def start(self, timeout: float = 30.0) -> "UwsgiServer":
        """Start uWSGI and wait until /healthz answers 200."""
        self._log = open(self.log_path, "ab")
        # the parent-death signal fires when the *thread* that started the child ends: only the
        # main thread, which lives as long as the session, may ask for it
        main_thread = threading.current_thread() is threading.main_thread()
        self.process = subprocess.Popen(
            [str(UWSGI), "--ini", str(ROOT / "uwsgi.ini"), *self.args],
            cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=functools.partial(_terminate_with_parent, os.getpid()) if main_thread else None,
        )
        if self.started_ticks is None:
            self.started_ticks = start_ticks(self.process.pid)
        wait_until(self._ready, timeout, message=f"uWSGI on port {self.port} (log: {self.log_path})")
        return self

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"uWSGI exited with {self.process.returncode}: {self.log_tail()}")
        # the app loaded and every worker forked: a signal to a half-started instance is no clean stop
        log = self.log_path.read_text(errors="replace")
        if "WSGI app 0 (mountpoint='') ready" not in log or log.count("spawned uWSGI worker") < self.workers:
            return False
        try:
            return self.get("/healthz", timeout=1.0).status == 200
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> float:
        """Signal uWSGI's master and wait for it to exit; returns the seconds it took."""
        if self.process is None or self.process.poll() is not None:
            return 0.0
        started = time.monotonic()
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)
            raise AssertionError(f"uWSGI did not stop within {timeout} s")
        finally:
            self._log.close()
        return time.monotonic() - started

    def close(self) -> None:
        """Stop everything this server started, whatever state it is in."""
        try:
            if self.process is not None and self.process.poll() is None:
                self.stop()
        finally:
            if self.process is not None and self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
            self.kill_dispatchers()
            if self._engine is not None:
                self._engine.dispose()

    def log_tail(self, lines: int = 40) -> str:
        """The end of uWSGI's log, for failure messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    # ------------------------------------------------------------------ HTTP

    def url(self, path: str) -> str:
        """The full URL of `path` on this server."""
        return f"http://127.0.0.1:{self.port}{path}"

    def request(self, method: str, path: str, body=None, token: str | None = None,
                timeout: float = 10.0) -> Response:
        """One JSON request; 4xx/5xx come back as a Response too."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url(path), data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                return _response(answer.status, answer.read(), dict(answer.headers))
        except urllib.error.HTTPError as error:
            return _response(error.code, error.read(), dict(error.headers))

    def get(self, path: str, token: str | None = None, timeout: float = 10.0) -> Response:
        """GET `path`."""
        return self.request("GET", path, token=token, timeout=timeout)

    def post(self, path: str, body, token: str | None = None) -> Response:
        """POST JSON to `path`."""
        return self.request("POST", path, body, token)

    # ------------------------------------------------------------------ the database behind it

    @property
    def engine(self):
        """An engine on the server's database, for set-up and inspection."""
        if self._engine is None:
            self._engine = db.make_engine(self.database_url)
        return self._engine

    def dispatcher_pids(self) -> list[int]:
        """Pids of dispatchers registered in the database that are still running."""
        try:
            with self.engine.connect() as conn:
                pids = conn.execute(sa.select(schema.dispatchers.c.pid)).scalars().all()
        except sa.exc.DBAPIError:
            return []
        return [pid for pid in set(pids) if pid_alive(pid) and self._ours(pid)]

    def _ours(self, pid: int) -> bool:
        """Guard against pid reuse: a dispatcher of ours started after this server did.

        (uWSGI's procname rewrites the argv and environ memory that forks inherit, so neither
        can tell us whose process it is.)
        """
        started = start_ticks(pid)
        return started is not None and self.started_ticks is not None and started >= self.started_ticks

    def kill_dispatchers(self, sig: int = signal.SIGKILL, timeout: float = 5.0) -> None:
        """Stop every dispatcher this server's database knows of, and wait until they are gone."""
        for pid in self.dispatcher_pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        wait_until(lambda: not self.dispatcher_pids(), timeout, message="dispatchers to exit")


def _response(status: int, raw: bytes, headers: dict) -> Response:
    try:
        body = json.loads(raw) if raw else None
    except ValueError:
        body = raw.decode(errors="replace")
    return Response(status, body, headers)
