"""The loopback Tray stand-in works with a real pooled HTTP client."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.receiver import Receiver, ReceiverProcess, read_record_file, sign


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5) as c:
        yield c


def identify(user_id: str, traits: dict[str, bool]) -> dict[str, object]:
    return {"type": "identify", "userId": user_id, "traits": traits, "messageId": f"m-{user_id}"}


def post(
    client: httpx.Client, url: str, message: dict[str, object], secret: str | None = None
) -> httpx.Response:
    body = json.dumps(message).encode()
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers["X-Signature"] = sign(secret, body)
    return client.post(url, content=body, headers=headers)


def test_records_requests_per_path(receiver: Receiver, client: httpx.Client) -> None:
    response = post(client, receiver.url("w1"), identify("u1", {"a": True}))
    post(client, receiver.url("w2"), identify("u2", {"a": True}))

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    [record] = receiver.requests("w1")
    assert record.path == "/w1"
    assert record.method == "POST"
    assert record.headers["CONTENT-TYPE"] == "application/json"
    assert "content-type" in record.headers
    assert record.json == identify("u1", {"a": True})
    assert json.loads(record.body) == record.json
    assert record.status == 200
    assert record.accepted
    assert record.fault is None
    assert record.user_id == "u1"
    assert record.message_type == "identify"
    assert [r.path for r in receiver.requests()] == ["/w1", "/w2"]
    assert receiver.requests(receiver.url("w2")) == receiver.requests("/w2")
    assert receiver.url("w1") == f"http://127.0.0.1:{receiver.port}/w1"


def test_signature_checked_against_exact_body(receiver: Receiver, client: httpx.Client) -> None:
    post(client, receiver.url("w1"), identify("good", {"a": True}), secret="test-secret")
    post(client, receiver.url("w1"), identify("wrong", {"a": True}), secret="other")
    post(client, receiver.url("w1"), identify("unsigned", {"a": True}))

    outcome = {r.user_id: r.signature_ok for r in receiver.requests("w1")}
    assert outcome == {"good": True, "wrong": False, "unsigned": False}
    assert all(r.status == 200 for r in receiver.requests())  # it records, it does not reject


def test_signature_not_checked_without_secret(client: httpx.Client) -> None:
    with Receiver() as rx:
        post(client, rx.url("w1"), identify("u1", {"a": True}), secret="anything")
        assert rx.requests()[0].signature_ok is None


def test_fixed_statuses_per_path_and_user(receiver: Receiver, client: httpx.Client) -> None:
    receiver.set_status("down", 500)
    receiver.set_status(receiver.url("bad"), 400)
    receiver.set_user_status("u-broken", 422)

    assert post(client, receiver.url("down"), identify("u1", {"a": True})).status_code == 500
    assert post(client, receiver.url("bad"), identify("u1", {"a": True})).status_code == 400
    assert post(client, receiver.url("w1"), identify("u-broken", {"a": True})).status_code == 422
    assert post(client, receiver.url("w1"), identify("u1", {"a": True})).status_code == 200
    assert receiver.requests("down")[0].fault == "path:500"
    assert receiver.requests("w1")[0].fault == "user:422"
    assert [r.user_id for r in receiver.accepted()] == ["u1"]

    receiver.clear_faults()
    assert post(client, receiver.url("down"), identify("u1", {"a": True})).status_code == 200


def test_fail_next_then_normal(receiver: Receiver, client: httpx.Client) -> None:
    receiver.fail_next(2, "503", path="w1")
    codes = [
        post(client, receiver.url("w1"), identify("u1", {"a": True})).status_code for _ in "abc"
    ]
    assert codes == [503, 503, 200]


@pytest.mark.parametrize(
    ("retry_after", "expected"), [("0", "0"), (3, "3"), (None, None)], ids=["0", "3", "none"]
)
def test_fault_429_carries_retry_after(
    client: httpx.Client, retry_after: str | int | None, expected: str | None
) -> None:
    with Receiver(fail_ratio=1.0, fault_modes=["429"], retry_after=retry_after) as rx:
        response = post(client, rx.url("w1"), identify("u1", {"a": True}))
        assert response.status_code == 429
        assert response.headers.get("Retry-After") == expected
        assert rx.requests()[0].status == 429
        assert rx.accepted() == []


def test_fault_503(client: httpx.Client) -> None:
    with Receiver(fail_ratio=1.0, fault_modes=["503"]) as rx:
        assert post(client, rx.url("w1"), identify("u1", {"a": True})).status_code == 503
        assert rx.requests()[0].fault == "503"


def test_fault_drop_is_a_transport_error(client: httpx.Client) -> None:
    with Receiver(fail_ratio=1.0, fault_modes=["drop"]) as rx:
        with pytest.raises(httpx.TransportError):
            post(client, rx.url("w1"), identify("u1", {"a": True}))
        [record] = rx.requests()
        assert record.status == "dropped"
        assert not record.accepted
        rx.clear_faults()  # the pool recovers from the dropped connection
        assert post(client, rx.url("w1"), identify("u1", {"a": True})).status_code == 200


def test_fault_slow_trips_client_timeout() -> None:
    with (
        Receiver(fail_ratio=1.0, fault_modes=["slow"], slow_seconds=2) as rx,
        httpx.Client(timeout=0.2) as client,
    ):
        started = time.monotonic()
        with pytest.raises(httpx.TimeoutException):
            post(client, rx.url("w1"), identify("u1", {"a": True}))
        assert time.monotonic() - started < 1.5
        [record] = rx.requests()
        assert record.status == "slow"
        assert rx.accepted() == []
    # leaving the block stopped the receiver without waiting out the 2 s sleep


def test_faults_are_deterministic_for_a_seed(client: httpx.Client) -> None:
    def outcomes(seed: int) -> list[int]:
        with Receiver(fail_ratio=0.5, fault_modes=["503", "429"], seed=seed) as rx:
            return [
                post(client, rx.url("w1"), identify(f"u{i}", {"a": True})).status_code
                for i in range(40)
            ]

    first = outcomes(seed=7)
    assert first == outcomes(seed=7)
    assert first != outcomes(seed=8)
    assert {200, 503, 429} == set(first)


def test_faults_change_at_runtime(receiver: Receiver, client: httpx.Client) -> None:
    receiver.set_faults(fail_ratio=1.0, fault_modes=["503"])
    assert post(client, receiver.url("w1"), identify("u1", {"a": True})).status_code == 503
    receiver.fail_ratio = 0.0
    assert post(client, receiver.url("w1"), identify("u1", {"a": True})).status_code == 200
    with pytest.raises(ValueError):
        receiver.fault_modes = ["teapot"]
    with pytest.raises(ValueError):
        receiver.fail_ratio = 1.5


def test_final_traits_last_value_wins_and_deletes(receiver: Receiver, client: httpx.Client) -> None:
    url = receiver.url("w1")
    post(client, url, identify("u1", {"a": True}))
    post(client, url, identify("u1", {"b": True}))
    post(client, url, identify("u2", {"a": True}))
    post(client, url, identify("u1", {"a": False}))
    receiver.set_user_status("u2", 500)
    post(client, url, identify("u2", {"a": False}))  # not accepted: does not count
    post(client, url, {"type": "delete", "userId": "u3", "messageId": "d1"})
    post(client, receiver.url("w2"), identify("u1", {"a": True}))

    assert receiver.final_traits("w1") == {"u1": {"a": False, "b": True}, "u2": {"a": True}}
    assert receiver.final_traits("w2") == {"u1": {"a": True}}
    assert receiver.deletes("w1") == ["u3"]
    assert receiver.deletes("w2") == []


def test_wait_for_counts_accepted_requests(receiver: Receiver, client: httpx.Client) -> None:
    receiver.fail_next(1, "503")
    url = receiver.url("w1")

    def send() -> None:
        time.sleep(0.1)
        for i in range(4):
            post(client, url, identify(f"u{i}", {"a": True}))

    sender = threading.Thread(target=send)
    sender.start()
    try:
        found = receiver.wait_for(3, path="w1", timeout=5)
    finally:
        sender.join()
    assert len(found) >= 3
    assert all(r.accepted for r in found)
    with pytest.raises(TimeoutError, match="3 of 5 accepted"):
        receiver.wait_for(5, path="w1", timeout=0.2)


def test_chunked_body_is_read(receiver: Receiver, client: httpx.Client) -> None:
    body = json.dumps(identify("u1", {"a": True})).encode()
    response = client.post(receiver.url("w1"), content=iter([body[:10], body[10:]]))
    assert response.status_code == 200
    assert receiver.requests()[0].json == identify("u1", {"a": True})


def test_keep_alive_pool_hundreds_per_second(receiver: Receiver, client: httpx.Client) -> None:
    count = 300
    started = time.monotonic()
    for i in range(count):
        assert post(client, receiver.url("w1"), identify(f"u{i}", {"a": True})).is_success
    elapsed = time.monotonic() - started

    assert len(receiver.accepted("w1")) == count
    assert len({r.client_port for r in receiver.requests()}) == 1  # one kept-alive connection
    assert count / elapsed > 100, f"{count / elapsed:.0f} requests/s"


def test_concurrent_clients_all_recorded(receiver: Receiver) -> None:
    with httpx.Client(limits=httpx.Limits(max_connections=16)) as client:

        def send(worker: int) -> None:
            for i in range(50):
                post(
                    client, receiver.url(f"w{worker % 3}"), identify(f"u{worker}-{i}", {"a": True})
                )

        threads = [threading.Thread(target=send, args=(n,)) for n in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    records = receiver.requests()
    assert len(records) == 16 * 50
    assert [r.seq for r in records] == list(range(16 * 50))


def test_stop_cuts_idle_keep_alive_connections(client: httpx.Client) -> None:
    rx = Receiver().start()
    post(client, rx.url("w1"), identify("u1", {"a": True}))
    started = time.monotonic()
    rx.stop()  # the client still holds its connection open
    assert time.monotonic() - started < 2
    with pytest.raises(httpx.TransportError):
        post(client, rx.url("w1"), identify("u1", {"a": True}))


def test_restart_keeps_port_and_records(client: httpx.Client) -> None:
    with Receiver() as rx:
        url = rx.url("w1")
        post(client, url, identify("u1", {"a": True}))
        rx.stop()  # "Tray is down"
        with pytest.raises(httpx.TransportError):
            post(client, url, identify("u2", {"a": True}))
        rx.start()
        assert rx.url("w1") == url
        assert post(client, url, identify("u3", {"a": True})).status_code == 200
        assert [r.user_id for r in rx.accepted()] == ["u1", "u3"]


def test_subprocess_mode_prints_port_and_records_lines(tmp_path: Path) -> None:
    record = tmp_path / "record.jsonl"
    with ReceiverProcess(record, secret="s3cret") as proc, httpx.Client(timeout=5) as client:
        for i in range(3):
            post(client, proc.url("w1"), identify(f"u{i}", {"a": True}), secret="s3cret")
        assert proc.port > 0
        lines = proc.records("w1")
    assert [line["body"]["userId"] for line in lines] == ["u0", "u1", "u2"]
    assert all(line["status"] == 200 and line["signature_ok"] for line in lines)


def test_subprocess_mode_survives_kill_9_of_the_client_count(tmp_path: Path) -> None:
    record = tmp_path / "record.jsonl"
    proc = ReceiverProcess(record, fail_ratio=0.5, fault_modes=["503"], seed=1).start()
    try:
        with httpx.Client(timeout=5) as client:
            codes = [
                post(client, proc.url("w1"), identify(f"u{i}", {"a": True})).status_code
                for i in range(20)
            ]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.stop()
    lines = read_record_file(record)
    assert [line["status"] for line in lines] == codes
    assert {200, 503} == set(codes)
