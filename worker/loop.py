"""The worker: consume one session's command stream in order, run each command in the shell, commit one result.

    start: connect, load the functions, create the consumer group (or find it lost), start the control thread
    loop:  read the next entry (own pending entries first) -> check it -> run it -> commit + ack (one FCALL)
    stop:  on a stop request or SIGTERM, let the running command finish within the grace, else stop it and commit
           `interrupted`; then exit 0

Exit codes: 0 stopped; 2 bad configuration; 3 session state lost (Redis came back without the consumer group);
4 Redis unreachable.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import redis

from worker import protocol
from worker.errors import SessionStateLostError
from worker.protocol import CommandRequest, CommandResult, ControlRequest, DecodeError
from worker.settings import WorkerSettings
from worker.shell import Shell, ShellResult

log = logging.getLogger("shellq.worker")

EXIT_OK, EXIT_CONFIG, EXIT_STATE_LOST, EXIT_REDIS = 0, 2, 3, 4
CONSUMER = "worker"
Entry = tuple[str, dict[bytes, bytes] | None]


def connect(url: str, password_file: Any = None, **options: Any) -> redis.Redis:
    """A Redis client for `url`; the password, if any, comes from `password_file`."""
    if password_file:
        with open(password_file) as f:
            options["password"] = f.read().strip()
    return redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=5, **options)


class Worker:
    """Serves one session. `serve()` runs the loop until `stop()` (or `max_commands`); tests run it in a thread."""

    def __init__(self, settings: WorkerSettings, shell: Shell | None = None) -> None:
        self.settings = settings
        self.keys = protocol.keys(settings.session)
        self.redis = connect(settings.redis_url, settings.redis_password_file)
        self.shell = shell or Shell(
            work_dir=settings.work_dir,
            output_cap=settings.output_cap,
            spool_quota=settings.spool_quota,
            kill_grace=settings.kill_grace,
            reap_orphans=True,
        )
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._running: tuple[str, threading.Event] | None = None
        self._cancelled: set[str] = set()
        self._terminated = False
        self._control: threading.Thread | None = None

    def serve(self, max_commands: int | None = None) -> int:
        """Run the loop; returns the process exit code."""
        done = 0
        try:
            self._start()
            self._recover()
            entry: Entry | None = None
            while entry or (not self._stopping.is_set() and (max_commands is None or done < max_commands)):
                if entry is None:
                    entry = self._read()
                    continue
                more = not self._stopping.is_set() and (max_commands is None or done + 1 < max_commands)
                entry = self._commit(entry, self._handle(entry), read_next=more)
                done += 1
        except SessionStateLostError as e:
            log.error("session state lost: %s", e)
            return EXIT_STATE_LOST
        finally:
            self.close()
        return EXIT_OK

    def stop(self, grace: float | None = None) -> None:
        """Stop after the running command; if it is still running after `grace` seconds, stop it (`interrupted`)."""
        self._stopping.set()
        grace = self.settings.shutdown_grace if grace is None else grace
        timer = threading.Timer(grace, self._terminate)
        timer.daemon = True
        timer.start()

    def close(self) -> None:
        self._stopping.set()
        if self._control:
            self._control.join()
        self.shell.close()
        try:
            self.redis.hset(self.keys.meta, mapping={"state": "stopped", "current": ""})
        except redis.RedisError as e:
            log.warning("could not record the stop: %s", e)
        self.redis.close()

    # -- steps ---------------------------------------------------------------------------------------------------

    def _start(self) -> None:
        protocol.load_functions(self.redis)
        k = self.keys
        if self.redis.hsetnx(k.meta, "group_created_ms", int(time.time() * 1000)):
            self.redis.xgroup_create(k.cmd, protocol.GROUP, id="0", mkstream=True)
        elif not self._group_exists():
            raise SessionStateLostError(f"{k.cmd} has no consumer group {protocol.GROUP!r} although it was created")
        self._heartbeat()
        self._control = threading.Thread(target=self._control_loop, name="shellq-control", daemon=True)
        self._control.start()
        log.info("serving session %s (pid %d, shell epoch %d)", self.settings.session, os.getpid(), self.shell.epoch)

    def _group_exists(self) -> bool:
        try:
            groups = self.redis.xinfo_groups(self.keys.cmd)
        except redis.ResponseError:
            return False
        return any(g["name"] in (protocol.GROUP, protocol.GROUP.encode()) for g in groups)

    def _recover(self) -> None:
        """Settle entries this session's worker took but never committed: they were started, so they are not run
        again; each gets one `interrupted` result (or `lost` if the entry is gone)."""
        pending = self._xreadgroup("0", block=None)
        for entry_id, fields in pending:
            self._commit((entry_id, fields), self._unfinished(entry_id, fields), read_next=False)

    def _read(self) -> Entry | None:
        entries = self._xreadgroup(">", block=self.settings.block_ms)
        return entries[0] if entries else None

    def _xreadgroup(self, start: str, block: int | None) -> list[Entry]:
        try:
            reply: Any = self.redis.xreadgroup(
                protocol.GROUP, CONSUMER, {self.keys.cmd: start}, count=None if start == "0" else 1, block=block
            )
        except redis.ResponseError as e:
            if "NOGROUP" in str(e):
                raise SessionStateLostError(str(e)) from None
            raise
        return [(eid.decode(), fields or None) for _, entries in reply for eid, fields in entries]

    def _handle(self, entry: Entry) -> CommandResult:
        """Check the entry and run it; every outcome is a result."""
        entry_id, fields = entry
        if fields is None:
            return _result(entry_id, entry_id, "lost", error="the command entry was trimmed or deleted before it ran")
        cid = _command_id(entry_id, fields)
        if protocol.entry_size(fields) > protocol.MAX_ENTRY_BYTES:
            return _result(cid, entry_id, "rejected", error=f"entry larger than {protocol.MAX_ENTRY_BYTES} bytes")
        try:
            req = protocol.decode(CommandRequest, fields)
        except DecodeError as e:
            return _result(cid, entry_id, "rejected", error=f"malformed command entry: {e}")
        timeout = req.timeout or self.settings.default_timeout
        if timeout > self.settings.max_timeout:
            return _result(
                cid,
                entry_id,
                "rejected",
                error=f"timeout {timeout:g}s exceeds the maximum {self.settings.max_timeout:g}s",
            )
        return self._execute(cid, entry_id, req, timeout)

    def _execute(self, cid: str, entry_id: str, req: CommandRequest, timeout: float) -> CommandResult:
        cancel = threading.Event()
        with self._lock:
            if cid in self._cancelled:
                return _result(cid, entry_id, "cancelled", error="interrupted before it started")
            self._running = (cid, cancel)
        try:
            r = self.shell.run(req.cmd, timeout=timeout, env=req.env, cwd=req.cwd, spool_name=cid, cancel=cancel)
        finally:
            with self._lock:
                self._running = None
        return self._from_shell(cid, entry_id, r)

    def _from_shell(self, cid: str, entry_id: str, r: ShellResult) -> CommandResult:
        status: protocol.Status = r.status
        error = None
        if status == "cancelled" and self._terminated:
            status, error = "interrupted", "the worker was stopped while the command ran"
        return CommandResult(
            id=cid,
            entry_id=entry_id,
            status=status,
            exit_code=r.exit_code,
            stdout=r.stdout,
            stderr=r.stderr,
            stdout_size=r.stdout_size,
            stderr_size=r.stderr_size,
            truncated=r.truncated,
            spool_path=r.spool_path,
            cwd=r.cwd,
            duration_ms=round(r.duration_ms, 3),
            shell_epoch=r.shell_epoch,
            error=error,
        )

    def _unfinished(self, entry_id: str, fields: dict[bytes, bytes] | None) -> CommandResult:
        if fields is None:
            return _result(entry_id, entry_id, "lost", error="the command entry was trimmed or deleted before it ran")
        return _result(
            _command_id(entry_id, fields),
            entry_id,
            "interrupted",
            error="the worker stopped while the command ran; its outcome is unknown",
            shell_epoch=self.shell.epoch,
        )

    def _commit(self, entry: Entry, result: CommandResult, read_next: bool) -> Entry | None:
        """FCALL shellq_commit (result + journal + XACK in one step), pipelined with the next XREADGROUP."""
        k, s = self.keys, self.settings
        args: list[Any] = [protocol.GROUP, entry[0], s.journal_ttl, s.results_maxlen]
        for name, value in protocol.encode(result).items():
            args += [name, value]
        pipe = self.redis.pipeline(transaction=False)
        pipe.fcall("shellq_commit", 3, k.res, k.jrnl(result.id), k.cmd, *args)
        if read_next:
            pipe.xreadgroup(protocol.GROUP, CONSUMER, {k.cmd: ">"}, count=1, block=s.block_ms)
        try:
            replies = pipe.execute()
        except redis.ResponseError as e:
            if "NOGROUP" in str(e):
                raise SessionStateLostError(str(e)) from None
            raise
        if result.status not in ("completed",):
            log.info("command %s: %s %s", result.id, result.status, result.error or "")
        if not read_next or not replies[1]:
            return None
        eid, fields = replies[1][0][1][0]
        return eid.decode(), fields or None

    # -- control and heartbeat (own thread, own connection) ------------------------------------------------------

    def _control_loop(self) -> None:
        conn = connect(self.settings.redis_url, self.settings.redis_password_file)
        last = "0"  # read the whole (capped) control history: interrupts of queued commands count
        seconds, micros = conn.time()
        started = seconds * 1000 + micros // 1000
        block = max(1, int(self.settings.heartbeat * 1000))
        try:
            while not self._stopping.is_set() or self._running:
                self._heartbeat(conn=conn)
                reply: Any = conn.xread({self.keys.ctl: last}, block=block)
                for _, entries in reply or []:
                    for eid, fields in entries:
                        last = eid.decode()
                        self._on_control(fields, fresh=int(last.split("-")[0]) >= started)
        except redis.RedisError as e:
            log.warning("control thread: %s", e)
        finally:
            conn.close()

    def _on_control(self, fields: dict[bytes, bytes], fresh: bool) -> None:
        try:
            msg = protocol.decode(ControlRequest, fields)
        except DecodeError as e:
            log.warning("ignored control message: %s", e)
            return
        if msg.op == "shutdown" and fresh:
            log.info("shutdown requested on the control stream")
            self.stop()
        elif msg.op == "interrupt" and msg.id:
            with self._lock:
                if self._running and self._running[0] == msg.id:
                    self._running[1].set()
                    self.shell.interrupt()
                else:
                    self._cancelled.add(msg.id)

    def _terminate(self) -> None:
        with self._lock:
            if self._running:
                self._terminated = True
                self._running[1].set()
                self.shell.interrupt()

    def _heartbeat(self, conn: redis.Redis | None = None) -> None:
        running = self._running
        fields = {
            "state": "running" if running else "idle",
            "current": running[0] if running else "",
            "pid": os.getpid(),
            "shell_epoch": self.shell.epoch,
        }
        args = [x for kv in fields.items() for x in kv]
        try:
            (conn or self.redis).fcall("shellq_heartbeat", 1, self.keys.meta, *args)
        except redis.RedisError as e:
            log.warning("heartbeat failed: %s", e)


def _command_id(entry_id: str, fields: dict[bytes, bytes]) -> str:
    raw = fields.get(b"id")
    if raw is None:
        return entry_id
    text = raw.decode(errors="replace")
    return text if protocol.ID_PATTERN.match(text) and not protocol.is_entry_id(text) else entry_id


def _result(cid: str, entry_id: str, status: protocol.Status, error: str, shell_epoch: int = 0) -> CommandResult:
    return CommandResult(id=cid, entry_id=entry_id, status=status, error=error, shell_epoch=shell_epoch)
