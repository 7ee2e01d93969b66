"""Fuzzing from the contract: schemathesis against the real service under uWSGI.

The service runs with the project's uwsgi.ini (tests.harness.UwsgiServer); schemathesis loads its
/openapi.json and sends about FUZZ_EXAMPLES generated requests (default 1,000; `make fuzz` asks
for 10,000) with every check it has enabled. The test asserts that no answer is a 5xx, that every
check passes (every answer is one the document describes, valid data is accepted, invalid data
rejected, authentication enforced, ...) and that the requests were really made: a run that
silently generated nothing fails.

Two parts, both deterministic (a fixed seed, no example database):

1. schemathesis' coverage phase, through its CLI (`st run --phases examples,coverage`, a JSON
   report parsed here): a fixed set of about 500 requests at the schema's edges (boundary
   lengths and ids, each constraint broken in turn, missing required parts, methods the
   document does not list). The checks that only apply there run here: `missing_required_header`,
   `unsupported_method` (405 with `Allow`). It runs as a user of its own, over a chat, a message
   and a device of its own, before the second part's world exists: what it deletes is its own.
2. The rest of the budget through the Python API: one Hypothesis test (`schema.as_strategy()`
   per operation) that sends, for every operation, schema-valid requests, schema-invalid ones,
   and valid ones whose path ids are resources seeded over HTTP (alice's chat with bob and its
   message, carol's chat and message, alice's and bob's devices), so the member-only routes
   answer more than 404. Each target is sent once first, then drawn at random. The requests
   carry alice's token (the document's `bearerAuth`, so `ignored_auth` also probes every
   success without a token and with a wrong one); one in ten carries carol's instead (an
   outsider: 403), one an unknown token and one none at all (401). Deletions of the seeded
   members and devices are undone after each request. Check failures are collected rather than
   raised, so one finding does not end the run (and nothing is shrunk, which would add requests).

Requests are counted by the server itself, from uWSGI's request log. Schemathesis leaves out the
operation that serves the document it loaded (GET /openapi.json); tests/test_ops.py covers it.

Not run: schemathesis' stateful scenarios (`schema.as_state_machine()`), where the
`use_after_free` and `ensure_resource_availability` checks apply. Against a server whose state
persists between scenarios Hypothesis stops them as flaky (FlakyStrategyDefinition), and the
links it infers from this document start few useful chains (creating a chat cannot start one:
nothing in the document produces `member_ids`).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.errors import FailureGroup

from tests.harness import UwsgiServer, wait_until

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "1000"))
# a request answers in milliseconds; a stuck one is a finding, not a reason to hang the suite
REQUEST_TIMEOUT = 10.0
# slow answers are findings too (max_response_time), with room for a loaded 2-core machine
MAX_RESPONSE_TIME = 5.0
# at least this share of the asked-for requests must really be answered
MIN_SHARE_SENT = 0.9
SEED = 20261123
ST = Path(sys.executable).parent / "st"  # schemathesis' CLI, from the same virtual environment
COVERAGE_TIMEOUT = 300

# about 25 ms per request here, the checks included; four times that, and room to start and stop
pytestmark = pytest.mark.timeout(int(180 + EXAMPLES * 0.1))

# uWSGI's request log line ends "... => generated 45 bytes in 2 msecs (HTTP/1.1 200) 2 headers ..."
LOGGED_REQUEST = re.compile(r" => generated \d+ bytes in (\d+) msecs \(HTTP/[\d.]+ (\d{3})\)")

# path parameter -> which of the seeded resources it names
PATH_RESOURCES = {"chat_id": "chats", "message_id": "messages", "device_id": "devices", "user_id": "users"}
# schemathesis' defaults for these two checks (its configuration reference), extended below
NEGATIVE_EXPECTED = ["400", "401", "403", "404", "405", "406", "409", "415", "422", "428", "429", "5xx"]
POSITIVE_EXPECTED = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]
# whose credentials go with a request, in turn: mostly the configured member's (alice)
CREDENTIALS = ["member"] * 7 + ["outsider", "unknown", "none"]


def config_text(token: str) -> str:
    """schemathesis.toml for both parts: every check on, `token` as the bearerAuth, API.md's statuses.

    - max_response_time needs its limit.
    - The Authorization header is not generated: invalid requests would mostly break it (401)
      rather than the body, path or query. Requests without it or with a wrong one are still
      sent: the coverage phase's, one in five of the second part's, and ignored_auth's probes.
    - An invalid request may be answered 413 too_large: the body limit is checked before the body
      is read (API.md), e.g. for member_ids over maxItems, which cannot fit in 64 KiB.
    - POST /v1/chats answers 400 invalid_field to schema-valid member_ids that name no user (API.md:
      "unknown ids -> 400 invalid_field", described in the document): for that operation, a 400
      is an accepted answer to valid data.
    - POST /v1/devices answers 400 invalid_field to a schema-valid Web Push subscription whose
      endpoint's host is not in WEBPUSH_ALLOWED_HOSTS (configuration, not schema) or whose p256dh
      is not a point on P-256 (no JSON Schema says that): a 400 is accepted there too.
    - No cache of schemathesis' own in the working directory.
    """
    return f"""
