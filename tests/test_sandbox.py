"""A docker session is a sandbox (issue 15, docs: README "Containers"): its network reaches Redis and nothing else,
its limits hold (memory with swap, pids, CPU, disk), its root can be read-only, its shell user is configurable, and
its containers belong to one shellq server: another server's stop and gc leave them alone. Every probe targets only
listeners this test starts on this machine (loopback, the Docker bridge's gateway)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import RedisServer, server_binaries, wait_for

from containers.docker_backend import INSTANCE_LABEL, LABEL, SOCKET_DIR, DockerBackend, server_id
from producer import Client, ClientSettings, Session
from worker import protocol
from worker.errors import ConfigError

pytestmark = pytest.mark.docker
SHELLQ = Path(sys.executable).parent / "shellq"
FAST = {"SHELLQ_HEARTBEAT": "0.2", "SHELLQ_LEASE_TTL": "1.5", "SHELLQ_KILL_GRACE": "0.3"}


def _server(path: Path, *args: str, unix: bool = True) -> RedisServer:
    path.mkdir(exist_ok=True)
    server = RedisServer("redis", server_binaries()["redis"], path, unix=unix)
    server.start(*args)
    return server


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = _server(tmp_path_factory.mktemp("sandbox-redis"))
    yield server
    server.stop()


@pytest.fixture
def backend(image: str, redis_server: RedisServer) -> Iterator[DockerBackend]:
    with DockerBackend(redis_server.url, image=image) as b:
        yield b


def session(url: str, name: str) -> Session:
    return Client(settings=ClientSettings(redis_url=url, no_worker_after=5)).session(name)


class Listener:
    """A TCP listener of this test's own on (host, a free port), counting the connections it accepts."""

    def __init__(self, host: str) -> None:
        self.sock = socket.create_server((host, 0))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


CONNECT = """python3 - <<'EOF'
import json, socket, sys
out = {}
for host, port in json.loads(sys.argv[1] if len(sys.argv) > 1 else '''TARGETS'''):
    try:
        socket.create_connection((host, port), timeout=3).close()
        out[f"{host}:{port}"] = "connected"
    except OSError as e:
        out[f"{host}:{port}"] = type(e).__name__ + ": " + (e.strerror or str(e))
print(json.dumps(out))
EOF"""


def test_network_reaches_redis_and_nothing_else(backend: DockerBackend, redis_server: RedisServer, session_id: str):
    """By default the container has no network (only its own loopback) and reaches Redis through the unix socket:
    the host's loopback listeners, the bridge's gateway and a listener on all of the host's addresses are out of
    reach, a listener opened inside cannot be reached from the host, and raw sockets are refused."""
    gateway = backend.docker.networks.get("bridge").attrs["IPAM"]["Config"][0]["Gateway"]
    listeners = [Listener("127.0.0.1"), Listener(gateway), Listener("0.0.0.0")]
    try:
        container_id = backend.start(session_id, env=FAST)
        s = session(redis_server.url, session_id)
        targets = [["127.0.0.1", listeners[0].port], [gateway, listeners[1].port]]
        targets += [[gateway, listeners[2].port], ["127.0.0.1", listeners[2].port]]
        targets += [["127.0.0.1", redis_server.port], [gateway, redis_server.port]]
        r = s.run(CONNECT.replace("TARGETS", json.dumps(targets)), timeout=60)
        answers = json.loads(r.stdout)
        assert len(answers) == len(targets) and "connected" not in answers.values(), answers
        assert all(
            a.startswith(("ConnectionRefusedError", "OSError: Network is unreachable")) for a in answers.values()
        )
        assert [x.accepted for x in listeners] == [0, 0, 0]
        interfaces = s.run("tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '").stdout.split()
        assert interfaces == ["lo"]  # nothing to route through: no eth0, no gateway
        mounts = s.run(f"grep -c ' {SOCKET_DIR} ' /proc/self/mountinfo; ls {SOCKET_DIR} 2>&1").stdout
        assert mounts.startswith("1\n") and "Permission denied" in mounts  # the socket's directory: not the shell's
        inside = s.run(
            'python3 -c \'import socket,time; s=socket.create_server(("0.0.0.0", 0)); print(s.getsockname()[1],'
            " flush=True); time.sleep(30)' & sleep 1; kill %1 2>/dev/null; true"
        )
        port = int(inside.stdout.split()[0])
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=3).close()
        attrs = backend.docker.containers.get(container_id).attrs
        assert attrs["HostConfig"]["NetworkMode"] == "none"
        assert not any(n.get("IPAddress") for n in attrs["NetworkSettings"]["Networks"].values())
        raw = s.run("python3 -c 'import socket; socket.socket(socket.AF_PACKET, socket.SOCK_RAW)'")
        assert raw.exit_code != 0 and "Operation not permitted" in raw.stderr
    finally:
        for x in listeners:
            x.close()
        backend.stop(session_id)


