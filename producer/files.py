"""The producer's side of file operations, stdin and commands over the entry cap (`Session.write_file`,
`read_file`, `list_dir`, `archive`, `upload`, `download`, `run(stdin=...)`): requests on the command stream, run in
order with the commands, whose large input and output move in chunks (worker/transfer.py has the protocol).

Input (stdin, a file's bytes, a tar of a directory) up to INLINE bytes rides in the entry; more goes on
`shellq:{S}:in:<id>` after the entry, at most WINDOW chunks ahead of the worker. Output up to INLINE bytes comes in
the result; more on `shellq:{S}:out:<id>`, read (and deleted) while the worker writes it. Memory stays bounded on
every side: a chunk of CHUNK bytes at a time here, WINDOW chunks in Redis, files spooled to disk in the worker.
"""

from __future__ import annotations

import errno as errnos
import itertools
import json
import os
import tarfile
import tempfile
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar, cast

from pydantic import ValidationError

from producer import core
from producer.result import FileInfo
from worker import protocol
from worker.errors import (
    ConfigError,
    FileTooLargeError,
    InvalidResultError,
    NoWorkerError,
    ResultTimeoutError,
    SessionFileError,
    SessionFileNotFoundError,
    SessionIsADirectoryError,
    SessionNotADirectoryError,
    SessionPermissionError,
    ShellqError,
)
from worker.protocol import CommandRequest, CommandResult, DecodeError
from worker.transfer import CHUNK, TTL, WINDOW

T = TypeVar("T")


class SessionLike(Protocol):
    """What the steps need of a session (sync or async): its id, keys and client settings."""

    id: str
    keys: protocol.Keys

    @property
    def client(self) -> Any: ...


INLINE = 512 << 10
"""Input up to this many bytes goes in the request entry itself."""
ARCHIVE_CAP = 1 << 30
"""The largest archive `archive()` and `download()` of a directory accept unless told otherwise (bytes)."""
_ERRORS: dict[int, type[SessionFileError]] = {
    errnos.ENOENT: SessionFileNotFoundError,
    errnos.EISDIR: SessionIsADirectoryError,
    errnos.ENOTDIR: SessionNotADirectoryError,
    errnos.EACCES: SessionPermissionError,
    errnos.EPERM: SessionPermissionError,
    errnos.EFBIG: FileTooLargeError,
}


def request(op: protocol.Op, path: str | os.PathLike[str] | None = None, **fields: Any) -> CommandRequest:
    """A request for `op`; ConfigError for a bad field."""
    try:
        if path is not None:
            fields["path"] = os.fspath(path)
        return CommandRequest(op=op, id=fields.pop("id", None) or core.new_id(), **fields)
    except ValidationError as e:
        raise ConfigError(str(e)) from None


def with_input(req: CommandRequest, data: bytes | None) -> CommandRequest:
    """`req` with its input inline when `data` is small, else announced by size (`input_size`: sent after the
    entry by `call`); a command text over the entry cap moves to the input stream too (`cmd_size`)."""
    updates: dict[str, Any] = {}
    if len(req.cmd) > INLINE:
        updates.update(cmd=b"", cmd_size=len(req.cmd))
    if data is not None and len(data) <= INLINE:
        updates["stdin"] = data
    elif data is not None:
        updates["input_size"] = len(data)
    return req.model_copy(update=updates) if updates else req


@dataclass(frozen=True)
class Send:
    """Step: send these commands pipelined (through FCALL's library loading when `fcall`); the replies come back."""

    commands: tuple[tuple[Any, ...], ...]
    fcall: bool = False


@dataclass(frozen=True)
class Sleep:
    """Step: wait this many seconds."""

    seconds: float


@dataclass(frozen=True)
class Local:
    """Step: run `work` (local file or archive work, which may take a while) and send back what it returns."""

    work: Callable[[], Any]


