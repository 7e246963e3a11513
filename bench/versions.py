"""Round trip of `true` for two shellq versions side by side in one run (method and raw numbers printed; nothing
asserted): what a change cost.

    python bench/versions.py --before REF [--runs 2000] [--rounds 3] [--appendfsync everysec|always] [--json out]

Method: `git worktree add` REF into a temporary directory. Each round measures, one after the other (so drift in
this machine's speed hits every side alike, and in a rotating order, so no side always runs last), in a fresh
process whose imports come from that side's tree:
  before        REF: a private redis-server (AOF on), one `python -m worker` subprocess, `Session.run("true")`
                through the `default` user (no password)
  after         this checkout, the same way
  after (ACL)   this checkout as shipped: a server with an aclfile and an admin password, the session's users
                made by `containers.access.grant`, the worker on `shellq.worker.S` with its password file, the
                producer on `shellq.producer.S`
Each side: 200 warm-up runs, then `--runs` timed runs; p50/p95/p99/mean per side and round, then pooled.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SIDE = r"""
import json, os, secrets, shutil, socket, subprocess, sys, tempfile, time
from pathlib import Path
import redis
from producer import Client

runs, fsync, acl = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
work = Path(tempfile.mkdtemp(prefix="shellq-bench-"))
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
binary = shutil.which("redis-server")
args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(work), "--save", "",
        "--appendonly", "yes", "--appendfsync", fsync]
admin = f"redis://127.0.0.1:{port}/0"
if acl:
    password = secrets.token_hex(16)
    (work / "users.acl").write_text(f"user default on >{password} ~* &* +@all\n")
    args += ["--aclfile", str(work / "users.acl")]
    admin = f"redis://:{password}@127.0.0.1:{port}/0"
server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
for _ in range(500):
    try:
        redis.Redis.from_url(admin).ping(); break
    except redis.ConnectionError:
        time.sleep(0.01)
env = {**os.environ, "SHELLQ_SESSION": "bench", "SHELLQ_WORK_DIR": str(work / "session"), "SHELLQ_REDIS_URL": admin}
producer_url = admin
if acl:
    from containers import access
    creds = access.grant(redis.Redis.from_url(admin), "bench")
    (work / "worker.password").write_text(creds.worker_password)
    env.update(SHELLQ_REDIS_URL=access.url_for(admin, creds.worker_user),
               SHELLQ_REDIS_PASSWORD_FILE=str(work / "worker.password"))
    producer_url = access.url_for(admin, creds.producer_user, creds.producer_password)
worker = subprocess.Popen([sys.executable, "-m", "worker"], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
try:
    s = Client(producer_url).session("bench")
    assert s.run("true", timeout=30).exit_code == 0
    for _ in range(200):
        s.run("true")
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        r = s.run("true")
        out.append((time.perf_counter() - t) * 1000)
        assert r.exit_code == 0
    print(json.dumps(out))
finally:
    worker.terminate(); worker.wait(10)
    server.kill(); server.wait()
    shutil.rmtree(work, ignore_errors=True)
"""


def side(tree: Path, runs: int, fsync: str, acl: bool) -> list[float]:
    done = subprocess.run(
        [sys.executable, "-c", SIDE, str(runs), fsync, "1" if acl else "0"],
        cwd=tree,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "PYTHONPATH": str(tree), "HOME": str(Path.home())},
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"side {tree} (acl={acl}) failed:\n{done.stderr.decode()[-3000:]}")
    return list(json.loads(done.stdout))


def stats(ms: list[float]) -> str:
    s = sorted(ms)
    p = lambda q: s[min(len(s) - 1, int(len(s) * q))]  # noqa: E731
    return f"{len(s):>6} {statistics.median(s):>9.3f} {p(0.95):>9.3f} {p(0.99):>9.3f} {statistics.fmean(s):>9.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="git ref of the version to compare against")
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--appendfsync", default="everysec", choices=["everysec", "always"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    print(__doc__)
    with tempfile.TemporaryDirectory(prefix="shellq-before-") as tmp:
        before = Path(tmp) / "tree"
        git = ["git", "-C", str(ROOT), "worktree"]
        subprocess.run([*git, "add", "-q", "--detach", str(before), args.before], check=True)
        try:
            sides = {"before": (before, False), "after": (ROOT, False), "after (ACL)": (ROOT, True)}
            raw: dict[str, list[list[float]]] = {name: [] for name in sides}
            print(f"{'side':<14}{'round':>6} {'n':>6} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'mean ms':>9}")
            for round_no in range(1, args.rounds + 1):
                order = list(sides.items())
                shift = (round_no - 1) % len(order)  # each side takes each place in turn: no side is always last
                for name, (tree, acl) in order[shift:] + order[:shift]:
                    ms = side(tree, args.runs, args.appendfsync, acl)
                    raw[name].append(ms)
                    print(f"{name:<14}{round_no:>6} {stats(ms)}", flush=True)
            print()
            pooled = {name: [x for r in rounds for x in r] for name, rounds in raw.items()}
            for name, ms in pooled.items():
                print(f"{name:<14}{'all':>6} {stats(ms)}")
            base = statistics.median(pooled["before"])
            for name in ("after", "after (ACL)"):
                change = (statistics.median(pooled[name]) / base - 1) * 100
                print(f"p50 {name} vs before ({args.before}): {change:+.1f}%")
            if args.json:
                args.json.write_text(json.dumps({"before": args.before, "raw": raw}))
        finally:
            subprocess.run([*git, "remove", "--force", str(before)], check=False)


if __name__ == "__main__":
    main()
