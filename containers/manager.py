"""`shellq manager`: the RQ worker beside a Docker engine that runs shellq's jobs (containers/jobs.py) and watches
the engine's session containers.

One manager per Docker host: it holds the lease `shellq:manager:<host>` (renewed every 5 s, gone 15 s after it
dies). The manager that takes the lease over knows its predecessor is dead, so the jobs that predecessor had
started are abandoned: it hands them to RQ's own abandoned-job handling at once (StartedJobRegistry.cleanup: a
job with retries left is queued again, else failed), and the retried start adopts the container the first try
made. Supervision: Docker's `die` events of this server's containers, whoever started them, answer the session's
queued and running commands `unavailable` with the reason (DockerBackend.supervise).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import redis
from rq import SimpleWorker
from rq.scheduler import RQScheduler
from rq.serializers import JSONSerializer

from containers import jobs
from containers.docker_backend import DEFAULT_IMAGE, DockerBackend
from containers.local import pid_running
from worker.errors import ConfigError

log = logging.getLogger("shellq.manager")

LEASE_PREFIX = "shellq:manager:"
LEASE_TTL_MS = 15_000
RENEW_EVERY = 5.0


class Lease:
    """`shellq:manager:<host>`: one manager per Docker host; its value says who ({"pid", "machine", "since",
    "worker", "token"})."""

    def __init__(self, r: redis.Redis, host: str) -> None:
        self.r, self.key = r, LEASE_PREFIX + host
        self.token = uuid.uuid4().hex
        self.worker = f"shellq-manager-{host}-{self.token[:6]}"
        self.value = json.dumps(
            {"pid": os.getpid(), "machine": socket.gethostname(), "since": time.time(), "worker": self.worker}
            | {"token": self.token, "process": _process_identity(os.getpid())}
        )

    def acquire(self) -> bool:
        return bool(self.r.set(self.key, self.value, nx=True, px=LEASE_TTL_MS))

    def wait(self) -> None:
        """Take the lease: at once when it is free or its holder is a dead process on this machine (a manager that
        was killed), else once it lapses (this manager stands by meanwhile)."""
        said = False
        while not self.acquire():
            raw: Any = self.r.get(self.key)
            if raw is None:
                continue  # it lapsed just now
            holder = json.loads(raw)
            mine = holder.get("machine") == socket.gethostname() and _same_boot_and_namespace(holder.get("process"))
            if mine and _process_identity(int(holder.get("pid", 0))) != holder.get("process"):
                log.warning("manager %s (pid %s) died: taking its lease over", holder.get("worker"), holder["pid"])
                self._take_from(raw)
                continue
            if not said:
                log.warning("a manager for this host runs (%s): standing by until its lease lapses", raw.decode())
                said = True
            time.sleep(1)

    def _take_from(self, old: bytes) -> None:
        """Delete the lease if it still holds `old` (a GET and a DELETE under WATCH)."""
        with self.r.pipeline() as pipe:
            try:
                pipe.watch(self.key)  # type: ignore[no-untyped-call]
                if pipe.get(self.key) == old:
                    pipe.multi()
                    pipe.delete(self.key)
                    pipe.execute()
            except redis.WatchError:
                pass

    def renew(self) -> bool:
        """Extend the lease if it is still this manager's (a GET and a SET under WATCH)."""
        with self.r.pipeline() as pipe:
            try:
                pipe.watch(self.key)  # type: ignore[no-untyped-call]
                if pipe.get(self.key) != self.value.encode():
                    return False
                pipe.multi()
                pipe.set(self.key, self.value, px=LEASE_TTL_MS)
                pipe.execute()
                return True
            except redis.WatchError:
                return False

    def release(self) -> None:
        self._take_from(self.value.encode())


def _process_identity(pid: int) -> str | None:
    """boot id, pid namespace and start time of a process of this machine: a pid alone may be another namespace's,
    or a reused one. None when the process is gone."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    if not pid_running(pid):
        return None
    started = raw[raw.rindex(b")") + 2 :].split()[19].decode()
    return f"{boot}/{namespace}/{started}"


def _same_boot_and_namespace(identity: str | None) -> bool:
    """Is a lease holder's recorded identity from this boot and this pid namespace (so its pid means the same)?"""
    mine = _process_identity(os.getpid())
    return bool(identity and mine and identity.rsplit("/", 1)[0] == mine.rsplit("/", 1)[0])


def live_managers(r: redis.Redis) -> dict[str, dict[str, Any]]:
    """host -> the lease value of each live manager."""
    found: dict[str, dict[str, Any]] = {}
    for key in r.scan_iter(match=LEASE_PREFIX + "*", count=1000):
        raw: Any = r.get(key)
        if raw:
            name = key.decode() if isinstance(key, bytes) else str(key)
            value = json.loads(raw)
            value.pop("token", None)
            value.pop("process", None)
            found[name[len(LEASE_PREFIX) :]] = value
    return found


