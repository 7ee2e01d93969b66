"""The operator dashboard's summary: what the service did in the last hour and what it holds now,
read from the database. It writes nothing: the history it shows is written by the dispatchers
(notifier.minutes).
"""
from __future__ import annotations

from sqlalchemy.engine import Connection

from notifier import events, minutes, outbox, registry
from notifier.model import iso


def summary(conn: Connection, now: float, stale_after: float, webhooks_enabled: bool) -> dict:
    """Everything the dashboard shows, as JSON-ready data.

    `minutes` holds the start (epoch seconds) of each of the last WINDOW minutes, oldest first, the
    current (partial) minute last; every series is aligned with it. Delivery counts of a minute with
    no row are 0; a queue sample missing (no dispatcher ran that minute) is None.
    """
    last = minutes.minute_of(now)
    window = list(range(last - minutes.WINDOW + 1, last + 1))
    counts = minutes.per_minute(conn, window[0])
    samples = minutes.queue_history(conn, window[0])
    deliveries = {outcome: [counts.get((m, outcome), 0) for m in window] for outcome in minutes.OUTCOMES}
    return {
        "generated_at": iso(now),
        "minutes": [m * 60 for m in window],
        "deliveries": deliveries,
        "totals": {outcome: sum(series) for outcome, series in deliveries.items()},
        "queue": {
            **outbox.queue_depth(conn, now),
            "history": {key: [samples[m][key] if m in samples else None for m in window]
                        for key in ("pending_jobs", "pending_deliveries", "oldest_pending_age")},
        },
        "failures": minutes.failures(conn, window[0]),
        "dispatchers": registry.dispatchers_alive(conn, now, stale_after),
        "webhooks": {"enabled": webhooks_enabled, **events.backlog(conn, now)},
    }
