"""Files and stdin through a session: time, peak memory of every side, in one run (method and raw numbers printed;
nothing asserted).

    python bench/files.py [--mib 200] [--stdin-mib 50] [--json out.json]

Setup: a private redis-server (AOF everysec) and one `python -m worker` subprocess (local backend).
  upload       Session.upload of a local file of --mib MiB of random bytes (write_file in chunks)
  download     Session.download of it back (read_file in chunks); both compared by sha256
  stdin        Session.run("sha256sum", stdin=<--stdin-mib MiB>), checked against the local sha256
  base64 run   the way an adapter had to move the same stdin before: base64 through `run` in 600 KiB pieces
               appended to a file, then `sha256sum < file` (what the issue called ~75 round trips for 50 MiB)
For each: wall time, and the peak RSS of the producer (this process) and of the worker during it (VmHWM, reset
before each through /proc/PID/clear_refs), and Redis's peak used_memory above its level before (sampled every 10 ms).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from roundtrip import start_redis

from producer import Client, Session


def hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def reset_hwm(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


class RedisPeak:
    """Samples Redis's used_memory every 10 ms in a thread; `peak` is the most above the level at the start."""

    def __init__(self, url: str) -> None:
        self._r = redis.Redis.from_url(url)
        self._base = int(self._r.info("memory")["used_memory"])
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, int(self._r.info("memory")["used_memory"]) - self._base)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def measure(name: str, url: str, worker: int, fn: Callable[[], object]) -> dict[str, float]:
    for pid in (os.getpid(), worker):
        reset_hwm(pid)
    peak = RedisPeak(url)
    started = time.perf_counter()
    fn()
    wall = time.perf_counter() - started
    redis_peak = peak.stop()
    row = {
        "seconds": wall,
        "producer_peak_mib": hwm_kib(os.getpid()) / 1024,
        "worker_peak_mib": hwm_kib(worker) / 1024,
        "redis_peak_mib": redis_peak / 2**20,
    }
    print(
        f"{name:<12}{wall:>9.2f}{row['producer_peak_mib']:>14.1f}{row['worker_peak_mib']:>12.1f}{row['redis_peak_mib']:>12.1f}"
    )
    return row


def base64_run(s: Session, data: bytes, path: str) -> str:
    s.run(f": > {path}")
    piece = 600 << 10
    for i in range(0, len(data), piece):
        encoded = base64.b64encode(data[i : i + piece]).decode()
        r = s.run(f"echo {encoded} | base64 -d >> {path}")
        assert r.ok, r
    return s.run(f"sha256sum < {path}").stdout.split()[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=200)
    ap.add_argument("--stdin-mib", type=int, default=50)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="shellq-bench-files-"))
    server, url, server_version = start_redis(tmp, "everysec")
    env = {**os.environ, "SHELLQ_REDIS_URL": url, "SHELLQ_SESSION": "files", "SHELLQ_WORK_DIR": str(tmp / "w")}
    worker = subprocess.Popen([sys.executable, "-m", "worker", "--log-level", "WARNING"], env=env)
    rows: dict[str, dict[str, float]] = {}
    try:
        s = Client(url).session("files")
        s.run("true", timeout=60)
        local = tmp / "big.bin"
        with open(local, "wb") as f:
            for _ in range(args.mib):
                f.write(os.urandom(1 << 20))
        digest = hashlib.sha256(local.read_bytes()).hexdigest()
        remote = str(tmp / "remote.bin")
        machine = f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}"
        print(f"# files and stdin — {time.strftime('%Y-%m-%d %H:%M')} — {machine}")
        print(f"# Redis: {server_version}, AOF everysec; {args.mib} MiB file, {args.stdin_mib} MiB stdin")
        print(f"{'what':<12}{'seconds':>9}{'producer MiB':>14}{'worker MiB':>12}{'Redis MiB':>12}")
        rows["upload"] = measure("upload", url, worker.pid, lambda: s.upload(local, remote))
        back = tmp / "back.bin"
        rows["download"] = measure("download", url, worker.pid, lambda: s.download(remote, back))
        assert hashlib.sha256(back.read_bytes()).hexdigest() == digest, "the round trip changed the bytes"
        assert hashlib.sha256(Path(remote).read_bytes()).hexdigest() == digest
        back.unlink()
        Path(remote).unlink()
        data = os.urandom(args.stdin_mib << 20)
        want = hashlib.sha256(data).hexdigest()
        got: list[str] = []
        rows["stdin"] = measure(
            "stdin", url, worker.pid, lambda: got.append(s.run("sha256sum", stdin=data, timeout=600).stdout.split()[0])
        )
        rows["base64 run"] = measure(
            "base64 run", url, worker.pid, lambda: got.append(base64_run(s, data, str(tmp / "b64.bin")))
        )
        assert got == [want, want], (got, want)
        print(f"producer RSS before the stdin rows includes the {args.stdin_mib} MiB it sends (held by the caller)")
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        server.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "mib": args.mib, "stdin_mib": args.stdin_mib}, indent=1))


if __name__ == "__main__":
    main()
