"""The control plane (issue 16): `shellq manager` (a real RQ worker) beside the real Docker engine starts, stops and
collects docker sessions as RQ jobs; it runs only shellq's own jobs; it answers the commands of a container that
died `unavailable`; a manager SIGKILLed in the middle of a start leaves one container, adopted by its successor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import ROOT, RedisServer, server_binaries, wait_for
from rq import Callback, Queue
from rq.job import JobStatus
from rq.serializers import JSONSerializer

from containers import access, jobs
from containers.docker_backend import LABEL
from containers.local import SessionStartError
from producer import Client, ClientSettings
from worker import protocol
from worker.errors import ConfigError

pytestmark = pytest.mark.docker
SHELLQ = Path(sys.executable).parent / "shellq"
FAST = {"SHELLQ_HEARTBEAT": "0.2", "SHELLQ_LEASE_TTL": "1.5", "SHELLQ_KILL_GRACE": "0.3"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer("redis", server_binaries()["redis"], tmp_path_factory.mktemp("manager-redis"))
    server.start()
    yield server
    server.stop()


class Managers:
    """`shellq manager` subprocesses of one test, each on its own Docker host name (queue)."""

    def __init__(self, server: RedisServer, tmp_path: Path) -> None:
        self.server, self.tmp_path = server, tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, host: str, *args: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, "SHELLQ_REDIS_URL": self.server.url}
        with open(self.tmp_path / f"manager-{host}-{len(self.procs)}.log", "ab") as log:
            proc = subprocess.Popen(
                [str(SHELLQ), "manager", "--queue", host, *args], env=env, stdout=log, stderr=log, cwd=ROOT
            )
        self.procs.append(proc)
        r = self.server.client()
        wait_for(lambda: self._leased(r, host, proc), timeout=30)
        return proc

    def _leased(self, r: redis.Redis, host: str, proc: subprocess.Popen[bytes]) -> bool:
        assert proc.poll() is None, self.log()
        raw: Any = r.get(f"shellq:manager:{host}")
        return bool(raw) and json.loads(raw)["pid"] == proc.pid

    def log(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-2000:] for p in self.tmp_path.glob("manager-*.log"))

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.fixture
def managers(server: RedisServer, tmp_path: Path, image: str) -> Iterator[Managers]:
    m = Managers(server, tmp_path)
    yield m
    m.stop()


@pytest.fixture
def host() -> str:
    return f"h-{uuid.uuid4().hex[:8]}"


def client(server: RedisServer) -> Client:
    return Client(settings=ClientSettings(redis_url=server.url, no_worker_after=5))


def containers_of(engine: Any, session: str) -> list[Any]:
    return list(engine.containers.list(all=True, filters={"label": f"{LABEL}={session}"}, ignore_removed=True))


def test_create_session_through_the_manager_and_supervision(
    managers: Managers, server: RedisServer, host: str, image: str, engine: Any, session_id: str
) -> None:
    """A producer with only Redis creates a session (a manager starts it), runs commands; `docker kill` of its
    container gets the running and queued commands answered `unavailable` in under 5 s with the reason, and
    `shellq session list` shows the session gone."""
    managers.start(host)
    c = client(server)
    s = c.create_session(session_id, image=image, env=FAST)
    assert s.run("export A=1; id -un").stdout == "shellq\n"
    assert s.run("echo $A").stdout == "1\n"
    running, queued = s.submit("sleep 60"), s.submit("echo never")
    wait_for(lambda: c.redis.hget(protocol.keys(session_id).meta, "current") == running.encode())
    (container,) = containers_of(engine, session_id)
    killed = time.monotonic()
    container.kill()
    results = [s.result(cid, timeout=20) for cid in (running, queued)]
    assert time.monotonic() - killed < 5
    assert [r.status for r in results] == ["unavailable"] * 2
    assert all("killed (exit code 137: SIGKILL)" in (r.error or "") for r in results), results
    listed = subprocess.run(
        [str(SHELLQ), "session", "list"],
        check=False,
        env={**os.environ, "SHELLQ_REDIS_URL": server.url},
        capture_output=True,
    )
    row = next(line for line in listed.stdout.decode().splitlines() if line.startswith(session_id))
    assert row.split()[1:4] == ["docker", "down", "gone"], row
    stop = jobs.manager_queue(c.redis, host).enqueue(jobs.stop_session, session_id)
    wait_for(lambda: stop.get_status(refresh=True) == "finished", timeout=30)
    assert not containers_of(engine, session_id)


def test_manager_errors_come_back_as_shellq_errors(
    managers: Managers, server: RedisServer, host: str, image: str, engine: Any, session_id: str, tmp_path: Path
) -> None:
    allowed = tmp_path / "allowed"
    (allowed / "data").mkdir(parents=True)
    managers.start(host, "--mount-allow", str(allowed), "--mount-allow", "/run")
    c = client(server)
    with pytest.raises(SessionStartError, match=r"no image shellq-worker:absent.*shellq image build"):
        c.create_session(session_id, image="shellq-worker:absent")
    with pytest.raises(ConfigError, match=r"not under a path this manager allows \(--mount-allow\)"):
        c.create_session(session_id, image=image, mounts=["/etc:/host-etc:ro"])
    for mount in ("/run:/r", "/run/docker.sock:/s"):  # allowed paths, but the engine's socket is there
        with pytest.raises(ConfigError, match=r"never the Docker socket|is a socket"):
            c.create_session(session_id, image=image, mounts=[f"{allowed}/data:/d", mount])
    (allowed / "link").symlink_to(tmp_path)  # inside the allowed path, pointing out of it
    with pytest.raises(ConfigError, match=r"link is a symlink"):
        c.create_session(session_id, image=image, mounts=[f"{allowed}/link:/x"])
    for name in ("data:/x", f"{allowed}/../allowed/data:/x", f"{allowed}/absent:/x"):  # a volume name, `..`, none
        with pytest.raises(ConfigError, match=r"absolute and plain|does not exist"):
            c.create_session(session_id, image=image, mounts=[name])
    with pytest.raises(ConfigError, match="network 'host' is not allowed here"):
        c.create_session(session_id, image=image, network="host")
    with pytest.raises(SessionStartError, match=r"did not start[\s\S]*no-such-user"):  # the container's log
        c.create_session(session_id, image=image, user="no-such-user", env=FAST)
    with pytest.raises(ValueError, match="memory"):
        c.create_session(session_id, image=image, memory_limit="1g")  # an option no start has
    assert not containers_of(engine, session_id)
    s = c.create_session(session_id, image=image, env=FAST, mounts=[f"{allowed / 'data'}:/data"])
    assert s.run("touch /data/x 2>&1; ls /data").exit_code == 0
    jobs.manager_queue(c.redis, host).enqueue(jobs.stop_session, session_id)
    wait_for(lambda: not containers_of(engine, session_id), timeout=30)


class _Evil:
    """Unpickling this runs a command: what a pickled job could do to a worker that unpickles."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_manager_runs_only_shellqs_own_jobs(managers: Managers, server: RedisServer, host: str, tmp_path: Path) -> None:
    """An enqueued `os.system`, a shellq job with an on_success hook, and a pickled job whose arguments run a
    command when unpickled: none runs (the markers stay absent), each job fails, and the manager goes on."""
    managers.start(host)
    r = server.client()
    name = jobs.queue_name(host)
    markers = [tmp_path / f"pwned-{i}" for i in range(3)]
    plain = Queue(name, connection=r, serializer=JSONSerializer).enqueue(os.system, f"touch {markers[0]}")
    hooked = Queue(name, connection=r, serializer=JSONSerializer).enqueue(
        jobs.gc_sessions, on_success=Callback("os.getcwd")
    )
    pickled = Queue(name, connection=r).enqueue(print, _Evil(markers[2]))  # RQ's default serializer: pickle
    for job in (plain, hooked, pickled):
        wait_for(lambda job=job: job.get_status(refresh=True) == "failed", timeout=30)
    assert not [m for m in markers if m.exists()]
    assert "refused job 'posix.system'" in (plain.latest_result().exc_string or "")
    assert "runs no callbacks" in (hooked.latest_result().exc_string or "")
    ok = jobs.manager_queue(r, host).enqueue(jobs.gc_sessions)
    wait_for(lambda: ok.get_status(refresh=True) == "finished", timeout=30)  # the manager is still serving


