"""The Docker backend: one container per session, a sandbox, always removed.

The container runs the worker image (`shellq image build`) with an init that reaps zombies, limits (memory with
swap included, CPU, pids, disk), only the capabilities its worker needs, `no-new-privileges`, and no network: it
reaches Redis through Redis's unix socket, whose directory is mounted in, and nothing else (an explicit `network`
adds one). Start returns once the worker's heartbeat is seen. A container that dies while its session has commands
queued gets them answered `unavailable` at once (a watcher on Docker's event stream), so an agent never mistakes a
dead environment for a failing command or waits for nothing.

Containers carry `shellq.session=S` and `shellq.instance=<the Redis server's shellq id>`: many shellq servers can
share one engine, and stop, gc and cleanup only ever touch their own server's containers. So do the snapshot images
a fork starts from (containers/fork.py), which go when the fork's session stops.
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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import docker
import redis
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.types import Mount

from containers import access, images
from containers.local import SessionStartError
from worker import protocol
from worker.errors import ConfigError

log = logging.getLogger("shellq.containers")

LABEL = "shellq.session"
INSTANCE_LABEL = "shellq.instance"
"""The id of the shellq server (the Redis server, `server_id`) whose session a container runs."""
WORKER_LABEL = "shellq.worker"
"""The id its worker announces in the session's meta (`instance`): which container holds the session."""
SERVER_KEY = "shellq:server"
"""A hash on each Redis server shellq uses: `id`, made once, names that server's containers on shared engines."""
SOCKET_DIR = "/etc/shellq/redis"
"""Where the directory of Redis's unix socket is mounted (read-only) in a container: inside /etc/shellq (root's,
0700), so no shell user can reach it whatever the socket's owner and mode (a shell whose uid owns the socket would
otherwise open it, and could fill Redis's `maxclients`)."""
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
"""Where the worker's Redis password is put in its container (a volume of its own, so a read-only root works too),
before the container starts: root's, 0600."""


ORPHAN_AFTER = 30
"""Seconds without a heartbeat (or, for a container still starting, since it was created) after which `gc` takes
a container for an orphan."""
FORK_LABEL = "shellq.fork"
"""On a snapshot image (`shellq fork`, containers/fork.py): the session started from it, which owns it."""
SNAPSHOTS = "shellq-fork"
"""The repository of snapshot images, tagged `<server id>-<session>`; removed when their session stops or by `gc`."""


