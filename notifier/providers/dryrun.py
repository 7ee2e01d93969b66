"""The provider used when a platform has no credentials: log the payload, send nothing."""
from __future__ import annotations

import json
import logging

from notifier.config import Settings
from notifier.model import Outcome, Platform, Push, Result
from notifier.payload import apns_collapse_id, apns_id, apns_payload, fcm_message, webpush_payload, webpush_topic
from notifier.providers.base import shorten_token

logger = logging.getLogger(__name__)

DRY_RUN = "dry_run"


class DryRunProvider:
    """Records every push as skipped (reason "dry_run") and logs what would have been sent."""

    def __init__(self, platform: Platform, settings: Settings | None = None) -> None:
        self.platform = Platform(platform)
        settings = settings if settings is not None else Settings()
        self._ttl = settings.push_ttl
        self._content = settings.push_content

    async def send(self, push: Push) -> Result:
        if self.platform is Platform.APNS:
            payload = apns_payload(push, content=self._content).decode("utf-8")
            extra = f"apns-id={apns_id(push.message_id, push.device_id)} " \
                    f"apns-collapse-id={apns_collapse_id(push.message_id)}"
        elif self.platform is Platform.WEBPUSH:
            payload = webpush_payload(push, content=self._content).decode("utf-8")
            extra = f"topic={webpush_topic(push.message_id)}"
        else:
            message = fcm_message(push, self._ttl, content=self._content)
            message["fcm_token"] = shorten_token(push.token)
            payload = json.dumps(message, ensure_ascii=False, separators=(",", ":"))
            extra = ""
        logger.info("dry-run %s: delivery %s to %s %s payload=%s", self.platform.value,
                    push.delivery_id, shorten_token(push.token), extra, payload)
        return Result(Outcome.SKIPPED, reason=DRY_RUN)

    async def close(self) -> None:
        return None
