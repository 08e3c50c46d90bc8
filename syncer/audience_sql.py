"""Audience SQL, read before it is trusted: one query, parsed with sqlglot in its source's dialect.

This is the first check, not the boundary. It refuses what is plainly not a query or plainly
writes or changes the session (a data-modifying CTE, ``SELECT … INTO``, locking clauses,
``COPY``, ``ATTACH``, ``PRAGMA``, ``SET``, MySQL's executable comments …) with a clear message,
before anything reaches the database. What a query may *read* is decided by the database itself
(see ``syncer.sources``): functions are not judged here by name.

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

# SQLAlchemy's dialect names where sqlglot names them otherwise; others are tried as they are.
SQLGLOT_DIALECTS = {"postgresql": "postgres", "mariadb": "mysql", "mssql": "tsql"}

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
    (exp.Export, "writes files"),
    (exp.Attach, "attaches a database"),
    (exp.Detach, "detaches a database"),
    (exp.Pragma, "runs a PRAGMA"),
    (exp.Set, "changes session settings (SET)"),
    (exp.Use, "changes the session's database (USE)"),
    (exp.Transaction, "controls the transaction"),
    (exp.Commit, "controls the transaction"),
    (exp.Rollback, "controls the transaction"),
    (exp.Grant, "changes privileges"),
    (exp.Revoke, "changes privileges"),
    (exp.Analyze, "runs ANALYZE"),
    (exp.Cache, "caches a table"),
    (exp.Uncache, "uncaches a table"),
    (exp.Refresh, "refreshes a table"),
    (exp.Kill, "kills a session"),
    (exp.Declare, "declares variables"),
    (exp.Comment, "sets a comment"),
    (exp.Command, "is a command, not a query"),
)
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
            parsed = sqlglot.parse(sql, read=dialect)
    except (SqlglotError, ValueError) as exc:
        raise AudienceError(
            f"the audience SQL is not valid SQL for {dialect or sqlalchemy_dialect}: "
            f"{_first_line(exc)}"
        ) from None
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
        raise AudienceError(f"the audience SQL is not a query; give {QUERY_ROOT}")
    if dialect == "mysql":
        _refuse_live_comments(tokens)
        if any(isinstance(node, exp.Hint) for node in tree.walk()):
            raise _live_comment()
    _refuse_semicolons_inside(tokens, meaningful)
    return sql[meaningful[0].start : meaningful[-1].end + 1]


def _refuse_effects(tree: exp.Expr) -> None:
    for node in tree.walk():
        for kind, what in _EFFECTS:
            if isinstance(node, kind):
                raise AudienceError(f"the audience SQL {what}; give {QUERY_ROOT}")
        if isinstance(node, exp.PropertyEQ) and isinstance(
            node.this, exp.Parameter | exp.SessionParameter
        ):
            raise AudienceError(f"the audience SQL assigns a session variable; give {QUERY_ROOT}")


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
