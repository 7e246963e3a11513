"""Faults on the Redis side: kill -9 and restart under load, a restart that lost everything, connections cut by a
proxy while the worker blocks, and the producer's bounded retries. Checked with `history.check`."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from helpers import SHELLQ_SCRIPT, RedisServer, free_port, server_binaries, wait_for
from history import History, analyse, exec_line
from tcp_proxy import TcpProxy
from test_faults import AOF_ALWAYS, Workers, client_for, own_server, settle, submit_ok, wait_exit, worker_pool

from producer import NoWorkerError, RedisRefusedError, RedisTimeoutError, RedisUnavailableError, SessionStateLostError
from worker import protocol

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    yield from worker_pool(tmp_path)


@pytest.fixture(params=["redis", "valkey"])
def durable_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisServer]:
    """A server of this test's own with AOF `appendfsync always`: it is killed with -9 and restarted."""
    yield from own_server(request.param, tmp_path, *AOF_ALWAYS)


def blocked_through(proxy: TcpProxy, server: RedisServer) -> bool:
    """CLIENT LIST: is every connection the proxy carries that reads streams (XREAD, XREADGROUP) blocked in that
    read right now, and is there at least one? That is the worker waiting for a command (and its control thread)."""
    ports = proxy.upstream_ports()
    readers = [
        c
        for c in server.client().client_list()
        if int(c["addr"].rsplit(":", 1)[1]) in ports and c.get("cmd") in ("xread", "xreadgroup")
    ]
    return bool(readers) and all("b" in c.get("flags", "") for c in readers)


def has_group(server: RedisServer, session: str) -> bool:
    try:
        groups = server.client().xinfo_groups(protocol.keys(session).cmd)
    except redis.ResponseError:
        return False
    return bool(groups)


# -- Redis killed and restarted -----------------------------------------------------------------------------------


@pytest.mark.parametrize("lease_ttl", ["5", "1.5"], ids=["lease-outlasts-outage", "lease-expires-in-outage"])
def test_redis_killed_and_restarted_under_load(
    durable_server: RedisServer, workers: Workers, session_id: str, tmp_path: Path, lease_ttl: str
) -> None:
    """kill -9 of Redis (AOF always) while 4 producers push 200 commands; restarted on the same port 2 s later.
    Nothing accepted is lost, nothing runs twice, the worker and the producers carry on by themselves, whether
    the worker's lease outlasts the outage (as the 15 s default does) or expires during it with no rival."""
    log, h = tmp_path / "exec.log", History()
    worker = workers.start(durable_server.url, session_id, env={"SHELLQ_LEASE_TTL": lease_ttl})
    errors: list[BaseException] = []

    def producer(p: int) -> None:
        s = client_for(durable_server.url, retry_for=30.0, no_worker_after=30.0).session(session_id)
        try:
            for i in range(50):
                cid = submit_ok(h, s, log, f"p{p}-{i}", f"echo p{p}-{i}")
                if i % 2:
                    assert s.result(cid, timeout=60).stdout == f"{cid}\n"
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=producer, args=(p,), name=f"producer-{p}") for p in range(4)]
    for t in threads:
        t.start()
    res_key = protocol.keys(session_id).res
    wait_for(lambda: durable_server.client().xlen(res_key) >= 40, timeout=30)
    durable_server.stop()  # kill -9
    time.sleep(2)  # the outage
    durable_server.start(*AOF_ALWAYS)
    for t in threads:
        t.join(timeout=70)
    assert not any(t.is_alive() for t in threads), "a producer hung"
    assert not errors, errors
    s = client_for(durable_server.url, retry_for=30.0).session(session_id)
    for _, cid in h.accepted():
        s.result(cid, timeout=30)
    assert worker.poll() is None, "the worker did not survive the restart"
    settle(h, durable_server, {session_id: log})
    report = analyse(h, {}, {})
    assert report.accepted == 200
    assert dict(report.statuses) == {"completed": 200}, "a command was not run to its end"