Steps = Generator[Send | Sleep | Local, Any, T]
"""An operation as the steps it takes (sans-IO): `drive` runs them for the sync client, `AsyncSession` awaits them."""


def drive(session: SessionLike, steps: Steps[T]) -> T:
    """Run `steps` on the sync client; an error a step meets is raised inside the steps (their cleanup runs)."""
    reply: Any = None
    error: Exception | None = None
    while True:
        try:
            step = steps.throw(error) if error is not None else steps.send(reply)
        except StopIteration as done:
            return cast(T, done.value)
        reply, error = None, None
        try:
            if isinstance(step, Send):
                reply = session.client.fcall(*step.commands) if step.fcall else session.client.send(*step.commands)
            elif isinstance(step, Sleep):
                time.sleep(step.seconds)
            else:
                reply = step.work()
        except Exception as e:
            error = e


def call(
    session: SessionLike,
    req: CommandRequest,
    *,
    cmd: bytes = b"",
    source: Iterable[bytes] = (),
    sink: Callable[[bytes], object] | None = None,
    timeout: float | None = None,
) -> Steps[CommandResult]:
    """Submit `req` and send its chunked input (`submit`), take its chunked output into `sink`, and return its
    result as the worker committed it. Raises NoWorkerError, ResultTimeoutError (after `timeout` plus RUN_MARGIN
    seconds; a command no worker took is cancelled, as `run` does), QueueFullError, InvalidResultError."""
    assert req.id is not None
    deadline = time.monotonic() + (timeout or session.client.settings.default_timeout) + core.RUN_MARGIN
    try:
        yield from submit(session, req, cmd=cmd, source=source, deadline=deadline)
        return (yield from _wait(session, req.id, sink, deadline))
    except (NoWorkerError, ResultTimeoutError) as e:
        yield Send((("DEL", session.keys.input(req.id)),))
        outcome = yield from _cancel(session, req.id, str(e))
        raise core.give_up_error(e, req.id, outcome) from None


def submit(
    session: SessionLike, req: CommandRequest, *, cmd: bytes = b"", source: Iterable[bytes] = (), deadline: float
) -> Steps[bool]:
    """Queue `req`, then send its chunked input (`cmd` when `req.cmd_size`, then `source`), which ends once the
    worker has all but the last WINDOW chunks. False when its id was accepted before (nothing is sent again)."""
    assert req.id is not None
    settings = session.client.settings
    (reply,) = yield Send((core.submit_call(session.keys, settings, req),), True)
    if not core.submitted(session.id, req, reply):
        return False
    if req.cmd_size or req.input_size:
        yield from _send(session, req.id, _chunks(cmd if req.cmd_size else b"", source), deadline)
    return True


def _chunks(cmd: bytes, source: Iterable[bytes]) -> Iterator[bytes]:
    """The command's text, then the source, cut in CHUNK-byte pieces (a large piece is sliced, not copied whole)."""
    pending = bytearray()
    for data in itertools.chain([cmd], source):
        view = memoryview(data)
        if pending:
            fill = CHUNK - len(pending)
            pending += view[:fill]
            view = view[fill:]
            if len(pending) < CHUNK:
                continue
            yield bytes(pending)
            pending.clear()
        while len(view) >= CHUNK:
            yield bytes(view[:CHUNK])
            view = view[CHUNK:]
        pending += view
    if pending:
        yield bytes(pending)


