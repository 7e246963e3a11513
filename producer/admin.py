"""Looking after sessions as a whole: list them with their state, delete their history."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from producer.client import Client
from worker import protocol


@dataclass(frozen=True)
class SessionState:
    """One row of `shellq session list`."""

    name: str
    backend: str
    worker_alive: bool
    state: str
    queue_depth: int | None
    current: str
    shell_epoch: int


def list_sessions(client: Client) -> list[SessionState]:
    """Every session with a meta hash (SCAN MATCH shellq:{*}:meta), its worker's liveness and its queue depth."""
    r = client.redis
    rows = []
    for key in r.scan_iter(match="shellq:{*}:meta", count=500):
        name = key.decode()[len("shellq:{") : -len("}:meta")]
        if not protocol.ID_PATTERN.match(name):
            continue
        meta = {k.decode(): v.decode(errors="replace") for k, v in r.hgetall(key).items()}  # type: ignore[union-attr]
        alive = client.session(name).worker_alive()
        rows.append(
            SessionState(
                name=name,
                backend=meta.get("backend", "?"),
                worker_alive=alive,
                state=meta.get("state", "?") if alive else "down",
                queue_depth=_queue_depth(r, protocol.keys(name).cmd),
                current=meta.get("current", "") if alive else "",
                shell_epoch=int(meta.get("shell_epoch", 0)),
            )
        )
    return sorted(rows, key=lambda row: row.name)


def _queue_depth(r: redis.Redis, cmd_key: str) -> int | None:
    """Commands not yet answered: delivered-but-unacknowledged plus not yet delivered (XINFO GROUPS)."""
    try:
        groups: Any = r.xinfo_groups(cmd_key)
    except redis.ResponseError:
        return None
    for g in groups:
        if g["name"] in (protocol.GROUP, protocol.GROUP.encode()):
            lag = g.get("lag")
            return int(g["pending"]) + int(lag) if lag is not None else None
    return None


def delete_session(client: Client, session: str) -> int:
    """Delete every key of a session (streams, meta, journal); returns how many were deleted."""
    k = protocol.keys(session)
    names: list[Any] = [k.cmd, k.res, k.ctl, k.live, k.meta, k.lease, k.seq]
    names += list(client.redis.scan_iter(match=k.jrnl("*"), count=1000))
    return int(client.redis.delete(*names))
