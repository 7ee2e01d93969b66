"""The operator dashboard's cost to the POSTs: POST latency with and without ten dashboards open.

One server with OPS_PASSWORD, POSTs at a fixed rate into a 2-device chat in alternating rounds:
without dashboards, then with ten pollers each fetching /ops/api/summary every 5 s, as ten open
pages do (each worker's 3 s cache then answers some, computes the rest), and so on. Reported: p50/p99/max of the POSTs per side, the summaries served, the uWSGI CPU per POST.
"""
from __future__ import annotations

import base64
import threading
import time

from bench.common import summary_ms, table
from bench.env import BenchEnv
from bench.fanout import post, wait_pushed
from bench.loadgen import open_loop, post_bytes, request
from bench.procs import CpuMeter, group_pids

NAME = "dashboard"
PASSWORD = "bench-dashboard-password"
RATE = 100.0       # POSTs per second: well under capacity, so a change shows in the tail, not the rate
ROUND_SECONDS, QUICK_ROUND_SECONDS = 10, 3
ROUNDS, QUICK_ROUNDS = 3, 1
DASHBOARDS = 10
POLL_EVERY = 5.0  # what the page does


def run(env: BenchEnv, quick: bool = False) -> dict:
    server = env.server("dashboard", env={"OPS_PASSWORD": PASSWORD})
    seconds = QUICK_ROUND_SECONDS if quick else ROUND_SECONDS
    try:
        chat = env.chat(server, apns=2, fcm=0)
        _, warm = post(server, chat, "warm-up")
        wait_pushed(env, server, warm, 2, [env.apns], timeout=30)
        raw = post_bytes("127.0.0.1", server.port, chat.path, chat.token, {"text": "with or without"})
        sides = {"no dashboard": [], f"{DASHBOARDS} dashboards polling": []}
        served, cpu = {name: 0 for name in sides}, {name: 0.0 for name in sides}
        for _ in range(QUICK_ROUNDS if quick else ROUNDS):
            for name in sides:
                pollers = _Pollers(server.port, DASHBOARDS if "polling" in name else 0)
                meter = CpuMeter({"uwsgi": lambda: group_pids(server.process.pid)})
                meter.start()
                pollers.start()
                result = open_loop("127.0.0.1", server.port, lambda i: raw, RATE, seconds)
                pollers.stop()
                cpu[name] += meter.stop()["uwsgi"]
                served[name] += pollers.served
                sides[name] += result.answers
    finally:
        env.stop_server(server)
    rows, summary = [], {}
    for name, answers in sides.items():
        latency = summary_ms([a.latency for a in answers])
        summary[name] = {**latency, "posts": len(answers), "summaries_served": served[name],
                         "errors": sum(1 for a in answers if a.status != 201),
                         "uwsgi_cpu_us_per_post": round(cpu[name] / len(answers) * 1e6) if answers else None}
        rows.append([name, len(answers), latency["p50"], latency["p99"], latency["max"], served[name],
                     summary[name]["uwsgi_cpu_us_per_post"]])
    quiet, busy = (summary[name]["p99"] for name in sides)
    return {
        "name": NAME, "sides": summary,
        "targets": {"POST p99 with ten dashboards / without": {
            "value": round(busy / quiet, 2) if quiet and busy else None, "target": "about 1 (no move)",
            "met": bool(quiet and busy and busy <= quiet * 1.25)}},
        "tables": [table(f"POSTs at {RATE:.0f}/s, with and without {DASHBOARDS} dashboards polling every "
                         f"{POLL_EVERY:.0f} s ({ROUNDS} alternating rounds of {seconds} s each)",
                         ["side", "POSTs", "p50 ms", "p99 ms", "max ms", "summaries served", "uWSGI CPU us/POST"],
                         rows)],
    }


class _Pollers:
    """`count` threads, each GETting the dashboard's summary every POLL_EVERY seconds."""

    def __init__(self, port: int, count: int):
        self.port, self.count = port, count
        self.served = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._poll, daemon=True) for _ in range(count)]
        credentials = base64.b64encode(f"ops:{PASSWORD}".encode()).decode()
        self._raw = (f"GET /ops/api/summary HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                     f"Authorization: Basic {credentials}\r\nConnection: close\r\n\r\n").encode()

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)

    def _poll(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                if request("127.0.0.1", self.port, self._raw, timeout=10).status == 200:
                    self.served += 1  # a racy count across threads is fine for a report
            except OSError:
                pass
            self._stop.wait(max(0.0, POLL_EVERY - (time.monotonic() - began)))
