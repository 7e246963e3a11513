"""The wire contract: key names, the stream entry models, the codec, limits and defaults (docs/design.md "Wire format").

Every stream entry is a flat map whose field names are a model's fields. Scalars are plain text (booleans `1`/`0`,
numbers in decimal), bytes fields are stored as they are, nested values are msgpack, an absent field is None or the
field's default. So a person can write a command and read a result with redis-cli:

    redis-cli XADD 'shellq:{s1}:cmd' '*' cmd 'cd /tmp && ls'
    redis-cli XRANGE 'shellq:{s1}:res' - +
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple, TypeVar

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from worker.errors import ConfigError

WIRE_VERSION = 1
MAX_ENTRY_BYTES = 1 << 20
"""A command entry larger than this (field names and values together) is rejected."""
OUTPUT_CAP = 1 << 20
"""Bytes of stdout (and of stderr) kept in a result: the first and the last half."""
DEFAULT_TIMEOUT = 300.0
"""Execution limit in seconds for a command that names none (SHELLQ_DEFAULT_TIMEOUT)."""
MAX_TIMEOUT = 86400.0
"""The largest timeout a command may ask for (SHELLQ_MAX_TIMEOUT); above it the command is rejected."""
GROUP = "shellq"
"""The consumer group on every session's command stream."""
JOURNAL_TTL_MAX = 10 * 365 * 86400
"""The longest a journal may be kept, in seconds (ten years): Redis refuses an EXPIRE past its clock's range, and
shellq_submit would fail after queueing the command."""

Status = Literal["completed", "timeout", "cancelled", "interrupted", "shell_exited", "rejected", "lost", "unavailable"]

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
_ENTRY_ID = re.compile(rb"^\d+-\d+\Z")


def check_id(value: str, what: str = "id") -> str:
    """Validate a session or command id: `^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$` (safe in keys, ACLs, paths, CLIs)."""
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        raise ConfigError(
            f"invalid {what} {value!r}: use 1-64 letters, digits, '_' or '-', not starting with '_' or '-'"
        )
    return value


def is_entry_id(value: str | bytes) -> bool:
    """Does this look like a stream entry id (`1700000000000-0`)? Client command ids never do."""
    return bool(_ENTRY_ID.match(value.encode() if isinstance(value, str) else value))


def entry_key(entry_id: str) -> tuple[int, int]:
    """Sort key of a stream entry id (`ms-seq`)."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def command_id(entry_id: str, fields: dict[bytes, bytes]) -> str:
    """The id a command entry answers to: its client `id` when that is valid, else its entry id."""
    raw = fields.get(b"id") if isinstance(fields, dict) else None
    if raw is None:
        return entry_id
    text = raw.decode(errors="replace")
    return text if ID_PATTERN.match(text) and not is_entry_id(text) else entry_id


class Keys(NamedTuple):
    """The Redis keys of one session; all carry the hash tag `{S}` so they live on one cluster shard."""

    cmd: str
    res: str
    ctl: str
    live: str
    meta: str
    lease: str
    seq: str
    wake: str
    """The worker's own wake-up stream: a stop adds an entry, which ends the worker's blocking reads at once."""

    def jrnl(self, command_id: str) -> str:
        """The journal hash of one command: `entry` (its command entry id), `res` (its result entry id)."""
        return f"{self.cmd[: -len('cmd')]}jrnl:{command_id}"

    def input(self, command_id: str) -> str:
        """The stream a command's chunked input comes on (its text past the entry cap, its stdin, a file's bytes)."""
        return f"{self.cmd[: -len('cmd')]}in:{command_id}"

    def output(self, command_id: str) -> str:
        """The stream a file operation's output goes on in chunks (a file read, an archive) when it is large."""
        return f"{self.cmd[: -len('cmd')]}out:{command_id}"


def keys(session: str) -> Keys:
    check_id(session, "session id")
    p = f"shellq:{{{session}}}:"
    return Keys(p + "cmd", p + "res", p + "ctl", p + "live", p + "meta", p + "lease", p + "seq", p + "wake")