def server_id(r: redis.Redis) -> str:
    """This Redis server's shellq id (12 hex digits, made on first use and kept in `shellq:server`)."""
    r.hsetnx(SERVER_KEY, "id", uuid.uuid4().hex[:12])
    found: Any = r.hget(SERVER_KEY, "id")
    return str(found.decode())


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
        self._instance: str | None = None
        self._socket: Path | None = None
        self._layer_quota = True  # until the engine says its storage driver cannot bound a container's layer
        self._homes: dict[tuple[str, str], tuple[str, int, int]] = {}  # (image, user) -> home, uid, gid
        self._swap_checked = False
        self._started: dict[str, str] = {}  # session -> container id, for cleanup
        self._stopping: set[str] = set()
        self._watcher: threading.Thread | None = None
        atexit.register(self.close)

    def __enter__(self) -> DockerBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def instance(self) -> str:
        """The id of the shellq server this backend works for (`server_id` of its Redis); its containers' label."""
        if self._instance is None:
            self._instance = server_id(self.redis)
        return self._instance

    def start(
        self,
        session: str,
        *,
        memory: str = "2g",
        cpus: float = 1.0,
        pids: int = 512,
        disk: str | None = None,
        user: str = SHELL_USER,
        read_only: bool = False,
        mounts: Sequence[str] = (),
        network: str | None = None,
        env: dict[str, str] | None = None,
        start_timeout: float = 30.0,
        image: str | None = None,
    ) -> str:
        """Run the session's container and wait for its worker's heartbeat; returns the container id.

        memory: RAM, swap included (Docker's size strings: "512m", "2g"); cpus: CPUs' worth of time; pids: processes
        and threads; disk: what the shell may write ("10g"; None: no limit of shellq's): a quota on the container's
        layer where the storage driver has one, else bounded tmpfs mounts on the shell user's writable places (its
        home, /tmp, /var/tmp, /run/lock: each up to `disk`, counted in `memory`); user: the shell's user in the image
        ("root": weaker, see the README); read_only: a read-only root, with tmpfs where the shell and worker write;
        mounts: HOST:CTR[:ro] binds; network: a Docker network to join besides the way to Redis (None: none; "host"
        only when asked); image: this start's image (None: the backend's). Raises SessionStartError (with the
        container's last log lines) or ConfigError.
        """
        image = image or self.image
        self._check_image(image)
        self._stopping.discard(session)
        self._check_swap_limit()
        network_mode, binds, worker_url = self._route(network)
        existing = self._adoptable(session)
        if existing is not None and (adopted := self._adopt(session, existing, start_timeout)) is not None:
            return adopted
        worker = uuid.uuid4().hex[:16]
        creds = access.grant(self.redis, session)
        environment = {**(env or {}), "SHELLQ_SESSION": session}  # `env` may not name another session
        environment.pop("SHELLQ_SHELL_USER", None)
        if user != "root":
            environment["SHELLQ_SHELL_USER"] = user
        environment.update(
            SHELLQ_REDIS_URL=worker_url(creds.worker_user),
            SHELLQ_REDIS_PASSWORD_FILE=PASSWORD_FILE,
            SHELLQ_INSTANCE=worker,
        )
        environment.setdefault("SHELLQ_WORK_DIR", "/var/lib/shellq/session")
        if disk or read_only:  # the worker's spool of long output counts in the disk limit, or in memory
            spool = _bytes(disk) // 2 if disk else _bytes(memory) // 4
            environment["SHELLQ_SPOOL_QUOTA"] = str(min(spool, 1 << 30))
        options: dict[str, Any] = {
            "name": f"shellq-{self.instance}-{session}-{uuid.uuid4().hex[:6]}",
            "labels": {LABEL: session, INSTANCE_LABEL: self.instance, WORKER_LABEL: worker},
            "init": True,
            "mem_limit": memory,
            "memswap_limit": memory,  # the same figure: no swap beyond the memory limit
            "nano_cpus": int(cpus * 1e9),
            "pids_limit": pids,
            "mounts": [
                Mount(target=os.path.dirname(PASSWORD_FILE), source=None, type="volume"),
                *binds,
                *(_mount(m) for m in mounts),
            ],
            "read_only": read_only,
            "network_mode": network_mode,
            "environment": environment,
            "restart_policy": {"Name": "on-failure", "MaximumRetryCount": 5},  # a dead worker restarts and recovers
            "cap_drop": ["ALL"],
            "cap_add": list(WORKER_CAPABILITIES),
            "security_opt": ["no-new-privileges:true"],
        }
        container = None
        try:
            container = self._create(image, options, user, disk, memory)
            container.put_archive(os.path.dirname(PASSWORD_FILE), _password_archive(creds.worker_password))
            container.start()
        except BaseException:
            if container is not None:
                self._remove(container.id)
            access.revoke(self.redis, session)
            raise
        return self._wait_for_worker(session, container, worker, start_timeout)

    def _wait_for_worker(self, session: str, container: Any, worker: str, start_timeout: float) -> str:
        """Until the container's worker (instance id `worker`) announces itself in the session's meta; returns the
        container id. A container that exits first, or a timeout, is removed with the session's users, and raises
        SessionStartError with its last log lines."""
        keys = protocol.keys(session)
        self._started[session] = container.id
        self._watch()
        deadline = time.monotonic() + start_timeout
        next_check = 0.0  # asking Docker costs ~10 ms; Redis is asked every 10 ms
        while self.redis.hget(keys.meta, "instance") != worker.encode():
            if time.monotonic() < next_check:
                time.sleep(0.01)
                continue
            next_check = time.monotonic() + 0.25
            container.reload()
            crashed = container.attrs.get("RestartCount", 0) > 0  # its worker exited before it ever announced itself
            if container.status in ("exited", "dead") or crashed or time.monotonic() > deadline:
                tail = container.logs(tail=20).decode(errors="replace")
                self._remove(container.id)
                self._started.pop(session, None)
                access.revoke(self.redis, session)
                raise SessionStartError(
                    f"the container of session {session} did not start ({container.status}):\n{tail}"
                )
        self.redis.hset(keys.meta, mapping={"backend": self.name, "container": container.id})
        return str(container.id)

    def _adoptable(self, session: str) -> Any | None:
        """This server's container of the session that is there to keep (created, running or restarting: a start
        that was retried after its first try made it, or a session started twice); the others are removed."""
        keep = None
        for container in self._containers(session):
            if keep is None and container.status in ("created", "running", "restarting"):
                keep = container
            else:
                self._remove(container.id)
        return keep

    def _adopt(self, session: str, container: Any, start_timeout: float) -> str | None:
        """Keep the session's container and its worker (its password, read from the container, stays: the worker's
        connections too); returns its id, or None after removing a container whose password never arrived (its
        start was cut short: a new one is made)."""
        try:
            stream, stat = container.get_archive(PASSWORD_FILE)  # stat: Docker's, of the path
            plain = not stat.get("linkTarget") and not stat.get("mode", 0) & ~0o7777  # Go's FileMode: no type bits
            if stat.get("size", 0) > 4096 or not plain:  # a root shell swapped it for something else
                raise tarfile.TarError("not the password file")
            with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
                member = tar.extractfile(os.path.basename(PASSWORD_FILE))
                password = member.read(4096).decode().strip() if member else ""
        except (NotFound, APIError, tarfile.TarError, KeyError, UnicodeDecodeError):
            password = ""
        if not password:
            self._remove(container.id)
            return None
        access.grant(self.redis, session, worker_password=password)
        if container.status == "created":
            container.start()
        log.info("session %s: adopted its container %s", session, container.id[:12])
        return self._wait_for_worker(session, container, container.labels.get(WORKER_LABEL, ""), start_timeout)

    def stop(self, session: str, timeout: float = 10.0) -> bool:
        """Stop and remove the session's containers of this server, and its snapshot image when it is a fork
        (idempotent); returns whether a container was there."""
        self._stopping.add(session)
        found = self._containers(session)
        for container in found:
            with contextlib.suppress(DockerException):
                container.stop(timeout=int(timeout))
            self._remove(container.id)
        self._started.pop(session, None)
        access.revoke(self.redis, session)
        self._remove_snapshots(self._snapshots(session))
        return bool(found)

    def forget(self, session: str) -> None:
        """Leave the session's container running after this backend object is gone (the CLI's `session start`)."""
        self._started.pop(session, None)

    def gc(self, dry_run: bool = False) -> list[str]:
        """Remove this server's containers whose session is gone or whose worker's heartbeat expired (30 s), then
        its snapshot images (`shellq fork`) that no container uses; returns their sessions. `dry_run`: only say
        which."""
        removed = []
        self.redis.ping()  # without Redis no container can be judged
        for container in self._containers():
            session = container.labels.get(LABEL, "")
            if protocol.ID_PATTERN.match(session) and self._alive(session, container.labels.get(WORKER_LABEL, "")):
                continue
            if container.status in ("created", "running") and _age(container) < ORPHAN_AFTER:
                continue  # starting: its worker has not beaten yet
            removed.append(session)
            if dry_run:
                continue
            self._remove(container.id)
            if protocol.ID_PATTERN.match(session):
                access.revoke(self.redis, session)
        orphans = self._orphan_snapshots()
        removed += [s for s in orphans if s not in removed]
        if not dry_run:
            self._remove_snapshots(list(orphans.values()))
        return removed

    def close(self) -> None:
        """Remove every container this backend started (also run at interpreter exit)."""
        for session in list(self._started):
            with contextlib.suppress(DockerException, redis.RedisError):
                self.stop(session, timeout=2)

    def image_config(self, image: str) -> dict[str, Any] | None:
        """The image's configuration (Docker's `Config`: WorkingDir, User, Env, Labels...); None when this host has
        no such image."""
        return images.image_config(self.docker, image)

    def build_image(
        self, context: Path, tag: str, buildargs: dict[str, str], labels: dict[str, str] | None = None
    ) -> str:
        """Build `context`'s Dockerfile as `tag` on this engine (an image for sessions: FROM the worker image, say),
        without refreshing its base from a registry. Returns the image id; ImageBuildError when the build fails."""
        return images.docker_build(self.docker, context, tag, buildargs, labels)

    # -- internals ------------------------------------------------------------------------------------------------

    def _check_image(self, image: str) -> None:
        """The worker image must be on this host: `containers.run` would otherwise try to pull it from a registry."""
        try:
            self.docker.images.get(image)
        except ImageNotFound:
            raise SessionStartError(
                f"no image {image} on this Docker host: build it with `shellq image build --tag {image}`"
                " (add --base IMAGE for another base than python:3.12-slim)"
            ) from None

    def _check_swap_limit(self) -> None:
        """Docker drops `memory-swap` silently on a host without swap accounting (cgroup v1 without swapaccount=1):
        say so once, since memory then does not include swap."""
        if self._swap_checked:
            return
        self._swap_checked = True
        if self.docker.info().get("SwapLimit") is False:
            log.warning("this Docker host has no swap limit support: a session's memory limit does not include swap")

    def _containers(self, session: str | None = None) -> list[Any]:
        """This server's session containers (of one session, when given), running or not."""
        labels = [f"{INSTANCE_LABEL}={self.instance}", f"{LABEL}={session}" if session else LABEL]
        found: list[Any] = self.docker.containers.list(all=True, filters={"label": labels}, ignore_removed=True)
        return found

    def _snapshots(self, session: str | None = None) -> list[Any]:
        """This server's snapshot images (of one session, when given): tagged ones; an untagged one left as the
        parent of a fork of a fork goes when its last child does."""
        labels = [f"{INSTANCE_LABEL}={self.instance}", f"{FORK_LABEL}={session}" if session else FORK_LABEL]
        found: list[Any] = self.docker.images.list(filters={"label": labels})
        return found

    def _orphan_snapshots(self) -> dict[str, Any]:
        """session -> its snapshot image, for the snapshots no container of this server uses whose session has no
        container either, and no meta (a fork claims its session's meta before it makes the image) or an image
        older than ORPHAN_AFTER (a fork that died half way)."""
        containers = self._containers()
        used = {c.attrs.get("Image") for c in containers}
        alive = {c.labels.get(LABEL, "") for c in containers}
        orphans = {}
        for image in self._snapshots():
            session = image.labels.get(FORK_LABEL, "")
            if image.id in used or session in alive:
                continue
            known = protocol.ID_PATTERN.match(session) and self.redis.exists(protocol.keys(session).meta)
            if not known or _age(image) >= ORPHAN_AFTER:
                orphans[session] = image
        return orphans

    def _remove_snapshots(self, images: Sequence[Any]) -> None:
        """Remove snapshot images by their snapshot tags (one that is the parent of another snapshot only loses its
        tag; another tag someone gave it stays); one still in use stays for a later `gc`."""
        for image in images:
            for tag in (t for t in image.tags if t.startswith(f"{SNAPSHOTS}:")):
                try:
                    self.docker.images.remove(tag)
                except NotFound:
                    pass
                except APIError as e:
                    log.warning("snapshot image %s stays: %s", tag, e.explanation or e)

    def _create(self, image: str, options: dict[str, Any], user: str, disk: str | None, memory: str) -> Any:
        """containers.create, with the disk limit as a quota on the container's layer where the storage driver has
        one (learnt from the engine's answer), else as bounded tmpfs mounts (`_tmpfs`)."""
        if disk and self._layer_quota and not options["read_only"]:
            try:
                return self.docker.containers.create(image, storage_opt={"size": disk}, **options)
            except APIError as e:
                if "storage-opt" not in str(e):
                    raise
                self._layer_quota = False  # e.g. overlay2 on ext4: "supported only for overlay over xfs with pquota"
        tmpfs = self._tmpfs(image, user, disk, options["read_only"], memory)
        return self.docker.containers.create(image, tmpfs=tmpfs, **options)

    def _route(self, network: str | None) -> tuple[str, list[Mount], Any]:
        """How a container reaches Redis: (network mode, mounts, worker user -> worker URL). Through Redis's unix
        socket (its directory mounted read-only) when this backend's Redis has one on this machine, so the container
        needs no network at all; else over the `network` the caller names (which must reach Redis)."""
        socket_path = self._redis_socket()
        if socket_path is not None:
            db = self.redis.connection_pool.connection_kwargs.get("db", 0)
            inside = f"{SOCKET_DIR}/{socket_path.name}"

            def via_socket(user: str) -> str:
                return f"unix://{quote(user, safe='')}@{inside}?db={db}"

            source = Mount(SOCKET_DIR, str(socket_path.parent), type="bind", read_only=True)
            if volume := os.environ.get("SHELLQ_REDIS_SOCKET_VOLUME"):  # a manager in compose: Redis's volume
                source = Mount(SOCKET_DIR, volume, type="volume", read_only=True)
            return network or "none", [source], via_socket
        if network is None:
            host = urlsplit(self.redis_url).hostname or "localhost"
            raise ConfigError(
                f"a session container reaches Redis through Redis's unix socket, and the Redis at {host} has none"
                " on this machine: give it one (`unixsocket` in its config, in a directory of its own; `shellq up`"
                " does), or name a Docker network from which the container reaches it (--network NAME; the"
                " container then reaches whatever else that network reaches)"
            )
        return network, [], lambda user: access.url_for(self.redis_url, user)

    def _redis_socket(self) -> Path | None:
        """The unix socket of this backend's Redis server, when it has one on this machine (checked: the same
        server's run_id answers there) in a directory holding nothing else that a container must not see."""
        if self._socket is not None:
            return self._socket
        try:
            found: Any = self.redis.config_get("unixsocket")
            path = found.get("unixsocket")
            ours: Any = self.redis.info("server")
        except redis.ResponseError:  # NOPERM: an admin URL without CONFIG (a managed Redis)
            return None
        if not path or not os.path.exists(path):
            return None
        kwargs = self.redis.connection_pool.connection_kwargs
        probe = redis.Redis(
            unix_socket_path=path, username=kwargs.get("username"), password=kwargs.get("password"), socket_timeout=5
        )
        try:
            theirs: Any = probe.info("server")
        except redis.RedisError:
            return None
        finally:
            probe.close()
        if theirs.get("run_id") != ours.get("run_id"):
            return None
        socket_path = Path(path)
        if not socket_path.is_absolute():
            raise ConfigError(f"Redis's unix socket {path!r} is a relative path: give `unixsocket` an absolute one")
        others = [
            p.name
            for p in socket_path.parent.iterdir()
            if p != socket_path and not (p.suffix == ".pid" and p.is_file() and not p.is_symlink())
        ]
        if others:
            raise ConfigError(
                f"Redis's unix socket is in {socket_path.parent}, which also holds {', '.join(sorted(others)[:3])}:"
                " a session container gets that directory mounted; give the socket a directory of its own"
            )
        self._socket = socket_path
        return socket_path

    def _tmpfs(self, image: str, user: str, disk: str | None, read_only: bool, memory: str) -> dict[str, str]:
        """tmpfs mounts on every place the shell user may write in a Debian-like image (its home, /tmp, /var/tmp,
        /run/lock), each up to `disk`, for a read-only root or a disk limit without a layer quota; else none. A home
        outside /home (a system user's: /usr/sbin, /dev) is left alone."""
        if not (disk or read_only):
            return {}
        size = f"size={disk}," if disk else ""
        tmpfs = {path: f"{size}exec,mode=1777" for path in ("/tmp", "/var/tmp", "/run/lock")}
        home, uid, gid = self._user_home(image, user)
        if home.startswith("/home/") or home == "/root":
            tmpfs[home] = f"{size}exec,uid={uid},gid={gid},mode=0750"
        if read_only:  # the worker's directory (SHELLQ_WORK_DIR), its spool included: bounded below memory
            spool = _bytes(disk) if disk else _bytes(memory) // 4
            tmpfs["/var/lib/shellq"] = f"size={spool + (16 << 20)},mode=0755"
        return tmpfs

    def _user_home(self, image: str, user: str) -> tuple[str, int, int]:
        """(home, uid, gid) of `user` in the image, read from its /etc/passwd (a container created, never started;
        labelled with no session, so `gc` removes one left behind)."""
        if (image, user) in self._homes:
            return self._homes[image, user]
        labels = {LABEL: "", INSTANCE_LABEL: self.instance}
        probe = self.docker.containers.create(image, labels=labels, network_mode="none")
        try:
            stream, _ = probe.get_archive("/etc/passwd")
            with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
                member = tar.extractfile("passwd")
                text = member.read().decode(errors="replace") if member else ""
        finally:
            probe.remove(force=True)
        for line in text.splitlines():
            fields = line.split(":")
            if len(fields) >= 6 and user in (fields[0], fields[2]) and fields[2].isdigit() and fields[3].isdigit():
                self._homes[image, user] = fields[5] or "/", int(fields[2]), int(fields[3])
                return self._homes[image, user]
        if user.isdigit():  # a uid with no passwd entry (the worker accepts it): no home to bound
            return "/", int(user), int(user)
        raise ConfigError(f"no user {user!r} in image {image} (its /etc/passwd)")

    def _alive(self, session: str, instance: str) -> bool:
        reply: Any = self.redis.hmget(protocol.keys(session).meta, "instance", "heartbeat_ms")
        found, beat = reply
        if not found or not beat or found.decode() != instance:
            return False
        now: Any = self.redis.time()
        return bool(int(now[0]) * 1000 - int(beat) < ORPHAN_AFTER * 1000)

    def _remove(self, container_id: str) -> None:
        try:
            self.docker.containers.get(container_id).remove(force=True, v=True)  # v: its password volume too
        except NotFound:
            pass
        except APIError as e:
            if e.status_code != 409:  # 409: "removal already in progress" (a concurrent stop or gc): done anyway
                raise

    def _watch(self) -> None:
        """Watch Docker's events for the death of containers this backend started (one thread per backend)."""
        if self._watcher is None:
            self._watcher = threading.Thread(target=self.supervise, name="shellq-docker-events", daemon=True)
            self._watcher.start()

    def supervise(
        self, every_session: bool = False, stop: threading.Event | None = None, since: float | None = None
    ) -> None:
        """Answer `unavailable`, with the reason, the queued and running commands of a session whose container died
        for good (not restarted by its restart policy): the containers this backend started, or with `every_session`
        all of this server's (the manager: whoever started them). Blocks on Docker's event stream until `stop` is
        set (checked at each event and every 5 s) or, without `stop`, until the engine goes away. `since`: a Unix
        time; the events before it are not replayed."""
        after: str | None = None if since is None else f"{since:.9f}"  # events before it are not replayed
        while stop is None or not stop.is_set():
            until = time.time() + 5 if stop is not None else None
            try:
                mine = {"label": [LABEL, f"{INSTANCE_LABEL}={self.instance}"], "event": "die"}
                for event in self.docker.events(decode=True, filters=mine, since=after, until=until):
                    if nano := event.get("timeNano"):
                        seconds, ns = divmod(int(nano) + 1, 10**9)
                        after = f"{seconds}.{ns:09d}"  # the next event, not this one again
                    self._died(event, every_session)
            except DockerException as e:
                if stop is None:
                    return
                log.warning("Docker events: %s; watching again", e)
                stop.wait(1)
            if stop is None:
                return

    def _died(self, event: dict[str, Any], every_session: bool) -> None:
        try:
            self._answer_death(event, every_session)
        except Exception:  # one session's odd state (a root shell's garbage) must not end the supervision
            log.exception("could not settle the death of container %s", str(event.get("id", ""))[:12])

    def _answer_death(self, event: dict[str, Any], every_session: bool) -> None:
        attrs: dict[str, Any] = event.get("Actor", {}).get("Attributes", {})
        session, cid = attrs.get(LABEL, ""), event.get("id", "")
        if not protocol.ID_PATTERN.match(session) or session in self._stopping:
            return
        if not every_session and self._started.get(session) != cid:
            return
        if attrs.get("exitCode") == "0":
            return  # its worker exited as asked (a stop): it settled its commands and released the session
        reason = self._death(cid, attrs.get("exitCode", "?"))
        if reason is None:
            return  # the worker died, not the container: the restarted worker settles what it left
        with contextlib.suppress(redis.RedisError):
            n = answer_unavailable(self.redis, session, attrs.get(WORKER_LABEL, ""), reason)
            log.warning("session %s: container %s: %s; %d commands answered unavailable", session, cid[:12], reason, n)

    def _death(self, container_id: str, code: str) -> str | None:
        """After a `die`: None when Docker brings the container back (restart policy), else why it is gone for
        good: the OOM killer, a signal, its restarts used up, removed."""
        time.sleep(0.5)
        try:
            info = self.docker.api.inspect_container(container_id)
        except NotFound:
            return f"its container was removed (exit code {code})"
        state = info["State"]
        if state.get("Restarting") or state.get("Running"):
            return None
        if state.get("OOMKilled"):
            return f"its container was killed by the OOM killer (memory limit; exit code {code})"
        restarts, policy = info.get("RestartCount", 0), info["HostConfig"].get("RestartPolicy") or {}
        if restarts and restarts >= policy.get("MaximumRetryCount", 0) > 0:
            return f"its container exited (code {code}) after {restarts} restarts, the most its policy allows"
        if code in ("137", "143"):
            return f"its container was killed (exit code {code}: {'SIGKILL' if code == '137' else 'SIGTERM'})"
        return f"its container exited (code {code})"


