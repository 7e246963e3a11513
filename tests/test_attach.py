"""`shellq attach`, driven through a real pty (pexpect) as a person would, against a private `shellq up` server."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pexpect
import pytest
from helpers import ROOT, Cli, free_port

SHELLQ = Path(sys.executable).parent / "shellq"
ATTACH = [str(Path(sys.executable).parent / "shellq"), "attach"]
"""`shellq attach`, run as the module until the verb is wired into producer/cli.py."""

Spawn = Callable[..., pexpect.spawn]


@pytest.fixture
def session(cli_session: str) -> str:
    return cli_session


@pytest.fixture
def attach(cli: Cli) -> Iterator[Spawn]:
    """Start `shellq attach ARGS...` on a pty of its own (a dumb terminal, 200 columns: no escape sequences)."""
    children: list[pexpect.spawn] = []

    def spawn(*args: str) -> pexpect.spawn:
        env = {**cli.env, "TERM": "dumb", "INPUTRC": "/dev/null"}
        child = pexpect.spawn(
            ATTACH[0],
            [*ATTACH[1:], *args],
            env=env,
            cwd=str(ROOT),
            timeout=30,
            dimensions=(24, 200),
            encoding="utf-8",
            codec_errors="replace",
        )
        children.append(child)
        return child

    yield spawn
    for child in children:
        child.close(force=True)


def prompt(session: str, cwd: str | None = None, status: int = 0) -> str:
    """The prompt as a regex, at the start of a line: `S:/tmp$ `, `S:/tmp [1]$ ` (cwd None: any, or none yet)."""
    where = r"(?::[^\r\n[]*)?" if cwd is None else re.escape(f":{cwd}")
    return rf"\n{re.escape(session)}{where}{re.escape(f' [{status}]' if status else '')}\$ "


def output(line: str) -> str:
    """A line of output as a regex (a whole line: not the echo of the command that prints it)."""
    return rf"\r\n{re.escape(line)}(?=\r\n)"


def leave(child: pexpect.spawn) -> int:
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus is not None
    return child.exitstatus


def test_lines_run_in_the_sessions_shell_and_the_prompt_follows_it(cli: Cli, session: str, attach: Spawn) -> None:
    child = attach(session)
    child.expect(prompt(session))
    child.sendline("cd /tmp")
    child.expect(prompt(session, "/tmp"))
    child.sendline("pwd")
    child.expect(output("/tmp"))
    child.expect(prompt(session, "/tmp"))
    child.sendline("export X=7")
    child.expect(prompt(session, "/tmp"))
    child.sendline("echo $X")
    child.expect(output("7"))
    assert cli("exec", session, "--", "echo $X").stdout == b"7\n"  # the session's own shell, not a copy
    child.sendline("false")
    child.expect(prompt(session, "/tmp", 1))
    child.sendline("printf 'no newline'")
    child.expect(output("no newline"))  # the prompt starts a line of its own
    child.expect(prompt(session, "/tmp"))
    child.sendeof()
    assert leave(child) == 0


def test_output_is_shown_as_it_comes_and_ctrl_c_interrupts_the_command(cli: Cli, session: str, attach: Spawn) -> None:
    child = attach(session)
    child.expect(prompt(session))
    child.sendline("echo start; sleep 30; echo never")
    child.expect(output("start"))  # while the command still sleeps
    child.sendintr()
    child.expect("cancelled")
    child.expect(prompt(session, status=130))
    assert "never" not in child.before
    child.sendline("echo after")
    child.expect(output("after"))
    child.expect(prompt(session))
    assert cli("exec", session, "--", "echo fine").stdout == b"fine\n"
    child.sendline("exit")  # leaves; the session's shell goes on
    assert leave(child) == 0
    assert cli("exec", session, "--", "echo still").stdout == b"still\n"


def test_ctrl_c_at_the_prompt_drops_the_line(session: str, attach: Spawn) -> None:
    child = attach(session)
    child.expect(prompt(session))
    child.send("echo dropped")
    child.expect("echo dropped")  # readline has it
    child.sendintr()
    child.expect(prompt(session))
    child.sendline("echo kept")
    child.expect(output("kept"))
    assert "dropped\r\n" not in child.before.replace("echo dropped", "")
    child.expect(prompt(session))
    child.sendeof()
    assert leave(child) == 0


def test_a_trailing_backslash_continues_the_command(session: str, attach: Spawn) -> None:
    child = attach(session)
    child.expect(prompt(session))
    child.sendline("echo one \\")
    child.expect("> ")
    child.sendline("two")
    child.expect(output("one two"))
    child.expect(prompt(session))


def test_history_is_kept_between_attaches(cli: Cli, session: str, attach: Spawn) -> None:
    first = attach(session)
    first.expect(prompt(session))
    first.sendline("echo remembered-$((6 * 7))")
    first.expect(output("remembered-42"))
    first.expect(prompt(session))
    first.sendeof()
    assert leave(first) == 0
    assert "echo remembered-$((6 * 7))" in (cli.home / "attach_history").read_text()
    second = attach(session)
    second.expect(prompt(session))
    second.sendcontrol("p")  # previous line
    second.sendline("")
    second.expect(output("remembered-42"))


def test_read_only_prints_results_of_commands_submitted_elsewhere(cli: Cli, session: str, attach: Spawn) -> None:
    child = attach(session, "--read-only")
    child.expect("submitting nothing")
    assert cli("exec", session, "--", "echo hi; (exit 3)").returncode == 3
    child.expect(re.escape("completed, exit 3"))
    child.expect(re.escape("echo hi; (exit 3)"))
    child.expect(output("hi"))
    child.sendintr()
    assert leave(child) == 0


def test_read_only_leaves_on_ctrl_d(session: str, attach: Spawn) -> None:
    child = attach(session, "--read-only")
    child.expect("submitting nothing")
    child.sendeof()
    assert leave(child) == 0


def test_no_worker_is_said_and_the_prompt_comes_back(cli: Cli, session: str, attach: Spawn) -> None:
    assert cli("session", "stop", session, "--keep").returncode == 0
    child = attach(session)
    child.expect("no worker serves session")
    child.expect(prompt(session))
    child.sendline("echo lost")
    child.expect("shellq: .*no worker")
    child.expect(prompt(session))
    child.sendeof()
    assert leave(child) == 0


def test_an_unknown_session_or_no_redis_exits_1(cli: Cli) -> None:
    unknown = subprocess.run([*ATTACH, "nosuch"], env=cli.env, capture_output=True, timeout=60, check=False)
    assert unknown.returncode == 1
    assert unknown.stderr.splitlines()[-1] == b"shellq: no session nosuch (`shellq session list` shows them)"
    env = {**cli.env, "SHELLQ_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "SHELLQ_RETRY_FOR": "0"}
    away = subprocess.run([*ATTACH, "s1"], env=env, capture_output=True, timeout=60, check=False)
    assert away.returncode == 1
    assert away.stderr.startswith(b"shellq: cannot reach Redis") and b"Traceback" not in away.stderr
