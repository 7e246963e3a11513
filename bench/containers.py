"""Containers side by side in one run (method and raw numbers printed; nothing asserted).

    python bench/containers.py [--image shellq-worker:latest] [--starts 10] [--runs 500] [--execs 50] [--json out.json]

  cold start   DockerBackend.start(S) + Session.run("true")  vs  a bare `docker run -d IMAGE sleep infinity`
               (SDK containers.run, detached) until it is running; each container removed after
  teardown     DockerBackend.stop(S) (SIGTERM, the worker exits, then the container is removed) of a session that
               ran `true`  vs  `docker rm -f` (SDK remove(force=True), the same API call) of a running
               `docker run -d` container; both until the container no longer exists
  per command  Session.run("true") to a worker in a container  vs  `docker exec C true` (CLI) and the docker SDK's
               exec_run(["true"]) into a running container
Redis: a private redis-server with AOF everysec on loopback, and a unix socket (for a backend that mounts it).

Two shellq versions side by side (what a change to the docker backend cost):

    python bench/containers.py --before e3bab75 [--after REF] [--base shellq-base:bookworm] [--starts 10]
                               [--runs 500] [--rounds 3] [--json out.json]

  before       REF: `git worktree add` into a temporary directory
  after        this checkout as it is when the bench starts (tracked and untracked files, edits included, copied
               into a temporary directory so that its image and its code stay the same through the run), or
               `--after REF`, checked out like `before`
Each side gets its own worker image, built from its tree (`python -m producer.cli image build --base BASE --tag
shellq-worker:bench-before|after`, left behind for the next run). Each round runs the sides one after the other
in a rotating order (no side always last), each in a fresh process whose imports come from that side's tree, with
its own redis-server: loopback port, AOF everysec, an aclfile and an admin password (the `default` user), and a
unix socket alone in a private directory (`--unixsocket DIR/sock/redis.sock --unixsocketperm 700`: what a backend
that mounts the socket into the container needs; one that does not ignores it). In that process:
  cold start   backend.start(S) + the first Session.run("true") result, `--starts` times, with one
               DockerBackend(url, image) made before the timing (each session then stopped: `teardown` is
               backend.stop(S), timed too)
  round trip   one session: 50 warm-up runs of Session.run("true"), then `--runs` timed runs, then stop
The producer uses the admin URL on loopback TCP on both sides. Per side and round, then pooled over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import docker

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from roundtrip import start_redis, summary, timed

if TYPE_CHECKING:  # imported where used: with --before, this process never imports a docker backend
    from containers.docker_backend import DockerBackend

ROOT = Path(__file__).resolve().parent.parent

BARE = "shellq.bench.bare"  # labels the bare `docker run -d` containers, so none is left behind
SESSION_LABEL = "shellq.session"  # containers.docker_backend.LABEL, on both sides
WARMUP = 50
METRICS = ("cold start", "teardown", "round trip")

SIDE = r"""
import json, secrets, shutil, socket, subprocess, sys, tempfile, time
from pathlib import Path
import redis
import containers.docker_backend, producer.client, worker.protocol
from containers.docker_backend import DockerBackend
from producer import Client

image, starts, runs, warmup, prefix = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
work = Path(tempfile.mkdtemp(prefix="shellq-bench-"))
(work / "sock").mkdir(mode=0o700)
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
password = secrets.token_hex(16)
(work / "users.acl").write_text(f"user default on >{password} ~* &* +@all\n")
args = [shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(work), "--save", "",
        "--appendonly", "yes", "--appendfsync", "everysec", "--aclfile", str(work / "users.acl"),
        "--unixsocket", str(work / "sock" / "redis.sock"), "--unixsocketperm", "700"]
url = f"redis://:{password}@127.0.0.1:{port}/0"
server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
ms = lambda t: (time.perf_counter() - t) * 1000
out = {"cold start": [], "teardown": [], "round trip": []}
try:
    admin = redis.Redis.from_url(url)
    for _ in range(500):
        try:
            version = admin.info("server")["redis_version"]; break
        except redis.ConnectionError:
            assert server.poll() is None, "redis-server exited"
            time.sleep(0.01)
    else:
        raise SystemExit("redis-server did not start")
    with DockerBackend(url, image=image) as backend:
        client = Client(url)
        for i in range(starts):
            name = f"{prefix}-{i}"
            t = time.perf_counter()
            backend.start(name)
            r = client.session(name).run("true")
            out["cold start"].append(ms(t))
            assert r.exit_code == 0, r
            t = time.perf_counter()
            backend.stop(name)
            out["teardown"].append(ms(t))
        name = f"{prefix}-rt"
        backend.start(name)
        s = client.session(name)
        for _ in range(warmup):
            assert s.run("true").exit_code == 0
        for _ in range(runs):
            t = time.perf_counter()
            r = s.run("true")
            out["round trip"].append(ms(t))
            assert r.exit_code == 0, r
        backend.stop(name, timeout=1)
    files = [containers.docker_backend.__file__, producer.client.__file__, worker.protocol.__file__]
    print(json.dumps({"raw": out, "redis": version, "files": files}))
