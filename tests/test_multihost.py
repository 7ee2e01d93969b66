"""Several hosts on one PostgreSQL: shared outbox, SKIP LOCKED claims, LISTEN/NOTIFY wake-ups, outages.

"Hosts" are uWSGI instances on two ports, each with its own PUSH_HOST_ID and so its own dispatcher.
"""
from __future__ import annotations

import os
import signal
import statistics
import time
from collections import Counter

import pytest
import sqlalchemy as sa

from notifier import schema
from tests.e2e import add_bulk_member, apns_token, make_chat, post_message, wait_complete
from tests.harness import UwsgiServer, wait_until
from tests.pg import TempPostgres, require_postgres, temporary_database

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def pg_url():
    require_postgres()
    with temporary_database() as url:
        yield url


@pytest.fixture
def hosts(tmp_path):
    """Start uWSGI "hosts"; closed (dispatchers included) at teardown. Request it AFTER pg_url and
    fakes, so it is torn down first: its dispatchers are found through the database, which must
    still exist then."""
    started = []

    def start(fakes, database_url, host_id, env=None):
        server = UwsgiServer(tmp_path / host_id, database_url=database_url, workers=2, args=("--processes", "2"),
                             env={**fakes.env, "PUSH_HOST_ID": host_id, "PUSH_IDLE_EXIT": "60", **(env or {})})
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.close()


def received_pairs(fakes) -> Counter:
    """(token, message id) of every push the fakes accepted."""
    pairs = Counter()
    for r in fakes.apns.received:
        if r.status == 200:
            pairs[(r.token, r.payload["message_id"])] += 1
    for r in fakes.fcm.received:
        if r.status == 200:
            pairs[(r.token, int(r.message["data"]["message_id"]))] += 1
    return pairs


def dispatchers_by_host(server) -> dict:
    with server.engine.connect() as conn:
        rows = conn.execute(sa.select(schema.dispatchers.c.host_id, schema.dispatchers.c.pid)
                            .where(schema.dispatchers.c.stopped_at.is_(None))).all()
    alive = set(server.dispatcher_pids())
    return {host: pid for host, pid in rows if pid in alive}


def sent_by_host(server) -> Counter:
    with server.engine.connect() as conn:
        rows = conn.execute(sa.select(schema.deliveries.c.handled_by, sa.func.count())
                            .where(schema.deliveries.c.state == "sent")
                            .group_by(schema.deliveries.c.handled_by)).all()
    return Counter(dict(rows))


def test_two_hosts_share_the_outbox_and_send_each_push_exactly_once(pg_url, fakes, hosts):
    env = {"PUSH_BATCH": "10", "PUSH_CONCURRENCY": "8"}
    a = hosts(fakes, pg_url, "host-a", env)
    b = hosts(fakes, pg_url, "host-b", env)
    # slow enough answers that a backlog builds and both dispatchers find work to claim
    fakes.apns.delay = fakes.fcm.delay = 0.05
    chat = make_chat(a, {f"user{i}": [("apns", apns_token(i)), ("fcm", f"android-{i}")] for i in range(1, 6)})
    add_bulk_member(a, chat, apns_devices=30, fcm_devices=30, start=1000)
    devices = 10 + 60
    messages = [post_message(server, chat, f"m{n}") for n, server in zip(range(20), [a, b] * 10)]
    for message in messages:
        report = wait_complete(a, chat, message, 120)
        assert report["summary"]["sent"] == devices  # never the sender's own phone
    pairs = received_pairs(fakes)
    assert len(pairs) == 20 * devices
    assert set(pairs.values()) == {1}, "a push was sent twice while both dispatchers lived"
    assert set(dispatchers_by_host(a)) == {"host-a", "host-b"}, "both dispatchers stay alive"
    shares = sent_by_host(a)
    assert shares["host-a"] > 0 and shares["host-b"] > 0, f"the work is shared: {shares}"


