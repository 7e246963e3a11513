"""What the sync and async producers share, with no I/O: the commands they send (submit, read, journal, cancel),
what the replies mean, and the errors they raise. `Client` (producer/client.py) and `AsyncClient`
(producer/aio.py) only move these over their connections, so the twins cannot drift apart."""

from __future__ import annotations

import secrets
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import redis
import redis.backoff
import redis.retry
from pydantic import ValidationError

from producer.result import Chunk, Result

if TYPE_CHECKING:
    from producer.client import ClientSettings
from worker import protocol
from worker.errors import (
    AccessDeniedError,
    ConfigError,
    InvalidRequestError,
    InvalidResultError,
    NoWorkerError,
    QueueFullError,
    RedisRefusedError,
    RedisReplyError,
    RedisTimeoutError,
    RedisUnavailableError,
    SessionStateLostError,
    WaitError,
    is_refusal,
)
from worker.protocol import CommandRequest, CommandResult, ControlRequest, DecodeError, OutputChunk

RUN_MARGIN = 30.0
"""`run()` waits this much longer than the command's timeout before giving up on a result."""
READ_COUNT = 16
"""Result entries one read returns at most."""
LIVE_COUNT = 256
"""Live output entries one read returns at most."""
LIVE_SLACK_MS = 1000
"""A reader of live output starts this long before its command was submitted (in case the server's clock stepped
back in between: stream ids follow it)."""
CONNECT_TIMEOUT = 2.0
"""Seconds a connection (TCP, and TLS's handshake) may take to be made."""
READ_TIMEOUT = 10.0
"""Seconds a reply may take: ten times the longest blocking read a producer sends (`XREAD BLOCK 1000`). A Redis
that accepts connections and then says nothing (stopped, or partitioned after the connect) is unavailable after
this, and retried for `retry_for`."""


def retry_until(seconds: float, is_retryable: Callable[[Exception], bool] | None) -> Callable[[Exception], bool]:
    """redis-py's `is_retryable` for a call that may retry for `seconds` from now (see RetryFor): a connection
    error, a timeout, or a refusal (an error reply saying Redis refuses commands for now, such as OOM)."""
    deadline = time.monotonic() + seconds

    def retryable(error: Exception) -> bool:
        if isinstance(error, redis.ResponseError) and not refusal(error):
            return False
        return time.monotonic() < deadline and (is_retryable is None or is_retryable(error))

    return retryable


