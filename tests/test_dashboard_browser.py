"""The operator dashboard in a real browser: headless Chromium, driven by Selenium, against the real
uWSGI with real traffic through the protocol fakes.

The page must load with the ops user's credentials and not without; draw the traffic's numbers (read
back from what the page rendered and from the data its charts were given); show the dead token's
reason under failures; load nothing from another origin; log no console error; and refresh by
itself, without reloading. A screenshot goes to the test's tmp dir, and to docs/dashboard.png when
CHAT_SAVE_SCREENSHOT=1 (the README's picture).

Chromium is Debian's `chromium` and `chromium-driver`: installed by the session's first use when
missing and running as root (apt-get, bounded by a timeout), else the tests skip saying why.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e import apns_token, make_chat, post_message, wait_complete
from tests.harness import ROOT, UwsgiServer, wait_until

PASSWORD = "a long ops password for the browser test"
APT_TIMEOUT = 300  # seconds for each apt-get step (a download of about 100 MB)
# the first test's timeout covers the session fixture's install too: up to three apt-get steps
pytestmark = pytest.mark.timeout(3 * APT_TIMEOUT + 180)
PAGE_TIMEOUT = 30  # seconds for a page load and for the driver's commands
RENDER_TIMEOUT = 45  # seconds for the page to show what the database holds (a queue sample waits for a heartbeat)
CHROME_FLAGS = (
    "--headless=new", "--no-sandbox",  # root in a container: no user namespace for the sandbox
    "--disable-dev-shm-usage", "--window-size=1400,1000", "--no-first-run", "--no-default-browser-check",
    # the browser's own traffic (updates, sync, safe browsing lists) has no business on a test machine
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-default-apps",
)


# ---------------------------------------------------------------- Chromium and its driver

def _binaries() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def _apt(*args: str) -> str | None:
    """Run apt-get; None when it worked, else why not."""
    try:
        done = subprocess.run(["apt-get", *args], env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=APT_TIMEOUT)
    except subprocess.TimeoutExpired:
        return f"apt-get {args[0]} took over {APT_TIMEOUT} s"
    return None if done.returncode == 0 else f"apt-get {args[0]} failed: {done.stderr.strip()[-300:]}"


def _install() -> str | None:
    """Install Debian's chromium and chromium-driver; None when done, else why not."""
    if os.geteuid() != 0:
        return "not running as root (apt-get install chromium chromium-driver, or run the tests as root)"
    if shutil.which("apt-get") is None:
        return "no apt-get on this machine to install chromium and chromium-driver"
    install = ("install", "-y", "-q", "--no-install-recommends", "chromium", "chromium-driver")
    if _apt(*install) is None:
        return None
    # the package lists may be missing or stale on a fresh machine
    return _apt("update", "-q") or _apt(*install)


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    """(browser, driver) paths; installed when missing and possible, else the test is skipped."""
    pytest.importorskip("selenium", reason="selenium is not installed (requirements-dev.txt)")
    if _binaries() is None:
        problem = _install()
        if _binaries() is None:
            pytest.skip(f"Chromium and its driver are not installed: {problem or 'not found after apt-get install'}")
    return _binaries()


