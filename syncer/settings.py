"""settings.toml: read once at start, validated, frozen.

Nothing else in the package reads ``os.environ``: ``${VAR}`` references are
expanded here, and secrets are wrapped in :class:`Secret` whose repr hides them.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import os
import re
import stat
import tomllib
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from syncer.dialects import KNOWN
from syncer.errors import ConfigError

SETTINGS_ENV = "SYNCER_SETTINGS"
DEFAULT_SETTINGS_FILE = "settings.toml"
DEFAULT_DATABASE_URL = "sqlite:///syncer.db"
DEFAULT_SOURCE = "default"
DEFAULT_TIMEOUT_SECONDS = 5.0
DEFAULT_MAX_CONCURRENCY = 64
DEFAULT_DELIVERY_PROCESSES = 2
MAX_DELIVERY_PROCESSES = 16
DEFAULT_MAX_ATTEMPTS = 100
DEFAULT_MAX_AGE = "24h"
DEFAULT_BACKOFF_BASE_SECONDS = 0.5
DEFAULT_BACKOFF_MAX_SECONDS = 30.0
DEFAULT_EVERY = "3h"
DEFAULT_TIMEZONE = "UTC"
DEFAULT_SHUTDOWN_GRACE = "30s"
DEFAULT_QUERY_TIMEOUT_SECONDS = 300.0
DEFAULT_MAX_REMOVED_PERCENT = 50  # the removal guard: a run removing more than this share...
DEFAULT_MIN_REMOVED = 100  # ...and at least this many members is held
MAX_MIN_REMOVED = 1_000_000_000
DEFAULT_OWED_LONGER_THAN = "1h"  # [alerts]: deliveries owed longer than this are a problem
DEFAULT_REPEAT_AFTER = "4h"  # [alerts]: an open problem is posted again after this long
MAX_WEBHOOK_URLS = 10
# Databases that can hold syncer's state; sources may use any SQLAlchemy dialect.
STATE_BACKENDS = ("sqlite", "postgresql", "mysql", "mariadb")
MAX_ALLOWED_DIRECTORIES = 100
MAX_WORKFLOW_URLS = 10
MAX_SETTINGS_BYTES = 1024 * 1024  # a settings file is a few KB; never read one unbounded

# Bounds of every number and duration in settings.toml and on the command line (--every,
# --cron), checked at start: a value past them is bad input (exit 2), never a hang, an
# overflow or a task per sender later on.
DAY = 86400
MIN_EVERY_SECONDS, MAX_EVERY_SECONDS = 1, 366 * DAY  # default_every, --every
CRON_MUST_FIRE_WITHIN_DAYS = 5 * 366  # a cron line's next run: at most ~5 years away
MAX_CRON_LENGTH = 100  # audiences.cron is a String(100)
MIN_MAX_AGE_SECONDS, MAX_MAX_AGE_SECONDS = 1, 30 * DAY
MIN_SHUTDOWN_GRACE_SECONDS, MAX_SHUTDOWN_GRACE_SECONDS = 1, 3600
MIN_TIMEOUT_SECONDS, MAX_TIMEOUT_SECONDS = 0.01, 300.0  # [tray] timeout_seconds: one call
MIN_QUERY_TIMEOUT_SECONDS, MAX_QUERY_TIMEOUT_SECONDS = 0.01, float(DAY)
MIN_CONCURRENCY, MAX_CONCURRENCY = 1, 1000
MIN_ATTEMPTS, MAX_ATTEMPTS = 1, 10_000
MIN_REQUESTS_PER_SECOND, MAX_REQUESTS_PER_SECOND = 0.1, 1e6
MIN_BACKOFF_SECONDS = 0.001
MAX_BACKOFF_BASE_SECONDS, MAX_BACKOFF_MAX_SECONDS = 60.0, 3600.0
MIN_DELIVERY_PROCESSES = 1
MIN_ALERT_DURATION_SECONDS, MAX_ALERT_DURATION_SECONDS = 60, 30 * DAY  # [alerts] durations
# No duration anywhere is longer than this (~100 years), and its numbers have at most this
# many digits: nothing computed from one can overflow a datetime.
MAX_DURATION_SECONDS = 36_600 * DAY
MAX_DURATION_DIGITS = 10

# Workflow URLs (bearer secrets: messages show their host, never the path or query).
MAX_WORKFLOW_URL_LENGTH = 2000
MAX_HOST_LENGTH = 253  # a DNS name, RFC 1035
DEFAULT_PORTS = {"http": 80, "https": 443}

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_DURATION_PART = re.compile(r"([0-9]+)([smhd])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": DAY}
_UNIT_ORDER = "dhms"
_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_PORT = re.compile(r"[0-9]{1,5}")
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# A last label that URL parsers and inet_aton read as a number (0x7f000001, 0177, 2130706433):
# the host would be an IPv4 address in disguise.
_NUMERIC_LABEL = re.compile(r"(0x[0-9a-f]*|[0-9]+)")
# What RFC 3986 allows in a path and query: unreserved, sub-delims, ":", "@", "/", "?" and
# percent-encoded octets.
_PATH_AND_QUERY = re.compile(r"(?:[A-Za-z0-9._~!$&'()*+,;=:@/?-]|%[0-9A-Fa-f]{2})*")


class Secret:
    """A string that never shows itself in repr, str, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def parse_duration(
    text: str,
    *,
    what: str,
    at_least: int = 1,
    at_most: int = MAX_DURATION_SECONDS,
) -> int:
    """``90s``, ``15m``, ``3h``, ``1d`` or combinations like ``1h30m`` -> seconds, refused
    outside ``at_least..at_most``."""
    cleaned = text.strip().lower()
    pos, total, units = 0, 0, ""
    for match in _DURATION_PART.finditer(cleaned):
        if (
            match.start() != pos
            or match.group(2) in units
            or (units and _UNIT_ORDER.index(match.group(2)) < _UNIT_ORDER.index(units[-1]))
        ):
            break  # 1s1s, 30m1h: each unit once, the largest first
        units += match.group(2)
        if len(match.group(1).lstrip("0")) > MAX_DURATION_DIGITS:
            total = MAX_DURATION_SECONDS + 1  # out of range; never turned into a number
        else:
            total += int(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if not cleaned or pos != len(cleaned) or total <= 0:
        raise ConfigError(
            f"{what}: {_shown(text)} is not a duration; use a positive number with s, m, h or d, "
            "like 90s, 15m, 3h or 1d (combined: each unit once, largest first, like 1h30m)"
        )
    if not at_least <= total <= at_most:
        raise ConfigError(
            f"{what}: {_shown(text)} is out of range; use {format_duration(at_least)} "
            f"to {format_duration(at_most)}"
        )
    return total


def _shown(text: str) -> str:
    """A value for a message: quoted, and cut short when long."""
    return repr(_cut(text))


def _cut(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def format_duration(seconds: int) -> str:
    parts = []
    for unit in ("d", "h", "m", "s"):
        size = _DURATION_UNITS[unit]
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts) or "0s"


def validate_cron(expression: str, *, what: str) -> str:
    """A standard 5-field crontab line, as APScheduler's ``CronTrigger.from_crontab`` reads it,
    that fires within ``CRON_MUST_FIRE_WITHIN_DAYS`` (``0 0 31 2 *`` never does)."""
    from apscheduler.triggers.cron import CronTrigger

    fix = 'use 5 fields like "0 */3 * * *"'
    if not expression.isascii():
        # int() reads fullwidth and Arabic-Indic digits as digits: a line no cron and no DBA reads the same way
        raise ConfigError(f"{what}: {_shown(expression)} has characters other than ASCII; {fix}")
    if len(expression) > MAX_CRON_LENGTH:
        raise ConfigError(
            f"{what}: the cron expression is longer than {MAX_CRON_LENGTH} characters"
        )
    try:
        trigger = CronTrigger.from_crontab(expression, timezone="UTC")
    except (ValueError, TypeError, OverflowError) as exc:
        raise ConfigError(
            f"{what}: {expression!r} is not a cron expression ({exc}); {fix}"
        ) from None
    now = datetime.now(UTC)
    try:
        first = trigger.get_next_fire_time(None, now)
    except (ValueError, OverflowError):
        first = None
    if first is None or first - now > timedelta(days=CRON_MUST_FIRE_WITHIN_DAYS):
        raise ConfigError(
            f"{what}: {expression!r} does not fire within {CRON_MUST_FIRE_WITHIN_DAYS // 366} "
            f"years; {fix}"
        )
    return expression.strip()


def normalize_workflow_url(url: str, *, what: str) -> str:
    """The one spelling of a Tray workflow URL, or ConfigError naming ``what`` and the URL's
    host only (the path and query are the bearer secret).

    Accepted: http or https, a DNS name (RFC 1123 labels; IDNA names become their ``xn--``
    form) or an IPv4/IPv6 literal, a port 1..65535, a path and query of RFC 3986 characters.
    Refused: userinfo, a fragment, whitespace or control characters anywhere. Normalised:
    scheme and host in lower case, the default port dropped, an empty ``?`` dropped, an empty
    path made ``/``; the path and a non-empty query are kept exactly.
    """
    fix = "use https://<id>.trayapp.io/<path>"
    if len(url) > MAX_WORKFLOW_URL_LENGTH:
        raise ConfigError(f"{what}: the URL is longer than {MAX_WORKFLOW_URL_LENGTH} characters")
    if any(ch.isspace() or unicodedata.category(ch)[0] in "CZ" for ch in url):
        raise ConfigError(f"{what}: the URL contains whitespace or a control character; remove it")
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in DEFAULT_PORTS:
        raise ConfigError(f"{what}: the URL is not an http(s) URL; {fix}")
    netloc_end = min((i for i in (rest.find(c) for c in "/?#\\") if i >= 0), default=len(rest))
    netloc, path_and_query = rest[:netloc_end], rest[netloc_end:]
    if "@" in netloc:
        raise ConfigError(
            f"{what}: the URL has a user name or password before its host; remove it "
            "(Tray's workflow URLs carry no credentials)"
        )
    host, port = _host_and_port(netloc, what=what)
    shown = f"{what}: the URL for host {_with_port(host, port, scheme)}"
    if "#" in path_and_query:
        raise ConfigError(f"{shown} has a #fragment, which is never sent; remove it")
    if "\\" in path_and_query:
        raise ConfigError(f"{shown} has a backslash; write / or %5C")
    if not _PATH_AND_QUERY.fullmatch(path_and_query):
        raise ConfigError(
            f"{shown} has characters a URL cannot hold (non-ASCII, quotes, <>, {{}}, | or a "
            "stray %); percent-encode them"
        )
    # RFC 3986 6.2.2: %2f and %2F are one octet, %41 is A: one spelling of each
    path_and_query = _PERCENT.sub(_normal_escape, path_and_query)
    path, _, query = path_and_query.partition("?")
    return f"{scheme}://{_with_port(host, port, scheme)}{path or '/'}" + (
        f"?{query}" if query else ""
    )


def _normal_escape(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else match.group(0).upper()


def _host_and_port(netloc: str, *, what: str) -> tuple[str, int | None]:
    """``host[:port]`` of a URL -> (normalised host, port), refusing what is not well formed."""
    if netloc.startswith("["):
        literal, bracket, after = netloc[1:].partition("]")
        if not bracket or (after and not after.startswith(":")):
            raise ConfigError(f"{what}: the URL's host is not a well-formed [IPv6] literal")
        try:
            if "%" in literal:  # a zone (fe80::1%eth0) names an interface of this machine only
                raise ValueError(literal)
            host = f"[{ipaddress.IPv6Address(literal).compressed}]"
        except ValueError:
            raise ConfigError(f"{what}: the URL's host is not a valid IPv6 address") from None
        port_text = after[1:] if after else None
    else:
        name, colon, port_text_or_empty = netloc.partition(":")
        port_text = port_text_or_empty if colon else None
        host = _dns_or_ipv4(name, what=what)
    if port_text is None or port_text == "":
        return host, None
    if not port_text.isascii() or not port_text.isdigit():
        raise ConfigError(f"{what}: the URL for host {host} has a port that is not a number")
    if not _PORT.fullmatch(port_text.lstrip("0") or "0") or int(port_text) > 65535:
        raise ConfigError(f"{what}: the URL for host {host} has a port past 65535")
    if int(port_text) == 0:
        raise ConfigError(f"{what}: the URL for host {host} has port 0; use 1 to 65535")
    return host, int(port_text)


def _dns_or_ipv4(name: str, *, what: str) -> str:
    if not name:
        raise ConfigError(f"{what}: the URL has no host; use https://<id>.trayapp.io/<path>")
    if not name.isascii():
        try:
            import idna  # only for a host that is not ASCII

            name = idna.encode(name, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError):
            raise ConfigError(
                f"{what}: the URL's host is not a valid internationalised domain name"
            ) from None
    name = name.lower()
    labels = name.split(".")
    if all(label.isdigit() for label in labels):
        try:
            return str(ipaddress.IPv4Address(name))
        except ValueError:
            raise ConfigError(
                f"{what}: the URL's host is not a valid IPv4 address (four numbers 0-255, "
                "no leading zeros)"
            ) from None
    if (
        len(name) > MAX_HOST_LENGTH
        or not all(_DNS_LABEL.fullmatch(label) for label in labels)
        or _NUMERIC_LABEL.fullmatch(labels[-1])
    ):
        raise ConfigError(
            f"{what}: the URL's host is not a valid DNS name (letters, digits and hyphens in "
            "dot-separated labels of 1 to 63 characters) or IP address"
        )
    return name


def _with_port(host: str, port: int | None, scheme: str) -> str:
    return host if port is None or port == DEFAULT_PORTS[scheme] else f"{host}:{port}"


def url_host(url: str) -> str:
    """``host[:port]`` of a workflow URL: how syncer shows and stores it (never the path)."""
    try:
        netloc = urlsplit(url).netloc.rpartition("@")[2]
    except ValueError:  # not a URL at all (an unclosed [IPv6 literal)
        return "?"
    return netloc.lower() or "?"


def workflow_url_hash(key: str, url: str) -> str:
    """The keyed hash (HMAC-SHA256, hex) a normalised workflow URL is stored as."""
    return hmac.new(key.encode(), url.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True, kw_only=True)
class DatabaseSettings:
    url: URL


@dataclass(frozen=True, kw_only=True)
class SourceSettings:
    name: str
    url: URL
    query_timeout_seconds: float = DEFAULT_QUERY_TIMEOUT_SECONDS
    # PostgreSQL: the role audience SQL runs as (SET LOCAL ROLE) when the source is the state
    # database; it must have no privilege on syncer's own tables.
    read_role: str | None = None
    # Run audience SQL even though the source's role can reach past a read-only transaction
    # (a superuser, pg_write_server_files, a usable dblink ...). Off: such a role is refused.
    allow_privileged_role: bool = False
    # DuckDB: the only folders audience SQL may read files from (external access is off).
    allowed_directories: tuple[Path, ...] = ()


@dataclass(frozen=True, kw_only=True)
class TraySettings:
    workflow_urls: tuple[str, ...] = ()  # normalised (normalize_workflow_url), distinct
    shared_secret: Secret | None = None
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    backoff_base_seconds: float = DEFAULT_BACKOFF_BASE_SECONDS
    backoff_max_seconds: float = DEFAULT_BACKOFF_MAX_SECONDS
    max_requests_per_second: float | None = None
    max_age_seconds: int = parse_duration(DEFAULT_MAX_AGE, what="default")
    # Processes sharing a delivery pass; max_concurrency and max_requests_per_second are
    # totals that they split between them.
    delivery_processes: int = DEFAULT_DELIVERY_PROCESSES

    def require_urls(self) -> tuple[str, ...]:
        """The workflow URLs, for commands that send: at least one must be configured."""
        if not self.workflow_urls:
            raise ConfigError(
                "no Tray workflow URL configured; set [tray] workflow_urls in settings.toml "
                "(or try: syncer demo)"
            )
        return self.workflow_urls


@dataclass(frozen=True, kw_only=True)
class ScheduleSettings:
    default_every_seconds: int = parse_duration(DEFAULT_EVERY, what="default")
    timezone: str = DEFAULT_TIMEZONE
    shutdown_grace_seconds: int = parse_duration(DEFAULT_SHUTDOWN_GRACE, what="default")


@dataclass(frozen=True, kw_only=True)
class GuardSettings:
    """The removal guard: a run that would remove more than ``max_removed_percent`` of the
    audience's members, and at least ``min_removed`` of them, is held (100 turns it off)."""

    max_removed_percent: int = DEFAULT_MAX_REMOVED_PERCENT
    min_removed: int = DEFAULT_MIN_REMOVED


@dataclass(frozen=True, kw_only=True)
class AlertSettings:
    """Where alerts are posted (secrets, like workflow URLs: shown as hosts only) and when."""

    webhook_urls: tuple[str, ...] = ()  # normalised (normalize_workflow_url), distinct
    owed_longer_than_seconds: int = parse_duration(DEFAULT_OWED_LONGER_THAN, what="default")
    repeat_after_seconds: int = parse_duration(DEFAULT_REPEAT_AFTER, what="default")
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS  # one POST: connect, send, the answer


@dataclass(frozen=True, kw_only=True)
class Settings:
    path: Path | None
    database: DatabaseSettings
    sources: Mapping[str, SourceSettings]
    tray: TraySettings = field(default_factory=TraySettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    guard: GuardSettings = field(default_factory=GuardSettings)
    alerts: AlertSettings = field(default_factory=AlertSettings)

    def source(self, name: str) -> SourceSettings:
        try:
            return self.sources[name]
        except KeyError:
            known = ", ".join(sorted(self.sources)) or "none"
            raise ConfigError(
                f"unknown source {name!r}; add [sources.{name}] to settings.toml (known: {known})"
            ) from None


def settings_path(explicit: str | None) -> Path:
    """``--settings PATH``, else ``$SYNCER_SETTINGS``, else ``./settings.toml``."""
    if explicit == "":
        raise ConfigError("--settings is empty; give the path of a settings file")
    return Path(explicit or os.environ.get(SETTINGS_ENV) or DEFAULT_SETTINGS_FILE)


def load_settings(explicit: str | None = None) -> Settings:
    path = settings_path(explicit)
    text = _read_settings_text(path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{_shown_path(path)}: not valid TOML: {exc}") from None
    return parse_settings(raw, base_dir=path.resolve().parent, path=path)


def _read_settings_text(path: Path) -> str:
    """The text of a settings file: a regular file (not a folder, FIFO or device, which could
    block or never end) of at most MAX_SETTINGS_BYTES, in UTF-8 (a byte-order mark is fine)."""
    shown = _shown_path(path)
    try:
        # O_NONBLOCK: opening a FIFO with no writer returns at once instead of waiting for one
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ConfigError(
            f"settings file {shown} not found; pass --settings PATH or set {SETTINGS_ENV}"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read settings file {shown}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError(
            f"settings file {shown} is not a regular file (a folder, FIFO or device); "
            "give a .toml file"
        )
    with os.fdopen(fd, "rb") as file:
        try:
            data = file.read(MAX_SETTINGS_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"cannot read settings file {shown}: {exc.strerror or exc}") from None
    if len(data) > MAX_SETTINGS_BYTES:
        raise ConfigError(
            f"settings file {shown} is larger than {MAX_SETTINGS_BYTES // 1024} KB; "
            "is it the right file?"
        )
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError(f"settings file {shown} is UTF-16; save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"settings file {shown} is not UTF-8 text (line {line}); save it as UTF-8"
        ) from None


def _shown_path(path: Path) -> str:
    text = str(path)
    return repr(text.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace"))


def parse_settings(raw: Mapping[str, Any], *, base_dir: Path, path: Path | None = None) -> Settings:
    expanded = _expand(raw, where="")
    _only(
        expanded, {"database", "sources", "tray", "schedule", "guard", "alerts"}, where="settings"
    )

    db_raw = _table(expanded, "database")
    _only(db_raw, {"url"}, where="[database]")
    database = DatabaseSettings(
        url=_database_url(db_raw.get("url", DEFAULT_DATABASE_URL), base_dir, "[database] url")
    )

    sources: dict[str, SourceSettings] = {}
    for name, src_raw in _table(expanded, "sources").items():
        if not _SOURCE_NAME.fullmatch(name):
            raise ConfigError(
                f"[sources.{_cut(name)!r}]: a source name is 1 to {MAX_SOURCE_NAME_LENGTH} "
                "ASCII letters, digits, _ or -, like [sources.warehouse]"
            )
        where = f"[sources.{name}]"
        if not isinstance(src_raw, Mapping):
            raise ConfigError(f"{where} must be a table with a url")
        _only(
            src_raw,
            {
                "url",
                "query_timeout_seconds",
                "read_role",
                "allow_privileged_role",
                "allowed_directories",
            },
            where=where,
        )
        if "url" not in src_raw:
            raise ConfigError(f'{where} needs a url, like url = "sqlite:///warehouse.db"')
        source_url = _database_url(src_raw["url"], base_dir, f"{where} url", source=True)
        sources[name] = SourceSettings(
            name=name,
            url=source_url,
            query_timeout_seconds=_number(
                src_raw.get("query_timeout_seconds", DEFAULT_QUERY_TIMEOUT_SECONDS),
                f"{where} query_timeout_seconds",
                MIN_QUERY_TIMEOUT_SECONDS,
                MAX_QUERY_TIMEOUT_SECONDS,
            ),
            read_role=_role_name(src_raw.get("read_role"), f"{where} read_role"),
            allow_privileged_role=_flag(
                src_raw.get("allow_privileged_role", False), f"{where} allow_privileged_role"
            ),
            allowed_directories=_allowed_directories(
                src_raw.get("allowed_directories"), source_url, base_dir, where
            ),
        )
    sources.setdefault(DEFAULT_SOURCE, SourceSettings(name=DEFAULT_SOURCE, url=database.url))
    _check_duckdb_sources(sources, database.url, base_dir, path)

    tray_raw = _table(expanded, "tray")
    _only(
        tray_raw,
        {
            "workflow_urls",
            "shared_secret",
            "timeout_seconds",
            "max_concurrency",
            "max_attempts",
            "backoff_base_seconds",
            "backoff_max_seconds",
            "max_requests_per_second",
            "max_age",
            "delivery_processes",
        },
        where="[tray]",
    )
    backoff_base = _number(
        tray_raw.get("backoff_base_seconds", DEFAULT_BACKOFF_BASE_SECONDS),
        "[tray] backoff_base_seconds",
        MIN_BACKOFF_SECONDS,
        MAX_BACKOFF_BASE_SECONDS,
    )
    tray = TraySettings(
        workflow_urls=_workflow_urls(tray_raw.get("workflow_urls")),
        shared_secret=_secret(tray_raw.get("shared_secret"), "[tray] shared_secret"),
        timeout_seconds=_number(
            tray_raw.get("timeout_seconds", DEFAULT_TIMEOUT_SECONDS),
            "[tray] timeout_seconds",
            MIN_TIMEOUT_SECONDS,
            MAX_TIMEOUT_SECONDS,
        ),
        max_concurrency=_whole_number(
            tray_raw.get("max_concurrency", DEFAULT_MAX_CONCURRENCY),
            "[tray] max_concurrency",
            MIN_CONCURRENCY,
            MAX_CONCURRENCY,
        ),
        max_attempts=_whole_number(
            tray_raw.get("max_attempts", DEFAULT_MAX_ATTEMPTS),
            "[tray] max_attempts",
            MIN_ATTEMPTS,
            MAX_ATTEMPTS,
        ),
        backoff_base_seconds=backoff_base,
        backoff_max_seconds=_number(
            tray_raw.get("backoff_max_seconds", DEFAULT_BACKOFF_MAX_SECONDS),
            "[tray] backoff_max_seconds",
            backoff_base,
            MAX_BACKOFF_MAX_SECONDS,
            low_is="backoff_base_seconds",
        ),
        max_age_seconds=parse_duration(
            _duration_text(tray_raw.get("max_age", DEFAULT_MAX_AGE), "[tray] max_age"),
            what="[tray] max_age",
            at_least=MIN_MAX_AGE_SECONDS,
            at_most=MAX_MAX_AGE_SECONDS,
        ),
        max_requests_per_second=(
            None
            if tray_raw.get("max_requests_per_second") is None
            else _number(
                tray_raw["max_requests_per_second"],
                "[tray] max_requests_per_second",
                MIN_REQUESTS_PER_SECOND,
                MAX_REQUESTS_PER_SECOND,
            )
        ),
        delivery_processes=_whole_number(
            tray_raw.get("delivery_processes", DEFAULT_DELIVERY_PROCESSES),
            "[tray] delivery_processes",
            MIN_DELIVERY_PROCESSES,
            MAX_DELIVERY_PROCESSES,
        ),
    )

    sched_raw = _table(expanded, "schedule")
    _only(sched_raw, {"default_every", "timezone", "shutdown_grace"}, where="[schedule]")
    every = _duration_text(
        sched_raw.get("default_every", DEFAULT_EVERY), "[schedule] default_every"
    )
    grace = _duration_text(
        sched_raw.get("shutdown_grace", DEFAULT_SHUTDOWN_GRACE), "[schedule] shutdown_grace"
    )
    timezone = sched_raw.get("timezone", DEFAULT_TIMEZONE)
    try:
        ZoneInfo(str(timezone))
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f'[schedule] timezone: {timezone!r} is not a time zone; use a name like "UTC" '
            'or "Europe/Berlin"'
        ) from None
    schedule = ScheduleSettings(
        default_every_seconds=parse_duration(
            every,
            what="[schedule] default_every",
            at_least=MIN_EVERY_SECONDS,
            at_most=MAX_EVERY_SECONDS,
        ),
        timezone=str(timezone),
        shutdown_grace_seconds=parse_duration(
            grace,
            what="[schedule] shutdown_grace",
            at_least=MIN_SHUTDOWN_GRACE_SECONDS,
            at_most=MAX_SHUTDOWN_GRACE_SECONDS,
        ),
    )
    guard_raw = _table(expanded, "guard")
    _only(guard_raw, {"max_removed_percent", "min_removed"}, where="[guard]")
    guard = GuardSettings(
        max_removed_percent=_whole_number(
            guard_raw.get("max_removed_percent", DEFAULT_MAX_REMOVED_PERCENT),
            "[guard] max_removed_percent",
            0,
            100,
        ),
        min_removed=_whole_number(
            guard_raw.get("min_removed", DEFAULT_MIN_REMOVED),
            "[guard] min_removed",
            0,
            MAX_MIN_REMOVED,
        ),
    )
    return Settings(
        path=path,
        database=database,
        sources=sources,
        tray=tray,
        schedule=schedule,
        guard=guard,
        alerts=_alert_settings(_table(expanded, "alerts")),
    )


def _alert_settings(raw: Mapping[str, Any]) -> AlertSettings:
    _only(
        raw,
        {"webhook_urls", "owed_longer_than", "repeat_after", "timeout_seconds"},
        where="[alerts]",
    )
    durations = {
        name: parse_duration(
            _duration_text(raw.get(name, default), f"[alerts] {name}"),
            what=f"[alerts] {name}",
            at_least=MIN_ALERT_DURATION_SECONDS,
            at_most=MAX_ALERT_DURATION_SECONDS,
        )
        for name, default in (
            ("owed_longer_than", DEFAULT_OWED_LONGER_THAN),
            ("repeat_after", DEFAULT_REPEAT_AFTER),
        )
    }
    return AlertSettings(
        webhook_urls=_webhook_urls(raw.get("webhook_urls")),
        owed_longer_than_seconds=durations["owed_longer_than"],
        repeat_after_seconds=durations["repeat_after"],
        timeout_seconds=_number(
            raw.get("timeout_seconds", DEFAULT_TIMEOUT_SECONDS),
            "[alerts] timeout_seconds",
            MIN_TIMEOUT_SECONDS,
            MAX_TIMEOUT_SECONDS,
        ),
    )


def _webhook_urls(value: Any) -> tuple[str, ...]:
    """[alerts] webhook_urls: 0 to MAX_WEBHOOK_URLS URLs, read as workflow URLs are (they are
    bearer secrets too: messages show their host only)."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(
            '[alerts] webhook_urls must be a list of URLs, like ["https://hooks.slack.com/<path>"]'
        )
    if len(value) > MAX_WEBHOOK_URLS:
        raise ConfigError(
            f"[alerts] webhook_urls has {len(value)} URLs; give at most {MAX_WEBHOOK_URLS}"
        )
    return _distinct_urls(value, "alerts", "webhook_urls", "every alert would be posted twice")


def _expand(value: Any, *, where: str) -> Any:
    if isinstance(value, str):

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            found = os.environ.get(name)
            if found is None or found == "":
                raise ConfigError(
                    f"settings {where or 'value'} uses ${{{name}}} but the environment variable "
                    f"{name} is not set"
                )
            return found

        return _VAR.sub(replace, value)
    if isinstance(value, Mapping):
        return {k: _expand(v, where=f"{where}.{k}" if where else k) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, where=where) for v in value]
    return value


def _duration_text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f'{name} must be a string like "3h" or "30s"')
    return value


def _table(raw: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"[{name}] must be a table")
    return value


def _only(raw: Mapping[str, Any], allowed: set[str], *, where: str) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r}; allowed keys are {', '.join(sorted(allowed))}"
        )


def _database_url(value: Any, base_dir: Path, what: str, *, source: bool = False) -> URL:
    """A database URL from the settings. The state database is SQLite, PostgreSQL or
    MySQL/MariaDB; a source (``source=True``) may use any SQLAlchemy dialect (whether it is
    installed is checked where it is used: ``db.check_driver``)."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f'{what} must be a database URL string, like "sqlite:///syncer.db"')
    if any(ord(char) < 32 or ord(char) == 127 for char in value.strip()):
        raise ConfigError(f"{what} contains a control character (a NUL byte, a line break…)")
    if not is_utf8(value):
        raise ConfigError(f"{what} is not valid UTF-8 text (check the variables it reads)")
    try:
        url = make_url(value.strip())
        url.port  # noqa: B018  (parsed lazily: a port that is not a number fails here)
    except (ArgumentError, ValueError):
        raise ConfigError(
            f"{what}: not a database URL; use sqlite:///file.db or "
            "postgresql+psycopg://user@host/db"
        ) from None
    backend = url.get_backend_name()
    if not source and backend not in STATE_BACKENDS:
        hint = " (it can be a source: [sources.NAME] url)" if backend in KNOWN else ""
        raise ConfigError(
            f"{what}: database {backend!r} cannot hold syncer's state{hint}; use sqlite, "
            "postgresql or mysql"
        )
    if backend == "duckdb":
        return _duckdb_url(url, base_dir, what)
    if backend == "postgresql" and url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    if backend in ("mysql", "mariadb") and "+" not in url.drivername:
        url = url.set(drivername=f"{backend}+pymysql")
    if backend == "sqlite":
        database = url.database or ""
        if database in ("", ":memory:") or database.startswith("file:"):
            raise ConfigError(f"{what}: use a SQLite file path, like sqlite:///syncer.db")
        # ?mode=memory, ?uri=true, ?check_same_thread …: syncer opens SQLite files its own
        # way (WAL, a busy timeout, read-only sources); options would be ignored or fight it
        url, db_path = _database_file(url, base_dir, what, "SQLite", "sqlite:///syncer.db")
        try:
            # a folder, /dev/null, a FIFO: SQLite would fail late, block, or write a journal
            # beside a device
            if db_path.exists() and not db_path.is_file():
                raise ConfigError(
                    f"{what}: {_shown(str(db_path))} is not a regular file (a folder or a "
                    "device); point it at a SQLite file"
                )
        except OSError:  # a name too long, a folder we cannot look into: SQLite will say
            pass
    return url


def _duckdb_url(url: URL, base_dir: Path, what: str) -> URL:
    """A DuckDB file, its path resolved beside the settings file (as SQLite's is)."""
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith(("md:", "motherduck:")):
        raise ConfigError(
            f"{what}: use a DuckDB file path, like duckdb:///warehouse.duckdb (in-memory and "
            "MotherDuck databases are not supported as sources)"
        )
    # DuckDB options arrive as ?name=value config: syncer sets its own (read_only, external
    # access off, allowed_directories) and lets none of them be loosened from the URL
    url, _ = _database_file(url, base_dir, what, "DuckDB", "duckdb:///warehouse.duckdb")
    return url


def _database_file(
    url: URL, base_dir: Path, what: str, title: str, example: str
) -> tuple[URL, Path]:
    """The URL of a database file without ``?options``, its path resolved beside the settings
    file, and that path."""
    if url.query:
        raise ConfigError(
            f"{what}: a {title} URL takes no ?options ({', '.join(sorted(url.query))}); "
            f"remove them, like {example}"
        )
    db_path = Path(url.database or "")
    if not db_path.is_absolute():
        db_path = (base_dir / db_path).resolve()
        url = url.set(database=str(db_path))
    return url, db_path


def _check_duckdb_sources(
    sources: Mapping[str, SourceSettings], state_url: URL, base_dir: Path, path: Path | None
) -> None:
    """What audience SQL on DuckDB may read must hold neither settings.toml nor the state
    database (their secrets and syncer's tables); and sources on one DuckDB file share one
    database in a process, so they must list the same folders."""
    settings_file = (path or base_dir / DEFAULT_SETTINGS_FILE).resolve()
    guarded = [("the settings file", settings_file)]
    if state_url.get_backend_name() == "sqlite" and state_url.database:
        guarded.append(("the state database", Path(state_url.database)))
    by_file: dict[str, SourceSettings] = {}
    for source in sources.values():
        for folder in source.allowed_directories:
            for what, held in guarded:
                if folder == held.parent or folder in held.parents:
                    raise ConfigError(
                        f"[sources.{source.name}] allowed_directories: {_shown_path(folder)} "
                        f"holds {what}, which audience SQL must not read; list the folders "
                        "that hold the data files only"
                    )
        if source.url.get_backend_name() != "duckdb":
            continue
        other = by_file.setdefault(str(source.url.database), source)
        if set(other.allowed_directories) != set(source.allowed_directories):
            raise ConfigError(
                f"[sources.{other.name}] and [sources.{source.name}] open the same DuckDB file "
                "with different allowed_directories; give them the same list (or one source)"
            )


def _allowed_directories(value: Any, url: URL, base_dir: Path, where: str) -> tuple[Path, ...]:
    what = f"{where} allowed_directories"
    if value is None:
        return ()
    if url.get_backend_name() != "duckdb":
        raise ConfigError(f"{what} applies to DuckDB sources only; remove it")
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f'{what} must be a list of folder paths, like ["exports/"]')
    if len(value) > MAX_ALLOWED_DIRECTORIES:
        raise ConfigError(
            f"{what} lists {len(value)} folders; give at most {MAX_ALLOWED_DIRECTORIES}"
        )
    folders = []
    for entry in value:
        if any(ord(char) < 32 or ord(char) == 127 for char in entry) or not is_utf8(entry):
            raise ConfigError(f"{what}: {_shown(_cut(entry))} is not a usable path")
        path = Path(entry)
        folder = (path if path.is_absolute() else base_dir / path).resolve()
        try:
            is_dir = folder.is_dir()
        except OSError:
            is_dir = False
        if not is_dir:
            raise ConfigError(f"{what}: {_shown_path(folder)} is not a folder")
        if folder == Path(folder.anchor):
            raise ConfigError(
                f"{what}: {_shown_path(folder)} is the whole file system; list the folders "
                "that hold the files audiences read"
            )
        folders.append(folder)
    return tuple(dict.fromkeys(folders))


def _workflow_urls(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(
            '[tray] workflow_urls must be a list of URLs, like ["https://x.trayapp.io/<path>"]'
        )
    if not 1 <= len(value) <= MAX_WORKFLOW_URLS:
        raise ConfigError(
            f"[tray] workflow_urls has {len(value)} URLs; give 1 to {MAX_WORKFLOW_URLS}"
        )
    return _distinct_urls(
        value, "tray", "workflow_urls", "the workflow would get every message twice"
    )


def _distinct_urls(values: list[str], section: str, key: str, twice: str) -> tuple[str, ...]:
    """``[section] key``'s URLs, each normalised (``normalize_workflow_url``) and given once:
    a URL listed twice, however spelled, is refused, saying ``twice`` (what would happen)."""
    urls: list[str] = []
    for i, url in enumerate(values):
        normal = normalize_workflow_url(url, what=f"[{section}] {key}[{i}]")
        if normal in urls:
            raise ConfigError(
                f"[{section}] {key}[{i}] is the same URL as {key}[{urls.index(normal)}] "
                f"(host {url_host(normal)}) once normalised, so {twice}; list each URL once"
            )
        urls.append(normal)
    return tuple(urls)


def _secret(value: Any, what: str) -> Secret | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f'{what} must be a non-empty string, like "${{TRAY_SHARED_SECRET}}"')
    # Never shown, so say what is wrong with it, not what it is: these are copy-paste slips
    # (a trailing newline, bytes that are not UTF-8) that would sign every call wrongly.
    if not is_utf8(value):
        raise ConfigError(f"{what} is not valid UTF-8 text (check the variable it reads)")
    if value != value.strip() or any(unicodedata.category(ch)[0] == "C" for ch in value):
        raise ConfigError(
            f"{what} has spaces or line breaks at its ends, or control characters; "
            "give the secret exactly as Tray shows it"
        )
    return Secret(value)


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: bytes from the environment that are not UTF-8
        return False
    return True


def _number(value: Any, what: str, low: float, high: float, *, low_is: str | None = None) -> float:
    """A positive number within ``low..high`` (``low_is``: the setting ``low`` comes from)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{what} must be a positive number, got {_cut(repr(value))}")
    if value < low:
        floor = f"{low_is} ({low:g})" if low_is else f"{low:g}"
        raise ConfigError(f"{what} must be at least {floor}, got {value:g}")
    if value > high:
        raise ConfigError(f"{what} must be at most {high:g}, got {value:g}")
    return float(value)


def _whole_number(value: Any, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or (value <= 0 and low > 0):
        kind = "a positive whole number" if low > 0 else "a whole number"
        raise ConfigError(f"{what} must be {kind}, got {_cut(repr(value))}")
    if value < low:
        raise ConfigError(f"{what} must be at least {low}, got {value}")
    if value > high:
        raise ConfigError(f"{what} must be at most {high}, got {_cut(str(value))}")
    return value


MAX_SOURCE_NAME_LENGTH = 63  # audiences.source_name holds 100
_SOURCE_NAME = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_SOURCE_NAME_LENGTH}}}")
_ROLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,62}")


def _role_name(value: Any, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _ROLE_NAME.fullmatch(value):
        raise ConfigError(
            f'{what} must be a plain role name (letters, digits, _ and $), like "syncer_reader"'
        )
    return value


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{what} must be true or false, got {value!r}")
    return value
