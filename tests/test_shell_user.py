"""A shell run as an unprivileged user (`Shell(user=...)`, `SHELLQ_SHELL_USER`): its commands cannot read the
worker's secrets or signal the worker, and everything the shell does keeps working as that user."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import ROOT, RedisServer, wait_for
from shell_helpers import assert_ok, gone, procs_with_arg, unique_sleep, wait_until

from worker import protocol
from worker.errors import ConfigError
from worker.loop import Worker
from worker.settings import WorkerSettings
from worker.shell import Shell
from worker.shell_process import ShellUser

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="running the shell as another user needs root")

NOBODY = pwd.getpwnam("nobody")
MakeShell = Callable[..., Shell]


@pytest.fixture
def nobody(make_shell: MakeShell) -> Shell:
    return make_shell(user="nobody", kill_grace=0.5)


@pytest.fixture
def root_secret() -> Iterator[Path]:
    """A file only root may read, in a directory everyone may enter."""
    fd, name = tempfile.mkstemp(prefix="shellq-test-secret-")
    os.write(fd, b"root-only-secret\n")
    os.close(fd)
    yield Path(name)
    os.unlink(name)


def run(sh: Shell, command: str, timeout: float = 60) -> tuple[int | None, str, str]:
    r = sh.run(command, timeout=timeout)
    assert r.status == "completed"
    return r.exit_code, r.stdout.decode(), r.stderr.decode()


# -- who the commands run as ----------------------------------------------------------------------------------------


def test_commands_run_as_the_user_with_its_own_groups_home_and_name(nobody: Shell) -> None:
    r = nobody.run('id -u; id -g; id -G; echo "$HOME $USER $LOGNAME"; pwd', timeout=60)
    uid, gid = NOBODY.pw_uid, NOBODY.pw_gid
    groups = " ".join(map(str, os.getgrouplist("nobody", gid)))
    assert_ok(r, f"{uid}\n{gid}\n{groups}\n{NOBODY.pw_dir} nobody nobody\n/\n".encode())
    assert "0" not in groups.split()


def test_a_user_with_no_usable_home_starts_in_the_root_directory_an_explicit_cwd_wins(make_shell: MakeShell) -> None:
    """nobody's home (/nonexistent) does not exist; the session directory is root's (0700), never the start."""
    assert run(make_shell(user="nobody"), "pwd") == (0, "/\n", "")
    assert run(make_shell(user="nobody", cwd="/tmp"), "pwd") == (0, "/tmp\n", "")


def test_a_user_starts_in_its_home_when_it_may_enter_it(tmp_path: Path) -> None:
    home = Path(tempfile.mkdtemp(prefix="shellq-test-home-"))
    try:
        user = ShellUser("nobody", NOBODY.pw_uid, NOBODY.pw_gid, (NOBODY.pw_gid,), str(home))
        assert user.start_dir() == "/"  # mkdtemp: 0700 root
        os.chown(home, NOBODY.pw_uid, NOBODY.pw_gid)
        assert user.start_dir() == str(home)
        assert ShellUser("nobody", NOBODY.pw_uid, NOBODY.pw_gid, (), str(tmp_path)).start_dir() == "/"
    finally:
        home.rmdir()


def test_a_uid_with_no_passwd_entry_gets_its_own_gid_no_groups_and_home_slash(make_shell: MakeShell) -> None:
    uid = 4_000_123
    with pytest.raises(KeyError):
        pwd.getpwuid(uid)
    r = make_shell(user=str(uid)).run('id -u; id -g; id -G; echo "$HOME"; pwd', timeout=60)
    assert_ok(r, f"{uid}\n{uid}\n{uid}\n/\n/\n".encode())


def test_the_workers_own_user_changes_nothing(make_shell: MakeShell, tmp_path: Path) -> None:
    sh = make_shell(user="root")
    assert run(sh, "id -u; pwd") == (0, f"0\n{sh.work_dir}\n", "")


# -- what the user cannot do ----------------------------------------------------------------------------------------


def test_a_root_only_file_cannot_be_read(nobody: Shell, root_secret: Path) -> None:
    code, out, err = run(nobody, f"cat {root_secret}")
    assert (code, out) == (1, "")
    assert "Permission denied" in err


def test_the_workers_environment_and_memory_cannot_be_read(nobody: Shell) -> None:
    code, out, err = run(nobody, f"cat /proc/{os.getpid()}/environ; cat /proc/{os.getpid()}/mem")
    assert (code, out, err.count("Permission denied")) == (1, "", 2)


def test_the_worker_and_the_guard_cannot_be_killed(nobody: Shell) -> None:
    guard = nobody._bash.guard_pid
    code, _, err = run(nobody, f"kill -9 {os.getpid()}; kill -9 {guard}")
    assert code == 1
    assert err.count("Operation not permitted") == 2
    assert os.path.exists(f"/proc/{guard}")
    assert run(nobody, "echo alive") == (0, "alive\n", "")


def test_removing_the_shells_own_files_fails_and_the_session_goes_on(nobody: Shell) -> None:
    """The run directory is root's: the shell uses its files but cannot remove or replace them (the worker, root,
    never follows a path the shell chose)."""
    rundir = nobody._bash.rundir
    run(nobody, "export KEPT=yes")
    code, _, err = run(nobody, f"rm -rf {rundir}/* {rundir}; ln -s /etc/passwd {rundir}/x")
    assert code == 1
    assert "Permission denied" in err
    r = nobody.run("echo $KEPT; echo err >&2", timeout=60)
    assert (r.status, r.exit_code, r.stdout, r.stderr, r.shell_epoch) == ("completed", 0, b"yes\n", b"err\n", 1)


# -- everything the shell does, as that user ------------------------------------------------------------------------


def test_state_persists_between_commands(nobody: Shell) -> None:
    assert run(nobody, "cd /tmp; export X=1; f() { echo from-f; }") == (0, "", "")
    r = nobody.run('echo "$X"; pwd; f; (exit 7)', timeout=60)
    assert (r.status, r.exit_code, r.stdout, r.cwd) == ("completed", 7, b"1\n/tmp\nfrom-f\n", "/tmp")


def test_a_timeout_stops_the_users_command_and_the_shell_goes_on(nobody: Shell) -> None:
    stubborn = unique_sleep(100)
    r = nobody.run(f"(trap '' INT TERM; exec sleep {stubborn})", timeout=1)
    assert (r.status, r.shell_epoch) == ("timeout", 1)
    assert wait_until(gone(stubborn))
    assert run(nobody, "id -u") == (0, f"{NOBODY.pw_uid}\n", "")


def test_an_interrupt_stops_the_users_command(nobody: Shell) -> None:
    threading.Timer(0.5, nobody.interrupt).start()
    r = nobody.run("sleep 30; echo not-reached", timeout=60)
    assert (r.status, r.stdout, r.shell_epoch) == ("cancelled", b"", 1)
    assert run(nobody, "echo next") == (0, "next\n", "")


def test_a_background_job_runs_as_the_user_and_outlives_its_command(nobody: Shell) -> None:
    job = unique_sleep(30)
    code, out, _ = run(nobody, f"sleep {job} & echo $!", timeout=10)
    pid = int(out)
    assert code == 0
    (uid_line,) = [line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Uid:")]
    assert uid_line.split()[1:] == [str(NOBODY.pw_uid)] * 4
    assert run(nobody, f"kill -0 {pid} && echo alive; kill %1") == (0, "alive\n", "")
    assert wait_until(gone(job))


def test_exit_replaces_the_bash_with_one_run_as_the_same_user(nobody: Shell) -> None:
    r = nobody.run("exit 3", timeout=60)
    assert (r.status, r.exit_code, r.shell_epoch) == ("shell_exited", 3, 1)
    r = nobody.run("id -u", timeout=60)
    assert (r.status, r.stdout, r.shell_epoch) == ("completed", f"{NOBODY.pw_uid}\n".encode(), 2)


def test_a_bash_that_cannot_run_the_driver_is_replaced(nobody: Shell) -> None:
    """`set -n`: the worker sees bash back at its prompt with no report (/proc/PID/syscall of the user's bash)."""
    nobody.run("set -n", timeout=60)
    r = nobody.run("id -u", timeout=60)
    assert (r.status, r.stdout, r.shell_epoch) == ("completed", f"{NOBODY.pw_uid}\n".encode(), 2)


def test_megabytes_of_output_arrive_byte_exact_and_past_the_cap_are_spooled(make_shell: MakeShell) -> None:
    expected = "".join(f"{i}\n" for i in range(1, 500_001)).encode()
    big = make_shell(user="nobody", output_cap=8 << 20)
    r = big.run("seq 1 500000; head -c 3000000 /dev/zero >&2", timeout=60)
    assert (r.status, r.exit_code, r.truncated) == ("completed", 0, False)
    assert (r.stdout, r.stderr) == (expected, bytes(3_000_000))
    capped = make_shell(user="nobody")
    r = capped.run("seq 1 500000", timeout=60)
    assert (r.truncated, r.stdout_size, r.spool_path is not None) == (True, len(expected), True)
    assert r.spool_path is not None
    assert (Path(r.spool_path) / "stdout").read_bytes() == expected


def test_orphans_of_the_users_commands_are_reaped(make_shell: MakeShell) -> None:
    sh = make_shell(user="nobody", reap_orphans=True)
    orphan = unique_sleep(30)
    assert run(sh, f"(sleep {orphan} &) ; echo started") == (0, "started\n", "")
    assert procs_with_arg(orphan)
    sh.close()
    assert wait_until(gone(orphan))


# -- configuration --------------------------------------------------------------------------------------------------


def test_an_unknown_user_is_a_config_error_naming_it() -> None:
    with pytest.raises(ConfigError, match="SHELLQ_SHELL_USER=no-such-user-xyz: no such user"):
        Shell(user="no-such-user-xyz")


def test_the_setting_is_read_from_the_environment(caplog: pytest.LogCaptureFixture) -> None:
    settings = WorkerSettings.from_env({"SHELLQ_SESSION": "s", "SHELLQ_SHELL_USER": "nobody"})
    assert settings.shell_user == "nobody"
    assert "unknown setting" not in caplog.text


def test_an_unknown_user_stops_the_worker_with_its_config_exit_code(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "SHELLQ_SESSION": "s1", "SHELLQ_SHELL_USER": "no-such-user-xyz"}
    env |= {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}  # inside a container, where the worker's packages are
    env |= {"SHELLQ_REDIS_URL": "redis://127.0.0.1:9", "SHELLQ_WORK_DIR": str(tmp_path / "work")}
    command = [sys.executable, "-m", "worker"]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert "SHELLQ_SHELL_USER=no-such-user-xyz: no such user" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_worker_that_is_not_root_may_only_name_its_own_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: NOBODY.pw_uid)
    with pytest.raises(ConfigError, match=r"^SHELLQ_SHELL_USER=root needs a worker running as root$"):
        Shell(user="root")
    assert ShellUser.resolve("nobody") is None
    assert ShellUser.resolve(str(NOBODY.pw_uid)) is None


