"""The ``syncer`` command: parses arguments, calls plain functions, prints results.

Bad input of any kind ends in one line on stderr and exit code 2; a run that could not
deliver everything exits 1. A traceback never reaches the user (``--log-level debug``
logs it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import select
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from syncer import __version__, audiences, db, history, logs
from syncer.errors import ConfigError, SyncerError, UsageError
from syncer.models import AUDIENCE_ACTIVE, AUDIENCE_PAUSED, DELIVERY_STATUSES
from syncer.settings import (
    DEFAULT_SOURCE,
    MAX_MIN_REMOVED,
    Settings,
    is_utf8,
    load_settings,
    settings_path,
)

if TYPE_CHECKING:
    from syncer.preview import Preview
    from syncer.sync import RunResult

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_PIPE_CLOSED = 128 + 13  # as a tool killed by SIGPIPE: the reader of our output went away
MAX_LIMIT = 1_000_000  # rows one listing prints
MAX_DEMO_USERS = 1_000_000
DEFAULT_AUDIENCES_FILE = "audiences.yml"
MAX_SAMPLE = 1000  # ids a preview shows
# Arguments that name files: any bytes the file system allows, so not held to UTF-8.
PATH_ARGUMENTS = frozenset({"settings", "file", "dir", "warehouse"})


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"syncer: error: {message} (see: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="syncer", description="Sync audience membership to Tray.io workflows.")
    parser.add_argument("--version", action="version", version=f"syncer {__version__}")
    parser.add_argument(
        "--settings", metavar="PATH", help="settings file (default: ./settings.toml)"
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="default: info for serve, warning otherwise",
    )
    parser.add_argument("--log-format", default="text", choices=["text", "json"])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    db_cmd = commands.add_parser("db", help="state database schema")
    db_sub = db_cmd.add_subparsers(dest="db_command", required=True, parser_class=_Parser)
    db_sub.add_parser("upgrade", help="create or upgrade the schema (alembic upgrade head)")

    aud = commands.add_parser("audience", help="define and manage audiences")
    aud_sub = aud.add_subparsers(dest="audience_command", required=True, parser_class=_Parser)
    create = aud_sub.add_parser("create", help="define an audience; prints its key")
    create.add_argument("name")
    create.add_argument("--sql", required=True, help="a SELECT returning user ids")
    create.add_argument("--source", default="default", help="a [sources.NAME] of settings.toml")
    _schedule_args(create)
    listing = aud_sub.add_parser("list", help="list audiences")
    listing.add_argument("--json", action="store_true")
    listing.add_argument("--all", action="store_true", help="include deleted audiences")
    show = aud_sub.add_parser("show", help="show one audience")
    show.add_argument("key")
    show_as = show.add_mutually_exclusive_group()
    show_as.add_argument("--json", action="store_true")
    show_as.add_argument(
        "--sql", action="store_true", help="print the SQL it runs (rules compiled) and its values"
    )
    upd = aud_sub.add_parser("update", help="change the SQL or schedule (never the key)")
    upd.add_argument("key")
    upd.add_argument("--sql")
    _schedule_args(upd)
    upd.add_argument(
        "--max-removed-percent",
        type=_count_or_default(0, 100),
        metavar="N",
        help="hold a run that would remove more than N%% of the members "
        "('default': the [guard] setting)",
    )
    upd.add_argument(
        "--min-removed",
        type=_count_or_default(0, MAX_MIN_REMOVED),
        metavar="N",
        help="...and at least N members ('default': the [guard] setting)",
    )
    aud_sub.add_parser(
        "approve", help="let the next run through the removal guard, once"
    ).add_argument("key")
    look = aud_sub.add_parser(
        "preview", help="members, a sample and who would enter or leave; writes and sends nothing"
    )
    what = look.add_mutually_exclusive_group(required=True)
    what.add_argument("key", nargs="?", help="an audience, as its next run would evaluate it")
    what.add_argument("--sql", help="a SELECT returning user ids, tried on --source")
    what.add_argument("--file", help="an audiences.yml: preview its entry --name")
    look.add_argument("--name", help="with --file: the entry's name (or key)")
    look.add_argument("--source", help="a [sources.NAME] of settings.toml (with --sql)")
    look.add_argument("--json", action="store_true")
    look.add_argument(
        "--sample", type=_count(1, MAX_SAMPLE), default=10, help="ids to show (default 10)"
    )
    for name, text in (
        ("pause", "stop syncing it until resumed"),
        ("resume", "sync it again"),
    ):
        aud_sub.add_parser(name, help=text).add_argument("key")
    retire = aud_sub.add_parser("delete", help="stop syncing it; its key is retired forever")
    retire.add_argument("key")
    retire.add_argument(
        "--unset", action="store_true", help="first send {key: false} to every current member"
    )

    users = commands.add_parser("users", help="user deletion")
    users_sub = users.add_subparsers(dest="users_command", required=True, parser_class=_Parser)
    forget = users_sub.add_parser(
        "delete", help="forward a delete to Tray, purge the user, suppress them from now on"
    )
    forget.add_argument("user_ids", nargs="*", metavar="USER_ID")
    forget.add_argument("--file", help="a file of user ids, one a line")
    restore = users_sub.add_parser("restore", help="lift the suppression of a deleted user")
    restore.add_argument("user_id", metavar="USER_ID")

    sync = commands.add_parser("sync", help="run audiences now, in the foreground")
    sync.add_argument("keys", nargs="*", metavar="KEY", help="default: every active audience")
    sync.add_argument("--json", action="store_true", help="print the results as JSON")
    sync.add_argument(
        "--wait", action="store_true", help="wait for a run in progress elsewhere, then run"
    )
    sync.add_argument(
        "--dry-run",
        action="store_true",
        help="only preview each audience: members, entering, leaving; writes and sends nothing",
    )

    commands.add_parser(
        "serve", help="the scheduler: runs every active audience on its schedule until stopped"
    )

    for name, text in (
        ("plan", "show what applying audiences.yml would change; writes nothing"),
        ("apply", "make the audiences what audiences.yml says, in one transaction"),
    ):
        as_code = commands.add_parser(name, help=text)
        as_code.add_argument(
            "file", nargs="?", default=DEFAULT_AUDIENCES_FILE, help="default: ./audiences.yml"
        )
        as_code.add_argument(
            "--prune", action="store_true", help="also delete audiences the file does not name"
        )
        as_code.add_argument(
            "--adopt",
            action="store_true",
            help="let the file take over audiences of its keys that were made by hand",
        )
        as_code.add_argument("--json", action="store_true")
        if name == "plan":
            as_code.add_argument(
                "--no-preview",
                action="store_true",
                help="skip the member counts of new and changed audiences",
            )

    dels = commands.add_parser("deliveries", help="the outbox: deliveries, newest first")
    dels.add_argument("key", nargs="?")
    dels.add_argument("--status", choices=DELIVERY_STATUSES)
    dels.add_argument("--limit", type=_count(1, MAX_LIMIT), default=50)
    dels.add_argument("--json", action="store_true")

    again = commands.add_parser("retry", help="send failed deliveries again, and all owed now")
    again.add_argument("key", nargs="?")

    hist = commands.add_parser("history", help="sync runs, newest first")
    hist.add_argument("key", nargs="?")
    hist.add_argument("--limit", type=_count(1, MAX_LIMIT), default=20)
    hist.add_argument("--json", action="store_true")

    demo = commands.add_parser("demo", help="a self-contained demo with a local receiver")
    where = demo.add_mutually_exclusive_group()
    where.add_argument("--dir", default="syncer-demo", help="where to put it (recreated)")
    where.add_argument(
        "--warehouse",
        metavar="PATH",
        help="only write the demo warehouse (SQLite tables users and orders) to PATH, then stop",
    )
    demo.add_argument("--users", type=_count(10, MAX_DEMO_USERS), default=2000)
    return parser


def _count(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` to ``high``."""

    def count(text: str) -> int:
        digits = text.strip()
        if not re.fullmatch(r"[+-]?[0-9]+", digits, flags=re.ASCII):
            raise argparse.ArgumentTypeError(f"{_shorten(text)!r} is not a whole number")
        value = int(digits) if len(digits) <= 20 else None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"{_shorten(digits)} is out of range: give a number from {low} to {high}"
            )
        return value

    return count