@pytest.fixture
def browser(chromium, tmp_path):
    """A headless Chromium that keeps its console and network logs; always quit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = chromium
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    service = Service(executable_path=driver_path, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.set_page_load_timeout(PAGE_TIMEOUT)
        driver.set_script_timeout(PAGE_TIMEOUT)
        yield driver
    finally:
        driver.quit()


# ---------------------------------------------------------------- the service, with traffic

@pytest.fixture
def server(tmp_path, fakes):
    """uWSGI with the dashboard on; a dispatcher that stays up through the test (its heartbeat samples
    the queue), and a retry base short enough for nothing to wait long."""
    server = UwsgiServer(tmp_path / "server", env={**fakes.env, "OPS_PASSWORD": PASSWORD, "PUSH_IDLE_EXIT": "120",
                                                   "PUSH_RETRY_BASE": "0.2"})
    server.start()
    yield server
    server.close()


def send_traffic(server: UwsgiServer, fakes) -> dict:
    """Three messages to bob (APNs), cat (FCM, a dead token) and dan (FCM, whose first push is told to
    come back in an hour); returns what the dashboard must show."""
    fakes.fcm.script("cat-android", [(404, "UNREGISTERED")])
    fakes.fcm.script("dan-android", [(503, "UNAVAILABLE", 3600)])
    chat = make_chat(server, {"bob": [("apns", apns_token(1))], "cat": [("fcm", "cat-android")],
                              "dan": [("fcm", "dan-android")]})
    first = post_message(server, chat, "first")

    def first_recorded():
        report = server.get(f"/v1/messages/{first}/deliveries", token=chat.sender_token).body
        states = sorted((d["state"], d["attempts"]) for d in report["deliveries"])
        return states == [("failed", 1), ("pending", 1), ("sent", 1)]
    # cat's device is disabled by then: the next messages have no delivery for it
    wait_until(first_recorded, 20, interval=0.1, message="the first message's outcomes")
    for text in ("second", "third"):
        wait_complete(server, chat, post_message(server, chat, text), 20)
    return {"totals": {"sent": 5, "failed": 1, "skipped": 0, "retried": 1},
            "failures": [["fcm", "UNREGISTERED", "1"]], "pending_deliveries": 1, "pending_jobs": 0}


# ---------------------------------------------------------------- what the page shows

def network_log(driver) -> list[dict]:
    """The DevTools network events logged since the last call."""
    events = (json.loads(entry["message"])["message"] for entry in driver.get_log("performance"))
    return [event for event in events if event["method"].startswith("Network.")]


def requested(events: list[dict]) -> list[dict]:
    return [e["params"] for e in events if e["method"] == "Network.requestWillBeSent"]


def text(driver, selector: str) -> str:
    from selenium.webdriver.common.by import By
    return driver.find_element(By.CSS_SELECTOR, selector).text


def table(driver, selector: str) -> list[list[str]]:
    from selenium.webdriver.common.by import By
    return [[cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
            for row in driver.find_elements(By.CSS_SELECTOR, f"{selector} tbody tr")]


def shown(driver) -> dict:
    """What the page rendered: the numbers it wrote and the data its charts were given."""
    from selenium.webdriver.common.by import By
    deliveries = driver.find_element(By.ID, "deliveries-chart")
    queue = driver.find_element(By.ID, "queue-chart")
    return {
        "totals": {cell.get_attribute("data-outcome"): int(cell.text)
                   for cell in driver.find_elements(By.CSS_SELECTOR, "#delivery-totals dd") if cell.text.isdigit()},
        "charted": json.loads(deliveries.get_attribute("data-totals") or "null"),
        "points": deliveries.get_attribute("data-points"),
        "queue_latest": json.loads(queue.get_attribute("data-latest") or "null"),
        "pending_deliveries": text(driver, "#pending-deliveries"),
        "pending_jobs": text(driver, "#pending-jobs"),
        "failures": table(driver, "#failures"),
    }


def drawn(driver, figure_id: str) -> bool:
    """Whether the chart's canvas has anything on it (it differs from a blank canvas of its size)."""
    return driver.execute_script("""
        const canvas = document.querySelector(`#${arguments[0]} canvas`);
        if (!canvas || !canvas.width || !canvas.height) return false;
        const blank = document.createElement("canvas");
        blank.width = canvas.width; blank.height = canvas.height;
        return canvas.toDataURL() !== blank.toDataURL();
    """, figure_id)


def save_screenshot(driver, tmp_path: Path) -> Path:
    """The whole page (beyond the window's height) as a PNG in the test's tmp dir, and as
    docs/dashboard.png when asked."""
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    path = tmp_path / "dashboard.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    if os.environ.get("CHAT_SAVE_SCREENSHOT") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copyfile(path, ROOT / "docs" / "dashboard.png")
    return path


def test_the_dashboard_shows_the_traffic_in_a_real_browser(server, fakes, browser, tmp_path):
    expected = send_traffic(server, fakes)
    page = server.url("/ops/")
    origin = server.url("")

    browser.get(page)  # no credentials
    answers = [e["params"]["response"] for e in network_log(browser) if e["method"] == "Network.responseReceived"]
    assert [a["status"] for a in answers if a["url"] == page] == [401]
    assert "deliveries-chart" not in browser.page_source
    browser.get_log("browser")  # the 401 is logged as a failed load: not this test's subject

    credentials = base64.b64encode(f"ops:{PASSWORD}".encode()).decode()
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": f"Basic {credentials}"}})
    browser.get(page)

    def complete():
        now = shown(browser)
        return now if (now["totals"] == expected["totals"] and now["queue_latest"]
                       and now["queue_latest"]["pending_deliveries"] == expected["pending_deliveries"]) else None
    try:
        view = wait_until(complete, RENDER_TIMEOUT, interval=0.5, message="the page to show the traffic")
    finally:
        save_screenshot(browser, tmp_path)

    assert view["charted"] == expected["totals"]  # the chart was given the same numbers the page wrote
    assert view["points"] == "60"  # a point per minute of the last hour
    assert (view["pending_deliveries"], view["pending_jobs"]) == (str(expected["pending_deliveries"]),
                                                                  str(expected["pending_jobs"]))
    assert view["failures"] == expected["failures"]
    assert drawn(browser, "deliveries-chart") and drawn(browser, "queue-chart")
    dispatchers = table(browser, "#dispatchers")
    assert dispatchers and {int(row[1]) for row in dispatchers} <= set(server.dispatcher_pids())
    assert text(browser, "#webhook-backlog") == "0" and text(browser, "#webhooks-enabled") == "no"

    # it refreshes by itself: more summaries fetched, the page itself loaded once
    events = network_log(browser)
    events += wait_until(lambda: (lambda more: more if any(r["request"]["url"].endswith("/ops/api/summary")
                                                           for r in requested(more)) else None)(network_log(browser)),
                         15, interval=0.5, message="a refresh of the summary")
    urls = [r["request"]["url"] for r in requested(events)]
    assert urls.count(server.url("/ops/api/summary")) >= 2
    assert urls.count(page) == 1
    assert {server.url(f"/ops/static/{name}") for name in ("uPlot.iife.js", "uPlot.min.css", "dashboard.js",
                                                           "dashboard.css")} <= set(urls)
    # nothing left the origin (the favicon is an inline data: URL, not a request)
    assert [url for url in urls if not url.startswith(origin + "/") and not url.startswith("data:")] == []
    assert [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"] == []
