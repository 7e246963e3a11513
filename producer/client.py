"""The client agents use: submit commands to a session, wait for their results, interrupt them."""

from __future__ import annotations

import getpass
import math
import os
import socket
import time
import uuid
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import hiredis
import redis
from pydantic import Field

from producer import core, files
from producer import history as _history
from producer.result import Chunk, FileInfo, Result
from worker import protocol
from worker.errors import (
    InvalidResultError,
    NoWorkerError,
    RedisUnavailableError,
    ResultTimeoutError,
    ShellqError,
    WaitError,
)
from worker.protocol import CommandRequest, EnvSettings

RUN_MARGIN = core.RUN_MARGIN


def _default_name() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a uid with no passwd entry (a container's)
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


T = TypeVar("T")


class ClientSettings(EnvSettings):
    """How a producer reaches Redis and decides that nobody serves a session."""

    redis_url: str = "redis://localhost:6379/0"
    """Redis URL (redis://, rediss://, user:pass@)."""
    no_worker_after: float = Field(default=10.0, gt=0)
    """Seconds without a worker heartbeat after which a wait raises NoWorkerError."""
    default_timeout: float = Field(default=protocol.DEFAULT_TIMEOUT, gt=0)
    """The timeout `run()` waits for when the command names none (the worker applies its own)."""
    journal_ttl: int = Field(default=7 * 86400, ge=1, le=protocol.JOURNAL_TTL_MAX)
    """Seconds a submitted command id stays known (the idempotent-submit window)."""
    queue_cap: int = Field(default=1000, ge=1)
    """Unfinished commands a session may hold until its worker has said its own cap."""
    client_name: str = Field(default_factory=_default_name, max_length=200)
    """Who this client is, recorded with each command it submits (`by`; `shellq log` shows it): user@host."""
    retry_for: float = Field(default=10.0, ge=0)
    """Seconds each call keeps retrying while Redis cannot be reached or does not answer (safe: submits are
    idempotent by id); a Redis that accepts connections and never answers adds one read timeout (10 s)."""


_redis_errors = core.redis_errors


class Client:
    """A connection to the Redis that holds the sessions. Thread-safe; one per process is enough."""

    def __init__(self, url: str | None = None, *, settings: ClientSettings | None = None) -> None:
        self.settings = settings or ClientSettings.from_env(redis_url=url)
        self.redis = redis.Redis.from_url(
            self.settings.redis_url,
            socket_timeout=core.READ_TIMEOUT,
            socket_connect_timeout=core.CONNECT_TIMEOUT,
            retry=core.RetryFor(self.settings.retry_for),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
            **core.connection_options(self.settings.redis_url),
        )
        self._functions_loaded = False
        self._idle: list[Any] = []  # the hot path's connections not in use (list.pop and append are atomic)
        # A client nobody closed may end in a reference cycle (an exception's traceback holds the frames that hold
        # it); the garbage collector then finalizes its sockets in any order. This closes them first.
        self._closer = weakref.finalize(self, _disconnect, self.redis, self._idle)

    @classmethod
    def from_env(cls) -> Client:
        """A client for SHELLQ_REDIS_URL."""
        return cls()

    def session(self, session_id: str) -> Session:
        """A handle on a session's streams; nothing is checked or created until it is used."""
        return Session(self, session_id)

    def run_many(self, items: Sequence[tuple[Any, ...]], timeout: float | None = None) -> list[Result | ShellqError]:
        """Run many commands, on many sessions, at once: one pipelined round trip submits them all, then one
        blocking read at a time waits on every result stream that still owes a result (re-armed as results come).

        items: `(session, command)` or `(session, command, options)`, options being `run`'s keyword arguments
        (`timeout`, `id`, `idempotent`, `env`, `cwd`, `user`, `merge_stderr`; not `stdin`); commands for one session run
        in the order given. timeout: the execution limit of the items that give none (seconds; None: the worker's).
        Returns one entry per item, in input order: its Result, or the ShellqError that item met in its place
        (NoWorkerError for a session no worker serves, QueueFullError, ResultTimeoutError, InvalidRequestError for a
        malformed item...): each item stands alone, and one session's trouble costs the others nothing. Errors are
        returned rather than given a Result of their own, since a Result says what happened to a command in its shell,
        and these commands never got there (or their outcome is unknown): `isinstance(r, Result)` tells them apart, and
        the error keeps its type and its `cancelled`. A wait that gives up cancels that command as `run` does. Raises
        only for what stops every item: RedisUnavailableError, AccessDeniedError."""
        from producer.batch import run_many

        return run_many(self, items, timeout)

    def create_session(
        self,
        session_id: str | None = None,
        *,
        backend: str = "docker",
        host: str | None = None,
        timeout: float = 120.0,
        **options: Any,
    ) -> Session:
        """Have a `shellq manager` start a session and return its handle once its worker's heartbeat was seen.

        backend: "docker" (the only backend a manager runs); host: the Docker host whose manager starts it (None:
        the only one running); options: those of DockerBackend.start (`image`, `memory`, `cpus`, `pids`, `disk`,
        `user`, `read_only`, `mounts`, `network`, `env`, `start_timeout`), checked here. Needs the admin's URL (the
        managers' queues are the admin's). Raises NoManagerError, SessionStartError (with the container's last
        log lines), ConfigError (a bad option, a mount or network the manager does not allow), ResultTimeoutError
        after `timeout` seconds."""
        from containers import jobs

        if backend != "docker":
            raise ValueError(f"a manager starts docker sessions, not {backend!r} ones")
        name = protocol.check_id(session_id or f"s-{uuid.uuid4().hex[:8]}", "session id")
        options = {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}
        with _redis_errors(self.settings.redis_url):
            jobs.create_session(self.redis, name, options, host=host, timeout=timeout)
        return self.session(name)

    def close(self) -> None:
        self._closer()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, *commands: tuple[Any, ...], errors_in_place: bool = False) -> list[Any]:
        """Send `commands` pipelined on a connection of the client's own and return their raw replies, retrying a
        connection that fails like every other call does (resending is safe: submits are idempotent by id). An
        error reply raises redis.ResponseError, or with `errors_in_place` is returned in its place.
        Connections are made like the pool's, but kept in a plain list: taking one from redis-py's pool and giving
        it back cost more than the rest of a submit's client side."""
        try:
            conn = self._idle.pop()
        except IndexError:
            conn = self.redis.connection_pool.make_connection()
        if conn.pid != os.getpid():  # made before a fork: the parent's socket is not ours to use
            conn = self.redis.connection_pool.make_connection()
        try:
            with _redis_errors(self.settings.redis_url):
                replies: list[Any] = conn.retry.call_with_retry(
                    lambda: _roundtrip(conn, *commands, errors_in_place=errors_in_place), lambda _: conn.disconnect()
                )
        finally:  # kept even after an error: its replies were all read, or it was disconnected and will reconnect
            self._idle.append(conn)
        return replies

    def fcall(self, *commands: tuple[Any, ...]) -> list[Any]:
        """`send` commands that call shellq's functions (FCALL); loads the library first if this client has not, and
        again if Redis answers "Function not found" (it came back empty). ConfigError for a library of another
        version; other error replies raise redis.ResponseError."""
        self.ensure_functions()
        for attempt in (1, 2):
            try:
                return self.send(*commands)
            except redis.ResponseError as e:
                if refusal := protocol.version_refusal(e):
                    raise refusal from None
                if "Function not found" not in str(e) or attempt == 2:
                    raise
                self.ensure_functions(again=True)
        raise AssertionError("unreachable")

    def ensure_functions(self, again: bool = False) -> None:
        """Load shellq's Redis functions unless this client did already (`protocol.load_functions`); `again` after
        Redis answered "Function not found" (it came back empty)."""
        if again or not self._functions_loaded:
            with _redis_errors(self.settings.redis_url):
                protocol.load_functions(self.redis.execute_command, redis.ResponseError)
            self._functions_loaded = True


