"""destinations: the host and a keyed hash of each workflow URL, never the URL itself

A Tray workflow URL is a bearer secret: whoever has it can post to the workflow. The state
database no longer holds one. ``destinations.url`` becomes ``host`` (``host[:port]``, for
people to read) and ``url_hash``, the HMAC-SHA256 (hex) of the normalised URL keyed by a
random per-installation key kept in ``syncer_settings`` as ``destination_hash_key``. The
sender finds a configured URL's row by that hash.

Upgrading computes host and hash from every existing row. Two rows whose URLs are one URL once
normalised (``HTTPS://X/p`` and ``https://x/p?``) were two destinations; the oldest keeps the
URL's hash and the others are retired, like a URL taken out of settings (what they were owed
stays in their history, unsent). A row whose URL is no longer accepted is retired too.

Downgrading cannot give the URLs back: ``url`` is filled with ``unrecoverable://<host>/<hash>``
(unique, never sent anywhere: the old code sends only to URLs in settings, so a configured URL
becomes a new destination there and is owed a backfill). Upgrading again reads host and hash
back from that placeholder.

On SQLite the table is rebuilt with foreign keys off (other tables refer to it; the check
that nothing points nowhere runs before they are turned on again).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import sqlalchemy as sa
from alembic import op

from syncer.errors import ConfigError
from syncer.settings import normalize_workflow_url, url_host, workflow_url_hash

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEY_NAME = "destination_hash_key"
HOST_LENGTH = 260
HASH_LENGTH = 64
URL_LENGTH = 700
PLACEHOLDER = "unrecoverable://"
MYSQL = ("mysql", "mariadb")

destinations = sa.table(
    "destinations",
    sa.column("id", sa.Integer),
    sa.column("url", sa.String),
    sa.column("host", sa.String),
    sa.column("url_hash", sa.String),
)
settings = sa.table("syncer_settings", sa.column("name", sa.String), sa.column("value", sa.String))


def _url_column() -> sa.String:
    return sa.String(URL_LENGTH).with_variant(
        sa.dialects.mysql.VARCHAR(URL_LENGTH, collation="utf8mb4_bin"), *MYSQL
    )


@contextmanager
def _foreign_keys_off() -> Iterator[None]:
    """SQLite: rebuild ``destinations`` under the tables that refer to it (dropping a table
    others refer to is refused while foreign keys are on). Elsewhere: nothing to do."""
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        yield
        return
    bind.exec_driver_sql("PRAGMA foreign_keys=OFF")
    try:
        yield
        broken = bind.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
        if broken:
            raise RuntimeError(f"migration 0006 left rows pointing nowhere: {broken[:5]}")
    finally:
        bind.exec_driver_sql("PRAGMA foreign_keys=ON")


def _key() -> str:
    bind = op.get_bind()
    value = bind.execute(
        sa.select(settings.c.value).where(settings.c.name == KEY_NAME)
    ).scalar_one_or_none()
    if value:
        return str(value)
    value = secrets.token_hex(32)
    bind.execute(sa.insert(settings).values(name=KEY_NAME, value=value))
    return value


def _host_and_hash(key: str, url: str, taken: set[str], row_id: int) -> tuple[str, str]:
    if url.startswith(PLACEHOLDER):  # left by a downgrade: host and hash as they were
        host, _, url_hash = url.removeprefix(PLACEHOLDER).rpartition("/")
        return host[:HOST_LENGTH], url_hash
    try:
        normal = normalize_workflow_url(url, what="destinations.url")
    except ConfigError:  # no longer accepted: retired, its host as best it can be read
        host = url_host(url)
    else:
        url_hash = workflow_url_hash(key, normal)
        if url_hash not in taken:
            return url_host(normal), url_hash
        host = url_host(normal)  # another spelling of a URL an older row has: retired
    return host[:HOST_LENGTH], workflow_url_hash(key, f"retired destination {row_id}")


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        # The URLs' bytes are overwritten on disk, not only unlinked from the table.
        bind.exec_driver_sql("PRAGMA secure_delete = ON")
    key = _key()
    with op.batch_alter_table("destinations") as batch:
        batch.add_column(sa.Column("host", sa.String(HOST_LENGTH), nullable=True))
        batch.add_column(sa.Column("url_hash", sa.String(HASH_LENGTH), nullable=True))
    rows = bind.execute(
        sa.select(destinations.c.id, destinations.c.url).order_by(destinations.c.id)
    ).all()
    taken: set[str] = set()
    for row_id, url in rows:
        host, url_hash = _host_and_hash(key, url, taken, row_id)
        taken.add(url_hash)
        # The URL itself is overwritten before its column goes: a dropped column's bytes stay
        # in the rows on PostgreSQL and MySQL until they are rewritten (the old row versions
        # there are freed by the next VACUUM).
        bind.execute(
            sa.update(destinations)
            .where(destinations.c.id == row_id)
            .values(host=host, url_hash=url_hash, url=f"{PLACEHOLDER}{host}/{url_hash}")
        )
    with _foreign_keys_off(), op.batch_alter_table("destinations") as batch:
        batch.alter_column("host", existing_type=sa.String(HOST_LENGTH), nullable=False)
        batch.alter_column("url_hash", existing_type=sa.String(HASH_LENGTH), nullable=False)
        batch.drop_constraint("uq_destinations_url", type_="unique")
        batch.drop_column("url")
        batch.create_unique_constraint("uq_destinations_url_hash", ["url_hash"])


def downgrade() -> None:
    bind = op.get_bind()
    with op.batch_alter_table("destinations") as batch:
        batch.add_column(sa.Column("url", _url_column(), nullable=True))
    # The URLs cannot be recovered: a placeholder that keeps host and hash for the next upgrade.
    rows = bind.execute(
        sa.select(destinations.c.id, destinations.c.host, destinations.c.url_hash)
    ).all()
    for row_id, host, url_hash in rows:
        bind.execute(
            sa.update(destinations)
            .where(destinations.c.id == row_id)
            .values(url=f"{PLACEHOLDER}{host}/{url_hash}")
        )
    with _foreign_keys_off(), op.batch_alter_table("destinations") as batch:
        batch.alter_column("url", existing_type=_url_column(), nullable=False)
        batch.drop_constraint("uq_destinations_url_hash", type_="unique")
        batch.drop_column("url_hash")
        batch.drop_column("host")
        batch.create_unique_constraint("uq_destinations_url", ["url"])
