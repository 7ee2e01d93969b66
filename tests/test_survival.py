"""The dispatcher under the real uWSGI: what a plain multiprocessing.Process gets wrong (shared/UWSGI.md),
each pinned by a test: EOF, worker recycling, reload, stop, SIGKILL, zombies, supervised mode."""
from __future__ import annotations

import os
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from tests.e2e import add_bulk_member, apns_token, delivery_states, make_chat, post_message, wait_complete
from tests.harness import pid_alive, port_is_free, wait_until

pytestmark = pytest.mark.timeout(180)

# a fan-out that takes a few seconds: few concurrent sends, each answered after a delay
SLOW = {"PUSH_CONCURRENCY": "4", "PUSH_BATCH": "20"}
SLOW_DELAY = 0.25
SLOW_DEVICES = 80  # 80 / 4 * 0.25 s = 5 s of fan-out, at least


def slow_chat(server, fakes, devices=SLOW_DEVICES):
    fakes.apns.delay = SLOW_DELAY
    fakes.fcm.delay = SLOW_DELAY
    chat = make_chat(server, {"bob": [("apns", apns_token(1))]})
    tokens = add_bulk_member(server, chat, apns_devices=devices, start=100)
    return chat, tokens


def dispatcher_pid(server) -> int:
    return wait_until(lambda: (server.dispatcher_pids() or [None])[0], 10, message="a dispatcher")


def test_client_reading_to_eof_gets_it_at_once_not_when_the_fan_out_ends(servers, fakes):
    server = servers(fakes, SLOW)
    chat, _ = slow_chat(server, fakes)
    body = b'{"text": "eof?"}'
    request = (f"POST /v1/chats/{chat.chat_id}/messages HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
               f"Authorization: Bearer {chat.sender_token}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):  # to EOF
            answer += chunk
    took = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 201")
    assert took < 1.0, f"EOF after {took:.2f} s: someone else held the connection"
    assert len(fakes.apns.received) < SLOW_DEVICES + 1  # the fan-out was still running
    message = int(answer.split(b'"id": ')[1].split(b",")[0])
    wait_complete(server, chat, message, 60)


def test_worker_recycled_after_the_post_is_not_delayed_and_nothing_is_lost(servers, fakes, tmp_path):
    setup = servers(fakes)
    chat, tokens = slow_chat(setup, fakes)
    setup.stop()
    server = servers(fakes, SLOW, args=("--max-requests", "1", "--min-worker-lifetime", "1", "--processes", "1"),
                     workers=1, database_url=setup.database_url)
    # The start-up probe may or may not have recycled the first worker (it does when it comes after
    # min-worker-lifetime), and its successor may have been forked a moment ago: probe until a
    # worker recycles (a request recycles one only once it is older than min-worker-lifetime), so
    # the POST below is the first request of a worker whose birth is known, and recycles it
    respawns = server.log_path.read_text().count("Respawned uWSGI worker")

    def probe_recycles() -> bool:
        assert server.get("/healthz").status == 200
        return server.log_path.read_text().count("Respawned uWSGI worker") > respawns

    wait_until(probe_recycles, 10, interval=0.3, message="a probed worker to be recycled")
    time.sleep(1.2)  # older than min-worker-lifetime, so this worker recycles after one request
    log_before = server.log_path.read_text()
    posted = time.monotonic()
    message = post_message(server, chat)
    wait_until(lambda: server.log_path.read_text().count("Respawned uWSGI worker") >
               log_before.count("Respawned uWSGI worker"), 10, message="the worker to be recycled")
    recycled_after = time.monotonic() - posted
    assert recycled_after < 2.0, f"recycle took {recycled_after:.2f} s"
    assert server.dispatcher_pids(), "the fan-out should still be running after the recycle"
    report = wait_complete(server, chat, message, 60)
    assert report["summary"]["sent"] == len(tokens) + 1
    assert set(fakes.apns.sent_tokens()) >= set(tokens)


@pytest.mark.parametrize("how", ["reload", "stop"])
def test_reload_or_stop_mid_fan_out_is_quick_and_the_fan_out_completes(servers, fakes, how):
    server = servers(fakes, SLOW)
    chat, tokens = slow_chat(server, fakes)
    message = post_message(server, chat)
    pid = dispatcher_pid(server)
    assert fakes.apns.wait_for(4, timeout=10)
    if how == "reload":
        before = server.log_path.read_text().count("WSGI app 0 (mountpoint='') ready")
        started = time.monotonic()
        server.process.send_signal(signal.SIGHUP)
        wait_until(lambda: server.log_path.read_text().count("WSGI app 0 (mountpoint='') ready") > before
                   and server.get("/healthz").status == 200, 10, message="the reload")
        took = time.monotonic() - started
    else:
        took = server.stop(signal.SIGTERM)
        assert port_is_free(server.port), "the dispatcher must not hold the listening socket"
    assert took < 2.0, f"{how} took {took:.2f} s"
    assert pid_alive(pid), "the dispatcher survives"
    assert delivery_states(server, message).get("pending", 0) > 0, "still mid fan-out"
    wait_until(lambda: delivery_states(server, message) == {"sent": len(tokens) + 1}, 60, interval=0.2,
               message="the surviving dispatcher to finish")
    assert set(fakes.apns.sent_tokens().values()) == {1}


def test_sigkill_of_the_dispatcher_mid_fan_out_loses_nothing(servers, fakes):
    server = servers(fakes, {"PUSH_LEASE": "2", "PUSH_CONCURRENCY": "20", "PUSH_BATCH": "100"})
    fakes.apns.delay = fakes.fcm.delay = 0.02
    chat = make_chat(server, {"bob": [("apns", apns_token(1))]})
    tokens = add_bulk_member(server, chat, apns_devices=1000, fcm_devices=999, start=100)
    first = post_message(server, chat, "first")
    assert fakes.apns.wait_for(200, timeout=30)
    os.kill(dispatcher_pid(server), signal.SIGKILL)
    assert delivery_states(server, first).get("pending", 0) > 0
    second = post_message(server, chat, "second")  # starts a new dispatcher, which takes over after the lease
    for message in (first, second):
        report = wait_complete(server, chat, message, 120)
        assert report["summary"]["pending"] == 0
        assert report["summary"]["sent"] == len(tokens) + 1
    received = set(fakes.apns.sent_tokens()) | set(fakes.fcm.sent_tokens())
    assert received >= set(tokens)  # every device got the push at least once


def zombies_of(pids: set[int]) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) in pids:
            found.append(int(entry.name))
    return found


