"""Kinds: the worker never dies of its shell's output or metadata; a timeout stops the command's own processes only.

Output bytes, paths that are not UTF-8, garbage and forged records on the report FIFO, and orphans reparented to the
worker while a command runs: each gets an honest result, and the next command gets its own.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import RedisServer
from shell_helpers import is_running, procs_with_arg, unique_sleep, wait_until

from producer import Client, ClientSettings
from worker import protocol, shell_driver
from worker.loop import Worker
from worker.shell import Shell

# -- metadata that is not UTF-8 -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "suffix"),
    [
        ("mkdir -p $'{tmp}/x-\\xff' && cd $'{tmp}/x-\\xff' && echo in", b"/x-\xff"),
        ("mkdir -p $'{tmp}/\\xc3(\\x80' && cd $'{tmp}/\\xc3(\\x80' && echo in", b"/\xc3(\x80"),
        ("cd '{tmp}'; PWD=$'/tmp/\\xff'; echo in", b""),
    ],
)
def test_cwd_that_is_not_utf8_reaches_the_producer(
    redis_server: RedisServer,
    start_worker: Callable[..., Worker],
    session_id: str,
    tmp_path: Path,
    command: str,
    suffix: bytes,
) -> None:
    """The issue's example killed the worker (UnicodeEncodeError on the cwd); the next command was answered
    `interrupted` by a restarted worker. Now: the wire keeps the exact bytes, the str view replaces."""
    start_worker(session_id)
    s = Client(settings=ClientSettings(redis_url=redis_server.url)).session(session_id)
    r = s.run(command.format(tmp=tmp_path), timeout=30)
    assert (r.status, r.exit_code, r.stdout) == ("completed", 0, "in\n")
    raw = redis_server.client().xrange(protocol.keys(session_id).res)[-1][1]
    assert raw[b"cwd"] == os.fsencode(tmp_path) + suffix
    assert r.cwd == (os.fsencode(tmp_path) + suffix).decode(errors="replace")
    nxt = s.run("echo next", timeout=30)
    assert (nxt.status, nxt.stdout, nxt.shell_epoch) == ("completed", "next\n", r.shell_epoch)


def test_shell_reports_a_non_utf8_cwd_exactly(shell: Shell, tmp_path: Path) -> None:
    r = shell.run(f"mkdir -p $'{tmp_path}/x-\\xff' && cd $'{tmp_path}/x-\\xff'", timeout=20)
    assert os.fsencode(r.cwd) == os.fsencode(tmp_path) + b"/x-\xff"


def test_env_value_and_cwd_option_that_are_not_utf8(shell: Shell, tmp_path: Path) -> None:
    odd = os.fsdecode(os.fsencode(tmp_path) + b"/d-\xfe")
    os.mkdir(odd)
    r = shell.run('printf %s "$V"; pwd', timeout=20, env={"V": os.fsdecode(b"v-\xfe")}, cwd=odd)
    assert r.stdout == b"v-\xfe" + os.fsencode(odd) + b"\n"


# -- the report FIFO ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [b"garbage", b"x y z\0", b"\0\0\0", b"abc 0 ok /\0", b"n 99999 ok /\0", b"n 0 maybe /\0", b"\xff" * 70000, b" "],
)
def test_report_reader_drops_malformed_records(garbage: bytes) -> None:
    reader = shell_driver.ReportReader()
    assert all(r.tag == b"abc" for r in reader.feed(garbage))
    good = reader.feed(b"\0tag 3 ok /tmp\0")
    assert good[-1] == shell_driver.Report(b"tag", 3, True, "/tmp")


@pytest.mark.parametrize(
    "write",
    [
        "printf 'garbage' >> {r}",
        "printf 'garbage\\0x y z\\0\\0 1 2 3 4\\0' >> {r}",
        "printf 'ffff 0 ok /\\0' >> {r}",
        "head -c 100000 /dev/urandom >> {r}",
        "printf 'no-nul-at-all %.0s' $(seq 3000) >> {r}",
    ],
)
def test_garbage_on_the_report_fifo(shell: Shell, tmp_path: Path, write: str) -> None:
    """Anything a command writes to the report FIFO (it can find it: same user) never makes a result answer the
    wrong command or raises: the command and the next one get their own results."""
    r = shell.run(  # its own run directory: other shells on this machine (other test runs) are not its to break
        f"cd '{tmp_path}'; r={shell._bash.rundir}/r; {write.format(r='$r')}; echo mine",
        timeout=20,
    )
    assert (r.status, r.exit_code, r.stdout) == ("completed", 0, b"mine\n")
    nxt = shell.run("echo next; pwd", timeout=20)
    assert (nxt.status, nxt.stdout) == ("completed", f"next\n{tmp_path}\n".encode())


def test_forged_early_report_does_not_reach_the_next_command(shell: Shell) -> None:
    """A command may lie about itself (it owns its shell): it reports itself done while it still runs. The next
    command still gets exactly its own output."""
    forge = (
        "n=$(alias __shellq_run | sed -n 's/.*__shellq_report \\([0-9a-f]*\\) .*/\\1/p'); "
        f"r={shell._bash.rundir}/r; "
        'printf "%s 0 ok /\\0" "$n" >> "$r"; sleep 1; echo late-output'
    )
    first = shell.run(forge, timeout=20)
    assert first.status == "completed"
    nxt = shell.run("echo mine", timeout=20)
    assert (nxt.status, nxt.exit_code, nxt.stdout) == ("completed", 0, b"mine\n")


def test_run_directory_removed_during_a_command(shell: Shell, tmp_path: Path) -> None:
    rundir = shell._bash.rundir  # its own: other shells on this machine (other test runs) are not its to break
    r = shell.run(f"cd '{tmp_path}'; export KEPT=1; rm -rf {rundir}; echo gone", timeout=20)
    assert (r.status, r.stdout) == ("completed", b"gone\n")
    nxt = shell.run('echo "$KEPT"; pwd', timeout=20)
    assert (nxt.status, nxt.stdout, nxt.shell_epoch) == ("completed", f"1\n{tmp_path}\n".encode(), r.shell_epoch)


def test_output_fifos_replaced_by_plain_files(shell: Shell) -> None:
    """A command that swaps the output FIFOs for plain files (the same user, in a local session) loses nothing: the
    worker sees they are not FIFOs and makes them again before the next command."""
    rundir = shell._bash.rundir
    swap = f"for f in {rundir}/o* {rundir}/e*; do rm -f $f; echo planted > $f; done; echo swapped"
    assert shell.run(swap, timeout=20).status == "completed"
    nxt = shell.run("echo mine; echo err >&2", timeout=20)
    assert (nxt.status, nxt.stdout, nxt.stderr) == ("completed", b"mine\n", b"err\n")


def test_command_file_replaced_by_a_symlink(shell: Shell, tmp_path: Path) -> None:
    """A symlink where the command file was (to a file of the user's, or to /dev/zero) is not written through or
    sourced: the next command's text goes to a new file of the worker's."""
    victim = tmp_path / "victim"
    victim.write_text("mine\n")
    rundir = shell._bash.rundir
    assert shell.run(f"rm -f {rundir}/c; ln -s {victim} {rundir}/c; echo done", timeout=20).stdout == b"done\n"
    nxt = shell.run("echo next", timeout=20)
    assert (nxt.status, nxt.stdout) == ("completed", b"next\n")
    assert victim.read_text() == "mine\n"


def test_stdin_link_pointed_elsewhere(shell: Shell, tmp_path: Path) -> None:
    """The link that gives each command /dev/null as stdin, pointed at a file: the next command reads nothing."""
    secret = tmp_path / "secret"
    secret.write_text("SECRET")
    assert shell.run(f"ln -sfn {secret} {shell._bash.rundir}/i; echo done", timeout=20).status == "completed"
    assert shell.run("cat; echo end", timeout=20).stdout == b"end\n"


def test_report_fifo_replaced_by_the_commands_own(shell: Shell) -> None:
    """A command that puts a FIFO of its own where the report FIFO was (bash then waits to open it for its report)
    is still answered at once as completed, not held until its timeout."""
    r = shell.run(f"rm -f {shell._bash.rundir}/r; mkfifo {shell._bash.rundir}/r; echo done", timeout=30)
    assert (r.status, r.exit_code, r.stdout) == ("completed", 0, b"done\n")
    assert shell.run("echo next", timeout=20).stdout == b"next\n"


def test_output_fifos_pointed_at_a_shared_fifo(shell: Shell, tmp_path: Path) -> None:
    """Symlinks from the output FIFOs to one FIFO elsewhere (which others could write to) are not read: stdout and
    stderr stay apart."""
    shared = tmp_path / "shared"
    os.mkfifo(shared)
    rundir = shell._bash.rundir
    assert shell.run(f"for f in {rundir}/o* {rundir}/e*; do ln -sfn {shared} $f; done", timeout=20).exit_code == 0
    nxt = shell.run("echo out; echo err >&2", timeout=20)
    assert (nxt.stdout, nxt.stderr) == (b"out\n", b"err\n")


# -- orphans reaped while a command runs --------------------------------------------------------------------------


def _zombie_children(session: int) -> int:
    """Zombie children of this process in the session `session` (another test's leftovers are not this one's)."""
    me, count = os.getpid(), 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_bytes()
            except OSError:
                continue
            fields = stat[stat.rindex(b")") + 2 :].split()
            if fields[0] == b"Z" and int(fields[1]) == me and int(fields[3]) == session:
                count += 1
    return count


def test_orphans_are_reaped_while_a_long_command_runs(make_shell: Callable[..., Shell]) -> None:
    """The issue's example left hundreds of zombies until the command ended; under a pids limit every later fork
    failed."""
    sh = make_shell(reap_orphans=True)
    seen: list[int] = []
    stop = threading.Event()
    session = sh.pid  # bash leads its own session, and its jobs' orphans stay in it

    def sample() -> None:
        while not stop.wait(0.1):
            seen.append(_zombie_children(session))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        r = sh.run("for i in $(seq 200); do (sleep 0.01 &); done; sleep 2", timeout=30)
    finally:
        stop.set()
        sampler.join()
    assert r.status == "completed"
    assert len(seen) > 10
    assert max(seen[-5:]) < 100, seen  # reaped while the command runs (all 200 stayed until its end before)


# -- a timeout stops the command's processes, not those of earlier jobs ---------------------------------------------


@pytest.mark.parametrize(
    "job",
    [
        "(sleep 1.5; sleep {s}) >/dev/null 2>&1 &",
        "nohup bash -c 'sleep 1.5; sleep {s}' >/dev/null 2>&1 &",
        "set +m; (sleep 1.5; sleep {s}) >/dev/null 2>&1 &",
        "bash -c 'while :; do sleep 0.5; done & sleep 1.5; exec sleep {s}' >/dev/null 2>&1 &",
        "set +m; sleep {s} >/dev/null 2>&1 &",
    ],
)
@pytest.mark.parametrize("stop", ["timeout", "interrupt"])
def test_earlier_jobs_survive_a_later_commands_timeout(make_shell: Callable[..., Shell], job: str, stop: str) -> None:
    """The issue's example: an earlier job's child born while a later command ran was killed by its timeout."""
    sh = make_shell(reap_orphans=True, kill_grace=0.5)
    s = unique_sleep(3986)
    sh.run(job.format(s=s), timeout=20)
    if stop == "timeout":
        r = sh.run("sleep 6", timeout=3)
    else:
        threading.Timer(3, sh.interrupt).start()
        r = sh.run("sleep 6", timeout=30)
    assert r.status == ("timeout" if stop == "timeout" else "cancelled")
    assert wait_until(lambda: bool(procs_with_arg(s)), 3), "the earlier job's child was killed"
    time.sleep(0.5)
    assert all(is_running(p) for p in procs_with_arg(s))


def test_the_commands_own_background_jobs_stop_with_it(make_shell: Callable[..., Shell]) -> None:
    sh = make_shell(reap_orphans=True, kill_grace=0.5)
    a, b = unique_sleep(3987), unique_sleep(3988)
    r = sh.run(f"sleep {a} & (sleep 0.5; sleep {b}) & sleep 6", timeout=2)
    assert r.status == "timeout"
    assert wait_until(lambda: not procs_with_arg(a) and not procs_with_arg(b), 5)
