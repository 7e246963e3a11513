"""Aggregate throughput: commands/s with 1, 8, 32 and 128 concurrent sessions (method and raw numbers printed).

    python bench/throughput.py [--sessions 1 8 32 128] [--seconds 10] [--appendfsync everysec]

Each session has its own local worker subprocess; producers are separate processes (4 at most, each driving its
share of the sessions with one thread per session, each thread running `true` back to back). Reported: commands
completed per second over the window, and the CPU time used by the whole machine (from /proc/stat) per command.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from roundtrip import start_redis  # noqa: E402

from producer import Client, ClientSettings  # noqa: E402


def cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine so far (user + nice + system + irq + softirq), /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def drive(url: str, sessions: list[str], seconds: float, out: mp.Queue) -> None:  # type: ignore[type-arg]
    counts = [0] * len(sessions)
    deadline = time.monotonic() + seconds

    def loop(i: int, name: str) -> None:
        s = Client(url).session(name)
        while time.monotonic() < deadline:
            s.run("true", timeout=30)
            counts[i] += 1

    threads = [threading.Thread(target=loop, args=(i, n)) for i, n in enumerate(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put(sum(counts))


def measure(url: str, tmp: Path, n: int, seconds: float) -> tuple[float, float]:
    names = [f"tp{n}-{i}" for i in range(n)]
    env = {**os.environ, "SHELLQ_REDIS_URL": url}
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "worker", "--log-level", "WARNING"],
            env={**env, "SHELLQ_SESSION": name, "SHELLQ_WORK_DIR": str(tmp / name)},
            cwd=ROOT,
        )
        for name in names
    ]
    waiting = Client(settings=ClientSettings(redis_url=url, no_worker_after=300))  # 128 workers boot slowly on 2 cores
    for name in names:
        waiting.session(name).run("true", timeout=60)  # every worker is up
    groups = [names[i::4] for i in range(min(4, n))]
    out: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    cpu0, t0 = cpu_seconds(), time.monotonic()
    procs = [mp.Process(target=drive, args=(url, g, seconds, out)) for g in groups]
    for p in procs:
        p.start()
    total = sum(out.get() for _ in procs)
    for p in procs:
        p.join()
    wall, cpu = time.monotonic() - t0, cpu_seconds() - cpu0
    for w in workers:
        w.terminate()
    for w in workers:
        w.wait(timeout=30)
    return total / wall, cpu / max(total, 1) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--appendfsync", default="everysec", choices=["everysec", "always"])
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="shellq-tp-"))
    server, url, version = start_redis(tmp, args.appendfsync)
    print(
        f"# throughput — {time.strftime('%Y-%m-%d %H:%M')} — {os.cpu_count()} cpus; Redis {version}, "
        f"AOF {args.appendfsync}; {args.seconds:g} s per point"
    )
    print(f"{'sessions':>8}{'commands/s':>12}{'cpu µs/cmd':>12}")
    try:
        for n in args.sessions:
            rate, cpu = measure(url, tmp, n, args.seconds)
            print(f"{n:>8}{rate:>12.0f}{cpu:>12.0f}", flush=True)
    finally:
        server.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
