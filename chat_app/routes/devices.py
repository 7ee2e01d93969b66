"""Push devices of the caller: register (phones and browsers), list, delete; the VAPID key browsers
subscribe with."""
from __future__ import annotations

from bottle import request, response
import sqlalchemy as sa

from chat_app import validation
from chat_app.errors import ApiError, forbidden, invalid_field, not_found
import notifier

PLATFORMS = ("apns", "fcm", "webpush")


def register(app, ctx) -> None:
    """Add the device routes to `app`."""
    allowed = notifier.parse_allowed_hosts(ctx.settings.webpush_allowed_hosts)
    public_key = (notifier.vapid_public_key(ctx.settings.vapid_private_key_file)
                  if ctx.settings.vapid_private_key_file else None)

    @app.get("/v1/webpush/key")
    def webpush_key():
        if public_key is None:
            raise not_found("VAPID key (Web Push is not configured)")
        return {"public_key": public_key}

    @app.post("/v1/devices")
    def add_device():
        with ctx.read() as conn:
            user = ctx.user(conn)
        body = validation.read_json_object(request, ctx.max_body)
        platform = body.get("platform")
        if platform not in PLATFORMS:
            raise invalid_field("platform", "must be 'apns', 'fcm' or 'webpush'")
        keys = None
        if platform == "webpush":
            token, *keys = validation.webpush_subscription(body, allowed)
            app_id = None
        else:
            token = validation.device_token(platform, body.get("token"))
            app_id = validation.text(body, "app", 255, required=False)
            if app_id is None and platform == "apns":
                app_id = ctx.settings.apns_topic
        try:
            status, device = _bind(ctx, user["id"], platform, token, app_id, keys)
        except sa.exc.IntegrityError:
            # another request registered the same token between our read and our insert
            status, device = _bind(ctx, user["id"], platform, token, app_id, keys)
        response.status = status
        return device

    @app.get("/v1/devices")
    def my_devices():
        with ctx.read() as conn:
            user = ctx.user(conn)
            return {"devices": notifier.list_devices(conn, user["id"])}

    @app.delete("/v1/devices/<device_id:id>")
    def delete_device(device_id):
        with ctx.write() as conn:
            user = ctx.user(conn)
            device_id = validation.path_id(device_id)
            owner = notifier.device_owner(conn, device_id) if device_id else None
            if owner is None:
                raise not_found("device")
            if owner != user["id"]:
                raise forbidden("this device belongs to another user")
            notifier.disable_devices(conn, [device_id], "deleted")
        response.status = 204
        return ""


def _bind(ctx, user_id: int, platform: str, token: str, app_id: str | None,
          keys: list[str] | None) -> tuple[int, dict]:
    """Register `token` for the user: (201, device) when new to them, (200, device) when they had it.
    `keys`: a Web Push subscription's (p256dh, auth), stored, never echoed."""
    keys = tuple(keys) if keys else None
    with ctx.write() as conn:
        existing = notifier.device_by_token(conn, token)
        if existing is None:
            return 201, notifier.insert_device(conn, user_id, platform, token, app_id, ctx.clock(), keys)
        if existing.user_id == user_id and existing.enabled:
            if existing.platform != platform:
                raise ApiError(409, "conflict", f"this token is already registered as a {existing.platform} device")
            if app_id != existing.app or (keys and keys != (existing.p256dh, existing.auth)):
                return 200, notifier.rebind_device(conn, existing.id, user_id, platform, app_id, keys)
            return 200, {"id": existing.id, "platform": existing.platform, "token": existing.token,
                         "app": existing.app}
        # the phone changed hands, or was deleted or unregistered and comes back
        return 201, notifier.rebind_device(conn, existing.id, user_id, platform, app_id, keys)
