"""Fork a docker session: a new session NEW from S's filesystem and shell state (`Session.fork`, `shellq fork`).

What NEW gets, and how:

* S's files: `docker commit` of S's container, paused while the snapshot is taken (its commands wait: about a
  second per 200 MB written, bench/fork.py; then S goes on untouched), as the image `shellq-fork:<server id>-<NEW>`,
  labelled with this server's id and NEW. NEW's container runs it with the options S's container was made with
  (memory, CPUs, pids, disk, shell user, bind mounts, network, read-only root) and S's environment (the image keeps
  it), but its own session id, Redis users and password (`access.grant`; S's password lives in a volume, which no
  commit holds) and a fresh session directory (S's, with its marker, stays in the image, out of the shell's reach).
  The image goes when NEW stops (`session stop`, the backend's cleanup); `shellq gc` removes one no container uses.
* S's shell state: one command in S (id `fork-<nonce>`; it changes nothing there) prints what NEW's shell then runs
  as its first command (the same id): S's working directory, umask, `shopt` and `set -o` options, exported
  variables (`declare -p`; bash's read-only and dynamic ones, SHELLOPTS, EUID, RANDOM and the like, only keep their
  export), functions (with their export, read-only and trace attributes) and aliases.
* NEW's meta says where it came from: `forked_from` (S) and `forked_at` (the entry id of that command on S's
  command stream: NEW is S as it was after every command up to that entry).

What NEW does not get: S's processes (background jobs, servers: nothing runs in NEW that its own commands did not
start); unexported shell variables, traps, the directory stack, positional parameters; the contents of tmpfs mounts
and volumes, which are not in a container's layer (with a read-only root, or a disk limit on an engine without
layer quotas, the shell user's home, /tmp, /var/tmp and /run/lock are tmpfs: they start empty, and a fork whose
working directory was there fails). Bind mounts are mounted again: S and NEW share them. A command another client
queued on S may run between the state and the snapshot: its file changes may be in NEW, its shell changes are not
(a warning is logged). The fork's command in S waits behind S's running and queued commands, as any command does.
"""

from __future__ import annotations

import logging
import posixpath
import re
import secrets
import threading
from dataclasses import dataclass
from typing import Any

import redis
from docker.errors import APIError, NotFound

from containers.docker_backend import (
    FORK_LABEL,
    INSTANCE_LABEL,
    LABEL,
    SNAPSHOTS,
    SOCKET_DIR,
    WORKER_LABEL,
    DockerBackend,
)
from producer import core, files
from producer.admin import delete_session
from producer.client import Client
from producer.files import Local, SessionLike, Steps
from worker import protocol
from worker.errors import AccessDeniedError, ConfigError, ShellqError

log = logging.getLogger("shellq.containers")

FROM_LABEL = "shellq.forked-from"
"""On a snapshot image: the session it was taken of."""

CAPTURE = r"""\builtin shopt -u expand_aliases
(
builtin trap - DEBUG ERR RETURN
M=@MARK@
builtin printf '%s set\n' "$M"
builtin set +o
builtin printf '%s shopt\n' "$M"
builtin shopt -p
builtin set +eEuvxfT +o posix +o pipefail
IFS=$' \t\n'
builtin printf '%s cwd\n%s\n' "$M" "${PWD-}"
builtin printf '%s umask\n' "$M"
builtin umask
builtin printf '%s variables\n' "$M"
builtin declare -px | while builtin read -r w a n; do
  [[ $w == declare && $n =~ ^[A-Za-z_][A-Za-z0-9_]*$ && ! -v $n ]] || continue
  builtin printf '\\builtin unset -v %s; \\builtin export %s\n' "$n" "$n"
done
for n in $(builtin compgen -e); do
  case $n in
    __shellq_* | _) ;;
    BASHOPTS | SHELLOPTS | EUID | PPID | UID | BASH* | FUNCNAME | GROUPS | DIRSTACK | PIPESTATUS | LINENO | \
    RANDOM | SRANDOM | SECONDS | EPOCHSECONDS | EPOCHREALTIME | HISTCMD | COMP_* | HOSTNAME)
      builtin printf '\\builtin export %s\n' "$n" ;;
    *) builtin declare -p -- "$n" ;;
  esac
done
builtin printf '%s functions\n' "$M"
builtin declare -F | while builtin read -r _ a n; do
  case $n in __shellq_*) continue ;; esac
  builtin declare -f -- "$n"
  [[ $a == -f ]] || builtin printf '\\builtin declare %s -- %q\n' "$a" "$n"
done
builtin printf '%s aliases\n' "$M"
for n in "${!BASH_ALIASES[@]}"; do
  [[ $n == __shellq_run ]] || { builtin printf '\\builtin '; builtin alias -- "$n"; }
done
builtin printf '%s end\n' "$M"
)
"""
"""Run in S's shell: prints its state in sections, each after a line `MARK NAME`. Its first line turns alias
expansion off for the lines after it (S's aliases must not rewrite them; the driver turns it on again before the
next command); the rest runs in a subshell, so that nothing of S changes (not its options, not a variable). The
options are printed first, before the subshell sets its own. Names of bash's read-only and dynamic variables
(`declare -p` of them would fail, or copy a meaningless value) and the driver's own `__shellq_*` are left out;
variables exported but never set (OLDPWD before a first `cd`) are unset again after the restore's `cd`."""
SHOPT_FIXED = frozenset({b"expand_aliases", b"login_shell", b"restricted_shell"})
"""`shopt` options a script cannot set (or the driver sets before each command): not copied."""


