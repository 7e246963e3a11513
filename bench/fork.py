"""Fork vs replay: a new session with another one's files and shell state, made by `fork` or by running that
session's commands again in a fresh one (method and raw numbers printed; nothing asserted).

    python bench/fork.py [--image shellq-worker:latest] [--rounds 3] [--files 200] [--json out.json]

Setup: a private redis-server (AOF everysec, a unix socket alone in a private directory, which the containers
mount), one DockerBackend(url, image). The source session S runs 50 commands: `cd` and `export`s, a function, and
40 commands that each write 5 files of 1 MiB from /dev/urandom (`--files` in all: 200 MiB) under ~/tree. Then, per
round, in turns (which one goes first rotates):
  fork     containers.fork.fork(S, F) (S's shell state read by one command, `docker commit` of S's container, paused
           meanwhile, F started from that image, the state restored in F) until F answers `true`
  replay   DockerBackend.start(R) of a fresh session, then S's 50 commands run one by one in R (read from S's
           command stream `shellq:{S}:cmd`, field `cmd`, as sent), until R answers `true`
  Session.replay   the same with the library's replay (producer/history.py: S's history read back, each request
           submitted again under a derived id and waited for), `until` S's 50th command (the forks' own come after)
  commit   `docker commit` of S's container alone (pause=True): how long S's commands wait during a fork
Each new session is stopped after its round (`stop` removes F's snapshot image); every one answers the same check
(file count and bytes under ~/tree, cwd, the variables, the function) as S. Reported: wall ms of each, the
snapshot image's own layer (its size minus the worker image's) and total size, and `source shell`: the time
S's 50 commands took in its shell (the sum of their duration_ms), what a replay cannot go below.
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
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from roundtrip import free_port

from containers.docker_backend import DockerBackend
from containers.fork import fork
from producer import Client, Result, Session
from worker import protocol

FAST = {"SHELLQ_HEARTBEAT": "0.2", "SHELLQ_LEASE_TTL": "1.5"}
CHECK = "echo $(find ~/tree -type f | wc -l) $(du -sb ~/tree | cut -f1) $PWD $PROJECT $STEP $(tag)"


def history(files: int) -> list[str]:
    """The source's 50 commands: 40 write `files` MiB of random data, 10 move around and set up the shell."""
    per = files // 40
    writes = [
        f"mkdir -p d{i:02} && for j in $(seq {per}); do head -c 1048576 /dev/urandom > d{i:02}/f$j; done"
        for i in range(40)
    ]
    setup = ["mkdir -p ~/tree && cd ~/tree", "export PROJECT=bench", "tag() { echo tagged; }", "export STEP=0"]
    tail = ["ls | wc -l", "cd d07 && ls", "cd ..", "export STEP=1", "sha256sum d00/f1 > sums", "cat sums | wc -c"]
    return setup[:2] + writes[:20] + setup[2:] + writes[20:] + tail


