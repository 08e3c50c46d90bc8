"""The state database's tables (SQLAlchemy 2.0 typed declarative).

Alembic owns the schema (``migrations/``); a test proves the migrations give exactly these
models. Every timestamp is stored in UTC. ``docs/schema.md`` explains each table to DBAs.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    ColumnElement,
    DateTime,
    Dialect,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    and_,
    false,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeEngine

USER_ID_LENGTH = 255
KEY_LENGTH = 255
HOST_LENGTH = 260  # a DNS name (253) or an IPv6 literal, with ":port"
URL_HASH_LENGTH = 64  # hex SHA-256
DESTINATION_HASH_KEY = "destination_hash_key"  # syncer_settings: the key of url_hash

# Status values, as stored.
AUDIENCE_ACTIVE, AUDIENCE_PAUSED, AUDIENCE_DELETED = "active", "paused", "deleted"
RUN_RUNNING, RUN_SUCCEEDED, RUN_PARTIAL, RUN_FAILED, RUN_INTERRUPTED, RUN_HELD = (
    "running",
    "succeeded",
    "partial",
    "failed",
    "interrupted",
    "held",  # the removal guard stopped it: nothing committed, nothing sent
)
RUN_INITIAL, RUN_INCREMENTAL = "initial", "incremental"
DELIVERY_PENDING, DELIVERY_SENT, DELIVERY_FAILED, DELIVERY_SUPERSEDED, DELIVERY_CANCELLED = (
    "pending",
    "sent",
    "failed",
    "superseded",
    "cancelled",
)
DELIVERY_STATUSES = (
    DELIVERY_PENDING,
    DELIVERY_SENT,
    DELIVERY_FAILED,
    DELIVERY_SUPERSEDED,
    DELIVERY_CANCELLED,
)
KIND_IDENTIFY, KIND_DELETE = "identify", "delete"
MYSQL = ("mysql", "mariadb")  # the dialect names of MySQL and MariaDB


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as UTC and always read back as an aware UTC datetime."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name in MYSQL:
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name in ("sqlite", *MYSQL) else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def exact_string(length: int) -> String:
    """Text compared byte for byte everywhere (MySQL's default collation ignores case)."""
    return String(length).with_variant(mysql.VARCHAR(length, collation="utf8mb4_bin"), *MYSQL)


def only_on(index: Index, *dialects: str) -> Index:
    """An index that exists on these databases only (and that schema comparisons expect only
    there: ``in_schema``)."""
    index.info["only_on"] = dialects
    # ddl_if documents a tuple of names; its annotation says str only.
    return index.ddl_if(dialect=cast(Any, dialects))


def in_schema(item: object, dialect: str) -> bool:
    """Whether a schema item of the models belongs on this kind of database."""
    only = getattr(item, "info", {}).get("only_on")
    return only is None or dialect in only


# A 64-bit id that is still SQLite's fast rowid alias.
BigId = BigInteger().with_variant(Integer(), "sqlite")

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Audience(Base):
    """One audience: a name, its fixed key, a definition over a source, a schedule."""

    __tablename__ = "audiences"
    __table_args__ = (
        CheckConstraint("status IN ('active', 'paused', 'deleted')", name="status"),
        CheckConstraint("every_seconds IS NULL OR cron IS NULL", name="one_schedule"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(exact_string(KEY_LENGTH), unique=True)
    name: Mapped[str] = mapped_column(String(255))
    source_name: Mapped[str] = mapped_column(String(100))
    definition_sql: Mapped[str] = mapped_column(Text)
    # SQL compiled from rules: its bound values (JSON), and the rules themselves (JSON).
    definition_params: Mapped[str | None] = mapped_column(Text)
    definition_rules: Mapped[str | None] = mapped_column(Text)
    every_seconds: Mapped[int | None] = mapped_column(Integer)
    cron: Mapped[str | None] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # ``syncer apply`` owns it (audiences.yml): read-only to ``audience update``.
    managed: Mapped[bool] = mapped_column(Boolean, server_default=false())
    # The removal guard's overrides of [guard]; NULL: the settings' value.
    guard_max_removed_percent: Mapped[int | None] = mapped_column(Integer)
    guard_min_removed: Mapped[int | None] = mapped_column(Integer)
    # ``syncer audience approve``: the next run goes through the guard once.
    removal_approved_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class AudienceModel(Base):
    """A model of audiences.yml as ``syncer apply`` stored it: a table (or a query) of a
    source, with the columns the source reported, for the rule builder."""

    __tablename__ = "audience_models"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    source_name: Mapped[str] = mapped_column(String(100))
    table_name: Mapped[str | None] = mapped_column(String(255))
    sql: Mapped[str | None] = mapped_column(Text)
    primary_key: Mapped[str | None] = mapped_column(String(255))  # a parent: one row per user
    foreign_key: Mapped[str | None] = mapped_column(String(255))  # a related model
    timestamp_column: Mapped[str | None] = mapped_column(String(255))
    columns: Mapped[str] = mapped_column(Text)  # JSON: [[name, type], ...]
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)


class Destination(Base):
    """A Tray workflow URL that has appeared in settings.toml, stored as its host and a keyed
    hash, never the URL itself (a bearer secret: settings are the only place it lives).

    ``url_hash`` is the HMAC-SHA256 (hex) of the normalised URL keyed by the installation's
    ``destination_hash_key`` (``syncer_settings``); the sender finds a URL's row by it.
    """

    __tablename__ = "destinations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    host: Mapped[str] = mapped_column(String(HOST_LENGTH))  # host[:port], for people to read
    url_hash: Mapped[str] = mapped_column(String(URL_HASH_LENGTH), unique=True)
    first_seen_at: Mapped[datetime] = mapped_column(UTCDateTime)


class AudienceDestination(Base):
    """Which destination has been given an audience's full membership, and in which run."""

    __tablename__ = "audience_destinations"

    audience_id: Mapped[int] = mapped_column(ForeignKey("audiences.id"), primary_key=True)
    destination_id: Mapped[int] = mapped_column(ForeignKey("destinations.id"), primary_key=True)
    since_run_id: Mapped[int] = mapped_column(ForeignKey("sync_runs.id"))


class SyncRun(Base):
    """One run of one audience: what it found and how it ended."""

    __tablename__ = "sync_runs"
    __table_args__ = (
        CheckConstraint("kind IN ('initial', 'incremental')", name="kind"),
        CheckConstraint(
            "status IN ('running', 'succeeded', 'partial', 'failed', 'interrupted', 'held')",
            name="status",
        ),
        # Unique, as ``id`` alone is: the key the history's foreign keys refer to (``in_run``).
        Index(None, "audience_id", "id", unique=True),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    audience_id: Mapped[int] = mapped_column(ForeignKey("audiences.id"))
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    committed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    members: Mapped[int | None] = mapped_column(Integer)
    added: Mapped[int | None] = mapped_column(Integer)
    removed: Mapped[int | None] = mapped_column(Integer)
    skipped_ids: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)


def in_run(run_column: str) -> ForeignKeyConstraint:
    """``(audience_id, <run_column>)`` refers to a run *of the same audience*.

    One key where an ``audience_id`` and a run id would each have their own: the database
    checks a foreign key with one lookup per written row, and a run's rows are written by the
    million (measured on PostgreSQL: 1.7-1.8 s to insert 200,000 rows with this key, 2.6-3.9 s
    with the two, 0.7-1.0 s with none). The audience is still checked, through the run's own
    key to ``audiences``; and a row can no longer name another audience's run."""
    return ForeignKeyConstraint(["audience_id", run_column], [SyncRun.audience_id, SyncRun.id])


class Membership(Base):
    """One stay of a user in an audience: entered in one run, exited in a later one (or not yet).

    Current members have ``exited_run_id IS NULL``. The members as of run N are the rows with
    ``entered_run_id <= N AND (exited_run_id IS NULL OR exited_run_id > N)``.
    """

    __tablename__ = "memberships"
    __table_args__ = (
        in_run("entered_run_id"),
        in_run("exited_run_id"),
        Index(None, "entered_run_id"),
        # Not on PostgreSQL: there an exit is then a HOT update, its row rewritten in its own
        # page (fillfactor 90 leaves room) and no index touched (migration 0004).
        only_on(Index("ix_memberships_exited_run_id", "exited_run_id"), "sqlite", *MYSQL),
        {"sqlite_with_rowid": False, "postgresql_with": {"fillfactor": 90}},
    )

    audience_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[str] = mapped_column(exact_string(USER_ID_LENGTH), primary_key=True)
    entered_run_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    exited_run_id: Mapped[int | None] = mapped_column(Integer)


class Delivery(Base):
    """The outbox and its history: one message for one user to one destination."""

    __tablename__ = "deliveries"
    __table_args__ = (
        CheckConstraint(
            "(kind = 'identify' AND audience_id IS NOT NULL AND run_id IS NOT NULL)"
            " OR (kind = 'delete' AND deletion_id IS NOT NULL)",
            name="kind",
        ),
        CheckConstraint(
            "status IN ('pending', 'sent', 'failed', 'superseded', 'cancelled')", name="status"
        ),
        in_run("run_id"),  # both NULL on a delete: not checked
        Index(None, "status", "audience_id", "destination_id", "id"),
        Index(None, "audience_id", "user_id"),
        Index(None, "run_id", "status"),
        Index(None, "deletion_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    run_id: Mapped[int | None] = mapped_column(Integer)
    audience_id: Mapped[int | None] = mapped_column(Integer)
    deletion_id: Mapped[int | None] = mapped_column(ForeignKey("user_deletions.id"))
    destination_id: Mapped[int] = mapped_column(ForeignKey("destinations.id"))
    user_id: Mapped[str] = mapped_column(exact_string(USER_ID_LENGTH))
    kind: Mapped[str] = mapped_column(String(16))
    trait_value: Mapped[bool | None] = mapped_column(Boolean(create_constraint=False))
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    owed_since: Mapped[datetime] = mapped_column(UTCDateTime)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    # The delivery process (host:pid:n) that made the last attempt, written with its outcome:
    # on a sent row, who sent it. NULL until the first attempt is recorded.
    claimed_by: Mapped[str | None] = mapped_column(String(64))


class DeliveryPage(Base):
    """One page of a delivery pass: the rows owed to one URL with ids ``first_id..last_id``.

    The lease holder cuts what is owed into pages when a pass starts; each delivery process
    claims one page at a time (``FOR UPDATE SKIP LOCKED``) and sends its rows. Claiming a page
    writes one small row instead of every outbox row it holds. A pass's pages are deleted when
    it ends, and pages a dead pass left behind when the next one starts.
    """

    __tablename__ = "delivery_pages"
    __table_args__ = (Index(None, "destination_id", "audience_id", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    audience_id: Mapped[int | None] = mapped_column(ForeignKey("audiences.id"))  # None: deletions
    destination_id: Mapped[int] = mapped_column(ForeignKey("destinations.id"))
    first_id: Mapped[int] = mapped_column(BigInteger)
    last_id: Mapped[int] = mapped_column(BigInteger)
    owed: Mapped[int] = mapped_column(Integer)  # rows owed in the page when it was cut
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class UserDeletion(Base):
    """A request to delete a user, for auditors: keyed by a salted hash, never the id.

    While ``restored_at`` is NULL the user is suppressed: runs never sync them into an
    audience again. What became of the delete message per URL is in ``deliveries``.
    """

    __tablename__ = "user_deletions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_hash: Mapped[str] = mapped_column(String(64), index=True)
    requested_at: Mapped[datetime] = mapped_column(UTCDateTime)
    restored_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Setting(Base):
    """Values syncer keeps for itself, such as the salt of user hashes."""

    __tablename__ = "syncer_settings"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[str] = mapped_column(String(255))


class SyncLease(Base):
    """Who is running an audience right now. At most one row per audience."""

    __tablename__ = "sync_leases"

    audience_id: Mapped[int] = mapped_column(ForeignKey("audiences.id"), primary_key=True)
    token: Mapped[str] = mapped_column(String(64))
    holder_host: Mapped[str] = mapped_column(String(255))
    holder_pid: Mapped[int] = mapped_column(Integer)
    holder_started: Mapped[int | None] = mapped_column(BigInteger)
    acquired_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


class ServiceLease(Base):
    """Leadership among ``syncer serve`` processes: the row's holder is the one that schedules."""

    __tablename__ = "service_leases"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    token: Mapped[str] = mapped_column(String(64))
    holder_host: Mapped[str] = mapped_column(String(255))
    holder_pid: Mapped[int] = mapped_column(Integer)
    holder_started: Mapped[int | None] = mapped_column(BigInteger)
    acquired_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


# Alert events, as stored on alert_problems (and posted; a closed problem posts ``resolved``).
ALERT_RUN_FAILED, ALERT_RUN_PARTIAL, ALERT_RUN_HELD = "run_failed", "run_partial", "run_held"
ALERT_URL_FAILED, ALERT_DELIVERIES_OWED = "url_failed", "deliveries_owed"
ALERT_EVENTS = (
    ALERT_RUN_FAILED,
    ALERT_RUN_PARTIAL,
    ALERT_RUN_HELD,
    ALERT_URL_FAILED,
    ALERT_DELIVERIES_OWED,
)


class AlertProblem(Base):
    """One problem alerts are about (``run:<audience id>``, ``url:<destination id>``,
    ``owed:<destination id>``): open while ``resolved_at`` is NULL. A problem that comes back
    after it was resolved is opened again in the same row."""

    __tablename__ = "alert_problems"
    __table_args__ = (
        CheckConstraint(
            "event IN ('run_failed', 'run_partial', 'run_held', 'url_failed', 'deliveries_owed')",
            name="event",
        ),
    )

    problem: Mapped[str] = mapped_column(String(100), primary_key=True)
    event: Mapped[str] = mapped_column(String(32))  # the latest event of the problem
    opened_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # When it was last posted (or is being posted); NULL: never.
    last_sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    sent_count: Mapped[int] = mapped_column(Integer)  # posts accepted since it was opened
    resolved_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Why the last post was not accepted, per webhook host (never a URL); NULL once one is.
    last_error: Mapped[str | None] = mapped_column(Text)


def owed(audience_id: int | None, destination_ids: Sequence[int]) -> ColumnElement[bool]:
    """Deliveries of an audience (None: user deletions) still owed to some workflow URLs."""
    d = DELIVERIES.c
    return and_(
        d.status == DELIVERY_PENDING,
        d.audience_id.is_(None) if audience_id is None else d.audience_id == audience_id,
        d.destination_id.in_(destination_ids),
    )


def _table(model: type[Base]) -> Table:
    return cast(Table, model.__table__)


AUDIENCES = _table(Audience)
AUDIENCE_MODELS = _table(AudienceModel)
MEMBERSHIPS = _table(Membership)
DELIVERIES = _table(Delivery)
DELIVERY_PAGES = _table(DeliveryPage)
SYNC_LEASES = _table(SyncLease)
SERVICE_LEASES = _table(ServiceLease)
USER_DELETIONS = _table(UserDeletion)
SYNCER_SETTINGS = _table(Setting)
ALERT_PROBLEMS = _table(AlertProblem)
