"""The worker's side of a session in Redis: the lease, taking and committing commands, recovery reads, the
session's state, durability checks and retention. Every method is one or two round trips, named by its command."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worker import protocol, resp
from worker.errors import ConfigError, FencedError, RedisReplyError, RedisUnavailableError, SessionStateLostError
from worker.protocol import CommandResult
from worker.settings import WorkerSettings

log = logging.getLogger("shellq.worker")

CONSUMER = "worker"
"""One consumer name for every worker of a session: the lease, not the group, decides who works."""
Entry = tuple[str, dict[bytes, bytes] | None]


def connect(url: str, password_file: Path | None = None, name: str | None = None) -> resp.Redis:
    """A client for `url` whose connections are called `name` (CLIENT SETNAME); the password, if any, comes from
    `password_file`, read at each connect (never kept). It never retries by itself: re-sending a take whose reply
    was lost would skip that command. The worker's own reconnect loop waits, notices a stop request, and picks up a
    taken command from its pending list."""
    return resp.Redis(url, password_file=password_file, name=name, timeout=30, connect_timeout=5)


def _pairs(flat: Any) -> dict[bytes, Any]:
    """A RESP2 flat list of field, value, ... as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _entries(reply: Any) -> list[Entry]:
    """Stream entries from a raw XREAD-style reply; deleted payloads become None."""
    return [(eid, fields or None) for eid, fields in protocol.stream_entries(reply)]


