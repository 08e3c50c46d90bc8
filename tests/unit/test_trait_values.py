"""Computed trait values: what a source returns becomes one typed, canonical value."""

from __future__ import annotations

import enum
import json
from datetime import UTC, date, datetime, time, timedelta, timezone, tzinfo
from decimal import Decimal
from uuid import UUID

import pytest

from syncer.trait_values import (
    DEFAULT_PRECISION,
    FALSE,
    KIND_BOOLEAN,
    KIND_NUMBER,
    KIND_STRING,
    KIND_TIMESTAMP,
    MAX_NUMBER_DIGITS,
    MAX_STRING_BYTES,
    TRUE,
    TraitValue,
    UnsupportedValue,
    normalise,
)


def number(text: str) -> TraitValue:
    return TraitValue(kind=KIND_NUMBER, text=text)


def same(a: object, b: object, *, precision: int = DEFAULT_PRECISION) -> bool:
    return normalise(a, precision=precision) == normalise(b, precision=precision)


def test_none_is_no_value() -> None:
    assert normalise(None) is None


# --- numbers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0"),
        (42, "42"),
        (-7, "-7"),
        (2**63 - 1, "9223372036854775807"),
        (2**64, "18446744073709551616"),  # beyond 64 bits: still exact
        (-(2**64), "-18446744073709551616"),
        (10**20 + 1, "100000000000000000001"),
        (10**21, "1e+21"),  # JavaScript's notation from 1e21 on, every digit kept
        (12345678901234567890123, "1.2345678901234567890123e+22"),
        (10**300, "1e+300"),
    ],
)
def test_ints_are_exact(value: int, text: str) -> None:
    assert normalise(value) == number(text)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (Decimal("10.50"), "10.5"),
        (Decimal("10.5"), "10.5"),
        (Decimal("1E+2"), "100"),
        (Decimal("100.00"), "100"),
        (Decimal("-0.00"), "0"),
        (Decimal("0E-8"), "0"),
        (Decimal("-12.340"), "-12.34"),
        (Decimal("0.000001"), "0.000001"),
        (Decimal("0.0000001"), "0.0000001"),
        (Decimal("0.00000001"), "1e-8"),
        (Decimal("1.50E-10"), "1.5e-10"),
        (Decimal("0.30000000000000004"), "0.30000000000000004"),  # exact: never rounded
        (Decimal("123456789012345678.123456789"), "123456789012345678.123456789"),
    ],
)
def test_decimals_are_exact_without_trailing_zeros(value: Decimal, text: str) -> None:
    assert normalise(value) == number(text)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.1 + 0.2, "0.3"),
        (0.3, "0.3"),
        (10.5, "10.5"),
        (-0.0, "0"),
        (0.0, "0"),
        (3.0, "3"),
        (1e21, "1e+21"),
        (1.5e22, "1.5e+22"),
        (1e-7, "0.0000001"),
        (1.5e-8, "1.5e-8"),
        (2.0**53, "9007199254740992"),  # integral within 2**53: that integer exactly
        (123456789012.0, "123456789012"),
        (2.0**53 + 2, "9007199250000000"),  # beyond 2**53: rounded like any float
        (123456789.123, "123456789"),
        (1 / 3, "0.333333333"),
        (-2 / 3, "-0.666666667"),
        (1e300, "1e+300"),
    ],
)
def test_floats_are_rounded_to_nine_significant_digits(value: float, text: str) -> None:
    assert normalise(value) == number(text)


def test_the_same_number_however_a_source_computed_it() -> None:
    assert same(Decimal("10.50"), 10.5)
    assert same(Decimal("10.50"), Decimal("10.5"))
    assert same(Decimal("1E+2"), 100)
    assert same(Decimal("100.00"), 100.0)
    assert same(0.1 + 0.2, 0.3)
    assert same(0.1 + 0.2, Decimal("0.3"))
    assert same(3.0, 3)
    assert same(3.0, Decimal("3.000"))
    assert same(-0.0, 0)
    assert same(sum([0.1] * 10), 1)  # a warehouse that summed into a float
    assert same(float(2**53), 2**53)
    assert same(1e21, 10**21)
    assert same(1e21, Decimal("1E+21"))


