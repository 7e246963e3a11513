"""What a session costs (method and raw numbers printed; nothing asserted).

  python bench/costs.py [--commands 10000] [--json out.json]

worker RSS     VmRSS of a local worker idle, and after --commands `true` commands (its peak VmHWM too)
Redis memory   INFO used_memory per idle session (20 sessions started and served once), and per 1,000 results
100 MB stdout  `head -c 100000000 /dev/zero`: time to the result, bytes kept, the worker's peak RSS
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import redis  # noqa: E402
from roundtrip import start_redis  # noqa: E402

from producer import Client  # noqa: E402


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def start_worker(url: str, session: str, tmp: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "SHELLQ_REDIS_URL": url, "SHELLQ_SESSION": session, "SHELLQ_WORK_DIR": str(tmp / session)}
    proc = subprocess.Popen([sys.executable, "-m", "worker", "--log-level", "WARNING"], env=env, cwd=HERE.parent)
    Client(url).session(session).run("true", timeout=60)
    return proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commands", type=int, default=10_000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="shellq-costs-"))
    server, url, version = start_redis(tmp, "everysec")
    r = redis.Redis.from_url(url)
    workers: list[subprocess.Popen[bytes]] = []
    try:
        print(f"# costs — {time.strftime('%Y-%m-%d %H:%M')} — Redis {version}, AOF everysec")
        w = start_worker(url, "cost", tmp)
        workers.append(w)
        time.sleep(2)
        idle = status_kb(w.pid, "VmRSS")
        s = Client(url).session("cost")
        for _ in range(args.commands):
            s.run("true")
        rss = {"idle_kb": idle, "commands": args.commands}
        rss |= {"after_commands_kb": status_kb(w.pid, "VmRSS"), "peak_after_commands_kb": status_kb(w.pid, "VmHWM")}
        print(
            f"worker RSS idle: {idle / 1024:.1f} MiB; after {args.commands} commands: "
            f"{rss['after_commands_kb'] / 1024:.1f} MiB (peak {rss['peak_after_commands_kb'] / 1024:.1f} MiB)"
        )

        before = int(r.info("memory")["used_memory"])
        for i in range(20):
            workers.append(start_worker(url, f"idle-{i}", tmp))
        per_session = (int(r.info("memory")["used_memory"]) - before) / 20
        before = int(r.info("memory")["used_memory"])
        for _ in range(1000):
            s.run("true")
        per_1k = int(r.info("memory")["used_memory"]) - before
        redis_memory = {"idle_sessions": 20, "per_idle_session_bytes": per_session, "per_1k_results_bytes": per_1k}
        print(
            f"Redis used_memory per idle session: {per_session / 1024:.1f} KiB; per 1,000 `true` results "
            f"(with their commands and journal entries): {per_1k / 1024:.1f} KiB"
        )

        base_hwm = status_kb(w.pid, "VmHWM")
        t = time.perf_counter()
        big = s.run("head -c 100000000 /dev/zero", timeout=300)
        took = time.perf_counter() - t
        peak = status_kb(w.pid, "VmHWM")
        print(
            f"100 MB stdout: {took * 1000:.0f} ms to the result; kept {len(big.stdout_bytes)} of {big.stdout_size} "
            f"bytes (truncated={big.truncated}, spooled to {big.spool_path}); worker peak RSS "
            f"{peak / 1024:.1f} MiB (before: {base_hwm / 1024:.1f} MiB, idle {idle / 1024:.1f})"
        )
        stdout = {"ms": took * 1000, "kept_bytes": len(big.stdout_bytes), "stdout_size": big.stdout_size}
        stdout |= {"truncated": big.truncated, "peak_rss_kb": peak, "peak_rss_before_kb": base_hwm, "idle_rss_kb": idle}
    finally:
        for proc in workers:
            proc.terminate()
        for proc in workers:
            proc.wait(timeout=30)
        server.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        machine = f"{platform.node()} {platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}"
        meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine, "redis": version, "aof": "everysec"}
        results = {"worker_rss": rss, "redis_memory": redis_memory, "stdout_100mb": stdout}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        print(f"raw numbers: {args.json}")


if __name__ == "__main__":
    main()
