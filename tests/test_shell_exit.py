"""Commands that end, replace, stop or rewire bash cannot break the session for good."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from shell_helpers import assert_usable, is_running, run_timed

from worker.shell import Shell


def assert_respawned(sh: Shell, old_pid: int, old_epoch: int) -> None:
    """The next command runs in a new bash, one epoch later, and the state of the old one is gone."""
    r = assert_usable(sh)
    assert r.shell_epoch == sh.epoch == old_epoch + 1
    assert sh.pid != old_pid
    assert not is_running(old_pid)
    r = sh.run('echo "[${SHELLQ_T_STATE-}]"', timeout=30)
    assert r.stdout == b"[]\n"


@pytest.mark.parametrize(("command", "exit_code"), [("exit", 0), ("exit 3", 3), ("kill -9 $$", 137)])
def test_shell_exit_is_reported_and_shell_respawned(shell: Shell, command: str, exit_code: int) -> None:
    shell.run("export SHELLQ_T_STATE=1")
    pid = shell.pid
    r, elapsed = run_timed(shell, command)
    assert (r.status, r.exit_code, r.shell_epoch) == ("shell_exited", exit_code, 1)
    assert elapsed < 10
    assert_respawned(shell, pid, 1)


# A program that replaced bash may be waited for (exit 0) or killed at once (137): the session is over either way.
@pytest.mark.parametrize(("command", "exit_codes"), [("exec true", {0}), ("exec sleep 1", {0, 137})])
def test_exec_replacing_bash_is_reported_and_shell_respawned(shell: Shell, command: str, exit_codes: set[int]) -> None:
    shell.run("export SHELLQ_T_STATE=1")
    pid = shell.pid
    r, elapsed = run_timed(shell, command)
    assert (r.status, r.shell_epoch) == ("shell_exited", 1)
    assert r.exit_code in exit_codes
    assert elapsed < 10
    assert_respawned(shell, pid, 1)


def test_exit_keeps_output_printed_before_it(shell: Shell) -> None:
    r = shell.run("echo bye; echo err >&2; exit 5")
    assert (r.status, r.exit_code, r.stdout, r.stderr) == ("shell_exited", 5, b"bye\n", b"err\n")


def test_epoch_increases_with_each_respawn(shell: Shell) -> None:
    assert shell.run("exit").shell_epoch == 1
    assert shell.run("true").shell_epoch == 2
    assert shell.run("exit 4").shell_epoch == 2
    assert shell.run("true").shell_epoch == 3
    assert shell.epoch == 3


def test_bash_killed_while_idle_is_respawned_for_next_command(shell: Shell) -> None:
    pid = shell.pid
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    r = assert_usable(shell)
    assert r.shell_epoch == shell.epoch == 2
    assert shell.pid != pid


def test_stopped_bash_does_not_hang(shell: Shell) -> None:
    r, elapsed = run_timed(shell, "kill -STOP $$", timeout=2)
    assert r.status in ("completed", "timeout", "shell_exited")
    assert elapsed < 20
    assert_usable(shell)


def test_set_e_then_failure_does_not_break_the_session(shell: Shell) -> None:
    r = shell.run("set -e; false", timeout=30)
    assert r.status in ("completed", "shell_exited")
    assert r.exit_code == 1
    assert_usable(shell)


def test_errexit_left_on_does_not_break_later_commands(shell: Shell, tmp_path: Path) -> None:
    shell.run("set -euo pipefail", timeout=30)
    r = shell.run("false", timeout=30)
    assert r.status in ("completed", "shell_exited")
    assert r.exit_code == 1
    assert_usable(shell)
    r = shell.run("pwd", env={"SHELLQ_T_X": "1"}, cwd=str(tmp_path), timeout=30)
    assert (r.status, r.exit_code, r.stdout) == ("completed", 0, f"{tmp_path}\n".encode())


def test_unbound_variable_under_set_u_does_not_break_the_session(shell: Shell) -> None:
    r = shell.run("set -u; echo $nope", timeout=30)
    assert r.status in ("completed", "shell_exited")
    assert r.exit_code != 0
    assert r.stdout == b""
    assert b"nope: unbound variable" in r.stderr
    assert_usable(shell)


def test_exec_redirecting_stdout_does_not_hide_later_output(shell: Shell, tmp_path: Path) -> None:
    r = shell.run(f"exec > '{tmp_path}/out.txt'; echo hidden", timeout=30)
    assert (r.status, r.exit_code, r.stdout) == ("completed", 0, b"")
    assert (tmp_path / "out.txt").read_bytes() == b"hidden\n"
    assert_usable(shell)


def test_exec_closing_stderr_does_not_break_capture(shell: Shell) -> None:
    r = shell.run("exec 2>&-", timeout=30)
    assert (r.status, r.exit_code) == ("completed", 0)
    r = shell.run("echo out; echo err >&2", timeout=30)
    assert (r.status, r.exit_code, r.stdout, r.stderr) == ("completed", 0, b"out\n", b"err\n")


def test_exec_closing_stdout_does_not_break_capture(shell: Shell) -> None:
    r = shell.run("exec >&-", timeout=30)
    assert (r.status, r.exit_code) == ("completed", 0)
    assert_usable(shell)
