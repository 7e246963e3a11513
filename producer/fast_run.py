"""`Session.run` of one command (producer/client.py) over the worker's RESP client (worker/resp.py), for `shellq
exec`'s fast path (producer/cli_fast.py): FUNCTION LIST (ours must be loaded) and XREVRANGE, then FCALL shellq_submit
pipelined with XREAD BLOCK of the result stream and HMGET of the journal, then XREAD + HMGET until the result, the
worker's liveness checked and a wait that gives up cancelling the command as `Session._wait` and `_give_up` do (with
producer/core.py's own messages: imported then, on the rare path). What it does not expect (an error reply, a result
entry that is not what a worker writes, a session lost or a full queue) ends in None: over to producer/cli.py."""

from __future__ import annotations

import os
import sys
import time

from producer.cli_fast import EXIT_CANCELLED, EXIT_SHELLQ, EXIT_STARTED
from worker.errors import RedisRefusedError, RedisTimeoutError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (2 ms); mypy treats the name as true
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import TypeAlias

    from worker.resp import Redis

    Shown: TypeAlias = tuple[dict[str, object], bytes, bytes]
    """A result as `shellq exec` shows it: its `--json` view (but the base64), its stdout and its stderr."""
    Outcome: TypeAlias = Shown | int | None
    """What a wait ends with: the result, an exit status already explained on stderr, or None: over to the full
    path (with `--id`)."""

# What producer/core.py and worker/protocol.py say, copied so as not to import them (tests/test_cli_fast.py checks)
RUN_MARGIN = 30.0
READ_COUNT = 16
STATUSES = frozenset(
    {"completed", "timeout", "cancelled", "interrupted", "shell_exited", "rejected", "lost", "unavailable"}
)
RESULT_FIELDS = {
    **dict.fromkeys(("v", "exit_code", "stdout_size", "stderr_size", "shell_epoch", "errno"), "int"),
    **dict.fromkeys(("id", "entry_id", "status"), "ascii"),
    **dict.fromkeys(("stdout", "stderr"), "bytes"),
    **dict.fromkeys(("spool_path", "cwd", "error", "filename"), "text"),
    **dict.fromkeys(("truncated", "streamed"), "bool"),
    "duration_ms": "float",
}
"""CommandResult's fields, by how the worker writes them."""


def functions() -> tuple[str, str]:
    """worker/functions.lua, as worker/protocol.py reads it: its code and the caller name `shellq/<version>`."""
    import worker

    with open(os.path.join(os.path.dirname(worker.__file__), "functions.lua"), encoding="utf-8") as f:  # no pathlib
        code = f.read()
    found = [line for line in code.splitlines() if line.startswith("local VERSION = ")]
    version = found[0].removeprefix("local VERSION = ").strip() if found else "0"
    return code, f"shellq/{int(version) if version.isdigit() else 0}"


