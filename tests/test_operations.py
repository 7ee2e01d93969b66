"""What operators do to a running service, under the real uWSGI with the project's uwsgi.ini:
reload it, stop and start it, kill its dispatcher. After each: the next message reaches every device
quickly, no process holds a deleted SQLite file, and the database is intact."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from notifier import schema

from tests.e2e import add_bulk_member, apns_token, make_chat, post_message, wait_complete
from tests.harness import UwsgiServer, pid_alive, wait_until

pytestmark = pytest.mark.timeout(180)

READY = "WSGI app 0 (mountpoint='') ready"


def uwsgi_pids(server: UwsgiServer) -> set[int]:
    """The master and its workers."""
    if server.process is None or server.process.poll() is not None:
        return set()
    children = os.popen(f"pgrep -P {server.process.pid}").read().split()
    return {server.process.pid, *map(int, children)}


def deleted_database_files(pids, database: Path) -> dict[int, list[str]]:
    """Open files of `pids` that are the database or its -wal/-shm, unlinked since they were opened."""
    found = {}
    for pid in pids:
        try:
            names = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for name in names:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{name}")
            except OSError:
                continue
            if target.startswith(str(database)) and target.endswith("(deleted)"):
                found.setdefault(pid, []).append(target)
    return found


def integrity(server: UwsgiServer) -> str:
    """SQLite's own verdict on the file, read through a brand-new connection."""
    engine = sa.create_engine(server.database_url)
    try:
        with engine.connect() as conn:
            return "; ".join(conn.exec_driver_sql("PRAGMA integrity_check").scalars())
    finally:
        engine.dispose()


def reload(server: UwsgiServer, timeout: float = 15.0) -> None:
    """A graceful reload (SIGHUP to the master); returns once the new workers serve."""
    before = server.log_path.read_text(errors="replace").count(READY)
    server.process.send_signal(signal.SIGHUP)
    wait_until(lambda: server.log_path.read_text(errors="replace").count(READY) > before
               and server.get("/healthz").status == 200, timeout, message="the reload")


def assert_next_message_is_quick_and_the_database_sound(server, chat, fakes, devices: int):
    """Post, expect every device within 2 s, then check what a new connection and the kernel see."""
    sent_before = sum(fakes.apns.sent_tokens().values())
    posted = time.monotonic()
    message = post_message(server, chat, "after")
    assert fakes.apns.wait_for(sent_before + devices, timeout=2.0), (
        f"{sum(fakes.apns.sent_tokens().values()) - sent_before} of {devices} devices within 2 s")
    took = time.monotonic() - posted
    # what the dispatcher recorded is visible to a new connection, in a file nobody has deleted
    report = wait_complete(server, chat, message, 10)
    assert report["summary"]["sent"] == devices
    database = Path(server.database_url[len("sqlite:///"):])
    pids = uwsgi_pids(server) | set(server.dispatcher_pids())
    assert deleted_database_files(pids, database) == {}
    assert integrity(server) == "ok"
    return took


def one_device_chat(server):
    return make_chat(server, {"bob": [("apns", apns_token(1))]})


def test_after_a_graceful_reload_the_next_message_is_pushed_at_once(servers, fakes):
    server = servers(fakes, {"PUSH_IDLE_EXIT": "60"})
    chat = one_device_chat(server)
    wait_complete(server, chat, post_message(server, chat, "before"), 10)  # a dispatcher now lives
    dispatcher = server.dispatcher_pids()
    reload(server)
    assert_next_message_is_quick_and_the_database_sound(server, chat, fakes, devices=1)
    assert server.dispatcher_pids() == dispatcher, "the dispatcher outlived the reload and kept serving"


def test_after_a_stop_and_a_start_the_next_message_is_pushed_at_once(servers, fakes):
    server = servers(fakes, {"PUSH_IDLE_EXIT": "60"})
    chat = one_device_chat(server)
    wait_complete(server, chat, post_message(server, chat, "before"), 10)
    server.stop()
    server.start()
    assert_next_message_is_quick_and_the_database_sound(server, chat, fakes, devices=1)


