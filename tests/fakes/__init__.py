"""Protocol fakes of Apple's APNs (HTTP/2) and Google's FCM v1 (HTTP/2 and HTTP/1.1), for tests and benchmarks.

- `tests.fakes.tls`: throw-away CA / server / client certificates, APNs .p8 key, service account.
- `tests.fakes.apns.APNsFake`: HTTP/2 + TLS server behaving like api.push.apple.com.
- `tests.fakes.fcm.FCMFake`: HTTPS server behaving like fcm.googleapis.com (an HTTP/2 listener and an
  HTTP/1.1 one) + the oauth2 token endpoint (HTTP/1.1).

This module only holds the scripting/recording machinery both fakes share, so importing
`tests.fakes` starts nothing.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from typing import Any, Deque, Dict, Generic, Iterable, List, NamedTuple, Optional, Sequence, TypeVar

__all__ = ["Scripted", "ScriptedRecorder", "stop_loop_thread"]


def stop_loop_thread(loop, thread: Optional[threading.Thread], timeout: float) -> None:
    """Stop a fake's event loop, which runs forever on `thread`, and join the thread (bounded).
    The loop's own shutdown (its serve function's `finally`) closes the listener and connections."""
    if loop is None or thread is None or not thread.is_alive():
        return
    try:
        loop.call_soon_threadsafe(loop.stop)
    except RuntimeError:
        pass  # loop already closed
    thread.join(timeout)


class Scripted(NamedTuple):
    """One scripted answer: HTTP status, provider reason/error code, optional Retry-After (s)."""

    status: int
    reason: Optional[str] = None
    retry_after: Optional[int] = None


R = TypeVar("R")


def _as_scripted(entry: Any) -> Scripted:
    if isinstance(entry, Scripted):
        return entry
    if isinstance(entry, int):
        return Scripted(entry)
    entry = tuple(entry)
    if not 1 <= len(entry) <= 3:
        raise ValueError(f"a scripted response is (status, reason[, retry_after]), got {entry!r}")
    status = int(entry[0])
    if not 100 <= status <= 599:
        raise ValueError(f"bad HTTP status {status!r}")
    return Scripted(*entry)


class ScriptedRecorder(Generic[R]):
    """Thread-safe scripting of answers and recording of answered requests.

    The server thread calls `_scripted_answer(token)` once a request has passed validation,
    and `_record(request, token, ok)` once it has been answered. Test threads call the public
    methods. One lock (inside a condition variable) guards all of it.
    """

    def __init__(self, *, record: bool = True) -> None:
        self._cond = threading.Condition()
        self._scripts: Dict[str, Deque[Scripted]] = {}
        self._default: Optional[Scripted] = None
        self._record_requests = record
        self._answered = 0
        self._sent: Counter = Counter()
        self._statuses: Counter = Counter()
        #: Every answered request, in answer order (errors included). Empty when record=False.
        self.received: List[R] = []
        #: Seconds to wait before answering each request (set it from the test thread).
        self.delay: float = 0.0

    # -- scripting (test thread) ---------------------------------------------------------

    def script(self, token: str, responses: Iterable[Any]) -> None:
        """Answer the next requests to `token` with `responses` in order, then 200 again.

        Each entry is (status, reason) or (status, reason, retry_after), or a bare status;
        `reason` is Apple's reason (APNs) or the FcmError errorCode (FCM), defaulted from the
        status when None. Appends to what is already scripted for the token. Requests that
        fail validation (auth, topic, payload...) are answered for that and consume nothing.
        """
        entries = [_as_scripted(e) for e in responses]
        with self._cond:
            self._scripts.setdefault(token, deque()).extend(entries)

    def set_default(
        self, status: Optional[int], reason: Optional[str] = None, retry_after: Optional[int] = None
    ) -> None:
        """Answer every valid request this way (an outage) until `set_default(None)`."""
        with self._cond:
            self._default = None if status is None else _as_scripted((status, reason, retry_after))

    def reset(self) -> None:
        """Forget scripts, the default, the recordings and the delay."""
        with self._cond:
            self._scripts.clear()
            self._default = None
            self.received.clear()
            self._answered = 0
            self._sent.clear()
            self._statuses.clear()
            self.delay = 0.0

    # -- observation (test thread) -------------------------------------------------------

    def wait_for(self, count: int, timeout: float = 10.0) -> bool:
        """Block until at least `count` requests have been answered; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._answered >= count, timeout)

    def sent_tokens(self) -> Counter:
        """Counter of device tokens answered with success (200)."""
        with self._cond:
            return Counter(self._sent)

    @property
    def answered(self) -> int:
        """Number of requests answered (== len(received) when recording)."""
        return self._answered

    def statuses(self) -> Counter:
        """Counter of HTTP statuses answered."""
        with self._cond:
            return Counter(self._statuses)

    # -- server side ---------------------------------------------------------------------

    def _scripted_answer(self, token: Optional[str]) -> Optional[Scripted]:
        with self._cond:
            if self._default is not None:
                return self._default
            queue = self._scripts.get(token) if token is not None else None
            if queue:
                answer = queue.popleft()
                if not queue:
                    del self._scripts[token]
                return answer
        return None

    def _record(self, request: R, token: Optional[str], status: int, sent: bool) -> None:
        with self._cond:
            if self._record_requests:
                self.received.append(request)
            self._answered += 1
            self._statuses[status] += 1
            if sent and token is not None:
                self._sent[token] += 1
            self._cond.notify_all()

    def _remaining_scripts(self) -> Dict[str, Sequence[Scripted]]:
        with self._cond:
            return {k: list(v) for k, v in self._scripts.items()}