class WireModel(BaseModel):
    """Base of every stream entry model."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)
    wire_bytes: ClassVar[frozenset[str]] = frozenset()
    """Fields kept as raw bytes on the wire."""
    wire_packed: ClassVar[frozenset[str]] = frozenset()
    """Fields msgpack-encoded on the wire."""

    v: int = WIRE_VERSION
    """Wire version."""

    @field_validator("v")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if value != WIRE_VERSION:
            raise ValueError(f"wire version {value} is not supported (this shellq speaks {WIRE_VERSION})")
        return value


Op = Literal["exec", "write", "read", "list", "stat", "archive", "extract"]


class CommandRequest(WireModel):
    """A command on `shellq:{S}:cmd`: a shell command (`exec`) or a file operation on `path`, run in order with the
    others (worker/files.py). Input too large for the entry comes in chunks on `shellq:{S}:in:<id>`: the command's
    text first (`cmd_size` bytes), then its stdin or the file's bytes (`input_size` bytes)."""

    wire_bytes = frozenset({"cmd", "stdin"})
    wire_packed = frozenset({"env"})

    op: Op = "exec"
    """What to do: `exec` runs `cmd` in the shell; `write`, `read`, `list`, `stat`, `archive` and `extract` act on
    `path`."""
    id: str | None = None
    """Client command id, the idempotency key; absent in hand-written entries (the entry id is used)."""
    cmd: bytes = b""
    """The shell text, run as a file that bash sources (`exec`)."""
    timeout: float | None = Field(default=None, gt=0)
    """Execution limit in seconds; None = the worker's default."""
    env: dict[str, str] | None = None
    """Variables exported before the command (they persist, like `export`)."""
    cwd: str | None = None
    """Directory entered before the command (it persists, like `cd`)."""
    idempotent: bool = False
    """Safe to run again if the worker died while it ran."""
    stdin: bytes | None = None
    """The command's stdin (`exec`) or the bytes to write (`write`) or unpack (`extract`), inline; None: stdin is
    /dev/null, unless `input_size` says it comes in chunks."""
    cmd_size: int | None = Field(default=None, ge=0)
    """Bytes of command text that come in chunks instead of `cmd` (a command over the entry cap)."""
    input_size: int | None = Field(default=None, ge=0)
    """Bytes of stdin (or of the file) that come in chunks after the command text."""
    user: str | None = None
    """Run this one command or file operation as this user (a name or uid), in a child of the shell."""
    merge_stderr: bool = False
    """`exec`: the command's stderr goes to its stdout (`2>&1`), interleaved as written; the result's stderr is
    empty."""
    path: str | None = None
    """The file operation's path; a relative one resolves against the shell's current directory."""
    mode: int | None = Field(default=None, ge=0, le=0o7777)
    """`write`: the file's permission bits (default: an existing file's, else 0o644)."""
    offset: int = Field(default=0, ge=0)
    """`read`: where to start, in bytes."""
    max_bytes: int | None = Field(default=None, ge=0)
    """`read`: how many bytes at most; `archive`: the largest archive allowed."""
    recursive: bool = False
    """`list`: the whole tree below `path`, not only its entries."""
    max_entries: int | None = Field(default=None, ge=1)
    """`list`: stop after this many entries."""
    by: str | None = None
    """Who submitted it (the client's `client_name`, user@host by default); for `shellq log`."""

    @field_validator("id")
    @classmethod
    def _client_id(cls, value: str | None) -> str | None:
        if value is not None and (is_entry_id(value) or not ID_PATTERN.match(value)):
            raise ValueError("must match ^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$ and not look like an entry id")
        return value

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for name in value or {}:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*\Z", name):
                raise ValueError(f"invalid environment variable name {name!r}")
        return value

    @model_validator(mode="after")
    def _op_fields(self) -> CommandRequest:
        if self.op != "exec" and not self.path:
            raise ValueError(f"a {self.op} needs a path")
        if self.op == "exec" and not self.cmd and not self.cmd_size and "cmd" not in self.model_fields_set:
            raise ValueError("cmd: Field required")
        if self.stdin is not None and self.input_size is not None:
            raise ValueError("stdin comes inline or in chunks (input_size), not both")
        return self


