"""The `shellq` console script end to end, in subprocesses, against a private `shellq up` server."""

from __future__ import annotations

import base64
import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from helpers import free_port, wait_for

from worker import protocol

SHELLQ = Path(sys.executable).parent / "shellq"


class Cli:
    """Runs the installed `shellq` script with a private SHELLQ_HOME and no SHELLQ_REDIS_URL."""

    def __init__(self, home: Path) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SHELLQ_")}
        self.env.update(SHELLQ_HOME=str(home), SHELLQ_NO_WORKER_AFTER="2")

    def __call__(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [str(SHELLQ), *args], env={**self.env, **(env or {})}, capture_output=True, timeout=timeout, check=False
        )

    def popen(self, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([str(SHELLQ), *args], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def url(self) -> str:
        return str(json.loads((Path(self.env["SHELLQ_HOME"]) / "server.json").read_text())["url"])


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    assert SHELLQ.exists(), f"the console script is not installed next to {sys.executable} (pip install -e .)"
    run = Cli(tmp_path_factory.mktemp("shellq-home"))
    up = run("up")
    assert up.returncode == 0, up.stderr
    yield run
    run("down")


@pytest.fixture
def session(cli: Cli, session_id: str) -> Iterator[str]:
    started = cli("session", "start", "--name", session_id)
    assert started.returncode == 0, started.stderr
    assert started.stdout == f"{session_id}\n".encode()
    yield session_id
    cli("session", "stop", session_id)


def test_up_records_a_private_server_the_other_verbs_find(cli: Cli, tmp_path: Path) -> None:
    again = cli("up")
    assert again.returncode == 0
    assert b"already running" in again.stdout
    record = Path(cli.env["SHELLQ_HOME"]) / "server.json"
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    info = json.loads(record.read_text())
    assert info["url"].startswith("redis://:") and "@127.0.0.1:" in info["url"]
    r = redis.Redis.from_url(info["url"])
    assert r.config_get("appendonly")["appendonly"] == "yes"
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=info["port"]).ping()
    listing = cli("session", "list")
    assert listing.returncode == 0
    assert b"using the server of `shellq up`" in listing.stderr


def test_exec_passes_output_bytes_and_exit_status_through(cli: Cli, session: str) -> None:
    r = cli("exec", session, "--", "printf 'out\\xff\\x00'; printf err >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr.split(b"\n")[-1]) == (3, b"out\xff\x00", b"err")


def test_exec_keeps_state_between_invocations(cli: Cli, session: str, tmp_path: Path) -> None:
    assert cli("exec", session, "--", f"cd {tmp_path} && export COLOUR=blue").returncode == 0
    r = cli("exec", session, "--", "echo", "$COLOUR", "&&", "pwd")
    assert r.stdout == f"blue\n{tmp_path}\n".encode()


def test_exec_env_cwd_and_json(cli: Cli, session: str, tmp_path: Path) -> None:
    r = cli(
        "exec",
        session,
        "--json",
        "--env",
        "A=1",
        "--env",
        "B=two words",
        "--cwd",
        str(tmp_path),
        "--",
        "echo $A $B; pwd",
    )
    assert r.returncode == 0
    view = json.loads(r.stdout)
    assert view["status"] == "completed" and view["exit_code"] == 0
    assert view["stdout"] == f"1 two words\n{tmp_path}\n"
    assert base64.b64decode(view["stdout_b64"]) == view["stdout"].encode()
    assert view["cwd"] == str(tmp_path)


def test_exec_timeout_exits_124_and_keeps_the_session(cli: Cli, session: str) -> None:
    r = cli("exec", session, "--timeout", "0.5", "--", "echo begun; sleep 30")
    assert (r.returncode, r.stdout) == (124, b"begun\n")
    assert cli("exec", session, "--", "echo fine").stdout == b"fine\n"


def test_exec_interrupted_exits_130(cli: Cli, session: str) -> None:
    proc = cli.popen("exec", session, "--", "sleep 30")
    r = redis.Redis.from_url(cli.url())
    meta = protocol.keys(session).meta
    wait_for(lambda: r.hget(meta, "current"))
    from producer import Client

    Client(cli.url()).session(session).interrupt(r.hget(meta, "current").decode())  # type: ignore[union-attr]
    assert proc.wait(timeout=20) == 130
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    proc.stderr.close()


def test_exec_without_worker_exits_125_quickly(cli: Cli, session_id: str) -> None:
    r = cli("exec", session_id, "--", "true", timeout=30)
    assert r.returncode == 125
    assert b"no worker" in r.stderr


def test_exec_without_redis_exits_125_naming_the_problem(cli: Cli) -> None:
    r = cli("exec", "s1", "--", "true", env={"SHELLQ_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert r.returncode == 125
    assert b"cannot reach Redis" in r.stderr
    assert b"Traceback" not in r.stderr


def test_session_list_and_stop(cli: Cli, session: str) -> None:
    cli("exec", session, "--", "exit 0")
    row = next(line for line in cli("session", "list").stdout.decode().splitlines() if line.startswith(session))
    assert row.split()[1:5] == ["local", "alive", "idle", "0"]
    kept = cli("session", "stop", session, "--keep")
    assert kept.returncode == 0 and b"streams kept" in kept.stdout
    r = redis.Redis.from_url(cli.url())
    assert r.xlen(protocol.keys(session).res) == 1
    row = next(line for line in cli("session", "list").stdout.decode().splitlines() if line.startswith(session))
    assert row.split()[2] == "down"
    gone = cli("session", "stop", session)
    assert gone.returncode == 0 and b"no worker was running" in gone.stdout
    assert r.exists(protocol.keys(session).res) == 0
    assert session not in cli("session", "list").stdout.decode()


def test_shellq_worker_serves_a_session(cli: Cli, session_id: str) -> None:
    proc = subprocess.Popen(
        [str(SHELLQ), "worker", "--session", session_id],
        env={**cli.env, "SHELLQ_REDIS_URL": cli.url()},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        r = cli("exec", session_id, "--", "echo served", env={"SHELLQ_REDIS_URL": cli.url()})
        assert r.stdout == b"served\n"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0


def test_down_stops_the_server(tmp_path: Path) -> None:
    run = Cli(tmp_path)
    assert run("up").returncode == 0
    url = run.url()
    stopped = run("down")
    assert (stopped.returncode, stopped.stdout) == (0, b"shellq: server stopped\n")
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url).ping()
    assert run("down").stdout == b"shellq: no server was running\n"
    missing = run("session", "list")
    assert missing.returncode == 1 and b"shellq up" in missing.stderr
