"""Audience SQL, read before it is trusted: one query, parsed with sqlglot in its source's dialect.

This is the first check, not the boundary. It refuses what is plainly not a query or plainly
writes or changes the session (a data-modifying CTE, ``SELECT … INTO``, locking clauses,
``COPY``, ``ATTACH``, ``PRAGMA``, ``SET``, MySQL's executable comments, DuckDB's ``INSTALL`` /
``LOAD``, Snowflake's stage commands, Redshift's ``UNLOAD``, ClickHouse's ``SYSTEM`` and
``SETTINGS`` …) with a clear message, before anything reaches the database. Statements sqlglot
only knows as a generic command, or cannot parse in the dialect at all, are named by their
leading keywords. What a query may *read* is decided by the database itself (see
``syncer.sources``): functions and table functions (``read_parquet``) are not judged here by name.

``embeddable`` returns the text syncer wraps as a subquery: the user's own SQL from its first
to its last token. Trailing semicolons and comments are cut off, so no comment can swallow the
SQL syncer writes around it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import sqlglot
from sqlglot import Token, TokenType, exp
from sqlglot.errors import SqlglotError

from syncer.errors import AudienceError

# SQLAlchemy's dialect names where sqlglot names them otherwise; others are tried as they are
# (duckdb, snowflake, bigquery, redshift, trino, databricks, sqlite, mysql, oracle …).
SQLGLOT_DIALECTS = {
    "postgresql": "postgres",
    "mariadb": "mysql",
    "mssql": "tsql",
    "clickhousedb": "clickhouse",  # clickhouse-connect's dialect
}

# Statements and clauses that write, lock, or change the session or files, wherever they stand.
_EFFECTS: tuple[tuple[type[exp.Expr], str], ...] = (
    (exp.Copy, "copies data in or out (COPY)"),
    (exp.DML, "writes data"),  # INSERT, UPDATE, DELETE, MERGE, also inside a CTE
    (exp.DDL, "changes the schema"),
    (exp.Create, "creates objects"),
    (exp.Drop, "drops objects"),
    (exp.Alter, "changes the schema"),
    (exp.TruncateTable, "writes data"),
    (exp.Into, "writes a table (SELECT … INTO)"),
    (exp.Lock, "takes row locks (FOR UPDATE / FOR SHARE)"),
    (exp.LoadData, "loads files"),
    (exp.Export, "exports data to files (EXPORT)"),
    (exp.Install, "installs or loads an extension (INSTALL)"),
    (exp.Put, "uploads files to a stage (PUT)"),
    (exp.Get, "downloads files from a stage (GET)"),
    (exp.ListStage, "lists a stage's files (LIST), which is not a query for user ids"),
    (exp.Summarize, "describes data (SUMMARIZE), which is not a query for user ids"),
    (exp.Describe, "describes data (DESCRIBE), which is not a query for user ids"),
    (exp.Show, "describes the database (SHOW), which is not a query for user ids"),
    (exp.Attach, "attaches a database"),
    (exp.Detach, "detaches a database"),
    (exp.Pragma, "runs a PRAGMA"),
    (exp.Set, "changes session settings (SET)"),
    (exp.Use, "changes the session's database, schema, role or warehouse (USE)"),
    (exp.Transaction, "controls the transaction"),
    (exp.Commit, "controls the transaction"),
    (exp.Rollback, "controls the transaction"),
    (exp.Grant, "changes privileges"),
    (exp.Revoke, "changes privileges"),
    (exp.Analyze, "runs ANALYZE"),
    (exp.Cache, "caches a table"),
    (exp.Uncache, "uncaches a table"),
    (exp.Refresh, "refreshes a table"),
    (exp.Kill, "kills queries or sessions (KILL)"),
    (exp.Declare, "declares variables"),
    (exp.Comment, "sets a comment"),
)
_COMMAND = "is a command, not a query"

# What a statement does, by its leading keywords, for those sqlglot parses as a generic Command
# (or not at all) in some dialect. Two-word keys are looked up before one-word ones; the keyword
# goes where ``{}`` stands.
_NOT_IDS = "({}), which is not a query for user ids"
_KEYWORDS: dict[str, str] = {
    "INSTALL": "installs or loads an extension ({})",
    "FORCE INSTALL": "installs or loads an extension ({})",
    "LOAD": "installs or loads an extension ({})",
    "LOAD DATA": "loads files ({})",
    "CALL": "calls a procedure ({})",
    "EXPORT": "exports data to files ({})",
    "IMPORT": "imports a database from files ({})",
    "ATTACH": "attaches a database ({})",
    "DETACH": "detaches a database ({})",
    "USE": "changes the session's database, schema, role or warehouse ({})",
    "SET": "changes session settings ({})",
    "RESET": "changes session settings ({})",
    "UNSET": "changes session settings ({})",
    "PRAGMA": "runs a PRAGMA ({})",
    "COPY": "copies data in or out ({})",
    "PUT": "uploads files to a stage ({})",
    "GET": "downloads files from a stage ({})",
    "REMOVE": "removes files from a stage ({})",
    "RM": "removes files from a stage ({})",
    "UNLOAD": "unloads data to files ({})",
    "SYSTEM": "runs a {} statement on the server",
    "OPTIMIZE": "rewrites tables ({})",
    "VACUUM": "rewrites tables ({})",
    "CHECKPOINT": "writes the database ({})",
    "KILL": "kills queries or sessions ({})",
    "SUMMARIZE": "describes data " + _NOT_IDS,
    "DESCRIBE": "describes data " + _NOT_IDS,
    "DESC": "describes data " + _NOT_IDS,
    "SHOW": "describes the database " + _NOT_IDS,
    "EXPLAIN": "explains a statement " + _NOT_IDS,
    "EXECUTE": "runs dynamic SQL ({})",
    "PREPARE": "runs dynamic SQL ({})",
    "DEALLOCATE": "runs dynamic SQL ({})",
    "BEGIN": "controls the transaction ({})",
    "START": "controls the transaction ({})",
    "END": "controls the transaction ({})",
    "ABORT": "controls the transaction ({})",
    "LOCK": "takes table locks ({})",
    "ADD": "adds files to the session ({})",
    "MSCK": "repairs a table ({})",
}
# Tokens that cannot be a statement's keyword (a quoted name, a string).
_NOT_KEYWORDS = {TokenType.STRING, TokenType.IDENTIFIER, TokenType.NATIONAL_STRING}
# MySQL runs what stands inside ``/*! … */`` (and MariaDB ``/*M! … */``) and reads optimizer
# hints (``/*+ SET_VAR(…) */`` sets session variables): to sqlglot they are comments.
_MYSQL_LIVE_COMMENTS = ("!", "M!", "+")

QUERY_ROOT = "one read-only SELECT (or WITH … SELECT, UNION, VALUES) returning user ids"


def sqlglot_dialect(sqlalchemy_dialect: str) -> str:
    """sqlglot's name for a SQLAlchemy dialect; sqlglot's generic SQL ("") when it has none."""
    name = SQLGLOT_DIALECTS.get(sqlalchemy_dialect, sqlalchemy_dialect)
    return name if sqlglot.Dialect.get(name) is not None else ""


def embeddable(sql: str, sqlalchemy_dialect: str) -> str:
    """The audience SQL, checked, as syncer embeds it (``(<sql>\\n)``).

    Raises AudienceError with the reason: empty, not valid SQL for the dialect, more than
    one statement, not a query, or a write / lock / session or file effect anywhere inside.
    """
    dialect = sqlglot_dialect(sqlalchemy_dialect)
    if not sql.strip():
        raise AudienceError("the audience SQL is empty; give a SELECT that returns user ids")
    try:
        with _quiet_sqlglot():
            tokens = sqlglot.Dialect.get_or_raise(dialect).tokenize(sql)
    except (SqlglotError, ValueError) as exc:
        raise _not_valid(dialect or sqlalchemy_dialect, exc) from None
    try:
        with _quiet_sqlglot():
            parsed = sqlglot.parse(sql, read=dialect)
    except (SqlglotError, ValueError) as exc:
        # A statement sqlglot cannot parse in this dialect (DuckDB's EXPORT DATABASE,
        # ClickHouse's KILL QUERY) is still named by what it does, when its keyword says so.
        refusal = _refusal_by_keyword(_leading_words(tokens))
        if refusal is not None:
            raise refusal from None
        raise _not_valid(dialect or sqlalchemy_dialect, exc) from None
    statements = [s for s in parsed if s is not None and not isinstance(s, exp.Semicolon)]
    meaningful = [token for token in tokens if token.token_type != TokenType.SEMICOLON]
    if not statements or not meaningful:
        raise AudienceError("the audience SQL is empty; give a SELECT that returns user ids")
    if len(statements) > 1:
        raise AudienceError(
            f"the audience SQL holds {len(statements)} statements; give {QUERY_ROOT}"
        )
    [tree] = statements
    _refuse_effects(tree)
    if not isinstance(tree, exp.Query | exp.Values):
        # sqlglot reads some statements as a bare name (Databricks' RESET, DuckDB's CHECKPOINT)
        raise _refusal_by_keyword(_leading_words(tokens)) or AudienceError(
            f"the audience SQL is not a query; give {QUERY_ROOT}"
        )
    if dialect == "mysql":
        _refuse_live_comments(tokens)
        if any(isinstance(node, exp.Hint) for node in tree.walk()):
            raise _live_comment()
    _refuse_semicolons_inside(tokens, meaningful)
    return sql[meaningful[0].start : meaningful[-1].end + 1]


def _refuse_effects(tree: exp.Expr) -> None:
    for node in tree.walk():
        if isinstance(node, exp.Command):
            words = str(node.this).split()
            if isinstance(node.expression, exp.Literal) and node.expression.is_string:
                words += str(node.expression.this).split()[:1]
            raise _refusal_by_keyword(words) or AudienceError(
                f"the audience SQL {_COMMAND}; give {QUERY_ROOT}"
            )
        if isinstance(node, exp.Alter) and str(node.args.get("kind")).upper() == "SESSION":
            raise AudienceError(
                f"the audience SQL changes session settings (ALTER SESSION); give {QUERY_ROOT}"
            )
        for kind, what in _EFFECTS:
            if isinstance(node, kind):
                raise AudienceError(f"the audience SQL {what}; give {QUERY_ROOT}")
        if isinstance(node, exp.Query):
            # ClickHouse: ``SETTINGS max_execution_time = 0`` would lift syncer's time limit
            if node.args.get("settings"):
                raise AudienceError(
                    f"the audience SQL changes the query's settings (SETTINGS); give {QUERY_ROOT}"
                )
            if node.args.get("format"):
                raise AudienceError(
                    "the audience SQL sets the output format (FORMAT), which syncer chooses; "
                    f"give {QUERY_ROOT}"
                )
        if isinstance(node, exp.PropertyEQ) and isinstance(
            node.this, exp.Parameter | exp.SessionParameter
        ):
            raise AudienceError(f"the audience SQL assigns a session variable; give {QUERY_ROOT}")


def _leading_words(tokens: list[Token]) -> list[str]:
    """The statement's first two words, upper-case, as written (no strings, no quoted names)."""
    words = []
    for token in tokens:
        if token.token_type == TokenType.SEMICOLON:
            continue
        if token.token_type in _NOT_KEYWORDS or not token.text.replace("_", "").isalpha():
            break
        words.append(token.text.upper())
        if len(words) == 2:
            break
    return words


