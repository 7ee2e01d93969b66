"""Settings of the service, read once from the environment and validated.

Both packages use this module: the web layer for the database URL and the
dispatcher's wake-up, the notifier for everything about pushes. A malformed
value, or an unknown variable with a prefix we own (APNS_, FCM_, PUSH_, WEBHOOK_, VAPID_, WEBPUSH_), fails
fast with a ConfigError naming the variable.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
import os
import socket
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from notifier.endpoints import DEFAULT_ALLOWED_HOSTS, parse_allowed_hosts

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATABASE_URL = "sqlite:///var/chat.sqlite3"
DEFAULT_FCM_ENDPOINT = "https://fcm.googleapis.com/v1/projects"
OWNED_PREFIXES = ("APNS_", "FCM_", "PUSH_", "WEBHOOK_", "VAPID_", "WEBPUSH_")

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration variable is missing, malformed or unknown."""


@dataclass(frozen=True)
class Settings:
    """Every knob of the service. Plain values only, so it pickles to a spawned child."""

    # repr=False: a password in a URL, and the webhook secret, stay out of tracebacks and reprs
    # (redacted() is what logs show)
    database_url: str = field(default=DEFAULT_DATABASE_URL, repr=False)
    # APNs
    apns_key_file: str | None = None
    apns_key_id: str | None = None
    apns_team_id: str | None = None
    apns_topic: str | None = None
    apns_cert_file: str | None = None
    apns_sandbox: bool = False
    apns_endpoint: str | None = None
    # FCM
    fcm_service_account_file: str | None = None
    fcm_project_id: str | None = None
    fcm_endpoint: str = DEFAULT_FCM_ENDPOINT
    # Web Push: the VAPID key (a PEM EC P-256 private key) and the subject push services may contact
    vapid_private_key_file: str | None = None
    vapid_subject: str | None = None
    webpush_allowed_hosts: str = DEFAULT_ALLOWED_HOSTS
    # shared by the providers
    push_content: str = "full"  # "ids": no chat name and no text leave the server
    push_ca_file: str | None = None
    push_ttl: int = 86400
    push_max_attempts: int = 8
    push_concurrency: int = 500
    push_idle_exit: float = 60.0
    push_lease: float = 60.0
    push_batch: int = 1000
    push_retry_base: float = 1.0
    push_retry_max: float = 300.0
    push_dispatcher: str = "process"
    push_run_dir: str = "var/run"
    push_host_id: str = field(default_factory=socket.gethostname)
    push_fcm_connections: int = 4
    # how long finished work (delivery rows, push jobs, webhook events) is kept, in seconds
    push_retention: float = 7 * 86400.0
    # result webhooks: off unless both are set
    webhook_url: str | None = field(default=None, repr=False)
    webhook_secret: str | None = field(default=None, repr=False)
    webhook_max_attempts: int = 18
    webhook_retry_base: float = 10.0
    webhook_concurrency: int = 8
    # the operator dashboard (/ops/, HTTP Basic user `ops`): off unless set
    ops_password: str | None = field(default=None, repr=False)

    @property
    def apns_configured(self) -> bool:
        """True when APNs credentials (a .p8 key or a certificate) are set."""
        return bool(self.apns_key_file or self.apns_cert_file)

    @property
    def webpush_configured(self) -> bool:
        """True when a VAPID key is set (Web Push is sent, not dry-run)."""
        return bool(self.vapid_private_key_file)

    @property
    def fcm_configured(self) -> bool:
        """True when FCM credentials are set."""
        return bool(self.fcm_service_account_file)

    @property
    def webhooks_enabled(self) -> bool:
        """True when result webhooks are configured (WEBHOOK_URL and WEBHOOK_SECRET)."""
        return bool(self.webhook_url and self.webhook_secret)

    @property
    def ops_enabled(self) -> bool:
        """True when the operator dashboard is served (OPS_PASSWORD is set)."""
        return bool(self.ops_password)

    @property
    def run_dir(self) -> Path:
        """Where the dispatcher keeps its lock file and wake-up socket."""
        path = Path(self.push_run_dir)
        return path if path.is_absolute() else PROJECT_ROOT / path

    def redacted(self) -> dict:
        """The settings as a dict fit for logs: paths and ids are shown, the URL's password is not."""
        values = dataclasses.asdict(self)
        values["database_url"] = _redact_url(self.database_url)
        if self.webhook_secret is not None:
            values["webhook_secret"] = "***"
        if self.ops_password is not None:
            values["ops_password"] = "***"
        values["webhook_url"] = _redact_url(self.webhook_url) if self.webhook_url else None
        return values


