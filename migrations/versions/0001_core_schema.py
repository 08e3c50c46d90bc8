"""core schema: audiences, memberships, sync runs, deliveries, leases

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# UTC timestamps, with microseconds on MySQL/MariaDB too (syncer.models.UTCDateTime).
UTC_DATETIME = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def exact_string(length: int) -> sa.types.TypeEngine[str]:
    """Compared byte for byte everywhere (syncer.models.exact_string)."""
    return sa.String(length).with_variant(
        mysql.VARCHAR(length, collation="utf8mb4_bin"), "mysql", "mariadb"
    )


def upgrade() -> None:
    op.create_table(
        "audiences",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", exact_string(255), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("source_name", sa.String(length=100), nullable=False),
        sa.Column("definition_sql", sa.Text(), nullable=False),
        sa.Column("every_seconds", sa.Integer(), nullable=True),
        sa.Column("cron", sa.String(length=100), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.Column("updated_at", UTC_DATETIME, nullable=False),
        sa.Column("deleted_at", UTC_DATETIME, nullable=True),
        sa.CheckConstraint(
            "status IN ('active', 'paused', 'deleted')", name=op.f("ck_audiences_status")
        ),
        sa.CheckConstraint(
            "every_seconds IS NULL OR cron IS NULL", name=op.f("ck_audiences_one_schedule")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audiences")),
        sa.UniqueConstraint("key", name=op.f("uq_audiences_key")),
    )
    op.create_table(
        "destinations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("url", exact_string(700), nullable=False),
        sa.Column("first_seen_at", UTC_DATETIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_destinations")),
        sa.UniqueConstraint("url", name=op.f("uq_destinations_url")),
    )
    op.create_table(
        "user_deletions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_hash", sa.String(length=64), nullable=False),
        sa.Column("requested_at", UTC_DATETIME, nullable=False),
        sa.Column("restored_at", UTC_DATETIME, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_user_deletions")),
    )
    op.create_index(
        op.f("ix_user_deletions_user_hash"), "user_deletions", ["user_hash"], unique=False
    )
    settings = op.create_table(
        "syncer_settings",
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("value", sa.String(length=255), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_syncer_settings")),
    )
    # The salt of user hashes exists from the start: user deletions and snapshot commits
    # lock its row to stay apart (syncer.privacy.lock_deletions).
    op.bulk_insert(settings, [{"name": "user_hash_salt", "value": secrets.token_hex(16)}])
    op.create_table(
        "service_leases",
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("token", sa.String(length=64), nullable=False),
        sa.Column("holder_host", sa.String(length=255), nullable=False),
        sa.Column("holder_pid", sa.Integer(), nullable=False),
        sa.Column("holder_started", sa.BigInteger(), nullable=True),
        sa.Column("acquired_at", UTC_DATETIME, nullable=False),
        sa.Column("expires_at", UTC_DATETIME, nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_service_leases")),
    )
    op.create_table(
        "sync_leases",
        sa.Column("audience_id", sa.Integer(), nullable=False),
        sa.Column("token", sa.String(length=64), nullable=False),
        sa.Column("holder_host", sa.String(length=255), nullable=False),
        sa.Column("holder_pid", sa.Integer(), nullable=False),
        sa.Column("holder_started", sa.BigInteger(), nullable=True),
        sa.Column("acquired_at", UTC_DATETIME, nullable=False),
        sa.Column("expires_at", UTC_DATETIME, nullable=False),
        sa.ForeignKeyConstraint(
            ["audience_id"], ["audiences.id"], name=op.f("fk_sync_leases_audience_id_audiences")
        ),
        sa.PrimaryKeyConstraint("audience_id", name=op.f("pk_sync_leases")),
    )
    op.create_table(
        "sync_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("audience_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("started_at", UTC_DATETIME, nullable=False),
        sa.Column("committed_at", UTC_DATETIME, nullable=True),
        sa.Column("finished_at", UTC_DATETIME, nullable=True),
        sa.Column("members", sa.Integer(), nullable=True),
        sa.Column("added", sa.Integer(), nullable=True),
        sa.Column("removed", sa.Integer(), nullable=True),
        sa.Column("skipped_ids", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.CheckConstraint("kind IN ('initial', 'incremental')", name=op.f("ck_sync_runs_kind")),
        sa.CheckConstraint(
            "status IN ('running', 'succeeded', 'partial', 'failed', 'interrupted')",
            name=op.f("ck_sync_runs_status"),
        ),
        sa.ForeignKeyConstraint(
            ["audience_id"], ["audiences.id"], name=op.f("fk_sync_runs_audience_id_audiences")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sync_runs")),
    )
    with op.batch_alter_table("sync_runs", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_sync_runs_audience_id_id"), ["audience_id", "id"], unique=False
        )

    op.create_table(
        "audience_destinations",
        sa.Column("audience_id", sa.Integer(), nullable=False),
        sa.Column("destination_id", sa.Integer(), nullable=False),
        sa.Column("since_run_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["audience_id"],
            ["audiences.id"],
            name=op.f("fk_audience_destinations_audience_id_audiences"),
        ),
        sa.ForeignKeyConstraint(
            ["destination_id"],
            ["destinations.id"],
            name=op.f("fk_audience_destinations_destination_id_destinations"),
        ),
        sa.ForeignKeyConstraint(
            ["since_run_id"],
            ["sync_runs.id"],
            name=op.f("fk_audience_destinations_since_run_id_sync_runs"),
        ),
        sa.PrimaryKeyConstraint(
            "audience_id", "destination_id", name=op.f("pk_audience_destinations")
        ),
    )
    op.create_table(
        "deliveries",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=True),
        sa.Column("audience_id", sa.Integer(), nullable=True),
        sa.Column("deletion_id", sa.Integer(), nullable=True),
        sa.Column("destination_id", sa.Integer(), nullable=False),
        sa.Column("user_id", exact_string(255), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("trait_value", sa.Boolean(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", UTC_DATETIME, nullable=False),
        sa.Column("owed_since", UTC_DATETIME, nullable=False),
        sa.Column("next_attempt_at", UTC_DATETIME, nullable=False),
        sa.Column("last_attempt_at", UTC_DATETIME, nullable=True),
        sa.Column("delivered_at", UTC_DATETIME, nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "(kind = 'identify' AND audience_id IS NOT NULL AND run_id IS NOT NULL)"
            " OR (kind = 'delete' AND deletion_id IS NOT NULL)",
            name=op.f("ck_deliveries_kind"),
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'sent', 'failed', 'superseded', 'cancelled')",
            name=op.f("ck_deliveries_status"),
        ),
        sa.ForeignKeyConstraint(
            ["audience_id"], ["audiences.id"], name=op.f("fk_deliveries_audience_id_audiences")
        ),
        sa.ForeignKeyConstraint(
            ["destination_id"],
            ["destinations.id"],
            name=op.f("fk_deliveries_destination_id_destinations"),
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["sync_runs.id"], name=op.f("fk_deliveries_run_id_sync_runs")
        ),
        sa.ForeignKeyConstraint(
            ["deletion_id"],
            ["user_deletions.id"],
            name=op.f("fk_deliveries_deletion_id_user_deletions"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deliveries")),
    )
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_deliveries_audience_id_user_id"),
            ["audience_id", "user_id"],
            unique=False,
        )
        batch_op.create_index(
            batch_op.f("ix_deliveries_run_id_status"), ["run_id", "status"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_deliveries_deletion_id"), ["deletion_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_deliveries_status_audience_id_destination_id_id"),
            ["status", "audience_id", "destination_id", "id"],
            unique=False,
        )

    op.create_table(
        "memberships",
        sa.Column("audience_id", sa.Integer(), nullable=False),
        sa.Column("user_id", exact_string(255), nullable=False),
        sa.Column("entered_run_id", sa.Integer(), nullable=False),
        sa.Column("exited_run_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["audience_id"], ["audiences.id"], name=op.f("fk_memberships_audience_id_audiences")
        ),
        sa.ForeignKeyConstraint(
            ["entered_run_id"],
            ["sync_runs.id"],
            name=op.f("fk_memberships_entered_run_id_sync_runs"),
        ),
        sa.ForeignKeyConstraint(
            ["exited_run_id"], ["sync_runs.id"], name=op.f("fk_memberships_exited_run_id_sync_runs")
        ),
        sa.PrimaryKeyConstraint(
            "audience_id", "user_id", "entered_run_id", name=op.f("pk_memberships")
        ),
        sqlite_with_rowid=False,
    )
    with op.batch_alter_table("memberships", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_memberships_entered_run_id"), ["entered_run_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_memberships_exited_run_id"), ["exited_run_id"], unique=False
        )


def downgrade() -> None:
    # Dropping a table drops its indexes (MySQL refuses to drop an index an FK still uses).
    for table in (
        "memberships",
        "deliveries",
        "audience_destinations",
        "sync_runs",
        "sync_leases",
        "service_leases",
        "syncer_settings",
        "user_deletions",
        "destinations",
        "audiences",
    ):
        op.drop_table(table)
