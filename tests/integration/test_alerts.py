"""Alerts against a real state database and a loopback webhook receiver.

A run's result (built here, as a run would return it) and real delivery rows (made by a real
run, then aged or failed in SQL) go through ``syncer.alerts``; the receiver records what was
posted. Hostile webhooks (slow, silent, 500, redirecting) cost bounded time, raise nothing,
and leave ``last_error`` naming the host only: the webhook URL holds a secret path that must
show nowhere.
"""

from __future__ import annotations

import dataclasses
import http.server
import logging
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from syncer import alerts
from syncer.models import ALERT_PROBLEMS, DELIVERIES, RUN_SUCCEEDED
from syncer.settings import AlertSettings, Settings, normalize_workflow_url, url_host
from syncer.sync import RunResult
from tests.e2e.conftest import assert_usage_error
from tests.e2e.test_serve import LEADING, wait_until
from tests.helpers import TEST_SECRET, run_cli, start_cli, toml_value, write_settings
from tests.integration.conftest import World
from tests.receiver import Receiver, RecordedRequest

SECRET_PATH = "hooks/T0SECRET/B0SECRET/xoxo-secret-token"
TIMEOUT = 0.5  # [alerts] timeout_seconds in the hostile cases
# The most one alert may take against a hostile webhook: every try to its deadline, the waits
# between them, and room for a machine busy with other tests.
LATEST = alerts.POST_ATTEMPTS * TIMEOUT + 2 * alerts.MAX_BACKOFF_SECONDS + 10


@pytest.fixture
def hooks() -> Iterator[Receiver]:
    """The alert webhooks' receiver (no signature: alerts are not Tray messages)."""
    with Receiver() as rx:
        yield rx


def with_alerts(settings: Settings, *urls: str, **options: Any) -> Settings:
    alert_settings = AlertSettings(
        webhook_urls=tuple(normalize_workflow_url(u, what="test") for u in urls), **options
    )
    return dataclasses.replace(settings, alerts=alert_settings)


def result(status: str, *, run_id: int = 7, key: str = "pro_users", **counts: Any) -> RunResult:
    fields: dict[str, Any] = {"members": 120, "added": 5, "removed": 300, "sent": 0, "failed": 0}
    return RunResult(
        run_id=run_id,
        audience_key=key,
        kind="incremental",
        status=status,
        error=counts.pop("error", None),
        **(fields | counts),
    )


def problem(world: World, name: str) -> Any:
    with world.state.connect() as conn:
        return conn.execute(select(ALERT_PROBLEMS).where(ALERT_PROBLEMS.c.problem == name)).first()


def set_problem(world: World, name: str, **values: Any) -> None:
    with world.state.begin() as conn:
        conn.execute(
            update(ALERT_PROBLEMS).where(ALERT_PROBLEMS.c.problem == name).values(**values)
        )


def bodies(rx: Receiver, path: str = SECRET_PATH) -> list[dict[str, Any]]:
    return [r.json for r in rx.requests(path)]


def assert_no_secret(*texts: object) -> None:
    for text in texts:
        assert "SECRET" not in str(text) and "xoxo" not in str(text), text


# -- run events -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "event", "words"),
    [
        ("failed", "run_failed", ["failed", "source went away", "syncer history pro_users"]),
        ("partial", "run_partial", ["partly delivered", "sent 90, failed 10"]),
        ("held", "run_held", ["held", "remove 300", "syncer audience approve pro_users"]),
    ],
)
def test_a_run_that_failed_was_partial_or_held_is_posted_with_its_fields(
    world: World, hooks: Receiver, status: str, event: str, words: list[str]
) -> None:
    audience = world.create()
    settings = with_alerts(world.settings, hooks.url(SECRET_PATH), hooks.url("second"))
    run = result(status, key=audience.key, sent=90, failed=10, error="source went away")

    alerts.after_run(
        world.state, settings, audience_id=audience.id, audience_key=audience.key, result=run
    )

    [body] = bodies(hooks)
    assert bodies(hooks, "second") == [body]  # every webhook gets it
    [request] = hooks.requests(SECRET_PATH)
    assert request.headers["Content-Type"] == "application/json"
    assert set(alerts.PAYLOAD_FIELDS) <= set(body)
    assert body["event"] == event
    assert body["problem"] == f"run:{audience.id}"
    assert (body["audience_key"], body["audience_id"], body["run_id"]) == (
        audience.key,
        audience.id,
        7,
    )
    assert (body["status"], body["members"], body["added"], body["removed"]) == (
        status,
        120,
        5,
        300,
    )
    assert (body["sent"], body["failed"], body["error"]) == (90, 10, "source went away")
    assert body["url_host"] is None
    assert body["opened_at"] == body["at"]
    text = body["text"]
    assert text.startswith("syncer: ") and "\n" not in text
    for word in [audience.key, "run 7", *words]:
        assert word in text, (word, text)
    assert_no_secret(request.body)
    row = problem(world, f"run:{audience.id}")
    assert (row.event, row.sent_count, row.resolved_at, row.last_error) == (event, 1, None, None)


