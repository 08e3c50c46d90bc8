"""README.md's "Using it", run as written: every ``syncer`` line of its code block, in order, in
a folder holding a copy of the repository's settings.toml, with a loopback receiver's URL where
the README says to add the Tray workflow URLs. The docs cannot drift from what works."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO_ROOT, cli_env
from tests.receiver import Receiver

ACTIVATE = ". .venv/bin/activate"
# The line of settings.toml the README tells the reader to fill in.
WORKFLOW_URLS_LINE = '# workflow_urls = ["https://<id>.trayapp.io"]'


def using_it_commands() -> list[str]:
    """The shell lines of the first code block under "## Using it", comments dropped and
    backslash-continued lines joined."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Using it\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, flags=re.DOTALL)
    assert block is not None, "no ```sh block under ## Using it"
    text = block.group(1).replace("\\\n", " ")
    lines = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            lines.append(shlex.join(words))
    return lines


def _run(words: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "syncer", *words[1:]],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_using_it_works_as_written(tmp_path: Path) -> None:
    commands = using_it_commands()
    assert commands, "the Using it block has no commands"
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert "Add your Tray workflow URLs under [tray] workflow_urls" in readme

    folder = tmp_path / "clone"
    folder.mkdir()
    settings = (REPO_ROOT / "settings.toml").read_text(encoding="utf-8")
    assert settings.count(WORKFLOW_URLS_LINE) == 1, "settings.toml no longer has the URL line"
    env = cli_env()
    env.pop("SYNCER_SETTINGS", None)  # as a reader's shell: ./settings.toml

    with Receiver() as rx:
        url = rx.url("workflow")
        (folder / "settings.toml").write_text(
            settings.replace(WORKFLOW_URLS_LINE, f'workflow_urls = ["{url}"]'), encoding="utf-8"
        )
        results: list[tuple[str, subprocess.CompletedProcess[str]]] = []
        for line in commands:
            if line == ACTIVATE:
                continue  # the tests already run in the project's environment
            words = shlex.split(line)
            assert words[0] == "syncer", f"the README runs something other than syncer: {line}"
            result = _run(words, folder, env)
            shown = f"{line}\nexit {result.returncode}\n{result.stdout}{result.stderr}"
            assert result.returncode == 0, shown
            assert "Traceback" not in result.stderr, shown
            results.append((line, result))
        calls = rx.accepted("workflow")

    by_command = [line for line, _ in results]
    created = next(r for line, r in results if line.startswith("syncer audience create"))
    promised = re.search(r"# -> (\w+)", readme)
    assert promised is not None
    assert created.stdout.strip() == promised.group(1)
    key = promised.group(1)

    syncs = [r for line, r in results if line == "syncer sync"]
    assert len(syncs) == 2, by_command
    assert "(initial) succeeded" in syncs[0].stdout, syncs[0].stdout
    assert "(incremental) succeeded" in syncs[1].stdout, syncs[1].stdout
    found = re.search(r"succeeded: (\d+) members", syncs[0].stdout)
    assert found is not None, syncs[0].stdout
    members = int(found.group(1))
    assert members > 0, "the example audience found nobody: the warehouse is not where it should be"
    # the initial sync told the workflow about every member, once; nothing changed since
    assert len(calls) == members
    assert {c.json["traits"][key] for c in calls} == {True}

    history = next(r for line, r in results if line == "syncer history")
    assert len([row for row in history.stdout.splitlines() if key in row]) == 2

    listed = next(r for line, r in results if line.startswith("syncer audience list --json"))
    (audience,) = json.loads(listed.stdout)
    assert audience["key"] == key
    assert audience["last_run"]["status"] == "succeeded"
    # the folder holds what the README says: the state and the warehouse beside settings.toml
    assert (folder / "syncer.db").exists() and (folder / "warehouse.db").exists()
