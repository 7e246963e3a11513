"""The Docker backend: one container per session, labelled `shellq.session=S`, always removed.

The container runs the worker image (`shellq image build`) with an init that reaps zombies, resource limits and
the session's Redis settings; start returns once the worker's heartbeat is seen. A container that dies while its
session has commands queued gets them answered `unavailable` at once (a watcher on Docker's event stream), so an
agent never mistakes a dead environment for a failing command or waits for nothing.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import logging
import os
import tarfile
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import docker
import redis
from docker.errors import DockerException, ImageNotFound, NotFound

from containers import access
from containers.local import SessionStartError
from worker import protocol
from worker.errors import ConfigError

log = logging.getLogger("shellq.containers")

LABEL = "shellq.session"
INSTANCE_LABEL = "shellq.instance"
DEFAULT_IMAGE = "shellq-worker:latest"
SHELL_USER = "shellq"
"""The user the shell runs as in a container (the image makes it); the worker stays root."""
WORKER_CAPABILITIES = {
    "SETUID": "start bash as the shell user",
    "SETGID": "give it that user's groups, and only those",
    "KILL": "signal the shell's processes (timeouts, interrupts, the guard's cleanup)",
    "CHOWN": "hand the shell its command file and FIFOs",
    "FOWNER": "reset the access time of the shell's command file (how the worker tells a command ran)",
    "DAC_OVERRIDE": "open the shell's FIFOs and command file again (0600, the shell user's), check its syntax",
    "SYS_PTRACE": "read /proc/PID/syscall and fd/0 of a bash of another uid (is it back at its prompt?)",
}
"""The only capabilities a session container keeps (Docker's other defaults, NET_RAW, MKNOD, SETFCAP, SETPCAP,
NET_BIND_SERVICE, SYS_CHROOT, AUDIT_WRITE, FSETID, are dropped), and why the worker (root) needs each. The shell runs
as the shell user with none, and `no-new-privileges` keeps setuid binaries and file capabilities from adding any."""
PASSWORD_FILE = "/etc/shellq/redis-password"
"""Where the worker's Redis password is put in its container, before the container starts."""


