"""A command can reach its own session and nothing else (docs/design.md "Security", issue 14), over real servers.

- A probe (tests/security_probe.py) runs inside session A as A's command, by A's unprivileged shell user: it gathers
  every credential and Redis address it can find (environment, /proc/*/environ, cmdline and memory, the files named
  there, the places shellq keeps things) and tries each credential with every attack (B's streams, MONITOR, FLUSHALL,
  CONFIG SET, ACL SETUSER, FUNCTION LOAD REPLACE, SHUTDOWN...). Every attempt is refused, no password is found, B's
  state is untouched and B and A go on working, the library, users and config are as before, and the result A's
  producer gets is the worker's, not the one the probe tried to forge. Local backend (shell user `nobody`) and
  Docker backend (everything the container can find).
- The same attacks with a session's real worker and producer passwords (as if they leaked) reach that session's own
  keys only, and only what its role writes.
- Locally, another session's spooled output (its session directory) is out of a command's reach.
- Session users survive a Redis restart and are gone after `stop`; a producer user reaches its own session only; a
  worker whose password is refused, or that meets a changed library, exits with the configuration code and one
  line; so does a producer meeting a changed library, and `grant` (the admin) loads the real one back.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
import security_probe
from helpers import ROOT, RedisServer, server_binaries

from containers import access
from containers.local import LocalBackend
from producer import AccessDeniedError, Client, ClientSettings, ConfigError, Session
from worker import protocol
from worker.loop import EXIT_CONFIG
from worker.protocol import CommandRequest, CommandResult

pytestmark = [
    pytest.mark.timeout(90),
    # LocalBackend leaves its workers running in the background (as `shellq session start` does) and drops their
    # Popen objects; the fixture stops them at teardown
    pytest.mark.filterwarnings(r"ignore:subprocess \d+ is still running:ResourceWarning"),
]

SESSION_ENV = {"SHELLQ_HEARTBEAT": "0.2", "SHELLQ_LEASE_TTL": "5", "SHELLQ_KILL_GRACE": "0.3"}
"""A lease far longer than the heartbeat: B's state may change only by its heartbeat's timestamp while A attacks."""
REFUSALS = ("error: NOAUTH", "error: WRONGPASS", "error: NOPERM", "connection refused", "permission denied")
WRONGPASS = "error: WRONGPASS invalid username-password pair or user is disabled."
UNAUTHENTICATED = "error: ERR Protocol error: unauthenticated"
"""Redis's limit on a connection that has not authenticated (more than 10 arguments, or one over 16 KiB): refused
before it is read, and the connection closed."""
PROTECTED = "error: ERR DEBUG command not allowed"
"""DEBUG's own guard (enable-debug-command no): Redis answers it before it looks at who asks."""
PROBE_EXIT = 7
CHANGED_LIBRARY = protocol.FUNCTIONS + "\n-- changed: same name, same version, other code\n"


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("a shell user other than the worker's own (SHELLQ_SHELL_USER=nobody) needs a worker run as root")


def start_server(kind: str, workdir: Path, *extra: str) -> RedisServer:
    binaries = server_binaries()
    if kind not in binaries:
        if os.environ.get("CI"):
            pytest.fail(f"{kind} server binary not found; scripts/bootstrap installs it")
        pytest.skip(f"no {kind} server binary here")
    workdir.mkdir(parents=True, exist_ok=True)
    server = RedisServer(kind, binaries[kind], workdir)
    server.start(*extra)
    return server


@pytest.fixture(params=["redis", "valkey"])
def own_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisServer]:
    """A server of this test's own (it is restarted, or attacked with real passwords): redis 7.0 and Valkey 9."""
    server = start_server(request.param, tmp_path / request.param, "--appendonly", "yes", "--appendfsync", "always")
    yield server
    server.stop()


def client_for(url: str) -> Client:
    return Client(settings=ClientSettings(redis_url=url, no_worker_after=10))


