"""The Inspect AI sandbox provider `shellq` (issue 20, producer/adapters/inspect_sandbox.py), on the local backend
with a real worker and Redis: Inspect's own portable conformance suite (`inspect_ai.util._sandbox.self_check`, each
check an item) with a non-root default user; exec that leaves the session's shell as it was; output past shellq's
cap and past Inspect's limit; `inspect sandbox cleanup shellq`; and one `inspect eval` whose scripted model drives
Inspect's `bash_session` tool in a shellq sandbox, offline."""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from conftest import need
from helpers import RUN_ID, RedisServer
from inspect_ai import Task
from inspect_ai import eval as inspect_eval
from inspect_ai.dataset import Sample
from inspect_ai.log import read_eval_log
from inspect_ai.model import ModelOutput, ModelUsage, get_model
from inspect_ai.scorer import CORRECT, INCORRECT, Score, Target, accuracy, scorer
from inspect_ai.solver import TaskState, generate, use_tools
from inspect_ai.tool import bash_session
from inspect_ai.util import OutputLimitExceededError, SandboxEnvironmentSpec
from inspect_ai.util._sandbox import self_check
from inspect_ai.util._sandbox.limits import override_max_exec_output_size

from producer import Client
from producer.adapters.inspect_sandbox import PREFIX, ShellqSandboxConfig, ShellqSandboxEnvironment
from producer.admin import delete_session, session_names

T = TypeVar("T")
MiB = 1 << 20


@pytest.fixture(scope="module")
def shell_user() -> Iterator[str]:
    """The sandbox's default user: not root (self_check's `chmod -r` and `chmod -w` files must refuse it), with a
    home to start in and write to (`nobody` has none). Made with useradd for this module, removed after it."""
    need(os.geteuid() == 0, "a shell user other than the worker's needs the tests to run as root")
    name = f"sqi-{RUN_ID}"
    subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", name], check=True, capture_output=True)
    yield name
    subprocess.run(["userdel", "--remove", name], check=False, capture_output=True)


@pytest.fixture(scope="module")
def config(redis_server: RedisServer, shell_user: str) -> Iterator[ShellqSandboxConfig]:
    """Local backend, shell as `shell_user`, root allowed (self_check adds a user as root); shellq's state dir
    (SHELLQ_HOME: logs, session directories with the spool) in a root-owned directory that user may enter (the
    spool is readable by the shell's group; tmp_path's parents are 0700)."""
    home = Path(tempfile.mkdtemp(prefix="shellq-inspect-"))
    home.chmod(0o755)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SHELLQ_HOME", str(home))
        yield ShellqSandboxConfig(backend="local", user=shell_user, root_commands=True, redis_url=redis_server.url)
    shutil.rmtree(home)
    with Client(redis_server.url) as client:
        assert not [n for n in session_names(client.redis) if n.startswith(PREFIX)], "sessions left behind"