seed = {SEED}

[cache]
enabled = false

[generation]
with-security-parameters = false

[checks]
enabled = true
max_response_time = {MAX_RESPONSE_TIME}
negative_data_rejection.expected-statuses = {json.dumps(NEGATIVE_EXPECTED + ["413"])}

[auth.openapi.bearerAuth]
bearer = "{token}"

[[operations]]
include-operation-id = "createChat"
checks.positive_data_acceptance.expected-statuses = {json.dumps(POSITIVE_EXPECTED + ["400"])}

[[operations]]
include-operation-id = "registerDevice"
checks.positive_data_acceptance.expected-statuses = {json.dumps(POSITIVE_EXPECTED + ["400"])}
"""


@dataclass
class World:
    """The users and resources made over HTTP before the second part, and their tokens."""

    tokens: dict[str, str]
    user_ids: dict[str, int]
    ids: dict[str, list[int]]
    chat_id: int


@dataclass
class Tally:
    """What the run did and found."""

    coverage_cases: int = 0
    coverage_seconds: float = 0.0
    cases: int = 0
    fuzz_seconds: float = 0.0
    case_statuses: Counter = field(default_factory=Counter)
    by_kind: Counter = field(default_factory=Counter)
    by_operation: Counter = field(default_factory=Counter)
    failures: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)
    # from the server's own log: every request it answered, set-up and the checks' probes included
    requests: int = 0
    statuses: Counter = field(default_factory=Counter)
    slowest_ms: int = 0

    def answered(self, case, response) -> None:
        """Count a generated request and its answer."""
        self.cases += 1
        self.case_statuses[response.status_code] += 1
        self.by_operation[case.operation.label] += 1

    def failed(self, case, response, group: FailureGroup) -> None:
        """Keep the first example of each distinct finding."""
        for failure in group.exceptions:
            key = (case.operation.label, failure.title, response.status_code)
            self.failures.setdefault(key, f"{failure.message.strip()}\n{case.as_curl_command()}")


@pytest.fixture
def server(tmp_path):
    server = UwsgiServer(tmp_path).start()
    try:
        yield server
    finally:
        server.close()


# ------------------------------------------------------------------ part 1: the coverage phase (CLI)

def run_coverage_phase(server: UwsgiServer, workdir: Path, tally: Tally) -> None:
    """schemathesis' examples and coverage phases through its CLI, as a user with resources of its own."""
    user = server.post("/v1/users", {"name": "coverage"})
    assert user.status == 201, user
    token = user.body["token"]
    chat = server.post("/v1/chats", {"name": "coverage", "member_ids": []}, token=token)
    assert chat.status == 201, chat
    assert server.post(f"/v1/chats/{chat.body['id']}/messages", {"text": "edge"}, token=token).status == 201
    assert server.post("/v1/devices", {"platform": "fcm", "token": "coverage-phone"}, token=token).status == 201

    config, report = workdir / "schemathesis.toml", workdir / "coverage-report.json"
    config.write_text(config_text(token))
    command = [str(ST), "--config-file", str(config), "run", server.url("/openapi.json"),
               "--phases", "examples,coverage", "--checks", "all", "--continue-on-failure",
               "--workers", "1", "--seed", str(SEED), "--generation-deterministic",  # (and no example database)
               "--request-timeout", str(REQUEST_TIMEOUT),
               "--report", "json", "--report-json-path", str(report), "--no-color"]
    started = time.monotonic()
    # its working directory is the test's: nothing of schemathesis' lands in the project
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=COVERAGE_TIMEOUT)
    tally.coverage_seconds = time.monotonic() - started
    assert report.exists(), f"st run exited with {result.returncode} and no report:\n{result.stdout}{result.stderr}"
    run = json.loads(report.read_text())
    tally.coverage_cases = run["test_cases"]["generated"]
    # the CLI's own account of a failure (with a curl command) starts after its banner and progress
    details = shorten(result.stdout[max(result.stdout.find(" FAILURES "), 0):].strip(), 3000)
    for failure in run["failures"]:
        for operation in failure["operations"]:
            tally.failures.setdefault((operation, failure["title"], "coverage phase"), details)
    for error in run["errors"]:
        tally.errors.append(f"coverage phase: {shorten(json.dumps(error), 600)}")
    if result.returncode != 0 and not run["failures"] and not run["errors"]:
        tally.errors.append(f"coverage phase: st run exited with {result.returncode}: {details}")


