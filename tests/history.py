"""An operation history of a shellq run and a total-queue checker for it (Jepsen's `total-queue`, RabbitMQ's suite).

The test records what clients did and saw; the commands record that they ran:

    h = History()
    h.submit(session, exec_line(log, "c-1", "make"), "c-1")   # invoke, then ok / fail / timeout
    h.read_results(redis_client, "s1")                         # every result on shellq:{s1}:res
    report = check(h, {"s1": read_executions(log)}, {"s1": stream_order(redis_client, "s1")})
    print(report)                                              # accepted=… results=… duplicated=… lost=… …

Every test command starts with `echo CID >> LOG` (see `exec_line`), so the log lists each execution once, in the
order the shell ran them. `check` raises AssertionError naming every violation:

- every accepted command (a submit that returned, or an entry written by hand) has exactly one result;
- a submit that failed or timed out on the client has zero or one result, never two;
- no result for a command nobody submitted;
- no command executed twice (`may_rerun` ids, submitted `idempotent`, may run once more);
- `completed`/`timeout`/`shell_exited` ran exactly once; `interrupted` at most once; `rejected`/`lost`/
  `unavailable` never (or per `may_rerun`: a poison command ran before it was rejected);
- every executed command has a result;
- per session, execution order equals command-stream order (XRANGE shellq:{S}:cmd).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import redis

from producer import ConfigError, InvalidRequestError, QueueFullError, Session
from worker import protocol

OpType = Literal["invoke", "ok", "fail", "timeout"]
OpKind = Literal["submit", "raw", "result"]
RAN_TO_AN_END = frozenset({"completed", "timeout", "shell_exited"})
NEVER_RAN = frozenset({"rejected", "lost", "unavailable"})


@dataclass(frozen=True)
class Op:
    """One event: a submit's invocation or completion, a hand-written entry, or a result seen on the stream."""

    index: int
    process: str
    """Who did it (the thread's name)."""
    kind: OpKind
    type: OpType
    session: str
    cid: str
    value: str | None = None
    """A result's status; a failed or timed-out submit's error."""
    time: float = 0.0


@dataclass
class Report:
    """What `check` found; `str()` is the one-line summary."""

    accepted: int = 0
    """Distinct commands accepted (submit returned, or written by hand)."""
    indeterminate: int = 0
    """Distinct commands whose submits all failed or timed out on the client."""
    results: int = 0
    """Result entries seen."""
    executions: int = 0
    """Lines in the execution logs."""
    duplicated: int = 0
    """Commands with more than one result or more executions than allowed."""
    lost: int = 0
    """Accepted commands without a result."""
    interrupted: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        statuses = " ".join(f"{k}:{v}" for k, v in sorted(self.statuses.items()))
        return (
            f"accepted={self.accepted} results={self.results} duplicated={self.duplicated} lost={self.lost} "
            f"interrupted={self.interrupted} executions={self.executions} indeterminate={self.indeterminate} "
            f"[{statuses}]"
        )


