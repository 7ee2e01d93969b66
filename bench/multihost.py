"""5. Several hosts on one PostgreSQL: POST latency and fan-out on PostgreSQL, and one vs two dispatchers.

PostgreSQL is TEST_DATABASE_URL's server (default postgresql://postgres@127.0.0.1:5432/test); each part
creates its own database there and drops it afterwards. Where none is reachable the benchmark says
why and measures nothing.

- POST latency against group size: bench.latency's service measurement, with DATABASE_URL on
  PostgreSQL (the SQLite numbers are the latency benchmark's, in the same `make bench` run).
- Fan-out of one message to 10,000 devices (all APNs, then half APNs half FCM) with one "host"
  (a uWSGI instance with its own PUSH_HOST_ID, so its own dispatcher), then with a second host on
  the same database, alternately: one, two, one, two, so both see the same share of this shared
  machine. Deliveries/s, first push, and how the pushes were split between the hosts (`handled_by`).

Both "hosts" run on this one 2-core machine against the same fakes: a second dispatcher adds a
second event loop and a second set of claims and records in flight, not a second machine's cores.
"""
from __future__ import annotations

import sqlalchemy as sa

from bench import fanout, latency
from bench.common import percentile, table
from bench.env import BenchEnv, delivery_states, wait_drained
from bench.procs import CpuMeter
from notifier import schema
from tests.harness import wait_until
from tests.pg import PG_URL, temporary_database, unreachable_reason

NAME = "multihost"
SIZES, QUICK_SIZES = (2, 100, 1_000, 10_000), (2, 100)
ROUNDS, PER_ROUND, WARMUP = 2, 160, 32
DEVICES, QUICK_DEVICES = 10_000, 500
# scenario -> alternations of (one host, two hosts); mixed is slower (FCM on a thread pool)
ALTERNATIONS = {"apns": 2, "mixed": 1}


def run(env: BenchEnv, quick: bool = False) -> dict:
    reason = unreachable_reason(PG_URL)
    if reason:
        print(f"  skipped: {reason}", flush=True)
        return {"name": NAME, "skipped": reason, "targets": {},
                "tables": [table("Several hosts on PostgreSQL", ["skipped"], [[reason]])]}
    sizes = QUICK_SIZES if quick else SIZES
    with temporary_database(PG_URL) as url:
        rows = latency.measure_service(env, sizes, per_round=48 if quick else PER_ROUND,
                                       rounds=1 if quick else ROUNDS, warmup=8 if quick else WARMUP,
                                       database_url=url)
    for row in rows:
        print(f"  PostgreSQL {row['devices']:>6} devices: p50 {row['p50']} ms, p99 {row['p99']} ms, "
              f"{row['rps']} req/s", flush=True)
    with temporary_database(PG_URL) as url:
        fan = fan_out(env, url, QUICK_DEVICES if quick else DEVICES, {"apns": 1} if quick else ALTERNATIONS)
    results = {"postgres": PG_URL.rpartition("/")[0] + "/<temporary database>", "latency": rows, "fanout": fan}
    return {"name": NAME, **results, "targets": targets(results), "tables": tables(results)}


