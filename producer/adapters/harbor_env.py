"""`ShellqEnvironment`: Harbor's environment (the harness of Terminal-Bench 2.0) as a shellq session in a container.

    harbor run --path TASKS --agent oracle --env producer.adapters.harbor_env:ShellqEnvironment --ek image=IMAGE

Each trial gets a session of its own, `harbor-<16 hex>`, started on the Docker backend in `start` and stopped, its
keys deleted, in `stop`; Redis comes from SHELLQ_REDIS_URL (or `shellq up`, or `--ek redis_url=`). Harbor's calls
go through the public async client (`AsyncSession`), the backend's blocking calls through `asyncio.to_thread`:

- The image: `--ek image=` (a worker image, `shellq image build`), else the task's `docker_image`, which must be
  one. A task's `environment/Dockerfile` is built on it, never pulling (`ARG SHELLQ_WORKER_IMAGE` then
  `FROM ${SHELLQ_WORKER_IMAGE}`: the worker comes from there). Compose tasks are refused.
- `exec` is stateless, as `docker exec` is: `bash -c CMD` in a child of the worker, as the user (Harbor's, else
  the `user` option, root), in `cwd` (else the task's workdir, else the image's, else /app), with the task's and
  the call's variables; the session's shell keeps its state. Past `timeout_sec` the command is killed and
  RuntimeError raised, as Harbor's Docker environment does; a cancelled exec (Harbor's agent timeout) interrupts it.
- Files and directories move through shellq's file operations (`upload`/`download`, chunked), as root like
  `docker cp`. Nothing is mounted from the host: Harbor downloads /logs itself. /logs/{agent,verifier,artifacts},
  /tests, /solution and /app (when the image lacks it) are made writable by anyone, for non-root agents.
- The container has no network for a `no-network` task; a public one joins `network` (Docker's `bridge`).

Harbor needs Python >= 3.12; `import producer` does not import this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import posixpath
import re
import shlex
import threading
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from harbor.environments.base import BaseEnvironment, ExecResult  # type: ignore[import-not-found,import-untyped,unused-ignore]
from harbor.environments.capabilities import (  # type: ignore[import-not-found,import-untyped,unused-ignore]
    EnvironmentCapabilities,
    EnvironmentResourceCapabilities,
)
from harbor.environments.options import EnvironmentOptions  # type: ignore[import-not-found,import-untyped,unused-ignore]
from harbor.models.task.config import NetworkMode  # type: ignore[import-not-found,import-untyped,unused-ignore]
from pydantic import Field

from containers import embedded
from producer.admin import delete_session
from producer.aio import AsyncClient, AsyncSession
from producer.client import Client
from producer.result import Result
from worker import protocol
from worker.errors import ConfigError, SessionFileError

if TYPE_CHECKING:
    from containers.docker_backend import DockerBackend

PREFIX = "harbor-"
"""Every session this environment starts is named `harbor-<16 hex>`."""
WORKER_IMAGE_ARG = "SHELLQ_WORKER_IMAGE"
"""The build argument a task's Dockerfile gets: the worker image to build FROM."""
BUILT_LABEL = "shellq.harbor.worker"
"""On an image built from a task's Dockerfile: the worker image it was built on."""
APP_DIR = "/app"
"""Where Harbor's tasks keep their work (Terminal-Bench's images' WORKDIR): made, writable by anyone, if missing, and
where commands start when neither the task nor the image names a working directory."""
FILE_USER = "root"
"""Who writes and reads the files Harbor moves (`docker cp` ignores the container's users too)."""


class ShellqOptions(EnvironmentOptions):  # type: ignore[misc,unused-ignore]
    """`--ek key=value` options of ShellqEnvironment."""

    image: str | None = None
    """The worker image (default: the task's `docker_image`, else `shellq-worker:latest`)."""
    redis_url: str | None = None
    """The Redis of the sessions (default: SHELLQ_REDIS_URL, else `shellq up`'s). Harbor writes options into the
    job's config.json: prefer the variable for a URL with a password."""
    user: str = "root"
    """Who runs a command Harbor gives no user (Docker's default user of most task images)."""
    network: str = "bridge"
    """The Docker network a task with public network access joins (a `no-network` task gets none)."""
    memory: str = "2g"
    """RAM with swap included when the task gives no `memory_mb`."""
    cpus: float = Field(default=1.0, gt=0)
    """CPUs when the task gives no `cpus`."""
    start_timeout: float = Field(default=60.0, gt=0)
    """Seconds a container's worker may take to start."""