@dataclass(frozen=True)
class Fork:
    """A session made by `fork`."""

    session: str
    source: str
    forked_at: str
    """The entry id, on the source's command stream, of the command that read its shell state."""
    image: str
    """The snapshot image the session's container runs: `shellq-fork:<server id>-<session>`."""
    container: str


def fork(
    source: SessionLike,
    new: str,
    *,
    backend: DockerBackend | None = None,
    timeout: float = 120.0,
    start_timeout: float = 60.0,
) -> Fork:
    """`fork_steps` on the sync client (`Session`)."""
    return files.drive(source, fork_steps(source, new, backend=backend, timeout=timeout, start_timeout=start_timeout))


def fork_steps(
    source: SessionLike,
    new: str,
    *,
    backend: DockerBackend | None = None,
    timeout: float = 120.0,
    start_timeout: float = 60.0,
) -> Steps[Fork]:
    """Fork the docker session `source` into a new session `new` (module docstring: what it gets, what not), as
    steps for either client; returns once NEW's shell has S's state. The docker work runs in `Local` steps.

    backend: the DockerBackend that starts NEW and owns it (it stops NEW when it closes); None: one for the client's
    URL, which leaves NEW running (`session stop` or `gc` removes it), as `shellq session start` does. timeout:
    the execution limit of the two commands (reading S's state, restoring it in NEW). Raises ConfigError (no
    session S, S not a docker session of this server, NEW exists, a client without the admin's rights),
    ShellqError (S's container gone or not running, the snapshot or the restore failed: NEW is then removed again),
    SessionStartError, and what `run` raises (NoWorkerError when nobody serves S)."""
    protocol.check_id(new, "session id")
    url = source.client.settings.redis_url
    owner: DockerBackend = backend or (yield Local(lambda: _backend_for(url)))
    parent = yield Local(lambda: _claim(owner, source.id, new))
    try:
        nonce = secrets.token_hex(8)
        script, entry = yield from _capture(source, nonce, timeout)
        image = yield Local(lambda: _snapshot(owner, parent, source.id, new, entry, nonce))
        options = start_options(parent.attrs)
        container = yield Local(lambda: _start(owner, new, image, options, start_timeout, keep=backend is None))
        yield Local(lambda: owner.redis.hset(protocol.keys(new).meta, mapping={"forked_at": entry}))
        yield from _restore(source.client.session(new), script, nonce, timeout)
    except Exception:
        yield Local(lambda: _undo(owner, new))
        raise
    return Fork(new, source.id, entry, image, container)


def restore_script(captured: bytes, mark: bytes) -> bytes:
    """The script NEW's shell runs, from CAPTURE's output: cwd, umask, shopt (before the functions: `extglob` decides
    how their bodies parse), variables (while `declare` is still the builtin), functions, aliases (after the
    functions, which hold their bodies' aliases expanded already), and `set -o` last (errexit, nounset, posix)."""
    parts = re.split(rb"(?m)^" + re.escape(mark) + rb" (\w+)\n", captured)
    sections = dict(zip(parts[1::2], parts[2::2], strict=True))
    if b"end" not in sections:
        raise ShellqError("the shell state came back incomplete (its output was cut)")
    lines = []
    if cwd := sections.get(b"cwd", b"").removesuffix(b"\n"):
        lines.append(b"\\builtin cd -- " + _quote(cwd))
    umask = sections.get(b"umask", b"").strip()
    if not re.fullmatch(rb"[0-7]{3,4}", umask):
        raise ShellqError(f"the shell state came back garbled (umask {umask[:20]!r})")
    lines.append(b"\\builtin umask " + umask)
    shopt: dict[bytes, list[bytes]] = {b"-s": [], b"-u": []}
    for words in map(bytes.split, sections.get(b"shopt", b"").splitlines()):
        if len(words) == 3 and words[0] == b"shopt" and words[1] in shopt and words[2] not in SHOPT_FIXED:
            shopt[words[1]].append(words[2])
    lines += [b"\\builtin shopt " + flag + b" " + b" ".join(names) for flag, names in shopt.items() if names]
    lines += [sections.get(name, b"") for name in (b"variables", b"functions", b"aliases")]
    options = [b" ".join(line.split()[1:3]) for line in sections.get(b"set", b"").splitlines() if line[:4] == b"set "]
    lines.append(b"\\builtin set " + b" ".join(options) if options else b"")
    return b"\n".join(line.removesuffix(b"\n") for line in lines if line) + b"\n"


