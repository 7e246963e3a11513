"""Provisioning as RQ jobs: start, stop and gc of docker sessions, on one queue per Docker host
(`shellq-manager:<host>`), run by `shellq manager` beside that host's engine (containers/manager.py).

An RQ job names its function by import path, so whoever may enqueue on a queue may run code where its worker
runs: here, on a Docker host. Three walls: the queues are the admin's (session users get NOPERM on `rq:*`); jobs
travel as JSON (RQ's JSONSerializer: nothing is unpickled); and `ManagerJob` runs only the functions in `JOBS`,
with no callbacks. Mounts must lie under the manager's `--mount-allow` paths and never expose the Docker socket;
networks other than none need `--network-allow`.

Jobs are idempotent: a start retried after its first try made the container adopts it (DockerBackend.start); a
stop of a stopped session does nothing. A start that fails for a reason a retry cannot change (no image, a
refused mount, a container that exits) returns `{"error": ..., "kind": ...}` instead of raising, so RQ does not
retry it; Docker's own failures raise, and RQ retries them (`Retry`).
"""

from __future__ import annotations

import os
import socket
import stat
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict, Field
from rq import Queue, Retry
from rq.job import Job
from rq.serializers import JSONSerializer

from containers.docker_backend import DEFAULT_IMAGE, SHELL_USER, DockerBackend
from containers.local import SessionStartError
from worker import protocol
from worker.errors import ConfigError, ShellqError

QUEUE_PREFIX = "shellq-manager:"
"""RQ queue of the manager of Docker host H: `shellq-manager:H` (keys `rq:queue:shellq-manager:H`, ...)."""
START_TIMEOUT = 60.0
"""Seconds a start waits for the worker's heartbeat (DockerBackend.start's `start_timeout`)."""
JOB_TIMEOUT = 180
"""Seconds RQ lets a job run before it kills it (a start: image check, create, heartbeat; a stop: 10 s grace)."""
RETRY_MAX, RETRY_INTERVALS = 3, [1, 5, 15]
"""RQ Retry of every job (tries after the first; seconds before each): Docker hiccups and a manager that died
mid-job (its successor retries the job)."""
GC_INTERVAL = 60
"""Seconds between two gc jobs of a manager (RQ's scheduler runs them)."""
GC_PREFIX = "shellq-gc-"
"""Job ids of the periodic gc chain."""


class ForbiddenJobError(ShellqError):
    """A job on a manager's queue that is not one of shellq's own (or asks for a callback): never run."""


class NoManagerError(ShellqError):
    """No `shellq manager` is running for the Docker host asked for (or for any)."""


class StartOptions(BaseModel):
    """What a start job may ask of DockerBackend.start (see its docstring for units); nothing else is accepted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str = DEFAULT_IMAGE
    memory: str = "2g"
    cpus: float = Field(1.0, gt=0)
    pids: int = Field(512, gt=0)
    disk: str | None = None
    user: str = SHELL_USER
    read_only: bool = False
    mounts: tuple[str, ...] = ()
    network: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    start_timeout: float = Field(START_TIMEOUT, gt=0, le=JOB_TIMEOUT - 30)


@dataclass
class ManagerConfig:
    """What a manager allows, set once at its start (`configure`), and its one backend (shared with its
    supervision, so a stop it makes is not mistaken for a death)."""

    backend: DockerBackend
    host: str
    mount_allow: tuple[str, ...] = ()
    network_allow: tuple[str, ...] = ()
    gc_interval: int = GC_INTERVAL


_config: dict[str, ManagerConfig] = {}
"""The running manager's configuration (under "manager"): jobs run in its process (SimpleWorker)."""


def configure(config: ManagerConfig) -> None:
    _config["manager"] = config


def queue_name(host: str) -> str:
    return QUEUE_PREFIX + protocol.check_id(host, "Docker host name")


def default_host() -> str:
    """This machine's name, made a valid id (a manager's default `--queue`)."""
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname()).strip("-_")
    return name[:64] or "docker"


def manager_queue(r: redis.Redis, host: str) -> Queue:
    return Queue(queue_name(host), connection=r, serializer=JSONSerializer, job_class=ManagerJob)


# -- the jobs -----------------------------------------------------------------------------------------------------