class Run:
    """`Session.run` of one command (producer/client.py), over worker/resp.py; every step names what it sends."""

    def __init__(self, url: str, name: str, cid: str, settings: dict[str, float | int | str], fields: list[bytes]):
        from worker.resp import Redis

        self.r: Redis = Redis(url, timeout=10.0, connect_timeout=2.0)  # producer/core.py READ_TIMEOUT, CONNECT_TIMEOUT
        self.url, self.name, self.cid, self.settings, self.fields = url, name, cid, settings, fields
        prefix = f"shellq:{{{name}}}:"
        self.res, self.jrnl = prefix + "res", f"{prefix}jrnl:{cid}"
        self.code, self.caller = functions()
        self.last = "0-0"
        self.submitted = False

    def wait_for_result(self, timeout: float | None) -> Outcome:
        """FUNCTION LIST (ours must be loaded) and XREVRANGE (where the result stream ends); FCALL shellq_submit,
        XREAD BLOCK and HMGET of the journal in one round trip; then `wait` as `Session._wait`."""
        library, tail = self.r.pipeline(
            ("FUNCTION", "LIST", "LIBRARYNAME", "shellq", "WITHCODE"), ("XREVRANGE", self.res, "+", "-", "COUNT", "1")
        )
        if loaded_code(library) != self.code:
            return None  # the full path loads them, or says why it may not
        self.last = tail[0][0].decode() if tail else "0-0"
        deadline = time.monotonic() + (timeout or float(self.settings["default_timeout"])) + RUN_MARGIN
        self.submitted = True
        try:
            accepted, read, journal = self.r.pipeline(self.submit_call(), self.read_call(1000), self.journal_call())
        except RedisRefusedError:  # the submit itself was refused (the reads after it never are): nothing queued
            self.submitted = False
            raise
        if accepted[0] == 0:  # an id accepted before: its result, as `Session.result` reads it
            journal, tail = self.r.pipeline(self.journal_call(), ("XREVRANGE", self.res, "+", "-", "COUNT", "1"))
            self.last, read = tail[0][0].decode() if tail else "0-0", None
        elif accepted[0] != 1:
            return None  # a full queue, a session lost or gone: the full path's submit of this id says which
        found = self.found(read, journal)
        return found if found is not False else self.wait(deadline)

    def submit_call(self) -> tuple[str | bytes, ...]:
        """FCALL shellq_submit of the command entry (producer/core.py `submit_call`)."""
        prefix, settings = f"shellq:{{{self.name}}}:", self.settings
        head = ("FCALL", "shellq_submit", "3", prefix + "cmd", self.jrnl, prefix + "seq", self.caller)
        return (*head, str(settings["journal_ttl"]), str(settings["queue_cap"]), self.cid, *self.fields)

    def read_call(self, block_ms: int) -> tuple[str, ...]:
        return ("XREAD", "COUNT", str(READ_COUNT), "BLOCK", str(block_ms), "STREAMS", self.res, self.last)

    def journal_call(self) -> tuple[str, ...]:
        return ("HMGET", self.jrnl, "res", "cancelled", "entry")

    def found(self, read: object, journal: list[bytes | None]) -> Outcome | bool:
        """producer/core.py `found`: the result entry the journal names, from the read or by XRANGE; False: none
        yet."""
        rid = journal[0].decode() if journal[0] is not None else None
        for eid, fields in stream_entries(read):
            self.last = eid
            if eid == rid:
                return result_view(fields, self.cid)
        if rid is not None:
            return self.fetch(rid)
        if journal[1] is not None:
            return None  # cancelled before it started: the full path reads that from the journal
        return False

    def fetch(self, rid: str) -> Outcome:
        """XRANGE res rid rid."""
        for _, fields in stream_entries([(self.res, self.r.call("XRANGE", self.res, rid, rid))]):
            return result_view(fields, self.cid)
        return None  # trimmed: the full path says so

    def wait(self, deadline: float) -> Outcome:
        """XREAD BLOCK (a second at most) and HMGET of the journal until the result comes; once `no_worker_after`
        has passed, FCALL_RO shellq_alive between reads."""
        started, limit = time.monotonic(), float(self.settings["no_worker_after"])
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return self.give_up(None)
            read, journal = self.r.pipeline(
                self.read_call(max(1, int(min(remaining, 1.0) * 1000))), self.journal_call()
            )
            if (found := self.found(read, journal)) is not False:
                return found
            if time.monotonic() - started >= limit:
                alive = self.r.call("FCALL_RO", "shellq_alive", "1", f"shellq:{{{self.name}}}:meta", self.caller)
                if worker_gone(alive, limit):
                    return self.give_up(alive)

    def give_up(self, alive: list[object] | None) -> Outcome:
        """`Session._give_up` with producer/core.py's own errors (imported now: this is the rare path): cancel the
        command unless a worker took it (HGET, FCALL shellq_cancel), then say what became of it as `cmd_exec`
        does."""
        from producer import core
        from worker import protocol
        from worker.errors import (
            NoWorkerError,
            RedisReplyError,
            RedisUnavailableError,
            ResultTimeoutError,
            ShellqError,
            WaitError,
        )

        try:
            if alive is None:
                error: WaitError = ResultTimeoutError(f"no result for {self.cid} on session {self.name} in time")
            else:
                try:
                    core.check_worker(self.name, alive, float(self.settings["no_worker_after"]))
                    return None  # alive by core's reckoning after all: the full path waits on
                except NoWorkerError as e:
                    error = e
            entry = self.r.call("HGET", self.jrnl, "entry")
            outcome, rid = "unknown", None
            if entry is not None:
                call = core.cancel_call(
                    protocol.keys(self.name), int(self.settings["journal_ttl"]), self.cid, entry.decode(), str(error)
                )
                outcome, rid = core.cancel_outcome(self.r.call(*call))
            if outcome == "answered" and rid is not None:
                return self.fetch(rid)
            raise core.give_up_error(error, self.cid, outcome)
        except WaitError as e:
            if e.cancelled:  # it did not run and never will
                print(f"shellq: {e}", file=sys.stderr)
                return EXIT_SHELLQ
            print(f"shellq: {e} (command {self.cid}; do not retry it blindly: it started)", file=sys.stderr)
            return EXIT_STARTED
        except (RedisUnavailableError, RedisReplyError):
            raise  # not the session's answer: the full path takes over
        except ShellqError as e:  # SessionStateLostError
            print(f"shellq: {e}", file=sys.stderr)
            return EXIT_SHELLQ

    def unanswered(self, error: RedisTimeoutError) -> int:
        """Redis accepted the connection and gave no reply within the read timeout: say so as `cmd_exec` does (125,
        or 75 once the submit was sent: the command may have been queued and may still run)."""
        where = f"shellq: cannot reach Redis at {redact(self.url)}: {error}"
        if not self.submitted:
            print(where, file=sys.stderr)
            return EXIT_SHELLQ
        maybe = f"command {self.cid} may have been queued and may still run"
        print(f"{where}; {maybe} (do not retry it blindly: `shellq log` tells)", file=sys.stderr)
        return EXIT_STARTED

    def interrupt(self) -> int:
        """`Session.interrupt`: XADD an interrupt to the session's control stream, on a new connection (a reply
        may be unread on the old one)."""
        self.r.close()
        try:
            ctl = f"shellq:{{{self.name}}}:ctl"
            self.r.call("XADD", ctl, "MAXLEN", "~", "1000", "*", "v", "1", "op", "interrupt", "id", self.cid)
        except Exception as e:
            from worker.errors import RedisUnavailableError

            where = f"cannot reach Redis at {redact(self.url)}: " if isinstance(e, RedisUnavailableError) else ""
            print(f"shellq: {where}{e}", file=sys.stderr)
            return EXIT_SHELLQ
        finally:
            self.r.close()
        print(f"shellq: interrupted; command {self.cid} is being cancelled", file=sys.stderr)
        return EXIT_CANCELLED