def _send(session: SessionLike, cid: str, chunks: Iterator[bytes], deadline: float) -> Steps[None]:
    """XADD each chunk to the command's input stream, keeping at most WINDOW unread; stop early when the command
    already has its result (it will read no more: refused, cancelled) and delete what it left."""
    key, journal = session.keys.input(cid), core.journal_call(session.keys, cid)
    settings, checked = session.client.settings, time.monotonic()
    for chunk in chunks:
        _, _, waiting, answered = yield Send(
            (("XADD", key, "*", "data", chunk), ("EXPIRE", key, TTL), ("XLEN", key), journal)
        )
        wait = 0.001
        while waiting >= WINDOW and answered[0] is None and answered[1] is None:
            if time.monotonic() > deadline:
                raise ResultTimeoutError(f"the worker took no input on {key} in time")
            yield Sleep(wait)
            wait = min(wait * 2, 0.05)
            waiting, answered = yield Send((("XLEN", key), journal))
            if time.monotonic() - checked >= settings.no_worker_after:  # the worker may be busy, or gone
                (alive,) = yield Send((core.alive_call(session.keys),), True)
                core.check_worker(session.id, alive, settings.no_worker_after)
                checked = time.monotonic()
        if answered[0] is not None or answered[1] is not None:
            yield Send((("DEL", key),))
            return


def _wait(
    session: SessionLike, cid: str, sink: Callable[[bytes], object] | None, deadline: float
) -> Steps[CommandResult]:
    """Read the command's output stream (deleting what was read) while waiting for its result; once the result is
    committed, what is left of the output is already there (the worker sends it all first)."""
    keys, settings = session.keys, session.client.settings
    out, after, taken = keys.output(cid), "0-0", list[str]()
    journal, tail = yield Send((core.journal_call(keys, cid), core.tail_call(keys)))
    res_after = core.tail_id(tail)
    started, answered = time.monotonic(), journal[0] is not None or journal[1] is not None
    while True:
        if not answered and time.monotonic() > deadline:
            raise ResultTimeoutError(f"no result for {cid} on session {session.id} in time")
        streams = ("STREAMS", out, keys.res, after, res_after) if not answered else ("STREAMS", out, after)
        read = ("XREAD", "COUNT", WINDOW, *(("BLOCK", 1000) if not answered else ()), *streams)
        calls = (("XDEL", out, *taken),) if taken else ()
        *_, reply, journal = yield Send((*calls, read, core.journal_call(keys, cid)))
        by_key = protocol.entries_by_key(reply)
        if results := by_key.get(keys.res):
            res_after = results[-1][0]
        taken = [eid for eid, _ in by_key.get(out, [])]
        for _, fields in by_key.get(out, []):
            if sink is not None and not fields.get(b"eof"):
                sink(fields.get(b"data", b""))
        after = taken[-1] if taken else after
        if answered and not taken:
            break
        answered = answered or journal[0] is not None or journal[1] is not None
        if not by_key and not answered and time.monotonic() - started >= settings.no_worker_after:
            (alive,) = yield Send((core.alive_call(keys),), True)
            core.check_worker(session.id, alive, settings.no_worker_after)
    if after != "0-0":
        yield Send((("DEL", out),))
    return (yield from _result(session, cid, journal))


def _result(session: SessionLike, cid: str, journal: Any) -> Steps[CommandResult]:
    """The result entry an answered journal names."""
    keys = session.keys
    if journal[0] is None:  # cancelled before any worker took it
        raise core.give_up_error(NoWorkerError(f"{cid} was cancelled before it ran", True), cid, "cancelled")
    rid = journal[0].decode()
    (entries,) = yield Send((("XRANGE", keys.res, rid, rid),))
    if not entries:
        raise ShellqError(f"the result of {cid} was trimmed from {keys.res}")
    fields = entries[0][1]
    fields = dict(zip(fields[::2], fields[1::2], strict=True)) if isinstance(fields, list) else fields
    try:
        return protocol.decode(CommandResult, fields)
    except DecodeError as e:
        raise InvalidResultError(f"result entry {rid} on {keys.res} (for {cid}) cannot be read: {e}") from None


def _cancel(session: SessionLike, cid: str, reason: str) -> Steps[str]:
    """Cancel the command unless a worker took it (`Session._cancel`); -> core.cancel_outcome's first part."""
    (entry,) = yield Send((("HGET", session.keys.jrnl(cid), "entry"),))
    if entry is None:
        return "unknown"
    call = core.cancel_call(session.keys, session.client.settings.journal_ttl, cid, entry.decode(), reason)
    (reply,) = yield Send((call,), True)
    return core.cancel_outcome(reply)[0]