def test_redis_restarted_empty_is_session_state_lost(
    durable_server: RedisServer, workers: Workers, session_id: str, tmp_path: Path
) -> None:
    log, h = tmp_path / "exec.log", History()
    worker = workers.start(durable_server.url, session_id)
    s = client_for(durable_server.url, retry_for=10.0, no_worker_after=5.0).session(session_id)
    submit_ok(h, s, log, "e-1", "echo before")
    assert s.result("e-1", timeout=20).stdout == "before\n"

    durable_server.stop()
    for item in durable_server.workdir.iterdir():  # no AOF, no RDB: Redis comes back empty (its users stay)
        if item != durable_server.aclfile:
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    durable_server.start(*AOF_ALWAYS)
    assert wait_exit(worker, 30) == 3, "the worker should exit with 'session state lost'"
    assert not has_group(durable_server, session_id), "the consumer group was re-created"

    started = time.monotonic()
    try:
        cid = s.submit(exec_line(log, "e-2", "echo after"), id="e-2")
        r = s.result(cid, timeout=30)
    except (SessionStateLostError, NoWorkerError):
        pass
    else:
        assert r.status == "unavailable", f"{r.status} {r.error}"
        assert "session state lost" in (r.error or "")
    assert time.monotonic() - started < 40
    assert not has_group(durable_server, session_id)
    assert not log.exists() or log.read_text().split() == ["e-1"]


# -- connections cut while the worker blocks ------------------------------------------------------------------------


def test_connection_cut_while_the_worker_blocks_waiting_for_a_command(
    redis_server: RedisServer, workers: Workers, session_id: str, tmp_path: Path
) -> None:
    log, h = tmp_path / "exec.log", History()
    s = client_for(redis_server.url).session(session_id)
    with TcpProxy(redis_server.port, redis_server.password) as proxy:
        worker = workers.start(proxy.url, session_id)
        submit_ok(h, s, log, "warm", "true")
        s.result("warm", timeout=20)
        for round_ in range(3):
            wait_for(lambda: blocked_through(proxy, redis_server), timeout=20)
            assert proxy.cut() >= 1
            cids = [submit_ok(h, s, log, f"r{round_}-{i}", f"echo r{round_}-{i}") for i in range(5)]
            for cid in cids:
                r = s.result(cid, timeout=30)
                assert (r.status, r.stdout) == ("completed", f"{cid}\n"), r.error
        assert proxy.accepted > 3, "the worker did not reconnect through the proxy"
        assert worker.poll() is None
    settle(h, redis_server, {session_id: log})


def test_connections_cut_again_and_again_during_a_stream_of_commands(
    redis_server: RedisServer, workers: Workers, session_id: str, tmp_path: Path
) -> None:
    """Cuts land wherever the worker is (reading, running, committing): still one result per command, no command
    run twice, stream order kept."""
    log, h = tmp_path / "exec.log", History()
    s = client_for(redis_server.url).session(session_id)
    res_key = protocol.keys(session_id).res
    with TcpProxy(redis_server.port, redis_server.password) as proxy:
        worker = workers.start(proxy.url, session_id)
        for i in range(60):
            submit_ok(h, s, log, f"c-{i}", f"echo c-{i}; sleep 0.02")
        for k in range(1, 7):
            wait_for(lambda k=k: redis_server.client().xlen(res_key) >= 8 * k, timeout=30)
            proxy.cut()
        for _, cid in h.accepted():
            s.result(cid, timeout=30)
        assert worker.poll() is None
    settle(h, redis_server, {session_id: log})
    report = analyse(h, {}, {})
    print(f"cuts: {report}")
    assert report.statuses["lost"] == 0


@pytest.mark.parametrize("side", ["sync", "async"])
def test_a_submit_whose_reply_is_lost_is_said_to_may_still_run(
    redis_server: RedisServer, workers: Workers, session_id: str, tmp_path: Path, side: str
) -> None:
    """Redis gets the submit and its reply is lost (the connection goes, then Redis cannot be reached until the
    retries end): the command runs, so `run` must not raise as if nothing had been queued. It raised without
    `command_id`, from the last attempt's connect error, and `shellq exec` exited 125 ("never will run")."""
    from producer import AsyncClient, ClientSettings

    ran = tmp_path / "ran"
    workers.start(redis_server.url, session_id)
    with TcpProxy(redis_server.port, redis_server.password) as proxy:
        settings = ClientSettings(redis_url=proxy.url, retry_for=1.0)

        async def run_async() -> None:
            async with AsyncClient(settings=settings) as client:
                s = client.session(session_id)
                assert (await s.run("true", timeout=10)).exit_code == 0  # connected, the library loaded
                proxy.muted.set()
                await s.run(f"touch {ran}", timeout=10, id="lost-reply")

        def run_sync() -> None:
            s = client_for(proxy.url, retry_for=1.0).session(session_id)
            assert s.run("true", timeout=10).exit_code == 0
            proxy.muted.set()
            s.run(f"touch {ran}", timeout=10, id="lost-reply")

        outcome: list[object] = []
        caller = threading.Thread(
            target=lambda: outcome.append(_try(run_sync if side == "sync" else lambda: asyncio.run(run_async())))
        )
        caller.start()
        wait_for(ran.exists, timeout=30)  # it ran; its caller has heard nothing
        proxy.close()  # the connection goes; reconnecting is refused from now on
        caller.join(timeout=60)
    [error] = outcome
    assert isinstance(error, RedisUnavailableError), error
    assert error.command_id == "lost-reply", error
    assert "may have been queued and may still run" in str(error), error