def worker_gone(alive: list[int | bytes | None], limit: float) -> bool:
    """Whether producer/core.py `check_worker` raises for this shellq_alive reply: no heartbeat within `limit`
    seconds (by the server's clock), the worker stopped, the session's state lost or its environment gone, or Redis
    refusing the worker's takes for longer than `limit`."""
    now_ms, beat, state, *refused = alive
    if refused and refused[0] and (int(now_ms or 0) - int(refused[0])) / 1000 > limit:
        return True  # Redis refuses the worker's takes
    return beat is None or (int(now_ms or 0) - int(beat)) / 1000 > limit or state in (b"stopped", b"gone", b"lost")


def loaded_code(reply: list[list[bytes]] | None) -> str | None:
    """The code of the library `shellq` in a FUNCTION LIST ... WITHCODE reply (RESP2), as worker/protocol.py
    `loaded_functions` reads it."""
    for library in reply or []:
        fields = dict(zip(library[::2], library[1::2], strict=True))
        if fields.get(b"library_name") == b"shellq" and fields.get(b"library_code") is not None:
            return fields[b"library_code"].decode(errors="replace")
    return None


def stream_entries(reply: object) -> Iterator[tuple[str, dict[bytes, bytes]]]:
    """The entries of an XREAD reply (RESP2), as worker/protocol.py `stream_entries` gives them."""
    for _, entries in reply or []:  # type: ignore[attr-defined]
        for eid, raw in entries:
            fields = dict(zip(raw[::2], raw[1::2], strict=True)) if isinstance(raw, list) else {}
            yield eid.decode(), fields


def result_view(fields: dict[bytes, bytes], cid: str) -> Shown | None:
    """A result entry as `shellq exec` shows it: its Result's fields as producer/cli.py's `--json` view has them
    (`json_text` adds the base64), and the output bytes. None for an entry that is not what a worker writes for
    this command (the full path reads it, or says why it cannot)."""
    values: dict[str, object] = {"v": 1, "exit_code": None, "stdout": b"", "stderr": b"", "stdout_size": 0}
    values |= {"stderr_size": 0, "truncated": False, "spool_path": None, "cwd": None, "duration_ms": 0.0}
    values |= {"shell_epoch": 0, "error": None}
    for raw_name, raw in fields.items():
        name = raw_name.decode(errors="replace")
        kind = RESULT_FIELDS.get(name)
        if kind is None:
            return None
        value = wire_value(kind, raw)
        if value is None:
            return None
        values[name] = value
    if values["v"] != 1 or values.get("id") != cid or values.get("status") not in STATUSES or "entry_id" not in values:
        return None
    out, err = values["stdout"], values["stderr"]
    assert isinstance(out, bytes) and isinstance(err, bytes)
    view = {name: values[name] for name in ("id", "status", "exit_code")}
    view |= {"stdout": out.decode(errors="replace"), "stderr": err.decode(errors="replace")}
    for name in ("stdout_size", "stderr_size", "truncated", "spool_path", "cwd", "duration_ms", "shell_epoch"):
        view[name] = values[name]
    view |= {"error": values["error"], "entry_id": values["entry_id"]}
    return view, out, err


def wire_value(kind: str, raw: bytes) -> object:
    """A result field's value as pydantic reads what the worker writes (worker/protocol.py `encode`); None for
    anything else."""
    if kind == "bytes":
        return raw
    if kind == "text":  # the wire's surrogate escapes, shown with replacement characters (Result.from_wire)
        return raw.decode(errors="replace")
    if kind == "ascii":
        return raw.decode() if raw.isascii() else None
    if kind == "bool":
        return {b"1": True, b"0": False}.get(raw)
    if kind == "int":
        return int(raw) if raw.removeprefix(b"-").isdigit() else None
    if raw.translate(None, b"0123456789.e-+") or not raw[:1].isdigit():  # a float as str(float) writes it
        return None
    try:
        return float(raw)
    except ValueError:
        return None


def redact(url: str) -> str:
    """producer/core.py `redact`: the URL without its password."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}***@{rest.split('@', 1)[1]}" if "@" in rest else url