def check(result: CommandResult, what: str) -> CommandResult:
    """`result` when the operation succeeded; else the error it met: a SessionFileError subclass for an OS error
    (errno, strerror and filename from the session), a ShellqError naming the status otherwise."""
    if result.status == "completed" and result.exit_code == 0:
        return result
    if result.errno is not None:
        cls = _ERRORS.get(result.errno, SessionFileError)
        raise cls(result.errno, result.error or os.strerror(result.errno), result.filename)
    raise ShellqError(f"{what}: {result.status}: {result.error or 'no reason given'}")


# -- the operations, as steps --------------------------------------------------------------------------------------


def run_with_input(
    session: SessionLike, req: CommandRequest, stdin: bytes | None, timeout: float | None
) -> Steps[CommandResult]:
    """`run` of a command with stdin, or over the entry cap."""
    wire = with_input(req, stdin)
    source = [stdin] if stdin is not None and wire.input_size else []
    return (yield from call(session, wire, cmd=req.cmd, source=source, timeout=timeout))


def submit_with_input(
    session: SessionLike, req: CommandRequest, stdin: bytes | None, timeout: float | None
) -> Steps[str]:
    """`submit` of a command with stdin, or over the entry cap."""
    wire = with_input(req, stdin)
    deadline = time.monotonic() + (timeout or session.client.settings.default_timeout) + core.RUN_MARGIN
    source = [stdin] if stdin is not None and wire.input_size else []
    yield from submit(session, wire, cmd=req.cmd, source=source, deadline=deadline)
    assert wire.id is not None
    return wire.id


def write_file(
    session: SessionLike, path: str, data: bytes, mode: int | None, user: str | None, timeout: float | None
) -> Steps[None]:
    req = with_input(request("write", path, mode=mode, user=user, timeout=timeout), data)
    source = [data] if req.input_size is not None else []
    check((yield from call(session, req, source=source, timeout=timeout)), f"write_file({path!r})")


def read_to(
    session: SessionLike,
    op: protocol.Op,
    path: str,
    sink: Callable[[bytes], object],
    user: str | None,
    timeout: float | None,
    **fields: Any,
) -> Steps[CommandResult]:
    """Run a `read`, `list` or `archive` whose output goes to `sink` (inline or chunked alike)."""
    req = request(op, path, user=user, timeout=timeout, **fields)
    result = check((yield from call(session, req, sink=sink, timeout=timeout)), f"{op} of {path!r}")
    if not result.streamed:
        sink(result.stdout)
    return result


def read_file(
    session: SessionLike, path: str, max_bytes: int | None, offset: int, user: str | None, timeout: float | None
) -> Steps[bytes]:
    parts: list[bytes] = []
    yield from read_to(session, "read", path, parts.append, user, timeout, max_bytes=max_bytes, offset=offset)
    return b"".join(parts)


def list_dir(
    session: SessionLike, path: str, recursive: bool, max_entries: int | None, user: str | None, timeout: float | None
) -> Steps[list[FileInfo]]:
    parts: list[bytes] = []
    fields = {"recursive": recursive, "max_entries": max_entries}
    yield from read_to(session, "list", path, parts.append, user, timeout, **fields)
    listing = json.loads(b"".join(parts))
    return [FileInfo(p, size, mode, mtime, is_dir) for p, size, mode, mtime, is_dir in listing["entries"]]


def stat(session: SessionLike, path: str, user: str | None, timeout: float | None) -> Steps[FileInfo]:
    parts: list[bytes] = []
    yield from read_to(session, "stat", path, parts.append, user, timeout)
    p, size, mode, mtime, is_dir = json.loads(b"".join(parts))
    return FileInfo(p, size, mode, mtime, is_dir)


