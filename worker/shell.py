"""The persistent shell: one long-lived bash that runs one command at a time and survives what the command does.

How a command runs (docs/design.md, "The shell"; the bash process is `worker.shell_process`, the shell code it is
driven with `worker.shell_driver`):

* its text is written to a file that bash `source`s, with stdin from /dev/null (or the file holding the stdin it
  was given) and stdout/stderr into two FIFOs the worker reads while the command runs, so heredocs, quotes and
  multi-line input behave as in a script file;
* completion, exit status and cwd come back as a record on a report FIFO, tagged with a per-command nonce;
* a timeout or interrupt sends SIGINT to bash (whose trap returns from the sourced file) and to the command's
  processes, then SIGTERM and SIGKILL to those processes, and as a last resort kills bash and respawns it;
* when bash exits, is replaced (`exit`, `exec`, `set -e`) or can no longer run the driver (`set -n`), a new bash is
  started and `epoch` goes up by one; a command that bash could not even start is run in the new bash.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from worker import output, procs, shell_driver
from worker.output import Captures, OutputCapture, Spool, read_available
from worker.shell_driver import ReportReader
from worker.shell_process import ShellProcess, ShellUser

ShellStatus = Literal["completed", "timeout", "cancelled", "shell_exited"]
LiveSink = Callable[[Literal["stdout", "stderr"], int, bytes], None]
"""Takes (stream, offset, bytes) of a running command's output (worker/live.py)."""

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
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
_TICK = 0.2  # seconds between checks that bash was not stopped, is not back at its prompt unreported, and reaping
_QUIET = 0.002
"""Seconds a command runs before its output FIFOs are watched (read as they fill) rather than read at its end: a
short command then wakes the worker once, with its report, not also for each FIFO bash closes before that."""
_READY = b"shellq-ready"


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
    """What went wrong around the command (its output could not be spooled, bash had to be replaced)."""


@dataclass
class _Running:
    """The state of the command being run."""

    nonce: bytes
    captures: Captures
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
    killed_bash: bool = False
    not_run: bool = False
    resent: bool = False
    error: str | None = None
    step: int = 0
    step_deadline: float = math.inf
    live: LiveSink | None = None

    @property
    def out(self) -> OutputCapture:
        return self.captures.out

    @property
    def err(self) -> OutputCapture:
        return self.captures.err