def test_session_users_cannot_reach_the_managers_queues(
    managers: Managers, server: RedisServer, host: str, image: str, session_id: str
) -> None:
    managers.start(host)
    c = client(server)
    c.create_session(session_id, image=image, env=FAST)
    password = access.new_producer_password(c.redis, session_id)
    producer = redis.Redis.from_url(access.url_for(server.url, access.producer_user(session_id), password))
    with pytest.raises(redis.exceptions.NoPermissionError):
        Queue(jobs.queue_name(host), connection=producer, serializer=JSONSerializer).enqueue(jobs.gc_sessions)
    with pytest.raises(redis.exceptions.NoPermissionError):
        producer.keys("rq:*")
    stop = jobs.manager_queue(c.redis, host).enqueue(jobs.stop_session, session_id)
    wait_for(lambda: stop.get_status(refresh=True) == "finished", timeout=30)


def test_manager_killed_mid_start_leaves_one_container_adopted_by_its_successor(
    managers: Managers, server: RedisServer, host: str, image: str, engine: Any, session_id: str
) -> None:
    """SIGKILL the manager while its start job waits for the worker; the successor takes the lease over, hands the
    abandoned job back to RQ (retries left: queued again), and the retried start adopts the container the first
    try made. The producer, waiting all along, gets its session; there is one container, and no orphan."""
    first = managers.start(host)
    c = client(server)
    created: dict[str, Any] = {}

    def create() -> None:
        try:
            created["session"] = c.create_session(session_id, image=image, env=FAST, timeout=120)
        except Exception as e:  # reported below
            created["error"] = e

    waiting = threading.Thread(target=create)
    waiting.start()
    wait_for(lambda: [c.status for c in containers_of(engine, session_id)] == ["running"], timeout=60)
    first.send_signal(signal.SIGKILL)  # its job is waiting for the worker's heartbeat, or has just seen it
    first.wait()
    (made,) = containers_of(engine, session_id)
    managers.start(host)  # the lease expires 15 s after the kill; the successor then takes it
    waiting.join(timeout=150)
    assert "session" in created, created.get("error") or managers.log()
    (kept,) = containers_of(engine, session_id)
    assert kept.id == made.id  # adopted, not made again
    s = created["session"]
    assert s.run("echo adopted").stdout == "adopted\n"
    jobs.manager_queue(c.redis, host).enqueue(jobs.stop_session, session_id)
    wait_for(lambda: not containers_of(engine, session_id), timeout=30)


