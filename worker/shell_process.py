"""The bash process behind a `Shell`: its private run directory (command file, report and output FIFOs), its
command pipe, its guard, the user it runs as, and the facts the worker reads about it from /proc."""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import os
import platform
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import termios
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from worker import procs, shell_driver
from worker.errors import ConfigError

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

_READ_SYSCALL = {"x86_64": 0, "aarch64": 63, "arm64": 63}.get(platform.machine())
"""The number of read(2) in /proc/PID/syscall on this machine (None: the prompt check is off)."""


def _run_dir() -> Path:
    """A private directory on tmpfs when there is one (per-command files are cheap there), with a path the driver
    can use unquoted."""
    for base in ("/dev/shm", tempfile.gettempdir(), "/tmp"):
        if os.path.isdir(base) and os.access(base, os.W_OK) and shell_driver.is_safe_path(base):
            return Path(tempfile.mkdtemp(prefix="shellq-", dir=base))
    raise OSError(f"no writable directory with a plain path for the shell's files (tried /dev/shm, {base})")


@dataclass(frozen=True, slots=True)
class ShellUser:
    """The user bash runs as when that is not the worker's own (`SHELLQ_SHELL_USER`)."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    """Its supplementary groups from the group database; none of the worker's are kept."""
    home: str

    @classmethod
    def resolve(cls, spec: str | None, what: str = "SHELLQ_SHELL_USER") -> ShellUser | None:
        """A user name or numeric uid; None when unset or the worker's own uid. A uid with no passwd entry gets gid
        = uid, no other groups and HOME=/. Raises ConfigError for an unknown name, or a non-root worker (the
        message names the setting, `what`)."""
        if not spec:
            return None
        try:
            entry: pwd.struct_passwd | None = pwd.getpwuid(int(spec)) if spec.isdecimal() else pwd.getpwnam(spec)
        except KeyError:
            if not spec.isdecimal():
                raise ConfigError(f"{what}={spec}: no such user") from None
            entry = None
        uid = int(spec) if entry is None else entry.pw_uid
        if uid >= 0xFFFFFFFF:
            raise ConfigError(f"{what}={spec}: not a valid uid")
        if uid == os.geteuid():
            return None
        if os.geteuid() != 0:
            raise ConfigError(f"{what}={spec} needs a worker running as root")
        if entry is None:
            return cls(spec, uid, uid, (), "/")
        groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
        return cls(entry.pw_name, uid, entry.pw_gid, groups, entry.pw_dir or "/")

    def env(self) -> dict[str, str]:
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name}

    def start_dir(self) -> str:
        """Its home when the mode bits let it list the home and search every directory above, else `/`."""
        home = Path(self.home)
        steps = [(home, 0o5), *((parent, 0o1) for parent in home.parents)]
        return self.home if home.is_absolute() and all(self._may(d, bits) for d, bits in steps) else "/"

    def may_run(self, program: str) -> bool:
        """Can this user execute `program` (every directory on its real path searchable, the file executable)?"""
        real = Path(os.path.realpath(program))
        try:
            info = os.stat(real)
        except OSError:
            return False
        shift = 6 if info.st_uid == self.uid else 3 if info.st_gid in (self.gid, *self.groups) else 0
        return all(self._may(d, 0o1) for d in real.parents) and (info.st_mode >> shift) & 0o1 == 0o1

    def _may(self, directory: Path, bits: int) -> bool:
        try:
            info = os.stat(directory)
        except OSError:
            return False
        shift = 6 if info.st_uid == self.uid else 3 if info.st_gid in (self.gid, *self.groups) else 0
        return stat.S_ISDIR(info.st_mode) and (info.st_mode >> shift) & bits == bits


OOM_SCORE_ADJ = 1000
"""bash's and so every command's oom_score_adj: under memory pressure the kernel kills a command, not the worker
(which has 0). A command may lower its own back to 0, not below (making it a floor needs CAP_SYS_RESOURCE, which
Docker hosts such as CI's do not have to give): then the worker can be chosen, and its death is answered honestly
(`interrupted`, a restart)."""
FORK_PATIENCE = 30.0
"""Seconds the worker keeps trying to start bash while the container has no process to spare (EAGAIN: the pids
limit reached by a command's background jobs or fork bomb): those end, and the session must come back then."""


