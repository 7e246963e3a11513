"""The worker loop and the producer client over real Redis 7.0 and Valkey 9 servers."""

from __future__ import annotations

import gc
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
import redis
from helpers import ROOT, RedisServer, free_port, server_binaries, wait_for

from producer import Client, ClientSettings, ConfigError, InvalidRequestError, NoWorkerError, ResultTimeoutError
from worker import protocol
from worker.loop import Worker
from worker.settings import WorkerSettings

StartWorker = Callable[..., Worker]


def client_for(server: RedisServer, **settings: Any) -> Client:
    return Client(settings=ClientSettings(redis_url=server.url, **settings))


def raw_results(server: RedisServer, session: str) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in server.client().xrange(protocol.keys(session).res)]


def wait_results(server: RedisServer, session: str, count: int) -> list[dict[bytes, bytes]]:
    wait_for(lambda: len(raw_results(server, session)) >= count)
    return raw_results(server, session)


def test_run_keeps_shell_state_between_commands(
    redis_server: RedisServer, start_worker: StartWorker, session_id: str
) -> None:
    start_worker(session_id)
    s = client_for(redis_server).session(session_id)
    first = s.run("cd /tmp && export GREETING=hello && printf 'out' && printf 'err' >&2")
    second = s.run("echo $GREETING; pwd; exit_code_is() { return 3; }; exit_code_is")
    assert (first.status, first.exit_code, first.stdout, first.stderr, first.cwd) == (
        "completed",
        0,
        "out",
        "err",
        "/tmp",
    )
    assert (second.exit_code, second.stdout) == (3, "hello\n/tmp\n")
    assert second.shell_epoch == first.shell_epoch == 1


def test_env_and_cwd_of_a_command(
    redis_server: RedisServer, start_worker: StartWorker, session_id: str, tmp_path: Path
) -> None:
    start_worker(session_id)
    r = client_for(redis_server).session(session_id).run("echo $MODE; pwd", env={"MODE": "ci x"}, cwd=str(tmp_path))
    assert (r.stdout, r.cwd) == (f"ci x\n{tmp_path}\n", str(tmp_path))


def test_hand_written_entry_runs_and_its_result_reads_with_xrange(
    redis_server: RedisServer, start_worker: StartWorker, session_id: str
) -> None:
    start_worker(session_id)
    keys = protocol.keys(session_id)
    entry_id = redis_server.client().xadd(keys.cmd, {"cmd": "cd /tmp && echo hand-made"}).decode()
    (fields,) = wait_results(redis_server, session_id, 1)
    assert fields[b"id"] == entry_id.encode()
    assert fields[b"entry_id"] == entry_id.encode()
    assert fields[b"status"] == b"completed"
    assert fields[b"exit_code"] == b"0"
    assert fields[b"stdout"] == b"hand-made\n"
    assert fields[b"cwd"] == b"/tmp"
    assert b"stderr" in fields and b"duration_ms" in fields and b"shell_epoch" in fields
    # and the producer finds it by the entry id too
    assert client_for(redis_server).session(session_id).result(entry_id, timeout=5).stdout == "hand-made\n"


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"cmd": "true", "colour": "blue"}, "colour"),
        ({"cmd": "true", "timeout": "soon"}, "timeout"),
        ({"cmd": "true", "timeout": "-1"}, "timeout"),
        ({"cmd": "true", "env": b"\xc1not-msgpack"}, "env"),
        ({"cmd": "true", "v": "9"}, "wire version 9"),
        ({"cmd": "true", "op": "format-disk"}, "op"),
        ({"timeout": "5"}, "cmd"),
        ({"cmd": "true", "timeout": "999999"}, "exceeds the maximum"),
        ({"cmd": "x" * (protocol.MAX_ENTRY_BYTES + 1)}, "larger than"),
    ],
)
def test_malformed_entries_are_rejected_and_the_worker_goes_on(
    redis_server: RedisServer, start_worker: StartWorker, session_id: str, fields: dict[str, Any], reason: str
) -> None:
    start_worker(session_id)
    r = redis_server.client()
    cmd_key = protocol.keys(session_id).cmd
    bad_id = r.xadd(cmd_key, fields)  # type: ignore[arg-type]
    r.xadd(cmd_key, {"cmd": "echo still-here"})
    rejected, after = wait_results(redis_server, session_id, 2)
    assert rejected[b"status"] == b"rejected"
    assert rejected[b"entry_id"] == bad_id
    assert reason in rejected[b"error"].decode()
    assert b"exit_code" not in rejected
    assert (after[b"status"], after[b"stdout"]) == (b"completed", b"still-here\n")