def test_different_numbers_stay_different() -> None:
    assert not same(0.3, 0.31)
    assert not same(Decimal("0.30000000000000004"), 0.3)  # decimals are exact
    assert not same(2**53 + 1, float(2**53 + 1))  # the float is 2**53, rounded
    assert not same(10, "10")  # kinds differ
    assert not same(1, True)


@pytest.mark.parametrize(
    ("precision", "value", "text"),
    [
        (3, 1234.5, "1230"),  # significant digits, as f"{x:.3g}"
        (3, 0.012345, "0.0123"),
        (3, 1.2355e-10, "1.24e-10"),
        (3, 1234.0, "1234"),  # integral within 2**53: exact whatever the precision
        (1, 0.25, "0.2"),  # round-half-even on the binary value, as format() does
        (1, 0.35, "0.3"),  # 0.35 is 0.34999… as a double
        (17, 0.1 + 0.2, "0.30000000000000004"),
        (17, 0.3, "0.29999999999999999"),
    ],
)
def test_precision_is_significant_digits(precision: int, value: float, text: str) -> None:
    assert normalise(value, precision=precision) == number(text)


def test_precision_does_not_touch_ints_or_decimals() -> None:
    assert normalise(123456, precision=2) == number("123456")
    assert normalise(Decimal("1.23456"), precision=2) == number("1.23456")


@pytest.mark.parametrize("precision", [0, -1, 18, 100])
def test_precision_outside_1_to_17_is_a_programming_error(precision: int) -> None:
    with pytest.raises(ValueError, match="precision must be 1 to 17") as caught:
        normalise(1, precision=precision)
    assert not isinstance(caught.value, UnsupportedValue)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (float("nan"), "a number that is NaN or infinite"),
        (float("inf"), "a number that is NaN or infinite"),
        (float("-inf"), "a number that is NaN or infinite"),
        (Decimal("NaN"), "a number that is NaN or infinite"),
        (Decimal("sNaN"), "a number that is NaN or infinite"),
        (Decimal("-Infinity"), "a number that is NaN or infinite"),
        (10**308, "a number beyond 1e308"),
        (-(10**308), "a number beyond 1e308"),
        (2**5000, "a number beyond 1e308"),  # refused before it is written out
        (1.7e308, "a number beyond 1e308"),
        (Decimal("1E+100000"), "a number beyond 1e308"),
        (Decimal("1E-308"), "closer to 0 than 1e-307"),
        (5e-324, "closer to 0 than 1e-307"),
        (Decimal("0." + "1" * (MAX_NUMBER_DIGITS + 1)), "more than 400 significant digits"),
    ],
)
def test_numbers_no_json_reader_holds_are_refused(value: object, reason: str) -> None:
    with pytest.raises(UnsupportedValue, match=reason):
        normalise(value)


def test_the_number_range_edges_are_accepted() -> None:
    assert normalise(10**308 - 1) == number("9." + "9" * 307 + "e+307")
    assert normalise(Decimal("1E-307")) == number("1e-307")
    assert normalise(Decimal("0." + "1" * MAX_NUMBER_DIGITS)) == number("0." + "1" * 400)


# --- booleans, strings, bytes -------------------------------------------------------------


def test_booleans() -> None:
    assert normalise(True) == TraitValue(kind=KIND_BOOLEAN, text="true") == TRUE
    assert normalise(False) == TraitValue(kind=KIND_BOOLEAN, text="false") == FALSE


@pytest.mark.parametrize(
    "value", ["pro", "", " padded ", "10", "1e3", "true", "2026-11-22", "Zürich", "🎉", "a\nb"]
)
def test_strings_are_kept_as_they_are(value: str) -> None:
    assert normalise(value) == TraitValue(kind=KIND_STRING, text=value)


def test_strings_that_look_like_other_kinds_are_strings() -> None:
    assert not same("10", 10)
    assert not same("true", True)
    assert not same("2026-11-22T00:00:00.000Z", date(2026, 11, 22))


