"""Webhooks and retention, measured against the pushes and the POSTs they must not slow down.

1. A slow receiver: a 10,000-device APNs fan-out (POST -> last push at the fake), with webhooks
   off, with a receiver that answers at once, and with one that sleeps 5 s per request. Before
   each big message, 20 small ones complete, so 20 events are queued and the sender's slots
   (WEBHOOK_CONCURRENCY, 8) are all held by the sleeping receiver while the fan-out runs.
2. A pruning pass of 100,000 delivery rows: POSTs at a fixed rate for 10 s with nothing to prune,
   then 100,000 rows of a fan-out completed long ago are inserted and POSTs continue at the same
   rate for 40 s while the dispatcher's next maintenance pass deletes them (PUSH_RETENTION=15: a
   pass every 15 s). The POST latencies inside the pass (from the first row gone to the last) against those
   of the quiet phase.
"""
from __future__ import annotations

import base64
import threading
import time

import sqlalchemy as sa

from bench.common import summary_ms, table
from bench.env import BenchEnv, dispatcher_pid, wait_drained
from bench.fanout import post, wait_pushed
from bench.loadgen import open_loop, post_bytes
from bench.procs import CpuMeter
from notifier import db, schema
from tests.fakes.webhook import WebhookReceiver

NAME = "webhooks"
DEVICES, QUICK_DEVICES = 10_000, 500
RUNS = 2
QUEUED_EVENTS = 20
SLOW = 5.0
PRUNE_ROWS, QUICK_PRUNE_ROWS = 100_000, 5_000
POST_RATE = 40.0  # POSTs per second in the pruning phases: well under this machine's capacity
QUIET_SECONDS = 10
PRUNE_SECONDS = 40  # the next maintenance pass starts within 15 s (PUSH_RETENTION=15), then takes a few
SECRET = "whsec_" + base64.b64encode(b"bench-webhook-signing-key-32byte").decode()


def run(env: BenchEnv, quick: bool = False) -> dict:
    devices = QUICK_DEVICES if quick else DEVICES
    scenarios = [_fanout_scenario(env, label, delay, devices, 1 if quick else RUNS)
                 for label, delay in (("webhooks off", None), ("receiver answers at once", 0.0),
                                      (f"receiver sleeps {SLOW:.0f} s per request", SLOW))]
    pruning = _pruning(env, QUICK_PRUNE_ROWS if quick else PRUNE_ROWS, quick)
    base = scenarios[0]["post_to_last_s"]
    slow = scenarios[2]["post_to_last_s"]
    delta = round(slow - base, 3) if slow is not None and base is not None else None
    p99_quiet, p99_pass = pruning["quiet"]["p99_ms"], pruning["during_pass"]["p99_ms"]
    return {
        "name": NAME, "devices": devices, "fanout": scenarios, "pruning": pruning,
        "targets": {
            "slow receiver: change of POST -> last push (s)": {"value": delta, "target": "< 1",
                                                              "met": delta is not None and delta < 1},
            "POST p99 during a pruning pass of %d rows (ms)" % pruning["rows"]: {
                "value": p99_pass, "target": "< 15 (quiet: %s)" % p99_quiet,
                "met": p99_pass is not None and p99_pass < 15},
        },
        "tables": [
            table(f"Fan-out to {devices:,} APNs devices while webhooks are sent (median of {RUNS} runs)",
                  ["webhooks", "POST -> first push ms", "POST -> last push s", "deliveries/s",
                   "dispatcher CPU us/push", "events queued at the POST", "events received during"],
                  [[s["label"], s["post_to_first_ms"], s["post_to_last_s"], s["rate"], s["cpu_us_per_push"],
                    s["events_queued"], s["events_received_during"]] for s in scenarios],
                  [f"change with a receiver sleeping {SLOW:.0f} s: {delta} s (target under 1 s)"]),
            table(f"POSTs at {POST_RATE:.0f}/s while a pruning pass deletes {pruning['rows']:,} delivery rows",
                  ["phase", "POSTs", "p50 ms", "p99 ms", "max ms", "errors"],
                  [[name, pruning[key]["count"], pruning[key]["p50_ms"], pruning[key]["p99_ms"],
                    pruning[key]["max_ms"], pruning[key]["errors"]]
                   for name, key in (("nothing to prune", "quiet"), ("during the pass", "during_pass"))],
                  [f"the pass: {pruning['pass_seconds']} s, {pruning['rows_per_s']} rows/s "
                   f"({pruning['rows']:,} rows in batches of 500, 5 ms apart); dispatcher CPU over the "
                   f"pruning phase {pruning['dispatcher_cpu_s']} s"]),
        ],
    }