# -- local sessions ------------------------------------------------------------------------------------------------


@dataclass
class LocalSessions:
    """Sessions of a LocalBackend whose directories (logs, credentials, session directories) lie in a directory
    everyone may enter, under /tmp/shellq-*: what protects them is their own modes, as on a real machine."""

    server: RedisServer
    base: Path
    backend: LocalBackend = field(init=False)
    started: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.backend = LocalBackend(self.server.url, self.base / "logs", self.base / "work", self.base / "credentials")

    def start(self, session: str, shell_user: str | None = None) -> Session:
        env = {**SESSION_ENV, **({"SHELLQ_SHELL_USER": shell_user} if shell_user else {})}
        self.backend.start(session, env=env)
        self.started.append(session)
        return client_for(self.server.url).session(session)

    def worker_password(self, session: str) -> str:
        return self.backend.password_file(session).read_text().strip()


@pytest.fixture
def local_sessions() -> Iterator[Callable[[RedisServer], LocalSessions]]:
    made: list[LocalSessions] = []

    def make(server: RedisServer) -> LocalSessions:
        base = Path(tempfile.mkdtemp(prefix="shellq-sectest-", dir="/tmp"))
        base.chmod(0o755)
        made.append(LocalSessions(server, base))
        return made[-1]

    yield make
    for sessions in made:
        for session in sessions.started:
            sessions.backend.stop(session)
        sessions.backend.redis.close()
        shutil.rmtree(sessions.base, ignore_errors=True)


# -- the probe -----------------------------------------------------------------------------------------------------


def probe_config(
    port: int, own: str, other: str, command_id: str, paths: list[str], unix: str | None = None
) -> dict[str, Any]:
    forged_command = CommandRequest(id="forged-by-probe", cmd=b"echo forged-by-probe")
    forged_result = CommandResult(id=command_id, entry_id="1-1", status="completed", exit_code=0, stdout=b"forged\n")

    def b64(fields: dict[str, bytes]) -> dict[str, str]:
        return {name: base64.b64encode(value).decode() for name, value in fields.items()}

    return {
        "targets": [["127.0.0.1", port]] + ([["unix", unix]] if unix else []),
        "own": own,
        "other": other,
        "command_id": command_id,
        "caller": protocol.CALLER,
        "paths": paths,
        "forged_command": b64(protocol.encode(forged_command)),
        "forged_result": b64(protocol.encode(forged_result)),
        "changed_library": CHANGED_LIBRARY,
    }


def probe_command(config: dict[str, Any]) -> str:
    """The probe as a command's text: python3 reading its source from a here-document, its configuration in argv."""
    source = (ROOT / "tests" / "security_probe.py").read_text()
    assert "\nSHELLQ_PROBE\n" not in source
    arg = base64.b64encode(json.dumps(config).encode()).decode()
    return f"python3 - {arg} <<'SHELLQ_PROBE'\n{source}SHELLQ_PROBE\n"


def refused(attack: str, reply: str) -> bool:
    return reply.startswith((*REFUSALS, UNAUTHENTICATED)) or (attack == "debug" and reply.startswith(PROTECTED))


def attempts(report: dict[str, Any]) -> list[tuple[str, tuple[str | None, str | None], str, str]]:
    """Every attempt of a probe's report as (target, (user, password), attack, reply); an AUTH is attack `auth`."""
    a = report if "rows" in report else report["attempts"]
    creds = [(u, p) for u, p in a["credentials"]]
    out = []
    for t, c, auth, replies in a["rows"]:
        target = a["targets"][t]
        if auth != -1:
            out.append((target, creds[c], "auth", a["replies"][auth]))
        out += [(target, creds[c], a["attacks"][i], a["replies"][r]) for i, r in enumerate(replies)]
    return out


