"""Workflow URLs end to end: a URL is a bearer secret (its path is the token).

- The state database holds no URL: each is stored as its host and a keyed hash, and no table
  holds a path, even after failed deliveries, at ``--log-level debug``.
- ``syncer deliveries`` shows the host; the sender still finds each URL's row (no backfill
  when the same URL is written another way).
- Spellings of one URL are one URL: listing two is bad input (exit 2, host only, nothing written).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from tests.e2e.conftest import Project, assert_usage_error
from tests.receiver import Receiver

NAME, KEY, SQL = "All Users", "all_users", "SELECT user_id FROM users"
USERS = [f"u{i}" for i in range(1, 6)]
TOKENS = ("tok-9c1e7f3a-alpha-secret", "tok-4e6f8b2d-beta-secret")

ProjectFactory = Callable[..., Project]


def _holding(project: Project, fragment: str) -> dict[str, list[str]]:
    """table -> its rows (as text) that contain ``fragment``, over every table."""
    found = {t: [r for r in rows if fragment in r] for t, rows in project.dump().items()}
    return {table: rows for table, rows in found.items() if rows}


def test_no_table_holds_a_workflow_url_and_deliveries_show_its_host(
    project_factory: ProjectFactory, state_url: str, secret_receiver: Receiver
) -> None:
    rx = secret_receiver
    urls = [rx.url(f"hooks/{token}") for token in TOKENS]
    p = project_factory(
        state_url,
        USERS,
        workflow_urls=urls,
        shared_secret="${TRAY_SHARED_SECRET}",
        tray={"max_attempts": 2},
    )
    p.cli("db", "upgrade")
    p.cli("audience", "create", NAME, "--sql", SQL)
    rx.set_status(f"hooks/{TOKENS[1]}", 503)  # every call fails: errors are recorded

    synced = p.cli("--log-level", "debug", "sync", check=1)
    rx.set_status(f"hooks/{TOKENS[1]}", None)
    listed, as_json = p.cli_many(("deliveries",), ("deliveries", "--json"))

    host = f"127.0.0.1:{rx.port}"
    for token in TOKENS:
        assert _holding(p, token) == {}
        assert _holding(p, "hooks/") == {}
        for shown in (synced.stdout, synced.stderr, listed.stdout, as_json.stdout):
            assert token not in shown
    assert list(_holding(p, host)) == ["destinations"]  # stored as host[:port] ...
    rows = json.loads(as_json.stdout)
    assert len(rows) == 2 * len(USERS)
    assert {r["destination_host"] for r in rows} == {host}  # ... and shown as it
    assert host in listed.stdout
    assert {r["status"] for r in rows if r["destination_id"] == 1} == {"sent"}
    assert {r["status"] for r in rows if r["destination_id"] == 2} == {"failed"}

    # The same URLs written another way are the same destinations: nothing new is owed.
    p.settings = p.write_settings(
        workflow_urls=[u.replace("http://", "HTTP://") + "?" for u in urls],
        shared_secret="${TRAY_SHARED_SECRET}",
    )
    before = len(rx.requests())
    assert "succeeded" in p.cli("sync").stdout
    assert len(rx.requests()) == before
    assert len(p.dump()["destinations"]) == 2


def test_two_spellings_of_one_url_are_refused(
    project_factory: ProjectFactory, sqlite_url: str, secret_receiver: Receiver
) -> None:
    rx = secret_receiver
    url = rx.url(f"hooks/{TOKENS[0]}")
    p = project_factory(sqlite_url, USERS, workflow_urls=[url])
    p.cli("db", "upgrade")
    p.cli("audience", "create", NAME, "--sql", SQL)
    before = p.dump()
    host = f"127.0.0.1:{rx.port}"
    spellings = [
        url.replace("http://", "HTTP://"),
        url + "?",
        url.replace(host, f"127.0.0.1:0{rx.port}"),
    ]
    for spelling in spellings:
        bad = p.write_settings(name="bad.toml", workflow_urls=[url, spelling])
        line = assert_usage_error(
            p.cli("sync", settings=bad, check=None),
            "[tray] workflow_urls[1]",
            "same URL",
            host,
        )
        assert TOKENS[0] not in line
    for bad_url, says in [
        (url + "#part", "#fragment"),
        (url.replace(str(rx.port), "70000"), "port past 65535"),
        (url.replace("http://", "http://user:pw@"), "user name or password"),
        (url + "\r\nX: y", "control character"),
    ]:
        bad = p.write_settings(name="bad.toml", workflow_urls=[bad_url])
        line = assert_usage_error(
            p.cli("sync", settings=bad, check=None), "[tray] workflow_urls[0]", says
        )
        assert TOKENS[0] not in line and "pw" not in line
    assert p.dump() == before
    assert rx.requests() == []