def test_a_network_asked_for_is_joined(backend: DockerBackend, redis_server: RedisServer, session_id: str) -> None:
    """--network NAME: the container joins that network (here Docker's bridge, whose gateway then answers), and
    still reaches Redis through the socket."""
    gateway = backend.docker.networks.get("bridge").attrs["IPAM"]["Config"][0]["Gateway"]
    listener = Listener(gateway)
    try:
        backend.start(session_id, env=FAST, network="bridge")
        r = session(redis_server.url, session_id).run(
            CONNECT.replace("TARGETS", json.dumps([[gateway, listener.port]]))
        )
        assert json.loads(r.stdout) == {f"{gateway}:{listener.port}": "connected"}
        wait_for(lambda: listener.accepted == 1)
    finally:
        listener.close()
        backend.stop(session_id)


def test_redis_without_a_socket_needs_a_network_named(image: str, tmp_path: Path, session_id: str) -> None:
    server = _server(tmp_path / "nosock", unix=False)
    try:
        with DockerBackend(server.url, image=image) as backend:
            with pytest.raises(ConfigError, match=r"has none on this machine.*--network NAME"):
                backend.start(session_id, env=FAST)
            assert not backend._containers(session_id)
            assert not server.client().acl_users() or all("shellq." not in u for u in server.client().acl_users())
    finally:
        server.stop()


def test_redis_restart_reaches_running_containers(image: str, tmp_path: Path, session_id: str) -> None:
    """The socket's directory is mounted, not the socket: Redis restarting (a new socket file, same place) is seen
    by the container's worker, which reconnects; the queued command runs, nothing is lost."""
    server = _server(tmp_path / "restart", "--appendonly", "yes", "--appendfsync", "always")
    try:
        with DockerBackend(server.url, image=image) as backend:
            backend.start(session_id, env=FAST)
            s = session(server.url, session_id)
            assert s.run("export BEFORE=1").exit_code == 0
            server.stop()
            server.start("--appendonly", "yes", "--appendfsync", "always")
            cid = s.submit("echo $BEFORE after")
            assert s.result(cid, timeout=60).stdout == "1 after\n"
            backend.stop(session_id)
    finally:
        server.stop()


def test_memory_hog_is_killed_and_the_session_survives(
    backend: DockerBackend, redis_server: RedisServer, session_id: str
) -> None:
    container_id = backend.start(session_id, env=FAST, memory="256m")
    s = session(redis_server.url, session_id)
    host = backend.docker.containers.get(container_id).attrs["HostConfig"]
    assert host["Memory"] == host["MemorySwap"] == 256 * 2**20  # swap included: no swap beyond the limit
    hog = s.run("python3 -c 'b = bytearray(1024 * 2**20); print(len(b))'", timeout=60)
    assert hog.status == "completed" and hog.exit_code == 137, hog  # SIGKILL by the OOM killer
    assert s.run("echo alive").stdout == "alive\n"
    backend.stop(session_id)


