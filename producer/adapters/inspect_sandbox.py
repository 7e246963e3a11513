"""The Inspect AI sandbox provider `shellq`: `Task(..., sandbox="shellq")` or `inspect eval --sandbox shellq`.

Each sample gets a shellq session of its own, `inspect-<16 hex>` (a container with the Docker backend, the default;
a worker process on this machine with the local backend), started in `sample_init` and stopped, its keys deleted,
in `sample_cleanup`; `inspect sandbox cleanup shellq` removes what an eval left behind. Inspect's calls go through
the public async client (`AsyncSession`), the backends' blocking calls through `asyncio.to_thread`:

- `exec` is stateless, as Inspect requires: it runs in a subshell of the session's shell,
  `( export K=V && cd -- DIR && exec -- CMD... )`, so the shell keeps its directory and variables; `user=` runs
  it in a child of the worker as that user. A command past its `timeout` is killed with its process group by the
  worker: TimeoutError. shellq keeps 1 MiB of each stream (head and tail) and spools the rest: up to Inspect's
  limit (10 MiB) the whole comes from the spool, past it OutputLimitExceededError.
- `read_file`/`write_file` are shellq's file operations, as the shell's user; their errors are the builtin ones,
  naming the path as given. Relative paths resolve against the shell's directory when the sample started.
- `connection()` is `shellq attach <session>`.

Inspect imports this module through the `inspect_ai` entry point, which registers the provider (the one side
effect of importing it); `import producer` does not import it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import posixpath
import pwd
import shlex
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, overload

import anyio
from inspect_ai.util import (
    ExecResult,
    OutputLimitExceededError,
    SandboxConnection,
    SandboxEnvironment,
    SandboxEnvironmentConfigType,
    SandboxEnvironmentLimits,
    SandboxUnavailableError,
    SandboxUserUnsupportedError,
    sandboxenv,
)
from inspect_ai.util._sandbox._cli import SANDBOX_CLI, SANDBOX_TOOLS_DIR
from inspect_ai.util._sandbox.events import SandboxTimeoutError
from inspect_ai.util._sandbox.lifecycle import sandbox_lifecycle_state
from pydantic import BaseModel, ConfigDict, Field, model_validator

from containers import embedded
from containers.local import LocalBackend
from producer.admin import delete_session, session_names
from producer.aio import AsyncClient, AsyncSession
from producer.client import Client
from producer.result import Result
from worker import protocol
from worker.errors import ConfigError, NoWorkerError, RedisUnavailableError, SessionFileError, SessionStateLostError

if TYPE_CHECKING:
    from containers.docker_backend import DockerBackend

    Backend: TypeAlias = LocalBackend | DockerBackend

log = logging.getLogger("shellq.producer")

PREFIX = "inspect-"
"""Every session this provider starts is named `inspect-<16 hex>`: how `cli_cleanup` knows its own."""
TOOLS_STOP_TIMEOUT = 55
"""Seconds Inspect's sandbox-tools server may take to stop (Inspect's local sandbox allows as much)."""


class ShellqSandboxConfig(BaseModel):
    """The configuration of the `shellq` sandbox: `SandboxEnvironmentSpec("shellq", ShellqSandboxConfig(...))`,
    or a YAML file of these fields (`--sandbox shellq:shellq.yaml`)."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    backend: Literal["docker", "local"] = "docker"
    """Where each sample's session runs: `docker`, a container (the model's commands are isolated and limited);
    `local`, a worker process on this machine (no isolation: for trusted code and development)."""
    image: str | None = None
    """The worker image (docker; default: the Docker backend's, `shellq image build`)."""
    user: str | None = None
    """The shell's user: the default user of exec and of the file operations. Default: `shellq`, the image's
    non-root user (docker); the user running Inspect (local; another user needs Inspect running as root)."""
    root_commands: bool = False
    """Let `exec(user="root")` run as root where the shell runs as another user (SHELLQ_ROOT_COMMANDS; root there
    can read the worker's Redis credentials). Without it such a call raises SandboxUserUnsupportedError, and the
    tools Inspect injects (bash_session, text_editor) run as the default user."""
    redis_url: str | None = Field(default=None, exclude=True)
    """The Redis that holds the sessions, with admin credentials. Default: SHELLQ_REDIS_URL, else the server of
    `shellq up`. Never written to the eval log (Inspect logs the config, and the URL may hold a password)."""
    memory: str | None = None
    """RAM with swap included, as Docker writes it ("2g"; docker; default 2g)."""
    cpus: float | None = None
    """CPUs' worth of time (docker; default 1)."""
    pids: int | None = None
    """Processes and threads (docker; default 512)."""
    disk: str | None = None
    """What the shell may write ("10g"; docker; default: no limit of shellq's)."""

    @model_validator(mode="after")
    def _docker_only(self) -> ShellqSandboxConfig:
        given = [name for name in ("image", "memory", "cpus", "pids", "disk") if getattr(self, name) is not None]
        if self.backend == "local" and given:
            raise ValueError(f"{', '.join(given)}: the local backend runs no container (backend: docker has them)")
        return self