def holes(report: dict[str, Any], allowed: Callable[[tuple[str | None, str | None], str], bool]) -> list[str]:
    """The attempts that were not refused (and are not `allowed`), as lines for an assertion message."""
    return [
        f"{target} user={user} password={(password or '')[:12]}... {attack}: {reply}"
        for target, (user, password), attack, reply in attempts(report)
        if not refused(attack, reply) and not allowed((user, password), attack)
    ]


@dataclass
class ServerState:
    """What the probe must leave alone: another session's keys, the users, the library, the config."""

    session: dict[bytes, Any]
    users: set[bytes | str]
    library: str | None
    config: dict[str, str]
    rq: list[bytes | str]

    @classmethod
    def read(cls, r: redis.Redis, session: str) -> ServerState:
        config: Any = r.config_get("appendonly")
        config.update(r.config_get("maxmemory-policy"))
        return cls(
            snapshot(r, session),
            set(r.acl_users()),
            protocol.loaded_functions(r.execute_command),
            config,
            sorted(r.keys("rq:*")),
        )


def snapshot(r: redis.Redis, session: str) -> dict[bytes, Any]:
    """Every key of the session, exactly: streams with their groups, hashes, strings. Left out: what its worker's
    heartbeat rewrites (meta `heartbeat_ms`; the lease's TTL, not its value)."""
    state: dict[bytes, Any] = {}
    for key in sorted(r.scan_iter(match=f"shellq:{{{session}}}:*", count=1000)):
        kind = r.type(key)
        if kind == b"stream":
            state[key] = (r.xrange(key), r.execute_command("XINFO", "GROUPS", key))  # type: ignore[no-untyped-call]
        elif kind == b"hash":
            fields: Any = r.hgetall(key)
            fields.pop(b"heartbeat_ms", None)
            state[key] = fields
        elif kind == b"string":
            state[key] = r.get(key)
        else:
            state[key] = (kind, r.dump(key))
    return state


@dataclass
class Attack:
    """A run of the probe in session A against session B on one server."""

    admin: redis.Redis
    port: int
    a: tuple[str, Session]
    b: tuple[str, Session]
    paths: list[str]
    passwords: dict[str, str]
    """Every real password (what it is -> the password): none of them may be found."""
    unix: str | None = None
    """The unix socket through which the session's worker reaches Redis (a docker session: its network is none)."""

    def run(self) -> dict[str, Any]:
        (a, sa), (b, sb) = self.a, self.b
        assert sb.run("echo b-has-a-history").exit_code == 0
        before = ServerState.read(self.admin, b)
        cid = f"probe-{secrets.token_hex(4)}"
        result = sa.run(probe_command(probe_config(self.port, a, b, cid, self.paths, self.unix)), timeout=60, id=cid)
        assert (result.status, result.exit_code) == ("completed", PROBE_EXIT), result.stderr[-3000:]
        report: dict[str, Any] = json.loads(result.stdout)

        found = report["found"]["candidates"]
        leaked = {what: found[p] for what, p in self.passwords.items() if p in found}
        assert not leaked, f"the probe found real passwords (what -> where): {leaked}"
        found_holes = holes(report, lambda cred, attack: False)
        assert not found_holes, "attacks that were not refused:\n" + "\n".join(found_holes[:50])

        self.admin.ping()  # SHUTDOWN was refused
        assert ServerState.read(self.admin, b) == before
        assert sb.run("echo b-alive").stdout == "b-alive\n"
        assert sa.run("echo a-alive").stdout == "a-alive\n"
        again = sa.result(cid, timeout=5)  # the worker's result, not the forged one (exit_code 0, "forged")
        assert (again.exit_code, again.stdout) == (PROBE_EXIT, result.stdout)
        res: Any = self.admin.xrange(protocol.keys(a).res)
        assert not [fields for _, fields in res if fields.get(b"stdout") == b"forged\n"]
        self.check_it_tried(report)
        return report

    def check_it_tried(self, report: dict[str, Any]) -> None:
        """The probe looked and attacked: a probe that finds and tries nothing would pass every check above."""
        searched, tcp = report["searched"], f"127.0.0.1:{self.port}"
        assert searched["proc_cmdline"]["readable"] >= 3, searched["proc_cmdline"]
        assert searched["proc_environ"]["tried"] >= 3 and searched["proc_environ"]["readable"] >= 1
        assert searched["proc_mem"]["tried"] >= 3
        assert searched["dirs"]["listed"] + searched["files"]["read"] >= 1
        names = report["attempts"]["attacks"]
        assert len(names) >= 30 and "shutdown" in names and "function-load-replace" in names
        if self.unix:  # no network in the container: the server's port is not there; its socket, maybe
            on_tcp = {reply for t, _, _, reply in attempts(report) if t == tcp}
            assert on_tcp == {"connection refused"}, on_tcp
        else:
            assert tcp in report["found"]["addresses"], sorted(report["found"]["addresses"])[:40]
        target = f"unix:{self.unix}" if self.unix else tcp
        bare = [(attack, reply) for t, cred, attack, reply in attempts(report) if t == target and cred == (None, None)]
        assert [attack for attack, _ in bare] == names
        if {reply for _, reply in bare} == {"permission denied"}:
            return  # the shell user may not even open the socket (its directory is the Redis server user's, 0700)
        answers = {"auth-backdoor": ("error: WRONGPASS",), "debug": ("error: NOAUTH", PROTECTED)}
        normal = ("error: NOAUTH", UNAUTHENTICATED)
        odd = [(attack, reply) for attack, reply in bare if not reply.startswith(answers.get(attack, normal))]
        assert not odd, odd
        users = {user for user, _ in report["attempts"]["credentials"]}
        assert {"default", access.worker_user(self.b[0]), access.producer_user(self.b[0])} <= users


