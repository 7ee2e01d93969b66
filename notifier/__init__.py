"""The push dispatcher: outbox claiming, PushProcess, providers, retries.

Public surface for the web layer: `Waker` (start or nudge this host's dispatcher).
"""
from notifier.waker import Waker

__all__ = ["Waker"]