finally:
    server.kill(); server.wait()
    shutil.rmtree(work, ignore_errors=True)
"""


def wait_gone(engine: docker.DockerClient, filters: dict[str, str]) -> None:
    while engine.containers.list(all=True, filters=filters, ignore_removed=True):
        time.sleep(0.005)


def lifecycles(
    engine: docker.DockerClient, backend: DockerBackend, url: str, image: str, starts: int
) -> dict[str, list[float]]:
    """Cold start and teardown, shellq's and a bare container's, `starts` times each."""
    from producer import Client

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
        wait_gone(engine, {"label": f"{SESSION_LABEL}={name}"})
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


def measure(args: argparse.Namespace) -> None:
    """One image, shellq against bare Docker (the mode without --before)."""
    from containers.docker_backend import DockerBackend
    from producer import Client

    engine = docker.from_env()
    tmp = Path(tempfile.mkdtemp(prefix="shellq-bench-"))
    server, url, version = start_redis(tmp, "everysec", unix_socket=True)
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
        for c in engine.containers.list(all=True, filters={"label": BARE}, ignore_removed=True):
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


# -- two versions side by side (--before) -----------------------------------------------------------------------


def git(*args: str) -> str:
    """git in this checkout; its output with the trailing newline cut (porcelain lines keep their leading blank)."""
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.rstrip()


def checkout(ref: str, dest: Path) -> str:
    """`git worktree add` REF at dest; returns the commit."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(dest), ref], check=True)
    return git("-C", str(dest), "rev-parse", "--short", "HEAD")


def snapshot(dest: Path) -> str:
    """Copy this checkout's tracked and untracked files (not the ignored ones) to dest; describes what was copied."""
    listed = git("ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    for rel in filter(None, listed):
        source = ROOT / rel
        if source.is_file():  # a tracked file deleted in the working tree is not copied
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / rel)
    changed = git("status", "--porcelain", "--untracked-files=all").splitlines()
    return f"working tree at {git('rev-parse', '--short', 'HEAD')}, changed: " + (
        ", ".join(line[3:] for line in changed) or "nothing"
    )


