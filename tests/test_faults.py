"""Fault injection against real workers (subprocesses) and real Redis/Valkey servers, checked with `history.check`.

Crash points come from the worker itself (SHELLQ_FAULT=<step>, SHELLQ_FAULT_AFTER=<n>: it SIGKILLs itself there),
signals from the test (SIGKILL, SIGTERM, SIGSTOP/SIGCONT). Every command records its own execution
(`echo CID >> LOG; ...`), so the checker can tell "ran once" from "ran twice" and "never ran".
Redis restarts, connection cuts and the producer's retries are in test_faults_redis.py; the long run in test_load.py.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import ROOT, RedisServer, server_binaries, wait_for
from history import History, check, exec_line, read_executions, stream_order

from producer import Client, ClientSettings, QueueFullError, Result, Session
from worker import protocol
from worker.loop import Worker

pytestmark = pytest.mark.timeout(90)

LEASE_TTL = "1.5"
AOF_ALWAYS = ("--appendonly", "yes", "--appendfsync", "always")
SIGKILLED = -signal.SIGKILL


# -- fixtures and helpers (also imported by test_faults_redis.py and test_load.py) ---------------------------------


class Workers:
    """`python -m worker` subprocesses of one test, each logging to tmp_path/worker-<session>-<n>.log."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: dict[int, Path] = {}

    def start(
        self, url: str, session: str, env: dict[str, str] | None = None, wrapper: tuple[str, ...] = ()
    ) -> subprocess.Popen[bytes]:
        """Start a worker for `session` on `url` (heartbeat 0.2 s, lease TTL 1.5 s unless `env` says otherwise),
        under `wrapper` (say, prlimit) if given."""
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("SHELLQ_")}
        full_env.update(
            SHELLQ_REDIS_URL=url,
            SHELLQ_SESSION=session,
            SHELLQ_HEARTBEAT="0.2",
            SHELLQ_LEASE_TTL=LEASE_TTL,
            SHELLQ_WORK_DIR=str(self.tmp_path / f"work-{session}"),
        )
        full_env.update(env or {})
        log_path = self.tmp_path / f"worker-{session}-{len(self.procs)}.log"
        with open(log_path, "wb") as log:
            argv = [*wrapper, sys.executable, "-m", "worker"]
            proc = subprocess.Popen(argv, env=full_env, stdout=log, stderr=log, cwd=ROOT)
        self.procs.append(proc)
        self.logs[proc.pid] = log_path
        return proc

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        return self.logs[proc.pid].read_text(errors="replace")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)  # a stopped worker dies of SIGKILL too, but let it see the end
                proc.kill()
            proc.wait()


def worker_pool(tmp_path: Path) -> Iterator[Workers]:
    """The body of a `workers` fixture: worker subprocesses, killed (by pid) at teardown."""
    pool = Workers(tmp_path)
    try:
        yield pool
    finally:
        pool.close()


def own_server(kind: str, tmp_path: Path, *args: str) -> Iterator[RedisServer]:
    """The body of a server fixture: a server of the test's own (it may kill -9 and restart it), stopped at the end."""
    binaries = server_binaries()
    if kind not in binaries:
        if os.environ.get("CI"):
            pytest.fail(f"{kind} server binary not found; scripts/bootstrap installs it")
        pytest.skip(f"no {kind} server binary here")
    data = tmp_path / f"{kind}-data"
    data.mkdir()
    server = RedisServer(kind, binaries[kind], data)
    server.start(*args)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    """Worker subprocesses, killed (by pid) at teardown."""
    yield from worker_pool(tmp_path)


@pytest.fixture(params=["redis", "valkey"])
def durable_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisServer]:
    """A server of this test's own with AOF `appendfsync always`."""
    yield from own_server(request.param, tmp_path, *AOF_ALWAYS)


def client_for(url: str, **settings: float) -> Client:
    """A producer client; waits tolerate a worker takeover (no_worker_after 20 s)."""
    settings.setdefault("no_worker_after", 20.0)
    return Client(settings=ClientSettings(redis_url=url, **settings))


