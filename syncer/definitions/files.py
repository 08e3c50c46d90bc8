"""``audiences.yml``: the file that declares models and audiences, read into typed objects once.

``load_file`` reads the file (bounded: size, nodes, nesting; no aliases, no custom tags, no
duplicate keys), keeps the line of every YAML node by its path, and validates the values with the
pydantic models below (``AudiencesFile``). Every mistake is reported as one line naming the place:
``audiences.yml:14: audiences[0].rules.all[1].attribute: <what is wrong>``.

What needs a database (a model's columns, a source's dialect) is checked later, by whoever
compiles the rules; ``LoadedFile.locate`` and ``LoadedFile.error`` turn the paths of those
errors (``("audiences", 0, *RuleError.path)``, ``("models", name, *RuleError.path)``) into the
same kind of line.

``python -m syncer.definitions.files`` prints the file's JSON Schema (``audiences.schema.json``,
shipped in the package for editors).
"""

from __future__ import annotations

import json
import re
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError
from yaml.events import (
    AliasEvent,
    CollectionStartEvent,
    DocumentEndEvent,
    DocumentStartEvent,
    Event,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
    StreamStartEvent,
)
from yaml.nodes import ScalarNode

from syncer.audiences import MAX_NAME_LENGTH, Schedule, audience_key
from syncer.definitions.rules import (
    AttributeCondition,
    Condition,
    Group,
    ModelSpec,
    RelatedCondition,
)
from syncer.errors import AudienceError, ConfigError
from syncer.guard import GuardOverrides
from syncer.models import KEY_LENGTH
from syncer.settings import (
    DEFAULT_SOURCE,
    MAX_EVERY_SECONDS,
    MAX_MIN_REMOVED,
    MIN_EVERY_SECONDS,
    parse_duration,
    validate_cron,
)

# Bounds on the file: it is input, read whole into memory.
MAX_FILE_BYTES = 1024 * 1024
MAX_NODES = 100_000  # YAML nodes (every scalar, list and mapping)
MAX_NESTING = 64  # lists and mappings inside each other (a rule's own bound is tighter)
MAX_AUDIENCES = 1000
MAX_MODELS = 100
MAX_DESCRIPTION_LENGTH = 10_000
MAX_ERRORS_KEPT = 20  # located errors kept on the exception; its message shows the first

MODEL_NAME_PATTERN = (
    r"^[A-Za-z_][A-Za-z0-9_]{0,62}$"  # an SQL alias: PostgreSQL keeps 63 characters
)

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

# The YAML types a value may have; anything else (!!set, !!binary, !!python/..., !custom) is
# refused with its tag named.
_YAML_TAG = "tag:yaml.org,2002:"
_SCALAR_TAGS = {
    f"{_YAML_TAG}{kind}" for kind in ("str", "int", "float", "bool", "null", "timestamp")
}
# The characters YAML allows (PyYAML's reader refuses the others, without a line).
_NOT_PRINTABLE = re.compile(
    "[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]"
)
_MAPPING_TAGS = {None, "!", f"{_YAML_TAG}map"}
_SEQUENCE_TAGS = {None, "!", f"{_YAML_TAG}seq"}

