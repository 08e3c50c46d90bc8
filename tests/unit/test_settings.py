"""settings.toml: defaults, paths, ${VAR}, validation, and secrets that never show."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from syncer.audiences import parse_schedule
from syncer.errors import AudienceError, ConfigError
from syncer.settings import (
    Secret,
    Settings,
    TraySettings,
    load_settings,
    normalize_workflow_url,
    url_host,
    validate_cron,
    workflow_url_hash,
)
from tests.helpers import REPO_ROOT, toml_value

URL_A = "https://a.trayapp.io/"
URL_B = "https://b.trayapp.io/"
SECRET_PATH = "/hooks/tok-SECRET-1234"  # a workflow URL's path is its bearer secret


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
    "cron",
    [
        "",
        "* * * *",
        "* * * * * *",
        "61 * * * *",
        "*/0 * * * *",
        "@hourly",
        "@reboot",
        "5-1 * * * *",
        "0 0 L * *",
        "\uff10 0 * * *",  # a fullwidth 0: int() reads it, cron does not
        "\u0663 0 * * *",  # an Arabic-Indic 3
    ],
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
    urls = [f"https://w{i}.trayapp.io/" for i in range(10)]
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
    assert "https://" in message


# A URL is accepted only if it names exactly one well-formed origin and path. Every refusal
# names the key and shows at most the host: never the path or the query.
BAD_URLS = [
    # (id, the URL, what the message says)
    (
        "port-past-65535",
        f"https://a.trayapp.io:65536{SECRET_PATH}",
        "for host a.trayapp.io has a port past 65535",
    ),
    ("port-wraps-to-80", f"https://a.trayapp.io:65616{SECRET_PATH}", "port past 65535"),
    ("port-long", f"https://a.trayapp.io:{'9' * 40}{SECRET_PATH}", "port past 65535"),
    ("port-zero", f"https://a.trayapp.io:0{SECRET_PATH}", "port 0"),
    ("port-not-a-number", f"https://a.trayapp.io:8o{SECRET_PATH}", "not a number"),
    ("cr-lf-in-path", f"https://a.trayapp.io{SECRET_PATH}\r\nX-Injected: 1", "control character"),
    ("lf-in-host", f"https://a.tray\napp.io{SECRET_PATH}", "control character"),
    ("tab", f"https://a.trayapp.io{SECRET_PATH}\t", "whitespace"),
    ("nul", f"https://a.trayapp.io{SECRET_PATH}\u0000", "control character"),
    ("space-in-host", f"https://a trayapp.io{SECRET_PATH}", "whitespace"),
    ("nbsp-in-path", f"https://a.trayapp.io{SECRET_PATH}\u00a0x", "whitespace"),
    ("userinfo", f"https://user:pa55@a.trayapp.io{SECRET_PATH}", "user name or password"),
    ("user-only", f"https://user@a.trayapp.io{SECRET_PATH}", "user name or password"),
    (
        "fragment",
        f"https://a.trayapp.io{SECRET_PATH}#frag",
        "for host a.trayapp.io has a #fragment",
    ),
    ("empty-fragment", f"https://a.trayapp.io{SECRET_PATH}#", "#fragment"),
    ("backslash", f"https://a.trayapp.io\\@evil.example{SECRET_PATH}", "backslash"),
    ("underscore-host", f"https://a_b.trayapp.io{SECRET_PATH}", "not a valid DNS name"),
    ("hyphen-label", f"https://-a.trayapp.io{SECRET_PATH}", "not a valid DNS name"),
    ("empty-label", f"https://a..trayapp.io{SECRET_PATH}", "not a valid DNS name"),
    ("long-label", f"https://{'a' * 64}.trayapp.io{SECRET_PATH}", "not a valid DNS name"),
    ("percent-host", f"https://a%2etrayapp.io{SECRET_PATH}", "not a valid DNS name"),
    ("numeric-tld", f"https://a.trayapp.123{SECRET_PATH}", "not a valid DNS name"),
    ("hex-ipv4-in-disguise", f"https://0x7f000001{SECRET_PATH}", "not a valid DNS name"),
    ("hex-tld", f"https://a.0x1f{SECRET_PATH}", "not a valid DNS name"),
    ("bad-ipv4", f"http://256.1.1.1{SECRET_PATH}", "not a valid IPv4"),
    ("short-ipv4", f"http://127.1{SECRET_PATH}", "not a valid IPv4"),
    ("bad-ipv6", f"http://[::g]{SECRET_PATH}", "not a valid IPv6"),
    ("ipv6-zone", f"http://[fe80::1%25eth0]{SECRET_PATH}", "not a valid IPv6"),
    ("unclosed-ipv6", f"http://[::1{SECRET_PATH}", "IPv6"),
    ("no-host", f"https://{SECRET_PATH}", "no host"),
    ("no-scheme", f"a.trayapp.io{SECRET_PATH}", "not an http(s) URL"),
    ("ftp", f"ftp://a.trayapp.io{SECRET_PATH}", "not an http(s) URL"),
    ("javascript", f"javascript:alert(1)//{SECRET_PATH}", "not an http(s) URL"),
    ("quote-in-path", f'https://a.trayapp.io{SECRET_PATH}\\"x', "backslash"),
    ("brace-in-path", f"https://a.trayapp.io{SECRET_PATH}{{x}}", "percent-encode"),
    ("non-ascii-path", f"https://a.trayapp.io{SECRET_PATH}é", "percent-encode"),
    ("stray-percent", f"https://a.trayapp.io{SECRET_PATH}%zz", "percent-encode"),
    ("too-long", f"https://a.trayapp.io{SECRET_PATH}/{'x' * 2000}", "longer than 2000"),
]


@pytest.mark.parametrize(
    ("url", "says"), [case[1:] for case in BAD_URLS], ids=[c[0] for c in BAD_URLS]
)
def test_bad_workflow_urls_are_refused_naming_the_key_never_the_path(
    tmp_path: Path, url: str, says: str
) -> None:
    message = refusal(tmp_path, f"[tray]\nworkflow_urls = {toml_value([URL_A, url])}\n")
    assert message.startswith("[tray] workflow_urls[1]: "), message
    assert says in message
    assert "SECRET" not in message and "hooks" not in message


@pytest.mark.parametrize(
    ("given", "normal"),
    [
        ("https://a.trayapp.io", "https://a.trayapp.io/"),
        ("HTTPS://A.TrayApp.IO/Hook/X", "https://a.trayapp.io/Hook/X"),  # the path keeps its case
        ("https://a.trayapp.io/x?", "https://a.trayapp.io/x"),
        ("https://a.trayapp.io?", "https://a.trayapp.io/"),
        ("https://a.trayapp.io:443/x", "https://a.trayapp.io/x"),
        ("http://a.trayapp.io:80/x", "http://a.trayapp.io/x"),
        ("https://a.trayapp.io:80/x", "https://a.trayapp.io:80/x"),
        ("https://a.trayapp.io:/x", "https://a.trayapp.io/x"),
        ("http://127.0.0.1:08080/w1", "http://127.0.0.1:8080/w1"),
        ("https://a.trayapp.io/x?b=2&a=1", "https://a.trayapp.io/x?b=2&a=1"),  # kept exactly
        ("https://a.trayapp.io/x%2Fy/./z", "https://a.trayapp.io/x%2Fy/./z"),
        ("http://[0:0::1]:8080/w", "http://[::1]:8080/w"),
        ("https://bücher.example/x", "https://xn--bcher-kva.example/x"),
        ("https://localhost/x", "https://localhost/x"),
        # RFC 3986 6.2.2: escapes in upper case, unreserved characters unescaped
        ("https://a.trayapp.io/x%2fy?q=%7e%41%3d", "https://a.trayapp.io/x%2Fy?q=~A%3D"),
        ("https://a\u3002trayapp\u3002io/x", "https://a.trayapp.io/x"),  # ideographic full stops
    ],
)
def test_workflow_urls_are_kept_normalised(given: str, normal: str) -> None:
    assert normalize_workflow_url(given, what="w") == normal
    assert normalize_workflow_url(normal, what="w") == normal  # once normal, stays so


def test_spellings_of_one_url_are_one_url_and_refused_as_duplicates(tmp_path: Path) -> None:
    base = f"https://a.trayapp.io{SECRET_PATH}"
    for spelling in [
        f"https://a.trayapp.io{SECRET_PATH}".replace("-", "%2d"),
        f"https://a.trayapp.io{SECRET_PATH}".replace("k", "%6B"),
        base.replace("https", "HTTPS"),
        base.replace("a.trayapp.io", "A.TRAYAPP.IO"),
        base + "?",
        base.replace("a.trayapp.io", "a.trayapp.io:443"),
    ]:
        message = refusal(
            tmp_path, f"[tray]\nworkflow_urls = {toml_value([URL_B, base, spelling])}\n"
        )
        assert message.startswith("[tray] workflow_urls[2] is the same URL as workflow_urls[1]")
        assert "host a.trayapp.io" in message and "SECRET" not in message


def test_settings_keep_the_normalised_urls(tmp_path: Path) -> None:
    settings = load(
        tmp_path, f'[tray]\nworkflow_urls = ["HTTPS://A.trayapp.io:443{SECRET_PATH}?"]\n'
    )
    assert settings.tray.workflow_urls == (f"https://a.trayapp.io{SECRET_PATH}",)
    assert url_host(settings.tray.workflow_urls[0]) == "a.trayapp.io"
    assert url_host("http://127.0.0.1:8080/w1") == "127.0.0.1:8080"
    assert url_host("http://[::1]:8080/w1") == "[::1]:8080"


def test_a_url_hash_is_keyed() -> None:
    url = f"https://a.trayapp.io{SECRET_PATH}"
    assert workflow_url_hash("k1", url) == workflow_url_hash("k1", url)
    assert workflow_url_hash("k1", url) != workflow_url_hash("k2", url)
    assert len(workflow_url_hash("k1", url)) == 64 and SECRET_PATH not in workflow_url_hash(
        "k1", url
    )


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


# --- bounds -----------------------------------------------------------------------------------------

# (settings.toml text, the key the message names, what it says): every number and duration has
# limits, checked at start; past them is bad input, not a hang, an overflow or a crash later.
OUT_OF_BOUNDS = [
    ('[schedule]\ndefault_every = "3000000d"\n', "[schedule] default_every", "use 1s to 366d"),
    ('[schedule]\ndefault_every = "367d"\n', "[schedule] default_every", "out of range"),
    ('[schedule]\ndefault_every = "8785h"\n', "[schedule] default_every", "out of range"),
    (f'[schedule]\ndefault_every = "{"9" * 5000}s"\n', "[schedule] default_every", "out of range"),
    ('[schedule]\nshutdown_grace = "2h"\n', "[schedule] shutdown_grace", "use 1s to 1h"),
    ('[tray]\nmax_age = "999999999999d"\n', "[tray] max_age", "use 1s to 30d"),
    ('[tray]\nmax_age = "31d"\n', "[tray] max_age", "out of range"),
    ("[tray]\ntimeout_seconds = 301\n", "[tray] timeout_seconds", "at most 300"),
    ("[tray]\ntimeout_seconds = 1e308\n", "[tray] timeout_seconds", "at most 300"),
    ("[tray]\ntimeout_seconds = inf\n", "[tray] timeout_seconds", "positive number"),
    ("[tray]\ntimeout_seconds = 0.001\n", "[tray] timeout_seconds", "at least 0.01"),
    ("[tray]\nmax_concurrency = 100000000\n", "[tray] max_concurrency", "at most 1000"),
    ("[tray]\nmax_concurrency = 1001\n", "[tray] max_concurrency", "at most 1000"),
    (
        "[tray]\nmax_requests_per_second = 1e-300\n",
        "[tray] max_requests_per_second",
        "at least 0.1",
    ),
    ("[tray]\nmax_requests_per_second = 2e6\n", "[tray] max_requests_per_second", "at most 1e+06"),
    ("[tray]\nmax_requests_per_second = 0\n", "[tray] max_requests_per_second", "positive"),
    ("[tray]\nbackoff_base_seconds = 61\n", "[tray] backoff_base_seconds", "at most 60"),
    ("[tray]\nbackoff_base_seconds = 1e-9\n", "[tray] backoff_base_seconds", "at least 0.001"),
    ("[tray]\nbackoff_max_seconds = 1e300\n", "[tray] backoff_max_seconds", "at most 3600"),
    (
        "[tray]\nbackoff_base_seconds = 5\nbackoff_max_seconds = 2\n",
        "[tray] backoff_max_seconds",
        "at least backoff_base_seconds (5)",
    ),
    ("[tray]\nmax_attempts = 10001\n", "[tray] max_attempts", "at most 10000"),
    ("[tray]\nmax_attempts = 9223372036854775807\n", "[tray] max_attempts", "at most 10000"),
    ("[tray]\ndelivery_processes = 17\n", "[tray] delivery_processes", "at most 16"),
    (
        '[sources.wh]\nurl = "sqlite:///wh.db"\nquery_timeout_seconds = 90000\n',
        "[sources.wh] query_timeout_seconds",
        "at most 86400",
    ),
    (
        '[sources.wh]\nurl = "sqlite:///wh.db"\nquery_timeout_seconds = 1e-5\n',
        "[sources.wh] query_timeout_seconds",
        "at least 0.01",
    ),
]


@pytest.mark.parametrize(("text", "key", "says"), OUT_OF_BOUNDS)
def test_settings_past_their_bounds_are_refused_naming_the_key(
    tmp_path: Path, text: str, key: str, says: str
) -> None:
    message = refusal(tmp_path, text)
    assert message.startswith(key), message
    assert says in message
    assert len(message) < 300  # a huge value is not echoed whole


def test_settings_at_their_bounds_are_accepted(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        '[schedule]\ndefault_every = "366d"\nshutdown_grace = "1h"\n'
        '[tray]\nmax_age = "30d"\ntimeout_seconds = 300\nmax_concurrency = 1000\n'
        "max_requests_per_second = 0.1\nbackoff_base_seconds = 60\nbackoff_max_seconds = 3600\n"
        "max_attempts = 10000\n",
    )
    assert settings.schedule.default_every_seconds == 366 * 86400
    assert settings.schedule.shutdown_grace_seconds == 3600
    assert settings.tray.max_age_seconds == 30 * 86400
    assert (settings.tray.max_concurrency, settings.tray.max_attempts) == (1000, 10000)
    assert load(tmp_path, '[schedule]\ndefault_every = "1s"\n').schedule.default_every_seconds == 1


@pytest.mark.parametrize(
    ("every", "cron", "says"),
    [
        ("3000000d", None, "--every: '3000000d' is out of range; use 1s to 366d"),
        ("367d", None, "out of range"),
        ("99999999999999999999999s", None, "out of range"),
        (None, "0 0 31 2 *", "does not fire within 5 years"),  # never
        (None, "0 0 29 2 mon", "does not fire within 5 years"),  # next in 2044
        (None, "0 " * 60 + "*", "longer than 100 characters"),
    ],
)
def test_audience_schedules_past_their_bounds_are_refused(
    every: str | None, cron: str | None, says: str
) -> None:
    with pytest.raises(AudienceError) as info:
        parse_schedule(every, cron)
    assert says in str(info.value)


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


# --- hostile settings files and values -------------------------------------------------------


@pytest.mark.parametrize("every", ["1s1s", "30m1h", "1h1h", "1d2d3h"])
def test_a_duration_names_each_unit_once_largest_first(tmp_path: Path, every: str) -> None:
    message = refusal(tmp_path, f'[schedule]\ndefault_every = "{every}"\n')
    assert message.startswith("[schedule] default_every") and "each unit once" in message


def test_a_settings_file_may_start_with_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "settings.toml"
    path.write_bytes(b'\xef\xbb\xbf[schedule]\ndefault_every = "2h"\n')
    assert load_settings(str(path)).schedule.default_every_seconds == 7200


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ('[schedule]\ndefault_every = "2h"\n'.encode("utf-16"), "UTF-16"),
        (b'[schedule]\n# caf\xe9\ndefault_every = "2h"\n', "line 2"),
        (b"# " + b"x" * (1024 * 1024) + b"\n", "larger than"),
    ],
    ids=["utf-16", "latin-1", "past-the-cap"],
)
def test_settings_files_that_are_not_small_utf8_text_are_refused(
    tmp_path: Path, content: bytes, named: str
) -> None:
    path = tmp_path / "settings.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=named):
        load_settings(str(path))


@pytest.mark.parametrize("name", ["fifo", "/dev/zero", "/dev/null"])
def test_a_settings_file_that_is_a_fifo_or_device_is_refused_without_blocking(
    tmp_path: Path, name: str
) -> None:
    """A FIFO nobody writes to would block the open; /dev/zero would never end."""
    path = Path(name) if name.startswith("/") else tmp_path / name
    if not path.exists():
        os.mkfifo(path)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_settings(str(path))


def test_an_empty_settings_argument_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--settings is empty"):
        load_settings("")


@pytest.mark.parametrize("name", ["a b", "\u00e9", "x\\u0000", "../x", "", "\U0001f642", "n" * 64])
def test_odd_source_names_are_refused(tmp_path: Path, name: str) -> None:
    message = refusal(tmp_path, f'[sources.{toml_value(name)}]\nurl = "sqlite:///w.db"\n')
    assert "source name" in message


@pytest.mark.parametrize(
    "query", ["mode=memory", "uri=true", "check_same_thread=false", "timeout=abc", "mode=rwc"]
)
def test_sqlite_urls_take_no_options(tmp_path: Path, query: str) -> None:
    message = refusal(tmp_path, f'[database]\nurl = "sqlite:///state.db?{query}"\n')
    assert "takes no ?options" in message and query.split("=")[0] in message


@pytest.mark.parametrize("path", ["/dev/null", "/dev/zero", "."])
def test_a_sqlite_path_that_is_not_a_file_is_refused(tmp_path: Path, path: str) -> None:
    for section in ("[database]", "[sources.default]"):
        message = refusal(tmp_path, f'{section}\nurl = "sqlite:///{path}"\n')
        assert "not a regular file" in message


def test_a_database_url_whose_port_is_not_a_number_is_refused(tmp_path: Path) -> None:
    message = refusal(tmp_path, '[database]\nurl = "postgresql://u@127.0.0.1:abc/db"\n')
    assert "not a database URL" in message


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ("abc\udcff", "not valid UTF-8"),  # bytes of the environment that are not UTF-8
        ("abc\r\n", "line breaks"),
        (" abc", "spaces"),
        ("abc\tdef", "control characters"),
    ],
    ids=["not-utf8", "crlf", "leading-space", "tab"],
)
def test_a_shared_secret_from_a_bad_variable_is_refused_unshown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str, named: str
) -> None:
    monkeypatch.setenv("SYNCER_TEST_SECRET", value)
    message = refusal(tmp_path, '[tray]\nshared_secret = "${SYNCER_TEST_SECRET}"\n')
    assert named in message and "abc" not in message


def test_a_shared_secret_with_a_nul_byte_is_refused(tmp_path: Path) -> None:
    message = refusal(tmp_path, '[tray]\nshared_secret = "abc\\u0000def"\n')
    assert "control characters" in message and "abc" not in message


def test_a_database_url_from_a_variable_that_is_not_utf8_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SYNCER_TEST_DB", "sqlite:///state\udcff.db")
    message = refusal(tmp_path, '[database]\nurl = "${SYNCER_TEST_DB}"\n')
    assert "[database] url is not valid UTF-8" in message