def test_invalid_client_id_in_raw_entry_is_rejected_under_the_entry_id(
    redis_server: RedisServer, start_worker: StartWorker, session_id: str
) -> None:
    start_worker(session_id)
    entry_id = redis_server.client().xadd(protocol.keys(session_id).cmd, {"cmd": "true", "id": "a:b*"})
    (res,) = wait_results(redis_server, session_id, 1)
    assert (res[b"status"], res[b"id"]) == (b"rejected", entry_id)
    assert b"id" in res[b"error"]


def test_four_concurrent_producers_each_get_their_own_results_in_stream_order(
    redis_server: RedisServer, start_worker: StartWorker, session_id: str, tmp_path: Path
) -> None:
    start_worker(session_id)
    log = tmp_path / "order.log"
    outcomes: dict[int, list[tuple[str, str]]] = {}

    def producer(p: int) -> None:
        s = client_for(redis_server).session(session_id)
        outcomes[p] = [(f"p{p}-{i}\n", s.run(f"echo p{p}-{i} | tee -a {log}").stdout) for i in range(25)]

    threads = [threading.Thread(target=producer, args=(p,)) for p in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(outcomes) == [0, 1, 2, 3]
    for pairs in outcomes.values():
        assert [want for want, _ in pairs] == [got for _, got in pairs]
    executed = log.read_text().splitlines()
    stream = redis_server.client().xrange(protocol.keys(session_id).cmd)
    submitted = [fields[b"cmd"].decode().split()[1] for _, fields in stream]
    assert executed == submitted
    assert len(executed) == 100


def test_resubmitting_an_id_returns_it_without_queueing_twice(
    redis_server: RedisServer, start_worker: StartWorker, session_id: str, tmp_path: Path
) -> None:
    start_worker(session_id)
    s = client_for(redis_server).session(session_id)
    marker = tmp_path / "runs"
    first = s.submit(f"echo run >> {marker}; echo once", id="c-42")
    again = s.submit(f"echo run >> {marker}; echo once", id="c-42")
    assert first == again == "c-42"
    assert s.result("c-42", timeout=10).stdout == "once\n"
    assert s.run("echo ignored", id="c-42").stdout == "once\n"
    assert redis_server.client().xlen(protocol.keys(session_id).cmd) == 1
    assert marker.read_text() == "run\n"


def test_bad_arguments_raise_before_anything_is_queued(redis_server: RedisServer, session_id: str) -> None:
    s = client_for(redis_server).session(session_id)
    with pytest.raises(ConfigError):
        s.submit("true", id="has:colon")
    with pytest.raises(ConfigError):
        s.submit("true", id="1700000000000-0")
    with pytest.raises(ConfigError):
        s.submit("true", env={"BAD-NAME": "1"})
    with pytest.raises(InvalidRequestError):  # a command's text goes in chunks when it is large; its env does not
        s.submit("true", env={"HUGE": "x" * (protocol.MAX_ENTRY_BYTES + 1)})
    with pytest.raises(ConfigError):
        client_for(redis_server).session("bad session")
    assert redis_server.client().exists(protocol.keys(session_id).cmd) == 0


def test_timeout_is_a_result_not_an_exception(
    redis_server: RedisServer, start_worker: StartWorker, session_id: str
) -> None:
    start_worker(session_id, kill_grace=0.3)
    s = client_for(redis_server).session(session_id)
    s.run("export KEPT=1")
    r = s.run("echo started; sleep 30", timeout=0.5)
    assert (r.status, r.stdout) == ("timeout", "started\n")
    assert s.run("echo $KEPT").stdout == "1\n"


def test_interrupt_running_command_gives_cancelled_with_partial_output(
    redis_server: RedisServer, start_worker: StartWorker, session_id: str
) -> None:
    start_worker(session_id)
    s = client_for(redis_server).session(session_id)
    cid = s.submit("echo partial; sleep 30")
    wait_for(lambda: redis_server.client().hget(protocol.keys(session_id).meta, "current") == cid.encode())
    s.interrupt(cid)
    r = s.result(cid, timeout=10)
    assert (r.status, r.stdout) == ("cancelled", "partial\n")


def test_interrupt_queued_command_cancels_it_without_running(
    redis_server: RedisServer, start_worker: StartWorker, session_id: str, tmp_path: Path
) -> None:
    start_worker(session_id)
    s = client_for(redis_server).session(session_id)
    marker = tmp_path / "ran"
    blocker = s.submit("sleep 1")
    queued = s.submit(f"touch {marker}")
    s.interrupt(queued)
    assert s.result(blocker, timeout=10).status == "completed"
    r = s.result(queued, timeout=10)
    assert (r.status, r.exit_code) == ("cancelled", None)
    assert "before it started" in (r.error or "")
    assert not marker.exists()


def test_result_fetched_later_by_another_process(
    redis_server: RedisServer, start_worker: StartWorker, session_id: str
) -> None:
    start_worker(session_id)
    cid = client_for(redis_server).session(session_id).submit("printf 'from afar'", id="far-1")
    script = (
        "import sys; from producer import Client; "
        f"r = Client({redis_server.url!r}).session({session_id!r}).result({cid!r}, timeout=10); "
        "sys.stdout.write(r.status + ':' + r.stdout)"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60, check=True
    )
    assert out.stdout == "completed:from afar"


def test_waiting_on_a_session_without_worker_raises_no_worker(redis_server: RedisServer, session_id: str) -> None:
    s = client_for(redis_server, no_worker_after=1.0).session(session_id)
    started = time.monotonic()
    with pytest.raises(NoWorkerError):
        s.run("true", timeout=60)
    assert time.monotonic() - started < 10


def test_result_wait_is_bounded(redis_server: RedisServer, start_worker: StartWorker, session_id: str) -> None:
    start_worker(session_id)
    s = client_for(redis_server).session(session_id)
    cid = s.submit("sleep 5")
    with pytest.raises(ResultTimeoutError):
        s.result(cid, timeout=0.5)
    with pytest.raises(TimeoutError):  # ResultTimeoutError is a TimeoutError too
        s.result(cid, timeout=0.2)


def test_worker_subprocess_serves_and_exits_0_on_sigterm(
    redis_server: RedisServer, worker_process: Callable[..., subprocess.Popen[bytes]], session_id: str
) -> None:
    proc = worker_process(session_id, env={"SHELLQ_SHUTDOWN_GRACE": "0.5"})
    s = client_for(redis_server).session(session_id)
    assert s.run("echo up", timeout=10).stdout == "up\n"
    cid = s.submit("echo going; sleep 30")
    wait_for(lambda: redis_server.client().hget(protocol.keys(session_id).meta, "current") == cid.encode())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    r = s.result(cid, timeout=5)
    assert (r.status, r.stdout) == ("interrupted", "going\n")
    assert "stopped" in (r.error or "")


def test_sigterm_lets_a_short_command_finish(
    redis_server: RedisServer, worker_process: Callable[..., subprocess.Popen[bytes]], session_id: str
) -> None:
    proc = worker_process(session_id, env={"SHELLQ_SHUTDOWN_GRACE": "5"})
    s = client_for(redis_server).session(session_id)
    s.run("true", timeout=10)
    cid = s.submit("sleep 0.5; echo finished")
    wait_for(lambda: redis_server.client().hget(protocol.keys(session_id).meta, "current") == cid.encode())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    assert s.result(cid, timeout=5).stdout == "finished\n"


def test_killed_worker_takes_its_command_along_and_successor_reports_interrupted(
    redis_server: RedisServer, worker_process: Callable[..., subprocess.Popen[bytes]], session_id: str, tmp_path: Path
) -> None:
    proc = worker_process(session_id)
    s = client_for(redis_server).session(session_id)
    marker = tmp_path / "survived"
    cid = s.submit(f"sleep 2.5; touch {marker}")
    wait_for(lambda: redis_server.client().hget(protocol.keys(session_id).meta, "current") == cid.encode())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    successor = worker_process(session_id)
    r = s.result(cid, timeout=15)
    assert (r.status, r.exit_code) == ("interrupted", None)
    after = s.run("echo next", timeout=10)
    assert after.stdout == "next\n"
    time.sleep(3)
    assert not marker.exists(), "the command outlived its worker"
    successor.send_signal(signal.SIGTERM)
    assert successor.wait(timeout=15) == 0


def test_worker_refuses_bad_configuration(worker_process: Callable[..., subprocess.Popen[bytes]]) -> None:
    proc = worker_process("bad session id")
    assert proc.wait(timeout=30) == 2


def test_lost_consumer_group_is_reported_not_recreated(
    redis_server: RedisServer, worker_process: Callable[..., subprocess.Popen[bytes]], session_id: str
) -> None:
    proc = worker_process(session_id)
    s = client_for(redis_server).session(session_id)
    s.run("true", timeout=10)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=15)
    redis_server.client().delete(protocol.keys(session_id).cmd)  # Redis "came back" without the stream
    again = worker_process(session_id)
    assert again.wait(timeout=30) == 3
    assert redis_server.client().exists(protocol.keys(session_id).cmd) == 0


