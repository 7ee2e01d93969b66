"""A webhook receiver on 127.0.0.1: records every request it gets, answers what the test scripts.

Plain HTTP/1.1 (http.server, one thread per connection), as most receivers are. It verifies
nothing itself: the tests verify the signature of what it recorded with the `standardwebhooks`
package, as a receiver would.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.harness import free_port


@dataclass
class Received:
    """One request as the receiver got it."""

    path: str
    headers: dict  # lower-case names
    body: bytes
    at: float
    status: int  # what it answered

    @property
    def event(self) -> dict:
        """The JSON body."""
        return json.loads(self.body)


@dataclass
class WebhookReceiver:
    """Answers `script` in order, then `default`; sleeps `delay` seconds before each answer."""

    port: int = field(default_factory=free_port)
    default: int = 204
    delay: float = 0.0
    received: list[Received] = field(default_factory=list)
    _script: list[int] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Where the service should POST."""
        return f"http://127.0.0.1:{self.port}/hooks/chat"

    def script(self, *statuses: int) -> None:
        """Answer these statuses to the next requests, in order."""
        with self._lock:
            self._script.extend(statuses)

    def start(self) -> "WebhookReceiver":
        """Listen on the port (the same one after a stop: a receiver that comes back)."""
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if receiver.delay:
                    time.sleep(receiver.delay)
                with receiver._lock:
                    status = receiver._script.pop(0) if receiver._script else receiver.default
                    receiver.received.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()},
                                                      body, time.time(), status))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):  # quiet
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening (connections are refused from now on)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
            self._server = None

    def events(self, event_type: str | None = None) -> list[Received]:
        """What was received (of one type), in order."""
        with self._lock:
            return [r for r in self.received if event_type is None or r.event["type"] == event_type]
