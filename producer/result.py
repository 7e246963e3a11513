"""`Result`: what an agent gets back for a command (str views of the output, with the raw bytes kept)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict

from worker.protocol import CommandResult, Status


class Result(BaseModel):
    """The one result of a command, as the producer API returns it."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    id: str
    """The command id (what `submit` returned)."""
    status: Status
    """completed, timeout, cancelled, interrupted, shell_exited, rejected, lost or unavailable."""
    exit_code: int | None
    """The command's exit status (signals as 128+n); None when it did not run to an exit."""
    stdout: str
    """stdout decoded as UTF-8 with replacement characters."""
    stderr: str
    """stderr decoded as UTF-8 with replacement characters."""
    stdout_bytes: bytes
    """The stdout bytes kept (all, or the first and last halves of the cap when truncated)."""
    stderr_bytes: bytes
    """The stderr bytes kept."""
    stdout_size: int
    """Total bytes the command wrote to stdout."""
    stderr_size: int
    """Total bytes the command wrote to stderr."""
    truncated: bool
    """Some output is only in the spool (`spool_path`)."""
    spool_path: str | None
    """Directory in the session's environment with the full `stdout` and `stderr` when truncated."""
    cwd: str | None
    """The shell's working directory after the command."""
    duration_ms: float
    """Time the command took in the shell."""
    shell_epoch: int
    """Increases whenever bash was respawned; a change means the shell's state was reset."""
    error: str | None
    """Why shellq could not run the command as asked."""
    entry_id: str
    """The command's entry id on the session's command stream."""

    @property
    def ok(self) -> bool:
        """The command ran to its end with exit code 0."""
        return self.status == "completed" and self.exit_code == 0

    @classmethod
    def from_wire(cls, r: CommandResult) -> Result:
        """The view of a result entry. (pydantic-core validates the fields read one by one faster than model_dump
        plus validation, or model_construct, would build it.)"""
        data = {name: getattr(r, name) for name in _FROM_WIRE}
        data.update(stdout_bytes=r.stdout, stderr_bytes=r.stderr)
        data.update(stdout=r.stdout.decode(errors="replace"), stderr=r.stderr.decode(errors="replace"))
        for name in ("cwd", "error", "spool_path"):  # the wire keeps a path's exact bytes; the view replaces
            if data[name] is not None:
                data[name] = data[name].encode(errors="surrogateescape").decode(errors="replace")
        return cls(**data)


_FROM_WIRE = tuple(name for name in Result.model_fields if name in CommandResult.model_fields)
"""The fields a Result takes as they are from its CommandResult."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of a command's output, as `Session.stream` yields it."""

    stream: Literal["stdout", "stderr"]
    """Which output stream the bytes come from."""
    data: bytes
    """The bytes."""
    offset: int
    """Where `data` starts in its stream, in bytes. It equals the end of the previous chunk of that stream unless
    bytes were dropped from the live stream (more than its rate or buffer allow, or trimmed before a late reader
    came): those are in the result's head and tail and in the spool. A lower one means the command was started over
    (its worker died and the command was idempotent)."""


@dataclass(frozen=True, slots=True)
class FileInfo:
    """An entry of `Session.list_dir`."""

    path: str
    """The directory given joined with the entry's name (bytes that are not UTF-8 as surrogate escapes, as
    `os.fsdecode` gives them)."""
    size: int
    """Bytes (st_size)."""
    mode: int
    """st_mode: type and permission bits (`stat.S_ISLNK(mode)` for a symlink, which is not followed)."""
    mtime: float
    """Last modification, seconds since the epoch."""
    is_dir: bool
