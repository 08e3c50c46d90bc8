"""Rules instead of SQL: an audience as conditions over declared models, compiled to one query.

A *model* is a table or a query on a source (``ModelSpec``): the *parent* model has one row per
user (``primary_key``); a *related* model points at it (``foreign_key``) and may carry a
``timestamp``. A rule is a tree of conditions, parsed once into typed objects (``parse_rules``):

- ``{attribute: plan, in: [pro, enterprise]}``: a column of the parent model and one operator;
- ``{related: orders, at_least: 1, within: 30d, where: [...]}``: how many related rows a user
  has, optionally only recent ones or ones matching conditions on the related model's columns;
- ``{all: [...]}``, ``{any: [...]}``, ``{not: {...}}``, nested freely (within bounds).

Compiling is two steps: ``describe_model`` reads each model's columns from its source (the only
step that touches a database), then ``compile_rules`` builds a SQLAlchemy Core ``Select`` from
the rule and that metadata alone, with every value bound, never pasted. ``compiled_sql`` turns it
into the SQL text a run stores and executes on the source (through the same read-only checks as
hand-written SQL). Each condition is two-valued (true or false, never NULL), so ``not`` means
what a reader expects: a user with no plan is "not pro".

Text compares as the column's collation says (MySQL's and MariaDB's usual ones ignore case,
SQLite's and PostgreSQL's do not); ``contains`` ignores case everywhere, and matches ``%`` and
``_`` as themselves. ``within`` is computed by the database each time the query runs.
"""

from __future__ import annotations