def start_session(session: str, options: dict[str, Any]) -> dict[str, Any]:
    """Start (or adopt) the session's container; returns {"session", "container"} or {"error", "kind"}."""
    config = _configured()
    try:
        opts = StartOptions(**options)
        _check_mounts(opts.mounts, config.mount_allow)
        if opts.network is not None and opts.network not in config.network_allow:
            raise ConfigError(f"network {opts.network!r} is not allowed here (shellq manager --network-allow)")
        container = config.backend.start(protocol.check_id(session, "session id"), **opts.model_dump())
        config.backend.forget(session)  # the container outlives this job: stop_session or gc removes it
    except (SessionStartError, ConfigError, ValueError) as e:
        return {"error": str(e), "kind": "SessionStartError" if isinstance(e, SessionStartError) else "ConfigError"}
    return {"session": session, "container": container}


def stop_session(session: str) -> dict[str, Any]:
    """Stop and remove the session's container of this server (a no-op when there is none)."""
    config = _configured()
    return {"session": session, "stopped": config.backend.stop(protocol.check_id(session))}


def gc_sessions(periodic: bool = False) -> dict[str, Any]:
    """Remove this server's containers whose session or worker is gone; a `periodic` one (the manager's own chain)
    then schedules the next, whatever this one's outcome."""
    config = _configured()
    try:
        return {"removed": config.backend.gc()}
    finally:
        if periodic:
            schedule_gc(config.backend.redis, config.host, config.gc_interval)


JOBS = frozenset(f"{__name__}.{f.__name__}" for f in (start_session, stop_session, gc_sessions))
"""The only functions a manager runs."""


def schedule_gc(r: redis.Redis, host: str, interval: int, restart: bool = False) -> None:
    """Enqueue the next periodic gc job in `interval` seconds (RQ's scheduler moves it to the queue then). With
    `restart` (a manager starting), the chains of managers before it are dropped first: one chain per host."""
    queue = manager_queue(r, host)
    if restart:
        registry = queue.scheduled_job_registry
        for job_id in registry.get_job_ids():
            if job_id.startswith(GC_PREFIX):
                registry.remove(job_id, delete_job=True)
    job_id = f"{GC_PREFIX}{uuid.uuid4().hex[:12]}"
    queue.enqueue_in(
        timedelta(seconds=interval), gc_sessions, True, job_id=job_id, job_timeout=JOB_TIMEOUT, result_ttl=600
    )


class ManagerJob(Job):
    """An RQ job that runs only one of JOBS, with no callbacks: what reaches a manager's queue any other way (an
    enqueued `os.system`, a job with an `on_success` hook) fails without importing anything."""

    @property
    def func(self) -> Any:
        if self.instance is not None or self.func_name not in JOBS:
            raise ForbiddenJobError(f"refused job {self.func_name!r}: a shellq manager runs only {sorted(JOBS)}")
        names = (self._success_callback_name, self._failure_callback_name, self._stopped_callback_name)
        if any(names) or self.webhooks:
            raise ForbiddenJobError(f"refused job {self.id}: a shellq manager runs no callbacks and no webhooks")
        return super().func

    # RQ calls these on paths that never touch `func` (a failure, an abandoned job's cleanup): nothing is imported,
    # called or sent, whatever the job's hash in Redis says.
    @property
    def success_callback(self) -> Any:
        return None

    @property
    def failure_callback(self) -> Any:
        return None

    @property
    def stopped_callback(self) -> Any:
        return None

    def send_webhooks(self, status: Any, *, exc_string: str | None = None) -> None:
        return None


# -- the producer's side ------------------------------------------------------------------------------------------


def managers(r: redis.Redis) -> dict[str, dict[str, Any]]:
    """The live managers: host -> what each recorded ({"pid", "machine", "since", "worker"}); see manager.Lease."""
    from containers.manager import live_managers

    return live_managers(r)


def create_session(
    r: redis.Redis, session: str, options: dict[str, Any], host: str | None = None, timeout: float = 120.0
) -> str:
    """Enqueue a start job on the manager of `host` (None: the only live manager) and wait for it; returns the
    container id once the session's worker's heartbeat was seen. Raises NoManagerError, SessionStartError (with
    the container's last log lines), ConfigError, or ResultTimeoutError after `timeout` seconds."""
    StartOptions(**options)  # bad options fail here, not on the manager
    value = call(r, host, start_session, (protocol.check_id(session, "session id"), options), timeout)
    return str(value["container"])


