"""`ShellqRuntime`: SWE-ReX's runtime interface (`swerex.runtime.abstract.AbstractRuntime`) over one shellq session.

SWE-agent and other harnesses drive their sandbox through that interface. Here the bash session is the shellq
session's persistent shell, and the file methods are shellq's file operations (`read_file`, `write_file`, `upload`:
one entry on the command stream each, large payloads in chunks), never base64 through the shell. Everything is
awaited on `producer.aio`, so nothing blocks the event loop.

    runtime = ShellqRuntime.from_url("redis://...", "s1")
    await runtime.create_session(CreateBashSessionRequest())
    observation = await runtime.run_in_session(BashAction(command="ls"))

Errors are SWE-ReX's LocalRuntime's for the same cases (FileNotFoundError for a missing file, CommandTimeoutError,
NonZeroExitCodeError, SessionExistsError...); a failure of shellq itself (no worker, Redis gone) raises its
ShellqError. Where shellq differs, it says so rather than pretend:

- One bash session per runtime, under whatever name it is created with; a second name raises NotImplementedError.
  `close_session` forgets the name: the shell lives on with its state (shellq has no call that resets it).
- Interactive commands and `expect` raise NotImplementedError: a command runs to its end, stdin at /dev/null.
- `output` is stdout then stderr (shellq keeps them apart; a pty interleaves them); past 1 MiB each, the first and
  last halves are kept (the whole in the session's spool). A syntax error is bash's exit code 2, not
  BashIncorrectSyntaxError.
- `timeout=None` is the worker's default limit (300 s), not none; a command over its limit is stopped by the worker
  (CommandTimeoutError here), not left running for a BashInterruptAction, which interrupts a command in flight.
- `execute` runs in a subshell of the session's bash (its state is left as it was); a missing program or `cwd` is an
  exit code (127, 1) with bash's message, not the OSError subprocess raises.

SWE-ReX enters shellq here and nowhere else; `import producer` does not import this module.
"""

from __future__ import annotations

import asyncio
import io
import logging
import shlex

from swerex.exceptions import (
    CommandTimeoutError,
    NoExitCodeError,
    NonZeroExitCodeError,
    SessionDoesNotExistError,
    SessionExistsError,
)
from swerex.runtime.abstract import (
    AbstractRuntime,
    Action,
    BashAction,
    BashInterruptAction,
    BashObservation,
    CloseBashSessionResponse,
    CloseResponse,
    CloseSessionRequest,
    CloseSessionResponse,
    Command,
    CommandResponse,
    CreateBashSessionResponse,
    CreateSessionRequest,
    CreateSessionResponse,
    IsAliveResponse,
    Observation,
    ReadFileRequest,
    ReadFileResponse,
    UploadRequest,
    UploadResponse,
    WriteFileRequest,
    WriteFileResponse,
)

from producer import core
from producer.aio import AsyncClient, AsyncSession
from producer.client import Session
from producer.result import Result
from worker.errors import ShellqError

log = logging.getLogger("shellq.producer")