class SessionStore:
    """Redis operations of one worker on one session, all fenced by the worker's lease token."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.keys = protocol.keys(settings.session)
        self.name = f"shellq-worker:{settings.session}:{settings.instance}"
        self.redis = connect(settings.redis_url, settings.redis_password_file, self.name)
        self.token = settings.instance
        self.epoch = 0
        self._ttl_ms = int(settings.lease_ttl * 1000)
        self._owners: dict[str, str] = {}  # entry id -> the entry owning its command id, for entries just taken
        self._cancels: dict[str, str] = {}  # entry id -> why a producer cancelled it before it was taken
        self.wake_seen = "0-0"
        """The newest wake stream entry this worker has seen (see `wake`)."""

    def wake(self) -> None:
        """XADD to the session's wake stream, which every blocking read of this worker also waits on (see
        `wake_seen`): a stop does not wait out those reads. Best effort: without Redis, they end within a second."""
        try:
            with contextlib.suppress(RedisUnavailableError, RedisReplyError):
                self.redis.pipeline(
                    ("XADD", self.keys.wake, "MAXLEN", 1, "*", "pid", os.getpid()), ("EXPIRE", self.keys.wake, 60)
                )
        finally:
            self.redis.release()  # this thread's own connection: the worker may have closed the others already

    def note_wake(self) -> None:
        """Remember the wake stream's newest entry (one a predecessor left): only a newer one wakes this worker."""
        kept: Any = self.redis.call("XRANGE", self.keys.wake, "-", "+")  # one entry at most (MAXLEN 1)
        self.wake_seen = kept[-1][0].decode() if kept else "0-0"

    def woken(self, reply: Any) -> list[Entry]:
        """The entries of `reply` (an XREAD of some stream and the wake stream) that are not wake-ups, noting the
        wake-ups seen (a predecessor's stop, say, which does not concern this worker: the next read waits past it)."""
        entries: list[Entry] = []
        for key, found in reply.items() if isinstance(reply, dict) else reply or []:
            got = _entries([[key, found]])
            if key.decode() == self.keys.wake:
                self.wake_seen = got[-1][0] if got else self.wake_seen
            else:
                entries += got
        return entries

    def close(self) -> None:
        self.redis.close()

    def load_functions(self) -> None:
        """Load shellq's library unless Redis has this version (see `protocol.load_functions`)."""
        protocol.load_functions(self.redis.call, RedisReplyError)

    # -- lease ---------------------------------------------------------------------------------------------------

    def acquire(self) -> int | None:
        """FCALL shellq_acquire: the fencing epoch if this worker holds the lease now, else None."""
        k = self.keys
        reply: Any = self._call(
            lambda: self.redis.call(
                "FCALL", "shellq_acquire", 2, k.lease, k.meta, protocol.CALLER, self.token, self._ttl_ms
            )
        )
        held, value = reply
        if not held:
            return None
        self.epoch = int(value)
        return self.epoch

    def beat(self, fields: dict[str, Any]) -> bool:
        """FCALL shellq_heartbeat: renew the lease and stamp the heartbeat; False when the lease is someone else's."""
        args = [x for kv in fields.items() for x in kv]
        k = self.keys
        return bool(
            self._call(
                lambda: self.redis.call(
                    "FCALL", "shellq_heartbeat", 2, k.lease, k.meta, protocol.CALLER, self.token, self._ttl_ms, *args
                )
            )
        )

    def record_stop(self) -> None:
        """Mark the session's worker stopped in meta (HSET state stopped), unless another worker holds the lease now
        (GET lease): its session is not stopped."""
        if self.redis.call("GET", self.keys.lease) in (None, self.token.encode()):
            self.redis.call("HSET", self.keys.meta, "state", "stopped", "current", "")

    def _call(self, step: Callable[[], Any]) -> Any:
        """Run one fenced step. FENCED -> FencedError, unless the session's state is gone altogether
        (SessionStateLostError). VERSION (another shellq's library in Redis) -> ConfigError. "Function not found"
        means Redis restarted without our library: load it again, make sure the session's state survived, retry."""
        for attempt in (1, 2):
            try:
                return step()
            except RedisReplyError as e:
                if refusal := protocol.version_refusal(e):
                    raise refusal from None
                if "NOGROUP" in str(e):
                    self.check_session()
                    raise SessionStateLostError(f"{self.keys.cmd} lost its consumer group: {e}") from None
                if "FENCED" in str(e):
                    self.check_session()  # a lease gone with everything else is lost state, not a takeover
                    raise FencedError("this worker's lease was taken over; it stops") from None
                if "Function not found" not in str(e) or attempt == 2:
                    raise
                self.check_session()  # Redis came back empty: the session is lost, not the library only
                self.load_functions()
        raise AssertionError("unreachable")

    # -- session state -------------------------------------------------------------------------------------------

    def open_session(self, marker: Path) -> None:
        """Create the consumer group at 0 the first time (noting it in meta and in `marker`, a file in the session
        directory that names the session); afterwards a missing group or meta means Redis lost the session's state:
        never re-create it. A marker naming another session (a directory copied from it: a fork's image) is no
        evidence about this one."""
        created = self.redis.call("HGET", self.keys.meta, "group_created_ms")
        if created is None and not self._marked(marker):
            self.redis.call("HSET", self.keys.meta, "group_created_ms", int(time.time() * 1000))
            try:
                self.redis.call("XGROUP", "CREATE", self.keys.cmd, protocol.GROUP, "0", "MKSTREAM")
            except RedisReplyError as e:
                if "BUSYGROUP" not in str(e):
                    raise
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(self.settings.session)
            return
        self.check_session()

    def _marked(self, marker: Path) -> bool:
        """Does `marker` say this session was served from here before? (Unreadable: assume it does.)"""
        try:
            named = marker.read_text().strip()
        except FileNotFoundError:
            return False
        except OSError:
            return True
        if named != self.settings.session:
            log.warning("%s names session %r, not %s: ignored", marker, named, self.settings.session)
            return False
        return True

    def check_session(self) -> None:
        """Raise SessionStateLostError unless the session's meta and consumer group exist (XINFO GROUPS)."""
        if self.redis.call("HGET", self.keys.meta, "group_created_ms") is None:
            raise SessionStateLostError(
                f"session {self.settings.session}: Redis has no record of it (came back empty?)"
            )
        if self._group() is None:
            raise SessionStateLostError(f"{self.keys.cmd} lost its consumer group {protocol.GROUP!r}")

    def mark_lost(self, reason: str) -> int:
        """Record the loss in meta and answer every command now on the stream `unavailable`; returns how many."""
        self.redis.call("HSET", self.keys.meta, "state", "lost", "error", reason)
        self.load_functions()
        self.redis.call("SET", self.keys.lease, self.token, "PX", self._ttl_ms, "NX")
        if self.redis.call("GET", self.keys.lease) != self.token.encode():
            return 0  # another worker answers for the session
        answered = 0
        for entry_id, fields in _entries([(None, self.redis.call("XRANGE", self.keys.cmd, "-", "+"))]):
            cid = protocol.command_id(entry_id, fields or {})
            result = CommandResult(
                id=cid, entry_id=entry_id, status="unavailable", error=f"session state lost: {reason}"
            )
            answered += self.commit(entry_id, result, checked=False)
        return answered

    def durability_problems(self) -> list[str] | None:
        """What makes this Redis lose accepted commands or results (INFO persistence, INFO memory). A session's own
        worker user may not run INFO (a @dangerous command): then what the admin found when it made the session's
        users (meta `durability`, see containers/access.py), or None when nobody checked."""
        try:
            info = {**self._info("persistence"), **self._info("memory")}
        except RedisReplyError as e:
            if "NOPERM" not in str(e):
                raise
            found: bytes | None = self.redis.call("HGET", self.keys.meta, "durability")
            return None if found is None else [p for p in found.decode(errors="replace").split("\n") if p]
        return protocol.durability_problems(info)

    # -- commands ------------------------------------------------------------------------------------------------

    def take(self, after: str, block_ms: int, commit: tuple[Any, ...] | None = None) -> tuple[Entry | None, str]:
        """Wait until the command stream has an entry newer than `after` (XREAD BLOCK), then FCALL shellq_take: the
        next new command, delivered to this lease holder (it counts as started from now). One round trip: Redis
        runs the pipelined take the moment the blocked read returns. Also returns where the next wait starts.
        A `commit` (see `commit_and_take`) goes first in the same round trip. The take skips (acknowledges) entries
        a producer cancelled before any worker took them, and remembers who owns the taken entry's command id
        (see `original`) and whether a producer cancelled it (see `cancel_reason`)."""
        k = self.keys
        wait = ("XREAD", "COUNT", 1, "BLOCK", block_ms, "STREAMS", k.cmd, k.wake, after, self.wake_seen)
        take: tuple[Any, ...] = ("FCALL", "shellq_take", 2, k.cmd, k.lease, protocol.CALLER, self.token)
        take += (protocol.GROUP, CONSUMER, self.settings.journal_ttl)
        calls = (commit, wait, take) if commit else (wait, take)
        *_, seen, reply = self._call(lambda: self.redis.pipeline(*calls))
        if reply:
            entry = _entries(reply[0])[0]
            self._owners[entry[0]] = reply[1].decode()
            if reply[2]:
                self._cancels[entry[0]] = reply[2].decode(errors="replace")
            return entry, entry[0]
        newer = self.woken(seen)
        return None, newer[-1][0] if newer else after  # never wait again on an entry someone else took

    def original(self, command_id: str, entry_id: str) -> str | None:
        """The entry that owns `command_id` when it is not `entry_id` (which then duplicates it), else None. The
        owner is the entry the command's journal names (`entry`): known from the take for a new entry, else read
        (HGET jrnl:<id> entry) for one recovered after a crash or a lost reply."""
        owner = self._owners.pop(entry_id, None)
        if owner is None:
            raw: Any = self.redis.call("HGET", self.keys.jrnl(command_id), "entry")
            owner = raw.decode() if raw else entry_id
        return owner if owner != entry_id else None

    def cancel_reason(self, entry_id: str) -> str | None:
        """Why a producer cancelled the entry just taken before any worker took it (journal `cancelled`), else None:
        the worker answers it `cancelled` without running it."""
        return self._cancels.pop(entry_id, None)

    def last_delivered(self) -> str:
        """The consumer group's last delivered entry id (XINFO GROUPS)."""
        group = self._group()
        if group is None:
            raise SessionStateLostError(f"{self.keys.cmd} lost its consumer group")
        return str(group[b"last-delivered-id"].decode())

    def _group(self) -> dict[bytes, Any] | None:
        """The session's consumer group as XINFO GROUPS describes it; None when it (or the stream) is gone."""
        try:
            groups: Any = self.redis.call("XINFO", "GROUPS", self.keys.cmd)
        except RedisReplyError:
            return None
        return next((g for g in map(_pairs, groups) if g.get(b"name") == protocol.GROUP.encode()), None)

    def _info(self, section: str) -> dict[str, str]:
        text: bytes = self.redis.call("INFO", section)
        return dict(line.partition(":")[::2] for line in text.decode().splitlines() if ":" in line)

    def pending(self) -> tuple[list[Entry], list[str]]:
        """Every entry delivered but not acknowledged, oldest first, claimed to this worker (XAUTOCLAIM, then
        XREADGROUP 0); and the ids of pending entries whose payload was trimmed or deleted."""
        deleted: list[str] = []
        cursor = "0-0"
        while True:
            reply: Any = self.redis.call("XAUTOCLAIM", self.keys.cmd, protocol.GROUP, CONSUMER, 0, cursor, "COUNT", 100)
            cursor = reply[0].decode()
            deleted += [d.decode() for d in (reply[2] if len(reply) > 2 else [])]
            if cursor == "0-0":
                break
        own: Any = self.redis.call("XREADGROUP", "GROUP", protocol.GROUP, CONSUMER, "STREAMS", self.keys.cmd, "0")
        return _entries(own), deleted

    def attempt(self, command_id: str) -> int:
        """HINCRBY jrnl:<id> attempts: how many times this command has now been started (for idempotent ones)."""
        return int(self.redis.call("HINCRBY", self.keys.jrnl(command_id), "attempts", 1))

    def command_id_of(self, entry_id: str) -> str:
        """The command id an entry was submitted with (GET jrnl:<entry id>), else the entry id itself."""
        raw: Any = self.redis.call("GET", self.keys.jrnl(entry_id))
        return raw.decode() if raw else entry_id

    def commit(self, entry_id: str, result: CommandResult, checked: bool = True) -> bool:
        """FCALL shellq_commit: result + journal + XACK in one step; False when it had been committed before.
        Unchecked (answering a lost session's commands), a missing group or library is not looked into."""
        call = self._commit_call(entry_id, result)

        def step() -> Any:
            return self.redis.call(*call)

        return bool((self._call(step) if checked else step())[0])

    def commit_and_take(
        self, entry_id: str, result: CommandResult, after: str, block_ms: int
    ) -> tuple[Entry | None, str]:
        """FCALL shellq_commit, and in the same round trip the wait for the next command and its take (see `take`):
        the worker waits again before its producer even has the result, so the next submit wakes it at once and
        the take shares that submit's step in Redis (one fsync, with AOF always, not two)."""
        return self.take(after, block_ms, commit=self._commit_call(entry_id, result))

    def _commit_call(self, entry_id: str, result: CommandResult) -> tuple[Any, ...]:
        s, k = self.settings, self.keys
        call: tuple[Any, ...] = ("FCALL", "shellq_commit", 5, k.res, k.jrnl(result.id), k.cmd, k.lease, k.meta)
        call += (protocol.CALLER, self.token, protocol.GROUP, entry_id, s.journal_ttl, s.results_maxlen, result.id)
        return call + tuple(x for kv in protocol.encode(result).items() for x in kv)

    def trim(self) -> None:
        """Retention: results older than `results_max_age` go (XTRIM MINID ~); commands too, but never at or above
        the oldest unsettled one (pending, or not yet delivered)."""
        cutoff = f"{int(time.time() * 1000) - int(self.settings.results_max_age * 1000)}-0"
        self.redis.call("XTRIM", self.keys.res, "MINID", "~", cutoff)
        count, oldest, *_ = self.redis.call("XPENDING", self.keys.cmd, protocol.GROUP)
        keep_from = oldest.decode() if count and oldest else None
        floor = min(cutoff, keep_from or self.last_delivered(), key=protocol.entry_key)
        self.redis.call("XTRIM", self.keys.cmd, "MINID", "~", floor)


def check_durability(store: SessionStore) -> None:
    """Log each durability problem loudly; with `require_durable`, refuse to start instead."""
    problems = store.durability_problems()
    if problems is None:
        problems = ["unknown: this worker's Redis user may not run INFO, and no admin recorded the server's durability"]
    for problem in problems:
        log.warning("Redis is not durable: %s", problem)
    if problems and store.settings.require_durable:
        raise ConfigError("refusing to start (SHELLQ_REQUIRE_DURABLE): " + "; ".join(problems))
