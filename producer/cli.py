"""The `shellq` command.

    shellq up | down                           a private server in the background (the embedded default); `down`
                                               stops the live sessions first (history kept), `up` brings the
                                               server back on the same port with the same password and data
    shellq image build [--base IMAGE] [--tag T] [--stack]
                                               the worker image, built offline on any base with python3 >= 3.10
                                               (--stack: compose.yaml's image of redis and manager)
    shellq session start [--name S] [--backend local|docker] [--image I] [--memory 2g] [--cpus 1] [--pids 512]
                         [--disk SIZE] [--user U] [--read-only] [--mount HOST:CTR[:ro]] [--network N]
                         [--manager [HOST]] [--producer-url]
                                               a session and its worker; prints its name (and, with
                                               --producer-url, a Redis URL that reaches this session only)
    shellq session stop S [--keep] [--manager [HOST]]
                                               stop its worker and delete the session (keys, local directory):
                                               the name is free again; --keep keeps its history to resume it
    shellq session list                        name, backend, worker, state, queue depth, epoch, current command
                                               (or "no worker, N queued")
    shellq exec S [--timeout T] [--json | --follow] [-i] [-u USER] [--env K=V] [--cwd DIR] [--id ID] -- CMD
                                               run CMD; its stdout/stderr and exit status become shellq's
                                               (124 timeout, 130 cancelled, 125 when shellq could not run it
                                               and never will, 75 when it started, or may have been queued
                                               before Redis went, but its result never came);
                                               --follow prints its output as it comes; -i gives it this stdin;
                                               -u runs it as USER in a child of the shell; --id ID
                                               again returns that run's result instead of a rerun
    shellq cp SRC DST                          copy files or trees to or from a session (S:PATH, like docker cp;
                                               DST - prints a session file)
    shellq log S [--full] [--json] [--follow] [--since ID]
                                               the session's commands and results in order
    shellq replay SRC DST [--until ID] [--dry-run] [--skip-failed] [--to-url URL]
                                               run SRC's commands again in DST (ids derived from SRC's: a
                                               replay resumed runs each at most once); a table of original vs
                                               replayed, exit 1 at a difference
    shellq attach S [--read-only] [--timeout T] a prompt on S's shell for a person (readline, Ctrl-C interrupts,
                                               live output); --read-only follows its results
    shellq fork S NEW [--timeout T]            a new docker session from S's files (docker commit) and shell state
    shellq gc [--dry-run]                      remove this server's session containers whose worker is gone
    shellq manager [--queue HOST] [--mount-allow PATH]... [--network-allow NAME]...
                                               run shellq's RQ jobs (start, stop, gc of docker sessions) beside
                                               this Docker engine, and watch its session containers
    shellq info [--json]                       sessions, managers and their queues (an ops view)
    shellq worker                              serve one session (same as python -m worker)

Redis: SHELLQ_REDIS_URL, else the server of `shellq up`. Every failure is one `shellq: ...` line on stderr, exit
status 1 (125 for `exec`, 130 after Ctrl-C, which also interrupts the command `exec` waits for), never a traceback.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import sys
import uuid
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import redis

from producer import core, files, history
from producer.attach import add_attach_verb
from producer.cli_fast import exit_status
from producer.client import RUN_MARGIN, Client, ClientSettings, Session
from producer.result import Result
from worker import protocol
from worker.errors import RedisUnavailableError, ShellqError, WaitError

if TYPE_CHECKING:
    from containers.backend import Backend
    from containers.local import LocalBackend

EXIT_TIMEOUT, EXIT_SHELLQ, EXIT_CANCELLED = 124, 125, 130
EXIT_STARTED = 75
"""The command started but the wait ended before its result (its worker went away): it may have run, or still run."""


class CliError(ShellqError):
    """A user-facing error: printed as `shellq: message`, exit status 1 (125 for `exec`)."""


def main(argv: list[str] | None = None) -> int:
    from worker.resp import claim_std_fds

    claim_std_fds()  # a closed stdout must not become the Redis socket, which a command's output would then reach
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        from worker.__main__ import main as worker_main

        worker_args = argv[1:]
        return _guarded(lambda: worker_main(worker_args), failure=1)
    command: list[str] = []
    if "--" in argv:  # everything after `--` is the command, untouched
        argv, command = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    args = _parser().parse_args(argv)
    if "command" in args:
        args.command += command
    handler: Callable[[argparse.Namespace], int] = args.handler
    return _guarded(lambda: handler(args), failure=EXIT_SHELLQ if handler is cmd_exec else 1)


def _guarded(verb: Callable[[], int], failure: int) -> int:
    """Run a verb; whatever ends it early becomes one `shellq: ...` line on stderr and an exit status."""
    try:
        return verb()
    except KeyboardInterrupt:
        print("shellq: interrupted", file=sys.stderr)
        return EXIT_CANCELLED
    except Exception as e:
        print(f"shellq: {explain(e)}", file=sys.stderr)
        return failure


def explain(e: Exception) -> str:
    """One line that says what went wrong, for any error that ends a verb."""
    if isinstance(e, ShellqError | ValueError):  # ours, pydantic's and the codec's messages are written to be read
        return str(e)
    if isinstance(e, redis.AuthenticationError) or "WRONGPASS" in str(e) or "NOAUTH" in str(e):
        return f"Redis refused the credentials ({e}): the URL's password is not this server's"
    if isinstance(e, redis.exceptions.NoPermissionError):
        return f"this Redis user may not do that ({e}): a session's producer URL reaches only that session's commands"
    if isinstance(e, redis.ConnectionError | redis.TimeoutError):
        return f"cannot reach Redis: {e}"
    if isinstance(e, redis.RedisError):
        return f"Redis answered with an error: {e}"
    docker_errors = sys.modules.get("docker.errors")  # not imported: then it cannot be one of Docker's errors
    if docker_errors is not None and isinstance(e, docker_errors.DockerException):
        return f"Docker: {getattr(e, 'explanation', None) or e}"
    if isinstance(e, ModuleNotFoundError):
        return f"the Python package {e.name!r} is missing: reinstall shellq (it depends on it)"
    if isinstance(e, OSError):
        return f"{e.strerror or e}: {e.filename}" if e.filename else str(e.strerror or e)
    return f"unexpected {type(e).__name__}: {e} (a bug in shellq; please report it)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shellq", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    verbs = p.add_subparsers(required=True, metavar="VERB")
    up = verbs.add_parser("up", help="start the private server in the background")
    up.add_argument("--data-dir", help="where the server keeps its data (default: in the shellq state dir)")
    up.add_argument("--port", type=int, default=0)
    up.add_argument("--appendfsync", choices=["everysec", "always"], default="everysec")
    up.set_defaults(handler=cmd_up)
    verbs.add_parser("down", help="stop the private server").set_defaults(handler=cmd_down)
    verbs.add_parser("worker", help="serve one session (python -m worker)", add_help=False)

    session = verbs.add_parser("session", help="start, stop and list sessions").add_subparsers(
        required=True, metavar="ACTION"
    )
    start = session.add_parser("start", help="start a session and its worker")
    start.add_argument("--name", help="session id (default: a new one)")
    start.add_argument("--backend", choices=["local", "docker"], default="local")
    start.add_argument("--image", default="shellq-worker:latest", help="docker: the worker image")
    start.add_argument("--memory", default="2g", help="docker: memory limit")
    start.add_argument("--cpus", type=float, default=1.0, help="docker: CPU limit")
    start.add_argument("--pids", type=int, default=512, help="docker: process limit")
    start.add_argument("--disk", help="docker: what the shell may write, e.g. 10g (default: no limit)")
    start.add_argument("--user", default="shellq", help="docker: the shell's user in the image (root: weaker)")
    start.add_argument("--read-only", action="store_true", help="docker: read-only root; tmpfs home and /tmp")
    start.add_argument("--mount", action="append", default=[], metavar="HOST:CTR[:ro]", help="docker: bind mount")
    start.add_argument(
        "--network", help="docker: also join this network (default: none; Redis is reached through its socket)"
    )
    start.add_argument(
        "--manager",
        nargs="?",
        const="",
        metavar="HOST",
        help="docker: have the `shellq manager` of HOST (default: the only one running) start it",
    )
    start.add_argument(
        "--producer-url",
        action="store_true",
        help="also print a Redis URL that reaches this session only (its producer user), for an agent",
    )
    start.set_defaults(handler=cmd_session_start)
    stop = session.add_parser("stop", help="stop a session's worker")
    stop.add_argument("name")
    stop.add_argument("--keep", action="store_true", help="keep the session's streams (history) in Redis")
    stop.add_argument(
        "--manager", nargs="?", const="", metavar="HOST", help="docker: have the `shellq manager` of HOST stop it"
    )
    stop.set_defaults(handler=cmd_session_stop)
    session.add_parser("list", help="list sessions").set_defaults(handler=cmd_session_list)

    image = verbs.add_parser("image", help="worker images").add_subparsers(required=True, metavar="ACTION")
    build = image.add_parser("build", help="build the worker image (no network needed)")
    build.add_argument("--base", default="python:3.12-slim", help="base image with python3 >= 3.10")
    build.add_argument("--tag", help="default: shellq-worker:latest (shellq-stack:latest with --stack)")
    build.add_argument(
        "--stack", action="store_true", help="the image of compose.yaml's redis and manager (all of shellq, Valkey)"
    )
    build.set_defaults(handler=cmd_image_build)
    gc = verbs.add_parser("gc", help="remove this server's containers whose session or worker is gone")
    gc.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    gc.set_defaults(handler=cmd_gc)

    _add_ops_verbs(verbs)

    _add_exec_verbs(verbs)
    _add_history_verbs(verbs)
    add_attach_verb(verbs)
    return p


# -- Redis location ------------------------------------------------------------------------------------------------


def _add_exec_verbs(verbs: Any) -> None:
    """`shellq exec` and `shellq cp`."""
    ex = verbs.add_parser("exec", help="run a command in a session")
    ex.add_argument("name")
    ex.add_argument("--timeout", type=float, help="execution limit in seconds (default: the worker's)")
    ex.add_argument("--json", action="store_true", help="print the whole result as JSON")
    ex.add_argument("-f", "--follow", action="store_true", help="print the output as it comes (live output)")
    ex.add_argument("-i", "--interactive", action="store_true", help="give the command this process's stdin")
    ex.add_argument("-u", "--user", help="run it as this user (in a child of the shell; its state is untouched)")
    ex.add_argument("--env", action="append", default=[], metavar="K=V", help="export K=V first (repeatable)")
    ex.add_argument("--cwd", help="cd here first")
    ex.add_argument("--id", help="the command id: run again with the same id, it returns that run's result (no rerun)")
    ex.add_argument("command", nargs="*", help="the command (after --), joined with spaces")
    ex.set_defaults(handler=cmd_exec)
    cp = verbs.add_parser("cp", help="copy files or trees between here and a session (S:PATH names a session path)")
    cp.add_argument("source", help="S:PATH or a local path")
    cp.add_argument("destination", help="S:PATH, a local path, or - (a session file to stdout)")
    cp.add_argument("-u", "--user", help="read or write in the session as this user")
    cp.set_defaults(handler=cmd_cp)


def _add_history_verbs(verbs: Any) -> None:
    """`shellq log` and `shellq replay`."""
    log = verbs.add_parser("log", help="a session's commands and results, in order")
    log.add_argument("name")
    log.add_argument("--full", action="store_true", help="all of each command and of its output kept")
    log.add_argument("--json", action="store_true", help="one JSON object per command (output as text and base64)")
    log.add_argument("-f", "--follow", action="store_true", help="keep printing results as they come")
    log.add_argument("--since", metavar="ID", help="only what came after this command id or entry id")
    log.set_defaults(handler=cmd_log)
    rp = verbs.add_parser("replay", help="run a session's commands again, in order, in another session")
    rp.add_argument("source")
    rp.add_argument("destination")
    rp.add_argument("--until", metavar="ID", help="stop after this command id or entry id of the source")
    rp.add_argument("--dry-run", action="store_true", help="say what would be replayed, submit nothing")
    rp.add_argument("--skip-failed", action="store_true", help="leave out commands that did not exit 0")
    rp.add_argument("--to-url", metavar="URL", help="the destination's Redis, when it is another server")
    rp.set_defaults(handler=cmd_replay)
    fk = verbs.add_parser("fork", help="a new docker session from a session's files and shell state")
    fk.add_argument("source")
    fk.add_argument("new")
    fk.add_argument("--timeout", type=float, default=120.0, help="seconds the fork may take (default 120)")
    fk.set_defaults(handler=cmd_fork)


def _add_ops_verbs(verbs: Any) -> None:
    """`shellq manager` and `shellq info`."""
    manager = verbs.add_parser("manager", help="run shellq's jobs beside this Docker engine (RQ worker)")
    manager.add_argument("--queue", metavar="HOST", help="the Docker host's name (default: this machine's)")
    manager.add_argument(
        "--mount-allow", action="append", default=[], metavar="PATH", help="allow bind mounts under PATH"
    )
    manager.add_argument(
        "--network-allow", action="append", default=[], metavar="NAME", help="allow sessions on network NAME"
    )
    manager.add_argument("--gc-interval", type=int, default=60, help="seconds between two gc jobs")
    manager.set_defaults(handler=cmd_manager)
    info = verbs.add_parser("info", help="sessions, managers and their queues")
    info.add_argument("--json", action="store_true")
    info.set_defaults(handler=cmd_info)


def redis_url() -> str:
    """SHELLQ_REDIS_URL, else the URL `shellq up` recorded (said once on stderr)."""
    if url := os.environ.get("SHELLQ_REDIS_URL"):
        return url
    from containers import embedded

    info = embedded.recorded()
    if info is None:
        raise CliError("no Redis: set SHELLQ_REDIS_URL or run `shellq up`")
    print(f"shellq: using the server of `shellq up` (127.0.0.1:{info.port})", file=sys.stderr)
    return info.url


def _client(url: str | None = None) -> Client:
    return Client(settings=ClientSettings.from_env(redis_url=url or redis_url()))


def _say(line: str) -> None:
    print(f"shellq: {line}", file=sys.stderr)


# -- verbs -----------------------------------------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    from pathlib import Path

    from containers import embedded

    data = Path(args.data_dir) if args.data_dir else None
    info, started = embedded.up(data, port=args.port, appendfsync=args.appendfsync, say=_say)
    state = "started" if started else "already running"
    print(f"shellq: server {state}: {os.path.basename(info.binary)} on 127.0.0.1:{info.port} (pid {info.pid})")
    print(f"shellq: data in {info.data_dir} (AOF on); the other verbs find it; `shellq down` stops it")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    """Stop the live sessions (keeping their history), then the server; its port, password and data stay for `up`."""
    from containers import embedded

    info = embedded.recorded()
    if info is None:
        print("shellq: no server was running")
        return 0
    failed = _stop_live_sessions(info.url) if embedded.alive(info) else 0
    embedded.down()
    print("shellq: server stopped")
    print("shellq: `shellq up` brings it back on the same port, with the same password and data", file=sys.stderr)
    return 1 if failed else 0


def _stop_live_sessions(url: str) -> int:
    """Stop every session with a live worker, history kept (`session stop --keep`); returns how many failed."""
    from producer.admin import list_sessions

    failed = 0
    for row in list_sessions(_client(url)):
        if not row.worker_alive:
            continue
        try:
            _backend(row.backend, url).stop(row.name)
        except Exception as e:  # say it and go on: the server stops anyway, the worker reconnects after `up`
            print(f"shellq: could not stop session {row.name}: {explain(e)}", file=sys.stderr)
            failed += 1
            continue
        again = f"shellq session start --name {row.name}" + (" --backend docker" if row.backend == "docker" else "")
        print(f"shellq: stopped session {row.name} ({row.backend}), history kept: after `shellq up`, `{again}`")
    return failed


def cmd_session_start(args: argparse.Namespace) -> int:
    from containers.local import SessionStartError

    name = protocol.check_id(args.name or f"s-{uuid.uuid4().hex[:8]}", "session id")
    url = redis_url()
    if _client(url).session(name).worker_alive():
        raise CliError(f"session {name} already has a live worker (`shellq session stop {name}` stops it)")
    try:
        if args.manager is not None:
            where = _start_via_manager(name, url, args)
        elif args.backend == "docker":
            where = _start_docker(name, url, args)
        else:
            where = _start_local(name, url)
    except SessionStartError as e:
        if "session state lost" not in str(e):
            raise
        hint = f"if its history was deleted on purpose, `shellq session stop {name}` frees the name; then start it"
        raise CliError(f"{e}\nshellq: {hint}") from None
    print(name)
    if args.producer_url:
        from containers import access

        password = access.new_producer_password(_client(url).redis, name)
        print(access.url_for(url, access.producer_user(name), password))
    print(f"shellq: session {name}: {where}", file=sys.stderr)
    return 0


def _start_docker(name: str, url: str, args: argparse.Namespace) -> str:
    from containers.docker_backend import DockerBackend

    docker_backend = DockerBackend(url, image=args.image)
    options = {"memory": args.memory, "cpus": args.cpus, "pids": args.pids, "disk": args.disk, "user": args.user}
    handle = docker_backend.start(name, read_only=args.read_only, mounts=args.mount, network=args.network, **options)
    docker_backend.forget(name)  # the container outlives this command; `session stop` or `gc` removes it
    return f"container {handle[:12]} ({args.image})"


def _start_via_manager(name: str, url: str, args: argparse.Namespace) -> str:
    options = {"image": args.image, "memory": args.memory, "cpus": args.cpus, "pids": args.pids, "disk": args.disk}
    options |= {"user": args.user, "read_only": args.read_only, "mounts": args.mount, "network": args.network}
    client = _client(url)
    client.create_session(name, host=args.manager or None, **options)
    container: Any = client.redis.hget(protocol.keys(name).meta, "container") or b"?"
    return f"container {container.decode()[:12]} ({args.image}), started by a manager"


def _start_local(name: str, url: str) -> str:
    local = _local_backend(url)
    return f"local worker pid {local.start(name)}, log {local.log_path(name)}"


def _backend(kind: str, url: str) -> Backend:
    """The backend a session's meta names (`docker`; anything else: a worker on this machine)."""
    if kind == "docker":
        from containers.docker_backend import DockerBackend

        return DockerBackend(url)
    return _local_backend(url)