# -- a Redis that refuses commands -----------------------------------------------------------------------------


def test_a_redis_out_of_memory_refuses_new_work_and_records_what_ran(
    durable_server: RedisServer, workers: Workers, session_id: str, tmp_path: Path
) -> None:
    """At maxmemory with `noeviction` (the setting shellq asks for), Redis refuses writes. The command running then
    still gets its result (the worker crashed with a traceback on the refused commit, and the command's outcome was
    lost); a wait on a command queued behind it ends once Redis has refused the worker's takes for longer than
    `no_worker_after`, cancelling it; submits are refused with an error that names the cause, from the client and
    the CLI (exit 125); the worker waits, says so once, and serves again once Redis has room."""
    proc = workers.start(durable_server.url, session_id)
    with (
        client_for(durable_server.url) as client,
        client_for(durable_server.url, retry_for=1.0, no_worker_after=3.0) as quick,
    ):
        s = client.session(session_id)
        assert s.run("echo up", timeout=10).stdout == "up\n"
        started = tmp_path / "started"
        cid = s.submit(f"touch {started}; sleep 1; echo ran")
        queued = s.submit("echo queued")  # behind it: not taken before Redis has room again
        wait_for(started.exists, timeout=30)
        with durable_server.client() as admin:
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", "1")  # any write that may grow memory is refused now
            try:
                r = s.result(cid, timeout=30)
                assert (r.status, r.stdout) == ("completed", "ran\n")
                with pytest.raises(NoWorkerError, match="can take no command: Redis has refused them") as waited:
                    quick.session(session_id).result(queued, timeout=60)  # no_worker_after 3 s
                assert waited.value.cancelled and "OOM" in str(waited.value)  # it will never run

                with pytest.raises(RedisRefusedError, match="refuses commands now: OOM command not allowed"):
                    quick.session(session_id).submit("echo never")
                env = {**os.environ, "SHELLQ_REDIS_URL": durable_server.url, "SHELLQ_RETRY_FOR": "1"}
                cli = subprocess.run(
                    [SHELLQ_SCRIPT, "exec", session_id, "--", "echo never"],
                    env=env, capture_output=True, text=True, timeout=60, check=False,
                )  # fmt: skip
                assert cli.returncode == 125
                assert cli.stderr.startswith("shellq: Redis at ") and "refuses commands now: OOM" in cli.stderr
                assert "Traceback" not in cli.stderr
                assert proc.poll() is None  # the worker waits for room
            finally:
                admin.config_set("maxmemory", "0")
        assert s.run("echo again", timeout=30).stdout == "again\n"
        assert s.result(queued, timeout=10).status == "cancelled"
        never = [h for h in s.history() if h.request and b"never" in h.request.cmd]
    assert never == []  # neither refused submit was queued
    log = workers.log(proc)
    assert log.count("Redis unavailable (Redis refuses commands now: OOM") == 1, log
    assert "Redis is back after" in log and "Traceback" not in log, log