def test_periodic_gc_removes_orphans(
    managers: Managers, server: RedisServer, host: str, image: str, engine: Any, session_id: str
) -> None:
    """RQ's scheduler runs the manager's gc every --gc-interval seconds: a container whose session is gone goes."""
    managers.start(host, "--gc-interval", "1")
    c = client(server)
    c.create_session(session_id, image=image, env=FAST)
    (container,) = containers_of(engine, session_id)
    container.pause()  # its worker beats no more
    c.redis.delete(protocol.keys(session_id).meta)  # the session is gone
    wait_for(lambda: not containers_of(engine, session_id), timeout=60)


def test_cli_start_via_manager_and_info(
    managers: Managers, server: RedisServer, host: str, image: str, engine: Any, session_id: str
) -> None:
    managers.start(host)
    env = {**os.environ, "SHELLQ_REDIS_URL": server.url, **FAST}

    def shellq(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([str(SHELLQ), *args], check=False, env=env, capture_output=True, timeout=120)

    started = shellq("session", "start", "--name", session_id, "--backend", "docker", "--image", image, "--manager")
    assert started.returncode == 0, started.stderr
    assert b"started by a manager" in started.stderr
    assert shellq("exec", session_id, "--", "echo", "via-manager").stdout == b"via-manager\n"
    info = json.loads(shellq("info", "--json").stdout)
    assert info["managers"][host]["queue"] == jobs.queue_name(host)
    row = next(x for x in info["sessions"] if x["name"] == session_id)
    assert row["worker_alive"] and row["backend"] == "docker" and row["heartbeat_age"] < 5
    text = shellq("info").stdout.decode()
    assert host in text and session_id in text
    assert shellq("session", "stop", session_id).returncode == 0
    assert not containers_of(engine, session_id)


def test_a_planted_abandoned_job_calls_nothing_when_a_manager_starts(
    managers: Managers, server: RedisServer, host: str
) -> None:
    """A job hash in the manager's started registry with a failure callback (what the admin role, or a bug, can
    leave): the next manager hands it to RQ's abandoned-job cleanup with shellq's job class, which calls no
    callback (`builtins.print` would print the exception class into the manager's log)."""
    r = server.client()
    name = jobs.queue_name(host)
    planted = Queue(name, connection=r, serializer=JSONSerializer).enqueue(
        jobs.gc_sessions, on_failure=Callback("builtins.print")
    )
    Queue(name, connection=r, serializer=JSONSerializer).remove(planted.id)
    planted.set_status(JobStatus.STARTED)
    r.zadd(f"rq:wip:{name}", {f"{planted.id}:planted": 1})  # long expired: its worker is gone
    managers.start(host)
    wait_for(lambda: planted.get_status(refresh=True) in ("failed", "queued", "finished"), timeout=30)
    time.sleep(1)
    assert "<class 'rq.exceptions.AbandonedJobError'>" not in managers.log()