def test_unknown_shellq_variable_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    protocol.warn_unknown({"SHELLQ_DEFAULT_TIMOUT": "5", "SHELLQ_REDIS_URL": "redis://x"})
    assert "SHELLQ_DEFAULT_TIMOUT" in caplog.text
    assert "SHELLQ_DEFAULT_TIMEOUT" in caplog.text.split("did you mean")[1]
    assert "SHELLQ_REDIS_URL" not in caplog.text


def test_every_setting_is_a_known_variable() -> None:
    from producer.client import ClientSettings
    from worker.settings import WorkerSettings

    for model in (WorkerSettings, ClientSettings):
        for name in model.model_fields:
            assert f"SHELLQ_{name.upper()}" in protocol.ENV_NAMES


def test_redis_down_is_a_clear_error(session_id: str) -> None:
    s = Client(settings=ClientSettings(redis_url=f"redis://127.0.0.1:{free_port()}/0")).session(session_id)
    with pytest.raises(ConnectionError, match="cannot reach Redis"):
        s.submit("true")


def test_wire_codec_round_trips_bytes_and_nested_values() -> None:
    req = protocol.CommandRequest(id="c-1", cmd=b"\xff\x00echo", timeout=1.5, env={"A": "1"}, idempotent=True)
    fields = {k.encode(): v for k, v in protocol.encode(req).items()}
    assert fields[b"cmd"] == b"\xff\x00echo"
    assert fields[b"timeout"] == b"1.5"
    assert fields[b"idempotent"] == b"1"
    assert b"cwd" not in fields
    assert protocol.decode(protocol.CommandRequest, fields) == req