def test_a_redis_turned_replica_is_waited_out(durable_server: RedisServer, workers: Workers, session_id: str) -> None:
    """A Redis made a replica (a failover gone wrong: READONLY to every write, the worker's take and heartbeat
    included): submits are refused naming it, the idle worker logs it once and stays, and serves again once the
    server is a master again, with the session's state intact."""
    proc = workers.start(durable_server.url, session_id)
    with client_for(durable_server.url) as client, client_for(durable_server.url, retry_for=1.0) as quick:
        s = client.session(session_id)
        before = s.run("cd /tmp && export KEPT=1", timeout=10)
        assert before.exit_code == 0
        with durable_server.client() as admin:
            admin.replicaof("127.0.0.1", str(free_port()))  # a master that is not there: no sync, data kept
            try:
                with pytest.raises(RedisRefusedError, match="refuses commands now: READONLY"):
                    quick.session(session_id).submit("echo never")
                time.sleep(2)  # the worker's take is refused meanwhile
                assert proc.poll() is None
            finally:
                admin.replicaof("NO", "ONE")
        r = s.run("echo $KEPT; pwd", timeout=30)
        assert (r.stdout, r.shell_epoch) == ("1\n/tmp\n", before.shell_epoch)  # the same bash
    log = workers.log(proc)
    assert log.count("Redis unavailable (") == 1, log  # the switch resets connections first, then READONLY
    assert "Redis is back after" in log and "Traceback" not in log, log
    assert "control thread:" not in log, log  # its blocked read cut short (UNBLOCKED) is the same outage


