"""Client.run_many (issue 17): one pipelined submit, one blocking read over many result streams; results in input
order, one per item; each item stands alone (a session without a worker gives that item NoWorkerError in its place,
the others their results)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import pytest
from helpers import RedisServer, wait_for

from producer import Client, ClientSettings, NoWorkerError, Result
from worker.errors import ConfigError, InvalidRequestError
from worker.loop import Worker


def _client(server: RedisServer, no_worker_after: float = 10.0) -> Client:
    return Client(settings=ClientSettings(redis_url=server.url, no_worker_after=no_worker_after))


def test_results_come_in_input_order_one_per_item(
    redis_server: RedisServer, worker_process: Callable[..., subprocess.Popen[bytes]], session_id: str
) -> None:
    """Workers in processes of their own, as deployed (a timeout's kill in one must not be seen by another)."""
    names = [f"{session_id}-{i}" for i in range(4)]
    client = _client(redis_server)
    for name in names:
        worker_process(name)
    wait_for(lambda: all(client.session(n).worker_alive() for n in names), timeout=30)
    items: list[tuple[object, ...]] = [
        (names[0], "export A=first"),
        (names[1], "sleep 0.3; echo slow"),
        (names[0], "echo $A"),  # after the export: one session's commands run in the order given
        (names[2], "echo $B; pwd", {"env": {"B": "b"}, "cwd": "/tmp"}),
        (names[3], "sleep 5", {"timeout": 0.3}),
        (names[1], "echo fast"),
    ]
    results = client.run_many(items)
    assert all(isinstance(r, Result) for r in results), results
    out = [r.stdout for r in results if isinstance(r, Result)]
    assert out == ["", "slow\n", "first\n", "b\n/tmp\n", "", "fast\n"]
    assert [r.status for r in results if isinstance(r, Result)][4] == "timeout"


def test_each_item_stands_alone(
    redis_server: RedisServer, start_worker: Callable[..., Worker], session_id: str
) -> None:
    """A session no worker serves, a malformed item, an unknown option, a bad session id: each gets its own error in
    its place; the good items their results. The unserved command is cancelled: it will never run."""
    served = f"{session_id}-ok"
    start_worker(served)
    client = _client(redis_server, no_worker_after=1.0)
    started = time.monotonic()
    results = client.run_many(
        [
            (served, "echo one"),
            (f"{session_id}-nobody", "echo never"),
            ("bad id!", "true"),
            (served,),
            (served, "true", {"retries": 3}),
            (served, "echo two"),
        ]
    )
    assert time.monotonic() - started < 10
    assert isinstance(results[0], Result) and results[0].stdout == "one\n"
    assert isinstance(results[1], NoWorkerError) and results[1].cancelled
    assert isinstance(results[2], ConfigError)
    assert isinstance(results[3], InvalidRequestError) and isinstance(results[4], InvalidRequestError)
    assert isinstance(results[5], Result) and results[5].stdout == "two\n"


def test_an_id_accepted_before_answers_with_its_result(
    redis_server: RedisServer, start_worker: Callable[..., Worker], session_id: str
) -> None:
    start_worker(session_id)
    client = _client(redis_server)
    first = client.session(session_id).run("n=$((n + 1)); echo $n", id="once")
    (again,) = client.run_many([(session_id, "n=$((n + 1)); echo $n", {"id": "once", "idempotent": True})])
    assert isinstance(again, Result) and again.stdout == first.stdout == "1\n"


@pytest.mark.timeout(120)
def test_many_sessions_at_once(redis_server: RedisServer, start_worker: Callable[..., Worker], session_id: str) -> None:
    names = [f"{session_id}-{i}" for i in range(24)]
    for name in names:
        start_worker(name)
    client = _client(redis_server)
    for round_ in range(3):
        results = client.run_many([(name, f"echo {name} {round_}") for name in names])
        assert [r.stdout if isinstance(r, Result) else r for r in results] == [f"{n} {round_}\n" for n in names]
