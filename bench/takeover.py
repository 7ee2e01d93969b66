"""`python -m bench.takeover [--rounds N] [--database sqlite|postgresql|both]`: crash recovery time.

A 2,000-device fan-out (1,500 APNs + 500 FCM) whose dispatcher is SIGKILLed after 200 pushes, with
the next message posted right after the kill, under the real uWSGI against the protocol fakes.
Measured from the kill: the dead dispatcher's leases released, the first message complete, the
second complete; and the duplicates (pushes accepted twice). Prints a table, saves
bench/results/takeover.json. Asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

from bench.common import fmt, machine_info, print_tables, save, table
from notifier import schema
from tests.e2e import add_bulk_member, apns_token, make_chat, post_message, running_fakes, wait_complete
from tests.harness import UwsgiServer, wait_until
from tests.pg import temporary_database, unreachable_reason

LEASE = 60  # the default: what a takeover that waited for the lease would cost


def one_round(workdir: Path, database_url: str | None) -> dict:
    """One kill mid fan-out; the seconds from the kill to each milestone."""
    with running_fakes(workdir / "fakes") as fakes:
        server = UwsgiServer(workdir / "server", database_url=database_url,
                             env={**fakes.env, "PUSH_LEASE": str(LEASE), "PUSH_IDLE_EXIT": "30"})
        try:
            server.start()
            fakes.apns.delay = fakes.fcm.delay = 0.005  # a fan-out of a few seconds, to be killed mid-way
            chat = make_chat(server, {"bob": [("apns", apns_token(1))]})
            tokens = add_bulk_member(server, chat, apns_devices=1500, fcm_devices=499, start=100)
            first = post_message(server, chat, "first")
            fakes.apns.wait_for(200, timeout=60)
            [pid] = wait_until(server.dispatcher_pids, 10, message="the dispatcher")
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            second = post_message(server, chat, "second")
            owner = f"%:{pid}:%"

            def leases():
                with server.engine.connect() as conn:
                    return conn.execute(sa.select(sa.func.count()).select_from(schema.deliveries).where(
                        schema.deliveries.c.state == "pending", schema.deliveries.c.lease_owner.like(owner))
                    ).scalar_one()

            wait_until(lambda: leases() == 0, 120, interval=0.02, message="the leases to be taken over")
            released = time.monotonic() - killed
            done = {}
            for message in (first, second):
                wait_complete(server, chat, message, 180)
                done[message] = time.monotonic() - killed
            accepted = sum(fakes.apns.sent_tokens().values()) + sum(fakes.fcm.sent_tokens().values())
            return {"leases_released_s": round(released, 2), "first_complete_s": round(done[first], 2),
                    "second_complete_s": round(done[second], 2),
                    "duplicates": accepted - 2 * (len(tokens) + 1)}
        finally:
            server.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.takeover", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--database", choices=("sqlite", "postgresql", "both"), default="both")
    args = parser.parse_args(argv)
    machine = machine_info()
    rows, raw = [], {}
    for kind in ("sqlite", "postgresql") if args.database == "both" else (args.database,):
        if kind == "postgresql" and unreachable_reason():
            print(f"postgresql skipped: {unreachable_reason()}")
            continue
        rounds = []
        for n in range(args.rounds):
            with tempfile.TemporaryDirectory(prefix="bench-takeover-") as scratch:
                if kind == "sqlite":
                    rounds.append(one_round(Path(scratch), None))
                else:
                    with temporary_database() as url:
                        rounds.append(one_round(Path(scratch), url))
            print(f"{kind} round {n + 1}: {rounds[-1]}", flush=True)
        raw[kind] = rounds
        for key in ("leases_released_s", "first_complete_s", "second_complete_s", "duplicates"):
            values = [r[key] for r in rounds]
            rows.append([kind, key, fmt(statistics.median(values)), fmt(min(values)), fmt(max(values))])
    result = {"machine": machine, "lease_s": LEASE, "rounds": raw, "tables": [table(
        "SIGKILL of the dispatcher mid 2,000-device fan-out, next message posted at once (s from the kill)",
        ["database", "measure", "median", "min", "max"], rows,
        [f"PUSH_LEASE={LEASE} s: a takeover that waited for the lease would take at least that long"])]}
    print_tables(result)
    save("takeover", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