import json
import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import date, datetime, time
from typing import Annotated, Any, Literal, cast

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError
from sqlalchemy import (
    BindParameter,
    Boolean,
    ColumnElement,
    Connection,
    Date,
    DateTime,
    Dialect,
    Float,
    FromClause,
    Integer,
    Numeric,
    Select,
    String,
    Time,
    and_,
    bindparam,
    column,
    false,
    func,
    inspect,
    literal_column,
    not_,
    or_,
    select,
    table,
    text,
    true,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.engine.interfaces import BindTyping
from sqlalchemy.exc import NoSuchTableError, SQLAlchemyError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.sqltypes import NullType
from sqlalchemy.types import TypeEngine

from syncer.errors import AudienceError, ConfigError
from syncer.settings import parse_duration
from syncer.sources import (
    USER_ID_COLUMN,
    _describe_postgres,
    describe_db_error,
    normalize_sql,
)

# Bounds on one rule: a file is input, and a rule becomes one SQL statement.
MAX_DEPTH = 20  # conditions nested in groups (and related ``where``s)
MAX_CONDITIONS = 500  # conditions in one rule, counting groups
MAX_VALUES = 1000  # values in one ``in`` / ``not_in`` list
MAX_INTEGER = 2**63 - 1  # a whole number every database binds (a 64-bit integer)

SCALAR_OPERATORS = ("eq", "ne", "lt", "le", "gt", "ge")
LIST_OPERATORS = ("in", "not_in")
OPERATORS = (*SCALAR_OPERATORS, *LIST_OPERATORS, "contains", "is_null", "is_not_null")
COUNT_OPERATORS = ("at_least", "at_most", "exactly")
GROUP_KEYS = ("all", "any", "not")


def _config(schema: dict[str, Any] | None = None) -> ConfigDict:
    """Keys as in the file, nothing else; ``schema``: what the JSON Schema adds for editors."""

    def edit(generated: dict[str, Any]) -> None:
        # An absent key is None in Python; in the file, a key is given with a value or left out.
        for field in generated.get("properties", {}).values():
            if field.get("default", ...) is None:
                del field["default"]
            branches = field.get("anyOf", [])
            if {"type": "null"} in branches:
                branches.remove({"type": "null"})
                if len(branches) == 1:
                    del field["anyOf"]
                    field.update(branches[0])
        generated.update(schema or {})

    return ConfigDict(
        extra="forbid",
        frozen=True,
        populate_by_name=True,
        serialize_by_alias=True,
        json_schema_extra=cast(Any, edit),
    )


def _scalar(value: Any) -> Any:
    if value is None:
        raise PydanticCustomError("value", "null is not a value here: use is_null: true")
    if not isinstance(value, str | int | float) or (
        isinstance(value, float) and not math.isfinite(value)
    ):
        raise PydanticCustomError(
            "value", "a value is text, a number or true/false (quote dates: '2024-01-31')"
        )
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INTEGER:
        raise PydanticCustomError(
            "value", "a whole number here is at most 9223372036854775807 (64 bits) either way"
        )
    if isinstance(value, str) and "\x00" in value:
        raise PydanticCustomError("value", "a value may not hold a NUL character (\\0)")
    return value


# One value of a condition; its type is checked against the column's when the rule is compiled.
Scalar = Annotated[StrictStr | StrictInt | StrictFloat | StrictBool, BeforeValidator(_scalar)]


# --- the file's models --------------------------------------------------------------------------


# ``in`` / ``not_in``: a bounded list of values.
Values = Annotated[list[Scalar], Field(min_length=1, max_length=MAX_VALUES)]
# ``at_least`` / ``at_most`` / ``exactly``: a number of rows.
Count = Annotated[StrictInt, Field(ge=0, le=MAX_INTEGER)]


class ModelSpec(BaseModel):
    """A model as ``audiences.yml`` declares it."""

    model_config = _config(
        {
            "oneOf": [{"required": ["table"]}, {"required": ["sql"]}],
            "anyOf": [{"required": ["primary_key"]}, {"required": ["foreign_key"]}],
        }
    )

    source: str = "default"
    table: str | None = Field(default=None, min_length=1)
    sql: str | None = Field(default=None, min_length=1)
    primary_key: str | None = Field(default=None, min_length=1)  # the parent model: one row a user
    foreign_key: str | None = Field(default=None, min_length=1)  # a related model -> the parent
    timestamp: str | None = Field(default=None, min_length=1)  # enables ``within``

    @model_validator(mode="after")
    def _one_kind(self) -> ModelSpec:
        if (self.table is None) == (self.sql is None):
            raise PydanticCustomError(
                "model_source", "give exactly one of table (a table's name) or sql (a query)"
            )
        if self.primary_key is None and self.foreign_key is None:
            raise PydanticCustomError(
                "model_kind",
                "give primary_key (the parent model: one row per user) or foreign_key "
                "(a related model: its column that holds the parent's primary_key)",
            )
        return self

    @property
    def is_parent(self) -> bool:
        return self.primary_key is not None and self.foreign_key is None

    @property
    def is_related(self) -> bool:
        return self.foreign_key is not None


# --- conditions -----------------------------------------------------------------------------------


class AttributeCondition(BaseModel):
    """A column of the model and one operator: ``{attribute: plan, eq: pro}``."""

    model_config = _config({"minProperties": 2, "maxProperties": 2})  # attribute + an operator

    attribute: str = Field(min_length=1)
    eq: Scalar | None = None
    ne: Scalar | None = None
    lt: Scalar | None = None
    le: Scalar | None = None
    gt: Scalar | None = None
    ge: Scalar | None = None
    in_: Values | None = Field(default=None, alias="in")
    not_in: Values | None = None
    contains: Annotated[StrictStr, BeforeValidator(_scalar)] | None = None
    is_null: Literal[True] | None = None
    is_not_null: Literal[True] | None = None

    @model_validator(mode="after")
    def _one_operator(self) -> AttributeCondition:
        given = [name for name in OPERATORS if getattr(self, _field(name)) is not None]
        if len(given) != 1:
            raise PydanticCustomError("operator", _operator_message(given))
        return self

    @property
    def operator(self) -> str:
        """The operator's name as written (``in``, not ``in_``)."""
        return next(name for name in OPERATORS if getattr(self, _field(name)) is not None)

    @property
    def value(self) -> Any:
        return getattr(self, _field(self.operator))


class WhereGroup(BaseModel):
    """``all`` / ``any`` / ``not`` over conditions on a related model's columns."""

    model_config = _config({"minProperties": 1, "maxProperties": 1})

    all_: list[WhereCondition] | None = Field(default=None, alias="all")
    any_: list[WhereCondition] | None = Field(default=None, alias="any")
    not_: WhereCondition | None = Field(default=None, alias="not")

    @model_validator(mode="after")
    def _one_key(self) -> WhereGroup:
        _check_group(self.all_, self.any_, self.not_)
        return self

    @property
    def kind(self) -> str:
        return _group_kind(self.all_, self.any_)


class RelatedCondition(BaseModel):
    """How many rows of a related model a user has: ``{related: orders, at_least: 1}``."""

    model_config = _config({"oneOf": [{"required": [key]} for key in COUNT_OPERATORS]})

    related: str = Field(min_length=1)
    at_least: Count | None = None
    at_most: Count | None = None
    exactly: Count | None = None
    within: str | None = None  # a duration: only rows whose timestamp is this recent
    where: Annotated[WhereCondition | list[WhereCondition] | None, WrapValidator(_where_field)] = (
        None
    )

    @field_validator("within")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_duration(value, what="within")
            except ConfigError as exc:
                raise PydanticCustomError("duration", str(exc).removeprefix("within: ")) from None
        return value

    @model_validator(mode="after")
    def _one_count(self) -> RelatedCondition:
        given = [name for name in COUNT_OPERATORS if getattr(self, name) is not None]
        if len(given) != 1:
            raise PydanticCustomError(
                "count",
                f"give exactly one of {', '.join(COUNT_OPERATORS)} (a number of rows)"
                + (f"; got {' and '.join(given)}" if given else ""),
            )
        return self

    @property
    def count_operator(self) -> str:
        return next(name for name in COUNT_OPERATORS if getattr(self, name) is not None)

    @property
    def count(self) -> int:
        value = getattr(self, self.count_operator)
        assert isinstance(value, int)
        return value

    @property
    def within_seconds(self) -> int | None:
        return None if self.within is None else parse_duration(self.within, what="within")

    @property
    def where_condition(self) -> AttributeCondition | WhereGroup | None:
        """``where`` as one condition: a list is ``all`` of it."""
        if isinstance(self.where, list):
            return WhereGroup(all=self.where)
        return self.where


class Group(BaseModel):
    """``all`` / ``any`` / ``not`` over conditions: ``{all: [...]}``."""

    model_config = _config({"minProperties": 1, "maxProperties": 1})

    all_: list[Condition] | None = Field(default=None, alias="all")
    any_: list[Condition] | None = Field(default=None, alias="any")
    not_: Condition | None = Field(default=None, alias="not")

    @model_validator(mode="after")
    def _one_key(self) -> Group:
        _check_group(self.all_, self.any_, self.not_)
        return self

    @property
    def kind(self) -> str:
        return _group_kind(self.all_, self.any_)


def _field(name: str) -> str:
    return "in_" if name == "in" else name


def _operator_message(given: list[str]) -> str:
    if not given:
        return f"give one operator: {', '.join(OPERATORS)}"
    return (
        f"one operator per condition, got {' and '.join(given)}; "
        "combine conditions with all: or any:"
    )


def _check_group(all_: object, any_: object, not_: object) -> None:
    given = [
        key for key, value in zip(GROUP_KEYS, (all_, any_, not_), strict=True) if value is not None
    ]
    if len(given) != 1:
        raise PydanticCustomError(
            "group",
            "give exactly one of all, any or not"
            + (f"; got {' and '.join(given)}" if given else ""),
        )


def _group_kind(all_: object, any_: object) -> str:
    return "all" if all_ is not None else "any" if any_ is not None else "not"


# Which kind of condition a mapping is, from its keys: pydantic's errors then point into the
# kind the user meant (``rules.all[1].attribute``), not into each kind of a union in turn.
_walking: ContextVar[bool] = ContextVar("syncer_rules_walking", default=False)


def _condition(value: Any, handler: ValidatorFunctionWrapHandler, *, where: bool) -> Any:
    if isinstance(value, _WHERE_KINDS if where else _KINDS):
        return value
    if not isinstance(value, dict):
        raise PydanticCustomError("condition", _condition_message(where))
    if _walking.get():
        return _dispatch(value, where=where)
    _check_bounds(value)
    token = _walking.set(True)
    try:
        return _dispatch(value, where=where)
    finally:
        _walking.reset(token)


def _condition_message(where: bool) -> str:
    if where:
        return "a where condition is {attribute: COLUMN, OPERATOR: VALUE}, or all/any/not of them"
    return (
        "a condition is {attribute: COLUMN, OPERATOR: VALUE}, {related: MODEL, at_least: N}, "
        "or {all: [...]}, {any: [...]}, {not: {...}}"
    )


def _dispatch(value: dict[Any, Any], *, where: bool) -> Any:
    keys = [key for key in value if isinstance(key, str)]
    kinds = [key for key in ("attribute", "related") if key in value]
    group_keys = [key for key in GROUP_KEYS if key in value]
    if group_keys:
        kinds.append("/".join(group_keys))
    if len(kinds) != 1:
        if not kinds:
            unknown = [key for key in keys if key not in OPERATORS][:1]
            if unknown:
                _fail((unknown[0],), f"unknown key {unknown[0]!r}; {_condition_message(where)}")
            _fail((), _condition_message(where))
        _fail((), f"a condition is one kind: got {' and '.join(kinds)}; combine them with all:")
    if "attribute" in value:
        unknown = [key for key in keys if key != "attribute" and key not in OPERATORS]
        if unknown:
            _fail(
                (unknown[0],),
                f"unknown operator {unknown[0]!r}; operators: {', '.join(OPERATORS)}",
            )
        operators = [key for key in OPERATORS if key in value]
        nulls = [key for key in operators if value[key] is None]
        if nulls:
            _fail((nulls[0],), "null is not a value here: use is_null: true")
        if len(operators) != 1:
            _fail(tuple(operators[1:2]), _operator_message(operators))
        return AttributeCondition.model_validate(value)
    allowed = ("related", *COUNT_OPERATORS, "within", "where") if "related" in value else GROUP_KEYS
    unknown = [key for key in keys if key not in allowed]
    if unknown:
        _fail((unknown[0],), f"unknown key {unknown[0]!r}; use {', '.join(allowed)}")
    if "related" in value:
        if where:
            _fail(
                ("related",),
                "a where condition is on the related model's own columns: attribute, all, any, not",
            )
        return RelatedCondition.model_validate(value)
    if where:
        return WhereGroup.model_validate(value)
    return Group.model_validate(value)


def _fail(loc: tuple[str | int, ...], message: str) -> None:
    detail: InitErrorDetails = {
        "type": PydanticCustomError("rule", message),
        "loc": loc,
        "input": None,
    }
    raise ValidationError.from_exception_data("rule", [detail])


def _check_bounds(value: Any) -> None:
    """Nesting and size, counted on the input before it is parsed (stops at the bounds)."""
    count = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_CONDITIONS:
            raise PydanticCustomError(
                "rule_size", f"a rule holds more than {MAX_CONDITIONS} conditions"
            )
        if not isinstance(node, dict):
            continue
        if depth > MAX_DEPTH:
            raise PydanticCustomError(
                "rule_depth", f"conditions are nested more than {MAX_DEPTH} deep"
            )
        for key in ("all", "any", "not", "where"):
            children = node.get(key)
            if isinstance(children, dict):
                stack.append((children, depth + 1))
            elif isinstance(children, list):
                stack.extend((child, depth + 1) for child in children[: MAX_CONDITIONS + 1])


def _where_field(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """``where``: one condition, or a list of them (all of them)."""
    if value is None:
        return None
    if isinstance(value, list):
        return _WHERE_LIST.validate_python(value)
    return _condition(value, handler, where=True)


def _condition_validator(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    return _condition(value, handler, where=False)


def _where_validator(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    return _condition(value, handler, where=True)


Condition = Annotated[
    AttributeCondition | RelatedCondition | Group, WrapValidator(_condition_validator)
]
WhereCondition = Annotated[AttributeCondition | WhereGroup, WrapValidator(_where_validator)]

WhereGroup.model_rebuild()
RelatedCondition.model_rebuild()
Group.model_rebuild()

_WHERE_LIST: TypeAdapter[list[AttributeCondition | WhereGroup]] = TypeAdapter(list[WhereCondition])
_KINDS = (AttributeCondition, RelatedCondition, Group)
_WHERE_KINDS = (AttributeCondition, WhereGroup)
Rules = Condition  # a rule is its top-level condition (usually a group)

CONDITION: TypeAdapter[AttributeCondition | RelatedCondition | Group] = TypeAdapter(Condition)


def parse_rules(data: Any) -> AttributeCondition | RelatedCondition | Group:
    """A rule as written (parsed YAML or JSON) -> typed conditions; raises pydantic's
    ValidationError, whose locations are paths into ``data``."""
    return CONDITION.validate_python(data)


def rules_data(rules: AttributeCondition | RelatedCondition | Group) -> Any:
    """A rule as it would be written: plain JSON-able data, keys as in the file."""
    return CONDITION.dump_python(rules, mode="json", by_alias=True, exclude_none=True)


class RuleError(AudienceError):
    """A rule that does not fit its models: ``path`` is where in the rule (the YAML path from
    the audience entry, e.g. ``("rules", "all", 1, "attribute")``)."""

    def __init__(self, path: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


# --- metadata: the only step that reads a database ----------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """A model and its columns as its source reports them (names in the database's own case;
    types are ``NullType`` for a ``sql`` model). A ``sql`` model's spec holds its normalized
    SQL."""

    name: str
    spec: ModelSpec
    columns: Mapping[str, TypeEngine[Any]]

    def column(self, name: str, path: tuple[str | int, ...]) -> str:
        """The column's name as the database spells it: exactly, or else the one column that
        matches ignoring case."""
        if name in self.columns:
            return name
        folded = [column for column in self.columns if column.lower() == name.lower()]
        if len(folded) == 1:
            return folded[0]
        raise RuleError(
            path, f"no column {name!r} in model {self.name} (columns: {_listed(self.columns)})"
        )


def describe_model(conn: Connection, name: str, spec: ModelSpec) -> ModelInfo:
    """Read a model's columns from its source: one read-only query, nothing fetched.

    Run it the way audience SQL runs (``syncer.sources.fenced``). A ``sql`` model's SQL is
    checked like hand-written audience SQL first. Raises RuleError with a path inside the
    model's entry (``("table",)``, ``("primary_key",)`` …): no such table, SQL that is refused or
    fails, a key or timestamp column it does not have.
    """
    if spec.table is not None:
        schema, _, table_name = spec.table.rpartition(".")
        try:
            if conn.dialect.name == "duckdb":
                columns = _duckdb_columns(conn, table_name, schema or None)
            else:
                reflected = inspect(conn).get_columns(table_name, schema=schema or None)
                columns = {str(c["name"]): c["type"] for c in reflected}
        except NoSuchTableError:
            raise RuleError(
                ("table",), f"no table {spec.table!r} on source {spec.source!r}"
            ) from None
        except SQLAlchemyError as exc:
            raise RuleError(
                ("table",),
                f"could not read table {spec.table!r} on source {spec.source!r}: "
                f"{describe_db_error(exc)}",
            ) from None
        if not columns:  # some dialects report a missing table as one without columns
            raise RuleError(("table",), f"no table {spec.table!r} on source {spec.source!r}")
    else:
        assert spec.sql is not None
        try:
            sql = normalize_sql(spec.sql, conn.dialect.name)
        except AudienceError as exc:
            raise RuleError(("sql",), str(exc)) from None
        _check_no_colon_names(sql)
        try:
            names = _query_columns(conn, sql)
        except SQLAlchemyError as exc:
            raise RuleError(
                ("sql",),
                f"the model's SQL failed on source {spec.source!r}: {describe_db_error(exc)}",
            ) from None
        columns = {str(column_name): NullType() for column_name in names}
        spec = spec.model_copy(update={"sql": sql})
    info = ModelInfo(name=name, spec=spec, columns=columns)
    for key in ("primary_key", "foreign_key", "timestamp"):
        wanted = getattr(spec, key)
        if wanted is not None:
            info.column(wanted, (key,))
    return info


def _query_columns(conn: Connection, sql: str) -> list[str]:
    """The names of a query's columns; nothing fetched. PostgreSQL: from the server's parse of
    it, so nothing runs at all (as audience SQL is described there, ``syncer.sources``)."""
    if conn.dialect.name == "postgresql":
        return _describe_postgres(conn, sql)[0]
    query: Select[Any] = (
        select(literal_column("*")).select_from(text(f"({sql}\n) AS model_query")).limit(0)
    )
    result = conn.execute(query)
    names = list(map(str, result.keys()))
    result.close()
    return names


def _duckdb_columns(
    conn: Connection, table_name: str, schema: str | None
) -> dict[str, TypeEngine[Any]]:
    """DuckDB's own catalog (duckdb_engine reflects through PostgreSQL's, which DuckDB 1.2+
    does not fully have)."""
    rows = conn.execute(
        text(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = :table_name AND table_schema = coalesce(:schema, current_schema()) "
            "AND table_catalog = current_database() ORDER BY ordinal_position"
        ),
        {"table_name": table_name, "schema": schema},
    ).all()
    return {str(name): _duckdb_type(str(data_type)) for name, data_type in rows}


def _duckdb_type(name: str) -> TypeEngine[Any]:
    name = name.upper()
    if name.startswith(("VARCHAR", "TEXT", "STRING", "CHAR", "BPCHAR")):
        return String()
    if name == "BOOLEAN":
        return Boolean()
    if name.removeprefix("U") in ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT"):
        return Integer()
    if name.startswith(("DOUBLE", "FLOAT", "REAL")):
        return Float()
    if name.startswith(("DECIMAL", "NUMERIC")):
        return Numeric()
    if name.startswith("TIMESTAMP"):
        return DateTime(timezone=name in ("TIMESTAMP WITH TIME ZONE", "TIMESTAMPTZ"))
    if name == "DATE":
        return Date()
    if name.startswith("TIME"):
        return Time()
    return NullType()


def _check_no_colon_names(sql: str) -> None:
    """SQLAlchemy reads ``:name`` in SQL text as a parameter, even inside a string literal; the
    compiled query would bind it to NULL."""
    found = text(sql)._bindparams
    if found:
        raise RuleError(
            ("sql",),
            f"the model's SQL holds ':{next(iter(found))}', which would be read as a parameter; "
            "write it another way (e.g. ':' || 'name')",
        )


def _listed(names: Iterable[str]) -> str:
    shown = sorted(names)
    return ", ".join(shown[:20]) + (f" … ({len(shown)} in all)" if len(shown) > 20 else "")


# --- the compiler: rules and metadata in, a Select out; no side effects ---------------------------


def compile_rules(
    rules: Condition, parent: ModelInfo, related: Mapping[str, ModelInfo]
) -> Select[Any]:
    """``SELECT <parent>.<primary_key> AS user_id FROM <parent> WHERE <rules>``.

    ``related``: the models a ``related:`` condition may name (others, the parent itself, are
    refused with the reason). RuleError paths start at ``("rules",)``: the audience entry's key.
    """
    if not parent.spec.is_parent:
        raise RuleError(
            ("rules",),
            f"model {parent.name!r} is not a parent model: give one with primary_key "
            "(one row per user) and no foreign_key",
        )
    assert parent.spec.primary_key is not None
    compiler = _Compiler(parent, related)
    parent_rows = compiler.parent_rows
    condition = compiler.condition(rules, parent, parent_rows, ("rules",))
    key = parent_rows.c[parent.column(parent.spec.primary_key, ("rules",))]
    return select(key.label(USER_ID_COLUMN)).select_from(parent_rows).where(condition)


class _Compiler:
    def __init__(self, parent: ModelInfo, related: Mapping[str, ModelInfo]) -> None:
        self.parent = parent
        self.related = related
        self.parent_rows = self.rows(parent)

    def rows(self, model: ModelInfo) -> FromClause:
        """The model as a FROM item named after it."""
        columns = [column(name, type_) for name, type_ in model.columns.items()]
        if model.spec.table is not None:
            schema, _, table_name = model.spec.table.rpartition(".")
            return table(table_name, *columns, schema=schema or None).alias(model.name)
        assert model.spec.sql is not None
        return text(f"{model.spec.sql}\n").columns(*columns).subquery(model.name)

    def condition(
        self,
        node: Condition | WhereCondition,
        model: ModelInfo,
        rows: FromClause,
        path: tuple[str | int, ...],
    ) -> ColumnElement[bool]:
        if isinstance(node, AttributeCondition):
            return self.attribute(node, model, rows, path)
        if isinstance(node, RelatedCondition):
            return self.related_rows(node, path)
        if node.not_ is not None:
            return not_(self.condition(node.not_, model, rows, (*path, "not")))
        kind = node.kind
        children = [
            self.condition(child, model, rows, (*path, kind, index))
            for index, child in enumerate((node.all_ if kind == "all" else node.any_) or [])
        ]
        if not children:
            return true() if kind == "all" else false()
        return and_(*children) if kind == "all" else or_(*children)

    def attribute(
        self,
        node: AttributeCondition,
        model: ModelInfo,
        rows: FromClause,
        path: tuple[str | int, ...],
    ) -> ColumnElement[bool]:
        name = model.column(node.attribute, (*path, "attribute"))
        col: ColumnElement[Any] = rows.c[name]
        op, value = node.operator, node.value
        where = (*path, op)
        if op == "is_null":
            return col.is_(None)
        if op == "is_not_null":
            return col.is_not(None)
        kind = _kind(col.type)
        if op == "contains":
            if kind not in ("text", None):
                raise RuleError(where, f"contains needs a text column; {name!r} is a {kind} column")
            return and_(col.is_not(None), col.icontains(value, autoescape=True))
        values = value if isinstance(value, list) else [value]
        for index, item in enumerate(values):
            _check_value(item, kind, name, (*where, index) if isinstance(value, list) else where)
        bound = [_bind(item, col.type, kind, name) for item in values]
        if op == "in":
            return and_(col.is_not(None), col.in_(bound))
        if op == "not_in":
            return or_(col.is_(None), col.not_in(bound))
        compare = _COMPARE[op]
        if op == "ne":
            return or_(col.is_(None), compare(col, bound[0]))
        return and_(col.is_not(None), compare(col, bound[0]))

    def related_rows(
        self, node: RelatedCondition, path: tuple[str | int, ...]
    ) -> ColumnElement[bool]:
        model = self.related.get(node.related)
        where = (*path, "related")
        if model is None:
            if node.related == self.parent.name:
                model = self.parent
            else:
                known = _listed({*self.related, self.parent.name})
                raise RuleError(where, f"no model {node.related!r} (known: {known})")
        if not model.spec.is_related:
            raise RuleError(
                where,
                f"model {node.related!r} is not related: give a model with foreign_key",
            )
        if model.spec.source != self.parent.spec.source:
            raise RuleError(
                where,
                f"model {node.related!r} is on source {model.spec.source!r} and model "
                f"{self.parent.name!r} on {self.parent.spec.source!r}: an audience's models "
                "are on one source",
            )
        assert model.spec.foreign_key is not None and self.parent.spec.primary_key is not None
        rows = self.rows(model)
        parent_key = self.parent_rows.c[self.parent.column(self.parent.spec.primary_key, where)]
        conditions: list[ColumnElement[bool]] = [
            rows.c[model.column(model.spec.foreign_key, where)] == parent_key
        ]
        if node.within is not None:
            if model.spec.timestamp is None:
                raise RuleError(
                    (*path, "within"),
                    f"'within' needs a timestamp on model {node.related!r}",
                )
            stamp = rows.c[model.column(model.spec.timestamp, (*path, "within"))]
            conditions.append(_Since(stamp, _seconds(node.within_seconds)))
        if node.where is not None:
            if isinstance(node.where, list):
                conditions.extend(
                    self.condition(child, model, rows, (*path, "where", index))
                    for index, child in enumerate(node.where)
                )
            else:
                conditions.append(self.condition(node.where, model, rows, (*path, "where")))
        op, count = node.count_operator, node.count
        if op == "at_least" and count == 0:
            return true()
        matching: Select[Any] = select(literal_column("1")).select_from(rows).where(*conditions)
        if op == "at_least" and count == 1:
            return matching.exists()
        if count == 0:  # exactly 0, at_most 0
            return ~matching.exists()
        counted = select(func.count()).select_from(rows).where(*conditions).scalar_subquery()
        bound = bindparam(op, count, type_=Integer(), unique=True)
        if op == "at_least":
            return counted >= bound
        if op == "at_most":
            return counted <= bound
        return counted == bound


_COMPARE: dict[str, Callable[[ColumnElement[Any], ColumnElement[Any]], ColumnElement[bool]]] = {
    "eq": operator.eq,
    "ne": operator.ne,
    "lt": operator.lt,
    "le": operator.le,
    "gt": operator.gt,
    "ge": operator.ge,
}


def _kind(type_: TypeEngine[Any]) -> str | None:
    """What values a column holds, as far as its reported type tells (None: unknown)."""
    if isinstance(type_, Boolean):
        return "boolean"
    if isinstance(type_, mysql.TINYINT) and type_.display_width == 1:
        return None  # MySQL's BOOLEAN: true/false or a number
    if isinstance(type_, Integer | Numeric | Float):  # Float is not a Numeric in SQLAlchemy 2.1
        return "number"
    if isinstance(type_, String):
        return "text"
    if isinstance(type_, DateTime):
        return "datetime"
    if isinstance(type_, Date):
        return "date"
    if isinstance(type_, Time):
        return "time"
    return None


def _check_value(value: Any, kind: str | None, name: str, path: tuple[str | int, ...]) -> None:
    """The value fits the column (a mistake here is a run failing on the source later, or on
    some databases a comparison that is silently never true)."""
    shown = repr(value) if isinstance(value, str) else json.dumps(value)
    if kind == "text" and isinstance(value, bool):
        raise RuleError(
            path,
            f"{name!r} is a text column, and YAML read this value as {shown} (it does so with "
            "yes, no, on, off, true and false): write the word in quotes, like 'no'",
        )
    if kind == "text" and not isinstance(value, str):
        raise RuleError(path, f"{name!r} is a text column: write the value in quotes ('{shown}')")
    if kind == "number" and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise RuleError(path, f"{name!r} is a number column: write a number, not {shown}")
    if kind == "boolean" and not isinstance(value, bool):
        raise RuleError(path, f"{name!r} is a true/false column: write true or false, not {shown}")
    if kind in ("date", "datetime", "time"):
        parse = {"date": date.fromisoformat, "datetime": datetime.fromisoformat}.get(
            kind, time.fromisoformat
        )
        example = {"date": "2024-01-31", "datetime": "2024-01-31 18:30:00"}.get(kind, "18:30")
        try:
            if not isinstance(value, str):
                raise ValueError(value)
            parse(value)
        except ValueError:
            raise RuleError(
                path, f"{name!r} is a {kind} column: write a {kind} in quotes, like '{example}'"
            ) from None


def _bind(value: Any, type_: TypeEngine[Any], kind: str | None, name: str) -> BindParameter[Any]:
    """A bound value, named after its column for reading (``:plan_1``). Dates and times stay
    text (ISO 8601), which every database reads as the column's type: a run binds the stored
    values by their Python type, and the Select here binds them the same way."""
    key = re.sub(r"\W", "_", name.encode("ascii", "replace").decode()).strip("_")[:30] or "value"
    if key[0].isdigit():
        key = f"value_{key}"
    if kind is None or kind in ("date", "datetime", "time"):
        return bindparam(key, value, unique=True)  # typed by the value
    return bindparam(key, value, type_=type_, unique=True)


def _seconds(seconds: int | None) -> BindParameter[int]:
    assert seconds is not None
    return bindparam("within_seconds", seconds, type_=Integer(), unique=True)


class _Since(FunctionElement[bool]):
    """``timestamp >= now - seconds``, now as the database has it when the query runs (the
    compiled SQL is stored and run for months). Naive timestamps are read as UTC; a text
    column as an ISO 8601 timestamp; on SQLite an integer column as Unix time."""

    type = Boolean()
    name = "since"
    inherit_cache = True
    _is_implicitly_boolean = True


def _since_parts(
    element: _Since, compiler: SQLCompiler, **kw: Any
) -> tuple[str, str, TypeEngine[Any]]:
    stamp, seconds = element.clauses
    return compiler.process(stamp, **kw), compiler.process(seconds, **kw), stamp.type


@compiles(_Since)
def _since_ansi(element: _Since, compiler: SQLCompiler, **kw: Any) -> str:
    stamp, seconds, _ = _since_parts(element, compiler, **kw)
    return f"({stamp} >= CURRENT_TIMESTAMP - {seconds} * INTERVAL '1' SECOND)"


@compiles(_Since, "sqlite")
def _since_sqlite(element: _Since, compiler: SQLCompiler, **kw: Any) -> str:
    stamp, seconds, type_ = _since_parts(element, compiler, **kw)
    # datetime() reads '2024-01-31T18:30:00Z' and '2024-01-31 18:30:00' alike, so they compare
    # as times, not as text.
    read = f"datetime({stamp}, 'unixepoch')" if isinstance(type_, Integer) else f"datetime({stamp})"
    return f"({read} >= datetime('now', '-' || {seconds} || ' seconds'))"


@compiles(_Since, "postgresql")
def _since_postgresql(element: _Since, compiler: SQLCompiler, **kw: Any) -> str:
    stamp, seconds, type_ = _since_parts(element, compiler, **kw)
    since = f"make_interval(secs => {seconds})"
    if isinstance(type_, DateTime) and type_.timezone:
        return f"({stamp} >= now() - {since})"
    if isinstance(type_, String):
        stamp = f"CAST({stamp} AS TIMESTAMP)"
    return f"({stamp} >= (now() AT TIME ZONE 'UTC') - {since})"


@compiles(_Since, "duckdb")
def _since_duckdb(element: _Since, compiler: SQLCompiler, **kw: Any) -> str:
    stamp, seconds, type_ = _since_parts(element, compiler, **kw)
    since = f"to_seconds(CAST({seconds} AS BIGINT))"
    if isinstance(type_, DateTime) and type_.timezone:
        return f"({stamp} >= now() - {since})"
    if isinstance(type_, String):
        stamp = f"CAST({stamp} AS TIMESTAMP)"
    return f"({stamp} >= CAST(timezone('UTC', now()) AS TIMESTAMP) - {since})"


@compiles(_Since, "mysql")
@compiles(_Since, "mariadb")
def _since_mysql(element: _Since, compiler: SQLCompiler, **kw: Any) -> str:
    stamp, seconds, type_ = _since_parts(element, compiler, **kw)
    # TIMESTAMP columns read in the session's time zone, as NOW() is; DATETIME holds UTC.
    now = "NOW(6)" if isinstance(type_, mysql.TIMESTAMP) else "UTC_TIMESTAMP(6)"
    return f"({stamp} >= {now} - INTERVAL {seconds} SECOND)"


# --- the SQL a run stores -----------------------------------------------------------------------


def compiled_sql(query: Select[Any], dialect: Dialect) -> tuple[str, dict[str, Any]]:
    """The query as SQL text with ``:name`` placeholders in the source's dialect, and its
    values (plain JSON-able values): what a run stores, and executes as
    ``text(sql).bindparams(**params)``. IN lists are expanded, one placeholder a value."""
    named: Dialect = type(dialect)(paramstyle="named")  # type: ignore[call-arg]
    # No ``::type`` casts after placeholders (psycopg's dialect adds some): text() would not
    # read ``:name::FLOAT`` as a parameter.
    named.bind_typing = BindTyping.NONE
    compiled = query.compile(dialect=named, compile_kwargs={"render_postcompile": True})
    return str(compiled), dict(compiled.params)


def display_sql(query: Select[Any], dialect: Dialect) -> str:
    """The query as ``audience show --sql`` prints it: the SQL, then its values."""
    sql, params = compiled_sql(query, dialect)
    if not params:
        return sql
    values = "\n".join(
        f"--   :{key} = {json.dumps(value, ensure_ascii=False)}" for key, value in params.items()
    )
    return f"{sql}\n-- values:\n{values}"
