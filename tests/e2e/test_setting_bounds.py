"""Schedules and settings past their bounds are bad input at the door (exit 2, one line naming
the key and the range, nothing written), never an overflow in ``serve`` or a hang in ``sync``."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.e2e.conftest import Project, assert_usage_error
from tests.receiver import Receiver

SQL = "SELECT user_id FROM users"
EXISTING = "pro_users"

ProjectFactory = Callable[..., Project]

COMMAND_LINE = [
    pytest.param(("audience", "create", "New", "--sql", SQL, "--every", "3000000d"),
                 ("--every", "1s to 366d"), id="create-every-3000000d"),
    pytest.param(("audience", "update", EXISTING, "--every", "99999999999999999999d"),
                 ("--every", "out of range"), id="update-every-20-digits"),
    pytest.param(("audience", "create", "New", "--sql", SQL, "--cron", "0 0 31 2 *"),
                 ("--cron", "does not fire within 5 years"), id="create-cron-never"),
    pytest.param(("audience", "update", EXISTING, "--cron", "0 0 30 2 *"),
                 ("--cron", "does not fire"), id="update-cron-never"),
]  # fmt: skip

SETTINGS = [
    pytest.param({"extra": '[schedule]\ndefault_every = "3000000d"'},
                 ("[schedule] default_every", "1s to 366d"), id="default-every"),
    pytest.param({"tray": {"max_concurrency": 100_000_000}},
                 ("[tray] max_concurrency", "at most 1000"), id="max-concurrency"),
    pytest.param({"tray": {"max_requests_per_second": 1e-300}},
                 ("[tray] max_requests_per_second", "at least 0.1"), id="rate"),
    pytest.param({"tray": {"max_age": "999999999999d"}},
                 ("[tray] max_age", "1s to 30d"), id="max-age"),
    pytest.param({"tray": {"backoff_max_seconds": 1e300}},
                 ("[tray] backoff_max_seconds", "at most 3600"), id="backoff-max"),
]  # fmt: skip


@pytest.fixture
def project(project_factory: ProjectFactory, sqlite_url: str, receiver: Receiver) -> Project:
    p = project_factory(sqlite_url, ["u1", "u2"], workflow_urls=[receiver.url("w1")])
    p.cli("db", "upgrade")
    p.cli("audience", "create", "Pro Users", "--sql", SQL)
    return p


@pytest.mark.parametrize(("args", "names"), COMMAND_LINE)
def test_schedules_past_their_bounds_are_refused(
    project: Project, args: tuple[str, ...], names: tuple[str, ...]
) -> None:
    before = project.dump()
    assert_usage_error(project.cli(*args, check=None), *names)
    assert project.dump() == before


@pytest.mark.parametrize(("options", "names"), SETTINGS)
def test_settings_past_their_bounds_stop_sync_at_the_start(
    project: Project, receiver: Receiver, options: dict[str, object], names: tuple[str, ...]
) -> None:
    before = project.dump()
    bad = project.write_settings(name="bad.toml", workflow_urls=[receiver.url("w1")], **options)
    assert_usage_error(project.cli("sync", settings=bad, check=None, timeout=30), *names)
    assert project.dump() == before
    assert receiver.requests() == []
