"""`shellq attach S`: a prompt on a session's shell, for a person debugging an agent's session.

    shellq attach S [--timeout T]              each line typed runs in S, its output shown as it comes; its
                                               stdin is /dev/null (nothing typed reaches a running command);
                                               Ctrl-C interrupts it; Ctrl-D or `exit` leaves
    shellq attach S --read-only                submit nothing: print each result committed on S from now on

The commands go through the session's queue like any agent's (`Session.submit`, `Session.stream`): they share its
shell, its state and its order. A line ending with a backslash goes on on the next line (sent as typed: bash joins
it); other unfinished input (an open quote) is sent as it is, and bash says what is wrong with it. `exit` and
`logout` leave instead of being sent: sent, they would end the session's shell and reset its state. Line editing
and history come from readline; the history is kept in shellq's state dir (`attach_history`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import select
import sys
import termios
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

from producer import core
from producer.client import RUN_MARGIN, Client, ClientSettings, Session
from producer.result import Result
from worker import protocol
from worker.errors import ShellqError, WaitError
from worker.settings import state_dir

HISTORY_FILE = "attach_history"
"""The prompt's history, in shellq's state dir."""
HISTORY_LENGTH = 1000
INTERRUPT_WAIT = 10.0
"""Seconds to wait, after Ctrl-C, for the interrupted command's result."""
LEAVE = frozenset({"exit", "logout"})
"""Lines that leave the prompt instead of being sent: sent, they would end the session's shell (its state lost)."""