def stop_via_manager(r: redis.Redis, session: str, host: str | None = None, timeout: float = 60.0) -> bool:
    """Have the manager of `host` stop the session's container; returns whether there was one."""
    return bool(call(r, host, stop_session, (protocol.check_id(session, "session id"),), timeout)["stopped"])


def call(r: redis.Redis, host: str | None, func: Any, args: tuple[Any, ...], timeout: float) -> dict[str, Any]:
    """Enqueue one of JOBS on the manager of `host` (None: the only live one), with RQ's Retry and timeout, and
    wait for its return value. Raises NoManagerError, the job's own error (SessionStartError, ConfigError), a
    SessionStartError naming the manager's failure, or ResultTimeoutError after `timeout` seconds."""
    from worker.errors import ResultTimeoutError

    live = sorted(managers(r))
    if host is None:
        if len(live) != 1:
            which = f"several are ({', '.join(live)}): name one" if live else "none is running (`shellq manager`)"
            raise NoManagerError(f"no manager to run {func.__name__}: {which}")
        host = live[0]
    elif host not in live:
        raise NoManagerError(f"no manager runs for Docker host {host!r} (`shellq manager --queue {host}`)")
    job = manager_queue(r, host).enqueue(
        func,
        *args,
        job_timeout=JOB_TIMEOUT,
        retry=Retry(max=RETRY_MAX, interval=RETRY_INTERVALS),
        result_ttl=3600,
        failure_ttl=86400,
    )
    deadline = time.monotonic() + timeout
    while (status := job.get_status(refresh=True)) not in ("finished", "failed", "stopped", "canceled"):
        if time.monotonic() > deadline:
            job.cancel()  # not run if still queued; one that started is undone by a stop behind it
            if func is start_session:
                manager_queue(r, host).enqueue(stop_session, *args[:1], job_timeout=JOB_TIMEOUT)
            raise ResultTimeoutError(
                f"the manager of {host} did not finish {func.__name__} in {timeout:g} s; it was called off"
            )
        time.sleep(0.02)
    if status != "finished":
        result = job.latest_result()
        last = (result.exc_string or "").strip().splitlines()[-1:] if result else []
        raise SessionStartError(f"the manager of {host} failed ({func.__name__}): {''.join(last) or status}")
    value: dict[str, Any] = job.return_value() or {}
    if "error" in value:
        raise (ConfigError if value.get("kind") == "ConfigError" else SessionStartError)(value["error"])
    return value


# -- internals ----------------------------------------------------------------------------------------------------


def _configured() -> ManagerConfig:
    if "manager" not in _config:
        raise ConfigError("shellq's jobs run in `shellq manager`, which configures them")
    return _config["manager"]


DOCKER_SOCKETS = ("/var/run/docker.sock", "/run/docker.sock")


def _check_mounts(mounts: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    """Each mount's host path must be absolute, exist, lie under an allowed path, have no symlink anywhere in it
    (the manager may see another filesystem than the Docker daemon resolving it: compose), and neither be nor hold
    the Docker socket. Raises ConfigError."""
    sockets = {os.path.realpath(s) for s in DOCKER_SOCKETS}
    if (host := os.environ.get("DOCKER_HOST", "")).startswith("unix://"):
        sockets.add(os.path.realpath(host[len("unix://") :]))
    for spec in mounts:
        source = spec.split(":")[0]
        if not source.startswith("/") or os.path.normpath(source) != source.rstrip("/") or "/../" in f"{source}/":
            raise ConfigError(f"mount {spec!r}: the host path must be absolute and plain (no `..`, not a volume name)")
        if not any(source == root or source.startswith(root.rstrip("/") + "/") for root in allowed):
            raise ConfigError(f"mount {spec!r}: {source} is not under a path this manager allows (--mount-allow)")
        path = Path("/")
        for part in Path(source).parts[1:]:
            path /= part
            try:
                mode = path.lstat().st_mode
            except OSError:
                raise ConfigError(f"mount {spec!r}: {path} does not exist") from None
            if stat.S_ISLNK(mode) or stat.S_ISSOCK(mode):
                raise ConfigError(f"mount {spec!r}: {path} is a {'symlink' if stat.S_ISLNK(mode) else 'socket'}")
        for sock in sockets:
            if sock == source or sock.startswith(source.rstrip("/") + "/"):
                raise ConfigError(f"mount {spec!r}: never the Docker socket (it is the Docker host's root)")
