"""What Tray receives: Segment-style bodies, message ids, signatures, Retry-After."""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

import syncer
from syncer.errors import PermanentDeliveryError
from syncer.settings import Secret
from syncer.tray import (
    MESSAGE_NAMESPACE,
    IdentifyBodies,
    delete_body,
    delete_message_id,
    identify_body,
    identify_message_id,
    parse_retry_after,
    signature,
)

KEY = "order_completed_last_30days"
MOMENT = datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC)
NOW = datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC)


def identify(
    user_id: str = "u123",
    *,
    value: bool = True,
    timestamp: datetime = MOMENT,
    message_id: str = "m-1",
) -> bytes:
    return identify_body(
        user_id=user_id,
        audience_key=KEY,
        audience_id=42,
        value=value,
        message_id=message_id,
        timestamp=timestamp,
    )


def test_identify_body_is_the_segment_wire_format() -> None:
    message_id = identify_message_id(42, 7, "u123")
    body = identify_body(
        user_id="u123",
        audience_key=KEY,
        audience_id=42,
        value=True,
        message_id=message_id,
        timestamp=MOMENT,
    )
    assert json.loads(body) == message("u123", True, message_id, "2026-11-22T10:00:00.000Z")


def message(user_id: str, value: bool, message_id: str, timestamp: str) -> dict[str, object]:
    """An identify message as DESIGN.md's wire format has it, in its key order."""
    return {
        "type": "identify",
        "userId": user_id,
        "traits": {KEY: value},
        "context": {
            "personas": {
                "computation_class": "audience",
                "computation_key": KEY,
                "computation_id": "42",
            },
            "library": {"name": "syncer", "version": syncer.__version__},
        },
        "integrations": {"All": False},
        "messageId": message_id,
        "timestamp": timestamp,
    }


def test_user_who_left_gets_false() -> None:
    assert json.loads(identify(value=False))["traits"] == {KEY: False}


def test_timestamp_has_milliseconds() -> None:
    moment = datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
    assert json.loads(identify(timestamp=moment))["timestamp"] == "2026-01-02T03:04:05.123Z"


def test_non_utc_timestamp_is_sent_in_utc() -> None:
    berlin = datetime(2026, 11, 22, 11, 0, 0, tzinfo=ZoneInfo("Europe/Berlin"))
    new_york = datetime(2026, 7, 1, 20, 30, 0, 500000, tzinfo=ZoneInfo("America/New_York"))
    assert json.loads(identify(timestamp=berlin))["timestamp"] == "2026-11-22T10:00:00.000Z"
    assert json.loads(identify(timestamp=new_york))["timestamp"] == "2026-07-02T00:30:00.500Z"


def test_delete_body_is_the_segment_wire_format() -> None:
    body = delete_body(
        user_id="u123",
        message_id="d-1",
        timestamp=datetime(2026, 11, 22, 5, 0, 0, tzinfo=ZoneInfo("America/New_York")),
    )
    assert json.loads(body) == {
        "type": "delete",
        "userId": "u123",
        "timestamp": "2026-11-22T10:00:00.000Z",
        "messageId": "d-1",
    }


def test_body_is_compact_json_bytes() -> None:
    body = identify()
    assert isinstance(body, bytes)
    assert b" " not in body
    assert body.startswith(b'{"type":"identify","userId":"u123",')


@pytest.mark.parametrize(
    "user_id", ["ünïcødé-ユーザー", "emoji-🎉", 'quote"back\\slash', "tab\tid"]
)
def test_any_user_id_survives_the_round_trip(user_id: str) -> None:
    body = identify(user_id)
    assert json.loads(body.decode("utf-8"))["userId"] == user_id
    deleted = delete_body(user_id=user_id, message_id="d", timestamp=MOMENT)
    assert json.loads(deleted.decode("utf-8"))["userId"] == user_id