def _local_backend(url: str) -> LocalBackend:
    from containers import embedded
    from containers.local import LocalBackend

    home = embedded.state_dir()
    return LocalBackend(url, log_dir=home / "logs", work_root=home / "sessions")


def cmd_session_stop(args: argparse.Namespace) -> int:
    from producer.admin import delete_session

    name = protocol.check_id(args.name, "session id")
    url = redis_url()
    client = _client(url)
    k = protocol.keys(name)
    known = bool(client.redis.exists(k.meta, k.cmd, k.res))
    kind: Any = client.redis.hget(k.meta, "backend")
    if args.manager is not None:
        from containers import jobs

        was_running = jobs.stop_via_manager(client.redis, name, args.manager or None)
    else:
        was_running = _backend(kind.decode() if kind else "local", url).stop(name)
    what = "stopped its worker" if was_running else "no worker was running"
    if args.keep:
        if not (known or was_running):
            raise CliError(f"no session {name} (`shellq session list` shows them)")
        print(f"shellq: session {name}: {what}; streams kept (`shellq session start --name {name}` resumes it)")
        return 0
    deleted = delete_session(client, name)
    local = _local_backend(url).remove_state(name)
    if not (deleted or local or was_running):
        raise CliError(f"no session {name} (`shellq session list` shows them)")
    print(f"shellq: session {name}: {what}; {deleted} keys deleted; the name is free again")
    return 0


