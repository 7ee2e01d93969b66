"""The operator dashboard: its setting, its guard (HTTP Basic, 401/404/405, the security headers), its
files, the summary's numbers after real recorded outcomes, and the per-minute history under it
(counters, queue samples, pruning) against SQLite and PostgreSQL.

In-process (WebTest) and in storage, with explicit times where the storage is called directly. The
page in a real browser, against the real uWSGI, is tests/test_dashboard_browser.py.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import re
import time
from html.parser import HTMLParser
from importlib import metadata

import pytest
import sqlalchemy as sa

from chat_app.app import create_app
from chat_app.routes import dashboard as routes
from notifier import dashboard, minutes, outbox, retention, schema
from notifier.config import ConfigError, load_settings
from notifier.dispatcher import Dispatcher
from notifier.model import DeliveryState, Outcome, Platform, Result
from tests.test_storage import (LEASE, NOW, claim_batch, engine, post, postgres_engine,  # noqa: F401
                                record, rows, sent, world, write)
from tests.webapp import ContractTestApp, assert_error

pytestmark = pytest.mark.timeout(60)

PASSWORD = "correct horse battery staple"
MINUTE = minutes.minute_of(NOW)
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


def basic(user: str, password: str) -> dict:
    """An Authorization header with HTTP Basic credentials."""
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


OPS = basic("ops", PASSWORD)


@pytest.fixture
def app_settings(app_settings):
    """conftest's settings, with the dashboard on."""
    return dataclasses.replace(app_settings, ops_password=PASSWORD)


@pytest.fixture
def plain_app(app_settings) -> ContractTestApp:
    """The same app without OPS_PASSWORD."""
    settings = dataclasses.replace(app_settings, ops_password=None)
    return ContractTestApp(create_app(settings, wake=lambda: None))


def assert_secured(res) -> None:
    """The headers every answer under /ops/ carries."""
    assert res.headers["Cache-Control"] == "no-store"
    assert res.headers["Content-Security-Policy"] == CSP
    assert res.headers["X-Content-Type-Options"] == "nosniff"
    assert res.headers["Referrer-Policy"] == "no-referrer"


# ---------------------------------------------------------------- the setting

def test_ops_password_is_read_validated_and_never_shown():
    settings = load_settings({"OPS_PASSWORD": PASSWORD})

    assert settings.ops_password == PASSWORD and settings.ops_enabled
    assert settings.redacted()["ops_password"] == "***"
    assert PASSWORD not in repr(settings)
    assert not load_settings({}).ops_enabled


@pytest.mark.parametrize("value, problem", [
    ("short-secret", "16 to 1024 characters"),
    (" " + PASSWORD, "leading or trailing spaces"),
    (PASSWORD + "\n", "leading or trailing spaces"),
    (PASSWORD + "\x00", "printable"),
])
def test_a_weak_or_malformed_ops_password_stops_the_start_naming_the_variable_not_the_value(value, problem):
    with pytest.raises(ConfigError, match=r"^OPS_PASSWORD: ") as error:
        load_settings({"OPS_PASSWORD": value})

    assert problem in str(error.value)
    assert value.strip() not in str(error.value)


# ---------------------------------------------------------------- the guard

@pytest.mark.parametrize("path", ["/ops", "/ops/", "/ops/api/summary", "/ops/static/dashboard.js", "/ops/anything"])
def test_without_ops_password_everything_under_ops_is_the_json_404(plain_app, path):
    assert_error(plain_app.get(path, headers=OPS, expect_errors=True), 404, "not_found")
    assert_error(plain_app.post(path, headers=OPS, expect_errors=True), 404, "not_found")


@pytest.mark.parametrize("headers", [
    {},
    basic("ops", "wrong password, long enough"),
    basic("admin", PASSWORD),
    basic("ops", PASSWORD + "x"),
    {"Authorization": "Basic " + base64.b64encode(f"ops{PASSWORD}".encode()).decode()},  # no colon
    {"Authorization": "Basic not base64!"},
    {"Authorization": f"Bearer {PASSWORD}"},
], ids=["none", "wrong-password", "wrong-user", "longer-password", "no-colon", "not-base64", "bearer"])
@pytest.mark.parametrize("path", ["/ops/", "/ops/api/summary", "/ops/static/uPlot.iife.js", "/ops/no/such/page"])
def test_wrong_or_missing_credentials_are_401_with_the_basic_challenge(app, path, headers):
    res = app.get(path, headers=headers, expect_errors=True)

    assert_error(res, 401, "unauthorized")
    assert res.headers["WWW-Authenticate"] == 'Basic realm="ops"'
    assert_secured(res)