def side_env(tree: Path) -> dict[str, str]:
    """This environment with that tree's packages first on sys.path and no SHELLQ_ settings."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("SHELLQ_", "PYTHON"))}
    return keep | {"PYTHONPATH": str(tree)}


def build_image(engine: docker.DockerClient, tree: Path, base: str, tag: str) -> str:
    """That tree's `shellq image build`; returns the image id."""
    cmd = [sys.executable, "-m", "producer.cli", "image", "build", "--base", base, "--tag", tag]
    done = subprocess.run(cmd, cwd=tree, env=side_env(tree), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"image build in {tree} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return str(engine.images.get(tag).id)


def run_side(tree: Path, image: str, args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    """One side, one round, in a fresh process importing from `tree`."""
    cmd = [sys.executable, "-c", SIDE, image, str(args.starts), str(args.runs), str(WARMUP), prefix]
    done = subprocess.run(cmd, cwd=tree, env=side_env(tree), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"side {tree} failed:\n{done.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    stray = [f for f in out["files"] if not Path(f).resolve().is_relative_to(tree.resolve())]
    if stray:
        raise SystemExit(f"side {tree} imported shellq from elsewhere: {stray}")
    return out


def remove_leftovers(engine: docker.DockerClient, prefix: str) -> None:
    """Containers of this run's sessions that a failed side left behind (only those)."""
    for c in engine.containers.list(all=True, filters={"label": SESSION_LABEL}, ignore_removed=True):
        if c.labels.get(SESSION_LABEL, "").startswith(prefix):
            c.remove(force=True, v=True)  # and its anonymous volumes


def line(ms: list[float]) -> str:
    if not ms:
        return f"{0:>6}"
    r = summary(ms)
    return f"{r['n']:>6}{r['p50']:>10.2f}{r['p95']:>10.2f}{r['p99']:>10.2f}{r['mean']:>10.2f}{r['max']:>10.2f}"


def rounds(
    sides: dict[str, tuple[Path, str]], args: argparse.Namespace, prefix: str
) -> tuple[dict[str, dict[str, list[list[float]]]], str]:
    """Every round, each side once, in a rotating order; returns raw[side][metric] = one list per round."""
    raw: dict[str, dict[str, list[list[float]]]] = {name: {metric: [] for metric in METRICS} for name in sides}
    print(
        f"{'side':<8}{'round':>6} {'what':<12}{'n':>6}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'mean ms':>10}"
        f"{'max ms':>10}"
    )
    version = "?"
    for round_no in range(1, args.rounds + 1):
        order = list(sides.items())
        shift = (round_no - 1) % len(order)
        for name, (tree, image) in order[shift:] + order[:shift]:
            out = run_side(tree, image, args, f"{prefix}-{name[0]}{round_no}")
            version = out["redis"]
            for metric in METRICS:
                raw[name][metric].append(out["raw"][metric])
                print(f"{name:<8}{round_no:>6} {metric:<12}{line(out['raw'][metric])}", flush=True)
    return raw, version


def report(raw: dict[str, dict[str, list[list[float]]]], args: argparse.Namespace) -> None:
    print("\nraw (ms; round trips: the first 20 of each round, all of them in --json)")
    for name, metrics in raw.items():
        for metric, per_round in metrics.items():
            for round_no, ms in enumerate(per_round, 1):
                shown = ms if metric != "round trip" else ms[:20]
                more = " ..." if len(shown) < len(ms) else ""
                print(f"{name} round {round_no} {metric}: " + " ".join(f"{x:.2f}" for x in shown) + more)
    print(f"\npooled over {args.rounds} rounds")
    print(f"{'side':<8}{'what':<13}{'n':>6}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'mean ms':>10}{'max ms':>10}")
    pooled = {name: {m: [x for r in per_round for x in r] for m, per_round in ms.items()} for name, ms in raw.items()}
    for metric in METRICS:
        for name in pooled:
            print(f"{name:<8}{metric:<13}{line(pooled[name][metric])}")
    for metric in METRICS:
        before, after = pooled["before"][metric], pooled["after"][metric]
        if before and after:
            change = (statistics.median(after) / statistics.median(before) - 1) * 100
            print(f"p50 {metric}, after vs before: {change:+.1f}%")


def compare(args: argparse.Namespace) -> None:
    """Two shellq versions, each with its own image, in one run (--before)."""
    print(__doc__)
    engine = docker.from_env()
    prefix = f"bench-{uuid.uuid4().hex[:6]}"
    with tempfile.TemporaryDirectory(prefix="shellq-versions-") as tmp:
        trees = {"before": Path(tmp) / "before", "after": Path(tmp) / "after"}
        added = [trees["before"]]
        try:
            described = {"before": f"{args.before} = {checkout(args.before, trees['before'])}"}
            if args.after:
                added.append(trees["after"])
                described["after"] = f"{args.after} = {checkout(args.after, trees['after'])}"
            else:
                described["after"] = snapshot(trees["after"])
            sides: dict[str, tuple[Path, str]] = {}
            for name, tree in trees.items():
                tag = f"shellq-worker:bench-{name}"
                image_id = build_image(engine, tree, args.base, tag)
                print(f"# {name}: {described[name]}; image {tag} ({image_id[:19]}, FROM {args.base})", flush=True)
                sides[name] = (tree, tag)
            docker_version = engine.version().get("Version", "?")
            print(
                f"# {time.strftime('%Y-%m-%d %H:%M')} — {platform.node()}, {os.cpu_count()} cpus; Docker "
                f"{docker_version}; {args.starts} starts, {args.runs} runs (+{WARMUP} warm-up) per side and round\n"
            )
            raw, version = rounds(sides, args, prefix)
            print(f"# redis-server {version}, AOF everysec")
            report(raw, args)
            if args.json:
                meta: dict[str, object] = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.node()}
                meta |= {"redis": version, "docker": docker_version, "base": args.base, "warmup": WARMUP}
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps({"meta": meta, "sides": described, "raw_ms": raw}))
                print(f"raw numbers: {args.json}")
        finally:
            remove_leftovers(engine, prefix)
            for tree in added:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default="shellq-worker:latest", help="without --before: the worker image")
    ap.add_argument("--starts", type=int, default=10)
    ap.add_argument("--runs", type=int, default=500)
    ap.add_argument("--execs", type=int, default=50, help="without --before: docker exec runs")
    ap.add_argument("--before", help="git ref of the version to compare against (builds its own image)")
    ap.add_argument("--after", help="with --before: a git ref instead of this checkout")
    ap.add_argument("--base", default="shellq-base:bookworm", help="with --before: base of both images")
    ap.add_argument("--rounds", type=int, default=3, help="with --before")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.before:
        compare(args)
    elif args.after:
        ap.error("--after needs --before")
    else:
        measure(args)


if __name__ == "__main__":
    main()