def start_options(attrs: dict[str, Any]) -> dict[str, Any]:
    """The options of DockerBackend.start that made a session container, read back from it (`docker inspect`), for
    a container like it: memory, cpus, pids, disk, user, read_only, mounts (the binds asked for), network, and a
    session directory of its own (`env`: SHELLQ_WORK_DIR beside the old one, whose marker names another session)."""
    host, config = attrs["HostConfig"], attrs["Config"]
    env = dict(item.partition("=")[::2] for item in config.get("Env") or [])
    tmp = (host.get("Tmpfs") or {}).get("/tmp", "")
    sized = [o.removeprefix("size=") for o in tmp.split(",") if o.startswith("size=")]
    binds = [m for m in host.get("Mounts") or [] if m.get("Type") == "bind" and m.get("Target") != SOCKET_DIR]
    work_dir = env.get("SHELLQ_WORK_DIR", "/var/lib/shellq/session").rstrip("/")
    return {
        "memory": _size(int(host["Memory"])),
        "cpus": int(host["NanoCpus"]) / 1e9,
        "pids": int(host["PidsLimit"]),
        "disk": (host.get("StorageOpt") or {}).get("size") or (sized[0] if sized else None),
        "user": env.get("SHELLQ_SHELL_USER", "root"),
        "read_only": bool(host.get("ReadonlyRootfs")),
        "mounts": [f"{m['Source']}:{m['Target']}" + (":ro" if m.get("ReadOnly") else "") for m in binds],
        "network": None if host.get("NetworkMode") in (None, "", "none") else host["NetworkMode"],
        "env": {"SHELLQ_WORK_DIR": f"{posixpath.dirname(work_dir)}/session-{secrets.token_hex(4)}"},
    }


# -- the steps ---------------------------------------------------------------------------------------------------

_backends: dict[str, DockerBackend] = {}
_backends_lock = threading.Lock()


def _backend_for(url: str) -> DockerBackend:
    """One DockerBackend per admin URL in this process (each watches Docker's events in a thread of its own)."""
    with _backends_lock:
        if url not in _backends:
            _backends[url] = DockerBackend(url)
        return _backends[url]


def _claim(backend: DockerBackend, source: str, new: str) -> Any:
    """Check that `source` is a docker session of this server whose container runs, and that `new` is a free name,
    then claim it (HSETNX of its meta's `forked_from`: of two forks into one name, one wins); returns the source's
    container."""
    try:
        with core.redis_errors(backend.redis_url):
            container = _source_container(backend, source)
            keys, r = protocol.keys(new), backend.redis
            taken = new == source or r.exists(keys.cmd) or backend._containers(new)
            if taken or not r.hsetnx(keys.meta, "forked_from", source):
                raise ConfigError(f"session {new} already exists: fork into a new name")
    except AccessDeniedError as e:
        raise ConfigError(f"a fork needs the admin's Redis URL (it makes a session and its users): {e}") from None
    return container


def _source_container(backend: DockerBackend, source: str) -> Any:
    """The running container of the docker session `source`, which must be this server's (meta `container`)."""
    raw: Any = backend.redis.hgetall(protocol.keys(source).meta)
    meta = {k.decode(): v.decode(errors="replace") for k, v in raw.items()}
    if not meta:
        raise ConfigError(f"no session {source} (`shellq session list` shows them)")
    if meta.get("backend") != "docker":
        kind = meta.get("backend", "local")
        raise ConfigError(f"session {source} runs on the {kind} backend: only a docker session can be forked")
    try:
        container = backend.docker.containers.get(meta.get("container") or "-")
    except NotFound:
        raise ShellqError(f"the container of session {source} is gone: there is nothing to fork") from None
    instance = backend.instance
    if container.labels.get(INSTANCE_LABEL) != instance or container.labels.get(LABEL) != source:
        raise ConfigError(f"the container of session {source} is not this shellq server's ({instance})")
    if container.status != "running":
        raise ShellqError(f"the container of session {source} is {container.status}: a fork needs it running")
    return container


