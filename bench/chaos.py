"""`python -m bench.chaos [--seed N] [--faults N] [--database sqlite|postgresql|both] ...`: a seeded chaos run.

Messages stream (a few per second, from a thread, each POST with a client_id and retried on
connection errors and 5xx as a real client would) into a few chats of APNs and FCM devices, under
the real uWSGI with the project's uwsgi.ini, while seeded random faults hit at random moments:

- ``dispatcher_kill``  SIGKILL of a dispatcher (found through the database's registry)
- ``worker_kill``      SIGKILL of a uWSGI worker (a child of the master)
- ``reload``           SIGHUP to the master; waits until it serves again
- ``restart``          stop (SIGTERM) and start of uWSGI, same database
- ``storm_5xx``, ``storm_429``, ``storm_goaway``, ``storm_slow``  provider storms from the fakes,
  each for a short random time (500/503; 429 with Retry-After; APNs GOAWAY after a few requests
  per connection; answers delayed)
- PostgreSQL only (a private TempPostgres server, so it can be restarted):
  ``db_restart`` (fast stop, start) and ``host_kill`` (a second host, another PUSH_HOST_ID on the
  same database: SIGKILL of its master's process group and of its dispatcher, then started again)

The kinds come in rounds, each round a seeded shuffle of every kind, so even a short run mixes
them. The seed is printed; the same seed replays the same faults, targets and pauses (the
machine's timing still varies). At the end it waits (bounded) until every message's deliveries
are complete, then reports messages, deliveries, faults by kind, pushes lost (expected
(token, message) pairs no fake ever accepted), duplicates (pairs accepted twice or more, each
attributed to a fault, or reported as unexplained), the longest time from a fault to the next
message fully delivered, 5xx answers seen by the stream (503 while the database is down counted
apart), `PRAGMA integrity_check` on SQLite, processes holding a deleted database file, and
processes left over after everything was closed. It prints tables, saves
bench/results/chaos.json, and asserts nothing: tests/test_chaos.py is the short version with
assertions.

Every process started is stopped (try/finally), every wait is bounded, ports are picked free,
everything listens on 127.0.0.1 only.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import http.client
import os
import random
import shutil
import signal
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import sqlalchemy as sa

from standardwebhooks import Webhook, WebhookVerificationError

from bench.common import machine_info, percentile, print_tables, save, table
from notifier import schema
from tests.e2e import Chat, Fakes, add_bulk_member, make_chat, running_fakes
from tests.fakes.apns import APNsFake
from tests.fakes.fcm import FCMFake
from tests.fakes.webhook import WebhookReceiver
from tests.harness import UwsgiServer, pid_alive, start_ticks, wait_until
from tests.pg import TempPostgres

NAME = "chaos"
BASE_KINDS = ("dispatcher_kill", "worker_kill", "reload", "restart",
              "storm_5xx", "storm_429", "storm_goaway", "storm_slow")
POSTGRES_KINDS = ("db_restart", "host_kill")
DB_SUFFIXES = ("", "-wal", "-shm", "-journal")

# Storms come back to back in a chaos run, so the retry budget is sized for that rather than for
# real outages: the run measures durability (lost pushes), not the exhaustion of PUSH_MAX_ATTEMPTS.
SERVICE_ENV = {"PUSH_MAX_ATTEMPTS": "30", "PUSH_RETRY_MAX": "5"}
# result webhooks on, to a receiver that is up throughout: every completed fan-out must be reported
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"chaos-run-webhook-signing-key-32").decode()


# ------------------------------------------------------------------ configuration

@dataclass
class ChaosConfig:
    """What one run does. Plain values, so the JSON result can carry it."""

    seed: int
    faults: int = 100
    database: str = "sqlite"            # "sqlite" or "postgresql"
    chats: int = 3
    apns_per_chat: int = 200
    fcm_per_chat: int = 50
    rate: float = 2.0                   # messages per second, spread over the chats
    gap: tuple = (0.5, 2.5)             # seconds between the end of a fault and the next one
    storm: tuple = (1.0, 4.0)           # how long a provider storm lasts
    down: tuple = (0.5, 2.5)            # how long a stopped uWSGI / database / host stays down
    explain_window: float = 2.0         # a fault this long before a first copy still explains its duplicate
    integrity_every_fault: bool = True  # SQLite: PRAGMA integrity_check after every fault
    final_timeout: float = 240.0        # bound on the wait for every delivery to complete
    post_deadline: float = 60.0         # a client gives up retrying one POST after this long
    workers: int = 4                    # uWSGI workers per host
    env: dict = field(default_factory=dict)  # extra environment for the service

    def kinds(self) -> tuple:
        """The fault kinds this database allows."""
        return BASE_KINDS + (POSTGRES_KINDS if self.database == "postgresql" else ())


def schedule(config: ChaosConfig) -> list[str]:
    """The kinds of the run's faults, in order: rounds, each a seeded shuffle of every kind."""
    rng = random.Random(f"{config.seed}:schedule")
    kinds, out = list(config.kinds()), []
    while len(out) < config.faults:
        rng.shuffle(kinds)
        out.extend(kinds)
    return out[:config.faults]


# ------------------------------------------------------------------ protocol fakes that remember every acceptance

class RecordingAPNsFake(APNsFake):
    """APNsFake keeping only (token, message id, time) of each accepted push: a long run answers
    hundreds of thousands of requests, and the full records (headers, payload) would not fit."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, record=False, **kwargs)
        self.accepted: list = []

    def _record_answer(self, conn, stream, verdict):
        if verdict.status == 200 and isinstance(verdict.payload, dict):
            self.accepted.append((verdict.token, int(verdict.payload.get("message_id", 0)), time.time()))
        super()._record_answer(conn, stream, verdict)


class RecordingFCMFake(FCMFake):
    """FCMFake keeping only (token, message id, time) of each accepted push."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, record=False, **kwargs)
        self.accepted: list = []

    def _record(self, request, token, status, sent):
        if sent and request is not None:
            data = (request.message or {}).get("data") or {}
            self.accepted.append((token, int(data.get("message_id", 0)), request.at))
        super()._record(request, token, status, sent)


