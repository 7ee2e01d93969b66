"""The host's wake-up socket: its name, a nudge, a liveness probe, and the listener that holds it.

The dispatcher binds an abstract-namespace Unix datagram socket whose name is derived from the
database and the host id. That one socket is both the wake-up channel and the "one dispatcher per
host" lock: only one process can bind a name, and the kernel frees it the instant the holder dies,
even on SIGKILL, so no stale pidfile or lock file can ever block a restart. A name that can be
bound is therefore proof that every earlier dispatcher of this host is gone.

A leaf module: it imports only the configuration.
"""
from __future__ import annotations

import errno
import hashlib
import socket

from notifier.config import Settings, resolve_database_url

_ABSENT = (errno.ECONNREFUSED, errno.ENOENT)


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
        except BlockingIOError:
            return True  # its queue is full of nudges already: it is alive and has been told
        except OSError as exc:
            if exc.errno in _ABSENT:
                return False
            raise
    return True


def someone_listens(settings: Settings) -> bool:
    """Whether a process holds this host's name, without sending it anything.

    A datagram connect() only checks that the peer exists. A process that was killed but has not
    yet closed its files still counts: the next probe, a moment later, sees it gone."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(socket_name(settings))
        except OSError as exc:
            if exc.errno in _ABSENT:
                return False
            raise
    return True


class Listener:
    """The bound wake-up socket: holding it means 'this host's dispatcher'."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.sock: socket.socket | None = None

    def bind(self) -> bool:
        """Take the name; False when another process holds it."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(socket_name(self.settings))
        except OSError:
            sock.close()
            return False
        sock.setblocking(False)
        self.sock = sock
        return True

    def fileno(self) -> int:
        """The socket's descriptor, for the event loop's reader."""
        return self.sock.fileno()

    def drain_nudges(self) -> None:
        """Discard queued nudges: one look at the outbox answers them all."""
        while self.sock is not None:
            try:
                self.sock.recv(64)
            except OSError:
                return

    def close(self) -> None:
        """Free the name, so the next wake-up starts a new dispatcher."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
