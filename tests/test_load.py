"""Load with faults: 100 sessions x 100 commands through 100 worker subprocesses on one Redis (AOF everysec), while
workers are killed with -9 at random and restarted. Nothing accepted may be lost, nothing may run twice.

    .venv/bin/python -m pytest tests/test_load.py -s    # prints `load: accepted=... wall=...s`
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import RedisServer, wait_for
from history import History, analyse, check, exec_line, read_executions, stream_order
from test_faults import Workers, client_for, own_server, worker_pool

from worker import protocol

SESSIONS = 100
COMMANDS = 100
PRODUCERS = 20  # threads, each driving SESSIONS / PRODUCERS sessions with a Client of its own
KILLS = 20
SEED = 20261122
WORKER_ENV = {"SHELLQ_HEARTBEAT": "0.5", "SHELLQ_LEASE_TTL": "3"}


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    yield from worker_pool(tmp_path)


@pytest.fixture
def everysec_server(tmp_path: Path) -> Iterator[RedisServer]:
    yield from own_server("redis", tmp_path, "--appendonly", "yes", "--appendfsync", "everysec")


class Fleet:
    """One live worker per session; `kill_one` kills a random one with -9 and starts its replacement at once."""

    def __init__(self, workers: Workers, url: str, sessions: list[str]) -> None:
        self.workers, self.url = workers, url
        self.procs = {s: workers.start(url, s, env=WORKER_ENV) for s in sessions}
        self.kills = 0

    def kill_one(self, rng: random.Random) -> None:
        session = rng.choice(sorted(self.procs))
        proc = self.procs[session]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        self.procs[session] = self.workers.start(self.url, session, env=WORKER_ENV)
        self.kills += 1

    def stop(self) -> list[int]:
        """SIGTERM every worker; their exit codes."""
        for proc in self.procs.values():
            proc.send_signal(signal.SIGTERM)
        return [proc.wait(timeout=60) for proc in self.procs.values()]


def produce(url: str, h: History, mine: list[str], logs: dict[str, Path], errors: list[BaseException]) -> None:
    """One producer thread: COMMANDS commands to each of its sessions, round robin, with a Client of its own."""
    try:
        with client_for(url, retry_for=30.0, no_worker_after=60.0) as client:
            handles = [client.session(s) for s in mine]
            for i in range(COMMANDS):
                for s in handles:
                    cid = f"{s.id}-{i}"
                    assert h.submit(s, exec_line(logs[s.id], cid), cid), f"{cid} not accepted"
    except BaseException as e:
        errors.append(e)


def answered(server: RedisServer, sessions: list[str]) -> int:
    """Result entries over all sessions (XLEN of each result stream, pipelined)."""
    pipe = server.client().pipeline(transaction=False)
    for s in sessions:
        pipe.xlen(protocol.keys(s).res)
    return sum(pipe.execute())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_load_with_random_worker_kills(everysec_server: RedisServer, workers: Workers, tmp_path: Path) -> None:
    began = time.monotonic()
    server, h = everysec_server, History()
    sessions = [f"load-{i:03d}" for i in range(SESSIONS)]
    logs = {s: tmp_path / "exec" / f"{s}.log" for s in sessions}
    logs[sessions[0]].parent.mkdir()
    fleet = Fleet(workers, server.url, sessions)
    errors: list[BaseException] = []
    per = SESSIONS // PRODUCERS
    threads = [
        threading.Thread(
            target=produce, args=(server.url, h, sessions[p * per : (p + 1) * per], logs, errors), name=f"producer-{p}"
        )
        for p in range(PRODUCERS)
    ]
    for t in threads:
        t.start()

    rng, total = random.Random(SEED), SESSIONS * COMMANDS
    wait_for(lambda: answered(server, sessions) >= total * 0.05, timeout=120)  # kill while commands flow
    while fleet.kills < KILLS and answered(server, sessions) < total * 0.9:
        time.sleep(rng.uniform(0.3, 1.5))
        fleet.kill_one(rng)
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors[:3]
    wait_for(lambda: answered(server, sessions) >= total, timeout=300)
    wall = time.monotonic() - began

    r = server.client()
    for s in sessions:
        h.read_results(r, s)
    executions = {s: read_executions(log) for s, log in logs.items()}
    orders = {s: stream_order(r, s) for s in sessions}
    report = analyse(h, executions, orders)
    print(
        f"\nload: accepted={report.accepted} results={report.results} duplicated={report.duplicated} "
        f"lost={report.lost} interrupted={report.interrupted} wall={wall:.1f}s "
        f"(workers killed: {fleet.kills}, seed {SEED}, statuses {dict(report.statuses)})"
    )
    check(h, executions, orders)  # raises, listing every violation
    assert report.accepted == total
    assert (report.lost, report.duplicated) == (0, 0)
    assert fleet.stop() == [0] * SESSIONS
