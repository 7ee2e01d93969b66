"""Prometheus metrics, correct across uWSGI workers, dispatcher processes and hosts.

Two sources, merged at scrape time by whichever worker answers /metrics:
- the database, for everything that is state (deliveries by platform and state, queue depth,
  dispatcher starts): it is shared by every process and host, so no process-local count can drift;
- prometheus_client's multiprocess files under <run dir>/metrics, for what only the dispatcher
  sees while it happens (attempt outcomes, provider latency). The dispatcher switches
  prometheus_client to multiprocess mode inside its own process (see enable_multiprocess).
"""
from __future__ import annotations

import os
from pathlib import Path

from notifier import events, outbox, registry
from notifier.config import Settings

# a dispatcher silent for three intervals is taken for dead, and its leases are taken over by any
# host: at 2 s, a living dispatcher at nice 10 on a loaded machine (load 11-14 on 2 cores) missed
# three beats and another host re-sent its batches (the chaos run's duplicates). A death on the
# same host is seen at once through the wake-up socket, whatever this says.
HEARTBEAT_INTERVAL = 5.0
HEARTBEAT_STALE_AFTER = 3 * HEARTBEAT_INTERVAL
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def metrics_dir(settings: Settings) -> Path:
    """Where the dispatcher's multiprocess metric files live."""
    return settings.run_dir / "metrics"


def render(engine, settings: Settings, now: float) -> tuple[bytes, str]:
    """The Prometheus text exposition of every metric; (body, content type)."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_DatabaseCollector(engine, now))
    path = metrics_dir(settings)
    if path.is_dir():
        MultiProcessCollector(registry, path=str(path))
    return generate_latest(registry), CONTENT_TYPE_LATEST


class _DatabaseCollector:
    """Reads the state metrics from the database at scrape time."""

    def __init__(self, engine, now: float):
        self.engine = engine
        self.now = now

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        with self.engine.connect() as conn:
            counts = outbox.delivery_counts(conn)
            depth = outbox.queue_depth(conn, self.now)
            status = registry.dispatcher_status(conn, self.now, HEARTBEAT_STALE_AFTER)
            webhooks = events.backlog(conn, self.now)
        by_state = GaugeMetricFamily(
            "chat_push_deliveries", "Deliveries by platform and current state (from the database).",
            labels=["platform", "state"])
        for platform, state, count in counts:
            by_state.add_metric([platform, state], count)
        yield by_state
        yield GaugeMetricFamily("chat_push_queue_pending_deliveries", "Deliveries waiting to be sent or retried.",
                                value=depth["pending_deliveries"])
        yield GaugeMetricFamily("chat_push_queue_pending_jobs", "Messages not yet expanded into deliveries.",
                                value=depth["pending_jobs"])
        yield GaugeMetricFamily("chat_push_queue_oldest_pending_age_seconds",
                                "Age of the oldest pending job or delivery.", value=depth["oldest_pending_age"])
        yield GaugeMetricFamily("chat_push_dispatchers_alive", "Dispatchers with a recent heartbeat.",
                                value=len(status["alive"]))
        yield GaugeMetricFamily("chat_webhook_backlog", "Webhook events not yet delivered (nor given up on).",
                                value=webhooks["pending"])
        yield GaugeMetricFamily("chat_webhook_oldest_pending_age_seconds", "Age of the oldest pending webhook event.",
                                value=webhooks["oldest_pending_age"])
        starts = CounterMetricFamily("chat_push_dispatcher_starts", "Dispatcher processes started (restarts included).")
        starts.add_metric([], status["starts"])
        yield starts


class DispatcherMetrics:
    """The dispatcher's own metrics, written to multiprocess files. Create inside the dispatcher process."""

    def __init__(self, settings: Settings):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        enable_multiprocess(metrics_dir(settings))
        registry = CollectorRegistry(auto_describe=False)  # never exported from here; files are the output
        self.attempts = Counter("chat_push_attempts", "Provider answers by platform and outcome.",
                                ["platform", "outcome"], registry=registry)
        self.webhooks = Counter("chat_webhook_attempts", "Webhook attempts by outcome (delivered, retry, "
                                "gone: 410, gave_up: out of attempts).", ["outcome"], registry=registry)
        self.latency = Histogram("chat_push_provider_latency_seconds", "Time for a provider to answer one push.",
                                 ["platform"], buckets=LATENCY_BUCKETS, registry=registry)
        # labelled children kept: labels() checks and joins its arguments on every call, which was
        # a third of the cost of counting a push
        self._attempts: dict = {}
        self._latency: dict = {}

    def observe(self, platform: str, outcome: str, seconds: float | None) -> None:
        """Count one provider answer."""
        counter = self._attempts.get((platform, outcome))
        if counter is None:
            counter = self._attempts[(platform, outcome)] = self.attempts.labels(platform, outcome)
        counter.inc()
        if seconds is not None:
            histogram = self._latency.get(platform)
            if histogram is None:
                histogram = self._latency[platform] = self.latency.labels(platform)
            histogram.observe(seconds)

    def observe_webhook(self, outcome: str) -> None:
        """Count one webhook attempt."""
        self.webhooks.labels(outcome).inc()


def enable_multiprocess(path: Path) -> None:
    """Make metrics created from now on in this process write to mmap files under `path`.

    prometheus_client picks its value class at import time from PROMETHEUS_MULTIPROC_DIR; the
    dispatcher may be a fork of a worker that imported it already, so set both.
    """
    from prometheus_client import values

    path.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    values.ValueClass = values.MultiProcessValue()