def _count_or_default(low: int, high: int) -> Callable[[str], int | str]:
    """An argparse type: a whole number from ``low`` to ``high``, or ``default``."""
    count = _count(low, high)

    def count_or_default(text: str) -> int | str:
        return audiences.GUARD_DEFAULT if text == audiences.GUARD_DEFAULT else count(text)

    return count_or_default


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _schedule_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--every", metavar="DURATION", help="like 90s, 15m, 3h, 1d")
    group.add_argument("--cron", metavar="CRON", help='like "0 */3 * * *"')


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure(
        args.log_level or ("info" if args.command == "serve" else "warning"), args.log_format
    )
    try:
        _check_text(parser, args)
        code = _dispatch(args)
        sys.stdout.flush()  # here, not at exit: a reader that went away is noticed below
        return code
    except BrokenPipeError as exc:
        if not _stdout_closed():
            return _unexpected(exc)
        # `syncer deliveries | head -3`: end quietly, as any Unix tool does. What is still
        # buffered for stdout goes nowhere, so the flush at exit cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PIPE_CLOSED
    except UsageError as exc:
        return _fail(EXIT_USAGE, str(exc))
    except SyncerError as exc:
        return _fail(EXIT_FAILED, str(exc))
    except SQLAlchemyError as exc:
        logger.debug("database error", exc_info=True)
        return _fail(EXIT_FAILED, f"database error: {db.first_line(exc)}")
    except KeyboardInterrupt:
        return _fail(130, "interrupted")
    except Exception as exc:
        return _unexpected(exc)


