"""audiences as code, rules, the removal guard: what audiences.yml and a held run need

- ``audiences``: ``definition_params`` (the bound values of SQL compiled from rules, JSON),
  ``definition_rules`` (the rules themselves, JSON, as the builder edits them), ``managed``
  (true when ``syncer apply`` owns the audience: read-only to ``audience update``), the guard's
  per-audience overrides (``guard_max_removed_percent``, ``guard_min_removed``) and
  ``removal_approved_at`` (``syncer audience approve``: the next run goes through once).
- ``audience_models``: the models of audiences.yml as ``apply`` stored them, with the columns
  the source reported (the console's rule builder offers them).
- ``sync_runs.status`` may be ``held``: a run that would have removed too many members,
  recorded with the counts it would have had and nothing committed.

On SQLite ``sync_runs`` is rebuilt to change its check (with foreign keys off: other tables
refer to it; the check that nothing points nowhere runs before they are turned on again).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUS_CHECK = "ck_sync_runs_status"
OLD_STATUSES = "status IN ('running', 'succeeded', 'partial', 'failed', 'interrupted')"
NEW_STATUSES = "status IN ('running', 'succeeded', 'partial', 'failed', 'interrupted', 'held')"
MYSQL = ("mysql", "mariadb")


def _utc() -> sa.types.TypeEngine[object]:
    return sa.DateTime(timezone=True).with_variant(sa.dialects.mysql.DATETIME(fsp=6), *MYSQL)


@contextmanager
def _foreign_keys_off() -> Iterator[None]:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        yield
        return
    bind.exec_driver_sql("PRAGMA foreign_keys=OFF")
    try:
        yield
        broken = bind.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
        if broken:
            raise RuntimeError(f"migration 0007 left rows pointing nowhere: {broken[:5]}")
    finally:
        bind.exec_driver_sql("PRAGMA foreign_keys=ON")


def _status_check(statuses: str) -> None:
    with _foreign_keys_off(), op.batch_alter_table("sync_runs") as batch:
        batch.drop_constraint(op.f(STATUS_CHECK), type_="check")
        batch.create_check_constraint("status", statuses)


def upgrade() -> None:
    # Plain ADD COLUMN everywhere (SQLite too: no rebuild of a table others refer to).
    op.add_column("audiences", sa.Column("definition_params", sa.Text(), nullable=True))
    op.add_column("audiences", sa.Column("definition_rules", sa.Text(), nullable=True))
    op.add_column(
        "audiences",
        sa.Column("managed", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.add_column("audiences", sa.Column("guard_max_removed_percent", sa.Integer(), nullable=True))
    op.add_column("audiences", sa.Column("guard_min_removed", sa.Integer(), nullable=True))
    op.add_column("audiences", sa.Column("removal_approved_at", _utc(), nullable=True))
    op.create_table(
        "audience_models",
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("source_name", sa.String(100), nullable=False),
        sa.Column("table_name", sa.String(255), nullable=True),
        sa.Column("sql", sa.Text(), nullable=True),
        sa.Column("primary_key", sa.String(255), nullable=True),
        sa.Column("foreign_key", sa.String(255), nullable=True),
        sa.Column("timestamp_column", sa.String(255), nullable=True),
        sa.Column("columns", sa.Text(), nullable=False),
        sa.Column("updated_at", _utc(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_audience_models")),
    )
    _status_check(NEW_STATUSES)


def downgrade() -> None:
    # A held run becomes a failed one: nothing of it was committed, as for a failed run.
    op.execute("UPDATE sync_runs SET status = 'failed' WHERE status = 'held'")
    _status_check(OLD_STATUSES)
    op.drop_table("audience_models")
    # SQLite drops a column in place (3.35+), as the others do.
    for name in (
        "removal_approved_at",
        "guard_min_removed",
        "guard_max_removed_percent",
        "managed",
        "definition_rules",
        "definition_params",
    ):
        op.drop_column("audiences", name)