def test_a_worker_runs_its_commands_as_the_shell_user(
    redis_server: RedisServer, start_worker: Callable[..., Worker], session_id: str
) -> None:
    start_worker(session_id, shell_user="nobody")
    keys, client = protocol.keys(session_id), redis_server.client()
    client.xadd(keys.cmd, {"cmd": "id -u; cat /proc/1/environ"})
    wait_for(lambda: client.xlen(keys.res) >= 1)
    ((_, fields),) = client.xrange(keys.res)
    assert (fields[b"status"], fields[b"stdout"]) == (b"completed", f"{NOBODY.pw_uid}\n".encode())
    assert b"Permission denied" in fields[b"stderr"]


# -- paths another user planted --------------------------------------------------------------------------------------


def test_a_run_directory_replaced_by_another_users_symlink_is_not_followed(nobody: Shell, tmp_path: Path) -> None:
    """Root deletes the shell's run directory (`rm -rf /dev/shm/*` in a root session) and the shell user plants a
    symlink at its path: the worker must not make its files (or chown them) wherever that points."""
    target = tmp_path / "target"
    target.mkdir()
    (target / "c").write_text("kept")
    rundir = nobody._bash.rundir
    shutil.rmtree(rundir)
    rundir.symlink_to(target)
    os.lchown(rundir, NOBODY.pw_uid, NOBODY.pw_gid)
    with pytest.raises(OSError, match="replaced by another user's file"):
        nobody.run("echo hi", timeout=10)  # the worker answers it `interrupted` and starts a new bash
    assert [(p.name, p.read_text(), p.stat().st_uid) for p in target.iterdir()] == [("c", "kept", 0)]


