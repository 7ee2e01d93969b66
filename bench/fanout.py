"""2. Fan-out throughput: one message to 10,000 APNs devices, to 10,000 FCM devices, mixed, and to
10,000 Web Push subscriptions.

The service under uWSGI with a warm dispatcher (it has sent a few messages already: connections
open, APNs stream limit raised, OAuth token fetched). For each message: POST time at the client,
first and last accepted push at the fake (the fakes mark each message id), deliveries/s, provider
connections opened during the run (the fakes count them). Beside it, the ceiling: lean clients
(bench.ceiling) sending the same requests to the same fakes with the same concurrency.

Web Push is warmed right before its message, with a message to WEBPUSH_WARM subscriptions: aiohttp
closes a connection idle for 15 s, and the other scenarios take longer than that, so a warm-up at
the start would leave the Web Push message to open its 100 connections again (a dispatcher under
steady traffic has them open). Each push is encrypted for its subscription (RFC 8291: one ECDH per
subscription per message, the protocol's floor), so the Web Push rows come with a second table:
the encryption's CPU per push alone, and the fake's own ceiling (pre-encrypted pushes from the lean
client), to show the fake is not what bounds the row.
"""
from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor

from bench import ceiling
from bench.common import percentile, table
from bench.env import BenchEnv, delivery_states, dispatcher_pid, wait_drained
from bench.loadgen import post_bytes, request
from bench.procs import CpuMeter
from notifier.config import Settings
from notifier.process import DISPATCHER_NICE, lower_priority
from tests.e2e import apns_token

NAME = "fanout"
DEVICES = 10_000
QUICK_DEVICES = 500
APNS_RUNS = 3        # messages per scenario (first-push p50 is over all of them)
OTHER_RUNS = 1
SMALL_MESSAGES = 20  # extra messages to a 2-device chat, for the first-push latency of a small chat
APNS_CONNECTIONS, APNS_STREAMS = 4, 250
WEBPUSH_WARM = 200           # subscriptions of the Web Push warm-up message: >= 100, so every connection opens
ENCRYPTION_SAMPLE = 2_000    # subscriptions the encryption alone is timed over
PLATFORMS = ("apns", "fcm", "webpush")


def post(server, chat, text: str) -> tuple[float, int]:
    answer = request("127.0.0.1", server.port, post_bytes("127.0.0.1", server.port, chat.path, chat.token,
                                                          {"text": text}))
    if answer.status != 201:
        raise RuntimeError(f"POST answered {answer.status}: {answer.body[:200]!r}")
    import json
    return answer.started, json.loads(answer.body)["id"]


def wait_pushed(env: BenchEnv, server, message_id: int, expected: int, platforms, timeout: float) -> dict:
    """Wait until the fakes accepted `expected` pushes of the message (or the outbox is done with it)."""
    deadline = time.monotonic() + timeout
    while True:
        marks = [fake.stats()["marks"].get(str(message_id)) for fake in platforms]
        count = sum(m[2] for m in marks if m)
        if count >= expected:
            break
        if time.monotonic() > deadline:
            break
        if count and time.monotonic() > deadline - timeout / 2:
            states = delivery_states(server, [message_id])
            if not states.get("pending"):
                break  # some failed: do not wait for pushes that will never come
        time.sleep(0.05)
    present = [m for m in marks if m]
    return {"count": count, "first": min((m[0] for m in present), default=None),
            "last": max((m[1] for m in present), default=None)}


def one_message(env, server, chat, platforms, label: str, pid: int, timeout: float) -> dict:
    meter = CpuMeter({"dispatcher": lambda: [pid], "fakes": lambda: [fake.pid for fake in env.fakes]})
    meter.start()
    posted, message_id = post(server, chat, f"fan-out {label}")
    marks = wait_pushed(env, server, message_id, chat.devices, platforms, timeout)
    cpu = meter.stop()
    states = delivery_states(server, [message_id])
    first = (marks["first"] - posted) * 1000 if marks["first"] else None
    last = (marks["last"] - posted) if marks["last"] else None
    return {"message_id": message_id, "devices": chat.devices, "pushed": marks["count"], "states": states,
            "post_to_first_ms": round(first, 1) if first is not None else None,
            "post_to_last_s": round(last, 3) if last is not None else None,
            "rate": round(marks["count"] / last, 0) if last else None,
            "steady_rate": round(marks["count"] / (marks["last"] - marks["first"]), 0)
            if marks["first"] and marks["last"] and marks["last"] > marks["first"] else None,
            "cpu_s": cpu}


