"""A realistic agent trajectory of ~50 shell commands, end to end, in each system that keeps shell state.

    python bench/trajectory.py [--repeat 3] [--json bench/results/trajectory.json]

The same list of plain bash strings runs in every system, one command at a time, as an agent would send them: make
a scratch dir and cd into it; write a small package with a bug, a unittest file and a .gitignore with heredocs; git
init/config/add/commit; git clone it and cd into the clone; python3 -m venv + source .venv/bin/activate; build the
wheel of a second tiny package by hand (a Python script writing METADATA, WHEEL and RECORD with zipfile: no network,
no setuptools) and pip install --no-index it; run the tests (one fails); grep -rn for the bug; sed -i the fix; run
the tests again (they pass); git status / diff --stat / commit; pull the fix into the first repo; cd back and forth,
exported variables and a shell function used later, echo $VIRTUAL_ENV, deactivate, ls, cat, wc -l, find. After the
first `cd` all paths are relative or come from exported variables, so cd/export/venv state must persist between
commands. Every command has an expected substring of its output (e.g. the first test run FAILED, the second OK, the
sed edit visible in grep, `git diff --stat` 1 file changed); a system passes when all of them are there.
The third command exports PAGER=cat GIT_PAGER=cat, as SWE-agent does: without it the swe-rex docker session (a
pty) waited forever in git's pager (`more` in the image) at the first `git log`; shellq's bash has no terminal, so
git never pages there. swe-rex logs "Bashlex fail" for each heredoc; the commands run all the same.

Each system runs the trajectory --repeat times, each time in a fresh scratch directory (under a host tempdir for the
local systems, /tmp/trajectory-N in a container) in one long-lived session that was started and answered `true`
before the clock starts (cold start is not counted; see containers.py). Reported: the wall time of the whole
trajectory (median, min and max over the repetitions) and the median / p95 / max of the per-command times pooled
over them. Most of the total is the work itself (venv creation, pip, unittest), the same in every system; the
per-command median is where the executor's own overhead shows. Redis is a private redis-server with AOF everysec
on loopback. Systems:

  shellq local       Session.run through Redis to a local worker subprocess (python -m worker)
  shellq container   Session.run through Redis to a worker in a shellq-worker container (DockerBackend, given all the
                     machine's cpus, as the swe-rex container has)
  swe-rex local      swerex LocalRuntime bash session (pexpect, persistent)
  swe-rex docker     swerex DockerDeployment into shellq-bench-swerex:latest (bench/swerex_image.sh), when available

Left out, because they keep no shell state between commands (a fresh `bash -c` per command: the `cd`, `export` and
`source .venv/bin/activate` are gone by the next one): mini-swe-agent, AutoGen's Docker executor, plain docker exec.
The local systems run the host's python3 and git, the containers the image's, so compare totals within a row's
environment.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
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
import peers  # noqa: E402
from peers import Runner, shellq_runner, swerex_runner  # noqa: E402
from roundtrip import start_redis, summary  # noqa: E402

from containers.docker_backend import DockerBackend  # noqa: E402
from producer import Client  # noqa: E402

SWEREX_IMAGE = "shellq-bench-swerex:latest"
DATE = "2024-01-01T00:00:00Z"  # fixed commit dates: the same commit ids in every system

BUILD_WHEEL = '''cat > build_wheel.py <<'EOF'
"""Build dist/greet-0.1.0-py3-none-any.whl by hand: no setuptools, no network."""
import base64
import hashlib
import pathlib
import zipfile

NAME, VERSION = "greet", "0.1.0"
INFO = f"{NAME}-{VERSION}.dist-info"
files = {
    "greet/__init__.py": pathlib.Path("greet/__init__.py").read_bytes(),
    f"{INFO}/METADATA": f"Metadata-Version: 2.1\\nName: {NAME}\\nVersion: {VERSION}\\n".encode(),
    f"{INFO}/WHEEL": b"Wheel-Version: 1.0\\nGenerator: build_wheel.py\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n",
}


def record_line(path, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}\\n"


files[f"{INFO}/RECORD"] = ("".join(record_line(p, d) for p, d in files.items()) + f"{INFO}/RECORD,,\\n").encode()
wheel = pathlib.Path("dist") / f"{NAME}-{VERSION}-py3-none-any.whl"
wheel.parent.mkdir(exist_ok=True)
with zipfile.ZipFile(wheel, "w") as zf:
    for path, data in files.items():
        zf.writestr(path, data)
print(wheel)
EOF'''

TEST_FILE = """cat > tests/test_ops.py <<'EOF'
import unittest