def test_an_open_problem_is_not_posted_again_within_repeat_after_then_is(
    world: World, hooks: Receiver
) -> None:
    audience = world.create()
    settings = with_alerts(world.settings, hooks.url(SECRET_PATH), repeat_after_seconds=3600)
    name = f"run:{audience.id}"

    def held(run_id: int) -> None:
        alerts.after_run(
            world.state,
            settings,
            audience_id=audience.id,
            audience_key=audience.key,
            result=result("held", run_id=run_id, key=audience.key),
        )

    held(1)
    held(2)
    held(3)
    assert [b["run_id"] for b in bodies(hooks)] == [1]
    first = problem(world, name)

    # the last post an hour and a second ago: the next held run is posted again
    set_problem(world, name, last_sent_at=first.last_sent_at - timedelta(seconds=3601))
    held(4)
    assert [b["run_id"] for b in bodies(hooks)] == [1, 4]
    again = problem(world, name)
    assert again.sent_count == 2
    assert again.opened_at == first.opened_at  # the same problem, still open
    assert bodies(hooks)[1]["opened_at"] == bodies(hooks)[0]["opened_at"]
    held(5)
    assert len(bodies(hooks)) == 2


def test_a_changed_event_is_posted_at_once(world: World, hooks: Receiver) -> None:
    audience = world.create()
    settings = with_alerts(world.settings, hooks.url(SECRET_PATH))
    for status, run_id in [("failed", 1), ("failed", 2), ("held", 3), ("held", 4)]:
        alerts.after_run(
            world.state,
            settings,
            audience_id=audience.id,
            audience_key=audience.key,
            result=result(status, run_id=run_id, key=audience.key),
        )
    assert [(b["event"], b["run_id"]) for b in bodies(hooks)] == [
        ("run_failed", 1),
        ("run_held", 3),
    ]


def test_a_run_that_succeeds_resolves_the_problem_once_and_it_can_open_again(
    world: World, hooks: Receiver
) -> None:
    audience = world.create()
    settings = with_alerts(world.settings, hooks.url(SECRET_PATH))

    def run(status: str, run_id: int) -> None:
        alerts.after_run(
            world.state,
            settings,
            audience_id=audience.id,
            audience_key=audience.key,
            result=result(status, run_id=run_id, key=audience.key, removed=0),
        )

    run("succeeded", 1)  # nothing open: nothing to say
    assert bodies(hooks) == []
    assert problem(world, f"run:{audience.id}") is None
    run("held", 2)
    run("succeeded", 3)
    run("succeeded", 4)
    held, resolved = bodies(hooks)
    assert resolved["event"] == "resolved"
    assert resolved["resolves"] == "run_held"
    assert (resolved["problem"], resolved["run_id"], resolved["status"]) == (
        f"run:{audience.id}",
        3,
        RUN_SUCCEEDED,
    )
    assert resolved["opened_at"] == held["opened_at"]
    assert "Resolved" in resolved["text"] and audience.key in resolved["text"]
    assert problem(world, f"run:{audience.id}").resolved_at is not None

    run("failed", 5)  # back again: a new problem, posted at once
    assert [b["event"] for b in bodies(hooks)] == ["run_held", "resolved", "run_failed"]
    reopened = problem(world, f"run:{audience.id}")
    assert (reopened.event, reopened.resolved_at, reopened.sent_count) == ("run_failed", None, 1)


def test_without_webhooks_nothing_is_posted_or_written(world: World, hooks: Receiver) -> None:
    audience = world.create()
    for status in ("held", "succeeded"):
        alerts.after_run(
            world.state,
            world.settings,
            audience_id=audience.id,
            audience_key=audience.key,
            result=result(status, key=audience.key),
        )
    alerts.check_deliveries(world.state, world.settings)
    assert hooks.requests() == []
    assert world.rows("SELECT * FROM alert_problems") == []