def run(env: BenchEnv, quick: bool = False) -> dict:
    devices = QUICK_DEVICES if quick else DEVICES
    ceilings = Ceilings(env, devices)
    server = env.server("fanout", webpush=True)
    try:
        chats = {
            "apns": env.chat(server, apns=devices, fcm=0),
            "fcm": env.chat(server, apns=0, fcm=devices),
            "mixed": env.chat(server, apns=devices // 2, fcm=devices - devices // 2),
            "webpush": env.chat(server, webpush=devices),
        }
        webpush_warm = env.chat(server, webpush=WEBPUSH_WARM)
        small = env.chat(server, apns=1, fcm=1)
        # warm-up: the dispatcher starts, opens its connections, raises the stream limit, gets a token
        start = _connections(env)
        for i in range(3):
            post(server, small, f"warm-up {i}")
        pid = dispatcher_pid(server)
        wait_drained(server, 30)
        warm = _connections(env, start)
        ceilings.warm_up()
        results: dict = {"scenarios": {}, "small": None, "ceiling": {}}
        fakes = {"apns": [env.apns], "fcm": [env.fcm], "mixed": [env.apns, env.fcm], "webpush": [env.webpush]}
        for scenario, chat in chats.items():
            runs = APNS_RUNS if scenario == "apns" else OTHER_RUNS
            opened = {platform: 0 for platform in PLATFORMS}
            rows, ceiling_rows = [], []
            for i in range(1 if quick else runs):
                if scenario == "webpush":  # see the module docstring: its connections, opened just before
                    before = _connections(env)
                    warm_id = post(server, webpush_warm, f"warm-up webpush {i}")[1]
                    wait_pushed(env, server, warm_id, webpush_warm.devices, [env.webpush], 30)
                    wait_drained(server, 30)
                    for platform, count in _connections(env, before).items():
                        warm[platform] += count  # counted with the warm-up's in the run's total
                before = _connections(env)
                rows.append(one_message(env, server, chat, fakes[scenario], f"{scenario} {i}", pid,
                                        timeout=30 if scenario == "apns" else 120))
                wait_drained(server, 30)
                for platform, count in _connections(env, before).items():
                    opened[platform] += count
                # the ceiling right after, so both see the same share of this shared machine
                ceiling_rows.append(ceilings.run(scenario))
            results["scenarios"][scenario] = {"runs": rows, "connections_opened": opened}
            results["ceiling"][scenario] = _median_run(ceiling_rows)
            print(f"  {scenario}: " + ", ".join(f"{r['rate']}/s first {r['post_to_first_ms']} ms" for r in rows)
                  + "; ceiling " + ", ".join(f"{c['rate']:.0f}/s" for c in ceiling_rows), flush=True)
            if scenario == "webpush":  # while the machine is as it was for the Web Push rows
                results["webpush"] = ceilings.webpush_costs()
                print(f"  webpush: encryption {results['webpush']['encryption']['encode_us']} us/push; the fake "
                      f"alone {results['webpush']['fake_alone']['rate']:.0f}/s", flush=True)
        firsts = []
        for i in range(5 if quick else SMALL_MESSAGES):
            posted, message_id = post(server, small, f"small {i}")
            marks = wait_pushed(env, server, message_id, small.devices, [env.apns, env.fcm], 10)
            if marks["first"]:
                firsts.append((marks["first"] - posted) * 1000)
            time.sleep(0.05)
        results["small"] = {"messages": len(firsts), "post_to_first_ms": [round(f, 1) for f in firsts]}
        results["dispatcher_pid"] = pid
        results["connections_opened_at_warm_up"] = warm
        results["dispatcher_connections_total"] = {
            p: warm[p] + sum(d["connections_opened"][p] for d in results["scenarios"].values()) for p in warm}
    finally:
        ceilings.close()
        env.stop_server(server)
    return {"name": NAME, **results, "targets": targets(results), "tables": tables(results, devices)}


def _connections(env: BenchEnv, since: dict | None = None) -> dict:
    """Connections each fake has seen opened (minus `since`)."""
    now = {p: getattr(env, p).stats()["connections_opened"] for p in PLATFORMS}
    return {p: now[p] - (since or {}).get(p, 0) for p in now}


def _median_run(rows: list[dict]) -> dict:
    ordered = sorted(rows, key=lambda r: r["rate"])
    return {**ordered[len(ordered) // 2], "runs": len(rows), "rates": [round(r["rate"]) for r in rows]}


def _at_dispatcher_priority() -> None:
    """The ceiling's child: its own session (so its own scheduler autogroup), at the dispatcher's
    priority, exactly as notifier.process puts the PushProcess."""
    os.setsid()
    lower_priority(DISPATCHER_NICE)


_PREPARED: dict = {}  # scenario -> (APNs requests, FCM bodies), set before the ceiling's child forks


def _ceiling_in_child(scenario: str, apns_args: dict, fcm_args: dict) -> dict:
    if scenario == "warm-up":
        return ceiling.apns_ceiling(_PREPARED["apns"][0][:2000], **apns_args)
    if scenario == "webpush":
        return ceiling.webpush_ceiling(**_PREPARED["webpush"])
    if scenario == "webpush-costs":
        return _webpush_costs_in_child()
    apns_reqs, fcm_bodies = _PREPARED[scenario]
    if scenario == "apns":
        return ceiling.apns_ceiling(apns_reqs, **apns_args)
    if scenario == "fcm":
        return ceiling.fcm_ceiling(fcm_bodies, **fcm_args)
    return ceiling.mixed_ceiling(apns_reqs, fcm_bodies, apns_args, fcm_args)


def _webpush_costs_in_child() -> dict:
    """The encryption alone over ENCRYPTION_SAMPLE subscriptions, then the fake alone: as many pushes
    as the Web Push row, encrypted before the clock (those same bodies, cycling)."""
    prepared = _PREPARED["webpush"]
    sample = prepared["subscriptions"][:ENCRYPTION_SAMPLE]
    encryption = ceiling.webpush_encryption_cost(sample, prepared["payload"])
    bodies = encryption.pop("bodies")
    alone = ceiling.webpush_fake_ceiling(sample, bodies, prepared["headers"], prepared["ca_file"],
                                         requests=len(prepared["subscriptions"]), fake_pid=prepared["fake_pid"])
    return {"encryption": encryption, "fake_alone": alone}


class Ceilings:
    """The lean clients of bench.ceiling, run in a child process at the dispatcher's CPU priority
    (notifier.process.DISPATCHER_NICE), against the same fakes."""

    def __init__(self, env: BenchEnv, devices: int):
        a, f, w = env.apns.info, env.fcm.info, env.webpush.info
        self.env = env
        self.apns_args = {"host": a["host"], "port": a["port"], "ca_file": env.ca_file,
                          "connections": APNS_CONNECTIONS, "streams": APNS_STREAMS}
        self.fcm_args = {"send_url": f["send_url"], "ca_file": env.ca_file,
                         "connections": Settings().push_fcm_connections}
        apns_tokens = [apns_token(90_000_000 + i) for i in range(devices)]
        fcm_tokens = [f"fcm-ceiling-{i}" for i in range(devices)]
        half = devices // 2
        self.requests = {
            "apns": (self._apns(apns_tokens), None),
            "fcm": (None, ceiling.fcm_requests(fcm_tokens)),
            "mixed": (self._apns(apns_tokens[:half]), ceiling.fcm_requests(fcm_tokens[:devices - half])),
        }
        # Web Push: subscriptions of its own (the same fake's browsers, not the service's), the payload
        # and headers of one message, one VAPID JWT for the fake's origin
        payload, headers = ceiling.webpush_message(ceiling.webpush_authorization(w["key_file"], w["subject"],
                                                                                 w["origin"]))
        self.requests["webpush"] = {"subscriptions": env.webpush.subscribe(devices), "payload": payload,
                                    "headers": headers, "ca_file": env.ca_file,
                                    "connections": ceiling.WEBPUSH_CONNECTIONS, "fake_pid": env.webpush.pid}
        self.pool = None

    def _apns(self, tokens):
        a = self.env.apns.info
        return ceiling.apns_requests(tokens, a["key_file"], a["key_id"], a["team_id"], a["topic"], a["host"])

    def warm_up(self) -> None:
        self.fcm_args["access_token"] = ceiling.fcm_access_token(self.env.fcm.info["account_file"], self.env.ca_file)
        _PREPARED.clear()
        _PREPARED.update(self.requests)  # the forked child finds them here: nothing big is pickled
        self.pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"),
                                        initializer=_at_dispatcher_priority)
        self.pool.submit(_ceiling_in_child, "warm-up", self.apns_args, self.fcm_args).result()

    def run(self, scenario: str) -> dict:
        meter = CpuMeter({"fakes": lambda: [fake.pid for fake in self.env.fakes]})
        meter.start()
        out = self.pool.submit(_ceiling_in_child, scenario, self.apns_args, self.fcm_args).result()
        out["cpu_s"] = meter.stop()
        return out

    def webpush_costs(self) -> dict:
        """Encryption alone, and the fake alone with its CPU per push (read from /proc by the child,
        around its clock)."""
        return self.pool.submit(_ceiling_in_child, "webpush-costs", self.apns_args, self.fcm_args).result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


# issue 10: each sender's rate at least this share of the lean client's, in the same run, with at
# most CPU_TIMES its CPU per push (Web Push has no such target: its floor is the encryption)
RATE_TARGETS = {"apns": 0.6, "fcm": 0.5, "mixed": 0.5}
CPU_TIMES = 5


def _service_rate(runs: list[dict]) -> float:
    rates = [r["rate"] for r in runs if r["rate"]]
    return percentile(rates, 50) if rates else 0


def _service_cpu_us(runs: list[dict]) -> float:
    return sum(r["cpu_s"]["dispatcher"] for r in runs) * 1e6 / max(1, sum(r["pushed"] for r in runs))


def targets(results) -> dict:
    out = {}
    for scenario, share in RATE_TARGETS.items():
        data = results["scenarios"].get(scenario)
        if not data:
            continue
        ceiling_row = results["ceiling"][scenario]
        ratio = _service_rate(data["runs"]) / ceiling_row["rate"]
        out[f"{scenario}_rate_vs_ceiling"] = {"value": round(ratio, 2), "target": f">= {share}",
                                              "met": ratio >= share}
        times = _service_cpu_us(data["runs"]) / (ceiling_row["client_cpu_s"] * 1e6 / ceiling_row["requests"])
        out[f"{scenario}_cpu_per_push_vs_ceiling"] = {"value": round(times, 2), "target": f"<= {CPU_TIMES}",
                                                      "met": times <= CPU_TIMES}
    if results["scenarios"].get("apns"):
        opened = results["dispatcher_connections_total"]["apns"]
        out["apns_connections"] = {"value": opened, "target": "<= 4", "met": opened <= 4}
    firsts = [r["post_to_first_ms"] for s in results["scenarios"].values() for r in s["runs"]
              if r["post_to_first_ms"] is not None]
    if firsts:
        p50 = percentile(firsts, 50)
        out["first_push_p50_ms_big_fan_outs"] = {"value": round(p50, 1), "target": "<= 50", "met": p50 <= 50}
    small = results["small"]["post_to_first_ms"] if results.get("small") else []
    if small:
        p50 = percentile(small, 50)
        out["first_push_p50_ms_small_chat"] = {"value": round(p50, 1), "target": "<= 50", "met": p50 <= 50}
    return out


def tables(results, devices: int) -> list:
    rows = []
    for scenario, data in results["scenarios"].items():
        runs = data["runs"]
        ceil = results["ceiling"][scenario]["rate"]
        rate = _service_rate(runs)
        rows.append([f"service: {scenario}", len(runs), devices, rate,
                     percentile([r["steady_rate"] for r in runs if r["steady_rate"]], 50),
                     percentile([r["post_to_first_ms"] for r in runs if r["post_to_first_ms"] is not None], 50),
                     percentile([r["post_to_last_s"] for r in runs if r["post_to_last_s"] is not None], 50),
                     *(data["connections_opened"].get(p, 0) for p in PLATFORMS),
                     round(rate / ceil, 2) if rate and ceil else None,
                     round(_service_cpu_us(runs))])
    for scenario, value in results["ceiling"].items():
        conns = {p: 0 for p in PLATFORMS}
        if scenario == "mixed":
            conns.update(apns=value["apns"]["connections"], fcm=value["fcm"]["connections"])
        else:
            conns[scenario] = value.get("connections")
        rows.append([f"ceiling: {scenario}", value["runs"], value["requests"], round(value["rate"]), None,
                     round(value.get("first_ms") or 0, 1) if scenario != "mixed" else None, round(value["seconds"], 3),
                     *(conns[p] for p in PLATFORMS), 1.0, round(value["client_cpu_s"] * 1e6 / value["requests"])])
    notes = ["deliveries/s = pushes accepted by the fake / (last push - POST); steady = between the first and last "
             "push; p50 over the runs; each ceiling run follows a service run (median shown)",
             f"ceiling: APNs {APNS_CONNECTIONS} connections x {APNS_STREAMS} streams of raw h2; FCM "
             f"{Settings().push_fcm_connections} connections x 100 streams of raw h2 (the dispatcher: notifier.providers.h2client on as many); "
             f"Web Push: one aiohttp session, {ceiling.WEBPUSH_CONNECTIONS} keep-alive HTTP/1.1 connections (the "
             "provider's limit per push service; opened before the clock) and as many workers, each push encrypted "
             "inside the clock (WebPusher.encode), one VAPID JWT; "
             "same requests, same fakes, requests "
             f"built before the clock starts, run at the dispatcher's CPU priority (nice {DISPATCHER_NICE})",
             "conns: connections the fakes saw opened during the scenario, the warm dispatcher's already open ("
             f"over the whole run, warm-up included, the dispatcher opened {results['dispatcher_connections_total']} "
             "connections; FCM's include the OAuth token endpoint); "
             "us/push: CPU microseconds per push of the dispatcher (service) or of the client (ceiling); "
             f"Web Push was warmed by a {WEBPUSH_WARM}-subscription message just before its own"]
    small = results.get("small") or {}
    firsts = small.get("post_to_first_ms") or []
    t = [table(f"Fan-out of one message to {devices:,} devices",
               ["sender", "runs", "pushes", "deliveries/s", "steady/s", "first ms", "last s", "APNs conns",
                "FCM conns", "WP conns", "x ceiling", "us/push"], rows, notes)]
    if results.get("webpush"):
        t.append(_webpush_table(results, devices))
    if firsts:
        t.append(table("POST -> first push at the fake, warm dispatcher (ms)",
                       ["chat", "messages", "p50", "p95", "max"],
                       [[f"{devices:,} devices", sum(len(s['runs']) for s in results['scenarios'].values()),
                         percentile([r["post_to_first_ms"] for s in results["scenarios"].values() for r in s["runs"]
                                     if r["post_to_first_ms"] is not None], 50), None, None],
                        ["2 devices", len(firsts), percentile(firsts, 50), percentile(firsts, 95), max(firsts)]]))
    return t


def _webpush_table(results, devices: int) -> dict:
    """What one Web Push costs: the encryption alone, the fake alone, beside the rows above."""
    costs = results["webpush"]
    enc, alone = costs["encryption"], costs["fake_alone"]
    service = results["scenarios"]["webpush"]["runs"]
    pushed = max(1, sum(r["pushed"] for r in service))
    service_fake = sum(r["cpu_s"]["fakes"] for r in service)
    service_s = sum(r["post_to_last_s"] or 0 for r in service)
    lean = results["ceiling"]["webpush"]

    def cores(cpu_s, seconds):
        return round(cpu_s / seconds, 2) if seconds else None

    rows = [
        ["encryption alone: WebPusher(sub).encode(payload)", enc["subscriptions"], None, enc["encode_us"], None, None],
        ["  of which a fresh P-256 key + one ECDH (the floor)", enc["subscriptions"], None, enc["ecdh_us"], None, None],
        ["the fake alone: pre-encrypted pushes, lean client", alone["requests"], round(alone["rate"]),
         round(alone["client_cpu_s"] * 1e6 / alone["requests"]), round(alone["fake_cpu_s"] * 1e6 / alone["requests"]),
         cores(alone["fake_cpu_s"], alone["seconds"])],
        ["the fake during the service's Web Push row", pushed, percentile([r["rate"] for r in service if r["rate"]], 50),
         None, round(service_fake * 1e6 / pushed), cores(service_fake, service_s)],
        ["the fake during the lean client's Web Push row", lean["requests"], round(lean["rate"]), None,
         round(lean["fake_cpu_s"] * 1e6 / lean["requests"]), cores(lean["fake_cpu_s"], lean["seconds"])],
    ]
    notes = [f"CPU per push (process time); the encryption in a loop without I/O, {enc['plaintext_bytes']} bytes of "
             f"plaintext -> {enc['body_bytes']} bytes of aes128gcm body; the fake's CPU from /proc (it also judges "
             "VAPID and TTL, decrypts with one ECDH, and answers over TLS); fake cores: its CPU seconds per wall "
             "second (its loop is one thread: near 1.0, the fake is the limit)",
             "the fake alone: the lean client with bodies encrypted before the clock, so the client's encryption is "
             "out of the way and the fake (or, with fake cores well under 1.0, the rest of the machine) is the limit: "
             "it has to stay above the service's and the lean client's rates",
             f"the fake's answers: lean client {lean['statuses']}, the fake alone {alone['statuses']}"]
    return table(f"Web Push: the encryption and the fake, per push ({devices:,} pushes per row)",
                 ["what", "pushes", "per s", "client us/push", "fake us/push", "fake cores"], rows, notes)
