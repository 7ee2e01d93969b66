"""What the HTTP/2 fakes (APNs, FCM) share: h2 settings the fake enforces itself, hpack's Huffman
decoder memoized, and the writing side of a server connection (one write per loop pass)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from typing import Any, Awaitable, Callable, Collection, Dict, List, Optional

from h2.settings import Settings

UNLIMITED = 2**31 - 1


def install_huffman_memo() -> None:
    """Memoize hpack's Huffman decoder (a pure function of its bytes argument).

    HTTP/2 clients (h2, so aioapns too) send `authorization` as a never-indexed literal, so
    the same ~200-byte JWT is Huffman-decoded, in pure Python, on every request: about a
    third of the fake's CPU per request. The memo returns the same bytes for the same input,
    so hpack's behaviour is unchanged for everyone in the process. Installed by start();
    does nothing if hpack's layout is not the one expected.
    """
    try:
        import hpack.hpack as hpack_module
    except ImportError:  # pragma: no cover
        return
    current = getattr(hpack_module, "decode_huffman", None)
    if current is None or getattr(current, "_apns_fake_memo", False):
        return

    cache: Dict[bytes, bytes] = {}

    def decode_huffman(data: Any) -> bytes:
        key = bytes(data) if data is not None else b""
        hit = cache.get(key)
        if hit is None:
            hit = current(data)
            if len(cache) >= 4096:
                cache.clear()
            cache[key] = hit
        return hit

    decode_huffman._apns_fake_memo = True  # type: ignore[attr-defined]
    hpack_module.decode_huffman = decode_huffman


class AdvertisedSettings(Settings):
    """Local settings whose MAX_CONCURRENT_STREAMS h2 sends but does not enforce.

    h2 enforces its own advertised limit as a *connection* error, and from the moment it is
    set rather than from when the client acknowledged it; so a client that opens streams
    before it has read the server's first SETTINGS (aioapns does) would lose the whole
    connection. The fake enforces the limit itself (see each fake's _on_request).
    """

    @property
    def max_concurrent_streams(self) -> int:  # type: ignore[override]
        return UNLIMITED


class H2Writing:
    """The writing side of an asyncio + h2 server connection. The class using it has `h2`,
    `transport`, `closed` and `flush_scheduled`."""

    h2: Any
    transport: Any
    closed: bool
    flush_scheduled: bool

    def _schedule_flush(self) -> None:
        # answers and timers of the same loop iteration share one write
        if not self.flush_scheduled and not self.closed:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self.flush_scheduled = False
        if self.closed or self.transport is None or self.h2 is None:
            return
        data = self.h2.data_to_send()
        if data:
            self.transport.write(data)

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        """Drop the connection at once (no close handshake)."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


def serve_forever(loop: asyncio.AbstractEventLoop, protocol_factory: Callable[[], asyncio.Protocol],
                  sock: socket.socket, ssl_ctx: ssl.SSLContext, ready: threading.Event,
                  failure: List[BaseException], connections: Callable[[], Collection[Any]],
                  on_exception: Callable[[asyncio.AbstractEventLoop, Dict[str, Any]], None],
                  shutdown: Optional[Callable[[], Awaitable[None]]] = None) -> None:
    """A fake's loop thread: serve TLS connections on `sock` until the loop is stopped, then
    await `shutdown()` if given (a server framework's own graceful close), drop the connections
    still open (`connections()`: objects with abort()), cancel the tasks left and close the loop.
    A failure to start is put in `failure`; `ready` is set either way."""
    asyncio.set_event_loop(loop)
    loop.set_exception_handler(on_exception)
    try:
        server = loop.run_until_complete(
            loop.create_server(protocol_factory, sock=sock, ssl=ssl_ctx, backlog=1024, ssl_handshake_timeout=10))
    except BaseException as exc:  # noqa: BLE001 - reported to the starter
        failure.append(exc)
        sock.close()
        ready.set()
        loop.close()
        return
    ready.set()
    try:
        loop.run_forever()
    finally:
        server.close()
        if shutdown is not None:
            try:
                loop.run_until_complete(asyncio.wait_for(shutdown(), 2))
            except Exception:  # noqa: BLE001 - the connections are aborted below all the same
                pass
        for conn in list(connections()):
            conn.abort()
        # let connection_lost callbacks and transport closes run
        for _ in range(3):
            loop.run_until_complete(asyncio.sleep(0))
        tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.close()
