"""At most N pushes in flight for the dispatcher's batches, first come first served.

The dispatcher's lanes each hand over a batch and wait for all of its results; a few worker
coroutines, never more than the limit (PUSH_CONCURRENCY), take the pushes off one queue in
order and send them. A worker ends when the queue is empty, so an idle dispatcher keeps none.
A send that takes longer than the pool's timeout is cancelled and its result is `on_timeout(item)`:
one watchdog timer per pool checks the workers, where a timer per push cost as much as the rest
of this module.

Why not a task per push behind a semaphore, as before: with 2,000 pushes of two batches behind a
limit of 500, every push cost a task, a semaphore wait and its wake-up; in an APNs fan-out that
was about a tenth of the dispatcher's CPU, against a lean client's none. Here a push costs a
queue entry.
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import Awaitable, Callable


class _Batch:
    __slots__ = ("size", "results", "future")

    def __init__(self, size: int, future: asyncio.Future) -> None:
        self.size = size
        self.results: list = []
        self.future = future


class _Worker:
    __slots__ = ("task", "started", "expired")

    def __init__(self) -> None:
        self.task: asyncio.Task | None = None
        self.started: float | None = None  # loop time its current send began
        self.expired = False               # the watchdog cancelled its current send


class SendPool:
    """Runs `send(item)` for the items of every batch given to `run`, at most `limit` at a time;
    a send running past `timeout` seconds is cancelled and `on_timeout(item)` is its result
    (it is noticed within a quarter of the timeout after it passes)."""

    def __init__(self, limit: int, send: Callable[[object], Awaitable[object]], timeout: float,
                 on_timeout: Callable[[object], object]) -> None:
        if limit < 1 or timeout <= 0:
            raise ValueError("limit must be >= 1 and timeout > 0")
        self.limit = limit
        self.timeout = timeout
        self._send = send
        self._on_timeout = on_timeout
        self._queue: deque[tuple[object, _Batch]] = deque()
        self._workers: set[_Worker] = set()
        self._watchdog: asyncio.TimerHandle | None = None

    @property
    def in_flight(self) -> int:
        """Workers running (each has at most one item in flight)."""
        return len(self._workers)

    async def run(self, items: list) -> list:
        """Send every item, behind the items already queued; return the results of `send`, in the
        order they completed. Cancelled, the items not yet taken are still sent (their results
        dropped): call cancel() to stop everything."""
        if not items:
            return []
        loop = asyncio.get_running_loop()
        batch = _Batch(len(items), loop.create_future())
        self._queue.extend((item, batch) for item in items)
        for _ in range(min(self.limit - len(self._workers), len(self._queue))):
            worker = _Worker()
            worker.task = loop.create_task(self._work(worker))
            self._workers.add(worker)
            worker.task.add_done_callback(lambda _, w=worker: self._workers.discard(w))
        if self._watchdog is None:
            self._watchdog = loop.call_later(self.timeout / 4, self._watch)
        return await batch.future

    def cancel(self) -> None:
        """Stop every worker; the batches they were sending fail with CancelledError."""
        for worker in list(self._workers):
            worker.task.cancel()
        while self._queue:
            _, batch = self._queue.popleft()
            batch.future.cancel()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _watch(self) -> None:
        self._watchdog = None
        if not self._workers:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        for worker in self._workers:
            if worker.started is not None and now - worker.started > self.timeout and not worker.expired:
                worker.expired = True
                worker.task.cancel()
        self._watchdog = loop.call_later(self.timeout / 4, self._watch)

    async def _work(self, worker: _Worker) -> None:
        queue = self._queue
        loop = asyncio.get_running_loop()
        while queue:
            item, batch = queue.popleft()
            worker.started = loop.time()
            try:
                result = await self._send(item)
            except asyncio.CancelledError:
                if not worker.expired:  # cancelled from outside: stop
                    batch.future.cancel()
                    raise
                worker.expired = False
                worker.task.uncancel()
                result = self._on_timeout(item)
            except Exception as exc:  # the batch fails; the worker goes on with the others' items
                if not batch.future.done():
                    batch.future.set_exception(exc)
                continue
            finally:
                worker.started = None
            batch.results.append(result)
            if len(batch.results) == batch.size and not batch.future.done():
                batch.future.set_result(batch.results)
