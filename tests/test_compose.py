"""compose.yaml (issue 16): the stack comes up with Debian's docker-compose 1.29 (or `docker compose`), with no
registry (the images are the project's own offline builds); a producer on the host creates a session through the
stack's manager, runs a command, sees `unavailable` when the session's container is killed; the demo profile runs
its scripted agent; `down -v` leaves no container and no volume behind."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import DOCKER_BASE, build_image, need
from helpers import ROOT, free_port, wait_for

from containers.docker_backend import INSTANCE_LABEL, LABEL
from producer import Client, ClientSettings

pytestmark = pytest.mark.docker


def _compose() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if subprocess.run(["docker", "compose", "version"], capture_output=True, check=False).returncode == 0:
        return ["docker", "compose"]
    need(False, "no docker-compose and no `docker compose` (scripts/docker-engine installs docker-compose)")
    return []


@pytest.fixture(scope="module")
def stack_image(engine: Any) -> str:
    return build_image(engine, DOCKER_BASE, "shellq-stack:test", "--stack")


@pytest.fixture
def stack(engine: Any, image: str, stack_image: str) -> Iterator[dict[str, str]]:
    name = f"shellq-t{secrets.token_hex(4)}"
    env = {
        **os.environ,
        "COMPOSE_PROJECT_NAME": name,
        "SHELLQ_STACK": name,
        "SHELLQ_ADMIN_PASSWORD": secrets.token_hex(16),
        "SHELLQ_REDIS_PORT": str(free_port()),
        "SHELLQ_DOCKER_HOST": f"compose-{name}",
        "REDIS_IMAGE": stack_image,
        "STACK_IMAGE": stack_image,
        "WORKER_IMAGE": image,
    }
    compose = [*_compose(), "-f", str(ROOT / "compose.yaml")]
    try:
        up = subprocess.run([*compose, "up", "-d"], env=env, capture_output=True, check=False, timeout=300)
        assert up.returncode == 0, up.stderr.decode()
        yield env
    finally:
        logs = subprocess.run([*compose, "logs", "--no-color"], env=env, capture_output=True, check=False)
        _remove_sessions(engine, env)  # a failed test's: they hold the socket volume
        down = subprocess.run([*compose, "down", "-v"], env=env, capture_output=True, check=False, timeout=300)
        left = engine.containers.list(
            all=True, filters={"label": f"com.docker.compose.project={name}"}, ignore_removed=True
        )
        volumes = [v.name for v in engine.volumes.list() if name in v.name]
        assert down.returncode == 0, down.stderr.decode()
        assert not left and not volumes, (left, volumes, logs.stdout.decode()[-3000:])


def _url(stack: dict[str, str]) -> str:
    return f"redis://:{stack['SHELLQ_ADMIN_PASSWORD']}@127.0.0.1:{stack['SHELLQ_REDIS_PORT']}/0"


def _remove_sessions(engine: Any, stack: dict[str, str]) -> None:
    """The session containers of the stack's server (shellq.instance = its id), if any are left."""
    try:
        found: Any = redis.Redis.from_url(_url(stack), socket_timeout=5).hget("shellq:server", "id")
    except redis.RedisError:
        return
    if found:
        for c in engine.containers.list(
            all=True, filters={"label": f"{INSTANCE_LABEL}={found.decode()}"}, ignore_removed=True
        ):
            c.remove(force=True, v=True)


def test_stack_serves_a_producer_on_the_host(stack: dict[str, str], engine: Any, image: str) -> None:
    url = _url(stack)
    client = Client(settings=ClientSettings(redis_url=url, no_worker_after=5))
    host = stack["SHELLQ_DOCKER_HOST"]

    def manager_up() -> bool:
        try:
            return bool(client.redis.exists(f"shellq:manager:{host}"))
        except redis.ConnectionError:
            return False

    wait_for(manager_up, timeout=60)
    config: Any = client.redis.config_get("appendfsync")
    assert config["appendfsync"] == "always"
    name = f"team-{stack['SHELLQ_STACK']}"
    s = client.create_session(name, host=host, image=image)
    assert s.run("export A=41; id -un").stdout == "shellq\n"
    assert s.run("echo $((A + 1))").stdout == "42\n"
    (container,) = engine.containers.list(all=True, filters={"label": f"{LABEL}={name}"}, ignore_removed=True)
    queued = [s.submit("sleep 60"), s.submit("echo never")]
    time.sleep(0.5)
    container.kill()
    assert [s.result(c, timeout=20).status for c in queued] == ["unavailable", "unavailable"]

    compose = [*_compose(), "-f", str(ROOT / "compose.yaml")]
    demo = subprocess.run(
        [*compose, "--profile", "demo", "run", "--rm", "demo"], env=stack, capture_output=True, check=False, timeout=300
    )
    assert demo.returncode == 0, demo.stderr.decode()[-3000:]
    assert "\n42\n/tmp/app\n" in demo.stdout.decode(), demo.stdout.decode()
    assert "session demo: stopped its worker" in demo.stdout.decode()

    stop = subprocess.run(
        [str(Path(sys.executable).parent / "shellq"), "session", "stop", name, "--manager", host],
        env={**os.environ, "SHELLQ_REDIS_URL": url},
        capture_output=True,
        check=False,
        timeout=120,
    )
    assert stop.returncode == 0, stop.stderr.decode()
    assert not engine.containers.list(all=True, filters={"label": f"{LABEL}={name}"}, ignore_removed=True)
