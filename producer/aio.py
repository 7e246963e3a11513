"""The async twin of producer/client.py on redis.asyncio: `AsyncClient` and `AsyncSession`, with the names and
semantics of `Client` and `Session` (`run`, `submit`, `result`, `interrupt`, `worker_alive`, `run_many`), `aclose()`
and `async with`. What they send and how they read the replies comes from producer/core.py, shared with the sync
twin; only the waiting is their own (`await`, never a blocking call).

Cancelling a task that awaits a result never loses it: the command keeps its one result in Redis, and a later
`result(id)` finds it (a cancelled read closes its connection, so no reply is left for the next call to misread).
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

import redis
import redis.asyncio
import redis.asyncio.retry
from redis.backoff import ExponentialBackoff

from producer import batch, core, files
from producer.client import ClientSettings
from producer.result import Chunk, FileInfo, Result
from worker import protocol
from worker.errors import (
    ConfigError,
    InvalidResultError,
    NoWorkerError,
    RedisRefusedError,
    RedisUnavailableError,
    ResultTimeoutError,
    SessionStateLostError,
    ShellqError,
    WaitError,
)
from worker.protocol import CommandRequest

T = TypeVar("T")
MAX_CONNECTIONS = 10_000
"""Connections one AsyncClient may open: each awaited result holds one while it waits (a blocking read), so a loop
that awaits 200 sessions at once needs 200 (redis.asyncio's default pool stops at 100). Redis's own `maxclients`
is 10,000 by default."""


class _TLSConnection(redis.asyncio.SSLConnection):
    """redis.asyncio's TLS connection naming a plain Redis behind a rediss:// URL (core.TLSConnection's twin; the
    handshake is bounded by the connect timeout here already, but every retry would wait it out)."""

    async def _connect(self) -> None:
        try:
            await super()._connect()  # type: ignore[no-untyped-call]
        except TimeoutError:
            if await asyncio.to_thread(core.answers_plain_resp, self.host, self.port, self.socket_connect_timeout):
                raise core.not_tls(self.host, self.port) from None
            raise

    async def connect_check_health(self, *args: Any, **kwargs: Any) -> None:
        try:
            await super().connect_check_health(*args, **kwargs)
        except redis.ConnectionError as e:  # redis.asyncio wraps whatever _connect raised, and retries that
            if isinstance(e.__cause__, ConfigError):
                raise e.__cause__ from None
            raise


class _RetryFor(redis.asyncio.retry.Retry):
    """core.RetryFor's twin: redis.asyncio's Retry bounded by time."""

    def __init__(self, seconds: float) -> None:
        super().__init__(ExponentialBackoff(cap=1.0, base=0.05), retries=-1)
        self.update_supported_errors([redis.ResponseError])  # refusals only (see core.retry_until)
        self.seconds = seconds

    async def call_with_retry(
        self,
        do: Callable[[], Awaitable[T]],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        attempts = core.Attempts(core.retry_until(self.seconds, is_retryable))
        try:
            return await super().call_with_retry(do, fail, attempts, with_failure_count)
        except Exception as e:
            attempts.tell(e)
            raise


class AsyncClient:
    """A connection pool to the Redis that holds the sessions, for one event loop."""

    def __init__(self, url: str | None = None, *, settings: ClientSettings | None = None) -> None:
        self.settings = settings or ClientSettings.from_env(redis_url=url)
        self.redis = redis.asyncio.Redis.from_url(
            self.settings.redis_url,
            socket_timeout=core.READ_TIMEOUT,
            socket_connect_timeout=core.CONNECT_TIMEOUT,
            retry=_RetryFor(self.settings.retry_for),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
            max_connections=MAX_CONNECTIONS,
        )
        if core.connection_options(self.settings.redis_url):  # rediss://; redis.asyncio's from_url takes no class
            self.redis.connection_pool.connection_class = _TLSConnection
        self._functions_loaded = False

    @classmethod
    def from_env(cls) -> AsyncClient:
        """A client for SHELLQ_REDIS_URL."""
        return cls()

    def session(self, session_id: str) -> AsyncSession:
        """A handle on a session's streams (nothing is sent); ConfigError for an invalid id."""
        return AsyncSession(self, protocol.check_id(session_id, "session id"))

    async def aclose(self) -> None:
        await self.redis.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def run_many(
        self, items: Sequence[tuple[Any, ...]], timeout: float | None = None
    ) -> list[Result | ShellqError]:
        """Client.run_many's twin: one pipelined submit, then blocking reads over every result stream that still
        owes a result; one entry per item, in input order, a Result or the ShellqError that item met."""
        return await _run_many(self, items, timeout)

    async def send(self, *commands: tuple[Any, ...], errors_in_place: bool = False) -> list[Any]:
        """Send `commands` pipelined on one connection and return their raw replies (Client.send's twin): an error
        reply raises redis.ResponseError, or with `errors_in_place` is returned in its place. A connection error is
        retried with backoff for `retry_for` seconds (resending is safe: submits are idempotent by id)."""
        deadline = time.monotonic() + self.settings.retry_for
        delay, unsent = 0.05, True
        while True:
            try:
                with core.redis_errors(self.settings.redis_url):
                    return await self._roundtrip(commands, errors_in_place)
            except RedisUnavailableError as e:
                unsent = unsent and (isinstance(e, RedisRefusedError) or core.unsent(e))
                if time.monotonic() + delay > deadline:
                    e.shellq_unsent = unsent  # type: ignore[attr-defined]  # see core.unsent
                    raise
                await asyncio.sleep(delay)
                delay = min(2 * delay, 1.0)

    async def _roundtrip(self, commands: tuple[tuple[Any, ...], ...], errors_in_place: bool) -> list[Any]:
        pool = self.redis.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await conn.send_packed_command(conn.pack_commands(commands))
            replies: list[Any] = []
            error: redis.ResponseError | None = None
            for _ in commands:
                try:
                    replies.append(await conn.read_response())
                except redis.ResponseError as e:
                    error = error or e
                    replies.append(e if errors_in_place else None)
        except BaseException:  # cancelled or failed half way: unread replies must not answer the next call
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)
        if error is not None and not errors_in_place:
            raise error
        return replies

    async def fcall(self, *commands: tuple[Any, ...]) -> list[Any]:
        """`send` commands that call shellq's functions, loading the library first (and again after Redis answered
        "Function not found"). ConfigError for a library of another version."""
        await self.ensure_functions()
        for attempt in (1, 2):
            try:
                return await self.send(*commands)
            except redis.ResponseError as e:
                if refusal := protocol.version_refusal(e):
                    raise refusal from None
                if "Function not found" not in str(e) or attempt == 2:
                    raise
                await self.ensure_functions(again=True)
        raise AssertionError("unreachable")

    async def ensure_functions(self, again: bool = False) -> None:
        """protocol.load_functions, run in a thread with a short-lived sync client (it happens once per client)."""
        if again or not self._functions_loaded:
            await asyncio.to_thread(_load_functions, self.settings.redis_url)
            self._functions_loaded = True


