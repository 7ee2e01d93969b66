"""3. Memory: peak RSS (VmHWM) of the dispatcher process during a 100,000-device fan-out.

The dispatcher is found through the `dispatchers` table. It is a fork of a uWSGI worker, so its RSS
starts with the pages of the worker it inherited and touches (the app, SQLAlchemy, the providers);
VmHWM is read before the fan-out (warm, after a small message) and after it.
"""
from __future__ import annotations

import threading
import time

from bench.common import proc_status, table
from bench.env import BenchEnv, delivery_states, dispatcher_pid, wait_drained
from bench.fanout import post, wait_pushed

NAME = "memory"
DEVICES = 100_000
QUICK_DEVICES = 2_000
TARGET_MB = 150


def run(env: BenchEnv, quick: bool = False) -> dict:
    devices = QUICK_DEVICES if quick else DEVICES
    server = env.server("memory")
    try:
        small = env.chat(server, apns=1, fcm=1)
        big = env.chat(server, apns=devices, fcm=0)
        post(server, small, "warm-up")
        pid = dispatcher_pid(server)
        wait_drained(server, 30)
        before_hwm, before_rss = proc_status(pid, "VmHWM"), proc_status(pid, "VmRSS")
        samples = []
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                rss = proc_status(pid, "VmRSS")
                if rss:
                    samples.append((time.time(), rss))
                stop.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        posted, message_id = post(server, big, "one hundred thousand")
        marks = wait_pushed(env, server, message_id, devices, [env.apns], timeout=300)
        stop.set()
        sampler.join()
        after_hwm, after_rss = proc_status(pid, "VmHWM"), proc_status(pid, "VmRSS")
        states = delivery_states(server, [message_id])
        seconds = (marks["last"] - posted) if marks["last"] else None
    finally:
        env.stop_server(server)
    peak_mb = after_hwm / 1024 if after_hwm else None
    result = {
        "name": NAME, "devices": devices, "dispatcher_pid": pid, "pushed": marks["count"], "states": states,
        "seconds": round(seconds, 2) if seconds else None,
        "rate": round(marks["count"] / seconds) if seconds else None,
        "vmhwm_before_kb": before_hwm, "vmrss_before_kb": before_rss,
        "vmhwm_after_kb": after_hwm, "vmrss_after_kb": after_rss,
        "rss_samples_kb": [r for _, r in samples][::5],
        "targets": {"dispatcher_peak_rss_mb": {"value": round(peak_mb, 1) if peak_mb else None,
                                                "target": f"< {TARGET_MB}", "met": bool(peak_mb and peak_mb < TARGET_MB)}},
    }
    result["tables"] = [table(
        f"Dispatcher memory for one message to {devices:,} APNs devices (MB)",
        ["VmHWM before", "VmHWM after", "growth", "VmRSS after", "pushes", "seconds", "deliveries/s"],
        [[round(before_hwm / 1024, 1), round(after_hwm / 1024, 1), round((after_hwm - before_hwm) / 1024, 1),
          round(after_rss / 1024, 1), marks["count"], result["seconds"], result["rate"]]],
        ["VmHWM: peak resident set of the dispatcher process (/proc/PID/status), pid from the dispatchers table; "
         "'before' is after a warm-up message (the worker's inherited pages it touched included)"])]
    return result
