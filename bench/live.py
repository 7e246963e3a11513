"""Live output: how late a chunk reaches a reader, and what publishing costs a command that prints a lot, in one run
(method and raw numbers printed; nothing asserted).

    python bench/live.py [--lines 500] [--big-runs 5] [--json out.json]

Setup: a private redis-server (AOF everysec) and two `python -m worker` subprocesses (local backend), one that
publishes live output (the default) and one with SHELLQ_LIVE_OUTPUT=false.
  delay        a command prints `--lines` lines, one every 10 ms, each holding time.time_ns() at its write; a reader
               (Session.stream, then AsyncSession.stream) notes time.time_ns() as each chunk arrives: the delay of
               every line, from the command's write to the reader (same machine, same clock). Lines the live stream
               did not carry (the command's last moments) come with the result; they are counted too.
  100 MiB      `head -c 104857600 /dev/zero` run with live output on (with and without a reader following it) and
               off, in turns: the command's duration in the shell (duration_ms) and the wall time of run(); then
               the live stream's length and MEMORY USAGE, and the bytes that reached the reader.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from roundtrip import start_redis, summary

from producer import AsyncClient, Chunk, Client, Session
from worker import protocol

TICKER = "python3 -c 'import time\nfor i in range({n}):\n print(time.time_ns(), flush=True); time.sleep(0.01)'"
BIG = "head -c 104857600 /dev/zero"


def start_worker(tmp: Path, url: str, name: str, live: bool) -> subprocess.Popen[bytes]:
    env = {**os.environ, "SHELLQ_REDIS_URL": url, "SHELLQ_SESSION": name, "SHELLQ_WORK_DIR": str(tmp / name)}
    env["SHELLQ_LIVE_OUTPUT"] = "true" if live else "false"
    return subprocess.Popen([sys.executable, "-m", "worker", "--log-level", "WARNING"], env=env)


def delays(chunks: list[tuple[int, Chunk]]) -> list[float]:
    """Per line: arrival minus the time written in it (ms)."""
    out, partial = [], b""
    for arrived, chunk in chunks:
        if chunk.stream != "stdout":
            continue
        lines = (partial + chunk.data).split(b"\n")
        partial = lines.pop()
        out += [(arrived - int(line)) / 1e6 for line in lines if line]
    return out


def sync_delays(s: Session, lines: int) -> list[float]:
    cid = s.submit(TICKER.format(n=lines))
    return delays([(time.time_ns(), c) for c in s.stream(cid, timeout=120)])


def async_delays(url: str, session: str, lines: int) -> list[float]:
    async def go() -> list[tuple[int, Chunk]]:
        async with AsyncClient(url) as client:
            s = client.session(session)
            cid = await s.submit(TICKER.format(n=lines))
            return [(time.time_ns(), c) async for c in s.stream(cid, timeout=120)]

    return delays(asyncio.run(go()))


def big(s: Session, follow: bool) -> tuple[float, float, int]:
    """(duration_ms in the shell, wall ms of the run, bytes a follower received)."""
    got = [0]

    def reader(cid: str) -> None:
        for c in s.stream(cid, timeout=300):
            got[0] += len(c.data)

    started = time.perf_counter()
    cid = s.submit(BIG, timeout=300)
    thread = threading.Thread(target=reader, args=(cid,)) if follow else None
    if thread:
        thread.start()
    r = s.result(cid, timeout=300)
    wall = (time.perf_counter() - started) * 1000
    if thread:
        thread.join()
    assert r.stdout_size == 100 * 2**20, r
    return r.duration_ms, wall, got[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=500)
    ap.add_argument("--big-runs", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="shellq-bench-live-"))
    server, url, server_version = start_redis(tmp, "everysec")
    workers = [start_worker(tmp, url, "on", True), start_worker(tmp, url, "off", False)]
    raw: dict[str, list[float]] = {}
    try:
        client = Client(url)
        on, off = client.session("on"), client.session("off")
        on.run("true", timeout=60)
        off.run("true", timeout=60)
        raw["delay sync"] = sync_delays(on, args.lines)
        raw["delay async"] = async_delays(url, "on", args.lines)
        sides = {"on": (on, False), "on+reader": (on, True), "off": (off, False)}
        received: dict[str, list[int]] = {name: [] for name in sides}
        for i in range(args.big_runs):
            names = list(sides)
            for name in names[i % 3 :] + names[: i % 3]:
                duration, wall, got = big(*sides[name])
                raw.setdefault(f"100MiB {name} shell", []).append(duration)
                raw.setdefault(f"100MiB {name} wall", []).append(wall)
                received[name].append(got)
        live = protocol.keys("on").live
        live_len, live_bytes = client.redis.xlen(live), client.redis.memory_usage(live)
    finally:
        for w in workers:
            w.terminate()
            w.wait(timeout=30)
        server.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    machine = f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}"
    print(f"# live output — {time.strftime('%Y-%m-%d %H:%M')} — {machine}")
    print(f"# Redis: {server_version}, AOF everysec; {args.lines} lines 10 ms apart; {args.big_runs} runs of {BIG!r}")
    print(f"{'what':<26}{'n':>6}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'mean ms':>10}{'max ms':>10}")
    results = {name: summary(ms) for name, ms in raw.items()}
    for name, r in results.items():
        print(
            f"{name:<26}{r['n']:>6}{r['p50']:>10.3f}{r['p95']:>10.3f}{r['p99']:>10.3f}{r['mean']:>10.3f}{r['max']:>10.3f}"
        )
    shell_on = statistics.median(raw["100MiB on shell"])
    shell_off = statistics.median(raw["100MiB off shell"])
    print(f"100 MiB in the shell, live on vs off (medians): {shell_on:.1f} vs {shell_off:.1f} ms")
    print(f"bytes a follower received of 100 MiB, per run: {received['on+reader']}")
    print(f"live stream after: {live_len} entries, {live_bytes} bytes (MEMORY USAGE)")
    if args.json:
        out = {"summary": results, "raw_ms": raw, "received": received, "live_len": live_len, "live_bytes": live_bytes}
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
