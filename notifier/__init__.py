"""The push dispatcher: outbox claiming, PushProcess, providers, retries.

What the web layer uses: `Waker` (start or nudge this host's dispatcher, and the watchdog), and the
modules `db` (engine, write transactions, migrate), `devices`, `outbox` (enqueue, the delivery
report, queue depth), `registry` (dispatchers alive), `config`, `model` and `metrics`; its WSGI
entry point also calls `providers.check_configuration` at start-up.
"""
from notifier.waker import Waker

__all__ = ["Waker"]