class RetryFor(redis.retry.Retry):
    """redis-py's Retry bounded by time: no retry starts `seconds` after the call began. redis-py counts attempts,
    and retries a connect inside each retry of a command, so a count bounds little: with 15 retries, a call to a Redis
    that accepted connections and never answered took over five minutes. Backoff: 50 ms doubling up to 1 s."""

    def __init__(self, seconds: float) -> None:
        super().__init__(redis.backoff.ExponentialBackoff(cap=1.0, base=0.05), retries=-1)
        self.update_supported_errors([redis.ResponseError])  # refusals only (see retry_until)
        self.seconds = seconds

    def call_with_retry(
        self,
        do: Callable[[], Any],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> Any:
        attempts = Attempts(retry_until(self.seconds, is_retryable))
        try:
            return super().call_with_retry(do, fail, attempts, with_failure_count)
        except Exception as e:
            attempts.tell(e)
            raise


class Attempts:
    """The failed attempts of one call with retries (an is_retryable filter that remembers what it saw), so that the
    error finally raised can say whether every attempt failed before anything was sent: `unsent(error)`."""

    def __init__(self, retryable: Callable[[Exception], bool]) -> None:
        self.retryable = retryable
        self.failures: list[Exception] = []

    def __call__(self, error: Exception) -> bool:
        self.failures.append(error)
        return self.retryable(error)

    def tell(self, error: Exception) -> None:
        """Mark the error the call raised: were all its attempts failures before anything was sent?"""
        seen = self.failures
        error.shellq_unsent = bool(seen) and error is seen[-1] and all(map(_before_sending, seen))  # type: ignore[attr-defined]


def _before_sending(error: Exception) -> bool:
    """Did this attempt fail before its commands reached Redis: in the connect (redis-py's "Error N connecting to
    HOST:PORT", "Timeout connecting to server"), or refused by Redis (a refused submit queues nothing)?"""
    if isinstance(error, (redis.ConnectionError, redis.TimeoutError)):
        return "connecting to " in str(error)
    return refusal(error) is not None


def unsent(error: BaseException) -> bool:
    """Did every attempt of the call that raised `error` fail before anything reached Redis? Read from `error`, else
    from the error it was raised from (the outermost call that knows says: a connect's own retries know less than
    the command's). False when nothing says."""
    for e in (error, error.__cause__, error.__context__):
        if e is not None and hasattr(e, "shellq_unsent"):
            return bool(e.shellq_unsent)
    return False


@contextmanager
def redis_errors(url: str) -> Iterator[None]:
    """redis-py's (and redis.asyncio's) errors as shellq's: AccessDeniedError, RedisUnavailableError."""
    try:
        yield
    except (redis.AuthenticationError, redis.exceptions.NoPermissionError) as e:  # WRONGPASS, NOAUTH; NOPERM
        raise AccessDeniedError(f"Redis at {redact(url)} refused this user: {e}") from None
    except redis.exceptions.BusyLoadingError as e:  # a ConnectionError to redis-py; a refusal (LOADING) to shellq
        raise RedisRefusedError(f"Redis at {redact(url)} refuses commands now: LOADING {e}") from None
    except redis.TimeoutError as e:
        raise RedisTimeoutError(f"cannot reach Redis at {redact(url)}: {e}") from e
    except redis.ConnectionError as e:
        raise RedisUnavailableError(f"cannot reach Redis at {redact(url)}: {e}") from e
    except redis.ResponseError as e:
        if refusal(e):
            raise RedisRefusedError(f"Redis at {redact(url)} refuses commands now: {refusal(e)}") from None
        raise


def may_run(error: RedisUnavailableError, command_id: str) -> RedisUnavailableError:
    """`error`, saying that `command_id` may have been queued and may still run (its `command_id` set)."""
    said = type(error)(f"{error}; command {command_id} may have been queued and may still run: its result tells")
    said.command_id = command_id
    return said


def refusal(error: Exception) -> str | None:
    """The text of a Redis error reply that refuses commands for now (worker.errors.REFUSALS), else None. redis-py
    cuts the code off the replies it has a class for (OOM, READONLY, MASTERDOWN...) and keeps it in `status_code`."""
    if not isinstance(error, redis.ResponseError):
        return None
    text, code = str(error), getattr(error, "status_code", None)
    if code and not text.startswith(code):
        text = f"{code} {text}"
    return text if is_refusal(text) else None


class TLSConnection(redis.SSLConnection):
    """redis-py's TLS connection with its handshake bounded by the connect timeout, not the read timeout, and a plain
    Redis behind a rediss:// URL named as such (ConfigError, not retried): such a server takes the TLS ClientHello
    for the start of a command and never answers, so each retry would wait out the read timeout (30 s)."""

    def _connect(self) -> Any:
        read_timeout, self.socket_timeout = self.socket_timeout, self.socket_connect_timeout
        try:
            sock = super()._connect()  # type: ignore[no-untyped-call]
        except TimeoutError:
            if answers_plain_resp(self.host, self.port, self.socket_connect_timeout):
                raise not_tls(self.host, self.port) from None
            raise
        finally:
            self.socket_timeout = read_timeout
        sock.settimeout(read_timeout)
        return sock


def not_tls(host: str, port: int) -> ConfigError:
    return ConfigError(f"Redis at {host}:{port} does not speak TLS: use a redis:// URL for it, not rediss://")


def answers_plain_resp(host: str, port: int, timeout: float | None) -> bool:
    """Does HOST:PORT answer a plain-text PING as Redis does (`+PONG`, or an error such as `-NOAUTH`)?"""
    try:
        with socket.create_connection((host, port), timeout=timeout) as probe:
            probe.sendall(b"PING\r\n")
            return probe.recv(1) in (b"+", b"-")
    except OSError:
        return False


def connection_options(url: str) -> dict[str, Any]:
    """Extra redis-py options for `url`: shellq's TLS connection class for rediss:// (see TLSConnection)."""
    return {"connection_class": TLSConnection} if url.lower().startswith("rediss://") else {}


def redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}***@{rest.split('@', 1)[1]}" if "@" in rest else url


def new_id() -> str:
    """A fresh command id."""
    return f"c-{secrets.token_hex(8)}"