def wait_exit(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    """The worker's exit status; AssertionError if it is still running after `timeout` seconds."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"worker {proc.pid} still running after {timeout:g}s") from None


def wait_current(server: RedisServer, session: str, cid: str, timeout: float = 20.0) -> None:
    """Wait until the session's worker reports `cid` as its running command (meta `current`)."""
    meta = protocol.keys(session).meta
    wait_for(lambda: server.client().hget(meta, "current") == cid.encode(), timeout=timeout)


def gone(pid: int) -> bool:
    """Has the process exited (gone, or a zombie nobody reaped yet)?"""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def settle(
    history: History,
    server: RedisServer,
    logs: dict[str, Path],
    may_rerun: tuple[str, ...] = (),
) -> None:
    """Read every result of the sessions in `logs` into the history, then run the checker."""
    client = server.client()
    for session in logs:
        history.read_results(client, session)
    check(
        history,
        {s: read_executions(log) for s, log in logs.items()},
        {s: stream_order(client, s) for s in logs},
        may_rerun=may_rerun,
    )


def submit_ok(history: History, session: Session, log: Path, cid: str, body: str = "true", **options: object) -> str:
    """Submit `echo CID >> LOG; BODY` as `cid`; it must be accepted."""
    assert history.submit(session, exec_line(log, cid, body), cid, **options), f"submit of {cid} was not accepted"
    return cid


def expect(r: Result, status: str, exit_code: int | None = 0) -> None:
    assert (r.status, r.exit_code) == (status, exit_code), f"{r.id}: {r.status} {r.exit_code} error={r.error!r}"


# -- kill -9 at every step of the protocol ------------------------------------------------------------------------

# step -> (status, exit code, executions) of the command the worker died on, for a plain and an idempotent command
AFTER_RESTART = {
    ("taken", False): ("interrupted", None, 0),
    ("ran", False): ("interrupted", None, 1),
    ("committed", False): ("completed", 0, 1),
    ("taken", True): ("completed", 0, 1),
    ("ran", True): ("completed", 0, 2),
    ("committed", True): ("completed", 0, 1),
}


@pytest.mark.parametrize("idempotent", [False, True], ids=["plain", "idempotent"])
@pytest.mark.parametrize("step", ["taken", "ran", "committed"])
def test_worker_killed_at_a_step_then_restarted(
    redis_server: RedisServer, workers: Workers, session_id: str, tmp_path: Path, step: str, idempotent: bool
) -> None:
    log, h = tmp_path / "exec.log", History()
    s = client_for(redis_server.url).session(session_id)
    first = workers.start(redis_server.url, session_id, env={"SHELLQ_FAULT": step, "SHELLQ_FAULT_AFTER": "2"})
    submit_ok(h, s, log, "c-1", "echo one")
    expect(s.result("c-1", timeout=20), "completed")  # the first command is not the faulty one
    submit_ok(h, s, log, "c-2", "echo two", idempotent=idempotent)
    assert wait_exit(first) == SIGKILLED, f"SHELLQ_FAULT={step} did not kill the worker"

    successor = workers.start(redis_server.url, session_id)
    r = s.result("c-2", timeout=30)
    status, exit_code, runs = AFTER_RESTART[(step, idempotent)]
    expect(r, status, exit_code)
    if status == "completed":
        assert r.stdout == "two\n"
    assert read_executions(log).count("c-2") == runs
    submit_ok(h, s, log, "c-3", "echo three")
    assert s.result("c-3", timeout=20).stdout == "three\n"
    successor.send_signal(signal.SIGTERM)
    assert wait_exit(successor) == 0
    settle(h, redis_server, {session_id: log}, may_rerun=("c-2",) if idempotent else ())
    assert h.results_for(session_id, "c-2") == [status]


def test_fault_after_defaults_to_the_first_command(
    redis_server: RedisServer, workers: Workers, session_id: str, tmp_path: Path
) -> None:
    log, h = tmp_path / "exec.log", History()
    s = client_for(redis_server.url).session(session_id)
    first = workers.start(redis_server.url, session_id, env={"SHELLQ_FAULT": "ran"})
    submit_ok(h, s, log, "c-1", "echo one")
    assert wait_exit(first) == SIGKILLED
    workers.start(redis_server.url, session_id)
    expect(s.result("c-1", timeout=30), "interrupted", None)
    submit_ok(h, s, log, "c-2")
    expect(s.result("c-2", timeout=20), "completed")
    settle(h, redis_server, {session_id: log})


def test_sigterm_mid_command_commits_interrupted_and_exits_0(
    redis_server: RedisServer, workers: Workers, session_id: str, tmp_path: Path
) -> None:
    log, h = tmp_path / "exec.log", History()
    s = client_for(redis_server.url).session(session_id)
    proc = workers.start(redis_server.url, session_id, env={"SHELLQ_SHUTDOWN_GRACE": "0.5"})
    submit_ok(h, s, log, "c-1", "echo going; sleep 30")
    wait_current(redis_server, session_id, "c-1")
    proc.send_signal(signal.SIGTERM)
    assert wait_exit(proc, 20) == 0
    r = s.result("c-1", timeout=5)
    expect(r, "interrupted", None)
    assert r.stdout == "going\n"
    settle(h, redis_server, {session_id: log})


# -- one worker per session ------------------------------------------------------------------------------------


def test_paused_worker_is_replaced_and_fenced_off_when_it_resumes(
    redis_server: RedisServer, workers: Workers, session_id: str, tmp_path: Path
) -> None:
    log, h = tmp_path / "exec.log", History()
    pidfile, survived = tmp_path / "sleeper.pid", tmp_path / "survived"
    s = client_for(redis_server.url).session(session_id)
    paused = workers.start(redis_server.url, session_id)
    submit_ok(h, s, log, "c-1", f"sh -c 'echo $$ > {pidfile}; exec sleep 60'; touch {survived}")
    wait_current(redis_server, session_id, "c-1")
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip())
    sleeper = int(pidfile.read_text())
    os.kill(paused.pid, signal.SIGSTOP)
    try:
        successor = workers.start(redis_server.url, session_id)
        expect(s.result("c-1", timeout=30), "interrupted", None)  # the successor took over past the lease
        wait_for(lambda: gone(sleeper), timeout=15)  # ... and killed the stopped worker's command
        submit_ok(h, s, log, "c-2", "echo $PPID")
        assert s.result("c-2", timeout=20).stdout == f"{successor.pid}\n"
    finally:
        os.kill(paused.pid, signal.SIGCONT)
    submit_ok(h, s, log, "c-3", "echo $PPID")  # the resumed worker must not take it
    wait_exit(paused)  # it notices it lost the lease and exits (any status)
    assert s.result("c-3", timeout=20).stdout == f"{successor.pid}\n"
    assert not survived.exists()
    assert successor.poll() is None
    settle(h, redis_server, {session_id: log})
    assert h.results_for(session_id, "c-1") == ["interrupted"], "the resumed worker published a result"


