"""Waking this host's dispatcher from the web layer: a nudge if one lives, else a new PushProcess;
and a watchdog that starts one whenever work is pending and none lives.

A nudge alone can be lost: a dispatcher that was killed a moment ago may still hold the host's
name (its files are not closed yet), or be finishing its last batch before a stop, and take the
datagram with it. The outbox keeps the work; what is lost is only the wake-up. So every second
the watchdog (a uWSGI timer, chat_app.wsgi) asks: does anyone hold the name, and is anything
pending? If nobody and something, it starts a dispatcher, which takes the dead one's leases over
at once. A message is therefore picked up within about a second whatever the dispatcher's state.
"""
from __future__ import annotations

import logging
import time

from notifier import db, events, outbox
from notifier.config import Settings
from notifier.process import PushProcess
from notifier.wakeup import nudge, someone_listens

logger = logging.getLogger(__name__)

# a dispatcher we started is given this long to bind its socket before we start another
STARTUP_GRACE = 5.0


class Waker:
    """Called after a message commits (wake) and by the watchdog timer (watch).

    Keeps the processes it started, so it can reap them (`is_alive()` waits on exited children)
    and does not start a second one while the first is still binding its socket.
    """

    def __init__(self, settings: Settings, engine=None):
        self.settings = settings
        self.engine = engine  # for the watchdog's look at the outbox
        self._started: dict = {}  # process -> start time

    def reap(self) -> None:
        """Collect the exit status of dispatchers we started that have exited, so none stays a zombie.

        Cheap enough for every request: one non-blocking waitpid per process we started (0 or 1).
        """
        if self._started:
            self._started = {p: t for p, t in self._started.items() if p.is_alive()}

    def wake(self) -> None:
        """Make sure a dispatcher will look at the outbox soon. O(1), never waits for the fan-out."""
        self.reap()
        if nudge(self.settings):
            return
        if self.settings.push_dispatcher == "external":
            logger.debug("notifier: no dispatcher listening; the supervised one will poll the outbox")
            return
        self.start()

    def watch(self) -> None:
        """The watchdog's tick: start a dispatcher if none holds the name and work is pending."""
        self.reap()
        if self.settings.push_dispatcher == "external" or self._starting() or someone_listens(self.settings):
            return
        with self.engine.connect() as conn:
            pending = outbox.work_pending(conn) or (self.settings.webhooks_enabled and events.any_pending(conn))
        if not pending:
            return
        logger.info("notifier: work is pending and no dispatcher runs on this host; starting one")
        self.start()

    def start(self) -> None:
        """Start a PushProcess, unless one we started is still starting, or the fork is not clean."""
        if self._starting():
            return  # ours is starting; it claims everything committed when it begins
        if not db.close_sqlite_before_fork():
            # a SQLite connection of this process is in use (never expected between requests): a
            # fork now would carry its state; the watchdog tries again within a second
            logger.warning("notifier: a database connection is in use; not forking a dispatcher now")
            return
        process = PushProcess(self.settings)
        process.start()
        process.forget()
        self._started[process] = time.monotonic()

    def _starting(self) -> bool:
        now = time.monotonic()
        return any(now - t < STARTUP_GRACE and p.is_alive() for p, t in self._started.items())