def request(
    cmd: str | bytes,
    cid: str | None,
    timeout: float | None,
    idempotent: bool,
    env: dict[str, str] | None,
    cwd: str | None,
    user: str | None = None,
    merge_stderr: bool = False,
) -> CommandRequest:
    """A command request; ConfigError for a bad id or option."""
    body = cmd.encode() if isinstance(cmd, str) else cmd
    if cid is not None:
        protocol.check_id(cid, "command id")
        if protocol.is_entry_id(cid):
            raise ConfigError(f"command id {cid!r} looks like a stream entry id; pick another")
    try:
        return CommandRequest(
            id=cid or new_id(),
            cmd=body,
            timeout=timeout,
            env=env,
            cwd=cwd,
            idempotent=idempotent,
            user=user,
            merge_stderr=merge_stderr,
        )
    except ValidationError as e:
        raise ConfigError(str(e)) from None


def submit_call(keys: protocol.Keys, settings: ClientSettings, req: CommandRequest) -> tuple[Any, ...]:
    """The FCALL shellq_submit of `req`, signed with the client's name (`by`, unless the request names one);
    InvalidRequestError for an entry over the size limit."""
    assert req.id is not None
    fields = protocol.encode(req)
    if req.by is None and settings.client_name:
        fields["by"] = settings.client_name.encode()
    size = sum(len(name) + len(value) for name, value in fields.items())
    if size > protocol.MAX_ENTRY_BYTES:
        raise InvalidRequestError(f"command entry is {size} bytes; the limit is {protocol.MAX_ENTRY_BYTES}")
    submit: tuple[Any, ...] = ("FCALL", "shellq_submit", 3, keys.cmd, keys.jrnl(req.id), keys.seq)
    submit += (protocol.CALLER, settings.journal_ttl, settings.queue_cap, req.id)
    return submit + tuple(x for kv in fields.items() for x in kv)


def submitted(session_id: str, req: CommandRequest, reply: Any) -> bool:
    """What shellq_submit answered: True when the command was queued now, False when its id was accepted before.
    Raises QueueFullError, SessionStateLostError, NoWorkerError (the session is gone), and, for an error reply in
    its place, RedisRefusedError (out of memory, say), ConfigError (another version's library) or RedisReplyError."""
    if isinstance(reply, redis.ResponseError):
        if refused := refusal(reply):
            raise RedisRefusedError(f"session {session_id}: Redis refuses commands now: {refused}")
        raise protocol.version_refusal(reply) or RedisReplyError(f"session {session_id}: {reply}")
    outcome = int(reply[0])
    if outcome == -1:
        raise QueueFullError(f"session {session_id} holds {reply[1]} unfinished commands; its cap is {reply[2]}")
    if outcome == -2 and reply[1] == b"lost":
        raise SessionStateLostError(f"session {session_id}: Redis lost its state; its worker stopped")
    if outcome == -2:
        message = f"session {session_id}: its environment is gone (container exited); start it again"
        raise NoWorkerError(message + f"; {req.id} was not queued", cancelled=True)
    return bool(outcome)


def journal_call(keys: protocol.Keys, command_id: str) -> tuple[Any, ...]:
    """HMGET of what a command's journal says: the result entry its worker committed, why it was cancelled before
    it started, its command entry."""
    return ("HMGET", keys.jrnl(command_id), "res", "cancelled", "entry")


def read_call(keys: protocol.Keys, after: str, block_ms: int) -> tuple[Any, ...]:
    return ("XREAD", "COUNT", READ_COUNT, "BLOCK", block_ms, "STREAMS", keys.res, after)


def tail_call(keys: protocol.Keys) -> tuple[Any, ...]:
    return ("XREVRANGE", keys.res, "+", "-", "COUNT", 1)


def tail_id(reply: Any) -> str:
    """The newest entry id of a `tail_call` reply ("0-0" for an empty stream)."""
    return str(reply[0][0].decode()) if reply else "0-0"


@dataclass(frozen=True)
class Found:
    """What a read and a journal say about a command: its result, or the result entry still to be fetched
    (`fetch`), or nothing yet; and the newest entry the read saw (`newest`, None when it saw none)."""

    result: Result | None
    fetch: str | None
    newest: str | None


def found(keys: protocol.Keys, command_id: str, read: Any, journal: Any) -> Found:
    """The command's result if its journal (a `journal_call` reply) names one; `read` is the raw XREAD reply sent
    before it in the same round trip, which usually holds the entry. The journal, written only in the worker's
    commit, decides which entry is the result: an entry that merely carries the command's id is not it. A command
    cancelled before any worker took it is answered from the journal. InvalidResultError for an unreadable entry."""
    newest = None
    for eid, fields in protocol.stream_entries(read) if read else ():
        newest = eid
        if journal[0] is not None and eid == journal[0].decode():
            return Found(decode(keys, command_id, eid, fields), None, newest)
    if journal[0] is not None:
        return Found(None, journal[0].decode(), newest)
    if journal[1] is not None:
        return Found(cancelled(command_id, journal[2], journal[1]), None, newest)
    return Found(None, None, newest)