def test_two_workers_started_at_once_only_one_serves(
    redis_server: RedisServer, workers: Workers, session_id: str, tmp_path: Path
) -> None:
    log, h = tmp_path / "exec.log", History()
    s = client_for(redis_server.url).session(session_id)
    pair = [workers.start(redis_server.url, session_id), workers.start(redis_server.url, session_id)]
    first = [submit_ok(h, s, log, f"a-{i}", "echo $PPID") for i in range(10)]
    served_by = {s.result(cid, timeout=30).stdout for cid in first}
    assert len(served_by) == 1, f"commands ran in more than one worker: {served_by}"
    holder = next(p for p in pair if f"{p.pid}\n" in served_by)
    waiting = next(p for p in pair if p is not holder)
    assert waiting.poll() is None, "the second worker should wait for the lease, not exit"

    holder.kill()
    holder.wait()
    second = [submit_ok(h, s, log, f"b-{i}", "echo $PPID") for i in range(10)]
    assert {s.result(cid, timeout=30).stdout for cid in second} == {f"{waiting.pid}\n"}
    settle(h, redis_server, {session_id: log})


# -- recovery: idempotent re-run, poison, trimmed entries ---------------------------------------------------------


@pytest.mark.parametrize("idempotent", [False, True], ids=["plain", "idempotent"])
def test_command_that_kills_its_worker(
    redis_server: RedisServer, workers: Workers, session_id: str, tmp_path: Path, idempotent: bool
) -> None:
    """`kill -9 $PPID` kills the worker (the shell's parent). Plain: the next worker answers `interrupted`.
    Idempotent: it runs once more, kills that worker too, and the third answers `rejected` (poison)."""
    log, h = tmp_path / "exec.log", History()
    s = client_for(redis_server.url).session(session_id)
    submit_ok(h, s, log, "poison-1", "kill -9 $PPID", idempotent=idempotent)
    res_key = protocol.keys(session_id).res
    deaths = 0

    def answered() -> bool:
        return bool(redis_server.client().xlen(res_key))

    for _ in range(4):
        proc = workers.start(redis_server.url, session_id)
        wait_for(lambda p=proc: p.poll() is not None or answered(), timeout=30)
        if answered():
            break
        assert proc.wait() == SIGKILLED
        deaths += 1
    r = s.result("poison-1", timeout=5)
    if idempotent:
        expect(r, "rejected", None)
        assert "poison" in (r.error or "")
        assert deaths == 2, "an idempotent command runs once more after a crash, not again and again"
    else:
        expect(r, "interrupted", None)
        assert deaths == 1
    assert read_executions(log).count("poison-1") == deaths
    assert proc.poll() is None, "the worker that answered must go on serving"
    submit_ok(h, s, log, "c-after", "echo fine")
    assert s.result("c-after", timeout=20).stdout == "fine\n"
    settle(h, redis_server, {session_id: log}, may_rerun=("poison-1",))