def test_body_over_tray_limit_is_a_permanent_failure() -> None:
    with pytest.raises(PermanentDeliveryError, match="1 MB"):
        identify("u" * 1_000_001)


USER_IDS = [
    "u123",
    "ünïcødé-ユーザー",
    "emoji-🎉",
    'quote"back\\slash',
    "tab\tid",
    "ctl\x01",
    "x" * 300,
]


@pytest.mark.parametrize("user_id", USER_IDS)
def test_a_body_is_byte_for_byte_the_compact_json_of_the_message(user_id: str) -> None:
    """Bodies are put together from pieces encoded once per audience; the bytes on the wire
    must still be exactly ``json.dumps`` of the message, whatever the user id holds."""
    bodies = IdentifyBodies(KEY, 42)
    for value, moment in [(True, MOMENT), (False, MOMENT + timedelta(milliseconds=7))]:
        message_id = identify_message_id(42, 7, user_id)
        stamp = moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
        expected = message(user_id, value, message_id, stamp)
        body = bodies.body(user_id=user_id, value=value, message_id=message_id, timestamp=moment)
        assert body == json.dumps(expected, separators=(",", ":"), ensure_ascii=False).encode()


@pytest.mark.parametrize("user_id", USER_IDS)
def test_message_ids_are_rfc_4122_version_5_uuids(user_id: str) -> None:
    reference = uuid.uuid5(MESSAGE_NAMESPACE, f"identify/42/7/{user_id}")
    assert identify_message_id(42, 7, user_id) == str(reference)
    assert delete_message_id(99) == str(uuid.uuid5(MESSAGE_NAMESPACE, "delete/99"))


def test_message_id_is_stable_for_the_same_run_audience_and_user() -> None:
    assert identify_message_id(42, 7, "u123") == identify_message_id(42, 7, "u123")


@pytest.mark.parametrize(
    "other",
    [(43, 7, "u123"), (42, 8, "u123"), (42, 7, "u124"), (7, 42, "u123"), (42, 7, "U123")],
)
def test_message_id_differs_when_anything_changes(other: tuple[int, int, str]) -> None:
    assert identify_message_id(*other) != identify_message_id(42, 7, "u123")


def test_message_ids_are_unique_across_many_users() -> None:
    ids = {identify_message_id(1, 1, f"user-{n}") for n in range(2_000)}
    assert len(ids) == 2_000


def test_signature_is_lowercase_hex_hmac_sha1_of_the_body() -> None:
    body = identify("ünïcødé")
    sig = signature(body, Secret("s3cret"))
    assert sig == hmac.new(b"s3cret", body, hashlib.sha1).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{40}", sig)


def test_signature_depends_on_secret_and_every_byte() -> None:
    body = identify()
    sig = signature(body, Secret("s3cret"))
    assert signature(body, Secret("other")) != sig
    assert signature(identify(value=False), Secret("s3cret")) != sig


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("3", 3.0), ("0", 0.0), ("2.5", 2.5), (" 7 ", 7.0), ("-5", 0.0)],
)
def test_retry_after_seconds(header: str, seconds: float) -> None:
    assert parse_retry_after(header, now=NOW) == seconds


def test_retry_after_http_date_in_the_future() -> None:
    header = email.utils.format_datetime(NOW + timedelta(seconds=10), usegmt=True)
    assert parse_retry_after(header, now=NOW) == 10.0


def test_retry_after_http_date_in_the_past_means_now() -> None:
    header = email.utils.format_datetime(NOW - timedelta(hours=1), usegmt=True)
    assert parse_retry_after(header, now=NOW) == 0.0


@pytest.mark.parametrize(
    "header",
    [None, "", "soon", "0x10", "Mon, 32 Feb 2026 10:00:00 GMT", "Sun, 06 Nov 99999 08:49:37 GMT"],
)
def test_unreadable_retry_after_is_ignored(header: str | None) -> None:
    assert parse_retry_after(header, now=NOW) is None
