"""What runs beside the shell rather than in it: file operations, and a command run as another user (`user=`).

Both are a child process the worker starts as the user they are for (the shell's own by default, so permissions
mean what they say: a file operation never runs with the worker's privileges), in the shell's current directory,
with its input from a file the worker spooled (stdin, the bytes of a `write`, the tar of an `extract`) and its
output read as it comes:

* a file operation is worker/fileops.py run by this Python (`-I -S`: the standard library only); it reports an OS
  error as one JSON line on stderr (errno, strerror, filename) and its exit status;
* a command as another user is `bash -c` with the shell's exported variables (read from the shell just before) and
  its current directory: a child of the session's state, which it cannot change.

A timeout or an interrupt stops the child's process group: SIGTERM, then SIGKILL after `kill_grace` seconds. When
the child ends by itself, what a command left running keeps running (as a shell's background job would), while
anything a file operation left is killed. A command's output past the cap is spooled as the shell's is.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from worker.errors import ConfigError
from worker.output import Captures
from worker.protocol import CommandRequest, CommandResult, Status
from worker.shell import Shell
from worker.shell_process import ShellUser, _popen
from worker.transfer import Sender, TransferError

HELPER = Path(__file__).with_name("fileops.py")
ERROR_CAP = 64 << 10
"""Bytes of a file operation's stderr kept (its error line)."""

ChildStatus = Literal["completed", "timeout", "cancelled"]


@dataclass
class ChildOutcome:
    status: ChildStatus
    exit_code: int | None


def run_child(
    args: list[str],
    *,
    user: ShellUser | None,
    cwd: str,
    env: dict[str, str],
    stdin: IO[bytes] | None,
    on_stdout: Callable[[bytes], None],
    on_stderr: Callable[[bytes], None],
    deadline: float,
    cancelled: Callable[[], bool],
    kill_grace: float,
    pass_fds: tuple[int, ...] = (),
    merge_stderr: bool = False,
    keep_leftovers: bool = False,
) -> ChildOutcome:
    """Run `args` to its end, its deadline (time.monotonic()) or until `cancelled()`, handing its output to the
    callbacks as it comes (stderr to `on_stdout` too with `merge_stderr`). OSError when it cannot be started (a
    `cwd` that is gone, say).

    A timeout or a cancel stops the child's process group. When the child ends by itself, what it left running in
    its group is killed too, unless `keep_leftovers` (a command's `nohup server &`): then the pipes such a process
    still holds are drained by a thread, so it never blocks on them and the child's result does not wait for it."""
    proc = _popen(
        args,
        user,
        stdin=stdin if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
        cwd=cwd,
        env=env,
        start_new_session=True,
        pass_fds=pass_fds,
        user=None if user is None else user.uid,
        group=None if user is None else user.gid,
        extra_groups=None if user is None else user.groups,
    )
    assert proc.stdout is not None
    sinks = {proc.stdout.fileno(): on_stdout}
    if proc.stderr is not None:
        sinks[proc.stderr.fileno()] = on_stderr
    try:
        status = _follow(proc, sinks, deadline, cancelled, kill_grace)
        exit_code = proc.wait()
        for fd, sink in sinks.items():  # what the child wrote before it ended is in the pipe by now
            while data := _read(fd):
                sink(data)
            if data is None:  # a process it left behind holds the pipe
                _drain_in_thread(os.dup(fd))
    finally:
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()
    if status != "completed" or not keep_leftovers:
        _signal_group(proc.pid, signal.SIGKILL)  # what it left running in its group
    code = exit_code if exit_code >= 0 else 128 - exit_code
    return ChildOutcome(status, code if status == "completed" else None)


