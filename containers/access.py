"""Redis roles as ACL users (docs/design.md "Security"): the admin (whoever holds the URL shellq was given), and per
session a worker user and a producer user that reach that session's keys and nothing else.

    grant(r, "s1")   -> Credentials: makes (or rotates) the users shellq.worker.s1 and shellq.producer.s1
    revoke(r, "s1")  -> deletes them

Both persist the change (ACL SAVE) where the server has an aclfile, so a restart keeps the users; where it has none
(a server someone else runs without one), the users last until the server restarts, and `grant` says so once.
The admin needs: ACL SETUSER, ACL DELUSER, ACL SAVE (optional), FUNCTION LOAD, FUNCTION LIST, and the data commands
on `shellq:*` (README "Security" lists them).
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import redis

from worker import protocol
from worker.errors import ConfigError

log = logging.getLogger("shellq.access")

WORKER_COMMANDS = (
    *("fcall", "fcall_ro", "function|list", "xread", "xreadgroup", "xautoclaim", "xack", "xgroup|create"),
    *("xinfo|groups", "xrange", "xtrim", "xpending", "xadd", "xdel", "hset", "hget", "hmget", "hincrby", "hsetnx"),
    *("hexists", "get", "set", "incr", "expire", "pttl", "time", "ping", "client|setname", "del", "xlen"),
)
"""What a session's worker sends (worker/store.py, worker/loop.py, worker/control.py and, inside FCALL, the
commands of worker/functions.lua): no @admin, no @dangerous (INFO, CLIENT LIST, KEYS...), no FUNCTION change."""

PRODUCER_COMMANDS = (
    *("fcall", "fcall_ro", "function|list", "xread", "xrange", "xrevrange", "xlen", "xinfo|groups", "xadd"),
    *("hget", "hmget", "hgetall", "hset", "get", "set", "incr", "expire", "time", "ping"),
    "client|setname",
)
"""What `Client` sends for one session (producer/client.py and, inside FCALL, shellq_submit and shellq_cancel)."""


@dataclass(frozen=True)
class Credentials:
    """The users of one session and their passwords (hex, 64 characters)."""

    session: str
    worker_password: str
    producer_password: str

    @property
    def worker_user(self) -> str:
        return worker_user(self.session)

    @property
    def producer_user(self) -> str:
        return producer_user(self.session)


def worker_user(session: str) -> str:
    return f"shellq.worker.{protocol.check_id(session, 'session id')}"


def producer_user(session: str) -> str:
    return f"shellq.producer.{protocol.check_id(session, 'session id')}"


def worker_rules(session: str) -> list[str]:
    """ACL SETUSER rules of the session's worker: every key of the session, read and write; its commands only."""
    return ["resetkeys", f"~{_prefix(session)}*", "resetchannels", "-@all", *(f"+{c}" for c in WORKER_COMMANDS)]


def producer_rules(session: str) -> list[str]:
    """ACL SETUSER rules of the session's producer: read every key of the session; write its commands, journal,
    control requests and submit counter, never its results (only the worker commits those), its meta (what the
    worker and the backend record there, pids included, is trusted by them) or its lease; and the transfer streams
    (input it sends, output it consumes)."""
    p = _prefix(session)
    keys = [f"%R~{p}*", *(f"~{p}{name}" for name in ("cmd", "jrnl:*", "ctl", "seq", "in:*", "out:*"))]
    transfers = f"(~{p}in:* ~{p}out:* +xdel +del)"  # deleting: only the transfer streams, never the command stream
    return ["resetkeys", *keys, "resetchannels", "-@all", *(f"+{c}" for c in PRODUCER_COMMANDS), "clearselectors",
            transfers]  # fmt: skip


