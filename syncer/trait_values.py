"""A computed trait's value: what a source returns, typed and normalised once.

A source's driver (SQLite, psycopg, PyMySQL, DuckDB, the warehouse dialects) hands back a Python
object per user; ``normalise`` turns it into a ``TraitValue``: a kind and the canonical text
syncer stores and compares. Two values are the same iff their ``(kind, text)`` are equal, so a
value that did not change is never re-sent because of how a warehouse computed it this time.

- ``None``: no value (the user has none; a value that disappears goes out as ``null``).
- ``bool``: ``boolean``, text ``true`` / ``false``.
- ``int``: ``number``, exact at any size within the number range below (``2**64`` and beyond
  too: the text keeps every digit, and the payload carries every digit as a JSON integer).
- ``decimal.Decimal``: ``number``, exact, trailing zeros dropped (``Decimal("10.50")`` is
  ``10.5``, ``Decimal("1E+2")`` is ``100``); NaN and infinities are refused.
- ``float``: ``number``. An integral float within ``2**53`` is that integer exactly (a warehouse
  that sums integers into a float makes no change); any other float is rounded to
  ``precision`` significant digits (default 9), as ``f"{x:.{precision}g}"`` does, so ``0.1 + 0.2``
  is ``0.3``, ``-0.0`` is ``0``, and at precision 3 ``1234.5`` is ``1230``. NaN and infinities
  are refused.
- Numbers must be 0 or between ``1e-307`` and ``1e308`` in magnitude (what every JSON reader
  holds as a double) with at most ``MAX_NUMBER_DIGITS`` significant digits; others are refused.
  Their text is JavaScript's: plain digits from ``1e-7`` up to ``1e21``, else
  ``1.5e+21`` / ``1e-8``.
- ``str``: ``string``, as is: a string that looks like a number stays a string. NUL characters,
  lone surrogates and more than ``MAX_STRING_BYTES`` of UTF-8 are refused (a message body must
  stay well under Tray's 1 MB).
- ``bytes`` (``bytearray``, ``memoryview``): a ``string`` when valid UTF-8, else refused.
- ``datetime``: ``timestamp`` in UTC to the millisecond (microseconds truncated, not rounded); a
  naive datetime is read as UTC, an aware one converted. A ``date`` is 00:00 UTC that day.
  Text and payload are ISO 8601: ``2026-11-22T10:00:00.000Z``.
- Anything else (``time``, ``timedelta``, lists, dicts, UUIDs…) is refused.

A refusal raises ``UnsupportedValue`` with a short, fixed reason that never contains the value
itself (values may be personal data), so a caller can count users per reason.

``normalise`` runs once per row of a source's stream: no imports, regexes or Decimal arithmetic
on the paths ints, floats, strings and datetimes take.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal

KIND_NUMBER = "number"
KIND_STRING = "string"
KIND_BOOLEAN = "boolean"
KIND_TIMESTAMP = "timestamp"
KINDS = frozenset({KIND_NUMBER, KIND_STRING, KIND_BOOLEAN, KIND_TIMESTAMP})

DEFAULT_PRECISION = 9
MIN_PRECISION = 1
MAX_PRECISION = 17  # 17 significant digits tell every two doubles apart
MAX_STRING_BYTES = 64 * 1024
MAX_NUMBER_DIGITS = 400
# The decimal exponent of a number's leading digit: |x| < 1e308 and, unless 0, |x| >= 1e-307.
MAX_NUMBER_EXPONENT = 307
MIN_NUMBER_EXPONENT = -307

EXACT_FLOAT_INTEGER = 2**53
_PLAIN_INT_BOUND = 10**21  # JavaScript writes integers below 1e21 in plain digits
_INT_BITS_BEYOND_RANGE = 1024  # 2**1024 > 1e308: refused before converting to decimal text
_FLOAT_FORMATS = {p: f".{p}g" for p in range(MIN_PRECISION, MAX_PRECISION + 1)}


class UnsupportedValue(ValueError):
    """A source returned a value that cannot be a trait value; the message says why."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TraitValue:
    """One user's value of a computed trait: its kind and canonical text (see module doc)."""

    kind: str
    text: str

    def as_json(self) -> object:
        """The value in an identify payload's ``{"<key>": value}``: a JSON number (an ``int``
        when integral, else the nearest ``float``), a string, a bool, or the ISO 8601 text."""
        if self.kind == KIND_NUMBER:
            number = Decimal(self.text)
            # The text has no trailing zeros, so a non-negative exponent means integral.
            exponent = number.as_tuple().exponent
            if isinstance(exponent, int) and exponent >= 0:
                return int(number)
            return float(number)
        if self.kind == KIND_BOOLEAN:
            return self.text == "true"
        if self.kind in (KIND_STRING, KIND_TIMESTAMP):
            return self.text
        raise ValueError(f"unknown trait value kind {self.kind!r}")


