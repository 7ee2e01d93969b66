"""1. POST latency against group size: the service and three naive baselines, side by side.

For each variant and group size: a fresh uWSGI (project uwsgi.ini, its own SQLite file), one chat whose
messages go to N recipient devices (half APNs, half FCM: one bulk-inserted member), a warm-up, then
16 clients POSTing back to back (closed loop), pushes going to the fakes. The service's dispatcher,
and the baselines' threads and processes, push meanwhile: their CPU use is the point of the comparison.
"""
from __future__ import annotations

import os
import time

from bench.common import summary_ms, table
from bench.env import BenchEnv, delivery_states, drop_backlog, queue_depth
from bench.loadgen import closed_loop, post_bytes
from bench.procs import CpuMeter, group_pids, kill_worker_children

NAME = "latency"
CLIENTS = 16
SIZES = (2, 100, 1_000, 10_000)
QUICK_SIZES = (2, 100)
VARIANTS = ("service", "inline", "thread", "process")
LABELS = {"service": "service (outbox + dispatcher)", "inline": "(a) push inline in the handler",
          "thread": "(b) thread per request", "process": "(c) Process per message"}
# the service: SERVICE_ROUNDS rounds of SERVICE_PER_ROUND requests per size, sizes interleaved
SERVICE_ROUNDS, SERVICE_PER_ROUND = 4, 160
# the baselines, one run per size: fewer requests at big sizes, or one run of baseline (a) at 10,000
# devices would take minutes; the `n` column says how many
REQUESTS = {
    "inline": {2: 160, 100: 48, 1_000: 16, 10_000: 4},
    "thread": {2: 96, 100: 48, 1_000: 32, 10_000: 16},
    "process": {2: 48, 100: 32, 1_000: 32, 10_000: 16},
}
# baseline (a) at 10,000 devices takes longer than uwsgi.ini's harakiri (30 s) and would be killed
BASELINE_ARGS = ("--harakiri", "300")
QUICK_REQUESTS = 48
WARMUP = 32


def _make(server, chat, size):
    host, port = "127.0.0.1", server.port

    def make(i):
        return post_bytes(host, port, chat.path, chat.token, {"text": f"message {i} to {size} devices"})
    return make


def _meter(env: BenchEnv, server) -> CpuMeter:
    master = server.process.pid
    return CpuMeter({
        "uwsgi": lambda: group_pids(master),
        "dispatcher": server.dispatcher_pids,
        "fakes": lambda: [env.apns.pid, env.fcm.pid],
        "loadgen": lambda: [os.getpid()],
    })


def _result(variant, size, runs, cpus) -> dict:
    latencies = [lat for run in runs for lat in run.latencies]
    wall = sum(run.wall for run in runs)
    ok = sum(run.statuses().get(201, 0) for run in runs)
    errors = sum(len(run.errors) + sum(n for status, n in run.statuses().items() if status != 201) for run in runs)
    cpu = {key: round(sum(c[key] for c in cpus), 2) for key in cpus[0]}
    return {"variant": variant, "devices": size, "requests": len(latencies) + sum(len(r.errors) for r in runs),
            "clients": CLIENTS, "ok": ok, "errors": errors, "rps": round(len(latencies) / wall, 1) if wall else 0,
            "wall_s": round(wall, 2), **summary_ms(latencies), "cpu_s": cpu}


