"""audiences.yml: read into typed objects, every mistake one line naming the file, line and path;
hostile files refused with a reason; the JSON Schema shipped for editors is current."""

from __future__ import annotations

import json
import math
import os
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from syncer.audiences import Schedule
from syncer.definitions import files
from syncer.definitions.files import (
    AudiencesFileError,
    LoadedFile,
    entry_key,
    json_schema,
    load_file,
)
from syncer.definitions.rules import AttributeCondition, Group, RelatedCondition
from syncer.errors import AudienceError
from syncer.guard import GuardOverrides
from tests.helpers import REPO_ROOT

# DESIGN.md's example ("Audiences as code, and rules instead of SQL"), as written there.
DESIGN_EXAMPLE = """\
models:
  users:                      # the parent model: one row per user
    source: default
    table: users              # or sql: SELECT ...
    primary_key: user_id
  orders:                     # a related model
    source: default
    table: orders
    foreign_key: user_id      # -> users.primary_key
    timestamp: completed_at   # enables `within`
audiences:
  - name: Order Completed Last 30days
    every: 3h                 # or cron: "0 */3 * * *"; paused: true; guard: {max_removed_percent: 20}
    rules:
      all:                    # all / any / not, nested freely
        - related: orders
          within: 30d
          at_least: 1         # at_least / at_most / exactly; optional `where:` rules on the related model
        - attribute: plan     # a column of the parent model
          in: [pro, enterprise]   # eq, ne, lt, le, gt, ge, in, not_in, contains, is_null, is_not_null
  - name: VIP
    sql: SELECT user_id FROM users WHERE lifetime_value > 1000
"""

MODELS = """\
models:
  users:
    table: users
    primary_key: user_id
  orders:
    table: orders
    foreign_key: user_id
    timestamp: completed_at
"""