from calc import add, mean
from greet import greet


class OpsTest(unittest.TestCase):
    def test_add(self):
        self.assertEqual(add(2, 3), 5)

    def test_mean(self):
        self.assertEqual(mean([1, 2, 3, 4]), 2.5)

    def test_greet(self):
        self.assertEqual(greet("calc"), "hello, calc")
EOF"""


def trajectory(root: str) -> list[tuple[str, str]]:
    """The commands, each with a substring its output must contain ("" checks nothing); only the first names root."""
    return [
        (f"mkdir -p {root} && cd {root} && pwd", root),
        (f"export PIP_DISABLE_PIP_VERSION_CHECK=1 GIT_AUTHOR_DATE={DATE} GIT_COMMITTER_DATE={DATE}", ""),
        ("export PAGER=cat GIT_PAGER=cat", ""),
        ("mkdir -p upstream/calc upstream/tests && cd upstream && pwd", f"{root}/upstream"),
        ("cat > calc/__init__.py <<'EOF'\nfrom calc.ops import add, mean\n\n__all__ = ['add', 'mean']\nEOF", ""),
        (
            "cat > calc/ops.py <<'EOF'\ndef add(a, b):\n    return a + b\n\n\n"
            "def mean(values):\n    return sum(values) / (len(values) - 1)\nEOF",
            "",
        ),
        ("touch tests/__init__.py", ""),
        (TEST_FILE, ""),
        ("cat > .gitignore <<'EOF'\n.venv/\n__pycache__/\nEOF", ""),
        ("git init -q -b main && git config user.name Agent && git config user.email agent@example.invalid", ""),
        ("git add -A && git commit -q -m 'calc: add and mean' && git log --oneline | wc -l", "1"),
        ("cd .. && git clone -q upstream work 2>&1 && cd work && pwd", f"{root}/work"),
        ("git config user.name Agent && git config user.email agent@example.invalid && git config user.name", "Agent"),
        ("export PROJECT=$(pwd) && ls -A", "calc"),
        ("git log --format=%s", "calc: add and mean"),
        ("python3 -m venv .venv", ""),
        ("source .venv/bin/activate", ""),
        ("echo $VIRTUAL_ENV", f"{root}/work/.venv"),
        ("which python && python --version", f"{root}/work/.venv/bin/python"),
        ("mkdir -p ../greet/greet && cd ../greet && pwd", f"{root}/greet"),
        ("cat > greet/__init__.py <<'EOF'\ndef greet(name):\n    return f'hello, {name}'\nEOF", ""),
        (BUILD_WHEEL, ""),
        ("python build_wheel.py", "dist/greet-0.1.0-py3-none-any.whl"),
        ("python -m zipfile -l dist/greet-0.1.0-py3-none-any.whl", "greet-0.1.0.dist-info/RECORD"),
        ("pip install --no-index ./dist/*.whl 2>&1", "Successfully installed greet-0.1.0"),
        ("cd $PROJECT && pwd", f"{root}/work"),
        ("pip list 2>/dev/null | grep -i greet", "0.1.0"),
        ("python -c 'from greet import greet; print(greet(\"world\"))'", "hello, world"),
        ("ls calc tests", "test_ops.py"),
        ("head -n 5 tests/test_ops.py", "from calc import add, mean"),
        ("python -m unittest -v 2>&1", "FAILED (failures=1)"),
        ("grep -rn 'len(values)' calc tests", "calc/ops.py:6:"),
        ("sed -n '5,6p' calc/ops.py", "(len(values) - 1)"),
        ("sed -i 's/(len(values) - 1)/len(values)/' calc/ops.py", ""),
        ("grep -n 'return sum' calc/ops.py", "6:    return sum(values) / len(values)"),
        ("python -m unittest -v 2>&1", "\nOK"),
        ("git status --short", "M calc/ops.py"),
        ("git diff --stat", "1 file changed, 1 insertion(+), 1 deletion(-)"),
        ("git diff | grep '^[-+] '", "+    return sum(values) / len(values)"),
        ("wc -l calc/ops.py tests/test_ops.py", "6 calc/ops.py"),
        ("export TEST_LOG=$PROJECT/../unittest.log", ""),
        ('t() { python -m unittest "$@" 2>&1 | tee "$TEST_LOG" | tail -n 1; }', ""),
        ("t", "OK"),
        ("cd .. && ls", "unittest.log"),
        ("cd - > /dev/null && pwd", f"{root}/work"),
        ('echo "$VIRTUAL_ENV" && tail -n 1 "$TEST_LOG"', f"{root}/work/.venv\nOK"),
        ("git add -A && git commit -q -m 'calc: fix mean' && git log --oneline | wc -l", "2"),
        ("cd ../upstream && git log --oneline | wc -l", "1"),
        ("git pull -q --ff-only ../work main 2>&1 && git log -n 1 --format=%s", "calc: fix mean"),
        ("grep -n 'return sum' calc/ops.py", "/ len(values)"),
        ("cd $PROJECT && deactivate && echo venv=${VIRTUAL_ENV:-none}", "venv=none"),
        ("python3 -c 'import greet' 2>&1 | tail -n 1", "No module named 'greet'"),
        ("cd .. && find . -name '*.py' -not -path '*/.venv/*' | sort", "./work/calc/ops.py"),
        ("git -C work log --oneline | wc -l && echo PROJECT=$PROJECT", f"2\nPROJECT={root}/work"),
    ]


def play(run: Runner, root: str) -> dict[str, Any]:
    """Run the trajectory once in a fresh root; per-command times and the checks that failed."""
    ms, failed = [], []
    start = time.perf_counter()
    for i, (cmd, want) in enumerate(trajectory(root), 1):
        t = time.perf_counter()
        out = run(cmd)
        ms.append((time.perf_counter() - t) * 1000)
        if want not in out.replace("\r\n", "\n"):
            failed.append(f"command {i} {cmd.splitlines()[0]!r}: wanted {want!r}, got {out[-300:]!r}")
    return {"total_s": time.perf_counter() - start, "ms": ms, "failed": failed}


def roots(base: str, n: int) -> list[str]:
    return [f"{base}-{i}" for i in range(n)]


def measure(run: Runner, dirs: list[str]) -> dict[str, Any]:
    runs = [play(run, root) for root in dirs]
    totals = [r["total_s"] for r in runs]
    return {
        "total_s": {"median": statistics.median(totals), "min": min(totals), "max": max(totals), "raw": totals},
        "per_command": summary([x for r in runs for x in r["ms"]]),
        "raw_ms": [r["ms"] for r in runs],
        "failed": [f for r in runs for f in r["failed"]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3, help="trajectories per system, each in a fresh directory")
    ap.add_argument("--image", default="shellq-worker:latest")
    ap.add_argument("--swerex-image", default=SWEREX_IMAGE)
    ap.add_argument("--json", type=Path, default=HERE / "results" / "trajectory.json")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a SIGTERM still runs the cleanups below
    engine = docker.from_env()
    tmp = Path(tempfile.mkdtemp(prefix="shellq-trajectory-"))
    server, url, redis_version = start_redis(tmp, "everysec", unix_socket=True)
    box_roots = roots("/tmp/trajectory", args.repeat)
    results: dict[str, Any] = {}
    left_out = {
        "mini-swe-agent, autogen docker, docker exec (CLI, SDK)": "a fresh bash per command, no cd/export/venv state"
    }
    cleanups: list[Callable[[], None]] = []
    try:
        name = f"traj-{uuid.uuid4().hex[:6]}"
        env = {**os.environ, "SHELLQ_REDIS_URL": url, "SHELLQ_SESSION": name, "SHELLQ_WORK_DIR": str(tmp / name)}
        worker = subprocess.Popen([sys.executable, "-m", "worker", "--log-level", "WARNING"], env=env, cwd=HERE.parent)
        cleanups.append(lambda: stop_process(worker))
        answer_true(url, name)
        results["shellq local"] = measure(shellq_runner(url, name), roots(f"{tmp}/shellq-local", args.repeat))

        backend = DockerBackend(url, image=args.image)
        cleanups.append(backend.close)
        name = f"traj-{uuid.uuid4().hex[:6]}"
        backend.start(name, cpus=float(os.cpu_count() or 1))
        answer_true(url, name)
        results["shellq container"] = measure(shellq_runner(url, name), box_roots)

        run, stop = swerex_runner()
        cleanups.append(stop)
        results["swe-rex local"] = measure(run, roots(f"{tmp}/swerex-local", args.repeat))

        skip = swerex_docker_skip(engine, args.swerex_image)
        if skip:
            left_out["swe-rex docker"] = skip
        else:
            run, stop, *_ = peers.swerex_docker_runner(args.swerex_image)  # (run, stop, start ms)
            cleanups.append(stop)
            results["swe-rex docker"] = measure(run, box_roots)
    finally:
        peers.run_cleanups(cleanups)
        server.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    report(results, left_out, redis_version, engine.version().get("Version", "?"), args)
    if any(r["failed"] for r in results.values()):
        sys.exit(1)


def answer_true(url: str, session: str) -> None:
    r = Client(url).session(session).run("true", timeout=60)
    if not r.ok:
        hint = "; a worker image older than this tree? (scripts/bench rebuilds it)"
        raise RuntimeError(f"session {session} answered `true` with {r.status}: {r.error}{hint}")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(timeout=30)


def swerex_docker_skip(engine: docker.DockerClient, image: str) -> str:
    """Why the swe-rex docker row cannot run here, or "" when it can."""
    if getattr(peers, "swerex_docker_runner", None) is None:
        return "bench/peers.py has no swerex_docker_runner"
    try:
        engine.images.get(image)
    except docker.errors.ImageNotFound:
        return f"no image {image} (bench/swerex_image.sh builds it)"
    return ""


def report(
    results: dict[str, Any], left_out: dict[str, str], redis_version: str, docker_version: str, args: Any
) -> None:
    n = len(trajectory(""))
    machine = f"{platform.node()} {platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}"
    print(f"# agent trajectory ({n} commands) — {time.strftime('%Y-%m-%d %H:%M')} — {machine}")
    print(f"# Docker {docker_version}; Redis {redis_version}, AOF everysec (shellq figures); {args.repeat} runs each")
    print(f"{'system':<18}{'total s':>9}{'min':>7}{'max':>7}{'cmd p50 ms':>12}{'p95 ms':>9}{'max ms':>9}  checks")
    for system, r in results.items():
        t, c = r["total_s"], r["per_command"]
        checks = "all pass" if not r["failed"] else f"{len(r['failed'])} FAILED"
        row = f"{t['median']:>9.2f}{t['min']:>7.2f}{t['max']:>7.2f}{c['p50']:>12.2f}{c['p95']:>9.1f}{c['max']:>9.1f}"
        print(f"{system:<18}{row}  {checks}")
    for system, why in left_out.items():
        print(f"left out: {system}: {why}")
    for system, r in results.items():
        for failure in r["failed"]:
            print(f"FAILED {system}: {failure}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine, "redis": redis_version}
    meta |= {"docker": docker_version, "repeat": args.repeat, "aof": "everysec"}
    commands = [cmd for cmd, _ in trajectory("ROOT")]
    args.json.write_text(
        json.dumps({"meta": meta, "commands": commands, "left_out": left_out, "results": results}, indent=1)
    )
    print(f"raw numbers: {args.json}")


if __name__ == "__main__":
    main()
