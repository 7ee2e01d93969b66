"""A lean HTTP load generator: raw sockets, one connection per request (uWSGI's http-socket closes
after each answer), latency from connect to the last byte of the body.

closed_loop(): N clients, each sending its next request as soon as the previous one is answered.
open_loop(): requests started at a fixed rate whatever the answers do (a thread pool absorbs slow ones).

Threads, not asyncio: 16 blocking clients spend their time in recv() with the GIL released, and the
code stays small; it runs in the benchmark's process, away from the fakes (their own processes).
"""
from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field


@dataclass
class Answer:
    status: int
    body: bytes
    started: float      # time.time() when the request was started
    latency: float      # seconds, connect to last byte


@dataclass
class Run:
    answers: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    wall: float = 0.0

    @property
    def latencies(self) -> list:
        return [a.latency for a in self.answers]

    @property
    def rate(self) -> float:
        return len(self.answers) / self.wall if self.wall else 0.0

    def statuses(self) -> dict:
        out: dict = {}
        for answer in self.answers:
            out[answer.status] = out.get(answer.status, 0) + 1
        return out


def post_bytes(host: str, port: int, path: str, token: str, body: dict) -> bytes:
    payload = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n").encode() + payload


def request(host: str, port: int, raw: bytes, timeout: float = 120.0) -> Answer:
    """Send one raw request on a new connection; read the answer (by Content-Length, else to EOF)."""
    started = time.time()
    t0 = time.perf_counter()
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(raw)
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed before the headers")
            buffer += chunk
        head, _, body = buffer.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while length is None or len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    return Answer(status, body, started, time.perf_counter() - t0)


def closed_loop(host: str, port: int, make_request, total: int, clients: int = 16, timeout: float = 120.0) -> Run:
    """`clients` threads send `total` requests (make_request(i) -> raw bytes) back to back."""
    run = Run()
    lock = threading.Lock()
    counter = iter(range(total))

    def client() -> None:
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            try:
                answer = request(host, port, make_request(index), timeout)
            except Exception as exc:  # noqa: BLE001 - counted, reported in the table
                with lock:
                    run.errors.append(repr(exc))
                continue
            with lock:
                run.answers.append(answer)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(min(clients, total))]
    t0 = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    run.wall = time.perf_counter() - t0
    return run


def open_loop(host: str, port: int, make_request, rate: float, duration: float, on_tick=None,
              max_in_flight: int = 64, timeout: float = 60.0) -> Run:
    """Start requests at `rate` per second for `duration` seconds. on_tick(second) is called once per
    elapsed second (samplers). A request that cannot start because `max_in_flight` are outstanding
    is counted as an error (the load generator, not the server, would be the limit)."""
    run = Run()
    lock = threading.Lock()
    in_flight = threading.Semaphore(max_in_flight)
    total = int(rate * duration)

    def one(index: int) -> None:
        try:
            answer = request(host, port, make_request(index), timeout)
        except Exception as exc:  # noqa: BLE001
            with lock:
                run.errors.append(repr(exc))
        else:
            with lock:
                run.answers.append(answer)
        finally:
            in_flight.release()

    t0 = time.perf_counter()
    next_tick = 1
    with ThreadPoolExecutor(max_workers=max_in_flight) as pool:
        for index in range(total):
            due = t0 + index / rate
            while True:
                now = time.perf_counter()
                if on_tick is not None and now - t0 >= next_tick:
                    on_tick(next_tick)
                    next_tick += 1
                    continue
                if now >= due:
                    break
                time.sleep(min(due - now, t0 + next_tick - now) if on_tick is not None else due - now)
            if not in_flight.acquire(blocking=False):
                with lock:
                    run.errors.append("load generator saturated")
                continue
            pool.submit(one, index)
        while on_tick is not None and time.perf_counter() - t0 < duration:
            now = time.perf_counter()
            if now - t0 >= next_tick:
                on_tick(next_tick)
                next_tick += 1
            else:
                time.sleep(min(0.05, t0 + next_tick - now))
    run.wall = time.perf_counter() - t0
    if on_tick is not None and next_tick <= duration:
        on_tick(next_tick)
    return run
