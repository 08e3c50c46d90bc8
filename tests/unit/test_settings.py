"""settings.toml: defaults, paths, ${VAR}, validation, and secrets that never show."""

from __future__ import annotations

from pathlib import Path

import pytest

from syncer.errors import ConfigError
from syncer.settings import (
    Secret,
    Settings,
    TraySettings,
    load_settings,
    validate_cron,
)
from tests.helpers import REPO_ROOT, toml_value

URL_A = "https://a.trayapp.io"
URL_B = "https://b.trayapp.io"


def write(folder: Path, text: str, name: str = "settings.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def load(folder: Path, text: str) -> Settings:
    return load_settings(str(write(folder, text)))


def refusal(folder: Path, text: str) -> str:
    """Load settings that must be refused; return the message, which must be one line."""
    with pytest.raises(ConfigError) as info:
        load(folder, text)
    message = str(info.value)
    assert "\n" not in message
    return message


def sqlite_file(settings_url: object) -> Path:
    text = str(settings_url)
    assert text.startswith("sqlite:///"), text
    return Path(text.removeprefix("sqlite:///"))


# --- defaults and where settings come from ---------------------------------------------------


def test_empty_file_gives_the_documented_defaults(tmp_path: Path) -> None:
    settings = load(tmp_path, "")
    assert sqlite_file(settings.database.url) == (tmp_path / "syncer.db").resolve()
    assert list(settings.sources) == ["default"]
    assert settings.source("default").url == settings.database.url
    assert settings.tray.workflow_urls == ()
    assert settings.tray.shared_secret is None
    assert settings.tray.timeout_seconds == 5
    assert settings.schedule.default_every_seconds == 3 * 3600
    assert settings.schedule.timezone == "UTC"


def test_missing_sections_fall_back_to_defaults(tmp_path: Path) -> None:
    settings = load(tmp_path, f'[tray]\nworkflow_urls = ["{URL_A}"]\n')
    assert settings.tray.workflow_urls == (URL_A,)
    assert settings.tray.timeout_seconds == 5
    assert sqlite_file(settings.database.url) == (tmp_path / "syncer.db").resolve()
    assert settings.schedule.default_every_seconds == 3 * 3600


def test_shipped_settings_file_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRAY_SHARED_SECRET", raising=False)
    settings = load_settings(str(REPO_ROOT / "settings.toml"))
    assert sqlite_file(settings.database.url) == (REPO_ROOT / "syncer.db").resolve()
    assert settings.schedule.default_every_seconds == 3 * 3600


def test_settings_file_from_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "conf", '[schedule]\ndefault_every = "15m"\n', name="custom.toml")
    monkeypatch.setenv("SYNCER_SETTINGS", str(path))
    assert load_settings().schedule.default_every_seconds == 900


def test_settings_file_defaults_to_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, '[schedule]\ndefault_every = "1d"\n')
    monkeypatch.delenv("SYNCER_SETTINGS", raising=False)
    monkeypatch.chdir(tmp_path)
    assert load_settings().schedule.default_every_seconds == 86400


def test_missing_file_is_refused_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_settings(str(missing))
    message = str(info.value)
    assert str(missing) in message
    assert "--settings" in message
    assert "\n" not in message