def _load_functions(url: str) -> None:
    with core.redis_errors(url), redis.Redis.from_url(url, socket_timeout=10, **core.connection_options(url)) as r:
        protocol.load_functions(r.execute_command, redis.ResponseError)


class AsyncSession:
    """One session, for one event loop: Session's twin."""

    def __init__(self, client: AsyncClient, session_id: str) -> None:
        self.client = client
        self.id = session_id
        self.keys = protocol.keys(session_id)
        self._last_seen: str | None = None

    async def submit(
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
        """Queue a command and return its id (Session.submit)."""
        req = core.request(cmd, id, timeout, idempotent, env, cwd, user, merge_stderr)
        if stdin is not None or len(req.cmd) > files.INLINE:
            return await self._with_input(req, files.submit_with_input(self, req, stdin, timeout))
        return (await self._submit(req, read_from=None))[0]

    async def run(
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
        """Submit a command and wait for its result (Session.run: the same timeouts, errors and cancellation, the
        same `stdin`, `user` and `merge_stderr`)."""
        req = core.request(cmd, id, timeout, idempotent, env, cwd, user, merge_stderr)
        if stdin is not None or len(req.cmd) > files.INLINE:
            return Result.from_wire(await self._with_input(req, files.run_with_input(self, req, stdin, timeout)))
        deadline = time.monotonic() + (timeout or self.client.settings.default_timeout) + core.RUN_MARGIN
        if self._last_seen is None:
            self._last_seen = core.tail_id((await self.client.send(core.tail_call(self.keys)))[0])
        cid, new, reply = await self._submit(req, read_from=self._last_seen)
        try:
            if not new:
                return await self.result(cid, timeout=max(0.0, deadline - time.monotonic()))
            try:
                found = await self._found(cid, *reply)
            except InvalidResultError as e:
                return await self._give_up(cid, e, cancel=True)
            return found or await self._wait(cid, deadline)
        except RedisUnavailableError as e:
            raise core.may_run(e, cid) from None

    async def result(self, command_id: str, timeout: float = 60.0, *, cancel: bool = True) -> Result:
        """The result of a command, waiting up to `timeout` seconds (Session.result)."""
        deadline = time.monotonic() + timeout
        journal, tail = await self.client.send(core.journal_call(self.keys, command_id), core.tail_call(self.keys))
        if found := await self._found(command_id, None, journal):
            return found
        self._last_seen = core.tail_id(tail)
        return await self._wait(command_id, deadline, cancel)

    async def stream(
        self, command_id: str, timeout: float | None = None, *, cancel: bool = False
    ) -> AsyncIterator[Chunk]:
        """`Session.stream`: `async for chunk in s.stream(cid)`."""
        follow = core.Follow(self.keys, protocol.check_id(command_id, "command id"))
        journal, tail = await self.client.send(core.journal_call(self.keys, command_id), core.tail_call(self.keys))
        follow.start(journal, tail)
        started = time.monotonic()
        deadline = math.inf if timeout is None else started + timeout
        result = None
        while (found := core.found(self.keys, command_id, None, journal)).result is None and found.fetch is None:
            try:
                if time.monotonic() >= deadline:
                    raise ResultTimeoutError(f"no result for {command_id} on session {self.id} in time")
                block = max(1, int(min(deadline - time.monotonic(), 1.0) * 1000))
                read, journal = await self.client.send(
                    follow.read_call(block), core.journal_call(self.keys, command_id)
                )
                for chunk in follow.take(read):
                    yield chunk
                if time.monotonic() - started >= self.client.settings.no_worker_after:
                    await self._check_worker()
            except (NoWorkerError, ResultTimeoutError) as e:
                result = await self._give_up(command_id, e, cancel)  # raises unless the result came meanwhile
                break
        while rest := (await self.client.send(follow.rest_call()))[0]:
            for chunk in follow.take(rest):
                yield chunk
        for chunk in follow.rest(result or found.result or await self._read_result(command_id, found.fetch or "")):
            yield chunk

    # -- files, stdin, users: producer/files.py's steps, awaited -----------------------------------------------

    async def write_file(
        self, path: str, data: bytes, mode: int | None = None, *, user: str | None = None, timeout: float | None = None
    ) -> None:
        """`Session.write_file`."""
        await self._drive(files.write_file(self, path, data, mode, user, timeout))

    async def read_file(
        self,
        path: str,
        max_bytes: int | None = None,
        offset: int = 0,
        *,
        user: str | None = None,
        timeout: float | None = None,
    ) -> bytes:
        """`Session.read_file`."""
        return await self._drive(files.read_file(self, path, max_bytes, offset, user, timeout))

    async def list_dir(
        self,
        path: str,
        recursive: bool = False,
        max_entries: int | None = None,
        *,
        user: str | None = None,
        timeout: float | None = None,
    ) -> list[FileInfo]:
        """`Session.list_dir`."""
        return await self._drive(files.list_dir(self, path, recursive, max_entries, user, timeout))

    async def stat(self, path: str, *, user: str | None = None, timeout: float | None = None) -> FileInfo:
        """`Session.stat`."""
        return await self._drive(files.stat(self, path, user, timeout))

    async def archive(
        self, path: str, max_bytes: int = files.ARCHIVE_CAP, *, user: str | None = None, timeout: float | None = None
    ) -> bytes:
        """`Session.archive`."""
        return await self._drive(files.archive(self, path, max_bytes, user, timeout))

    async def upload(
        self, local: str | os.PathLike[str], remote: str, *, user: str | None = None, timeout: float | None = None
    ) -> None:
        """`Session.upload` (packing a directory runs in a thread)."""
        await self._drive(files.upload(self, local, remote, user, timeout))

    async def download(
        self, remote: str, local: str | os.PathLike[str], *, user: str | None = None, timeout: float | None = None
    ) -> None:
        """`Session.download` (unpacking a directory runs in a thread)."""
        await self._drive(files.download(self, remote, local, user, timeout))

    async def fork(self, new: str, *, timeout: float = 120.0, start_timeout: float = 60.0) -> AsyncSession:
        """`Session.fork` (its Docker calls run in threads)."""
        from containers.fork import fork_steps

        await self._drive(fork_steps(self, new, timeout=timeout, start_timeout=start_timeout))
        return self.client.session(new)

    async def _drive(self, steps: files.Steps[T]) -> T:
        """files.drive, awaited."""
        reply: Any = None
        error: Exception | None = None
        while True:
            try:
                step = steps.throw(error) if error is not None else steps.send(reply)
            except StopIteration as done:
                return cast(T, done.value)
            reply, error = None, None
            try:
                if isinstance(step, files.Send):
                    send = self.client.fcall if step.fcall else self.client.send
                    reply = await send(*step.commands)
                elif isinstance(step, files.Sleep):
                    await asyncio.sleep(step.seconds)
                else:
                    reply = await asyncio.to_thread(step.work)
            except Exception as e:
                error = e

    async def interrupt(self, command_id: str) -> None:
        """Stop a command: running -> `cancelled` with its partial output; still queued -> `cancelled` unrun."""
        fields = core.interrupt_fields(command_id)
        flat = [x for kv in fields.items() for x in kv]
        await self.client.send(("XADD", self.keys.ctl, "MAXLEN", "~", 1000, "*", *flat))

    async def worker_alive(self) -> bool:
        """Session.worker_alive."""
        return core.alive(await self._alive_reply(), self.client.settings.no_worker_after)

    # -- internals: Session's, with await ------------------------------------------------------------------------

    async def _submit(self, req: CommandRequest, read_from: str | None) -> tuple[str, bool, Any]:
        assert req.id is not None
        settings = self.client.settings
        commands = [core.submit_call(self.keys, settings, req)]
        if read_from is not None:
            commands += [core.read_call(self.keys, read_from, 1000), core.journal_call(self.keys, req.id)]
        try:
            replies = await self.client.fcall(*commands)
        except RedisUnavailableError as e:  # Session._submit
            raise e if core.unsent(e) else core.may_run(e, req.id) from None
        return req.id, core.submitted(self.id, req, replies[0]), replies[1:] if read_from is not None else None

    async def _with_input(self, req: CommandRequest, steps: files.Steps[T]) -> T:
        """Session._with_input, awaited."""
        await self.client.ensure_functions()  # a Redis gone from the start fails here, before anything is sent
        try:
            return await self._drive(steps)
        except RedisUnavailableError as e:
            raise core.may_run(e, str(req.id)) from None

    async def _found(self, command_id: str, read: Any, journal: Any) -> Result | None:
        found = core.found(self.keys, command_id, read, journal)
        self._last_seen = found.newest or self._last_seen
        if found.fetch is not None:
            return await self._read_result(command_id, found.fetch)
        return found.result

    async def _read_result(self, command_id: str, rid: str) -> Result:
        (entries,) = await self.client.send(("XRANGE", self.keys.res, rid, rid))
        if not entries:
            raise ShellqError(f"the result of {command_id} was trimmed from {self.keys.res}")
        (_, fields), *_ = protocol.stream_entries({self.keys.res: entries})
        return core.decode(self.keys, command_id, rid, fields)

    async def _wait(self, command_id: str, deadline: float, cancel: bool = True) -> Result:
        started = time.monotonic()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timeout = ResultTimeoutError(f"no result for {command_id} on session {self.id} in time")
                return await self._give_up(command_id, timeout, cancel)
            block = max(1, int(min(remaining, 1.0) * 1000))
            read = core.read_call(self.keys, self._last_seen or "0-0", block)
            try:
                replies = await self.client.send(read, core.journal_call(self.keys, command_id))
                if found := await self._found(command_id, *replies):
                    return found
                if time.monotonic() - started >= self.client.settings.no_worker_after:
                    await self._check_worker()
            except (NoWorkerError, InvalidResultError) as e:
                return await self._give_up(command_id, e, cancel)

    async def _give_up(self, command_id: str, error: WaitError, cancel: bool) -> Result:
        if not cancel:
            raise error
        outcome, rid = await self._cancel(command_id, str(error))
        if outcome == "answered" and rid is not None:
            return await self._read_result(command_id, rid)
        raise core.give_up_error(error, command_id, outcome)

    async def _cancel(self, command_id: str, reason: str) -> tuple[str, str | None]:
        (raw,) = await self.client.send(("HGET", self.keys.jrnl(command_id), "entry"))
        if raw is None:
            return "unknown", None
        call = core.cancel_call(self.keys, self.client.settings.journal_ttl, command_id, raw.decode(), reason)
        (reply,) = await self.client.fcall(call)
        return core.cancel_outcome(reply)

    async def _alive_reply(self) -> Any:
        return (await self.client.fcall(core.alive_call(self.keys)))[0]

    async def _check_worker(self) -> None:
        core.check_worker(self.id, await self._alive_reply(), self.client.settings.no_worker_after)


# -- run_many -----------------------------------------------------------------------------------------------------


async def _run_many(client: AsyncClient, items: Sequence[tuple[Any, ...]], timeout: float | None) -> list[Any]:
    """producer/batch.py's run_many, awaited: the same planning, commands and bookkeeping."""
    out: list[Any] = [None] * len(items)
    sessions: dict[str, AsyncSession] = {}
    planned: list[tuple[int, AsyncSession, CommandRequest, tuple[Any, ...]]] = []
    settings = client.settings
    for i, item in enumerate(items):
        try:
            sid, req = batch.plan(item, timeout)
            session = sessions.setdefault(sid, client.session(sid))
            call = core.submit_call(session.keys, settings, req)
        except ShellqError as e:
            out[i] = e
            continue
        planned.append((i, session, req, call))
    if not planned:
        return out
    order = list(dict.fromkeys(s.id for _, s, _, _ in planned))
    await client.ensure_functions()
    commands = [core.tail_call(sessions[sid].keys) for sid in order] + [call for *_, call in planned]
    replies = await client.send(*commands, errors_in_place=True)
    for sid, tail in zip(order, replies, strict=False):
        sessions[sid]._last_seen = "0-0" if isinstance(tail, Exception) else core.tail_id(tail)
    now = time.monotonic()
    pending: list[batch.Pending] = []
    for (i, session, req, _), reply in zip(planned, replies[len(order) :], strict=True):
        try:
            core.submitted(session.id, req, reply)
        except ShellqError as e:
            out[i] = e
            continue
        limit = req.timeout or settings.default_timeout
        pending.append(batch.Pending(i, session, str(req.id), now + limit + core.RUN_MARGIN))
    while pending:
        pending = await _wait_round(client, pending, out)
    return out


async def _wait_round(client: AsyncClient, pending: list[batch.Pending], out: list[Any]) -> list[batch.Pending]:
    """batch._wait_round, awaited."""
    now = time.monotonic()
    still = []
    for p in pending:
        if now >= p.deadline:
            out[p.index] = await _give_up(p, ResultTimeoutError(f"no result for {p.command_id} on {p.session.id}"))
        else:
            still.append(p)
    if not still:
        return []
    streams = {p.session.id: p.session for p in still}
    block = max(1, int(min(1.0, min(p.deadline for p in still) - now) * 1000))
    read: tuple[Any, ...] = ("XREAD", "COUNT", core.READ_COUNT, "BLOCK", block, "STREAMS")
    read += tuple(s.keys.res for s in streams.values()) + tuple(s._last_seen or "0-0" for s in streams.values())
    got = await client.send(read, *(core.journal_call(p.session.keys, p.command_id) for p in still))
    by_key = batch.by_stream(got[0])
    left = []
    for p, journal in zip(still, got[1:], strict=True):
        try:
            found = await p.session._found(p.command_id, by_key.get(p.session.keys.res), journal)
        except ShellqError as e:
            out[p.index] = e
            continue
        if found is not None:
            out[p.index] = found
        else:
            left.append(p)
    return await _check_workers(client, left, out)


async def _check_workers(client: AsyncClient, pending: list[batch.Pending], out: list[Any]) -> list[batch.Pending]:
    """batch._check_workers, awaited."""
    now, limit = time.monotonic(), client.settings.no_worker_after
    due = {p.session.id: p.session for p in pending if now - p.started >= limit}
    dead = set()
    for sid, session in due.items():
        try:
            await session._check_worker()
        except (NoWorkerError, SessionStateLostError):
            dead.add(sid)
    left = []
    for p in pending:
        if p.session.id in dead:
            out[p.index] = await _give_up(p, NoWorkerError(f"no worker serves session {p.session.id}"))
        else:
            if p.session.id in due:
                p.started = now
            left.append(p)
    return left


async def _give_up(p: batch.Pending, error: WaitError) -> Any:
    try:
        return await p.session._give_up(p.command_id, error, cancel=True)
    except ShellqError as e:
        return e