def _fail(code: int, message: str) -> int:
    print(f"syncer: error: {message}", file=sys.stderr)
    return code


def _unexpected(exc: Exception) -> int:
    """A bug, not bad input: one line, exit 1, the traceback only at ``--log-level debug``."""
    logger.debug("unexpected error", exc_info=exc)
    text = " ".join(str(exc).split())
    return _fail(EXIT_FAILED, f"unexpected error: {type(exc).__name__}: {_shorten(text, 300)}")


def _stdout_closed() -> bool:
    """Whether stdout is a pipe or socket whose reader has gone (poll reports an error)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def _check_text(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Names, keys, ids and SQL must be UTF-8 text. Bytes that are not arrive from the command
    line as lone surrogates, which no database, JSON body or terminal takes: refuse them here,
    once, before anything is read or written. (File names may be any bytes: not checked.)"""
    names = _argument_names(parser)
    for dest, value in vars(args).items():
        if dest in PATH_ARGUMENTS:
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and not is_utf8(item):
                raw = item.encode("utf-8", "surrogateescape" if _is_escaped(item) else "replace")
                raise UsageError(
                    f"argument {names.get(dest, dest)} is not valid UTF-8 text "
                    f"({_shorten(repr(raw), 60)}); give names, keys, ids and SQL as UTF-8"
                )


def _is_escaped(text: str) -> bool:
    try:
        text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    return True


def _argument_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each argument's ``dest`` -> how ``--help`` names it (``--sql``, ``NAME``, ``USER_ID``)."""
    names: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                names.update(_argument_names(sub))
        elif action.option_strings:
            names.setdefault(action.dest, action.option_strings[-1])
        else:
            metavar = action.metavar if isinstance(action.metavar, str) else None
            names.setdefault(action.dest, metavar or action.dest.upper())
    return names