@pytest.mark.parametrize("how", [[], ["--follow"], ["-i"]], ids=["plain", "follow", "stdin"])
def test_exec_says_a_command_may_still_run_when_redis_goes_while_it_waits(
    durable_server: RedisServer, workers: Workers, session_id: str, tmp_path: Path, how: list[str]
) -> None:
    """`shellq exec` queued behind a running command when Redis turns replica: its wait cannot cancel the command
    (READONLY), so it must not exit 125 ("never will run"): it exits 75 saying the command may still run, and it
    does run once Redis is a master again. The same with its output followed, and with stdin (which go other
    ways: a submit and a stream; the input's steps)."""
    workers.start(durable_server.url, session_id)
    with client_for(durable_server.url) as client:
        s = client.session(session_id)
        started, ran = tmp_path / "started", tmp_path / "ran"
        first = s.submit(f"touch {started}; sleep 3")
        wait_for(started.exists, timeout=30)
        env = {**os.environ, "SHELLQ_REDIS_URL": durable_server.url, "SHELLQ_RETRY_FOR": "1"}
        env["SHELLQ_NO_WORKER_AFTER"] = "2"
        cli = subprocess.Popen(
            [SHELLQ_SCRIPT, "exec", session_id, *how, "--", f"echo behind >> {ran}"],
            env=env, stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert cli.stdin is not None
        cli.stdin.write("input\n")
        cli.stdin.close()
        cli.stdin = None  # written and closed: communicate() below only reads
        time.sleep(0.5)  # queued behind the sleep
        with durable_server.client() as admin:
            admin.replicaof("127.0.0.1", str(free_port()))
            try:
                _, stderr = cli.communicate(timeout=60)
            finally:
                admin.replicaof("NO", "ONE")
        assert cli.returncode == 75, stderr
        assert "may have been queued and may still run" in stderr and "Traceback" not in stderr, stderr
        assert s.result(first, timeout=30).status == "completed"
        wait_for(lambda: ran.exists() and ran.read_text() == "behind\n", timeout=30)


@pytest.mark.parametrize(
    ("reply", "refused"),
    [
        ("OOM command not allowed when used memory > 'maxmemory'.", True),
        ("MISCONF Errors writing to the AOF file: No space left on device", True),
        ("READONLY You can't write against a read only replica.", True),
        ("MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.", True),
        ("BUSY Redis is busy running a script.", True),
        ("NOREPLICAS Not enough good replicas to write.", True),
        ("UNBLOCKED force unblock from blocking operation, instance state changed (master -> replica?)", True),
        ("WRONGTYPE Operation against a key holding the wrong kind of value", False),
        ("ERR Function not found", False),
        ("FENCED lease lost", False),
        ("NOPERM User p has no permissions to run the 'xadd' command", False),
    ],
)
def test_the_producer_tells_a_refusal_from_a_failed_command(reply: str, refused: bool) -> None:
    """As redis-py parses it (it cuts the code off the replies it has a class for, OOM's and MASTERDOWN's among
    them): a refusal is retried and raised as RedisRefusedError with Redis's words; any other error reply is not."""
    from redis._parsers.base import BaseParser

    from producer.core import refusal

    assert refusal(BaseParser.parse_error(reply)) == (reply if refused else None)


# -- the producer's retries ---------------------------------------------------------------------------------------


def test_producer_retries_while_redis_is_down_then_raises_redis_unavailable(tmp_path: Path) -> None:
    binaries = server_binaries()
    if "redis" not in binaries:
        pytest.skip("no redis-server binary here")
    server = RedisServer("redis", binaries["redis"], tmp_path)  # not started yet: nothing listens on its port

    quick = client_for(server.url, retry_for=1.0).session("retry-s")
    started = time.monotonic()
    with pytest.raises(RedisUnavailableError) as raised:
        quick.submit("true", id="r-0")
    assert isinstance(raised.value, ConnectionError)
    assert time.monotonic() - started < 20

    patient = client_for(server.url, retry_for=20.0).session("retry-s")
    outcome: list[object] = []
    t = threading.Thread(target=lambda: outcome.append(_try(lambda: patient.submit("true", id="r-1"))))
    t.start()
    try:
        time.sleep(1.5)  # Redis is down this long while the submit retries
        server.start(*AOF_ALWAYS)
        t.join(timeout=30)
        assert outcome == ["r-1"]
        assert server.client().xlen(protocol.keys("retry-s").cmd) == 1
    finally:
        t.join(timeout=30)
        server.stop()


def test_a_redis_that_does_not_answer_is_unavailable_after_one_read_timeout(tmp_path: Path) -> None:
    """A Redis that accepts connections and says nothing (stopped here; a partition after the connect looks the same):
    a call gives up after one read timeout, its retries bounded by `retry_for`, in the sync and the async client alike.
    redis-py counts retries, and retries the connect inside each retry of the command: such a call took minutes."""
    from producer import AsyncClient, ClientSettings
    from producer.core import READ_TIMEOUT, redact

    kind, binary = next(iter(server_binaries().items()))
    server = RedisServer(kind, binary, tmp_path)
    server.start()
    settings = ClientSettings(redis_url=server.url, retry_for=1.0)

    async def submit_async() -> None:
        async with AsyncClient(settings=settings) as client:
            await client.session("quiet-s").submit("true", id="q-1")

    outcomes: dict[str, object] = {}

    def attempt(name: str, fn: Callable[[], object]) -> None:
        started = time.monotonic()
        outcomes[name] = (_try(fn), time.monotonic() - started)

    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        sync = threading.Thread(
            target=attempt,
            args=("sync", lambda: client_for(server.url, retry_for=1.0).session("quiet-s").submit("true", id="q-0")),
        )
        sync.start()
        attempt("async", lambda: asyncio.run(submit_async()))
        sync.join(timeout=60)
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()
    assert set(outcomes) == {"sync", "async"}  # the sync call ended too
    for name, (error, took) in outcomes.items():
        assert isinstance(error, RedisTimeoutError), (name, error)
        assert f"cannot reach Redis at {redact(server.url)}" in str(error), (name, error)
        assert took < 2 * READ_TIMEOUT, (name, took)


def test_exec_against_a_redis_that_does_not_answer_ends_after_one_read_timeout(tmp_path: Path) -> None:
    """`shellq exec` to a Redis that accepts connections and says nothing: exit 125 naming it, after one read
    timeout. Its fast path used to hand over to the full path, which waited as long again (over 20 s)."""
    from producer.core import READ_TIMEOUT

    kind, binary = next(iter(server_binaries().items()))
    server = RedisServer(kind, binary, tmp_path)
    server.start()
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        env = {**os.environ, "SHELLQ_REDIS_URL": server.url}
        argv = [SHELLQ_SCRIPT, "exec", "quiet-s", "--", "true"]
        cli = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
        took = time.monotonic() - started
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()
    assert cli.returncode == 125, cli.stderr
    assert f"no reply within {READ_TIMEOUT:g}s" in cli.stderr and "Traceback" not in cli.stderr, cli.stderr
    assert took < 1.5 * READ_TIMEOUT, took


def test_producer_default_retry_window_is_ten_seconds() -> None:
    from producer import ClientSettings

    assert ClientSettings(redis_url=f"redis://127.0.0.1:{free_port()}/0").retry_for == 10.0
    assert ClientSettings.from_env({"SHELLQ_RETRY_FOR": "2.5"}).retry_for == 2.5


def _try(fn: Callable[[], object]) -> object:
    try:
        return fn()
    except Exception as e:
        return e