class ShellqEnvironment(BaseEnvironment):  # type: ignore[misc,unused-ignore]
    """One trial's shellq session in a container of its own."""

    options_model: ClassVar[type[EnvironmentOptions]] = ShellqOptions
    _build_locks: ClassVar[dict[str, asyncio.Lock]] = {}

    _session: AsyncSession | None = None
    _backend: DockerBackend | None = None
    _starting: asyncio.Future[str] | None = None
    _workdir = APP_DIR

    @staticmethod
    def type() -> str:
        return "shellq"

    @property
    def capabilities(self) -> EnvironmentCapabilities:
        return EnvironmentCapabilities(disable_internet=True)

    @classmethod
    def resource_capabilities(cls) -> EnvironmentResourceCapabilities:
        return EnvironmentResourceCapabilities(cpu_limit=True, memory_limit=True, fractional_cpus=True)

    @classmethod
    def preflight(cls, kwargs: dict[str, Any] | None = None) -> None:
        """Options valid and a Redis named, before Harbor queues any trial."""
        super().preflight(kwargs)
        options = cls.parse_options(kwargs)
        assert isinstance(options, ShellqOptions)
        embedded.client_url(options.redis_url, "pass --ek redis_url=...")

    @property
    def opts(self) -> ShellqOptions:
        assert isinstance(self.options, ShellqOptions)
        return self.options

    def _validate_definition(self) -> None:
        if (self.environment_dir / "docker-compose.yaml").exists() or self.extra_docker_compose_paths:
            raise ValueError("shellq runs one container per trial: Docker Compose tasks are not supported")

    # -- lifecycle ---------------------------------------------------------------------------------------------

    async def start(self, force_build: bool) -> None:
        """Build the task's Dockerfile if it has one, start the session and make Harbor's directories."""
        url = embedded.client_url(self.opts.redis_url, "pass --ek redis_url=...")
        self._backend = backend = await asyncio.to_thread(_docker_backend, url)
        image = await self._image(backend, force_build)
        session = AsyncClient(url).session(f"{PREFIX}{uuid.uuid4().hex[:16]}")
        self._session = session
        self.logger.info(f"{self.session_id}: shellq session {session.id} on {image}")
        policy = self.network_policy.network_mode
        start = functools.partial(
            backend.start,
            session.id,
            image=image,
            memory=f"{mb}m" if (mb := self._effective_memory_mb) else self.opts.memory,
            cpus=float(self._effective_cpus or self.opts.cpus),
            network=None if policy == NetworkMode.NO_NETWORK else self.opts.network,
            mounts=[f"{m['source']}:{m['target']}{':ro' if m.get('read_only') else ''}" for m in self._binds()],
            env={"SHELLQ_ROOT_COMMANDS": "true"},  # Harbor runs its own steps as root (chmod, reward files)
            start_timeout=self.opts.start_timeout,
        )
        # a cancelled start (Harbor's build timeout) goes on in its thread: `stop` waits for it, then stops
        self._starting = asyncio.ensure_future(asyncio.to_thread(start))
        await asyncio.shield(self._starting)
        workdir = self.task_env_config.workdir
        self._workdir = workdir if workdir else await asyncio.to_thread(_image_workdir, backend, image)
        made = [self._workdir, APP_DIR]  # writable by anyone if the image lacks them; Harbor's directories always
        writable = [*self._mount_targets(writable_only=True), "/tests", "/solution"]
        script = f'for d in {shlex.join(made)}; do [ -d "$d" ] || {{ mkdir -p "$d" && chmod 777 "$d"; }}; done'
        for command in (script, self._ensure_dirs_command(writable)):
            if (done := await self.exec(command, "/", user="root")).return_code != 0:
                raise RuntimeError(f"{self.session_id}: could not make Harbor's directories: {done.stderr}")
        await self._upload_environment_dir_after_start()

    async def stop(self, delete: bool) -> None:
        """Stop the container and delete the session's keys (an image built for the task stays, for the next)."""
        session, backend = self._session, self._backend
        if session is None or backend is None:
            return
        self._session = None
        try:
            if self._starting is not None:
                with contextlib.suppress(Exception):
                    await self._starting
            await session.client.aclose()
        finally:
            await asyncio.shield(asyncio.to_thread(_stop, backend, session.client.settings.redis_url, session.id))

    # -- commands and files --------------------------------------------------------------------------------------

    async def exec(
        self,
        command: str,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        timeout_sec: int | None = None,
        user: str | int | None = None,
    ) -> ExecResult:
        session = self._live()
        user = self._resolve_user(user)
        cid = f"hb-{uuid.uuid4().hex}"
        run = session.run(
            command,
            min(timeout_sec or protocol.MAX_TIMEOUT, protocol.MAX_TIMEOUT),
            id=cid,
            env=self._merge_env(env),
            cwd=cwd or self._workdir,
            user=str(user if user is not None else self.opts.user),
        )
        try:
            r = await run
            result = _exec_result(r, timeout_sec, session.id)
            if r.truncated and r.spool_path:  # past shellq's 1 MiB cap: the whole, as `docker exec` gives it
                result.stdout = await _whole(session, r, "stdout") or None
                result.stderr = await _whole(session, r, "stderr") or None
            return result
        except asyncio.CancelledError:  # Harbor's own timeout: the command must not hold the session's queue
            await asyncio.shield(session.interrupt(cid))
            raise

    async def upload_file(self, source_path: Path | str, target_path: str) -> None:
        await self._live().upload(source_path, target_path, user=FILE_USER)

    async def upload_dir(self, source_dir: Path | str, target_dir: str) -> None:
        await self._live().upload(source_dir, target_dir, user=FILE_USER)

    async def download_file(self, source_path: str, target_path: Path | str) -> None:
        await self._live().download(source_path, target_path, user=FILE_USER)

    async def download_dir(self, source_dir: str, target_dir: Path | str) -> None:
        await self._live().download(source_dir, target_dir, user=FILE_USER)

    # -- helpers -------------------------------------------------------------------------------------------------

    def _live(self) -> AsyncSession:
        if self._session is None:
            raise RuntimeError(f"{self.session_id}: the shellq environment is not started")
        return self._session

    def _binds(self) -> Sequence[Mapping[str, Any]]:
        binds = [m for m in self._host_mounts if m.get("type") == "bind"]
        if len(binds) != len(self._host_mounts):
            raise ValueError("shellq mounts host directories only (type: bind)")
        return binds

    async def _image(self, backend: DockerBackend, force_build: bool) -> str:
        """The session's image: the worker image, or the task's Dockerfile built on it (once per content)."""
        worker_image = self.opts.image or self.task_env_config.docker_image or "shellq-worker:latest"
        if not (self.environment_dir / "Dockerfile").exists():
            return worker_image
        seed = f"{self.environment_id} {worker_image} {BUILT_LABEL}".encode()
        name = re.sub(r"[^a-z0-9_.-]+", "-", self.environment_name.lower())[:40].strip(".-") or "task"
        tag = f"shellq-harbor:{name}-{hashlib.sha256(seed).hexdigest()[:12]}"
        async with self._build_locks.setdefault(tag, asyncio.Lock()):
            await asyncio.to_thread(_build, backend, self.environment_dir, worker_image, tag, force_build)
        return tag