def _load_settings(explicit: str | None) -> Settings:
    try:
        return load_settings(explicit)
    except RecursionError:
        raise ConfigError(
            f"settings file {str(settings_path(explicit))!r} is nested too deeply; "
            "keep its tables and arrays a few levels deep"
        ) from None


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from syncer.demo import build_demo_warehouse, run_demo

        if args.warehouse is not None:
            build_demo_warehouse(args.warehouse, users=args.users, out=sys.stdout)
            return EXIT_OK
        return run_demo(args.dir, users=args.users, out=sys.stdout)
    settings = _load_settings(args.settings)
    if args.command == "db":
        db.upgrade(settings.database.url)
        print(f"state database is at the latest schema: {db.safe_url(settings.database.url)}")
        return EXIT_OK
    state = db.open_state(settings.database.url)
    try:
        with _state_database_problems(state):
            db.check_schema(state)
            if _writes(args):
                db.check_writable(state)
            if _runs_audience_sql(args):
                for source in settings.sources.values():
                    db.check_driver(source.url)
            handler = {
                "audience": _audience,
                "sync": _sync,
                "history": _history,
                "serve": _serve,
                "users": _users,
                "deliveries": _deliveries,
                "retry": _retry,
                "plan": _plan,
                "apply": _plan,
            }[args.command]
            return handler(args, state, settings)
    finally:
        state.dispose()


def _writes(args: argparse.Namespace) -> bool:
    """Whether the command may write to the state database (listings only read)."""
    if args.command == "audience":
        return args.audience_command not in {"list", "show", "preview"}
    if args.command == "plan":
        return False
    if args.command == "sync" and args.dry_run:
        return False  # only temporary tables: a read-only state database user may preview
    return args.command not in {"history", "deliveries"}


def _runs_audience_sql(args: argparse.Namespace) -> bool:
    if args.command == "audience":
        return args.audience_command in {"create", "update", "preview"}
    return args.command in {"sync", "serve", "plan", "apply"}


@contextmanager
def _state_database_problems(state: Engine) -> Iterator[None]:
    """Database errors that are the operator's to fix (a file this user cannot write, a file
    that is not a database, a role without grants, a read-only server) as bad settings:
    exit 2. Anything else stays a database error (exit 1)."""
    try:
        yield
    except SQLAlchemyError as exc:
        fix = _operator_fix(exc)
        if fix is None:
            raise
        logger.debug("database error", exc_info=True)
        raise ConfigError(
            f"the state database {db.safe_url(state.url)}: {db.first_line(exc)}; {fix}"
        ) from None


SQLITE_FIXES = {
    "SQLITE_READONLY": "run syncer as a user who can write the file and its folder",
    "SQLITE_CANTOPEN": "check that its folder exists and this user can write there",
    "SQLITE_NOTADB": "point [database] url at a syncer state database or a new file",
    "SQLITE_PERM": "run syncer as a user who can write the file and its folder",
    "SQLITE_AUTH": "run syncer as a user who can write the file and its folder",
}
POSTGRES_FIXES = {
    "42501": "grant the role of [database] url all privileges on syncer's tables",
    "25006": "point [database] url at a database that takes writes (not a standby, nor one "
    "with default_transaction_read_only on)",
}
MYSQL_FIXES = {
    1044: "grant the user of [database] url all privileges on its database",
    1142: "grant the user of [database] url all privileges on its database",
    1227: "grant the user of [database] url all privileges on its database",
    1290: "point [database] url at a server that takes writes",
    1792: "point [database] url at a server that takes writes",
}


def _operator_fix(exc: SQLAlchemyError) -> str | None:
    orig = getattr(exc, "orig", None)
    if isinstance(orig, sqlite3.Error):
        name = str(getattr(orig, "sqlite_errorname", ""))
        return next((fix for code, fix in SQLITE_FIXES.items() if name.startswith(code)), None)
    sqlstate = getattr(orig, "sqlstate", None)  # psycopg
    if isinstance(sqlstate, str):
        return POSTGRES_FIXES.get(sqlstate)
    code = getattr(orig, "args", (None,))[:1]  # PyMySQL, mysqlclient: (errno, message)
    return MYSQL_FIXES.get(code[0]) if code and isinstance(code[0], int) else None