def test_the_page_is_served_to_the_ops_user_with_the_security_headers(app):
    res = app.get("/ops/", headers=OPS, status=200)

    assert res.content_type == "text/html"
    assert res.charset == "utf-8"
    assert_secured(res)
    assert "<title>chat · operations</title>" in res.text


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
@pytest.mark.parametrize("path", ["/ops/", "/ops/api/summary", "/ops/static/dashboard.js"])
def test_the_dashboard_is_read_only(app, method, path):
    res = app.request(path, method=method, headers=OPS, expect_errors=True)

    assert_error(res, 405, "method_not_allowed")
    assert res.headers["Allow"] == "GET"


def test_ops_without_the_slash_redirects_to_the_page(app):
    res = app.get("/ops", status=308)

    assert res.headers["Location"].endswith("/ops/")
    assert_secured(res)


def test_an_unknown_file_under_ops_is_404_once_authenticated(app):
    for path in ("/ops/static/nothing.js", "/ops/static/index.html", "/ops/no/such/page"):
        res = app.get(path, headers=OPS, expect_errors=True)
        assert_error(res, 404, "not_found")
        assert_secured(res)


def test_the_dashboard_is_not_part_of_the_json_api(app):
    document = app.get("/openapi.json").json

    assert not [path for path in document["paths"] if path.startswith("/ops")]


# ---------------------------------------------------------------- the files

class _Page(HTMLParser):
    """What a page loads and whether it carries inline script or style."""

    def __init__(self):
        super().__init__()
        self.urls, self.inline = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "style" in attrs or any(name.startswith("on") for name in attrs):
            self.inline.append((tag, attrs))
        if tag == "style" or (tag == "script" and "src" not in attrs):
            self.inline.append((tag, attrs))
        self.urls += [attrs[name] for name in ("src", "href") if name in attrs]


def test_the_page_loads_only_its_own_files_and_has_no_inline_script_or_style(app):
    page = _Page()
    page.feed(app.get("/ops/", headers=OPS).text)

    assert page.inline == []
    assert sorted(page.urls) == ["data:,", "static/dashboard.css", "static/dashboard.js",
                                 "static/uPlot.iife.js", "static/uPlot.min.css"]
    for url in page.urls:
        if url.startswith("static/"):
            assert app.get(f"/ops/{url}", headers=OPS).status_int == 200


@pytest.mark.parametrize("name, content_type", [
    ("dashboard.js", "text/javascript"), ("dashboard.css", "text/css"),
    ("uPlot.iife.js", "text/javascript"), ("uPlot.min.css", "text/css"),
])
def test_static_files_have_their_type_and_the_security_headers(app, name, content_type):
    res = app.get(f"/ops/static/{name}", headers=OPS, status=200)

    assert res.content_type == content_type
    assert_secured(res)
    assert res.body


def test_the_chart_library_is_the_pinned_uplot_python_wheels_file():
    assets = routes.STATIC.parents[2] / "requirements-assets.txt"
    (pin,) = [line for line in open(assets) if line.startswith("uplot-python==")]
    installed = {str(path): path for path in metadata.files("uplot-python")}

    assert pin.strip() == f"uplot-python=={metadata.version('uplot-python')}"
    assert routes.chart_library() == {name: installed[path].read_binary() for name, path in routes.CHART_FILES.items()}
    assert b"uPlot" in routes.chart_library()["uPlot.iife.js"][:400]


def test_the_script_sets_no_inline_style_and_loads_nothing_from_elsewhere():
    script = (routes.STATIC / "dashboard.js").read_text()

    assert "innerHTML" not in script and "setAttribute(\"style\"" not in script and ".style." not in script
    assert not re.search(r"https?://", script)
    assert 'fetch("api/summary"' in script


# ---------------------------------------------------------------- the summary

class ScriptedProvider:
    """Answers each token with its scripted Results in turn, then SENT."""

    def __init__(self, platform, scripts=None):
        self.platform = platform
        self.scripts = {token: list(results) for token, results in (scripts or {}).items()}

    async def send(self, push):
        queue = self.scripts.get(push.token)
        return queue.pop(0) if queue else Result(Outcome.SENT, 200, None)

    async def close(self):
        pass