def _follow(
    proc: subprocess.Popen[bytes],
    sinks: dict[int, Callable[[bytes], None]],
    deadline: float,
    cancelled: Callable[[], bool],
    kill_grace: float,
) -> ChildStatus:
    """Hand the child's output to `sinks` until it exits (a pidfd says when), stopping its group at the deadline or
    a cancel: SIGTERM, then SIGKILL `kill_grace` seconds later. -> how it ended."""
    poller = select.poll()
    for fd in sinks:
        os.set_blocking(fd, False)
        poller.register(fd, select.POLLIN)
    open_fds = set(sinks)
    exited: int | None
    try:
        exited = os.pidfd_open(proc.pid)
        poller.register(exited, select.POLLIN)
    except OSError:  # a kernel without pidfds (before 5.3): look every 10 ms
        exited = None
    status: ChildStatus = "completed"
    stop_at = math.inf
    try:
        while proc.poll() is None:
            now = time.monotonic()
            if status == "completed" and (now >= deadline or cancelled()):
                status = "timeout" if now >= deadline else "cancelled"
                _signal_group(proc.pid, signal.SIGTERM)
                stop_at = now + kill_grace
            elif now >= stop_at:
                _signal_group(proc.pid, signal.SIGKILL)
                stop_at = math.inf
            ready = [fd for fd, _ in poller.poll(100 if exited is not None else 10) if fd in open_fds]
            for fd in ready:
                if not _pass_on(fd, sinks[fd]):
                    poller.unregister(fd)
                    open_fds.discard(fd)
    finally:
        if exited is not None:
            os.close(exited)
    return status


def _pass_on(fd: int, sink: Callable[[bytes], None]) -> bool:
    """Hand what `fd` has to `sink`; False at its end."""
    data = _read(fd)
    if data:
        sink(data)
    return data != b""


def _drain_in_thread(fd: int) -> None:
    """Read `fd` to its end and close it, from a thread: the output of a process a command left running."""

    def drain() -> None:
        try:
            while os.read(fd, 1 << 16):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)

    os.set_blocking(fd, True)
    try:
        threading.Thread(target=drain, daemon=True, name="shellq-drain").start()
    except RuntimeError:  # no thread to be had (the pids limit): its writer gets EPIPE instead
        os.close(fd)


def _read(fd: int) -> bytes | None:
    try:
        return os.read(fd, 1 << 16)
    except BlockingIOError:
        return None


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


@dataclass
class FileOutcome:
    """A file operation's end: `status`, and for a failed one its errno (None for a failure that is not an OS
    error) and message."""

    status: ChildStatus
    ok: bool
    errno: int | None = None
    error: str | None = None
    filename: str | None = None


def file_op(
    op: str,
    args: dict[str, object],
    *,
    user: ShellUser | None,
    cwd: str,
    stdin: IO[bytes] | None,
    on_output: Callable[[bytes], None],
    deadline: float,
    cancelled: Callable[[], bool],
    kill_grace: float,
) -> FileOutcome:
    """Run one file operation of worker/fileops.py as `user` in `cwd`; its output (a file's bytes, an archive, a
    listing) goes to `on_output`."""
    errors = bytearray()

    def keep_error(data: bytes) -> None:
        errors.extend(data[: ERROR_CAP - len(errors)])

    env = {"PATH": os.environ.get("PATH", os.defpath), "LANG": "C.UTF-8"}
    if user is not None:
        env.update(user.env())
    outcome = run_child(
        [_python(user), "-I", "-S", str(HELPER), op, json.dumps(args)],
        user=user,
        cwd=cwd,
        env=env,
        stdin=stdin,
        on_stdout=on_output,
        on_stderr=keep_error,
        deadline=deadline,
        cancelled=cancelled,
        kill_grace=kill_grace,
    )
    if outcome.status != "completed":
        return FileOutcome(outcome.status, False, error=f"the {op} of {args.get('path')} was stopped")
    if outcome.exit_code == 0:
        return FileOutcome("completed", True)
    return _failure(op, args, outcome.exit_code, bytes(errors))


PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3")
"""Where else to look for an interpreter (3.10 or later) the helper's user may run."""


def _python(user: ShellUser | None) -> str:
    """The interpreter for the helper: the worker's own, unless the helper runs as a user who may not run that one
    (a virtualenv under root's 0700 home): then the first `python3` that user may run. OSError when there is
    none."""
    candidates = [sys.executable, shutil.which("python3") or "", *PYTHONS]
    for program in candidates:
        if program and (user is None or user.may_run(program)):
            return program
    raise OSError(errno.EACCES, f"no python3 that {user.name if user else 'the worker'} may run", candidates[0])


