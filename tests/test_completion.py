"""Fan-out completion, webhook events and retention in storage, against SQLite and PostgreSQL.

Called directly (notifier.completion, events, retention), with explicit times: nothing sleeps.
The same through the real service is in test_webhooks.py.
"""
from __future__ import annotations

import json
import threading

import pytest

from notifier import completion, devices, events, outbox, retention, schema
from notifier.model import DeliveryState
from tests.test_storage import (LEASE, NOW, World, claim_batch, count, engine, post, postgres_engine,  # noqa: F401
                                record, rows, sent, world, write)

DAY = 86400.0


def failed(delivery_id: int) -> outbox.Update:
    return outbox.Update(delivery_id, DeliveryState.FAILED, 1, NOW, 410, "Unregistered")


def complete(engine, message_ids, now: float = NOW, with_events: bool = True) -> list[int]:
    with write(engine) as conn:
        return completion.complete_fanouts(conn, message_ids, now, with_events)


def event_bodies(engine) -> list[dict]:
    return [json.loads(row.body) for row in rows(engine, schema.webhook_events)]


def finish(engine, world: World, text: str = "hello", now: float = NOW) -> int:
    """Post a message, expand and send its deliveries (bob's sent, the others failed); complete it."""
    message = post(engine, world, text, now=now)["id"]
    bob, *others = claim_batch(engine, "d1", now)
    record(engine, "d1", [sent(bob, now), *map(failed, others)])
    assert complete(engine, [message], now) == [message]
    return message


# ---------------------------------------------------------------- completion

def test_a_fanout_completes_once_when_its_last_delivery_is_final(engine, world):
    message = post(engine, world)["id"]
    bob, dan = claim_batch(engine, "d1", NOW)
    record(engine, "d1", [sent(bob)])
    assert complete(engine, [message]) == []  # dan's is pending

    record(engine, "d1", [failed(dan)])
    assert complete(engine, [message]) == [message]
    assert complete(engine, [message]) == []  # once

    (fanout,) = rows(engine, schema.fanouts, schema.fanouts.c.message_id)
    assert (fanout.sent, fanout.failed, fanout.skipped, fanout.completed_at, fanout.pruned_at) == (1, 1, 0, NOW, None)
    assert rows(engine, schema.push_jobs)[0].state == "completed"
    (event,) = event_bodies(engine)
    assert event["type"] == "message.fanout_completed"
    assert event["data"]["summary"] == {"sent": 1, "failed": 1, "skipped": 0}
    assert event["data"]["failed"] == [{"device_id": world.devices["dan"], "platform": "fcm", "last_status": 410,
                                        "last_reason": "Unregistered"}]


def test_a_job_not_yet_expanded_is_not_complete(engine, world):
    message = post(engine, world)["id"]
    assert complete(engine, [message]) == []
    assert count(engine, schema.fanouts) == 0


def test_without_webhooks_the_summary_is_stored_and_no_event_written(engine, world):
    message = post(engine, world)["id"]
    ids = claim_batch(engine, "d1", NOW)
    record(engine, "d1", [sent(i) for i in ids])
    assert complete(engine, [message], with_events=False) == [message]
    assert count(engine, schema.fanouts) == 1 and count(engine, schema.webhook_events) == 0


def test_the_sweep_completes_what_nobody_noticed(engine, world):
    message = post(engine, world)["id"]
    ids = claim_batch(engine, "d1", NOW)
    record(engine, "d1", [sent(i) for i in ids])  # recorded without the completion check
    with write(engine) as conn:
        assert completion.sweep(conn, NOW, True) == [message]
        assert completion.sweep(conn, NOW, True) == []


def test_two_transactions_finishing_one_fanout_at_once_complete_it(engine, world):
    """Each records one of the last two deliveries and checks. Without the job's row lock (PostgreSQL,
    READ COMMITTED) each saw the other's row still pending, and the fan-out never completed."""
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite runs one write transaction at a time: no two can interleave")
    message = post(engine, world)["id"]
    bob, dan = claim_batch(engine, "d1", NOW)
    first = engine.connect()
    second = engine.connect()
    try:
        first.begin()
        second.begin()
        outbox.record_updates(first, "d1", [sent(bob)])
        outbox.record_updates(second, "d1", [sent(dan)])
        assert completion.complete_fanouts(first, [message], NOW, True) == []  # sees dan's row pending
        got = []
        checker = threading.Thread(target=lambda: got.append(completion.complete_fanouts(second, [message], NOW, True)))
        checker.start()
        checker.join(0.5)
        assert checker.is_alive(), "the second check must wait for the first transaction"
        first.commit()
        checker.join(10)
        second.commit()
        assert got == [[message]]
    finally:
        first.close()
        second.close()
    assert count(engine, schema.fanouts) == 1 and count(engine, schema.webhook_events) == 1


def test_deliveries_report_before_and_after_pruning(engine, world):
    message = finish(engine, world)
    with engine.connect() as conn:
        before = completion.delivery_report(conn, message)
    assert before["complete"] is True and before["pruned"] is False and len(before["deliveries"]) == 2

    with write(engine) as conn:
        assert retention.prune_deliveries(conn, NOW + 1, NOW + 1) == 3  # 2 rows, then the fan-out marked
    with engine.connect() as conn:
        after = completion.delivery_report(conn, message)
    assert after == {"complete": True, "summary": before["summary"], "deliveries": [], "pruned": True}


