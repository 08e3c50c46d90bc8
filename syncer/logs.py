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
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(max(logging.WARNING, root.level))


def trace(log: logging.Logger, exc: BaseException) -> None:
    """After a one-line error: the traceback of an exception that is not one of syncer's own
    (a bug, or a library's surprise), at debug level, so ``--log-level debug`` shows where."""
    if not isinstance(exc, SyncerError):
        log.debug("where the error above came from", exc_info=exc)