def test_a_run_error_never_shows_a_workflow_url_in_full(world: World, hooks: Receiver) -> None:
    audience = world.create()
    settings = with_alerts(world.settings, hooks.url(SECRET_PATH))
    [workflow_url] = world.settings.tray.workflow_urls[:1]
    alerts.after_run(
        world.state,
        settings,
        audience_id=audience.id,
        audience_key=audience.key,
        result=result("failed", key=audience.key, error=f"could not reach {workflow_url}"),
    )
    [body] = bodies(hooks)
    assert workflow_url not in body["error"] and url_host(workflow_url) in body["error"]


def test_a_quoted_error_cannot_ping_a_slack_channel(world: World, hooks: Receiver) -> None:
    audience = world.create()
    settings = with_alerts(world.settings, hooks.url(SECRET_PATH))
    error = "column <!channel> & <@U123> not found"
    alerts.after_run(
        world.state,
        settings,
        audience_id=audience.id,
        audience_key=audience.key,
        result=result("failed", key=audience.key, error=error),
    )
    [body] = bodies(hooks)
    assert body["error"] == error  # the structured field as it was
    assert "<" not in body["text"] and ">" not in body["text"]
    assert "&lt;!channel&gt; &amp; &lt;@U123&gt;" in body["text"]


# -- deliveries -----------------------------------------------------------------------------------


def synced(world: World) -> str:
    """An audience of three users, synced to both workflow URLs (all sent)."""
    world.set_users(["u1", "u2", "u3"])
    audience = world.create()
    assert world.sync(audience.key).status == RUN_SUCCEEDED
    return audience.key


def destination_of(world: World, key: str, path: str) -> int:
    [delivery, *_] = world.deliveries(key, path=path)
    return int(world.scalar("SELECT destination_id FROM deliveries WHERE id = :id", id=delivery.id))


def set_deliveries(world: World, destination_id: int, **values: Any) -> None:
    with world.state.begin() as conn:
        conn.execute(
            update(DELIVERIES).where(DELIVERIES.c.destination_id == destination_id).values(**values)
        )


def test_deliveries_failed_for_good_are_posted_once_then_resolved(
    world: World, hooks: Receiver
) -> None:
    key = synced(world)
    settings = with_alerts(world.settings, hooks.url(SECRET_PATH), repeat_after_seconds=3600)
    w1 = destination_of(world, key, "w1")
    now = datetime.now(UTC)
    set_deliveries(world, w1, status="failed", last_attempt_at=now, last_error="HTTP 404")

    alerts.check_deliveries(world.state, settings)
    alerts.check_deliveries(world.state, settings)

    [body] = bodies(hooks)
    assert body["event"] == "url_failed"
    assert body["problem"] == f"url:{w1}"
    assert body["url_host"] == world.rx.url("w1").split("/")[2]
    assert (body["failed"], body["error"]) == (3, "HTTP 404")
    assert body["audience_key"] is None
    text = body["text"]
    for word in [body["url_host"], "failed for good", "3", "HTTP 404", "syncer retry"]:
        assert word in text, (word, text)
    assert "/w1" not in text  # the workflow URL's path is a secret too

    # nothing failed for an hour: resolved, once
    set_deliveries(world, w1, last_attempt_at=now - timedelta(seconds=3601))
    alerts.check_deliveries(world.state, settings)
    alerts.check_deliveries(world.state, settings)
    assert [b["event"] for b in bodies(hooks)] == ["url_failed", "resolved"]
    assert bodies(hooks)[1]["resolves"] == "url_failed"
    assert bodies(hooks)[1]["url_host"] == body["url_host"]


def test_deliveries_owed_too_long_are_posted_and_resolved_when_sent(
    world: World, hooks: Receiver
) -> None:
    key = synced(world)
    settings = with_alerts(world.settings, hooks.url(SECRET_PATH), owed_longer_than_seconds=3600)
    w2 = destination_of(world, key, "w2")
    oldest = datetime.now(UTC) - timedelta(hours=2)
    set_deliveries(world, w2, status="pending", owed_since=oldest, delivered_at=None)

    alerts.check_deliveries(world.state, settings)
    alerts.check_deliveries(world.state, settings)

    [body] = bodies(hooks)
    assert body["event"] == "deliveries_owed"
    assert body["problem"] == f"owed:{w2}"
    assert body["owed"] == 3
    assert body["owed_since"] == alerts._iso(oldest)
    assert "owed for longer than 1h" in body["text"] and body["url_host"] in body["text"]

    # owed for less than the threshold: not a problem
    set_deliveries(world, w2, owed_since=datetime.now(UTC) - timedelta(minutes=59))
    alerts.check_deliveries(world.state, settings)
    assert [b["event"] for b in bodies(hooks)] == ["deliveries_owed", "resolved"]
    assert problem(world, f"owed:{w2}").resolved_at is not None


