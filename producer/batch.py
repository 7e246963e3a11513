"""`Client.run_many`: many commands on many sessions with one pipelined submit and one blocking read over every
result stream at a time, for orchestrators that drive tens to hundreds of sessions without a thread each."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis

from producer import core
from worker import protocol
from worker.errors import (
    InvalidRequestError,
    NoWorkerError,
    ResultTimeoutError,
    SessionStateLostError,
    ShellqError,
    WaitError,
)
from worker.protocol import CommandRequest

if TYPE_CHECKING:
    from producer.client import Client, Session

OPTIONS = frozenset({"timeout", "id", "idempotent", "env", "cwd", "user", "merge_stderr"})
"""What an item's options may hold: the keyword arguments of `Session.run`."""


@dataclass
class Pending:
    """An item waiting for its result (its session: a Session or an AsyncSession)."""

    index: int
    session: Any
    command_id: str
    deadline: float
    started: float = field(default_factory=time.monotonic)


def run_many(client: Client, items: Sequence[tuple[Any, ...]], timeout: float | None = None) -> list[Any]:
    """See Client.run_many."""
    out: list[Any] = [None] * len(items)
    sessions: dict[str, Session] = {}
    planned: list[tuple[int, Session, Any]] = []
    for i, item in enumerate(items):
        try:
            sid, request = plan(item, timeout)
            session = sessions.setdefault(sid, client.session(sid))
            session._submit_call(request)  # an entry over the size limit is this item's error
        except ShellqError as e:
            out[i] = e
            continue
        planned.append((i, session, request))
    if not planned:
        return out
    order = list(dict.fromkeys(s.id for _, s, _ in planned))
    tails = [("XREVRANGE", sessions[sid].keys.res, "+", "-", "COUNT", 1) for sid in order]
    replies = _send(client, *tails, *(s._submit_call(req) for _, s, req in planned))
    for sid, tail in zip(order, replies, strict=False):
        sessions[sid]._last_seen = "0-0" if not tail or isinstance(tail, Exception) else tail[0][0].decode()
    pending: list[Pending] = []
    now = time.monotonic()
    for (i, session, request), reply in zip(planned, replies[len(order) :], strict=True):
        try:
            session._submitted(request, reply)
        except ShellqError as e:
            out[i] = e
            continue
        limit = request.timeout or client.settings.default_timeout
        pending.append(Pending(i, session, str(request.id), now + limit + core.RUN_MARGIN))
    while pending:
        pending = _wait_round(client, pending, out)
    return out


def plan(item: tuple[Any, ...], timeout: float | None) -> tuple[str, CommandRequest]:
    """An item's session id and command request (shared with the async twin); its error otherwise."""
    if not isinstance(item, tuple | list) or len(item) not in (2, 3):
        raise InvalidRequestError(f"an item is (session, command) or (session, command, options), not {item!r}")
    sid, command = item[0], item[1]
    options: dict[str, Any] = dict(item[2]) if len(item) == 3 else {}
    if unknown := set(options) - OPTIONS:
        raise InvalidRequestError(f"unknown options {sorted(unknown)}: run_many takes {sorted(OPTIONS)}")
    protocol.check_id(sid, "session id")
    request = core.request(
        command,
        options.get("id"),
        options.get("timeout", timeout),
        bool(options.get("idempotent", False)),
        options.get("env"),
        options.get("cwd"),
        options.get("user"),
        bool(options.get("merge_stderr", False)),
    )
    return sid, request


def _send(client: Client, *commands: tuple[Any, ...]) -> list[Any]:
    """One round trip; error replies come back in their place (as redis.ResponseError) instead of failing the rest.
    Loads shellq's functions first, and again if Redis came back empty."""
    client.ensure_functions()
    replies = client.send(*commands, errors_in_place=True)
    if any(isinstance(r, redis.ResponseError) and "Function not found" in str(r) for r in replies):
        client.ensure_functions(again=True)
        replies = client.send(*commands, errors_in_place=True)
    return replies


def _wait_round(client: Client, pending: list[Pending], out: list[Any]) -> list[Pending]:
    """One blocking read over the result streams of every session with a pending command (from where each was
    last read), pipelined with the journals of those commands; settles what the journals name, gives up on what
    ran out of time or has no worker, and returns what is still pending."""
    now = time.monotonic()
    still: list[Pending] = []
    for p in pending:
        if now >= p.deadline:
            out[p.index] = _give_up(p, ResultTimeoutError(f"no result for {p.command_id} on session {p.session.id}"))
        else:
            still.append(p)
    if not still:
        return []
    streams = {p.session.id: p.session for p in still}
    block = max(1, int(min(1.0, min(p.deadline for p in still) - now) * 1000))
    read: tuple[Any, ...] = ("XREAD", "COUNT", core.READ_COUNT, "BLOCK", block, "STREAMS")
    read += tuple(s.keys.res for s in streams.values()) + tuple(s._last_seen or "0-0" for s in streams.values())
    replies = client.send(read, *(p.session._journal(p.command_id) for p in still))
    by_key = by_stream(replies[0])
    left: list[Pending] = []
    for p, journal in zip(still, replies[1:], strict=True):
        try:
            found = p.session._found(p.command_id, by_key.get(p.session.keys.res), journal)
        except ShellqError as e:
            out[p.index] = e
            continue
        if found is not None:
            out[p.index] = found
        else:
            left.append(p)
    return _check_workers(client, left, out)


def by_stream(reply: Any) -> dict[str, Any]:
    """A raw XREAD reply over many streams, split into one single-stream reply per stream key."""
    pairs = reply.items() if isinstance(reply, dict) else reply or []
    return {(k.decode() if isinstance(k, bytes) else str(k)): {k: entries} for k, entries in pairs}


def _check_workers(client: Client, pending: list[Pending], out: list[Any]) -> list[Pending]:
    """Commands that have waited `no_worker_after` seconds: is their session's worker alive? Those of a session
    without one are given up (cancelled unless a worker took them) with NoWorkerError in their place."""
    now, limit = time.monotonic(), client.settings.no_worker_after
    due = {p.session.id: p.session for p in pending if now - p.started >= limit}
    if not due:
        return pending
    dead = set()
    for sid, session in due.items():
        try:
            session._check_worker()
        except (NoWorkerError, SessionStateLostError):
            dead.add(sid)
    left = []
    for p in pending:
        if p.session.id in dead:
            error = NoWorkerError(f"no worker serves session {p.session.id}")
            out[p.index] = _give_up(p, error)
        else:
            if p.session.id in due:
                p.started = now  # asked again in `no_worker_after` seconds
            left.append(p)
    return left


def _give_up(p: Pending, error: WaitError) -> Any:
    """Session._give_up for one item: its result if one came meanwhile, else the error it raises (in place)."""
    try:
        return p.session._give_up(p.command_id, error, cancel=True)
    except ShellqError as e:
        return e
