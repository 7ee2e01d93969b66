"""Waking this host's dispatcher from a request handler: a nudge if one lives, else a new PushProcess.

The dispatcher binds an abstract-namespace Unix datagram socket whose name is derived from the
database and the host id. That one socket is both the wake-up channel and the "one dispatcher per
host" lock: only one process can bind a name, and the kernel frees it the instant the holder dies,
even on SIGKILL, so no stale pidfile or lock file can ever block a restart.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import socket
import time

from notifier.config import Settings, resolve_database_url

logger = logging.getLogger(__name__)

# a dispatcher we started is given this long to bind its socket before we start another
STARTUP_GRACE = 5.0


def socket_name(settings: Settings) -> bytes:
    """The abstract socket name of the dispatcher serving this database on this host."""
    key = f"{resolve_database_url(settings.database_url)}|{settings.push_host_id}"
    return b"\0chat-notifier-" + hashlib.sha256(key.encode()).hexdigest()[:24].encode()


def nudge(settings: Settings) -> bool:
    """Tell a live dispatcher there is work; False when none is listening on this host."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        try:
            sock.sendto(b"!", socket_name(settings))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except BlockingIOError:
            return True  # its queue is full of nudges already: it is alive and has been told
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return False
            raise
    return True


class Waker:
    """Called after a message commits: nudges the live dispatcher or starts one.

    Keeps the processes it started, so it can reap them (`is_alive()` waits on exited children)
    and does not start a second one while the first is still binding its socket.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self._started: dict = {}  # process -> start time

    def reap(self) -> None:
        """Collect the exit status of dispatchers we started that have exited, so none stays a zombie.

        Cheap enough for every request: one non-blocking waitpid per process we started (0 or 1).
        """
        if self._started:
            self._started = {p: t for p, t in self._started.items() if p.is_alive()}

    def wake(self) -> None:
        """Make sure a dispatcher will look at the outbox soon. O(1), never waits for the fan-out."""
        now = time.monotonic()
        self.reap()
        if nudge(self.settings):
            return
        if self.settings.push_dispatcher == "external":
            logger.debug("notifier: no dispatcher listening; the supervised one will poll the outbox")
            return
        if any(now - t < STARTUP_GRACE for t in self._started.values()):
            return  # ours is starting; it claims everything committed when it begins
        from notifier.process import PushProcess

        process = PushProcess(self.settings)
        process.start()
        process.forget()
        self._started[process] = now
