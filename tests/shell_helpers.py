"""Helpers for the persistent-shell tests: timed runs, result checks, finding a command's processes in /proc."""

from __future__ import annotations

import os
import secrets
import shlex
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from worker.shell import Shell, ShellResult

PY = shlex.quote(sys.executable)
"""This test run's Python, quoted for a shell command line."""


def python_command(code: str, *args: str) -> str:
    """A shell command running `code` (then `args`) with this test run's Python."""
    return " ".join([PY, "-c", shlex.quote(code), *map(shlex.quote, args)])


def run_timed(sh: Shell, command: str | bytes, timeout: float | None = 60) -> tuple[ShellResult, float]:
    """Run the command; return the result and the seconds it took."""
    start = time.monotonic()
    r = sh.run(command, timeout=timeout)
    return r, time.monotonic() - start


def run_ok(sh: Shell, command: str, env: dict[str, str] | None = None, cwd: str | None = None) -> ShellResult:
    """Run a command that must complete with exit status 0 and print nothing on stderr."""
    r = sh.run(command, timeout=60, env=env, cwd=cwd)
    assert (r.status, r.exit_code, r.stderr) == ("completed", 0, b"")
    return r


def assert_ok(r: ShellResult, stdout: bytes, stderr: bytes = b"") -> None:
    assert (r.status, r.exit_code, r.stdout, r.stderr) == ("completed", 0, stdout, stderr)


def assert_usable(sh: Shell) -> ShellResult:
    """The shell runs the next command normally."""
    r = sh.run("echo ok", timeout=30)
    assert_ok(r, b"ok\n")
    return r


def assert_no_private_paths(data: bytes) -> None:
    """Nothing names the shell's own per-command files."""
    assert b"/shellq" not in data
    assert b"/dev/shm" not in data


def unique_sleep(seconds: int) -> str:
    """A sleep duration no other test (or concurrent run) uses, so its processes can be found in /proc."""
    return f"{seconds}.{secrets.randbelow(10**6):06d}"


def procs_with_arg(arg: str) -> list[int]:
    """Pids of live processes that have `arg` as one of their argv elements."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if arg.encode() in argv:
            pids.append(int(entry.name))
    return pids


def is_running(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 :].split()[0] != b"Z"


def wait_until(condition: Callable[[], object], seconds: float = 5.0) -> bool:
    """Poll `condition` until it is truthy or `seconds` have passed."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def gone(*args: str) -> Callable[[], bool]:
    """A condition: no live process has any of `args` in its argv."""
    return lambda: not any(procs_with_arg(arg) for arg in args)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
