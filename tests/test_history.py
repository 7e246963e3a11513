"""A session's history read back (`shellq log`, `Session.history`) and run again (`shellq replay`,
`Session.replay`): issue 19. Real Redis, real workers; the CLI in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import ROOT, RedisServer, wait_for

from producer import Client, ClientSettings, NoWorkerError, ResultTimeoutError
from producer.history import replay_id
from worker import protocol
from worker.loop import Worker


@pytest.fixture
def client_for() -> Iterator[Callable[[RedisServer], Client]]:
    """Clients of a server, closed at the end of the test."""
    made: list[Client] = []

    def make(server: RedisServer) -> Client:
        made.append(Client(settings=ClientSettings(redis_url=server.url, no_worker_after=3, client_name="tester@here")))
        return made[-1]

    yield make
    for client in made:
        client.close()


def shellq(server: RedisServer, *args: str, url: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SHELLQ_REDIS_URL": url or server.url, "SHELLQ_NO_WORKER_AFTER": "3"}
    cli = [sys.executable, "-m", "producer.cli", *args]
    return subprocess.run(cli, env=env, capture_output=True, text=True, timeout=120, check=False, cwd=ROOT)


def make_history(client: Client, session: str, work: Path) -> dict[str, str]:
    """A session with each kind of end in its history; returns the command ids by name."""
    s = client.session(session)
    ids = {}
    ids["cd"] = s.run(f"mkdir -p {work} && cd {work}").id
    ids["export"] = s.run("export A=1; echo $A > a.txt").id
    ids["fail"] = s.run("echo oops >&2; false").id
    s.write_file("b.txt", b"bee\n")
    ids["stdin"] = s.run("cat > c.txt", stdin=b"see\n").id
    ids["cancelled"] = s.submit("sleep 30")
    wait_for(lambda: client.redis.hget(protocol.keys(session).meta, "current") == ids["cancelled"].encode())
    s.interrupt(ids["cancelled"])
    assert s.result(ids["cancelled"]).status == "cancelled"
    ids["lines"] = s.run("for i in $(seq 1 9); do echo line $i; done").id
    return ids


def test_log_shows_each_command_with_its_end_in_order(
    redis_server: RedisServer,
    client_for: Callable[[RedisServer], Client],
    start_worker: Callable[..., Worker],
    session_id: str,
    tmp_path: Path,
) -> None:
    start_worker(session_id)
    ids = make_history(client_for(redis_server), session_id, tmp_path / "w")
    done = shellq(redis_server, "log", session_id)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    positions = [out.index(ids[name]) for name in ("cd", "export", "fail", "stdin", "cancelled", "lines")]
    assert positions == sorted(positions)
    assert "by tester@here" in out
    assert "$ export A=1; echo $A > a.txt" in out
    assert "completed, exit 1" in out and "! oops" in out
    assert "$ write b.txt (4 bytes)" in out
    assert "cancelled, exit 130" in out
    assert "| line 1" in out and "| line 9" in out and "4 more lines (--full shows them)" in out
    assert "| line 5" not in out
    assert "| line 5" in shellq(redis_server, "log", session_id, "--full").stdout
    since = shellq(redis_server, "log", session_id, "--since", ids["cancelled"]).stdout
    assert ids["lines"] in since and ids["export"] not in since


def test_log_json_lines_carry_request_and_result(
    redis_server: RedisServer,
    client_for: Callable[[RedisServer], Client],
    start_worker: Callable[..., Worker],
    session_id: str,
    tmp_path: Path,
) -> None:
    start_worker(session_id)
    ids = make_history(client_for(redis_server), session_id, tmp_path / "w")
    lines = [json.loads(line) for line in shellq(redis_server, "log", session_id, "--json").stdout.splitlines()]
    by_id = {view["id"]: view for view in lines}
    assert by_id[ids["fail"]]["result"]["exit_code"] == 1
    assert by_id[ids["fail"]]["result"]["stderr"] == "oops\n"
    assert by_id[ids["stdin"]]["request"]["stdin_b64"] == "c2VlCg=="
    assert by_id[ids["export"]]["request"]["by"] == "tester@here"
    write = next(view for view in lines if view["request"]["op"] == "write")
    assert write["request"]["path"] == "b.txt"


def test_log_follow_prints_results_as_they_come(
    redis_server: RedisServer,
    client_for: Callable[[RedisServer], Client],
    start_worker: Callable[..., Worker],
    session_id: str,
) -> None:
    start_worker(session_id)
    s = client_for(redis_server).session(session_id)
    s.run("echo before")
    env = {**os.environ, "SHELLQ_REDIS_URL": redis_server.url}
    follow = subprocess.Popen(
        [sys.executable, "-m", "producer.cli", "log", session_id, "--follow"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert follow.stdout is not None
        seen = ""
        while "| before" not in seen:
            seen += follow.stdout.readline()
        s.run("echo after")
        while "| after" not in seen:
            seen += follow.stdout.readline()
        assert seen.count("| before") == 1
    finally:
        follow.kill()
        follow.wait()
        if follow.stdout is not None:
            follow.stdout.close()


def test_replay_runs_what_ran_skips_what_never_did_and_resumes_without_running_twice(
    redis_server: RedisServer,
    client_for: Callable[[RedisServer], Client],
    start_worker: Callable[..., Worker],
    session_id: str,
    tmp_path: Path,
) -> None:
    client = client_for(redis_server)
    start_worker(session_id)
    dst = f"{session_id}-dst"
    start_worker(dst)
    ids = make_history(client, session_id, tmp_path / "w")
    s = client.session(session_id)
    busy = s.submit("sleep 1")
    never = s.submit("echo never", id="queued-then-cancelled")
    with pytest.raises(ResultTimeoutError) as gave_up:
        s.result(never, timeout=0.1)  # the wait gives up and cancels it: it never runs
    assert gave_up.value.cancelled
    assert s.result(busy).ok
    wait_for(lambda: client.redis.hget(protocol.keys(session_id).jrnl(never), "res") is not None)
    report = client.session(session_id).replay(dst)
    rows = {row.record.command_id: row for row in report.rows}
    assert rows[never].skipped is not None and rows[never].replayed is None
    assert rows[ids["fail"]].replayed is not None and rows[ids["fail"]].replayed.exit_code == 1
    assert rows[ids["cancelled"]].replayed is not None and rows[ids["cancelled"]].replayed.status == "timeout"
    assert report.first_difference is None
    d = client.session(dst)
    assert d.run("pwd; cat a.txt b.txt c.txt; echo $A").stdout == f"{tmp_path / 'w'}\n1\nbee\nsee\n1\n"
    count = client.redis.xlen(protocol.keys(dst).cmd)
    again = client.session(session_id).replay(dst)  # the same replay again: nothing runs twice
    assert client.redis.xlen(protocol.keys(dst).cmd) == count
    assert [row.replayed and row.replayed.entry_id for row in again.rows] == [
        row.replayed and row.replayed.entry_id for row in report.rows
    ]
    assert client.redis.hget(protocol.keys(dst).jrnl(replay_id(session_id, ids["cd"])), "res") is not None


def test_replay_cli_table_dry_run_until_skip_failed_and_a_difference(
    redis_server: RedisServer,
    client_for: Callable[[RedisServer], Client],
    start_worker: Callable[..., Worker],
    session_id: str,
    tmp_path: Path,
) -> None:
    client = client_for(redis_server)
    start_worker(session_id)
    ids = make_history(client, session_id, tmp_path / "w")
    dry = shellq(redis_server, "replay", session_id, f"{session_id}-x", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count("would run") == 7 and not client.redis.exists(protocol.keys(f"{session_id}-x").cmd)
    start_worker(f"{session_id}-u")
    until = shellq(redis_server, "replay", session_id, f"{session_id}-u", "--until", ids["fail"], "--skip-failed")
    assert until.returncode == 0, until.stdout + until.stderr
    assert "2 commands replayed" in until.stdout and "it failed (--skip-failed)" in until.stdout
    # a destination where the same commands end otherwise: the first difference is named, exit status 1
    start_worker(f"{session_id}-d")
    client.session(f"{session_id}-d").run(f"mkdir -p {tmp_path / 'w'} && chmod 0 {tmp_path / 'w'}")
    differs = shellq(redis_server, "replay", session_id, f"{session_id}-d", "--until", ids["export"])
    if os.geteuid() != 0:  # root ignores the mode; make the difference another way
        assert differs.returncode == 1 and f"first difference: {ids['export']}" in differs.stdout


@pytest.fixture
def other_server(tmp_path: Path, redis_server: RedisServer) -> Iterator[RedisServer]:
    """A second Redis; ask for it before `start_worker` so the workers on it stop before it does."""
    (tmp_path / "other").mkdir()
    server = RedisServer("redis", redis_server.binary, tmp_path / "other")
    server.start()
    yield server
    server.stop()


def test_replay_from_a_session_without_worker_to_another_server(
    redis_server: RedisServer,
    client_for: Callable[[RedisServer], Client],
    other_server: RedisServer,
    start_worker: Callable[..., Worker],
    session_id: str,
    tmp_path: Path,
) -> None:
    client = client_for(redis_server)
    worker = start_worker(session_id)
    make_history(client, session_id, tmp_path / "w")
    worker.stop(grace=0)
    wait_for(lambda: not client.session(session_id).worker_alive(), timeout=15)
    start_worker(session_id, redis_url=other_server.url)  # the same name, on the other server
    done = shellq(redis_server, "replay", session_id, session_id, "--to-url", other_server.url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "7 commands replayed" in done.stdout
    assert client_for(other_server).session(session_id).read_file("c.txt") == b"see\n"


def test_replay_into_a_session_without_worker_is_an_error(
    redis_server: RedisServer,
    client_for: Callable[[RedisServer], Client],
    start_worker: Callable[..., Worker],
    session_id: str,
    tmp_path: Path,
) -> None:
    client = client_for(redis_server)
    start_worker(session_id)
    client.session(session_id).run("true")
    with pytest.raises(NoWorkerError):
        client.session(session_id).replay(f"{session_id}-nobody")
    done = shellq(redis_server, "replay", session_id, f"{session_id}-nobody2")
    assert done.returncode in (1, 125)
    assert "shellq: " in done.stderr and "Traceback" not in done.stderr