def _exec_result(r: Result, timeout_sec: int | None, session: str) -> ExecResult:
    """Harbor's ExecResult for a command's result; what Harbor's Docker environment raises, it raises."""
    if r.status == "timeout":
        raise RuntimeError(f"Command timed out after {timeout_sec} seconds")
    if r.status == "rejected":  # an unknown user: `docker exec --user` exits 126 too
        return ExecResult(stdout=None, stderr=f"{r.error}\n", return_code=126)
    if r.status != "completed" or r.exit_code is None:
        raise RuntimeError(f"shellq session {session}: the command ended {r.status}: {r.error or ''}".rstrip(": "))
    return ExecResult(stdout=r.stdout or None, stderr=r.stderr or None, return_code=r.exit_code)


async def _whole(session: AsyncSession, r: Result, stream: str) -> str:
    """A stream of a truncated result, whole from its spool (what the result kept when the spool is gone)."""
    kept: str = getattr(r, stream)
    assert r.spool_path is not None
    try:
        data = await session.read_file(posixpath.join(r.spool_path, stream), user=FILE_USER)
    except SessionFileError:
        return kept
    return data.decode(errors="replace") if len(data) == getattr(r, f"{stream}_size") else kept


_backends: dict[str, DockerBackend] = {}
_backends_lock = threading.Lock()


def _docker_backend(url: str) -> DockerBackend:
    """This process's Docker backend for Redis `url` (blocking: it asks the engine)."""
    from containers.docker_backend import DockerBackend

    with _backends_lock:
        if url not in _backends:
            _backends[url] = DockerBackend(url)
        return _backends[url]


def _image_workdir(backend: DockerBackend, image: str) -> str:
    """The image's WORKDIR (APP_DIR when it has none)."""
    config = backend.image_config(image) or {}
    return str(config.get("WorkingDir") or APP_DIR)


def _build(backend: DockerBackend, context: Path, worker_image: str, tag: str, force: bool) -> None:
    """Build a task's Dockerfile on the worker image as `tag` (kept: later trials reuse it); ImageBuildError."""
    built = None if force else backend.image_config(tag)
    if built is None:
        backend.build_image(context, tag, {WORKER_IMAGE_ARG: worker_image}, {BUILT_LABEL: worker_image})
        built = backend.image_config(tag) or {}
    if (built.get("Labels") or {}).get("shellq.image") != "worker":
        raise ConfigError(
            f"{context}/Dockerfile makes an image without shellq's worker: start it with `ARG {WORKER_IMAGE_ARG}` "
            f"and `FROM ${{{WORKER_IMAGE_ARG}}}`, or build it, add the worker (`shellq image build --base IMAGE "
            "--tag IMAGE-shellq`) and pass `--ek image=IMAGE-shellq`"
        )


def _stop(backend: DockerBackend, url: str, session: str) -> None:
    """Stop the session's container and delete its keys."""
    backend.stop(session)
    with Client(url) as client:
        delete_session(client, session)