TRUE = TraitValue(kind=KIND_BOOLEAN, text="true")
FALSE = TraitValue(kind=KIND_BOOLEAN, text="false")

# A frozen dataclass's __init__ sets each field through object.__setattr__; setting the slots
# directly costs half as much, which is a third of normalise() on a million-row stream.
_new_object = object.__new__
_set_kind = TraitValue.__dict__["kind"].__set__
_set_text = TraitValue.__dict__["text"].__set__


def _value(kind: str, text: str) -> TraitValue:
    """``TraitValue(kind=kind, text=text)``, faster."""
    value = _new_object(TraitValue)
    _set_kind(value, kind)
    _set_text(value, text)
    return value


def normalise(value: object, *, precision: int = DEFAULT_PRECISION) -> TraitValue | None:
    """``value`` as a source's driver returned it, typed and canonical; None for no value.

    Raises ``UnsupportedValue`` for a value that cannot be a trait value, ``ValueError`` for
    a ``precision`` outside 1..17."""
    # Exact type checks first: the common cases cost one comparison each.
    if precision not in _FLOAT_FORMATS:
        raise ValueError(f"precision must be {MIN_PRECISION} to {MAX_PRECISION}, not {precision!r}")
    if type(value) is int:
        return _from_int(value)
    if type(value) is str:
        return _from_str(value)
    if type(value) is float:
        return _from_float(value, precision)
    if value is None:
        return None
    if type(value) is datetime:
        return _from_datetime(value)
    if type(value) is Decimal:
        return _from_decimal(value)
    # Subclasses (IntEnum, pandas' Timestamp…); bool before int, datetime before date.
    if isinstance(value, bool):
        return TRUE if value else FALSE
    if isinstance(value, int):
        return _from_int(int(value))
    if isinstance(value, float):
        return _from_float(float(value), precision)
    if isinstance(value, Decimal):
        return _from_decimal(value)
    if isinstance(value, str):
        return _from_str(str.__str__(value))  # the text itself, not an Enum's str()
    if isinstance(value, datetime):
        return _from_datetime(value)
    if isinstance(value, date):
        return _from_date(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return _from_bytes(bytes(value))
    raise UnsupportedValue(
        f"a value of type {type(value).__name__} (not a number, string, boolean or timestamp)"
    )


def _from_int(value: int) -> TraitValue:
    if -_PLAIN_INT_BOUND < value < _PLAIN_INT_BOUND:
        return _value(KIND_NUMBER, str(value))
    if value.bit_length() > _INT_BITS_BEYOND_RANGE:
        raise UnsupportedValue(_OUT_OF_RANGE)
    return _value(KIND_NUMBER, _number_text(value < 0, str(abs(value)), 0))


def _from_float(value: float, precision: int) -> TraitValue:
    if not math.isfinite(value):
        raise UnsupportedValue("a number that is NaN or infinite")
    if value.is_integer() and -EXACT_FLOAT_INTEGER <= value <= EXACT_FLOAT_INTEGER:
        return _value(KIND_NUMBER, str(int(value)))  # -0.0 too: "0"
    written = format(value, _FLOAT_FORMATS[precision])
    return _value(KIND_NUMBER, _scientific_text(written, "e"))


def _from_decimal(value: Decimal) -> TraitValue:
    if not value.is_finite():
        raise UnsupportedValue("a number that is NaN or infinite")
    return _value(KIND_NUMBER, _scientific_text(str(value), "E"))


def _scientific_text(written: str, marker: str) -> str:
    """Canonical text of a finite number written as ``[-]digits[.digits][<marker>[+-]exp]``
    (what ``format(float, "g")`` and ``str(Decimal)`` produce)."""
    negative = written.startswith("-")
    mantissa, _, exponent_text = written.lstrip("-").partition(marker)
    exponent = int(exponent_text) if exponent_text else 0
    whole, _, fraction = mantissa.partition(".")
    return _number_text(negative, whole + fraction, exponent - len(fraction))


def _number_text(negative: bool, digits: str, exponent: int) -> str:
    """Canonical text of ``±digits * 10**exponent`` (digits may have leading or trailing zeros),
    as JavaScript writes numbers: plain from 1e-7 to 1e21, else ``d.ddde±x``."""
    significant = digits.lstrip("0")
    if not significant:
        return "0"  # -0 too
    coefficient = significant.rstrip("0")
    exponent += len(significant) - len(coefficient)
    count = len(coefficient)
    leading = exponent + count - 1  # the exponent of the leading digit
    if not MIN_NUMBER_EXPONENT <= leading <= MAX_NUMBER_EXPONENT:
        raise UnsupportedValue(_OUT_OF_RANGE)
    if count > MAX_NUMBER_DIGITS:
        raise UnsupportedValue(f"a number with more than {MAX_NUMBER_DIGITS} significant digits")
    if -7 <= leading < 21:
        if exponent >= 0:
            text = coefficient + "0" * exponent
        elif leading >= 0:
            point = count + exponent
            text = f"{coefficient[:point]}.{coefficient[point:]}"
        else:
            text = f"0.{'0' * (-leading - 1)}{coefficient}"
    else:
        head = coefficient[0] if count == 1 else f"{coefficient[0]}.{coefficient[1:]}"
        text = f"{head}e{'+' if leading > 0 else '-'}{abs(leading)}"
    return "-" + text if negative else text


_OUT_OF_RANGE = "a number beyond 1e308 or, unless 0, closer to 0 than 1e-307"


def _from_str(value: str) -> TraitValue:
    if "\x00" in value:
        raise UnsupportedValue("a string with a NUL character")
    if len(value) > MAX_STRING_BYTES:
        raise UnsupportedValue(_STRING_TOO_LONG)
    if not value.isascii():
        try:
            size = len(value.encode())
        except UnicodeEncodeError:
            raise UnsupportedValue(
                "a string that is not valid Unicode (a lone surrogate)"
            ) from None
        if size > MAX_STRING_BYTES:
            raise UnsupportedValue(_STRING_TOO_LONG)
    return _value(KIND_STRING, value)


_STRING_TOO_LONG = f"a string over {MAX_STRING_BYTES // 1024} KiB of UTF-8"


def _from_bytes(value: bytes) -> TraitValue:
    try:
        text = value.decode()
    except UnicodeDecodeError:
        raise UnsupportedValue("bytes that are not UTF-8 text") from None
    return _from_str(text)


def _from_datetime(value: datetime) -> TraitValue:
    if value.tzinfo is not None:
        offset = value.utcoffset()
        if offset:
            try:
                value = value - offset
            except OverflowError:
                raise UnsupportedValue("a timestamp beyond year 1 to 9999 in UTC") from None
        value = value.replace(tzinfo=None)
    # isoformat truncates microseconds to milliseconds.
    text = value.isoformat(timespec="milliseconds")
    return _value(KIND_TIMESTAMP, text + "Z")


def _from_date(value: date) -> TraitValue:
    return _value(KIND_TIMESTAMP, f"{value.isoformat()}T00:00:00.000Z")
