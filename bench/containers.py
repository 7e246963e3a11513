"""Containers side by side in one run (method and raw numbers printed; nothing asserted).

    python bench/containers.py [--image shellq-worker:latest] [--starts 10] [--runs 500] [--execs 50]

  cold start   DockerBackend.start(S) + Session.run("true")  vs  a bare `docker run -d IMAGE sleep infinity`
               (SDK containers.run, detached) until it is running; each container removed after
  per command  Session.run("true") to a worker in a container  vs  `docker exec C true` (CLI) and the docker SDK's
               exec_run(["true"]) into a running container
Redis: a private redis-server with AOF everysec on loopback (containers use the host network).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import docker

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from roundtrip import start_redis, summary, timed

from containers.docker_backend import DockerBackend
from producer import Client


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default="shellq-worker:latest")
    ap.add_argument("--starts", type=int, default=10)
    ap.add_argument("--runs", type=int, default=500)
    ap.add_argument("--execs", type=int, default=50)
    args = ap.parse_args()
    engine = docker.from_env()
    tmp = Path(tempfile.mkdtemp(prefix="shellq-bench-"))
    server, url, version = start_redis(tmp, "everysec")
    raw: dict[str, list[float]] = {"cold start shellq": [], "cold start docker run -d": []}
    try:
        with DockerBackend(url, image=args.image) as backend:
            for _ in range(args.starts):
                name = f"b-{uuid.uuid4().hex[:8]}"
                t = time.perf_counter()
                backend.start(name)
                Client(url).session(name).run("true")
                raw["cold start shellq"].append((time.perf_counter() - t) * 1000)
                backend.stop(name, timeout=1)
            for _ in range(args.starts):
                t = time.perf_counter()
                c = engine.containers.run(args.image, ["infinity"], entrypoint="sleep", detach=True)
                while c.status != "running":
                    c.reload()
                raw["cold start docker run -d"].append((time.perf_counter() - t) * 1000)
                c.remove(force=True)

            name = f"b-{uuid.uuid4().hex[:8]}"
            cid = backend.start(name)
            s = Client(url).session(name)
            raw["shellq run (container)"] = timed(lambda: s.run("true"), args.runs)
            container = engine.containers.get(cid)
            raw["docker exec (CLI)"] = timed(
                lambda: subprocess.run(["docker", "exec", cid, "true"], check=True), args.execs, warmup=3
            )
            raw["docker SDK exec_run"] = timed(lambda: container.exec_run(["true"]), args.execs, warmup=3)
            backend.stop(name, timeout=1)
    finally:
        server.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    docker_version = engine.version().get("Version", "?")
    print(f"# containers — {time.strftime('%Y-%m-%d %H:%M')} — {platform.node()}, {os.cpu_count()} cpus")
    print(f"# Docker {docker_version}; Redis {version}, AOF everysec; image {args.image}")
    print(f"{'what':<28}{'n':>5}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for what, ms in raw.items():
        r = summary(ms)
        print(f"{what:<28}{r['n']:>5}{r['p50']:>10.2f}{r['p95']:>10.2f}{r['p99']:>10.2f}{r['max']:>10.2f}")
    for what, ms in raw.items():
        print(f"raw {what}: " + " ".join(f"{x:.2f}" for x in ms[:20]) + (" ..." if len(ms) > 20 else ""))


if __name__ == "__main__":
    main()