def _fanout_scenario(env: BenchEnv, label: str, delay: float | None, devices: int, runs: int) -> dict:
    receiver = WebhookReceiver(delay=delay).start() if delay is not None else None
    extra = {"WEBHOOK_URL": receiver.url, "WEBHOOK_SECRET": SECRET} if receiver else {}
    server = env.server(f"webhooks-{len(env.servers)}-{int(time.time())}", env=extra)
    try:
        small, big, pid = _warm_chats(env, server, devices)
        rows = []
        for index in range(runs):
            for n in range(QUEUED_EVENTS):  # events to keep the sender busy during the fan-out
                post(server, small, f"queue {index}.{n}")
            wait_drained(server, 30)
            queued = _pending_events(server) if receiver else 0
            received_before = len(receiver.received) if receiver else 0
            meter = CpuMeter({"dispatcher": lambda: [pid]})
            meter.start()
            posted, message_id = post(server, big, f"big {index}")
            marks = wait_pushed(env, server, message_id, devices, [env.apns], timeout=300)
            cpu = meter.stop()
            last = marks["last"] - posted if marks["last"] else None
            rows.append({
                "post_to_first_ms": round((marks["first"] - posted) * 1000, 1) if marks["first"] else None,
                "post_to_last_s": round(last, 3) if last else None,
                "rate": round(marks["count"] / last) if last else None,
                "cpu_us_per_push": round(cpu["dispatcher"] / marks["count"] * 1e6) if marks["count"] else None,
                "events_queued": queued,
                "events_received_during": (len(receiver.received) - received_before) if receiver else 0,
                "pushed": marks["count"],
            })
        median = sorted(rows, key=lambda r: r["post_to_last_s"] or float("inf"))[len(rows) // 2]
        return {"label": label, **median, "runs": rows}
    finally:
        env.stop_server(server)
        if receiver is not None:
            receiver.stop()


def _warm_chats(env: BenchEnv, server, devices: int):
    """A one-device chat and a `devices`-device chat; one message through the small one so the
    dispatcher is up and its APNs connection open. Returns (small, big, the dispatcher's pid)."""
    small = env.chat(server, apns=1, fcm=0)
    big = env.chat(server, apns=devices, fcm=0)
    _, warm = post(server, small, "warm-up")
    wait_pushed(env, server, warm, 1, [env.apns], timeout=30)
    return small, big, dispatcher_pid(server)


def _pending_events(server) -> int:
    with server.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(schema.webhook_events)
                            .where(schema.webhook_events.c.state == "pending")).scalar_one()


def _pruning(env: BenchEnv, rows: int, quick: bool) -> dict:
    server = env.server(f"pruning-{int(time.time())}", env={"PUSH_RETENTION": "15"})
    try:
        small, big, pid = _warm_chats(env, server, rows)
        request = post_bytes("127.0.0.1", server.port, small.path, small.token, {"text": "during pruning"})
        seconds = 3 if quick else QUIET_SECONDS
        quiet = open_loop("127.0.0.1", server.port, lambda i: request, POST_RATE, seconds)
        old_message = _insert_old_fanout(server, big.chat_id, rows)
        watch = _RowWatch(server, old_message)
        watch.start()
        meter = CpuMeter({"dispatcher": lambda: [pid]})
        meter.start()
        busy = open_loop("127.0.0.1", server.port, lambda i: request, POST_RATE, 20 if quick else PRUNE_SECONDS)
        cpu = meter.stop()
        watch.stop()
    finally:
        env.stop_server(server)
    start, end = watch.first_gone, watch.all_gone
    during = [a for a in busy.answers if start and end and start <= a.started <= end]
    span = round(end - start, 2) if start and end else None
    return {
        "rows": rows, "pass_seconds": span, "rows_per_s": round(rows / span) if span else None,
        "quiet": _latency(quiet.answers, quiet.errors),
        "during_pass": _latency(during, busy.errors),
        "dispatcher_cpu_s": cpu["dispatcher"],
    }


def _latency(answers, errors) -> dict:
    latencies = [a.latency for a in answers]
    summary = summary_ms(latencies) if latencies else {}
    return {"count": len(latencies), "errors": len(errors) + sum(1 for a in answers if a.status >= 400),
            "p50_ms": summary.get("p50"), "p99_ms": summary.get("p99"),
            "max_ms": round(max(latencies) * 1000, 1) if latencies else None}


def _insert_old_fanout(server, chat_id: int, rows: int) -> int:
    """A message whose fan-out to every device of the chat completed a day ago: its job completed,
    its summary stored, one `sent` delivery row per device. Returns its id."""
    day_ago = time.time() - 86400
    devices, messages, jobs, fanouts, deliveries = (schema.devices, schema.messages, schema.push_jobs,
                                                    schema.fanouts, schema.deliveries)
    with db.writer(server.engine).begin() as conn:
        sender = conn.execute(sa.select(schema.chats.c.creator_id).where(schema.chats.c.id == chat_id)).scalar_one()
        message = conn.execute(messages.insert().values(chat_id=chat_id, sender_id=sender, text="old",
                                                        created_at=day_ago).returning(messages.c.id)).scalar_one()
        conn.execute(jobs.insert().values(message_id=message, state="completed", created_at=day_ago))
        conn.execute(fanouts.insert().values(message_id=message, sent=rows, failed=0, skipped=0,
                                             completed_at=day_ago))
        ids = conn.execute(sa.select(devices.c.id).join(schema.members, schema.members.c.user_id == devices.c.user_id)
                           .where(schema.members.c.chat_id == chat_id, devices.c.user_id != sender)).scalars().all()
        conn.execute(deliveries.insert(), [
            {"message_id": message, "device_id": device, "platform": "apns", "state": "sent", "attempts": 1,
             "next_attempt_at": day_ago, "last_status": 200, "sent_at": day_ago, "created_at": day_ago}
            for device in ids])
    return message


class _RowWatch:
    """Polls the old message's delivery rows: when the first went, when the last did."""

    def __init__(self, server, message_id: int):
        self.server, self.message_id = server, message_id
        self.first_gone: float | None = None
        self.all_gone: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._initial: int | None = None

    def start(self) -> None:
        self._initial = self._count()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _count(self) -> int:
        with self.server.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(schema.deliveries)
                                .where(schema.deliveries.c.message_id == self.message_id)).scalar_one()

    def _run(self) -> None:
        while not self._stop.is_set() and self.all_gone is None:
            left = self._count()
            now = time.time()
            if self.first_gone is None and left < self._initial:
                self.first_gone = now
            if left == 0:
                self.all_gone = now
            self._stop.wait(0.1)