def add_attach_verb(verbs: Any) -> None:
    """`shellq attach`, on the `add_subparsers()` of the `shellq` parser."""
    attach = verbs.add_parser(
        "attach",
        help="an interactive prompt on a session's shell (for debugging)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    attach.add_argument("name", help="the session")
    attach.add_argument(
        "--read-only",
        action="store_true",
        help="submit nothing: print each result the session commits from now on (Ctrl-C or Ctrl-D leaves)",
    )
    attach.add_argument(
        "--timeout", type=float, help="each command's execution limit in seconds (default: the worker's)"
    )
    attach.set_defaults(handler=cmd_attach)


def cmd_attach(args: argparse.Namespace) -> int:
    """Prompt for commands and run them in the session (`Prompt`), or follow its results (`follow_results`)."""
    from producer.cli import CliError, redis_url  # not at the top: producer.cli imports this module

    name = protocol.check_id(args.name, "session id")
    if args.timeout is not None and args.timeout <= 0:
        raise CliError(f"--timeout wants a number of seconds above 0, got {args.timeout}")
    session = Client(settings=ClientSettings.from_env(redis_url=redis_url())).session(name)
    known, last = _look(session)
    if not known:
        raise CliError(f"no session {name} (`shellq session list` shows them)")
    if args.read_only:
        return follow_results(session)
    if not session.worker_alive():
        wait = session.client.settings.no_worker_after
        _say(f"no worker serves session {name} now: a command waits {wait:g} s for one, then is cancelled")
        _say(f"`shellq session start --name {name}` starts one")
    return Prompt(session, args.timeout, last.cwd if last else None).loop()


class Prompt:
    """Read a command, run it in the session showing its output as it comes, then prompt again."""

    def __init__(self, session: Session, timeout: float | None, cwd: str | None) -> None:
        self.session = session
        self.timeout = timeout
        self.cwd = cwd
        """The shell's directory after the last command seen (shown in the prompt)."""
        self.status = 0
        """The last command's exit status (shown in the prompt when it is not 0)."""
        self.settings = session.client.settings
        self.line_editing = False
        """Does readline edit the lines typed?"""

    def loop(self) -> int:
        with _history(state_dir() / HISTORY_FILE) as editing:
            self.line_editing = editing
            while (command := self.read()) is not None:
                if command.strip() in LEAVE:
                    break
                if command.strip():
                    self.execute(command)
        return 0

    def prompt(self) -> str:
        from producer.cli import _printable

        where = f":{_printable(self.cwd)}" if self.cwd else ""
        status = f" [{self.status}]" if self.status else ""
        return f"{self.session.id}{where}{status}$ "

    def read(self) -> str | None:
        """The next command (lines ending with a backslash go on); None at Ctrl-D. Ctrl-C drops what was typed."""
        lines: list[str] = []
        while True:
            try:
                lines.append(input("> " if lines else self.prompt()))
            except KeyboardInterrupt:  # like bash: the line is dropped, a new prompt comes
                Output().interrupted(echoed=not self.line_editing and _echoes_control_chars())
                lines = []
                continue
            except EOFError:
                print()
                return None
            if not _continued(lines[-1]):
                return "\n".join(lines)

    def execute(self, command: str) -> None:
        """Run one command; Ctrl-C interrupts it. Its failures, and shellq's, are one line: the prompt comes back."""
        cid = f"c-{secrets.token_hex(8)}"
        out = Output()
        try:
            try:
                self.session.submit(command, id=cid, timeout=self.timeout)
                out.follow(self.session, cid, (self.timeout or self.settings.default_timeout) + RUN_MARGIN)
            except KeyboardInterrupt:  # the command would go on in the session: stop it, show the rest
                out.interrupted(echoed=_echoes_control_chars())
                self.session.interrupt(cid)
                out.follow(self.session, cid, INTERRUPT_WAIT)
            out.line_start()
            self.note(self.session.result(cid))
        except KeyboardInterrupt:
            out.line_start()
            _say(f"not waiting for command {cid} any more (it was told to stop)")
        except WaitError as e:
            out.line_start()
            _say(str(e) if e.cancelled else f"{e} (command {cid}: it may have run)")
        except Exception as e:
            from producer.cli import explain

            out.line_start()
            _say(explain(e))

    def note(self, r: Result) -> None:
        """Take the prompt's directory and status from the result; say what a bare exit status does not."""
        self.cwd = r.cwd or self.cwd
        self.status = _exit_status(r)
        if r.status == "shell_exited":
            _say(f"the shell exited (status {r.exit_code}); a new one started: its state was reset")
        elif r.status != "completed":
            _say(f"command {r.id} {r.status}" + (f": {r.error}" if r.error else ""))
        elif r.error:
            _say(r.error)
        if r.truncated:
            _say(f"output truncated: all of it is in {r.spool_path} in the session")


class Output:
    """A command's output on fd 1 and 2: how much of each stream was shown, and whether the last byte ended a line."""

    def __init__(self) -> None:
        self.shown = {"stdout": 0, "stderr": 0}
        self.at_line_start = True

    def follow(self, session: Session, cid: str, timeout: float) -> None:
        """Print the command's output as it comes (`Session.stream`), past what was shown already, until its result
        is committed; a gap (bytes the live stream dropped, kept in the session's spool) is said."""
        for chunk in session.stream(cid, timeout=timeout, cancel=True):
            seen, end = self.shown[chunk.stream], chunk.offset + len(chunk.data)
            if end <= seen:
                continue
            if chunk.offset > seen:
                self.line_start()
                _say(f"[{chunk.offset - seen} bytes of {chunk.stream} not shown: see the spool]")
            self.write(1 if chunk.stream == "stdout" else 2, chunk.data[max(0, seen - chunk.offset) :])
            self.shown[chunk.stream] = end

    def write(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if data:
            self.at_line_start = data.endswith(b"\n")

    def line_start(self) -> None:
        """End the output's last line, so that what follows (a note, the prompt) starts a line of its own."""
        if not self.at_line_start:
            self.write(1, b"\n")

    def interrupted(self, echoed: bool) -> None:
        """Show a Ctrl-C (unless the terminal `echoed` it) and end the line."""
        if not echoed:
            self.write(2, b"^C")
        self.at_line_start = False
        self.line_start()


def follow_results(session: Session) -> int:
    """--read-only: print each result the session commits from now on, with the command it answers (XREAD BLOCK on
    its result stream, in slices of a second: `history.wait_new_results`), until Ctrl-C or Ctrl-D."""
    from producer import history
    from producer.cli import explain

    after = core.tail_id(session.client.send(core.tail_call(session.keys))[0])
    _say(f"following session {session.id}'s results, submitting nothing; Ctrl-C or Ctrl-D leaves")
    out = Output()
    try:
        while not _input_ended():
            try:
                results, after = history.wait_new_results(session, after)
                for r in results:
                    _show_result(session, Result.from_wire(r), out)
            except (ShellqError, redis.RedisError) as e:  # Redis away: say it, and keep following once it is back
                _say(explain(e))
    except KeyboardInterrupt:
        out.interrupted(echoed=_echoes_control_chars())
    return 0


def _show_result(session: Session, r: Result, out: Output) -> None:
    """One result: a line with its command id, status, exit code and command (XRANGE on the command stream), then
    its output."""
    from producer import history
    from producer.cli import _printable

    req = history.request_of(session, r.entry_id) if protocol.is_entry_id(r.entry_id) else None
    exit_code = "" if r.exit_code is None else f", exit {r.exit_code}"
    what = _printable(history.describe(req))
    out.write(1, f"[{_printable(r.id)}] {r.status}{exit_code}, {r.duration_ms:.0f} ms: {what}\n".encode())
    if req is None or req.op == "exec":  # a file operation's output is the file's bytes: not for the terminal
        for fd, data in ((1, r.stdout_bytes), (2, r.stderr_bytes)):
            out.write(fd, data)
            out.line_start()
    if r.error:
        _say(r.error)
    if r.truncated:
        _say(f"output truncated: all of it is in {r.spool_path} in the session")


def _look(session: Session) -> tuple[bool, Result | None]:
    """Does the session exist (EXISTS on its keys), and its newest result if it can be read (XREVRANGE)?"""
    keys = session.keys
    exists, tail = session.client.send(("EXISTS", keys.meta, keys.cmd, keys.res), core.tail_call(keys))
    entries = protocol.stream_entries([(keys.res.encode(), tail)])
    try:
        last = Result.from_wire(protocol.decode(protocol.CommandResult, entries[0][1])) if entries else None
    except protocol.DecodeError:
        last = None
    return bool(exists), last


@contextlib.contextmanager
def _history(path: Path) -> Iterator[bool]:
    """Line editing and history through the readline module when there is one (yields whether there is); the
    history kept in `path`."""
    try:
        import readline
    except ImportError:
        yield False
        return
    readline.set_completer(lambda text, state: None)  # the files here are not the session's: complete nothing
    readline.set_history_length(HISTORY_LENGTH)
    with contextlib.suppress(OSError):
        readline.read_history_file(path)
    before = readline.get_current_history_length()
    try:
        yield True
    finally:
        with contextlib.suppress(OSError):  # appended, not rewritten: two prompts at once keep both their lines
            path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))  # commands may hold secrets: the user's only
            readline.append_history_file(readline.get_current_history_length() - before, path)


