"""Per-command round trip of shellq and the executors agents would otherwise use, side by side in one run.

    make bench      (creates bench/.venv with the peers from PyPI: mini-swe-agent, swe-rex, autogen-ext[docker])

For each system: the time of `true`, `ls -la /usr/lib` and `python3 -c pass` (median / p95 / p99 over --runs, after a
warmup), and whether `export` and `cd` survive into the next command. Containers use the debootstrap base image
(`shellq-base:bookworm`, built offline) and the shellq worker image; Redis is a private redis-server with AOF
everysec on loopback. Systems:

  shellq local          Session.run through Redis to a local worker subprocess
  shellq container      Session.run through Redis to a worker in a container (DockerBackend)
  bash -c               subprocess.run(["bash", "-c", CMD]): a fresh process, no state
  docker exec (CLI)     `docker exec C bash -c CMD` into a running container
  docker SDK exec_run   docker SDK `container.exec_run(["bash", "-c", CMD])`
  mini-swe-agent        minisweagent DockerEnvironment.execute (docker exec bash -lc per command)
  autogen docker        autogen_ext DockerCommandLineCodeExecutor.execute_code_blocks (a bash code block)
  swe-rex local         swerex LocalRuntime bash session (pexpect, persistent), its default settings
  swe-rex docker        swerex DockerDeployment: the same bash session behind swerex-remote (FastAPI, HTTP) in a
                        container of the base image plus swe-rex (bench/swerex_image.sh, built offline)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import docker  # noqa: E402
from roundtrip import start_redis, summary  # noqa: E402

from containers.docker_backend import DockerBackend  # noqa: E402
from producer import Client  # noqa: E402

COMMANDS = {"true": "true", "ls": "ls -la /usr/lib", "python": "python3 -c pass"}
STATE_SET, STATE_CHECK, STATE_WANT = "export BENCH_A=1 && cd /tmp", "echo $BENCH_A:$(pwd)", "1:/tmp"
SWEREX_IMAGE = "shellq-bench-swerex:latest"  # built by bench/swerex_image.sh
Runner = Callable[[str], str]
os.environ.setdefault("SWE_REX_LOG_STREAM_LEVEL", "WARNING")  # swe-rex logs DEBUG and INFO to stdout otherwise
os.environ.setdefault("MSWEA_SILENT_STARTUP", "1")  # mini-swe-agent prints a banner to stdout otherwise


def measure(run: Runner, runs: int, warmup: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, cmd in COMMANDS.items():
        for _ in range(warmup):
            run(cmd)
        ms = []
        for _ in range(runs):
            t = time.perf_counter()
            run(cmd)
            ms.append((time.perf_counter() - t) * 1000)
        out[name] = {**summary(ms), "raw_ms": ms}
    run(STATE_SET)
    out["state_kept"] = run(STATE_CHECK).strip() == STATE_WANT
    return out


def shellq_runner(url: str, session: str) -> Runner:
    s = Client(url).session(session)
    return lambda cmd: s.run(cmd).stdout


def minisweagent_runner(image: str) -> tuple[Runner, Callable[[], None]]:
    import logging

    from minisweagent.environments.docker import DockerEnvironment

    logging.getLogger("minisweagent").setLevel(logging.WARNING)  # it logs each container start to stdout
    env = DockerEnvironment(image=image)
    return (lambda cmd: str(env.execute({"command": cmd})["output"])), env.cleanup


def autogen_runner(image: str, work: Path) -> tuple[Runner, Callable[[], None]]:
    from autogen_core import CancellationToken
    from autogen_core.code_executor import CodeBlock
    from autogen_ext.code_executors.docker import DockerCommandLineCodeExecutor

    loop = asyncio.new_event_loop()
    ex = DockerCommandLineCodeExecutor(image=image, work_dir=work)
    loop.run_until_complete(ex.start())

    def run(cmd: str) -> str:
        blocks = [CodeBlock(code=cmd, language="bash")]
        return str(loop.run_until_complete(ex.execute_code_blocks(blocks, CancellationToken())).output)

    return run, lambda: loop.run_until_complete(ex.stop())


def swerex_runner() -> tuple[Runner, Callable[[], None]]:
    from swerex.runtime.abstract import BashAction, CreateBashSessionRequest
    from swerex.runtime.local import LocalRuntime

    loop = asyncio.new_event_loop()
    rt = LocalRuntime()
    loop.run_until_complete(rt.create_session(CreateBashSessionRequest()))

    def run(cmd: str) -> str:
        return str(loop.run_until_complete(rt.run_in_session(BashAction(command=cmd, check="silent"))).output)

    return run, lambda: loop.run_until_complete(rt.close())


def swerex_docker_runner(image: str) -> tuple[Runner, Callable[[], None], float]:
    """A bash session of swe-rex's DockerDeployment; also returns how long DockerDeployment.start() took, in ms."""
    from swerex.deployment.docker import DockerDeployment
    from swerex.runtime.abstract import BashAction, CreateBashSessionRequest

    loop = asyncio.new_event_loop()
    deployment = DockerDeployment(image=image, pull="never")  # a local image: there is no registry to pull from
    t = time.perf_counter()
    loop.run_until_complete(deployment.start())  # `docker run` of swerex-remote, then polls it until it answers
    start_ms = (time.perf_counter() - t) * 1000

    def stop() -> None:
        loop.run_until_complete(deployment.stop())

    try:
        loop.run_until_complete(deployment.runtime.create_session(CreateBashSessionRequest()))
    except BaseException:
        stop()
        raise

    def run(cmd: str) -> str:
        action = BashAction(command=cmd, check="silent")
        return str(loop.run_until_complete(deployment.runtime.run_in_session(action)).output)

    return run, stop, start_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=200, help="timed runs per command for the fast systems")
    ap.add_argument("--slow-runs", type=int, default=30, help="timed runs per command for docker-exec-based ones")
    ap.add_argument("--base", default="shellq-base:bookworm")
    ap.add_argument("--image", default="shellq-worker:latest")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "peers.json")
    args = ap.parse_args()
    engine = docker.from_env()
    if not engine.images.list(name=SWEREX_IMAGE):
        subprocess.run([HERE / "swerex_image.sh"], stdout=sys.stderr, check=True)  # keeps stdout to the report
    tmp = Path(tempfile.mkdtemp(prefix="shellq-peers-"))
    server, url, redis_version = start_redis(tmp, "everysec", unix_socket=True)
    results: dict[str, Any] = {}
    cleanups: list[Callable[[], None]] = []
    try:
        name = f"bench-{uuid.uuid4().hex[:6]}"
        env = {**os.environ, "SHELLQ_REDIS_URL": url, "SHELLQ_SESSION": name, "SHELLQ_WORK_DIR": str(tmp / name)}
        worker = subprocess.Popen([sys.executable, "-m", "worker", "--log-level", "WARNING"], env=env, cwd=HERE.parent)
        cleanups.append(worker.terminate)
        Client(url).session(name).run("true", timeout=60)
        results["shellq local"] = measure(shellq_runner(url, name), args.runs, 20)

        backend = DockerBackend(url, image=args.image)
        cleanups.append(backend.close)
        cname = f"bench-{uuid.uuid4().hex[:6]}"
        backend.start(cname)
        results["shellq container"] = measure(shellq_runner(url, cname), args.runs, 20)

        results["bash -c"] = measure(
            lambda cmd: subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, check=False).stdout,
            args.runs,
            5,
        )
        plain = engine.containers.run(args.base, ["infinity"], entrypoint="sleep", detach=True, auto_remove=True)
        cleanups.append(lambda: plain.remove(force=True))
        results["docker exec (CLI)"] = measure(
            lambda cmd: (
                subprocess.run(
                    ["docker", "exec", plain.id, "bash", "-c", cmd], capture_output=True, text=True, check=False
                ).stdout
            ),
            args.slow_runs,
            3,
        )
        results["docker SDK exec_run"] = measure(
            lambda cmd: plain.exec_run(["bash", "-c", cmd]).output.decode(), args.slow_runs, 3
        )
        run, stop = minisweagent_runner(args.base)
        cleanups.append(stop)
        results["mini-swe-agent"] = measure(run, args.slow_runs, 3)
        run, stop = autogen_runner(args.base, tmp / "autogen")
        cleanups.append(stop)
        results["autogen docker"] = measure(run, args.slow_runs, 3)
        run, stop = swerex_runner()
        cleanups.append(stop)
        results["swe-rex local"] = measure(run, args.slow_runs, 3)
        run, stop, start_ms = swerex_docker_runner(SWEREX_IMAGE)
        cleanups.append(stop)
        results["swe-rex docker"] = {**measure(run, args.slow_runs, 3), "start_ms": start_ms}
    finally:
        run_cleanups(cleanups)
        server.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    report(results, redis_version, engine.version().get("Version", "?"), args.json)