@sandboxenv(name="shellq")
class ShellqSandboxEnvironment(SandboxEnvironment):
    """One sample's shellq session."""

    def __init__(self, session: AsyncSession, backend: Backend, config: ShellqSandboxConfig, url: str) -> None:
        super().__init__()
        self.session = session
        self.config = config
        self._backend, self._url = backend, url
        self._working_dir = "/"
        self._starting: asyncio.Future[Any] | None = None
        self._tools_user_seen: str | None = None
        self._tools_used = False  # local backend: Inspect's sandbox-tools server runs here (as _tools_user_seen)
        self._closed = False

    # -- Inspect's lifecycle ------------------------------------------------------------------------------------

    @classmethod
    def config_deserialize(cls, config: dict[str, Any]) -> BaseModel:
        return ShellqSandboxConfig.model_validate(config)

    @classmethod
    def default_concurrency(cls) -> int | None:
        return 2 * (os.cpu_count() or 1)  # as Inspect's Docker provider: each sample runs a worker

    @classmethod
    async def task_init(cls, task_name: str, config: SandboxEnvironmentConfigType | None) -> None:
        """Fail early: the configuration reads, Redis answers, and so does the Docker engine (docker)."""
        cfg = _config(config)
        url = embedded.client_url(cfg.redis_url, "give redis_url")
        await asyncio.to_thread(_backend, cfg.backend, url)
        async with AsyncClient(url) as client:
            await client.send(("PING",))

    @classmethod
    async def sample_init(
        cls, task_name: str, config: SandboxEnvironmentConfigType | None, metadata: dict[str, str]
    ) -> dict[str, SandboxEnvironment]:
        cfg = _config(config)
        url = embedded.client_url(cfg.redis_url, "give redis_url")
        backend = await asyncio.to_thread(_backend, cfg.backend, url)
        env = cls(AsyncClient(url).session(f"{PREFIX}{uuid.uuid4().hex[:16]}"), backend, cfg, url)
        _live().sessions[env.session.id] = env
        try:  # a cancelled start goes on in its thread: `_close` waits for it before stopping the session
            env._starting = asyncio.ensure_future(asyncio.to_thread(_start, backend, cfg, env.session.id))
            await asyncio.shield(env._starting)
            probe = await env.session.run("true", timeout=60)
            if not probe.ok or probe.cwd is None:
                raise SandboxUnavailableError(f"shellq session {env.session.id} did not answer: {probe.status}")
            env._working_dir = probe.cwd
        except BaseException:
            with anyio.CancelScope(shield=True):
                await env._close(interrupted=True)
            raise
        return {"default": env}

    @classmethod
    async def sample_cleanup(
        cls,
        task_name: str,
        config: SandboxEnvironmentConfigType | None,
        environments: dict[str, SandboxEnvironment],
        interrupted: bool,
    ) -> None:
        for env in environments.values():
            await env.as_type(ShellqSandboxEnvironment)._close(interrupted)

    @classmethod
    async def task_cleanup(cls, task_name: str, config: SandboxEnvironmentConfigType | None, cleanup: bool) -> None:
        """Stop the sessions no sample cleanup stopped; with `--no-sandbox-cleanup`, say which are left running."""
        left = list(_live().sessions.values())
        for env in left:
            if cleanup:
                await env._close(interrupted=True)
            else:
                env._leave_running()
        if left and not cleanup:
            print(f"shellq sessions left running: {' '.join(env.session.id for env in left)}")
            print("`shellq attach <session>` enters one; `inspect sandbox cleanup shellq` removes them")

    @classmethod
    async def cli_cleanup(cls, id: str | None) -> None:
        """Stop `id`, or every session this provider started (`inspect-…`) on the Redis of SHELLQ_REDIS_URL (or
        `shellq up`), and delete their keys."""
        if id is not None and not id.startswith(PREFIX):
            raise ConfigError(f"{id} is not a session of Inspect's (they are named {PREFIX}…)")
        removed = await asyncio.to_thread(_cli_cleanup, id, embedded.client_url(None, "give redis_url"))
        print("\n".join(f"shellq session {name} removed" for name in removed) or "no shellq session to remove")

    # -- the sandbox ---------------------------------------------------------------------------------------------

    async def exec(
        self,
        cmd: list[str],
        input: str | bytes | None = None,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        user: str | None = None,
        timeout: int | None = None,
        timeout_retry: bool = True,
        concurrency: bool = True,
    ) -> ExecResult[str]:
        """Run `cmd` in a subshell of the session's shell (as `user`: in a child of the worker), stateless.
        `timeout_retry` has nothing to retry (Docker's retries a hung daemon; a shellq timeout is the command's)."""
        if not cmd:
            raise ValueError("cmd must not be empty")
        env = {**(env or {}), **self._tools_env(cmd, user)}
        if any("\0" in s for s in (*cmd, *env, *env.values(), cwd or "")):
            raise ValueError("embedded null byte")
        text = _subshell(cmd, self._path(cwd or "."), env)
        stdin = input.encode() if isinstance(input, str) else input
        try:  # no timeout: the largest a worker accepts by default (a day)
            r = await self.session.run(text, timeout or protocol.MAX_TIMEOUT, stdin=stdin, user=user)
        except (NoWorkerError, RedisUnavailableError, SessionStateLostError) as e:
            raise SandboxUnavailableError(f"shellq session {self.session.id}: {e}") from e
        if (code := self._exit_code(r, user, timeout)) is None:
            return ExecResult(False, 126, "", f"{r.error}\n")  # an unknown user, as `docker exec --user` says it
        result = ExecResult(code == 0, code, await self._output(r, "stdout"), await self._output(r, "stderr"))
        if code == 126 and f"exec: {cmd[0]}: cannot execute: Permission denied" in result.stderr:
            raise PermissionError(f"Permission denied executing command: {result}")
        return result

    async def write_file(self, file: str, contents: str | bytes) -> None:
        data = contents.encode() if isinstance(contents, str) else contents
        try:
            await self.session.write_file(self._path(file), data)
        except SessionFileError as e:
            raise _as_given(e, file) from e

    @overload
    async def read_file(self, file: str, text: Literal[True] = True) -> str: ...

    @overload
    async def read_file(self, file: str, text: Literal[False]) -> bytes: ...

    async def read_file(self, file: str, text: bool = True) -> str | bytes:
        limit = SandboxEnvironmentLimits.MAX_READ_FILE_SIZE
        try:
            if (await self.session.stat(self._path(file))).size > limit:
                raise OutputLimitExceededError(SandboxEnvironmentLimits.MAX_READ_FILE_SIZE_STR, truncated_output=None)
            data = await self.session.read_file(self._path(file), max_bytes=limit + 1)  # it may grow meanwhile
        except SessionFileError as e:
            raise _as_given(e, file) from e
        if len(data) > limit:
            raise OutputLimitExceededError(SandboxEnvironmentLimits.MAX_READ_FILE_SIZE_STR, truncated_output=None)
        return data.decode("utf-8") if text else data

    async def connection(self, *, user: str | None = None) -> SandboxConnection:
        """`shellq attach <session>`: a prompt on the session's shell, as its user (SHELLQ_REDIS_URL set)."""
        if user is not None and user != _shell_user(self.config):
            raise NotImplementedError(f"shellq attach runs commands as the session's shell user, not {user}")
        if not await self.session.worker_alive():
            raise ConnectionError(f"shellq session {self.session.id} is not running")
        return SandboxConnection(type="shellq", command=shlex.join(["shellq", "attach", self.session.id]))

    def default_polling_interval(self) -> float:
        return 0.2

    # -- internals -------------------------------------------------------------------------------------------------

    def _path(self, path: str) -> str:
        """`path` resolved against the directory the shell started in (a person in `shellq attach` may `cd`)."""
        return posixpath.join(self._working_dir, path)

    def _tools_env(self, cmd: list[str], user: str | None) -> dict[str, str]:
        """Local backend: the server of Inspect's sandbox tools gets a directory per session (the machine's
        /var/tmp is shared), as Inspect's own local sandbox does, and is stopped at cleanup."""
        if not isinstance(self._backend, LocalBackend) or cmd[0] != SANDBOX_CLI:
            return {}
        self._tools_used, self._tools_user_seen = True, user
        return {"INSPECT_SANDBOX_TOOLS_DIR": self._tools_dir}

    @property
    def _tools_dir(self) -> str:
        return f"{SANDBOX_TOOLS_DIR}/.shellq-{self.session.id}"

    def _exit_code(self, r: Result, user: str | None, timeout: int | None) -> int | None:
        """The command's exit status (130: someone interrupted it); None for a user the session does not know. A
        timeout raises TimeoutError, a root the session refuses SandboxUserUnsupportedError, a session that could
        not run it SandboxUnavailableError."""
        if r.status == "timeout":
            output = (r.stdout + r.stderr) or None
            raise SandboxTimeoutError(f"Command timed out after {timeout} seconds", truncated_output=output)
        if r.status == "rejected" and user and (r.error or "").startswith(f"user={user}:"):
            if "SHELLQ_ROOT_COMMANDS" in (r.error or ""):
                raise SandboxUserUnsupportedError(f"shellq session {self.session.id}: {r.error}")
            return None
        if r.status == "cancelled":
            return 130 if r.exit_code is None else r.exit_code
        if r.exit_code is None or r.status not in ("completed", "shell_exited"):
            raise SandboxUnavailableError(f"shellq session {self.session.id}: {r.status}: {r.error}")
        return r.exit_code

    async def _output(self, r: Result, stream: Literal["stdout", "stderr"]) -> str:
        """The whole of a stream: the result's, or past shellq's cap the spool's, up to Inspect's limit."""
        kept: bytes = getattr(r, f"{stream}_bytes")
        size: int = getattr(r, f"{stream}_size")
        if size == len(kept):
            return kept.decode(errors="replace")
        limit = SandboxEnvironmentLimits.MAX_EXEC_OUTPUT_SIZE
        if size <= limit and r.spool_path is not None:
            with contextlib.suppress(SessionFileError):
                whole = await self.session.read_file(posixpath.join(r.spool_path, stream), max_bytes=size)
                if len(whole) == size:
                    return whole.decode(errors="replace")
        # over Inspect's limit, or (a spool evicted) no whole to read: the head, as Inspect's proxy keeps
        limit_str = SandboxEnvironmentLimits.MAX_EXEC_OUTPUT_SIZE_STR if size > limit else f"{len(kept)} bytes"
        raise OutputLimitExceededError(limit_str, truncated_output=kept[: len(kept) // 2].decode(errors="replace"))

    async def _close(self, interrupted: bool) -> None:
        """Stop Inspect's tools server (local), then the session, and delete its keys; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._starting is not None:
            with contextlib.suppress(Exception):
                await self._starting
        try:
            if self._tools_used:
                await self._stop_tools(5 if interrupted else TOOLS_STOP_TIMEOUT)
            await self.session.client.aclose()
            await asyncio.to_thread(_stop, self._backend, self._url, self.session.id)
        finally:
            _live().sessions.pop(self.session.id, None)

    async def _stop_tools(self, timeout: int) -> None:
        user = self._tools_user_seen
        try:
            await self.exec([SANDBOX_CLI, "stop-server"], cwd="/", user=user, timeout=timeout)
            await self.exec(["/bin/rm", "-rf", "--", self._tools_dir], cwd="/", user=user, timeout=timeout)
        except Exception as e:  # the session stops anyway
            log.warning("could not stop Inspect's sandbox-tools server in %s: %s", self.session.id, e)

    def _leave_running(self) -> None:
        """--no-sandbox-cleanup: keep the session after Inspect exits (the Docker backend would remove it)."""
        if not isinstance(self._backend, LocalBackend):
            self._backend.forget(self.session.id)
        _live().sessions.pop(self.session.id, None)


# -- helpers ---------------------------------------------------------------------------------------------------------


@dataclass
class _Live:
    """The sessions an eval batch started and has not stopped, on Inspect's lifecycle scope of the batch."""

    sessions: dict[str, ShellqSandboxEnvironment] = field(default_factory=dict)


_UNSCOPED = _Live()
"""The sessions started outside an eval (the provider driven directly)."""


def _live() -> _Live:
    scope = sandbox_lifecycle_state()
    return scope.get(_Live) if scope is not None else _UNSCOPED


def _config(config: SandboxEnvironmentConfigType | None) -> ShellqSandboxConfig:
    if config is None:
        return ShellqSandboxConfig()
    if isinstance(config, ShellqSandboxConfig):
        return config
    if isinstance(config, str):
        import yaml  # type: ignore[import-untyped]  # Inspect's dependency

        return ShellqSandboxConfig.model_validate(yaml.safe_load(Path(config).read_text()) or {})
    raise ConfigError(f"the shellq sandbox takes a ShellqSandboxConfig or a YAML file, not {type(config).__name__}")


def _subshell(cmd: list[str], cwd: str, env: dict[str, str]) -> str:
    """Shell text running `cmd` in `cwd` with `env` in a subshell: the session's shell keeps its state, and `cmd[0]`
    is found on the PATH `env` gives."""
    steps = [f"export {' '.join(shlex.quote(f'{k}={v}') for k, v in env.items())}"] if env else []
    steps += [f"cd -- {shlex.quote(cwd)}", f"exec -- {shlex.join(cmd)}"]
    return f"( {' && '.join(steps)} )"


def _as_given(e: SessionFileError, file: str) -> SessionFileError:
    """The same error (a FileNotFoundError, PermissionError...) naming the path as the caller gave it."""
    return type(e)(e.errno, e.strerror, file)


_backends: dict[tuple[str, str, str], Backend] = {}
_backends_lock = threading.Lock()


def _backend(kind: str, url: str) -> Backend:
    """This process's backend for `kind` and Redis `url` (blocking: the Docker one asks the engine)."""

    home = embedded.state_dir()  # the CLI's places, so `shellq session stop` and `shellq attach` work alike
    key = (kind, url, str(home) if kind == "local" else "")
    with _backends_lock:
        if key not in _backends:
            if kind == "docker":
                from containers.docker_backend import DockerBackend

                _backends[key] = DockerBackend(url)
            else:
                _backends[key] = LocalBackend(url, log_dir=home / "logs", work_root=home / "sessions")
        return _backends[key]


def _start(backend: Backend, cfg: ShellqSandboxConfig, session: str) -> None:
    env = {"SHELLQ_ROOT_COMMANDS": "true"} if cfg.root_commands else {}
    if isinstance(backend, LocalBackend):
        backend.start(session, env={**env, **({"SHELLQ_SHELL_USER": cfg.user} if cfg.user else {})})
        return
    limits = {name: getattr(cfg, name) for name in ("memory", "cpus", "pids", "disk", "user")}
    backend.start(session, image=cfg.image, env=env, **{k: v for k, v in limits.items() if v is not None})


def _stop(backend: Backend, url: str, session: str) -> None:
    """Stop the session's worker, delete its keys and (local) its directory and log."""
    backend.stop(session)
    with Client(url) as client:
        delete_session(client, session)
    if isinstance(backend, LocalBackend):
        backend.remove_state(session)


def _shell_user(cfg: ShellqSandboxConfig) -> str:
    if cfg.user:
        return cfg.user
    if cfg.backend == "docker":
        from containers.docker_backend import SHELL_USER

        return SHELL_USER
    return pwd.getpwuid(os.geteuid()).pw_name


def _cli_cleanup(only: str | None, url: str) -> list[str]:
    with Client(url) as client:
        names = [n for n in session_names(client.redis) if n.startswith(PREFIX) and only in (None, n)]
        kinds: list[Any] = [client.redis.hget(protocol.keys(name).meta, "backend") for name in names]
    for name, kind in zip(names, kinds, strict=True):
        _stop(_backend("docker" if kind == b"docker" else "local", url), url, name)
    return names
