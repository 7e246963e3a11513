"""The local backend: a session's worker as a background process on this machine, with no isolation.

For development and the zero-setup quick start (Linux only: the shell needs /proc, process groups and the child
subreaper flag). The Docker backend gives each session its own container instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis

from containers import access
from worker import protocol
from worker.errors import ShellqError

RELEASE = "if redis.call('GET', KEYS[1]) == redis.call('HGET', KEYS[2], 'instance') then redis.call('DEL', KEYS[1]) end"
"""Lua: delete the lease (KEYS[1]) when it is still the token of the worker the meta hash (KEYS[2]) names."""


class SessionStartError(ShellqError):
    """The worker did not come up; the message carries the last lines of its log."""


class LocalBackend:
    """Start and stop session workers as local processes; their logs go to `log_dir/<session>.log`."""

    name = "local"

    def __init__(
        self, redis_url: str, log_dir: Path, work_root: Path | None = None, credentials_dir: Path | None = None
    ) -> None:
        self.redis_url = redis_url
        self.log_dir = log_dir
        self.work_root = work_root or log_dir
        self.credentials_dir = credentials_dir or log_dir.parent / "credentials"
        """Where each session's worker password file lives (a 0700 directory of 0600 files)."""
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=10)
        self._procs: dict[str, subprocess.Popen[bytes]] = {}  # workers started here, reaped by `stop`

    def log_path(self, session: str) -> Path:
        return self.log_dir / f"{protocol.check_id(session, 'session id')}.log"

    def start(self, session: str, start_timeout: float = 20.0, env: dict[str, str] | None = None) -> str:
        """Start the worker in the background and wait for its first heartbeat; returns its pid. The worker gets
        the session's own Redis user (made, or given new passwords, here: `access.grant`) and its password as a
        file; the admin URL this backend holds never reaches it."""
        keys = protocol.keys(session)
        if self._alive_pid(session):
            raise ShellqError(f"session {session} already has a live worker")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.chmod(0o700)  # the logs name commands; the credentials and session directories lie beside
        creds = access.grant(self.redis, session)
        password_file = self.password_file(session)
        password_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(creds.worker_password + "\n")
        full_env = {**_base_env(env), **(env or {})}
        full_env.update(
            SHELLQ_REDIS_URL=access.url_for(self.redis_url, creds.worker_user),
            SHELLQ_REDIS_PASSWORD_FILE=str(password_file),
            SHELLQ_SESSION=session,
            SHELLQ_WORK_DIR=str(self.work_dir(session)),
        )
        with open(self.log_path(session), "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "worker"],
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self._procs[session] = proc
        deadline = time.monotonic() + start_timeout
        while self.redis.hget(keys.meta, "pid") != str(proc.pid).encode():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                self._procs.pop(session, None)
                self._revoke(session)
                raise SessionStartError(f"the worker of session {session} did not start:\n{self._log_tail(session)}")
            time.sleep(0.05)
        self.redis.hset(keys.meta, mapping={"backend": self.name, "log": str(self.log_path(session))})
        return str(proc.pid)

    def stop(self, session: str, timeout: float = 10.0) -> bool:
        """Ask the worker to shut down (control stream), then SIGTERM and SIGKILL it if it lingers, and delete the
        session's Redis users. Idempotent; returns whether a worker was running."""
        keys = protocol.keys(session)
        pid = self._alive_pid(session)
        if pid is None:
            self._reap(session)
            self._revoke(session)
            return False
        request: Any = self.redis.xadd(keys.ctl, protocol.encode(protocol.ControlRequest(op="shutdown")))  # type: ignore[arg-type]
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                _signal(pid, sig)
            deadline = time.monotonic() + timeout / 2
            while pid_running(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not pid_running(pid):
                break
        # served: a worker started again within seconds would take it for a request of its own (worker/control.py)
        self.redis.xdel(keys.ctl, request)
        self.redis.hset(keys.meta, "state", "stopped")
        if not pid_running(pid):
            self._release_lease(session)
        self._reap(session)
        self._revoke(session)
        return True

    def _reap(self, session: str) -> None:
        """Wait for the worker this object started (its exit status is read, no zombie is left), at most a second:
        /proc can call it gone a moment before its exit status can be read."""
        if (proc := self._procs.pop(session, None)) is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)

    def password_file(self, session: str) -> Path:
        return self.credentials_dir / f"{protocol.check_id(session, 'session id')}.password"

    def _revoke(self, session: str) -> None:
        """The session's users go with its worker (a new start makes new ones); so does its password file."""
        access.revoke(self.redis, session)
        self.password_file(session).unlink(missing_ok=True)

    def _release_lease(self, session: str) -> None:
        """DEL the lease a stopped worker still holds (one EVAL), so that a new one need not wait out its TTL."""
        keys = protocol.keys(session)
        self.redis.eval(RELEASE, 2, keys.lease, keys.meta)

    def work_dir(self, session: str) -> Path:
        """The session's directory: the shell starts there, spooled output and the worker's marker file live there."""
        return self.work_root / protocol.check_id(session, "session id")

    def remove_state(self, session: str) -> bool:
        """Delete what the session left on this machine (its directory, with the marker file by which its next worker
        would take deleted keys for a Redis that lost them, and its log), so that its name is free again. Call it
        after `stop`, when the session's keys are deleted too; returns whether there was anything."""
        found = [p for p in (self.work_dir(session), self.log_path(session)) if p.exists()]
        for path in found:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return bool(found)

    def _alive_pid(self, session: str) -> int | None:
        """The pid of the session's worker if it runs on this machine."""
        raw = self.redis.hget(protocol.keys(session).meta, "pid")
        if not raw:
            return None
        pid = int(raw)
        return pid if pid_running(pid) and b"worker" in _cmdline(pid) else None

    def _log_tail(self, session: str, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path(session).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


_PASSED_TO_ANOTHER_USER = ("PATH", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR")


def _base_env(env: dict[str, str] | None) -> dict[str, str]:
    """The worker's environment before its own settings: this process's, or, when the shell is to run as another
    user (SHELLQ_SHELL_USER), only the locale, PATH and TMPDIR of it: the shell inherits the worker's environment,
    and the operator's may hold credentials (REDISCLI_AUTH, cloud keys) that user must not see."""
    if (env or {}).get("SHELLQ_SHELL_USER", os.environ.get("SHELLQ_SHELL_USER")):
        return {k: v for k, v in os.environ.items() if k in _PASSED_TO_ANOTHER_USER or k.startswith("SHELLQ_")}
    return dict(os.environ)


def pid_running(pid: int) -> bool:
    """The process exists and is not a zombie (whoever its parent is)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 :].split()[0] != b"Z"


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
