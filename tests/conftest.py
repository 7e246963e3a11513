"""Fixtures: fresh shells, real Redis/Valkey servers on free ports, in-process and subprocess workers."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT, RUN_ID, Cli, RedisServer, server_binaries, wait_for

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
def private_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of this test's own (it changes server-wide state: users, the Functions library), the first kind
    this machine has."""
    kind, binary = next(iter(server_binaries().items()))
    server = RedisServer(kind, binary, tmp_path)
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
        settings.setdefault("redis_url", redis_server.url)
        worker = Worker(WorkerSettings(session=session, **settings))
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


# -- Docker ----------------------------------------------------------------------------------------------------------

DOCKER_BASE = "shellq-base:bookworm"
"""The debootstrap base image .ci/run builds (containers/base-image.sh)."""


def need(condition: bool, why: str) -> None:
    """Skip without it on a developer's machine; in CI, where .ci/run sets everything up, fail."""
    if not condition:
        if os.environ.get("CI"):
            pytest.fail(f"{why} (CI must have it: .ci/run sets it up)")
        pytest.skip(why)


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    """The Docker engine; at the end of the module, no container of this run's sessions may be left (the docker SDK
    is imported here, not at the top: the shell tests also run inside the worker image, which lacks it). Other
    runs' and servers' containers on the engine are not this run's to judge or remove."""
    import docker
    from docker.errors import DockerException

    from containers.docker_backend import INSTANCE_LABEL, LABEL

    client = None
    try:
        client = docker.from_env()
        client.ping()
    except DockerException:
        client = None
    if client is None:  # the SDK leaves a socket behind when no engine answers: finalize it here, quietly
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
        need(False, "no Docker engine")
    assert client is not None
    yield client
    found = client.containers.list(all=True, filters={"label": LABEL}, ignore_removed=True)
    leftovers = [c for c in found if c.labels.get(INSTANCE_LABEL, "").startswith(RUN_ID)]
    for c in leftovers:
        c.remove(force=True)
    assert not leftovers, f"containers left behind: {[c.name for c in leftovers]}"


def build_image(engine: Any, base: str, tag: str, *extra: str) -> str:
    """`shellq image build --base BASE --tag TAG [EXTRA...]`, as a user runs it."""
    from docker.errors import DockerException

    try:
        engine.images.get(base)
    except DockerException:
        need(False, f"base image {base} missing (containers/base-image.sh builds it)")
    shellq = Path(sys.executable).parent / "shellq"
    build = [str(shellq), "image", "build", "--base", base, "--tag", tag, *extra]
    done = subprocess.run(build, capture_output=True, check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert b"Step 1/" in done.stderr  # progress is shown
    return tag


TEST_IMAGE = f"shellq-worker:test-{RUN_ID}"
"""This run's worker image: a tag of its own, so that test runs sharing an engine never run each other's code."""


@pytest.fixture(scope="module")
def image(engine: Any) -> str:
    """The worker image on the debootstrap base (built once per module from this checkout; layers are cached)."""
    return build_image(engine, DOCKER_BASE, TEST_IMAGE)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Remove this run's image tags (the layers stay in the build cache for the next run)."""
    if "docker" not in sys.modules:
        return
    import docker
    from docker.errors import DockerException

    try:
        client = docker.from_env()
        for found in client.images.list(name="shellq-worker"):
            for tag in found.tags:
                if tag.endswith(RUN_ID):
                    client.images.remove(tag, noprune=True)
        client.close()
    except DockerException:
        pass


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    """A private `shellq up` server for a module's tests, driven through the console script (helpers.Cli)."""
    script = Path(sys.executable).parent / "shellq"
    assert script.exists(), f"the console script is not installed next to {sys.executable} (pip install -e .)"
    run = Cli(tmp_path_factory.mktemp("shellq-home"))
    up = run("up")
    assert up.returncode == 0, up.stderr
    yield run
    run("down")


@pytest.fixture
def cli_session(cli: Cli, session_id: str) -> Iterator[str]:
    """A session started with `shellq session start` (a local worker) on the `cli` server; stopped afterwards."""
    started = cli("session", "start", "--name", session_id)
    assert started.returncode == 0, started.stderr
    assert started.stdout == f"{session_id}\n".encode()
    yield session_id
    cli("session", "stop", session_id)
