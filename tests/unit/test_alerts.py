"""[alerts] settings: defaults, webhook URLs read as workflow URLs are, bounds; and the most
posting one alert may take."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from syncer import alerts
from syncer.errors import ConfigError
from syncer.settings import (
    DEFAULT_TIMEOUT_SECONDS,
    MAX_WEBHOOK_URLS,
    AlertSettings,
    parse_settings,
)

SECRET = "T0SECRET/B0SECRET/xoxo"


def parsed(table: dict[str, Any]) -> AlertSettings:
    return parse_settings({"alerts": table}, base_dir=Path(os.sep)).alerts


def refused(table: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_settings({"alerts": table}, base_dir=Path(os.sep))
    text = str(caught.value)
    assert "\n" not in text and SECRET not in text and "xoxo" not in text
    return text


def test_defaults_no_webhooks() -> None:
    assert parse_settings({}, base_dir=Path(os.sep)).alerts == AlertSettings()
    found = parsed({})
    assert found.webhook_urls == ()
    assert (found.owed_longer_than_seconds, found.repeat_after_seconds) == (3600, 4 * 3600)
    assert found.timeout_seconds == DEFAULT_TIMEOUT_SECONDS


def test_webhook_urls_are_normalised_as_workflow_urls_are() -> None:
    found = parsed(
        {
            "webhook_urls": [f"HTTPS://Hooks.Example.COM:443/{SECRET}", "http://10.0.0.1:8080"],
            "owed_longer_than": "90m",
            "repeat_after": "1d",
            "timeout_seconds": 2.5,
        }
    )
    assert found.webhook_urls == (f"https://hooks.example.com/{SECRET}", "http://10.0.0.1:8080/")
    assert (found.owed_longer_than_seconds, found.repeat_after_seconds) == (5400, 86400)
    assert found.timeout_seconds == 2.5
    assert len(parsed({"webhook_urls": []}).webhook_urls) == 0
    ten = [f"https://h{i}.example.com/{SECRET}" for i in range(MAX_WEBHOOK_URLS)]
    assert len(parsed({"webhook_urls": ten}).webhook_urls) == MAX_WEBHOOK_URLS


@pytest.mark.parametrize(
    ("table", "named"),
    [
        ("https://x", "must be a table"),
        ({"webhook_urls": f"https://hooks.example.com/{SECRET}"}, "must be a list"),
        ({"webhook_urls": [f"https://user:pw@hooks.example.com/{SECRET}"]}, "user name"),
        ({"webhook_urls": [f"https://hooks.example.com/{SECRET}#frag"]}, "hooks.example.com"),
        ({"webhook_urls": [f"https://h{i}.example.com/{SECRET}" for i in range(11)]}, "11 URLs"),
        ({"webhook_urls": [f"https://a.io/{SECRET}", f"https://A.io/{SECRET}"]}, "same URL"),
        ({"hooks": []}, "unknown key 'hooks'"),
        ({"owed_longer_than": 3600}, "must be a string"),
        ({"owed_longer_than": "59s"}, "out of range"),
        ({"repeat_after": "31d"}, "out of range"),
        ({"timeout_seconds": "5"}, "positive number"),
        ({"timeout_seconds": 0.001}, "at least"),
    ],
)
def test_bad_alert_settings_are_refused_naming_the_host_only(table: Any, named: str) -> None:
    text = refused(table)
    assert "[alerts]" in text and named in text, text


def test_posting_one_alert_is_bounded() -> None:
    bound = alerts._bound_seconds(AlertSettings(timeout_seconds=5))
    assert bound == pytest.approx(alerts.POST_ATTEMPTS * 5 + 0.75 + 1.5)