def _popen(args: list[str], owner: ShellUser | None = None, **kwargs: Any) -> subprocess.Popen[bytes]:
    """subprocess.Popen, retried with backoff for up to FORK_PATIENCE seconds while fork fails with EAGAIN. Still
    failing then, with a shell user of its own (`owner`): every process of that user is killed (what holds the
    processes is the shell's: a fork bomb, daemons that left its session), and the start is tried again."""
    deadline, delay, cleared = time.monotonic() + FORK_PATIENCE, 0.05, False
    while True:
        try:
            return subprocess.Popen(args, **kwargs)
        except BlockingIOError:
            if time.monotonic() > deadline:
                if owner is None or cleared:
                    raise
                procs.kill_user(owner.uid)
                deadline, cleared = time.monotonic() + 5, True
            time.sleep(delay)
            delay = min(2 * delay, 1.0)


class ShellProcess:
    """One bash in a session of its own, fed lines on a pipe; reports come back on a FIFO in its run directory.

    With a `user`, bash runs as that user, and the run directory stays the worker's (mode 0710, group: the user's):
    the shell may use the files in it, which are its own (0600), but cannot remove, rename or replace them, so the
    worker (root) never opens or makes a path the shell chose. The guard stays the worker's: it kills the shell."""

    live_pids: ClassVar[set[int]] = set()
    """bash and guard pids of every live shell in this process (not orphans, whoever adopted them)."""

    def __init__(self, env: dict[str, str], cwd: str, user: ShellUser | None = None) -> None:
        self.user = user
        self.rundir = _run_dir()
        self.cmd_file = self.rundir / "c"
        self.rewrite = (f"{self.cmd_file}: ".encode(), b"bash: ")
        """bash's name for the command file in its messages, and what a terminal would show instead."""
        self.generation = 0
        self.stdin_link = self.rundir / "i"
        """What a command's stdin is: a symlink to /dev/null, or to the file `set_stdin` named."""
        self._stdin_from: str | None = None
        self.cmd_fd = self.report_fd = -1
        self.out_path, self.err_path = self.rundir / "o0", self.rundir / "e0"
        self.restore_files()
        self.out_path, self.err_path = self._make_fifos()
        self.knows_reads = _reads_update_atime(self.cmd_fd, self.cmd_file)
        """Reading the command file marks its access time here (not so on a `noatime` mount): `ran()` can tell."""
        self.proc = _popen(
            ["bash", "--norc", "--noprofile"],
            user,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
            cwd=cwd,
            user=None if user is None else user.uid,
            group=None if user is None else user.gid,
            extra_groups=None if user is None else user.groups,
        )
        self.pid = self.proc.pid
        with contextlib.suppress(OSError):  # the OOM killer's first pick is a command, never the worker
            Path(f"/proc/{self.pid}/oom_score_adj").write_text(f"{OOM_SCORE_ADJ}\n")
        assert self.proc.stdin is not None
        self._stdin = self.proc.stdin.fileno()
        self._stdin_ino = os.fstat(self._stdin).st_ino
        self.pidfd = _pidfd(self.pid)
        guard_r, self._guard_w = os.pipe()
        try:
            self._guard = _popen(
                ["bash", "--norc", "--noprofile", "-c", _GUARD],
                user,
                stdin=guard_r,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                env={"SID": str(self.pid), "RUNDIR": str(self.rundir), "PATH": env.get("PATH", os.defpath)},
            )
        except OSError:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            os.close(guard_r)
        self.guard_pid = self._guard.pid
        ShellProcess.live_pids.update((self.pid, self.guard_pid))

    # -- the run directory ---------------------------------------------------------------------------------------

    def _make_fifos(self) -> tuple[Path, Path]:
        self.generation += 1
        paths = self.rundir / f"o{self.generation}", self.rundir / f"e{self.generation}"
        for p in paths:
            os.mkfifo(p, 0o600)
            self._hand_over(p)
        return paths

    def _hand_over(self, target: Path | int) -> None:
        """Make a file of the run directory the shell user's (nothing to do when bash runs as the worker's user)."""
        if self.user is not None:
            os.chown(target, self.user.uid, self.user.gid)

    def restore_files(self) -> bool:
        """Make what a command removed (`rm -rf /dev/shm/*`) again, at the same paths, so the shell and its state
        go on; True when the report FIFO is new (its reader changed). OSError when the path now holds something
        this process does not own (a symlink or directory another user planted where ours was deleted): the worker
        then starts a new bash with a new run directory instead of following it."""
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.rundir, 0o700)
        info = os.lstat(self.rundir)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            raise OSError(errno.EEXIST, "the shell's run directory was replaced by another user's file", self.rundir)
        if self.user is not None:
            os.chown(self.rundir, -1, self.user.gid)
            os.chmod(self.rundir, 0o710)
            if not (self.rundir / "t").exists():  # where the driver saves traps: the shell cannot make files here
                _close(self._hand_over_new(self.rundir / "t", os.O_WRONLY))
        # An output FIFO behind a symlink is not ours (others may write to it); the report FIFO is read wherever
        # it now is, as bash may be waiting to open it (a report is only taken with its command's nonce).
        report = self.rundir / "r"
        missing = [p for p in (self.out_path, self.err_path) if not _is_fifo(p)]
        for p in missing + ([] if report.is_fifo() else [report]):
            p.unlink(missing_ok=True)
            os.mkfifo(p, 0o600)
            self._hand_over(p)
        if not self.stdin_link.is_symlink():
            self._stdin_from = None
            self.set_stdin(None)
        renewed = False
        if self.report_fd < 0 or not _same_file(self.report_fd, report, follow=True):
            _close(self.report_fd)
            # Read and write: the FIFO never reads as EOF, and bash's open for writing never waits.
            self.report_fd = os.open(report, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            renewed = True
        if self.cmd_fd < 0 or not _same_file(self.cmd_fd, self.cmd_file):
            _close(self.cmd_fd)
            self.cmd_file.unlink(missing_ok=True)  # what took its place (a symlink to /dev/zero, say) is not written
            self.cmd_fd = self._hand_over_new(self.cmd_file, os.O_RDWR | os.O_EXCL)
        return renewed

    def set_stdin(self, path: Path | None) -> None:
        """Point the next command's stdin at `path` (a file the shell user may read), or /dev/null."""
        target = str(path or os.devnull)
        if target == self._stdin_from and _link_target(self.stdin_link) == target:
            return
        new = self.rundir / "i.new"
        new.unlink(missing_ok=True)
        os.symlink(target, new)
        os.replace(new, self.stdin_link)
        self._stdin_from = target

    def _hand_over_new(self, path: Path, flags: int) -> int:
        fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._hand_over(fd)
        return fd

    def open_fifo(self, path: Path) -> int:
        """Open an output FIFO for reading, without waiting for bash to open it; made again first when it is gone or
        is no longer a FIFO."""
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(path, flags)
        except OSError as e:  # gone, or a symlink where the FIFO was (ELOOP)
            if e.errno not in (errno.ENOENT, errno.ELOOP):
                raise
            fd = -1
        if fd >= 0 and stat.S_ISFIFO(os.fstat(fd).st_mode):
            return fd
        _close(fd)
        self.restore_files()
        return os.open(path, flags)

    def report_fifo_moved(self) -> bool:
        """Is the report FIFO's path no longer the FIFO this process reads (a command removed or replaced it; bash,
        opening the path to report, may then wait for a reader that never comes)?"""
        return not _same_file(self.report_fd, self.rundir / "r", follow=True)

    def replace_fifos(self) -> None:
        """A background job still holds the current FIFOs: leave them to it, use new ones from now on."""
        for p in (self.out_path, self.err_path):
            p.unlink(missing_ok=True)
        self.out_path, self.err_path = self._make_fifos()

    def write_command(self, body: bytes) -> None:
        """Put the command's text in the file bash sources, with an access time of zero (`ran()`)."""
        info = os.fstat(self.cmd_fd)
        if not _same_file(self.cmd_fd, self.cmd_file, info):  # removed, or replaced (by a symlink, say)
            self.restore_files()
            info = os.fstat(self.cmd_fd)
        view, at = memoryview(body), 0
        try:
            while at < len(body):
                at += os.pwrite(self.cmd_fd, view[at:], at)
            if info.st_size > len(body):
                os.ftruncate(self.cmd_fd, len(body))
            os.utime(self.cmd_fd, ns=(0, time.time_ns()))
        except OSError as e:  # a full /dev/shm, say: name the file
            raise OSError(e.errno, e.strerror, str(self.cmd_file)) from None

    def ran(self) -> bool:
        """Did bash read the command file it was last given (it made the command's redirections and ran it)? True
        when that cannot be known."""
        try:
            info = os.fstat(self.cmd_fd)
        except OSError:
            return True
        return not self.knows_reads or info.st_atime_ns != 0 or info.st_nlink == 0

    # -- the process ---------------------------------------------------------------------------------------------

    def send(self, line: bytes) -> bool:
        """Write lines of input to bash; False when bash is gone."""
        try:
            os.write(self._stdin, line)
        except OSError:
            return False
        return True

    def exited(self) -> bool:
        return self.proc.poll() is not None

    def stopped(self) -> bool:
        p = procs.stat(self.pid)
        return p is not None and p.state == "T"

    def at_prompt(self) -> bool:
        """Is bash waiting for its next line (blocked reading its command pipe, which is empty)? Read from
        /proc/PID/syscall and /proc/PID/fd/0; False where those cannot be read."""
        if _READ_SYSCALL is None:
            return False
        try:
            with open(f"/proc/{self.pid}/syscall", "rb") as f:
                fields = f.read().split()
            if len(fields) < 2 or fields[0] != str(_READ_SYSCALL).encode() or int(fields[1], 16) != 0:
                return False
            if os.stat(f"/proc/{self.pid}/fd/0").st_ino != self._stdin_ino:
                return False
            queued = array.array("i", [0])
            fcntl.ioctl(self._stdin, termios.FIONREAD, queued)
        except (OSError, ValueError):
            return False
        return queued[0] == 0

    def cwd(self) -> str | None:
        """bash's working directory from /proc (when `$PWD` was unset)."""
        try:
            return os.readlink(f"/proc/{self.pid}/cwd")
        except OSError:
            return None

    def kill(self) -> int:
        """Kill bash and every process of its session (the guard does the sweep); return bash's wait status."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        os.close(self._guard_w)
        code = self.proc.wait()
        self._guard.wait()
        ShellProcess.live_pids.difference_update((self.pid, self.guard_pid))
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        for fd in (self.report_fd, self.cmd_fd, self.pidfd):
            _close(fd)
        shutil.rmtree(self.rundir, ignore_errors=True)
        return code


def _pidfd(pid: int) -> int:
    """A descriptor that polls readable when the process exits (-1 on kernels before 5.3)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return -1


def _reads_update_atime(fd: int, path: Path) -> bool:
    try:
        os.utime(fd, ns=(0, time.time_ns()))
        with open(path, "rb") as f:
            f.read(1)
        return os.fstat(fd).st_atime_ns != 0
    except OSError:
        return False


def _same_file(fd: int, path: Path, info: os.stat_result | None = None, follow: bool = False) -> bool:
    """Is `path` itself (or, with `follow`, what a symlink there points at) the file open as `fd` (whose fstat `info`
    may be given)?"""
    try:
        a, b = info or os.fstat(fd), os.stat(path) if follow else os.lstat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _is_fifo(path: Path) -> bool:
    """Is `path` itself (a symlink is not followed) a FIFO?"""
    try:
        return stat.S_ISFIFO(os.lstat(path).st_mode)
    except OSError:
        return False


def _link_target(path: Path) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _close(fd: int) -> None:
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)
