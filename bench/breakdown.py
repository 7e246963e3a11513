"""Where the time of one `true` round trip goes: CPU and wake-ups per command in each process (method and raw
numbers printed; nothing asserted).

    python bench/breakdown.py [--runs 5000] [--json out.json]

A private redis-server (AOF everysec), a local worker subprocess and a producer (this process) run `true` back to
back. Around the timed runs it reads, for the producer, Redis, the worker (all threads) and the worker's bash:
on-CPU time (/proc/PID/task/*/schedstat, in ns) and context switches (voluntary + involuntary,
/proc/PID/task/*/status), each divided by the number of commands; and Redis's own time per command it ran (INFO
commandstats). It does this twice: with the processes free to use every CPU, and with all of them pinned to one
CPU (sched_setaffinity before they start). The round trip is a chain: producer -> Redis -> worker -> bash -> worker
-> Redis -> producer; when the processes sit on different CPUs, each hand-over wakes another CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from roundtrip import start_redis  # noqa: E402

from producer import Client  # noqa: E402


def usage(pid: int) -> tuple[int, int]:
    """(on-CPU ns, context switches) of every thread of `pid` so far."""
    cpu = switches = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        cpu += int((task / "schedstat").read_text().split()[0])
        for line in (task / "status").read_text().splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                switches += int(line.split()[1])
    return cpu, switches


def phase(runs: int, cpus: set[int] | None) -> dict[str, Any]:
    """One measurement with fresh processes; `cpus` pins them all (set before they start, so children inherit)."""
    everything = os.sched_getaffinity(0)
    if cpus:
        os.sched_setaffinity(0, cpus)
    tmp = Path(tempfile.mkdtemp(prefix="shellq-breakdown-"))
    server, url, _ = start_redis(tmp, "everysec")
    env = {**os.environ, "SHELLQ_REDIS_URL": url, "SHELLQ_SESSION": "bd", "SHELLQ_WORK_DIR": str(tmp / "w")}
    worker = subprocess.Popen([sys.executable, "-m", "worker", "--log-level", "WARNING"], env=env, cwd=ROOT)
    try:
        client = Client(url)
        s = client.session("bd")
        s.run("true", timeout=60)
        for _ in range(300):
            s.run("true")
        admin = redis.Redis.from_url(url)
        bash = int(admin.hget(s.keys.meta, "shell_pid") or 0)  # type: ignore[arg-type]
        pids = {"producer": os.getpid(), "redis": server.pid, "worker": worker.pid, "bash": bash}
        admin.config_resetstat()
        before = {name: usage(pid) for name, pid in pids.items()}
        ms = []
        for _ in range(runs):
            t = time.perf_counter()
            s.run("true")
            ms.append((time.perf_counter() - t) * 1000)
        after = {name: usage(pid) for name, pid in pids.items()}
        stats: Any = admin.info("commandstats")
        client.close()
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        server.kill()
        server.wait()
        os.sched_setaffinity(0, everything)
    per = {
        name: {
            "cpu_us": (after[name][0] - before[name][0]) / runs / 1000,
            "switches": (after[name][1] - before[name][1]) / runs,
        }
        for name in pids
    }
    redis_cmds = {
        name.removeprefix("cmdstat_"): {"calls": v["calls"] / runs, "us_per_call": v["usec_per_call"]}
        for name, v in sorted(stats.items(), key=lambda kv: -kv[1]["usec"])
        if v["calls"] >= runs / 2 and "config" not in name
    }
    return {"p50_ms": statistics.median(ms), "mean_ms": statistics.fmean(ms), "processes": per, "redis": redis_cmds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    one = {min(os.sched_getaffinity(0))}
    phases = {"free": phase(args.runs, None), f"pinned to cpu {min(one)}": phase(args.runs, one)}
    print(f"# where a round trip goes — {time.strftime('%Y-%m-%d %H:%M')} — {os.cpu_count()} cpus, {args.runs} runs")
    for label, p in phases.items():
        total = sum(x["cpu_us"] for x in p["processes"].values())
        print(f"\n{label}: round trip p50 {p['p50_ms']:.3f} ms, mean {p['mean_ms']:.3f} ms")
        print(f"{'process':<10}{'cpu µs/cmd':>12}{'switches/cmd':>14}")
        for name, x in p["processes"].items():
            print(f"{name:<10}{x['cpu_us']:>12.0f}{x['switches']:>14.2f}")
        print(f"{'all':<10}{total:>12.0f}")
        print(
            "Redis, per command (inside FCALL too): "
            + ", ".join(f"{n} {c['calls']:.0f}x {c['us_per_call']:.1f} µs" for n, c in p["redis"].items())
        )
    if args.json:
        args.json.write_text(json.dumps(phases, indent=1))


if __name__ == "__main__":
    main()