def recording_fakes(directory: Path):
    """tests.e2e.running_fakes with the recording fakes above; yields Fakes; always stops them."""
    return running_fakes(directory, apns_class=RecordingAPNsFake, fcm_class=RecordingFCMFake)


def accepted_pairs(fakes: Fakes) -> dict:
    """(token, message id) -> sorted acceptance times, over both fakes."""
    pairs = defaultdict(list)
    for token, message_id, at in list(fakes.apns.accepted) + list(fakes.fcm.accepted):
        pairs[(token, message_id)].append(at)
    for times in pairs.values():
        times.sort()
    return pairs


# ------------------------------------------------------------------ the process table

def _stat_fields(pid: int) -> list | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_table() -> dict:
    """pid -> (parent pid, state letter) of every process visible in /proc."""
    table_ = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat_fields(int(name))
            if fields is not None:
                table_[int(name)] = (int(fields[1]), fields[0])
    return table_


def children(pid: int, procs: dict | None = None) -> list[int]:
    """Live (non-zombie) direct children of `pid`."""
    procs = process_table() if procs is None else procs
    return sorted(p for p, (ppid, state) in procs.items() if ppid == pid and state != "Z")


def descendants(pid: int | None = None) -> list[int]:
    """Live descendants of `pid` (default: this process), at any depth."""
    procs = process_table()
    root = os.getpid() if pid is None else pid
    found, frontier = [], [root]
    while frontier:
        parent = frontier.pop()
        for child in children(parent, procs):
            found.append(child)
            frontier.append(child)
    return sorted(found)


def process_started_at(pid: int) -> float | None:
    """When the process started, as a time.time() value (boot time + /proc/PID/stat's start ticks)."""
    ticks = start_ticks(pid)
    if ticks is None:
        return None
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return int(line.split()[1]) + ticks / os.sysconf("SC_CLK_TCK")
    return None


