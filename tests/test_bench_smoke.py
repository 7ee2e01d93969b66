"""The benchmark code runs (bench/, `make bench`): one benchmark function at tiny sizes.

Nothing about speed is asserted: this only proves the harness (fakes in their own processes,
uWSGI, load generator, tables) works, so `make bench` does not rot unnoticed.
"""
from __future__ import annotations

import pytest

from bench.common import render
from bench.env import BenchEnv
from bench.fanout import post, wait_pushed
from bench.latency import measure_service, tables

pytestmark = pytest.mark.timeout(120)


def test_latency_benchmark_runs_at_tiny_sizes(tmp_path):
    with BenchEnv(tmp_path / "bench") as env:
        rows = measure_service(env, sizes=(2, 4), per_round=8, rounds=1, warmup=2)
    assert [row["devices"] for row in rows] == [2, 4]
    assert all(row["ok"] == 8 and row["errors"] == 0 for row in rows)
    text = "\n".join(render(t) for t in tables(rows))
    assert "POST /v1/chats/{id}/messages latency" in text


def test_fakes_mark_the_pushes_of_a_message(tmp_path):
    with BenchEnv(tmp_path / "bench") as env:
        server = env.server("smoke")
        try:
            chat = env.chat(server, apns=3, fcm=2)
            _, message_id = post(server, chat, "smoke")
            marks = wait_pushed(env, server, message_id, 5, [env.apns, env.fcm], timeout=30)
        finally:
            env.stop_server(server)
    assert marks["count"] == 5
    assert marks["first"] <= marks["last"]


def test_multihost_fan_out_runs_with_one_and_two_hosts(tmp_path):
    from bench.multihost import fan_out
    from tests.pg import require_postgres, temporary_database

    require_postgres()
    with temporary_database() as url, BenchEnv(tmp_path / "bench") as env:
        result = fan_out(env, url, devices=6, alternations={"apns": 1})
    one, = result["runs"]["apns"]["one"]
    two, = result["runs"]["apns"]["two"]
    assert (one["dispatchers"], two["dispatchers"]) == (1, 2)
    assert one["pushed"] == two["pushed"] == 6
    assert one["by_host"] == {"host-a": 6} and sum(two["by_host"].values()) == 6
