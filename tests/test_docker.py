"""Sessions in real containers on a real Docker engine. In CI the engine and the debootstrap base images are there
(.ci/run); on a developer machine without an engine these tests skip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from conftest import build_image, need
from docker.errors import DockerException
from helpers import ROOT, RUN_ID, RedisServer, server_binaries, wait_for

from containers.docker_backend import LABEL, DockerBackend
from producer import Client, ClientSettings, Session
from worker import protocol

pytestmark = pytest.mark.docker
SHELLQ = Path(sys.executable).parent / "shellq"
BASE = "shellq-base:bookworm"
SECOND_BASE = "shellq-base:trixie"


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = RedisServer("redis", server_binaries()["redis"], tmp_path_factory.mktemp("docker-redis"))
    server.start("--appendonly", "yes")
    yield server.url
    server.stop()


@pytest.fixture
def backend(image: str, redis_url: str) -> Iterator[DockerBackend]:
    with DockerBackend(redis_url, image=image) as b:
        yield b


def session(redis_url: str, name: str) -> Session:
    return Client(settings=ClientSettings(redis_url=redis_url, no_worker_after=5)).session(name)


FAST = {"SHELLQ_HEARTBEAT": "0.2", "SHELLQ_LEASE_TTL": "1.5", "SHELLQ_KILL_GRACE": "0.3"}


def test_start_exec_stop_in_a_container(backend: DockerBackend, redis_url: str, session_id: str) -> None:
    container_id = backend.start(session_id, env=FAST)
    s = session(redis_url, session_id)
    assert s.run("test -f /.dockerenv && cd /tmp && export INSIDE=yes").exit_code == 0
    r = s.run("echo $INSIDE; pwd; cat /proc/1/cmdline | tr '\\0' ' '")
    assert r.stdout.splitlines()[:2] == ["yes", "/tmp"]
    assert "docker-init" in r.stdout  # an init that reaps is PID 1
    timed = s.run("echo before; sleep 30", timeout=0.5)
    assert (timed.status, timed.stdout) == ("timeout", "before\n")
    assert s.run("echo $INSIDE").stdout == "yes\n"
    assert backend.stop(session_id) is True
    assert not backend.docker.containers.list(all=True, filters={"id": container_id}, ignore_removed=True)
    assert backend.stop(session_id) is False  # idempotent


def test_zombies_are_reaped_in_the_container(backend: DockerBackend, redis_url: str, session_id: str) -> None:
    backend.start(session_id, env=FAST)
    s = session(redis_url, session_id)
    s.run("for i in 1 2 3 4 5; do (sleep 0.1 &); done; sleep 0.5")
    time.sleep(1.5)
    s.run("true")
    r = s.run("ps -eo stat= | grep -c '^Z' || true")
    assert r.stdout.strip() == "0"


def test_container_killed_from_outside_answers_queued_commands_unavailable(
    backend: DockerBackend, redis_url: str, session_id: str
) -> None:
    container_id = backend.start(session_id, env=FAST)
    s = session(redis_url, session_id)
    running = s.submit("sleep 60")
    queued = [s.submit(f"echo queued-{i}") for i in range(3)]
    r = backend.redis
    wait_for(lambda: r.hget(protocol.keys(session_id).meta, "current") == running.encode())
    started = time.monotonic()
    backend.docker.containers.get(container_id).kill()
    results = [s.result(cid, timeout=20) for cid in (running, *queued)]
    assert [x.status for x in results] == ["unavailable"] * 4
    assert all("container was killed (exit code 137: SIGKILL)" in (x.error or "") for x in results), results
    assert time.monotonic() - started < 15
    backend.stop(session_id)


def test_worker_killed_inside_the_container_keeps_the_crash_matrix(
    backend: DockerBackend, redis_url: str, session_id: str
) -> None:
    container_id = backend.start(session_id, env=FAST)
    s = session(redis_url, session_id)
    before = s.run("echo up")
    running = s.submit("sleep 60")
    queued = s.submit("echo after-restart")
    meta = protocol.keys(session_id).meta
    wait_for(lambda: backend.redis.hget(meta, "current") == running.encode())
    pid = backend.redis.hget(meta, "pid")
    assert pid is not None
    backend.docker.containers.get(container_id).exec_run(["kill", "-9", pid.decode()])
    interrupted = s.result(running, timeout=30)
    assert (interrupted.status, interrupted.exit_code) == ("interrupted", None)
    after = s.result(queued, timeout=30)
    assert (after.status, after.stdout) == ("completed", "after-restart\n")
    assert after.shell_epoch > before.shell_epoch  # a new worker: a new bash, and the result says so
    backend.stop(session_id)


def test_image_from_a_second_base_with_another_python(
    engine: docker.DockerClient, redis_url: str, session_id: str
) -> None:
    tag = build_image(engine, SECOND_BASE, f"shellq-worker:trixie-{RUN_ID}")
    with DockerBackend(redis_url, image=tag) as b:
        b.start(session_id, env=FAST)
        r = session(redis_url, session_id).run("python3 -c 'import sys; print(sys.version_info[:2])'")
        assert r.stdout == "(3, 13)\n"


def test_base_without_python_is_a_clear_error(engine: docker.DockerClient, tmp_path: Path) -> None:
    need(_has(engine, BASE), f"{BASE} missing")
    (tmp_path / "Dockerfile").write_text(f"FROM {BASE}\nRUN rm -f /usr/bin/python3*\n")
    engine.images.build(path=str(tmp_path), tag="shellq-test:nopython", rm=True)
    done = subprocess.run(
        [str(SHELLQ), "image", "build", "--base", "shellq-test:nopython", "--tag", "x:y"],
        capture_output=True,
        check=False,
    )
    assert done.returncode == 1
    assert b"has no usable python3" in done.stderr
    assert b"Traceback" not in done.stderr
    engine.images.remove("shellq-test:nopython", force=True)


def _has(engine: docker.DockerClient, tag: str) -> bool:
    try:
        engine.images.get(tag)
        return True
    except DockerException:
        return False


def test_gc_removes_containers_whose_session_is_gone(backend: DockerBackend, redis_url: str, session_id: str) -> None:
    container_id = backend.start(session_id, env=FAST)
    backend.forget(session_id)  # as after `shellq session start`: the container outlives its starter
    backend.docker.containers.get(container_id).pause()  # its worker beats no more (a beat would write meta again)
    backend.redis.delete(protocol.keys(session_id).meta)  # the session is gone
    assert session_id in backend.gc()
    assert not backend.docker.containers.list(all=True, filters={"id": container_id}, ignore_removed=True)


def test_cli_session_with_docker_backend(image: str, redis_url: str, session_id: str) -> None:
    env = {**os.environ, "SHELLQ_REDIS_URL": redis_url, **FAST}
    start = subprocess.run(
        [
            str(SHELLQ),
            "session",
            "start",
            "--backend",
            "docker",
            "--image",
            image,
            "--name",
            session_id,
            "--memory",
            "512m",
            "--pids",
            "128",
        ],
        capture_output=True,
        env=env,
        check=False,
    )
    assert start.returncode == 0, start.stderr.decode()
    run = subprocess.run(
        [str(SHELLQ), "exec", session_id, "--", "cat /sys/fs/cgroup/pids/pids.max"],
        capture_output=True,
        env=env,
        check=False,
    )
    assert (run.returncode, run.stdout) == (0, b"128\n")
    stop = subprocess.run([str(SHELLQ), "session", "stop", session_id], capture_output=True, env=env, check=False)
    assert stop.returncode == 0 and b"stopped its worker" in stop.stdout


def test_shell_catalogue_passes_inside_a_container(backend: DockerBackend, session_id: str, tmp_path: Path) -> None:
    """The whole shell test catalogue, run by pytest inside a session container started by the backend."""
    lib = tmp_path / "pytest-lib"
    wheels = tmp_path / "wheels"
    probe = (
        backend.docker.containers.run(
            backend.image,
            ["-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
            entrypoint="python3",
            remove=True,
        )
        .decode()
        .strip()
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--only-binary=:all:",
            "--python-version",
            probe,
            "--dest",
            str(wheels),
            "pytest",
            "pytest-timeout",
        ],
        check=True,
    )
    import zipfile

    for wheel in wheels.glob("*.whl"):
        zipfile.ZipFile(wheel).extractall(lib)
    container_id = backend.start(session_id, env=FAST, mounts=[f"{ROOT}:/repo:ro", f"{lib}:/opt/pytest:ro"])
    container = backend.docker.containers.get(container_id)
    tests = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_shell_*.py"))
    code, out = container.exec_run(
        ["python3", "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        workdir="/repo",
        environment={"PYTHONPATH": "/opt/shellq/lib:/opt/pytest", "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/tmp"},
    )
    text = out.decode(errors="replace")
    assert code == 0, text[-3000:]
    assert " passed" in text.splitlines()[-1]


def _shellq(redis_url: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "SHELLQ_REDIS_URL": redis_url, **FAST}
    return subprocess.run([str(SHELLQ), *args], capture_output=True, env=env, timeout=120, check=False)


def test_cli_docker_session_without_its_image_names_the_build_to_run(
    engine: docker.DockerClient, redis_url: str, session_id: str
) -> None:
    tag = "shellq-worker:never-built"
    done = _shellq(redis_url, "session", "start", "--backend", "docker", "--image", tag, "--name", session_id)
    assert done.returncode == 1
    assert done.stderr.decode().splitlines() == [
        f"shellq: no image {tag} on this Docker host: build it with `shellq image build --tag {tag}`"
        " (add --base IMAGE for another base than python:3.12-slim)"
    ]
    assert not _has(engine, tag)  # nothing was pulled
    assert not engine.containers.list(all=True, filters={"label": f"{LABEL}={session_id}"}, ignore_removed=True)


def test_cli_docker_stop_keep_resumes_and_stop_frees_the_name(image: str, redis_url: str, session_id: str) -> None:
    start = ("session", "start", "--backend", "docker", "--image", image, "--name", session_id)
    assert _shellq(redis_url, *start).returncode == 0
    try:
        first = _shellq(redis_url, "exec", session_id, "--json", "--", "echo one")
        assert _shellq(redis_url, "session", "stop", session_id, "--keep").returncode == 0
        assert _shellq(redis_url, *start).returncode == 0  # same streams, a new container
        second = _shellq(redis_url, "exec", session_id, "--json", "--", "echo two")
        one, two = json.loads(first.stdout), json.loads(second.stdout)
        assert (one["stdout"], two["stdout"]) == ("one\n", "two\n")
        assert two["shell_epoch"] == one["shell_epoch"] + 1
        assert _shellq(redis_url, "session", "stop", session_id).returncode == 0
        again = _shellq(redis_url, *start)
        assert again.returncode == 0, again.stderr.decode()  # the name is free: a new session, no history
        assert (
            json.loads(_shellq(redis_url, "exec", session_id, "--json", "--", "true").stdout)["status"] == "completed"
        )
        assert Client(redis_url).redis.xlen(protocol.keys(session_id).res) == 1
    finally:
        _shellq(redis_url, "session", "stop", session_id)


def test_least_privilege_in_the_container(backend: DockerBackend, redis_url: str, session_id: str) -> None:
    """The shell: not root, no capabilities, no-new-privileges (no setuid binary or file capability adds any). The
    worker (root): only the capabilities DockerBackend names, none of Docker's other defaults (NET_RAW...)."""
    from containers.docker_backend import WORKER_CAPABILITIES

    container_id = backend.start(session_id, env=FAST)
    s = session(redis_url, session_id)
    status = s.run("id -un; grep -E '^(CapEff|CapBnd|NoNewPrivs):' /proc/self/status").stdout.split("\n")
    assert status[0] == "shellq"
    fields = dict(line.split(":\t") for line in status[1:] if line)
    assert (fields["CapEff"], fields["NoNewPrivs"]) == ("0000000000000000", "1"), fields
    expected = sum(1 << _CAP_NUMBERS[name] for name in WORKER_CAPABILITIES)
    assert int(fields["CapBnd"], 16) == expected  # the bounding set: nothing else can ever be gained
    raw = s.run("python3 -c 'import socket; socket.socket(socket.AF_PACKET, socket.SOCK_RAW)'")
    assert raw.exit_code != 0 and "Operation not permitted" in raw.stderr
    pid = backend.redis.hget(protocol.keys(session_id).meta, "pid")
    assert pid is not None
    container = backend.docker.containers.get(container_id)
    code, out = container.exec_run(["grep", "-E", "^CapEff:", f"/proc/{pid.decode()}/status"])
    assert code == 0 and int(out.split()[1], 16) == expected, out
    assert s.run("echo still fine").stdout == "still fine\n"
    backend.stop(session_id)


_CAP_NUMBERS = {"CHOWN": 0, "DAC_OVERRIDE": 1, "FOWNER": 3, "KILL": 5, "SETGID": 6, "SETUID": 7, "SYS_PTRACE": 19}
"""linux/capability.h"""