class History:
    """A thread-safe, append-only list of `Op`s."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ops: list[Op] = []

    def record(self, kind: OpKind, type: OpType, session: str, cid: str, value: str | None = None) -> Op:
        with self._lock:
            op = Op(len(self.ops), threading.current_thread().name, kind, type, session, cid, value, time.monotonic())
            self.ops.append(op)
        return op

    def submit(self, session: Session, cmd: str, cid: str, **options: Any) -> bool:
        """`session.submit(cmd, id=cid, ...)`, recorded as invoke then ok, fail (definitely not queued: a refused
        argument or a full queue) or timeout (outcome unknown: Redis unreachable, no reply). True when accepted."""
        self.record("submit", "invoke", session.id, cid)
        try:
            session.submit(cmd, id=cid, **options)
        except (QueueFullError, ConfigError, InvalidRequestError) as e:
            self.record("submit", "fail", session.id, cid, f"{type(e).__name__}: {e}")
            return False
        except (ConnectionError, TimeoutError, redis.ConnectionError, redis.TimeoutError) as e:
            self.record("submit", "timeout", session.id, cid, f"{type(e).__name__}: {e}")
            return False
        except BaseException as e:
            self.record("submit", "timeout", session.id, cid, f"{type(e).__name__}: {e}")
            raise
        self.record("submit", "ok", session.id, cid)
        return True

    def raw(self, session: str, cid: str) -> None:
        """An entry written with a plain XADD (it is accepted as soon as XADD returns); `cid` is its entry id."""
        self.record("raw", "ok", session, cid)

    def result(self, session: str, cid: str, status: str) -> None:
        """A result seen for `cid`."""
        self.record("result", "ok", session, cid, status)

    def read_results(self, client: redis.Redis, session: str) -> list[dict[bytes, bytes]]:
        """XRANGE shellq:{S}:res: record every result entry of the session; returns their fields."""
        entries: Any = client.xrange(protocol.keys(session).res)
        for _, fields in entries:
            self.result(session, fields[b"id"].decode(), fields[b"status"].decode())
        return [fields for _, fields in entries]

    def sessions(self) -> set[str]:
        with self._lock:
            return {op.session for op in self.ops}

    def results_for(self, session: str, cid: str) -> list[str]:
        """Statuses of the results seen for one command."""
        with self._lock:
            return [
                op.value or "" for op in self.ops if op.kind == "result" and op.session == session and op.cid == cid
            ]

    def accepted(self, session: str | None = None) -> list[tuple[str, str]]:
        """(session, cid) of every accepted command, in the order they were first accepted."""
        with self._lock:
            ops = list(self.ops)
        seen: dict[tuple[str, str], None] = {}
        for op in ops:
            if op.type == "ok" and op.kind in ("submit", "raw") and session in (None, op.session):
                seen.setdefault((op.session, op.cid), None)
        return list(seen)


# -- executions and stream order --------------------------------------------------------------------------------


def exec_line(log: Path, cid: str, body: str = "true") -> str:
    """A test command that first records its own execution in `log`: `echo CID >> LOG; BODY`."""
    return f"echo {cid} >> {log}; {body}"


def read_executions(log: Path) -> list[str]:
    """The command ids in an execution log, one per execution, in execution order (first word of each line)."""
    if not log.exists():
        return []
    return [line.split()[0] for line in log.read_text().splitlines() if line.strip()]


def stream_order(client: redis.Redis, session: str) -> list[str]:
    """XRANGE shellq:{S}:cmd: the command ids in stream order (a hand-written entry's id is its entry id)."""
    entries: Any = client.xrange(protocol.keys(session).cmd)
    order = []
    for eid, fields in entries:
        entry_id = eid.decode()
        raw = fields.get(b"id")
        text = raw.decode(errors="replace") if raw is not None else ""
        ok = raw is not None and protocol.ID_PATTERN.match(text) and not protocol.is_entry_id(text)
        order.append(text if ok else entry_id)
    return order


# -- the checker --------------------------------------------------------------------------------------------------


def analyse(
    history: History,
    executions: Mapping[str, list[str]],
    stream_order: Mapping[str, list[str]],
    *,
    may_rerun: Collection[str] = (),
) -> Report:
    """Classify every command of the history; the violations are in `report.problems` (see the module docstring)."""
    report = Report()
    submitted: dict[tuple[str, str], set[str]] = {}
    results: dict[tuple[str, str], list[str]] = {}
    for op in history.ops:
        key = (op.session, op.cid)
        if op.kind == "result":
            results.setdefault(key, []).append(op.value or "")
        elif op.type != "invoke":
            submitted.setdefault(key, set()).add(op.type)
        else:
            submitted.setdefault(key, set())
    ran: dict[tuple[str, str], int] = Counter((session, cid) for session, cids in executions.items() for cid in cids)
    report.results = sum(len(v) for v in results.values())
    report.executions = sum(ran.values())
    for outcomes in results.values():
        report.statuses.update(outcomes)
    report.interrupted = report.statuses["interrupted"]
    _check_results(report, submitted, results)
    _check_executions(report, results, ran, set(may_rerun))
    for session in sorted(set(executions) | set(stream_order)):
        _check_order(report, session, executions.get(session, []), stream_order.get(session, []))
    return report


def check(
    history: History,
    executions: Mapping[str, list[str]],
    stream_order: Mapping[str, list[str]],
    *,
    may_rerun: Collection[str] = (),
) -> Report:
    """`analyse`, then raise AssertionError listing the violations (the report line first)."""
    report = analyse(history, executions, stream_order, may_rerun=may_rerun)
    if report.problems:
        shown = "\n  ".join(report.problems[:40])
        more = f"\n  ... and {len(report.problems) - 40} more" if len(report.problems) > 40 else ""
        raise AssertionError(f"history check failed: {report}\n  {shown}{more}")
    return report


def _check_results(
    report: Report, submitted: dict[tuple[str, str], set[str]], results: dict[tuple[str, str], list[str]]
) -> None:
    for key, outcomes in sorted(submitted.items()):
        got = results.get(key, [])
        if "ok" in outcomes:
            report.accepted += 1
            if not got:
                report.lost += 1
                report.problems.append(f"lost: {_name(key)} was accepted but has no result")
            elif len(got) > 1:
                report.duplicated += 1
                report.problems.append(f"duplicated result: {_name(key)} has {len(got)} results {got}")
        else:
            report.indeterminate += 1
            if len(got) > 1:
                report.duplicated += 1
                report.problems.append(f"duplicated result: {_name(key)} (submit {outcomes or 'pending'}) has {got}")
    for key, got in sorted(results.items()):
        if key not in submitted:
            report.problems.append(f"unexpected: result {got} for {_name(key)}, which nobody submitted")


def _check_executions(
    report: Report, results: dict[tuple[str, str], list[str]], ran: Mapping[tuple[str, str], int], rerun: set[str]
) -> None:
    for key in sorted(set(results) | set(ran)):
        count, statuses = ran.get(key, 0), results.get(key, [])
        allowed = 2 if key[1] in rerun else 1
        if count > allowed:
            report.duplicated += 1
            report.problems.append(f"duplicated execution: {_name(key)} ran {count} times (results {statuses})")
        if count and not statuses:
            report.problems.append(f"executed without a result: {_name(key)} ran {count} time(s)")
        for status in statuses[:1]:
            if status in RAN_TO_AN_END and not 1 <= count <= allowed:
                report.problems.append(f"{status} but ran {count} times: {_name(key)}")
            elif status == "interrupted" and count > 1:
                report.problems.append(f"interrupted but ran {count} times: {_name(key)}")
            elif status in NEVER_RAN and count > (allowed if key[1] in rerun else 0):
                report.problems.append(f"{status} but ran {count} times: {_name(key)}")


def _check_order(report: Report, session: str, executed: list[str], stream: list[str]) -> None:
    """The first execution of each command, in log order, must follow the command stream's order."""
    in_stream = set(stream)
    first: dict[str, None] = {}
    for cid in executed:
        if cid in in_stream:
            first.setdefault(cid, None)
    ran = list(first)
    expected = [cid for cid in stream if cid in first]
    if ran != expected:
        at = next((i for i, (a, b) in enumerate(zip(ran, expected, strict=True)) if a != b), 0)
        report.problems.append(
            f"order: session {session} ran {ran[at : at + 5]}... where the stream has {expected[at : at + 5]}..."
            f" (position {at})"
        )


def _name(key: tuple[str, str]) -> str:
    return f"{key[0]}/{key[1]}"
