"""3. Memory and scale: the dispatcher's peak RSS (VmHWM) and rate during one message to 1,000,000
devices (about two minutes here; `--devices 100000` for a shorter run), beside the rate of a
10,000-device message measured just before on the same server and dispatcher.

Issue 10's scale target: at 1,000,000 devices the dispatcher's peak RSS at most 150 MB, its rate
within 15 % of the 10,000-device rate (the cost of a fan-out linear in its size), and the first
push still within 50 ms of the POST. The two sizes run one after the other in one dispatcher, over
one database that already holds every device of both, so only the fan-out's size differs.

The dispatcher is found through the `dispatchers` table. It is a fork of a uWSGI worker, so its RSS
starts with the pages of the worker it inherited and touches (the app, SQLAlchemy, the providers);
VmHWM is read after the warm-up (a small message), after the 10,000-device messages and after the
big one. RssAnon / RssFile / RssShmem at the end tell the heap from mapped files.
"""
from __future__ import annotations

import threading
import time

import sqlalchemy as sa

from bench.common import percentile, proc_status, table
from bench.env import BenchChat, BenchEnv, delivery_states, dispatcher_pid, wait_drained
from bench.fanout import post
from bench.procs import CpuMeter
from notifier import db, schema
from tests.e2e import TOPIC, apns_token

NAME = "memory"
DEVICES = 1_000_000
REFERENCE_DEVICES = 10_000
REFERENCE_RUNS = 3            # 10,000-device messages; their median rate is the reference
QUICK_DEVICES, QUICK_REFERENCE = 2_000, 500
TARGET_MB = 150
TARGET_RATE_SHARE = 0.85      # the big fan-out's rate at least this share of the 10,000-device rate
TARGET_FIRST_MS = 50
INSERT_BATCH = 50_000         # devices per insert transaction while building a big chat
STALL = 60                    # seconds without a push before a fan-out is given up as stuck
KEPT_SAMPLES = 200            # samples kept in the JSON (a million-device run takes about 1,000)
SAMPLE_INTERVAL = 0.5         # seconds between samples of the dispatcher's RSS and the pushes so far
TOKEN_STRIDE = 10 ** 9        # bulk tokens of chat c are apns_token(c * TOKEN_STRIDE + i): never env.chat()'s


