"""Files, stdin and users in a docker session (issue 18): file operations run as the shell's user (`shellq`), never
with the worker's root, so they cannot reach the worker's credentials; `user=` switches for one command; root is
refused there unless the worker allows it; large transfers go through the container's unix socket like the rest."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import RedisServer, server_binaries

from containers.docker_backend import DockerBackend
from producer import Client, ClientSettings, Session, SessionPermissionError

pytestmark = pytest.mark.docker
FAST = {"SHELLQ_HEARTBEAT": "0.2", "SHELLQ_LEASE_TTL": "1.5", "SHELLQ_KILL_GRACE": "0.3"}


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    path = tmp_path_factory.mktemp("files-docker-redis")
    server = RedisServer("redis", server_binaries()["redis"], path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def backend(image: str, redis_server: RedisServer) -> Iterator[DockerBackend]:
    with DockerBackend(redis_server.url, image=image) as b:
        yield b


def session(url: str, name: str) -> Session:
    return Client(settings=ClientSettings(redis_url=url, no_worker_after=5)).session(name)


def test_files_run_as_the_shell_user_and_cannot_read_the_workers_secrets(
    backend: DockerBackend, redis_server: RedisServer, session_id: str, tmp_path: Path
) -> None:
    backend.start(session_id, env=FAST)
    s = session(redis_server.url, session_id)
    data = os.urandom(3 << 20)  # over the inline limit: chunks through the container's socket both ways
    s.write_file("work/blob.bin", data)  # relative to the shell's home
    assert s.run("stat -c '%U %s' work/blob.bin").stdout == f"shellq {len(data)}\n"
    assert hashlib.sha256(s.read_file("work/blob.bin")).digest() == hashlib.sha256(data).digest()
    for secret in ("/etc/shellq/password", "/etc/shellq/redis"):
        with pytest.raises(PermissionError) as caught:
            s.read_file(secret) if secret.endswith("password") else s.list_dir(secret)
        assert isinstance(caught.value, SessionPermissionError)
    with pytest.raises(PermissionError):
        s.write_file("/opt/shellq/lib/worker/loop.py", b"# not yours\n")
    r = s.run("sha256sum", stdin=data)
    assert r.stdout.split()[0] == hashlib.sha256(data).hexdigest()
    s.upload(Path(__file__).parent / "helpers.py", "/tmp/helpers.py")
    assert s.read_file("/tmp/helpers.py") == (Path(__file__).parent / "helpers.py").read_bytes()


def test_user_switches_for_one_command_and_root_is_refused(
    backend: DockerBackend, redis_server: RedisServer, session_id: str
) -> None:
    backend.start(session_id, env=FAST)
    s = session(redis_server.url, session_id)
    s.run("cd /tmp && export SEEN=yes")
    r = s.run("id -un; pwd; echo $SEEN; cd / && export SEEN=no", user="nobody")
    assert r.stdout == "nobody\n/tmp\nyes\n"
    assert s.run("id -un; pwd; echo $SEEN").stdout == "shellq\n/tmp\nyes\n"  # the shell's state is untouched
    refused = s.run("cat /etc/shellq/password", user="root")
    assert refused.status == "rejected" and "root" in (refused.error or "")
    unknown = s.run("true", user="no-such-user-x")
    assert unknown.status == "rejected" and "no-such-user-x: no such user" in (unknown.error or "")
    with pytest.raises(PermissionError):
        s.write_file("/home/shellq/nope.txt", b"x", user="nobody")


def test_root_commands_when_the_worker_allows_them(
    backend: DockerBackend, redis_server: RedisServer, session_id: str
) -> None:
    backend.start(session_id, env={**FAST, "SHELLQ_ROOT_COMMANDS": "true"})
    s = session(redis_server.url, session_id)
    assert s.run("id -u", user="root").stdout == "0\n"
    assert s.run("id -un").stdout == "shellq\n"
