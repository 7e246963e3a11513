"""`shellq exec S -- true` as a shell script calls it, wall time per process, side by side in one run (method and raw
numbers printed; nothing asserted).

    python bench/cli.py [--runs 30] [--image shellq-worker:latest] [--json bench/results/cli.json]

Each row starts one process per run and waits for it to exit, the rows taken in turns (one run of each, then the
next round), so drift on the machine weighs on all alike; 3 rounds of warm-up first:
  shellq exec        the installed console script (producer/cli_fast.py: the fast path), SHELLQ_REDIS_URL set
  full path          `python -m producer.cli exec S -- true` (redis-py and pydantic imported: the path before)
  docker exec        `docker exec C true` into a running container of --image (else shellq-base:bookworm) that
                     this script starts; skipped, saying why, without a Docker engine or either image
  redis-cli          one `redis-cli` process that XADDs a hand-written `true` to the session's command stream and
                     XREAD BLOCKs its result stream for the result (the raw floor of a CLI on this design)
  python -c pass     the interpreter's own start-up, with this environment's site-packages
  shellq exec, wheel the same console script installed from a wheel of this checkout in a venv of its own (what
                     `pip install shellq` gives; the dependencies come from this environment), and that venv's
                     `python -c pass`: this environment's editable install costs every start ~11 ms of imports
The session is served by a local worker subprocess (`python -m worker`) on a private redis-server, AOF everysec.
PYTHONDONTWRITEBYTECODE is dropped from the children's environment: an installed shellq has its bytecode cached.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import redis

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from roundtrip import start_redis  # noqa: E402

from worker import protocol  # noqa: E402

SHELLQ = Path(sys.executable).parent / "shellq"


def wheel_venv(tmp: Path) -> tuple[Path | None, str]:
    """A venv with shellq installed from this checkout as a wheel (as `pip install shellq` installs it), its
    dependencies taken from this environment through a .pth file: its bin directory, or None and why not. This
    environment's own install is editable, and setuptools' finder for editable installs costs every Python start
    here (`python -c pass` too) about 11 ms of imports (pathlib, fnmatch, importlib.util)."""
    venv = tmp / "wheel-venv"
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
        site = next((venv / "lib").glob("python*/site-packages"))
        (site / "shellq-bench-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        install = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps"]
        subprocess.run([*install, str(HERE.parent)], check=True, capture_output=True, cwd=tmp)
    except (subprocess.CalledProcessError, StopIteration) as e:
        return None, f"could not install the wheel: {getattr(e, 'stderr', b'')!r}"[-300:]
    return venv / "bin", "shellq installed from a wheel of this checkout"


def start_container(image: str) -> tuple[str | None, str]:
    """A container of `image` (else of the debootstrap base) that sleeps: its id, or None and why not."""
    if shutil.which("docker") is None:
        return None, "no docker CLI on PATH"
    if subprocess.run(["docker", "info"], capture_output=True, check=False).returncode != 0:
        return None, "no Docker engine answers (`docker info` fails)"
    for candidate in (image, "shellq-base:bookworm"):
        if subprocess.run(["docker", "image", "inspect", candidate], capture_output=True, check=False).returncode:
            continue
        name = f"shellq-bench-cli-{uuid.uuid4().hex[:6]}"
        run = ["docker", "run", "-d", "--rm", "--name", name, "--entrypoint", "sleep", candidate, "infinity"]
        started = subprocess.run(run, capture_output=True, text=True, check=False)
        if started.returncode == 0:
            return started.stdout.strip(), candidate
        return None, f"docker run {candidate} failed: {started.stderr.strip()[-200:]}"
    return None, f"neither {image} nor shellq-base:bookworm is built (`make bench` builds them)"


def wall_ms(command: list[str], env: dict[str, str], stdin: bytes | None = None) -> float:
    """Start `command`, wait for it; milliseconds. A failed run stops the bench (a timing of an error is no timing)."""
    started = time.perf_counter()
    done = subprocess.run(command, env=env, input=stdin, capture_output=True, check=False)
    ms = (time.perf_counter() - started) * 1000
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}: {done.stderr.decode(errors='replace')}")
    return ms


def summary(ms: list[float]) -> dict[str, float]:
    s = sorted(ms)
    return {"n": len(s), "p50": statistics.median(s), "p90": s[math.ceil(len(s) * 0.9) - 1], "min": s[0], "max": s[-1]}


def rows(
    url: str, session: str, container: str | None, env: dict[str, str], wheel: Path | None
) -> dict[str, Callable[[], float]]:
    """What is timed: each a function that starts one process and returns its wall time in ms."""
    keys, r = protocol.keys(session), redis.Redis.from_url(url)
    port = str(urlsplit(url).port)

    def redis_cli() -> float:
        """XADD + XREAD BLOCK from the result stream's current end, in one redis-cli process (commands on stdin)."""
        tail = r.xrevrange(keys.res, count=1)
        after = tail[0][0].decode() if tail else "0-0"
        script = f"XADD {keys.cmd} * cmd true\nXREAD COUNT 1 BLOCK 10000 STREAMS {keys.res} {after}\n".encode()
        ms = wall_ms(["redis-cli", "-p", port], env, stdin=script)
        if len(r.xrange(keys.res, min=f"({after}")) != 1:  # its result came, and only it
            raise SystemExit("redis-cli: no result read back")
        return ms

    timed: dict[str, Callable[[], float]] = {
        "shellq exec": lambda: wall_ms([str(SHELLQ), "exec", session, "--", "true"], env),
        "full path": lambda: wall_ms([sys.executable, "-m", "producer.cli", "exec", session, "--", "true"], env),
        "redis-cli": redis_cli,
        "python -c pass": lambda: wall_ms([sys.executable, "-c", "pass"], env),
    }
    if wheel is not None:
        timed["shellq exec, wheel"] = lambda: wall_ms([str(wheel / "shellq"), "exec", session, "--", "true"], env)
        timed["python, wheel venv"] = lambda: wall_ms([str(wheel / "python"), "-c", "pass"], env)
    if container is not None:
        timed["docker exec"] = lambda: wall_ms(["docker", "exec", container, "true"], env)
    return timed


