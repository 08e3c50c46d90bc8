"""The ``syncer`` command with a DuckDB file as the source: a subprocess, a SQLite state
database, a real DuckDB file written with the ``duckdb`` module and the loopback receiver."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import duckdb
from sqlalchemy import make_url

import syncer.db
from tests.e2e.conftest import SECRET, Project, assert_usage_error, dump_database
from tests.helpers import toml_value, write_settings
from tests.receiver import Receiver

NAME = "Pro Users"
KEY = "pro_users"
SQL = "SELECT user_id FROM users WHERE plan = 'pro'"
NOWHERE = "http://127.0.0.1:9/never-called"


def _duck_project(
    root: Path,
    users: Sequence[tuple[str | None, str]],
    *,
    workflow_urls: list[str] | None = None,
    allowed: list[str] | None = None,
) -> Project:
    """A project folder: settings.toml, state.db (SQLite), warehouse.duckdb with ``users``
    (user_id, plan), and an ``exports/`` folder."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "exports").mkdir()
    duck = root / "warehouse.duckdb"
    with duckdb.connect(str(duck)) as db:
        db.execute("CREATE TABLE users (user_id VARCHAR, plan VARCHAR)")
        if users:
            db.executemany("INSERT INTO users VALUES (?, ?)", users)
    state_url = f"sqlite:///{(root / 'state.db').resolve()}"
    source = ["[sources.default]", 'url = "duckdb:///warehouse.duckdb"']  # beside settings.toml
    if allowed is not None:
        source.append(f"allowed_directories = {toml_value(allowed)}")
    settings = write_settings(
        root / "settings.toml",
        state_url=state_url,
        workflow_urls=workflow_urls,
        shared_secret="${TRAY_SHARED_SECRET}",
        extra="\n".join(source),
    )
    return Project(
        root=root, state_url=state_url, warehouse_url=f"duckdb:///{duck}", settings=settings
    )


def _set_users(project: Project, users: Sequence[tuple[str | None, str]]) -> None:
    with duckdb.connect(str(project.root / "warehouse.duckdb")) as db:
        db.execute("DELETE FROM users")
        db.executemany("INSERT INTO users VALUES (?, ?)", users)


def test_a_duckdb_audience_syncs_end_to_end(tmp_path: Path, secret_receiver: Receiver) -> None:
    rx = secret_receiver
    pros = [f"u{i:02d}" for i in range(1, 11)]
    p = _duck_project(
        tmp_path / "p",
        [(u, "pro") for u in pros] + [("f1", "free"), (None, "pro"), ("", "pro")],
        workflow_urls=[rx.url("w1"), rx.url("w2")],
        allowed=["exports"],
    )
    (p.root / "exports" / "vip.csv").write_text("user_id\nu01\nu02\n")
    p.cli("db", "upgrade")
    created, from_csv = p.cli_many(
        ("audience", "create", NAME, "--sql", SQL),
        ("audience", "create", "VIP", "--sql", "SELECT user_id FROM 'exports/vip.csv'"),
    )
    assert (created.stdout, created.stderr) == (f"{KEY}\n", "")
    assert from_csv.stdout == "vip\n"

    first = p.cli("sync")
    lines = first.stdout.splitlines()
    assert len(lines) == 2, first.stdout
    assert lines[0].startswith(f"{KEY}: run ") and "(initial) succeeded" in lines[0]
    assert lines[1].startswith("vip: run ") and "(initial) succeeded" in lines[1]
    for path in ("w1", "w2"):
        requests = rx.requests(path)
        assert len(requests) == 12  # ten pros and two VIPs, each one identify call
        assert all(r.accepted and r.signature_ok for r in requests)
        assert {r.json["type"] for r in requests} == {"identify"}
        assert rx.final_traits(path) == {u: {KEY: True} for u in pros} | {
            "u01": {KEY: True, "vip": True},
            "u02": {KEY: True, "vip": True},
        }

    # u01 leaves the pros, n1 joins: two calls per URL, nothing else
    _set_users(p, [(u, "pro") for u in pros[1:]] + [("n1", "pro"), ("u01", "free")])
    second = p.cli("sync", KEY)
    assert "(incremental) succeeded" in second.stdout and "+1 -1" in second.stdout
    for path in ("w1", "w2"):
        later = rx.requests(path)[12:]
        assert sorted((r.user_id, r.json["traits"][KEY]) for r in later) == [
            ("n1", True),
            ("u01", False),
        ]

    # the file is not held between commands: a writer gets in at once
    with duckdb.connect(str(p.root / "warehouse.duckdb")) as db:
        db.execute("CREATE TABLE written_after_sync (n INTEGER)")

    for output in p.outputs:
        assert SECRET not in output
        assert "Traceback" not in output