class Shell:
    """One long-lived bash; `run()` executes a command in it and returns a `ShellResult`. Not thread-safe except
    `interrupt()`, which another thread may call while `run()` waits.

    `user` (a name or uid; the worker must be root) runs bash and every command as that user, with its groups only
    and its HOME, USER and LOGNAME. Without an explicit `cwd` such a shell starts in that user's home when the user
    may enter it, else in `/`: the session directory holds the worker's spool files and is not the shell's."""

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
        user: str | None = None,
    ) -> None:
        self._user = ShellUser.resolve(user)
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="shellq-"))
        self.output_cap = output_cap
        self.kill_grace = kill_grace
        self.reap_orphans = reap_orphans and procs.set_child_subreaper()
        self._born = procs.last_pid()
        self._owns_work_dir = work_dir is None
        group = self._user.gid if self._user else None
        output.private_dir(self.work_dir, group)
        self._spool = Spool(self.work_dir / "spool", spool_quota, group)
        self._start_cwd = cwd or (self._user.start_dir() if self._user else str(self.work_dir))
        self._env = _shell_env(env, self._user)
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._interrupt = threading.Event()
        self._cancel: threading.Event | None = None
        self._live: LiveSink | None = None
        self._stdin: Path | None = None
        self._merge = False
        self._last_reap = 0.0
        self._seq = 0
        self._closed = False
        self.epoch = 0
        self._bash = self._spawn()

    @property
    def pid(self) -> int:
        return self._bash.pid

    @property
    def user(self) -> ShellUser | None:
        """The user bash runs as when it is not the worker's own."""
        return self._user

    @property
    def cwd(self) -> str:
        """The shell's current directory after the last command."""
        return self._last_cwd

    def exported(self) -> dict[str, str]:
        """The shell's exported variables now (`env -0`, run in it like a command)."""
        r = self.run("\\builtin command env -0", timeout=30)
        pairs = (item.partition(b"=") for item in r.stdout.split(b"\0") if b"=" in item)
        return {os.fsdecode(k): os.fsdecode(v) for k, _, v in pairs}

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
        live: LiveSink | None = None,
        stdin: Path | None = None,
        merge_stderr: bool = False,
    ) -> ShellResult:
        """Run one command to its end, its timeout or an interrupt. `env` is exported and `cwd` entered first (both
        persist, as if typed before the command). Setting `cancel` and then calling `interrupt()` stops this command
        even if the interrupt came before it started. `live` is given each piece of output read while the command
        runs, from `_QUIET` seconds on (the bytes read at its end only go into the result). `stdin` is a file the
        shell's user may read, given as the command's stdin (default /dev/null). With `merge_stderr` the command's
        stderr goes where its stdout goes (`2>&1`), interleaved as written."""
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
            self._cancel, self._live, self._stdin, self._merge = cancel, live, stdin, merge_stderr
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
                procs.signal_all(procs.adopted(self._born, exclude=ShellProcess.live_pids), signal.SIGKILL)
            os.close(self._wake_r)
            os.close(self._wake_w)
            if self._owns_work_dir:
                shutil.rmtree(self.work_dir, ignore_errors=True)

    # -- one command -------------------------------------------------------------------------------------------

    def _refusal(self, body: bytes, cwd: str | None) -> _Running | None:
        """Catch what would make bash misbehave before it starts: an unterminated heredoc, a missing cwd."""
        message = None
        if cwd is not None and not os.path.isdir(os.path.join(self._last_cwd, cwd)):
            message, code = f"bash: cd: {cwd}: No such file or directory\n".encode(errors="surrogateescape"), 1
        elif b"<<" in body:
            message, code = self._heredoc_problem(body), 2
        if not message:
            return None
        run = self._new_running(b"", math.inf, None)
        (run.out if self._merge else run.err).feed(message)
        run.exit_code, run.cwd = code, self._last_cwd
        return run

    def _heredoc_problem(self, body: bytes) -> bytes | None:
        """bash runs a script whose heredoc never ends (with a warning); we refuse it, as a terminal would hang."""
        self._bash.write_command(body)
        try:
            check = subprocess.run(
                ["bash", "--norc", "--noprofile", "-n", str(self._bash.cmd_file)],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                env=self._env,
                timeout=30,
                check=False,
            )
        except subprocess.TimeoutExpired:  # the file grew under it (a job of an earlier command): let bash judge
            return None
        if b"delimited by end-of-file" not in check.stderr:
            return None
        lines = [line for line in check.stderr.splitlines(keepends=True) if b"delimited by end-of-file" in line]
        return b"".join(lines).replace(*self._bash.rewrite) + b"shellq: not run: a here-document is not terminated\n"

    def _new_running(self, nonce: bytes, deadline: float, spool_name: str | None) -> _Running:
        captures = self.captures(spool_name or f"{int(time.time())}-{self._seq}", self._merge)
        return _Running(nonce, captures, {}, procs.last_pid(), deadline)

    def captures(self, spool_name: str, merge: bool = False) -> Captures:
        """Output captures for one command, spooling past the cap to this shell's spool as `spool_name` (for the
        shell's commands, and a command run beside it: worker/files.py)."""
        return Captures(self.output_cap, self._spool, spool_name, self._bash.rewrite, merge)

    def _execute(
        self, body: bytes, timeout: float | None, env: dict[str, str], cwd: str | None, spool_name: str | None
    ) -> _Running:
        """Run the command; if bash could not even start it (its state broke the driver's redirections), start a
        new bash and run it there, once."""
        if self._bash.exited():  # killed while idle: the new command gets a new shell
            self._bash.kill()
            self._bash = self._spawn()
        run = self._attempt(body, timeout, env, cwd, spool_name)
        if run.not_run:
            why = run.error
            run = self._attempt(body, timeout, env, cwd, spool_name)
            note = f"bash could not start this command ({why}); a new bash was started and ran it"
            run.error = f"{note}; {run.error}" if run.error else note
        return run

    def _attempt(
        self, body: bytes, timeout: float | None, env: dict[str, str], cwd: str | None, spool_name: str | None
    ) -> _Running:
        bash = self._bash
        deadline = time.monotonic() + timeout if timeout is not None else math.inf
        # The nonce tells this command's reports from any other; a command can read its own (it owns its shell).
        run = self._new_running(secrets.token_hex(8).encode(), deadline, spool_name)
        run.live = self._live
        run.streams[bash.open_fifo(bash.out_path)] = run.out
        if not self._merge:
            run.streams[bash.open_fifo(bash.err_path)] = run.err
        bash.set_stdin(self._stdin)
        bash.write_command(body)
        if env or cwd is not None or self._merge:
            line = shell_driver.begin_with(bash.rundir, run.nonce, bash.generation, env, cwd, self._merge)
        else:
            line = shell_driver.begin(run.nonce, bash.generation)
        if not bash.send(line):
            run.bash_gone = True
        self._wait(run)
        if run.step and not run.bash_gone:  # back at the prompt; what the command left behind goes too
            procs.terminate(lambda: self._command_procs(run), self.kill_grace)
        self._finish_streams(run)
        self._check_ran(run)
        if run.bash_gone:
            self._respawn(run)
        elif self.reap_orphans and time.monotonic() - self._last_reap > 1.0:
            self._last_reap = time.monotonic()
            procs.reap_zombies(keep=ShellProcess.live_pids)
        return run

    def _check_ran(self, run: _Running) -> None:
        """A report whose command never started (bash could not make its redirections: no descriptors left), or a
        command that took bash's own input away: this bash cannot go on."""
        if run.step == 0 and not run.bash_gone and run.reported and not self._bash.ran():
            run.not_run = run.bash_gone = run.killed_bash = True
            run.error = "bash could not open the command's input or output (out of file descriptors?)"

    def _wait(self, run: _Running) -> None:
        """Read output and reports until the command is over, stepping through the escalation when it has to stop.
        The output FIFOs are watched from `_QUIET` seconds on (a pipe holds 64 KiB until then)."""
        poller = select.poll()
        for fd in (self._bash.report_fd, self._wake_r, self._bash.pidfd):
            if fd >= 0:
                poller.register(fd, select.POLLIN)
        watch_from = time.monotonic() + _QUIET
        while not run.done:
            now = time.monotonic()
            if watch_from and now >= watch_from:
                watch_from = 0.0
                self._watch(run, poller)
            wait = min(run.deadline if run.step == 0 else run.step_deadline, now + _TICK, watch_from or math.inf) - now
            events = poller.poll(math.ceil(max(0.0, wait) * 1000))
            for fd, _ in events:
                if fd in run.streams:
                    self._pump(fd, run, poller)
                elif fd == self._bash.report_fd:
                    self._read_reports(run)
                elif fd == self._bash.pidfd:
                    self._read_reports(run)  # what it said before it went
                    run.bash_gone = run.done = True
                else:
                    read_available(self._wake_r)  # an interrupt: acted on in _check_progress
            self._check_progress(run, poller, idle=not events)

    def _watch(self, run: _Running, poller: select.poll) -> None:
        """The command has run `_QUIET` seconds: read its output as it comes, and publish it live."""
        for fd in run.streams:  # not read here: a FIFO bash has not opened yet reads as EOF
            poller.register(fd, select.POLLIN)
        if run.live is not None:
            run.out.live = functools.partial(run.live, "stdout")
            run.err.live = functools.partial(run.live, "stderr")

    def _interrupted(self) -> bool:
        return self._interrupt.is_set() or (self._cancel is not None and self._cancel.is_set())

    def _check_progress(self, run: _Running, poller: select.poll, idle: bool) -> None:
        if run.done:
            return
        now = time.monotonic()
        if run.step == 0 and now >= run.deadline:
            self._begin_stop(run, "timeout")
        elif run.step == 0 and run.stoppable and self._interrupted():
            self._begin_stop(run, "cancelled")
        elif run.step and now >= run.step_deadline:
            self._escalate(run)
        if idle:
            self._check_idle(run, poller)

    def _check_idle(self, run: _Running, poller: select.poll) -> None:
        """Nothing happened for a tick: is bash stopped, gone, or back at its prompt without a report?"""
        bash = self._bash
        if bash.stopped():  # `kill -STOP $$`: bash cannot even run its trap
            os.kill(bash.pid, signal.SIGCONT)
        elif bash.pidfd < 0 and bash.exited():
            run.bash_gone = run.done = True
        elif bash.report_fifo_moved():  # read the report where bash now writes it (or make the FIFO again)
            if bash.restore_files():
                poller.register(bash.report_fd, select.POLLIN)
        elif bash.at_prompt():
            self._read_reports(run)
            if not run.done:
                self._unreported(run, poller)
        if self.reap_orphans:  # orphans of the command's jobs, while it runs (a pids limit counts zombies)
            procs.reap_zombies(keep=ShellProcess.live_pids, sessions={bash.pid})

    def _unreported(self, run: _Running, poller: select.poll) -> None:
        """bash is back at its prompt and no report came. Its files may be gone (`rm -rf /dev/shm/*`): make them
        again and ask bash to send its report once more. If that brings nothing, bash can no longer run the
        driver (`set -n`, `enable -n builtin`, a DEBUG trap that skips every command): replace it."""
        bash = self._bash
        if bash.restore_files():
            poller.register(bash.report_fd, select.POLLIN)
        if not run.resent:
            run.resent = True
            bash.send(shell_driver.resend(run.nonce))
            return
        run.bash_gone = run.done = run.killed_bash = True
        if run.step == 0 and not bash.ran():
            run.not_run = True
            run.error = "its state no longer let bash run shellq's driver"
        else:
            run.error = (
                "bash was left unable to run commands (by `set -n`, a disabled or redefined builtin, or a DEBUG "
                "trap that skips commands); a new bash was started"
            )

    def _pump(self, fd: int, run: _Running, poller: select.poll) -> None:
        data = read_available(fd)
        if data:
            run.streams[fd].feed(data)
        elif data == b"":
            poller.unregister(fd)
            os.close(fd)
            del run.streams[fd]

    def _read_reports(self, run: _Running) -> None:
        bash, reports = self._bash, []
        while data := read_available(bash.report_fd, 4096):
            reports += self._reports.feed(data)
        for r in reports:
            if r.tag == run.nonce:
                run.exit_code, run.cwd, run.reported = r.exit_code, r.cwd or bash.cwd(), True
                run.done = run.done or run.step == 0
                if not r.stdin_ok:  # `exec 10<&-` took the pipe bash reads its commands from
                    run.bash_gone = run.killed_bash = run.done = True
                    run.error = "the command closed the shell's own input; a new bash was started"
            elif r.tag == run.nonce + b"-back":  # bash is back at its prompt after an interrupt
                run.exit_code = run.exit_code if run.reported else r.exit_code
                run.cwd, run.done = r.cwd or bash.cwd(), True

    def _begin_stop(self, run: _Running, status: ShellStatus) -> None:
        """Step 1: SIGINT to bash (its trap returns from the sourced file) and to every process of the command.

        Under job control bash drops the rest of its input line when a foreground job dies of SIGINT, so the
        driver's report may never come: a second line queued now reports when bash is back at its prompt."""
        run.status, run.step = status, 1
        run.step_deadline = time.monotonic() + self.kill_grace
        b = self._bash
        b.send(shell_driver.report(run.nonce + b"-back"))
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
            run.bash_gone = run.done = run.killed_bash = True

    def _finish_streams(self, run: _Running) -> None:
        """Take what the command wrote before it ended. A FIFO still held open by a background job is handed to a
        drain thread, so the job never blocks and its later output never reaches a later result."""
        lingering = []
        run.out.live = run.err.live = None
        for fd, capture in run.streams.items():
            while data := read_available(fd):
                capture.feed(data)
            if data is None:
                lingering.append(fd)
            else:
                os.close(fd)
        run.captures.finish()
        if lingering:
            self._bash.replace_fifos()
            for fd in lingering:
                try:
                    threading.Thread(target=_drain, args=(fd,), daemon=True, name="shellq-drain").start()
                except RuntimeError:  # no thread to be had (the pids limit): its writers get EPIPE instead
                    os.close(fd)

    # -- the bash process ----------------------------------------------------------------------------------------

    def _spawn(self) -> ShellProcess:
        """Start bash and wait until it answers; bumps `epoch`."""
        bash = ShellProcess(self._env, self._start_cwd, self._user)
        self.epoch += 1
        self._reports = ReportReader()
        bash.send(shell_driver.prelude(bash.rundir) + shell_driver.report(_READY))
        self._bash = bash
        run = self._new_running(_READY, time.monotonic() + 30, None)
        run.stoppable = False
        self._wait(run)
        if run.bash_gone or run.cwd is None:
            raise RuntimeError(f"bash did not start (status {bash.kill()})")
        self._last_cwd = run.cwd
        return bash

    def _respawn(self, run: _Running) -> None:
        """bash exited, was replaced or had to be replaced: reap it (and its session), record why, start a new one."""
        if not run.killed_bash:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._bash.proc.wait(timeout=0.2)  # `exit 3` is already on its way out; `exec sleep 60` is not
        code = self._bash.kill()
        if run.status == "completed" and not run.not_run:
            run.status = "shell_exited"
            if not run.reported:
                run.exit_code = None if run.killed_bash else code if code >= 0 else 128 - code
        self._bash = self._spawn()
        run.cwd = self._last_cwd  # the new bash's: where the next command starts (the old one's went with it)

    def _result(self, run: _Running, start: float) -> ShellResult:
        if run.cwd is not None:
            self._last_cwd = run.cwd
        epoch = self.epoch - 1 if run.bash_gone and not run.not_run else self.epoch
        return ShellResult(
            status=run.status,
            exit_code=run.exit_code,
            stdout=run.out.kept(),
            stderr=run.err.kept(),
            stdout_size=run.out.size,
            stderr_size=run.err.size,
            truncated=run.captures.truncated,
            spool_path=run.captures.spool_path,
            cwd=run.cwd or self._last_cwd,
            duration_ms=(time.monotonic() - start) * 1000,
            shell_epoch=epoch,
            error="; ".join(e for e in (run.error, run.captures.problem()) if e) or None,
        )


def _shell_env(extra: dict[str, str] | None, user: ShellUser | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _ENV_DROPPED and not k.startswith("SHELLQ_")}
    env.update(SHELL_ENV_DEFAULTS)
    env.update(user.env() if user else {})
    env.update(extra or {})
    return env


def _drain(fd: int) -> None:
    os.set_blocking(fd, True)
    try:
        while os.read(fd, 1 << 16):
            pass
    finally:
        os.close(fd)