def _mount(spec: str) -> Mount:
    """HOST:CTR[:ro] -> a bind mount (read-write unless `:ro`) of an absolute host path that must exist (Docker
    would create a missing one, and take a bare name for a named volume). Raises ConfigError."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
        raise ConfigError(f"--mount wants HOST:CONTAINER[:ro], got {spec!r}")
    if not parts[0].startswith("/") or not parts[1].startswith("/"):
        raise ConfigError(f"--mount wants absolute paths, got {spec!r}")
    if not os.path.exists(parts[0]):
        raise ConfigError(f"--mount {spec!r}: {parts[0]} does not exist")
    return Mount(parts[1], parts[0], type="bind", read_only=len(parts) == 3 and parts[2] == "ro")


def _password_archive(password: str) -> bytes:
    """A tar of PASSWORD_FILE's name holding `password`: root's, 0600 (the shell user cannot read it)."""
    data, out = (password + "\n").encode(), io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        secret = tarfile.TarInfo(os.path.basename(PASSWORD_FILE))
        secret.size, secret.mode = len(data), 0o600
        tar.addfile(secret, io.BytesIO(data))
    return out.getvalue()


def answer_unavailable(r: redis.Redis, session: str, instance: str, reason: str) -> int:
    """The session's environment is gone: answer each command it will never run `unavailable` and mark the session
    gone. Takes over the dead worker's lease (its token is the worker's instance id) so no commit is doubled."""
    keys = protocol.keys(session)
    holder: Any = r.get(keys.lease)
    if holder and holder != instance.encode():
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
    if r.exists(keys.meta):  # a session deleted meanwhile (`session stop`) is not brought back
        r.hset(keys.meta, mapping={"state": "gone", "error": reason, "current": ""})
    r.delete(keys.lease)
    return answered


def _bytes(size: str) -> int:
    """Docker's size strings ("512m", "2g", "1024", "64k"; binary units) -> bytes. Raises ConfigError."""
    text = size.strip().lower().removesuffix("b")
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    scale = units.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in units else text
    try:
        return int(float(number) * scale)
    except ValueError:
        raise ConfigError(f"not a size: {size!r} (say 512m, 2g)") from None


def _age(container: Any) -> float:
    """Seconds since the container was created (Docker's `Created`, RFC 3339 in UTC)."""
    created = str(container.attrs.get("Created", ""))[:19]
    try:
        made = datetime.fromisoformat(created).replace(tzinfo=timezone.utc)
    except ValueError:
        return float("inf")
    return (datetime.now(timezone.utc) - made).total_seconds()