def _audience(args: argparse.Namespace, state: Engine, settings: Settings) -> int:
    command = args.audience_command
    default_every = settings.schedule.default_every_seconds
    if command == "create":
        view = audiences.create(
            state,
            settings,
            name=args.name,
            sql=args.sql,
            source=args.source,
            schedule=audiences.parse_schedule(args.every, args.cron),
        )
        print(view.key)
        return EXIT_OK
    if command == "list":
        views = audiences.list_all(state, include_deleted=args.all)
        last = history.last_runs(state, [v.id for v in views])
        if args.json:
            _print_json([_audience_json(v, default_every, last.get(v.id)) for v in views])
        else:
            print(
                history.format_table(
                    ["KEY", "NAME", "STATUS", "SOURCE", "SCHEDULE", "LAST RUN"],
                    [
                        [
                            v.key,
                            v.name,
                            v.status,
                            v.source,
                            v.schedule.describe(default_every),
                            _last_run_cell(last.get(v.id)),
                        ]
                        for v in views
                    ],
                )
            )
        return EXIT_OK
    if command == "show":
        view = audiences.get(state, args.key, include_deleted=True)
        if args.sql:
            print(audiences.shown_sql(view))
            return EXIT_OK
        last_run = history.last_runs(state, [view.id]).get(view.id)
        data = _audience_json(view, default_every, last_run)
        if args.json:
            _print_json(data)
            return EXIT_OK
        data["last_run"] = "never" if last_run is None else _describe_last_run(last_run)
        for name, value in data.items():
            print(f"{name + ':':<12} {value}")
        return EXIT_OK
    if command == "update":
        schedule = None
        if args.every or args.cron:
            schedule = audiences.parse_schedule(args.every, args.cron)
        guard = None
        if args.max_removed_percent is not None or args.min_removed is not None:
            guard = audiences.validate_guard(args.max_removed_percent, args.min_removed)
        view = audiences.update_definition(
            state, settings, args.key, sql=args.sql, schedule=schedule, guard=guard
        )
        print(f"updated {view.key}")
        return EXIT_OK
    if command == "approve":
        view = audiences.approve(state, args.key)
        print(f"{view.key}: approved; its next run goes through the removal guard once")
        return EXIT_OK
    if command == "delete":
        from syncer.sync import retire_audience

        result = retire_audience(state, settings, args.key, unset=args.unset)
        if result is not None:
            print(_describe(result))
        print(f"{args.key}: deleted")
        return EXIT_OK if result is None or result.status == "succeeded" else EXIT_FAILED
    if command == "preview":
        return _preview(args, state, settings)
    status = {"pause": AUDIENCE_PAUSED, "resume": AUDIENCE_ACTIVE}
    view = audiences.set_status(state, args.key, status[command])
    print(f"{view.key}: {view.status}")
    return EXIT_OK


def _audience_json(
    view: audiences.AudienceView, default_every: int, last_run: history.LastRun | None
) -> dict[str, Any]:
    """The fields the console's API shows too: ``id`` is what Tray receives as
    ``computation_id``; ``last_run`` is the newest run or null."""
    return {
        "id": view.id,
        "key": view.key,
        "name": view.name,
        "status": view.status,
        "source": view.source,
        "sql": view.sql,
        "rules": view.rules,
        "managed": view.managed,
        "guard": {
            "max_removed_percent": view.guard.max_removed_percent,
            "min_removed": view.guard.min_removed,
        },
        "schedule": view.schedule.describe(default_every),
        "created_at": view.created_at.isoformat(),
        "updated_at": view.updated_at.isoformat(),
        "last_run": None if last_run is None else last_run.as_json(),
    }


def _last_run_cell(run: history.LastRun | None) -> str:
    """``held (run 12)``: what a listing shows of an audience's newest run."""
    return "-" if run is None else f"{run.status} (run {run.run_id})"


def _describe_last_run(run: history.LastRun) -> str:
    finished = run.finished_at.isoformat() if run.finished_at else "not finished"
    return f"run {run.run_id} {run.status} ({finished})"


