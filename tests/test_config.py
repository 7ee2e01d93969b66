"""Settings from the environment: parsed, validated, named in every error; obsolete ones tolerated."""
from __future__ import annotations

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
