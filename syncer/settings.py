"""settings.toml: read once at start, validated, frozen.

Nothing else in the package reads ``os.environ``: ``${VAR}`` references are
expanded here, and secrets are wrapped in :class:`Secret` whose repr hides them.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

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
MAX_WORKFLOW_URLS = 10

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_DURATION_PART = re.compile(r"(\d+)([smhd])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


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


def parse_duration(text: str, *, what: str) -> int:
    """``90s``, ``15m``, ``3h``, ``1d`` or combinations like ``1h30m`` -> seconds."""
    cleaned = text.strip().lower()
    pos, total = 0, 0
    for match in _DURATION_PART.finditer(cleaned):
        if match.start() != pos:
            break
        total += int(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if not cleaned or pos != len(cleaned) or total <= 0:
        raise ConfigError(
            f"{what}: {text!r} is not a duration; use a positive number with s, m, h or d, "
            "like 90s, 15m, 3h or 1d"
        )
    return total


def format_duration(seconds: int) -> str:
    parts = []
    for unit in ("d", "h", "m", "s"):
        size = _DURATION_UNITS[unit]
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts) or "0s"


def validate_cron(expression: str, *, what: str) -> str:
    """A standard 5-field crontab line, as APScheduler's ``CronTrigger.from_crontab`` reads it."""
    from apscheduler.triggers.cron import CronTrigger

    try:
        CronTrigger.from_crontab(expression, timezone="UTC")
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"{what}: {expression!r} is not a cron expression ({exc}); "
            'use 5 fields like "0 */3 * * *"'
        ) from None
    return expression.strip()


