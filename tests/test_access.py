"""Redis roles as ACL users, seen from the CLI and from an operator's side: `shellq up` servers, producer URLs,
rotation, an admin user that is not `default`, a server without an aclfile. (Attacks from inside a session:
tests/test_security.py.)"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from helpers import RedisServer, server_binaries, wait_for

from containers import access
from containers.local import LocalBackend, SessionStartError
from producer import AccessDeniedError, Client, ResultTimeoutError
from worker import protocol
from worker.errors import ConfigError

SHELLQ = Path(sys.executable).parent / "shellq"


def users(r: redis.Redis) -> set[str]:
    return {u.decode() for u in r.execute_command("ACL", "USERS")}  # type: ignore[no-untyped-call]


def refused(url: str) -> bool:
    """The URL's credentials no longer log in."""
    try:
        redis.Redis.from_url(url, socket_timeout=5).ping()
    except redis.AuthenticationError:
        return True
    return False


class Cli:
    def __init__(self, home: Path) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SHELLQ_")}
        self.env.update(SHELLQ_HOME=str(home), SHELLQ_NO_WORKER_AFTER="2")

    def __call__(self, *args: str, **env: str) -> subprocess.CompletedProcess[bytes]:
        full = {**self.env, **env}
        return subprocess.run([str(SHELLQ), *args], env=full, capture_output=True, timeout=60, check=False)


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    run = Cli(tmp_path / "home")
    assert run("up").returncode == 0
    yield run
    run("down")


def admin_url(home: Path) -> str:
    return str(json.loads((home / "server.json").read_text())["url"])


def test_shellq_up_needs_the_admin_password_and_session_users_come_and_go(cli: Cli, session_id: str) -> None:
    url = admin_url(Path(cli.env["SHELLQ_HOME"]))
    admin = redis.Redis.from_url(url)
    port = admin.connection_pool.connection_kwargs["port"]
    home = Path(cli.env["SHELLQ_HOME"])  # the AOF holds every session's commands and output: this user's only
    assert {stat.S_IMODE(p.stat().st_mode) for p in (home, home / "server")} == {0o700}
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port).ping()  # the default user needs the admin password
    started = cli("session", "start", "--name", session_id, "--producer-url")
    assert started.returncode == 0, started.stderr
    name, producer_url = started.stdout.decode().splitlines()
    assert name == session_id and producer_url.startswith(f"redis://shellq.producer.{session_id}:")
    assert {f"shellq.worker.{session_id}", f"shellq.producer.{session_id}"} <= users(admin)

    done = cli("exec", session_id, "--json", "--", "echo from the agent", SHELLQ_REDIS_URL=producer_url)
    assert done.returncode == 0, done.stderr
    other = cli("exec", "someone-else", "--", "true", SHELLQ_REDIS_URL=producer_url)
    assert other.returncode == 125 and b"Traceback" not in other.stderr
    assert b"refused this user" in other.stderr and b"someone-else" not in other.stdout, other.stderr
    listing = cli("session", "list", SHELLQ_REDIS_URL=producer_url)  # an admin verb
    assert listing.returncode == 1 and listing.stderr.count(b"\n") == 1, listing.stderr
    assert b"may not" in listing.stderr and b"Traceback" not in listing.stderr

    # a crash of the server keeps the users (aclfile) and the session working
    os.kill(json.loads((Path(cli.env["SHELLQ_HOME"]) / "server.json").read_text())["pid"], signal.SIGKILL)
    assert cli("up").returncode == 0
    assert admin_url(Path(cli.env["SHELLQ_HOME"])) == url  # same port and password: the worker reconnects
    assert {f"shellq.worker.{session_id}", f"shellq.producer.{session_id}"} <= users(admin)
    again = cli("exec", session_id, "--", "echo still here", SHELLQ_REDIS_URL=producer_url)
    assert again.returncode == 0 and again.stdout == b"still here\n", again.stderr

    assert cli("session", "stop", session_id, "--keep").returncode == 0  # users go with the worker
    assert not {u for u in users(admin) if u.endswith(f".{session_id}")} and refused(producer_url)
    assert cli("session", "start", "--name", session_id).returncode == 0  # new users, new passwords
    assert refused(producer_url)
    assert cli("session", "stop", session_id).returncode == 0
    assert not {u for u in users(admin) if u.endswith(f".{session_id}")}


@pytest.fixture
def server(private_server: RedisServer) -> RedisServer:
    """A server of this test's own (conftest.py): these tests change its users or its Functions library."""
    return private_server


