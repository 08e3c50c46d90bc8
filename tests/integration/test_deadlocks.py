"""A transaction the database rolls back to break a deadlock is run again (db.retry_deadlocks):
two real transactions update two rows in opposite orders on PostgreSQL and MariaDB."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import DBAPIError

from syncer.db import is_deadlock, retry_deadlocks
from tests.conftest import WITH_MARIADB

BACKENDS = [
    pytest.param("pg_url", id="postgres", marks=pytest.mark.postgres),
    *([pytest.param("mariadb_url", id="mariadb")] if WITH_MARIADB else []),
]


def _crossing(
    engine: Engine, first: int, second: int, barrier: threading.Barrier
) -> Callable[[], None]:
    """A transaction that locks row ``first``, waits for the other one to lock its row, then
    wants ``second`` (the other's): one of the two is the database's deadlock victim."""
    attempts = [0]

    def work() -> None:
        attempts[0] += 1
        with engine.begin() as conn:
            conn.execute(text("UPDATE cells SET v = v + 1 WHERE id = :id"), {"id": first})
            if attempts[0] == 1:
                barrier.wait(timeout=10)
            conn.execute(text("UPDATE cells SET v = v + 1 WHERE id = :id"), {"id": second})

    return work


@pytest.mark.parametrize("url_fixture", BACKENDS)
def test_the_deadlock_victim_runs_again_and_both_transactions_count(
    url_fixture: str, request: pytest.FixtureRequest
) -> None:
    engine = create_engine(str(request.getfixturevalue(url_fixture)))
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE cells (id INTEGER PRIMARY KEY, v INTEGER NOT NULL)"))
            conn.execute(text("INSERT INTO cells (id, v) VALUES (1, 0), (2, 0)"))
        barrier = threading.Barrier(2)
        errors: list[BaseException] = []
        victims: list[bool] = []

        def run(work: Callable[[], None], *, retried: bool) -> None:
            try:
                if retried:
                    retry_deadlocks(work, what="test")
                else:
                    work()
            except DBAPIError as exc:
                victims.append(is_deadlock(exc))
            except BaseException as exc:  # a broken barrier, say: the test fails below
                errors.append(exc)

        # Without retrying, one of the two crossing transactions is lost to the deadlock.
        plain = [
            threading.Thread(
                target=run, args=(_crossing(engine, 1, 2, barrier),), kwargs={"retried": False}
            ),
            threading.Thread(
                target=run, args=(_crossing(engine, 2, 1, barrier),), kwargs={"retried": False}
            ),
        ]
        for thread in plain:
            thread.start()
        for thread in plain:
            thread.join(timeout=60)
        assert not errors and victims == [True]

        # With retry_deadlocks, the victim runs again: both transactions count.
        with engine.begin() as conn:
            conn.execute(text("UPDATE cells SET v = 0"))
        barrier = threading.Barrier(2)
        victims.clear()
        retried = [
            threading.Thread(
                target=run, args=(_crossing(engine, 1, 2, barrier),), kwargs={"retried": True}
            ),
            threading.Thread(
                target=run, args=(_crossing(engine, 2, 1, barrier),), kwargs={"retried": True}
            ),
        ]
        for thread in retried:
            thread.start()
        for thread in retried:
            thread.join(timeout=60)
        assert not errors and not victims
        with engine.connect() as conn:
            assert conn.execute(text("SELECT v FROM cells ORDER BY id")).scalars().all() == [2, 2]
    finally:
        engine.dispose()