class Sandbox:
    """One sample's sandbox and the event loop that drives it (`box(box.env.exec([...]))`)."""

    def __init__(self, config: ShellqSandboxConfig) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        environments = self(ShellqSandboxEnvironment.sample_init("test", config, {}))
        self.env = environments["default"].as_type(ShellqSandboxEnvironment)

    def __call__(self, awaitable: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(awaitable)

    def close(self) -> None:
        self(ShellqSandboxEnvironment.sample_cleanup("test", self.config, {"default": self.env}, False))
        self.loop.close()


@pytest.fixture(scope="module")
def shared_box(config: ShellqSandboxConfig) -> Iterator[Sandbox]:
    """One sandbox for the checks of the module, as Inspect's own runner shares one."""
    box = Sandbox(config)
    yield box
    box.close()


@pytest.mark.parametrize("check", self_check.__all__)
def test_inspect_self_check(shared_box: Sandbox, check: str) -> None:
    """Inspect's conformance suite, check by check, with a default user that is not root."""
    shared_box(getattr(self_check, check)(shared_box.env))


def test_exec_leaves_the_sessions_shell_as_it_was(shared_box: Sandbox) -> None:
    """exec is stateless: a `cd` or `export` in one call is gone in the next, and the session's own shell, whose
    state a person in `shellq attach` would see, never moved."""
    env = shared_box.env
    before = shared_box(env.session.run("pwd; echo ${Y-unset}"))
    r = shared_box(env.exec(["bash", "-c", "cd /tmp && export Y=2 && pwd && echo $Y"], env={"Z": "3"}))
    assert (r.returncode, r.stdout) == (0, "/tmp\n2\n")
    again = shared_box(env.exec(["sh", "-c", "pwd; echo ${Y-unset} ${Z-unset}"]))
    assert again.stdout == f"{before.stdout.splitlines()[0]}\nunset unset\n"
    assert shared_box(env.session.run("pwd; echo ${Y-unset}")).stdout == before.stdout
    as_root = shared_box(env.exec(["sh", "-c", "id -u; pwd"], cwd="/tmp", user="root"))
    assert as_root.stdout == "0\n/tmp\n"


def test_output_past_shellqs_cap_comes_whole_and_past_inspects_limit_raises(shared_box: Sandbox) -> None:
    """shellq keeps 1 MiB of a stream in the result: up to Inspect's limit the rest comes from the spool, past it
    OutputLimitExceededError with the head (as Inspect's proxy keeps it)."""
    env = shared_box.env
    write = ["sh", "-c", 'head -c "$1" /dev/zero | tr "\\0" a; head -c 5 /dev/zero | tr "\\0" b >&2', "sh"]
    r = shared_box(env.exec([*write, str(3 * MiB)]))
    assert (r.stdout, r.stderr) == ("a" * 3 * MiB, "bbbbb")
    with override_max_exec_output_size(2 * MiB), pytest.raises(OutputLimitExceededError) as caught:
        shared_box(env.exec([*write, str(3 * MiB)]))
    assert "limit of 2 MiB was exceeded" in str(caught.value)
    assert caught.value.truncated_output == "a" * (MiB // 2)


def test_cli_cleanup_removes_the_sessions_an_eval_left(config: ShellqSandboxConfig, redis_server: RedisServer) -> None:
    """`inspect sandbox cleanup shellq`: every `inspect-…` session of the Redis of SHELLQ_REDIS_URL goes, worker
    and keys; others stay."""
    box = Sandbox(config)
    name = box.env.session.id
    with Client(redis_server.url) as client, pytest.MonkeyPatch.context() as mp:
        other = client.session(f"other-{RUN_ID}")
        other.submit("true")
        mp.setenv("SHELLQ_REDIS_URL", redis_server.url)
        box(ShellqSandboxEnvironment.cli_cleanup(None))
        assert not client.session(name).worker_alive()
        names = session_names(client.redis)
        assert name not in names and other.id in names
        delete_session(client, other.id)
    box.close()  # idempotent: nothing left to stop


# -- an eval -----------------------------------------------------------------------------------------------------


@pytest.fixture
def no_network() -> Iterator[list[str]]:
    """Every host other than this machine the process looked up or dialled while the test ran (an audit hook)."""
    seen: list[str] = []

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "socket.getaddrinfo":
            host = args[0]
        elif event == "socket.connect" and args[0].family in (socket.AF_INET, socket.AF_INET6):
            host = args[1][0]
        else:
            return
        if host not in (None, "localhost", "::1", "0.0.0.0") and not str(host).startswith("127."):
            seen.append(f"{event} {host}")

    if not _AUDITING:  # once per process: an audit hook cannot be removed
        sys.addaudithook(lambda event, args: [hook(event, args) for hook in _HOOKS])
        _AUDITING.append(True)
    _HOOKS.append(hook)
    yield seen
    _HOOKS.remove(hook)


_HOOKS: list[Any] = []
_AUDITING: list[bool] = []


def _scripted(*inputs: str) -> list[ModelOutput]:
    """The model's turns: one bash_session call per input, then a last word. Each carries its token usage, so
    Inspect counts no tokens itself (that would fetch a tokenizer)."""
    usage = ModelUsage(input_tokens=10, output_tokens=5, total_tokens=15)
    calls = [
        ModelOutput.for_tool_call("mockllm/model", "bash_session", {"action": "type_submit", "input": i})
        for i in inputs
    ]
    outputs = [*calls, ModelOutput.from_content("mockllm/model", "done")]
    return [o.model_copy(update={"usage": usage}) for o in outputs]


@scorer(metrics=[accuracy()])
def shell_output() -> Any:
    """CORRECT when the target appears in the last tool output."""

    async def score(state: TaskState, target: Target) -> Score:
        last = [m.text for m in state.messages if m.role == "tool"][-1]
        return Score(value=CORRECT if target.text in last else INCORRECT, explanation=last)

    return score


# Inspect's own: its model retry (inspect_ai/model/_retry.py) passes tenacity 9.2's deprecated `initial`; its
# sample event emitter (inspect_ai/hooks/_hooks.py) never closes the receiving end of its stream
@pytest.mark.filterwarnings("ignore:The 'initial' parameter is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:Unclosed <MemoryObjectReceiveStream:ResourceWarning")
def test_an_eval_drives_bash_session_in_a_shellq_sandbox(
    config: ShellqSandboxConfig, tmp_path: Path, no_network: list[str]
) -> None:
    """`inspect eval` of a task with sandbox "shellq": the mock model's bash_session calls `cd /tmp && export X=1`,
    then `echo $X; pwd`, see the state kept between calls; the score says so; nothing reaches the network."""
    model = get_model("mockllm/model", custom_outputs=_scripted("cd /tmp && export X=1", "echo $X; pwd"))
    task = Task(
        dataset=[Sample(input="Set X and move to /tmp, then show both.", target="1\n/tmp")],
        solver=[use_tools(bash_session()), generate()],
        scorer=shell_output(),
        sandbox=SandboxEnvironmentSpec("shellq", config),
    )
    [log] = inspect_eval(task, model=model, log_dir=str(tmp_path), display="none")
    assert log.status == "success", log.error
    assert log.samples is not None
    [sample] = log.samples
    assert sample.scores is not None
    assert sample.scores["shell_output"].value == CORRECT, sample.scores["shell_output"].explanation
    assert no_network == []
    assert config.redis_url and config.redis_url not in read_eval_log(log.location).model_dump_json()  # a password
    gc.collect()  # Inspect's unclosed stream goes while the filter above holds
