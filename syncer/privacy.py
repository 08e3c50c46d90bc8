"""User deletion: forward a delete to Tray, purge the user, suppress them from then on.

A deletion request is kept for auditors in ``user_deletions``, keyed by a salted SHA-256 of the
user id, never the id itself. The delete message travels through the same durable outbox as
identifies (``deliveries`` rows of kind ``delete``); its row holds the raw id only while it is
owed, and the hash once every URL has answered. Membership rows of the user are deleted, their
identify deliveries keep only the hash, and runs never sync the user into an audience again
until ``syncer users restore``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import select as io_select
import stat
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    and_,
    delete,
    exists,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from syncer import leases, loops
from syncer.db import write_transaction
from syncer.delivery import DeliveryTotals, deliver_audience, register_destinations
from syncer.errors import UsageError
from syncer.models import (
    AUDIENCES,
    DELIVERIES,
    DELIVERY_CANCELLED,
    DELIVERY_PENDING,
    KIND_DELETE,
    KIND_IDENTIFY,
    MEMBERSHIPS,
    SYNCER_SETTINGS,
    USER_DELETIONS,
    USER_ID_LENGTH,
)
from syncer.settings import Settings

logger = logging.getLogger(__name__)

SALT_SETTING = "user_hash_salt"
HASHED_PREFIX = "sha256:"
BATCH = 500
MAX_ID_FILE_BYTES = 64 * 2**20  # ~1.7M ids of 36 characters
ID_FILE_IDLE_SECONDS = 60  # a pipe or FIFO that sends nothing this long is given up
D = DELIVERIES


def read_user_ids(ids: Sequence[str], file: str | None) -> list[str]:
    """User ids from the command line and/or a UTF-8 file (one a line; a byte-order mark at its
    start is not part of the first id); refuses blanks, NUL bytes and bytes that are not UTF-8."""
    found = list(ids)
    if file is not None:
        found.extend(_ids_in_file(file))
    if not found:
        raise UsageError("give at least one user id, or --file with one id a line")
    for user_id in found:
        if not user_id.strip():
            raise UsageError("an empty user id was given; every id must have characters")
        if len(user_id) > USER_ID_LENGTH:
            raise UsageError(f"a user id is longer than {USER_ID_LENGTH} characters")
    return list(dict.fromkeys(found))


def _ids_in_file(file: str) -> list[str]:
    data = _read_id_file(file)
    found = []
    # Lines end at \n (or \r\n) only: str.splitlines() would also split an id at \x0c or U+2028.
    for number, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), 1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise UsageError(
                f"{file}:{number}: not valid UTF-8 text; save the file as UTF-8"
            ) from None
        if "\x00" in line:
            raise UsageError(f"{file}:{number}: a user id contains a NUL byte")
        if line:
            found.append(line)
    return found


def _read_id_file(file: str) -> bytes:
    """The bytes of an id file, bounded: at most MAX_ID_FILE_BYTES, and from a pipe (``--file
    <(psql …)``, a FIFO) or a device, at most ID_FILE_IDLE_SECONDS between two reads, so
    /dev/zero, a 1 GB file or a FIFO nobody writes to ends in an error, not a hang."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(f"cannot read user ids from {file!r}: {exc.strerror or exc}") from None
    too_big = UsageError(
        f"{file}: larger than {MAX_ID_FILE_BYTES // 2**20} MB; split it into smaller files"
    )
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise UsageError(f"cannot read user ids from {file!r}: Is a directory")
        if stat.S_ISREG(mode):
            if os.fstat(fd).st_size > MAX_ID_FILE_BYTES:
                raise too_big
            os.set_blocking(fd, True)
        poller = io_select.poll()
        poller.register(fd, io_select.POLLIN)
        chunks: list[bytes] = []
        size = 0
        while True:
            if not stat.S_ISREG(mode) and not poller.poll(ID_FILE_IDLE_SECONDS * 1000):
                raise UsageError(
                    f"{file}: nothing arrived for {ID_FILE_IDLE_SECONDS} s; is anything "
                    "writing to it?"
                )
            try:
                chunk = os.read(fd, min(2**20, MAX_ID_FILE_BYTES + 1 - size))
            except BlockingIOError:
                continue
            except OSError as exc:
                raise UsageError(
                    f"cannot read user ids from {file!r}: {exc.strerror or exc}"
                ) from None
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_ID_FILE_BYTES:
                raise too_big
    finally:
        os.close(fd)


def holds_deleted_user(user_id: ColumnElement[str]) -> ColumnElement[bool]:
    """Whether a delivery's ``user_id`` is a deleted user's: ``users delete`` put the hash in
    place of the id (whether or not the user was restored since). Such a row is never sent."""
    return and_(
        user_id.startswith(HASHED_PREFIX),
        exists().where(USER_DELETIONS.c.user_hash == func.substr(user_id, len(HASHED_PREFIX) + 1)),
    )


def salt_of(conn: Connection) -> str:
    """The salt, once made (a suppression exists only after a deletion made it)."""
    value = conn.execute(
        select(SYNCER_SETTINGS.c.value).where(SYNCER_SETTINGS.c.name == SALT_SETTING)
    ).scalar()
    return "" if value is None else str(value)


def salt(engine: Engine) -> str:
    """This installation's salt for user hashes, made on first use."""
    with engine.connect() as conn:
        value = salt_of(conn)
    if value:
        return value
    try:
        with write_transaction(engine) as conn:
            conn.execute(
                insert(SYNCER_SETTINGS).values(name=SALT_SETTING, value=secrets.token_hex(16))
            )
    except IntegrityError:
        pass  # another process made it first
    return salt(engine)