def test_an_admin_user_that_is_not_default_with_the_documented_rules(
    server: RedisServer, session_id: str, tmp_path: Path
) -> None:
    """README "Security": the ACL rules an operator gives shellq's admin on a Redis someone else administers."""
    root = server.client()
    rules = "on >op-pw ~shellq:* +@all -@dangerous +acl|setuser +acl|deluser +acl|save +acl|users +client|kill"
    rules += " +function|load +function|list +info"
    root.execute_command("ACL", "SETUSER", "shellq-admin", *rules.split())  # type: ignore[no-untyped-call]
    url = f"redis://shellq-admin:op-pw@127.0.0.1:{server.port}/0"
    backend = LocalBackend(url, tmp_path / "logs")
    backend.start(session_id)
    try:
        assert Client(url).session(session_id).run("echo fine").stdout == "fine\n"
    finally:
        backend.stop(session_id)
    assert not {u for u in users(root) if u.endswith(f".{session_id}")}


def test_restarting_a_session_rotates_its_passwords(server: RedisServer, session_id: str, tmp_path: Path) -> None:
    backend = LocalBackend(server.url, tmp_path / "logs")
    backend.start(session_id)
    password = backend.password_file(session_id).read_text().strip()
    worker_url = access.url_for(server.url, access.worker_user(session_id), password)
    producer = access.url_for(
        server.url, access.producer_user(session_id), access.new_producer_password(server.client(), session_id)
    )
    held = redis.Redis.from_url(producer)
    assert held.ping()
    backend.stop(session_id)
    assert refused(worker_url) and refused(producer)
    backend.start(session_id)
    try:
        assert refused(worker_url)
        with pytest.raises(redis.AuthenticationError):
            held.ping()  # its connection was closed with the old user; the old password no longer logs in
        assert Client(server.url).session(session_id).run("true").exit_code == 0
    finally:
        backend.stop(session_id)


def test_a_producer_user_reads_its_session_but_cannot_write_its_results(
    server: RedisServer, session_id: str, tmp_path: Path
) -> None:
    backend = LocalBackend(server.url, tmp_path / "logs")
    backend.start(session_id)
    try:
        password = access.new_producer_password(server.client(), session_id)
        agent = Client(access.url_for(server.url, access.producer_user(session_id), password))
        s = agent.session(session_id)
        cid = s.submit("sleep 30")
        queued = s.submit("echo never")
        with pytest.raises(ResultTimeoutError) as gave_up:
            s.result(queued, timeout=0.5)  # the wait gives up and cancels it: a journal write the user may do
        assert gave_up.value.cancelled
        s.interrupt(cid)
        assert s.result(cid, timeout=20).status == "cancelled"
        never = s.result(queued, timeout=20)
        assert never.status == "cancelled" and never.stdout == ""
        keys = protocol.keys(session_id)
        with pytest.raises(redis.exceptions.NoPermissionError):
            agent.redis.xadd(keys.res, {"id": cid, "status": "completed"})
        with pytest.raises(redis.exceptions.NoPermissionError):
            agent.redis.set(keys.lease, "mine")
        assert agent.redis.xlen(keys.res) >= 1  # reading its history is allowed
        with pytest.raises(AccessDeniedError):
            agent.session("another").submit("true")
    finally:
        backend.stop(session_id)


def test_a_command_written_by_hand_runs_under_the_session_users(
    server: RedisServer, session_id: str, tmp_path: Path
) -> None:
    """redis-cli XADD by the session's producer user: the worker, as the session's worker user, takes it (counting
    it against the queue cap, the one write its take adds) and answers it."""
    backend = LocalBackend(server.url, tmp_path / "logs")
    backend.start(session_id)
    try:
        password = access.new_producer_password(server.client(), session_id)
        agent = redis.Redis.from_url(access.url_for(server.url, access.producer_user(session_id), password))
        keys = protocol.keys(session_id)
        eid = agent.xadd(keys.cmd, {"cmd": "echo by hand"}).decode()
        wait_for(lambda: agent.xlen(keys.res) > 0, timeout=20)
        [(_, fields)] = agent.xrange(keys.res, "-", "+")
        assert (fields[b"id"], fields[b"status"], fields[b"stdout"]) == (eid.encode(), b"completed", b"by hand\n")
    finally:
        backend.stop(session_id)


