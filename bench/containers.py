"""Containers side by side in one run (method and raw numbers printed; nothing asserted).

    python bench/containers.py [--image shellq-worker:latest] [--starts 10] [--runs 500] [--execs 50] [--json out.json]

  cold start   DockerBackend.start(S) + Session.run("true")  vs  a bare `docker run -d IMAGE sleep infinity`
               (SDK containers.run, detached) until it is running; each container removed after
  teardown     DockerBackend.stop(S) (SIGTERM, the worker exits, then the container is removed) of a session that
               ran `true`  vs  `docker rm -f` (SDK remove(force=True), the same API call) of a running
               `docker run -d` container; both until the container no longer exists
  per command  Session.run("true") to a worker in a container  vs  `docker exec C true` (CLI) and the docker SDK's
               exec_run(["true"]) into a running container
Redis: a private redis-server with AOF everysec on loopback (containers use the host network).
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
import uuid
from pathlib import Path

import docker

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from roundtrip import start_redis, summary, timed

from containers.docker_backend import LABEL, DockerBackend
from producer import Client

BARE = "shellq.bench.bare"  # labels the bare `docker run -d` containers, so none is left behind


def wait_gone(engine: docker.DockerClient, filters: dict[str, str]) -> None:
    while engine.containers.list(all=True, filters=filters):
        time.sleep(0.005)


def lifecycles(
    engine: docker.DockerClient, backend: DockerBackend, url: str, image: str, starts: int
) -> dict[str, list[float]]:
    """Cold start and teardown, shellq's and a bare container's, `starts` times each."""
    names = ["cold start shellq", "cold start docker run -d", "teardown shellq", "teardown docker rm -f"]
    raw: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(starts):
        name = f"b-{uuid.uuid4().hex[:8]}"
        t = time.perf_counter()
        backend.start(name)
        Client(url).session(name).run("true")
        raw["cold start shellq"].append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        backend.stop(name)
        wait_gone(engine, {"label": f"{LABEL}={name}"})
        raw["teardown shellq"].append((time.perf_counter() - t) * 1000)
    for _ in range(starts):
        t = time.perf_counter()
        c = engine.containers.run(image, ["infinity"], entrypoint="sleep", detach=True, labels=[BARE])
        while c.status != "running":
            c.reload()
        raw["cold start docker run -d"].append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        c.remove(force=True)
        wait_gone(engine, {"id": c.id})
        raw["teardown docker rm -f"].append((time.perf_counter() - t) * 1000)
    return raw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default="shellq-worker:latest")
    ap.add_argument("--starts", type=int, default=10)
    ap.add_argument("--runs", type=int, default=500)
    ap.add_argument("--execs", type=int, default=50)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    engine = docker.from_env()
    tmp = Path(tempfile.mkdtemp(prefix="shellq-bench-"))
    server, url, version = start_redis(tmp, "everysec")
    try:
        with DockerBackend(url, image=args.image) as backend:
            raw = lifecycles(engine, backend, url, args.image, args.starts)
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
        for c in engine.containers.list(all=True, filters={"label": BARE}):
            c.remove(force=True)
        server.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    docker_version = engine.version().get("Version", "?")
    print(f"# containers — {time.strftime('%Y-%m-%d %H:%M')} — {platform.node()}, {os.cpu_count()} cpus")
    print(f"# Docker {docker_version}; Redis {version}, AOF everysec; image {args.image}")
    print(f"{'what':<28}{'n':>5}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    results = {what: {**summary(ms), "raw_ms": ms} for what, ms in raw.items()}
    for what, r in results.items():
        print(f"{what:<28}{r['n']:>5}{r['p50']:>10.2f}{r['p95']:>10.2f}{r['p99']:>10.2f}{r['max']:>10.2f}")
    for what, ms in raw.items():
        print(f"raw {what}: " + " ".join(f"{x:.2f}" for x in ms[:20]) + (" ..." if len(ms) > 20 else ""))
    if args.json:
        machine = f"{platform.node()} {platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}"
        meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine, "redis": version, "aof": "everysec"}
        meta |= {"docker": docker_version, "image": args.image}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        print(f"raw numbers: {args.json}")


if __name__ == "__main__":
    main()