def _preview(args: argparse.Namespace, state: Engine, settings: Settings) -> int:
    from syncer import preview

    if args.name is not None and args.file is None:
        raise UsageError("--name goes with --file: the entry of an audiences.yml to preview")
    if args.file is not None:
        if args.name is None or args.source is not None:
            raise UsageError(
                "give --file with --name (the entry to preview); its source is the file's"
            )
        from syncer.definitions.plan import preview_entry

        found = preview_entry(state, settings, args.file, args.name, sample_size=args.sample)
    elif args.key is not None:
        if args.source is not None:
            raise UsageError("--source goes with --sql; an audience previews on its own source")
        view = audiences.get(state, args.key)
        found = preview.preview_audience(state, settings, view, sample_size=args.sample)
    else:
        found = preview.preview(
            state,
            settings,
            sql=args.sql,
            params=None,
            source_name=args.source or DEFAULT_SOURCE,
            audience=None,
            sample_size=args.sample,
        )
    if args.json:
        _print_json(found.as_json())
    else:
        print(_describe_preview(found))
    return EXIT_OK


def _describe_preview(p: Preview) -> str:
    """A preview as a few lines a person reads."""
    title = f"{p.audience_key}: " if p.audience_key else ""
    lines = [
        f"{title}{p.members} members, {p.entering} entering, {p.leaving} leaving"
        + (" (its first run: everyone is entering)" if p.initial and p.audience_key else ""),
    ]
    if p.skipped:
        lines.append(f"  {p.skipped} ids skipped: blank, invalid or deleted users")
    for label, ids in (
        ("members", p.sample),
        ("entering", p.sample_entering),
        ("leaving", p.sample_leaving),
    ):
        if ids:
            lines.append(
                f"  {label}: {', '.join(ids)}" + (" …" if len(ids) < _total(p, label) else "")
            )
    if p.held:
        lines.append(
            f"  the removal guard would hold this run (nothing committed or sent); if the "
            f"source is right, let it through once: syncer audience approve {p.audience_key}"
        )
    elif p.approved:
        lines.append("  approved: the next run goes through the removal guard once")
    return "\n".join(lines)


def _total(p: Preview, label: str) -> int:
    return {"members": p.members, "entering": p.entering, "leaving": p.leaving}[label]


