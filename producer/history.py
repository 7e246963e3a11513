"""A session's history, read back and run again: `shellq log` and `shellq replay` (`Session.history`,
`Session.replay`).

The history is the session's two streams joined: every entry of `shellq:{S}:cmd` (what was asked, by whom, when:
the entry id is the server's time of the submit) with the entry of `shellq:{S}:res` that answers it (its
`entry_id`). Nothing is read but those streams and the journal, so a session whose worker is gone, or one stopped
with `--keep`, reads the same.

A replay submits the source's commands, in order, to another session through the normal submit path, each under an
id derived from the source's session and command id (`replay_id`): a replay interrupted and run again with the same
arguments finds the commands it already submitted and waits for their results instead of running them twice. What
is replayed, and why:

* a command that never ran is skipped: cancelled before it started, rejected (a malformed entry, a duplicate id),
  lost or unavailable; so is one with no result yet (the replay stops there: the source is still running);
* a command that ran is replayed, whatever its end: it changed the environment as far as it got. One that timed out
  is replayed with the same timeout, so it gets as far again. One cancelled while it ran (an interrupt: someone
  stopped it) is replayed with a timeout of the time it had run: the closest the destination gets to the same
  state without someone there to stop it at the same moment; its replay ends `timeout`, which counts as the same
  end as `cancelled`. One `interrupted` (its worker died) is replayed with its own timeout;
* file operations and stdin are replayed from the request, when its input was inline (up to 512 KiB); input that
  went in chunks is not kept after its command took it, so such a command is reported `not replayable` and skipped;
* `skip_failed` skips the commands that did not complete with exit code 0.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from producer import files
from worker import protocol
from worker.errors import ShellqError
from worker.protocol import CommandRequest, CommandResult, DecodeError

if TYPE_CHECKING:
    from producer.client import Session

PAGE = 500
"""Entries one XRANGE reads at a time."""
NEVER_RAN = ("rejected", "lost", "unavailable")


@dataclass(frozen=True)
class Record:
    """One command of a session's history: its entry, its request (None when the entry cannot be read: it was
    written by hand, or trimmed), and its result (None while it has none)."""

    entry_id: str
    command_id: str
    request: CommandRequest | None
    result: CommandResult | None
    problem: str | None = None
    """Why `request` is None."""

    @property
    def submitted(self) -> datetime:
        """When it was submitted (the server's clock, from the entry id)."""
        return datetime.fromtimestamp(protocol.entry_key(self.entry_id)[0] / 1000, UTC)

    @property
    def never_ran(self) -> bool:
        r = self.result
        return r is not None and (
            r.status in NEVER_RAN or (r.status == "cancelled" and (r.error or "").startswith("cancelled before"))
        )


def history(session: Session, since: str | None = None, until: str | None = None) -> list[Record]:
    """The session's commands in order, each with its result: after `since` and up to `until` (command ids or
    entry ids; ShellqError for an id the session does not know)."""
    keys, r = session.keys, session.client
    start = _position(session, since) if since else None
    end = _position(session, until) if until else "+"
    results = {res.entry_id: res for res in _results(session)}
    out = []
    for eid, fields in _entries(r, keys.cmd, f"({start}" if start else "-", end):
        cid = protocol.command_id(eid, fields)
        try:
            req, problem = protocol.decode(CommandRequest, fields), None
        except DecodeError as e:
            req, problem = None, f"the entry cannot be read: {e}"
        out.append(Record(eid, cid, req, results.get(eid), problem))
    return out


def _position(session: Session, ref: str) -> str:
    """The entry id of a command id or entry id."""
    if protocol.is_entry_id(ref):
        return ref
    (entry,) = session.client.send(("HGET", session.keys.jrnl(protocol.check_id(ref, "command id")), "entry"))
    if entry is None:
        raise ShellqError(f"session {session.id} has no command {ref!r} (or its record expired)")
    return str(entry.decode())


def _entries(client: Any, key: str, start: str, end: str) -> Iterator[tuple[str, dict[bytes, bytes]]]:
    while True:
        (page,) = client.send(("XRANGE", key, start, end, "COUNT", PAGE))
        for eid, raw in page or []:
            fields = dict(zip(raw[::2], raw[1::2], strict=True)) if isinstance(raw, list) else raw or {}
            yield eid.decode(), fields
        if not page or len(page) < PAGE:
            return
        start = f"({page[-1][0].decode()}"


def _results(session: Session) -> Iterator[CommandResult]:
    for _, fields in _entries(session.client, session.keys.res, "-", "+"):
        try:
            yield protocol.decode(CommandResult, fields)
        except DecodeError:
            continue


# -- replay ----------------------------------------------------------------------------------------------------------


def replay_id(source: str, command_id: str) -> str:
    """The id a command of session `source` is replayed under: the same on every run of the same replay."""
    return "r-" + hashlib.sha256(f"{source}\0{command_id}".encode()).hexdigest()[:32]


@dataclass
class Row:
    """One command of a replay: what it was, what the original did, what its replay did (None: not replayed)."""

    record: Record
    replayed: CommandResult | None = None
    skipped: str | None = None
    """Why it was not replayed."""

    @property
    def same(self) -> bool:
        """Did the replay end as the original did (status and exit code)? A skipped command counts as the same."""
        if self.replayed is None or self.record.result is None:
            return True
        original, replayed = self.record.result, self.replayed
        if original.status == "cancelled" and replayed.status == "timeout":  # stopped early, as the original was
            return True
        return (original.status, original.exit_code) == (replayed.status, replayed.exit_code)


@dataclass
class Report:
    source: str
    destination: str
    rows: list[Row] = field(default_factory=list)

    @property
    def first_difference(self) -> Row | None:
        return next((row for row in self.rows if not row.same), None)


def replay(
    source: Session,
    destination: Session,
    *,
    until: str | None = None,
    dry_run: bool = False,
    skip_failed: bool = False,
    on_row: Any = None,
) -> Report:
    """Submit `source`'s commands (up to `until`, a command or entry id) to `destination` in order, each waited for
    before the next (see the module's docstring for what is replayed and why); `on_row(row)` is called as each one
    is done. With `dry_run`, nothing is submitted: the report says what would be. Raises what `run` raises for
    the destination (NoWorkerError...)."""
    report = Report(source.id, destination.id)
    for record in history(source, until=until):
        row = Row(record, skipped=_skip_reason(record, skip_failed))
        if record.result is None and row.skipped is None:
            row.skipped = "it has no result yet: the replay stops here"
            report.rows.append(row)
            break
        if row.skipped is None and not dry_run:
            assert record.request is not None
            update: dict[str, Any] = {"id": replay_id(source.id, record.command_id), "by": None}
            if record.result is not None and record.result.status == "cancelled":  # stopped while it ran
                update["timeout"] = max(0.05, record.result.duration_ms / 1000)
            req = record.request.model_copy(update=update)
            row.replayed = files.drive(destination, files.call(destination, req, timeout=req.timeout))
        report.rows.append(row)
        if on_row is not None:
            on_row(row)
    return report


def _skip_reason(record: Record, skip_failed: bool) -> str | None:
    if record.request is None:
        return record.problem or "the entry cannot be read"
    if record.never_ran:
        return f"it never ran ({record.result.status if record.result else '?'})"
    req = record.request
    if req.cmd_size or req.input_size is not None:
        size = (req.cmd_size or 0) + (req.input_size or 0)
        return f"not replayable: its input ({size} bytes) went in chunks and was not kept"
    if (
        skip_failed
        and record.result is not None
        and not (record.result.status == "completed" and record.result.exit_code == 0)
    ):
        return "it failed (--skip-failed)"
    return None


def describe(req: CommandRequest | None, width: int = 100) -> str:
    """One line saying what a request asks: its command's first line, or the file operation and its path."""
    if req is None:
        return "(unreadable entry)"
    if req.op == "exec":
        text = req.cmd.decode(errors="replace") if req.cmd else f"({req.cmd_size} bytes of command)"
        lines = text.splitlines() or [""]
        more = f" (+{len(lines) - 1} lines)" if len(lines) > 1 else ""
        line = lines[0][:width] + ("…" if len(lines[0]) > width else "")
        extras = (f" <stdin {len(req.stdin)} bytes>" if req.stdin else "") + (f" [as {req.user}]" if req.user else "")
        return f"{line}{more}{extras}"
    size = len(req.stdin) if req.stdin is not None else req.input_size
    detail = f" ({size} bytes)" if size is not None else ""
    return f"{req.op} {req.path}{detail}" + (f" [as {req.user}]" if req.user else "")


def wait_new_results(session: Session, after: str, block_ms: int = 1000) -> tuple[list[CommandResult], str]:
    """Results committed after entry `after` on the result stream (waiting up to `block_ms`), and the new `after`."""
    (reply,) = session.client.send(("XREAD", "COUNT", PAGE, "BLOCK", block_ms, "STREAMS", session.keys.res, after))
    out = []
    for eid, fields in protocol.stream_entries(reply) if reply else []:
        after = eid
        try:
            out.append(protocol.decode(CommandResult, fields))
        except (DecodeError, ValidationError):
            continue
    return out, after


def request_of(session: Session, entry_id: str) -> CommandRequest | None:
    """The request of one command entry (None when gone or unreadable)."""
    for _, fields in _entries(session.client, session.keys.cmd, entry_id, entry_id):
        try:
            return protocol.decode(CommandRequest, fields)
        except DecodeError:
            return None
    return None