def test_broken_toml_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[tray\ntimeout_seconds = 5\n")
    with pytest.raises(ConfigError) as info:
        load_settings(str(path))
    message = str(info.value)
    assert str(path) in message
    assert "TOML" in message
    assert "\n" not in message


def test_unreadable_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "settings.toml"
    path.write_bytes(b'[schedule]\ntimezone = "\xff\xfe"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(str(path))
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_folder_instead_of_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(str(tmp_path))
    assert str(tmp_path) in str(info.value)
    assert "\n" not in str(info.value)


# --- database URLs ------------------------------------------------------------------------------


def test_relative_sqlite_paths_resolve_against_the_settings_folder_not_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "conf"
    write(
        conf,
        '[database]\nurl = "sqlite:///data/state.db"\n'
        '[sources.warehouse]\nurl = "sqlite:///../wh/warehouse.db"\n',
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    settings = load_settings("../conf/settings.toml")
    assert sqlite_file(settings.database.url) == (conf / "data" / "state.db").resolve()
    assert (
        sqlite_file(settings.source("warehouse").url)
        == (tmp_path / "wh" / "warehouse.db").resolve()
    )
    # without a [sources.default], audiences query the state database
    assert settings.source("default").url == settings.database.url


def test_absolute_sqlite_path_is_kept(tmp_path: Path) -> None:
    target = (tmp_path / "abs" / "state.db").resolve()
    settings = load(tmp_path / "conf", f'[database]\nurl = "sqlite:///{target}"\n')
    assert sqlite_file(settings.database.url) == target


def test_postgresql_url_gets_the_psycopg_driver(tmp_path: Path) -> None:
    settings = load(tmp_path, '[database]\nurl = "postgresql://syncer@db.internal:5433/state"\n')
    url = settings.database.url
    assert url.drivername == "postgresql+psycopg"
    assert (url.username, url.host, url.port, url.database) == (
        "syncer",
        "db.internal",
        5433,
        "state",
    )


def test_explicit_driver_is_kept(tmp_path: Path) -> None:
    settings = load(tmp_path, '[database]\nurl = "postgresql+psycopg://syncer@db/state"\n')
    assert settings.database.url.drivername == "postgresql+psycopg"


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///:memory:",
        "sqlite://",
        "oracle://scott@db/orcl",
        "not a url",
        "",
    ],
)
def test_unusable_database_url_is_refused(tmp_path: Path, url: str) -> None:
    message = refusal(tmp_path, f'[database]\nurl = "{url}"\n')
    assert message.startswith("[database] url")


def test_source_without_url_is_refused(tmp_path: Path) -> None:
    message = refusal(tmp_path, "[sources.warehouse]\nquery_timeout_seconds = 60\n")
    assert "[sources.warehouse]" in message
    assert "url" in message


def test_unknown_source_is_refused_listing_the_known_ones(tmp_path: Path) -> None:
    settings = load(tmp_path, '[sources.warehouse]\nurl = "sqlite:///wh.db"\n')
    with pytest.raises(ConfigError) as info:
        settings.source("warehuose")
    message = str(info.value)
    assert "[sources.warehuose]" in message
    assert "default, warehouse" in message


# --- ${VAR} -------------------------------------------------------------------------------------


def test_environment_variables_are_expanded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SYNCER_TEST_SECRET", "s3cret-from-env")
    monkeypatch.setenv("SYNCER_TEST_HOST", "db.internal")
    settings = load(
        tmp_path,
        '[database]\nurl = "postgresql://syncer@${SYNCER_TEST_HOST}/state"\n'
        '[tray]\nshared_secret = "${SYNCER_TEST_SECRET}"\n'
        'workflow_urls = ["https://${SYNCER_TEST_HOST}/hook"]\n',
    )
    assert settings.database.url.host == "db.internal"
    assert settings.tray.shared_secret == Secret("s3cret-from-env")
    assert settings.tray.workflow_urls == ("https://db.internal/hook",)


def test_unset_environment_variable_is_refused_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SYNCER_TEST_UNSET", raising=False)
    message = refusal(tmp_path, '[tray]\nshared_secret = "${SYNCER_TEST_UNSET}"\n')
    assert "SYNCER_TEST_UNSET" in message
    assert "not set" in message
    assert "shared_secret" in message


# --- durations, cron, time zones -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("every", "seconds"),
    [("90s", 90), ("15m", 900), ("3h", 10800), ("1d", 86400), ("1h30m", 5400)],
)
def test_default_every_durations(tmp_path: Path, every: str, seconds: int) -> None:
    settings = load(tmp_path, f'[schedule]\ndefault_every = "{every}"\n')
    assert settings.schedule.default_every_seconds == seconds


@pytest.mark.parametrize("every", ["0s", "-1h", "3x", "", "h", "1.5h", "1h 30m", "10"])
def test_bad_default_every_is_refused(tmp_path: Path, every: str) -> None:
    message = refusal(tmp_path, f'[schedule]\ndefault_every = "{every}"\n')
    assert message.startswith("[schedule] default_every")
    assert "like 90s, 15m, 3h or 1d" in message


