"""Fork (issue 19): a new docker session from another one's filesystem and shell state. NEW has S's files and shell
state but none of its processes; S and NEW then go their own ways; NEW's meta points back at S; NEW's snapshot
image goes with NEW (stop, gc); a fork that cannot be made says why and leaves nothing behind."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from docker.errors import NotFound
from helpers import RedisServer, server_binaries

from containers import access
from containers.docker_backend import FORK_LABEL, INSTANCE_LABEL, LABEL, PASSWORD_FILE, SNAPSHOTS, DockerBackend
from containers.fork import Fork, fork, fork_steps
from containers.local import LocalBackend
from producer import AsyncClient, Client, ClientSettings, Result, Session
from worker import protocol
from worker.errors import ConfigError, ShellqError

pytestmark = pytest.mark.docker
FAST = {"SHELLQ_HEARTBEAT": "0.2", "SHELLQ_LEASE_TTL": "1.5", "SHELLQ_KILL_GRACE": "0.3"}
STATE = (
    "set +o; shopt -p; umask; pwd; declare -px | grep -v ' HOSTNAME='; declare -F | grep -v __shellq_; "
    "declare -f $(compgen -A function | grep -v ^__shellq_); alias -p | grep -v __shellq_run; true"
)
"""What a shell's state looks like from inside, but for the driver's functions and alias (they name the shell's
own run directory), and HOSTNAME, which is each container's own: S and its fork must print the same."""


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer("redis", server_binaries()["redis"], tmp_path_factory.mktemp("fork-redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def backend(image: str, redis_server: RedisServer) -> Iterator[DockerBackend]:
    with DockerBackend(redis_server.url, image=image) as b:
        yield b


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[Client]:
    with Client(settings=ClientSettings(redis_url=redis_server.url, no_worker_after=5)) as c:
        yield c


def run(s: Session, cmd: str) -> Result:
    r = s.run(cmd, timeout=60)
    assert (r.status, r.exit_code, r.stderr) == ("completed", 0, ""), r
    return r


def snapshots(backend: DockerBackend, session: str) -> list[str]:
    """The snapshot image tags of a session on this engine."""
    tag = f"{SNAPSHOTS}:{backend.instance}-{session}"
    return [t for image in backend.docker.images.list(name=SNAPSHOTS) for t in image.tags if t == tag]


def password(backend: DockerBackend, container_id: str) -> bytes:
    stream, _ = backend.docker.containers.get(container_id).get_archive(PASSWORD_FILE)
    with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
        member = tar.extractfile("redis-password")
        assert member is not None
        return member.read()


def test_fork_has_the_files_and_shell_state_but_not_the_processes(
    backend: DockerBackend, client: Client, session_id: str
) -> None:
    source_container = backend.start(session_id, env=FAST)
    s = client.session(session_id)
    run(s, "echo home > ~/in-home; mkdir -p /tmp/work/sub; echo tmp > /tmp/work/in-tmp; cd /tmp/work/sub")
    run(s, "export A=1; f() { echo fn; }; alias hello='echo aliased'; set -o pipefail; shopt -s nullglob")
    run(s, "sleep 1000 & echo started")
    before = run(s, STATE).stdout
    length = client.redis.xlen(s.keys.cmd)

    made = fork(s, f"{session_id}-b", backend=backend)
    assert client.redis.xlen(s.keys.cmd) == length + 1  # S's history got the command that read its state
    new = client.session(made.session)
    assert made == Fork(made.session, session_id, made.forked_at, made.image, made.container)
    assert run(new, "cat ~/in-home /tmp/work/in-tmp").stdout == "home\ntmp\n"
    assert run(new, "pwd; echo $A; f; hello").stdout == "/tmp/work/sub\n1\nfn\naliased\n"
    assert run(new, STATE).stdout == before  # options, variables, functions, aliases, cwd, umask
    assert run(new, 'jobs; pgrep -x sleep || echo none; [ "$HOSTNAME" = "$(hostname)" ]').stdout == "none\n"
    assert run(s, "pgrep -x sleep >/dev/null && echo running").stdout == "running\n"  # nor stopped in S

    meta = client.redis.hgetall(new.keys.meta)
    assert meta[b"forked_from"] == session_id.encode()
    fork_entry = client.redis.xrange(s.keys.cmd, made.forked_at, made.forked_at)
    assert meta[b"forked_at"] == made.forked_at.encode() == fork_entry[0][0]
    first = client.redis.xrange(new.keys.cmd, count=1)
    assert first[0][1][b"id"] == fork_entry[0][1][b"id"]  # NEW began with the command that restored it
    assert password(backend, made.container) != password(backend, source_container)  # NEW has its own users
    probe = backend.docker.containers.create(made.image, labels={LABEL: "", INSTANCE_LABEL: backend.instance})
    try:
        with pytest.raises(NotFound):  # S's password was in a volume: the snapshot does not hold it
            probe.get_archive(PASSWORD_FILE)
    finally:
        probe.remove(force=True)

    run(new, "echo new > ~/in-home; export A=2; unset -f f; cd /; set +o pipefail")
    assert run(s, "cat ~/in-home; pwd; echo $A; f").stdout == "home\n/tmp/work/sub\n1\nfn\n"
    run(s, "echo source > /tmp/work/from-s; export B=1")
    assert run(new, "ls /tmp/work; echo B=$B").stdout == "in-tmp\nsub\nB=\n"

    assert snapshots(backend, made.session) == [made.image]
    assert backend.stop(made.session)
    assert snapshots(backend, made.session) == []  # the snapshot goes with its session
    assert run(s, "echo still here").stdout == "still here\n"


def test_fork_carries_a_large_and_odd_shell_state(
    backend: DockerBackend, client: Client, session_id: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Odd values and names (functions shadowing builtins, aliases of keywords), set -euT, a DEBUG trap and IFS=: in
    S break neither the copy nor S (its shell goes on: same epoch); a state over the 1 MiB output and entry caps goes
    through the spool and in chunks."""
    backend.start(session_id, env=FAST)
    s = client.session(session_id)
    run(s, "export Q=$'two\\nlines \"q\" $x `y` \\xff' SHELLOPTS; declare -rx R=ro; declare -ax ARR=(a 'b c')")
    run(s, "declare -Ax MAP=([k]=v ['x y']=z); declare -ix N=5; umask 027")
    run(s, "shopt -s extglob; g() { [[ $1 == @(a|b) ]] && echo match; }; export -f g; readonly -f g")
    run(s, "eval \"big() { : '$(head -c 1500000 /dev/zero | tr '\\0' x)'; }\"")
    run(s, "printf() { echo hostile; }; cd() { echo hostile; }; alias for=echo do=false while=false; set -euT")
    probe = "\\builtin echo \"${#Q} $R ${ARR[1]} ${MAP['x y']} $N\"; g b; type -t printf cd; alias for"
    state, expected = run(s, f"{{ {STATE}; }} | sha256sum").stdout, run(s, probe).stdout
    assert "ro b c z 5\nmatch\nfunction\nfunction\nalias for='echo'\n" in expected
    size = run(s, "declare -f big | wc -c").stdout
    epoch = run(s, "trap 'echo debug' DEBUG; IFS=:").shell_epoch

    made = fork(s, f"{session_id}-b", backend=backend)
    new = client.session(made.session)
    ids = [fields[b"id"].decode() for _, fields in client.redis.xrange(s.keys.cmd, made.forked_at)]
    assert ids[1:] == [f"{ids[0]}-spool"]  # the state was read from the spool (over the output cap)
    first = client.redis.xrange(new.keys.cmd, count=1)[0][1]
    assert (first[b"id"].decode(), int(first[b"cmd_size"]) > 1 << 20) == (ids[0], True)  # and sent in chunks
    assert "while it was forked" not in caplog.text  # its own commands do not count as someone else's
    assert run(new, f"{{ {STATE}; }} | sha256sum").stdout == state
    assert run(new, "declare -f big | wc -c").stdout == size
    assert run(new, probe).stdout == expected
    assert run(new, 'trap -p DEBUG; echo "[$IFS]"').stdout == "[ \t\n]\n"  # traps and unexported variables stay
    assert run(s, 'echo "[$IFS]"').shell_epoch == epoch


def test_fork_of_a_read_only_session_keeps_its_options_not_its_tmpfs(
    backend: DockerBackend, client: Client, session_id: str
) -> None:
    """tmpfs contents are not in a snapshot: a fork whose cwd was on one fails, and takes back what it made."""
    source_container = backend.start(session_id, env=FAST, read_only=True, memory="768m", cpus=0.5, pids=200)
    s = client.session(session_id)
    run(s, "echo x > /tmp/lost; mkdir /tmp/cwd; cd /tmp/cwd")
    new_name = f"{session_id}-b"
    with pytest.raises(ShellqError, match=r"(?s)could not be restored.*/tmp/cwd"):
        fork(s, new_name, backend=backend)
    assert not client.redis.exists(protocol.keys(new_name).meta)
    assert not backend._containers(new_name) and snapshots(backend, new_name) == []

    run(s, "cd ~")
    made = fork(s, new_name, backend=backend)
    new = client.session(made.session)
    assert (
        run(new, "pwd; ls /tmp; touch /etc/x 2>&1 || true").stdout
        == "/home/shellq\ntouch: cannot touch '/etc/x': Read-only file system\n"
    )
    limits = ("ReadonlyRootfs", "Memory", "MemorySwap", "NanoCpus", "PidsLimit", "NetworkMode", "CapAdd", "Tmpfs")
    source, forked = (backend.docker.containers.get(c).attrs["HostConfig"] for c in (source_container, made.container))
    assert {k: forked[k] for k in limits} == {k: source[k] for k in limits}
    assert (source["ReadonlyRootfs"], source["Memory"], source["PidsLimit"]) == (True, 768 << 20, 200)


def test_fork_of_a_fork_and_gc(backend: DockerBackend, client: Client, session_id: str) -> None:
    backend.start(session_id, env=FAST)
    s = client.session(session_id)
    run(s, "echo 1 > ~/gen")
    first = fork(s, f"{session_id}-1", backend=backend)
    run(client.session(first.session), "echo 2 >> ~/gen; export GEN=2")
    second = fork(client.session(first.session), f"{session_id}-2", backend=backend)
    backend.stop(first.session)  # its snapshot is the parent of the second's: untagged, kept while that one runs
    assert snapshots(backend, first.session) == []
    assert run(client.session(second.session), "cat ~/gen; echo $GEN").stdout == "1\n2\n2\n"

    backend.forget(second.session)
    container = backend.docker.containers.get(second.container)
    container.pause()  # its worker beats no more: a session gone without a `session stop`
    client.redis.delete(protocol.keys(second.session).meta)
    assert second.session in backend.gc()
    assert snapshots(backend, second.session) == []
    for made in (first, second):  # the first's untagged image went with its last child
        assert backend.docker.images.list(all=True, filters={"label": f"{FORK_LABEL}={made.session}"}) == []
    assert run(s, "cat ~/gen").stdout == "1\n"


def test_fork_errors_are_clear_and_leave_nothing(
    backend: DockerBackend, client: Client, redis_server: RedisServer, session_id: str, tmp_path: Path
) -> None:
    s = client.session(session_id)
    with pytest.raises(ConfigError, match=f"no session {session_id}"):
        fork(s, "x-new", backend=backend)
    local = LocalBackend(redis_server.url, tmp_path / "logs")
    local.start(session_id, env=FAST)
    try:
        with pytest.raises(ConfigError, match="local backend: only a docker session can be forked"):
            fork(s, f"{session_id}-b", backend=backend)
    finally:
        local.stop(session_id)
        client.redis.delete(s.keys.meta, s.keys.cmd)

    container_id = backend.start(session_id, env=FAST)
    other = f"{session_id}-other"
    backend.start(other, env=FAST)
    length = client.redis.xlen(s.keys.cmd)
    for taken in (session_id, other):
        with pytest.raises(ConfigError, match=f"session {taken} already exists"):
            fork(s, taken, backend=backend)
    with pytest.raises(ConfigError, match="session id"):
        fork(s, "bad:name", backend=backend)
    assert client.redis.xlen(s.keys.cmd) == length  # nothing ran in S
    assert client.redis.hget(protocol.keys(other).meta, "forked_from") is None

    backend.docker.containers.get(container_id).remove(force=True)
    with pytest.raises(ShellqError, match=f"the container of session {session_id} is gone"):
        fork(s, f"{session_id}-b", backend=backend)
    assert not client.redis.exists(protocol.keys(f"{session_id}-b").meta)


def test_fork_steps_drive_the_async_client_too(
    backend: DockerBackend, redis_server: RedisServer, session_id: str
) -> None:
    """What AsyncSession.fork runs: the same steps, awaited, the docker work in threads."""
    backend.start(session_id, env=FAST)

    async def scenario() -> tuple[Fork, str]:
        async with AsyncClient(redis_server.url) as client:
            s = client.session(session_id)
            await s.run("cd /tmp && export A=async")
            made = await s._drive(fork_steps(s, f"{session_id}-b", backend=backend))  # backend: this test's own
            return made, (await client.session(made.session).run("echo $PWD $A")).stdout

    made, out = asyncio.run(scenario())
    assert (made.source, out) == (session_id, "/tmp async\n")


def test_fork_needs_the_admin(backend: DockerBackend, redis_server: RedisServer, session_id: str) -> None:
    """A client with a session's producer URL may run commands there, not make sessions."""
    backend.start(session_id, env=FAST)
    password = access.new_producer_password(backend.redis, session_id)
    url = access.url_for(redis_server.url, access.producer_user(session_id), password)
    with Client(url) as producer, pytest.raises(ConfigError, match="admin"):
        fork(producer.session(session_id), f"{session_id}-b")


def test_shellq_fork_and_session_fork(backend: DockerBackend, client: Client, session_id: str) -> None:
    """The public ways in: `shellq fork S NEW` (prints NEW) and `Session.fork`; both leave S as it was."""
    backend.start(session_id, env=FAST)
    s = client.session(session_id)
    run(s, "cd /tmp && echo cli > made-by-cli && export WHO=cli")
    env = {**os.environ, "SHELLQ_REDIS_URL": client.settings.redis_url}
    done = subprocess.run(
        [str(Path(sys.executable).parent / "shellq"), "fork", session_id, f"{session_id}-c"],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    try:
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"{session_id}-c\n" and f"forked from {session_id}" in done.stderr
        assert run(client.session(f"{session_id}-c"), "cat made-by-cli; echo $WHO").stdout == "cli\ncli\n"
        child = s.fork(f"{session_id}-d")
        assert run(child, "pwd; echo $WHO").stdout == "/tmp\ncli\n"
        assert run(s, "pwd; echo $WHO").stdout == "/tmp\ncli\n"
    finally:
        for made in (f"{session_id}-c", f"{session_id}-d"):
            backend.stop(made)
