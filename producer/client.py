"""The client agents use: submit commands to a session, wait for their results, interrupt them."""

from __future__ import annotations

import math
import os
import secrets
import time
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from pydantic import Field, ValidationError
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from producer.result import Result
from worker import protocol
from worker.errors import (
    AccessDeniedError,
    ConfigError,
    InvalidRequestError,
    InvalidResultError,
    NoWorkerError,
    QueueFullError,
    RedisUnavailableError,
    ResultTimeoutError,
    SessionStateLostError,
    ShellqError,
    WaitError,
)
from worker.protocol import CommandRequest, CommandResult, ControlRequest, DecodeError, EnvSettings

RUN_MARGIN = 30.0
"""`run()` waits this much longer than the command's timeout before giving up on a result."""
_READ_COUNT = 16


class ClientSettings(EnvSettings):
    """How a producer reaches Redis and decides that nobody serves a session."""

    redis_url: str = "redis://localhost:6379/0"
    """Redis URL (redis://, rediss://, user:pass@)."""
    no_worker_after: float = Field(default=10.0, gt=0)
    """Seconds without a worker heartbeat after which a wait raises NoWorkerError."""
    default_timeout: float = Field(default=protocol.DEFAULT_TIMEOUT, gt=0)
    """The timeout `run()` waits for when the command names none (the worker applies its own)."""
    journal_ttl: int = Field(default=7 * 86400, ge=1)
    """Seconds a submitted command id stays known (the idempotent-submit window)."""
    queue_cap: int = Field(default=1000, ge=1)
    """Unfinished commands a session may hold until its worker has said its own cap."""
    retry_for: float = Field(default=10.0, ge=0)
    """Seconds each call keeps retrying while Redis cannot be reached (safe: submits are idempotent by id)."""


@contextmanager
def _redis_errors(url: str) -> Iterator[None]:
    try:
        yield
    except (redis.AuthenticationError, redis.exceptions.NoPermissionError) as e:  # WRONGPASS, NOAUTH; NOPERM
        raise AccessDeniedError(f"Redis at {_redact(url)} refused this user: {e}") from None
    except (redis.ConnectionError, redis.TimeoutError) as e:
        raise RedisUnavailableError(f"cannot reach Redis at {_redact(url)}: {e}") from e


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}***@{rest.split('@', 1)[1]}" if "@" in rest else url


