"""The push notifier: everything the web layer uses from it, and the only thing it imports.

`chat_app` imports `notifier` and these names, never a module inside it (an import-linter
contract in .importlinter checks it, in `make test`). The modules behind them are the notifier's
own business and may be rearranged freely.

- configuration: `Settings`, `load_settings`, `resolve_database_url`, `check_configuration`,
  `vapid_public_key` (what browsers subscribe with)
- Web Push endpoints: `parse_allowed_hosts`, `check_endpoint` (WEBPUSH_ALLOWED_HOSTS, the SSRF guard)
- the database: `make_engine`, `migrate`, `writer` / `Writer` (write transactions),
  `autocommit` (reads without a transaction), `ping`,
  `DriverStatement` (a statement run on the driver, for the request path), and the schema's tables
  the web layer owns the rows of (`users`, `chats`, `members`, `messages`, the `Id` type)
- pushes: `enqueue` (a message's push job, in the message's own transaction) and `Waker` (start
  or nudge this host's dispatcher; the watchdog)
- devices: `insert_device`, `rebind_device`, `device_by_token`, `device_owner`, `list_devices`,
  `disable_devices`
- reports: `delivery_report`, `queue_depth`, `webhook_backlog`, `dispatcher_status`,
  `render_metrics`, `HEARTBEAT_STALE_AFTER`
- vocabulary: `DeliveryState`, `iso`
- the operator dashboard: `dashboard_summary` (the last hour and the queue, for /ops/api/summary)
"""
from notifier.completion import delivery_report
from notifier.dashboard import summary as dashboard_summary
from notifier.config import Settings, load_settings, resolve_database_url
from notifier.db import DriverStatement, Writer, autocommit, make_engine, migrate, ping, writer
from notifier.devices import (device_by_token, device_owner, disable_devices, insert_device, list_devices,
                              rebind_device)
from notifier.endpoints import check_endpoint, parse_allowed_hosts
from notifier.events import backlog as webhook_backlog
from notifier.metrics import HEARTBEAT_STALE_AFTER
from notifier.metrics import render as render_metrics
from notifier.model import DeliveryState, iso
from notifier.outbox import enqueue, queue_depth
from notifier.providers import check_configuration, vapid_public_key
from notifier.registry import dispatcher_status
from notifier.schema import Id, chats, members, messages, users
from notifier.waker import Waker

__all__ = [
    "Settings", "load_settings", "resolve_database_url", "check_configuration", "vapid_public_key",
    "parse_allowed_hosts", "check_endpoint",
    "make_engine", "migrate", "writer", "Writer", "autocommit", "ping", "DriverStatement",
    "users", "chats", "members", "messages", "Id",
    "enqueue", "Waker",
    "insert_device", "rebind_device", "device_by_token", "device_owner", "list_devices", "disable_devices",
    "delivery_report", "queue_depth", "webhook_backlog", "dispatcher_status", "render_metrics",
    "HEARTBEAT_STALE_AFTER",
    "DeliveryState", "iso",
    "dashboard_summary",
]
