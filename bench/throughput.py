"""Aggregate throughput: commands/s with 1, 8, 32 and 128 concurrent sessions (method and raw numbers printed).

    python bench/throughput.py [--sessions 1 8 32 128] [--seconds 10] [--appendfsync everysec] [--json out.json]

Each session has its own local worker subprocess; producers are separate processes (4 at most, each driving its
share of the sessions with one thread per session, each thread running `true` back to back). Every worker answers
a first `true` before the producers start, and every session has had a result plus 1 s of load before the window
opens, so it holds steady state only (no worker boot, no producer start). Reported: commands completed per second
within the window, and the CPU time used by the whole machine (from /proc/stat) in the window per command, then the
same split by role, with each role's context switches per command: the producer processes, the workers (all their
threads), the shells (each worker's children: bash and its guard) and Redis; the JSON also has each session's
commands in the window.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from roundtrip import start_redis  # noqa: E402

from producer import Client, ClientSettings  # noqa: E402

BOOT_LIMIT = 300  # seconds all workers of a point may take to boot
WARMUP = 1.0  # seconds of load before the window opens
ROLES = ("producers", "workers", "shells", "redis")
"""Where the CPU per command went (/proc/PID/stat of each role's processes, in µs per command)."""


def cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine so far (user + nice + system + irq + softirq), /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """CPU seconds `pid` used so far, all its threads (utime + stime of /proc/PID/stat); 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_switches(pid: int) -> int:
    """Context switches of every thread of `pid` so far (voluntary + involuntary, /proc/PID/task/*/status)."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for line in (task / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    total += int(line.split()[1])
    except OSError:
        pass
    return total


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def roles_cpu(roles: dict[str, list[int]]) -> dict[str, tuple[float, int]]:
    """CPU seconds and context switches so far of each role's processes."""
    return {
        role: (sum(process_cpu(pid) for pid in pids), sum(process_switches(pid) for pid in pids))
        for role, pids in roles.items()
    }


def drive(url: str, sessions: list[tuple[int, str]], counts: Any, stop: Any) -> None:
    """One producer process: a thread per session running `true` back to back, adding up results in `counts`."""
    failed: list[Exception] = []

    def loop(i: int, name: str) -> None:
        s = Client(url).session(name)
        try:
            while not stop.is_set():
                s.run("true", timeout=30)
                counts[i] += 1
        except Exception as e:
            failed.append(e)
            raise

    threads = [threading.Thread(target=loop, args=(i, name)) for i, name in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sys.exit(1 if failed else 0)


def start_workers(url: str, tmp: Path, names: list[str]) -> list[subprocess.Popen[bytes]]:
    env = {**os.environ, "SHELLQ_REDIS_URL": url}
    return [
        subprocess.Popen(
            [sys.executable, "-m", "worker", "--log-level", "WARNING"],
            env={**env, "SHELLQ_SESSION": name, "SHELLQ_WORK_DIR": str(tmp / name)},
            cwd=ROOT,
        )
        for name in names
    ]


def wait_ready(url: str, names: list[str], workers: list[subprocess.Popen[bytes]]) -> None:
    """Until every worker has answered a `true`: 128 workers take a minute or more to boot on 2 cores."""
    client = Client(settings=ClientSettings(redis_url=url, no_worker_after=BOOT_LIMIT))
    deadline = time.monotonic() + BOOT_LIMIT
    for name, w in zip(names, workers, strict=True):
        s = client.session(name)
        while not s.worker_alive():
            if w.poll() is not None:
                raise RuntimeError(f"the worker of {name} exited with {w.returncode} before it served")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker of {name} did not start in {BOOT_LIMIT}s")
            time.sleep(0.1)
        s.run("true", timeout=60)


def measure(url: str, redis_pid: int, tmp: Path, n: int, seconds: float) -> dict[str, Any]:
    names = [f"tp{n}-{i}" for i in range(n)]
    workers = start_workers(url, tmp, names)
    counts = mp.Array("q", n, lock=False)  # results per session; each slot written by one thread only
    stop = mp.Event()
    groups = [[(i, names[i]) for i in range(k, n, 4)] for k in range(min(4, n))]
    procs = [mp.Process(target=drive, args=(url, g, counts, stop)) for g in groups]
    try:
        wait_ready(url, names, workers)
        for p in procs:
            p.start()
        deadline = time.monotonic() + 60
        while min(counts) == 0:  # every session's thread has had a result
            if any(p.exitcode is not None for p in procs) or time.monotonic() > deadline:
                raise RuntimeError("the producers did not get going")
            time.sleep(0.05)
        time.sleep(WARMUP)
        roles = {
            "producers": [p.pid for p in procs if p.pid is not None],
            "workers": [w.pid for w in workers],
            "shells": [c for w in workers for c in children(w.pid)],  # bash and its guard
            "redis": [redis_pid],
        }
        done0, cpu0, by0, t0 = list(counts), cpu_seconds(), roles_cpu(roles), time.monotonic()
        time.sleep(seconds)
        done1, cpu1, by1, t1 = list(counts), cpu_seconds(), roles_cpu(roles), time.monotonic()
    finally:
        stop.set()
        for p in procs:
            if p.pid is not None:
                p.join()
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait(timeout=60)
    if any(p.exitcode for p in procs):
        raise RuntimeError(f"a producer failed (exit codes {[p.exitcode for p in procs]})")
    per_session = [b - a for a, b in zip(done0, done1, strict=True)]
    total = sum(per_session)
    return {
        "sessions": n,
        "window_s": t1 - t0,
        "commands": total,
        "commands_per_s": total / (t1 - t0),
        "cpu_us_per_cmd": (cpu1 - cpu0) / max(total, 1) * 1e6,
        "cpu_us_per_cmd_by_role": {role: (by1[role][0] - by0[role][0]) / max(total, 1) * 1e6 for role in by0},
        "switches_per_cmd_by_role": {role: (by1[role][1] - by0[role][1]) / max(total, 1) for role in by0},
        "per_session": per_session,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--appendfsync", default="everysec", choices=["everysec", "always"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="shellq-tp-"))
    server, url, version = start_redis(tmp, args.appendfsync)
    print(
        f"# throughput — {time.strftime('%Y-%m-%d %H:%M')} — {os.cpu_count()} cpus; Redis {version}, "
        f"AOF {args.appendfsync}; {args.seconds:g} s per point"
    )
    print(f"{'':>32}{'CPU µs per command':^44}{'context switches per command':^36}")
    print(
        f"{'sessions':>8}{'commands/s':>12}{'cpu µs/cmd':>12}"
        + "".join(f"{r:>11}" for r in ROLES)
        + "".join(f"{r[:8]:>9}" for r in ROLES)
    )
    machine = f"{platform.node()} {platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}"
    meta: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine, "redis": version}
    meta |= {"aof": args.appendfsync, "seconds": args.seconds, "warmup_s": WARMUP}
    results: dict[str, dict[str, Any]] = {}
    try:
        for n in args.sessions:
            r = measure(url, server.pid, tmp, n, args.seconds)
            results[str(n)] = r
            by_role = "".join(f"{x:>11.0f}" for x in r["cpu_us_per_cmd_by_role"].values())
            switches = "".join(f"{x:>9.1f}" for x in r["switches_per_cmd_by_role"].values())
            print(f"{n:>8}{r['commands_per_s']:>12.0f}{r['cpu_us_per_cmd']:>12.0f}{by_role}{switches}", flush=True)
            if args.json:  # after every point, so the points measured survive a later one failing
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        if args.json:
            print(f"raw numbers: {args.json}")
    finally:
        server.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