class Session:
    """One session: its command stream, result stream and control stream."""

    def __init__(self, client: Client, session_id: str) -> None:
        self.client = client
        self.id = session_id
        self.keys = protocol.keys(session_id)
        self._last_seen: str | None = None  # newest result entry this handle has seen

    def submit(
        self,
        cmd: str | bytes,
        *,
        id: str | None = None,
        timeout: float | None = None,
        idempotent: bool = False,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | None = None,
        user: str | None = None,
        merge_stderr: bool = False,
    ) -> str:
        """Queue a command and return its id at once (with a large `stdin`, once the worker has taken all but the
        last few MiB of it). Submitting an id that was accepted before returns that id again without queueing
        anything (retries are safe). `stdin`, `user` and `merge_stderr` as in `run`."""
        req = core.request(cmd, id, timeout, idempotent, env, cwd, user, merge_stderr)
        if stdin is None and len(req.cmd) <= files.INLINE:
            return self._submit(req, read_from=None)[0]
        return self._with_input(req, files.submit_with_input(self, req, stdin, timeout))

    def run(
        self,
        cmd: str | bytes,
        timeout: float | None = None,
        *,
        id: str | None = None,
        idempotent: bool = False,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        stdin: bytes | None = None,
        user: str | None = None,
        merge_stderr: bool = False,
    ) -> Result:
        """Submit a command and wait for its result. `timeout` is the execution limit in seconds: an overrun returns
        a result with status `timeout`; the wait itself lasts up to the timeout plus RUN_MARGIN (30 s). A wait that
        gives up (NoWorkerError: no worker serves the session; ResultTimeoutError) cancels the command if no worker
        has taken it yet: the error's `cancelled` is then True and the command never runs. If a worker had taken
        it, `cancelled` is False (it is running or ran); if its result came meanwhile, that result is returned.
        Raises SessionStateLostError, QueueFullError, ConfigError, InvalidRequestError, InvalidResultError (a result
        entry that cannot be read) and RedisUnavailableError as well.

        `stdin`: bytes fed to the command's stdin, any size, NULs included (default: /dev/null); more than 512 KiB
        go in chunks, spooled to disk by the worker. `user`: run this one command as that user (a name or uid), in
        a child of the session's shell with its exported variables and current directory, changing none of the
        shell's state (`env` and `cwd` then apply to that command only); the worker must be able to switch users
        (in a container, or a worker running as root), and an unknown user is a `rejected` result naming it. A
        command over the 1 MiB entry cap goes in chunks too. `merge_stderr`: the command's stderr goes to its
        stdout (`2>&1`), interleaved in the order written; the result's stderr is then empty."""
        req = core.request(cmd, id, timeout, idempotent, env, cwd, user, merge_stderr)
        if stdin is not None or len(req.cmd) > files.INLINE:
            return Result.from_wire(self._with_input(req, files.run_with_input(self, req, stdin, timeout)))
        deadline = time.monotonic() + (timeout or self.client.settings.default_timeout) + RUN_MARGIN
        if self._last_seen is None:
            self._last_seen = self._tail()
        cid, new, reply = self._submit(req, read_from=self._last_seen)
        try:
            if not new:
                return self.result(cid, timeout=max(0.0, deadline - time.monotonic()))
            try:
                found = self._found(cid, *reply)
            except InvalidResultError as e:
                return self._give_up(cid, e, cancel=True)
            return found or self._wait(cid, deadline)
        except RedisUnavailableError as e:
            raise core.may_run(e, cid) from None

    def result(self, command_id: str, timeout: float = 60.0, *, cancel: bool = True) -> Result:
        """The result of a command, waiting up to `timeout` seconds for it. Raises ResultTimeoutError when it does
        not come in time and NoWorkerError when no worker serves the session; as in `run`, giving up cancels the
        command if no worker has taken it yet (the error's `cancelled` says so), unless `cancel` is False (to poll
        a command that should stay queued). InvalidResultError when its result entry cannot be read."""
        deadline = time.monotonic() + timeout
        journal, tail = self.client.send(self._journal(command_id), ("XREVRANGE", self.keys.res, "+", "-", "COUNT", 1))
        if found := self._found(command_id, None, journal):
            return found
        self._last_seen = tail[0][0].decode() if tail else "0-0"
        return self._wait(command_id, deadline, cancel)

    def stream(self, command_id: str, timeout: float | None = None, *, cancel: bool = False) -> Iterator[Chunk]:
        """The command's output while it runs: Chunks (`chunk.stream` "stdout" or "stderr", `chunk.data` bytes,
        `chunk.offset`) in the order the worker read them, ending when its result is committed (`result()` then
        returns it at once). A reader that starts late gets what the live stream still holds, then the rest; the
        bytes the live stream lacks (output of the command's last moments, of a command over in a few
        milliseconds, or dropped past the live rate) come from the result at the end, as far as its head and tail
        hold them: `offset` shows any gap. Stopping to read changes nothing. Raises NoWorkerError when no worker
        serves the session, ResultTimeoutError after `timeout` seconds (None: no limit), InvalidResultError,
        RedisUnavailableError; with `cancel`, such a wait that gives up cancels the command if no worker has taken
        it yet, as `result` does (the error's `cancelled` says so)."""
        follow = core.Follow(self.keys, protocol.check_id(command_id, "command id"))
        journal, tail = self.client.send(self._journal(command_id), core.tail_call(self.keys))
        follow.start(journal, tail)
        started = time.monotonic()
        deadline = math.inf if timeout is None else started + timeout
        result = None
        while (found := core.found(self.keys, command_id, None, journal)).result is None and found.fetch is None:
            try:
                if time.monotonic() >= deadline:
                    raise ResultTimeoutError(f"no result for {command_id} on session {self.id} in time")
                block = max(1, int(min(deadline - time.monotonic(), 1.0) * 1000))
                read, journal = self.client.send(follow.read_call(block), self._journal(command_id))
                yield from follow.take(read)
                if time.monotonic() - started >= self.client.settings.no_worker_after:
                    self._check_worker()
            except (NoWorkerError, ResultTimeoutError) as e:
                result = self._give_up(command_id, e, cancel)  # raises unless the result came meanwhile
                break
        while rest := self.client.send(follow.rest_call())[0]:
            yield from follow.take(rest)
        yield from follow.rest(result or found.result or self._read_result(command_id, found.fetch or ""))

    # -- history: read back and run again (producer/history.py) -------------------------------------------------

    def history(self, since: str | None = None, until: str | None = None) -> list[_history.Record]:
        """The session's commands in order, each with its result (None while it has none): after `since`, up to
        `until` (command ids or entry ids). Reads the streams only: works without a worker."""
        return _history.history(self, since, until)

    def replay(
        self, destination: Session | str, *, until: str | None = None, dry_run: bool = False, skip_failed: bool = False
    ) -> _history.Report:
        """Run this session's commands again, in order, in `destination` (a Session, possibly of another server,
        or a session id on this one), under ids derived from these (a replay run again runs nothing twice);
        returns each command's original and replayed ends (`Report.first_difference`). What is replayed and
        skipped: producer/history.py."""
        target = self.client.session(destination) if isinstance(destination, str) else destination
        return _history.replay(self, target, until=until, dry_run=dry_run, skip_failed=skip_failed)

    def fork(self, new: str, *, timeout: float = 120.0, start_timeout: float = 60.0) -> Session:
        """A new docker session `new` from this one's filesystem (`docker commit`, paused while it is taken) and
        shell state (cwd, exported variables, functions, aliases, options; not its processes), whose meta says
        `forked_from` and `forked_at`; this session goes on untouched. Needs the admin's URL and a docker session
        of this server. ConfigError, ShellqError. See containers/fork.py for what is and is not carried over."""
        from containers.fork import fork_steps

        files.drive(self, fork_steps(self, new, timeout=timeout, start_timeout=start_timeout))
        return self.client.session(new)

    # -- files: ordered with the commands, run as the shell's user (or `user`), relative paths from its cwd ------

    def write_file(
        self, path: str, data: bytes, mode: int | None = None, *, user: str | None = None, timeout: float | None = None
    ) -> None:
        """Put `data` (any size) at `path`: parents made, an existing file replaced atomically, `mode` its
        permission bits (default: the replaced file's, else 0o644). Raises the SessionFileError for what the
        session's OS said (SessionIsADirectoryError, SessionPermissionError...: also IsADirectoryError,
        PermissionError), and what `run` raises."""
        files.drive(self, files.write_file(self, path, data, mode, user, timeout))

    def read_file(
        self,
        path: str,
        max_bytes: int | None = None,
        offset: int = 0,
        *,
        user: str | None = None,
        timeout: float | None = None,
    ) -> bytes:
        """The bytes of `path` from `offset`, at most `max_bytes` (None: all, any size). SessionFileNotFoundError
        (a FileNotFoundError naming the path), SessionIsADirectoryError, SessionPermissionError..."""
        return files.drive(self, files.read_file(self, path, max_bytes, offset, user, timeout))

    def list_dir(
        self,
        path: str,
        recursive: bool = False,
        max_entries: int | None = None,
        *,
        user: str | None = None,
        timeout: float | None = None,
    ) -> list[FileInfo]:
        """The entries of directory `path` sorted by name (with `recursive`, the whole tree below it, depth first;
        symlinks are listed, not followed), at most `max_entries`. SessionNotADirectoryError for a file."""
        return files.drive(self, files.list_dir(self, path, recursive, max_entries, user, timeout))

    def stat(self, path: str, *, user: str | None = None, timeout: float | None = None) -> FileInfo:
        """`path`'s size (bytes), mode, mtime (seconds since the epoch) and kind, a symlink followed (what
        `read_file` would open). SessionFileNotFoundError, SessionPermissionError..."""
        return files.drive(self, files.stat(self, path, user, timeout))

    def archive(
        self, path: str, max_bytes: int = files.ARCHIVE_CAP, *, user: str | None = None, timeout: float | None = None
    ) -> bytes:
        """A tar.gz of `path` (a file or a tree; members named from its basename). FileTooLargeError past
        `max_bytes` bytes of archive."""
        return files.drive(self, files.archive(self, path, max_bytes, user, timeout))

    def upload(
        self, local: str | os.PathLike[str], remote: str, *, user: str | None = None, timeout: float | None = None
    ) -> None:
        """Copy a local file to `remote`, or a local directory's tree into `remote` (made if missing), streamed in
        chunks with bounded memory."""
        files.drive(self, files.upload(self, local, remote, user, timeout))

    def download(
        self, remote: str, local: str | os.PathLike[str], *, user: str | None = None, timeout: float | None = None
    ) -> None:
        """Copy `remote` to a local file, or a remote directory's tree into `local` (made if missing); members that
        would land outside `local` are refused (tarfile's `data` filter)."""
        files.drive(self, files.download(self, remote, local, user, timeout))

    def interrupt(self, command_id: str) -> None:
        """Stop a command: running -> `cancelled` with its partial output; still queued -> `cancelled` unrun."""
        fields = core.interrupt_fields(command_id)
        with _redis_errors(self.client.settings.redis_url):
            self.client.redis.xadd(self.keys.ctl, fields, maxlen=1000, approximate=True)  # type: ignore[arg-type]

    def worker_alive(self) -> bool:
        """Is a worker serving this session: a heartbeat within `no_worker_after` seconds, and neither stopped nor
        gone (its container died for good: DockerBackend.supervise)?"""
        return core.alive(self._alive_reply(), self.client.settings.no_worker_after)

    # -- internals ----------------------------------------------------------------------------------------------

    def _submit(self, req: CommandRequest, read_from: str | None) -> tuple[str, bool, Any]:
        """FCALL shellq_submit, pipelined with a blocking read of the result stream when `read_from` is given."""
        assert req.id is not None
        commands = [self._submit_call(req)]
        if read_from is not None:  # the journal is read once the blocked read returns: a result committed by then
            commands += [core.read_call(self.keys, read_from, 1000), core.journal_call(self.keys, req.id)]
        try:
            replies = self.client.fcall(*commands)
        except RedisUnavailableError as e:  # its reply lost on the way, the command may be queued (core.unsent)
            raise e if core.unsent(e) else core.may_run(e, req.id) from None
        return req.id, self._submitted(req, replies[0]), replies[1:] if read_from is not None else None

    def _with_input(self, req: CommandRequest, steps: files.Steps[T]) -> T:
        """files.drive of the steps of a command with stdin or over the entry cap (several calls: once Redis goes
        after the first, the command may have been queued, and the error says so)."""
        self.client.ensure_functions()  # a Redis gone from the start fails here, before anything is sent
        try:
            return files.drive(self, steps)
        except RedisUnavailableError as e:
            raise core.may_run(e, str(req.id)) from None

    def _submit_call(self, req: CommandRequest) -> tuple[Any, ...]:
        settings = self.client.settings
        return core.submit_call(self.keys, settings, req)

    def _submitted(self, req: CommandRequest, reply: Any) -> bool:
        return core.submitted(self.id, req, reply)

    def _tail(self) -> str:
        with _redis_errors(self.client.settings.redis_url):
            tail: Any = self.client.redis.xrevrange(self.keys.res, count=1)
        return core.tail_id(tail)

    def _journal(self, command_id: str) -> tuple[Any, ...]:
        return core.journal_call(self.keys, command_id)

    def _found(self, command_id: str, read: Any, journal: Any) -> Result | None:
        """core.found, fetching the result entry when the read did not hold it; remembers the newest entry seen."""
        found = core.found(self.keys, command_id, read, journal)
        self._last_seen = found.newest or self._last_seen
        if found.fetch is not None:
            return self._read_result(command_id, found.fetch)
        return found.result

    def _read_result(self, command_id: str, rid: str) -> Result:
        """The result entry `rid` of `command_id` (XRANGE res rid rid)."""
        with _redis_errors(self.client.settings.redis_url):
            entries: Any = self.client.redis.xrange(self.keys.res, rid, rid)
        if not entries:
            raise ShellqError(f"the result of {command_id} was trimmed from {self.keys.res}")
        return core.decode(self.keys, command_id, rid, entries[0][1])

    def _wait(self, command_id: str, deadline: float, cancel: bool = True) -> Result:
        """XREAD BLOCK the result stream in slices of at most a second until the result arrives; between slices,
        make sure some worker is alive. Giving up (no worker, no time left, an unreadable result entry) goes through
        `_give_up`."""
        started = time.monotonic()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timeout = ResultTimeoutError(f"no result for {command_id} on session {self.id} in time")
                return self._give_up(command_id, timeout, cancel)
            block = max(1, int(min(remaining, 1.0) * 1000))
            read = core.read_call(self.keys, self._last_seen or "0-0", block)
            try:
                found = self._found(command_id, *self.client.send(read, self._journal(command_id)))
                if found:
                    return found
                if time.monotonic() - started >= self.client.settings.no_worker_after:
                    self._check_worker()
            except (NoWorkerError, InvalidResultError) as e:
                return self._give_up(command_id, e, cancel)

    def _give_up(self, command_id: str, error: WaitError, cancel: bool) -> Result:
        """End a wait: cancel the command unless a worker took it (`_cancel`), then raise `error` saying which;
        return its result instead if one was committed meanwhile."""
        if not cancel:
            raise error
        outcome, rid = self._cancel(command_id, str(error))
        if outcome == "answered" and rid is not None:
            return self._read_result(command_id, rid)
        raise core.give_up_error(error, command_id, outcome)

    def _cancel(self, command_id: str, reason: str) -> tuple[str, str | None]:
        """FCALL shellq_cancel: mark the command cancelled in its journal unless a worker took it, in one atomic step
        (no worker runs it after that; the one that takes it commits it `cancelled`). -> core.cancel_outcome, or
        ("unknown", None): the session never accepted this id (or its journal expired)."""
        settings = self.client.settings
        with _redis_errors(settings.redis_url):
            raw: Any = self.client.redis.hget(self.keys.jrnl(command_id), "entry")
        if raw is None:
            return "unknown", None
        (reply,) = self.client.fcall(
            core.cancel_call(self.keys, settings.journal_ttl, command_id, raw.decode(), reason)
        )
        return core.cancel_outcome(reply)

    def _alive_reply(self) -> Any:
        """FCALL_RO shellq_alive (loading the library if Redis came back empty)."""
        self.client.ensure_functions()
        with _redis_errors(self.client.settings.redis_url):
            try:
                return self.client.redis.execute_command(*core.alive_call(self.keys))  # type: ignore[no-untyped-call]
            except redis.ResponseError as e:
                if refusal := protocol.version_refusal(e):
                    raise refusal from None
                if "Function not found" not in str(e):
                    raise
                self.client.ensure_functions(again=True)
                return self.client.redis.execute_command(*core.alive_call(self.keys))  # type: ignore[no-untyped-call]

    def _check_worker(self) -> None:
        """Raise NoWorkerError when the session's heartbeat is missing or too old, or its worker stopped."""
        core.check_worker(self.id, self._alive_reply(), self.client.settings.no_worker_after)


def _disconnect(client: redis.Redis, idle: list[Any]) -> None:
    while idle:
        idle.pop().disconnect()
    client.close()


def _roundtrip(conn: Any, *commands: tuple[Any, ...], errors_in_place: bool = False) -> list[Any]:
    """Send `commands` in one write on `conn` (a redis-py connection) and read their replies, as a pipeline would
    but without redis-py's client layer (80 µs a call on the hot path); packed by hiredis, which takes str (as
    UTF-8), bytes, int and float, as redis-py's own packer does, at a third of its cost. Replies are raw (RESP3
    once the connection said HELLO 3); the first error reply is raised once every reply has been read. A
    connection or timeout error (or anything else that stops the read half way) closes `conn` (the next use
    reconnects)."""
    try:
        conn.send_packed_command([b"".join(hiredis.pack_command(tuple(c)) for c in commands)])
        replies, error = [], None
        for _ in commands:
            try:
                replies.append(conn.read_response())
            except redis.ResponseError as e:
                error = error or e
                replies.append(e if errors_in_place else None)
    except BaseException:  # unread replies would answer the next call: start that one on a new connection
        conn.disconnect()
        raise
    if error is not None and not errors_in_place:
        raise error
    return replies