def test_pids_limit_ends_in_an_honest_result(backend: DockerBackend, redis_server: RedisServer, session_id: str):
    """2,000 background sleeps against a 256-process limit: bash's forks fail; the command ends either when the loop
    does (bash retried its forks until some sleeps ended) or with bash giving up (`shell_exited`, 254). The worker
    holds (no restart: it waits for a process to start the next bash), and once the sleeps exit the session works."""
    container_id = backend.start(session_id, env=FAST, pids=256)
    s = session(redis_server.url, session_id)
    r = s.run("for i in $(seq 2000); do sleep 10 & done 2>/dev/null; exit 1", timeout=120)
    assert (r.status, r.exit_code) in {("completed", 1), ("shell_exited", 254)}, r
    wait_for(lambda: s.run("pgrep -c sleep || true", timeout=60).stdout.strip() == "0", timeout=60)
    assert s.run("for i in 1 2 3; do sleep 0.1 & done; wait; echo ok").stdout == "ok\n"
    container = backend.docker.containers.get(container_id)
    assert container.attrs["RestartCount"] == 0  # the same worker all along
    backend.stop(session_id)


def test_cpu_limit_holds(backend: DockerBackend, redis_server: RedisServer, session_id: str) -> None:
    """Two busy loops for 2 s of wall time at cpus=0.5 get about 1 CPU-second between them (4 without the limit on
    two cores); the bound checked is loose (1.6 s): the limit, not the machine's speed."""
    backend.start(session_id, env=FAST, cpus=0.5)
    s = session(redis_server.url, session_id)
    spin = "timeout 2 sh -c 'while :; do :; done' & timeout 2 sh -c 'while :; do :; done' & wait; times"
    times = s.run(spin, timeout=30).stdout.splitlines()[1]  # children's user and system time, e.g. "0m0.51s 0m0.00s"
    used = sum(float(t.split("m")[0]) * 60 + float(t.split("m")[1].rstrip("s")) for t in times.split())
    assert 0.2 < used < 1.6, times
    backend.stop(session_id)


def test_disk_limit_fails_the_writing_command_with_enospc(
    backend: DockerBackend, redis_server: RedisServer, session_id: str
) -> None:
    """--disk 64m: writing 100 MB fails that command with ENOSPC (a layer quota where the storage driver has one;
    here, overlay2 on ext4, tmpfs mounts on the shell's writable places), and nothing else."""
    backend.start(session_id, env=FAST, disk="64m")
    s = session(redis_server.url, session_id)
    assert s.run("export KEPT=1; cd ~ && pwd").stdout == "/home/shellq\n"
    for place in ("~", "/tmp", "/var/tmp"):
        r = s.run(f"dd if=/dev/zero of={place}/big bs=1M count=100 2>&1; echo status=$?", timeout=60)
        assert "No space left on device" in r.stdout and "status=1" in r.stdout, r.stdout
        assert s.run(f"rm {place}/big && dd if=/dev/zero of={place}/small bs=1M count=10 2>/dev/null").exit_code == 0
    assert (
        s.run("echo $KEPT; gcc --version >/dev/null 2>&1; cp /bin/true ~/t && ~/t && echo runs").stdout == "1\nruns\n"
    )
    backend.stop(session_id)


def test_read_only_root_with_writable_home_and_tmp(
    backend: DockerBackend, redis_server: RedisServer, session_id: str
) -> None:
    backend.start(session_id, env=FAST, read_only=True)
    s = session(redis_server.url, session_id)
    r = s.run("touch /usr/x 2>&1; touch /tmp/x ~/x /var/tmp/x && echo writable")
    assert "Read-only file system" in r.stdout and "writable" in r.stdout
    assert s.run("echo $((6 * 7)) > ~/n && cat ~/n").stdout == "42\n"
    backend.stop(session_id)


def test_shell_user_is_configurable(backend: DockerBackend, redis_server: RedisServer, session_id: str) -> None:
    backend.start(session_id, env=FAST, user="root")
    assert session(redis_server.url, session_id).run("id -u").stdout == "0\n"
    backend.stop(session_id)
    backend.start(session_id, env=FAST, user="nobody")
    assert session(redis_server.url, session_id).run("id -un").stdout == "nobody\n"
    backend.stop(session_id)