def grant(r: redis.Redis, session: str, worker_password: str | None = None) -> Credentials:
    """Create the session's worker and producer users with new passwords; for a session started again on the same
    name, the old passwords stop working and the connections made with them are closed (CLIENT KILL USER).
    `worker_password`: keep this one for the worker (a worker that runs on, adopted by a retried start; its
    connections stay open). Loads shellq's Functions first (only the admin may). Raises ConfigError when `r` may
    not administer ACLs."""
    if r.connection_pool.connection_kwargs.get("db", 0):
        raise ConfigError(
            "shellq keeps its sessions in database 0: its session users are the server's, not a database's (a user"
            " that may SELECT reaches every database), so another database would be no boundary"
        )
    protocol.load_functions(r.execute_command, redis.ResponseError)
    creds = Credentials(session, worker_password or secrets.token_hex(32), secrets.token_hex(32))
    users = [(creds.worker_user, creds.worker_password, worker_rules(session))]
    users.append((creds.producer_user, creds.producer_password, producer_rules(session)))
    try:
        for user, password, rules in users:
            _call(r, "ACL", "SETUSER", user, "reset", "on", f">{password}", *rules)
            if not (worker_password and user == creds.worker_user):
                _call(r, "CLIENT", "KILL", "USER", user)
    except redis.ResponseError as e:
        why = f"cannot create the users of session {session} (this Redis user needs ACL SETUSER)"
        raise ConfigError(f"{why}: {e}") from None
    save(r)
    _record_durability(r, session)
    return creds


def new_producer_password(r: redis.Redis, session: str) -> str:
    """Give the session's producer user a new password (the old one stops working) and return it: what an agent
    handed this one session connects with (`url_for`)."""
    password = secrets.token_hex(32)
    try:
        _call(r, "ACL", "SETUSER", producer_user(session), "resetpass", f">{password}")
        _call(r, "CLIENT", "KILL", "USER", producer_user(session))
    except redis.ResponseError as e:
        raise ConfigError(f"cannot set the producer password of session {session}: {e}") from None
    save(r)
    return password


def revoke(r: redis.Redis, session: str) -> int:
    """Delete the session's users and close their connections (ACL DELUSER does); returns how many existed."""
    try:
        deleted = int(_call(r, "ACL", "DELUSER", worker_user(session), producer_user(session)))
    except redis.ResponseError as e:
        why = f"cannot delete the users of session {session} (this Redis user needs ACL DELUSER)"
        raise ConfigError(f"{why}: {e}") from None
    if deleted:
        save(r)
    return deleted


def sessions_with_users(r: redis.Redis) -> set[str]:
    """The sessions that have a worker or producer user (ACL USERS)."""
    names = (u.decode() if isinstance(u, bytes) else str(u) for u in _call(r, "ACL", "USERS"))
    return {n.split(".", 2)[2] for n in names if n.startswith(("shellq.worker.", "shellq.producer."))}


def _record_durability(r: redis.Redis, session: str) -> None:
    """Check the server's durability for the session's worker, whose user may not run INFO: record what is wrong in
    the session's meta (`durability`, one problem a line; empty: nothing), where the worker reads it."""
    try:
        info: dict[str, Any] = {**r.info("persistence"), **r.info("memory")}
    except redis.ResponseError:
        return  # this admin may not run INFO either: the worker says durability is unknown
    r.hset(protocol.keys(session).meta, "durability", "\n".join(protocol.durability_problems(info)))


_warned: set[str] = set()


def save(r: redis.Redis) -> None:
    """ACL SAVE, so a restarted server keeps the users; a server without an aclfile gets one warning."""
    try:
        _call(r, "ACL", "SAVE")
    except redis.ResponseError as e:
        if "unsaved" not in _warned:
            log.warning("session users will not survive a restart of this Redis (no aclfile: %s)", e)
            _warned.add("unsaved")


def url_for(url: str, user: str, password: str | None = None) -> str:
    """`url` with its credentials replaced by `user` (and `password`, when given: a URL to hand to an agent)."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    netloc = f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{parts.port}"
    auth = quote(user, safe="") + (f":{quote(password, safe='')}" if password else "")
    return urlunsplit((parts.scheme, f"{auth}@{netloc}", parts.path, parts.query, ""))


def _call(r: redis.Redis, *args: Any) -> Any:
    return r.execute_command(*args)  # type: ignore[no-untyped-call]


def _prefix(session: str) -> str:
    return f"shellq:{{{protocol.check_id(session, 'session id')}}}:"
