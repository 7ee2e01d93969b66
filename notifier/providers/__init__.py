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

import asyncio

from notifier.config import Settings
from notifier.model import Platform
from notifier.providers.apns import APNsProvider
from notifier.providers.base import Provider, shorten_token, tls_context
from notifier.providers.dryrun import DryRunProvider
from notifier.providers.fcm import FCMProvider
from notifier.providers.webpush import WebPushProvider, vapid_public_key
from notifier.retry import RetryPolicy

__all__ = ["Provider", "build_providers", "check_configuration", "shorten_token", "tls_context", "vapid_public_key"]


def build_providers(settings: Settings) -> dict[Platform, Provider]:
    """One provider per platform: real when configured, dry-run otherwise.

    Raises ConfigError (naming the variable) when a configured platform's
    credentials are unusable.
    """
    providers: dict[Platform, Provider] = {}
    if settings.apns_configured:
        providers[Platform.APNS] = APNsProvider(settings)
    else:
        providers[Platform.APNS] = DryRunProvider(Platform.APNS, settings)
    if settings.fcm_configured:
        providers[Platform.FCM] = FCMProvider(settings)
    else:
        providers[Platform.FCM] = DryRunProvider(Platform.FCM, settings)
    if settings.webpush_configured:
        providers[Platform.WEBPUSH] = WebPushProvider(settings)
    else:
        providers[Platform.WEBPUSH] = DryRunProvider(Platform.WEBPUSH, settings)
    return providers


def check_configuration(settings: Settings) -> None:
    """Build the providers once and close them, so a bad key or service account stops the
    service's start-up (naming the variable) instead of surfacing later in the dispatcher."""
    RetryPolicy.from_settings(settings)
    providers = build_providers(settings)

    async def close_all() -> None:
        for provider in providers.values():
            await provider.close()

    asyncio.run(close_all())