def test_redis_error_is_not_swallowed_by_submit(redis_server: RedisServer, session_id: str) -> None:
    redis_server.client().set(protocol.keys(session_id).cmd, "not a stream")
    with pytest.raises(redis.ResponseError):
        client_for(redis_server).session(session_id).submit("true")


def test_worker_asked_to_stop_while_redis_is_gone_exits(tmp_path: Path, session_id: str) -> None:
    server = RedisServer("redis", server_binaries()["redis"], tmp_path)
    server.start()
    env = {**os.environ, "SHELLQ_REDIS_URL": server.url, "SHELLQ_SESSION": session_id, "SHELLQ_HEARTBEAT": "0.2"}
    env["SHELLQ_WORK_DIR"] = str(tmp_path / "work")
    proc = subprocess.Popen([sys.executable, "-m", "worker"], env=env, cwd=ROOT, stderr=subprocess.PIPE)
    try:
        client_for(server).session(session_id).run("true", timeout=10)
        server.stop()
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 4  # "Redis unreachable", not a hang
        assert proc.stderr is not None
        assert b"cannot reach Redis" in proc.stderr.read()
    finally:
        proc.kill()
        if proc.stderr:
            proc.stderr.close()
        server.stop()


def test_session_state_is_running_during_a_command_and_idle_as_soon_as_it_ends(
    redis_server: RedisServer, start_worker: StartWorker, session_id: str
) -> None:
    """`session list` reads this state: a command that outlives a heartbeat shows running, and idle with its result
    (not one heartbeat later)."""
    from producer.admin import list_sessions

    start_worker(session_id)  # heartbeat every 0.2 s
    client = client_for(redis_server)
    s = client.session(session_id)
    cid = s.submit("sleep 0.8")

    def row() -> tuple[str, str]:
        state = next(r for r in list_sessions(client) if r.name == session_id)
        return state.state, state.current

    wait_for(lambda: row() == ("running", cid))
    s.result(cid, timeout=10)
    assert row() == ("idle", "")


def test_a_client_nobody_closed_leaves_no_socket_to_the_garbage_collector(
    redis_server: RedisServer, session_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception's traceback keeps a client in a reference cycle; its sockets must still be closed in order."""
    unraisable: list[BaseException | None] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(u.exc_value))
    for _ in range(30):
        client = client_for(redis_server)
        with pytest.raises(ResultTimeoutError):  # its own connections and its pool's are both in use
            client.session(session_id).result("c-none", timeout=0.05)
        client.send(("PING",))
        client.cycle = client  # type: ignore[attr-defined]
        del client
    gc.collect()
    assert unraisable == []


def test_a_marker_naming_another_session_is_not_this_sessions_history(
    redis_server: RedisServer, start_worker: Callable[..., Worker], session_id: str, tmp_path: Path
) -> None:
    """A session directory copied from another session (a fork's image holds its source's) starts a new session;
    the session's own marker with nothing in Redis is what means its state was lost."""
    copied = tmp_path / "copied"
    copied.mkdir()
    (copied / ".shellq-session").write_text("some-other-session")
    start_worker(session_id, work_dir=copied)
    with client_for(redis_server) as client:
        assert client.session(session_id).run("echo served", timeout=30).stdout == "served\n"
    assert (copied / ".shellq-session").read_text() == session_id
    own = tmp_path / "own"
    own.mkdir()
    (own / ".shellq-session").write_text(f"{session_id}-b")
    worker = Worker(WorkerSettings(redis_url=redis_server.url, session=f"{session_id}-b", work_dir=own))
    assert worker.serve() == 3  # session state lost: the group is never re-created