class Client:
    """A connection to the Redis that holds the sessions. Thread-safe; one per process is enough."""

    def __init__(self, url: str | None = None, *, settings: ClientSettings | None = None) -> None:
        self.settings = settings or ClientSettings.from_env(redis_url=url)
        retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=5 + math.ceil(self.settings.retry_for))
        self.redis = redis.Redis.from_url(
            self.settings.redis_url,
            socket_timeout=30,
            socket_connect_timeout=2,
            retry=retry,
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
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

    def send(self, *commands: tuple[Any, ...]) -> list[Any]:
        """Send `commands` pipelined on a connection of the client's own and return their raw replies, retrying a
        connection that fails like every other call does (resending is safe: submits are idempotent by id).
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
                    lambda: _roundtrip(conn, *commands), lambda _: conn.disconnect()
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
    ) -> str:
        """Queue a command and return its id at once. Submitting an id that was accepted before returns that id
        again without queueing anything (retries are safe)."""
        return self._submit(self._request(cmd, id, timeout, idempotent, env, cwd), read_from=None)[0]

    def run(
        self,
        cmd: str | bytes,
        timeout: float | None = None,
        *,
        id: str | None = None,
        idempotent: bool = False,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> Result:
        """Submit a command and wait for its result. `timeout` is the execution limit in seconds: an overrun returns
        a result with status `timeout`; the wait itself lasts up to the timeout plus RUN_MARGIN (30 s). A wait that
        gives up (NoWorkerError: no worker serves the session; ResultTimeoutError) cancels the command if no worker
        has taken it yet: the error's `cancelled` is then True and the command never runs. If a worker had taken
        it, `cancelled` is False (it is running or ran); if its result came meanwhile, that result is returned.
        Raises SessionStateLostError, QueueFullError, ConfigError, InvalidRequestError, InvalidResultError (a result
        entry that cannot be read) and RedisUnavailableError as well."""
        req = self._request(cmd, id, timeout, idempotent, env, cwd)
        deadline = time.monotonic() + (timeout or self.client.settings.default_timeout) + RUN_MARGIN
        if self._last_seen is None:
            self._last_seen = self._tail()
        cid, new, reply = self._submit(req, read_from=self._last_seen)
        if not new:
            return self.result(cid, timeout=max(0.0, deadline - time.monotonic()))
        try:
            found = self._found(cid, *reply)
        except InvalidResultError as e:
            return self._give_up(cid, e, cancel=True)
        return found or self._wait(cid, deadline)

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

    def interrupt(self, command_id: str) -> None:
        """Stop a command: running -> `cancelled` with its partial output; still queued -> `cancelled` unrun."""
        fields = protocol.encode(ControlRequest(op="interrupt", id=protocol.check_id(command_id, "command id")))
        with _redis_errors(self.client.settings.redis_url):
            self.client.redis.xadd(self.keys.ctl, fields, maxlen=1000, approximate=True)  # type: ignore[arg-type]

    # -- internals ----------------------------------------------------------------------------------------------

    def _request(
        self,
        cmd: str | bytes,
        cid: str | None,
        timeout: float | None,
        idempotent: bool,
        env: dict[str, str] | None,
        cwd: str | None,
    ) -> CommandRequest:
        body = cmd.encode() if isinstance(cmd, str) else cmd
        if cid is not None:
            protocol.check_id(cid, "command id")
            if protocol.is_entry_id(cid):
                raise ConfigError(f"command id {cid!r} looks like a stream entry id; pick another")
        try:
            req = CommandRequest(
                id=cid or f"c-{secrets.token_hex(8)}",
                cmd=body,
                timeout=timeout,
                env=env,
                cwd=cwd,
                idempotent=idempotent,
            )
        except ValidationError as e:
            raise ConfigError(str(e)) from None
        return req

    def _submit(self, req: CommandRequest, read_from: str | None) -> tuple[str, bool, Any]:
        """FCALL shellq_submit, pipelined with a blocking read of the result stream when `read_from` is given."""
        assert req.id is not None
        k, settings = self.keys, self.client.settings
        fields = protocol.encode(req)
        size = sum(len(name) + len(value) for name, value in fields.items())
        if size > protocol.MAX_ENTRY_BYTES:
            raise InvalidRequestError(f"command entry is {size} bytes; the limit is {protocol.MAX_ENTRY_BYTES}")
        submit: tuple[Any, ...] = ("FCALL", "shellq_submit", 3, k.cmd, k.jrnl(req.id), k.seq)
        submit += (protocol.CALLER, settings.journal_ttl, settings.queue_cap, req.id)
        submit += tuple(x for kv in fields.items() for x in kv)
        commands = [submit]
        if read_from is not None:  # the journal is read once the blocked read returns: a result committed by then
            commands.append(("XREAD", "COUNT", _READ_COUNT, "BLOCK", 1000, "STREAMS", k.res, read_from))
            commands.append(self._journal(req.id))
        replies = self.client.fcall(*commands)
        outcome = int(replies[0][0])
        if outcome == -1:
            depth, cap = replies[0][1], replies[0][2]
            raise QueueFullError(f"session {self.id} holds {depth} unfinished commands; its cap is {cap}")
        if outcome == -2 and replies[0][1] == b"lost":
            raise SessionStateLostError(f"session {self.id}: Redis lost its state; its worker stopped")
        if outcome == -2:
            message = f"session {self.id}: its environment is gone (container exited); start it again"
            raise NoWorkerError(message + f"; {req.id} was not queued", cancelled=True)
        return req.id, bool(outcome), replies[1:] if read_from is not None else None

    def _tail(self) -> str:
        with _redis_errors(self.client.settings.redis_url):
            tail: Any = self.client.redis.xrevrange(self.keys.res, count=1)
        return str(tail[0][0].decode()) if tail else "0-0"

    def _journal(self, command_id: str) -> tuple[Any, ...]:
        """HMGET of what the command's journal says: the result entry its worker committed, why it was cancelled
        before it started, its command entry."""
        return ("HMGET", self.keys.jrnl(command_id), "res", "cancelled", "entry")

    def _found(self, command_id: str, read: Any, journal: Any) -> Result | None:
        """The command's result if its journal (an HMGET reply of `_journal`) names one; `read` is the raw XREAD
        reply sent before it in the same round trip, which usually holds the entry. The journal, written only in
        the worker's commit, decides which entry is the result: an entry on the result stream that merely carries
        the command's id is not it. A command cancelled before any worker took it is answered from the journal."""
        newest = None
        for eid, fields in protocol.stream_entries(read) if read else ():
            newest = eid
            if journal[0] is not None and eid == journal[0].decode():
                self._last_seen = newest
                return self._decode(command_id, eid, fields)
        self._last_seen = newest or self._last_seen
        if journal[0] is not None:
            return self._read_result(command_id, journal[0].decode())
        if journal[1] is not None:
            return _cancelled(command_id, journal[2], journal[1])
        return None

    def _read_result(self, command_id: str, rid: str) -> Result:
        """The result entry `rid` of `command_id` (XRANGE res rid rid)."""
        with _redis_errors(self.client.settings.redis_url):
            entries: Any = self.client.redis.xrange(self.keys.res, rid, rid)
        if not entries:
            raise ShellqError(f"the result of {command_id} was trimmed from {self.keys.res}")
        return self._decode(command_id, rid, entries[0][1])

    def _decode(self, command_id: str, rid: str, fields: dict[bytes, bytes]) -> Result:
        """A result entry as a Result; InvalidResultError naming the entry when it cannot be read or answers another
        command (a journal pointed at the wrong entry)."""
        where = f"result entry {rid} on {self.keys.res} (for command {command_id})"
        try:
            result = Result.from_wire(protocol.decode(CommandResult, fields))
        except (DecodeError, ValidationError) as e:
            raise InvalidResultError(f"{where} cannot be read: {e}") from None
        if result.id != command_id:
            raise InvalidResultError(f"{where} answers command {result.id!r}, not this one")
        return result

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
            read = ("XREAD", "COUNT", _READ_COUNT, "BLOCK", block, "STREAMS", self.keys.res, self._last_seen or "0-0")
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
        if outcome == "cancelled":
            raise type(error)(f"{error}; {command_id} had not started: it is cancelled and will never run", True)
        if outcome == "started":
            raise type(error)(
                f"{error}; {command_id} had started (a worker took it): it is running or ran, and its result comes "
                "when a worker commits it"
            )
        raise error

    def _cancel(self, command_id: str, reason: str) -> tuple[str, str | None]:
        """FCALL shellq_cancel: mark the command cancelled in its journal unless a worker took it, in one atomic step
        (no worker runs it after that; the one that takes it commits it `cancelled`). -> ("cancelled", None) |
        ("answered", result id) | ("started", None) | ("unknown", None): the session never accepted this id (or its
        journal expired)."""
        k, settings = self.keys, self.client.settings
        with _redis_errors(settings.redis_url):
            raw: Any = self.client.redis.hget(k.jrnl(command_id), "entry")
        if raw is None:
            return "unknown", None
        call: tuple[Any, ...] = ("FCALL", "shellq_cancel", 2, k.cmd, k.jrnl(command_id))
        call += (protocol.CALLER, protocol.GROUP, raw.decode(), settings.journal_ttl, reason)
        (reply,) = self.client.fcall(call)
        outcome = {1: "cancelled", 3: "cancelled", 0: "answered", 2: "started"}.get(int(reply[0]), "unknown")
        return outcome, reply[1].decode() if outcome == "answered" else None

    def worker_alive(self) -> bool:
        """Is a worker serving this session: a heartbeat within `no_worker_after` seconds, and neither stopped nor
        gone (its container died for good: DockerBackend.supervise)?"""
        age, state = self._heartbeat()
        return age is not None and age <= self.client.settings.no_worker_after and state not in ("stopped", "gone")

    def _heartbeat(self) -> tuple[float | None, str | None]:
        """FCALL_RO shellq_alive: seconds since the last heartbeat (by the server's clock) and the worker's state."""
        self.client.ensure_functions()
        with _redis_errors(self.client.settings.redis_url):
            try:
                reply: Any = self.client.redis.fcall_ro("shellq_alive", 1, self.keys.meta, protocol.CALLER)
            except redis.ResponseError as e:
                if refusal := protocol.version_refusal(e):
                    raise refusal from None
                if "Function not found" not in str(e):
                    raise
                self.client.ensure_functions(again=True)
                reply = self.client.redis.fcall_ro("shellq_alive", 1, self.keys.meta, protocol.CALLER)
        now_ms, beat, state = reply
        return (None if beat is None else (int(now_ms) - int(beat)) / 1000), (state.decode() if state else None)

    def _check_worker(self) -> None:
        """Raise NoWorkerError when the session's heartbeat is missing or too old, or its worker stopped."""
        age, state = self._heartbeat()
        limit = self.client.settings.no_worker_after
        if state == "lost":
            raise SessionStateLostError(f"session {self.id}: Redis lost its state; its worker stopped")
        if state == "gone":
            raise NoWorkerError(f"session {self.id}: its environment is gone (container exited)")
        if age is None:
            raise NoWorkerError(f"no worker has ever served session {self.id}")
        if age > limit or state == "stopped":
            raise NoWorkerError(f"no worker serves session {self.id}: last heartbeat {age:.1f}s ago ({state})")


def _cancelled(command_id: str, entry_id: bytes | None, reason: bytes) -> Result:
    """The result of a command a producer cancelled before any worker took it, as its journal tells it (the worker
    that takes it later commits the same on the result stream)."""
    error = protocol.cancelled_error(reason.decode(errors="replace"))
    entry = entry_id.decode() if entry_id else ""
    return Result.from_wire(CommandResult(id=command_id, entry_id=entry, status="cancelled", error=error))


def _disconnect(client: redis.Redis, idle: list[Any]) -> None:
    while idle:
        idle.pop().disconnect()
    client.close()


def _roundtrip(conn: Any, *commands: tuple[Any, ...]) -> list[Any]:
    """Send `commands` in one write on `conn` (a redis-py connection) and read their replies, as a pipeline would
    but without redis-py's client layer (80 µs a call on the hot path). Replies are raw (RESP3 once the connection
    said HELLO 3); the first error reply is raised once every reply has been read. A connection or timeout error
    (or anything else that stops the read half way) closes `conn` (the next use reconnects)."""
    try:
        conn.send_packed_command(conn.pack_commands(commands))
        replies, error = [], None
        for _ in commands:
            try:
                replies.append(conn.read_response())
            except redis.ResponseError as e:
                error = error or e
                replies.append(None)
    except BaseException:  # unread replies would answer the next call: start that one on a new connection
        conn.disconnect()
        raise
    if error is not None:
        raise error
    return replies
