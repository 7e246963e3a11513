"""What the adapters for agent frameworks needed from the client, through a real worker and a real Redis: a `user=`
command that leaves a server running (it keeps running, its pipes do not hold the result back), its output past the
cap (spooled, like the shell's), `merge_stderr` (2>&1 in the order written) and `stat`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import RedisServer, wait_for

from producer import (
    AsyncClient,
    Client,
    ClientSettings,
    Result,
    Session,
    SessionFileNotFoundError,
    SessionPermissionError,
)
from worker.loop import Worker

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs a worker running as root")
MiB = 1 << 20


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[Client]:
    with Client(settings=ClientSettings(redis_url=redis_server.url, no_worker_after=5)) as c:
        yield c


@pytest.fixture
def session(client: Client, start_worker: Callable[..., Worker], session_id: str) -> Session:
    start_worker(session_id)
    return client.session(session_id)


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory every user may enter and write (tmp_path's parents are root's own, 0700)."""
    path = Path(tempfile.mkdtemp(prefix="shellq-test-beside-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def leftovers() -> Iterator[list[int]]:
    """Pids a test's commands left running: killed at its end."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


# -- a user= command that leaves a process running -------------------------------------------------------------------


@needs_root
def test_a_server_started_by_a_user_command_keeps_running_and_the_result_does_not_wait_for_it(
    session: Session, leftovers: list[int]
) -> None:
    # The server inherits the command's stdout: before, the worker waited for that pipe to close (the timeout),
    # then killed the server with the rest of the command's process group.
    r = session.run("sleep 600 & echo $!", user="nobody", timeout=20)
    assert (r.status, r.exit_code) == ("completed", 0), r
    pid = int(r.stdout)
    leftovers.append(pid)
    assert alive(pid)
    assert session.run(f"ps -o user= -p {pid}").stdout.strip() == "nobody"


@needs_root
def test_a_chatty_leftover_neither_blocks_nor_reaches_later_results(session: Session, leftovers: list[int]) -> None:
    chatty = "(while :; do echo spam; echo spam >&2; sleep 0.01; done) & echo pid=$!"
    r = session.run(chatty, user="nobody", timeout=20)
    assert r.status == "completed", r
    pid = int(next(line for line in r.stdout.splitlines() if line.startswith("pid="))[4:])
    leftovers.append(pid)
    for _ in range(5):
        later = session.run("echo quiet; sleep 0.05", user="nobody", timeout=20)
        assert (later.stdout, later.stderr) == ("quiet\n", "")
    assert alive(pid)  # it kept writing into a pipe nobody reads: it would be blocked or dead of EPIPE otherwise
    assert session.run(f"grep -c ^State: /proc/{pid}/status").stdout == "1\n"


@needs_root
def test_a_timeout_still_stops_the_whole_group(session: Session, shared: Path, leftovers: list[int]) -> None:
    r = session.run(f"sleep 600 & echo $! > {shared}/pid; sleep 600", user="nobody", timeout=1)
    assert r.status == "timeout"
    pid = int((shared / "pid").read_text())
    leftovers.append(pid)
    wait_for(lambda: not alive(pid), timeout=10)


@needs_root
def test_a_file_operation_leaves_nothing_running(session: Session, shared: Path) -> None:
    session.write_file(str(shared / "f"), b"x", user="nobody")
    assert session.run("pgrep -u nobody -f fileops.py || echo none").stdout == "none\n"


# -- output past the cap ---------------------------------------------------------------------------------------------


@needs_root
def test_a_user_commands_output_past_the_cap_is_spooled_like_the_shells(session: Session) -> None:
    size = 3 * MiB
    r = session.run(f"head -c {size} /dev/zero | tr '\\0' a; echo done >&2", user="nobody", timeout=60)
    assert r.status == "completed" and r.truncated and r.stdout_size == size
    assert r.spool_path is not None
    assert session.read_file(f"{r.spool_path}/stdout") == b"a" * size
    assert session.read_file(f"{r.spool_path}/stderr") == b"done\n"
    shell = session.run(f"head -c {size} /dev/zero")
    assert shell.spool_path is not None and os.path.dirname(shell.spool_path) == os.path.dirname(r.spool_path)


# -- merge_stderr ----------------------------------------------------------------------------------------------------

INTERLEAVED = "echo a; echo b >&2; echo c; no-such-command-xq; echo d >&2"
MERGED = "a\nb\nc\nbash: line 1: no-such-command-xq: command not found\nd\n"


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"env": {"X": "1"}, "cwd": "/"},
        pytest.param({"user": "nobody"}, marks=needs_root),
    ],
    ids=["shell", "shell-env-cwd", "user"],
)
def test_merge_stderr_keeps_the_order_written(session: Session, options: dict[str, object]) -> None:
    r = session.run(INTERLEAVED, merge_stderr=True, **options)  # type: ignore[arg-type]
    assert (r.stdout, r.stderr, r.stderr_size, r.exit_code) == (MERGED, "", 0, 0)
    apart = session.run(INTERLEAVED, **options)  # type: ignore[arg-type]
    assert (apart.stdout, apart.stderr) == ("a\nc\n", "b\nbash: line 1: no-such-command-xq: command not found\nd\n")


def test_merge_stderr_applies_to_that_command_only_and_in_run_many(client: Client, session: Session) -> None:
    assert session.run("echo x >&2", merge_stderr=True).stdout == "x\n"
    assert session.run("echo y >&2").stderr == "y\n"
    sid = session.id
    merged, apart = client.run_many([(sid, "echo m >&2", {"merge_stderr": True}), (sid, "echo n >&2")])
    assert isinstance(merged, Result) and isinstance(apart, Result)
    assert (merged.stdout, apart.stderr) == ("m\n", "n\n")


def test_merge_stderr_of_a_missing_cwd_reports_in_stdout(session: Session) -> None:
    r = session.run("true", cwd="no-such-dir-xq", merge_stderr=True)
    assert (r.exit_code, r.stderr) == (1, "")
    assert "no-such-dir-xq: No such file or directory" in r.stdout


# -- stat ------------------------------------------------------------------------------------------------------------


def test_stat_gives_size_mode_and_kind_following_symlinks(session: Session, shared: Path) -> None:
    (shared / "f").write_bytes(b"12345")
    (shared / "f").chmod(0o640)
    (shared / "d").mkdir()
    (shared / "link").symlink_to("f")
    info = session.stat(str(shared / "f"))
    assert (info.size, info.mode & 0o7777, info.is_dir) == (5, 0o640, False)
    assert info.mtime == pytest.approx((shared / "f").stat().st_mtime)
    assert session.stat(str(shared / "d")).is_dir
    assert session.stat(str(shared / "link")).size == 5
    session.run(f"cd {shared}")
    assert session.stat("f").path == "f"


def test_stat_of_a_missing_path_raises_file_not_found_naming_it(session: Session, shared: Path) -> None:
    with pytest.raises(SessionFileNotFoundError) as e:
        session.stat(str(shared / "missing\nname"))
    assert isinstance(e.value, FileNotFoundError) and e.value.filename == str(shared / "missing\nname")


@needs_root
def test_stat_runs_as_the_user_asked(session: Session, shared: Path) -> None:
    (shared / "closed").mkdir(mode=0o700)
    (shared / "closed" / "f").write_bytes(b"x")
    assert session.stat(str(shared / "closed" / "f")).size == 1
    with pytest.raises(SessionPermissionError):
        session.stat(str(shared / "closed" / "f"), user="nobody")


def test_async_stat_and_merge_stderr(redis_server: RedisServer, session: Session, shared: Path) -> None:
    (shared / "f").write_bytes(b"abc")

    async def go() -> tuple[int, str]:
        async with AsyncClient(settings=ClientSettings(redis_url=redis_server.url)) as c:
            s = c.session(session.id)
            info = await s.stat(str(shared / "f"))
            r = await s.run("echo e >&2", merge_stderr=True)
            return info.size, r.stdout

    assert asyncio.run(go()) == (3, "e\n")


# -- a cwd that is not UTF-8 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, pytest.param({"user": "nobody"}, marks=needs_root)], ids=["shell", "user"])
def test_a_missing_cwd_that_is_not_utf8_is_the_commands_error_and_the_worker_goes_on(
    session: Session, options: dict[str, object]
) -> None:
    """Its error message could not be encoded, and the worker died (the next command found no worker)."""
    r = session.run("pwd", cwd="/tmp/no-such-\udcff", **options)  # type: ignore[arg-type]
    assert (r.status, r.exit_code) == ("completed", 1)
    assert r.stderr_bytes == b"bash: cd: /tmp/no-such-\xff: No such file or directory\n"
    assert session.run("echo alive").stdout == "alive\n"