def test_the_summary_reports_the_recorded_outcomes_failures_queue_and_dispatchers(app, app_settings, app_engine,
                                                                                  signup, make_chat):
    ann, bob, cat, dan = signup("ann"), signup("bob"), signup("cat"), signup("dan")
    app.post_json("/v1/devices", {"platform": "apns", "token": "b" * 64}, headers=bob.headers, status=201)
    app.post_json("/v1/devices", {"platform": "fcm", "token": "cat-phone"}, headers=cat.headers, status=201)
    app.post_json("/v1/devices", {"platform": "fcm", "token": "dan-phone"}, headers=dan.headers, status=201)
    chat = make_chat(ann, bob, cat, dan)
    for text in ("one", "two"):
        app.post_json(f"/v1/chats/{chat['id']}/messages", {"text": text}, headers=ann.headers, status=201)
    apns = ScriptedProvider(Platform.APNS, {"b" * 64: [Result(Outcome.SKIPPED, None, "dry_run")]})
    fcm = ScriptedProvider(Platform.FCM, {
        "cat-phone": [Result(Outcome.DEAD_TOKEN, 404, "UNREGISTERED")],
        "dan-phone": [Result(Outcome.SENT, 200, None), Result(Outcome.TRANSIENT, 503, "UNAVAILABLE", 3600)],
    })
    providers = {Platform.APNS: apns, Platform.FCM: fcm, Platform.WEBPUSH: ScriptedProvider(Platform.WEBPUSH)}
    asyncio.run(Dispatcher(app_settings, app_engine, providers, owner="test:1:1").drain())
    with write(app_engine) as conn:
        conn.execute(schema.dispatchers.insert().values(host_id="host-a", pid=4321, started_at=time.time() - 60,
                                                        heartbeat_at=time.time() - 2))

    summary = app.get("/ops/api/summary", headers=OPS, status=200)

    assert summary.content_type == "application/json"
    assert_secured(summary)
    body = summary.json
    # both messages go out in one batch: bob 1 skipped (dry run) + 1 sent, cat 1 failed (dead token)
    # + 1 sent, dan 1 sent + 1 retried (due again in an hour: still pending)
    assert body["totals"] == {"sent": 3, "failed": 1, "skipped": 1, "retried": 1}
    assert body["failures"] == [{"platform": "fcm", "reason": "UNREGISTERED", "count": 1}]
    assert (body["queue"]["pending_jobs"], body["queue"]["pending_deliveries"]) == (0, 1)
    assert body["queue"]["oldest_pending_age"] >= 0
    assert len(body["minutes"]) == minutes.WINDOW == len(body["deliveries"]["sent"])
    assert body["minutes"][-1] == minutes.minute_of(time.time()) * 60
    assert [(d["host_id"], d["pid"]) for d in body["dispatchers"]] == [("host-a", 4321)]
    assert body["dispatchers"][0]["started"].endswith("Z") and body["dispatchers"][0]["heartbeat_age"] >= 2
    assert body["webhooks"] == {"enabled": False, "pending": 0, "oldest_pending_age": 0.0}


def test_the_summary_counts_queued_jobs_and_writes_nothing(app, app_engine, signup, make_chat):
    ann, bob = signup("ann"), signup("bob")
    chat = make_chat(ann, bob)
    for text in ("one", "two", "three"):
        app.post_json(f"/v1/chats/{chat['id']}/messages", {"text": text}, headers=ann.headers, status=201)

    body = app.get("/ops/api/summary", headers=OPS, status=200).json

    assert (body["queue"]["pending_jobs"], body["queue"]["pending_deliveries"]) == (3, 0)
    assert body["queue"]["history"]["pending_jobs"] == [None] * minutes.WINDOW  # no dispatcher sampled it
    assert body["totals"] == {"sent": 0, "failed": 0, "skipped": 0, "retried": 0}
    with app_engine.connect() as conn:
        for table in (schema.delivery_minutes, schema.queue_samples):
            assert conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one() == 0


def test_the_summary_is_reused_for_its_ttl_then_rebuilt():
    clock, built = [100.0], []
    cache = routes.SummaryCache(3.0, lambda: built.append(clock[0]) or f"{len(built)}".encode(), lambda: clock[0])

    answers = [cache.get()]
    clock[0] = 102.5
    answers.append(cache.get())
    clock[0] = 103.0
    answers.append(cache.get())

    assert answers == [b"1", b"1", b"2"]
    assert built == [100.0, 103.0]


# ---------------------------------------------------------------- the per-minute history, in storage

def finish_batch(engine, owner: str, updates, now: float) -> None:
    """Record a batch's outcomes and count them, in one transaction, as the dispatcher does."""
    with write(engine) as conn:
        outbox.record_updates(conn, owner, updates)
        minutes.count_outcomes(conn, [u.delivery_id for u in updates], now)


def counters(engine) -> dict:
    with engine.connect() as conn:
        query = sa.select(schema.delivery_minutes)
        return {(r.minute, r.platform, r.outcome, r.reason): r.count for r in conn.execute(query)}


