"""The persistent shell: one long-lived bash that runs one command at a time and survives what the command does.

How a command runs (see DESIGN.md "The shell"):

* its text is written to a file that bash `source`s, with stdin from /dev/null and stdout/stderr into two FIFOs the
  worker reads while the command runs, so heredocs, quotes and multi-line input behave as in a script file;
* completion, exit status and cwd come back on a report descriptor the command cannot see, tagged with a nonce;
* a timeout or interrupt sends SIGINT to bash (whose trap returns from the sourced file) and to the process groups
  the command created, then SIGTERM and SIGKILL to those processes, and as a last resort kills bash and respawns it;
* when bash exits or is replaced (`exit`, `exec`, `set -e`), a new bash is started and `epoch` goes up by one.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from worker import procs
from worker.output import OutputCapture, Spool, read_available

ShellStatus = Literal["completed", "timeout", "cancelled", "shell_exited"]

SHELL_ENV_DEFAULTS = {
    "PAGER": "cat",
    "GIT_PAGER": "cat",
    "MANPAGER": "cat",
    "GIT_EDITOR": ":",
    "GIT_MERGE_AUTOEDIT": "no",
    "TERM": "dumb",
    "LANG": "C.UTF-8",
}
_ENV_DROPPED = ("BASH_ENV", "ENV", "PROMPT_COMMAND", "HISTFILE")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TICK = 0.2  # seconds between checks that bash was not stopped
_QUIET = 0.002
"""Seconds a command runs before its output FIFOs are watched (read as they fill) rather than read at its end: a
short command then wakes the worker once, with its report, not also for each FIFO bash closes before that."""

# Runs in its own session; when the worker dies its stdin pipe closes and it kills every process of the shell's
# session (bash and all jobs), so a successor never overlaps a command still running from its predecessor, and it
# removes the shell's private directory of per-command files.
_GUARD = r"""
while IFS= read -r _; do :; done
for round in 1 2 3; do
  for f in /proc/[0-9]*/stat; do
    IFS= read -r line < "$f" 2>/dev/null || continue
    set -- ${line##*) }
    if [ "${4:-}" = "$SID" ]; then p=${f#/proc/}; kill -KILL "${p%/stat}" 2>/dev/null; fi
  done
done
rm -rf -- "$RUNDIR"
"""


@dataclass(frozen=True, slots=True)
class ShellResult:
    """What happened to one command."""

    status: ShellStatus
    exit_code: int | None
    stdout: bytes
    stderr: bytes
    stdout_size: int
    stderr_size: int
    truncated: bool
    spool_path: str | None
    cwd: str
    duration_ms: float
    shell_epoch: int
    error: str | None = None
    """What went wrong around the command (its output could not be spooled), though it ran."""


class _Bash:
    """One bash process in a session of its own, with its report pipe, its output FIFOs and its guard."""

    live_pids: ClassVar[set[int]] = set()
    """bash and guard pids of every live shell in this process (not orphans, whoever adopted them)."""

    def __init__(self, env: dict[str, str], cwd: str) -> None:
        shm = Path("/dev/shm")
        base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
        self.rundir = rundir = Path(tempfile.mkdtemp(prefix="shellq-", dir=base))  # tmpfs: per-command files are cheap
        self.cmd_file = rundir / "c"
        self.cmd_fd = self._open_command_file()
        self.rewrite = (f"{self.cmd_file}: ".encode(), b"bash: ")
        """bash's name for the command file in its messages, and what a terminal would show instead."""
        self.generation = 0
        self.out_path, self.err_path = self._make_fifos()
        r, w = os.pipe()
        self.report_fd = fcntl.fcntl(w, fcntl.F_DUPFD_CLOEXEC, 200)  # a high number user scripts rarely touch
        os.close(w)
        self.report_r = r
        os.set_blocking(r, False)
        self.proc = subprocess.Popen(
            ["bash", "--norc", "--noprofile"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(self.report_fd,),
            start_new_session=True,
            env=env,
            cwd=cwd,
        )
        os.close(self.report_fd)
        guard_r, self._guard_w = os.pipe()
        self._guard = subprocess.Popen(
            ["bash", "--norc", "--noprofile", "-c", _GUARD],
            stdin=guard_r,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env={"SID": str(self.proc.pid), "RUNDIR": str(rundir), "PATH": env.get("PATH", os.defpath)},
        )
        os.close(guard_r)
        self.pid = self.proc.pid
        self.guard_pid = self._guard.pid
        _Bash.live_pids.update((self.pid, self.guard_pid))
        self.buffer = b""

    def _make_fifos(self) -> tuple[Path, Path]:
        self.generation += 1
        paths = self.rundir / f"o{self.generation}", self.rundir / f"e{self.generation}"
        for p in paths:
            os.mkfifo(p, 0o600)
        return paths

    def open_fifo(self, path: Path) -> int:
        """Open an output FIFO for reading, without waiting for bash to open it."""
        try:
            return os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            self.restore_files()
            return os.open(path, os.O_RDONLY | os.O_NONBLOCK)

    def restore_files(self) -> None:
        """A command removed the run directory or files in it (`rm -rf /dev/shm/*`): make them again, at the paths
        bash's driver names, so the shell and its state go on."""
        self.rundir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for p in (self.out_path, self.err_path):
            if not p.exists():
                os.mkfifo(p, 0o600)
        os.close(self.cmd_fd)
        self.cmd_fd = self._open_command_file()

    def _open_command_file(self) -> int:
        return os.open(self.cmd_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def replace_fifos(self) -> None:
        """A background job still holds the current FIFOs: leave them to it, use new ones from now on."""
        for p in (self.out_path, self.err_path):
            p.unlink(missing_ok=True)
        self.out_path, self.err_path = self._make_fifos()

    def write_command(self, body: bytes) -> None:
        """Put the command's text in the file bash sources (kept open: a write and a truncate per command)."""
        if os.fstat(self.cmd_fd).st_nlink == 0:  # a command removed it
            self.restore_files()
        view, at = memoryview(body), 0
        try:
            while at < len(body):
                at += os.pwrite(self.cmd_fd, view[at:], at)
            os.ftruncate(self.cmd_fd, len(body))
        except OSError as e:  # a full /dev/shm, say: name the file
            raise OSError(e.errno, e.strerror, str(self.cmd_file)) from None

    def send(self, line: bytes) -> bool:
        """Write one line of input to bash; False when bash is gone."""
        assert self.proc.stdin is not None
        try:
            os.write(self.proc.stdin.fileno(), line)
        except (BrokenPipeError, OSError):
            return False
        return True

    def report(self, tag: bytes, status: bytes) -> bytes:
        """Shell code that writes `tag status cwd` NUL-terminated to the report descriptor."""
        return b"__shellq_report %s %s" % (tag, status)

    def prelude(self) -> bytes:
        """Defined once per bash: the driver's fixed parts as read-only functions and an alias, so a command's line
        is short (bash reads a pipe one byte at a time: 230 bytes cost 0.1 ms) and a command cannot redefine them.
        `set -m` gives every job its own process group; the INT trap makes an interrupt return from the sourced
        command file. The alias expands, at top level, to the sourcing of the command file with its redirections;
        should a command remove it (`unalias -a`, `shopt -u expand_aliases`), the function of the same name puts
        it back and asks for the long form of the line (`<nonce>-again`)."""
        e = self.report_fd + 1
        d = self.rundir
        body = (
            f"{{ builtin source {d}/c 2>&{e} {e}>&-; }} </dev/null >{d}/o$__shellq_g 2>/dev/null "
            f'{e}>{d}/e$__shellq_g {self.report_fd}>&-; __shellq_report "$__shellq_n" "$?"'
        )
        return (
            b"set -m; shopt -s expand_aliases; builtin trap 'builtin return 130' INT; "
            b"__shellq_begin() { __shellq_n=$1 __shellq_g=$2; builtin jobs >/dev/null 2>&1; "
            b"builtin trap 'builtin return 130' INT; }; "
            b'__shellq_report() { builtin printf \'%%s %%d %%s\\0\' "$1" "$2" "${PWD-}" >&%d; }; '
            b"__shellq_alias() { builtin shopt -s expand_aliases; builtin alias __shellq_run='%s'; }; "
            b'function __shellq_run { __shellq_alias; __shellq_report "$__shellq_n-again" 0; }; '
            b"builtin readonly -f __shellq_begin __shellq_report __shellq_alias __shellq_run; __shellq_alias; "
            % (self.report_fd, body.encode())
        )

    def stopped(self) -> bool:
        p = procs.stat(self.pid)
        return p is not None and p.state == "T"

    def kill(self) -> int:
        """Kill bash and every process of its session (the guard does the sweep); return bash's wait status."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        os.close(self._guard_w)
        code = self.proc.wait()
        self._guard.wait()
        _Bash.live_pids.difference_update((self.pid, self.guard_pid))
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        os.close(self.report_r)
        os.close(self.cmd_fd)
        shutil.rmtree(self.rundir, ignore_errors=True)
        return code


@dataclass
class _Running:
    """The state of the command being run."""

    nonce: bytes
    out: OutputCapture
    err: OutputCapture
    streams: dict[int, OutputCapture]
    since: int | None
    deadline: float
    status: ShellStatus = "completed"
    exit_code: int | None = None
    cwd: str | None = None
    done: bool = False
    reported: bool = False
    stoppable: bool = True
    bash_gone: bool = False
    step: int = 0
    step_deadline: float = math.inf
    spool_dir: Path | None = None


class Shell:
    """One long-lived bash; `run()` executes a command in it and returns a `ShellResult`. Not thread-safe except
    `interrupt()`, which another thread may call while `run()` waits."""

    def __init__(
        self,
        *,
        work_dir: str | Path | None = None,
        output_cap: int = 1 << 20,
        spool_quota: int = 1 << 30,
        kill_grace: float = 1.0,
        reap_orphans: bool = False,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> None:
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="shellq-"))
        self.output_cap = output_cap
        self.kill_grace = kill_grace
        self.reap_orphans = reap_orphans and procs.set_child_subreaper()
        self._born = procs.last_pid()
        self._owns_work_dir = work_dir is None
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._spool = Spool(self.work_dir / "spool", spool_quota)
        self._start_cwd = cwd or str(self.work_dir)
        self._env = _shell_env(env)
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._interrupt = threading.Event()
        self._cancel: threading.Event | None = None
        self._last_reap = 0.0
        self._seq = 0
        self._closed = False
        self.epoch = 0
        self._bash = self._spawn()

    @property
    def pid(self) -> int:
        return self._bash.pid

    def __enter__(self) -> Shell:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(
        self,
        command: str | bytes,
        timeout: float | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        spool_name: str | None = None,
        cancel: threading.Event | None = None,
    ) -> ShellResult:
        """Run one command to its end, its timeout or an interrupt. `env` is exported and `cwd` entered first (both
        persist, as if typed before the command). Setting `cancel` and then calling `interrupt()` stops this command
        even if the interrupt came before it started."""
        body = command.encode() if isinstance(command, str) else command
        for name in env or {}:
            if not _ENV_NAME.match(name):
                raise ValueError(f"invalid environment variable name: {name!r}")
        with self._lock:
            if self._closed:
                raise RuntimeError("shell is closed")
            self._interrupt.clear()
            while read_available(self._wake_r):
                pass
            self._seq += 1
            self._cancel = cancel
            start = time.monotonic()
            refusal = self._refusal(body, cwd)
            if refusal is not None:
                return self._result(refusal, start)
            return self._result(self._execute(body, timeout, env or {}, cwd, spool_name), start)

    def interrupt(self) -> None:
        """Stop the running command (status `cancelled`); does nothing when no command runs."""
        self._interrupt.set()
        os.write(self._wake_w, b"!")

    def close(self) -> None:
        """Kill bash and everything it started; remove the per-command files."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._bash.kill()
            if self.reap_orphans:
                procs.signal_all(procs.adopted(self._born, exclude=_Bash.live_pids), signal.SIGKILL)
            os.close(self._wake_r)
            os.close(self._wake_w)
            if self._owns_work_dir:
                shutil.rmtree(self.work_dir, ignore_errors=True)

    # -- one command -------------------------------------------------------------------------------------------

    def _refusal(self, body: bytes, cwd: str | None) -> _Running | None:
        """Catch what would make bash misbehave before it starts: an unterminated heredoc, a missing cwd."""
        message = None
        if cwd is not None and not os.path.isdir(os.path.join(self._last_cwd, cwd)):
            message, code = f"bash: cd: {cwd}: No such file or directory\n".encode(), 1
        elif b"<<" in body:
            message, code = self._heredoc_problem(body), 2
        if not message:
            return None
        run = self._new_running(b"", math.inf, None)
        run.err.feed(message)
        run.exit_code, run.cwd = code, self._last_cwd
        return run

    def _heredoc_problem(self, body: bytes) -> bytes | None:
        """bash runs a script whose heredoc never ends (with a warning); we refuse it, as a terminal would hang."""
        self._bash.write_command(body)
        check = subprocess.run(
            ["bash", "--norc", "--noprofile", "-n", str(self._bash.cmd_file)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            env=self._env,
            timeout=30,
            check=False,
        )
        if b"delimited by end-of-file" not in check.stderr:
            return None
        lines = [line for line in check.stderr.splitlines(keepends=True) if b"delimited by end-of-file" in line]
        return b"".join(lines).replace(*self._bash.rewrite) + b"shellq: not run: a here-document is not terminated\n"

    def _new_running(self, nonce: bytes, deadline: float, spool_name: str | None) -> _Running:
        def open_spool(stream: str) -> tuple[Path, int] | None:
            if run.spool_dir is None:
                run.spool_dir = self._spool.open(spool_name or f"{int(time.time())}-{self._seq}")
            room = self._spool.room()
            return (run.spool_dir / stream, room) if room > 0 else None

        out = OutputCapture(self.output_cap, lambda: open_spool("stdout"))
        err = OutputCapture(self.output_cap, lambda: open_spool("stderr"), rewrite=self._bash.rewrite)
        run = _Running(nonce, out, err, {}, procs.last_pid(), deadline)  # what open_spool fills in
        return run

    def _execute(
        self, body: bytes, timeout: float | None, env: dict[str, str], cwd: str | None, spool_name: str | None
    ) -> _Running:
        if self._bash.proc.poll() is not None:  # killed while idle: the new command gets a new shell
            self._bash.kill()
            self._bash = self._spawn()
        bash = self._bash
        deadline = time.monotonic() + timeout if timeout is not None else math.inf
        # The nonce only tells this command's reports from stale ones: a command can read it in its own shell.
        run = self._new_running(b"%x" % self._seq, deadline, spool_name)
        for path, capture in ((bash.out_path, run.out), (bash.err_path, run.err)):
            run.streams[bash.open_fifo(path)] = capture
        bash.write_command(body)
        if not bash.send(self._driver(run.nonce, env, cwd)):
            run.bash_gone = True
        self._wait(run)
        if run.step and not run.bash_gone:  # back at the prompt; what the command left behind goes too
            procs.terminate(lambda: self._command_procs(run), self.kill_grace)
        self._finish_streams(run)
        if run.bash_gone:
            self._respawn(run)
        elif self.reap_orphans and time.monotonic() - self._last_reap > 1.0:
            self._last_reap = time.monotonic()
            procs.reap_zombies(keep=())
        return run

    def _driver(self, nonce: bytes, env: dict[str, str], cwd: str | None, short: bool = True) -> bytes:
        """The one line bash reads for a command: `__shellq_begin NONCE GEN; __shellq_run` (the alias, see
        `_Bash.prelude`) or, with `env` or `cwd` to apply first, its long form. It expands no variable that `set -u`
        could trip on, and under `set -x` traces nothing of its own into the command's stderr: the group's stderr is
        /dev/null (where the trace of `source` goes) and the command's stderr is the FIFO, reached through a spare
        descriptor E."""
        b = self._bash
        begin = b"__shellq_begin %s %d; " % (nonce, b.generation)
        if short and not env and cwd is None:
            return begin + b"__shellq_run\n"
        e = b.report_fd + 1
        prelude = "".join(f"builtin export {k}={shlex.quote(v)} 2>&{e}; " for k, v in env.items())
        if cwd is not None:
            prelude += f"builtin cd -- {shlex.quote(cwd)} 2>&{e} && "
        return (
            begin
            + (
                f"{{ {prelude}builtin source {b.cmd_file} 2>&{e} {e}>&-; }} "
                f"</dev/null >{b.out_path} 2>/dev/null {e}>{b.err_path} {b.report_fd}>&-; "
            ).encode()
            + b.report(nonce, b'"$?"')
            + b"\n"
        )

    def _wait(self, run: _Running) -> None:
        """Read output and reports until the command is over, stepping through the escalation when it has to stop.
        The output FIFOs are watched from `_QUIET` seconds on (a pipe holds 64 KiB until then)."""
        poller = select.poll()
        for fd in (self._bash.report_r, self._wake_r):
            poller.register(fd, select.POLLIN)
        watch_from = time.monotonic() + _QUIET
        while not run.done:
            now = time.monotonic()
            if watch_from and now >= watch_from:
                watch_from = 0.0
                for fd in run.streams:  # not read here: a FIFO bash has not opened yet reads as EOF
                    poller.register(fd, select.POLLIN)
            wait = min(run.deadline if run.step == 0 else run.step_deadline, now + _TICK, watch_from or math.inf) - now
            events = poller.poll(math.ceil(max(0.0, wait) * 1000))
            for fd, _ in events:
                if fd in run.streams:
                    self._pump(fd, run, poller)
                elif fd == self._bash.report_r:
                    self._read_reports(run)
                else:
                    read_available(self._wake_r)  # an interrupt: acted on in _check_progress
            self._check_progress(run, idle=not events)

    def _interrupted(self) -> bool:
        return self._interrupt.is_set() or (self._cancel is not None and self._cancel.is_set())

    def _check_progress(self, run: _Running, idle: bool) -> None:
        if run.done:
            return
        now = time.monotonic()
        if run.step == 0 and now >= run.deadline:
            self._begin_stop(run, "timeout")
        elif run.step == 0 and run.stoppable and self._interrupted():
            self._begin_stop(run, "cancelled")
        elif run.step and now >= run.step_deadline:
            self._escalate(run)
        if idle and self._bash.stopped():  # `kill -STOP $$`: bash cannot even run its trap
            os.kill(self._bash.pid, signal.SIGCONT)

    def _pump(self, fd: int, run: _Running, poller: select.poll) -> None:
        data = read_available(fd)
        if data:
            run.streams[fd].feed(data)
        elif data == b"":
            poller.unregister(fd)
            os.close(fd)
            del run.streams[fd]

    def _read_reports(self, run: _Running) -> None:
        bash = self._bash
        while (data := read_available(bash.report_r, 4096)) is not None:
            if data == b"":
                run.bash_gone = run.done = True
                return
            bash.buffer += data
        *records, bash.buffer = bash.buffer.split(b"\0")
        for record in records:
            nonce, rc, cwd = record.split(b" ", 2)
            if nonce == run.nonce:
                run.exit_code, run.cwd, run.reported = int(rc), os.fsdecode(cwd), True
                run.done = run.done or run.step == 0
            elif nonce == run.nonce + b"-again":  # a command removed the alias: this once, the long form
                bash.send(self._driver(run.nonce, {}, None, short=False))
            elif nonce == run.nonce + b"-back":  # bash is back at its prompt after an interrupt
                run.exit_code = run.exit_code if run.reported else int(rc)
                run.cwd, run.done = os.fsdecode(cwd), True

    def _begin_stop(self, run: _Running, status: ShellStatus) -> None:
        """Step 1: SIGINT to bash (its trap returns from the sourced file) and to every process of the command.

        Under job control bash drops the rest of its input line when a foreground job dies of SIGINT, so the
        driver's report may never come: a second line queued now reports when bash is back at its prompt."""
        run.status, run.step = status, 1
        run.step_deadline = time.monotonic() + self.kill_grace
        b = self._bash
        b.send(b.report(run.nonce + b"-back", b'"$?"') + b"\n")
        os.kill(b.pid, signal.SIGCONT)
        os.kill(b.pid, signal.SIGINT)
        procs.signal_all(self._command_procs(run), signal.SIGINT)

    def _command_procs(self, run: _Running) -> list[int]:
        adopter = os.getpid() if self.reap_orphans else None
        return procs.command_procs(self._bash.pid, run.since, adopter, exclude=(self._bash.guard_pid,))

    def _escalate(self, run: _Running) -> None:
        """Steps 2-4: SIGTERM, then SIGKILL the command's processes; then kill bash itself (it will be respawned)."""
        run.step += 1
        run.step_deadline = time.monotonic() + self.kill_grace
        targets = self._command_procs(run)
        if run.step == 2:
            procs.signal_all(targets, signal.SIGTERM)
            procs.signal_all(targets, signal.SIGCONT)
        elif run.step == 3:
            procs.signal_all(targets, signal.SIGKILL)
        else:
            run.bash_gone = run.done = True

    def _finish_streams(self, run: _Running) -> None:
        """Take what the command wrote before it ended. A FIFO still held open by a background job is handed to a
        drain thread, so the job never blocks and its later output never reaches a later result."""
        lingering = []
        for fd, capture in run.streams.items():
            while data := read_available(fd):
                capture.feed(data)
            if data is None:
                lingering.append(fd)
            else:
                os.close(fd)
        for capture, name in ((run.out, "stdout"), (run.err, "stderr")):
            capture.finish()
            if run.spool_dir and capture.spooled is None:  # the other stream overflowed: keep this one beside it
                capture.save_kept(run.spool_dir / name)
        if lingering:
            self._bash.replace_fifos()
            for fd in lingering:
                threading.Thread(target=_drain, args=(fd,), daemon=True, name="shellq-drain").start()

    # -- the bash process ----------------------------------------------------------------------------------------

    def _spawn(self) -> _Bash:
        """Start bash and wait until it answers; bumps `epoch`."""
        bash = _Bash(self._env, self._start_cwd)
        self.epoch += 1
        ready = b"shellq-ready"
        bash.send(bash.prelude() + bash.report(ready, b"0") + b"\n")
        self._bash = bash
        run = self._new_running(ready, time.monotonic() + 30, None)
        run.stoppable = False
        self._wait(run)
        if run.bash_gone or run.cwd is None:
            raise RuntimeError(f"bash did not start (status {bash.kill()})")
        self._last_cwd = run.cwd
        return bash

    def _respawn(self, run: _Running) -> None:
        """bash exited, was replaced or had to be killed: reap it (and its session), record why, start a new one."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._bash.proc.wait(timeout=0.2)  # `exit 3` is already on its way out; `exec sleep 60` is not
        code = self._bash.kill()
        if run.status == "completed":
            run.status = "shell_exited"
            run.exit_code = code if code >= 0 else 128 - code
        run.cwd = run.cwd or self._last_cwd
        self._bash = self._spawn()

    def _result(self, run: _Running, start: float) -> ShellResult:
        if run.cwd is not None:
            self._last_cwd = run.cwd
        truncated = run.out.truncated or run.err.truncated
        epoch = self.epoch - 1 if run.bash_gone else self.epoch
        return ShellResult(
            status=run.status,
            exit_code=run.exit_code,
            stdout=run.out.kept(),
            stderr=run.err.kept(),
            stdout_size=run.out.size,
            stderr_size=run.err.size,
            truncated=truncated,
            spool_path=str(run.spool_dir) if truncated and run.spool_dir else None,
            cwd=run.cwd or self._last_cwd,
            duration_ms=(time.monotonic() - start) * 1000,
            shell_epoch=epoch,
            error=_spool_problem(run),
        )


def _spool_problem(run: _Running) -> str | None:
    failed = [f"{name}: {c.spool_error}" for name, c in (("stdout", run.out), ("stderr", run.err)) if c.spool_error]
    return f"output past the cap could not be spooled ({'; '.join(failed)})" if failed else None


def _shell_env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _ENV_DROPPED and not k.startswith("SHELLQ_")}
    env.update(SHELL_ENV_DEFAULTS)
    env.update(extra or {})
    return env


def _drain(fd: int) -> None:
    os.set_blocking(fd, True)
    try:
        while os.read(fd, 1 << 16):
            pass
    finally:
        os.close(fd)
