"""A short seeded chaos run (bench/chaos.py) with real assertions, on SQLite and on PostgreSQL.

Messages stream into two chats of 200 APNs + 50 FCM devices while a dozen faults of every kind hit
(dispatcher and worker SIGKILLs, reload, stop + start, provider storms; on PostgreSQL also a
database restart and the SIGKILL of a second host). Whatever happens, nothing queued may be lost,
a push may only be sent twice right after a fault, the clients see no 5xx but 503 while the
database is down, SQLite stays intact after every fault, no process keeps a deleted database
file open, and nothing is left running. All problems of a run are reported at once.

Replay a failure with the same seed and more detail: `python -m bench.chaos --seed 20261201
--faults 12 --chats 2 --database sqlite --keep` (logs and database kept).
"""
from __future__ import annotations

import pytest

from bench.chaos import ChaosConfig, run_one
from tests.pg import TempPostgres

pytestmark = pytest.mark.timeout(330)

SEED = 20261201
FAULTS = 12  # rounds of every kind, shuffled: 12 covers each kind at least once on both databases


def short_config(database: str) -> ChaosConfig:
    """The short run: two chats, a dozen faults close together, integrity_check after each."""
    return ChaosConfig(seed=SEED, faults=FAULTS, database=database, chats=2, gap=(0.5, 1.5),
                       final_timeout=120.0, integrity_every_fault=True)


def problems_of(result: dict) -> list[str]:
    """Every broken promise of a chaos run, in words (empty when the run is clean)."""
    found = []

    def check(ok: bool, text: str) -> None:
        if not ok:
            found.append(text)

    check(result["faults"] >= 10, f"only {result['faults']} faults")
    check(len(result["faults_by_kind"]) >= 6, f"too few kinds of fault: {result['faults_by_kind']}")
    check(not result["fault_errors"], f"faults that could not be staged: {result['fault_errors']}")
    check(result["final_wait"].get("complete"), f"deliveries still outstanding at the end: {result['final_wait']}")
    check(not result["posts_abandoned"], f"POSTs that never got an answer: {result['posts_abandoned']}")
    check(result["messages_per_client_id_max"] <= 1, "a retried POST stored a second message")
    check(result["lost"] == 0, f"{result['lost']} pushes lost, e.g. {result['lost_sample'][:5]}, "
                               f"by message {result['lost_by_message']}")
    check(result["unexpected_pushes"] == 0, f"{result['unexpected_pushes']} pushes to a device outside the chat")
    check(result["duplicates_unexplained"] == 0, f"{result['duplicates_unexplained']} duplicates with no fault "
                                                  f"near them, e.g. {result['unexplained_sample'][:5]}")
    check(result["http"].get("5xx_other", 0) == 0,
          f"5xx answers other than 503 while the database was down: {result['http_5xx_unexpected_sample'][:5]}")
    check(not result["deleted_db_held_after_faults"],
          f"a process held a deleted database file after a fault: {result['deleted_db_held_after_faults'][:3]}")
    check(not result["deleted_db_held_at_end"],
          f"a process held a deleted database file at the end: {result['deleted_db_held_at_end'][:3]}")
    hooks = result["webhooks"]
    check(hooks["missing_count"] == 0, f"{hooks['missing_count']} completed fan-outs without their webhook event, "
                                       f"e.g. messages {hooks['missing'][:5]}")
    check(hooks["uncompleted_messages"] == 0, f"{hooks['uncompleted_messages']} messages whose fan-out never completed")
    check(not hooks["invented"], f"events for messages that do not exist: {hooks['invented']}")
    check(not hooks["reported_twice"], f"messages reported under two event ids: {hooks['reported_twice']}")
    check(hooks["bad_signatures"] == 0, f"{hooks['bad_signatures']} webhook requests with a bad signature")
    check(not result["leftovers"], f"processes left running after close: {result['leftovers']}")
    check(not result["cleanup_errors"], f"clean-up failed: {result['cleanup_errors']}")
    if result["database"] == "sqlite":
        check(result["integrity_checked_after_faults"] == result["faults"], "integrity_check skipped after a fault")
        check(not result["integrity_bad_after_faults"],
              f"integrity_check failed after: {result['integrity_bad_after_faults']}")
        check(result["integrity_end"] == "ok", f"integrity_check at the end: {result['integrity_end']}")
    return found


def run_and_check(database: str, workdir) -> None:
    result = run_one(short_config(database), workdir)
    summary = (f"seed {SEED} on {database}: {result['messages']} messages, {result['deliveries']} deliveries, "
               f"faults {result['faults_by_kind']}, duplicates by fault {result['duplicates_by_fault']}, "
               f"longest fault -> next message delivered {result['recovery_max_s']} s "
               f"({result['recovery_worst']}), http {result['http']}")
    print(summary)
    problems = problems_of(result)
    assert not problems, summary + "\n- " + "\n- ".join(problems)


def test_chaos_on_sqlite_loses_nothing_and_leaves_nothing_behind(tmp_path):
    run_and_check("sqlite", tmp_path / "sqlite")


def test_chaos_on_postgresql_with_two_hosts_loses_nothing_and_leaves_nothing_behind(tmp_path):
    reason = TempPostgres.unavailable_reason()
    if reason:
        pytest.skip(reason)
    run_and_check("postgresql", tmp_path / "postgresql")