def test_probe_in_a_local_session_reaches_nothing_beyond_it(
    redis_server: RedisServer, local_sessions: Callable[[RedisServer], LocalSessions]
) -> None:
    need_root()
    local = local_sessions(redis_server)
    a, b = f"sec-a-{secrets.token_hex(4)}", f"sec-b-{secrets.token_hex(4)}"
    sa, sb = local.start(a, shell_user="nobody"), local.start(b, shell_user="nobody")
    admin = redis_server.client()
    real = {"admin": redis_server.password or "", "worker of A": local.worker_password(a)}
    real["worker of B"] = local.worker_password(b)
    real["producer of A"] = access.new_producer_password(admin, a)
    real["producer of B"] = access.new_producer_password(admin, b)
    backend = local.backend
    paths = [str(p) for p in (backend.credentials_dir, backend.log_dir, backend.work_dir(a), backend.work_dir(b))]
    paths += [str(backend.password_file(a)), str(backend.password_file(b)), str(redis_server.workdir)]
    paths += [str(redis_server.aclfile)]

    report = Attack(admin, redis_server.port, (a, sa), (b, sb), paths, real).run()

    assert report["euid"] == pwd.getpwnam("nobody").pw_uid
    denied = report["searched"]["files"]["denied_paths"] + report["searched"]["dirs"]["denied_paths"]
    assert str(backend.credentials_dir) in denied
    assert {str(backend.password_file(a)), str(redis_server.aclfile)} <= set(denied)
    assert str(backend.log_dir) in denied  # the logs name every command: the backend's own (0700)