# -- the machine fails under the shell -----------------------------------------------------------------------------

FILES_UP_TO_64K = ("prlimit", "--fsize=65536")  # the worker, its shell and commands: as a nearly full disk would


def test_output_that_cannot_be_spooled_is_said_and_the_command_completes(
    redis_server: RedisServer, workers: Workers, session_id: str
) -> None:
    workers.start(redis_server.url, session_id, env={"SHELLQ_OUTPUT_CAP": "1024"}, wrapper=FILES_UP_TO_64K)
    s = client_for(redis_server.url).session(session_id)
    r = s.run("head -c 200000 /dev/zero; export STILL=here", timeout=30)
    expect(r, "completed")
    assert (r.truncated, r.stdout_size, len(r.stdout_bytes)) == (True, 200000, 1024)
    assert "output past the cap could not be spooled (stdout: File too large" in (r.error or "")
    after = s.run("echo $STILL", timeout=30)
    assert (after.stdout, after.error, after.shell_epoch) == ("here\n", None, r.shell_epoch)


def test_a_command_the_shell_cannot_take_is_answered_and_the_session_goes_on(
    redis_server: RedisServer, workers: Workers, session_id: str
) -> None:
    proc = workers.start(redis_server.url, session_id, wrapper=FILES_UP_TO_64K)
    s = client_for(redis_server.url).session(session_id)
    first = s.run("true", timeout=30)
    r = s.run(f"echo {'x' * 100_000}", timeout=30)  # its command file cannot be written
    expect(r, "interrupted", None)
    assert "the shell failed: [Errno 27] File too large: '/" in (r.error or "")  # and names the file
    after = s.run("echo next", timeout=30)
    assert (after.status, after.stdout, after.shell_epoch) == ("completed", "next\n", first.shell_epoch + 1)
    assert proc.poll() is None, "the worker goes on serving"


@pytest.mark.parametrize("how", ["xdel", "xtrim"])
def test_pending_entry_deleted_from_the_stream_gets_lost(
    redis_server: RedisServer, workers: Workers, session_id: str, tmp_path: Path, how: str
) -> None:
    log, h = tmp_path / "exec.log", History()
    keys = protocol.keys(session_id)
    r = redis_server.client()
    s = client_for(redis_server.url).session(session_id)
    first = workers.start(redis_server.url, session_id, env={"SHELLQ_FAULT": "taken"})
    submit_ok(h, s, log, "c-1", "echo never")
    assert wait_exit(first) == SIGKILLED  # c-1 is now pending: taken, never started
    ((entry_id, _),) = r.xrange(keys.cmd)
    if how == "xdel":
        assert r.xdel(keys.cmd, entry_id) == 1
    else:
        assert r.xtrim(keys.cmd, maxlen=0, approximate=False) == 1
    workers.start(redis_server.url, session_id)
    wait_for(lambda: r.xlen(keys.res) > 0, timeout=30)
    (res,) = [fields for _, fields in r.xrange(keys.res)]
    assert (res[b"status"], res[b"entry_id"]) == (b"lost", entry_id)
    lost = s.result("c-1", timeout=10)  # the producer finds it under the id it submitted
    expect(lost, "lost", None)
    submit_ok(h, s, log, "c-2", "echo after")
    assert s.result("c-2", timeout=20).stdout == "after\n"
    settle(h, redis_server, {session_id: log})
    assert read_executions(log) == ["c-2"]


# -- admission: queue cap, duplicate submits, many producers, malformed entries ----------------------------------