# -- hostile webhooks -------------------------------------------------------------------------------


class RedirectHandler(http.server.BaseHTTPRequestHandler):
    server: Redirecting

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(307)
        self.send_header("Location", self.server.target)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


class Redirecting(http.server.ThreadingHTTPServer):
    """Answers every POST with a 307 to ``target``."""

    daemon_threads = True

    def __init__(self, target: str) -> None:
        self.target = target
        super().__init__(("127.0.0.1", 0), RedirectHandler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{path}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join()


@pytest.mark.parametrize("fault", ["slow", "500", "redirect"])
def test_a_hostile_webhook_costs_bounded_time_and_leaves_its_host_in_last_error(
    world: World, hooks: Receiver, caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    audience = world.create()
    redirecting = Redirecting(hooks.url("elsewhere"))
    try:
        if fault == "redirect":
            url = redirecting.url(SECRET_PATH)
        else:
            url = hooks.url(SECRET_PATH)
            hooks.set_faults(slow_seconds=30)
            hooks.set_status(SECRET_PATH, fault)
        host = url_host(url)
        settings = with_alerts(world.settings, url, timeout_seconds=TIMEOUT)
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="syncer.alerts"):
            alerts.after_run(
                world.state,
                settings,
                audience_id=audience.id,
                audience_key=audience.key,
                result=result("held", key=audience.key),
            )
        assert time.monotonic() - started < LATEST
    finally:
        redirecting.close()

    tries = 1 if fault == "redirect" else alerts.POST_ATTEMPTS
    assert len(hooks.requests(SECRET_PATH)) == (0 if fault == "redirect" else tries)
    assert hooks.requests("elsewhere") == []  # a redirect is never followed
    row = problem(world, f"run:{audience.id}")
    expected = {"slow": "timeout", "500": "HTTP 500", "redirect": "HTTP 307"}[fault]
    assert row.last_error.startswith(f"{host}: {expected}"), row.last_error
    # not posted: the next check tries again, and it is no send
    assert (row.last_sent_at, row.sent_count) == (None, 0)
    assert host in caplog.text
    assert_no_secret(row.last_error, caplog.text)


def test_a_webhook_that_answers_429_then_200_is_retried_and_accepted(
    world: World, hooks: Receiver
) -> None:
    audience = world.create()
    hooks.fail_next(2, "429", path=SECRET_PATH)
    settings = with_alerts(world.settings, hooks.url(SECRET_PATH))
    alerts.after_run(
        world.state,
        settings,
        audience_id=audience.id,
        audience_key=audience.key,
        result=result("failed", key=audience.key),
    )
    statuses = [r.status for r in hooks.requests(SECRET_PATH)]
    assert statuses == [429, 429, 200]
    row = problem(world, f"run:{audience.id}")
    assert (row.sent_count, row.last_error) == (1, None)


def test_a_post_nobody_took_is_tried_again_by_the_next_check(world: World, hooks: Receiver) -> None:
    key = synced(world)
    w1 = destination_of(world, key, "w1")
    set_deliveries(world, w1, status="failed", last_attempt_at=datetime.now(UTC))
    settings = with_alerts(world.settings, hooks.url(SECRET_PATH), timeout_seconds=TIMEOUT)
    hooks.set_status(SECRET_PATH, 503)
    alerts.check_deliveries(world.state, settings)
    assert problem(world, f"url:{w1}").last_error.startswith(url_host(hooks.url()))

    hooks.set_status(SECRET_PATH, None)
    alerts.check_deliveries(world.state, settings)
    accepted: list[RecordedRequest] = hooks.accepted(SECRET_PATH)
    assert [r.json["event"] for r in accepted] == ["url_failed"]
    row = problem(world, f"url:{w1}")
    assert (row.sent_count, row.last_error) == (1, None)


def test_a_check_stops_at_the_first_alert_no_webhook_takes(world: World, hooks: Receiver) -> None:
    key = synced(world)
    w1, w2 = destination_of(world, key, "w1"), destination_of(world, key, "w2")
    now = datetime.now(UTC)
    set_deliveries(world, w1, status="failed", last_attempt_at=now)
    set_deliveries(world, w2, status="pending", owed_since=now - timedelta(hours=2))
    settings = with_alerts(world.settings, hooks.url(SECRET_PATH), timeout_seconds=TIMEOUT)
    hooks.set_status(SECRET_PATH, 503)

    alerts.check_deliveries(world.state, settings)

    assert len(hooks.requests(SECRET_PATH)) == alerts.POST_ATTEMPTS  # one alert's tries
    assert problem(world, f"owed:{w2}") is None  # left for the next check
    hooks.set_status(SECRET_PATH, None)
    alerts.check_deliveries(world.state, settings)
    assert sorted(r.json["event"] for r in hooks.accepted(SECRET_PATH)) == [
        "deliveries_owed",
        "url_failed",
    ]


def test_a_webhook_nobody_listens_on_raises_nothing(world: World, hooks: Receiver) -> None:
    audience = world.create()
    closed = hooks.url(SECRET_PATH)
    hooks.stop()
    settings = with_alerts(world.settings, closed, timeout_seconds=TIMEOUT)
    alerts.after_run(
        world.state,
        settings,
        audience_id=audience.id,
        audience_key=audience.key,
        result=result("held", key=audience.key),
    )
    row = problem(world, f"run:{audience.id}")
    assert row.last_error.startswith(f"{url_host(closed)}: connection error")
    assert_no_secret(row.last_error)


# -- syncer serve ---------------------------------------------------------------------------------


def test_serve_posts_deliveries_owed_and_never_logs_the_webhook_url(
    lite_world: World, hooks: Receiver
) -> None:
    """The leader looks at once, then every minute: owed deliveries are posted, and serve's own
    retry then sends them (the problem resolves on a later look)."""
    world = lite_world
    key = synced(world)
    w2 = destination_of(world, key, "w2")
    oldest = datetime.now(UTC) - timedelta(hours=2)
    set_deliveries(world, w2, status="pending", owed_since=oldest, next_attempt_at=oldest)
    webhook = hooks.url(SECRET_PATH)
    settings = write_settings(
        world.tmp_path / "serve.toml",
        state_url=world.state_url,
        sources={"default": world.source_url},
        workflow_urls=world.urls,
        shared_secret=TEST_SECRET,
        extra=f"[alerts]\nwebhook_urls = [{toml_value(webhook)}]\n",
    )
    with start_cli("--log-level", "debug", "serve", settings=settings) as serve:
        wait_until(lambda: hooks.requests(SECRET_PATH), "the owed alert", 30, serve)
        wait_until(lambda: world.statuses(key, path="w2") == {"sent": 3}, "the retry", 30, serve)
        assert serve.stop() == 0
    [body, *_] = bodies(hooks)
    assert (body["event"], body["problem"], body["owed"]) == ("deliveries_owed", f"owed:{w2}", 3)
    output = serve.read_stdout() + serve.read_stderr()
    assert LEADING in output
    assert_no_secret(output)
    assert webhook not in output


# -- settings through the CLI -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alerts_toml", "named"),
    [
        ('webhook_urls = ["https://hooks.example.com/T0SECRET/x y"]', ["webhook_urls[0]"]),
        ('webhook_urls = ["ftp://hooks.example.com/T0SECRET"]', ["webhook_urls[0]", "http"]),
        (
            "webhook_urls = ["
            + ", ".join(f'"https://h{i}.example.com/T0SECRET"' for i in range(11))
            + "]",
            ["11 URLs", "at most 10"],
        ),
        (
            'webhook_urls = ["https://hooks.example.com/T0SECRET", '
            '"HTTPS://hooks.example.com:443/T0SECRET"]',
            ["webhook_urls[1]", "hooks.example.com", "same URL"],
        ),
        ('webhook_url = "https://hooks.example.com/T0SECRET"', ["unknown key 'webhook_url'"]),
        ('owed_longer_than = "soon"', ["owed_longer_than", "not a duration"]),
        ('repeat_after = "10s"', ["repeat_after", "out of range"]),
        ("timeout_seconds = 0", ["timeout_seconds", "positive"]),
        ("timeout_seconds = 1000", ["timeout_seconds", "at most 300"]),
    ],
)
def test_bad_alert_settings_are_one_line_and_exit_2(
    tmp_path: Path, sqlite_url: str, alerts_toml: str, named: list[str]
) -> None:
    settings = write_settings(tmp_path, state_url=sqlite_url, extra=f"[alerts]\n{alerts_toml}\n")
    line = assert_usage_error(run_cli("audience", "list", settings=settings), "[alerts]", *named)
    assert_no_secret(line)
