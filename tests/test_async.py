"""AsyncClient / AsyncSession (issue 17): the sync client's behaviours, run against both twins (parametrized);
a cancelled await loses no result; one event loop drives 200 sessions x 20 commands at once."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, RedisServer, wait_for

from producer import (
    AsyncClient,
    Client,
    ClientSettings,
    ConfigError,
    NoWorkerError,
    Result,
    ResultTimeoutError,
    ShellqError,
)
from worker.loop import Worker


class Twin:
    """The sync or the async client behind one set of calls, so each behaviour test runs against both."""

    def __init__(self, kind: str, url: str, no_worker_after: float) -> None:
        settings = ClientSettings(redis_url=url, no_worker_after=no_worker_after)
        self.kind = kind
        self.loop = asyncio.new_event_loop() if kind == "async" else None
        self.client: Any = AsyncClient(settings=settings) if kind == "async" else Client(settings=settings)

    def call(self, session: str, method: str, *args: Any, **kwargs: Any) -> Any:
        result = getattr(self.client.session(session), method)(*args, **kwargs)
        return self._wait(result)

    def run_many(self, items: list[tuple[Any, ...]], timeout: float | None = None) -> Any:
        return self._wait(self.client.run_many(items, timeout))

    def _wait(self, result: Any) -> Any:
        if self.loop is not None:
            return self.loop.run_until_complete(result)
        return result

    def close(self) -> None:
        if self.loop is not None:
            self.loop.run_until_complete(self.client.aclose())
            self.loop.close()
        else:
            self.client.close()


@pytest.fixture(params=["sync", "async"])
def twin(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[Twin]:
    t = Twin(request.param, redis_server.url, no_worker_after=1.5)
    yield t
    t.close()


def test_run_keeps_shell_state(twin: Twin, start_worker: Callable[..., Worker], session_id: str) -> None:
    start_worker(session_id)
    assert twin.call(session_id, "run", "cd /tmp && export A=1").exit_code == 0
    r = twin.call(session_id, "run", "echo $A; false")
    assert (r.status, r.exit_code, r.stdout, r.cwd) == ("completed", 1, "1\n", "/tmp")


def test_timeout_is_a_status(twin: Twin, start_worker: Callable[..., Worker], session_id: str) -> None:
    start_worker(session_id)
    r = twin.call(session_id, "run", "echo before; sleep 30", timeout=0.5)
    assert (r.status, r.stdout) == ("timeout", "before\n")


def test_submit_result_and_idempotent_ids(twin: Twin, start_worker: Callable[..., Worker], session_id: str) -> None:
    start_worker(session_id)
    cid = twin.call(session_id, "submit", "n=$((n + 1)); echo $n", id="c-once")
    assert twin.call(session_id, "submit", "n=$((n + 1)); echo $n", id="c-once") == cid  # queued nothing
    assert twin.call(session_id, "result", cid, timeout=10).stdout == "1\n"
    assert twin.call(session_id, "run", "echo $n").stdout == "1\n"


def test_interrupt_cancels_a_running_command(twin: Twin, start_worker: Callable[..., Worker], session_id: str) -> None:
    start_worker(session_id)
    cid = twin.call(session_id, "submit", "echo started; sleep 30")
    time.sleep(0.5)
    twin.call(session_id, "interrupt", cid)
    r = twin.call(session_id, "result", cid, timeout=15)
    assert (r.status, r.stdout) == ("cancelled", "started\n")


def test_no_worker_is_an_error_and_cancels(twin: Twin, session_id: str) -> None:
    started = time.monotonic()
    with pytest.raises(NoWorkerError) as e:
        twin.call(session_id, "run", "echo never")
    assert e.value.cancelled and time.monotonic() - started < 10


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_rediss_url_naming_a_plain_redis_is_a_config_error(kind: str, redis_server: RedisServer) -> None:
    """A plain Redis never answers a TLS handshake: both twins say the server does not speak TLS (ConfigError, not
    retried) instead of waiting out the read timeout on every retry."""
    t = Twin(kind, redis_server.url.replace("redis://", "rediss://", 1), no_worker_after=1.5)
    try:
        with pytest.raises(ConfigError, match="does not speak TLS: use a redis:// URL for it, not rediss://"):
            t.call("s1", "run", "true")
    finally:
        t.close()


def test_result_wait_ends_in_time(twin: Twin, start_worker: Callable[..., Worker], session_id: str) -> None:
    start_worker(session_id)
    cid = twin.call(session_id, "submit", "sleep 3")
    with pytest.raises(ResultTimeoutError):
        twin.call(session_id, "result", cid, timeout=0.3, cancel=False)
    assert twin.call(session_id, "result", cid, timeout=10).status == "completed"


def test_run_many_items_stand_alone(twin: Twin, start_worker: Callable[..., Worker], session_id: str) -> None:
    start_worker(session_id)
    results = twin.run_many([(session_id, "echo a"), (f"{session_id}-none", "true"), (session_id, "echo b")])
    assert isinstance(results[0], Result) and results[0].stdout == "a\n"
    assert isinstance(results[1], NoWorkerError)
    assert isinstance(results[2], Result) and results[2].stdout == "b\n"


def test_files_stdin_and_users(
    twin: Twin, start_worker: Callable[..., Worker], session_id: str, tmp_path: Path
) -> None:
    """Issue 18's operations on both twins: chunked and inline sizes, the error types, a tree both ways."""
    start_worker(session_id)
    base = tmp_path / "remote"
    twin.call(session_id, "run", f"mkdir -p {base} && cd {base}")
    big = os.urandom((3 << 20) + 5)
    twin.call(session_id, "write_file", "dir/big.bin", big)  # relative to the shell's cwd
    assert twin.call(session_id, "read_file", f"{base}/dir/big.bin") == big
    assert twin.call(session_id, "read_file", "dir/big.bin", max_bytes=3, offset=2) == big[2:5]
    [entry] = twin.call(session_id, "list_dir", "dir")
    assert (entry.path, entry.size, entry.is_dir) == ("dir/big.bin", len(big), False)
    with pytest.raises(FileNotFoundError) as missing:
        twin.call(session_id, "read_file", "dir/none")
    assert isinstance(missing.value, ShellqError) and missing.value.filename == "dir/none"
    assert twin.call(session_id, "run", "sha256sum", stdin=big).stdout.split()[0] == hashlib.sha256(big).hexdigest()
    assert twin.call(session_id, "run", "cat | wc -c", stdin=b"a\0b").stdout == "3\n"
    local = tmp_path / "local"
    twin.call(session_id, "download", f"{base}/dir", local)
    assert (local / "big.bin").read_bytes() == big
    twin.call(session_id, "upload", local, "copy")
    assert twin.call(session_id, "read_file", "copy/big.bin") == big
    if os.geteuid() == 0:
        assert twin.call(session_id, "run", "id -un", user="nobody").stdout == "nobody\n"


