"""Fixtures: fresh shells, real Redis/Valkey servers on free ports, in-process and subprocess workers."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, RedisServer, server_binaries, wait_for

from worker import protocol
from worker.loop import Worker
from worker.settings import WorkerSettings
from worker.shell import Shell


@pytest.fixture
def make_shell(tmp_path: Path) -> Iterator[Callable[..., Shell]]:
    """Factory for shells whose session directory lies under `tmp_path`; every shell made is closed at teardown."""
    shells: list[Shell] = []

    def make(**kwargs: Any) -> Shell:
        if "work_dir" not in kwargs:
            work_dir = tmp_path / f"session{len(shells)}"
            work_dir.mkdir()
            kwargs["work_dir"] = str(work_dir)
        sh = Shell(**kwargs)
        shells.append(sh)
        return sh

    yield make
    for sh in shells:
        sh.close()


@pytest.fixture
def shell(make_shell: Callable[..., Shell]) -> Shell:
    """A fresh shell with the default settings."""
    return make_shell()


# -- Redis servers and workers -------------------------------------------------------------------------------------


@pytest.fixture(scope="session", params=["redis", "valkey"])
def redis_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """Each loop test runs against redis-server 7.0 and Valkey 9. Missing one fails in CI and skips elsewhere."""
    binaries = server_binaries()
    if request.param not in binaries:
        if os.environ.get("CI"):
            pytest.fail(f"{request.param} server binary not found; scripts/bootstrap installs it")
        pytest.skip(f"no {request.param} server binary here")
    server = RedisServer(request.param, binaries[request.param], tmp_path_factory.mktemp(request.param))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def session_id() -> str:
    """A fresh session id per test, so tests never see each other's streams."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def start_worker(redis_server: RedisServer, tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """Start an in-process worker (a thread) for a session; stopped and joined at teardown."""
    running: list[tuple[Worker, threading.Thread]] = []

    def start(session: str, **settings: Any) -> Worker:
        settings.setdefault("work_dir", tmp_path / f"work-{session}-{len(running)}")
        settings.setdefault("heartbeat", 0.2)
        settings.setdefault("lease_ttl", 1.5)
        worker = Worker(WorkerSettings(redis_url=redis_server.url, session=session, **settings))
        thread = threading.Thread(target=worker.serve, name=f"worker-{session}", daemon=True)
        thread.start()
        running.append((worker, thread))
        wait_for(lambda: redis_server.client().hget(protocol.keys(session).meta, "heartbeat_ms") is not None)
        return worker

    yield start
    for worker, thread in running:
        worker.stop(grace=0)
        thread.join(timeout=15)


@pytest.fixture
def worker_process(redis_server: RedisServer, tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start `python -m worker` as a subprocess; killed at teardown if still running."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(session: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        full_env = {**os.environ, "SHELLQ_REDIS_URL": redis_server.url, "SHELLQ_SESSION": session}
        full_env.update({"SHELLQ_HEARTBEAT": "0.2", "SHELLQ_LEASE_TTL": "1.5"})
        full_env.setdefault("SHELLQ_WORK_DIR", str(tmp_path / f"work-{session}"))
        full_env.update(env or {})
        with open(tmp_path / f"worker-{session}-{len(procs)}.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "worker", *args], env=full_env, stdout=log, stderr=log, cwd=ROOT
            )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
