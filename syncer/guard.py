"""The removal guard: a run that would remove too many of an audience's members is held.

A source that breaks (a table truncated, a join gone wrong, a view replaced) looks to a diff
like every member leaving. Such a run is *held*: nothing committed to the snapshot, nothing
sent, the run recorded with the counts it would have had, and an alert. It holds while
the source keeps returning that answer; it lets itself through as soon as a run's removals
fall back under the threshold, or once after ``syncer audience approve KEY``.

The removal count is the diff the run computes anyway: the guard costs a comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

from syncer.settings import GuardSettings


@dataclass(frozen=True, kw_only=True)
class GuardOverrides:
    """An audience's own removal guard thresholds; None: the [guard] setting."""

    max_removed_percent: int | None = None
    min_removed: int | None = None


@dataclass(frozen=True, kw_only=True)
class Thresholds:
    max_removed_percent: int
    min_removed: int

    def holds(self, *, members_before: int, removed: int) -> bool:
        """More than ``max_removed_percent`` of the members before the run, and at least
        ``min_removed`` of them (``max_removed_percent = 100`` never holds)."""
        return removed >= self.min_removed and removed * 100 > (
            self.max_removed_percent * members_before
        )

    def describe(self, *, members_before: int, removed: int) -> str:
        share = 100 * removed / members_before if members_before else 0.0
        return (
            f"held by the removal guard: it would remove {removed} of {members_before} members "
            f"({share:.1f}%, over {self.max_removed_percent}% and at least {self.min_removed})"
        )


def thresholds(settings: GuardSettings, overrides: GuardOverrides) -> Thresholds:
    """An audience's thresholds: its own overrides, else the [guard] settings."""
    percent, least = overrides.max_removed_percent, overrides.min_removed
    return Thresholds(
        max_removed_percent=settings.max_removed_percent if percent is None else percent,
        min_removed=settings.min_removed if least is None else least,
    )


def members_before(*, members_after: int, added: int, removed: int) -> int:
    """The current snapshot's size, from the new one's and the diff between them."""
    return members_after - added + removed