def _failure(op: str, args: dict[str, object], code: int | None, stderr: bytes) -> FileOutcome:
    """The helper's error line as a FileOutcome; anything else it printed is the message."""
    try:
        line = json.loads(stderr.strip().splitlines()[-1])
    except (ValueError, IndexError):
        line = None
    if isinstance(line, dict) and isinstance(line.get("errno"), int):
        name = line.get("filename") or args.get("path")
        strerror = line.get("strerror") or os.strerror(line["errno"])
        return FileOutcome("completed", False, line["errno"], str(strerror), str(name) if name else None)
    if isinstance(line, dict) and line.get("error"):
        return FileOutcome("completed", False, error=str(line["error"]))
    text = stderr.decode(errors="replace").strip() or f"exit status {code}"
    return FileOutcome("completed", False, error=f"the {op} failed: {text}")


INLINE = 512 << 10
"""A file operation's output up to this size goes in its result; more goes in chunks on `shellq:{S}:out:<id>`."""


class Output:
    """A file operation's output: kept for the result while small, sent in chunks once larger (`Sender`), never
    more than `limit` bytes (past it, `over` is set and the operation is stopped)."""

    def __init__(self, open_sender: Callable[[], Sender], limit: int | None, stop: threading.Event) -> None:
        self._open_sender = open_sender
        self._limit = limit
        self._stop = stop
        self.kept = bytearray()
        self.sender: Sender | None = None
        self.size = 0
        self.over = False

    def __call__(self, data: bytes) -> None:
        if self.over:
            return
        self.size += len(data)
        if self._limit is not None and self.size > self._limit:
            self.over = True
            self._stop.set()
            return
        if self.sender is None and len(self.kept) + len(data) <= INLINE:
            self.kept += data
            return
        if self.sender is None:
            self.sender = self._open_sender()
            self.sender.write(bytes(self.kept))
            self.kept.clear()
        self.sender.write(data)


def beside(
    req: CommandRequest,
    cid: str,
    entry_id: str,
    *,
    cmd: bytes,
    stdin: Path | None,
    shell: Shell,
    open_sender: Callable[[], Sender],
    cancel: threading.Event,
    timeout: float,
    kill_grace: float,
    root_commands: bool,
) -> CommandResult:
    """Run a file operation, or a command as another user, for `req`; every outcome is a result. `stdin` is the
    spooled input (stdin, a file's bytes, a tar), `cmd` the command's text."""

    def result(status: Status, error: str | None = None, **fields: Any) -> CommandResult:
        return CommandResult(
            id=cid, entry_id=entry_id, status=status, error=error, cwd=shell.cwd, shell_epoch=shell.epoch, **fields
        )

    try:
        user = ShellUser.resolve(req.user, what="user") if req.user else shell.user
    except ConfigError as e:
        return result("rejected", str(e))
    if req.user and user is None and os.geteuid() == 0 and shell.user is not None and not root_commands:
        why = "commands may not run as root in this session (SHELLQ_ROOT_COMMANDS)"
        return result("rejected", f"user={req.user}: {why}")
    deadline = time.monotonic() + timeout
    cwd = shell.cwd if os.path.isdir(shell.cwd) else "/"  # a shell can stand in a directory since removed
    with contextlib.ExitStack() as stack:
        source = stack.enter_context(open(stdin, "rb")) if stdin is not None else None
        try:
            if req.op == "exec":
                captures = shell.captures(cid, req.merge_stderr)
                run = _exec_as(req, cmd, source, user, shell.exported(), cwd, deadline, cancel, captures, kill_grace)
                return result(**run)
            if cwd != shell.cwd and not os.path.isabs(req.path or ""):
                gone = f"the shell's current directory is gone ({shell.cwd})"
                return result("completed", gone, exit_code=1, errno=errno.ENOENT, filename=req.path)
            return _file_op(req, user, cwd, source, open_sender, deadline, cancel, kill_grace, result)
        except OSError as e:  # the child could not be started (no interpreter the user may run, no process left)
            return result("rejected", f"could not start the {req.op} as {user.name if user else 'the worker'}: {e}")


