"""SWE-ReX's runtime interface over a shellq session (issue 18, producer/adapters/swerex_runtime.py): SWE-ReX's own
file scenarios (write then read, a large file, upload a file, upload a tree) against `ShellqRuntime` on a real worker
and Redis, each transfer one file-operation entry on the session's command stream rather than base64 through `run`,
with SWE-ReX's LocalRuntime as the reference for what the same call returns or raises; then its bash session."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
from helpers import RedisServer
from swerex.exceptions import (
    CommandTimeoutError,
    NonZeroExitCodeError,
    SessionDoesNotExistError,
    SessionExistsError,
)
from swerex.runtime.abstract import (
    BashAction,
    BashInterruptAction,
    CloseBashSessionRequest,
    Command,
    CreateBashSessionRequest,
    ReadFileRequest,
    UploadRequest,
    WriteFileRequest,
)
from swerex.runtime.local import LocalRuntime

from producer import Client, ClientSettings
from producer.adapters.swerex_runtime import ShellqRuntime
from worker import protocol
from worker.loop import Worker
from worker.protocol import CommandRequest

T = TypeVar("T")
MiB = 1 << 20


class Rex:
    """A ShellqRuntime on one session and the event loop that drives it (`rex(rex.runtime.read_file(...))`);
    `local` is SWE-ReX's own LocalRuntime, the reference (the worker runs on this machine: same files)."""

    def __init__(self, runtime: ShellqRuntime) -> None:
        self.loop = asyncio.new_event_loop()
        self.runtime = runtime
        self.local = LocalRuntime()

    def __call__(self, awaitable: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(awaitable)

    def error(self, awaitable: Coroutine[Any, Any, object]) -> BaseException:
        """The exception the call raises (it must raise)."""
        with pytest.raises(Exception) as caught:
            self(awaitable)
        return caught.value

    def close(self) -> None:
        self(self.runtime.close())
        self.loop.close()


class CommandLog:
    """The entries added to the session's command stream (`shellq:{S}:cmd`) since the last look."""

    def __init__(self, r: redis.Redis, session_id: str) -> None:
        self._redis, self._key = r, protocol.keys(session_id).cmd
        last: Any = r.xrevrange(self._key, count=1)
        self._mark = last[0][0].decode() if last else "0-0"

    def ops(self) -> list[str]:
        """The `op` of each entry added since the last call (`exec` for a shell command)."""
        entries: Any = self._redis.xrange(self._key, f"({self._mark}", "+")
        if entries:
            self._mark = entries[-1][0].decode()
        return [protocol.decode(CommandRequest, fields).op for _, fields in entries]


@pytest.fixture
def rex(redis_server: RedisServer, start_worker: Callable[..., Worker], session_id: str) -> Iterator[Rex]:
    """A runtime made from a sync `Session` (it makes and closes its async twin), its bash session not created."""
    start_worker(session_id)
    with Client(settings=ClientSettings(redis_url=redis_server.url)) as client:
        r = Rex(ShellqRuntime(client.session(session_id)))
        yield r
        r.close()


@pytest.fixture
def log(redis_server: RedisServer, session_id: str) -> Iterator[CommandLog]:
    r = redis_server.client()
    yield CommandLog(r, session_id)
    r.close()


@pytest.fixture
def remote(tmp_path: Path) -> Path:
    """A directory for the session's files."""
    path = tmp_path / "remote"
    path.mkdir()
    return path


def text_blob(size: int) -> str:
    """Text of at least `size` bytes in UTF-8: ASCII, multi-byte characters and line ends of three kinds."""
    pieces = ["plain ascii ", "ünïcödé ", "日本語 ", "🙂 ", "\n", "\r\n", "\r", "\t"]
    rng = random.Random(1)
    chosen, total = [], 0
    while total < size:
        chosen.append(rng.choice(pieces))
        total += len(chosen[-1].encode())
    return "".join(chosen)


# -- SWE-ReX's file tests, in shellq's words ------------------------------------------------------------------------


def test_write_then_read_a_file(rex: Rex, log: CommandLog, remote: Path) -> None:
    """SWE-ReX's test_read_write_file (and test_write_to_non_existent_directory): one write, one read."""
    path = remote / "missing" / "parents" / "test.txt"
    rex(rex.runtime.write_file(WriteFileRequest(path=str(path), content="test")))
    assert path.read_text() == "test"
    assert rex(rex.runtime.read_file(ReadFileRequest(path=str(path)))).content == "test"
    assert log.ops() == ["write", "read"]


@pytest.mark.parametrize("case", ["missing", "directory"])
def test_reading_a_missing_file_or_a_directory_raises_what_local_runtime_raises(
    rex: Rex, remote: Path, case: str
) -> None:
    """SWE-ReX's test_read_non_existent_file: a FileNotFoundError (IsADirectoryError for a directory)."""
    request = ReadFileRequest(path=str(remote / "nothing.txt" if case == "missing" else remote))
    expected = type(rex.error(rex.local.read_file(request)))
    assert expected in (FileNotFoundError, IsADirectoryError)
    assert isinstance(rex.error(rex.runtime.read_file(request)), expected)


def test_a_large_write_is_one_write_entry_and_the_bytes_local_runtime_writes(
    rex: Rex, log: CommandLog, remote: Path
) -> None:
    """8 MiB of text (over the 1 MiB entry cap) is one `write` entry, its bytes in chunks beside it: no command
    runs in the shell to carry it."""
    content = text_blob(8 * MiB)
    rex(rex.runtime.write_file(WriteFileRequest(path=str(remote / "big.txt"), content=content)))
    assert log.ops() == ["write"]
    rex(rex.local.write_file(WriteFileRequest(path=str(remote / "reference.txt"), content=content)))
    assert (remote / "big.txt").read_bytes() == (remote / "reference.txt").read_bytes()


@pytest.mark.parametrize(
    ("kind", "encoding", "errors"),
    [
        ("text", None, None),  # UTF-8, universal newlines
        ("binary", "latin-1", None),  # every byte a character
        ("binary", None, "surrogateescape"),  # undecodable bytes kept as surrogates
        ("binary", None, "replace"),
    ],
)
def test_a_large_file_reads_as_local_runtime_reads_it(
    rex: Rex, log: CommandLog, remote: Path, kind: str, encoding: str | None, errors: str | None
) -> None:
    """SWE-ReX's test_read_large_file (1 MiB of "x", its length checked), at 6 MiB and for any bytes the API can
    return as text: the content equals LocalRuntime's for the same file, and the read is one `read` entry."""
    data = text_blob(6 * MiB).encode() if kind == "text" else random.Random(2).randbytes(6 * MiB)
    (remote / "large").write_bytes(data)
    request = ReadFileRequest(path=str(remote / "large"), encoding=encoding, errors=errors)
    content = rex(rex.runtime.read_file(request)).content
    assert log.ops() == ["read"]
    assert content == rex(rex.local.read_file(request)).content


def test_undecodable_bytes_raise_unicode_decode_error_as_local_runtime_does(rex: Rex, remote: Path) -> None:
    (remote / "binary").write_bytes(b"ok\xff\xfe")
    request = ReadFileRequest(path=str(remote / "binary"))
    assert isinstance(rex.error(rex.local.read_file(request)), UnicodeDecodeError)
    assert isinstance(rex.error(rex.runtime.read_file(request)), UnicodeDecodeError)


def test_upload_a_file(rex: Rex, log: CommandLog, tmp_path: Path, remote: Path) -> None:
    """SWE-ReX's test_upload_file (a text file, read back), and a 5 MiB binary one into missing parents, byte for
    byte: one `write` entry each."""
    (tmp_path / "source.txt").write_text("test")
    rex(rex.runtime.upload(UploadRequest(source_path=str(tmp_path / "source.txt"), target_path=str(remote / "t.txt"))))
    assert rex(rex.runtime.read_file(ReadFileRequest(path=str(remote / "t.txt")))).content == "test"
    data = random.Random(3).randbytes(5 * MiB)
    (tmp_path / "source.bin").write_bytes(data)
    target = remote / "new" / "dir" / "target.bin"
    rex(rex.runtime.upload(UploadRequest(source_path=str(tmp_path / "source.bin"), target_path=str(target))))
    assert target.read_bytes() == data
    assert log.ops() == ["write", "read", "write"]


def test_upload_a_directory(rex: Rex, log: CommandLog, tmp_path: Path, remote: Path) -> None:
    """SWE-ReX's test_upload_directory (two files, read back), with a nested tree, an empty directory and a binary
    file: one `extract` entry; into a directory that exists, the tree is merged (as SWE-ReX's RemoteRuntime does)."""
    source = tmp_path / "source_dir"
    (source / "nested" / "deeper").mkdir(parents=True)
    (source / "empty").mkdir()
    (source / "file1.txt").write_text("test1")
    (source / "file2.txt").write_text("test2")
    (source / "nested" / "deeper" / "blob.bin").write_bytes(random.Random(4).randbytes(2 * MiB + 5))
    target = remote / "target_dir"
    target.mkdir()
    (target / "kept.txt").write_text("kept")
    rex(rex.runtime.upload(UploadRequest(source_path=str(source), target_path=str(target))))
    assert log.ops() == ["extract"]
    for name, content in (("file1.txt", "test1"), ("file2.txt", "test2")):
        assert rex(rex.runtime.read_file(ReadFileRequest(path=str(target / name)))).content == content
    assert (target / "nested" / "deeper" / "blob.bin").read_bytes() == (source / "nested/deeper/blob.bin").read_bytes()
    assert (target / "empty").is_dir()
    assert (target / "kept.txt").read_text() == "kept"


# -- the bash session and execute ------------------------------------------------------------------------------------


def test_the_bash_session_is_the_sessions_persistent_shell(rex: Rex, remote: Path) -> None:
    rt = rex.runtime
    rex(rt.create_session(CreateBashSessionRequest()))
    rex(rt.run_in_session(BashAction(command=f"cd {remote} && export GREETING=hi")))
    obs = rex(rt.run_in_session(BashAction(command="pwd; echo $GREETING; echo oops >&2")))
    assert (obs.output, obs.exit_code) == (f"{remote}\nhi\noops\n", 0)
    assert rex(rt.run_in_session(BashAction(command="echo ''"))).output == "\n"
    assert rex(rt.run_in_session(BashAction(command="false", check="silent"))).exit_code == 1
    assert rex(rt.run_in_session(BashAction(command="false", check="ignore"))).exit_code is None
    error = rex.error(rt.run_in_session(BashAction(command="echo out; exit 3", error_msg="step 2")))
    assert isinstance(error, NonZeroExitCodeError)
    assert str(error).startswith("step 2: ") and "exit code 3" in str(error)


def test_one_bash_session_by_name_and_no_interactive_commands(rex: Rex) -> None:
    rt = rex.runtime
    assert isinstance(rex.error(rt.run_in_session(BashAction(command="true"))), SessionDoesNotExistError)
    rex(rt.create_session(CreateBashSessionRequest(session="main")))
    assert isinstance(rex.error(rt.create_session(CreateBashSessionRequest(session="main"))), SessionExistsError)
    second = rex.error(rt.create_session(CreateBashSessionRequest(session="other")))
    assert isinstance(second, NotImplementedError) and "one bash session" in str(second)
    interactive = BashAction(command="python3", session="main", is_interactive_command=True)
    assert isinstance(rex.error(rt.run_in_session(interactive)), NotImplementedError)
    rex(rt.close_session(CloseBashSessionRequest(session="main")))
    assert isinstance(
        rex.error(rt.run_in_session(BashAction(command="true", session="main"))), SessionDoesNotExistError
    )


def test_a_command_over_its_timeout_raises_command_timeout_and_the_shell_goes_on(rex: Rex) -> None:
    rt = rex.runtime
    rex(rt.create_session(CreateBashSessionRequest()))
    assert isinstance(rex.error(rt.run_in_session(BashAction(command="sleep 30", timeout=0.5))), CommandTimeoutError)
    assert rex(rt.run_in_session(BashAction(command="echo still here"))).output == "still here\n"


def test_an_interrupt_stops_the_command_in_flight(rex: Rex, remote: Path) -> None:
    rt = rex.runtime
    rex(rt.create_session(CreateBashSessionRequest()))
    started = remote / "started"

    async def interrupted() -> Any:
        command = f"echo started; touch {started}; sleep 60"
        running = asyncio.create_task(rt.run_in_session(BashAction(command=command, check="silent")))
        for _ in range(500):  # until the shell runs it (the worker is on this machine)
            if started.exists():
                break
            await asyncio.sleep(0.02)
        assert (await rt.run_in_session(BashInterruptAction())).exit_code == 0
        return await asyncio.wait_for(running, 20)

    obs = rex(interrupted())
    assert obs.output == "started\n"
    assert obs.failure_reason.startswith("cancelled")


def test_execute_runs_like_subprocess_and_leaves_the_shell_as_it_was(rex: Rex, remote: Path) -> None:
    rt = rex.runtime
    rex(rt.create_session(CreateBashSessionRequest()))
    rex(rt.run_in_session(BashAction(command=f"cd {remote}")))
    assert rex(rt.execute(Command(command=["printf", "%s|", "a b", "$HOME"]))).stdout == "a b|$HOME|"
    done = rex(
        rt.execute(Command(command="cd / && echo $X ${HOME-unset}; echo e >&2; exit 3", shell=True, env={"X": "1"}))
    )
    assert (done.stdout, done.stderr, done.exit_code) == ("1 unset\n", "e\n", 3)
    merged = rex(rt.execute(Command(command="pwd; echo e >&2", shell=True, cwd="/", merge_output_streams=True)))
    assert (merged.stdout, merged.stderr) == ("/\ne\n", "")
    assert isinstance(rex.error(rt.execute(Command(command="false", check=True))), NonZeroExitCodeError)
    assert rex(rt.run_in_session(BashAction(command="pwd; echo ${X-unset}"))).output == f"{remote}\nunset\n"


def test_is_alive_while_a_worker_serves_the_session(rex: Rex, redis_server: RedisServer) -> None:
    assert rex(rex.runtime.is_alive(timeout=10)).is_alive
    nobody = ShellqRuntime.from_url(redis_server.url, "t-no-worker-here")
    answer = rex(nobody.is_alive())
    assert not answer.is_alive and "no worker serves session t-no-worker-here" in answer.message
    rex(nobody.close())
