"""What the benchmarks share: the fakes (own processes), TLS material, servers under uWSGI, chats.

Servers are tests.harness.UwsgiServer (the real uWSGI with the project's uwsgi.ini, on a free
port, over its own SQLite file); chats are built with tests.e2e's helpers (HTTP sign-up, then
devices bulk-inserted straight into the database). Web Push devices are subscriptions made by the
Web Push fake (its browsers keep the private keys), inserted the same way.

Web Push is configured only in the servers that ask for it (`server(..., webpush=True)`): with a
VAPID key the dispatcher builds the real Web Push provider, which imports pywebpush, py_vapid and
aiohttp (8 MB more RSS in every dispatcher and a slower start), and the other benchmarks' numbers
(the memory benchmark's peak RSS, the baselines that build providers per thread or process) would
move for a platform they do not send to.
"""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

from bench.fakes import FakeProcess
from notifier import db, outbox, schema
from tests.e2e import add_bulk_member, make_chat
from tests.fakes.tls import make_tls_material
from tests.harness import UwsgiServer, pid_alive, wait_until

# the service as deployed, pointed at the fakes; the dispatcher stays up between the phases of a benchmark
SERVICE_ENV = {"PUSH_IDLE_EXIT": "600"}


class BenchEnv:
    """The fakes and a scratch directory for one `python -m bench` run."""

    def __init__(self, workdir: Path | None = None, keep: bool = False):
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="chat-bench-"))
        self.keep = keep
        self.apns: FakeProcess | None = None
        self.fcm: FakeProcess | None = None
        self.webpush: FakeProcess | None = None
        self.servers: list[UwsgiServer] = []
        self._chat_seq = 0

    def __enter__(self) -> "BenchEnv":
        tls = make_tls_material(self.workdir / "tls")
        self.ca_file = str(tls.ca_cert)
        self.apns = FakeProcess("apns", self.workdir / "apns", self.workdir / "tls").start()
        self.fcm = FakeProcess("fcm", self.workdir / "fcm", self.workdir / "tls").start()
        self.webpush = FakeProcess("webpush", self.workdir / "webpush", self.workdir / "tls").start()
        return self

    def __exit__(self, *exc) -> None:
        for server in list(self.servers):
            self.stop_server(server)
        for fake in self.fakes:
            fake.stop()
        if not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def fakes(self) -> list[FakeProcess]:
        """The fake processes started so far."""
        return [fake for fake in (self.apns, self.fcm, self.webpush) if fake is not None]

    @property
    def push_env(self) -> dict:
        """The environment that points the service's APNs and FCM providers at the fakes."""
        return {**self.apns.info["env"], **self.fcm.info["env"], "PUSH_CA_FILE": self.ca_file}

    @property
    def webpush_env(self) -> dict:
        """What Web Push adds to push_env: the bench's VAPID key (made by the fake's process, in the
        scratch directory), VAPID_SUBJECT, and WEBPUSH_ALLOWED_HOSTS=127.0.0.1:<the fake's port>
        (PUSH_CA_FILE already trusts the fake's certificate)."""
        return dict(self.webpush.info["env"])

    def server(self, name: str, env: dict | None = None, module: str | None = None, args: tuple = (),
               database_url: str | None = None, reset_marks: bool = True, webpush: bool = False) -> UwsgiServer:
        """Start uWSGI with the project's uwsgi.ini (optionally another WSGI module: the baselines, and
        extra uWSGI options, which override the ini's) over its own SQLite file, or `database_url`;
        `webpush`: with the Web Push provider pointed at the fake (see the module docstring)."""
        args = (("--module", module) if module else ()) + tuple(args)
        if reset_marks:  # message ids start at 1 again in the new server's database
            for fake in self.fakes:
                fake.marks_reset()
        push_env = {**self.push_env, **(self.webpush_env if webpush else {})}
        server = UwsgiServer(self.workdir / name, env={**push_env, **SERVICE_ENV, **(env or {})}, args=args,
                             database_url=database_url)
        self.servers.append(server)
        server.start(timeout=60)
        return server

    def stop_server(self, server: UwsgiServer) -> None:
        """Stop uWSGI, its dispatchers, and whatever its workers started (the baselines' processes)."""
        if server in self.servers:
            self.servers.remove(server)
        pgid = server.process.pid if server.process is not None else None
        try:
            server.close()
        finally:
            if pgid is not None:
                try:
                    os.killpg(pgid, signal.SIGKILL)  # naive children share uWSGI's process group
                except ProcessLookupError:
                    pass

    def chat(self, server: UwsgiServer, apns: int = 0, fcm: int = 0, webpush: int = 0) -> "BenchChat":
        """A chat whose messages go to `apns` + `fcm` recipient devices (one bulk member) and `webpush`
        browsers (another member: new subscriptions of the Web Push fake; the server needs
        `webpush=True` to send to them)."""
        chat = make_chat(server, {})
        self._chat_seq += 1
        start = self._chat_seq * 10_000_000
        if apns or fcm or not webpush:
            add_bulk_member(server, chat, apns_devices=apns, fcm_devices=fcm, start=start)
        subscriptions = []
        if webpush:
            subscriptions = self.webpush.subscribe(webpush)
            add_webpush_member(server, chat, subscriptions, start)
        return BenchChat(chat.chat_id, chat.sender_token, apns + fcm + webpush, subscriptions)