def user_hash(salt_value: str, user_id: str) -> str:
    return hashlib.sha256((salt_value + user_id).encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class DeletionResult:
    users: int
    deletions_queued: int


def delete_users(engine: Engine, user_ids: Iterable[str], destination_ids: Sequence[int]) -> int:
    """Record the requests, purge and suppress the users, and queue a delete per URL.

    All of it in one transaction per batch of users: a crash leaves each user either fully
    deleted (the deletes owed) or untouched. Returns the number of delete messages queued.
    """
    salt_value = salt(engine)
    ids = list(user_ids)
    queued = 0
    for start in range(0, len(ids), BATCH):
        with write_transaction(engine) as conn:
            lock_deletions(conn)
            # Read under the lock: an audience whose first snapshot was committed since the
            # last batch is purged too (snapshot commits take the same lock).
            audience_ids = list(conn.execute(select(AUDIENCES.c.id)).scalars())
            for user_id in ids[start : start + BATCH]:
                queued += _delete_one(
                    conn, user_id, user_hash(salt_value, user_id), audience_ids, destination_ids
                )
    return queued


def _delete_one(
    conn: Connection,
    user_id: str,
    hashed: str,
    audience_ids: list[int],
    destination_ids: Sequence[int],
) -> int:
    now = datetime.now(UTC)
    deletion_id = conn.execute(
        insert(USER_DELETIONS)
        .values(user_hash=hashed, requested_at=now)
        .returning(USER_DELETIONS.c.id)
    ).scalar_one()
    if audience_ids:
        in_audiences = D.c.audience_id.in_(audience_ids)
        conn.execute(
            delete(MEMBERSHIPS).where(
                MEMBERSHIPS.c.audience_id.in_(audience_ids), MEMBERSHIPS.c.user_id == user_id
            )
        )
        # An identify still owed must not reach Tray after the delete.
        conn.execute(
            update(D)
            .where(in_audiences, D.c.user_id == user_id, D.c.status == DELIVERY_PENDING)
            .values(status=DELIVERY_CANCELLED, last_error="the user was deleted")
        )
        conn.execute(
            update(D)
            .where(in_audiences, D.c.user_id == user_id, D.c.kind == KIND_IDENTIFY)
            .values(user_id=HASHED_PREFIX + hashed)
        )
    for destination_id in destination_ids:
        conn.execute(
            insert(D).values(
                deletion_id=deletion_id,
                destination_id=destination_id,
                user_id=user_id,
                kind=KIND_DELETE,
                status=DELIVERY_PENDING,
                attempts=0,
                created_at=now,
                owed_since=now,
                next_attempt_at=now,
            )
        )
    return len(destination_ids)


def forward_deletes(
    engine: Engine,
    settings: Settings,
    *,
    stop: threading.Event | None = None,
    due_only: bool = False,
) -> DeliveryTotals:
    """Send the delete messages owed, then keep only hashes of those no URL is owed."""
    targets = register_destinations(engine, settings.tray.require_urls())
    lease = leases.acquire_deletions(engine)
    try:
        totals = loops.run(
            deliver_audience(engine, None, targets, settings.tray, stop=stop, due_only=due_only)
        )
    finally:
        lease.release()
    hash_finished_deletes(engine)
    return totals


def hash_finished_deletes(engine: Engine) -> int:
    """A delete message no longer owed (sent, failed, cancelled) keeps the hash, not the id;
    only rows still owed hold the raw id, which they need to be sent."""
    hashed = (
        select(USER_DELETIONS.c.user_hash)
        .where(USER_DELETIONS.c.id == D.c.deletion_id)
        .scalar_subquery()
    )
    with write_transaction(engine) as conn:
        return int(
            conn.execute(
                update(D)
                .where(
                    D.c.kind == KIND_DELETE,
                    D.c.status != DELIVERY_PENDING,
                    ~D.c.user_id.startswith(HASHED_PREFIX),
                )
                .values(user_id=literal(HASHED_PREFIX) + hashed)
            ).rowcount
            or 0
        )


def restore_user(engine: Engine, user_id: str) -> int:
    """Lift the suppression of a deleted user; returns how many requests it lifted."""
    hashed = user_hash(salt(engine), user_id)
    with write_transaction(engine) as conn:
        return int(
            conn.execute(
                update(USER_DELETIONS)
                .where(USER_DELETIONS.c.user_hash == hashed, USER_DELETIONS.c.restored_at.is_(None))
                .values(restored_at=datetime.now(UTC))
            ).rowcount
            or 0
        )


def suppressed_hashes(conn: Connection, *, after_id: int = 0) -> set[str]:
    """Hashes of the users suppressed now (by deletions newer than ``after_id``)."""
    return set(
        conn.execute(
            select(USER_DELETIONS.c.user_hash).where(
                USER_DELETIONS.c.restored_at.is_(None), USER_DELETIONS.c.id > after_id
            )
        ).scalars()
    )


def latest_deletion(conn: Connection) -> int:
    return int(conn.execute(select(func.coalesce(func.max(USER_DELETIONS.c.id), 0))).scalar_one())


def lock_deletions(conn: Connection) -> None:
    """Serialize user deletions with snapshot commits (PostgreSQL, MySQL: a row lock on the
    salt, which the schema's first migration creates; SQLite: BEGIN IMMEDIATE does it)."""
    conn.execute(
        select(SYNCER_SETTINGS.c.name)
        .where(SYNCER_SETTINGS.c.name == SALT_SETTING)
        .with_for_update()
    ).first()


def count_suppressed(conn: Connection) -> int:
    return int(
        conn.execute(
            select(func.count()).where(USER_DELETIONS.c.restored_at.is_(None))
        ).scalar_one()
    )