class CommandResult(WireModel):
    """The one result of a command, on `shellq:{S}:res`."""

    wire_bytes = frozenset({"stdout", "stderr"})

    id: str
    """The command id: what `submit` returned (the entry id for hand-written commands)."""
    entry_id: str
    """The command's entry id on the command stream."""
    status: Status
    """What happened; see the statuses table in the README."""
    exit_code: int | None = None
    """The command's exit status (signals as 128+n); None when it did not run to an exit."""
    stdout: bytes = b""
    """stdout as kept: all of it, or the first and last 512 KiB when truncated."""
    stderr: bytes = b""
    """stderr as kept."""
    stdout_size: int = 0
    """Total bytes the command wrote to stdout."""
    stderr_size: int = 0
    """Total bytes the command wrote to stderr."""
    truncated: bool = False
    """Some output is not in this entry (see spool_path)."""
    spool_path: str | None = None
    """Directory in the session holding the full `stdout` and `stderr` when truncated."""
    cwd: str | None = None
    """The shell's working directory after the command."""
    duration_ms: float = 0.0
    """Wall time of the command in the shell."""
    shell_epoch: int = 0
    """Increases whenever bash was respawned: a changed epoch means shell state was reset."""
    error: str | None = None
    """Why shellq could not run the command as asked (rejected, lost, unavailable, interrupted), or why a file
    operation failed."""
    errno: int | None = None
    """A file operation that failed with an OS error: its errno (ENOENT, EISDIR, EACCES...); `error` is then its
    strerror."""
    filename: str | None = None
    """The path that OS error is about."""
    streamed: bool = False
    """A file operation's output (`stdout_size` bytes) went in chunks on `shellq:{S}:out:<id>`, not in `stdout`."""


class ControlRequest(WireModel):
    """An out-of-band message on `shellq:{S}:ctl`."""

    op: Literal["interrupt", "shutdown"]
    """`interrupt` a command (running → cancelled, queued → cancelled without running) or `shutdown` the worker."""
    id: str | None = None
    """The command an interrupt is for."""


class OutputChunk(WireModel):
    """A piece of a running command's output on `shellq:{S}:live` (worker/live.py); readers: `Session.stream`."""

    wire_bytes = frozenset({"data"})

    id: str
    """The command id."""
    stream: Literal["stdout", "stderr"]
    """Which of the command's output streams `data` comes from."""
    offset: int = Field(ge=0)
    """Where `data` starts in that stream, in bytes; a jump past what came before means bytes were dropped."""
    lease_epoch: int = 0
    """The fencing epoch of the worker that ran the command: a higher one means the command was started again."""
    data: bytes
    """The bytes, as the command wrote them (stderr with bash's name for the command file rewritten, as in the
    result)."""


M = TypeVar("M", bound=WireModel)


def encode(model: WireModel) -> dict[str, bytes]:
    """The flat field map of a model for XADD; None fields are left out."""
    out = {}
    for name, value in model.__dict__.items():  # the fields, in order (extra="forbid": nothing else)
        if value is None:
            continue
        if value is True or value is False:
            out[name] = b"1" if value else b"0"
        elif isinstance(value, bytes):
            out[name] = value
        elif name in model.wire_packed:
            out[name] = msgpack.packb(value, unicode_errors="surrogateescape")
        else:  # a path that is not UTF-8 (a cwd, say) keeps its exact bytes
            out[name] = str(value).encode(errors="surrogateescape")
    return out


class DecodeError(ValueError):
    """An entry that does not match its model; the message is readable and names the field."""


def decode(model: type[M], fields: dict[bytes, bytes]) -> M:
    """Parse a stream entry's fields into `model`; raises DecodeError with a readable reason."""
    data: dict[str, Any] = {}
    try:
        for raw_name, raw in fields.items():
            name = raw_name.decode()
            if name in model.wire_bytes:
                data[name] = raw
            elif name in model.wire_packed:
                data[name] = msgpack.unpackb(
                    raw, max_str_len=MAX_ENTRY_BYTES, max_bin_len=MAX_ENTRY_BYTES, unicode_errors="surrogateescape"
                )
            else:  # bytes that are not UTF-8 survive as surrogate escapes (os.fsdecode's convention)
                data[name] = raw.decode(errors="surrogateescape")
    except (UnicodeDecodeError, ValueError, msgpack.UnpackException) as e:
        raise DecodeError(f"field {raw_name!r} cannot be read: {e}") from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        reasons = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'entry'}: {err['msg']}" for err in e.errors())
        raise DecodeError(reasons) from None


