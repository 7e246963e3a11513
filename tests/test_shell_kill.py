"""Timeouts and interrupts stop the whole command and keep the shell; close() and a dead owner leave no process."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from shell_helpers import (
    assert_usable,
    gone,
    is_running,
    procs_with_arg,
    python_command,
    run_timed,
    unique_sleep,
    wait_until,
)

from worker.shell import Shell

REPO = Path(__file__).resolve().parents[1]


def python_ignoring(signals: str, tag: str) -> str:
    """A Python command that ignores `signals` (e.g. "SIGINT SIGTERM") and sleeps; `tag` is its argv[1]."""
    code = (
        "import signal, sys, time\n"
        f"for name in {signals.split()!r}:\n"
        "    signal.signal(getattr(signal, name), signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n"
    )
    return python_command(code, tag)


def run_python_script(code: str, *args: str) -> subprocess.Popen[bytes]:
    """Start `code` in a new Python process that can import the project; its stdout is a pipe."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, env=env, stdout=subprocess.PIPE)


def test_timeout_returns_at_once_with_status_timeout(shell: Shell) -> None:
    d = unique_sleep(31)
    r, elapsed = run_timed(shell, f"sleep {d}", timeout=0.5)
    assert r.status == "timeout"
    assert elapsed < 5
    assert wait_until(gone(d))
    assert_usable(shell)


def test_timeout_keeps_partial_output(shell: Shell) -> None:
    r, _ = run_timed(shell, f"echo before; echo err-before >&2; sleep {unique_sleep(32)}", timeout=0.5)
    assert r.status == "timeout"
    assert r.stdout == b"before\n"
    assert r.stderr.startswith(b"err-before\n")


@pytest.mark.parametrize("separator", ["; ", "\n", " && "])
def test_timeout_stops_the_rest_of_the_command(shell: Shell, tmp_path: Path, separator: str) -> None:
    marker = tmp_path / "after"
    r, _ = run_timed(shell, f"sleep {unique_sleep(33)}{separator}echo after; touch '{marker}'", timeout=0.5)
    assert r.status == "timeout"
    assert b"after" not in r.stdout
    time.sleep(1.0)
    assert not marker.exists()
    assert_usable(shell)
    assert not marker.exists()


def test_timeout_stops_a_loop_of_commands(shell: Shell) -> None:
    r, _ = run_timed(shell, f"for i in 1 2 3; do echo $i; sleep {unique_sleep(34)}; done; echo after", timeout=0.5)
    assert (r.status, r.stdout) == ("timeout", b"1\n")
    assert_usable(shell)


def test_timeout_keeps_exported_state_cwd_and_epoch(shell: Shell, tmp_path: Path) -> None:
    shell.run("export SHELLQ_T_KEPT=yes; plain=1", cwd=str(tmp_path))
    pid = shell.pid
    r, _ = run_timed(shell, f"sleep {unique_sleep(35)}", timeout=0.5)
    assert (r.status, r.shell_epoch, r.cwd) == ("timeout", 1, str(tmp_path))
    r = shell.run('echo "$SHELLQ_T_KEPT $plain $PWD"', timeout=30)
    assert (r.status, r.stdout, r.shell_epoch) == ("completed", f"yes 1 {tmp_path}\n".encode(), 1)
    assert (shell.epoch, shell.pid) == (1, pid)


@pytest.mark.parametrize("script", ["sleep {a} & echo $!; sleep {b}", "sleep {a} & echo $!; sleep {b} & wait"])
def test_timeout_kills_grandchildren(shell: Shell, script: str) -> None:
    a, b = unique_sleep(313), unique_sleep(314)
    r, _ = run_timed(shell, f"bash -c '{script.format(a=a, b=b)}'", timeout=1.0)
    assert r.status == "timeout"
    grandchild = int(r.stdout)
    assert wait_until(lambda: not is_running(grandchild))
    assert wait_until(gone(a, b))


