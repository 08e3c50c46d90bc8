"""Audience keys and schedules: what `syncer audience create` accepts and the key it prints."""

from __future__ import annotations

import pytest

from syncer.audiences import Schedule, _validated_name, audience_key, parse_schedule
from syncer.errors import AudienceError
from syncer.models import AUDIENCES

KEY_COLUMN_LENGTH = AUDIENCES.c.key.type.length
THREE_HOURS = 3 * 3600


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("Order Completed Last 30days", "order_completed_last_30days"),
        ("HighValueCustomers", "high_value_customers"),
        ("XMLHttpRequest Users", "xml_http_request_users"),
        ("Top10Users", "top10_users"),
        ("30 Day Buyers", "30_day_buyers"),
        ("VIP: Gold & Platinum!", "vip_gold_platinum"),
        ("user.name-with-dashes", "user_name_with_dashes"),
        ("a--b__c", "a_b_c"),
        ("Café Crème Lovers", "cafe_creme_lovers"),
        ("Über naïve Fans", "uber_naive_fans"),
        ("  Spaced Out  ", "spaced_out"),
        ("order_completed_last_30days", "order_completed_last_30days"),
    ],
)
def test_key_is_the_snake_cased_name(name: str, key: str) -> None:
    assert audience_key(name) == key


def test_name_is_tidied_and_keyed() -> None:
    assert _validated_name("  Order   Completed\tLast 30days ") == (
        "Order Completed Last 30days",
        "order_completed_last_30days",
    )


@pytest.mark.parametrize("name", ["", "   ", "\t\n"])
def test_empty_name_is_refused(name: str) -> None:
    with pytest.raises(AudienceError, match="name is empty") as info:
        _validated_name(name)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["!!!", "---", "東京"])
def test_name_without_letters_or_digits_for_a_key_is_refused(name: str) -> None:
    with pytest.raises(AudienceError, match="no letters or digits") as info:
        _validated_name(name)
    message = str(info.value)
    assert repr(name) in message
    assert "\n" not in message


def test_overlong_name_is_refused() -> None:
    with pytest.raises(AudienceError, match="longer than 255"):
        _validated_name("a" * 256)


def test_name_whose_key_would_not_fit_the_key_column_is_refused() -> None:
    # 255 characters is an accepted name length, but CamelCase grows by one "_" per word,
    # so the key is longer than the audiences.key column. It must be refused as bad input
    # (exit 2, clear line), not reach the INSERT (PostgreSQL/MySQL: "database error", exit 1;
    # SQLite: a key stored that no other database could hold).
    name = "Ab" * 127 + "A"
    assert len(name) == 255
    assert len(audience_key(name)) > KEY_COLUMN_LENGTH
    with pytest.raises(AudienceError):
        _validated_name(name)


@pytest.mark.parametrize(
    ("every", "seconds", "described"),
    [
        ("90s", 90, "every 1m30s"),
        ("15m", 900, "every 15m"),
        ("3h", THREE_HOURS, "every 3h"),
        ("1d", 86400, "every 1d"),
        ("1h30m", 5400, "every 1h30m"),
        (" 2H ", 7200, "every 2h"),
    ],
)
def test_every_schedule(every: str, seconds: int, described: str) -> None:
    schedule = parse_schedule(every, None)
    assert schedule == Schedule(every_seconds=seconds)
    assert schedule.describe(THREE_HOURS) == described


def test_cron_schedule_is_kept_trimmed() -> None:
    schedule = parse_schedule(None, " 0 */3 * * * ")
    assert schedule == Schedule(cron="0 */3 * * *")
    assert schedule.describe(THREE_HOURS) == "cron 0 */3 * * *"


def test_no_schedule_means_the_default_interval() -> None:
    schedule = parse_schedule(None, None)
    assert schedule == Schedule()
    assert schedule.describe(THREE_HOURS) == "every 3h (default)"


def test_every_and_cron_together_are_refused() -> None:
    with pytest.raises(AudienceError, match="either --every or --cron"):
        parse_schedule("3h", "0 */3 * * *")


@pytest.mark.parametrize("every", ["0s", "-1h", "3x", "", "h", "1.5h", "10"])
def test_bad_duration_is_refused_with_the_fix(every: str) -> None:
    with pytest.raises(AudienceError) as info:
        parse_schedule(every, None)
    message = str(info.value)
    assert message.startswith("--every:")
    assert "like 90s, 15m, 3h or 1d" in message
    assert "\n" not in message


@pytest.mark.parametrize("cron", ["61 * * * *", "* * * *", "* * * * * *", "@daily", "every day"])
def test_bad_cron_is_refused_with_the_fix(cron: str) -> None:
    with pytest.raises(AudienceError) as info:
        parse_schedule(None, cron)
    message = str(info.value)
    assert message.startswith("--cron:")
    assert 'use 5 fields like "0 */3 * * *"' in message
    assert "\n" not in message