def decode(keys: protocol.Keys, command_id: str, rid: str, fields: dict[bytes, bytes]) -> Result:
    """A result entry as a Result; InvalidResultError naming the entry when it cannot be read or answers another
    command (a journal pointed at the wrong entry)."""
    where = f"result entry {rid} on {keys.res} (for command {command_id})"
    try:
        result = Result.from_wire(protocol.decode(CommandResult, fields))
    except (DecodeError, ValidationError) as e:
        raise InvalidResultError(f"{where} cannot be read: {e}") from None
    if result.id != command_id:
        raise InvalidResultError(f"{where} answers command {result.id!r}, not this one")
    return result


def cancelled(command_id: str, entry_id: bytes | None, reason: bytes) -> Result:
    """The result of a command a producer cancelled before any worker took it, as its journal tells it (the worker
    that takes it later commits the same on the result stream)."""
    error = protocol.cancelled_error(reason.decode(errors="replace"))
    entry = entry_id.decode() if entry_id else ""
    return Result.from_wire(CommandResult(id=command_id, entry_id=entry, status="cancelled", error=error))


def cancel_call(keys: protocol.Keys, journal_ttl: int, command_id: str, entry: str, reason: str) -> tuple[Any, ...]:
    jrnl = keys.jrnl(command_id)
    return ("FCALL", "shellq_cancel", 2, keys.cmd, jrnl, protocol.CALLER, protocol.GROUP, entry, journal_ttl, reason)


def cancel_outcome(reply: Any) -> tuple[str, str | None]:
    """shellq_cancel's reply -> ("cancelled", None) | ("answered", result id) | ("started", None) | ("unknown",
    None)."""
    outcome = {1: "cancelled", 3: "cancelled", 0: "answered", 2: "started"}.get(int(reply[0]), "unknown")
    return outcome, reply[1].decode() if outcome == "answered" else None


def give_up_error(error: WaitError, command_id: str, outcome: str) -> WaitError:
    """The error a wait that gave up raises, saying what became of the command (`cancel_outcome`)."""
    if outcome == "cancelled":
        return type(error)(f"{error}; {command_id} had not started: it is cancelled and will never run", True)
    if outcome == "started":
        return type(error)(
            f"{error}; {command_id} had started (a worker took it): it is running or ran, and its result comes "
            "when a worker commits it"
        )
    return error


def interrupt_fields(command_id: str) -> dict[str, bytes]:
    return protocol.encode(ControlRequest(op="interrupt", id=protocol.check_id(command_id, "command id")))


def check_worker(session_id: str, reply: Any, limit: float) -> None:
    """Raise NoWorkerError (or SessionStateLostError) from a shellq_alive reply: no heartbeat within `limit`
    seconds, the worker stopped, the session's environment gone, or Redis refusing the worker's takes for longer
    than `limit` (at maxmemory, say: the worker is alive, but a queued command would wait for nothing)."""
    age, state = heartbeat(reply)
    if state == "lost":
        raise SessionStateLostError(f"session {session_id}: Redis lost its state; its worker stopped")
    if state == "gone":
        raise NoWorkerError(f"session {session_id}: its environment is gone (container exited)")
    if age is None:
        raise NoWorkerError(f"no worker has ever served session {session_id}")
    if age > limit or state == "stopped":
        raise NoWorkerError(f"no worker serves session {session_id}: last heartbeat {age:.1f}s ago ({state})")
    if (refused := refusal_of(reply)) and refused[0] > limit:
        why = f"Redis has refused them for {refused[0]:.0f}s: {refused[1]}"
        raise NoWorkerError(f"the worker of session {session_id} can take no command: {why}")


def heartbeat(reply: Any) -> tuple[float | None, str | None]:
    """A shellq_alive reply -> seconds since the last heartbeat (by the server's clock) and the worker's state."""
    now_ms, beat, state, *_ = reply
    return (None if beat is None else (int(now_ms) - int(beat)) / 1000), (state.decode() if state else None)