def entry_size(fields: dict[bytes, bytes]) -> int:
    return sum(len(k) + len(v) for k, v in fields.items())


FUNCTIONS = (Path(__file__).with_name("functions.lua")).read_text()
"""The Redis Functions library `shellq`: submit, commit, heartbeat and liveness, each one atomic step."""
FUNCTIONS_VERSION = int(re.search(r"^local VERSION = (\d+)$", FUNCTIONS, re.MULTILINE).group(1))  # type: ignore[union-attr]
"""The library's version; raised with every change to functions.lua."""
CALLER = f"shellq/{FUNCTIONS_VERSION}"
"""The first argument of every FCALL: the library refuses a caller of another version (a VERSION error)."""


def version_refusal(error: Exception) -> ConfigError | None:
    """The ConfigError to raise for a VERSION error reply (the library in Redis is another version), else None."""
    if not str(error).startswith("VERSION"):
        return None
    return ConfigError(
        f"{str(error).removeprefix('VERSION ')}; this shellq speaks version {FUNCTIONS_VERSION}: workers and "
        "producers of one Redis must run the same shellq version"
    )


def stream_entries(reply: Any) -> list[tuple[str, dict[bytes, bytes]]]:
    """The entries of a raw XREAD/XREADGROUP reply (a RESP3 map, a RESP2 list, or a function's flat lists), as
    (entry id, fields); a pending entry whose payload was deleted has empty fields."""
    out = []
    for _, entries in reply.items() if isinstance(reply, dict) else reply or []:
        for eid, raw in entries:
            fields = dict(zip(raw[::2], raw[1::2], strict=True)) if isinstance(raw, list) else raw or {}
            out.append((eid.decode(), fields))
    return out


def entries_by_key(reply: Any) -> dict[str, list[tuple[str, dict[bytes, bytes]]]]:
    """`stream_entries` of an XREAD over several keys, per key."""
    pairs = reply.items() if isinstance(reply, dict) else reply or []
    return {key.decode(): stream_entries([(key, entries)]) for key, entries in pairs}


def cancelled_error(reason: str) -> str:
    """The `error` of a command a producer cancelled before any worker took it: the same whether the producer reads
    it from the journal or the worker that takes the command commits it."""
    return f"cancelled before it started: {reason}"


def durability_problems(info: dict[str, Any]) -> list[str]:
    """What makes a Redis lose accepted commands or results, from its INFO `persistence` and `memory` fields."""
    problems = []
    if str(info.get("aof_enabled", "0")) == "0":
        problems.append("AOF is off: a Redis crash loses accepted commands and results")
    policy = str(info.get("maxmemory_policy", "noeviction"))
    if policy != "noeviction":
        problems.append(f"maxmemory-policy is {policy}: Redis may evict a session's streams")
    return problems


FUNCTIONS_SHA256 = hashlib.sha256(FUNCTIONS.encode()).hexdigest()
"""What identifies this shellq's library: workers and producers run only against exactly this code."""


def loaded_functions(call: Callable[..., Any]) -> str | None:
    """The code of the library `shellq` in Redis (FUNCTION LIST LIBRARYNAME shellq WITHCODE), None when there is
    none. `call` sends one command with the caller's client."""
    for library in call("FUNCTION", "LIST", "LIBRARYNAME", "shellq", "WITHCODE") or []:
        fields = library if isinstance(library, dict) else dict(zip(library[::2], library[1::2], strict=True))
        fields = {k.decode() if isinstance(k, bytes) else k: v for k, v in fields.items()}
        name, code = fields.get("library_name"), fields.get("library_code")
        if name in ("shellq", b"shellq") and code is not None:
            return code.decode(errors="replace") if isinstance(code, bytes) else str(code)
    return None


