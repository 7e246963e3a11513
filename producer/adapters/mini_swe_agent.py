"""`ShellqEnvironment`: mini-swe-agent's `Environment` over one shellq session, whose bash lives across actions.

Select it in a mini-swe-agent config (or run `mini -c` with `CONFIG`, this package's `mini_swe_agent.yaml`: the
`mini` command's own config, its prompt saying that `cd` and `export` persist):

    environment:
      environment_class: producer.adapters.mini_swe_agent.ShellqEnvironment
      backend: docker                  # default: local
      start_options: {image: shellq-worker:latest, memory: 4g}

Each environment starts a session of its own (a local worker process, or a container) when it is made, and stops it
in `cleanup()` (or when it is garbage-collected, or at exit). `execute` returns what mini-swe-agent's
LocalEnvironment returns for the same command (`output` with stderr merged into stdout, `returncode`,
`exception_info`; a timeout as returncode -1 with a `TimeoutExpired` in `extra`; `Submitted` raised for the submit
sentinel), and differs where shellq's whole point lies:

- Commands run one after another in ONE bash: `cd`, `export`, functions and activated venvs carry over. The shell
  starts in `cwd` with `env` exported (and starts so again after `exit`, which ends that bash: shellq starts a new
  one, with none of the old one's state). A command given `execute(cwd=...)` runs there; the next one is back where
  the shell was before it.
- The shell is bash (not /bin/sh), stdin is /dev/null, and a command's output past 1 MiB keeps its first and last
  halves (the whole is in the session's spool). A timeout stops the command and its children, not the shell.
- A failure of shellq itself (no worker, Redis gone) is an `exception_info` naming the ShellqError, as any error
  of LocalEnvironment's is; a command that ended otherwise (interrupted, cancelled...) names its status there.

mini-swe-agent enters shellq here and nowhere else; `import producer` does not import this module.
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import uuid
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import redis
from minisweagent.exceptions import Submitted
from minisweagent.utils.serialize import recursive_merge
from pydantic import BaseModel, ConfigDict

from containers import embedded
from producer.admin import delete_session
from producer.client import Client, ClientSettings
from producer.result import Result
from worker.errors import ConfigError, ShellqError

if TYPE_CHECKING:
    from containers.docker_backend import DockerBackend
    from containers.local import LocalBackend

log = logging.getLogger("shellq.producer")

CONFIG = Path(__file__).with_name("mini_swe_agent.yaml")
"""mini-swe-agent's `mini.yaml` for a shellq session: `mini -c <CONFIG>`."""
SUBMIT = "COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"
"""The first line of output by which an action submits (what follows it is the submission)."""
_SECRET = {"redis_url"}
"""Config fields kept out of the trajectory and the templates (a URL may hold a password)."""


class ShellqEnvironmentConfig(BaseModel):
    """How a ShellqEnvironment starts its session; `cwd`, `env` and `timeout` as in LocalEnvironmentConfig."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    cwd: str = ""
    """Directory the shell starts in (again after an `exit`); "": this process's with the local backend, / in docker."""
    env: dict[str, str] = {}
    """Variables exported when the shell starts; an action may change them, and the change persists."""
    forward_env: list[str] = []
    """Variables of this process exported too when the shell starts, those that are set (`env` wins)."""
    timeout: int = 30
    """Seconds an action may run (execute's `timeout` overrides it); then it is stopped, the shell kept."""
    backend: Literal["local", "docker"] = "local"
    """Where the session's worker runs: a process on this machine (no isolation) or a container of its own."""
    start_options: dict[str, Any] = {}
    """Keyword arguments of the backend's `start`: docker's `image`, `memory`, `cpus`, `mounts`, `network`..."""
    redis_url: str = ""
    """The shellq admin's Redis URL; "": SHELLQ_REDIS_URL, else the server `shellq up` started."""
    session: str = ""
    """The session id; "": `mswea-` and a random suffix."""
    keep_session: bool = False
    """Keep the session's streams after cleanup (its history: `shellq log SESSION`); its worker stops either way."""