# ------------------------------------------------------------------ part 2: fuzzing (Python API)

def seed_world(server: UwsgiServer) -> World:
    """Sign up alice, bob and carol; alice's chat with bob and a message; carol's own chat; two devices."""
    tokens, user_ids = {}, {}
    for name in ("alice", "bob", "carol"):
        answer = server.post("/v1/users", {"name": name})
        assert answer.status == 201, answer
        tokens[name], user_ids[name] = answer.body["token"], answer.body["id"]
    chat = server.post("/v1/chats", {"name": "fuzz", "member_ids": [user_ids["bob"]]}, token=tokens["alice"])
    other = server.post("/v1/chats", {"name": "carol's", "member_ids": []}, token=tokens["carol"])
    assert chat.status == other.status == 201
    messages = [server.post(f"/v1/chats/{chat.body['id']}/messages", {"text": "hello"}, token=tokens["alice"]),
                server.post(f"/v1/chats/{other.body['id']}/messages", {"text": "mine"}, token=tokens["carol"])]
    devices = [register_phone(server, tokens[name], name) for name in ("alice", "bob")]
    assert all(answer.status == 201 for answer in messages + devices)
    return World(
        tokens=tokens,
        user_ids=user_ids,
        ids={"chats": [chat.body["id"], other.body["id"]],
             "messages": [answer.body["id"] for answer in messages],
             "devices": [answer.body["id"] for answer in devices],
             "users": list(user_ids.values())},
        chat_id=chat.body["id"],
    )


def register_phone(server: UwsgiServer, token: str, name: str):
    """(Re-)register the user's seeded FCM device."""
    return server.post("/v1/devices", {"platform": "fcm", "token": f"{name}-phone"}, token=token)