class ShellqRuntime(AbstractRuntime):
    """A SWE-ReX runtime whose one bash session is a shellq session, for one event loop."""

    def __init__(self, session: AsyncSession | Session, *, logger: logging.Logger | None = None) -> None:
        """`session`: an AsyncSession, used as it is (its client stays the caller's to close); or a Session, whose
        async twin (an AsyncClient with the same settings) the runtime makes and closes in `close()`."""
        super().__init__()
        self.logger = logger or log
        self._owned: AsyncClient | None = None
        if isinstance(session, Session):
            self._owned = AsyncClient(settings=session.client.settings)
            session = self._owned.session(session.id)
        self.session = session
        self._name: str | None = None  # the SWE-ReX name of the bash session, once created
        self._in_flight: set[str] = set()  # ids of the commands being awaited, for BashInterruptAction

    @classmethod
    def from_url(cls, url: str, session_id: str) -> ShellqRuntime:
        """A runtime on session `session_id` of the Redis at `url`, with an AsyncClient of its own."""
        runtime = cls(AsyncClient(url).session(session_id))
        runtime._owned = runtime.session.client
        return runtime

    async def is_alive(self, *, timeout: float | None = None) -> IsAliveResponse:
        """Does a worker serve the session (a fresh heartbeat)? False with the reason, also when Redis is away."""
        try:
            alive = await asyncio.wait_for(self.session.worker_alive(), timeout)
        except (ShellqError, asyncio.TimeoutError) as e:
            return IsAliveResponse(is_alive=False, message=f"{type(e).__name__}: {e}")
        return IsAliveResponse(is_alive=alive, message="" if alive else f"no worker serves session {self.session.id}")

    async def create_session(self, request: CreateSessionRequest) -> CreateSessionResponse:
        """Name the session's shell (its state is what earlier commands left) and source `startup_source`."""
        if request.session == self._name:
            raise SessionExistsError(f"session {request.session} already exists")
        if self._name is not None:
            raise NotImplementedError(
                f"ShellqRuntime has one bash session, shellq session {self.session.id}, open as {self._name!r}; "
                f"another ({request.session!r}) needs a runtime on another shellq session"
            )
        output = ""
        if request.startup_source:
            sources = " ; ".join(f"source {path}" for path in request.startup_source)
            output = _output(await self._run(sources, request.startup_timeout))
        self._name = request.session
        return CreateBashSessionResponse(output=output)

    async def run_in_session(self, action: Action) -> Observation:
        """Run `action.command` in the session's shell, or interrupt the commands in flight (BashInterruptAction)."""
        if action.session != self._name:
            raise SessionDoesNotExistError(f"session {action.session!r} does not exist")
        if isinstance(action, BashInterruptAction):
            for cid in list(self._in_flight):
                await self.session.interrupt(cid)
            return BashObservation(exit_code=0)
        if action.is_interactive_command or action.is_interactive_quit or action.expect:
            raise NotImplementedError(
                "ShellqRuntime runs each command to its end with stdin at /dev/null: interactive commands and "
                "`expect` are not supported"
            )
        return _observation(action, await self._run(action.command, action.timeout))

    async def close_session(self, request: CloseSessionRequest) -> CloseSessionResponse:
        """Forget the session's name; the shell and its state stay (shellq has no call that resets them)."""
        if request.session != self._name:
            raise SessionDoesNotExistError(f"session {request.session!r} does not exist")
        self._name = None
        return CloseBashSessionResponse()

    async def execute(self, command: Command) -> CommandResponse:
        """Run `command` as subprocess.run would, in a subshell of the session's bash (which it leaves as it was)."""
        result = await self._run(_subprocess_text(command), command.timeout)
        response = CommandResponse(
            stdout=result.stdout_bytes.decode(errors="backslashreplace"),
            stderr=result.stderr_bytes.decode(errors="backslashreplace"),
            exit_code=result.exit_code,
        )
        if command.check and result.exit_code != 0:
            msg = (
                f"Command {command.command!r} failed with exit code {result.exit_code}. "
                f"Stdout:\n{response.stdout!r}\nStderr:\n{response.stderr!r}"
            )
            raise NonZeroExitCodeError(f"{command.error_msg}: {msg}" if command.error_msg else msg)
        return response

    async def read_file(self, request: ReadFileRequest) -> ReadFileResponse:
        """The file as `Path.read_text` gives it (universal newlines; encoding None: UTF-8), read by shellq's
        `read_file`: FileNotFoundError, IsADirectoryError, PermissionError, UnicodeDecodeError as there."""
        data = await self.session.read_file(request.path)
        text = io.TextIOWrapper(io.BytesIO(data), encoding=request.encoding or "utf-8", errors=request.errors)
        return ReadFileResponse(content=text.read())

    async def write_file(self, request: WriteFileRequest) -> WriteFileResponse:
        """Write `content` as UTF-8 with shellq's `write_file` (parents made, the file replaced atomically)."""
        await self.session.write_file(request.path, request.content.encode())
        return WriteFileResponse()

    async def upload(self, request: UploadRequest) -> UploadResponse:
        """Copy a local file to `target_path`, or a local directory's tree into it (made if missing; merged into
        one that exists, as SWE-ReX's RemoteRuntime does), with shellq's `upload`. A file onto an existing
        directory raises IsADirectoryError (LocalRuntime would copy it into the directory)."""
        await self.session.upload(request.source_path, request.target_path)
        return UploadResponse()

    async def close(self) -> CloseResponse:
        """Forget the bash session and close the client this runtime made; the shellq session (its worker, its
        shell) keeps running: stopping it is for whoever started it."""
        self._name = None
        if self._owned is not None:
            await self._owned.aclose()
            self._owned = None
        return CloseResponse()

    async def _run(self, cmd: str, timeout: float | None) -> Result:
        """Run `cmd` in the session's shell; CommandTimeoutError when the worker stopped it at its limit."""
        cid = core.new_id()
        self._in_flight.add(cid)
        try:
            result = await self.session.run(cmd, timeout, id=cid)
        finally:
            self._in_flight.discard(cid)
        if result.status == "timeout":
            limit = "the default" if timeout is None else timeout
            raise CommandTimeoutError(f"timeout after {limit} seconds while running command {cmd!r}")
        return result


def _output(result: Result) -> str:
    """stdout then stderr, undecodable bytes as backslash escapes (as SWE-ReX's bash session decodes)."""
    return result.stdout_bytes.decode(errors="backslashreplace") + result.stderr_bytes.decode(errors="backslashreplace")


def _observation(action: BashAction, result: Result) -> BashObservation:
    """The observation of a command that ran (or was meant to), checked as `action.check` asks."""
    output = _output(result)
    failure = "" if result.status == "completed" else ": ".join(filter(None, (result.status, result.error)))
    if action.check == "ignore":
        return BashObservation(output=output, failure_reason=failure)
    if result.exit_code is None:
        if action.check == "raise":
            raise NoExitCodeError(f"command {action.command!r} has no exit code ({failure})")
        return BashObservation(output=output, failure_reason=failure)
    if action.check == "raise" and result.exit_code != 0:
        msg = f"Command {action.command!r} failed with exit code {result.exit_code}. Here is the output:\n{output!r}"
        raise NonZeroExitCodeError(f"{action.error_msg}: {msg}" if action.error_msg else msg)
    return BashObservation(output=output, exit_code=result.exit_code, failure_reason=failure)


def _subprocess_text(command: Command) -> str:
    """Shell text that runs `command` as subprocess.run would (`shell` through /bin/sh -c, `env` as the whole
    environment, `cwd`, `merge_output_streams`), in a subshell so the session's shell keeps its state."""
    argv = [command.command] if isinstance(command.command, str) else list(command.command)
    if command.shell:
        argv = ["/bin/sh", "-c", *argv]
    if command.env is not None:
        argv = ["env", "-i", *(f"{name}={value}" for name, value in command.env.items()), *argv]
    text = f"exec {shlex.join(argv)}"
    if command.cwd is not None:
        text = f"cd {shlex.quote(command.cwd)} && {text}"
    return f"({text})" + (" 2>&1" if command.merge_output_streams else "")
