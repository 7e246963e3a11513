"""Lifecycle that does what a user means (issue 13, section 4), over real Redis/Valkey servers and real workers:

- a wait that gives up (no worker, no time left) cancels a command no worker has taken, atomically: it never runs
  later, and `shellq exec` exits 125 meaning "did not run and never will"; a command a worker took is not cancelled,
  and the wait says it started;
- an entry that reuses a command id of another entry is answered `rejected` and never runs (raw XADD);
- a result entry that cannot be decoded is a clear error naming the entry, never a traceback;
- a worker stopped while it waits for the session's lease exits 0 and leaves the session's state alone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import RedisServer, wait_for

from producer import (
    Client,
    ClientSettings,
    InvalidResultError,
    NoWorkerError,
    Result,
    ResultTimeoutError,
    Session,
)
from worker import protocol
from worker.loop import Worker

pytestmark = pytest.mark.timeout(90)

StartWorker = Callable[..., Worker]
WorkerProcess = Callable[..., subprocess.Popen[bytes]]
SHELLQ = Path(sys.executable).parent / "shellq"


def session_for(server: RedisServer, session: str, **settings: Any) -> Session:
    return Client(settings=ClientSettings(redis_url=server.url, **settings)).session(session)


def results(server: RedisServer, session: str) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in server.client().xrange(protocol.keys(session).res)]


def results_for(server: RedisServer, session: str, cid: str) -> list[dict[bytes, bytes]]:
    return [fields for fields in results(server, session) if fields[b"id"] == cid.encode()]


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def expect_cancelled_unrun(r: Result, reason: str) -> None:
    assert (r.status, r.exit_code) == ("cancelled", None), r
    assert "cancelled before it started" in (r.error or "") and reason in (r.error or ""), r.error


def shellq(server: RedisServer, *args: str, **env: str) -> subprocess.Popen[bytes]:
    """The `shellq` console script against `server`."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SHELLQ_")}
    full_env.update(SHELLQ_REDIS_URL=server.url, **env)
    return subprocess.Popen([str(SHELLQ), *args], env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


# -- a wait that gives up cancels a command nobody took ---------------------------------------------------------


def test_run_without_worker_cancels_the_command_so_a_later_worker_never_runs_it(
    redis_server: RedisServer, start_worker: StartWorker, session_id: str, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    s = session_for(redis_server, session_id, no_worker_after=1.0)
    with pytest.raises(NoWorkerError) as gave_up:
        s.run(f"touch {marker}", id="c-gone", timeout=60)
    assert gave_up.value.cancelled
    assert "will never run" in str(gave_up.value)

    start_worker(session_id)  # the session comes up later: the cancelled command must not run
    assert s.run("echo after", timeout=10).stdout == "after\n"
    expect_cancelled_unrun(s.result("c-gone", timeout=5), "no worker")
    assert not marker.exists()
    assert len(results_for(redis_server, session_id, "c-gone")) == 1


def test_retrying_a_given_up_run_with_a_new_id_runs_it_once(
    redis_server: RedisServer, start_worker: StartWorker, session_id: str, tmp_path: Path
) -> None:
    """An agent that retries on NoWorkerError (exit 125) after starting the session runs its command once."""
    log = tmp_path / "runs"
    s = session_for(redis_server, session_id, no_worker_after=1.0)
    with pytest.raises(NoWorkerError):
        s.run(f"echo run >> {log}", timeout=60)
    start_worker(session_id)
    assert s.run(f"echo run >> {log}", timeout=10).exit_code == 0
    s.run("true", timeout=10)
    assert lines(log) == ["run"]


def test_wait_timeout_cancels_a_command_still_queued(
    redis_server: RedisServer, start_worker: StartWorker, session_id: str, tmp_path: Path
) -> None:
    start_worker(session_id)
    marker = tmp_path / "ran"
    s = session_for(redis_server, session_id)
    blocker = s.submit("sleep 1.5; echo blocker")
    queued = s.submit(f"touch {marker}")
    with pytest.raises(ResultTimeoutError) as gave_up:
        s.result(queued, timeout=0.3)
    assert gave_up.value.cancelled
    assert s.result(blocker, timeout=10).stdout == "blocker\n"
    assert s.run("echo next", timeout=10).stdout == "next\n"  # the session went past the cancelled command
    expect_cancelled_unrun(s.result(queued, timeout=5), "in time")
    assert not marker.exists()


def test_a_poll_with_cancel_false_leaves_the_command_queued(
    redis_server: RedisServer, start_worker: StartWorker, session_id: str
) -> None:
    start_worker(session_id)
    s = session_for(redis_server, session_id)
    s.submit("sleep 1")
    queued = s.submit("echo still-queued")
    with pytest.raises(ResultTimeoutError) as gave_up:
        s.result(queued, timeout=0.2, cancel=False)
    assert not gave_up.value.cancelled
    r = s.result(queued, timeout=10)
    assert (r.status, r.stdout) == ("completed", "still-queued\n")


def test_a_wait_that_gives_up_on_a_running_command_says_it_started_and_leaves_it_running(
    redis_server: RedisServer, start_worker: StartWorker, session_id: str
) -> None:
    start_worker(session_id)
    s = session_for(redis_server, session_id)
    cid = s.submit("sleep 1; echo finished")
    wait_for(lambda: redis_server.client().hget(protocol.keys(session_id).meta, "current") == cid.encode())
    with pytest.raises(ResultTimeoutError) as gave_up:
        s.result(cid, timeout=0.2)
    assert not gave_up.value.cancelled
    assert "had started" in str(gave_up.value)
    r = s.result(cid, timeout=10)
    assert (r.status, r.stdout) == ("completed", "finished\n")
    assert len(results_for(redis_server, session_id, cid)) == 1


def test_no_worker_after_a_worker_took_the_command_says_it_started(
    redis_server: RedisServer, worker_process: WorkerProcess, session_id: str
) -> None:
    """The worker dies right after it took the command (counts as started): the cancel loses to the take, the wait
    says so, and the next worker answers the command `interrupted` (outcome unknown), not `cancelled`."""
    first = worker_process(session_id, env={"SHELLQ_FAULT": "taken"})
    s = session_for(redis_server, session_id, no_worker_after=1.0)
    s.submit("echo never", id="c-taken")
    assert first.wait(timeout=20) == -signal.SIGKILL
    with pytest.raises(NoWorkerError) as gave_up:
        s.result("c-taken", timeout=30)
    assert not gave_up.value.cancelled
    assert "had started" in str(gave_up.value)
    worker_process(session_id)
    r = s.result("c-taken", timeout=20)
    assert (r.status, r.exit_code) == ("interrupted", None)


def test_cancels_racing_the_worker_each_command_runs_once_or_never(
    redis_server: RedisServer, start_worker: StartWorker, session_id: str, tmp_path: Path
) -> None:
    """Give up on most commands right after submitting them (timeout 0), while the worker takes them: the cancel
    and the take are atomic steps, so each command is either cancelled and never runs, or runs once; either way it
    has one result. (A timeout of a few ms would not race: Redis ends a short blocking read only at its next tick.)"""
    start_worker(session_id)
    log = tmp_path / "exec.log"
    s = session_for(redis_server, session_id)
    cancelled: dict[str, bool] = {}
    for i in range(60):
        pause = "sleep 0.02" if i % 5 == 0 else "true"  # so that some commands wait in the queue
        cid = s.submit(f"echo r-{i} >> {log}; {pause}", id=f"r-{i}")
        try:
            s.result(cid, timeout=10 if i % 3 == 0 else 0)
            cancelled[cid] = False
        except ResultTimeoutError as e:
            cancelled[cid] = e.cancelled
    s.run("true", timeout=30)
    ran = lines(log)
    for cid, was_cancelled in cancelled.items():
        r = s.result(cid, timeout=10)
        if was_cancelled:
            assert (cid, r.status) == (cid, "cancelled") and cid not in ran
        else:
            assert (cid, r.status, ran.count(cid)) == (cid, "completed", 1)
        assert len(results_for(redis_server, session_id, cid)) == 1
    assert sorted(ran) == sorted(cid for cid, c in cancelled.items() if not c)
    assert sum(cancelled.values()) > 0, "no wait cancelled its command"


def test_exec_to_a_session_without_worker_exits_125_and_never_runs_later(
    redis_server: RedisServer, start_worker: StartWorker, session_id: str, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    began = time.monotonic()
    proc = shellq(redis_server, "exec", session_id, "--", f"touch {marker}", SHELLQ_NO_WORKER_AFTER="1")
    _, err = proc.communicate(timeout=60)
    took = time.monotonic() - began
    assert proc.returncode == 125, err
    assert b"will never run" in err and b"Traceback" not in err, err
    print(f"\nexec to a session without worker: exit 125 after {took:.2f}s (SHELLQ_NO_WORKER_AFTER=1)")
    start_worker(session_id)
    assert session_for(redis_server, session_id).run("echo up", timeout=10).stdout == "up\n"
    assert not marker.exists()


def test_exec_whose_worker_died_after_taking_the_command_exits_75_not_125(
    redis_server: RedisServer, worker_process: WorkerProcess, session_id: str
) -> None:
    """125 means "did not run and never will"; a command a worker took may have run: `exec` says so with 75."""
    first = worker_process(session_id, env={"SHELLQ_FAULT": "taken"})
    proc = shellq(redis_server, "exec", session_id, "--", "echo maybe", SHELLQ_NO_WORKER_AFTER="1")
    _, err = proc.communicate(timeout=60)
    assert first.wait(timeout=20) == -signal.SIGKILL
    assert proc.returncode == 75, err
    assert b"started" in err and b"Traceback" not in err, err


# -- an entry that reuses another entry's command id -------------------------------------------------------------


def test_the_same_raw_entry_written_twice_runs_once(
    redis_server: RedisServer, start_worker: StartWorker, session_id: str, tmp_path: Path
) -> None:
    """`redis-cli XADD 'shellq:{s}:cmd' '*' id c-1 cmd 'echo run >> LOG'` twice."""
    start_worker(session_id)
    log = tmp_path / "runs"
    r, cmd_key = redis_server.client(), protocol.keys(session_id).cmd
    first = r.xadd(cmd_key, {"id": "c-1", "cmd": f"echo run >> {log}; echo first"}).decode()
    wait_for(lambda: len(results(redis_server, session_id)) == 1)
    second = r.xadd(cmd_key, {"id": "c-1", "cmd": f"echo run >> {log}; echo second"}).decode()
    wait_for(lambda: len(results(redis_server, session_id)) == 2)
    s = session_for(redis_server, session_id)
    dup = s.result(second, timeout=5)
    assert (dup.status, dup.entry_id, dup.exit_code) == ("rejected", second, None)
    assert "duplicate command id 'c-1'" in (dup.error or "") and first in (dup.error or "")
    original = s.result("c-1", timeout=5)
    assert (original.status, original.stdout, original.entry_id) == ("completed", "first\n", first)
    assert lines(log) == ["run"]


@pytest.mark.parametrize("state", ["answered", "running", "queued"])
def test_a_raw_entry_reusing_a_submitted_id_is_rejected_and_never_runs(
    redis_server: RedisServer, start_worker: StartWorker, session_id: str, tmp_path: Path, state: str
) -> None:
    start_worker(session_id)
    log, go = tmp_path / "runs", tmp_path / "go"
    s = session_for(redis_server, session_id)
    r, keys = redis_server.client(), protocol.keys(session_id)
    if state == "queued":
        s.submit(f"while [ ! -e {go} ]; do sleep 0.02; done", id="blocker")
        wait_for(lambda: r.hget(keys.meta, "current") == b"blocker")
    wait = f"while [ ! -e {go} ]; do sleep 0.02; done; " if state == "running" else ""
    s.submit(f"{wait}echo original >> {log}; echo original", id="c-1")
    if state == "answered":
        s.result("c-1", timeout=10)
    if state == "running":
        wait_for(lambda: r.hget(keys.meta, "current") == b"c-1")
    dup = r.xadd(keys.cmd, {"id": "c-1", "cmd": f"echo duplicate >> {log}"}).decode()
    go.touch()
    rejected = s.result(dup, timeout=10)
    assert (rejected.status, rejected.id) == ("rejected", dup)
    assert "duplicate command id 'c-1'" in (rejected.error or "")
    assert s.result("c-1", timeout=10).stdout == "original\n"
    s.run("true", timeout=10)
    assert lines(log) == ["original"]
    assert len(results_for(redis_server, session_id, "c-1")) == 1
    assert s.submit("echo again", id="c-1") == "c-1"  # the id still answers to the original
    assert s.result("c-1", timeout=5).stdout == "original\n"


def test_two_raw_entries_queued_with_one_id_run_the_first_only(
    redis_server: RedisServer, start_worker: StartWorker, session_id: str, tmp_path: Path
) -> None:
    start_worker(session_id)
    log, go = tmp_path / "runs", tmp_path / "go"
    s = session_for(redis_server, session_id)
    r, keys = redis_server.client(), protocol.keys(session_id)
    s.submit(f"while [ ! -e {go} ]; do sleep 0.02; done", id="blocker")
    first = r.xadd(keys.cmd, {"id": "c-raw", "cmd": f"echo first >> {log}"}).decode()
    second = r.xadd(keys.cmd, {"id": "c-raw", "cmd": f"echo second >> {log}"}).decode()
    go.touch()
    assert s.result(second, timeout=10).status == "rejected"
    assert (s.result("c-raw", timeout=5).status, s.result("c-raw", timeout=5).entry_id) == ("completed", first)
    assert lines(log) == ["first"]


def test_a_duplicate_pending_when_its_worker_died_is_rejected_by_the_successor(
    redis_server: RedisServer, worker_process: WorkerProcess, session_id: str, tmp_path: Path
) -> None:
    """Recovery settles a taken duplicate as a duplicate (`rejected`, not run), not as the original's replay."""
    log = tmp_path / "runs"
    first = worker_process(session_id, env={"SHELLQ_FAULT": "taken", "SHELLQ_FAULT_AFTER": "2"})
    s = session_for(redis_server, session_id, no_worker_after=20.0)
    assert s.run(f"echo original >> {log}", id="c-1", timeout=20).exit_code == 0
    dup = redis_server.client().xadd(protocol.keys(session_id).cmd, {"id": "c-1", "cmd": f"echo dup >> {log}"})
    assert first.wait(timeout=20) == -signal.SIGKILL  # it died holding the duplicate, taken
    worker_process(session_id)
    rejected = s.result(dup.decode(), timeout=20)
    assert rejected.status == "rejected" and "duplicate" in (rejected.error or "")
    assert s.run(f"echo after >> {log}", timeout=20).exit_code == 0
    assert lines(log) == ["original", "after"]


# -- a result entry that cannot be decoded -----------------------------------------------------------------------

GARBAGE = {
    "bad status": {"status": "exploded"},
    "wrong type": {"status": "completed", "exit_code": "zero"},
    "bad version": {"status": "completed", "v": "9"},
    "unknown field": {"status": "completed", "colour": "blue"},
    "no entry id": {"status": "completed", "entry_id": None},
}


@pytest.mark.parametrize("path", ["waiting", "journal"])
@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_a_result_entry_that_cannot_be_read_is_a_clear_error_naming_it(
    redis_server: RedisServer, session_id: str, kind: str, path: str
) -> None:
    """The command's journal names a result entry that cannot be read (as a worker of another shellq might commit
    it); `waiting`: it is committed while the producer waits; `journal`: before the producer asks."""
    s = session_for(redis_server, session_id)
    cid = s.submit("true")
    r, keys = redis_server.client(), protocol.keys(session_id)
    fields = {k: v for k, v in {"id": cid, "entry_id": "1-1", **GARBAGE[kind]}.items() if v is not None}
    written: list[str] = []

    def commit() -> None:  # what the worker's commit writes
        rid = r.xadd(keys.res, fields).decode()  # type: ignore[arg-type]
        r.hset(keys.jrnl(cid), "res", rid)
        written.append(rid)

    if path == "journal":
        commit()
    else:
        threading.Timer(0.3, commit).start()  # while the producer waits
    with pytest.raises(InvalidResultError) as bad:
        s.result(cid, timeout=10)
    rid = written[0]
    assert rid in str(bad.value) and keys.res in str(bad.value) and cid in str(bad.value), bad.value
    assert not bad.value.cancelled  # it was answered, however unreadably: nothing to cancel


def test_a_result_entry_only_carrying_the_command_id_is_not_its_result(
    redis_server: RedisServer, start_worker: StartWorker, session_id: str
) -> None:
    """Anyone who can write the result stream can append an entry with a command's id; the producer takes the entry
    the worker committed (the journal's), so a forged `exit_code 0` never replaces the real `exit 3`."""
    s = session_for(redis_server, session_id)
    cid = s.submit("sleep 0.5; (exit 3)")
    r, keys = redis_server.client(), protocol.keys(session_id)
    forged = {"id": cid, "entry_id": "1-1", "status": "completed", "exit_code": "0", "v": "1"}
    r.xadd(keys.res, forged)  # type: ignore[arg-type]
    start_worker(session_id)
    assert (s.result(cid, timeout=20).status, s.result(cid).exit_code) == ("completed", 3)
    r.xadd(keys.res, {**forged, "id": (again := s.submit("(exit 4)"))})  # type: ignore[arg-type]
    assert s.result(again, timeout=20).exit_code == 4
    assert s.run("(exit 5)").exit_code == 5


def test_exec_meeting_an_unreadable_result_says_so_without_a_traceback(
    redis_server: RedisServer, session_id: str
) -> None:
    proc = shellq(redis_server, "exec", session_id, "--", "true")
    keys, r = protocol.keys(session_id), redis_server.client()
    wait_for(lambda: r.xlen(keys.cmd) == 1)
    ((entry_id, fields),) = r.xrange(keys.cmd)
    rid = r.xadd(keys.res, {"id": fields[b"id"], "entry_id": entry_id, "status": "completed", "v": "9"}).decode()
    r.hset(keys.jrnl(fields[b"id"].decode()), "res", rid)  # committed, as a worker of another shellq would
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 75  # answered (however unreadably): it will not run again, what it did is unknown
    assert b"Traceback" not in err
    assert b"cannot be read" in err and rid.encode() in err and b"wire version 9" in err, err


# -- a worker stopped while it waits for the lease ---------------------------------------------------------------


def wait_log(tmp_path: Path, session: str, n: int, text: str) -> None:
    """Wait until the log of the `n`-th worker process of the test (0-based) contains `text`."""
    path = tmp_path / f"worker-{session}-{n}.log"
    wait_for(lambda: path.exists() and text in path.read_text(errors="replace"), timeout=20)


def test_sigterm_while_waiting_for_a_dead_predecessors_lease_exits_0(
    redis_server: RedisServer, worker_process: WorkerProcess, session_id: str, tmp_path: Path
) -> None:
    env = {"SHELLQ_LEASE_TTL": "30"}  # the dead worker's lease outlives the test's patience
    dead = worker_process(session_id, env=env)
    s = session_for(redis_server, session_id)
    assert s.run("echo up", timeout=10).stdout == "up\n"
    dead.kill()
    dead.wait()
    waiting = worker_process(session_id, env=env)
    wait_log(tmp_path, session_id, 1, "waiting for its lease")
    waiting.send_signal(signal.SIGTERM)
    assert waiting.wait(timeout=15) == 0


def test_sigterm_to_a_worker_waiting_behind_a_live_one_leaves_the_session_served(
    redis_server: RedisServer, worker_process: WorkerProcess, session_id: str, tmp_path: Path
) -> None:
    serving = worker_process(session_id)
    s = session_for(redis_server, session_id, no_worker_after=1.0)
    assert s.run("echo $PPID", timeout=10).stdout == f"{serving.pid}\n"
    waiting = worker_process(session_id)
    wait_log(tmp_path, session_id, 1, "waiting for its lease")
    waiting.send_signal(signal.SIGTERM)
    assert waiting.wait(timeout=15) == 0
    meta = redis_server.client().hgetall(protocol.keys(session_id).meta)
    assert meta[b"state"] != b"stopped" and meta[b"pid"] == str(serving.pid).encode()
    assert s.worker_alive()
    assert s.run("echo $PPID", timeout=10).stdout == f"{serving.pid}\n"
    serving.send_signal(signal.SIGTERM)
    assert serving.wait(timeout=15) == 0


def test_in_process_worker_stopped_while_waiting_for_the_lease_returns_0(
    redis_server: RedisServer, start_worker: StartWorker, session_id: str, tmp_path: Path
) -> None:
    from worker.settings import WorkerSettings

    start_worker(session_id)
    second = Worker(
        WorkerSettings(redis_url=redis_server.url, session=session_id, work_dir=tmp_path / "second", lease_ttl=1.5)
    )
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(second.serve()))
    thread.start()
    time.sleep(0.5)
    second.stop(grace=0)
    thread.join(timeout=10)
    assert codes == [0]


def test_a_stop_ends_the_workers_blocking_reads_at_once_under_its_own_acl_user(
    redis_server: RedisServer, session_id: str, tmp_path: Path
) -> None:
    """A session's worker user may not CLIENT LIST or CLIENT UNBLOCK: its stop wakes its blocking reads through
    the session's wake stream. Reads that block two minutes (the command stream's and the control thread's) end at
    once, for a worker and for its successor, whom the predecessor's wake-up left alone."""
    from containers import access
    from worker.settings import WorkerSettings

    creds = access.grant(redis_server.client(), session_id)
    url = access.url_for(redis_server.url, creds.worker_user, creds.worker_password)
    long_reads = {"block_ms": 120_000, "heartbeat": 120.0, "lease_ttl": 300.0}
    for n in range(2):
        worker = Worker(WorkerSettings(redis_url=url, session=session_id, work_dir=tmp_path / f"w{n}", **long_reads))
        codes: list[int] = []
        thread = threading.Thread(target=lambda w=worker, c=codes: c.append(w.serve()), daemon=True)
        thread.start()
        with Client(redis_server.url) as client:
            assert client.session(session_id).run(f"echo {n}", timeout=30).stdout == f"{n}\n"
        time.sleep(0.2)  # back in its blocking read
        worker.stop(grace=0)
        thread.join(timeout=30)  # without a wake-up it would wait out a 120 s read
        assert codes == [0]
        redis_server.client().delete(protocol.keys(session_id).lease)  # the successor need not wait out the lease


def test_an_interrupt_stops_the_whole_line_of_a_worker_started_with_sigint_ignored(
    redis_server: RedisServer, worker_process: Callable[..., subprocess.Popen[bytes]], session_id: str
) -> None:
    """A worker started in the background of a script inherits SIGINT ignored, and its bash did too: bash cannot
    trap a signal ignored on entry, so an interrupt ended only `sleep` (escalating to SIGTERM), and `echo done`
    ran."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        worker_process(session_id)
    finally:
        signal.signal(signal.SIGINT, before)
    with Client(redis_server.url) as client:
        s = client.session(session_id)
        assert s.run("true", timeout=30).ok
        cid = s.submit("sleep 30; echo done")
        wait_for(lambda: redis_server.client().hget(protocol.keys(session_id).meta, "current") == cid.encode())
        s.interrupt(cid)
        r = s.result(cid, timeout=30)
    assert (r.status, r.stdout) == ("cancelled", "")
