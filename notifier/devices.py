"""Devices: a push token per phone or browser, who owns it, and whether it still receives."""
from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from notifier.schema import devices


def _device_dict(row) -> dict:
    return {"id": row.id, "platform": row.platform, "token": row.token, "app": row.app}


def device_by_token(conn: Connection, token: str):
    """The device row holding this token, or None."""
    return conn.execute(sa.select(devices).where(devices.c.token == token)).first()


def insert_device(conn: Connection, user_id: int, platform: str, token: str, app: str | None, now: float,
                  keys: tuple[str, str] | None = None) -> dict:
    """Insert a new enabled device (`keys`: a Web Push subscription's p256dh and auth)."""
    p256dh, auth = keys or (None, None)
    device_id = conn.execute(
        devices.insert().values(user_id=user_id, platform=platform, token=token, app=app, p256dh=p256dh,
                                auth=auth, enabled=True, created_at=now).returning(devices.c.id)
    ).scalar_one()
    return {"id": device_id, "platform": platform, "token": token, "app": app}


def rebind_device(conn: Connection, device_id: int, user_id: int, platform: str, app: str | None,
                  keys: tuple[str, str] | None = None) -> dict:
    """Give an existing token row to `user_id` and enable it again (a phone changed hands or came
    back; a browser's subscription got new keys)."""
    p256dh, auth = keys or (None, None)
    conn.execute(
        devices.update().where(devices.c.id == device_id)
        .values(user_id=user_id, platform=platform, app=app, p256dh=p256dh, auth=auth, enabled=True,
                disabled_reason=None)
    )
    return {"id": device_id, "platform": platform, "token": device_token(conn, device_id), "app": app}


def device_token(conn: Connection, device_id: int) -> str:
    """The token of a device."""
    return conn.execute(sa.select(devices.c.token).where(devices.c.id == device_id)).scalar_one()


def list_devices(conn: Connection, user_id: int) -> list[dict]:
    """The user's enabled devices, oldest first."""
    rows = conn.execute(
        sa.select(devices).where(devices.c.user_id == user_id, devices.c.enabled.is_(True)).order_by(devices.c.id)
    )
    return [_device_dict(row) for row in rows]


def device_owner(conn: Connection, device_id: int) -> int | None:
    """The owner of an enabled device, or None when there is no such device."""
    return conn.execute(
        sa.select(devices.c.user_id).where(devices.c.id == device_id, devices.c.enabled.is_(True))
    ).scalar()


def disable_devices(conn: Connection, device_ids: Sequence[int], reason: str) -> None:
    """Stop pushing to these devices; later messages skip them."""
    if device_ids:
        conn.execute(
            devices.update().where(devices.c.id.in_(list(device_ids)))
            .values(enabled=False, disabled_reason=reason)
        )


def disable_dead_devices(conn: Connection, dead: Sequence[tuple[int, str | None]]) -> list[dict]:
    """Disable the devices whose provider said the token is dead ((device id, provider reason)
    pairs); returns those this call disabled (not those disabled already), with their owner."""
    disabled = []
    reasons: dict[int, str | None] = dict(dead)
    if reasons:
        rows = conn.execute(
            devices.update().where(devices.c.id.in_(sorted(reasons)), devices.c.enabled.is_(True))
            .values(enabled=False, disabled_reason="unregistered")
            .returning(devices.c.id, devices.c.user_id, devices.c.platform)
        ).all()
        disabled = [{"device_id": r.id, "user_id": r.user_id, "platform": r.platform,
                     "reason": reasons[r.id] or "unregistered"} for r in sorted(rows)]
    return disabled
