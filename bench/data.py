"""The benchmark's audiences: ids like ``u0000001``, and 1 % churn between two snapshots.

Snapshot ``v1`` holds ids 0 … n-1. Snapshot ``v2`` drops every 200th of them (0.5 % leave) and
adds n/200 new ids after them (0.5 % join). Ids are produced lazily: the benchmark never holds
a whole audience in Python either.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import psycopg

LEAVE_EVERY = 200  # 0.5 % of v1 leave
JOIN_PER = 200  # n / 200 = 0.5 % join
COPY_CHUNK = 50_000
SOURCE_TABLES = ("members_v1", "members_v2")


def user_id(i: int) -> str:
    return f"u{i:07d}"


def v1_ids(n: int) -> Iterator[str]:
    return (user_id(i) for i in range(n))


def v2_ids(n: int) -> Iterator[str]:
    for i in range(n):
        if i % LEAVE_EVERY:
            yield user_id(i)
    for i in range(n, n + n // JOIN_PER):
        yield user_id(i)


def churn(n: int) -> tuple[int, int]:
    """(joined, left) between v1 and v2."""
    return n // JOIN_PER, len(range(0, n, LEAVE_EVERY))


def ids_of(table: str, n: int) -> Iterator[str]:
    """``members_v2`` holds snapshot v2; any other table (``members_v1``, ``members``) v1."""
    return v2_ids(n) if table == "members_v2" else v1_ids(n)


def chunks(ids: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for value in ids:
        batch.append(value)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def copy_text(rows: list[str]) -> bytes:
    """COPY text format for one text column (our ids need no escaping)."""
    return ("\n".join(rows) + "\n").encode()


def fill_sqlite_source(path: str, n: int, tables: tuple[str, ...] = SOURCE_TABLES) -> None:
    """Warehouse tables ``members_v1`` / ``members_v2(user_id TEXT)``: plain rowid tables."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("BEGIN")
        for table in tables:
            conn.execute(f"DROP TABLE IF EXISTS {table}")
            conn.execute(f"CREATE TABLE {table} (user_id TEXT NOT NULL)")
            conn.executemany(
                f"INSERT INTO {table} (user_id) VALUES (?)", ((u,) for u in ids_of(table, n))
            )
        conn.execute("COMMIT")
    finally:
        conn.close()


def fill_pg_source(dsn: str, n: int, tables: tuple[str, ...] = SOURCE_TABLES) -> None:
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        for table in tables:
            cur.execute(f"DROP TABLE IF EXISTS {table}")
            cur.execute(f"CREATE TABLE {table} (user_id TEXT NOT NULL)")
            with cur.copy(f"COPY {table} (user_id) FROM STDIN") as copy:
                for rows in chunks(ids_of(table, n), COPY_CHUNK):
                    copy.write(copy_text(rows))
            cur.execute(f"ANALYZE {table}")