# ---------------------------------------------------------------- retention

def test_retention_takes_only_finished_work_older_than_the_cutoff(engine, world):
    old = finish(engine, world, "old", now=NOW)
    young = finish(engine, world, "young", now=NOW + DAY)
    unfinished = post(engine, world, "unfinished", now=NOW)["id"]
    claim_batch(engine, "d1", NOW)  # expanded, still pending
    cutoff = NOW + DAY / 2

    deleted = 0
    with write(engine) as conn:
        while batch := retention.prune_deliveries(conn, cutoff, NOW + DAY):
            deleted += batch
    assert deleted == 2 + 1

    left = {r.message_id for r in rows(engine, schema.deliveries)}
    assert left == {young, unfinished}
    assert {r.message_id for r in rows(engine, schema.push_jobs)} == {young, unfinished}
    assert {r.message_id: r.pruned_at for r in rows(engine, schema.fanouts, schema.fanouts.c.message_id)} == {
        old: NOW + DAY, young: None}
    assert count(engine, schema.messages) == 3  # the history stays


def test_retention_deletes_in_batches(engine, world, monkeypatch):
    monkeypatch.setattr(retention, "BATCH", 3)
    messages = [finish(engine, world, f"m{i}") for i in range(4)]  # 8 delivery rows
    batches = []
    with write(engine) as conn:
        while batch := retention.prune_deliveries(conn, NOW + 1, NOW + 1):
            batches.append(batch)
    assert batches == [3, 3, 2 + 3, 1]  # the last delivery rows, then the fan-outs marked, 3 at a time
    assert count(engine, schema.deliveries) == 0
    assert count(engine, schema.fanouts, schema.fanouts.c.pruned_at.is_(None)) == 0
    assert len(messages) == 4


def test_retention_deletes_finished_events_with_their_attempts_and_keeps_pending_ones(engine, world):
    with write(engine) as conn:
        done_id = events.add_event(conn, "t", {"n": 1}, NOW)
        events.add_event(conn, "t", {"n": 2}, NOW)  # never sent: pending
        gone_id = events.add_event(conn, "t", {"n": 3}, NOW)
        young_id = events.add_event(conn, "t", {"n": 4}, NOW)
    with write(engine) as conn:
        claimed = {e.webhook_id: e for e in events.claim_events(conn, "d1", NOW, LEASE, 10)}
    with write(engine) as conn:
        events.record_attempt(conn, "d1", claimed[done_id].id, NOW, 0.1, 500, None, events.PENDING, NOW + 1)
    with write(engine) as conn:
        (again,) = [e for e in events.claim_events(conn, "d1", NOW + 1, LEASE, 10) if e.webhook_id == done_id]
        events.record_attempt(conn, "d1", again.id, NOW + 1, 0.1, 200, None, events.DELIVERED, NOW + 1)
        events.record_attempt(conn, "d1", claimed[gone_id].id, NOW, 0.1, 410, None, events.FAILED, NOW)
        events.record_attempt(conn, "d1", claimed[young_id].id, NOW + DAY, 0.1, 204, None, events.DELIVERED,
                              NOW + DAY)
    assert count(engine, schema.webhook_attempts) == 4

    with write(engine) as conn:
        assert retention.prune_events(conn, NOW + 10) == 2
        assert retention.prune_events(conn, NOW + 10) == 0
    assert sorted(json.loads(r.body)["data"]["n"] for r in rows(engine, schema.webhook_events)) == [2, 4]
    assert count(engine, schema.webhook_attempts) == 1


# ---------------------------------------------------------------- events

def test_an_event_is_leased_to_one_sender_and_its_body_never_changes(engine, world):
    with write(engine) as conn:
        webhook_id = events.add_event(conn, "message.fanout_completed", {"message_id": 7}, NOW)
    with write(engine) as conn:
        (mine,) = events.claim_events(conn, "d1", NOW, LEASE, 10)
        assert events.claim_events(conn, "d2", NOW + 1, LEASE, 10) == []  # leased
    assert mine.webhook_id == webhook_id and mine.attempts == 0
    assert json.loads(mine.body) == {"type": "message.fanout_completed", "timestamp": "2027-01-15T08:00:00.000Z",
                                     "data": {"message_id": 7}}
    with write(engine) as conn:
        assert events.record_attempt(conn, "d2", mine.id, NOW, 0.1, 200, None, events.DELIVERED, NOW) is False
        assert events.record_attempt(conn, "d1", mine.id, NOW, 0.1, 503, None, events.PENDING, NOW + 30) is True
    with engine.connect() as conn:
        assert events.next_due(conn) == NOW + 30
        assert events.backlog(conn, NOW + 30) == {"pending": 1, "oldest_pending_age": 30.0}
    with write(engine) as conn:
        (again,) = events.claim_events(conn, "d2", NOW + 30, LEASE, 10)
    assert (again.body, again.attempts) == (mine.body, 1)


def test_a_dead_device_is_reported_once(engine, world):
    with write(engine) as conn:
        first = devices.disable_dead_devices(conn, [(world.devices["dan"], "UNREGISTERED")])
        again = devices.disable_dead_devices(conn, [(world.devices["dan"], "UNREGISTERED")])
    assert first == [{"device_id": world.devices["dan"], "user_id": world.dan, "platform": "fcm",
                      "reason": "UNREGISTERED"}]
    assert again == []