def restore_world(server: UwsgiServer, world: World, case, response) -> None:
    """Undo what a request did to the seeded world, so that later requests still find it."""
    if response.status_code != 204:
        return
    params = case.path_parameters or {}
    if case.operation.label == "DELETE /v1/chats/{chat_id}/members/{user_id}" and \
            params.get("chat_id") == world.chat_id and params.get("user_id") in world.user_ids.values():
        removed = params["user_id"]
        # alice and bob are the chat's members: whoever is left adds the other back
        keeper = "bob" if removed == world.user_ids["alice"] else "alice"
        answer = server.post(f"/v1/chats/{world.chat_id}/members", {"user_id": removed}, token=world.tokens[keeper])
        assert answer.status in (200, 201), answer
    elif case.operation.label == "DELETE /v1/devices/{device_id}" and \
            params.get("device_id") in world.ids["devices"]:
        for name in ("alice", "bob"):
            register_phone(server, world.tokens[name], name)


def targets(schema, world: World) -> list[tuple[str, st.SearchStrategy]]:
    """(kind, strategy) pairs, drawn from uniformly: each operation gets its share of the budget.

    For every operation, valid requests; invalid ones when it has a parameter or a body to break;
    and for operations with path ids, valid requests naming the seeded resources, twice as often
    (random ids mostly get a 404 before the route does anything). An operation with a single
    possible request, such as GET /v1/me, is sent about once: Hypothesis does not repeat an input.
    """
    pairs = []
    for result in schema.get_all_operations():
        operation = result.ok()
        pairs.append(("valid", operation.as_strategy(GenerationMode.POSITIVE)))
        if len(operation.path_parameters) or len(operation.query) or operation.body:
            pairs.append(("invalid", operation.as_strategy(GenerationMode.NEGATIVE)))
        names = [parameter.name for parameter in operation.path_parameters]
        if names:
            ids = st.fixed_dictionaries({name: st.sampled_from(world.ids[PATH_RESOURCES[name]]) for name in names})
            known = ids.flatmap(lambda params, operation=operation: operation.as_strategy(
                GenerationMode.POSITIVE, path_parameters=params))
            pairs += [("known ids", known)] * 2
    return pairs