def test_a_producer_user_moves_large_files_and_deletes_only_transfer_streams(
    server: RedisServer, session_id: str, tmp_path: Path
) -> None:
    """Chunked input and output need the producer to delete what it read (XDEL) and what it left (DEL): it may, on
    the session's transfer streams only (an ACL selector), never on its command stream, whose loss would stop the
    session."""
    backend = LocalBackend(server.url, tmp_path / "logs")
    backend.start(session_id)
    try:
        password = access.new_producer_password(server.client(), session_id)
        agent = Client(access.url_for(server.url, access.producer_user(session_id), password))
        s = agent.session(session_id)
        data = os.urandom(3 << 20)  # six chunks each way
        s.write_file(str(tmp_path / "big.bin"), data)
        assert s.read_file(str(tmp_path / "big.bin")) == data
        assert s.run("wc -c", stdin=data).stdout == f"{len(data)}\n"
        keys = protocol.keys(session_id)
        for command in (("DEL", keys.cmd), ("XDEL", keys.cmd, "0-1"), ("DEL", keys.res), ("DEL", keys.meta)):
            with pytest.raises(redis.exceptions.NoPermissionError):
                agent.redis.execute_command(*command)  # type: ignore[no-untyped-call]
        assert agent.redis.delete(keys.input("c-gone")) == 0  # allowed, and nothing was left
        assert not list(server.client().scan_iter(keys.input("*"))) + list(server.client().scan_iter(keys.output("*")))
    finally:
        backend.stop(session_id)


def test_a_server_without_an_aclfile_works_and_says_its_users_will_not_survive_a_restart(
    tmp_path: Path, session_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    kind, binary = next(iter(server_binaries().items()))
    plain = RedisServer(kind, binary, tmp_path, secured=False)
    plain.start()
    try:
        backend = LocalBackend(plain.url, tmp_path / "logs")
        with caplog.at_level(logging.WARNING, logger="shellq.access"):
            access._warned.clear()
            backend.start(session_id)
        try:
            assert "will not survive a restart" in caplog.text
            assert Client(plain.url).session(session_id).run("echo ok").stdout == "ok\n"
        finally:
            backend.stop(session_id)
    finally:
        plain.stop()


def test_a_shell_user_gets_none_of_the_operators_environment(
    server: RedisServer, session_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run as another user, the shell must not inherit what the operator's environment holds (REDISCLI_AUTH, a
    cloud key): only the locale and PATH pass, and shellq's own settings stop at the worker."""
    if os.geteuid() != 0:
        pytest.skip("running the shell as another user needs root")
    monkeypatch.setenv("REDISCLI_AUTH", server.password or "")
    monkeypatch.setenv("SOME_CLOUD_KEY", "s3cr3t")
    backend = LocalBackend(server.url, tmp_path / "logs")
    backend.start(session_id, env={"SHELLQ_SHELL_USER": "nobody"})
    try:
        env = Client(server.url).session(session_id).run("env").stdout
    finally:
        backend.stop(session_id)
    assert "PATH=" in env and "USER=nobody" in env
    assert "s3cr3t" not in env and "REDISCLI_AUTH" not in env and "SHELLQ_" not in env, env
    assert stat.S_IMODE((tmp_path / "logs").stat().st_mode) == 0o700


def test_a_workers_user_may_not_run_info_so_the_admin_records_durability_for_it(
    server: RedisServer, session_id: str, tmp_path: Path
) -> None:
    """The test servers run without AOF. The session's worker (its user may not run INFO) learns that from what
    the admin recorded when it made the users, warns, and with SHELLQ_REQUIRE_DURABLE refuses to start."""
    backend = LocalBackend(server.url, tmp_path / "logs")
    backend.start(session_id)
    backend.stop(session_id)
    assert "Redis is not durable: AOF is off" in backend.log_path(session_id).read_text()
    with pytest.raises(SessionStartError, match=r"refusing to start \(SHELLQ_REQUIRE_DURABLE\): AOF is off"):
        backend.start(session_id, start_timeout=10, env={"SHELLQ_REQUIRE_DURABLE": "1"})


def test_sessions_live_in_database_0_only(private_server: RedisServer) -> None:
    """Session users are the server's: one that may SELECT reaches every database, so shellq refuses another
    database (and its session users may not SELECT)."""
    r = redis.Redis.from_url(private_server.url.rsplit("/", 1)[0] + "/1")
    with pytest.raises(ConfigError, match="database 0"):
        access.grant(r, "db-one")
    creds = access.grant(private_server.client(), "db-zero")
    worker = redis.Redis.from_url(access.url_for(private_server.url, creds.worker_user, creds.worker_password))
    with pytest.raises(redis.exceptions.NoPermissionError):
        worker.execute_command("SELECT", 1)