class ManagerWorker(SimpleWorker):
    """RQ's SimpleWorker (jobs run in this process, no fork: the supervision thread and the lease stay whole),
    on a manager's queue, with shellq's job class and JSON serializer."""


class ThreadScheduler(RQScheduler):
    """RQ's scheduler (it moves jobs enqueued `enqueue_in` to their queue when due), run in a thread of the manager
    instead of RQ's forked process: a manager that is SIGKILLed leaves no scheduler behind."""

    def _install_signal_handlers(self) -> None:
        pass  # the manager's main thread has the signals; `request_stop` ends the loop


def run(
    redis_url: str,
    host: str | None = None,
    mount_allow: tuple[str, ...] = (),
    network_allow: tuple[str, ...] = (),
    gc_interval: int = jobs.GC_INTERVAL,
    burst: bool = False,
) -> int:
    """Serve the manager's queue until SIGTERM/SIGINT (or, with `burst`, until it is empty); while another live
    manager holds this host's lease, stand by."""
    host = host or jobs.default_host()
    for root in mount_allow:
        if not root.startswith("/") or os.path.realpath(root) != root.rstrip("/"):
            raise ConfigError(f"--mount-allow {root!r}: give an absolute path with no symlink in it")
    r = redis.Redis.from_url(redis_url)
    lease = Lease(r, host)
    lease.wait()
    stop = threading.Event()
    backend = DockerBackend(redis_url, image=DEFAULT_IMAGE)
    jobs.configure(jobs.ManagerConfig(backend, host, mount_allow, network_allow, gc_interval))
    queue = jobs.manager_queue(r, host)
    # Whoever held the lease before is dead: the jobs it had started are abandoned now, not in RQ's minutes (RQ's
    # own cleanup, with this queue's job class: nothing a job's hash names is called), and its scheduler's lock
    # is free.
    queue.started_job_registry.cleanup(timestamp=time.time() + 10**9)
    scheduler = ThreadScheduler([queue], connection=r, serializer=JSONSerializer, logging_level="WARNING")
    r.delete(scheduler.get_locking_key(queue.name))
    threads = [
        threading.Thread(target=_keep, args=(lease, stop), name="shellq-manager-lease", daemon=True),
        threading.Thread(target=_supervise, args=(backend, stop), name="shellq-manager-supervise", daemon=True),
        threading.Thread(target=_schedule, args=(scheduler, stop), name="shellq-manager-scheduler", daemon=True),
    ]
    for thread in threads:
        thread.start()
    jobs.schedule_gc(r, host, gc_interval, restart=True)
    worker = ManagerWorker(
        [queue], connection=r, name=lease.worker, serializer=JSONSerializer, job_class=jobs.ManagerJob
    )
    log.info("shellq manager for Docker host %s: queue %s, server %s", host, queue.name, backend.instance)
    try:
        worker.work(burst=burst, logging_level="WARNING")
    finally:
        stop.set()
        scheduler.request_stop()  # type: ignore[no-untyped-call]
        for thread in threads:
            thread.join(timeout=10)
        lease.release()
        backend.close()
    return 0


def _supervise(backend: DockerBackend, stop: threading.Event) -> None:
    """DockerBackend.supervise for every session, from now on, again after any error (a Docker restart, Redis
    away, a session's odd key): supervision must not end while the manager runs."""
    since = time.time()
    while not stop.is_set():
        try:
            backend.supervise(every_session=True, stop=stop, since=since)
        except Exception:
            log.exception("supervision failed; watching again")
            stop.wait(1)


def _schedule(scheduler: ThreadScheduler, stop: threading.Event) -> None:
    """RQ's scheduler loop, again after any error (Redis restarting): delayed retries and the gc chain depend
    on it."""
    while not stop.is_set():
        try:
            scheduler.acquire_locks()  # type: ignore[no-untyped-call]
            scheduler.work()  # type: ignore[no-untyped-call]
        except Exception:
            log.exception("RQ's scheduler failed; starting it again")
            scheduler._stop_requested = False
            stop.wait(1)


def _keep(lease: Lease, stop: threading.Event) -> None:
    """Renew the lease; a manager that lost it (Redis lost it, or it was paused past the TTL) stops at once, so two
    managers never run one host's jobs."""
    while not stop.wait(RENEW_EVERY):
        try:
            if not lease.renew():
                log.error("lost the manager lease %s: stopping", lease.key)
                os.kill(os.getpid(), 15)
                return
        except redis.RedisError as e:
            log.warning("could not renew the manager lease: %s", e)