def run_fuzz(schema, server: UwsgiServer, world: World, tally: Tally, examples: int) -> None:
    """Send about `examples` generated requests and check every answer.

    First one request for each target (so that every operation is exercised, even one that
    Hypothesis would happen not to draw), then the rest of the budget over targets drawn at random.
    """
    session = requests.Session()
    pairs = targets(schema, world)
    member = f"Bearer {world.tokens['alice']}"
    # a well-formed token (43 URL-safe characters, as sign-up makes them) that no user has
    credentials = {"outsider": f"Bearer {world.tokens['carol']}", "unknown": f"Bearer {'u' * 43}"}

    def send(kind: str, case) -> None:
        # in turn rather than drawn: the shares stay exact whatever Hypothesis favours
        whose = CREDENTIALS[tally.cases % len(CREDENTIALS)]
        if whose != "member" and case.headers and case.headers.get("Authorization") == member:
            if whose == "none":
                del case.headers["Authorization"]
            else:
                case.headers["Authorization"] = credentials[whose]
        else:
            whose = "member"
        tally.by_kind[f"{kind}/{whose}"] += 1
        try:
            response = case.call(session=session, timeout=REQUEST_TIMEOUT)
        except requests.RequestException as exc:
            tally.errors.append(f"{case.operation.label}: {type(exc).__name__}: {exc}")
            return
        tally.answered(case, response)
        try:
            # what call_and_validate() hands the checks, so that their probes go the same way
            case.validate_response(response, transport_kwargs={"session": session, "timeout": REQUEST_TIMEOUT})
        except FailureGroup as group:
            tally.failed(case, response, group)
        restore_world(server, world, case, response)

    def run(choices: st.SearchStrategy, max_examples: int) -> None:
        # generation only: nothing is raised, so there is nothing to shrink or replay
        @settings(max_examples=max_examples, database=None, deadline=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @seed(SEED)
        @given(data=st.data())
        def fuzz(data):
            kind, strategy = data.draw(choices, label="target")
            send(kind, data.draw(strategy, label="case"))

        fuzz()

    started = time.monotonic()
    for pair in pairs:
        run(st.just(pair), 1)
    run(st.sampled_from(pairs), max(examples - tally.cases, 1))
    tally.fuzz_seconds = time.monotonic() - started


# ------------------------------------------------------------------ the numbers

def count_logged_requests(server: UwsgiServer, start: int, tally: Tally) -> None:
    """Add the requests uWSGI logged after byte offset `start` of its log to the tally, and stop uWSGI.

    A worker logs a request after sending the answer, and a stop can cut that short: a last,
    known request is sent and its line awaited first, so that every earlier line is there.
    """
    assert server.get("/healthz?fuzz=done").status == 200
    wait_until(lambda: b"/healthz?fuzz=done" in server.log_path.read_bytes()[start:], 10,
               message="uWSGI to log the last request")
    server.stop()
    with open(server.log_path, "rb") as log:
        log.seek(start)
        for line in log.read().decode(errors="replace").splitlines():
            found = LOGGED_REQUEST.findall(line)
            if found:
                msecs, status = found[-1]
                tally.requests += 1
                tally.statuses[int(status)] += 1
                tally.slowest_ms = max(tally.slowest_ms, int(msecs))


def shorten(text: str, limit: int) -> str:
    """`text`, cut to `limit` characters."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def summary(tally: Tally) -> str:
    """A short human summary of the run."""
    def counts(counter: Counter) -> str:
        return ", ".join(f"{key}: {n}" for key, n in sorted(counter.items()))

    lines = [f"fuzz: asked for {EXAMPLES} requests; generated {tally.coverage_cases + tally.cases}: "
             f"{tally.coverage_cases} in the coverage phase ({tally.coverage_seconds:.1f} s), "
             f"{tally.cases} fuzzing ({tally.fuzz_seconds:.1f} s); uWSGI answered {tally.requests} requests "
             f"(set-up and the checks' probes included), the slowest in {tally.slowest_ms} ms",
             f"  all requests by status: {counts(tally.statuses)}",
             f"  fuzzing requests by status: {counts(tally.case_statuses)}",
             f"  fuzzing requests by kind/credentials: {counts(tally.by_kind)}",
             f"  fuzzing requests by operation: {counts(tally.by_operation)}",
             f"  findings: {len(tally.failures)}, errors: {len(tally.errors)}"]
    for (operation, title, status), details in sorted(tally.failures.items(), key=str):
        # generated bodies can be huge: the start says enough to reproduce by hand
        lines.append(f"  FINDING {operation} -> {status}: {title}\n    {shorten(details, 1200)}")
    lines += [f"  ERROR {error}" for error in tally.errors[:20]]
    return "\n".join(lines)


def test_the_service_keeps_its_contract_under_fuzzing(server, tmp_path, capsys):
    log_start = server.log_path.stat().st_size
    tally = Tally()
    run_coverage_phase(server, tmp_path, tally)
    world = seed_world(server)
    schema = schemathesis.openapi.from_url(server.url("/openapi.json"), timeout=REQUEST_TIMEOUT,
                                           config=schemathesis.Config.from_str(config_text(world.tokens["alice"])))
    run_fuzz(schema, server, world, tally, EXAMPLES - tally.coverage_cases)
    count_logged_requests(server, log_start, tally)
    report = summary(tally)
    with capsys.disabled():  # the numbers are the point of `make fuzz`: show them when it passes too
        print(f"\n{report}")

    assert not [status for status in tally.statuses + tally.case_statuses if status >= 500], report
    assert not tally.failures, report
    assert not tally.errors, report
    assert tally.coverage_cases + tally.cases >= MIN_SHARE_SENT * EXAMPLES, report
    assert set(tally.by_operation) == {result.ok().label for result in schema.get_all_operations()}, report
    assert tally.requests >= tally.coverage_cases + tally.cases, report