def test_timeout_kills_background_jobs_the_command_started(shell: Shell) -> None:
    bg = unique_sleep(315)
    r, _ = run_timed(shell, f"sleep {bg} & sleep {unique_sleep(36)}", timeout=0.5)
    assert r.status == "timeout"
    assert wait_until(gone(bg))


def test_timeout_spares_background_jobs_of_earlier_commands(shell: Shell) -> None:
    earlier = unique_sleep(301)
    r = shell.run(f"sleep {earlier} &", timeout=30)
    assert (r.status, r.exit_code) == ("completed", 0)
    fg = unique_sleep(37)
    r, _ = run_timed(shell, f"sleep {fg}", timeout=0.5)
    assert r.status == "timeout"
    assert wait_until(gone(fg))
    time.sleep(0.5)
    assert procs_with_arg(earlier)
    assert_usable(shell)
    assert procs_with_arg(earlier)


def test_killed_command_leaves_no_messages_in_next_result(shell: Shell) -> None:
    r, _ = run_timed(shell, f"sleep {unique_sleep(316)} & sleep {unique_sleep(38)}", timeout=0.5)
    assert r.status == "timeout"
    assert_usable(shell)
    time.sleep(0.5)
    assert_usable(shell)


def test_timeout_stops_command_whose_shell_trap_ignores_sigint(shell: Shell) -> None:
    d = unique_sleep(39)
    r, elapsed = run_timed(shell, f'trap "" INT; sleep {d}', timeout=0.5)
    assert r.status == "timeout"
    assert elapsed < 15
    assert wait_until(gone(d))
    assert_usable(shell)


def test_user_sigint_trap_does_not_break_later_timeouts(shell: Shell) -> None:
    shell.run('trap "" INT', timeout=30)
    d = unique_sleep(40)
    r, elapsed = run_timed(shell, f"sleep {d}", timeout=0.5)
    assert r.status == "timeout"
    assert elapsed < 15
    assert wait_until(gone(d))
    assert_usable(shell)


@pytest.mark.parametrize("signals", ["SIGINT", "SIGINT SIGTERM"])
def test_timeout_escalates_past_ignored_signals(shell: Shell, signals: str) -> None:
    tag = f"shellq-test-ignore-{secrets.token_hex(4)}"
    r, elapsed = run_timed(shell, python_ignoring(signals, tag), timeout=1.0)
    assert r.status == "timeout"
    assert r.stdout == b"ready\n"
    assert elapsed < 20
    assert wait_until(gone(tag))
    assert_usable(shell)


def test_timeout_stops_builtin_busy_loop(shell: Shell) -> None:
    r, elapsed = run_timed(shell, "while :; do :; done", timeout=0.5)
    assert r.status == "timeout"
    assert elapsed < 20
    assert_usable(shell)


def test_interrupt_cancels_running_command_and_keeps_state(shell: Shell, tmp_path: Path) -> None:
    shell.run("export SHELLQ_T_KEPT=yes", cwd=str(tmp_path))
    d = unique_sleep(41)
    timer = threading.Timer(0.3, shell.interrupt)
    timer.start()
    try:
        r, elapsed = run_timed(shell, f"echo before; sleep {d}; echo after")
    finally:
        timer.cancel()
        timer.join()
    assert (r.status, r.stdout, r.shell_epoch) == ("cancelled", b"before\n", 1)
    assert elapsed < 5
    assert wait_until(gone(d))
    r = shell.run('echo "$SHELLQ_T_KEPT $PWD"', timeout=30)
    assert (r.status, r.stdout) == ("completed", f"yes {tmp_path}\n".encode())
    assert shell.epoch == 1


def test_interrupt_when_idle_does_nothing(shell: Shell) -> None:
    shell.interrupt()
    r = shell.run("sleep 0.2; echo ok", timeout=30)
    assert (r.status, r.exit_code, r.stdout) == ("completed", 0, b"ok\n")