def _file_op(
    req: CommandRequest,
    user: ShellUser | None,
    cwd: str,
    source: IO[bytes] | None,
    open_sender: Callable[[], Sender],
    deadline: float,
    cancel: threading.Event,
    kill_grace: float,
    result: Callable[..., CommandResult],
) -> CommandResult:
    stop = threading.Event()
    out = Output(open_sender, req.max_bytes if req.op == "archive" else None, stop)
    try:
        done = file_op(
            req.op,
            _op_args(req),
            user=user,
            cwd=cwd,
            stdin=source,
            on_output=out,
            deadline=deadline,
            cancelled=lambda: cancel.is_set() or stop.is_set(),
            kill_grace=kill_grace,
        )
        if out.sender is not None and not out.over:
            out.sender.close()
    except TransferError as e:
        return result("interrupted", f"the {req.op} of {req.path}: {e}")
    if out.over:
        if out.sender is not None:
            out.sender.abandon()
        too_large = f"the archive is larger than {req.max_bytes} bytes"
        return result("completed", too_large, exit_code=1, errno=errno.EFBIG, filename=req.path)
    if done.status != "completed":
        return result(done.status, done.error)
    return result(
        "completed",
        done.error,
        exit_code=0 if done.ok else 1,
        errno=done.errno,
        filename=done.filename,
        stdout=bytes(out.kept),
        stdout_size=out.size,
        streamed=out.sender is not None,
    )


def _op_args(req: CommandRequest) -> dict[str, object]:
    args: dict[str, object] = {"path": req.path}
    if req.op == "write":
        args["mode"] = req.mode
    elif req.op == "read":
        args.update(offset=req.offset, max_bytes=req.max_bytes)
    elif req.op == "list":
        args.update(recursive=req.recursive, max_entries=req.max_entries)
    return args


COMMAND_ARG_MAX = 64 << 10
"""A `user=` command longer than this is handed to bash as a file (a memfd) rather than `-c` (Linux caps one
argument at 128 KiB)."""


def _exec_as(
    req: CommandRequest,
    cmd: bytes,
    stdin: IO[bytes] | None,
    user: ShellUser | None,
    exported: dict[str, str],
    cwd: str,
    deadline: float,
    cancel: threading.Event,
    captures: Captures,
    kill_grace: float,
) -> dict[str, Any]:
    """`bash` running `cmd` as `user` with the shell's exported variables (and `req.env`) in its current directory
    (or `req.cwd` from there): a child of the session's state that changes none of it. What it leaves running when
    it ends by itself keeps running, as a background job of the shell's would. -> the result's fields."""
    env = {**exported, **(req.env or {}), **(user.env() if user else {})}
    cwd = os.path.join(cwd, req.cwd) if req.cwd else cwd
    out, err = captures.out, captures.err
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        fds: tuple[int, ...] = ()
        if len(cmd) <= COMMAND_ARG_MAX:
            args = ["bash", "--norc", "--noprofile", "-c", os.fsdecode(cmd)]
        else:
            text = os.memfd_create("shellq-command", 0)  # readable by whoever holds it, whatever the user
            stack.callback(os.close, text)
            os.write(text, cmd)
            args, fds = ["bash", "--norc", "--noprofile", f"/dev/fd/{text}"], (text,)
        if not os.path.isdir(cwd):
            missing = f"bash: cd: {req.cwd}: No such file or directory\n"
            (out if req.merge_stderr else err).feed(missing.encode(errors="surrogateescape"))
            done = ChildOutcome("completed", 1)
        else:
            done = run_child(
                args,
                user=user,
                cwd=cwd,
                env=env,
                stdin=stdin,
                on_stdout=out.feed,
                on_stderr=err.feed,
                deadline=deadline,
                cancelled=cancel.is_set,
                kill_grace=kill_grace,
                pass_fds=fds,
                merge_stderr=req.merge_stderr,
                keep_leftovers=True,
            )
    captures.finish()
    return {
        "status": done.status,
        "exit_code": done.exit_code,
        "stdout": out.kept(),
        "stderr": err.kept(),
        "stdout_size": out.size,
        "stderr_size": err.size,
        "truncated": captures.truncated,
        "spool_path": captures.spool_path,
        "error": captures.problem(),
        "duration_ms": round((time.monotonic() - started) * 1000, 3),
    }
