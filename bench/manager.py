"""A session's start to its first result, through a `shellq manager` vs the docker backend called directly, in one
run (method and raw numbers printed; nothing asserted).

    python bench/manager.py [--image shellq-worker:latest] [--starts 10] [--json out.json]

  direct    DockerBackend(url, image).start(S) in this process, then Session.run("true")
  manager   Client.create_session(S, image=...) (an RQ job on the queue of a `shellq manager` subprocess, which
            starts the container and answers once the worker's heartbeat is seen), then Session.run("true")
Each start is timed from the call to the first result; each session is stopped (untimed) before the next. The two
sides alternate, start by start. Redis: a private redis-server (AOF everysec, an aclfile and admin password, a unix
socket alone in a private directory).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from containers import jobs
from containers.docker_backend import DockerBackend
from producer import Client


def start_server(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    password, sock = secrets.token_hex(16), work / "sock" / "redis.sock"
    sock.parent.mkdir(mode=0o700)
    (work / "users.acl").write_text(f"user default on >{password} ~* &* +@all\n")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    binary = shutil.which("redis-server") or "redis-server"
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(work), "--save", ""]
    args += ["--appendonly", "yes", "--appendfsync", "everysec", "--aclfile", str(work / "users.acl")]
    args += ["--unixsocket", str(sock), "--unixsocketperm", "700"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    for _ in range(500):
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            time.sleep(0.02)
    return proc, url


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default="shellq-worker:latest")
    ap.add_argument("--starts", type=int, default=10)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    print(__doc__)
    work = Path(tempfile.mkdtemp(prefix="shellq-bench-manager-"))
    server, url = start_server(work)
    host = f"bench-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "SHELLQ_REDIS_URL": url}
    shellq = Path(sys.executable).parent / "shellq"
    log = open(work / "manager.log", "wb")  # noqa: SIM115 (the manager's lifetime)
    manager = subprocess.Popen([str(shellq), "manager", "--queue", host], env=env, stdout=log, stderr=log)
    client = Client(url)
    times: dict[str, list[float]] = {"direct": [], "manager": []}
    try:
        while host not in jobs.managers(client.redis):
            time.sleep(0.05)
        backend = DockerBackend(url, image=args.image)
        for i in range(args.starts):
            for side in ("direct", "manager") if i % 2 == 0 else ("manager", "direct"):
                name = f"bench-{side}-{i}-{uuid.uuid4().hex[:4]}"
                started = time.perf_counter()
                if side == "direct":
                    backend.start(name)
                    client.session(name).run("true")
                else:
                    client.create_session(name, image=args.image).run("true")
                times[side].append((time.perf_counter() - started) * 1000)
                if side == "direct":
                    backend.stop(name, timeout=2)
                else:
                    jobs.stop_via_manager(client.redis, name, host)
        backend.close()
    finally:
        manager.terminate()
        manager.wait(timeout=30)
        server.kill()
        shutil.rmtree(work, ignore_errors=True)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} — {platform.node()}, {os.cpu_count()} cpus; image {args.image}")
    print(f"{'side':<10}{'n':>4}{'median ms':>12}{'min ms':>10}{'max ms':>10}")
    for side, values in times.items():
        print(f"{side:<10}{len(values):>4}{statistics.median(values):>12.1f}{min(values):>10.1f}{max(values):>10.1f}")
    for side, values in times.items():
        print(f"{side} raw ms: " + " ".join(f"{v:.1f}" for v in values))
    if args.json:
        args.json.write_text(json.dumps(times, indent=1))


if __name__ == "__main__":
    main()
