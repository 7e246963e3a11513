"""One command on each of many sessions: Client.run_many vs sequential runs vs a thread per session, in one run
(method and raw numbers printed; nothing asserted).

    python bench/run_many.py [--sessions 100] [--rounds 7] [--json out.json]

Setup: a private redis-server (AOF everysec) and one `python -m worker` subprocess per session (local backend: a
worker and its bash each). Each round times, in a rotating order (no side always first), `true` on every session:
  run_many     client.run_many([(s, "true") for s in sessions]): one pipelined submit, blocking reads over all
               result streams
  sequential   for s in sessions: s.run("true")
  threads      a ThreadPoolExecutor with one thread per session, each s.run("true") (one shared Client)
  async        one event loop: asyncio.gather of AsyncSession.run("true") on every session (one AsyncClient)
  async_many   AsyncClient.run_many of the same items
Reported: wall time of the whole batch per round (ms), the median over rounds, and commands per second.
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
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from roundtrip import start_redis

from producer import AsyncClient, Client, Result


def start_worker(work: Path, name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(work / f"{name}.log", "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "worker", "--session", name], env=env, stdout=log, stderr=log)


def measure(client: Client, names: list[str], rounds: int) -> dict[str, list[float]]:
    """Wall time (ms) of `true` on every session, per side and round, sides rotating."""
    sessions = [client.session(n) for n in names]
    deadline = time.monotonic() + 120
    while not all(s.worker_alive() for s in sessions):
        if time.monotonic() > deadline:
            raise SystemExit("the workers did not come up in 120 s")
        time.sleep(0.2)
    times: dict[str, list[float]] = {"run_many": [], "sequential": [], "threads": [], "async": [], "async_many": []}
    loop = asyncio.new_event_loop()
    aclient = AsyncClient(client.settings.redis_url)
    asessions = [aclient.session(n) for n in names]

    async def gather() -> list[Result]:
        return list(await asyncio.gather(*(s.run("true") for s in asessions)))

    with ThreadPoolExecutor(max_workers=len(sessions)) as pool:
        sides = {
            "run_many": lambda: client.run_many([(n, "true") for n in names]),
            "sequential": lambda: [s.run("true") for s in sessions],
            "threads": lambda: list(pool.map(lambda s: s.run("true"), sessions)),
            "async": lambda: loop.run_until_complete(gather()),
            "async_many": lambda: loop.run_until_complete(aclient.run_many([(n, "true") for n in names])),
        }
        for warm in sides.values():  # connections, threads, the functions library
            warm()
        order = list(sides)
        for r in range(rounds):
            for name in order[r % len(order) :] + order[: r % len(order)]:
                started = time.perf_counter()
                results = sides[name]()
                times[name].append((time.perf_counter() - started) * 1000)
                bad = [x for x in results if not (isinstance(x, Result) and x.ok)]
                assert not bad, bad[:3]
    loop.run_until_complete(aclient.aclose())
    loop.close()
    return times


def report(times: dict[str, list[float]], n: int, version: str) -> None:
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} — {platform.node()}, {os.cpu_count()} cpus")
    print(f"# {n} sessions x `true`; {version}, AOF everysec")
    print(f"{'side':<12}{'rounds':>7}{'median ms':>12}{'min ms':>10}{'max ms':>10}{'commands/s':>12}")
    for side, values in times.items():
        median = statistics.median(values)
        line = f"{side:<12}{len(values):>7}{median:>12.1f}{min(values):>10.1f}{max(values):>10.1f}"
        print(line + f"{n / median * 1000:>12.0f}")
    for side, values in times.items():
        print(f"{side} raw ms: " + " ".join(f"{v:.1f}" for v in values))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    print(__doc__)
    work = Path(tempfile.mkdtemp(prefix="shellq-bench-many-"))
    server, url, version = start_redis(work, "everysec")
    names = [f"many-{i}" for i in range(args.sessions)]
    env = {**os.environ, "SHELLQ_REDIS_URL": url, "SHELLQ_HOME": str(work / "home")}
    workers = [start_worker(work, name, env) for name in names]
    try:
        times = measure(Client(url), names, args.rounds)
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait(timeout=30)
        server.kill()
        shutil.rmtree(work, ignore_errors=True)
    report(times, len(names), version)
    if args.json:
        args.json.write_text(json.dumps({"sessions": len(names), "ms": times}, indent=1))


if __name__ == "__main__":
    main()