class DockerBackend:
    """Start and stop session containers; also a context manager that removes what it started."""

    name = "docker"

    def __init__(self, redis_url: str, image: str = DEFAULT_IMAGE, client: docker.DockerClient | None = None) -> None:
        self.redis_url = redis_url
        self.image = image
        try:
            self.docker = client or docker.from_env()
            self.docker.ping()
        except DockerException as e:
            raise ConfigError(f"no Docker engine: {e}") from None
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=10)
        self._started: dict[str, str] = {}  # session -> container id, for cleanup
        self._stopping: set[str] = set()
        self._watcher: threading.Thread | None = None
        atexit.register(self.close)

    def __enter__(self) -> DockerBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(
        self,
        session: str,
        *,
        memory: str = "2g",
        cpus: float = 1.0,
        pids: int = 512,
        mounts: Sequence[str] = (),
        network: str | None = None,
        env: dict[str, str] | None = None,
        start_timeout: float = 30.0,
    ) -> str:
        """Run the session's container and wait for its worker's heartbeat; returns the container id."""
        keys = protocol.keys(session)
        self._check_image()
        instance = uuid.uuid4().hex[:16]
        creds = access.grant(self.redis, session)
        environment = {"SHELLQ_SESSION": session, "SHELLQ_SHELL_USER": SHELL_USER, **(env or {})}
        environment.update(
            SHELLQ_REDIS_URL=access.url_for(self.redis_url, creds.worker_user),
            SHELLQ_REDIS_PASSWORD_FILE=PASSWORD_FILE,
            SHELLQ_INSTANCE=instance,
        )
        environment.setdefault("SHELLQ_WORK_DIR", "/var/lib/shellq/session")
        container = self.docker.containers.create(
            self.image,
            name=f"shellq-{session}-{uuid.uuid4().hex[:6]}",
            labels={LABEL: session, INSTANCE_LABEL: instance},
            init=True,
            mem_limit=memory,
            nano_cpus=int(cpus * 1e9),
            pids_limit=pids,
            volumes=[_mount(m) for m in mounts],
            network_mode=network or self._default_network(),
            environment=environment,
            restart_policy={"Name": "on-failure", "MaximumRetryCount": 5},  # a worker that died restarts and recovers
            cap_drop=["ALL"],
            cap_add=list(WORKER_CAPABILITIES),
            security_opt=["no-new-privileges:true"],
        )
        container.put_archive("/", _password_archive(creds.worker_password))
        container.start()
        self._started[session] = container.id
        self._watch()
        deadline = time.monotonic() + start_timeout
        next_check = 0.0  # asking Docker costs ~10 ms; Redis is asked every 10 ms
        while self.redis.hget(keys.meta, "instance") != instance.encode():
            if time.monotonic() < next_check:
                time.sleep(0.01)
                continue
            next_check = time.monotonic() + 0.25
            container.reload()
            if container.status in ("exited", "dead") or time.monotonic() > deadline:
                tail = container.logs(tail=20).decode(errors="replace")
                self._remove(container.id)
                raise SessionStartError(
                    f"the container of session {session} did not start ({container.status}):\n{tail}"
                )
        self.redis.hset(keys.meta, mapping={"backend": self.name, "container": container.id})
        return str(container.id)

    def stop(self, session: str, timeout: float = 10.0) -> bool:
        """Stop and remove the session's containers (idempotent); returns whether one was there."""
        self._stopping.add(session)
        found = self.docker.containers.list(all=True, filters={"label": f"{LABEL}={session}"})
        for container in found:
            with contextlib.suppress(DockerException):
                container.stop(timeout=int(timeout))
            self._remove(container.id)
        self._started.pop(session, None)
        access.revoke(self.redis, session)
        return bool(found)

    def forget(self, session: str) -> None:
        """Leave the session's container running after this backend object is gone (the CLI's `session start`)."""
        self._started.pop(session, None)

    def gc(self) -> list[str]:
        """Remove containers whose session is gone or whose worker's heartbeat expired; returns their sessions."""
        removed = []
        self.redis.ping()  # without Redis no container can be judged
        for container in self.docker.containers.list(all=True, filters={"label": LABEL}):
            session = container.labels.get(LABEL, "")
            instance = container.labels.get(INSTANCE_LABEL, "")
            if not protocol.ID_PATTERN.match(session) or not self._alive(session, instance):
                self._remove(container.id)
                removed.append(session)
                if protocol.ID_PATTERN.match(session):
                    access.revoke(self.redis, session)
        return removed

    def close(self) -> None:
        """Remove every container this backend started (also run at interpreter exit)."""
        for session in list(self._started):
            with contextlib.suppress(DockerException, redis.RedisError):
                self.stop(session, timeout=2)

    # -- internals ------------------------------------------------------------------------------------------------

    def _check_image(self) -> None:
        """The worker image must be on this host: `containers.run` would otherwise try to pull it from a registry."""
        try:
            self.docker.images.get(self.image)
        except ImageNotFound:
            raise SessionStartError(
                f"no image {self.image} on this Docker host: build it with `shellq image build --tag {self.image}`"
                " (add --base IMAGE for another base than python:3.12-slim)"
            ) from None

    def _default_network(self) -> str:
        """host when Redis is on loopback (a bridge could not reach it), else Docker's default bridge."""
        host = urlsplit(self.redis_url).hostname or ""
        return "host" if host in ("localhost", "::1") or host.startswith("127.") else "bridge"

    def _alive(self, session: str, instance: str) -> bool:
        reply: Any = self.redis.hmget(protocol.keys(session).meta, "instance", "heartbeat_ms")
        found, beat = reply
        if not found or not beat or found.decode() != instance:
            return False
        now: Any = self.redis.time()
        return bool(int(now[0]) * 1000 - int(beat) < 30_000)

    def _remove(self, container_id: str) -> None:
        with contextlib.suppress(NotFound):
            self.docker.containers.get(container_id).remove(force=True)

    def _watch(self) -> None:
        """Watch Docker's events for the death of containers this backend started (one thread per backend)."""
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch_events, name="shellq-docker-events", daemon=True)
            self._watcher.start()

    def _watch_events(self) -> None:
        with contextlib.suppress(DockerException):
            for event in self.docker.events(decode=True, filters={"label": LABEL, "event": "die"}):
                attrs: dict[str, Any] = event.get("Actor", {}).get("Attributes", {})
                session, cid = attrs.get(LABEL, ""), event.get("id", "")
                if session in self._stopping or self._started.get(session) != cid:
                    continue
                code = attrs.get("exitCode", "?")
                if self._restarting(cid):
                    continue  # the worker died, not the container: the restarted worker settles what it left
                with contextlib.suppress(redis.RedisError):
                    reason = f"its container exited (code {code})"
                    n = answer_unavailable(self.redis, session, attrs.get(INSTANCE_LABEL, ""), reason)
                    log.warning(
                        "session %s: container %s died (code %s); %d commands answered unavailable",
                        session,
                        cid[:12],
                        code,
                        n,
                    )

    def _restarting(self, container_id: str) -> bool:
        """After a `die`: does Docker bring the container back (restart policy), or is it gone for good?"""
        time.sleep(0.5)
        try:
            state = self.docker.api.inspect_container(container_id)["State"]
        except NotFound:
            return False
        return bool(state.get("Restarting") or state.get("Running"))


