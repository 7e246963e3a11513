"""Linux process facts from /proc: who belongs to a shell's command, zombie reaping, the child subreaper flag."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

_PR_SET_CHILD_SUBREAPER = 36
_PR_SET_DUMPABLE = 4


class Proc(NamedTuple):
    pid: int
    state: str
    ppid: int
    pgrp: int
    sid: int


def stat(pid: int) -> Proc | None:
    """Parse /proc/PID/stat; None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name is in parentheses and may itself contain spaces and parentheses.
    fields = raw[raw.rindex(b")") + 2 :].split()
    return Proc(pid, fields[0].decode(), int(fields[1]), int(fields[2]), int(fields[3]))


def all_procs() -> list[Proc]:
    procs = []
    for name in os.listdir("/proc"):
        if name.isdigit() and (p := stat(int(name))) is not None:
            procs.append(p)
    return procs


@functools.cache
def _ns_last_pid() -> int:
    return os.open("/proc/sys/kernel/ns_last_pid", os.O_RDONLY | os.O_CLOEXEC)


def last_pid() -> int | None:
    """The pid most recently handed out in this pid namespace (/proc/sys/kernel/ns_last_pid, kept open)."""
    try:
        return int(os.pread(_ns_last_pid(), 32, 0))
    except (OSError, ValueError):
        return None


def born_between(pid: int, lo: int | None, hi: int | None) -> bool:
    """Was `pid` handed out after `lo` and no later than `hi` (pids wrap around at pid_max)?"""
    if lo is None or hi is None:
        return True
    if lo <= hi:
        return lo < pid <= hi
    return pid > lo or pid <= hi


def command_procs(
    shell_pid: int, since: int | None, adopter: int | None = None, exclude: Iterable[int] = ()
) -> list[int]:
    """Processes of the command the shell `shell_pid` (a session leader) started after pid `since` was handed out.

    A process belongs to the command that started its job: follow its parents up to the shell; the shell's child on
    that path (the job's leader, a pipeline member, a command substitution) was born during this command or not.
    So a server, a reloader or a watch loop an earlier command left running keeps every child it starts later,
    with or without job control (`set +m`). A process whose chain no longer reaches the shell (its parent exited)
    counts by its process group when that group is one of the shell's jobs, else by its own birth: with job control
    on, an orphan of an earlier job is still known by its job's group; a process that left the shell's session
    (`setsid`) and was orphaned is the command's when it was born during it.
    """
    procs = all_procs()
    now = last_pid()
    parent = {p.pid: p.ppid for p in procs}
    skip = {shell_pid, *exclude}
    found = []
    for p in procs:
        if p.pid in skip or p.state == "Z":
            continue
        leader = _leader(p.pid, shell_pid, parent)
        if leader is not None:
            mine = born_between(leader, since, now)
        elif p.sid == shell_pid and p.pgrp != shell_pid:
            mine = born_between(p.pgrp, since, now)
        else:
            adopted = adopter is not None and _descends(p.pid, adopter, parent, skip)
            mine = (adopted or p.sid == shell_pid) and born_between(p.pid, since, now)
        if mine:
            found.append(p.pid)
    return found


def _leader(pid: int, shell_pid: int, parent: dict[int, int]) -> int | None:
    """The shell's child on `pid`'s chain of parents (`pid` itself when it is one); None when the chain does not
    reach the shell."""
    for _ in range(256):
        up = parent.get(pid, 0)
        if up == shell_pid:
            return pid
        if up <= 1:
            return None
        pid = up
    return None


def adopted(since: int | None, exclude: Iterable[int]) -> list[int]:
    """Orphans this child subreaper adopted that were born after pid `since` (not in `exclude`), with every process
    of their sessions: what a `setsid` job left behind when its parent exited."""
    procs, now, me, skip = all_procs(), last_pid(), os.getpid(), set(exclude)
    orphans = {p.pid for p in procs if p.ppid == me and p.pid not in skip and born_between(p.pid, since, now)}
    return [p.pid for p in procs if p.state != "Z" and (p.pid in orphans or p.sid in orphans)]