def test_outcomes_are_counted_by_minute_platform_outcome_and_failure_reason(engine, world):
    post(engine, world)
    post(engine, world)
    bob1, dan1, bob2, dan2 = claim_batch(engine, "d1", NOW)  # bob's APNs phone, dan's FCM phone, twice
    finish_batch(engine, "d1", [sent(bob1), outbox.Update(dan1, DeliveryState.FAILED, 1, NOW, 404, "UNREGISTERED")],
                 NOW)
    finish_batch(engine, "d1", [sent(bob2, NOW + 1),
                                outbox.Update(dan2, DeliveryState.PENDING, 1, NOW + 3600, 503, "UNAVAILABLE")], NOW + 1)

    assert counters(engine) == {
        (MINUTE, "apns", "sent", ""): 2,  # two batches of one minute add up
        (MINUTE, "fcm", "failed", "UNREGISTERED"): 1,
        (MINUTE, "fcm", "retried", ""): 1,
    }

    post(engine, world)
    bob3, dan3 = claim_batch(engine, "d1", NOW + 60)
    finish_batch(engine, "d1", [sent(bob3, NOW + 60), outbox.Update(dan3, DeliveryState.SKIPPED, 0, NOW + 60, None,
                                                                    "dry_run")], NOW + 60)
    assert {key: n for key, n in counters(engine).items() if key[0] == MINUTE + 1} == {
        (MINUTE + 1, "apns", "sent", ""): 1,
        (MINUTE + 1, "fcm", "skipped", ""): 1,  # a reason is kept for failures only
    }


def test_a_result_not_written_because_the_lease_was_lost_is_not_counted(engine, world):
    post(engine, world)
    bob, dan = claim_batch(engine, "d1", NOW)
    taken = claim_batch(engine, "d2", NOW + LEASE + 1)  # d1's leases expired; d2 took both rows
    assert sorted(taken) == [bob, dan]

    finish_batch(engine, "d1", [sent(bob), sent(dan)], NOW + LEASE + 2)

    assert counters(engine) == {}


def test_the_queue_is_sampled_once_a_minute(engine, world):
    post(engine, world)
    with write(engine) as conn:
        assert minutes.sample_queue(conn, NOW) is True
        assert minutes.sample_queue(conn, NOW + 1) is False  # the same minute: measured once
    claim_batch(engine, "d1", NOW + 60)  # expanded: the job is done, two deliveries pending
    with write(engine) as conn:
        assert minutes.sample_queue(conn, NOW + 60) is True

    samples = rows(engine, schema.queue_samples, schema.queue_samples.c.minute)
    assert [(s.minute, s.pending_jobs, s.pending_deliveries) for s in samples] == [(MINUTE, 1, 0), (MINUTE + 1, 0, 2)]
    assert samples[0].oldest_pending_age == 0.0 and samples[1].oldest_pending_age >= 0.0


def test_the_summary_aligns_an_hour_of_minutes_with_zeros_and_gaps(engine, world):
    post(engine, world)
    bob, dan = claim_batch(engine, "d1", NOW)
    with write(engine) as conn:
        minutes.sample_queue(conn, NOW - 120)  # two minutes ago: both deliveries pending
    finish_batch(engine, "d1", [sent(bob), sent(dan)], NOW - 600)  # counted ten minutes ago
    with write(engine) as conn:
        conn.execute(schema.delivery_minutes.insert().values(minute=MINUTE - 60, platform="apns", outcome="sent",
                                                             reason="", count=99))  # out of the window

    with engine.connect() as conn:
        body = dashboard.summary(conn, NOW, 15.0, webhooks_enabled=True)

    assert body["minutes"] == [(MINUTE - 59 + i) * 60 for i in range(60)]
    assert body["deliveries"]["sent"][-11] == 2 and sum(body["deliveries"]["sent"]) == 2
    assert body["totals"] == {"sent": 2, "failed": 0, "skipped": 0, "retried": 0}
    history = body["queue"]["history"]["pending_deliveries"]
    assert history[-3] == 2 and history.count(None) == 59
    assert body["webhooks"]["enabled"] is True


def test_pruning_keeps_the_dashboards_hour_and_goes_in_small_batches(engine):
    with write(engine) as conn:
        for minute in range(MINUTE - 100, MINUTE + 1):
            conn.execute(schema.delivery_minutes.insert().values(minute=minute, platform="fcm", outcome="sent",
                                                                 reason="", count=1))
            conn.execute(schema.queue_samples.insert().values(minute=minute, pending_jobs=0, pending_deliveries=0,
                                                              oldest_pending_age=0.0))

    def prune(cutoff):
        with write(engine) as conn:
            return retention.prune_minutes(conn, cutoff, NOW)

    assert prune(NOW) == 2 * retention.MINUTES_PER_BATCH  # a retention shorter than the hour: the hour stays
    while prune(NOW):
        pass
    with engine.connect() as conn:
        kept = conn.execute(sa.select(sa.func.min(schema.delivery_minutes.c.minute))).scalar()
        samples = conn.execute(sa.select(sa.func.min(schema.queue_samples.c.minute))).scalar()
    assert kept == samples == MINUTE - minutes.WINDOW
    assert prune(NOW - 7 * 86400) == 0