def add_webpush_member(server: UwsgiServer, chat, subscriptions: list[dict], start: int) -> None:
    """One member with a Web Push device per subscription, inserted straight into the database as
    tests.e2e.add_bulk_member does for APNs and FCM (the rows POST /v1/devices would write: platform
    "webpush", the endpoint as the token, the keys beside it)."""
    user = server.post("/v1/users", {"name": f"browsers{start}"}).body
    answer = server.post(f"/v1/chats/{chat.chat_id}/members", {"user_id": user["id"]}, token=chat.sender_token)
    if answer.status != 201:
        raise RuntimeError(f"adding the Web Push member answered {answer.status}: {answer.body!r}")
    rows = [{"user_id": user["id"], "platform": "webpush", "token": sub["endpoint"], "app": None,
             "p256dh": sub["keys"]["p256dh"], "auth": sub["keys"]["auth"], "enabled": True, "created_at": 0.0}
            for sub in subscriptions]
    with db.writer(server.engine).begin() as conn:
        conn.execute(schema.devices.insert(), rows)


class BenchChat:
    def __init__(self, chat_id: int, token: str, devices: int, subscriptions: list[dict] | None = None):
        self.chat_id = chat_id
        self.token = token
        self.devices = devices
        self.subscriptions = subscriptions or []  # Web Push: the browsers' PushSubscription dicts

    @property
    def path(self) -> str:
        return f"/v1/chats/{self.chat_id}/messages"


def dispatcher_pid(server: UwsgiServer, timeout: float = 15.0) -> int:
    """The pid of the live dispatcher (from the `dispatchers` table)."""
    return wait_until(lambda: (server.dispatcher_pids() or [None])[0], timeout, message="a dispatcher")


def queue_depth(server: UwsgiServer) -> dict:
    """Pending jobs / deliveries and the oldest pending age, read from the database."""
    with server.engine.connect() as conn:
        return outbox.queue_depth(conn, time.time())


def drop_backlog(server: UwsgiServer) -> None:
    """Between phases: mark everything still queued as done (leases cleared), so the next phase starts
    from an empty outbox. The dispatcher stays up and warm: its batch in flight is not recorded
    (the lease is no longer its own).

    On PostgreSQL this bulk update takes row locks in its own order, against a dispatcher that is
    recording a batch (its rows, then the job row): the database may pick it as a deadlock's
    victim (40P01), which is then retried. (The service's own transactions cannot form such a
    cycle: claims take only unlocked rows, SKIP LOCKED.)"""
    for attempt in range(5):
        try:
            with db.writer(server.engine).begin() as conn:
                conn.execute(schema.deliveries.update().where(schema.deliveries.c.state == "pending")
                             .values(state="skipped", last_reason="bench_dropped", lease_owner=None,
                                     lease_until=None))
                conn.execute(schema.push_jobs.update()
                             .where(schema.push_jobs.c.state.in_(["pending", "expanded"]))
                             .values(state="completed"))
            return
        except sa.exc.OperationalError as exc:
            if getattr(exc.orig, "sqlstate", None) != "40P01" or attempt == 4:
                raise
            time.sleep(0.1)


def wait_drained(server: UwsgiServer, timeout: float, interval: float = 0.1) -> float | None:
    """Wait until nothing is pending; the seconds it took, or None on timeout."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        depth = queue_depth(server)
        if depth["pending_jobs"] == 0 and depth["pending_deliveries"] == 0:
            return time.monotonic() - started
        time.sleep(interval)
    return None


def delivery_states(server: UwsgiServer, message_ids=None) -> dict:
    query = sa.select(schema.deliveries.c.state, sa.func.count()).group_by(schema.deliveries.c.state)
    if message_ids is not None:
        query = query.where(schema.deliveries.c.message_id.in_(list(message_ids)))
    with server.engine.connect() as conn:
        return dict(conn.execute(query).all())


__all__ = ["BenchEnv", "BenchChat", "add_webpush_member", "dispatcher_pid", "queue_depth", "drop_backlog", "wait_drained",
           "delivery_states", "pid_alive"]
