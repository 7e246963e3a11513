"""A scripted agent for `make demo`: what shellq does, against a live session (its name is the argument)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
from urllib.parse import urlsplit

from producer import Client, Result
from producer.cli import redis_url
from worker import protocol


def show(title: str, r: Result) -> None:
    out = (r.stdout + r.stderr).rstrip("\n").replace("\n", "\n    | ")
    print(
        f"  {title}\n    status={r.status} exit_code={r.exit_code} cwd={r.cwd} epoch={r.shell_epoch} "
        f"{r.duration_ms:.1f} ms\n    | {out}"
    )


def main(session: str) -> None:
    url = redis_url()
    s = Client(url).session(session)
    work = tempfile.mkdtemp(prefix="shellq-demo-")

    print(f"\n1. State persists across commands (session {session})")
    show("cd + export", s.run(f"cd {work} && export GREETING='hello from shellq'"))
    show("a venv, activated in one command ...", s.run("python3 -m venv .venv && source .venv/bin/activate"))
    show("... is still active in the next", s.run('echo "$GREETING"; pwd; which python'))

    print("\n2. A timeout stops the command, not the shell")
    show("sleep 30 with timeout=1", s.run("echo working; sleep 30; echo never", timeout=1))
    show("state kept", s.run('echo "$GREETING"; pwd; echo "venv: $VIRTUAL_ENV"'))

    print("\n3. Two agents share the session; each gets its own results, in order")
    lines: list[str] = []

    def agent(name: str) -> None:
        mine = Client(url).session(session)
        for i in range(3):
            r = mine.run(f"echo {name}-{i} >> agents.log; echo {name}-{i}")
            lines.append(f"    agent {name} got {r.stdout.strip()!r}")

    threads = [threading.Thread(target=agent, args=(n,)) for n in ("A", "B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("\n".join(sorted(lines)))
    show("the shared file, in execution order", s.run("cat agents.log | tr '\\n' ' '"))

    print("\n4. Every result is readable with plain redis-cli")
    keys = protocol.keys(session)
    if shutil.which("redis-cli"):
        u = urlsplit(url)
        conn = ["-h", u.hostname or "127.0.0.1", "-p", str(u.port or 6379), "--no-auth-warning"]
        conn += ["-a", u.password] if u.password else []
        cmd = ["redis-cli", *conn, "XREVRANGE", keys.res, "+", "-", "COUNT", "1"]
        print(f"  $ redis-cli -p {u.port} -a *** XREVRANGE '{keys.res}' + - COUNT 1")
        print(
            "    "
            + subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().replace("\n", "\n    ")
        )
    else:
        print(f"  (redis-cli is not installed; the same read through redis-py:) XREVRANGE '{keys.res}' + - COUNT 1")
        for eid, fields in s.client.redis.xrevrange(keys.res, count=1):  # type: ignore[union-attr]
            print(f"    {eid.decode()}")
            for k, v in fields.items():
                print(f"      {k.decode()} = {v[:80]!r}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1])