def test_commands_written_by_hand_do_not_loosen_the_queue_cap(
    redis_server: RedisServer, start_worker: Callable[..., Worker], session_id: str, tmp_path: Path
) -> None:
    """Commands written with redis-cli XADD (no submit counted them) and answered leave the cap as it was: with a
    cap of 3, a fourth unfinished command is still refused."""
    start_worker(session_id, queue_cap=3)
    r, k = redis_server.client(), protocol.keys(session_id)
    s = Client(redis_server.url).session(session_id)
    for i in range(3):
        r.xadd(k.cmd, {"cmd": f"echo by-hand-{i}"})
    wait_for(lambda: r.xlen(k.res) == 3)
    go = tmp_path / "go"
    s.submit(f"while [ ! -e {go} ]; do sleep 0.05; done", id="held")
    wait_current(redis_server, session_id, "held")
    s.submit("true", id="second")
    s.submit("true", id="third")
    with pytest.raises(QueueFullError):
        s.submit("true", id="fourth")
    go.touch()
    assert s.result("third", timeout=20).status == "completed"


def test_queue_cap_refuses_submits_beyond_it(
    redis_server: RedisServer, workers: Workers, session_id: str, tmp_path: Path
) -> None:
    log, go, h = tmp_path / "exec.log", tmp_path / "go", History()
    workers.start(redis_server.url, session_id, env={"SHELLQ_QUEUE_CAP": "5"})
    settings = ClientSettings.from_env({"SHELLQ_REDIS_URL": redis_server.url, "SHELLQ_QUEUE_CAP": "5"})
    s = Client(settings=settings).session(session_id)
    submit_ok(h, s, log, "q-0", f"while [ ! -e {go} ]; do sleep 0.05; done")
    wait_current(redis_server, session_id, "q-0")
    for i in range(1, 5):
        submit_ok(h, s, log, f"q-{i}")
    assert not h.submit(s, exec_line(log, "q-5"), "q-5"), "a 6th unfinished command was accepted"
    refused = h.ops[-1]
    assert refused.type == "fail"
    assert "QueueFullError" in (refused.value or ""), refused.value
    assert "5" in (refused.value or ""), f"the message should give the numbers: {refused.value}"
    assert s.submit(exec_line(log, "q-1"), id="q-1") == "q-1"  # a retry of an accepted id is not refused
    assert redis_server.client().xlen(protocol.keys(session_id).cmd) == 5

    go.touch()
    for i in range(5):
        expect(s.result(f"q-{i}", timeout=20), "completed")
    submit_ok(h, s, log, "q-6")  # room again
    expect(s.result("q-6", timeout=20), "completed")
    settle(h, redis_server, {session_id: log})
    assert "q-5" not in read_executions(log)
    assert h.results_for(session_id, "q-5") == []


def test_duplicate_submits_from_eight_threads_queue_each_id_once(
    redis_server: RedisServer, workers: Workers, session_id: str, tmp_path: Path
) -> None:
    log, h = tmp_path / "exec.log", History()
    workers.start(redis_server.url, session_id)
    ids = [f"d-{i}" for i in range(20)]
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def producer(n: int) -> None:
        try:
            s = client_for(redis_server.url).session(session_id)
            order = ids[:]
            random.Random(n).shuffle(order)
            barrier.wait(timeout=20)
            for cid in order:
                submit_ok(h, s, log, cid, f"echo {cid}")
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=producer, args=(n,), name=f"producer-{n}") for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    s = client_for(redis_server.url).session(session_id)
    assert {cid: s.result(cid, timeout=30).stdout for cid in ids} == {cid: f"{cid}\n" for cid in ids}
    assert redis_server.client().xlen(protocol.keys(session_id).cmd) == 20
    settle(h, redis_server, {session_id: log})
    assert sorted(read_executions(log)) == sorted(ids)


