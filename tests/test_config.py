"""Settings from the environment: parsed, validated, named in every error; obsolete ones tolerated."""
from __future__ import annotations

import base64
import logging

import pytest

from notifier.config import ConfigError, load_settings


def test_an_unknown_variable_with_our_prefix_stops_the_start_naming_it():
    with pytest.raises(ConfigError, match="^PUSH_FCM_THREDS: unknown variable"):
        load_settings({"PUSH_FCM_THREDS": "8"})


def test_a_bad_value_names_the_variable():
    with pytest.raises(ConfigError, match="^PUSH_FCM_CONNECTIONS: "):
        load_settings({"PUSH_FCM_CONNECTIONS": "0"})


def test_fcm_connections_default_and_override():
    assert load_settings({}).push_fcm_connections == 4
    assert load_settings({"PUSH_FCM_CONNECTIONS": "2"}).push_fcm_connections == 2


def test_the_previous_releases_fcm_threads_is_accepted_ignored_and_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="notifier.config"):
        settings = load_settings({"PUSH_FCM_THREADS": "32"})
    assert not hasattr(settings, "push_fcm_threads")
    assert settings.push_fcm_connections == 4
    assert any("PUSH_FCM_THREADS: no longer used" in record.getMessage() for record in caplog.records)


# ---------------------------------------------------------------- webhooks and retention

def _secret(size: int) -> str:
    return "whsec_" + base64.b64encode(bytes(range(size))).decode()


def test_webhooks_are_off_by_default_and_on_with_a_url_and_a_secret():
    assert load_settings({}).webhooks_enabled is False
    settings = load_settings({"WEBHOOK_URL": "https://hooks.example.com/chat", "WEBHOOK_SECRET": _secret(32)})
    assert settings.webhooks_enabled is True
    assert (settings.webhook_max_attempts, settings.webhook_retry_base, settings.push_retention) == (18, 10.0, 604800)


@pytest.mark.parametrize("size", [24, 64])
def test_secrets_of_24_to_64_bytes_are_accepted(size):
    assert load_settings({"WEBHOOK_URL": "http://127.0.0.1/h", "WEBHOOK_SECRET": _secret(size)}).webhooks_enabled


@pytest.mark.parametrize("secret, why", [
    (_secret(23), "23 bytes"),
    (_secret(65), "65 bytes"),
    ("whsec_not base64!", "not valid base64"),
    (base64.b64encode(bytes(32)).decode(), "must be 'whsec_'"),
])
def test_a_bad_secret_is_refused_without_being_quoted(secret, why):
    with pytest.raises(ConfigError, match=f"^WEBHOOK_SECRET: .*{why}") as raised:
        load_settings({"WEBHOOK_URL": "http://127.0.0.1/h", "WEBHOOK_SECRET": secret})
    assert secret not in str(raised.value) and secret[6:] not in str(raised.value)


@pytest.mark.parametrize("environ, variable", [
    ({"WEBHOOK_URL": "http://127.0.0.1/h"}, "WEBHOOK_SECRET"),
    ({"WEBHOOK_SECRET": _secret(32)}, "WEBHOOK_URL"),
    ({"WEBHOOK_URL": "mailto:ops@example.com", "WEBHOOK_SECRET": _secret(32)}, "WEBHOOK_URL"),
    ({"WEBHOOK_URL": "https://", "WEBHOOK_SECRET": _secret(32)}, "WEBHOOK_URL"),
    ({"PUSH_RETENTION": "0"}, "PUSH_RETENTION"),
    ({"WEBHOOK_MAX_ATTEMPTS": "0"}, "WEBHOOK_MAX_ATTEMPTS"),
    ({"WEBHOOK_TIMEOUT": "5"}, "WEBHOOK_TIMEOUT"),  # not a setting: a typo must not pass silently
])
def test_incomplete_or_bad_webhook_settings_name_the_variable(environ, variable):
    with pytest.raises(ConfigError, match=f"^{variable}: "):
        load_settings(environ)


def test_the_secret_and_the_urls_password_never_reach_the_logged_settings():
    secret = _secret(32)
    settings = load_settings({"WEBHOOK_URL": "https://user:hunter2@hooks.example.com/chat", "WEBHOOK_SECRET": secret})
    logged = str(settings.redacted()) + repr(settings)
    assert secret not in logged and "hunter2" not in logged


# ---------------------------------------------------------------- Web Push and push content

def test_web_push_is_a_dry_run_until_a_vapid_key_is_set(tmp_path):
    assert load_settings({}).webpush_configured is False
    key = tmp_path / "vapid.pem"
    key.write_text("not checked here: the provider loads it at start-up")
    settings = load_settings({"VAPID_PRIVATE_KEY_FILE": str(key), "VAPID_SUBJECT": "mailto:ops@example.com"})
    assert settings.webpush_configured is True


@pytest.mark.parametrize("environ, variable", [
    ({"VAPID_SUBJECT": "ops@example.com"}, "VAPID_SUBJECT"),           # neither mailto: nor https:
    ({"VAPID_SUBJECT": "http://example.com"}, "VAPID_SUBJECT"),
    ({"VAPID_PRIVATE_KEY_FILE": "/nonexistent/vapid.pem"}, "VAPID_PRIVATE_KEY_FILE"),
    ({"WEBPUSH_ALLOWED_HOSTS": "*"}, "WEBPUSH_ALLOWED_HOSTS"),
    ({"WEBPUSH_ALLOWED_HOSTS": "https://fcm.googleapis.com"}, "WEBPUSH_ALLOWED_HOSTS"),
    ({"WEBPUSH_ALLOWED_HOSTS": "push.example.com:99999"}, "WEBPUSH_ALLOWED_HOSTS"),
    ({"PUSH_CONTENT": "none"}, "PUSH_CONTENT"),
    ({"VAPID_KEY": "x"}, "VAPID_KEY"),  # not a setting
])
def test_bad_web_push_settings_name_the_variable(environ, variable):
    with pytest.raises(ConfigError, match=f"^{variable}: "):
        load_settings(environ)


def test_a_vapid_key_needs_a_subject(tmp_path):
    key = tmp_path / "vapid.pem"
    key.write_text("x")
    with pytest.raises(ConfigError, match="^VAPID_SUBJECT: required"):
        load_settings({"VAPID_PRIVATE_KEY_FILE": str(key)})


def test_push_content_defaults_to_full():
    assert load_settings({}).push_content == "full"
    assert load_settings({"PUSH_CONTENT": "ids"}).push_content == "ids"
