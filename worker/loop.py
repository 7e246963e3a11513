"""The worker: serve one session's commands in order, run each in the shell, commit exactly one result each.

    start:   load the functions, check durability, wait for the session's lease, create the consumer group (or
             find the session's state lost), start the control thread, settle what a predecessor left pending
    loop:    take the next command (fenced by the lease) -> check it -> run it -> commit result + journal + ack
    faults:  Redis unreachable -> back off and reconnect, then re-check the session and the lease; a lost lease ->
             stop at once; SIGTERM -> let the running command finish within the grace, else stop it (`interrupted`)

Exit codes: 0 stopped; 2 bad configuration; 3 session state lost; 4 Redis unreachable at start; 5 lease lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from worker import files, procs, protocol, transfer
from worker.control import Control
from worker.errors import (
    ConfigError,
    FencedError,
    RedisRefusedError,
    RedisReplyError,
    RedisUnavailableError,
    SessionStateLostError,
    ShellqError,
)
from worker.live import LiveOutput
from worker.protocol import CommandRequest, CommandResult, DecodeError
from worker.settings import WorkerSettings, state_dir
from worker.shell import Shell, ShellResult
from worker.store import Entry, SessionStore, check_durability
from worker.transfer import TransferError

log = logging.getLogger("shellq.worker")

EXIT_OK, EXIT_CONFIG, EXIT_STATE_LOST, EXIT_REDIS, EXIT_FENCED = 0, 2, 3, 4, 5
POISON_AFTER = 2
"""An idempotent command is started at most this many times; one that killed the worker each time is poison."""
_SHELL_FIELDS = tuple(f.name for f in dataclasses.fields(ShellResult))
HOST = f"{socket.gethostname()}/{Path('/proc/sys/kernel/random/boot_id').read_text().strip()}"


class Worker:
    """Serves one session. `serve()` runs the loop until `stop()` (or `max_commands`); tests run it in a thread."""

    def __init__(self, settings: WorkerSettings, shell: Shell | None = None) -> None:
        self.settings = settings
        self.store = SessionStore(settings)
        self.work_dir = settings.work_dir or state_dir() / "sessions" / settings.session
        self.shell = shell or self._new_shell()
        self.live = (
            LiveOutput(
                self.store.redis,
                self.store.keys.live,
                maxlen=settings.live_maxlen,
                rate=settings.live_rate,
                ttl=settings.live_ttl,
            )
            if settings.live_output
            else None
        )
        self.stopping = threading.Event()
        self.running: tuple[str, threading.Event] | None = None
        self._lock = threading.Lock()
        self._cancelled: set[str] = set()
        self._terminated = False
        self._started: dict[str, None] = {}  # entry ids this process started, newest last (bounded)
        self._backlog: list[Entry] = []
        self._last = "0-0"
        self._taken = 0
        self._lease_fresh_until = 0.0
        self._control: Control | None = None
        self._serving = False  # holds the session's lease (the session's meta is this worker's to write)
        self._outage: float | None = None  # when Redis went (monotonic), while it is unavailable
        self._refused = ""  # Redis's words, while the outage is a refusal (heartbeats say it: see heartbeat_fields)
        self._delay = 0.05  # seconds before the next attempt to resume, during an outage
        self.leased = False
        """Has this worker held the session's lease? Until then a stop may abandon whatever it waits for (a
        Redis that does not answer, say): it has taken no command and written nothing of the session's."""
        self._inputs: Path | None = None  # see _input_dir

    def _new_shell(self) -> Shell:
        s = self.settings
        return Shell(
            work_dir=self.work_dir,
            output_cap=s.output_cap,
            spool_quota=s.spool_quota,
            kill_grace=s.kill_grace,
            reap_orphans=True,
            user=s.shell_user,
        )

    def serve(self, max_commands: int | None = None) -> int:
        """Run the loop; returns the process exit code."""
        done = 0
        try:
            if not self._start():
                return EXIT_OK  # stopped before it ever served: nothing to settle
            while (not self.stopping.is_set() or self._backlog) and (max_commands is None or done < max_commands):
                try:
                    entry = self._next()
                    if entry:
                        done += 1
                        self._process(entry, take_next=max_commands is None or done < max_commands)
                except RedisUnavailableError as e:
                    if self.stopping.is_set():
                        raise  # stopping anyway; the exit code says Redis could not be reached
                    self._reconnect(e)
        except SessionStateLostError as e:
            log.error("session state lost: %s", e)
            self._record_loss(str(e))
            return EXIT_STATE_LOST
        except FencedError as e:
            log.error("%s", e)
            self._serving = False
            return EXIT_FENCED
        except ConfigError as e:
            log.error("%s", e)
            return EXIT_CONFIG
        finally:
            self.close()
        return EXIT_OK

    def stop(self, grace: float | None = None) -> None:
        """Stop after the running command; if it is still running after `grace` seconds, stop it (`interrupted`)."""
        self.stopping.set()
        grace = self.settings.shutdown_grace if grace is None else grace
        timer = threading.Timer(grace, self._terminate)
        timer.daemon = True
        timer.start()
        threading.Thread(target=self.store.wake, name="shellq-wake", daemon=True).start()

    def interrupt(self, command_id: str) -> None:
        """Cancel a command: the running one is stopped; a queued one will be answered without running."""
        with self._lock:
            if self.running and self.running[0] == command_id:
                self.running[1].set()
                self.shell.interrupt()
            else:
                self._cancelled.add(command_id)

    def close(self) -> None:
        self.stopping.set()
        if self._control:
            self._control.join()
        self.shell.close()
        if self.live:
            self.live.close()
        if self._inputs is not None:
            shutil.rmtree(self._inputs, ignore_errors=True)
        try:
            if self._serving:  # a worker that waited for the lease or lost it must not mark its successor stopped
                self.store.record_stop()
        except (RedisUnavailableError, RedisReplyError) as e:
            log.warning("could not record the stop: %s", e)
        self.store.close()

    # -- start and recovery ----------------------------------------------------------------------------------------

    def _start(self) -> bool:
        """Get ready to serve; False when asked to stop while waiting for the lease."""
        self.store.load_functions()
        check_durability(self.store)
        if not self._wait_for_lease():
            log.info("stopped while waiting for the lease of session %s", self.settings.session)
            return False
        self._serving = self.leased = True
        self.store.note_wake()
        self.store.open_session(self.work_dir / ".shellq-session")
        previous = self.store.redis.call("HGET", self.store.keys.meta, "shell_epoch")
        if previous is not None:  # a new worker means a new bash: its epoch continues the session's count
            self.shell.epoch = max(self.shell.epoch, int(previous) + 1)
        self.renewed(self.store.beat(self.heartbeat_fields()))
        self._control = Control(self)
        self._control.start()
        self._recover()
        self._last = self.store.last_delivered()
        log.info("serving session %s (pid %d, lease epoch %d)", self.settings.session, os.getpid(), self.store.epoch)
        return True

    def _wait_for_lease(self) -> bool:
        """Wait until this worker holds the session's lease (True), or until it is asked to stop (False)."""
        said = False
        while self.store.acquire() is None:
            if not said:
                log.info("session %s is served by another worker; waiting for its lease", self.settings.session)
                said = True
            if self.stopping.wait(min(0.5, self.settings.lease_ttl / 4)):
                return False
        self._kill_predecessor()
        return True

    def _kill_predecessor(self) -> None:
        """A predecessor on this machine that lost the lease (paused, say) must not go on running its command."""
        meta = self.store.redis.call("HMGET", self.store.keys.meta, "host", "pid", "shell_pid")
        host, pid, shell_pid = (v.decode() if v else None for v in meta)
        if host != HOST or not shell_pid or not pid or pid == str(os.getpid()):
            return
        shell = procs.stat(int(shell_pid))
        if shell is None or shell.ppid != int(pid) or shell.sid != shell.pid:
            return  # that shell is gone (its pid may belong to someone else now)
        killed = procs.kill_session(shell.pid)
        if killed:
            log.warning("killed %d processes of the previous worker's shell (pid %s)", killed, pid)

    def _recover(self) -> None:
        """Settle what was taken but never committed: entries a worker started count as started. Each gets one
        result: the one already committed (acked only), `interrupted`, a second run when submitted idempotent,
        `rejected` as poison after that, or `lost` when the entry itself is gone."""
        entries, deleted = self.store.pending()
        for entry_id in deleted:
            cid = self.store.command_id_of(entry_id)
            self.store.commit(entry_id, _result(cid, entry_id, "lost", "the entry was deleted before it ran"))
        for entry in sorted(entries, key=lambda e: protocol.entry_key(e[0])):
            self._settle(entry)

    def _settle(self, entry: Entry) -> None:
        entry_id, fields = entry
        if fields is None:
            cid = self.store.command_id_of(entry_id)
            self.store.commit(entry_id, _result(cid, entry_id, "lost", "the entry was trimmed before it ran"))
            return
        cid = protocol.command_id(entry_id, fields)
        if original := self.store.original(cid, entry_id):
            self.store.commit(entry_id, _duplicate(cid, entry_id, original))
            return
        if self.store.redis.call("HEXISTS", self.store.keys.jrnl(cid), "res"):
            self.store.commit(entry_id, _result(cid, entry_id, "interrupted", ""))  # only acknowledges
            return
        idempotent = fields.get(b"idempotent") in (b"1", b"true")
        if idempotent and self.store.attempt(cid) <= POISON_AFTER:
            log.info("command %s was running when its worker died; it is idempotent: running it again", cid)
            self._process(entry, counted=True)
            return
        status: protocol.Status = "rejected" if idempotent else "interrupted"
        error = (
            f"poison: the worker died each of the {POISON_AFTER} times this command ran"
            if idempotent
            else "the worker died while the command ran; its outcome is unknown"
        )
        self.store.commit(entry_id, _result(cid, entry_id, status, error, self.shell.epoch))

    # -- the loop ------------------------------------------------------------------------------------------------

    def _next(self) -> Entry | None:
        """The next command: one recovered after a reconnect, else the next new one (waiting up to block_ms)."""
        if self._backlog:
            return self._backlog.pop(0)
        if time.monotonic() > self._lease_fresh_until and not self.store.beat(self.heartbeat_fields()):
            raise FencedError("this worker's lease was taken over; it stops")
        entry, self._last = self.store.take(self._last, self.settings.block_ms)
        self._recovered()
        return entry

    def _process(self, entry: Entry, counted: bool = False, take_next: bool = False) -> None:
        """Run one command and commit its result; `take_next` waits for the next command and takes it in the same
        round trip (taken, it is run even when a stop comes first: it counts as started)."""
        self._taken += 1
        self._started[entry[0]] = None
        if len(self._started) > 1000:
            del self._started[next(iter(self._started))]
        self._fault("taken")
        try:
            result = self._handle(entry, counted)
        except RedisUnavailableError:  # before the command ran (its input, its journal): recovery takes it again
            self._started.pop(entry[0], None)
            raise
        self._fault("ran")
        while True:
            try:
                fresh = time.monotonic() < self._lease_fresh_until
                if take_next and fresh and not self._backlog and not self.stopping.is_set():
                    block = self.settings.block_ms
                    queued, self._last = self.store.commit_and_take(entry[0], result, self._last, block)
                    if queued:
                        self._backlog.append(queued)
                else:
                    self.store.commit(entry[0], result)
                break
            except RedisUnavailableError as e:
                self._reconnect(e, holding=True)  # a result to commit: wait for Redis even when stopping
                take_next = False  # the commit alone (a refused take must not hold the result back)
        if result.status != "completed":
            log.info("command %s: %s %s", result.id, result.status, result.error or "")
        self._fault("committed")

    def _handle(self, entry: Entry, counted: bool) -> CommandResult:
        """Check the entry and run it; every outcome is a result."""
        entry_id, fields = entry
        if fields is None:
            return _result(entry_id, entry_id, "lost", "the command entry was trimmed or deleted before it ran")
        cid = protocol.command_id(entry_id, fields)
        if original := self.store.original(cid, entry_id):
            return _duplicate(cid, entry_id, original)
        if (reason := self.store.cancel_reason(entry_id)) is not None:
            return _result(cid, entry_id, "cancelled", protocol.cancelled_error(reason))
        if protocol.entry_size(fields) > protocol.MAX_ENTRY_BYTES:
            why = "the cap of hand-written entries; shellq's client sends a larger command's text in chunks"
            return _result(cid, entry_id, "rejected", f"entry larger than {protocol.MAX_ENTRY_BYTES} bytes ({why})")
        try:
            req = protocol.decode(CommandRequest, fields)
        except DecodeError as e:
            return _result(cid, entry_id, "rejected", f"malformed command entry: {e}")
        timeout = req.timeout or self.settings.default_timeout
        if timeout > self.settings.max_timeout:
            limit = self.settings.max_timeout
            return _result(cid, entry_id, "rejected", f"timeout {timeout:g}s exceeds the maximum {limit:g}s")
        if req.idempotent and not counted:
            self.store.attempt(cid)
        return self._execute(cid, entry_id, req, timeout)

    def _execute(self, cid: str, entry_id: str, req: CommandRequest, timeout: float) -> CommandResult:
        cancel = threading.Event()
        with self._lock:
            if cid in self._cancelled:
                return _result(cid, entry_id, "cancelled", "interrupted before it started")
            self.running = (cid, cancel)
        if self.live:
            self.live.begin(cid, self.store.epoch)
        try:
            with self._input(cid, req) as (cmd, stdin):
                if req.op != "exec" or req.user is not None:
                    return self._beside(cid, entry_id, req, cmd, stdin, cancel, timeout)
                live = self.live.feed if self.live else None
                r = self.shell.run(
                    cmd,
                    timeout=timeout,
                    env=req.env,
                    cwd=req.cwd,
                    spool_name=cid,
                    cancel=cancel,
                    live=live,
                    stdin=stdin,
                    merge_stderr=req.merge_stderr,
                )
        except TransferError as e:
            return _result(cid, entry_id, "rejected", f"its input did not come whole: {e}", self.shell.epoch)
        except RedisUnavailableError:  # an OSError too, but not the shell's: its input could not be read yet
            raise
        except OSError as e:  # the machine failed the shell (a full /dev/shm, no descriptors left): say so, go on
            log.exception("command %s: the shell failed; starting a new bash", cid)
            epoch = self._renew()
            return _result(cid, entry_id, "interrupted", f"the shell failed: {e}; a new bash was started", epoch)
        finally:
            if self.live:
                self.live.end()
            with self._lock:
                self.running = None
        return self._from_shell(cid, entry_id, r)

    @contextlib.contextmanager
    def _input(self, cid: str, req: CommandRequest) -> Iterator[tuple[bytes, Path | None]]:
        """The command's text and the file its input was spooled to (None: no input), from the entry or, in
        chunks, from its input stream (TransferError when they stop coming); the file is removed afterwards.
        Spooled to disk, not held: a 200 MiB upload costs the worker no memory."""
        if req.stdin is None and not req.cmd_size and req.input_size is None:
            yield req.cmd, None
            return
        group = self.shell.user.gid if self.shell.user else None
        path = self._input_dir(group) / cid
        cmd = bytearray(req.cmd)
        try:
            with open(path, "wb") as f:
                os.fchmod(f.fileno(), 0o640)  # the shell's group may read it (the shell runs a command on it)
                if group is not None:
                    os.fchown(f.fileno(), -1, group)
                if req.stdin is not None:
                    f.write(req.stdin)
                size = (req.cmd_size or 0) + (req.input_size or 0)
                if size:
                    for chunk in transfer.receive(self.store.redis, self.store.keys.input(cid), size):
                        head = max(0, min(len(chunk), (req.cmd_size or 0) - len(cmd)))
                        cmd += chunk[:head]
                        f.write(chunk[head:])
            has_input = req.stdin is not None or req.input_size is not None
            yield bytes(cmd), path if has_input else None
        finally:
            path.unlink(missing_ok=True)

    def _input_dir(self, group: int | None) -> Path:
        """Where input is spooled: a directory of the worker's in the temporary directory (on disk, and reachable by
        the shell's user, unlike a session directory under the worker's home), its group the shell's."""
        if self._inputs is None or not self._inputs.is_dir():
            self._inputs = Path(tempfile.mkdtemp(prefix="shellq-in-"))
            if group is not None:
                os.chown(self._inputs, -1, group)
                os.chmod(self._inputs, 0o750)
        return self._inputs

    def _beside(
        self, cid: str, entry_id: str, req: CommandRequest, cmd: bytes, stdin: Path | None, cancel: threading.Event,
        timeout: float,
    ) -> CommandResult:  # fmt: skip
        s = self.settings
        return files.beside(
            req,
            cid,
            entry_id,
            cmd=cmd,
            stdin=stdin,
            shell=self.shell,
            open_sender=lambda: transfer.Sender(self.store.redis, self.store.keys.output(cid)),
            cancel=cancel,
            timeout=timeout,
            kill_grace=s.kill_grace,
            root_commands=s.root_commands,
        )

    def _renew(self) -> int:
        """Replace a shell that failed with a new one (a new epoch); return the failed shell's epoch."""
        old = self.shell
        with contextlib.suppress(OSError):
            old.close()
        self.shell = self._new_shell()
        self.shell.epoch = old.epoch + 1
        return old.epoch

    def _from_shell(self, cid: str, entry_id: str, r: ShellResult) -> CommandResult:
        fields = {name: getattr(r, name) for name in _SHELL_FIELDS}
        fields["duration_ms"] = round(r.duration_ms, 3)
        if r.status == "cancelled" and self._terminated:
            fields.update(status="interrupted", exit_code=None, error="the worker was stopped while the command ran")
        return CommandResult(id=cid, entry_id=entry_id, **fields)  # validating costs less than model_construct

    # -- faults ----------------------------------------------------------------------------------------------------

    def _reconnect(self, error: RedisUnavailableError, holding: bool = False) -> None:
        """Wait for Redis with backoff, then make sure the session and the lease are still there, and pick up a
        command whose take reply was lost on the way. Asked to stop meanwhile, it gives up at once, or, `holding` a
        result to commit, after the shutdown grace (the next worker of the session then answers that command
        `interrupted`). An outage is logged once when it starts and once when a take succeeds again (`_recovered`);
        the backoff goes on across calls until then, since a Redis that refuses commands (out of memory, say)
        answers the steps here, and a commit (see functions.lua), and refuses the next take again."""
        if self._outage is None:
            self._outage, self._delay = time.monotonic(), 0.05
            log.warning("Redis unavailable (%s); retrying", error)
        stop_seen = None
        while True:
            if self.stopping.is_set() and self.running is None:
                stop_seen = stop_seen or time.monotonic()
                if not holding or time.monotonic() - stop_seen > max(self.settings.shutdown_grace, 1.0):
                    raise error
            time.sleep(self._delay)
            self._delay = min(self._delay * 2, 2.0)
            self._refused = str(error) if isinstance(error, RedisRefusedError) else ""
            try:
                self._resume()
                return
            except RedisUnavailableError as e:
                error = e

    def _resume(self) -> None:
        """After an outage: PING, the session's state, the lease, and the commands delivered to this worker."""
        self.store.redis.call("PING")
        self.store.check_session()
        if self.store.acquire() is None:
            raise FencedError("the lease was taken over while Redis was unreachable; this worker stops")
        entries, _ = self.store.pending()
        self._backlog = [
            e for e in sorted(entries, key=lambda e: protocol.entry_key(e[0])) if e[0] not in self._started
        ]
        self._last = self.store.last_delivered()

    def _recovered(self) -> None:
        """A take succeeded: an outage in progress is over (a refusal's end is beaten at once, so that no waiting
        producer gives up on a refusal already over)."""
        if self._outage is not None:
            log.info("Redis is back after %.1fs", time.monotonic() - self._outage)
            self._outage = None
            if self._refused:
                self._refused = ""
                self.renewed(self.store.beat(self.heartbeat_fields()))

    def _record_loss(self, reason: str) -> None:
        try:
            answered = self.store.mark_lost(reason)
            log.error("answered %d queued commands 'unavailable'", answered)
        except ShellqError as e:
            log.warning("could not record the loss: %s", e)

    def _fault(self, step: str) -> None:
        if self.settings.fault == step and self._taken == self.settings.fault_after:
            log.warning("fault injection: killing the worker at step %r", step)
            os.kill(os.getpid(), signal.SIGKILL)

    def _terminate(self) -> None:
        with self._lock:
            if self.running:
                self._terminated = True
                self.running[1].set()
                self.shell.interrupt()

    # -- for the control thread ------------------------------------------------------------------------------------

    def heartbeat_fields(self) -> dict[str, Any]:
        running = self.running
        return {
            "state": "running" if running else "idle",
            "current": running[0] if running else "",
            "pid": os.getpid(),
            "instance": self.settings.instance,
            "host": HOST,
            "shell_pid": self.shell.pid,
            "shell_epoch": self.shell.epoch,
            "queue_cap": self.settings.queue_cap,
            "refused": self._refused,
        }

    def renewed(self, ok: bool) -> None:
        """The lease was renewed (or found lost: then stop at once, killing the running command)."""
        if ok:
            self._lease_fresh_until = time.monotonic() + self.settings.lease_ttl / 2
            return
        log.error("lost the lease of session %s to another worker; stopping", self.settings.session)
        self._serving = False
        self._lease_fresh_until = 0.0
        self.stopping.set()
        self._terminate()


def _result(cid: str, entry_id: str, status: protocol.Status, error: str, shell_epoch: int = 0) -> CommandResult:
    return CommandResult(id=cid, entry_id=entry_id, status=status, error=error or None, shell_epoch=shell_epoch)


def _duplicate(cid: str, entry_id: str, original: str) -> CommandResult:
    """The result of an entry that reuses the command id of another entry: `rejected` under its own entry id (the
    command id's result stays the original's), never run."""
    error = f"duplicate command id {cid!r}: it belongs to entry {original}; this entry was not run"
    return _result(entry_id, entry_id, "rejected", error)