def test_local_session_cannot_read_another_sessions_spooled_output(
    redis_server: RedisServer, local_sessions: Callable[[RedisServer], LocalSessions]
) -> None:
    """Output past a session's cap is spooled in its session directory (result.spool_path): readable by its own
    shell user, not by another session's, even where the directories above are open to everyone. (Sessions that
    share one shell user share whatever that user can reach: README "Security".)"""
    need_root()
    local = local_sessions(redis_server)
    a, b = f"sec-a-{secrets.token_hex(4)}", f"sec-b-{secrets.token_hex(4)}"
    sa, sb = local.start(a, shell_user="nobody"), local.start(b, shell_user="65533")
    secret = f"b-secret-{secrets.token_hex(8)}"
    big = sb.run(f"echo {secret}; head -c 3000000 /dev/zero | tr '\\0' x; echo {secret}", timeout=30)
    assert big.exit_code == 0 and big.truncated and big.spool_path, big.error
    assert secret.encode() in b"".join(p.read_bytes() for p in Path(big.spool_path).iterdir())
    own = sb.run(f"grep -c {secret} {big.spool_path}/stdout")
    assert own.stdout == "2\n", own.stderr  # its own shell reads it: the agent can look at the whole output

    work = local.backend.work_dir(b)
    found = sa.run(f"cat {big.spool_path}/* 2>/dev/null | grep -c {secret}; grep -rl {secret} {work} 2>/dev/null")
    assert found.stdout == "0\n", f"A's command read B's spooled output ({big.spool_path}): {found.stdout[:500]}"


def test_leaked_session_passwords_reach_their_own_session_only(own_server: RedisServer) -> None:
    """The probe's attacks with A's real worker and producer passwords (as if a command had found them): refused
    (NOPERM) except A's own keys that the role writes: the worker commits A's results and journal, a producer
    writes A's journal (never its results)."""
    admin = own_server.client()
    a, b = f"sec-a-{secrets.token_hex(4)}", f"sec-b-{secrets.token_hex(4)}"
    creds, _ = access.grant(admin, a), access.grant(admin, b)
    before = ServerState.read(admin, b)
    config = probe_config(own_server.port, a, b, "c-leak", [])
    worker, producer = (creds.worker_user, creds.worker_password), (creds.producer_user, creds.producer_password)
    report = security_probe.attack([("127.0.0.1", own_server.port)], [worker, producer], config)
    own_writes = {
        worker: {"auth", "ping", "forge-own-result", "forge-own-journal"},
        producer: {"auth", "ping", "forge-own-journal"},
    }

    def allowed(cred: tuple[str | None, str | None], attack: str) -> bool:
        return attack in own_writes[(cred[0] or "", cred[1] or "")]

    found_holes = holes(report, allowed)
    assert not found_holes, "attacks that were not refused:\n" + "\n".join(found_holes)
    done = {(cred, attack): reply for _, cred, attack, reply in attempts(report)}
    for cred, names in own_writes.items():  # the passwords work, and the role's own writes succeed
        assert all(done[(cred, name)].startswith("ok: ") for name in names), (cred[0], done)
    assert done[(producer, "forge-own-result")].startswith("error: NOPERM")
    admin.ping()
    after = ServerState.read(admin, b)
    assert after == before
    assert protocol.loaded_functions(admin.execute_command) == protocol.FUNCTIONS


# -- session users: lifecycle, producers, refusals -----------------------------------------------------------------


def test_session_users_survive_a_redis_restart(
    own_server: RedisServer, local_sessions: Callable[[RedisServer], LocalSessions]
) -> None:
    local = local_sessions(own_server)
    a = f"sec-a-{secrets.token_hex(4)}"
    sa = local.start(a)
    admin = own_server.client()
    password = access.new_producer_password(admin, a)
    producer = client_for(access.url_for(own_server.url, access.producer_user(a), password)).session(a)
    assert sa.run("echo before").stdout == "before\n"
    pid = admin.hget(protocol.keys(a).meta, "pid")

    own_server.stop()  # SIGKILL; the AOF (fsync always) and the aclfile are all it comes back with
    own_server.start("--appendonly", "yes", "--appendfsync", "always")
    assert {access.worker_user(a), access.producer_user(a)} <= set(own_server.client().acl_users())
    after = producer.run("echo after", timeout=20)  # the worker reconnected with its password file
    assert (after.status, after.stdout) == ("completed", "after\n")
    assert own_server.client().hget(protocol.keys(a).meta, "pid") == pid  # the same worker, not a new one
    assert sa.run("echo admin-too").stdout == "admin-too\n"