def test_default_every_must_be_a_string(tmp_path: Path) -> None:
    message = refusal(tmp_path, "[schedule]\ndefault_every = 3\n")
    assert "default_every" in message
    assert '"3h"' in message


@pytest.mark.parametrize("cron", ["0 */3 * * *", "*/15 * * * *", "0 6 * * mon-fri"])
def test_valid_cron(cron: str) -> None:
    assert validate_cron(cron, what="--cron") == cron


@pytest.mark.parametrize(
    "cron", ["", "* * * *", "* * * * * *", "61 * * * *", "*/0 * * * *", "@hourly"]
)
def test_bad_cron_is_refused(cron: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_cron(cron, what="--cron")
    message = str(info.value)
    assert message.startswith("--cron:")
    assert 'like "0 */3 * * *"' in message
    assert "\n" not in message


def test_timezone_is_kept(tmp_path: Path) -> None:
    settings = load(tmp_path, '[schedule]\ntimezone = "Europe/Berlin"\n')
    assert settings.schedule.timezone == "Europe/Berlin"


@pytest.mark.parametrize("zone", ["Mars/Olympus", "Europe", "", "../etc/passwd", "utc"])
def test_bad_timezone_is_refused(tmp_path: Path, zone: str) -> None:
    message = refusal(tmp_path, f'[schedule]\ntimezone = "{zone}"\n')
    assert message.startswith("[schedule] timezone")
    assert "Europe/Berlin" in message


# --- [tray] ---------------------------------------------------------------------------------------


def test_one_to_ten_workflow_urls_are_accepted(tmp_path: Path) -> None:
    urls = [f"https://w{i}.trayapp.io" for i in range(10)]
    settings = load(tmp_path, f"[tray]\nworkflow_urls = {toml_value(urls)}\n")
    assert settings.tray.workflow_urls == tuple(urls)
    settings = load(tmp_path, '[tray]\nworkflow_urls = ["http://127.0.0.1:8080/w1"]\n')
    assert settings.tray.workflow_urls == ("http://127.0.0.1:8080/w1",)


def test_empty_workflow_url_list_is_refused(tmp_path: Path) -> None:
    message = refusal(tmp_path, "[tray]\nworkflow_urls = []\n")
    assert "has 0 URLs; give 1 to 10" in message


def test_eleven_workflow_urls_are_refused(tmp_path: Path) -> None:
    urls = [f"https://w{i}.trayapp.io" for i in range(11)]
    message = refusal(tmp_path, f"[tray]\nworkflow_urls = {toml_value(urls)}\n")
    assert "has 11 URLs; give 1 to 10" in message


def test_duplicate_workflow_urls_are_refused(tmp_path: Path) -> None:
    message = refusal(tmp_path, f'[tray]\nworkflow_urls = ["{URL_A}", "{URL_B}", "{URL_A}"]\n')
    assert "workflow_urls" in message
    assert "twice" in message


@pytest.mark.parametrize(
    "url", ["ftp://a.trayapp.io/x", "https://", "a.trayapp.io", "file:///etc/passwd"]
)
def test_non_http_workflow_url_is_refused(tmp_path: Path, url: str) -> None:
    message = refusal(tmp_path, f'[tray]\nworkflow_urls = ["{URL_A}", "{url}"]\n')
    assert message.startswith("[tray] workflow_urls[1]")
    assert repr(url) in message
    assert "https://" in message


def test_workflow_urls_must_be_a_list(tmp_path: Path) -> None:
    message = refusal(tmp_path, f'[tray]\nworkflow_urls = "{URL_A}"\n')
    assert "must be a list" in message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("timeout_seconds", "0"),
        ("timeout_seconds", "-1"),
        ("timeout_seconds", '"5"'),
        ("timeout_seconds", "true"),
        ("max_concurrency", "0"),
        ("max_concurrency", "1.5"),
        ("max_attempts", "-3"),
        ("backoff_base_seconds", "0"),
        ("backoff_max_seconds", "-0.5"),
        ("delivery_processes", "0"),
        ("delivery_processes", "1.5"),
        ("delivery_processes", '"2"'),
    ],
)
def test_non_positive_tray_numbers_are_refused(tmp_path: Path, key: str, value: str) -> None:
    message = refusal(tmp_path, f"[tray]\n{key} = {value}\n")
    assert message.startswith(f"[tray] {key} must be a positive")