class ShellqEnvironment:
    """mini-swe-agent's Environment protocol (`execute`, `get_template_vars`, `serialize`, `cleanup`) on a shellq
    session started for it."""

    def __init__(self, *, config_class: type[ShellqEnvironmentConfig] = ShellqEnvironmentConfig, **kwargs: Any) -> None:
        """Start the session (see ShellqEnvironmentConfig for the keyword arguments): SessionStartError if its worker
        does not come up, ConfigError if its shell cannot enter `cwd`."""
        self.config = config_class(**kwargs)
        self.config.session = self.config.session or f"mswea-{uuid.uuid4().hex[:8]}"
        url = embedded.client_url(self.config.redis_url, "set redis_url")
        self.client = Client(settings=ClientSettings.from_env(redis_url=url))
        self.session = self.client.session(self.config.session)
        self._start_dir = self.config.cwd or (os.getcwd() if self.config.backend == "local" else "/")
        self._epoch: int | None = None  # the epoch of the shell set up with `env` and `cwd`; None: set it up first
        self._cwd = self._start_dir  # where the shell is, as its last result said
        self._back: str | None = None  # where to go back to after a command given `cwd`
        backend = _backend(self.config.backend, url)
        self._stop = weakref.finalize(self, _stop, backend, self.client, self.config.session, self.config.keep_session)
        try:
            handle = backend.start(self.config.session, **self.config.start_options)
            log.info("session %s started: %s worker %s", self.config.session, self.config.backend, handle)
            if not (prepared := self._prepare()).ok:
                raise ConfigError(f"cannot start the shell in {self._start_dir}: {_text(prepared) or prepared.status}")
        except BaseException:
            self._stop()
            raise

    def execute(self, action: dict[str, Any], cwd: str = "", *, timeout: int | None = None) -> dict[str, Any]:
        """Run `action["command"]` in the session's shell; raises Submitted when its output starts with the sentinel."""
        command = action.get("command", "")
        limit = timeout or self.config.timeout
        try:
            output = _output(command, limit, self._run(command, limit, cwd))
        except ShellqError as e:
            output = _failure("", e)
        self._check_finished(output)
        return output

    def get_template_vars(self, **kwargs: Any) -> dict[str, Any]:
        """The config, the machine (`system`, `release`, `machine`...) and, with the local backend, this process's
        environment (which the shell inherits), as LocalEnvironment gives them."""
        environ = dict(os.environ) if self.config.backend == "local" else {}
        return recursive_merge(self.config.model_dump(exclude=_SECRET), platform.uname()._asdict(), environ, kwargs)

    def serialize(self) -> dict[str, Any]:
        """The config (less `redis_url`, which may hold a password) for the trajectory file."""
        return {
            "info": {
                "config": {
                    "environment": self.config.model_dump(mode="json", exclude=_SECRET),
                    "environment_type": f"{self.__class__.__module__}.{self.__class__.__name__}",
                }
            }
        }

    def cleanup(self) -> None:
        """Stop the session's worker and, unless `keep_session`, delete its streams and local state (idempotent)."""
        self._stop()

    def _start_env(self) -> dict[str, str]:
        forwarded = {name: os.environ[name] for name in self.config.forward_env if name in os.environ}
        return forwarded | self.config.env

    def _run(self, command: str, limit: int, cwd: str) -> Result:
        """Run the command (in `cwd`, else back where a command given one left from), setting up a new shell first."""
        if self._epoch is None and not (prepared := self._prepare()).ok:
            return prepared
        result = self.session.run(command, limit, cwd=cwd or self._back, merge_stderr=True)
        if result.status == "shell_exited" or result.shell_epoch != self._epoch:
            self._epoch = None  # a new bash (after `exit`): set up again before the next command
        elif cwd:
            self._back = self._back or self._cwd
        else:
            self._back, self._cwd = None, result.cwd or self._cwd
        return result

    def _prepare(self) -> Result:
        """Export `env` and enter the start directory, in a command of their own (`:`), in a new shell."""
        result = self.session.run(":", self.config.timeout, env=self._start_env(), cwd=self._start_dir)
        self._epoch = result.shell_epoch if result.ok else None
        self._cwd, self._back = self._start_dir, None
        return result

    def _check_finished(self, output: dict[str, Any]) -> None:
        """Raise Submitted when the output's first line is the sentinel and the command succeeded (LocalEnvironment's
        rule): the submission is the rest of the output."""
        lines = output.get("output", "").lstrip().splitlines(keepends=True)
        if lines and lines[0].strip() == SUBMIT and output["returncode"] == 0:
            submission = "".join(lines[1:])
            raise Submitted(
                {"role": "exit", "content": submission, "extra": {"exit_status": "Submitted", "submission": submission}}
            )


def _text(result: Result) -> str:
    return result.stdout + result.stderr  # stderr: merged into stdout; what is there is shellq's (a refusal)


def _output(command: str, limit: int, result: Result) -> dict[str, Any]:
    """LocalEnvironment's dict for the command's result: an exit (the shell's own `exit` too) gives its code; a
    timeout gives what subprocess.TimeoutExpired gives there; another end names the status."""
    text = _text(result)
    if result.status in ("completed", "shell_exited") and result.exit_code is not None:
        return {"output": text, "returncode": result.exit_code, "exception_info": ""}
    if result.status == "timeout":
        return _failure(text, subprocess.TimeoutExpired(command, limit))
    return _failure(text, ShellqError(": ".join(filter(None, (f"the command ended {result.status}", result.error)))))


def _failure(text: str, error: Exception) -> dict[str, Any]:
    return {
        "output": text,
        "returncode": -1,
        "exception_info": f"An error occurred while executing the command: {error}",
        "extra": {"exception_type": type(error).__name__, "exception": str(error)},
    }


def _backend(kind: str, url: str) -> LocalBackend | DockerBackend:
    """The backend, made as the `shellq` command makes it (the local one keeps logs in shellq's state directory)."""
    if kind == "docker":
        from containers.docker_backend import DockerBackend

        return DockerBackend(url)
    from containers.local import LocalBackend

    home = embedded.state_dir()
    return LocalBackend(url, log_dir=home / "logs", work_root=home / "sessions")


def _stop(backend: LocalBackend | DockerBackend, client: Client, session: str, keep: bool) -> None:
    """Stop the session's worker, then delete its keys and local state unless `keep`. Also run by the garbage
    collector and at exit, so a failure (Redis gone) is logged, not raised."""
    from containers.local import LocalBackend

    try:
        backend.stop(session)
        if not keep:
            delete_session(client, session)
            if isinstance(backend, LocalBackend):  # its session directory and log; a container leaves nothing here
                backend.remove_state(session)
    except (ShellqError, redis.RedisError, OSError) as e:
        log.warning("session %s: cleanup failed: %s", session, e)
    finally:
        client.close()