@pytest.mark.parametrize("planted", ["symlink", "another user's", "world-writable"])
def test_a_session_directory_another_user_could_have_planted_is_refused(
    make_shell: MakeShell, tmp_path: Path, planted: str
) -> None:
    work = tmp_path / "work"
    if planted == "symlink":
        (tmp_path / "elsewhere").mkdir()
        work.symlink_to(tmp_path / "elsewhere")
    else:
        work.mkdir()
        if planted == "another user's":
            os.chown(work, NOBODY.pw_uid, NOBODY.pw_gid)
        else:
            work.chmod(0o777)
    with pytest.raises(ConfigError, match="not a private directory"):
        make_shell(work_dir=str(work), user="nobody")


def test_the_spool_is_the_shell_users_to_read_and_nobody_elses(make_shell: MakeShell) -> None:
    base = Path(tempfile.mkdtemp(prefix="shellq-test-", dir="/tmp"))  # open above, as /tmp is (tmp_path is 0700)
    base.chmod(0o755)
    sh = make_shell(work_dir=str(base / "work"), user="nobody", output_cap=1024)
    r = sh.run("head -c 5000 /dev/zero | tr '\\0' y", timeout=20)
    assert r.truncated and r.spool_path is not None
    own = sh.run(f"wc -c < {r.spool_path}/stdout", timeout=20)
    assert own.stdout == b"5000\n", own.stderr
    modes = {p: stat.S_IMODE(os.stat(p).st_mode) for p in (base / "work", Path(r.spool_path))}
    sh.close()
    shutil.rmtree(base)
    assert all(mode & 0o007 == 0 for mode in modes.values()), modes  # others: nothing


def test_kill_user_ends_a_fork_loop_of_another_uid() -> None:
    """What the worker does when the shell user's processes hold the pids limit: SIGKILL every process of that
    uid, looking again until none is left, also while they fork. (A uid no one else uses: 54321.)"""
    import subprocess
    import time

    from worker import procs

    uid = 54321
    assert not procs.user_procs(uid)
    loop = subprocess.Popen(
        ["sh", "-c", "while :; do sleep 1000 & done"],
        user=uid,
        group=uid,
        extra_groups=[],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.3)
    assert procs.kill_user(uid) > 1
    loop.wait(timeout=10)
    assert not procs.user_procs(uid)
    with pytest.raises(ValueError):
        procs.kill_user(os.geteuid())
