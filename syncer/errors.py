"""One exception root, split by what the caller does with it.

- ``SyncerError`` is the root of every error this package raises on purpose.
- ``UsageError`` (and its children ``ConfigError``, ``AudienceError``) is bad input:
  the CLI prints one line and exits 2, having written nothing.
- ``LeaseHeldError`` means another run of the same audience is in progress.
- ``SourceError`` means an audience's query failed on its source at run time.
- ``DeliveryError`` splits into ``TransientDeliveryError`` (retry with backoff)
  and ``PermanentDeliveryError`` (give up at once).
"""

from __future__ import annotations


class SyncerError(Exception):
    """Root of all errors raised by syncer on purpose."""


class UsageError(SyncerError):
    """Bad input from the user: exit code 2, nothing written."""


class ConfigError(UsageError):
    """settings.toml, the environment or the state database setup is wrong."""


class AudienceError(UsageError):
    """An audience name, key, definition or schedule is wrong."""


class LeaseHeldError(SyncerError):
    """Another process is running this audience right now."""


class SourceError(SyncerError):
    """An audience's query failed on its source during a run."""


class DeliveryError(SyncerError):
    """A call to a Tray workflow URL did not succeed."""

    def __init__(
        self, message: str, *, status_code: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.retry_after = retry_after


class TransientDeliveryError(DeliveryError):
    """Timeouts, connection errors, 429 and 5xx: worth retrying."""


class PermanentDeliveryError(DeliveryError):
    """Other 4xx, redirects, oversize bodies: retrying will not help."""