def cmd_image_build(args: argparse.Namespace) -> int:
    from containers import images

    tag = args.tag or (images.STACK_TAG if args.stack else images.DEFAULT_TAG)
    images.build(args.base, tag, say=_say, stack=args.stack)
    print(tag)
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from containers.docker_backend import DockerBackend

    removed = DockerBackend(redis_url()).gc(dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print(f"shellq: {verb} {len(removed)} containers" + (f" ({', '.join(removed)})" if removed else ""))
    return 0


def cmd_manager(args: argparse.Namespace) -> int:
    import logging

    from containers import manager

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return manager.run(
        redis_url(),
        args.queue,
        tuple(args.mount_allow),
        tuple(args.network_allow),
        gc_interval=args.gc_interval,
    )


def cmd_info(args: argparse.Namespace) -> int:
    from producer.admin import info

    report = info(_client())
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{'SESSION':<24}{'BACKEND':<9}{'WORKER':<8}{'STATE':<9}{'QUEUE':>6}  HEARTBEAT")
    for row in report["sessions"]:
        beat = "-" if row["heartbeat_age"] is None else f"{row['heartbeat_age']:.1f} s ago"
        queue = "?" if row["queue_depth"] is None else row["queue_depth"]
        alive = "alive" if row["worker_alive"] else "-"
        print(f"{_printable(row['name']):<24}{row['backend']:<9}{alive:<8}{row['state']:<9}{queue:>6}  {beat}")
    print()
    print(f"{'MANAGER (DOCKER HOST)':<24}{'MACHINE':<20}{'PID':>8}  {'QUEUED':>6} {'STARTED':>7} {'FAILED':>6}")
    for host, m in sorted(report["managers"].items()):
        print(
            f"{_printable(host):<24}{_printable(str(m['machine'])):<20}{m['pid']:>8}  {m['queued']:>6}"
            f" {m['started']:>7} {m['failed']:>6}"
        )
    if not report["managers"]:
        print("(no manager running)")
    return 0


def cmd_session_list(args: argparse.Namespace) -> int:
    from producer.admin import list_sessions

    rows = list_sessions(_client())
    print(f"{'SESSION':<24}{'BACKEND':<9}{'WORKER':<8}{'STATE':<9}{'QUEUE':>6}  {'EPOCH':>5}  CURRENT")
    for r in rows:
        depth = "?" if r.queue_depth is None else str(r.queue_depth)
        backend, state, note = (_printable(x) for x in (r.backend, r.state, r.note))
        print(f"{r.name:<24}{backend:<9}{r.worker:<8}{state:<9}{depth:>6}  {r.shell_epoch:>5}  {note}")
    return 0


def _printable(text: str) -> str:
    """`text` with control characters escaped: what Redis holds must not drive the terminal it is printed on."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def cmd_exec(args: argparse.Namespace) -> int:
    command = args.command
    if not command:
        raise CliError("nothing to run: shellq exec SESSION -- CMD")
    if args.follow and args.json:
        raise CliError("--follow prints the output as it comes; --json prints the result at the end: pick one")
    env = dict(_key_value(item) for item in args.env)
    stdin = sys.stdin.buffer.read() if args.interactive else None
    session = _client().session(args.name)
    cid = args.id or f"c-{secrets.token_hex(8)}"
    run = _follow if args.follow else Session.run
    options: dict[str, Any] = {"id": cid, "env": env or None, "cwd": args.cwd, "stdin": stdin, "user": args.user}
    try:
        r = run(session, " ".join(command), timeout=args.timeout, **options)
    except KeyboardInterrupt:  # Ctrl-C stops the command too, as in a terminal
        session.interrupt(cid)
        print(f"shellq: interrupted; command {cid} is being cancelled", file=sys.stderr)
        return EXIT_CANCELLED
    except WaitError as e:
        if e.cancelled:
            raise  # 125: it did not run and never will
        print(f"shellq: {e} (command {cid}; do not retry it blindly: it started)", file=sys.stderr)
        return EXIT_STARTED
    except RedisUnavailableError as e:
        if e.command_id is None and not args.id:  # nothing reached Redis (an --id, the fast path's too, may have)
            raise  # 125
        where = "" if e.command_id else f"; command {cid} may have been queued and may still run"
        print(f"shellq: {e}{where} (do not retry it blindly: `shellq log` tells)", file=sys.stderr)
        return EXIT_STARTED
    if args.json:
        print(json.dumps(_json_view(r)))
    elif not args.follow:
        os.write(1, r.stdout_bytes)
        os.write(2, r.stderr_bytes)
    return _exit_status(r)


def _follow(session: Session, command: str, timeout: float | None, **options: Any) -> Result:
    """`Session.run`, printing the command's output as it comes (`Session.stream`); a gap in it (bytes the live
    stream dropped, kept in the result's spool) is said on stderr."""
    cid = session.submit(command, timeout=timeout, **options)  # a RedisUnavailableError says if it may run
    limit = (timeout or session.client.settings.default_timeout) + RUN_MARGIN
    shown = {"stdout": 0, "stderr": 0}
    try:
        for chunk in session.stream(cid, timeout=limit, cancel=True):
            if chunk.offset > shown[chunk.stream]:
                skipped = chunk.offset - shown[chunk.stream]
                os.write(2, f"\nshellq: [{skipped} bytes of {chunk.stream} not shown: see the spool]\n".encode())
            os.write(1 if chunk.stream == "stdout" else 2, chunk.data)
            shown[chunk.stream] = chunk.offset + len(chunk.data)
        return session.result(cid)
    except RedisUnavailableError as e:
        raise core.may_run(e, cid) from None


def cmd_cp(args: argparse.Namespace) -> int:
    """`shellq cp S:PATH LOCAL`, `shellq cp LOCAL S:PATH`, `shellq cp S:PATH -`: files and directory trees, like
    `docker cp`. A local path with a colon in it is written `./a:b`. A destination that ends with `/`, or a local
    directory that exists, receives the source under its own name."""
    source, destination = _session_path(args.source), _session_path(args.destination)
    if (source is None) == (destination is None):
        raise CliError("name one session path (S:PATH) and one local path: shellq cp S:/repo/out ./out")
    client = _client()
    if source is not None:
        session, remote = client.session(source[0]), source[1]
        if args.destination == "-":
            files.drive(session, files.read_to(session, "read", remote, sys.stdout.buffer.write, args.user, None))
            return 0
        local = Path(args.destination)
        if local.is_dir() or args.destination.endswith("/"):
            local = local / PurePosixPath(remote.rstrip("/")).name
        session.download(remote, local, user=args.user)
        return 0
    assert destination is not None
    session, remote = client.session(destination[0]), destination[1]
    if remote.endswith("/"):
        remote += Path(args.source).resolve().name
    session.upload(args.source, remote, user=args.user)
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    session = _client().session(args.name)
    show = _record_json if args.json else (lambda record: _record_text(record, args.full))
    (tail,) = session.client.send(("XREVRANGE", session.keys.res, "+", "-", "COUNT", 1))
    after = tail[0][0].decode() if tail else "0-0"
    records = history.history(session, since=args.since)
    if not records and not args.follow and not session.client.redis.exists(session.keys.cmd):
        raise CliError(f"session {args.name} has no history (no command stream)")
    shown = set()
    for record in records:
        print(show(record), flush=True)
        if record.result is not None:
            shown.add(record.entry_id)
    while args.follow:
        results, after = history.wait_new_results(session, after)
        for result in results:
            if result.entry_id not in shown:
                record = history.Record(
                    result.entry_id, result.id, history.request_of(session, result.entry_id), result
                )
                print(show(record), flush=True)
    return 0


def _record_text(record: history.Record, full: bool) -> str:
    """A command's block in `shellq log`: its ids, time and submitter; the command; how it ended; its output."""
    req, res = record.request, record.result
    by = f" by {_printable(req.by)}" if req is not None and req.by else ""
    when = record.submitted.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    lines = [f"{_printable(record.command_id)}  ({record.entry_id})  {when}{by}"]
    command = req.cmd.decode(errors="replace") if full and req is not None and req.op == "exec" else None
    shown = command.splitlines() if command else [history.describe(req)]
    lines += [f"  $ {_printable(line)}" for line in shown]
    if res is None:
        lines.append("  (no result yet: queued or running)")
        return "\n".join(lines)
    facts = [res.status] + ([f"exit {res.exit_code}"] if res.exit_code is not None else [])
    facts += [f"{res.duration_ms / 1000:.3f} s", f"cwd {_printable(res.cwd or '?')}", f"epoch {res.shell_epoch}"]
    lines.append("  " + ", ".join(facts) + (f": {_printable(res.error)}" if res.error else ""))
    for mark, data, size in (("|", res.stdout, res.stdout_size), ("!", res.stderr, res.stderr_size)):
        out = data.decode(errors="replace").splitlines()
        if not full and len(out) > 5:
            out = [*out[:3], f"... {len(out) - 5} more lines (--full shows them)", *out[-2:]]
        lines += [f"  {mark} {_printable(line)}" for line in out]
        if size > len(data):
            lines.append(f"  {mark} [{size} bytes in all; the rest is in {_printable(res.spool_path or 'the spool')}]")
    return "\n".join(lines)


def _record_json(record: history.Record) -> str:
    req, res = record.request, record.result
    view: dict[str, Any] = {"entry_id": record.entry_id, "id": record.command_id}
    view["submitted_at"] = record.submitted.isoformat()
    if req is not None:
        view["request"] = req.model_dump(mode="json", exclude={"cmd", "stdin", "v"}) | {
            "cmd": req.cmd.decode(errors="replace"),
            "stdin_b64": base64.b64encode(req.stdin).decode() if req.stdin is not None else None,
        }
    else:
        view["problem"] = record.problem
    if res is not None:
        view["result"] = res.model_dump(mode="json", exclude={"stdout", "stderr", "v"}) | {
            "stdout": res.stdout.decode(errors="replace"),
            "stderr": res.stderr.decode(errors="replace"),
            "stdout_b64": base64.b64encode(res.stdout).decode(),
            "stderr_b64": base64.b64encode(res.stderr).decode(),
        }
    return json.dumps(view)


def cmd_replay(args: argparse.Namespace) -> int:
    """Exit status 0 when every replayed command ended as its original did, 1 when one did not (the first is
    named), 125 when the replay could not go on."""
    source = _client().session(args.source)
    destination = (_client(args.to_url) if args.to_url else source.client).session(args.destination)
    print(f"{'command':<22}{'what':<42}{'original':<16}{'replayed':<16}")

    def row_line(row: history.Row) -> None:
        res, rep = row.record.result, row.replayed
        original = f"{res.status} {'' if res.exit_code is None else res.exit_code}" if res else "-"
        replayed = f"{rep.status} {'' if rep.exit_code is None else rep.exit_code}" if rep else "-"
        if row.skipped:
            replayed = "skipped" if not args.dry_run or "never ran" in row.skipped else "would skip"
        elif args.dry_run:
            replayed = "would run"
        what = _printable(history.describe(row.record.request, 38))
        mark = "" if row.same else "  <- differs"
        print(f"{_printable(row.record.command_id)[:21]:<22}{what[:41]:<42}{original:<16}{replayed:<16}{mark}")
        if row.skipped and "never ran" not in row.skipped:
            print(f"{'':<22}({_printable(row.skipped)})")

    report = history.replay(
        source, destination, until=args.until, dry_run=args.dry_run, skip_failed=args.skip_failed, on_row=row_line
    )
    if report.rows and report.rows[-1].skipped and "stops here" in report.rows[-1].skipped:
        row_line(report.rows[-1])
    first = report.first_difference
    ran = sum(1 for row in report.rows if row.replayed is not None)
    if first is None:
        print(f"{ran} commands replayed into {args.destination}; each ended as its original did")
        return 0
    print(f"first difference: {first.record.command_id} ({first.record.entry_id}); {ran} commands replayed")
    return 1


def cmd_fork(args: argparse.Namespace) -> int:
    from containers import fork

    made = fork.fork(_client().session(args.source), args.new, timeout=args.timeout)
    print(made.session)
    _say(f"forked from {made.source} at {made.forked_at} (image {made.image})")
    return 0


def _session_path(text: str) -> tuple[str, str] | None:
    """(session, path) for `S:PATH`, None for a local path."""
    name, sep, path = text.partition(":")
    return (name, path) if sep and protocol.ID_PATTERN.match(name) and path else None


def _key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep:
        raise CliError(f"--env wants K=V, got {item!r}")
    return key, value


def _exit_status(r: Result) -> int:
    return exit_status(r.id, r.status, r.exit_code, r.error)


def _json_view(r: Result) -> dict[str, Any]:
    view = r.model_dump(exclude={"stdout_bytes", "stderr_bytes"})
    view["stdout_b64"] = base64.b64encode(r.stdout_bytes).decode()
    view["stderr_b64"] = base64.b64encode(r.stderr_bytes).decode()
    return view


if __name__ == "__main__":
    sys.exit(main())
