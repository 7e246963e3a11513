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
    worker: str
    """`alive`, `down` (it had a worker, none serves it now) or `none` (no worker ever served it)."""
    state: str
    queue_depth: int | None
    """Commands not answered yet (None: Redis cannot say)."""
    current: str
    shell_epoch: int

    @property
    def worker_alive(self) -> bool:
        return self.worker == "alive"

    @property
    def note(self) -> str:
        """The running command, or why the queued ones wait."""
        if self.worker_alive:
            return self.current
        if self.queue_depth is None:
            return "no worker"
        return f"no worker, {self.queue_depth} queued" if self.queue_depth else ""


def list_sessions(client: Client) -> list[SessionState]:
    """Every session that has a meta hash or a command stream (SCAN MATCH), with its worker's liveness and queue
    depth: commands submitted to a session that no worker serves are listed too."""
    return [session_state(client, name) for name in session_names(client.redis)]


def session_names(r: redis.Redis) -> list[str]:
    """The ids of the sessions Redis knows: SCAN MATCH shellq:{*}:meta and shellq:{*}:cmd."""
    names = set()
    for suffix in ("meta", "cmd"):
        for key in r.scan_iter(match=f"shellq:{{*}}:{suffix}", count=500):
            name = key.decode(errors="replace")[len("shellq:{") : -len(f"}}:{suffix}")]
            if protocol.ID_PATTERN.match(name):
                names.add(name)
    return sorted(names)


def session_state(client: Client, name: str) -> SessionState:
    """One session's row: its meta hash (HGETALL), liveness (FCALL_RO shellq_alive) and queue depth."""
    raw: Any = client.redis.hgetall(protocol.keys(name).meta)
    meta = {k.decode(): v.decode(errors="replace") for k, v in raw.items()}
    alive = client.session(name).worker_alive()
    worker = "alive" if alive else "down" if "heartbeat_ms" in meta else "none"
    state = meta.get("state", "-")
    if not alive and state not in ("stopped", "gone", "lost"):
        state = "down" if worker == "down" else "-"
    return SessionState(
        name=name,
        backend=meta.get("backend", "-"),
        worker=worker,
        state=state,
        queue_depth=_queue_depth(client.redis, protocol.keys(name).cmd),
        current=meta.get("current", "") if alive else "",
        shell_epoch=int(meta.get("shell_epoch", 0)),
    )


def _queue_depth(r: redis.Redis, cmd_key: str) -> int | None:
    """Commands not yet answered: delivered-but-unacknowledged plus not yet delivered (XINFO GROUPS); every entry
    (XLEN) when no worker ever created the consumer group; 0 when there is no stream."""
    try:
        groups: Any = r.xinfo_groups(cmd_key)
    except redis.ResponseError:
        return 0
    for g in groups:
        if g["name"] in (protocol.GROUP, protocol.GROUP.encode()):
            lag = g.get("lag")
            return int(g["pending"]) + int(lag) if lag is not None else None
    return int(r.xlen(cmd_key))


def delete_session(client: Client, session: str) -> int:
    """Delete every key of a session (streams, meta, journal); returns how many were deleted."""
    k = protocol.keys(session)
    names: list[Any] = [k.cmd, k.res, k.ctl, k.live, k.meta, k.lease, k.seq, k.wake]
    for pattern in (k.jrnl("*"), k.input("*"), k.output("*")):
        names += list(client.redis.scan_iter(match=pattern, count=1000))
    return int(client.redis.delete(*names))


def info(client: Client) -> dict[str, Any]:
    """`shellq info`: every session (its state row, worker heartbeat age in seconds) and every live manager (from
    its lease) with its queue: jobs queued, started (running), failed. JSON-ready."""
    from rq import Queue
    from rq.registry import FailedJobRegistry, StartedJobRegistry

    from containers.jobs import queue_name
    from containers.manager import live_managers

    now: Any = client.redis.time()
    now_ms = int(now[0]) * 1000 + int(now[1]) // 1000
    sessions = []
    for row in list_sessions(client):
        beat: Any = client.redis.hget(protocol.keys(row.name).meta, "heartbeat_ms")
        age = (now_ms - int(beat)) / 1000 if beat else None
        sessions.append({**row.__dict__, "worker_alive": row.worker_alive, "heartbeat_age": age})
    managers = {}
    for host, lease in live_managers(client.redis).items():
        queue = Queue(queue_name(host), connection=client.redis)
        started = StartedJobRegistry(queue=queue)
        failed = FailedJobRegistry(queue=queue)
        managers[host] = {**lease, "queue": queue.name, "queued": queue.count}
        managers[host] |= {"started": started.count, "failed": failed.count}
    return {"sessions": sessions, "managers": managers}