def test_strings_up_to_64_kib_of_utf8() -> None:
    assert normalise("a" * MAX_STRING_BYTES) is not None
    assert normalise("é" * (MAX_STRING_BYTES // 2)) is not None  # 2 bytes each
    with pytest.raises(UnsupportedValue, match="a string over 64 KiB of UTF-8"):
        normalise("a" * (MAX_STRING_BYTES + 1))
    with pytest.raises(UnsupportedValue, match="a string over 64 KiB of UTF-8"):
        normalise("é" * (MAX_STRING_BYTES // 2 + 1))  # fewer characters, more bytes


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("a\x00b", "a string with a NUL character"),
        (b"a\x00b", "a string with a NUL character"),
        ("\ud800", "a string that is not valid Unicode"),
        (b"\xff\xfe", "bytes that are not UTF-8 text"),
    ],
)
def test_strings_a_database_or_payload_cannot_hold_are_refused(value: object, reason: str) -> None:
    with pytest.raises(UnsupportedValue, match=reason):
        normalise(value)


@pytest.mark.parametrize("value", [b"gold", bytearray(b"gold"), memoryview(b"gold")])
def test_utf8_bytes_are_strings(value: object) -> None:
    assert normalise(value) == TraitValue(kind=KIND_STRING, text="gold")


def test_non_ascii_bytes_are_decoded() -> None:
    assert normalise("Zürich".encode()) == TraitValue(kind=KIND_STRING, text="Zürich")


# --- timestamps ---------------------------------------------------------------------------


def timestamp(text: str) -> TraitValue:
    return TraitValue(kind=KIND_TIMESTAMP, text=text)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (datetime(2026, 11, 22, 10, 0), "2026-11-22T10:00:00.000Z"),  # naive: read as UTC
        (datetime(2026, 11, 22, 10, 0, tzinfo=UTC), "2026-11-22T10:00:00.000Z"),
        (
            datetime(2026, 11, 22, 11, 30, tzinfo=timezone(timedelta(hours=1, minutes=30))),
            "2026-11-22T10:00:00.000Z",
        ),
        (
            datetime(2026, 11, 21, 22, 0, tzinfo=timezone(timedelta(hours=-12))),
            "2026-11-22T10:00:00.000Z",
        ),
        (datetime(2026, 11, 22, 10, 0, 0, 123456), "2026-11-22T10:00:00.123Z"),
        (datetime(2026, 11, 22, 23, 59, 59, 999999), "2026-11-22T23:59:59.999Z"),  # truncated
        (datetime(1, 1, 1), "0001-01-01T00:00:00.000Z"),
        (datetime(9999, 12, 31, 23, 59, 59, 999999), "9999-12-31T23:59:59.999Z"),
        (date(2026, 11, 22), "2026-11-22T00:00:00.000Z"),
        (date(1, 1, 1), "0001-01-01T00:00:00.000Z"),
    ],
)
def test_timestamps_are_utc_to_the_millisecond(value: date, text: str) -> None:
    assert normalise(value) == timestamp(text)


def test_naive_and_aware_datetimes_for_the_same_instant_are_the_same() -> None:
    naive = datetime(2026, 11, 22, 10, 0)
    paris = datetime(2026, 11, 22, 11, 0, tzinfo=timezone(timedelta(hours=1)))
    assert same(naive, paris)
    assert same(naive.replace(tzinfo=UTC), paris)
    assert same(date(2026, 11, 22), datetime(2026, 11, 22, 0, 0, 0, 999))
    assert not same(naive, datetime(2026, 11, 22, 10, 0, tzinfo=timezone(timedelta(hours=1))))


def test_a_zone_without_an_offset_is_read_as_utc() -> None:
    class Unknown(tzinfo):
        def utcoffset(self, dt: datetime | None) -> None:
            return None

        def dst(self, dt: datetime | None) -> None:
            return None

        def tzname(self, dt: datetime | None) -> None:
            return None

    value = datetime(2026, 11, 22, 10, 0, tzinfo=Unknown())
    assert normalise(value) == timestamp("2026-11-22T10:00:00.000Z")


