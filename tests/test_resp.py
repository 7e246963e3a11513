"""The worker's own Redis client (worker/resp.py) against a real server: URLs, passwords, errors, outages."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
from helpers import ROOT, RedisServer, server_binaries

from worker import resp
from worker.errors import ConfigError, RedisReplyError, RedisUnavailableError
from worker.loop import EXIT_CONFIG
from worker.store import connect

PASSWORD = "s3cret pass/word"  # a space and a slash: the URL form must be quoted, the file form not
Open = Callable[[resp.Redis], resp.Redis]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    kind, binary = next(iter(server_binaries().items()))
    s = RedisServer(kind, binary, tmp_path, secured=False)
    s.start("--unixsocket", str(tmp_path / "redis.sock"), "--unixsocketperm", "700")
    require_password(s)
    yield s
    s.stop()


def require_password(server: RedisServer) -> None:
    with redis.Redis(port=server.port) as r:
        r.config_set("requirepass", PASSWORD)


@pytest.fixture
def opened() -> Iterator[Callable[[resp.Redis], resp.Redis]]:
    """Close every client a test made."""
    clients: list[resp.Redis] = []
    yield lambda client: clients.append(client) or client  # type: ignore[func-returns-value]
    for client in clients:
        client.close()


def authed(server: RedisServer) -> str:
    return f"redis://:{quote(PASSWORD, safe='')}@127.0.0.1:{server.port}/0"


def admin(server: RedisServer, key: str, db: int = 0) -> bytes | None:
    """GET `key` in `db` through redis-py."""
    with redis.Redis(port=server.port, password=PASSWORD, db=db) as r:
        return r.get(key)  # type: ignore[return-value]


def test_password_in_the_url_and_a_database_number(server: RedisServer, opened: Open) -> None:
    client = opened(resp.Redis(f"redis://:{quote(PASSWORD, safe='')}@127.0.0.1:{server.port}/3"))
    client.call("SET", "k", "in db 3")
    assert admin(server, "k", db=3) == b"in db 3"
    assert admin(server, "k", db=0) is None


def test_password_file_and_an_acl_user(server: RedisServer, tmp_path: Path, opened: Open) -> None:
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    client = opened(connect(f"redis://127.0.0.1:{server.port}/0", secret))
    client.call("ACL", "SETUSER", "agent", "on", ">agent-pw", "~*", "+@all")
    agent = opened(resp.Redis(f"redis://agent:agent-pw@127.0.0.1:{server.port}/0"))
    assert agent.call("ACL", "WHOAMI") == b"agent"


def test_a_wrong_password_is_a_configuration_error(server: RedisServer, opened: Open) -> None:
    with pytest.raises(ConfigError, match="refused the connection setup"):
        opened(resp.Redis(f"redis://:wrong@127.0.0.1:{server.port}/0")).call("PING")


def test_a_rediss_url_naming_a_plain_redis_says_so(server: RedisServer, tmp_path: Path, opened: Open) -> None:
    """A plain Redis never answers a TLS handshake: the client says it does not speak TLS (the handshake had no
    limit: a worker given such a URL waited forever, deaf to SIGTERM), and a worker exits with its configuration
    status."""
    url = authed(server).replace("redis://", "rediss://", 1)
    with pytest.raises(ConfigError, match=f"Redis at 127.0.0.1:{server.port} does not speak TLS: use a redis://"):
        opened(resp.Redis(url)).call("PING")
    env = {**os.environ, "SHELLQ_WORK_DIR": str(tmp_path / "work")}
    worker = subprocess.run(
        [sys.executable, "-m", "worker", "--redis-url", url, "--session", "s1"],
        env=env, capture_output=True, timeout=120, check=False, cwd=ROOT,
    )  # fmt: skip
    assert worker.returncode == EXIT_CONFIG
    assert b"does not speak TLS" in worker.stderr


def test_unix_socket_url(server: RedisServer, tmp_path: Path, opened: Open) -> None:
    url = f"unix://:{quote(PASSWORD, safe='')}@{tmp_path / 'redis.sock'}?db=2"
    client = opened(resp.Redis(url, name="shellq-test"))
    client.call("SET", "k", "over the socket")
    assert admin(server, "k", db=2) == b"over the socket"
    assert b"name=shellq-test" in client.call("CLIENT", "LIST")


def test_an_error_reply_is_raised_and_the_connection_goes_on(server: RedisServer, opened: Open) -> None:
    client = opened(resp.Redis(authed(server)))
    with pytest.raises(RedisReplyError, match="wrong number of arguments"):
        client.pipeline(("PING",), ("XADD", "only-a-key"), ("SET", "after", "1"))
    assert admin(server, "after") == b"1"  # the commands after the failing one ran
    assert client.call("PING") == b"PONG"


def test_an_outage_names_the_server_and_the_next_call_reconnects(server: RedisServer, opened: Open) -> None:
    client = opened(resp.Redis(authed(server)))
    client.call("SET", "k", "before")
    server.stop()
    with pytest.raises(RedisUnavailableError):
        client.call("GET", "k")  # the socket that was open: reset or closed
    with pytest.raises(RedisUnavailableError, match=f"connecting to 127.0.0.1:{server.port}"):
        client.call("GET", "k")
    server.start()
    require_password(server)
    assert client.call("PING") == b"PONG"


def test_a_server_that_stops_answering_is_an_outage_after_the_timeout(server: RedisServer, opened: Open) -> None:
    client = opened(resp.Redis(authed(server), timeout=0.5))
    client.call("SET", "k", "before")
    os.kill(server.proc.pid, signal.SIGSTOP)  # connected, but nothing comes back
    try:
        with pytest.raises(RedisUnavailableError, match=r"no reply within 0\.5s"):  # not "[Errno 11] Resource ..."
            client.call("GET", "k")
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    assert client.call("GET", "k") == b"before"  # a new connection: no late reply is taken for this one


def test_a_worker_stopped_while_redis_does_not_answer_exits_at_once(server: RedisServer, tmp_path: Path) -> None:
    """A worker that has not served yet has nothing to settle: SIGTERM ends it at once, even while it waits on a
    Redis that accepted its connection and says nothing (it used to wait out its 30 s read timeout, then exit 4)."""
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        env = {**os.environ, "SHELLQ_WORK_DIR": str(tmp_path / "work")}
        worker = subprocess.Popen(
            [sys.executable, "-m", "worker", "--redis-url", authed(server), "--session", "s1"],
            env=env, stderr=subprocess.PIPE, cwd=ROOT,
        )  # fmt: skip
        try:
            time.sleep(2)  # started, connected, and waiting for a reply
            assert worker.poll() is None
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=10) == 0
        finally:
            worker.kill()
            worker.wait()
        assert worker.stderr is not None
        with worker.stderr:
            assert b"SIGTERM before serving" in worker.stderr.read()
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


def test_unsupported_url_schemes_are_refused() -> None:
    with pytest.raises(ConfigError, match="unsupported Redis URL scheme"):
        resp.Redis("http://localhost:6379")


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://localhost",
        "redis://LocalHost:7000/3",
        "rediss://user:pa:ss@host.example:6380/1",
        "redis://:secret@127.0.0.1:1/0",
        "redis://shellq.worker.s1:hex0123@127.0.0.1:40000/0",
        "redis://user@host",
        "redis://a@b@host:1",
        "redis://host:/2",
        "unix:///run/redis.sock",
        "unix:///run/redis.sock?db=2",
        "unix:///tmp/x.sock?password=p%40ss&db=0",
        "redis://us%3Aer:p%2Fw@127.0.0.1:2/0",
        "redis://[::1]:6379/0",
        "redis://host?ssl_cert_reqs=none",
    ],
)
def test_urls_read_without_urllib_read_as_urllib_reads_them(url: str) -> None:
    from urllib.parse import parse_qs, unquote, urlsplit

    from worker.resp import Url, split_url

    parts, ours = urlsplit(url), split_url(url)
    expected = (
        parts.scheme,
        unquote(parts.username) if parts.username is not None else None,
        unquote(parts.password) if parts.password is not None else None,
        parts.hostname,
        parts.port,
        parts.path,
        {k: v[-1] for k, v in parse_qs(parts.query).items()},
    )
    names = ("scheme", "username", "password", "hostname", "port", "path", "query")
    assert set(names) == set(Url.__slots__)
    assert tuple(getattr(ours, name) for name in names) == expected


@pytest.mark.parametrize("url", ["redis://host:port/0", "redis://host:99999/0"])
def test_a_bad_port_is_a_value_error_as_with_urllib(url: str) -> None:
    from urllib.parse import urlsplit

    from worker.resp import split_url

    with pytest.raises(ValueError):
        _ = urlsplit(url).port
    with pytest.raises(ValueError):
        split_url(url)