def test_the_dispatcher_shows_as_chat_notifier_in_ps_and_top(servers, fakes):
    server = servers(fakes, {"PUSH_IDLE_EXIT": "60"}, workers=1, args=("--processes", "1"))
    chat = one_device_chat(server)
    wait_complete(server, chat, post_message(server, chat), 10)
    [pid] = server.dispatcher_pids()
    assert Path(f"/proc/{pid}/comm").read_text().strip() == "chat-notifier"  # top, ps -e, pgrep
    # ps aux: uWSGI owns argv here and adds uwsgi.ini's procname prefix, as for its own processes
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == b"chat chat-notifier"


def test_a_message_committed_while_the_dispatcher_is_killed_is_picked_up_without_another_post(servers, fakes):
    server = servers(fakes, {"PUSH_IDLE_EXIT": "60"})
    chat = one_device_chat(server)
    wait_complete(server, chat, post_message(server, chat, "before"), 10)
    [pid] = server.dispatcher_pids()
    # stop it without letting it exit (a SIGKILL in flight): it keeps the socket name, reads nothing
    os.kill(pid, signal.SIGSTOP)
    try:
        message = post_message(server, chat, "nudged into a dying process")
        os.kill(pid, signal.SIGKILL)
    finally:
        os.kill(pid, signal.SIGCONT)
    killed = time.monotonic()
    wait_until(lambda: not pid_alive(pid), 5, message="the old dispatcher to die")
    report = wait_complete(server, chat, message, 5)
    assert report["summary"]["sent"] == 1
    assert time.monotonic() - killed < 2.5, "picked up by the next dispatcher within about 2 s"


def dead_leases(server, pid: int) -> int:
    """Pending deliveries still leased to the dispatcher with this pid."""
    with server.engine.connect() as conn:
        return conn.execute(
            sa.select(sa.func.count()).select_from(schema.deliveries)
            .where(schema.deliveries.c.state == "pending",
                   schema.deliveries.c.lease_owner.like(f"%:{pid}:%"))).scalar_one()


def test_a_killed_fan_out_is_taken_over_at_once_not_after_the_lease(servers, fakes):
    server = servers(fakes, {"PUSH_LEASE": "60", "PUSH_CONCURRENCY": "50", "PUSH_BATCH": "200"})
    fakes.apns.delay = fakes.fcm.delay = 0.005  # slow enough to be killed mid-way
    chat = one_device_chat(server)
    tokens = add_bulk_member(server, chat, apns_devices=1500, fcm_devices=499, start=100)
    first = post_message(server, chat, "first")
    assert fakes.apns.wait_for(200, timeout=30)
    [pid] = server.dispatcher_pids()
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    assert dead_leases(server, pid) > 0, "killed mid-way, holding leases"
    second = post_message(server, chat, "second")
    # the next dispatcher releases the dead one's leases as it starts, not when they run out
    wait_until(lambda: dead_leases(server, pid) == 0, 5, message="the dead dispatcher's leases to be taken over")
    for message in (first, second):
        # well under the 60 s lease: nothing waited for it (the README has the measured time)
        report = wait_complete(server, chat, message, 40)
        assert report["summary"]["sent"] == len(tokens) + 1
    # duplicates only for pushes in flight at the kill, with the first copy's apns-id
    copies = {}
    for request in fakes.apns.received:
        if request.status == 200:
            copies.setdefault((request.token, request.payload["message_id"]), set()).add(request.headers["apns-id"])
    assert all(len(ids) == 1 for ids in copies.values()), "a re-sent push carries the same apns-id"
    duplicates = sum(fakes.apns.sent_tokens().values()) - len(copies)
    assert duplicates <= 2 * 200, "at most the batches claimed at the kill (two lanes)"
