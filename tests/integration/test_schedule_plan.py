"""When `syncer serve` first runs an audience: at once if it never ran or a slot was missed
(once, coalesced), else at its next slot; cron expressions in the configured time zone."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import Engine, insert

import syncer.db
from syncer import audiences
from syncer.models import SyncRun
from syncer.scheduler import Plan, Service
from syncer.settings import load_settings
from tests.helpers import make_warehouse, write_settings

BERLIN = ZoneInfo("Europe/Berlin")


@pytest.fixture
def service(tmp_path: Path, state_url: str) -> Iterator[Service]:
    warehouse = make_warehouse(tmp_path / "warehouse.db", ["u1", "u2"])
    path = write_settings(
        tmp_path / "settings.toml",
        state_url=state_url,
        sources={"default": warehouse},
        workflow_urls=["http://127.0.0.1:9/w1"],
        extra='[schedule]\ntimezone = "Europe/Berlin"\n',
    )
    settings = load_settings(str(path))
    syncer.db.upgrade(settings.database.url)
    state = syncer.db.open_state(settings.database.url)
    try:
        yield Service(settings, state)
    finally:
        state.dispose()


def _audience(service: Service, *, every: str | None = None, cron: str | None = None) -> Plan:
    view = audiences.create(
        service.state,
        service.settings,
        name="Planned",
        sql="SELECT user_id FROM users",
        schedule=audiences.parse_schedule(every, cron),
    )
    return Plan(
        audience_id=view.id,
        key=view.key,
        every_seconds=view.schedule.every_seconds,
        cron=view.schedule.cron,
        updated_at=view.updated_at,
    )


def _ran_at(state: Engine, audience_id: int, when: datetime) -> None:
    with state.begin() as conn:
        conn.execute(
            insert(SyncRun).values(
                audience_id=audience_id,
                kind="initial",
                status="succeeded",
                started_at=when,
                committed_at=when,
                finished_at=when,
                host="elsewhere",
                pid=1,
            )
        )


def _close(a: datetime, b: datetime) -> bool:
    return abs((a - b).total_seconds()) < 5


def test_a_new_audience_runs_at_once(service: Service) -> None:
    _, first = service._trigger(_audience(service, every="1h"))
    assert _close(first, datetime.now(UTC))


def test_a_new_cron_audience_runs_at_once_not_at_its_first_slot(service: Service) -> None:
    plan = _audience(service, cron="0 3 * * *")
    _, first = service._trigger(plan)
    assert _close(first, datetime.now(UTC))


def test_an_interval_continues_from_the_last_run(service: Service) -> None:
    plan = _audience(service, every="1h")
    last = datetime.now(UTC) - timedelta(minutes=10)
    _ran_at(service.state, plan.audience_id, last)
    trigger, first = service._trigger(plan)
    assert _close(first, last + timedelta(hours=1))
    following = trigger.get_next_fire_time(first, first + timedelta(seconds=1))
    assert _close(following, first + timedelta(hours=1))


def test_missed_interval_slots_run_once_now(service: Service) -> None:
    plan = _audience(service, every="1h")
    _ran_at(service.state, plan.audience_id, datetime.now(UTC) - timedelta(hours=7))
    _, first = service._trigger(plan)
    assert _close(first, datetime.now(UTC))


def test_cron_slots_are_in_the_configured_time_zone(service: Service) -> None:
    plan = _audience(service, cron="0 9 * * *")
    _ran_at(service.state, plan.audience_id, datetime.now(UTC))
    _, first = service._trigger(plan)
    local = first.astimezone(BERLIN)
    assert (local.hour, local.minute) == (9, 0)
    assert timedelta(0) < first - datetime.now(UTC) <= timedelta(days=1)


def test_a_missed_cron_slot_runs_once_now(service: Service) -> None:
    plan = _audience(service, cron="0 9 * * *")
    _ran_at(service.state, plan.audience_id, datetime.now(UTC) - timedelta(days=3))
    _, first = service._trigger(plan)
    assert _close(first, datetime.now(UTC))
