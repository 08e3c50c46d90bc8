"""alert_problems: what ``[alerts]`` has posted about, so an open problem is not posted again
within ``repeat_after``

One row per problem (``run:<audience id>``, ``url:<destination id>``, ``owed:<destination
id>``), opened again in place when it comes back after being resolved.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MYSQL = ("mysql", "mariadb")
EVENTS = "event IN ('run_failed', 'run_partial', 'run_held', 'url_failed', 'deliveries_owed')"


def _utc() -> sa.types.TypeEngine[object]:
    return sa.DateTime(timezone=True).with_variant(sa.dialects.mysql.DATETIME(fsp=6), *MYSQL)


def upgrade() -> None:
    op.create_table(
        "alert_problems",
        sa.Column("problem", sa.String(100), nullable=False),
        sa.Column("event", sa.String(32), nullable=False),
        sa.Column("opened_at", _utc(), nullable=False),
        sa.Column("last_sent_at", _utc(), nullable=True),
        sa.Column("sent_count", sa.Integer(), nullable=False),
        sa.Column("resolved_at", _utc(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.CheckConstraint(EVENTS, name=op.f("ck_alert_problems_event")),
        sa.PrimaryKeyConstraint("problem", name=op.f("pk_alert_problems")),
    )


def downgrade() -> None:
    op.drop_table("alert_problems")