def archive(session: SessionLike, path: str, max_bytes: int, user: str | None, timeout: float | None) -> Steps[bytes]:
    parts: list[bytes] = []
    yield from read_to(session, "archive", path, parts.append, user, timeout, max_bytes=max_bytes)
    return b"".join(parts)


def upload(
    session: SessionLike, local: str | os.PathLike[str], remote: str, user: str | None, timeout: float | None
) -> Steps[None]:
    """A local file to `remote`, or a local directory's tree into `remote` (made if missing), streamed: a tree is
    packed into a temporary file first (tar.gz), then sent a chunk at a time."""
    local = Path(local)
    with tempfile.TemporaryFile() if local.is_dir() else open(local, "rb") as f:
        if local.is_dir():
            yield Local(lambda: _pack(local, f))
        size = os.fstat(f.fileno()).st_size
        op: protocol.Op = "extract" if local.is_dir() else "write"
        req = request(op, remote, user=user, timeout=timeout, input_size=size)
        chunks = iter(lambda: f.read(CHUNK), b"")
        check((yield from call(session, req, source=chunks, timeout=timeout)), f"upload to {remote!r}")


def _pack(directory: Path, into: IO[bytes]) -> None:
    with tarfile.open(fileobj=into, mode="w|gz") as tar:
        for child in sorted(directory.iterdir()):
            tar.add(child, arcname=child.name)
    into.seek(0)


def download(
    session: SessionLike, remote: str, local: str | os.PathLike[str], user: str | None, timeout: float | None
) -> Steps[None]:
    """`remote` to a local file (written beside it, then renamed; its parents made once the read succeeds), or, for
    a directory, its tree into `local` (made if missing; the archive goes through a temporary file)."""
    local = Path(local)
    target = _LocalFile(local)
    try:
        yield from read_to(session, "read", remote, target.write, user, timeout)
        target.finish()
        return
    except SessionIsADirectoryError:
        pass
    finally:
        target.discard()
    with tempfile.TemporaryFile() as spool:
        yield from read_to(session, "archive", remote, spool.write, user, timeout, max_bytes=ARCHIVE_CAP)
        yield Local(lambda: _unpack(spool, local))


class _LocalFile:
    """A local file written as `.NAME.shellq-part` beside it, opened (parents made) on the first write."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.part = path.with_name(f".{path.name}.shellq-part")
        self._file: IO[bytes] | None = None

    def write(self, data: bytes) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.part, "wb")  # noqa: SIM115 - closed in finish() or discard()
        self._file.write(data)

    def finish(self) -> None:
        self.write(b"")  # an empty file is a file too
        assert self._file is not None
        self._file.close()
        os.replace(self.part, self.path)
        self._file = None

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self.part.unlink(missing_ok=True)


def _unpack(spool: IO[bytes], local: Path) -> None:
    spool.seek(0)
    local.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=spool, mode="r|gz") as tar:
        for member in tar:  # named `<basename of remote>/...`: what is under it goes under `local`
            _, _, rest = member.name.partition("/")
            if rest:
                member.name = rest
                _extract(tar, member, local)


def _extract(tar: tarfile.TarFile, member: tarfile.TarInfo, into: Path) -> None:
    """Extract one member with tarfile's `data` filter (no absolute paths, no `..`, no links out, no devices, no
    setuid bits); before Python 3.11.4, which has no filters, members that would need one are refused."""
    if hasattr(tarfile, "data_filter"):
        tar.extract(member, into, filter="data")
        return
    target = (into / member.name).resolve()
    if not target.is_relative_to(into.resolve()) or member.isdev() or member.issym() or member.islnk():
        raise ShellqError(f"refused to unpack {member.name!r}: it would reach outside {into} (or is a device or link)")
    member.mode &= 0o777
    tar.extract(member, into)