def test_two_servers_on_one_engine_own_their_containers(image: str, tmp_path: Path) -> None:
    """Two shellq servers, each with a docker session named alike: stop, gc and cleanup on one leave the other's
    container alone and working; gc --dry-run says what it would remove."""
    servers = [_server(tmp_path / "one"), _server(tmp_path / "two")]
    name = "same-name"
    try:
        with DockerBackend(servers[0].url, image=image) as one, DockerBackend(servers[1].url, image=image) as two:
            ids = [one.start(name, env=FAST), two.start(name, env=FAST)]
            assert one.instance != two.instance and one.instance == server_id(servers[0].client())
            containers = [one.docker.containers.get(i) for i in ids]
            assert [c.labels[INSTANCE_LABEL] for c in containers] == [one.instance, two.instance]
            assert containers[0].name != containers[1].name and one.instance in containers[0].name
            s2 = session(servers[1].url, name)
            assert s2.run("export MINE=2").exit_code == 0

            one.docker.containers.get(ids[0]).pause()  # its worker beats no more
            servers[0].client().delete(protocol.keys(name).meta)  # one's session is gone: one's gc removes it...
            assert one.gc(dry_run=True) == [name]
            assert one.docker.containers.get(ids[0]).status == "paused"  # a dry run removes nothing
            assert one.gc() == [name]
            assert one.stop(name) is False and one.gc() == []
            assert [
                c.id for c in one.docker.containers.list(filters={"label": f"{LABEL}={name}"}, ignore_removed=True)
            ] == [ids[1]]
            assert s2.run("echo $MINE").stdout == "2\n"  # ...and two's session runs on, untouched
            assert two.gc(dry_run=True) == []

            out = subprocess.run(
                [str(SHELLQ), "gc", "--dry-run"],
                check=False,
                env={**os.environ, "SHELLQ_REDIS_URL": servers[1].url},
                capture_output=True,
                timeout=60,
            )
            assert (out.returncode, out.stdout) == (0, b"shellq: would remove 0 containers\n"), out.stderr
            one.close()  # one's cleanup (also run at exit)
            assert s2.run("echo still").stdout == "still\n"
            assert two.stop(name) is True
    finally:
        for server in servers:
            server.stop()


def test_socket_is_out_of_the_shells_reach_whoever_owns_it(image: str, tmp_path: Path, session_id: str) -> None:
    """Even when the socket and its directory belong to the shell user's uid (a developer's `shellq up` as uid
    1000, the image's `shellq` is 1000 too), the shell cannot open it: it is mounted inside /etc/shellq (root's,
    0700). Only the worker reaches Redis."""
    server = _server(tmp_path / "uid")
    try:
        os.chown(server.socket.parent, 1000, 1000)
        os.chown(server.socket, 1000, 1000)
        with DockerBackend(server.url, image=image) as backend:
            backend.start(session_id, env=FAST)
            s = session(server.url, session_id)
            probe = (
                "python3 -c 'import socket; s = socket.socket(socket.AF_UNIX);"
                f' s.connect("{SOCKET_DIR}/redis.sock")\' 2>&1 | tail -1; id -u'
            )
            assert s.run(probe).stdout == "PermissionError: [Errno 13] Permission denied\n1000\n"
            backend.stop(session_id)
    finally:
        server.stop()


def test_socket_directory_holding_more_than_the_socket_is_refused(image: str, tmp_path: Path, session_id: str) -> None:
    server = _server(tmp_path / "shared")
    other = socket.socket(socket.AF_UNIX)
    try:
        other.bind(str(server.socket.parent / "docker.sock"))  # another service's socket beside Redis's
        with DockerBackend(server.url, image=image) as backend:
            with pytest.raises(ConfigError, match=r"also holds docker\.sock"):
                backend.start(session_id, env=FAST)
            assert not backend._containers(session_id)
    finally:
        other.close()
        server.stop()


def test_memory_pressure_kills_commands_never_the_worker(
    backend: DockerBackend, redis_server: RedisServer, session_id: str
) -> None:
    """Fourteen 22 MB processes at a 256 MB limit (a `make -j`): the OOM killer takes commands (their
    oom_score_adj is 1000), the worker stays (no restart), the session goes on."""
    container_id = backend.start(session_id, env=FAST, memory="256m")
    s = session(redis_server.url, session_id)
    assert s.run("cat /proc/self/oom_score_adj").stdout == "1000\n"
    assert s.run("echo -1 > /proc/self/oom_score_adj").exit_code != 0  # below the worker's: refused
    hogs = "for i in $(seq 14); do python3 -c 'b = bytearray(22 << 20); import time; time.sleep(3)' & done; wait"
    r = s.run(hogs + "; echo done", timeout=60)
    assert (r.status, r.stdout) == ("completed", "done\n"), r
    assert s.run("echo alive").stdout == "alive\n"
    assert backend.docker.containers.get(container_id).attrs["RestartCount"] == 0
    backend.stop(session_id)


