"""Logging set-up: plain lines for people, or JSON lines for log shippers (``--log-format json``)."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from syncer.errors import SyncerError

# Request lines would name workflow URLs, which are credentials of a kind: never log them.
QUIET_LOGGERS = ("httpx", "httpcore", "apscheduler")


class JsonFormatter(logging.Formatter):
    """One JSON object per line; a run's counts (``extra={"run": ...}``) come as fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        run = getattr(record, "run", None)
        if isinstance(run, dict):
            entry.update(run)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _OwnOrAskedFor(logging.Filter):
    """syncer's own records at the configured level. A library's (a warehouse driver's retries,
    warnings and errors, which syncer reports in its own words) only when more was asked for:
    its warnings and errors at ``info`` (``serve``'s default), everything at ``debug``. At a
    command's default, ``warning``, its error stays the one line it is."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "syncer" or record.name.startswith("syncer."):
            return True
        if self.level <= logging.DEBUG:
            return True
        return self.level <= logging.INFO and record.levelno >= logging.WARNING


# How this process's logging was configured: helper processes log the same way.
configured: tuple[str, str] | None = None


def configure(level: str, fmt: str) -> None:
    global configured
    configured = (level, fmt)
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.setLevel(getattr(logging, level.upper()))
    handler.addFilter(_OwnOrAskedFor(root.level))
    root.handlers[:] = [handler]
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(max(logging.WARNING, root.level))


def trace(log: logging.Logger, exc: BaseException) -> None:
    """After a one-line error: the traceback of an exception that is not one of syncer's own
    (a bug, or a library's surprise), at debug level, so ``--log-level debug`` shows where."""
    if not isinstance(exc, SyncerError):
        log.debug("where the error above came from", exc_info=exc)