def _continued(line: str) -> bool:
    """Does the line end with a backslash that escapes its newline (an odd number of them)?"""
    return (len(line) - len(line.rstrip("\\"))) % 2 == 1


def _exit_status(r: Result) -> int:
    """The status the prompt shows, as `shellq exec` would exit."""
    from producer.cli import EXIT_CANCELLED, EXIT_SHELLQ, EXIT_TIMEOUT

    if r.status in ("completed", "shell_exited") and r.exit_code is not None:
        return r.exit_code
    return {"timeout": EXIT_TIMEOUT, "cancelled": EXIT_CANCELLED}.get(r.status, EXIT_SHELLQ)


def _input_ended() -> bool:
    """--read-only: was Ctrl-D typed at the terminal (stdin readable and at its end)? Lines typed are dropped."""
    if not sys.stdin.isatty() or not select.select([sys.stdin], [], [], 0)[0]:
        return False
    if not os.read(sys.stdin.fileno(), 4096):
        return True
    _say("read-only: nothing typed is sent (Ctrl-C or Ctrl-D leaves)")
    return False


def _echoes_control_chars() -> bool:
    """Does the terminal on stdin show a Ctrl-C as `^C` itself (ECHOCTL)?"""
    try:
        return bool(termios.tcgetattr(sys.stdin.fileno())[3] & termios.ECHOCTL)
    except (termios.error, OSError, ValueError):
        return False


def _say(line: str) -> None:
    print(f"shellq: {line}", file=sys.stderr, flush=True)


if __name__ == "__main__":  # until producer/cli.py adds the verb: python -m producer.attach S [--read-only]
    from producer.cli import _guarded

    parser = argparse.ArgumentParser(prog="shellq")
    add_attach_verb(parser.add_subparsers(required=True, metavar="VERB"))
    parsed = parser.parse_args(["attach", *sys.argv[1:]])
    sys.exit(_guarded(lambda: cmd_attach(parsed), failure=1))