def test_a_message_posted_on_a_host_without_dispatcher_is_picked_up_by_another_promptly(pg_url, fakes, hosts):
    b = hosts(fakes, pg_url, "host-b")
    a = hosts(fakes, pg_url, "host-a", {"PUSH_DISPATCHER": "external"})  # host A runs none
    chat = make_chat(a, {"bob": [("apns", apns_token(1))]})
    post_message(b, chat, "start host B's dispatcher")
    wait_until(lambda: "host-b" in dispatchers_by_host(a), 15, message="host B's dispatcher")
    delays = []
    for n in range(5):
        before = len(fakes.apns.received)
        posted = time.monotonic()
        message = post_message(a, chat, f"from A {n}")
        assert fakes.apns.wait_for(before + 1, timeout=10)
        delays.append(time.monotonic() - posted)
        wait_complete(a, chat, message, 30)
    # the safety-net poll runs once a second: a median well under it means NOTIFY woke host B
    assert statistics.median(delays) < 0.5, delays
    assert set(dispatchers_by_host(a)) == {"host-b"}


def test_killing_one_hosts_dispatcher_mid_fan_out_lets_the_other_finish(pg_url, fakes, hosts):
    env = {"PUSH_LEASE": "2", "PUSH_BATCH": "20", "PUSH_CONCURRENCY": "10"}
    a = hosts(fakes, pg_url, "host-a", env)
    b = hosts(fakes, pg_url, "host-b", env)
    chat = make_chat(a, {"bob": [("apns", apns_token(1))]})
    wait_complete(a, chat, post_message(a, chat, "warm A"), 30)
    wait_complete(a, chat, post_message(b, chat, "warm B"), 30)
    tokens = add_bulk_member(a, chat, apns_devices=300, fcm_devices=300, start=1000)
    fakes.apns.delay = fakes.fcm.delay = 0.05
    message = post_message(a, chat, "big")
    assert fakes.apns.wait_for(len(fakes.apns.received) + 40, timeout=30)
    os.kill(dispatchers_by_host(a)["host-a"], signal.SIGKILL)
    report = wait_complete(b, chat, message, 120)
    assert report["summary"] == {"pending": 0, "sent": len(tokens) + 1, "failed": 0, "skipped": 0}
    served = {token for token, m in received_pairs(fakes) if m == message}
    assert served >= set(tokens), "every device served at least once"


def test_a_postgresql_restart_mid_fan_out_loses_nothing(tmp_path, fakes, hosts):
    reason = TempPostgres.unavailable_reason()
    if reason:
        pytest.skip(reason)
    pg = TempPostgres(tmp_path / "pg").init().start()
    server = None
    try:
        url = pg.database()
        server = hosts(fakes, url, "host-a", {"PUSH_BATCH": "20", "PUSH_CONCURRENCY": "10"})
        chat = make_chat(server, {"bob": [("apns", apns_token(1))]})
        tokens = add_bulk_member(server, chat, apns_devices=300, fcm_devices=100, start=1000)
        fakes.apns.delay = fakes.fcm.delay = 0.05
        message = post_message(server, chat, "before the restart")
        assert fakes.apns.wait_for(40, timeout=30)
        server.engine.dispose()
        pg.stop()
        during = server.post(f"/v1/chats/{chat.chat_id}/messages", {"text": "during"}, token=chat.sender_token)
        assert during.status == 503
        assert during.body["error"]["code"] == "unavailable"
        time.sleep(1)
        pg.start()
        report = wait_complete(server, chat, message, 120)
        assert report["summary"] == {"pending": 0, "sent": len(tokens) + 1, "failed": 0, "skipped": 0}
        after = post_message(server, chat, "after the restart")
        assert wait_complete(server, chat, after, 60)["summary"]["sent"] == len(tokens) + 1
        with server.engine.connect() as conn:
            texts = conn.execute(sa.select(schema.messages.c.text)).scalars().all()
            jobs = conn.execute(sa.select(sa.func.count()).select_from(schema.push_jobs)).scalar_one()
        assert "during" not in texts and jobs == len(texts)  # nothing half-written
    finally:
        if server is not None:
            server.close()  # while the database is up, so its dispatchers can be found and stopped
        pg.stop()