def kill_session(sid: int) -> int:
    """SIGKILL every process of session `sid` (a shell left by a worker that lost its lease); how many."""
    pids = [p.pid for p in all_procs() if p.sid == sid and p.state != "Z"]
    signal_all(pids, signal.SIGKILL)
    return len(pids)


def user_procs(uid: int) -> list[int]:
    """The live processes (zombies left out) owned by `uid`."""
    found = []
    for name in os.listdir("/proc"):
        try:
            owned = name.isdigit() and os.stat(f"/proc/{name}").st_uid == uid
        except OSError:
            continue
        if owned and (p := stat(int(name))) is not None and p.state != "Z":
            found.append(p.pid)
    return found


def kill_user(uid: int, rounds: int = 50) -> int:
    """SIGKILL every process owned by `uid`, looking again until none is left (a fork bomb forks between two
    looks); how many were signalled. Never the caller's own uid."""
    if uid == os.geteuid():
        raise ValueError("kill_user: not the worker's own uid")
    total = 0
    for _ in range(rounds):
        pids = user_procs(uid)
        if not pids:
            break
        signal_all(pids, signal.SIGKILL)
        total += len(pids)
        time.sleep(0.01)
    return total


def terminate(find: Callable[[], list[int]], grace: float) -> None:
    """SIGTERM what `find` returns, wait up to `grace` seconds for it to go, then SIGKILL what is left."""
    deadline = time.monotonic() + grace
    pids = find()
    signal_all(pids, signal.SIGTERM)
    signal_all(pids, signal.SIGCONT)
    while pids and time.monotonic() < deadline:
        time.sleep(0.02)
        pids = find()
    signal_all(pids, signal.SIGKILL)


def _descends(pid: int, ancestor: int, parent: dict[int, int], stop: set[int]) -> bool:
    """Is `ancestor` up the parent chain of `pid`, before any pid in `stop`?"""
    for _ in range(256):
        pid = parent.get(pid, 0)
        if pid == ancestor:
            return True
        if pid <= 1 or pid in stop:
            return False
    return False


def signal_all(pids: Iterable[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def set_child_subreaper() -> bool:
    """Make orphaned descendants of this process re-parent to it (prctl PR_SET_CHILD_SUBREAPER)."""
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


def set_not_dumpable() -> bool:
    """Make this process's memory and /proc files (environ, mem, fds) unreadable to every other process of its uid,
    and ptrace of it refused, so a command running as the same uid cannot read the worker's secrets from there
    (prctl PR_SET_DUMPABLE 0; see proc(5)). Children that exec are dumpable again."""
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) == 0)


def reap_zombies(keep: Iterable[int], sessions: set[int] | None = None) -> int:
    """Reap zombie children of this process, except the pids in `keep` (their owners wait for them), and only those
    of `sessions` when given (orphans of a shell's jobs, not a child some other part of this process waits for);
    count them."""
    kept, reaped = set(keep), 0
    for p in filter(None, map(stat, children())):
        if p.state == "Z" and p.pid not in kept and (sessions is None or p.sid in sessions):
            try:
                os.waitpid(p.pid, os.WNOHANG)
                reaped += 1
            except ChildProcessError:
                pass
    return reaped


def children() -> list[int]:
    """This process's children, adopted orphans included (/proc/self/task/*/children: no scan of all of /proc,
    which 128 workers on one host each doing it every second made quadratic)."""
    try:
        tasks = Path("/proc/self/task").iterdir()
        return [int(pid) for task in tasks for pid in (task / "children").read_text().split()]
    except FileNotFoundError:  # a kernel without CONFIG_PROC_CHILDREN
        me = os.getpid()
        return [p.pid for p in all_procs() if p.ppid == me]