def run_cleanups(cleanups: list[Callable[[], None]]) -> None:
    """Undo what the systems set up, newest first; a peer's failing teardown must not hide the numbers."""
    for cleanup in reversed(cleanups):
        try:
            cleanup()
        except Exception as e:
            print(f"cleanup: {e}", file=sys.stderr)


def report(results: dict[str, Any], redis_version: str, docker_version: str, path: Path) -> None:
    machine = f"{platform.node()} {platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}"
    print(f"# per-command round trip — {time.strftime('%Y-%m-%d %H:%M')} — {machine}")
    print(f"# Docker {docker_version}; Redis {redis_version}, AOF everysec (shellq figures)")
    print(f"{'system':<22}{'cmd':<8}{'n':>5}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}  state kept")
    fast = results["shellq local"]["true"]["p50"]
    for system, r in results.items():
        for cmd in COMMANDS:
            s = r[cmd]
            kept = ("yes" if r["state_kept"] else "no") if cmd == "true" else ""
            print(f"{system:<22}{cmd:<8}{s['n']:>5}{s['p50']:>10.2f}{s['p95']:>10.2f}{s['p99']:>10.2f}  {kept}")
    for system, r in results.items():
        if "start_ms" in r:
            print(f"{system} start: {r['start_ms']:.0f} ms (until its server answers; before the bash session)")
    print("ratio of each system's `true` p50 to shellq local's:")
    for system, r in results.items():
        print(f"  {system:<22}{r['true']['p50'] / fast:>8.1f}x")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine,
        "redis": redis_version,
        "docker": docker_version,
    }
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"raw numbers: {path}")


if __name__ == "__main__":
    main()
