"""Throw-away state and source databases: SQLite files in a work folder, PostgreSQL databases
on 127.0.0.1 named ``syncer_bench_*`` (dropped when the benchmark ends, also on errors).

PostgreSQL databases are owned by, and reached as, an ordinary role (``PG_ROLE``), as operators
run syncer: a superuser source is refused. ``PG_READER`` is the ``read_role`` audience SQL runs
as when the source is the state database itself."""

from __future__ import annotations

import secrets
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_ROLE = "syncer_bench"
PG_READER = "syncer_bench_reader"
PG_DSN_TEMPLATE = f"postgresql://{PG_ROLE}@127.0.0.1:5432/{{name}}"
PG_PREFIX = "syncer_bench_"
_ENSURE_ROLES = f"""
DO $$ BEGIN
  CREATE ROLE {PG_ROLE} LOGIN;
EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN
  CREATE ROLE {PG_READER} NOLOGIN;
EXCEPTION WHEN duplicate_object THEN NULL; END $$;
GRANT {PG_READER} TO {PG_ROLE};
"""


@dataclass(frozen=True, kw_only=True)
class Database:
    """One database as both syncer (a SQLAlchemy URL) and the baseline (a driver) reach it."""

    kind: str  # "sqlite" | "postgresql"
    url: str  # for syncer's settings
    target: str  # SQLite path, or psycopg DSN

    def connect_sqlite(self) -> sqlite3.Connection:
        """A connection set up like syncer's own (WAL, synchronous=NORMAL, autocommit)."""
        conn = sqlite3.connect(self.target, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA temp_store=FILE")
        return conn

    def connect_pg(self, *, autocommit: bool = False) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(self.target, autocommit=autocommit)

    def as_own_source(self, *tables: str) -> dict[str, str]:
        """``[sources.default]`` for audience SQL over these tables of this (state) database:
        on PostgreSQL through the read role, which may read them and nothing of syncer's
        (docs/security.md)."""
        if self.kind != "postgresql":
            return {"url": self.url}
        self.let_reader_select(*tables)
        return {"url": self.url, "read_role": PG_READER}

    def let_reader_select(self, *tables: str) -> None:
        """PostgreSQL: the read role may read these tables (and nothing of syncer's)."""
        if self.kind != "postgresql":
            return
        with self.connect_pg(autocommit=True) as conn:
            for table in tables:
                conn.execute(
                    sql.SQL("GRANT SELECT ON {} TO {}").format(
                        sql.Identifier(table), sql.Identifier(PG_READER)
                    )
                )


@dataclass
class Databases:
    """Creates databases under ``workdir`` / on PostgreSQL and drops them all in ``close``."""

    workdir: Path
    pg_names: list[str] = field(default_factory=list)

    def sqlite(self, name: str) -> Database:
        path = self.workdir / f"{name}.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        return Database(kind="sqlite", url=f"sqlite:///{path}", target=str(path))

    def postgres(self, name: str) -> Database:
        db = f"{PG_PREFIX}{name}_{secrets.token_hex(4)}"
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(_ENSURE_ROLES.encode())
            admin.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(db), sql.Identifier(PG_ROLE)
                )
            )
        self.pg_names.append(db)
        return Database(
            kind="postgresql",
            url=f"postgresql+psycopg://{PG_ROLE}@127.0.0.1:5432/{db}",
            target=PG_DSN_TEMPLATE.format(name=db),
        )

    def make(self, kind: str, name: str) -> Database:
        return self.sqlite(name) if kind == "sqlite" else self.postgres(name)

    def drop(self, database: Database) -> None:
        if database.kind == "sqlite":
            for suffix in ("", "-wal", "-shm"):
                Path(f"{database.target}{suffix}").unlink(missing_ok=True)
            return
        name = database.target.rsplit("/", 1)[1]
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
        if name in self.pg_names:
            self.pg_names.remove(name)

    def close(self) -> None:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
            for name in self.pg_names:
                admin.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
        self.pg_names.clear()


def checkpoint() -> None:
    """PostgreSQL's CHECKPOINT (a superuser's statement: the bench's own role is ordinary)."""
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as admin:
        admin.execute("CHECKPOINT")