@pytest.mark.parametrize(
    "value",
    [
        datetime(1, 1, 1, 0, 0, tzinfo=timezone(timedelta(hours=1))),
        datetime(9999, 12, 31, 23, 0, tzinfo=timezone(timedelta(hours=-2))),
    ],
)
def test_timestamps_beyond_year_9999_in_utc_are_refused(value: datetime) -> None:
    with pytest.raises(UnsupportedValue, match="a timestamp beyond year 1 to 9999 in UTC"):
        normalise(value)


# --- subclasses and everything else -------------------------------------------------------


class Plan(enum.IntEnum):
    PRO = 3


class Label(str, enum.Enum):  # noqa: UP042 (its str() is "Label.GOLD", unlike StrEnum's)
    GOLD = "gold"


class Moment(datetime):
    pass


def test_subclasses_of_supported_types_are_their_base_type() -> None:
    assert normalise(Plan.PRO) == number("3")
    assert normalise(Label.GOLD) == TraitValue(kind=KIND_STRING, text="gold")
    assert normalise(Moment(2026, 11, 22, 10)) == timestamp("2026-11-22T10:00:00.000Z")


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (time(10, 0), "time"),
        (timedelta(days=1), "timedelta"),
        ([1, 2], "list"),
        ({"a": 1}, "dict"),
        ((1,), "tuple"),
        (UUID(int=1), "UUID"),
        (1 + 2j, "complex"),
        (object(), "object"),
    ],
)
def test_other_types_are_refused_by_name(value: object, type_name: str) -> None:
    with pytest.raises(UnsupportedValue) as caught:
        normalise(value)
    assert str(caught.value) == (
        f"a value of type {type_name} (not a number, string, boolean or timestamp)"
    )
    assert isinstance(caught.value, ValueError)


def test_a_refusal_never_shows_the_value() -> None:
    secret = "s3cret-" + "x" * MAX_STRING_BYTES
    with pytest.raises(UnsupportedValue) as caught:
        normalise(secret)
    assert "s3cret" not in str(caught.value)


# --- as_json ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected", "expected_type"),
    [
        (42, 42, int),
        (3.0, 3, int),
        (Decimal("100.00"), 100, int),
        (2**64, 2**64, int),
        (10**21, 10**21, int),
        (1e21, 10**21, int),
        (-0.0, 0, int),
        (10.5, 10.5, float),
        (Decimal("10.50"), 10.5, float),
        (0.1 + 0.2, 0.3, float),
        (1.5e-8, 1.5e-8, float),
        (True, True, bool),
        (False, False, bool),
        ("10", "10", str),
        (datetime(2026, 11, 22, 10, 0, 0, 123456), "2026-11-22T10:00:00.123Z", str),
        (date(2026, 11, 22), "2026-11-22T00:00:00.000Z", str),
    ],
)
def test_as_json(value: object, expected: object, expected_type: type) -> None:
    normalised = normalise(value)
    assert normalised is not None
    as_json = normalised.as_json()
    assert as_json == expected
    assert type(as_json) is expected_type


def test_as_json_goes_into_a_payload_as_valid_json() -> None:
    values = [10**308 - 1, Decimal("1E-307"), 2**64, 0.1 + 0.2, "Zürich", True, date(2026, 1, 1)]
    for value in values:
        normalised = normalise(value)
        assert normalised is not None
        body = json.dumps({"trait": normalised.as_json()}, allow_nan=False)
        assert normalise(json.loads(body)["trait"]) in (
            normalised,
            TraitValue(kind=KIND_STRING, text=normalised.text),  # timestamps travel as text
        )


def test_as_json_of_an_unknown_kind_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown trait value kind 'colour'"):
        TraitValue(kind="colour", text="red").as_json()


def test_values_are_frozen_keyword_only_and_compare_by_kind_and_text() -> None:
    value = normalise(10)
    assert value is not None
    assert value == TraitValue(kind=KIND_NUMBER, text="10")
    assert hash(value) == hash(TraitValue(kind=KIND_NUMBER, text="10"))
    assert value != TraitValue(kind=KIND_STRING, text="10")
    with pytest.raises(AttributeError):
        value.text = "11"  # type: ignore[misc]
    with pytest.raises(TypeError):
        TraitValue(KIND_NUMBER, "10")  # type: ignore[call-arg]
