"""delivery_pages: delivery processes claim pages of the outbox, not its rows

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC_DATETIME = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
# The partial index of 0002, no longer read: deliveries.claimed_by is now written with each
# outcome (who made the last attempt), and claims live in delivery_pages.
CLAIMED_OWED = "claimed_by IS NOT NULL AND status = 'pending'"


def upgrade() -> None:
    op.create_table(
        "delivery_pages",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("audience_id", sa.Integer(), nullable=True),
        sa.Column("destination_id", sa.Integer(), nullable=False),
        sa.Column("first_id", sa.BigInteger(), nullable=False),
        sa.Column("last_id", sa.BigInteger(), nullable=False),
        sa.Column("owed", sa.Integer(), nullable=False),
        sa.Column("claimed_by", sa.String(length=64), nullable=True),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.ForeignKeyConstraint(
            ["audience_id"], ["audiences.id"], name=op.f("fk_delivery_pages_audience_id_audiences")
        ),
        sa.ForeignKeyConstraint(
            ["destination_id"],
            ["destinations.id"],
            name=op.f("fk_delivery_pages_destination_id_destinations"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_delivery_pages")),
    )
    op.create_index(
        op.f("ix_delivery_pages_destination_id_audience_id_id"),
        "delivery_pages",
        ["destination_id", "audience_id", "id"],
    )
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_index("ix_deliveries_claimed_owed")


def downgrade() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.create_index(
            "ix_deliveries_claimed_owed",
            ["claimed_by"],
            postgresql_where=sa.text(CLAIMED_OWED),
            sqlite_where=sa.text(CLAIMED_OWED),
        )
    # The table's indexes go with it. (Dropped first on its own, the index is refused by
    # MySQL/MariaDB: the foreign key on destination_id uses it.)
    op.drop_table("delivery_pages")