def run(env: BenchEnv, quick: bool = False, devices: int | None = None) -> dict:
    """Warm up, fan out REFERENCE_RUNS messages to 10,000 devices, then one to `devices` (default
    DEVICES; QUICK_DEVICES with `quick`), then 10,000 again; the table compares the two sizes."""
    devices = devices or (QUICK_DEVICES if quick else DEVICES)
    reference_devices = QUICK_REFERENCE if quick else REFERENCE_DEVICES
    server = env.server("memory")
    try:
        began = time.monotonic()
        small = env.chat(server, apns=1, fcm=1)
        reference = bulk_chat(env, server, reference_devices)
        big = bulk_chat(env, server, devices)
        setup_s = time.monotonic() - began
        post(server, small, "warm-up")
        pid = dispatcher_pid(server)
        wait_drained(server, 30)
        warm_hwm = proc_status(pid, "VmHWM")
        references = []
        for i in range(1 if quick else REFERENCE_RUNS):
            references.append(fan_out(env, server, reference, pid, f"reference {i}"))
            wait_drained(server, 30)
        before_hwm, before_rss = proc_status(pid, "VmHWM"), proc_status(pid, "VmRSS")
        measured = fan_out(env, server, big, pid, f"{devices:,} devices", sample=True)
        after = {key: proc_status(pid, key) for key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")}
        # the small size once more: a big fan-out lasts minutes on a shared machine, and a rate that
        # moved between before and after is the machine's doing, not the fan-out's size
        wait_drained(server, 60)
        again = []
        for i in range(1 if quick else REFERENCE_RUNS):
            again.append(fan_out(env, server, reference, pid, f"reference again {i}"))
            wait_drained(server, 30)
    finally:
        env.stop_server(server)
    result = {"name": NAME, "devices": devices, "reference_devices": reference_devices, "dispatcher_pid": pid,
              "setup_s": round(setup_s, 1), "reference_runs": references, "run": measured,
              "reference_runs_after": again,
              "vmhwm_warm_kb": warm_hwm, "vmhwm_before_kb": before_hwm, "vmrss_before_kb": before_rss,
              "vmhwm_after_kb": after["VmHWM"], "vmrss_after_kb": after["VmRSS"],
              "rss_after_kb": {key: after[key] for key in ("RssAnon", "RssFile", "RssShmem")}}
    result["reference_rate"] = percentile([r["rate"] for r in references if r["rate"]], 50)
    result["reference_first_ms"] = percentile([r["post_to_first_ms"] for r in references
                                               if r["post_to_first_ms"] is not None], 50)
    result["rate_share"] = (round(measured["rate"] / result["reference_rate"], 3)
                            if measured["rate"] and result["reference_rate"] else None)
    result["targets"] = targets(result)
    result["tables"] = tables(result)
    return result


def bulk_chat(env: BenchEnv, server, devices: int) -> BenchChat:
    """A chat whose messages go to `devices` APNs devices of one member: env.chat()'s rows
    (tests.e2e.add_bulk_member: same columns and values, tokens of the same form), inserted
    INSERT_BATCH rows per transaction, so a million devices never sit in the benchmark's memory
    as one list of dicts."""
    chat = env.chat(server, apns=1, fcm=0)
    with server.engine.connect() as conn:
        # the bulk member signed up after the sender: the chat's highest user id
        user_id = conn.execute(sa.select(sa.func.max(schema.members.c.user_id))
                               .where(schema.members.c.chat_id == chat.chat_id)).scalar_one()
    start = chat.chat_id * TOKEN_STRIDE
    for first in range(1, devices, INSERT_BATCH):
        rows = [{"user_id": user_id, "platform": "apns", "token": apns_token(start + i), "app": TOPIC,
                 "enabled": True, "created_at": 0.0} for i in range(first, min(devices, first + INSERT_BATCH))]
        with db.writer(server.engine).begin() as conn:
            conn.execute(schema.devices.insert(), rows)
    chat.devices = devices
    return chat


def fan_out(env: BenchEnv, server, chat: BenchChat, pid: int, label: str, stall: float = STALL,
            sample: bool = False) -> dict:
    """POST one message to `chat` and wait until the APNs fake has accepted every push: rate, first
    push after the POST, CPU (dispatcher, fakes, the rest of the machine); with `sample`, the
    dispatcher's VmRSS and the pushes so far every SAMPLE_INTERVAL seconds."""
    samples: list = []
    stop = threading.Event()

    def sampler():
        started = time.monotonic()
        while not stop.is_set():
            samples.append((round(time.monotonic() - started, 2), env.apns.stats()["ok"], proc_status(pid, "VmRSS")))
            stop.wait(SAMPLE_INTERVAL)

    meter = CpuMeter({"dispatcher": lambda: [pid], "fakes": lambda: [env.apns.pid, env.fcm.pid]})
    thread = threading.Thread(target=sampler, daemon=True) if sample else None
    meter.start()
    if thread is not None:
        thread.start()
    posted, message_id = post(server, chat, f"fan-out {label}")
    marks = _wait_pushed(env, message_id, chat.devices, stall)
    cpu = meter.stop()
    stop.set()
    if thread is not None:
        thread.join()
    states = delivery_states(server, [message_id])
    first = (marks["first"] - posted) * 1000 if marks["first"] else None
    last = (marks["last"] - posted) if marks["last"] else None
    out = {"message_id": message_id, "devices": chat.devices, "pushed": marks["count"], "states": states,
           "post_to_first_ms": round(first, 1) if first is not None else None,
           "post_to_last_s": round(last, 2) if last is not None else None,
           "rate": round(marks["count"] / last) if last else None,
           "steady_rate": round(marks["count"] / (marks["last"] - marks["first"]))
           if marks["first"] and marks["last"] and marks["last"] > marks["first"] else None,
           "cpu_s": cpu, "us_per_push": round(cpu["dispatcher"] * 1e6 / marks["count"]) if marks["count"] else None}
    if sample:
        base = samples[0][1] if samples else 0
        samples = [[t, pushed - base, rss] for t, pushed, rss in samples]  # seconds, pushes, VmRSS kB
        out["rate_by_tenth"] = _rate_by_tenth(samples)
        out["samples"] = samples[::max(1, len(samples) // KEPT_SAMPLES)]
    return out


def _wait_pushed(env: BenchEnv, message_id: int, expected: int, stall: float) -> dict:
    """Wait until the APNs fake has accepted `expected` pushes of the message, or none for `stall`
    seconds. Unlike bench.fanout.wait_pushed, no deadline and no look at the database meanwhile:
    a long fan-out is waited for as long as it moves, and counting a million delivery rows every
    50 ms would compete with the dispatcher it measures."""
    count, moved = 0, time.monotonic()
    while True:
        mark = env.apns.stats()["marks"].get(str(message_id))
        if mark and mark[2] > count:
            count, moved = mark[2], time.monotonic()
        if count >= expected or time.monotonic() - moved > stall:
            break
        time.sleep(0.05)
    return {"count": count, "first": mark[0] if mark else None, "last": mark[1] if mark else None}


def _rate_by_tenth(samples: list) -> list:
    """Pushes/s over each tenth of the run's time (from the samples): a rate that falls from one
    tenth to the next is a cost per push that grows as the fan-out proceeds."""
    if len(samples) < 11:
        return []
    rates = []
    for k in range(10):
        (t0, p0, _), (t1, p1, _) = samples[len(samples) * k // 10], samples[min(len(samples) * (k + 1) // 10,
                                                                                 len(samples) - 1)]
        rates.append(round((p1 - p0) / (t1 - t0)) if t1 > t0 else None)
    return rates


def targets(result: dict) -> dict:
    run_, peak_mb = result["run"], (result["vmhwm_after_kb"] or 0) / 1024
    share, first = result["rate_share"], run_["post_to_first_ms"]
    return {
        "dispatcher_peak_rss_mb": {"value": round(peak_mb, 1), "target": f"<= {TARGET_MB}",
                                   "met": bool(peak_mb) and peak_mb <= TARGET_MB},
        "rate_vs_10000_devices": {"value": share, "target": f">= {TARGET_RATE_SHARE}",
                                  "met": share is not None and share >= TARGET_RATE_SHARE},
        "first_push_ms": {"value": first, "target": f"<= {TARGET_FIRST_MS}",
                          "met": first is not None and first <= TARGET_FIRST_MS},
    }


def tables(result: dict) -> list:
    refs, big = result["reference_runs"], result["run"]
    small, large = f"{result['reference_devices']:,} devices", f"{result['devices']:,} devices"
    rows = [_row(small, refs, result["vmhwm_before_kb"]), _row(large, [big], result["vmhwm_after_kb"])]
    ratio = [f"  {large} / {small}", None, None]
    for column in range(3, 9):  # deliveries/s, steady/s, first ms, last s, us/push, fake us/push
        a, b = rows[1][column], rows[0][column]
        ratio.append(round(a / b, 2) if a and b else None)
    rows.append(ratio + [None, None])
    if result.get("reference_runs_after"):
        rows.append(_row(f"{small}, again after", result["reference_runs_after"], None))
    notes = ["one message per run to one member's APNs devices, same server, same warm dispatcher, the smaller "
             "size first (median of its runs); deliveries/s = pushes accepted by the fake / (last push - POST), "
             "steady = between the first and last push",
             "'again after': the small size once more after the big one (not in the ratio): if its rate moved, "
             "so did the machine",
             "first ms: POST sent -> first push accepted by the fake; us/push: the dispatcher's CPU (utime + stime, "
             "/proc/PID/stat) per push; fake us/push: the same for the fakes, whose work per push does not depend "
             "on the fan-out's size (a yardstick of the machine's speed during the run); other CPU s: the rest of "
             "the machine meanwhile (a disturbed run shows here)",
             "VmHWM: the dispatcher's peak resident set so far (/proc/PID/status), read after the run",
             f"set-up (chats over HTTP, devices inserted {INSERT_BATCH:,} per transaction): {result['setup_s']} s"]
    if big.get("rate_by_tenth"):
        notes.append(f"{result['devices']:,} devices, deliveries/s over each tenth of the run's time: "
                     + ", ".join(f"{r:,}" if r is not None else "-" for r in big["rate_by_tenth"]))
    scale = table(f"Scale: one message to {result['reference_devices']:,} and to {result['devices']:,} APNs devices",
                  ["fan-out", "runs", "pushes", "deliveries/s", "steady/s", "first ms", "last s", "us/push",
                   "fake us/push", "other CPU s", "VmHWM MB"], rows, notes)
    rss = result["rss_after_kb"]
    memory = table(
        f"Dispatcher memory for one message to {result['devices']:,} APNs devices (MB)",
        ["VmHWM warm", f"after {result['reference_devices']:,}", f"after {result['devices']:,}", "growth",
         "VmRSS after", "RssAnon", "RssFile", "RssShmem"],
        [[_mb(result["vmhwm_warm_kb"]), _mb(result["vmhwm_before_kb"]), _mb(result["vmhwm_after_kb"]),
          _mb(result["vmhwm_after_kb"] - result["vmhwm_before_kb"]), _mb(result["vmrss_after_kb"]),
          _mb(rss["RssAnon"]), _mb(rss["RssFile"]), _mb(rss["RssShmem"])]],
        ["VmHWM: peak resident set of the dispatcher process, pid from the dispatchers table; 'warm' is after a "
         "small warm-up message (the worker's inherited pages it touched included); growth: during the big "
         "fan-out; RssAnon/RssFile/RssShmem: heap, mapped files, shared memory at the end"])
    return [scale, memory]


def _row(label: str, runs: list, hwm_kb) -> list:
    """One table row for a group of runs of one size: medians, CPU per push over all of them."""
    def median(key):
        return percentile([r[key] for r in runs if r[key] is not None], 50)

    def per_push(group):
        return round(sum(r["cpu_s"][group] for r in runs) * 1e6 / max(1, pushed))

    pushed = sum(r["pushed"] for r in runs)
    return [label, len(runs), pushed, median("rate"), median("steady_rate"), median("post_to_first_ms"),
            median("post_to_last_s"), per_push("dispatcher"), per_push("fakes"),
            round(sum(r["cpu_s"]["other"] for r in runs), 1), _mb(hwm_kb)]


def _mb(kb) -> float | None:
    return None if kb is None else round(kb / 1024, 1)
