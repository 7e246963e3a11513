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
from typing import Any

import redis
from rq import SimpleWorker
from rq.registry import StartedJobRegistry
from rq.scheduler import RQScheduler
from rq.serializers import JSONSerializer

from containers import jobs
from containers.docker_backend import DEFAULT_IMAGE, DockerBackend
from containers.local import pid_running

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
            | {"token": self.token}
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
            if holder.get("machine") == socket.gethostname() and not pid_running(int(holder.get("pid", 0))):
                log.warning("manager %s (pid %s) died: taking its lease over", holder.get("worker"), holder["pid"])
                self._take_from(raw)
                continue
            if not said:
                log.warning("a manager for this host runs (%s): standing by until its lease lapses", raw.decode())
                said = True
            time.sleep(1)

    def _take_from(self, old: bytes) -> None:
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
        with self.r.pipeline() as pipe:
            try:
                pipe.watch(self.key)  # type: ignore[no-untyped-call]
                if pipe.get(self.key) == self.value.encode():
                    pipe.multi()
                    pipe.delete(self.key)
                    pipe.execute()
            except redis.WatchError:
                pass


def live_managers(r: redis.Redis) -> dict[str, dict[str, Any]]:
    """host -> the lease value of each live manager."""
    found: dict[str, dict[str, Any]] = {}
    for key in r.scan_iter(match=LEASE_PREFIX + "*", count=1000):
        raw: Any = r.get(key)
        if raw:
            name = key.decode() if isinstance(key, bytes) else str(key)
            value = json.loads(raw)
            value.pop("token", None)
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
    r = redis.Redis.from_url(redis_url)
    lease = Lease(r, host)
    lease.wait()
    stop = threading.Event()
    jobs.configure(jobs.ManagerConfig(redis_url, host, mount_allow, network_allow, gc_interval))
    backend = DockerBackend(redis_url, image=DEFAULT_IMAGE)
    threads = [
        threading.Thread(target=_keep, args=(lease, stop), name="shellq-manager-lease", daemon=True),
        threading.Thread(target=backend.supervise, args=(True, stop), name="shellq-manager-supervise", daemon=True),
    ]
    for thread in threads:
        thread.start()
    queue = jobs.manager_queue(r, host)
    # Whoever held the lease before is dead: the jobs it had started are abandoned now, not in RQ's minutes, and
    # its scheduler's lock is free.
    StartedJobRegistry(queue=queue).cleanup(timestamp=time.time() + 10**9)
    scheduler = ThreadScheduler([queue], connection=r, serializer=JSONSerializer, logging_level="WARNING")
    r.delete(scheduler.get_locking_key(queue.name))
    scheduler.acquire_locks()  # type: ignore[no-untyped-call]
    threads.append(threading.Thread(target=scheduler.work, name="shellq-manager-scheduler", daemon=True))
    threads[-1].start()
    jobs.schedule_gc(r, host, gc_interval)
    worker = ManagerWorker(
        [queue], connection=r, name=lease.worker, serializer=JSONSerializer, job_class=jobs.ManagerJob
    )
    log.info("shellq manager for Docker host %s: queue %s, server %s", host, queue.name, backend.instance)
    try:
        worker.work(burst=burst, logging_level="WARNING")
    finally:
        scheduler.request_stop()  # type: ignore[no-untyped-call]
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
        lease.release()
        backend.close()
    return 0


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