def test_close_kills_bash_and_its_background_jobs(make_shell: Callable[..., Shell]) -> None:
    sh = make_shell()
    d = unique_sleep(302)
    job = int(sh.run(f"sleep {d} & echo $!", timeout=30).stdout)
    bash = sh.pid
    sh.close()
    assert wait_until(lambda: not is_running(bash) and not is_running(job))
    assert wait_until(gone(d))


SETSID_SCRIPT = """
import sys
from worker.shell import Shell

sh = Shell(work_dir=sys.argv[1], reap_orphans=True)
sh.run("setsid sleep " + sys.argv[2] + " &", timeout=30)
sh.run("sleep 0.3")
sh.close()
print("closed")
"""


def test_close_kills_background_job_that_left_the_session(tmp_path: Path) -> None:
    """A `setsid` job escapes bash's session; the shell's owner is a subreaper (as the worker is) and still finds it."""
    d = unique_sleep(305)
    with run_python_script(SETSID_SCRIPT, str(tmp_path), d) as script:
        try:
            out, _ = script.communicate(timeout=60)
        finally:
            script.kill()
    try:
        assert out == b"closed\n"
        assert wait_until(gone(d))
    finally:
        for pid in procs_with_arg(d):  # do not leave a 305 s sleep behind when this fails
            os.kill(pid, signal.SIGKILL)


def test_close_twice_is_harmless(make_shell: Callable[..., Shell]) -> None:
    sh = make_shell()
    sh.close()
    sh.close()


def test_context_manager_closes_the_shell(tmp_path: Path) -> None:
    d = unique_sleep(304)
    with Shell(work_dir=str(tmp_path)) as sh:
        sh.run(f"sleep {d} &", timeout=30)
        bash = sh.pid
    assert wait_until(lambda: not is_running(bash))
    assert wait_until(gone(d))


def test_shell_without_work_dir_runs_commands(make_shell: Callable[..., Shell]) -> None:
    sh = make_shell(work_dir=None)
    assert_usable(sh)


OWNER_SCRIPT = """
import sys, threading, time
from worker.shell import Shell

sh = Shell(work_dir=sys.argv[1])
sh.run(f"sleep {sys.argv[2]} &")
threading.Thread(target=sh.run, args=(f"sleep {sys.argv[3]}",), daemon=True).start()
print(sh.pid, flush=True)
time.sleep(120)
"""


def test_owner_killed_with_sigkill_takes_the_session_down(tmp_path: Path) -> None:
    bg, fg = unique_sleep(302), unique_sleep(303)
    with run_python_script(OWNER_SCRIPT, str(tmp_path), bg, fg) as owner:
        try:
            assert owner.stdout is not None
            bash = int(owner.stdout.readline())
            assert wait_until(lambda: procs_with_arg(bg) and procs_with_arg(fg), 10)
        finally:
            owner.kill()
    assert wait_until(lambda: gone(bg, fg)() and not is_running(bash), 10)


ZOMBIE_SCRIPT = """
import os, sys, time
from pathlib import Path
from worker.shell import Shell

def zombie_children():
    count = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            raw = stat.read_bytes()
        except OSError:
            continue
        fields = raw[raw.rindex(b")") + 2 :].split()
        count += fields[0] == b"Z" and int(fields[1]) == os.getpid()
    return count

with Shell(work_dir=sys.argv[1], reap_orphans=True) as sh:
    sh.run("for i in 1 2 3; do (sleep 0.2 &); done; sleep 1")
    for _ in range(3):
        time.sleep(0.5)
        sh.run("true")
    print(zombie_children())
"""


def test_reap_orphans_leaves_no_zombies(tmp_path: Path) -> None:
    with run_python_script(ZOMBIE_SCRIPT, str(tmp_path)) as script:
        try:
            out, _ = script.communicate(timeout=60)
        finally:
            script.kill()
    assert script.returncode == 0
    assert out == b"0\n"