def test_audience_sql_that_reads_settings_or_writes_a_file_is_exit_2(tmp_path: Path) -> None:
    p = _duck_project(tmp_path / "p", [("u1", "pro")], workflow_urls=[NOWHERE], allowed=["exports"])
    syncer.db.upgrade(make_url(p.state_url))
    before = p.dump()

    # audience SQL that reads settings.toml, or writes a file: exit 2, one line, nothing stored
    refused = p.cli_many(
        ("audience", "create", "Leak", "--sql", "SELECT content FROM read_text('settings.toml')"),
        ("audience", "create", "Out", "--sql", "COPY users TO 'exports/out.csv'"),
        check=None,
    )
    assert_usage_error(refused[0], "settings.toml", "disabled by configuration")
    assert_usage_error(refused[1], "COPY")
    assert p.dump() == before
    assert not (p.root / "exports" / "out.csv").exists()
    assert list((p.root / "exports").iterdir()) == []
    for output in p.outputs:
        assert SECRET not in output
        assert "Traceback" not in output


def test_bad_duckdb_settings_are_one_line_and_exit_2(tmp_path: Path) -> None:
    p = _duck_project(tmp_path / "p", [("u1", "pro")], workflow_urls=[NOWHERE])
    syncer.db.upgrade(make_url(p.state_url))
    (p.root / "warehouse.duckdb").unlink()
    before = dump_database(p.state_url)

    def settings(name: str, source: str, database: str = p.state_url) -> Path:
        path = p.root / name
        path.write_text(f"[database]\nurl = {toml_value(database)}\n\n{source}\n")
        return path

    sqlite_source = f"sqlite:///{p.root / 'state.db'}"
    for folder in ("a", "b"):
        (p.root / folder).mkdir()
    os.mkfifo(p.root / "fifo.duckdb")
    cases = {
        "missing": (
            settings("missing.toml", '[sources.default]\nurl = "duckdb:///warehouse.duckdb"'),
            ("does not exist", str(p.root / "warehouse.duckdb")),
        ),
        "state": (
            settings("state.toml", "", database="duckdb:///x.duckdb"),
            ("[database] url", "duckdb", "cannot hold syncer's state"),
        ),
        "sqlite": (
            settings(
                "sqlite.toml",
                f'[sources.default]\nurl = "{sqlite_source}"\nallowed_directories = ["exports"]',
            ),
            ("allowed_directories", "DuckDB sources only"),
        ),
        "no-folder": (
            settings(
                "no-folder.toml",
                '[sources.default]\nurl = "duckdb:///w.duckdb"\nallowed_directories = ["nope"]',
            ),
            # the folder named as the user wrote it, whatever the length of its path
            ("allowed_directories", "nope", "is not a folder"),
        ),
        "root": (
            settings(
                "root.toml",
                '[sources.default]\nurl = "duckdb:///w.duckdb"\nallowed_directories = ["/"]',
            ),
            ("allowed_directories", "whole file system"),
        ),
        # the settings' own folder would let audience SQL read settings.toml and the state file
        "settings-folder": (
            settings(
                "here.toml",
                '[sources.default]\nurl = "duckdb:///w.duckdb"\nallowed_directories = ["."]',
            ),
            ("allowed_directories", "holds the settings file", "must not read"),
        ),
        "two-lists": (
            settings(
                "two.toml",
                '[sources.default]\nurl = "duckdb:///w.duckdb"\nallowed_directories = ["a"]\n'
                '[sources.other]\nurl = "duckdb:///w.duckdb"\nallowed_directories = ["b"]',
            ),
            ("same DuckDB file", "different allowed_directories"),
        ),
        # a SQLite file (DuckDB would read it through its SQLite extension) or a FIFO
        "sqlite-file": (
            settings("sqlitefile.toml", '[sources.default]\nurl = "duckdb:///state.db"'),
            ("is not a DuckDB database file",),
        ),
        "fifo": (
            settings("fifo.toml", '[sources.default]\nurl = "duckdb:///fifo.duckdb"'),
            ("is not a DuckDB database file",),
        ),
    }
    create = ("audience", "create", "X", "--sql", "SELECT 'u1' AS user_id")
    with ThreadPoolExecutor(max_workers=2) as pool:  # each start costs seconds of CPU
        results = list(
            pool.map(lambda case: p.cli(*create, settings=case[0], check=None), cases.values())
        )
    for (name, (_, fragments)), result in zip(cases.items(), results, strict=True):
        line = assert_usage_error(result, *fragments)
        assert len(line) < 300, (name, line)

    assert dump_database(p.state_url) == before
    assert not (p.root / "warehouse.duckdb").exists()  # not created by looking for it
    assert not (p.root / "x.duckdb").exists()