def cmdline(pid: int) -> str:
    """The process's command line as one string ('' when it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def is_postgres(line: str) -> bool:
    """A PostgreSQL server process, from its command line: the postmaster keeps its binary's path
    as argv[0], the backends retitle themselves 'postgres: ...'."""
    first = line.split(" ", 1)[0]
    return first.startswith("postgres") or first.endswith("/postgres")


def uwsgi_workers(server: UwsgiServer) -> list[int]:
    """The uWSGI workers of `server`: children of its master titled as workers."""
    if server.process is None or server.process.poll() is not None:
        return []
    return [pid for pid in children(server.process.pid) if "uWSGI worker" in cmdline(pid)]


def holders_of_deleted(path: str) -> list[dict]:
    """Every process with the database file (or its -wal, -shm, -journal) open after it was deleted."""
    targets = {f"{path}{suffix} (deleted)" for suffix in DB_SUFFIXES}
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{name}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{name}/fd/{fd}")
            except OSError:
                continue
            if target in targets:
                found.append({"pid": int(name), "fd": int(fd), "file": target, "cmdline": cmdline(int(name))})
    return found


class Subreaper:
    """Make this process the child subreaper for the run (prctl PR_SET_CHILD_SUBREAPER).

    Dispatchers detach from the worker that forked them; when that worker dies they would be
    re-parented to init and lost from view. As subreaper, this process inherits them instead, so
    "nothing left running" is a plain walk of our own descendants, whatever the database registry
    says (it is unreachable while PostgreSQL restarts) and whatever the processes call themselves.
    Orphans that die become our zombies: reap() collects them, never a pid a Popen still owns.
    """

    PR_SET_CHILD_SUBREAPER = 36

    def __init__(self):
        self.active = False
        self.owned: set = set()  # pids whose exit status a subprocess.Popen is waiting for

    def __enter__(self) -> "Subreaper":
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            self.active = libc.prctl(self.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
        except (OSError, AttributeError):
            self.active = False  # not Linux: leftovers are then checked through the registry only
        return self

    def __exit__(self, *exc) -> None:
        self.reap()
        if self.active:
            ctypes.CDLL(None).prctl(self.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)

    def reap(self) -> int:
        """waitpid() every zombie child that no Popen owns; returns how many."""
        reaped = 0
        for pid, (ppid, state) in process_table().items():
            if ppid == os.getpid() and state == "Z" and pid not in self.owned:
                try:
                    os.waitpid(pid, os.WNOHANG)
                    reaped += 1
                except ChildProcessError:
                    pass
        return reaped


# ------------------------------------------------------------------ the message stream

@dataclass
class Post:
    """One message the stream sent: every attempt, and the final answer."""

    seq: int
    chat: int
    client_id: str
    started: float
    finished: float | None = None
    message_id: int | None = None
    status: int | None = None
    attempts: list = field(default_factory=list)  # [started, finished, host, status or error name]


class MessageStream(threading.Thread):
    """Posts messages at `rate` per second, round-robin over chats and hosts, until stopped.

    Each POST carries a client_id, so a retry (on a connection error, a timeout or a 5xx, as a
    real client would, until `deadline` seconds have passed) is idempotent: the service answers
    200 with the first message when it had already stored it.
    """

    def __init__(self, hosts: list, chats: list[Chat], rate: float, seed: int, deadline: float = 60.0):
        super().__init__(name="chaos-stream", daemon=True)
        self.hosts = hosts  # list of UwsgiServer (shared with the fault thread: read only here)
        self.chats = chats
        self.interval = 1.0 / rate
        self.seed = seed
        self.deadline = deadline
        self.posts: list[Post] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        seq = 0
        next_at = time.monotonic()
        while not self.stopping.is_set():
            delay = next_at - time.monotonic()
            if delay > 0 and self.stopping.wait(delay):
                break
            next_at = max(next_at + self.interval, time.monotonic() - self.interval)
            self.post(seq)
            seq += 1

    def post(self, seq: int) -> Post:
        """Send message `seq`, retrying until a final answer or the deadline."""
        index = seq % len(self.chats)
        chat = self.chats[index]
        record = Post(seq, index, f"chaos-{self.seed}-{seq}", time.time())
        self.posts.append(record)
        body = {"text": f"chaos message {seq}", "client_id": record.client_id}
        host = seq % len(self.hosts)
        pause = 0.1
        while True:
            server = self.hosts[host]
            began = time.time()
            try:
                answer = server.request("POST", f"/v1/chats/{chat.chat_id}/messages", body,
                                        token=chat.sender_token, timeout=10.0)
                outcome = answer.status
            except (OSError, http.client.HTTPException) as exc:
                answer, outcome = None, type(exc).__name__
            record.attempts.append([began, time.time(), host, outcome])
            if answer is not None and answer.status < 500:
                record.finished, record.status = time.time(), answer.status
                if answer.status in (200, 201):
                    record.message_id = answer.body["id"]
                return record
            if time.time() - record.started > self.deadline:
                record.finished, record.status = time.time(), answer.status if answer is not None else None
                return record
            # a client behind a load balancer lands on another host when this one refuses
            host = (host + 1) % len(self.hosts)
            time.sleep(pause)
            pause = min(pause * 2, 1.0)


# ------------------------------------------------------------------ faults

@dataclass
class Fault:
    """One fault: when it began and ended (time.time()), what it hit, and the checks after it."""

    seq: int
    kind: str
    start: float
    end: float | None = None
    detail: dict = field(default_factory=dict)
    error: str | None = None
    integrity: str | None = None        # SQLite: PRAGMA integrity_check after the fault
    deleted_holders: list = field(default_factory=list)


class ChaosRun:
    """The set-up, the faults and the bookkeeping of one run on one database.

    Use as a context manager: everything started in __enter__ or during the run is stopped in
    __exit__, and close() reports what was still running after that.
    """

    def __init__(self, config: ChaosConfig, workdir: Path, log=print):
        self.config = config
        self.workdir = Path(workdir)
        self.log = log
        self.rng = random.Random(f"{config.seed}:faults")  # replaced per fault by run()
        self.faults: list[Fault] = []
        self.hosts: list[UwsgiServer] = []
        self.chats: list[Chat] = []
        self.tokens: dict[int, list[str]] = {}   # chat index -> recipient tokens
        self.fakes: Fakes | None = None
        self.receiver: WebhookReceiver | None = None
        self.pg: TempPostgres | None = None
        self.database_url: str | None = None
        self.stream: MessageStream | None = None
        self.reaper = Subreaper()
        self.started_at: float | None = None
        self.first_ticks: int | None = None
        self.leftovers: list = []
        self.leftovers_after_pg: list = []
        self.end_deleted_holders: list = []
        self.end_integrity: str | None = None
        self.final_wait: dict = {}
        self.cleanup_errors: list = []
        self._stack = contextlib.ExitStack()

    # -------------------------------------------------------------- set-up and tear-down

    def __enter__(self) -> "ChaosRun":
        try:
            self._stack.enter_context(self.reaper)
            self.first_ticks = start_ticks(os.getpid())
            self.fakes = self._stack.enter_context(recording_fakes(self.workdir / "fakes"))
            self.receiver = WebhookReceiver().start()
            self._stack.callback(self.receiver.stop)
            env = {**self.fakes.env, **SERVICE_ENV, "WEBHOOK_URL": self.receiver.url,
                   "WEBHOOK_SECRET": WEBHOOK_SECRET, "WEBHOOK_RETRY_BASE": "0.5", **self.config.env}
            if self.config.database == "postgresql":
                # not under workdir: pytest resets its own temporary root to 0700 whenever another
                # pytest session starts, and the postgres user then loses the way to its data directory
                pg_root = Path(tempfile.mkdtemp(prefix="chaos-pg-"))
                self._stack.callback(shutil.rmtree, pg_root, ignore_errors=True)
                self.pg = TempPostgres(pg_root).init()
                self._stack.callback(self._stop_pg)
                self.pg.start()
                self.database_url = self.pg.database()
                names = ("host-a", "host-b")
            else:
                names = ("host-a",)
            self._stack.callback(self._close_hosts)
            for name in names:
                server = UwsgiServer(self.workdir / name, env={**env, "PUSH_HOST_ID": name},
                                     database_url=self.database_url, workers=self.config.workers,
                                     args=("--processes", str(self.config.workers)))
                self.hosts.append(server)
                server.start()
                self.reaper.owned.add(server.process.pid)
                if self.database_url is None:
                    self.database_url = server.database_url
            for index in range(self.config.chats):
                chat = make_chat(self.hosts[0], {})
                self.tokens[index] = add_bulk_member(self.hosts[0], chat, apns_devices=self.config.apns_per_chat,
                                                     fcm_devices=self.config.fcm_per_chat,
                                                     start=10_000 * (index + 1))
                self.chats.append(chat)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop_stream()
        self._stack.close()

    def _close_hosts(self) -> None:
        """Stop every host and its dispatchers (while the database still answers), then look for leftovers."""
        for server in self.hosts:
            try:
                server.close()
            except Exception as exc:  # noqa: BLE001 - close the others anyway, report it
                self.log(f"  closing {server.env.get('PUSH_HOST_ID')}: {type(exc).__name__}: {exc}")
        self.leftovers = self._leftovers(ignore_postgres=True)

    def _stop_pg(self) -> None:
        try:
            pg_stop(self.pg)
        except Exception as exc:  # noqa: BLE001 - reported; _leftovers() below kills what remains
            self.cleanup_errors.append(f"stopping PostgreSQL: {type(exc).__name__}: {str(exc)[:200]}")
        self.leftovers_after_pg = self._leftovers(ignore_postgres=False)

    def _leftovers(self, ignore_postgres: bool) -> list:
        """Our descendants still running (after a short bounded wait); each is then killed and reported."""
        def remaining():
            self.reaper.reap()
            found = []
            for pid in descendants():
                line = cmdline(pid)
                if ignore_postgres and is_postgres(line):
                    continue
                found.append({"pid": pid, "cmdline": line})
            return found
        deadline = time.monotonic() + 5.0
        found = remaining()
        while found and time.monotonic() < deadline:
            time.sleep(0.2)
            found = remaining()
        for item in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(item["pid"], signal.SIGKILL)
        self.reaper.reap()
        return found

    @property
    def sqlite_path(self) -> str | None:
        """The SQLite file, when the run is on SQLite."""
        prefix = "sqlite:///"
        return self.database_url[len(prefix):] if self.database_url.startswith(prefix) else None

    # -------------------------------------------------------------- the run

    def start_stream(self) -> None:
        """Start posting messages."""
        self.started_at = time.time()
        self.stream = MessageStream(self.hosts, self.chats, self.config.rate, self.config.seed,
                                    self.config.post_deadline)
        self.stream.start()

    def stop_stream(self) -> None:
        """Stop posting (waits for the POST in hand, bounded by its own deadline)."""
        if self.stream is not None and self.stream.is_alive():
            self.stream.stopping.set()
            self.stream.join(self.config.post_deadline + 15)

    def run(self) -> None:
        """Stream messages while the scheduled faults hit, then wait until every delivery is complete."""
        kinds = schedule(self.config)
        self.start_stream()
        time.sleep(random.Random(f"{self.config.seed}:first").uniform(*self.config.gap))
        for seq, kind in enumerate(kinds):
            # one generator per fault: its target, length and the pause after it do not depend on
            # what the faults before it happened to find (a dispatcher alive or not), so a seed replays
            self.rng = random.Random(f"{self.config.seed}:fault:{seq}")
            fault = Fault(seq, kind, time.time())
            self.faults.append(fault)
            try:
                getattr(self, f"_fault_{kind}")(fault)
            except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                fault.error = f"{type(exc).__name__}: {str(exc)[:300]}"
                self._recover()
            fault.end = fault.end or time.time()
            self._after_fault(fault)
            self.log(f"  fault {seq + 1}/{len(kinds)} {kind} {_short(fault.detail)}"
                     f"{' ERROR ' + fault.error if fault.error else ''}"
                     f"{' integrity=' + fault.integrity if fault.integrity and fault.integrity != 'ok' else ''}"
                     f"{' DELETED-FILES-HELD' if fault.deleted_holders else ''}")
            time.sleep(self.rng.uniform(*self.config.gap))
        self.stop_stream()
        self.final_wait = self.wait_complete(self.config.final_timeout)
        self.end_deleted_holders = holders_of_deleted(self.sqlite_path) if self.sqlite_path else []
        self.end_integrity = integrity_check(self.sqlite_path) if self.sqlite_path else None

    def _after_fault(self, fault: Fault) -> None:
        self.reaper.reap()
        if self.sqlite_path:
            fault.deleted_holders = holders_of_deleted(self.sqlite_path)
            if self.config.integrity_every_fault:
                fault.integrity = integrity_check(self.sqlite_path)

    def _recover(self) -> None:
        """After a fault that went wrong: every host serves again, or the run stops."""
        if self.pg is not None and not (self.pg.data / "postmaster.pid").exists():
            self.pg.start()
        for server in self.hosts:
            if server.process is None or server.process.poll() is not None:
                self._start_again(server)

    # -------------------------------------------------------------- the kinds of fault

    def _fault_dispatcher_kill(self, fault: Fault) -> None:
        live = self.live_dispatchers()
        if not live:
            fault.detail["target"] = "none alive"
            return
        pid, host = self.rng.choice(sorted(live.items()))
        os.kill(pid, signal.SIGKILL)
        fault.detail.update(pid=pid, host=host)
        wait_until(lambda: not pid_alive(pid), 5, message=f"dispatcher {pid} to die")

    def _fault_worker_kill(self, fault: Fault) -> None:
        server = self.rng.choice(self.hosts)
        workers = uwsgi_workers(server)
        pid = self.rng.choice(workers)
        os.kill(pid, signal.SIGKILL)
        fault.detail.update(pid=pid, host=server.env["PUSH_HOST_ID"])
        wait_until(lambda: pid not in (now := uwsgi_workers(server)) and len(now) >= server.workers, 20,
                   interval=0.1, message="the master to respawn the worker")

    def _fault_reload(self, fault: Fault) -> None:
        server = self.rng.choice(self.hosts)
        fault.detail["host"] = server.env["PUSH_HOST_ID"]
        mark = _log_size(server)
        server.process.send_signal(signal.SIGHUP)
        _wait_serving(server, mark, 30)
        fault.detail["took"] = round(time.time() - fault.start, 2)

    def _fault_restart(self, fault: Fault) -> None:
        server = self.rng.choice(self.hosts)
        fault.detail["host"] = server.env["PUSH_HOST_ID"]
        fault.detail["stop_s"] = round(server.stop(signal.SIGTERM), 2)
        time.sleep(self.rng.uniform(*self.config.down))
        self._start_again(server)
        fault.detail["took"] = round(time.time() - fault.start, 2)

    def _storm(self, fault: Fault, kind: str) -> None:
        providers = ["apns"] if kind == "goaway" else self.rng.choice([["apns"], ["fcm"], ["apns", "fcm"]])
        duration = self.rng.uniform(*self.config.storm)
        fakes = {"apns": self.fakes.apns, "fcm": self.fakes.fcm}
        fault.detail.update(providers="+".join(providers), seconds=round(duration, 2))
        if kind == "5xx":
            status = self.rng.choice([500, 503])
            fault.detail["status"] = status
            for name in providers:
                fakes[name].set_default(status)
        elif kind == "429":
            retry_after = self.rng.randint(1, 3)
            fault.detail["retry_after"] = retry_after
            for name in providers:
                fakes[name].set_default(429, None, retry_after)
        elif kind == "goaway":
            after = self.rng.randint(3, 30)
            fault.detail["after"] = after
            self.fakes.apns.goaway_after(after)
        else:
            delay = round(self.rng.uniform(0.3, 2.0), 2)
            fault.detail["delay"] = delay
            for name in providers:
                fakes[name].delay = delay
        try:
            time.sleep(duration)
        finally:
            for name in providers:
                fakes[name].set_default(None)
                fakes[name].delay = 0.0
            self.fakes.apns.goaway_after(None)

    def _fault_storm_5xx(self, fault: Fault) -> None:
        self._storm(fault, "5xx")

    def _fault_storm_429(self, fault: Fault) -> None:
        self._storm(fault, "429")

    def _fault_storm_goaway(self, fault: Fault) -> None:
        self._storm(fault, "goaway")

    def _fault_storm_slow(self, fault: Fault) -> None:
        self._storm(fault, "slow")

    def _fault_db_restart(self, fault: Fault) -> None:
        for server in self.hosts:
            server.engine.dispose()  # our own pooled sessions would die with the server anyway
        pg_stop(self.pg)
        down = self.rng.uniform(*self.config.down)
        fault.detail["down_s"] = round(down, 2)
        time.sleep(down)
        self.pg.start()
        fault.detail["took"] = round(time.time() - fault.start, 2)

    def _fault_host_kill(self, fault: Fault) -> None:
        server = self.hosts[-1]  # the second host; the first one stays up to serve the stream
        host = server.env["PUSH_HOST_ID"]
        dispatchers = [pid for pid, h in self.live_dispatchers().items() if h == host]
        master = server.process.pid
        os.killpg(master, signal.SIGKILL)
        for pid in dispatchers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        server.process.wait(10)
        fault.detail.update(host=host, master=master, dispatchers=dispatchers)
        _close_log(server)
        time.sleep(self.rng.uniform(*self.config.down))
        self._start_again(server)
        fault.detail["took"] = round(time.time() - fault.start, 2)

    def _start_again(self, server: UwsgiServer) -> None:
        """Start a stopped host on its port and database; wait until it serves with every worker."""
        mark = _log_size(server)
        server.start(timeout=60)
        self.reaper.owned.add(server.process.pid)
        _wait_serving(server, mark, 60)

    # -------------------------------------------------------------- the database

    def live_dispatchers(self) -> dict:
        """pid -> host id of the registered dispatchers that still run (and started after we did)."""
        try:
            with self.hosts[0].engine.connect() as conn:
                rows = conn.execute(sa.select(schema.dispatchers.c.pid, schema.dispatchers.c.host_id,
                                              schema.dispatchers.c.started_at)
                                    .where(schema.dispatchers.c.stopped_at.is_(None))).all()
        except sa.exc.DBAPIError:
            return {}
        # a SIGKILLed dispatcher's row stays "running"; its pid may since belong to a PostgreSQL
        # backend or a worker. The process must have started before the row was written.
        return {pid: host for pid, host, registered in rows
                if pid_alive(pid) and (start_ticks(pid) or -1) >= (self.first_ticks or 0)
                and (process_started_at(pid) or float("inf")) <= registered + 2.0}  # btime has 1 s steps

    def outstanding(self) -> dict:
        """Push jobs not yet expanded and deliveries not yet final."""
        with self.hosts[0].engine.connect() as conn:
            jobs = conn.execute(sa.select(sa.func.count()).select_from(schema.push_jobs)
                                .where(schema.push_jobs.c.state == "pending")).scalar_one()
            pending = conn.execute(sa.select(sa.func.count()).select_from(schema.deliveries)
                                   .where(schema.deliveries.c.state == "pending")).scalar_one()
            events = conn.execute(sa.select(sa.func.count()).select_from(schema.webhook_events)
                                  .where(schema.webhook_events.c.state == "pending")).scalar_one()
        return {"jobs": jobs, "pending": pending, "events": events}

    def wait_complete(self, timeout: float) -> dict:
        """Wait (bounded) until no push job and no delivery is outstanding; returns how it went."""
        began = time.monotonic()
        last = None
        while time.monotonic() - began < timeout:
            try:
                last = self.outstanding()
            except sa.exc.DBAPIError:
                last = None
            if last is not None and last["jobs"] == 0 and last["pending"] == 0 and last["events"] == 0:
                return {"complete": True, "seconds": round(time.monotonic() - began, 1)}
            time.sleep(0.5)
        return {"complete": False, "seconds": round(time.monotonic() - began, 1), "outstanding": last}

    def stored_messages(self) -> list[tuple]:
        """(message id, chat id, client id) of every stored message."""
        with self.hosts[0].engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.select(schema.messages.c.id, schema.messages.c.chat_id,
                                                             schema.messages.c.client_id))]

    def webhook_report(self, expected: dict) -> dict:
        """Every completed fan-out must have reached the receiver as one signed event: the messages
        completed without one, events for messages that do not exist, messages reported under two
        different ids, bad signatures, and copies of one id (at least once: allowed)."""
        verifier = Webhook(WEBHOOK_SECRET)
        with self.hosts[0].engine.connect() as conn:
            completed = set(conn.execute(sa.select(schema.fanouts.c.message_id)).scalars())
        ids_by_message, copies, bad = defaultdict(set), Counter(), 0
        for request in (self.receiver.events() if self.receiver else []):
            try:
                event = verifier.verify(request.body, request.headers)
            except WebhookVerificationError:
                bad += 1
                continue
            copies[request.headers["webhook-id"]] += 1
            if event["type"] == "message.fanout_completed" and request.status < 300:
                ids_by_message[event["data"]["message_id"]].add(request.headers["webhook-id"])
        return {
            "completed": len(completed),
            "reported": len(ids_by_message),
            "missing": sorted(completed - set(ids_by_message))[:20],
            "missing_count": len(completed - set(ids_by_message)),
            "uncompleted_messages": len(set(expected) - completed),
            "invented": sorted(set(ids_by_message) - set(expected))[:20],
            "reported_twice": sorted(m for m, ids in ids_by_message.items() if len(ids) > 1)[:20],
            "bad_signatures": bad,
            "extra_copies": sum(n - 1 for n in copies.values()),
        }

    def registry(self) -> list[dict]:
        """The dispatcher registry, times relative to the stream's start: who ran when, on which host."""
        base = self.started_at or 0.0
        with self.hosts[0].engine.connect() as conn:
            rows = conn.execute(sa.select(schema.dispatchers).order_by(schema.dispatchers.c.id)).mappings().all()
        return [{"host": r["host_id"], "pid": r["pid"], "started": round(r["started_at"] - base, 2),
                 "heartbeat": round(r["heartbeat_at"] - base, 2),
                 "stopped": None if r["stopped_at"] is None else round(r["stopped_at"] - base, 2)} for r in rows]

    def delivery_states(self) -> dict:
        """Deliveries by state, and devices disabled during the run."""
        with self.hosts[0].engine.connect() as conn:
            states = dict(conn.execute(sa.select(schema.deliveries.c.state, sa.func.count())
                                       .group_by(schema.deliveries.c.state)).all())
            disabled = conn.execute(sa.select(sa.func.count()).select_from(schema.devices)
                                    .where(schema.devices.c.enabled.is_(False))).scalar_one()
        return {"states": states, "devices_disabled": disabled}

    # -------------------------------------------------------------- the report

    def analyse(self) -> dict:
        """Every figure of the run, as plain data (see the module docstring)."""
        config = self.config
        posts = list(self.stream.posts) if self.stream else []
        stored = self.stored_messages()
        chat_index = {chat.chat_id: index for index, chat in enumerate(self.chats)}
        expected = {}  # message id -> recipient tokens
        for message_id, chat_id, _ in stored:
            if chat_id in chat_index:
                expected[message_id] = self.tokens[chat_index[chat_id]]
        pairs = accepted_pairs(self.fakes)
        lost = [(token, m) for m, tokens in expected.items() for token in tokens if (token, m) not in pairs]
        recipients = {m: set(tokens) for m, tokens in expected.items()}
        unexpected = [pair for pair in pairs if pair[0] not in recipients.get(pair[1], ())]
        faults = [f for f in self.faults if f.end is not None]

        # duplicates: every copy after the first, attributed to the earliest fault overlapping
        # [first copy - window, this copy]: the one that intervened first
        by_kind, unexplained, extra = Counter(), [], 0
        for pair, times in pairs.items():
            for copy in times[1:]:
                extra += 1
                cause = next((f for f in faults if f.start <= copy and f.end >= times[0] - config.explain_window),
                             None)
                if cause is None:
                    unexplained.append({"token": "…" + pair[0][-10:], "message_id": pair[1],
                                        "first": round(times[0] - self.started_at, 2),
                                        "again": round(copy - self.started_at, 2)})
                else:
                    by_kind[cause.kind] += 1
        duplicated_pairs = sum(1 for times in pairs.values() if len(times) > 1)
        # how long after the first copy the second came: ~PUSH_LEASE means a lease ran out
        gaps = [times[1] - times[0] for times in pairs.values() if len(times) > 1]

        # recovery: from each fault's end to the full delivery of the first message posted after it
        delivered_at = {}
        for message_id, tokens in expected.items():
            firsts = [pairs[(token, message_id)][0] for token in tokens if (token, message_id) in pairs]
            delivered_at[message_id] = max(firsts) if len(firsts) == len(tokens) else None
        ordered = sorted((p for p in posts if p.message_id is not None), key=lambda p: p.started)
        recovery = {}
        for fault in faults:
            nxt = next((p for p in ordered if p.started >= fault.end), None)
            if nxt is None:
                continue
            done = delivered_at.get(nxt.message_id)
            recovery[fault.seq] = None if done is None else round(done - fault.end, 2)

        # 5xx answers seen by the stream; 503 while the database was down counted apart
        outages = [(f.start, f.end + 2.0) for f in faults if f.kind == "db_restart"]
        http = Counter()
        unexpected_5xx = []
        for post in posts:
            for began, ended, host, outcome in post.attempts:
                if isinstance(outcome, int):
                    if outcome < 500:
                        continue
                    if outcome == 503 and any(began <= o_end and ended >= o_start for o_start, o_end in outages):
                        http["503_db_down"] += 1
                    else:
                        http["5xx_other"] += 1
                        unexpected_5xx.append({"seq": post.seq, "status": outcome,
                                               "at": round(began - self.started_at, 2), "host": host})
                else:
                    http["connection_errors"] += 1
        retried = sum(1 for p in posts if len(p.attempts) > 1)
        replayed = sum(1 for p in posts if p.status == 200)
        abandoned = [p.seq for p in posts if p.message_id is None]
        client_ids = Counter(cid for _, _, cid in stored if cid)
        states = self.delivery_states()

        kinds = Counter(f.kind for f in self.faults)
        per_kind = {}
        for kind in config.kinds():
            values = [recovery[f.seq] for f in faults if f.kind == kind and f.seq in recovery]
            known = [v for v in values if v is not None]
            per_kind[kind] = {
                "faults": kinds[kind],
                "errors": sum(1 for f in self.faults if f.kind == kind and f.error),
                "duplicates": by_kind[kind],
                "recovery_max_s": max(known) if known else None,
                "recovery_p50_s": round(statistics.median(known), 2) if known else None,
                "never_recovered": sum(1 for v in values if v is None),
            }
        # the ordinary post -> fully delivered time, to read the recoveries against: on a loaded
        # machine a backlog builds and every message waits for it, fault or no fault
        latencies = [delivered_at[p.message_id] - p.started for p in ordered
                     if delivered_at.get(p.message_id) is not None]
        recoveries = [v for v in recovery.values() if v is not None]
        worst = max(recovery.items(), key=lambda kv: kv[1] if kv[1] is not None else float("inf"), default=None)
        return {
            "seed": config.seed, "database": config.database,
            "config": {k: v for k, v in asdict(config).items()},
            "seconds": round((self.faults[-1].end if self.faults else time.time()) - (self.started_at or 0), 1),
            "posts": len(posts), "messages": len(expected), "posts_retried": retried,
            "posts_answered_200_replay": replayed, "posts_abandoned": abandoned,
            "messages_per_client_id_max": max(client_ids.values(), default=0),
            "deliveries": sum(states["states"].values()), "delivery_states": states["states"],
            "devices_disabled": states["devices_disabled"],
            "expected_pushes": sum(len(t) for t in expected.values()),
            "accepted_pushes": sum(len(t) for t in pairs.values()),
            "lost": len(lost), "lost_sample": [("…" + t[-10:], m) for t, m in lost[:20]],
            "lost_by_message": dict(Counter(m for _, m in lost).most_common(20)),
            "unexpected_pushes": len(unexpected),
            "duplicate_pairs": duplicated_pairs, "duplicate_copies": extra,
            "duplicates_by_fault": dict(by_kind), "duplicates_unexplained": len(unexplained),
            "duplicate_gap_s": {name: (round(percentile(gaps, q), 2) if gaps else None)
                                for name, q in (("p50", 50), ("p95", 95), ("max", 100))},
            "unexplained_sample": unexplained[:20],
            "faults": len(self.faults), "faults_by_kind": dict(kinds), "per_kind": per_kind,
            "fault_errors": [{"seq": f.seq, "kind": f.kind, "error": f.error} for f in self.faults if f.error],
            "recovery_max_s": max(recoveries) if recoveries else None,
            "recovery_worst": ({"fault": worst[0], "kind": self.faults[worst[0]].kind, "seconds": worst[1]}
                               if worst else None),
            "recovery_never": sum(1 for v in recovery.values() if v is None),
            "delivered_latency_s": {name: (round(percentile(latencies, q), 2) if latencies else None)
                                    for name, q in (("p50", 50), ("p95", 95), ("max", 100))},
            "loadavg_at_end": list(os.getloadavg()),
            "http": dict(http), "http_5xx_unexpected_sample": unexpected_5xx[:20],
            "integrity_end": self.end_integrity,
            "integrity_bad_after_faults": [{"seq": f.seq, "kind": f.kind, "result": f.integrity}
                                           for f in self.faults if f.integrity not in (None, "ok")],
            "integrity_checked_after_faults": sum(1 for f in self.faults if f.integrity is not None),
            "deleted_db_held_after_faults": [{"seq": f.seq, "kind": f.kind, "holders": f.deleted_holders}
                                             for f in self.faults if f.deleted_holders],
            "deleted_db_held_at_end": self.end_deleted_holders,
            "final_wait": self.final_wait,
            "webhooks": self.webhook_report(expected),
            "dispatchers": self.registry(),
            "fault_log": [{"seq": f.seq, "kind": f.kind, "at": round(f.start - (self.started_at or 0), 2),
                           "seconds": round((f.end or f.start) - f.start, 2), "detail": f.detail,
                           **({"error": f.error} if f.error else {}),
                           "recovery_s": recovery.get(f.seq)} for f in self.faults],
        }


