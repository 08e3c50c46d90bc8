"""End-to-end helpers: a project folder (settings, SQLite warehouse, state database) that tests
drive through the real ``syncer`` command in a subprocess, and dumps of whole databases to prove
that a command wrote nothing (or leaked nothing)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect, text

from tests.helpers import make_warehouse, run_cli, write_settings
from tests.receiver import Receiver

SECRET_ENV = "TRAY_SHARED_SECRET"
SECRET = "sup3r-s3cret-value"  # never to be seen in any output or any table

Dump = dict[str, list[str]]


def dump_database(url: str) -> Dump:
    """Every row of every table, as sorted text: equal dumps mean nothing was written."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            tables = sorted(inspect(conn).get_table_names())
            quote = conn.dialect.identifier_preparer.quote
            return {
                table: sorted(
                    repr(tuple(row))
                    for row in conn.execute(text(f"SELECT * FROM {quote(table)}")).all()
                )
                for table in tables
            }
    finally:
        engine.dispose()


def assert_usage_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit 2, exactly one line on stderr starting ``syncer: error:``, no traceback anywhere,
    and the line names each of ``fragments`` (case-insensitive). Returns the line."""
    shown = f"exit {result.returncode}\n--- stdout\n{result.stdout}--- stderr\n{result.stderr}"
    assert result.returncode == 2, shown
    assert "Traceback" not in result.stdout + result.stderr, shown
    lines = result.stderr.splitlines()
    assert len(lines) == 1, shown
    assert lines[0].startswith("syncer: error:"), shown
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), f"{fragment!r} not named\n{shown}"
    return lines[0]


@dataclass(kw_only=True)
class Project:
    """A folder with settings.toml, a SQLite warehouse and a state database URL."""

    root: Path
    state_url: str
    warehouse_url: str
    settings: Path
    env: dict[str, str] = field(default_factory=lambda: {SECRET_ENV: SECRET})
    outputs: list[str] = field(default_factory=list)  # every stdout and stderr seen

    def write_settings(self, name: str = "settings.toml", **options: Any) -> Path:
        """A settings file in the project folder; ``options`` as for tests.helpers.write_settings."""
        options.setdefault("state_url", self.state_url)
        options.setdefault("sources", {"default": self.warehouse_url})
        return write_settings(self.root / name, **options)

    def cli(
        self,
        *args: str,
        check: bool | int | None = True,
        settings: Path | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        result = run_cli(
            *args,
            settings=settings or self.settings,
            env={**self.env, **(env or {})},
            check=check,
            timeout=timeout,
        )
        self.outputs += [result.stdout, result.stderr]
        return result

    def cli_many(
        self, *commands: Sequence[str], check: bool | int | None = True
    ) -> list[subprocess.CompletedProcess[str]]:
        """Independent commands, run two at a time (each ``syncer`` start costs 1-2 s of CPU);
        the results come back in the order given."""
        with ThreadPoolExecutor(max_workers=2) as pool:
            return list(pool.map(lambda args: self.cli(*args, check=check), commands))

    def set_users(self, user_ids: Sequence[str | None]) -> None:
        make_warehouse(Path(self.warehouse_url.removeprefix("sqlite:///")), user_ids)

    def dump(self) -> Dump:
        return dump_database(self.state_url)

    def warehouse_dump(self) -> Dump:
        return dump_database(self.warehouse_url)


def new_project(
    root: Path, state_url: str, users: Sequence[str | None], **settings: Any
) -> Project:
    root.mkdir(parents=True, exist_ok=True)
    warehouse_url = make_warehouse(root / "warehouse.db", users)
    project = Project(root=root, state_url=state_url, warehouse_url=warehouse_url, settings=root)
    project.settings = project.write_settings(**settings)
    return project


@pytest.fixture
def secret_receiver() -> Iterator[Receiver]:
    """A loopback receiver that checks signatures with SECRET (what ${TRAY_SHARED_SECRET} holds)."""
    with Receiver(secret=SECRET) as rx:
        yield rx


@pytest.fixture
def project_factory(tmp_path: Path) -> Callable[..., Project]:
    """``project_factory(state_url, users, **write_settings options)`` -> a Project in tmp_path."""
    serial = iter(range(1_000_000))

    def make(state_url: str, users: Sequence[str | None], **settings: Any) -> Project:
        return new_project(tmp_path / f"p{next(serial)}", state_url, users, **settings)

    return make