# libyaml's parser when PyYAML has it (the pure Python one takes ~10 s on a 1 MB file), with the
# same safe resolver and constructor either way.
_Loader = yaml.CSafeLoader | yaml.SafeLoader
_LOADER: type[_Loader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _fail(loc: tuple[str | int, ...], message: str) -> None:
    """A validation error at ``loc`` inside the model being validated."""
    detail: InitErrorDetails = {
        "type": PydanticCustomError("audiences_file", message),
        "loc": loc,
        "input": None,
    }
    raise ValidationError.from_exception_data("audiences_file", [detail])


# --- the file's shape -----------------------------------------------------------------------------


class GuardSpec(BaseModel):
    """An audience's own removal guard thresholds (the ``[guard]`` settings otherwise)."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        json_schema_extra={
            "anyOf": [{"required": ["max_removed_percent"]}, {"required": ["min_removed"]}]
        },
    )

    max_removed_percent: StrictInt | None = Field(
        default=None,
        ge=0,
        le=100,
        description="Hold a run that would remove more than this percent of the members.",
    )
    min_removed: StrictInt | None = Field(
        default=None,
        ge=0,
        le=MAX_MIN_REMOVED,
        description="... and at least this many users.",
    )

    @model_validator(mode="after")
    def _something(self) -> GuardSpec:
        if self.max_removed_percent is None and self.min_removed is None:
            raise PydanticCustomError(
                "guard", "give max_removed_percent and/or min_removed (or leave guard: out)"
            )
        return self

    @property
    def overrides(self) -> GuardOverrides:
        return GuardOverrides(
            max_removed_percent=self.max_removed_percent, min_removed=self.min_removed
        )


class AudienceEntry(BaseModel):
    """One audience: a name, SQL or rules, a schedule; optionally a pinned key, paused, a guard."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        json_schema_extra={
            "oneOf": [{"required": ["sql"]}, {"required": ["rules"]}],
            "not": {"required": ["every", "cron"]},
        },
    )

    name: str = Field(
        description="The display name; the key is made from it unless `key` pins one.",
        json_schema_extra={"minLength": 1, "maxLength": MAX_NAME_LENGTH},
    )
    key: str | None = Field(
        default=None,
        description="Pins the audience's key (lowercase letters, digits and _), so that the "
        "name can change without making a new audience.",
        json_schema_extra={"pattern": "^[a-z0-9]+(_[a-z0-9]+)*$", "maxLength": KEY_LENGTH},
    )
    sql: str | None = Field(
        default=None, min_length=1, description="A query returning user_id (or rules)."
    )
    rules: Condition | None = Field(
        default=None, description="Conditions over the models (or sql)."
    )
    source: str | None = Field(
        default=None,
        min_length=1,
        description=f"Where the SQL runs (default {DEFAULT_SOURCE!r}); rules run on their "
        "model's source.",
    )
    model: str | None = Field(
        default=None,
        min_length=1,
        description="The parent model the rules are over (default: the file's only one).",
    )
    every: str | None = Field(
        default=None, description="Run every this long: 90s, 15m, 3h, 1d, 1h30m (or cron)."
    )
    cron: str | None = Field(
        default=None,
        description='Run on a 5-field cron line, in [schedule] timezone: "0 */3 * * *" (or every).',
    )
    paused: StrictBool = Field(default=False, description="Declared, but not run.")
    guard: GuardSpec | None = Field(
        default=None, description="The removal guard's thresholds for this audience."
    )
    description: str | None = Field(default=None, max_length=MAX_DESCRIPTION_LENGTH)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        cleaned = " ".join(value.split())
        if not cleaned:
            raise PydanticCustomError(
                "name", "the name is empty; give a name like 'Order Completed Last 30days'"
            )
        if len(cleaned) > MAX_NAME_LENGTH:
            raise PydanticCustomError(
                "name", f"the name is longer than {MAX_NAME_LENGTH} characters"
            )
        return cleaned

    @field_validator("key")
    @classmethod
    def _key(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if len(value) > KEY_LENGTH:
            raise PydanticCustomError("key", f"a key is at most {KEY_LENGTH} characters")
        made = audience_key(value)
        if made != value:
            raise PydanticCustomError(
                "key",
                f"{_cut(value)!r} is not a key: use lowercase letters, digits and single _ "
                + (f"(like {_cut(made)!r})" if made else "(like 'vip_users')"),
            )
        return value

    @field_validator("sql")
    @classmethod
    def _sql(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise PydanticCustomError("sql", "the SQL is empty")
        return value

    @field_validator("every")
    @classmethod
    def _every(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_duration(
                    value, what="every", at_least=MIN_EVERY_SECONDS, at_most=MAX_EVERY_SECONDS
                )
            except ConfigError as exc:
                raise PydanticCustomError("every", str(exc).removeprefix("every: ")) from None
        return value

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                return validate_cron(value, what="cron")
            except ConfigError as exc:
                raise PydanticCustomError("cron", str(exc).removeprefix("cron: ")) from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> AudienceEntry:
        if self.sql is None and self.rules is None:
            _fail((), "give sql (a query returning user_id) or rules (conditions over models)")
        if self.sql is not None and self.rules is not None:
            _fail(("rules",), "give sql or rules, not both")
        if self.rules is not None and self.source is not None:
            _fail(
                ("source",),
                "rules run on their model's source: give source: on the model, not here",
            )
        if self.sql is not None and self.model is not None:
            _fail(("model",), "model: is for rules; SQL runs on source: (default 'default')")
        if self.every is not None and self.cron is not None:
            _fail(("cron",), "give every or cron, not both")
        if self.key is None:
            made = audience_key(self.name)
            if not made:
                _fail(
                    ("name",),
                    f"the name {_cut(self.name)!r} has no letters or digits to make a key from; "
                    "pin one with key:",
                )
            if len(made) > KEY_LENGTH:
                _fail(
                    ("name",),
                    f"the key made from this name would be {len(made)} characters, over "
                    f"{KEY_LENGTH}; choose a shorter name or pin a key with key:",
                )
        return self

    @property
    def schedule(self) -> Schedule:
        """The schedule as ``syncer.audiences`` stores it (neither given: the default)."""
        if self.every is not None:
            return Schedule(
                every_seconds=parse_duration(
                    self.every, what="every", at_least=MIN_EVERY_SECONDS, at_most=MAX_EVERY_SECONDS
                )
            )
        if self.cron is not None:
            return Schedule(cron=self.cron)
        return Schedule()

    @property
    def guard_overrides(self) -> GuardOverrides:
        return self.guard.overrides if self.guard is not None else GuardOverrides()


ModelName = Annotated[str, Field(pattern=MODEL_NAME_PATTERN)]


class AudiencesFile(BaseModel):
    """The whole file: models, then audiences. Checked here as far as no database is needed:
    keys unique, rules naming declared models of the right kind, ``within`` on a model with a
    timestamp."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="audiences.yml")

    models: dict[ModelName, ModelSpec] = Field(
        default_factory=dict,
        description="Tables or queries on a source: a parent model (primary_key, one row per "
        "user) and related models (foreign_key -> the parent's primary_key).",
        json_schema_extra={"maxProperties": MAX_MODELS, "additionalProperties": False},
    )
    audiences: list[AudienceEntry] = Field(default_factory=list, max_length=MAX_AUDIENCES)

    @field_validator("models", "audiences", mode="before")
    @classmethod
    def _written_empty(cls, value: Any, info: ValidationInfo) -> Any:
        """``audiences:`` with nothing under it (all of them removed) declares none."""
        if value is None:
            return {} if info.field_name == "models" else []
        return value

    @field_validator("models")
    @classmethod
    def _few_models(cls, value: dict[str, ModelSpec]) -> dict[str, ModelSpec]:
        if len(value) > MAX_MODELS:
            raise PydanticCustomError("models", f"more than {MAX_MODELS} models")
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> AudiencesFile:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        seen: dict[str, int] = {}
        for index, entry in enumerate(self.audiences):
            where: tuple[str | int, ...] = ("audiences", index)
            key = entry_key(entry)
            if key in seen:
                problems.append(
                    (
                        (*where, "key" if entry.key is not None else "name"),
                        f"the key {key!r} is also audiences[{seen[key]}]'s; each audience "
                        "needs its own (rename it, or pin another with key:)",
                    )
                )
            else:
                seen[key] = index
            if entry.rules is not None:
                problems.extend(self._rules_problems(entry, where))
        if problems:
            details: list[InitErrorDetails] = [
                {"type": PydanticCustomError("audiences_file", message), "loc": loc, "input": None}
                for loc, message in problems
            ]
            raise ValidationError.from_exception_data("audiences_file", details)
        return self

    def _rules_problems(
        self, entry: AudienceEntry, where: tuple[str | int, ...]
    ) -> Iterator[tuple[tuple[str | int, ...], str]]:
        parents = [name for name, spec in self.models.items() if spec.is_parent]
        if entry.model is not None:
            spec = self.models.get(entry.model)
            if spec is None:
                yield (*where, "model"), f"no model {entry.model!r} {self._known()}"
                return
            if not spec.is_parent:
                yield (
                    (*where, "model"),
                    f"model {entry.model!r} is not a parent model: rules are over a model with "
                    "primary_key (one row per user) and no foreign_key",
                )
                return
            parent = entry.model
        elif len(parents) == 1:
            parent = parents[0]
        elif not parents:
            yield (
                (*where, "rules"),
                "rules are over a parent model: declare one under models: with primary_key "
                "(one row per user)",
            )
            return
        else:
            yield (
                where,
                f"the file has several parent models ({', '.join(parents)}): say which one the "
                "rules are over with model:",
            )
            return
        assert entry.rules is not None
        yield from self._condition_problems(entry.rules, parent, (*where, "rules"))

    def _condition_problems(
        self,
        node: AttributeCondition | RelatedCondition | Group,
        parent: str,
        path: tuple[str | int, ...],
    ) -> Iterator[tuple[tuple[str | int, ...], str]]:
        stack: list[tuple[AttributeCondition | RelatedCondition | Group, tuple[str | int, ...]]]
        stack = [(node, path)]
        while stack:
            node, path = stack.pop()
            if isinstance(node, Group):
                if node.not_ is not None:
                    stack.append((node.not_, (*path, "not")))
                kind = node.kind
                children = (node.all_ if kind == "all" else node.any_) or []
                stack.extend(
                    (child, (*path, kind, index))
                    for index, child in reversed(list(enumerate(children)))
                )
            elif isinstance(node, RelatedCondition):
                yield from self._related_problems(node, parent, path)

    def _related_problems(
        self, node: RelatedCondition, parent: str, path: tuple[str | int, ...]
    ) -> Iterator[tuple[tuple[str | int, ...], str]]:
        spec = self.models.get(node.related)
        if spec is None:
            yield (*path, "related"), f"no model {node.related!r} {self._known()}"
            return
        if not spec.is_related:
            yield (
                (*path, "related"),
                f"model {node.related!r} is not related: give a model with foreign_key "
                "(its column that holds the parent's primary_key)",
            )
            return
        if spec.source != self.models[parent].source:
            yield (
                (*path, "related"),
                f"model {node.related!r} is on source {spec.source!r} and model {parent!r} on "
                f"{self.models[parent].source!r}: an audience's models are on one source",
            )
        if node.within is not None and spec.timestamp is None:
            yield (
                (*path, "within"),
                f"'within' needs a timestamp on model {node.related!r} "
                "(timestamp: its column of when the row happened)",
            )

    def _known(self) -> str:
        if not self.models:
            return "(the file declares no models: declare them under models:)"
        return f"(models: {', '.join(sorted(self.models))})"

    def parent_of(self, entry: AudienceEntry) -> str | None:
        """The parent model a rules entry is over (None for a SQL entry)."""
        if entry.rules is None:
            return None
        if entry.model is not None:
            return entry.model
        return next(name for name, spec in self.models.items() if spec.is_parent)

    def source_of(self, entry: AudienceEntry) -> str:
        """Where the entry's query runs: its model's source for rules, else ``source``."""
        parent = self.parent_of(entry)
        if parent is not None:
            return self.models[parent].source
        return entry.source or DEFAULT_SOURCE


def entry_key(entry: AudienceEntry) -> str:
    """The audience's key: pinned, or made from its name."""
    return entry.key if entry.key is not None else audience_key(entry.name)


def json_schema() -> dict[str, Any]:
    """The file's JSON Schema (``audiences.schema.json``), for editors."""
    schema = AudiencesFile.model_json_schema(by_alias=True, mode="validation")
    return {"$schema": SCHEMA_DIALECT, **schema}


# --- reading the file -----------------------------------------------------------------------------


class AudiencesFileError(AudienceError):
    """A mistake in the file: the message is the first located error (and how many more);
    ``errors`` holds the first ``MAX_ERRORS_KEPT`` of them, each a located line."""

    def __init__(self, errors: Sequence[str], total: int) -> None:
        more = total - 1
        super().__init__(errors[0] + (f" (and {more} more)" if more else ""))
        self.errors = tuple(errors)
        self.total = total


@dataclass(frozen=True)
class LoadedFile:
    """A valid file: its models and audiences, and where each of its values was written."""

    path: Path
    shown: str  # the path as the user gave it, for messages
    spec: AudiencesFile
    lines: Mapping[tuple[str | int, ...], int] = field(repr=False, compare=False)
    data: Any = field(repr=False, compare=False)  # the values as read, before validation

    def locate(self, loc: Sequence[str | int]) -> str:
        """``audiences.yml:14: audiences[0].rules.all[1].attribute``: the line of the nearest
        value the path reaches (a key not written: its mapping)."""
        return _locate(self.shown, self.lines, self.data, tuple(loc))

    def error(self, loc: Sequence[str | int], message: str) -> AudienceError:
        """An error at ``loc``: ``audiences.yml:14: audiences[0].rules.all[1].attribute: ...``."""
        return AudienceError(f"{self.locate(loc)}: {message}")


def load_file(path: str | Path) -> LoadedFile:
    """Read and validate ``audiences.yml``; any mistake is an AudiencesFileError (an
    AudienceError: exit 2) naming the file, the line and the YAML path."""
    shown = str(path)
    file = Path(path)
    text = _read_text(file, shown)
    data, lines = _read_yaml(text, shown)
    if data is None:  # empty, or only comments: nothing declared
        data = {}
    try:
        spec = AudiencesFile.model_validate(data)
    except ValidationError as exc:
        located = sorted(
            (_line(lines, _clean(err["loc"], data)), _describe(err, data, shown, lines))
            for err in exc.errors(include_url=False, include_context=False, include_input=False)
        )
        kept = [message for _, message in located[:MAX_ERRORS_KEPT]]
        raise AudiencesFileError(kept, len(located)) from None
    return LoadedFile(path=file, shown=shown, spec=spec, lines=lines, data=data)


def _read_text(file: Path, shown: str) -> str:
    try:
        info = file.stat()
    except FileNotFoundError:
        raise AudiencesFileError([f"{shown}: no such file"], 1) from None
    except OSError as exc:
        raise AudiencesFileError([f"{shown}: cannot read it: {exc.strerror}"], 1) from None
    if not stat.S_ISREG(info.st_mode):  # a folder, or a FIFO that would block
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise AudiencesFileError([f"{shown}: {kind}, not an audiences file"], 1)
    try:
        with file.open("rb") as handle:
            raw = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise AudiencesFileError([f"{shown}: cannot read it: {exc.strerror}"], 1) from None
    if len(raw) > MAX_FILE_BYTES:
        raise AudiencesFileError(
            [f"{shown}: larger than {MAX_FILE_BYTES // (1024 * 1024)} MB; split it"], 1
        )
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise AudiencesFileError(
            [f"{shown}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save it as UTF-8"],
            1,
        ) from None
    control = _NOT_PRINTABLE.search(text)
    if control is not None:
        line = text.count("\n", 0, control.start()) + 1
        raise AudiencesFileError(
            [f"{shown}:{line}: a control character YAML does not allow (U+{ord(control[0]):04X})"],
            1,
        )
    return text


class _Refused(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


@dataclass
class _Open:
    """A mapping or list being read."""

    value: dict[str, Any] | list[Any]
    path: tuple[str | int, ...]
    key: str | None = None  # a mapping's key whose value comes next
    key_lines: dict[str, int] = field(default_factory=dict)


def _read_yaml(text: str, shown: str) -> tuple[Any, dict[tuple[str | int, ...], int]]:
    """The file's values (plain dicts, lists and scalars as YAML's safe loader types them) and
    the line of each, by path. Built from the parser's events, so nesting and size are bounded
    as they are read, and an alias is refused where it is written (no node is ever shared)."""
    loader: _Loader | None = None
    try:
        loader = _LOADER(text)  # checks the characters first
        return _build(loader)
    except _Refused as exc:
        raise AudiencesFileError([f"{shown}:{exc.line}: {exc.message}"], 1) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = exc.problem or exc.context or "not valid YAML"
        context = (
            f" ({exc.context} at line {exc.context_mark.line + 1})"
            if exc.context and exc.problem and exc.context_mark is not None
            else ""
        )
        raise AudiencesFileError(
            [f"{shown}:{line}: not valid YAML: {problem}{context}"], 1
        ) from None
    except yaml.YAMLError as exc:
        raise AudiencesFileError([f"{shown}: not valid YAML: {exc}"], 1) from None
    finally:
        if loader is not None:
            loader.dispose()


def _build(loader: _Loader) -> tuple[Any, dict[tuple[str | int, ...], int]]:
    lines: dict[tuple[str | int, ...], int] = {}
    stack: list[_Open] = []
    root: Any = None
    nodes = 0
    documents = 0
    while loader.check_event():
        event: Event | None = loader.get_event()
        if event is None:
            break
        line = event.start_mark.line + 1 if event.start_mark is not None else 1
        if isinstance(event, StreamStartEvent | StreamEndEvent | DocumentEndEvent):
            continue
        if isinstance(event, DocumentStartEvent):
            documents += 1
            if documents > 1:
                raise _Refused(line, "a second YAML document (---): keep one document per file")
            continue
        if isinstance(event, AliasEvent):
            raise _Refused(
                line, f"aliases (*{event.anchor}) are not supported: write the value out"
            )
        if isinstance(event, MappingEndEvent | SequenceEndEvent):
            done = stack.pop()
            _place(stack, done.value)
            if not stack:
                root = done.value
            continue
        nodes += 1
        if nodes > MAX_NODES:
            raise _Refused(line, f"more than {MAX_NODES} values in one file")
        parent = stack[-1] if stack else None
        if isinstance(parent, _Open) and isinstance(parent.value, dict) and parent.key is None:
            parent.key = _key(event, parent, line)
            lines[(*parent.path, parent.key)] = line
            continue
        path: tuple[str | int, ...] = ()
        if parent is not None:
            path = (
                (*parent.path, len(parent.value))
                if isinstance(parent.value, list)
                else (*parent.path, str(parent.key))
            )
            if isinstance(parent.value, list):
                lines[path] = line
        else:
            lines[()] = line
        if isinstance(event, ScalarEvent):
            value = _scalar(loader, event, line)
            _place(stack, value)
            if not stack:
                root = value
        elif isinstance(event, CollectionStartEvent):
            if len(stack) >= MAX_NESTING:
                raise _Refused(line, f"lists and mappings nested more than {MAX_NESTING} deep")
            if isinstance(event, MappingStartEvent):
                _check_tag(event.tag, _MAPPING_TAGS, line)
                stack.append(_Open(value={}, path=path))
            else:
                assert isinstance(event, SequenceStartEvent)
                _check_tag(event.tag, _SEQUENCE_TAGS, line)
                stack.append(_Open(value=[], path=path))
    lines.setdefault((), 1)
    return root, lines


def _key(event: Event, parent: _Open, line: int) -> str:
    """A mapping's key, as written: keys are names, so ``on``, ``1`` and ``null`` are text
    here, as a YAML 1.2 editor reads them."""
    if not isinstance(event, ScalarEvent):
        raise _Refused(line, "a key is a name (text), not a list or a mapping")
    key = event.value
    if key in parent.key_lines:
        raise _Refused(
            line, f"the key {_cut(key)!r} is written twice (first at line {parent.key_lines[key]})"
        )
    parent.key_lines[key] = line
    return key


def _place(stack: list[_Open], value: Any) -> None:
    if not stack:
        return
    parent = stack[-1]
    if isinstance(parent.value, list):
        parent.value.append(value)
    else:
        assert parent.key is not None
        parent.value[parent.key] = value
        parent.key = None


def _check_tag(tag: str | None, allowed: set[str | None], line: int) -> None:
    if tag not in allowed:
        raise _Refused(line, _tag_message(str(tag)))


def _tag_message(tag: str) -> str:
    shown = "!!" + tag.removeprefix(_YAML_TAG) if tag.startswith(_YAML_TAG) else tag
    return f"the YAML tag {_cut(shown)} is not supported; remove it"


def _scalar(loader: _Loader, event: ScalarEvent, line: int) -> Any:
    tag = event.tag
    if tag is None or tag == "!":
        tag = loader.resolve(ScalarNode, event.value, event.implicit)  # type: ignore[no-untyped-call]
    if tag not in _SCALAR_TAGS:
        raise _Refused(line, _tag_message(str(tag)))
    node = ScalarNode(tag, event.value, style=event.style)
    try:
        return loader.construct_object(node)
    except (ValueError, OverflowError, yaml.YAMLError):
        kind = tag.rsplit(":", 1)[-1]
        what = {"int": "number", "float": "number", "timestamp": "date"}.get(kind, kind)
        raise _Refused(
            line, f"{_cut(event.value)!r} reads as a {what} but is not one; quote it if it is text"
        ) from None


# --- errors, located --------------------------------------------------------------------------------

_ALIASES = {"in_": "in", "all_": "all", "any_": "any", "not_": "not"}
_FIELD_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _clean(loc: Sequence[str | int], data: Any) -> tuple[str | int, ...]:
    """Pydantic's location as a path into the file: field names as written (``in``, not
    ``in_``), and the segments pydantic adds for unions, validators and dict keys dropped."""
    cleaned: list[str | int] = []
    node = data
    reached = True  # the path so far is in the data
    for raw in loc:
        segment = _ALIASES.get(raw, raw) if isinstance(raw, str) else raw
        child = _child(node, segment) if reached else _ABSENT
        if child is not _ABSENT:
            node = child
        elif isinstance(segment, int) or _FIELD_NAME.fullmatch(segment):
            reached = False  # a key not written (missing), or past what was read
        else:
            continue  # function-wrap[...], a union member's name, [key]
        cleaned.append(segment)
    return tuple(cleaned)


_ABSENT = object()


def _child(node: Any, segment: str | int) -> Any:
    if isinstance(node, dict) and isinstance(segment, str) and segment in node:
        return node[segment]
    if isinstance(node, list) and isinstance(segment, int) and 0 <= segment < len(node):
        return node[segment]
    return _ABSENT


def _line(lines: Mapping[tuple[str | int, ...], int], loc: tuple[str | int, ...]) -> int:
    for end in range(len(loc), -1, -1):
        line = lines.get(loc[:end])
        if line is not None:
            return line
    return 1


def _shown_loc(loc: Sequence[str | int]) -> str:
    """``audiences[0].rules.all[1].attribute``."""
    text = ""
    for segment in loc:
        if isinstance(segment, int):
            text += f"[{segment}]"
        elif _PLAIN_NAME.fullmatch(segment):
            text += f".{segment}" if text else segment
        else:
            text += f"[{json.dumps(segment, ensure_ascii=False)}]"
    return text


def _locate(
    shown: str, lines: Mapping[tuple[str | int, ...], int], data: Any, loc: tuple[str | int, ...]
) -> str:
    cleaned = _clean(loc, data)
    where = _shown_loc(cleaned)
    return f"{shown}:{_line(lines, cleaned)}" + (f": {where}" if where else "")


# The keys each part of the file takes, for "unknown key" messages.
_KNOWN_KEYS: dict[str, tuple[str, ...]] = {
    "file": tuple(AudiencesFile.model_fields),
    "model": tuple(ModelSpec.model_fields),
    "audience": tuple(AudienceEntry.model_fields),
    "guard": tuple(GuardSpec.model_fields),
}

_TYPE_MESSAGES = {
    "string_type": "expected text",
    "int_type": "expected a whole number",
    "int_parsing": "expected a whole number",
    "int_from_float": "expected a whole number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "dict_type": "expected a mapping (key: value lines)",
    "model_type": "expected a mapping (key: value lines)",
    "model_attributes_type": "expected a mapping (key: value lines)",
    "list_type": "expected a list (lines starting with '- ')",
}


def _describe(err: ErrorDetails, data: Any, shown: str, lines: Mapping[Any, int]) -> str:
    loc = _clean(err["loc"], data)
    kind = err["type"]
    message = err["msg"]
    part = _part(loc[:-1])
    if kind == "extra_forbidden" and loc and part is not None:
        message = f"unknown key {_cut(str(loc[-1]))!r} (known: {', '.join(_KNOWN_KEYS[part])})"
    elif kind == "extra_forbidden" and loc:
        message = f"unknown key {_cut(str(loc[-1]))!r}"
    elif kind == "missing":
        message = "required, and not given"
    elif kind == "string_pattern_mismatch" and len(loc) == 2 and loc[0] == "models":
        message = (
            "a model's name is letters, digits and _, not starting with a digit, "
            "at most 63 characters"
        )
    elif kind in _TYPE_MESSAGES:
        message = _TYPE_MESSAGES[kind]
        if kind == "string_type" and loc and isinstance(_value_at(data, loc), int | float):
            message += " (write it in quotes)"
    elif not kind.startswith(("audiences_file", "rule")) and message[:1].isupper():
        message = message[0].lower() + message[1:]
    if not loc and not isinstance(data, dict):
        message = "the file is a mapping with models: and audiences: at the top level"
    return f"{_locate(shown, lines, data, loc)}: {message}"


def _part(loc: tuple[str | int, ...]) -> str | None:
    """Which part of the file a path leads to (for its known keys), if a fixed one."""
    if loc == ():
        return "file"
    if len(loc) == 2 and loc[0] == "models":
        return "model"
    if len(loc) == 2 and loc[0] == "audiences":
        return "audience"
    if len(loc) == 3 and loc[0] == "audiences" and loc[2] == "guard":
        return "guard"
    return None


def _value_at(data: Any, loc: tuple[str | int, ...]) -> Any:
    node = data
    for segment in loc:
        try:
            node = node[segment]
        except (KeyError, IndexError, TypeError):
            return None
    return node


def _cut(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def main() -> None:
    print(json.dumps(json_schema(), indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