def test_concurrent_producers_and_malformed_entries_in_one_history(
    redis_server: RedisServer, workers: Workers, session_id: str, tmp_path: Path
) -> None:
    log, h = tmp_path / "exec.log", History()
    workers.start(redis_server.url, session_id)
    errors: list[BaseException] = []
    mismatches: list[tuple[str, str]] = []
    started = threading.Barrier(7)

    def producer(p: int) -> None:
        try:
            s = client_for(redis_server.url).session(session_id)
            started.wait(timeout=20)
            for i in range(25):
                cid = f"p{p}-{i}"
                submit_ok(h, s, log, cid, f"echo {cid}")
                if i % 5 == 4:  # wait now and then, like an agent reading its output
                    r = s.result(cid, timeout=30)
                    if r.stdout != f"{cid}\n":
                        mismatches.append((cid, r.stdout))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=producer, args=(p,), name=f"producer-{p}") for p in range(6)]
    for t in threads:
        t.start()
    started.wait(timeout=20)
    r, cmd_key = redis_server.client(), protocol.keys(session_id).cmd
    raw = [
        r.xadd(cmd_key, {"cmd": "true", "colour": "blue"}).decode(),
        r.xadd(cmd_key, {"cmd": "x" * (protocol.MAX_ENTRY_BYTES + 1)}).decode(),
    ]
    for eid in raw:
        h.raw(session_id, eid)
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert not mismatches, mismatches
    s = client_for(redis_server.url).session(session_id)
    for _, cid in h.accepted():
        s.result(cid, timeout=30)
    settle(h, redis_server, {session_id: log})
    assert [h.results_for(session_id, eid) for eid in raw] == [["rejected"], ["rejected"]]
    assert len(read_executions(log)) == 150


# -- durability settings ----------------------------------------------------------------------------------------


def test_require_durable_refuses_redis_without_aof(
    redis_server: RedisServer, workers: Workers, session_id: str
) -> None:
    proc = workers.start(redis_server.url, session_id, env={"SHELLQ_REQUIRE_DURABLE": "1"})
    assert wait_exit(proc) == 2
    assert redis_server.client().exists(protocol.keys(session_id).cmd) == 0


def test_worker_on_redis_without_aof_warns_about_durability(
    redis_server: RedisServer, workers: Workers, session_id: str
) -> None:
    proc = workers.start(redis_server.url, session_id)
    s = client_for(redis_server.url).session(session_id)
    assert s.run("echo up", timeout=10).stdout == "up\n"
    assert proc.poll() is None
    assert "durab" in workers.log(proc).lower(), workers.log(proc)


def test_require_durable_accepts_aof_with_noeviction_and_refuses_eviction(
    durable_server: RedisServer, workers: Workers, session_id: str
) -> None:
    env = {"SHELLQ_REQUIRE_DURABLE": "1"}
    r = durable_server.client()
    r.config_set("maxmemory-policy", "noeviction")
    proc = workers.start(durable_server.url, session_id, env=env)
    assert client_for(durable_server.url).session(session_id).run("echo safe", timeout=10).stdout == "safe\n"
    proc.send_signal(signal.SIGTERM)
    assert wait_exit(proc) == 0

    r.config_set("maxmemory-policy", "allkeys-lru")
    refused = workers.start(durable_server.url, f"{session_id}-lru", env=env)
    assert wait_exit(refused) == 2


# -- the checker itself ---------------------------------------------------------------------------------------------


def test_checker_reports_lost_duplicated_unexpected_and_reordered_commands() -> None:
    h = History()
    for cid in ("a", "b", "c", "d"):
        h.record("submit", "invoke", "s", cid)
        h.record("submit", "ok", "s", cid)
    h.record("submit", "invoke", "s", "e")
    h.record("submit", "timeout", "s", "e", "RedisUnavailableError")
    for cid, status in [("a", "completed"), ("b", "completed"), ("b", "completed"), ("d", "interrupted")]:
        h.result("s", cid, status)
    h.result("s", "zz", "completed")
    executions = {"s": ["b", "a", "d", "d"]}
    with pytest.raises(AssertionError) as failed:
        check(h, executions, {"s": ["a", "b", "c", "d", "e"]})
    text = str(failed.value)
    assert "accepted=4 results=5 duplicated=2 lost=1 interrupted=1" in text
    for problem in ("lost: s/c", "duplicated result: s/b", "unexpected: result", "interrupted but ran 2", "order:"):
        assert problem in text

    clean = History()
    clean.record("submit", "ok", "s", "a")
    clean.record("submit", "timeout", "s", "b")
    clean.result("s", "a", "completed")
    clean.raw("s", "1-1")
    clean.result("s", "1-1", "rejected")
    report = check(clean, {"s": ["a"]}, {"s": ["a", "1-1"]})
    assert (report.accepted, report.lost, report.duplicated, report.indeterminate) == (2, 0, 0, 1)