def fan_out(env: BenchEnv, url: str, devices: int, alternations: dict) -> dict:
    """One message at a time to `devices` devices, with host A's dispatcher alone, then with host B's too."""
    host_env = {"PUSH_HOST_ID": "host-a"}
    a = env.server("host-a", env=host_env, database_url=url)
    b = None
    runs: dict = {scenario: {"one": [], "two": []} for scenario in alternations}
    try:
        chats = {"apns": env.chat(a, apns=devices, fcm=0),
                 "mixed": env.chat(a, apns=devices // 2, fcm=devices - devices // 2)}
        small = env.chat(a, apns=1, fcm=1)
        _warm(a, small, hosts=1)
        for scenario, count in alternations.items():
            for _ in range(count):
                if b is not None:  # one: host B (and so its dispatcher) gone
                    env.stop_server(b)
                    b = None
                    wait_until(lambda: len(a.dispatcher_pids()) == 1, 15, message="host B's dispatcher gone")
                runs[scenario]["one"].append(_one_message(env, a, chats[scenario], scenario))
                b = env.server("host-b", env={"PUSH_HOST_ID": "host-b"}, database_url=url, reset_marks=False)
                _warm(b, small, hosts=2, watch=a)
                runs[scenario]["two"].append(_one_message(env, a, chats[scenario], scenario))
                print(f"  {scenario}: one host {runs[scenario]['one'][-1]['rate']}/s, two hosts "
                      f"{runs[scenario]['two'][-1]['rate']}/s (split {runs[scenario]['two'][-1]['by_host']})",
                      flush=True)
    finally:
        if b is not None:
            env.stop_server(b)
        env.stop_server(a)
    return {"devices": devices, "runs": runs}


def _warm(server, small, hosts: int, watch=None) -> None:
    """Start the host's dispatcher (a POST to it) and let it open its connections; wait until
    `hosts` dispatchers are alive on the database and nothing is pending."""
    watch = watch or server
    for i in range(3):
        fanout.post(server, small, f"warm-up {i}")
    wait_until(lambda: len(watch.dispatcher_pids()) == hosts, 15, message=f"{hosts} dispatcher(s)")
    wait_drained(watch, 30)


def _one_message(env: BenchEnv, server, chat, scenario: str) -> dict:
    fakes = [env.apns] if scenario == "apns" else [env.apns, env.fcm]
    pids = server.dispatcher_pids()
    meter = CpuMeter({"dispatchers": lambda: pids, "fakes": lambda: [env.apns.pid, env.fcm.pid]})
    meter.start()
    posted, message_id = fanout.post(server, chat, f"fan-out {scenario}")
    marks = fanout.wait_pushed(env, server, message_id, chat.devices, fakes, timeout=120)
    cpu = meter.stop()
    wait_drained(server, 30)
    last = marks["last"] - posted if marks["last"] else None
    return {"message_id": message_id, "dispatchers": len(pids), "pushed": marks["count"],
            "states": delivery_states(server, [message_id]),
            "post_to_first_ms": round((marks["first"] - posted) * 1000, 1) if marks["first"] else None,
            "post_to_last_s": round(last, 3) if last else None,
            "rate": round(marks["count"] / last) if last else None,
            "by_host": _sent_by_host(server, message_id), "cpu_s": cpu}


def _sent_by_host(server, message_id: int) -> dict:
    with server.engine.connect() as conn:
        rows = conn.execute(sa.select(schema.deliveries.c.handled_by, sa.func.count())
                            .where(schema.deliveries.c.message_id == message_id,
                                   schema.deliveries.c.state == "sent")
                            .group_by(schema.deliveries.c.handled_by)).all()
    return dict(sorted(rows))


def _rate(rows) -> float | None:
    return percentile([r["rate"] for r in rows if r["rate"]], 50)


def targets(results) -> dict:
    """Nothing is promised for two dispatchers on one machine; the ratio is reported, not judged."""
    return {}


def tables(results) -> list:
    rows = results["latency"]
    base = next((r["p99"] for r in rows if r["devices"] == min(x["devices"] for x in rows)), None)
    lat = [[r["devices"], r["requests"], r["errors"], r["rps"], r["p50"], r["p95"], r["p99"],
            round(r["p99"] / base, 2) if base and r["p99"] else None] for r in rows]
    fan = results["fanout"]
    body = []
    for scenario, by_count in fan["runs"].items():
        one = _rate(by_count["one"])
        for label, runs in (("one host", by_count["one"]), ("two hosts", by_count["two"])):
            rate = _rate(runs)
            split = {}
            for r in runs:
                for host, n in r["by_host"].items():
                    split[host] = split.get(host, 0) + n
            total = sum(split.values()) or 1
            pushes = sum(r["pushed"] for r in runs) or 1
            body.append([scenario, label, len(runs), rate, round(rate / one, 2) if rate and one else None,
                         percentile([r["post_to_first_ms"] for r in runs if r["post_to_first_ms"] is not None], 50),
                         percentile([r["post_to_last_s"] for r in runs if r["post_to_last_s"] is not None], 50),
                         " / ".join(f"{host} {n * 100 // total}%" for host, n in split.items()),
                         round(sum(r["cpu_s"]["dispatchers"] for r in runs) * 1e6 / pushes)])
    return [
        table("POST latency against group size on PostgreSQL (ms)",
              ["devices", "n", "errors", "req/s", "p50", "p95", "p99", "p99/p99@2"], lat,
              [f"{latency.CLIENTS} concurrent clients, closed loop; same measurement as the latency benchmark "
               "(whose rows are SQLite), DATABASE_URL on the local PostgreSQL"]),
        table(f"Fan-out of one message to {fan['devices']:,} devices on PostgreSQL: one dispatcher vs two",
              ["recipients", "dispatchers", "runs", "deliveries/s", "x one", "first ms", "last s", "sent by",
               "us/push"], body,
              ["one and two alternate (one, two, one, two): each pair sees the same machine; both hosts share "
               "this machine's 2 cores and the same fakes",
               "deliveries/s = pushes accepted by the fakes / (last push - POST), median over the runs; "
               "us/push: CPU microseconds per push of the dispatcher(s)"]),
    ]