def load_functions(call: Callable[..., Any], reply_error: type[Exception]) -> None:
    """Make sure Redis holds exactly this shellq's library (its code, not only its version number: a library
    replaced with changed code under the same version would forge every session's results). When it holds none or
    other code, FUNCTION LOAD REPLACE ours (persisted and replicated by Redis like data) if this client's user may
    (the admin). `call` sends one command with the caller's client; `reply_error` is what that client raises for an
    error reply. ConfigError when Redis has a newer library (loading ours over it would break the shellq that loaded
    it), or when the library is missing or differs and this user may not load it (a session's worker or producer)."""
    code = loaded_functions(call)
    if code == FUNCTIONS:
        return
    found = re.search(r"^local VERSION = (\d+)$", code or "", re.MULTILINE)
    theirs = int(found.group(1)) if found else None
    if theirs is not None and theirs > FUNCTIONS_VERSION:
        raise ConfigError(
            f"Redis has shellq functions version {theirs}, newer than this shellq's ({FUNCTIONS_VERSION}): "
            "upgrade this shellq; workers and producers of one Redis must run the same version"
        )
    try:
        call("FUNCTION", "LOAD", "REPLACE", FUNCTIONS)
    except reply_error as e:
        if "NOPERM" not in str(e) and "no permissions" not in str(e):  # redis-py drops the NOPERM code
            raise
        what = (
            "missing"
            if code is None
            else (
                f"not this shellq's code (version {theirs}, sha256 {hashlib.sha256(code.encode()).hexdigest()[:16]}; "
                f"this shellq's: version {FUNCTIONS_VERSION}, sha256 {FUNCTIONS_SHA256[:16]})"
            )
        )
        raise ConfigError(
            f"shellq's Redis functions are {what}, and this Redis user may not load them: run shellq with the admin "
            "URL once (`shellq session start` or `shellq up` loads them), or upgrade this shellq to match"
        ) from None


# -- settings ------------------------------------------------------------------------------------------------

S = TypeVar("S", bound="EnvSettings")
log = logging.getLogger("shellq.settings")

ENV_NAMES = frozenset(
    f"SHELLQ_{name}"
    for name in [
        *("REDIS_URL", "SESSION", "REDIS_PASSWORD_FILE", "DEFAULT_TIMEOUT", "MAX_TIMEOUT", "HEARTBEAT"),
        *("SHUTDOWN_GRACE", "KILL_GRACE", "OUTPUT_CAP", "SPOOL_QUOTA", "WORK_DIR", "RESULTS_MAXLEN"),
        *("JOURNAL_TTL", "BLOCK_MS", "NO_WORKER_AFTER", "HOME", "LEASE_TTL", "QUEUE_CAP", "RESULTS_MAX_AGE"),
        *("JANITOR_EVERY", "REQUIRE_DURABLE", "FAULT", "FAULT_AFTER", "RETRY_FOR", "INSTANCE", "SHELL_USER"),
        *("LIVE_OUTPUT", "LIVE_MAXLEN", "LIVE_RATE", "LIVE_TTL", "ROOT_COMMANDS", "CLIENT_NAME"),
    ]
)
"""Every SHELLQ_* variable shellq reads (worker and producer); others are warned about, not fatal."""


class EnvSettings(BaseModel):
    """A settings model whose field `x` is read from `SHELLQ_X`."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    @classmethod
    def from_env(cls: type[S], environ: dict[str, str] | None = None, **overrides: Any) -> S:
        """Read `SHELLQ_<FIELD>` for each field; explicit `overrides` (not None) win. Warns about unknown names."""
        environ = dict(os.environ if environ is None else environ)
        warn_unknown(environ)
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            var = f"SHELLQ_{name.upper()}"
            if environ.get(var):
                values[name] = environ[var]
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            reasons = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise ConfigError(f"invalid {cls.__name__}: {reasons}") from None


_warned: set[str] = set()


def warn_unknown(environ: dict[str, str]) -> None:
    """Log (once per name and process) each SHELLQ_* variable shellq does not read, with the closest known name."""
    for var in sorted(v for v in environ if v.startswith("SHELLQ_") and v not in ENV_NAMES | _warned):
        _warned.add(var)
        close = difflib.get_close_matches(var, sorted(ENV_NAMES), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        log.warning("unknown setting %s is ignored%s", var, hint)