def _dry_run(args: argparse.Namespace, state: Engine, settings: Settings) -> int:
    from syncer import preview

    if args.wait:
        raise UsageError("--wait does not go with --dry-run: a dry run takes no lease")
    results = preview.dry_run(state, settings, args.keys)
    if args.json:
        _print_json([r.as_json() for r in results])
    else:
        for r in results:
            if r.preview is None:
                print(f"{r.audience_key}: could not be previewed\n  {r.error}")
            else:
                print(_describe_preview(r.preview))
    failed = [r for r in results if r.preview is None]
    for r in failed:
        print(f"syncer: error: {r.audience_key}: {r.error}", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def _sync(args: argparse.Namespace, state: Engine, settings: Settings) -> int:
    if args.dry_run:
        return _dry_run(args, state, settings)
    # Imported here: the HTTP stack costs a noticeable share of every command's start-up.
    from syncer.sync import RUN_SKIPPED, sync_audiences

    show_progress = sys.stdout.isatty() and not args.json
    results = sync_audiences(
        state,
        settings,
        args.keys,
        progress_for=(lambda key: ProgressBar(key, sys.stdout)) if show_progress else None,
        wait=args.wait,
    )
    if args.json:
        _print_json([asdict(r) for r in results])
    else:
        for r in results:
            print(_describe(r))
    if any(r.status == RUN_SKIPPED for r in results):
        for r in results:
            if r.status == RUN_SKIPPED:
                print(f"syncer: {r.error}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK if all(r.status == "succeeded" for r in results) else EXIT_FAILED


def _describe(r: RunResult) -> str:
    if r.run_id is None:
        return f"{r.audience_key}: {r.status}"
    text = (
        f"{r.audience_key}: run {r.run_id} ({r.kind}) {r.status}: {r.members} members, "
        f"+{r.added} -{r.removed}, sent {r.sent}, failed {r.failed} in {r.seconds:.1f}s"
    )
    if r.skipped:
        text += f" ({r.skipped} ids skipped: blank, invalid or deleted users)"
    if r.error:
        text += f"\n  {r.error}"
    return text


def _serve(args: argparse.Namespace, state: Engine, settings: Settings) -> int:
    del args
    settings.tray.require_urls()
    from syncer.scheduler import serve

    return serve(settings, state)


def _deliveries(args: argparse.Namespace, state: Engine, settings: Settings) -> int:
    del settings
    from syncer.outbox import list_deliveries

    records = list_deliveries(state, args.key, status=args.status, limit=args.limit)
    if args.json:
        _print_json([r.as_json() for r in records])
        return EXIT_OK
    print(
        history.format_table(
            ["ID", "RUN", "AUDIENCE", "USER", "URL HOST", "VALUE", "STATUS", "ATTEMPTS", "LAST"],
            [
                [
                    str(r.id),
                    str(r.run_id),
                    r.audience_key,
                    r.user_id,
                    f"{r.destination_host} (#{r.destination_id})",
                    "-" if r.value is None else str(r.value).lower(),
                    r.status,
                    str(r.attempts),
                    r.last_error or (str(r.last_status_code) if r.last_status_code else "-"),
                ]
                for r in records
            ],
        )
    )
    return EXIT_OK


def _retry(args: argparse.Namespace, state: Engine, settings: Settings) -> int:
    from syncer.outbox import retry

    requeued, results = retry(state, settings, args.key)
    print(f"{requeued} failed deliveries queued again")
    code = EXIT_OK
    for r in results:
        if r.totals is None:
            print(f"syncer: {r.error}", file=sys.stderr)
            code = EXIT_FAILED
            continue
        print(
            f"{r.audience_key}: sent {r.totals.sent}, failed {r.totals.failed}, "
            f"still owed {r.totals.retry_later}"
        )
        if r.totals.not_delivered:
            code = EXIT_FAILED
    return code


def _users(args: argparse.Namespace, state: Engine, settings: Settings) -> int:
    from syncer import privacy

    if args.users_command == "restore":
        if not args.user_id.strip():
            raise UsageError("the user id is empty")
        lifted = privacy.restore_user(state, args.user_id)
        print("restored: later runs may sync this user again" if lifted else "not suppressed")
        return EXIT_OK
    user_ids = privacy.read_user_ids(args.user_ids, args.file)
    targets = settings.tray.require_urls()
    from syncer.delivery import register_destinations

    destinations = register_destinations(state, targets)
    queued = privacy.delete_users(state, user_ids, [d.id for d in destinations])
    print(f"{len(user_ids)} users deleted and suppressed; {queued} delete messages queued")
    totals = privacy.forward_deletes(state, settings)
    print(
        f"delete messages: sent {totals.sent}, failed {totals.failed}, "
        f"still owed {totals.retry_later}"
    )
    return EXIT_OK if totals.not_delivered == 0 else EXIT_FAILED


def _history(args: argparse.Namespace, state: Engine, settings: Settings) -> int:
    del settings
    records = history.runs(state, args.key, limit=args.limit)
    if args.json:
        _print_json([r.as_json() for r in records])
        return EXIT_OK
    print(history.format_runs(records))
    return EXIT_OK


def _plan(args: argparse.Namespace, state: Engine, settings: Settings) -> int:
    from syncer.definitions import plan as plans

    if args.command == "apply":
        done = plans.apply(state, settings, args.file, prune=args.prune, adopt=args.adopt)
    else:
        done = plans.make_plan(
            state,
            settings,
            args.file,
            prune=args.prune,
            adopt=args.adopt,
            with_preview=not args.no_preview,
        )
    if args.json:
        _print_json(done.as_json())
    else:
        print(plans.format_plan(done, applied=args.command == "apply"))
    return EXIT_OK


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


class ProgressBar:
    """A one-line progress bar of deliveries, for a terminal."""

    WIDTH = 30

    def __init__(self, label: str, out: TextIO) -> None:
        self.label = label
        self.out = out
        self.started = time.monotonic()
        self.finished = False

    def __call__(self, done: int, total: int) -> None:
        if self.finished:
            return
        filled = self.WIDTH * done // total if total else self.WIDTH
        bar = "#" * filled + "." * (self.WIDTH - filled)
        rate = done / max(time.monotonic() - self.started, 1e-6)
        self.finished = done >= total
        end = "\n" if self.finished else ""
        self.out.write(f"\r{self.label} [{bar}] {done}/{total} calls, {rate:.0f}/s{end}")
        self.out.flush()