def measure_service(env: BenchEnv, sizes, per_round: int, rounds: int, warmup: int,
                    database_url: str | None = None) -> list[dict]:
    """The service: one server, one chat per size, sizes measured in interleaved rounds (the order
    rotates), so every size sees the same share of this shared machine's noise. Before each round
    the outbox is emptied (what the previous size left queued is marked done), so a round measures
    the request path with the dispatcher busy with that round's own pushes only."""
    server = env.server("service", database_url=database_url)
    try:
        chats = {size: env.chat(server, apns=size // 2, fcm=size - size // 2) for size in sizes}
        for size in sizes:  # starts the dispatcher, opens the provider connections
            closed_loop("127.0.0.1", server.port, _make(server, chats[size], size), warmup, CLIENTS)
        runs = {size: [] for size in sizes}
        cpus = {size: [] for size in sizes}
        backlog = {size: [] for size in sizes}
        order = list(sizes)
        for round_ in range(rounds):
            for size in order[round_ % len(order):] + order[:round_ % len(order)]:
                drop_backlog(server)
                time.sleep(0.5)
                meter = _meter(env, server)
                meter.start()
                runs[size].append(closed_loop("127.0.0.1", server.port, _make(server, chats[size], size),
                                              per_round, CLIENTS))
                cpus[size].append(meter.stop())
                backlog[size].append(queue_depth(server))
        results = []
        for size in sizes:
            result = _result("service", size, runs[size], cpus[size])
            result["rounds"] = rounds
            result["p99_by_round"] = [summary_ms(run.latencies)["p99"] for run in runs[size]]
            result["backlog_after"] = backlog[size][-1]
            results.append(result)
        return results
    finally:
        env.stop_server(server)


def measure_baseline(env: BenchEnv, variant: str, size: int, requests: int, warmup: int) -> dict:
    """A naive variant at one group size, on a fresh server (its threads or processes from a previous
    size would still be pushing otherwise)."""
    server = env.server(f"{variant}-{size}", env={"BENCH_BASELINE": variant}, module="bench.baselines:application",
                        args=BASELINE_ARGS)
    try:
        chat = env.chat(server, apns=size // 2, fcm=size - size // 2)
        make = _make(server, chat, size)
        closed_loop("127.0.0.1", server.port, make, min(warmup, requests), CLIENTS)  # providers, connections
        time.sleep(0.5)
        meter = _meter(env, server)
        meter.start()
        run_ = closed_loop("127.0.0.1", server.port, make, requests, CLIENTS)
        result = _result(variant, size, [run_], [meter.stop()])
        time.sleep(1.0)
        result["deliveries_recorded_1s_after"] = delivery_states(server)
        return result
    finally:
        kill_worker_children(server.process.pid)
        env.stop_server(server)


def run(env: BenchEnv, quick: bool = False) -> dict:
    sizes = QUICK_SIZES if quick else SIZES
    rows = measure_service(env, sizes, per_round=QUICK_REQUESTS if quick else SERVICE_PER_ROUND,
                           rounds=2 if quick else SERVICE_ROUNDS, warmup=8 if quick else WARMUP)
    for row in rows:
        _progress(row)
    for variant in VARIANTS[1:]:
        for size in sizes:
            row = measure_baseline(env, variant, size, QUICK_REQUESTS if quick else REQUESTS[variant][size],
                                   warmup=8 if quick else WARMUP)
            rows.append(row)
            _progress(row)
    return {"name": NAME, "rows": rows, "targets": targets(rows), "tables": tables(rows)}


def _progress(row) -> None:
    print(f"  {row['variant']:8} {row['devices']:>6} devices: p50 {row['p50']} ms, p99 {row['p99']} ms, "
          f"{row['rps']} req/s, n={row['requests']}", flush=True)


def _get(rows, variant, size):
    return next((r for r in rows if r["variant"] == variant and r["devices"] == size), None)


def targets(rows) -> dict:
    out = {}
    small, big = _get(rows, "service", 2), _get(rows, "service", 10_000)
    if small and big and small["p99"]:
        ratio = big["p99"] / small["p99"]
        out["p99_10000_over_p99_2"] = {"value": round(ratio, 2), "target": "<= 1.25", "met": ratio <= 1.25}
    service, inline = _get(rows, "service", 1_000), _get(rows, "inline", 1_000)
    if service and inline and service["p99"]:
        ratio = inline["p99"] / service["p99"]
        out["inline_p99_over_service_p99_at_1000"] = {"value": round(ratio, 1), "target": ">= 100", "met": ratio >= 100}
    return out


def tables(rows) -> list:
    sizes = sorted({r["devices"] for r in rows})
    body = []
    for variant in VARIANTS:
        base = None
        for size in sizes:
            r = _get(rows, variant, size)
            if r is None:
                continue
            service = _get(rows, "service", size)
            vs = (round(r["p99"] / service["p99"], 1)
                  if r["p99"] and service and service["p99"] and variant != "service" else None)
            if base is None:
                base = r["p99"]
            body.append([LABELS[variant], size, r["requests"], r["errors"], r["rps"], r["p50"], r["p95"], r["p99"],
                         round(r["p99"] / base, 2) if base and r["p99"] else None, vs])
    cpu = []
    for r in rows:
        c = r["cpu_s"]
        cpu.append([LABELS[r["variant"]], r["devices"], r["wall_s"], c["uwsgi"], c["dispatcher"], c["fakes"],
                    c["loadgen"], c["other"], round(c["machine"] / r["wall_s"], 2) if r["wall_s"] else None])
    notes = [f"{CLIENTS} concurrent clients, closed loop, one connection per request; recipients half APNs, half FCM",
             "n: requests measured (after a warm-up); the naive variants get fewer at big sizes (baseline (a) "
             "at 10,000 devices answers in seconds), so their p99 there is close to their max",
             "p99/p99@2: this variant's p99 over its own p99 with 2 devices; x service: this p99 over the "
             "service's p99 at the same size"]
    result = [
        table("POST /v1/chats/{id}/messages latency against group size (ms)",
              ["variant", "devices", "n", "errors", "req/s", "p50", "p95", "p99", "p99/p99@2", "x service"], body, notes),
        table("CPU seconds used during each measurement (2 cores: at most 2 s per wall second)",
              ["variant", "devices", "wall s", "uwsgi", "dispatcher", "fakes", "loadgen", "other", "busy cores"], cpu,
              ["uwsgi: master, workers and the baselines' threads and processes; other: the rest of the machine "
               "(other users of this shared host, and baseline processes that exited during the run)"]),
    ]
    if any(r["variant"] == "service" for r in rows):
        backlog = [[r["devices"], r["backlog_after"]["pending_jobs"], r["backlog_after"]["pending_deliveries"],
                    r["backlog_after"]["oldest_pending_age"]] for r in rows if r["variant"] == "service"]
        result.append(table("Service: outbox backlog left at the end of each measurement",
                            ["devices", "pending jobs", "pending deliveries", "oldest pending s"], backlog,
                            ["16 closed-loop clients ask for far more pushes per second than any dispatcher "
                             "could send at big sizes; the backlog is what the request did not wait for"]))
    return result