def refusal_of(reply: Any) -> tuple[float, str] | None:
    """A shellq_alive reply -> how long (seconds, by the server's clock) Redis has refused the worker's takes, and
    Redis's words; None while it takes."""
    if len(reply) < 5 or not reply[3]:
        return None
    return (int(reply[0]) - int(reply[3])) / 1000, bytes(reply[4] or b"").decode(errors="replace")


def alive(reply: Any, limit: float) -> bool:
    age, state = heartbeat(reply)
    return age is not None and age <= limit and state not in ("stopped", "gone")


def alive_call(keys: protocol.Keys) -> tuple[Any, ...]:
    return ("FCALL_RO", "shellq_alive", 1, keys.meta, protocol.CALLER)


@dataclass
class Follow:
    """What a reader of one command's live output has seen, and what it sends next (sans-IO: `Session.stream` and
    `AsyncSession.stream` move the calls and feed the replies back). Chunks come from `shellq:{S}:live`; once the
    command's result is committed, the bytes the live stream lacks come from the result (its head and tail)."""

    keys: protocol.Keys
    command_id: str
    live_after: str = "0-0"
    res_after: str = "0-0"
    lease_epoch: int = -1
    seen: dict[str, int] = field(default_factory=lambda: {"stdout": 0, "stderr": 0})
    """Per output stream, the end of the last chunk yielded (bytes)."""

    def start(self, journal: Any, tail: Any) -> None:
        """Where to read from, given the command's journal (`journal_call`) and the result stream's newest entry
        (`tail_call`): live output from the command's submission on, results from now on."""
        entry = journal[2].decode() if journal[2] else self.command_id
        if protocol.is_entry_id(entry):
            self.live_after = f"{max(0, protocol.entry_key(entry)[0] - LIVE_SLACK_MS)}-0"
        self.res_after = tail_id(tail)

    def read_call(self, block_ms: int) -> tuple[Any, ...]:
        """A blocking read of the live stream and the result stream (a result wakes it too)."""
        keys = self.keys
        return ("XREAD", "COUNT", LIVE_COUNT, "BLOCK", block_ms, "STREAMS", keys.live, keys.res, self.live_after,
                self.res_after)  # fmt: skip

    def rest_call(self) -> tuple[Any, ...]:
        """A read of what is left on the live stream (once the result is committed, every chunk is there)."""
        return ("XREAD", "COUNT", LIVE_COUNT, "STREAMS", self.keys.live, self.live_after)

    def take(self, reply: Any) -> list[Chunk]:
        """This command's new chunks in a `read_call` or `rest_call` reply; entries that cannot be read are skipped
        (the result has their bytes)."""
        by_key = protocol.entries_by_key(reply)
        if results := by_key.get(self.keys.res):
            self.res_after = results[-1][0]
        out: list[Chunk] = []
        for eid, fields in by_key.get(self.keys.live, []):
            self.live_after = eid
            if fields.get(b"id") != self.command_id.encode():
                continue
            try:
                chunk = protocol.decode(OutputChunk, fields)
            except DecodeError:
                continue
            if chunk.lease_epoch < self.lease_epoch:
                continue  # a worker that lost the session's lease
            if chunk.lease_epoch > self.lease_epoch:  # the first chunk, or the command started over
                self.lease_epoch, self.seen = chunk.lease_epoch, {"stdout": 0, "stderr": 0}
            out += self._new(chunk.stream, chunk.offset, chunk.data)
        return out

    def rest(self, result: Result) -> list[Chunk]:
        """What the result holds beyond the chunks yielded: stdout's, then stderr's."""
        out: list[Chunk] = []
        for stream, kept, size in (
            ("stdout", result.stdout_bytes, result.stdout_size),
            ("stderr", result.stderr_bytes, result.stderr_size),
        ):
            if size <= len(kept):
                parts = [(0, kept)]
            else:  # truncated: the first half of the kept bytes is the head, the rest the tail
                head = len(kept) // 2
                parts = [(0, kept[:head]), (size - (len(kept) - head), kept[head:])]
            for offset, data in parts:
                out += self._new(stream, offset, data)  # type: ignore[arg-type]
        return out

    def _new(self, stream: Literal["stdout", "stderr"], offset: int, data: bytes) -> list[Chunk]:
        """The part of `data` (at `offset`) past what was yielded of `stream`, as a chunk."""
        start, end = max(offset, self.seen[stream]), offset + len(data)
        if end <= start:
            return []
        self.seen[stream] = end
        return [Chunk(stream, data[start - offset :], start)]