# variable name -> (field name, parser)
def _text(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value.strip()


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be 1 or 0")


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("must be a positive integer")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0 or number == float("inf"):
        raise ValueError("must be a positive number")
    return number


def _endpoint(value: str) -> str:
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("must be host:port")
    return value.strip()


def _url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError("must be an http(s) URL")
    return value.rstrip("/")


def _webhook_url(value: str) -> str:
    parsed = urllib.parse.urlsplit(value.strip())
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError("must be an http(s) URL with a host")
    return value.strip()


def _webhook_secret(value: str) -> str:
    # never quote the value in the message: it is a secret
    prefix = "whsec_"
    if not value.startswith(prefix):
        raise ValueError("must be 'whsec_' followed by the base64 of 24 to 64 random bytes")
    try:
        key = base64.b64decode(value[len(prefix):], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the part after 'whsec_' is not valid base64") from None
    if not 24 <= len(key) <= 64:
        raise ValueError(f"the key is {len(key)} bytes; it must be 24 to 64")
    return value


OPS_PASSWORD_LENGTH = (16, 1024)  # characters: long enough to resist guessing over HTTP, short enough to hash


def _ops_password(value: str) -> str:
    # never quote the value in the message: it is a secret
    shortest, longest = OPS_PASSWORD_LENGTH
    if not shortest <= len(value) <= longest:
        raise ValueError(f"must be {shortest} to {longest} characters long (it is {len(value)})")
    if not value.isprintable() or value != value.strip():
        raise ValueError("must be printable characters, without leading or trailing spaces")
    return value


def _push_content(value: str) -> str:
    if value not in ("full", "ids"):
        raise ValueError("must be 'full' or 'ids'")
    return value


def _vapid_subject(value: str) -> str:
    # RFC 8292: a contact the push service can use: mailto: or https:
    parsed = urllib.parse.urlsplit(value.strip())
    if parsed.scheme == "mailto" and "@" in parsed.path:
        return value.strip()
    if parsed.scheme == "https" and parsed.hostname:
        return value.strip()
    raise ValueError("must be a mailto: address or an https: URL")


def _allowed_hosts(value: str) -> str:
    parse_allowed_hosts(value)  # raises ValueError naming what is wrong
    return value


def _database_url(value: str) -> str:
    if not value.startswith(("sqlite://", "postgresql://", "postgresql+psycopg://")):
        raise ValueError("must be sqlite:///PATH or postgresql://...")
    return value


def _dispatcher_mode(value: str) -> str:
    if value not in ("process", "external"):
        raise ValueError("must be 'process' or 'external'")
    return value


def _readable_file(value: str) -> str:
    path = Path(value)
    if not path.is_file() or not os.access(path, os.R_OK):
        raise ValueError(f"file not found or unreadable: {value}")
    return value


VARIABLES: dict[str, tuple[str, callable]] = {
    "DATABASE_URL": ("database_url", _database_url),
    "APNS_KEY_FILE": ("apns_key_file", _readable_file),
    "APNS_KEY_ID": ("apns_key_id", _text),
    "APNS_TEAM_ID": ("apns_team_id", _text),
    "APNS_TOPIC": ("apns_topic", _text),
    "APNS_CERT_FILE": ("apns_cert_file", _readable_file),
    "APNS_SANDBOX": ("apns_sandbox", _bool),
    "APNS_ENDPOINT": ("apns_endpoint", _endpoint),
    "FCM_SERVICE_ACCOUNT_FILE": ("fcm_service_account_file", _readable_file),
    "FCM_PROJECT_ID": ("fcm_project_id", _text),
    "FCM_ENDPOINT": ("fcm_endpoint", _url),
    "PUSH_CA_FILE": ("push_ca_file", _readable_file),
    "PUSH_TTL": ("push_ttl", _positive_int),
    "PUSH_MAX_ATTEMPTS": ("push_max_attempts", _positive_int),
    "PUSH_CONCURRENCY": ("push_concurrency", _positive_int),
    "PUSH_IDLE_EXIT": ("push_idle_exit", _positive_float),
    "PUSH_LEASE": ("push_lease", _positive_float),
    "PUSH_BATCH": ("push_batch", _positive_int),
    "PUSH_RETRY_BASE": ("push_retry_base", _positive_float),
    "PUSH_RETRY_MAX": ("push_retry_max", _positive_float),
    "PUSH_DISPATCHER": ("push_dispatcher", _dispatcher_mode),
    "PUSH_RUN_DIR": ("push_run_dir", _text),
    "PUSH_HOST_ID": ("push_host_id", _text),
    "PUSH_FCM_CONNECTIONS": ("push_fcm_connections", _positive_int),
    "PUSH_RETENTION": ("push_retention", _positive_float),
    "PUSH_CONTENT": ("push_content", _push_content),
    "VAPID_PRIVATE_KEY_FILE": ("vapid_private_key_file", _readable_file),
    "VAPID_SUBJECT": ("vapid_subject", _vapid_subject),
    "WEBPUSH_ALLOWED_HOSTS": ("webpush_allowed_hosts", _allowed_hosts),
    "WEBHOOK_URL": ("webhook_url", _webhook_url),
    "WEBHOOK_SECRET": ("webhook_secret", _webhook_secret),
    "WEBHOOK_MAX_ATTEMPTS": ("webhook_max_attempts", _positive_int),
    "WEBHOOK_RETRY_BASE": ("webhook_retry_base", _positive_float),
    "WEBHOOK_CONCURRENCY": ("webhook_concurrency", _positive_int),
    "OPS_PASSWORD": ("ops_password", _ops_password),
}


# variables of an earlier release that no longer do anything: accepted, with a warning, so an
# upgrade does not refuse to start over a setting that has become pointless
OBSOLETE = {
    "PUSH_FCM_THREADS": "FCM is sent over HTTP/2 on the dispatcher's event loop, without threads; "
                        "PUSH_FCM_CONNECTIONS bounds its connections",
}


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from the environment; raise ConfigError naming the first bad variable."""
    environ = os.environ if environ is None else environ
    for name in environ:
        if name in OBSOLETE:
            logger.warning("%s: no longer used and ignored (%s)", name, OBSOLETE[name])
        elif name.startswith(OWNED_PREFIXES) and name not in VARIABLES:
            raise ConfigError(f"{name}: unknown variable (known: {', '.join(sorted(VARIABLES))})")
    values = {}
    for name, (attribute, parse) in VARIABLES.items():
        if name not in environ:
            continue
        try:
            values[attribute] = parse(environ[name])
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None
    settings = Settings(**values)
    _check_combinations(settings)
    return settings


def _check_combinations(settings: Settings) -> None:
    if settings.apns_key_file and settings.apns_cert_file:
        raise ConfigError("APNS_KEY_FILE and APNS_CERT_FILE: set one of them, not both")
    if settings.apns_key_file:
        for name in ("APNS_KEY_ID", "APNS_TEAM_ID"):
            if getattr(settings, name.lower()) is None:
                raise ConfigError(f"{name}: required with APNS_KEY_FILE")
    if settings.apns_configured and settings.apns_topic is None:
        raise ConfigError("APNS_TOPIC: required when APNs credentials are set")
    if settings.fcm_service_account_file and settings.fcm_project_id is None:
        raise ConfigError("FCM_PROJECT_ID: required with FCM_SERVICE_ACCOUNT_FILE")
    if settings.vapid_private_key_file and not settings.vapid_subject:
        raise ConfigError("VAPID_SUBJECT: required with VAPID_PRIVATE_KEY_FILE (mailto: or https:)")
    if bool(settings.webhook_url) != bool(settings.webhook_secret):
        missing = "WEBHOOK_SECRET" if settings.webhook_url else "WEBHOOK_URL"
        raise ConfigError(f"{missing}: required with {'WEBHOOK_URL' if settings.webhook_url else 'WEBHOOK_SECRET'}")


def resolve_database_url(url: str) -> str:
    """Make a relative SQLite path relative to the project root, so the cwd does not matter."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and url != "sqlite:///:memory:":
        return prefix + str(PROJECT_ROOT / url[len(prefix):])
    return url


def _redact_url(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else url