def auth(server: RedisServer, user: str, password: str) -> tuple[str | None, list[str]]:
    """AUTH user password, then PING, on a new connection: both replies (redis-py would retry a refused AUTH)."""
    return security_probe.run_all(("127.0.0.1", server.port), (user, password), [["PING"]])


def test_stopped_session_users_are_gone(
    redis_server: RedisServer, local_sessions: Callable[[RedisServer], LocalSessions]
) -> None:
    local = local_sessions(redis_server)
    s = f"sec-s-{secrets.token_hex(4)}"
    local.start(s)
    admin = redis_server.client()
    worker_password = local.worker_password(s)
    producer_password = access.new_producer_password(admin, s)
    assert auth(redis_server, access.worker_user(s), worker_password) == ("ok: OK", ["ok: PONG"])

    assert local.backend.stop(s) is True
    local.started.remove(s)
    users = set(admin.acl_users())
    assert not {access.worker_user(s), access.producer_user(s)} & users
    assert s not in access.sessions_with_users(admin)
    assert not local.backend.password_file(s).exists()
    for user, password in [(access.worker_user(s), worker_password), (access.producer_user(s), producer_password)]:
        assert auth(redis_server, user, password) == (WRONGPASS, ["error: NOAUTH Authentication required."])


def test_producer_user_reaches_its_own_session_only(
    redis_server: RedisServer, local_sessions: Callable[[RedisServer], LocalSessions]
) -> None:
    local = local_sessions(redis_server)
    a, b = f"sec-a-{secrets.token_hex(4)}", f"sec-b-{secrets.token_hex(4)}"
    local.start(a)
    sb = local.start(b)
    admin = redis_server.client()
    assert sb.run("echo b-before").exit_code == 0
    b_before = snapshot(admin, b)
    url = access.url_for(redis_server.url, access.producer_user(a), access.new_producer_password(admin, a))
    mine = client_for(url)

    assert mine.session(a).run("echo mine").stdout == "mine\n"
    with pytest.raises(AccessDeniedError, match="refused this user"):
        mine.session(b).run("echo theirs")
    with pytest.raises(AccessDeniedError, match="refused this user"):
        mine.session(b).result("c-anything", timeout=1)
    with pytest.raises(AccessDeniedError, match="refused this user"):
        mine.session(b).interrupt("c-anything")
    forged = protocol.encode(CommandResult(id="c-x", entry_id="1-1", status="completed", exit_code=0))
    with pytest.raises(redis.exceptions.NoPermissionError):
        mine.redis.xadd(protocol.keys(a).res, forged)  # type: ignore[arg-type]
    with pytest.raises(redis.exceptions.NoPermissionError):
        replace_library(mine.redis)
    assert snapshot(admin, b) == b_before
    assert sb.run("echo b-after").stdout == "b-after\n"


