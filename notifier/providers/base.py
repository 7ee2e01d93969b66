"""What every provider shares: the Provider interface, token shortening for logs, the TLS context.

A leaf of the providers package: the platforms import it, and it imports none of them.
"""
from __future__ import annotations

import ssl
from typing import Protocol, runtime_checkable

from notifier.config import ConfigError
from notifier.model import Platform, Push, Result


@runtime_checkable
class Provider(Protocol):
    """What the dispatcher needs from a push provider."""

    platform: Platform

    async def send(self, push: Push) -> Result:
        """Send one push; return its classified Result. Never raises for provider or network errors."""

    async def close(self) -> None:
        """Release connections and threads."""


def shorten_token(token: str | None) -> str:
    """A push token fit for logs: its first 8 characters and "…"."""
    if not token:
        return "<none>"
    return token[:8] + "…"


def tls_context(ca_file: str | None, alpn: list[str] | None = None):
    """An SSLContext trusting the system CAs plus PUSH_CA_FILE (proxies, tests), with optional ALPN."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ConfigError(f"PUSH_CA_FILE: cannot load CA certificates from {ca_file} "
                              f"({type(exc).__name__})") from None
    if alpn:
        context.set_alpn_protocols(alpn)
    return context