def write(tmp_path: Path, text: str | bytes, name: str = "audiences.yml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, text: str) -> LoadedFile:
    return load_file(write(tmp_path, textwrap.dedent(text)))


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files named as a user would: ``audiences.yml``, relative to the working folder."""
    monkeypatch.chdir(tmp_path)


def refusal(tmp_path: Path, text: str | bytes) -> AudiencesFileError:
    write(tmp_path, textwrap.dedent(text) if isinstance(text, str) else text)
    with pytest.raises(AudiencesFileError) as caught:
        load_file("audiences.yml")
    return caught.value


# --- a good file ---------------------------------------------------------------------------------


def test_designs_example_parses(tmp_path: Path) -> None:
    loaded = load(tmp_path, DESIGN_EXAMPLE)
    spec = loaded.spec
    assert list(spec.models) == ["users", "orders"]
    assert spec.models["users"].is_parent and spec.models["orders"].is_related
    assert spec.models["orders"].timestamp == "completed_at"
    order, vip = spec.audiences
    assert isinstance(order.rules, Group) and order.rules.kind == "all"
    related, plan = order.rules.all_ or []
    assert isinstance(related, RelatedCondition)
    assert (related.related, related.within_seconds, related.count) == ("orders", 30 * 86400, 1)
    assert isinstance(plan, AttributeCondition)
    assert (plan.attribute, plan.operator, plan.value) == ("plan", "in", ["pro", "enterprise"])
    assert order.schedule == Schedule(every_seconds=3 * 3600)
    assert (entry_key(order), entry_key(vip)) == ("order_completed_last_30days", "vip")
    assert (spec.parent_of(order), spec.source_of(order)) == ("users", "default")
    assert (spec.parent_of(vip), spec.source_of(vip)) == (None, "default")
    assert vip.sql == "SELECT user_id FROM users WHERE lifetime_value > 1000"
    assert not order.paused and order.guard is None
    assert order.guard_overrides == GuardOverrides()
    assert loaded.shown == str(tmp_path / "audiences.yml")


def test_every_kind_of_entry(tmp_path: Path) -> None:
    text = MODELS + textwrap.dedent(
        """\
          admins:
            sql: SELECT id, role FROM accounts
            primary_key: id
        audiences:
          - name: "  Pro   users  "
            key: pro
            model: users
            cron: "0 */3 * * *"
            paused: true
            guard: {max_removed_percent: 20}
            description: the paying ones
            rules: {attribute: plan, eq: pro}
          - name: Admins
            model: admins
            rules:
              not: {attribute: role, is_null: true}
          - name: Big spenders
            source: warehouse
            every: 1h30m
            guard: {min_removed: 0}
            sql: SELECT user_id FROM spend WHERE total > 1000
        """
    )
    loaded = load_file(write(tmp_path, text))
    pro, admins, spenders = loaded.spec.audiences
    assert pro.name == "Pro users"  # whitespace collapsed, as the CLI does
    assert (entry_key(pro), pro.paused, pro.description) == ("pro", True, "the paying ones")
    assert pro.schedule == Schedule(cron="0 */3 * * *")
    assert pro.guard_overrides == GuardOverrides(max_removed_percent=20)
    assert loaded.spec.parent_of(admins) == "admins"
    assert isinstance(admins.rules, Group) and isinstance(admins.rules.not_, AttributeCondition)
    assert loaded.spec.source_of(spenders) == "warehouse"
    assert spenders.schedule == Schedule(every_seconds=5400)
    assert spenders.guard_overrides == GuardOverrides(min_removed=0)
    assert Schedule() == loaded.spec.audiences[1].schedule  # neither: the default


@pytest.mark.parametrize(
    "text",
    ["", "# only a comment\n", "---\n", "models:\naudiences:\n", "models: {}\naudiences: []\n"],
)
def test_an_empty_file_declares_nothing(tmp_path: Path, text: str) -> None:
    spec = load(tmp_path, text).spec
    assert (spec.models, spec.audiences) == ({}, [])


def test_yaml_12_readings_of_keys_and_a_bom(tmp_path: Path) -> None:
    """Keys are names as written (``on``, ``null`` are not true and None), and a byte order
    mark is not part of the first key."""
    path = write(tmp_path, b"\xef\xbb\xbfmodels:\n  on: {table: t, primary_key: id}\n")
    assert list(load_file(path).spec.models) == ["on"]


# --- locating a path ---------------------------------------------------------------------------


def test_locate_points_at_the_key_of_a_path(tmp_path: Path) -> None:
    loaded = load(tmp_path, DESIGN_EXAMPLE)
    shown = loaded.shown
    assert loaded.locate(("audiences", 0, "rules", "all", 1, "attribute")) == (
        f"{shown}:19: audiences[0].rules.all[1].attribute"
    )
    assert loaded.locate(("audiences", 0, "rules", "all", 1, "in_", 1)) == (
        f"{shown}:20: audiences[0].rules.all[1].in[1]"
    )
    assert loaded.locate(("audiences", 0, "rules")) == f"{shown}:14: audiences[0].rules"
    assert loaded.locate(("audiences", 1)) == f"{shown}:21: audiences[1]"
    assert (
        loaded.locate(("models", "orders", "timestamp")) == f"{shown}:10: models.orders.timestamp"
    )
    assert loaded.locate(()) == f"{shown}:1"
    # a key not written: its mapping's line; what pydantic adds for unions and validators: dropped
    assert loaded.locate(("models", "users", "sql")) == f"{shown}:2: models.users.sql"
    assert loaded.locate(
        ("audiences", 0, "rules", "function-wrap[_condition_validator()]", "Group", "all", 0)
    ) == (f"{shown}:16: audiences[0].rules.all[0]")
    error = loaded.error(("audiences", 0, "rules", "all", 1, "attribute"), "no column 'plann'")
    assert isinstance(error, AudienceError)
    assert str(error) == f"{shown}:19: audiences[0].rules.all[1].attribute: no column 'plann'"


# --- mistakes, each on its line ------------------------------------------------------------------

BAD_FILES: list[tuple[str, str]] = [
    # the shape of the file
    ("- a\n- b\n", "1: the file is a mapping with models: and audiences: at the top level"),
    ("just text\n", "1: the file is a mapping with models: and audiences: at the top level"),
    ("models: {}\ntraits: []\n", "2: traits: unknown key 'traits' (known: models, audiences)"),
    ("audiences: {name: A}\n", "1: audiences: expected a list (lines starting with '- ')"),
    ("models: [users]\n", "1: models: expected a mapping (key: value lines)"),
    (
        "models:\n  my-model: {table: t, primary_key: id}\n",
        '2: models["my-model"]: a model\'s name is letters, digits and _, not starting with a '
        "digit, at most 63 characters",
    ),
    (
        "models:\n  users:\n    table: users\n    primary_keys: id\n",
        "4: models.users.primary_keys: unknown key 'primary_keys' (known: source, table, sql, "
        "primary_key, foreign_key, timestamp)",
    ),
    (
        "models:\n  users:\n    table: users\n",
        "2: models.users: give primary_key (the parent model: one row per user) or foreign_key "
        "(a related model: its column that holds the parent's primary_key)",
    ),
    # an entry's fields
    (
        "audiences:\n  - sql: SELECT 1\n",
        "2: audiences[0].name: required, and not given",
    ),
    (
        "audiences:\n  - name: 2024\n    sql: s\n",
        "2: audiences[0].name: expected text (write it in quotes)",
    ),
    (
        "audiences:\n  - name: '   '\n    sql: s\n",
        "2: audiences[0].name: the name is empty; give a name like 'Order Completed Last 30days'",
    ),
    (
        "audiences:\n  - name: '#!?'\n    sql: s\n",
        "2: audiences[0].name: the name '#!?' has no letters or digits to make a key from; "
        "pin one with key:",
    ),
    (
        "audiences:\n  - name: A\n    key: Big Spenders\n    sql: s\n",
        "3: audiences[0].key: 'Big Spenders' is not a key: use lowercase letters, digits and "
        "single _ (like 'big_spenders')",
    ),
    (
        "audiences:\n  - name: A\n",
        "2: audiences[0]: give sql (a query returning user_id) or rules (conditions over models)",
    ),
    (
        "audiences:\n  - name: A\n    sql: s\n    rules: {attribute: a, eq: 1}\n",
        "4: audiences[0].rules: give sql or rules, not both",
    ),
    ("audiences:\n  - name: A\n    sql: '  '\n", "3: audiences[0].sql: the SQL is empty"),
    (
        "audiences:\n  - name: A\n    sql: s\n    every: 1h\n    cron: '0 * * * *'\n",
        "5: audiences[0].cron: give every or cron, not both",
    ),
    (
        "audiences:\n  - name: A\n    sql: s\n    every: 3x\n",
        "4: audiences[0].every: '3x' is not a duration; use a positive number with s, m, h or d, "
        "like 90s, 15m, 3h or 1d (combined: each unit once, largest first, like 1h30m)",
    ),
    (
        "audiences:\n  - name: A\n    sql: s\n    every: 400d\n",
        "4: audiences[0].every: '400d' is out of range; use 1s to 366d",
    ),
    (
        "audiences:\n  - name: A\n    sql: s\n    cron: '0 0 31 2 *'\n",
        "4: audiences[0].cron: '0 0 31 2 *' does not fire within 5 years; use 5 fields like "
        '"0 */3 * * *"',
    ),
    (
        "audiences:\n  - name: A\n    sql: s\n    paused: 'yes please'\n",
        "4: audiences[0].paused: expected true or false",
    ),
    (
        "audiences:\n  - name: A\n    sql: s\n    guard: {}\n",
        "4: audiences[0].guard: give max_removed_percent and/or min_removed (or leave guard: out)",
    ),
    (
        "audiences:\n  - name: A\n    sql: s\n    guard:\n      max_removed_percent: 120\n",
        "5: audiences[0].guard.max_removed_percent: input should be less than or equal to 100",
    ),
    (
        "audiences:\n  - name: A\n    sql: s\n    guard: {min_removed: '5'}\n",
        "4: audiences[0].guard.min_removed: expected a whole number",
    ),
    (
        "audiences:\n  - name: A\n    sql: s\n    guard: {max_removed: 5}\n",
        "4: audiences[0].guard.max_removed: unknown key 'max_removed' (known: "
        "max_removed_percent, min_removed)",
    ),
    (
        "audiences:\n  - name: A\n    sql: s\n    schedule: 3h\n",
        "4: audiences[0].schedule: unknown key 'schedule' (known: name, key, sql, rules, source, "
        "model, every, cron, paused, guard, description)",
    ),
    (
        "audiences:\n  - name: A\n    sql: s\n    model: users\n",
        "4: audiences[0].model: model: is for rules; SQL runs on source: (default 'default')",
    ),
    # rules, as rules.py parses them, located in the file
    (
        MODELS + "audiences:\n  - name: A\n    rules:\n      all:\n        - attribute: plan\n"
        "          eq: pro\n        - attribute: plan\n          inn: [pro]\n",
        "16: audiences[0].rules.all[1].inn: unknown operator 'inn'; operators: eq, ne, lt, le, gt, "
        "ge, in, not_in, contains, is_null, is_not_null",
    ),
    (
        "audiences:\n  - name: A\n    rules:\n      any:\n        - attribute: signed_up\n"
        "          ge: 2024-01-31\n",
        "6: audiences[0].rules.any[0].ge: a value is text, a number or true/false (quote dates: "
        "'2024-01-31')",
    ),
    (
        MODELS + "audiences:\n  - name: A\n    rules:\n      not:\n        related: orders\n"
        "        at_least: -1\n",
        "14: audiences[0].rules.not.at_least: input should be greater than or equal to 0",
    ),
    # cross-checks: keys, models
    (
        "audiences:\n  - name: VIP\n    sql: a\n  - name: vip\n    sql: b\n",
        "4: audiences[1].name: the key 'vip' is also audiences[0]'s; each audience needs its own "
        "(rename it, or pin another with key:)",
    ),
    (
        "audiences:\n  - name: VIP\n    sql: a\n  - name: Other\n    key: vip\n    sql: b\n",
        "5: audiences[1].key: the key 'vip' is also audiences[0]'s; each audience needs its own "
        "(rename it, or pin another with key:)",
    ),
    (
        MODELS
        + "audiences:\n  - name: A\n    source: warehouse\n    rules: {attribute: plan, eq: pro}\n",
        "11: audiences[0].source: rules run on their model's source: give source: on the model, "
        "not here",
    ),
    (
        MODELS + "audiences:\n  - name: A\n    rules:\n      all:\n        - related: returns\n"
        "          at_least: 1\n",
        "13: audiences[0].rules.all[0].related: no model 'returns' (models: orders, users)",
    ),
    (
        MODELS + "audiences:\n  - name: A\n    rules: {related: users, at_least: 1}\n",
        "11: audiences[0].rules.related: model 'users' is not related: give a model with "
        "foreign_key (its column that holds the parent's primary_key)",
    ),
    (
        "models:\n  users: {table: u, primary_key: id}\n  visits: {table: v, foreign_key: uid}\n"
        "audiences:\n  - name: A\n    rules:\n      related: visits\n      within: 7d\n"
        "      at_least: 1\n",
        "8: audiences[0].rules.within: 'within' needs a timestamp on model 'visits' (timestamp: "
        "its column of when the row happened)",
    ),
    (
        "models:\n  users: {table: u, primary_key: id}\n"
        "  visits: {table: v, foreign_key: uid, source: other}\n"
        "audiences:\n  - name: A\n    rules: {related: visits, at_least: 1}\n",
        "6: audiences[0].rules.related: model 'visits' is on source 'other' and model 'users' on "
        "'default': an audience's models are on one source",
    ),
    (
        MODELS
        + "audiences:\n  - name: A\n    model: orders\n    rules: {attribute: plan, eq: pro}\n",
        "11: audiences[0].model: model 'orders' is not a parent model: rules are over a model "
        "with primary_key (one row per user) and no foreign_key",
    ),
    (
        MODELS
        + "audiences:\n  - name: A\n    model: user\n    rules: {attribute: plan, eq: pro}\n",
        "11: audiences[0].model: no model 'user' (models: orders, users)",
    ),
    (
        "models:\n  a: {table: a, primary_key: id}\n  b: {table: b, primary_key: id}\n"
        "audiences:\n  - name: A\n    rules: {attribute: plan, eq: pro}\n",
        "5: audiences[0]: the file has several parent models (a, b): say which one the rules are "
        "over with model:",
    ),
    (
        "audiences:\n  - name: A\n    rules: {attribute: plan, eq: pro}\n",
        "3: audiences[0].rules: rules are over a parent model: declare one under models: with "
        "primary_key (one row per user)",
    ),
    # YAML itself
    (
        "audiences:\n  - name: A\n   sql: x\n",
        "3: not valid YAML: did not find expected '-' indicator",
    ),
    ("audiences: [\n", "2: not valid YAML: did not find expected node content"),
    ("audiences:\n\t- name: x\n", "2: not valid YAML: found character that cannot start any token"),
    (
        "audiences:\n  - name: A\n    sql: s\n    name: B\n",
        "4: the key 'name' is written twice (first at line 2)",
    ),
    ("models: {}\nmodels: {}\n", "2: the key 'models' is written twice (first at line 1)"),
    (
        "audiences: []\n---\nmodels: {}\n",
        "2: a second YAML document (---): keep one document per file",
    ),
    ("? [a, b]\n: c\n", "1: a key is a name (text), not a list or a mapping"),
    (
        "models: &m {}\naudiences:\n  - name: A\n    sql: s\n    guard: *m\n",
        "5: aliases (*m) are not supported: write the value out",
    ),
    (
        "audiences: !!python/object/apply:os.system ['echo hi']\n",
        "1: the YAML tag !!python/object/apply:os.system is not supported; remove it",
    ),
    (
        "audiences:\n  - name: !!binary aGk=\n",
        "2: the YAML tag !!binary is not supported; remove it",
    ),
    ("models: !!set {a}\n", "1: the YAML tag !!set is not supported; remove it"),
    ("audiences:\n  - name: !mine A\n", "2: the YAML tag !mine is not supported; remove it"),
    (
        "audiences:\n  - name: 2024-02-30\n",
        "2: '2024-02-30' reads as a date but is not one; quote it if it is text",
    ),
    (
        "audiences:\n  - name: A\n    guard: {min_removed: " + "9" * 5000 + "}\n",
        "3: '" + "9" * 60 + "...' reads as a number but is not one; quote it if it is text",
    ),
    ("models: {}\naudiences: \x07\n", "2: a control character YAML does not allow (U+0007)"),
]


@pytest.mark.parametrize(("text", "says"), BAD_FILES)
def test_a_mistake_is_one_line_naming_file_line_and_path(
    tmp_path: Path, text: str, says: str
) -> None:
    error = refusal(tmp_path, text)
    message = str(error)
    assert "\n" not in message
    assert message.startswith(f"audiences.yml:{says}"), message
    assert message == error.errors[0] + (
        f" (and {error.total - 1} more)" if error.total > 1 else ""
    )


def test_the_first_mistake_in_the_file_and_how_many_more(tmp_path: Path) -> None:
    error = refusal(
        tmp_path,
        """\
        audiences:
          - name: A
            sql: s
            every: soon
          - name: B
            sql: s
            wat: 1
          - sql: s
        """,
    )
    assert error.errors == (
        "audiences.yml:4: audiences[0].every: 'soon' is not a duration; use a positive number "
        "with s, m, h or d, like 90s, 15m, 3h or 1d (combined: each unit once, largest first, "
        "like 1h30m)",
        "audiences.yml:7: audiences[1].wat: unknown key 'wat' (known: name, key, sql, rules, "
        "source, model, every, cron, paused, guard, description)",
        "audiences.yml:8: audiences[2].name: required, and not given",
    )
    assert error.total == 3
    assert str(error) == error.errors[0] + " (and 2 more)"


def test_the_path_as_given_is_the_path_shown(tmp_path: Path) -> None:
    write(tmp_path, "audiences: 3\n", "mine.yml")
    with pytest.raises(AudienceError, match=r"^mine\.yml:1: audiences: expected a list"):
        load_file("mine.yml")
    with pytest.raises(AudienceError, match=rf"^{re.escape(str(tmp_path))}/mine\.yml:1: "):
        load_file(tmp_path / "mine.yml")


# --- hostile files -----------------------------------------------------------------------------


def test_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(AudiencesFileError, match=r"^nope\.yml: no such file$"):
        load_file("nope.yml")
    (tmp_path / "folder.yml").mkdir()
    with pytest.raises(AudiencesFileError, match=r"^folder\.yml: a folder, not an audiences file$"):
        load_file("folder.yml")
    os.mkfifo(tmp_path / "fifo.yml")  # opening it would block until a writer came
    with pytest.raises(
        AudiencesFileError, match=r"^fifo\.yml: not a regular file, not an audiences file$"
    ):
        load_file("fifo.yml")


def test_an_unreadable_path(tmp_path: Path) -> None:
    write(tmp_path, "models: {}\n", "settings.toml")
    with pytest.raises(
        AudiencesFileError,
        match=r"^settings\.toml/audiences\.yml: cannot read it: Not a directory$",
    ):
        load_file("settings.toml/audiences.yml")


def test_mistakes_are_bad_input() -> None:
    assert issubclass(AudiencesFileError, AudienceError)  # the CLI: one line, exit 2


def test_a_file_over_1_mb(tmp_path: Path) -> None:
    comment = "# " + "x" * 1000 + "\n"
    error = refusal(tmp_path, "models: {}\n" + comment * 1100)
    assert str(error) == "audiences.yml: larger than 1 MB; split it"
    # just under the bound is read
    fits = "models: {}\n" + comment * ((files.MAX_FILE_BYTES - 20) // len(comment))
    assert load_file(write(tmp_path, fits)).spec.models == {}


def test_not_utf8(tmp_path: Path) -> None:
    error = refusal(tmp_path, "models: {}\naudiences:\n  - name: caf\xe9\n".encode("latin-1"))
    assert str(error) == "audiences.yml:3: not UTF-8 text (byte 0xe9); save it as UTF-8"


def test_a_billion_laughs_is_refused_at_its_first_alias(tmp_path: Path) -> None:
    laughs = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for level in range(1, 10):
        previous = chr(ord("a") + level - 1)
        laughs.append(
            f"{chr(ord('a') + level)}: &{chr(ord('a') + level)} [{', '.join(['*' + previous] * 9)}]"
        )
    error = refusal(tmp_path, "\n".join(laughs) + "\n")
    assert str(error) == "audiences.yml:2: aliases (*a) are not supported: write the value out"


def test_nesting_is_bounded(tmp_path: Path) -> None:
    deep = "audiences: " + "[" * 1000 + "]" * 1000 + "\n"
    error = refusal(tmp_path, deep)
    assert re.fullmatch(r"audiences\.yml:1: .*nesting.*|audiences\.yml:1: .*nested.*", str(error))
    indented = "".join("  " * level + f"k{level}:\n" for level in range(files.MAX_NESTING + 5))
    error = refusal(tmp_path, indented)
    assert str(error) == (
        f"audiences.yml:{files.MAX_NESTING + 1}: lists and mappings nested more than "
        f"{files.MAX_NESTING} deep"
    )


def test_the_number_of_values_is_bounded(tmp_path: Path) -> None:
    values = "audiences:\n" + "".join(f"  - {index}\n" for index in range(files.MAX_NODES + 10))
    error = refusal(tmp_path, values)
    # the mapping, its key, the list and the values before the one over the bound
    line = files.MAX_NODES - 3 + 2
    assert str(error) == f"audiences.yml:{line}: more than {files.MAX_NODES} values in one file"


def test_at_most_1000_audiences(tmp_path: Path) -> None:
    entries = "".join(f"  - name: A{index}\n    sql: s\n" for index in range(files.MAX_AUDIENCES))
    assert len(load(tmp_path, "audiences:\n" + entries).spec.audiences) == files.MAX_AUDIENCES
    error = refusal(tmp_path, "audiences:\n" + entries + "  - name: one more\n    sql: s\n")
    assert str(error).startswith(
        "audiences.yml:1: audiences: list should have at most 1000 items after validation"
    )


# --- the JSON Schema ---------------------------------------------------------------------------

SCHEMA_FILE = REPO_ROOT / "syncer" / "definitions" / "audiences.schema.json"


def test_the_shipped_schema_is_current() -> None:
    assert json.loads(SCHEMA_FILE.read_text(encoding="utf-8")) == json_schema(), (
        "audiences.schema.json is out of date; regenerate it: "
        "python -m syncer.definitions.files > syncer/definitions/audiences.schema.json"
    )


def test_the_schema_describes_the_file() -> None:
    schema = json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "audiences.yml"
    assert "$id" not in schema
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == {"models", "audiences"}
    entry = schema["$defs"]["AudienceEntry"]
    assert set(entry["properties"]) == {
        "name", "key", "sql", "rules", "source", "model", "every", "cron", "paused", "guard",
        "description",
    }  # fmt: skip
    assert entry["required"] == ["name"]
    conditions = schema["$defs"]["AttributeCondition"]["properties"]
    assert "in" in conditions and "in_" not in conditions  # keys as written in the file


# A small validator for the keywords the schema uses (the jsonschema package is not a
# dependency); the test below checks that it knows every keyword the schema has.
_ANNOTATIONS = {"title", "description", "default", "$schema", "$defs"}


def _keywords(schema: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(schema, dict):
        for key, value in schema.items():
            found.add(key)
            if key in ("properties", "patternProperties", "$defs"):
                for child in value.values():
                    found |= _keywords(child)
            elif key in ("anyOf", "oneOf", "allOf"):
                for child in value:
                    found |= _keywords(child)
            elif key in ("items", "not", "additionalProperties"):
                found |= _keywords(value)
    return found


_TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "null": type(None),
}


def _valid(value: Any, schema: Any, root: dict[str, Any]) -> bool:
    if schema is True:
        return True
    if schema is False:
        return False
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/$defs/")
        if not _valid(value, root["$defs"][name], root):
            return False
    kind = schema.get("type")
    if kind == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            return False
    elif kind == "number":
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            return False
    elif kind is not None and not isinstance(value, _TYPES[kind]):
        return False
    if isinstance(value, bool) and kind not in (None, "boolean"):
        return False
    if "anyOf" in schema and not any(_valid(value, s, root) for s in schema["anyOf"]):
        return False
    if "oneOf" in schema and sum(_valid(value, s, root) for s in schema["oneOf"]) != 1:
        return False
    if "not" in schema and _valid(value, schema["not"], root):
        return False
    if "const" in schema and value != schema["const"]:
        return False
    if "enum" in schema and value not in schema["enum"]:
        return False
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", 1e9):
            return False
        if "pattern" in schema and not re.search(schema["pattern"], value):
            return False
    if (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and not schema.get("minimum", -math.inf) <= value <= schema.get("maximum", math.inf)
    ):
        return False
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", 1e9):
            return False
        if "items" in schema and not all(_valid(item, schema["items"], root) for item in value):
            return False
    if isinstance(value, dict):
        if any(key not in value for key in schema.get("required", [])):
            return False
        if not schema.get("minProperties", 0) <= len(value) <= schema.get("maxProperties", 1e9):
            return False
        properties = schema.get("properties", {})
        patterns = schema.get("patternProperties", {})
        for key, item in value.items():
            matched = False
            if key in properties:
                matched = True
                if not _valid(item, properties[key], root):
                    return False
            for pattern, child in patterns.items():
                if re.search(pattern, key):
                    matched = True
                    if not _valid(item, child, root):
                        return False
            if not matched and not _valid(item, schema.get("additionalProperties", True), root):
                return False
    return True


_KNOWN_KEYWORDS = _ANNOTATIONS | {
    "$ref", "type", "anyOf", "oneOf", "not", "const", "enum", "minLength", "maxLength",
    "pattern", "minimum", "maximum", "minItems", "maxItems", "items", "required",
    "minProperties", "maxProperties", "properties", "patternProperties", "additionalProperties",
}  # fmt: skip


def test_the_schema_accepts_designs_example_and_refuses_mistakes() -> None:
    schema = json_schema()
    assert _keywords(schema) <= _KNOWN_KEYWORDS, _keywords(schema) - _KNOWN_KEYWORDS
    example = yaml.safe_load(DESIGN_EXAMPLE)
    assert _valid(example, schema, schema)
    full = yaml.safe_load(
        MODELS + "audiences:\n  - name: A\n    key: a_1\n    model: users\n    cron: '0 * * * *'\n"
        "    paused: true\n    guard: {max_removed_percent: 20, min_removed: 5}\n"
        "    rules:\n      any:\n        - not: {attribute: plan, is_null: true}\n"
        "        - related: orders\n          exactly: 2\n          where:\n"
        "            - {attribute: total, gt: 10.5}\n"
    )
    assert _valid(full, schema, schema)
    mistakes: list[tuple[tuple[str | int, ...], Any]] = [
        (("traits",), []),
        (("audiences", 1, "rules"), {"attribute": "plan", "eq": "pro"}),  # and sql
        (("audiences", 1, "cron"), "0 * * * *"),  # and every
        (("audiences", 0, "guard"), {}),
        (("audiences", 0, "guard"), {"max_removed_percent": 101}),
        (("audiences", 0, "key"), "Not A Key"),
        (("audiences", 0, "paused"), "yes"),
        (("audiences", 0, "rules", "all", 1, "inn"), ["x"]),
        (("audiences", 0, "rules", "all", 0, "at_least"), -1),
        (("models", "my-model"), {"table": "t", "primary_key": "id"}),
        (("models", "users", "tables"), "t"),
    ]
    for path, value in mistakes:
        changed = yaml.safe_load(DESIGN_EXAMPLE)
        node = changed
        for segment in path[:-1]:
            node = node[segment]
        node[path[-1]] = value
        if path == ("audiences", 1, "cron"):
            changed["audiences"][1]["every"] = "1h"
        assert not _valid(changed, schema, schema), path
