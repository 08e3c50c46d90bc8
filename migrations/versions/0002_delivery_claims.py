"""deliveries.claimed_by: which delivery process took a row

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Claimed rows still owed (syncer.models.CLAIMED_OWED): a partial index where the database
# has them, so a pass finds its claims without reading every owed row.
CLAIMED_OWED = "claimed_by IS NOT NULL AND status = 'pending'"


def upgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("claimed_by", sa.String(64), nullable=True))
        batch.create_index(
            "ix_deliveries_claimed_owed",
            ["claimed_by"],
            postgresql_where=sa.text(CLAIMED_OWED),
            sqlite_where=sa.text(CLAIMED_OWED),
        )


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_index("ix_deliveries_claimed_owed")
        batch.drop_column("claimed_by")