def in_turns(timed: dict[str, Callable[[], float]], runs: int, warmup: int = 3) -> dict[str, list[float]]:
    raw: dict[str, list[float]] = {name: [] for name in timed}
    for i in range(warmup + runs):
        for name, run in timed.items():
            ms = run()
            if i >= warmup:
                raw[name].append(ms)
    return raw


def report(raw: dict[str, list[float]], meta: dict[str, object], docker: str, path: Path) -> None:
    results = {name: summary(ms) for name, ms in raw.items()}
    print(f"# `shellq exec S -- true`, wall per process — {time.strftime('%Y-%m-%d %H:%M')} — {meta['machine']}")
    print(f"# Redis: {meta['redis']}, AOF everysec; a local worker; {meta['runs']} runs per row, in turns, after 3")
    print(f"{'what':<16}{'n':>4}{'p50 ms':>10}{'p90 ms':>10}{'min ms':>10}{'max ms':>10}")
    for name, s in results.items():
        print(f"{name:<16}{s['n']:>4}{s['p50']:>10.1f}{s['p90']:>10.1f}{s['min']:>10.1f}{s['max']:>10.1f}")
    if "docker exec" not in results:
        print(f"docker exec: skipped ({docker})")
    else:
        half = results["docker exec"]["p50"] / 2
        print(f"docker exec: into a container of {docker}")
        for name in ("shellq exec", "shellq exec, wheel"):
            if name in results:
                verdict = "met" if results[name]["p50"] <= half else "not met"
                print(f"goal: `{name}` p50 <= half of `docker exec`'s ({half:.1f} ms): {verdict}")
    for name, ms in raw.items():
        print(f"raw {name}: {' '.join(f'{x:.1f}' for x in ms)}")
    path.write_text(json.dumps({"meta": {**meta, "docker": docker}, "results": results, "raw_ms": raw}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--image", default="shellq-worker:latest")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "cli.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="shellq-bench-cli-"))
    server, url, server_version = start_redis(tmp, "everysec")
    session = f"cli-{uuid.uuid4().hex[:6]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHELLQ_") and k != "PYTHONDONTWRITEBYTECODE"}
    env["SHELLQ_REDIS_URL"] = url
    worker_env = {**env, "SHELLQ_SESSION": session, "SHELLQ_WORK_DIR": str(tmp / session)}
    worker = subprocess.Popen(
        [sys.executable, "-m", "worker", "--log-level", "WARNING"], env=worker_env, cwd=HERE.parent
    )
    container, docker = start_container(args.image)
    wheel, installed = wheel_venv(tmp)
    print(f"wheel: {installed}")
    try:
        wall_ms([str(SHELLQ), "exec", session, "--timeout", "60", "--", "true"], env)  # the worker serves
        raw = in_turns(rows(url, session, container, env, wheel), args.runs)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        if container is not None:
            subprocess.run(["docker", "rm", "-f", container], capture_output=True, check=False)
        server.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    machine = f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}"
    report(raw, {"machine": machine, "redis": server_version, "aof": "everysec", "runs": args.runs}, docker, args.json)


if __name__ == "__main__":
    main()