# ------------------------------------------------------------------ small helpers

def integrity_check(path: str) -> str:
    """`PRAGMA integrity_check` on the SQLite file, read-only: 'ok' or the problems found."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        try:
            rows = conn.execute("PRAGMA integrity_check").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return f"error: {exc}"
    return "; ".join(str(r[0]) for r in rows)[:500]


def pg_stop(pg: TempPostgres, timeout: float = 60.0) -> None:
    """TempPostgres.stop(), with pg_ctl's own words in the error when it fails (TempPostgres
    discards them), and the postmaster.pid it read."""
    import subprocess

    from tests.pg import _pg_bin

    pidfile = pg.data / "postmaster.pid"
    if not pidfile.exists():
        return
    command = [_pg_bin("pg_ctl"), "-D", str(pg.data), "-m", "fast", "-w", "-t", str(int(timeout) - 5), "stop"]
    if os.geteuid() == 0:
        command = ["runuser", "-u", "postgres", "--", *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        try:
            content = pidfile.read_text()[:200]
        except OSError as exc:
            content = f"({exc})"
        raise RuntimeError(f"pg_ctl stop exited {done.returncode}: {(done.stdout + done.stderr).strip()[:400]}; "
                           f"postmaster.pid: {content!r}")


def _log_size(server: UwsgiServer) -> int:
    try:
        return server.log_path.stat().st_size
    except FileNotFoundError:
        return 0


def _wait_serving(server: UwsgiServer, mark: int, timeout: float) -> None:
    """Wait until the log written after `mark` shows the app loaded and every worker spawned, and
    /healthz answers: a signal to a half-started instance would be no clean fault."""
    def ready():
        with open(server.log_path, "rb") as handle:
            handle.seek(mark)
            text = handle.read().decode(errors="replace")
        if "WSGI app 0 (mountpoint='') ready" not in text or text.count("spawned uWSGI worker") < server.workers:
            return False
        try:
            return server.get("/healthz", timeout=2.0).status in (200, 503)
        except OSError:
            return False
    wait_until(ready, timeout, interval=0.1, message=f"uWSGI on port {server.port} to serve again")


def _close_log(server: UwsgiServer) -> None:
    """After a SIGKILL, UwsgiServer.stop() returns early and leaves the log file open; close it
    (UwsgiServer has no public kill(); start() opens a new one)."""
    log = getattr(server, "_log", None)
    if log is not None and not log.closed:
        log.close()


def _short(detail: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in detail.items())


# ------------------------------------------------------------------ tables and the command

def tables(result: dict) -> list:
    """The run's figures as bench tables."""
    db = result["database"]
    http = result["http"]
    wait = result["final_wait"]
    rows = [
        ["seed", result["seed"]],
        ["faults", result["faults"]],
        ["run (s)", result["seconds"]],
        ["messages (posts)", f"{result['messages']} ({result['posts']})"],
        ["posts retried / answered 200 on replay / abandoned",
         f"{result['posts_retried']} / {result['posts_answered_200_replay']} / {len(result['posts_abandoned'])}"],
        ["deliveries", result["deliveries"]],
        ["delivery states", " ".join(f"{k}={v}" for k, v in sorted(result["delivery_states"].items()))],
        ["expected pushes / accepted", f"{result['expected_pushes']} / {result['accepted_pushes']}"],
        ["pushes lost", result["lost"]],
        ["pushes to the wrong device or message", result["unexpected_pushes"]],
        ["duplicates (pairs / extra copies)", f"{result['duplicate_pairs']} / {result['duplicate_copies']}"],
        ["duplicates unexplained", result["duplicates_unexplained"]],
        ["first -> second copy (s) p50 / p95 / max", " / ".join(str(v) for v in result["duplicate_gap_s"].values())],
        ["longest fault -> next message delivered (s)",
         f"{result['recovery_max_s']} ({(result['recovery_worst'] or {}).get('kind')})"],
        ["faults never followed by a fully delivered message", result["recovery_never"]],
        ["any message: POST -> all devices (s) p50 / p95 / max",
         " / ".join(str(v) for v in result["delivered_latency_s"].values())],
        ["HTTP 5xx (not 503 while the db was down)", http.get("5xx_other", 0)],
        ["HTTP 503 while the db was down", http.get("503_db_down", 0)],
        ["connection errors retried", http.get("connection_errors", 0)],
        ["all delivered at the end", f"{wait.get('complete')} after {wait.get('seconds')} s"],
        ["fan-outs completed / reported by webhook / missing / reported twice",
         f"{result['webhooks']['completed']} / {result['webhooks']['reported']} / "
         f"{result['webhooks']['missing_count']} / {len(result['webhooks']['reported_twice'])}"],
        ["webhook copies resent (same id) / bad signatures",
         f"{result['webhooks']['extra_copies']} / {result['webhooks']['bad_signatures']}"],
        ["processes holding a deleted db file (after faults / at end)",
         f"{len(result['deleted_db_held_after_faults'])} / {len(result['deleted_db_held_at_end'])}"],
        ["leftover processes after close", len(result.get("leftovers", []))],
        ["fault errors", len(result["fault_errors"])],
    ]
    if db == "sqlite":
        rows.insert(-3, ["integrity_check at end / bad after faults",
                         f"{result['integrity_end']} / {len(result['integrity_bad_after_faults'])} "
                         f"of {result['integrity_checked_after_faults']}"])
    kinds = [[kind, v["faults"], v["errors"], v["duplicates"], v["recovery_p50_s"], v["recovery_max_s"],
              v["never_recovered"]] for kind, v in result["per_kind"].items()]
    return [
        table(f"Chaos run on {db} (seed {result['seed']})", ["figure", "value"], rows,
              [f"{result['config']['chats']} chats of {result['config']['apns_per_chat']} APNs + "
               f"{result['config']['fcm_per_chat']} FCM devices, {result['config']['rate']} messages/s; "
               f"service env {SERVICE_ENV | result['config']['env']}",
               "lost: expected (token, message) pairs no fake accepted; a duplicate is explained by the earliest "
               f"fault overlapping [first copy - {result['config']['explain_window']} s, second copy]"]),
        table(f"Faults by kind on {db}", ["kind", "faults", "errors", "duplicates", "recovery p50 s",
                                          "recovery max s", "never"], kinds,
              ["recovery: from the fault's end to the full delivery of the first message posted after it"]),
    ]