def _capture(source: SessionLike, nonce: str, timeout: float) -> Steps[tuple[bytes, str]]:
    """Run CAPTURE in the source's shell; -> (the restore script, that command's entry id)."""
    mark = f"#shellq-fork-{nonce}"
    req = core.request(CAPTURE.replace("@MARK@", mark), f"fork-{nonce}", timeout, False, None, None)
    result = yield from files.call(source, req, timeout=timeout)
    if result.status != "completed" or result.exit_code != 0:
        why = result.error or result.stderr[-2000:].decode(errors="replace") or f"exit code {result.exit_code}"
        raise ShellqError(f"could not read the shell state of session {source.id}: {result.status}: {why}")
    captured = result.stdout
    if result.truncated and result.spool_path:  # over the output cap: the whole of it is in the spool
        parts: list[bytes] = []
        spooled = f"{result.spool_path}/stdout"
        yield from files.read_to(source, "read", spooled, parts.append, None, timeout, id=f"fork-{nonce}-spool")
        captured = b"".join(parts)
    return restore_script(captured, mark.encode()), result.entry_id


def _snapshot(backend: DockerBackend, container: Any, source: str, new: str, entry: str, nonce: str) -> str:
    """Commit the source's container (paused meanwhile) as NEW's snapshot image; returns its name."""
    backend._remove_snapshots(backend._snapshots(new))  # a fork that died half way left it: nobody uses it
    tag = f"{backend.instance}-{new}"
    labels = {LABEL: "", WORKER_LABEL: "", INSTANCE_LABEL: backend.instance, FORK_LABEL: new, FROM_LABEL: source}
    try:
        container.commit(repository=SNAPSHOTS, tag=tag, pause=True, conf={"Labels": labels})
    except NotFound:
        raise ShellqError(f"the container of session {source} went away while it was forked") from None
    except APIError as e:
        raise ShellqError(f"could not snapshot the container of session {source}: {e.explanation or e}") from None
    _check_quiet(backend.redis, source, entry, nonce)
    return f"{SNAPSHOTS}:{tag}"


def _check_quiet(r: redis.Redis, source: str, entry: str, nonce: str) -> None:
    """Warn when the source's worker took a command of someone else's after `entry` (the fork's own have ids
    `fork-<nonce>...`) before the snapshot was done: XINFO GROUPS, XRANGE."""
    keys = protocol.keys(source)
    groups: Any = r.xinfo_groups(keys.cmd)
    last = next((g["last-delivered-id"] for g in groups if g["name"] in (protocol.GROUP, protocol.GROUP.encode())), b"")
    last = last.decode() if isinstance(last, bytes) else str(last)
    if not last or not _after(last, entry):
        return
    taken: Any = r.xrange(keys.cmd, f"({entry}", last)
    others = [eid for eid, fields in taken if not fields.get(b"id", b"").startswith(f"fork-{nonce}".encode())]
    if others:
        log.warning(
            "session %s took %d command(s) while it was forked at %s: their file changes may be in the fork",
            source,
            len(others),
            entry,
        )


def _after(a: str, b: str) -> bool:
    """Stream entry id `a` comes after `b`."""
    return tuple(map(int, a.split("-"))) > tuple(map(int, b.split("-")))


def _start(
    backend: DockerBackend, new: str, image: str, options: dict[str, Any], start_timeout: float, keep: bool
) -> str:
    """Start NEW's container from the snapshot; `keep`: leave it running after this process (a backend of ours)."""
    container = backend.start(new, image=image, start_timeout=start_timeout, **options)
    if keep:
        backend.forget(new)
    return container


def _restore(target: SessionLike, script: bytes, nonce: str, timeout: float) -> Steps[None]:
    """Run the restore script as NEW's first command (in chunks when it is over the entry cap); anything it says on
    stderr is a failure."""
    req = core.request(script, f"fork-{nonce}", timeout, False, None, None)
    result = yield from files.run_with_input(target, req, None, timeout)
    if result.status != "completed" or result.exit_code != 0 or result.stderr:
        why = result.error or result.stderr[-2000:].decode(errors="replace") or f"exit code {result.exit_code}"
        raise ShellqError(f"the shell state could not be restored in session {target.id}: {result.status}: {why}")


def _undo(backend: DockerBackend, new: str) -> None:
    """Take back a fork that failed half way: NEW's container, users, snapshot image and keys."""
    try:
        backend.stop(new, timeout=2)
        with Client(backend.redis_url) as client:
            delete_session(client, new)
    except Exception:  # the fork's own error is the one to raise
        log.exception("could not remove what the failed fork %s made (`shellq gc` will)", new)


def _quote(text: bytes) -> bytes:
    """`text` in single quotes, for bash."""
    return b"'" + text.replace(b"'", b"'\\''") + b"'"


def _size(n: int) -> str:
    """Bytes as Docker's size string: 2147483648 -> "2g"."""
    for unit, scale in (("g", 1 << 30), ("m", 1 << 20), ("k", 1 << 10)):
        if n and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)