def _mount(spec: str) -> str:
    """HOST:CTR[:ro] -> Docker's volume string (read-write unless `:ro`)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
        raise ConfigError(f"--mount wants HOST:CONTAINER[:ro], got {spec!r}")
    return spec if len(parts) == 3 else f"{spec}:rw"


def _password_archive(password: str) -> bytes:
    """A tar of PASSWORD_FILE holding `password`: root's, 0600, in a 0700 directory (the shell user cannot read it)."""
    data, out = (password + "\n").encode(), io.BytesIO()
    directory = os.path.dirname(PASSWORD_FILE).lstrip("/")
    with tarfile.open(fileobj=out, mode="w") as tar:
        folder = tarfile.TarInfo(directory)
        folder.type, folder.mode = tarfile.DIRTYPE, 0o700
        tar.addfile(folder)
        secret = tarfile.TarInfo(PASSWORD_FILE.lstrip("/"))
        secret.size, secret.mode = len(data), 0o600
        tar.addfile(secret, io.BytesIO(data))
    return out.getvalue()


def answer_unavailable(r: redis.Redis, session: str, instance: str, reason: str) -> int:
    """The session's environment is gone: answer each command it will never run `unavailable` and mark the session
    gone. Takes over the dead worker's lease (its token is the worker's instance id) so no commit is doubled."""
    keys = protocol.keys(session)
    holder: Any = r.get(keys.lease)
    if holder and holder.decode() != instance:
        return 0  # a live worker elsewhere holds the session
    token = f"reaper:{uuid.uuid4().hex[:8]}"
    protocol.load_functions(r.execute_command, redis.ResponseError)
    r.set(keys.lease, token, px=10_000)
    answered = 0
    pending: Any = r.xreadgroup(protocol.GROUP, "worker", {keys.cmd: "0"})
    while True:
        fresh: Any = r.fcall("shellq_take", 2, keys.cmd, keys.lease, protocol.CALLER, token, protocol.GROUP, "worker")
        if not fresh:
            break
        pending += fresh
    for _, entries in pending or []:
        for eid, raw in entries:
            fields = dict(zip(raw[::2], raw[1::2], strict=True)) if isinstance(raw, list) else (raw or {})
            entry_id = eid.decode()
            cid = protocol.command_id(entry_id, fields)
            result = protocol.CommandResult(id=cid, entry_id=entry_id, status="unavailable", error=reason)
            args: list[Any] = [protocol.CALLER, token, protocol.GROUP, entry_id, 7 * 86400, 10_000, cid]
            for name, value in protocol.encode(result).items():
                args += [name, value]
            r.fcall("shellq_commit", 5, keys.res, keys.jrnl(cid), keys.cmd, keys.lease, keys.meta, *args)
            answered += 1
    r.hset(keys.meta, mapping={"state": "gone", "error": reason, "current": ""})
    r.delete(keys.lease)
    return answered