def run_one(config: ChaosConfig, workdir: Path, log=print) -> dict:
    """One whole run on one database: set up, faults, final wait, close; returns the result."""
    with ChaosRun(config, workdir, log=log) as run:
        run.run()
        result = run.analyse()
    # closing happened in __exit__: leftovers are known only now
    result["leftovers"] = run.leftovers + run.leftovers_after_pg
    result["cleanup_errors"] = run.cleanup_errors
    return result


def code_version() -> dict:
    """Which code ran: the commit, and whether the product's files had uncommitted changes (the
    figures of a run describe the tree as it was then)."""
    import hashlib
    import subprocess

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent.parent, capture_output=True,
                                  text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""
    diff = git("diff", "HEAD", "--", "notifier", "chat_app", "uwsgi.ini")
    return {"commit": git("rev-parse", "--short", "HEAD").strip(),
            "product_changes": git("status", "--porcelain", "--", "notifier", "chat_app", "uwsgi.ini").split("\n")[:-1],
            "product_diff_sha1": hashlib.sha1(diff.encode()).hexdigest()[:12] if diff else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=None, help="replay a run (default: a new random seed)")
    parser.add_argument("--faults", type=int, default=100, help="faults per database (default 100)")
    parser.add_argument("--database", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--chats", type=int, default=3)
    parser.add_argument("--apns", type=int, default=200, help="APNs devices per chat")
    parser.add_argument("--fcm", type=int, default=50, help="FCM devices per chat")
    parser.add_argument("--rate", type=float, default=2.0, help="messages per second")
    parser.add_argument("--final-timeout", type=float, default=240.0)
    parser.add_argument("--no-integrity-every-fault", action="store_true",
                        help="SQLite: run integrity_check at the end only")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra service environment, e.g. PUSH_LEASE=5 (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, databases)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 10**9)
    print(f"chaos seed {seed} (replay: python -m bench.chaos --seed {seed} --faults {args.faults} "
          f"--database {args.database})", flush=True)
    machine = machine_info()
    code = code_version()
    print(f"code: {code['commit']}, uncommitted product changes: {code['product_changes'] or 'none'}", flush=True)
    databases = ["sqlite", "postgresql"] if args.database == "both" else [args.database]
    runs = {}
    scratch = Path(tempfile.mkdtemp(prefix="chaos-"))
    try:
        for database in databases:
            if database == "postgresql":
                reason = TempPostgres.unavailable_reason()
                if reason:
                    print(f"\n== postgresql skipped: {reason}", flush=True)
                    runs[database] = {"skipped": reason}
                    continue
            config = ChaosConfig(seed=seed, faults=args.faults, database=database, chats=args.chats,
                                 apns_per_chat=args.apns, fcm_per_chat=args.fcm, rate=args.rate,
                                 final_timeout=args.final_timeout,
                                 integrity_every_fault=not args.no_integrity_every_fault,
                                 env=dict(item.split("=", 1) for item in args.env))
            print(f"\n== {database}: {args.faults} faults, kinds {', '.join(config.kinds())}", flush=True)
            began = time.monotonic()
            result = run_one(config, scratch / database)
            result["wall_seconds"] = round(time.monotonic() - began, 1)
            result["tables"] = tables(result)
            runs[database] = result
            print_tables(result)
            print(f"  ({result['wall_seconds']} s, load average at the end {result['loadavg_at_end']})", flush=True)
    finally:
        if args.keep:
            print(f"scratch directory: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    code_after = code_version()
    if code_after != code:
        print(f"the product's code changed during the run: now {code_after}", flush=True)
    path = save(NAME, {"name": NAME, "seed": seed, "machine": machine, "code": code, "code_after": code_after,
                       "loadavg_at_end": list(os.getloadavg()), "runs": runs})
    print(f"\nJSON in {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