def run_worker(server: RedisServer, session: str, password: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """`python -m worker` as a session's worker would run, its password in a file; waits for it to exit."""
    password_file = tmp_path / f"{session}.password"
    password_file.write_text(password + "\n")
    password_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHELLQ_")}
    env.update(
        SHELLQ_REDIS_URL=access.url_for(server.url, access.worker_user(session)),
        SHELLQ_REDIS_PASSWORD_FILE=str(password_file),
        SHELLQ_SESSION=session,
        SHELLQ_WORK_DIR=str(tmp_path / f"work-{session}"),
    )
    return subprocess.run(
        [sys.executable, "-m", "worker"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=30, check=False
    )


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == EXIT_CONFIG, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and " ERROR " in lines[0], done.stderr
    return lines[0]


def test_worker_whose_password_is_refused_exits_with_the_config_code(own_server: RedisServer, tmp_path: Path) -> None:
    s = f"sec-s-{secrets.token_hex(4)}"
    access.grant(own_server.client(), s)
    line = one_error_line(run_worker(own_server, s, "not-" + secrets.token_hex(16), tmp_path))
    assert "WRONGPASS" in line and "Redis refused the connection setup" in line


def replace_library(admin: redis.Redis) -> None:
    """What an admin's mistake, or an attacker holding the admin password, could do: FUNCTION LOAD REPLACE of the
    library `shellq` with other code under the same version number."""
    admin.execute_command("FUNCTION", "LOAD", "REPLACE", CHANGED_LIBRARY)  # type: ignore[no-untyped-call]


def test_replaced_library_is_refused_by_a_worker_until_the_admin_loads_it_again(
    own_server: RedisServer, tmp_path: Path
) -> None:
    admin = own_server.client()
    s = f"sec-s-{secrets.token_hex(4)}"
    creds = access.grant(admin, s)
    replace_library(admin)

    line = one_error_line(run_worker(own_server, s, creds.worker_password, tmp_path))
    assert "shellq's Redis functions are not this shellq's code (version" in line
    assert protocol.loaded_functions(admin.execute_command) == CHANGED_LIBRARY  # the worker could not replace it

    creds = access.grant(admin, s)  # the admin (`session start`) loads the real one back
    assert protocol.loaded_functions(admin.execute_command) == protocol.FUNCTIONS
    client_for(access.url_for(own_server.url, creds.producer_user, creds.producer_password)).ensure_functions()


def test_replaced_library_is_refused_by_a_producer_with_a_clear_error(own_server: RedisServer) -> None:
    admin = own_server.client()
    s = f"sec-s-{secrets.token_hex(4)}"
    creds = access.grant(admin, s)
    replace_library(admin)
    producer = client_for(access.url_for(own_server.url, creds.producer_user, creds.producer_password))

    with pytest.raises(ConfigError, match=r"shellq's Redis functions are not this shellq's code \(version \d+, sha256"):
        producer.session(s).run("true", timeout=5)
    assert protocol.loaded_functions(admin.execute_command) == CHANGED_LIBRARY
    assert admin.xlen(protocol.keys(s).cmd) == 0  # nothing was submitted


# -- docker ----------------------------------------------------------------------------------------------------------


@pytest.mark.docker
@pytest.mark.timeout(300)  # the image is built first (the module's fixture)
def test_probe_in_a_docker_session_reaches_nothing_beyond_it(image: str, tmp_path: Path) -> None:
    from containers.docker_backend import PASSWORD_FILE, SOCKET_DIR, DockerBackend

    server = start_server("redis", tmp_path / "redis", "--appendonly", "yes")
    a, b = f"sec-a-{secrets.token_hex(4)}", f"sec-b-{secrets.token_hex(4)}"
    try:
        with DockerBackend(server.url, image=image) as backend:
            containers = {s: backend.docker.containers.get(backend.start(s, env=SESSION_ENV)) for s in (a, b)}
            admin = server.client()
            real = {"admin": server.password or "", "producer of A": access.new_producer_password(admin, a)}
            real["producer of B"] = access.new_producer_password(admin, b)
            for s, container in containers.items():
                code, out = container.exec_run(["cat", PASSWORD_FILE])
                assert code == 0
                real[f"worker of {s}"] = out.decode().strip()
            paths = [PASSWORD_FILE, "/etc/shellq", "/var/lib/shellq", "/opt/shellq", "/home/shellq", "/root"]
            sa, sb = client_for(server.url).session(a), client_for(server.url).session(b)

            unix = f"{SOCKET_DIR}/{server.socket.name}"
            report = Attack(admin, server.port, (a, sa), (b, sb), paths, real, unix).run()

            assert report["euid"] == report["uid"] != 0  # the shell user `shellq`, not root
            denied = report["searched"]["files"]["denied_paths"] + report["searched"]["dirs"]["denied_paths"]
            assert {PASSWORD_FILE, "/etc/shellq"} <= set(denied)
    finally:
        server.stop()