def test_long_output_is_spooled_within_the_disk_limit(
    backend: DockerBackend, redis_server: RedisServer, session_id: str
) -> None:
    """--disk 64m: the worker's spool of a command's output (150 MB printed) stays within the limit too."""
    container_id = backend.start(session_id, env=FAST, disk="64m")
    s = session(redis_server.url, session_id)
    r = s.run("head -c 150M /dev/zero", timeout=60)
    assert r.status == "completed" and r.stdout_size == 150 << 20 and r.truncated
    container = backend.docker.containers.get(container_id)
    code, out = container.exec_run(["du", "-sm", "/var/lib/shellq"])
    assert code == 0 and int(out.split()[0]) <= 64, out
    backend.stop(session_id)


def test_restarted_session_is_supervised_again(
    backend: DockerBackend, redis_server: RedisServer, session_id: str
) -> None:
    """start, stop, start again on one backend, then the container is killed: its commands are answered."""
    backend.start(session_id, env=FAST)
    backend.stop(session_id)
    container_id = backend.start(session_id, env=FAST)
    s = session(redis_server.url, session_id)
    running = s.submit("sleep 60")
    wait_for(lambda: backend.redis.hget(protocol.keys(session_id).meta, "current") == running.encode())
    backend.docker.containers.get(container_id).kill()
    assert s.result(running, timeout=20).status == "unavailable"
    backend.stop(session_id)


def test_gc_leaves_a_starting_container_alone(
    backend: DockerBackend, redis_server: RedisServer, session_id: str
) -> None:
    """A running container younger than 30 s whose worker has not beaten yet is starting, not an orphan."""
    container_id = backend.start(session_id, env=FAST)
    backend.redis.delete(protocol.keys(session_id).meta)  # as before the worker's first heartbeat
    assert session_id not in backend.gc(dry_run=True)
    assert backend.docker.containers.get(container_id).status == "running"
    backend.stop(session_id)


def test_system_and_numeric_users_with_a_disk_limit(
    backend: DockerBackend, redis_server: RedisServer, session_id: str
) -> None:
    """A uid works as a user name; a system user's home (daemon: /usr/sbin) gets no tmpfs laid over it."""
    backend.start(session_id, env=FAST, user="1000", disk="64m")
    assert session(redis_server.url, session_id).run("id -un; pwd").stdout == "shellq\n/home/shellq\n"
    backend.stop(session_id)
    backend.start(session_id, env=FAST, user="daemon", disk="64m")
    assert session(redis_server.url, session_id).run("id -un; ls /usr/sbin | grep -c .").stdout.split()[0] == "daemon"
    backend.stop(session_id)


@pytest.mark.timeout(180)
def test_processes_that_left_the_shell_cannot_hold_the_pids_limit(
    backend: DockerBackend, redis_server: RedisServer, session_id: str
) -> None:
    """Loops that left the shell's session (setsid) take every process the limit allows, and bash exits: the
    worker gets a new bash (a freed process, or after FORK_PATIENCE by killing every process of the shell user).
    The result is honest (`shell_exited`, 3), the worker never restarted, the session answers."""
    container_id = backend.start(session_id, env=FAST, pids=128)
    s = session(redis_server.url, session_id)
    loop = "setsid sh -c 'while :; do sleep 1000 & done' >/dev/null 2>&1 < /dev/null &"
    r = s.run(f"{loop} {loop} {loop} sleep 1; exit 3", timeout=120)
    assert (r.status, r.exit_code) == ("shell_exited", 3), r
    assert s.run("echo ok", timeout=60).stdout == "ok\n"  # a builtin: it needs no process
    assert backend.docker.containers.get(container_id).attrs["RestartCount"] == 0
    backend.stop(session_id)