def start_redis(work: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    binary = shutil.which("redis-server") or "redis-server"
    port = free_port()
    (work / "sock").mkdir(mode=0o700)
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(work), "--save", ""]
    args += ["--appendonly", "yes", "--appendfsync", "everysec"]
    args += ["--unixsocket", str(work / "sock" / "redis.sock"), "--unixsocketperm", "700"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    r = redis.Redis.from_url(url)
    for _ in range(500):
        try:
            return proc, url, f"{Path(binary).name} {r.info('server')['redis_version']}"
        except redis.ConnectionError:
            time.sleep(0.01)
    raise RuntimeError("redis did not start")


def run(s: Session, cmd: str) -> Result:
    r = s.run(cmd, timeout=300)
    if (r.status, r.exit_code) != ("completed", 0):
        raise RuntimeError(f"{cmd!r} in {s.id}: {r.status} {r.exit_code} {r.stderr}")
    return r


def by_fork(backend: DockerBackend, client: Client, source: str, name: str) -> tuple[float, str]:
    t = time.perf_counter()
    made = fork(client.session(source), name, backend=backend)
    run(client.session(name), "true")
    return (time.perf_counter() - t) * 1000, made.image


def by_replay(backend: DockerBackend, client: Client, commands: list[str], name: str) -> float:
    t = time.perf_counter()
    backend.start(name, env=FAST)
    s = client.session(name)
    for cmd in commands:
        run(s, cmd)
    run(s, "true")
    return (time.perf_counter() - t) * 1000


def by_library_replay(backend: DockerBackend, client: Client, until: str, name: str) -> float:
    t = time.perf_counter()
    backend.start(name, env=FAST)
    report = client.session("src").replay(name, until=until)
    if report.first_difference is not None or len(report.rows) != 50:
        raise RuntimeError(f"replay into {name}: {report.first_difference}")
    run(client.session(name), "true")
    return (time.perf_counter() - t) * 1000


def commit_alone(backend: DockerBackend, container_id: str) -> float:
    container = backend.docker.containers.get(container_id)
    t = time.perf_counter()
    image = container.commit(repository="shellq-bench-commit", tag=f"{backend.instance}", pause=True)
    ms = (time.perf_counter() - t) * 1000
    backend.docker.images.remove(image.id)
    return ms


def one_round(
    backend: DockerBackend,
    client: Client,
    i: int,
    commands: list[tuple[str, str]],
    source_container: str,
    raw: dict[str, list[float]],
    checks: dict[str, str],
) -> dict[str, int]:
    """Fork, replay and Session.replay once each (the first one rotates); -> the snapshot's sizes."""
    kinds = ["fork", "replay", "Session.replay"]
    sizes: dict[str, int] = {}
    for kind in kinds[i % 3 :] + kinds[: i % 3]:
        name = f"{kind.replace('.', '-')}-{i}"
        if kind == "Session.replay":
            ms = by_library_replay(backend, client, commands[-1][0], name)
        elif kind == "fork":
            ms, image = by_fork(backend, client, "src", name)
            total = backend.docker.images.get(image).attrs["Size"]
            base = backend.docker.images.get(backend.docker.containers.get(source_container).image.id)
            sizes = {"snapshot total": total, "snapshot layer": total - base.attrs["Size"]}
        else:
            ms = by_replay(backend, client, [cmd for _, cmd in commands], name)
        raw[kind].append(ms)
        checks[name] = run(client.session(name), CHECK).stdout
        backend.stop(name)
    return sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default="shellq-worker:latest")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--files", type=int, default=200, help="MiB of random files the source writes (40 commands)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="shellq-bench-fork-"))
    server, url, server_version = start_redis(work)
    raw: dict[str, list[float]] = {"fork": [], "replay": [], "Session.replay": [], "commit": []}
    checks: dict[str, str] = {}
    sizes: dict[str, int] = {}
    try:
        with DockerBackend(url, image=args.image) as backend, Client(url) as client:
            source_container = backend.start("src", env=FAST)
            s = client.session("src")
            raw["source shell"] = [sum(run(s, cmd).duration_ms for cmd in history(args.files))]
            entries: Any = client.redis.xrange(protocol.keys("src").cmd)  # as sent, before any fork adds its own
            commands = [(eid.decode(), fields[b"cmd"].decode()) for eid, fields in entries]
            checks["source"] = run(s, CHECK).stdout
            for i in range(args.rounds):
                sizes = one_round(backend, client, i, commands, source_container, raw, checks) or sizes
                raw["commit"].append(commit_alone(backend, source_container))
    finally:
        server.kill()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)

    report(args, server_version, len(commands), raw, sizes, checks)


def report(
    args: argparse.Namespace,
    server_version: str,
    n: int,
    raw: dict[str, list[float]],
    sizes: dict[str, int],
    checks: dict[str, str],
) -> None:
    machine = f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}"
    print(f"# fork vs replay — {time.strftime('%Y-%m-%d %H:%M')} — {machine}")
    print(f"# Redis: {server_version}, AOF everysec; image {args.image}; {n} commands, {args.files} MiB")
    print(f"{'what':<16}{'n':>4}{'median ms':>12}   raw ms")
    for name, runs in raw.items():
        print(f"{name:<16}{len(runs):>4}{statistics.median(runs):>12.0f}   {' '.join(f'{x:.0f}' for x in runs)}")
    print(f"fork / replay (medians): {statistics.median(raw['fork']) / statistics.median(raw['replay']):.2f}")
    layer, total = (sizes[k] / 2**20 for k in ("snapshot layer", "snapshot total"))
    print(f"snapshot image: its own layer {layer:.1f} MiB, {total:.1f} MiB with the worker image's")
    same = {name: check == checks["source"] for name, check in checks.items()}
    print(
        f"state check ({checks['source'].strip()}): same as the source in {sum(same.values()) - 1} of {len(same) - 1}"
    )
    if args.json:
        args.json.write_text(json.dumps({"raw_ms": raw, "sizes": sizes, "checks": checks}, indent=1))


if __name__ == "__main__":
    main()