def test_nan_timeout_is_refused(tmp_path: Path) -> None:
    # TOML allows nan; a NaN timeout is not a positive number and must not be accepted.
    message = refusal(tmp_path, "[tray]\ntimeout_seconds = nan\n")
    assert message.startswith("[tray] timeout_seconds must be a positive")


def test_tray_numbers_are_read(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        "[tray]\ntimeout_seconds = 2.5\nmax_concurrency = 8\nmax_attempts = 3\n"
        "backoff_base_seconds = 0.1\nbackoff_max_seconds = 4\n",
    )
    assert settings.tray == TraySettings(
        timeout_seconds=2.5,
        max_concurrency=8,
        max_attempts=3,
        backoff_base_seconds=0.1,
        backoff_max_seconds=4.0,
    )


def test_delivery_processes_defaults_to_two_and_is_capped(tmp_path: Path) -> None:
    assert load(tmp_path, "").tray.delivery_processes == 2
    assert load(tmp_path, "[tray]\ndelivery_processes = 16\n").tray.delivery_processes == 16
    message = refusal(tmp_path, "[tray]\ndelivery_processes = 17\n")
    assert message == "[tray] delivery_processes must be at most 16, got 17"


def test_empty_shared_secret_is_refused(tmp_path: Path) -> None:
    message = refusal(tmp_path, '[tray]\nshared_secret = ""\n')
    assert message.startswith("[tray] shared_secret")


# --- unknown keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "where", "key"),
    [
        ('[source.default]\nurl = "sqlite:///w.db"\n', "settings", "source"),
        ('[database]\nurl = "sqlite:///s.db"\npool_size = 5\n', "[database]", "pool_size"),
        (
            '[sources.warehouse]\nurl = "sqlite:///w.db"\ntimeout = 5\n',
            "[sources.warehouse]",
            "timeout",
        ),
        ("[tray]\ntimeout = 5\n", "[tray]", "timeout"),
        ('[tray]\nworkflow_url = "https://a.trayapp.io"\n', "[tray]", "workflow_url"),
        ('[schedule]\nevery = "3h"\n', "[schedule]", "every"),
    ],
)
def test_unknown_keys_are_refused_naming_them(
    tmp_path: Path, text: str, where: str, key: str
) -> None:
    message = refusal(tmp_path, text)
    assert message.startswith(f"{where}: unknown key {key!r}")


@pytest.mark.parametrize(
    ("text", "where"),
    [("tray = 5\n", "[tray]"), ("sources = 5\n", "[sources]"), ('[sources]\nwh = "x"\n', "wh")],
)
def test_sections_that_are_not_tables_are_refused(tmp_path: Path, text: str, where: str) -> None:
    assert where in refusal(tmp_path, text)


# --- secrets never show -----------------------------------------------------------------------------


def test_secret_never_shows_its_value() -> None:
    secret = Secret("hunter2-very-secret")
    assert secret.reveal() == "hunter2-very-secret"
    for shown in (repr(secret), str(secret), f"{secret}", f"{secret!r}", repr([secret])):
        assert "hunter2" not in shown


def test_settings_repr_never_shows_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYNCER_TEST_SECRET", "tray-secret-value-42")
    monkeypatch.setenv("SYNCER_TEST_DB_PASSWORD", "db-password-value-43")
    settings = load(
        tmp_path,
        '[database]\nurl = "postgresql://syncer:${SYNCER_TEST_DB_PASSWORD}@db/state"\n'
        '[sources.warehouse]\nurl = "postgresql://ro:${SYNCER_TEST_DB_PASSWORD}@wh/analytics"\n'
        f'[tray]\nworkflow_urls = ["{URL_A}"]\nshared_secret = "${{SYNCER_TEST_SECRET}}"\n',
    )
    assert settings.tray.shared_secret is not None
    assert settings.tray.shared_secret.reveal() == "tray-secret-value-42"
    assert settings.database.url.password == "db-password-value-43"
    for shown in (repr(settings), str(settings), repr(settings.tray), repr(settings.sources)):
        assert "tray-secret-value-42" not in shown
        assert "db-password-value-43" not in shown
