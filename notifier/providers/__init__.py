"""Push providers: one small class per platform, one method that matters.

The interface (Sygnal's "pushkin", reduced)::

    class Provider(Protocol):
        platform: Platform
        async def send(self, push: Push) -> Result: ...
        async def close(self) -> None: ...

- ``send`` sends ONE notification to ONE device and returns its classified
  :class:`~notifier.model.Result` (outcome via :func:`notifier.classify.classify`,
  HTTP status or None, provider reason, Retry-After seconds). It never raises for
  a provider's answer or a network failure: a dead token is a return value
  (``Outcome.DEAD_TOKEN``), a timeout or a lost connection is ``Outcome.TRANSIENT``
  with ``status=None``. It does not retry: the dispatcher owns the one retry
  layer. It is safe to call concurrently from many tasks of one event loop; the
  provider bounds nothing itself beyond the provider's own limits (the caller
  bounds concurrency).
- ``close`` releases connections and threads; the provider is unusable afterwards.
- Providers never touch the database and never log a push token, a key or a
  bearer token (tokens are shortened with :func:`shorten_token`).

:func:`build_providers` returns one provider per platform: the real one when the
platform's credentials are configured, else :class:`~notifier.providers.dryrun.DryRunProvider`
(``Result(Outcome.SKIPPED, reason="dry_run")``, payload logged). Construction
validates the configuration and raises :class:`~notifier.config.ConfigError`
naming the variable. Call it inside the process that will send (after fork),
ideally inside the running event loop; no connection is opened before the
first ``send``.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from notifier.config import Settings
from notifier.model import Platform, Push, Result

__all__ = ["Provider", "build_providers", "check_configuration", "shorten_token", "tls_context"]


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
    import ssl

    from notifier.config import ConfigError

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


def build_providers(settings: Settings) -> dict[Platform, Provider]:
    """One provider per platform: real when configured, dry-run otherwise.

    Raises ConfigError (naming the variable) when a configured platform's
    credentials are unusable.
    """
    # imported here: the real providers pull in aioapns / pyfcm, which a dry-run
    # deployment (or the web layer) does not need at import time
    from notifier.providers.dryrun import DryRunProvider

    providers: dict[Platform, Provider] = {}
    if settings.apns_configured:
        from notifier.providers.apns import APNsProvider
        providers[Platform.APNS] = APNsProvider(settings)
    else:
        providers[Platform.APNS] = DryRunProvider(Platform.APNS, settings)
    if settings.fcm_configured:
        from notifier.providers.fcm import FCMProvider
        providers[Platform.FCM] = FCMProvider(settings)
    else:
        providers[Platform.FCM] = DryRunProvider(Platform.FCM, settings)
    return providers


def check_configuration(settings: Settings) -> None:
    """Build the providers once and close them, so a bad key or service account stops the
    service's start-up (naming the variable) instead of surfacing later in the dispatcher."""
    import asyncio

    from notifier.retry import RetryPolicy

    RetryPolicy.from_settings(settings)
    providers = build_providers(settings)

    async def close_all() -> None:
        for provider in providers.values():
            await provider.close()

    asyncio.run(close_all())