def _refusal_by_keyword(words: list[str]) -> AudienceError | None:
    for count in (2, 1):
        keyword = " ".join(words[:count])
        if len(words) >= count and keyword in _KEYWORDS:
            what = _KEYWORDS[keyword].format(keyword)
            return AudienceError(f"the audience SQL {what}; give {QUERY_ROOT}")
    return None


def _not_valid(dialect: str, exc: BaseException) -> AudienceError:
    return AudienceError(f"the audience SQL is not valid SQL for {dialect}: {_first_line(exc)}")


def _refuse_live_comments(tokens: list[Token]) -> None:
    for token in tokens:
        for comment in token.comments:
            if comment.lstrip().startswith(_MYSQL_LIVE_COMMENTS):
                raise _live_comment()


def _live_comment() -> AudienceError:
    return AudienceError(
        "the audience SQL holds a MySQL executable comment or optimizer hint "
        "(/*! … */, /*+ … */), which the server runs; remove it"
    )


def _refuse_semicolons_inside(tokens: list[Token], meaningful: list[Token]) -> None:
    first, last = meaningful[0].start, meaningful[-1].end
    if any(t.token_type == TokenType.SEMICOLON and first < t.start < last for t in tokens):
        raise AudienceError(f"the audience SQL holds more than one statement; give {QUERY_ROOT}")


@contextmanager
def _quiet_sqlglot() -> Iterator[None]:
    """sqlglot logs a warning when it falls back to parsing a Command: that is our refusal's
    business, not the terminal's."""
    log = logging.getLogger("sqlglot")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