def test_cancelled_await_loses_no_result(
    redis_server: RedisServer, start_worker: Callable[..., Worker], session_id: str
) -> None:
    """A task awaiting `run` is cancelled: the command still runs to its one result, which `result(id)` finds; the
    client goes on working (the cancelled read's connection was closed, not left with a reply in it)."""
    start_worker(session_id)

    async def scenario() -> tuple[Result, Result]:
        async with AsyncClient(redis_server.url) as client:
            s = client.session(session_id)
            task = asyncio.create_task(s.run("sleep 0.5; echo done", id="c-cancelled-await"))
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return await s.result("c-cancelled-await", timeout=10), await s.run("echo after")

    late, after = asyncio.run(scenario())
    assert (late.status, late.stdout, after.stdout) == ("completed", "done\n", "after\n")


@pytest.mark.timeout(300)
def test_one_loop_drives_200_sessions(redis_server: RedisServer, tmp_path: Path, session_id: str) -> None:
    """200 sessions x 20 commands, all awaited concurrently on one event loop; every result is its command's.
    The workers are processes of their own, as deployed (200 in one process would measure its GIL)."""
    names = [f"{session_id}-{i}" for i in range(200)]
    env = {**os.environ, "SHELLQ_REDIS_URL": redis_server.url, "SHELLQ_HOME": str(tmp_path / "home")}
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "worker", "--session", name],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name in names
    ]
    try:
        check = Client(redis_server.url)
        wait_for(lambda: all(check.session(n).worker_alive() for n in names), timeout=180)

        async def drive(client: AsyncClient, name: str) -> list[str]:
            s = client.session(name)
            await s.run(f"export ME={name}")
            return [(await s.run(f"echo $ME {j}")).stdout for j in range(19)]

        async def everyone() -> list[list[str]]:
            async with AsyncClient(redis_server.url) as client:
                jobs: list[Coroutine[Any, Any, list[str]]] = [drive(client, n) for n in names]
                return list(await asyncio.gather(*jobs))

        outputs = asyncio.run(everyone())
        assert outputs == [[f"{n} {j}\n" for j in range(19)] for n in names]
        check.close()
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.wait(timeout=30)
