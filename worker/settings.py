"""The worker's settings, read from `SHELLQ_*` environment variables (see `EnvSettings`)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Literal

from pydantic import Field

from worker import protocol
from worker.protocol import EnvSettings


def state_dir() -> Path:
    """Where shellq keeps its local state: SHELLQ_HOME, else $XDG_STATE_HOME/shellq, else ~/.local/state/shellq."""
    if home := os.environ.get("SHELLQ_HOME"):
        return Path(home)
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "shellq"


class WorkerSettings(EnvSettings):
    """How a worker serves one session."""

    redis_url: str = "redis://localhost:6379/0"
    """Redis to serve from (redis://, rediss://, user:pass@)."""
    session: str
    """The session id."""
    redis_password_file: Path | None = None
    """A file holding the Redis password (kept out of the URL and the environment)."""
    default_timeout: float = Field(default=protocol.DEFAULT_TIMEOUT, gt=0)
    """Execution limit for commands that name none, seconds."""
    max_timeout: float = Field(default=protocol.MAX_TIMEOUT, gt=0)
    """The largest timeout a command may ask for; above it the command is rejected."""
    heartbeat: float = Field(default=1.0, gt=0)
    """Seconds between heartbeats in the session's meta hash."""
    shutdown_grace: float = Field(default=5.0, ge=0)
    """On SIGTERM, how long the running command may go on before it is stopped and reported `interrupted`."""
    kill_grace: float = Field(default=1.0, gt=0)
    """Seconds between the steps SIGINT -> SIGTERM -> SIGKILL when a command is stopped."""
    output_cap: int = Field(default=protocol.OUTPUT_CAP, ge=1024)
    """Bytes of each output stream kept in a result."""
    spool_quota: int = Field(default=1 << 30, ge=0)
    """Bytes of spooled output kept in the session directory."""
    work_dir: Path | None = None
    """The session directory (spooled output, the worker's marker); default: `sessions/<session>` in shellq's state
    directory (`state_dir`), which is this user's own: a fixed path in /tmp could be planted by another user. The
    worker refuses a directory that is not its user's or that others may write."""
    shell_user: str | None = None
    """Run the shell (every command) as this user, a name or uid, with its own groups only, so commands cannot read
    the worker's secrets; needs a worker running as root. It starts in that user's home (else `/`), not in
    `work_dir`. Default: the worker's own user."""
    results_maxlen: int = Field(default=10_000, ge=1)
    """About how many results the result stream keeps (XADD MAXLEN ~)."""
    journal_ttl: int = Field(default=7 * 86400, ge=1, le=protocol.JOURNAL_TTL_MAX)
    """Seconds a command's journal entry (its idempotency record) is kept."""
    block_ms: int = Field(default=1000, ge=1)
    """Longest single wait for a new command; bounds how late a stop request is noticed."""
    lease_ttl: float = Field(default=5.0, gt=0)
    """Seconds a worker's lease lasts without renewal; a successor takes over this long after a worker dies."""
    queue_cap: int = Field(default=1000, ge=1)
    """Unfinished commands a session may hold; a submit beyond raises QueueFullError."""
    results_max_age: float = Field(default=7 * 86400.0, gt=0)
    """Seconds results (and the commands before them) are kept."""
    janitor_every: float = Field(default=60.0, gt=0)
    """Seconds between retention passes."""
    root_commands: bool = False
    """Let a command or file operation ask to run as root (`user="root"`) in a session whose shell runs as another
    user: root there reads the worker's credentials."""
    live_output: bool = True
    """Publish the output of running commands on `shellq:{S}:live` (worker/live.py)."""
    live_maxlen: int = Field(default=256, ge=1)
    """About how many chunks (of at most 16 KiB) the live stream keeps (XADD MAXLEN ~)."""
    live_rate: int = Field(default=1 << 20, ge=1 << 14)
    """Bytes of live output published per second at most; past it (and a 1 MiB buffer) bytes are dropped from the
    live stream, never from the result or the spool."""
    live_ttl: int = Field(default=3600, ge=1)
    """Seconds the live stream is kept after its last chunk."""
    require_durable: bool = False
    """Refuse to start when Redis has no AOF or may evict keys (instead of a loud warning)."""
    instance: str = Field(default_factory=lambda: uuid.uuid4().hex[:16], pattern=r"^[A-Za-z0-9_-]{1,64}$")
    """This worker's identity: its lease token and the `instance` field of the session's meta (a backend sets it
    to recognise the worker it started)."""
    fault: Literal["taken", "ran", "committed"] | None = None
    """Testing only: SIGKILL the worker at this step of the `fault_after`-th command."""
    fault_after: int = Field(default=1, ge=1)
    """Testing only: which command (1-based) triggers `fault`."""
