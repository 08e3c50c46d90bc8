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
"""

from __future__ import annotations

import math
from contextvars import ContextVar
from typing import Annotated, Any, Literal

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

from syncer.errors import AudienceError, ConfigError
from syncer.settings import parse_duration

# Bounds on one rule: a file is input, and a rule becomes one SQL statement.
MAX_DEPTH = 20  # conditions nested in groups (and related ``where``s)
MAX_CONDITIONS = 500  # conditions in one rule, counting groups
MAX_VALUES = 1000  # values in one ``in`` / ``not_in`` list

SCALAR_OPERATORS = ("eq", "ne", "lt", "le", "gt", "ge")
LIST_OPERATORS = ("in", "not_in")
OPERATORS = (*SCALAR_OPERATORS, *LIST_OPERATORS, "contains", "is_null", "is_not_null")
COUNT_OPERATORS = ("at_least", "at_most", "exactly")
GROUP_KEYS = ("all", "any", "not")

_CONFIG = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, serialize_by_alias=True)


def _scalar(value: Any) -> Any:
    if value is None:
        raise PydanticCustomError("value", "null is not a value here: use is_null: true")
    if not isinstance(value, str | int | float) or (
        isinstance(value, float) and not math.isfinite(value)
    ):
        raise PydanticCustomError(
            "value", "a value is text, a number or true/false (quote dates: '2024-01-31')"
        )
    return value


# One value of a condition; its type is checked against the column's when the rule is compiled.
Scalar = Annotated[StrictStr | StrictInt | StrictFloat | StrictBool, BeforeValidator(_scalar)]


# --- the file's models --------------------------------------------------------------------------


class ModelSpec(BaseModel):
    """A model as ``audiences.yml`` declares it."""

    model_config = _CONFIG

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

    model_config = _CONFIG

    attribute: str = Field(min_length=1)
    eq: Scalar | None = None
    ne: Scalar | None = None
    lt: Scalar | None = None
    le: Scalar | None = None
    gt: Scalar | None = None
    ge: Scalar | None = None
    in_: list[Scalar] | None = Field(default=None, alias="in", min_length=1, max_length=MAX_VALUES)
    not_in: list[Scalar] | None = Field(default=None, min_length=1, max_length=MAX_VALUES)
    contains: StrictStr | None = None
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

    model_config = _CONFIG

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

    model_config = _CONFIG

    related: str = Field(min_length=1)
    at_least: StrictInt | None = Field(default=None, ge=0)
    at_most: StrictInt | None = Field(default=None, ge=0)
    exactly: StrictInt | None = Field(default=None, ge=0)
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

    model_config = _CONFIG

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
        if depth > MAX_DEPTH:
            raise PydanticCustomError(
                "rule_depth", f"conditions are nested more than {MAX_DEPTH} deep"
            )
        if not isinstance(node, dict):
            continue
        if count > MAX_CONDITIONS:
            raise PydanticCustomError(
                "rule_size", f"a rule holds more than {MAX_CONDITIONS} conditions"
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