def validate_workflow_url(url: str, *, what: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{what}: {url!r} is not an http(s) URL; use https://<id>.trayapp.io")
    return url


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


@dataclass(frozen=True, kw_only=True)
class TraySettings:
    workflow_urls: tuple[str, ...] = ()
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
class Settings:
    path: Path | None
    database: DatabaseSettings
    sources: Mapping[str, SourceSettings]
    tray: TraySettings = field(default_factory=TraySettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)

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
    return Path(explicit or os.environ.get(SETTINGS_ENV) or DEFAULT_SETTINGS_FILE)


def load_settings(explicit: str | None = None) -> Settings:
    path = settings_path(explicit)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"settings file {str(path)!r} not found; pass --settings PATH or set {SETTINGS_ENV}"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read settings file {str(path)!r}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_settings(raw, base_dir=path.resolve().parent, path=path)


def parse_settings(raw: Mapping[str, Any], *, base_dir: Path, path: Path | None = None) -> Settings:
    expanded = _expand(raw, where="")
    _only(expanded, {"database", "sources", "tray", "schedule"}, where="settings")

    db_raw = _table(expanded, "database")
    _only(db_raw, {"url"}, where="[database]")
    database = DatabaseSettings(
        url=_database_url(db_raw.get("url", DEFAULT_DATABASE_URL), base_dir, "[database] url")
    )

    sources: dict[str, SourceSettings] = {}
    for name, src_raw in _table(expanded, "sources").items():
        where = f"[sources.{name}]"
        if not isinstance(src_raw, Mapping):
            raise ConfigError(f"{where} must be a table with a url")
        _only(
            src_raw,
            {"url", "query_timeout_seconds", "read_role", "allow_privileged_role"},
            where=where,
        )
        if "url" not in src_raw:
            raise ConfigError(f'{where} needs a url, like url = "sqlite:///warehouse.db"')
        sources[name] = SourceSettings(
            name=name,
            url=_database_url(src_raw["url"], base_dir, f"{where} url"),
            query_timeout_seconds=_positive_number(
                src_raw.get("query_timeout_seconds", DEFAULT_QUERY_TIMEOUT_SECONDS),
                f"{where} query_timeout_seconds",
            ),
            read_role=_role_name(src_raw.get("read_role"), f"{where} read_role"),
            allow_privileged_role=_flag(
                src_raw.get("allow_privileged_role", False), f"{where} allow_privileged_role"
            ),
        )
    sources.setdefault(DEFAULT_SOURCE, SourceSettings(name=DEFAULT_SOURCE, url=database.url))

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
    tray = TraySettings(
        workflow_urls=_workflow_urls(tray_raw.get("workflow_urls")),
        shared_secret=_secret(tray_raw.get("shared_secret"), "[tray] shared_secret"),
        timeout_seconds=_positive_number(
            tray_raw.get("timeout_seconds", DEFAULT_TIMEOUT_SECONDS), "[tray] timeout_seconds"
        ),
        max_concurrency=_positive_int(
            tray_raw.get("max_concurrency", DEFAULT_MAX_CONCURRENCY), "[tray] max_concurrency"
        ),
        max_attempts=_positive_int(
            tray_raw.get("max_attempts", DEFAULT_MAX_ATTEMPTS), "[tray] max_attempts"
        ),
        backoff_base_seconds=_positive_number(
            tray_raw.get("backoff_base_seconds", DEFAULT_BACKOFF_BASE_SECONDS),
            "[tray] backoff_base_seconds",
        ),
        backoff_max_seconds=_positive_number(
            tray_raw.get("backoff_max_seconds", DEFAULT_BACKOFF_MAX_SECONDS),
            "[tray] backoff_max_seconds",
        ),
        max_age_seconds=parse_duration(
            _duration_text(tray_raw.get("max_age", DEFAULT_MAX_AGE), "[tray] max_age"),
            what="[tray] max_age",
        ),
        max_requests_per_second=(
            None
            if tray_raw.get("max_requests_per_second") is None
            else _positive_number(
                tray_raw["max_requests_per_second"], "[tray] max_requests_per_second"
            )
        ),
        delivery_processes=_delivery_processes(
            tray_raw.get("delivery_processes", DEFAULT_DELIVERY_PROCESSES)
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
        default_every_seconds=parse_duration(every, what="[schedule] default_every"),
        timezone=str(timezone),
        shutdown_grace_seconds=parse_duration(grace, what="[schedule] shutdown_grace"),
    )
    return Settings(path=path, database=database, sources=sources, tray=tray, schedule=schedule)


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


def _database_url(value: Any, base_dir: Path, what: str) -> URL:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f'{what} must be a database URL string, like "sqlite:///syncer.db"')
    try:
        url = make_url(value.strip())
    except ArgumentError:
        raise ConfigError(
            f"{what}: not a database URL; use sqlite:///file.db or "
            "postgresql+psycopg://user@host/db"
        ) from None
    backend = url.get_backend_name()
    if backend not in ("sqlite", "postgresql", "mysql", "mariadb"):
        raise ConfigError(
            f"{what}: database {backend!r} is not supported; use sqlite, postgresql or mysql"
        )
    if backend == "postgresql" and url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    if backend in ("mysql", "mariadb") and "+" not in url.drivername:
        url = url.set(drivername=f"{backend}+pymysql")
    if backend == "sqlite":
        database = url.database or ""
        if database in ("", ":memory:") or database.startswith("file:"):
            raise ConfigError(f"{what}: use a SQLite file path, like sqlite:///syncer.db")
        db_path = Path(database)
        if not db_path.is_absolute():
            url = url.set(database=str((base_dir / db_path).resolve()))
    return url


def _workflow_urls(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(
            '[tray] workflow_urls must be a list of URLs, like ["https://x.trayapp.io"]'
        )
    if not 1 <= len(value) <= MAX_WORKFLOW_URLS:
        raise ConfigError(
            f"[tray] workflow_urls has {len(value)} URLs; give 1 to {MAX_WORKFLOW_URLS}"
        )
    if len(set(value)) != len(value):
        raise ConfigError("[tray] workflow_urls lists the same URL twice; list each once")
    return tuple(
        validate_workflow_url(url, what=f"[tray] workflow_urls[{i}]") for i, url in enumerate(value)
    )


def _secret(value: Any, what: str) -> Secret | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f'{what} must be a non-empty string, like "${{TRAY_SHARED_SECRET}}"')
    return Secret(value)


def _positive_number(value: Any, what: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{what} must be a positive number, got {value!r}")
    return float(value)


def _delivery_processes(value: Any) -> int:
    processes = _positive_int(value, "[tray] delivery_processes")
    if processes > MAX_DELIVERY_PROCESSES:
        raise ConfigError(
            f"[tray] delivery_processes must be at most {MAX_DELIVERY_PROCESSES}, got {processes}"
        )
    return processes


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{what} must be a positive whole number, got {value!r}")
    return value


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