def test_no_zombie_after_the_dispatcher_exits_and_another_request(servers, fakes):
    server = servers(fakes, {"PUSH_IDLE_EXIT": "0.5"}, args=("--processes", "1"), workers=1)
    chat = make_chat(server, {"bob": [("apns", apns_token(1))]})
    wait_complete(server, chat, post_message(server, chat), 30)
    uwsgi_pids = {server.process.pid} | {int(p) for p in os.popen(f"pgrep -P {server.process.pid}").read().split()}
    wait_until(lambda: not server.dispatcher_pids(), 15, message="the idle dispatcher to exit")
    assert server.get("/healthz").status == 200
    assert zombies_of(uwsgi_pids) == []


def test_supervised_dispatcher_survives_a_reload_without_a_second_copy(servers, fakes, tmp_path):
    pidfile = tmp_path / "notifier.pid"
    daemon = f"{pidfile} exec {sys.executable} -m notifier --pidfile {pidfile}"
    server = servers(fakes, {**SLOW, "PUSH_DISPATCHER": "external"}, args=("--smart-attach-daemon2", daemon))
    chat, tokens = slow_chat(server, fakes)
    pid = wait_until(lambda: pidfile.exists() and int(pidfile.read_text()), 15, message="the pidfile")
    message = post_message(server, chat)
    assert fakes.apns.wait_for(4, timeout=10)
    server.process.send_signal(signal.SIGHUP)
    time.sleep(3)  # the reload, and any re-attach, happen in here
    assert server.get("/healthz").status == 200
    assert server.dispatcher_pids() == [pid], "exactly the first copy runs"
    report = wait_complete(server, chat, message, 60)
    assert report["summary"]["sent"] == len(tokens) + 1
    assert set(fakes.apns.sent_tokens().values()) == {1}, "no duplicate send"


def test_the_dispatcher_runs_below_the_workers_in_its_own_session_and_scheduler_group(servers, fakes):
    server = servers(fakes)
    chat = make_chat(server, {"bob": [("apns", apns_token(1))]})
    wait_complete(server, chat, post_message(server, chat), 30)
    pid = dispatcher_pid(server)
    worker = int(os.popen(f"pgrep -P {server.process.pid}").read().split()[0])
    assert os.getsid(pid) == pid != os.getsid(worker)  # its own session: a group signal misses it
    assert os.getpriority(os.PRIO_PROCESS, pid) == os.getpriority(os.PRIO_PROCESS, worker) + 10
    autogroup = Path(f"/proc/{pid}/autogroup")
    if not autogroup.exists() or Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() != "1":
        pytest.skip("no scheduler autogroups on this kernel: the process's nice is all that counts")
    # a new session is a new autogroup, where the process's nice ranks it only against itself
    assert autogroup.read_text().split()[-2:] == ["nice", "10"]
