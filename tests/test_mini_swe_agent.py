"""mini-swe-agent's Environment over a shellq session (issue 20, producer/adapters/mini_swe_agent.py): an agent run
with mini-swe-agent's own deterministic test model and this package's config, whose state carries from one action
to the next, then `execute` itself against what mini-swe-agent's LocalEnvironment returns for the same command."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import RedisServer
from minisweagent.agents.default import DefaultAgent
from minisweagent.config import get_config_from_spec
from minisweagent.environments import get_environment
from minisweagent.environments.local import LocalEnvironment
from minisweagent.exceptions import Submitted
from minisweagent.models.test_models import DeterministicModel, make_output

from producer import Client
from producer.adapters.mini_swe_agent import CONFIG, ShellqEnvironment
from worker import protocol
from worker.errors import ConfigError

Factory = Callable[..., ShellqEnvironment]


@pytest.fixture
def make_env(redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Factory]:
    """ShellqEnvironments on the test server (local backend, its logs under tmp_path), cleaned up at teardown."""
    monkeypatch.setenv("SHELLQ_HOME", str(tmp_path / "shellq"))
    made: list[ShellqEnvironment] = []

    def make(**config: Any) -> ShellqEnvironment:
        env = ShellqEnvironment(redis_url=redis_server.url, **config)
        made.append(env)
        return env

    yield make
    for env in made:
        env.cleanup()


def test_an_agent_run_keeps_directory_and_variables_from_one_action_to_the_next(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHELLQ_HOME", str(tmp_path / "shellq"))
    config = get_config_from_spec(str(CONFIG))
    env = get_environment({**config["environment"], "redis_url": redis_server.url})
    assert isinstance(env, ShellqEnvironment)
    actions = ["cd /tmp && export X=1", "echo $X && pwd", "echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT && echo done-$X"]
    model = DeterministicModel(  # type: ignore[no-untyped-call]
        outputs=[make_output(f"step {i}", [{"command": a}]) for i, a in enumerate(actions)],
        observation_template=config["model"]["observation_template"],
    )
    agent_config = {k: v for k, v in config["agent"].items() if k != "mode"}  # `mode` is the interactive agent's
    agent = DefaultAgent(model, env, **agent_config)
    try:
        outcome = agent.run("say where you are")
    finally:
        env.cleanup()
    assert outcome == {"exit_status": "Submitted", "submission": "done-1\n"}
    assert "persist" in agent.messages[1]["content"]  # the prompt says that state carries over
    observations = [m for m in agent.messages[2:] if m["role"] == "user"]  # after the system message and the task
    assert [(o["extra"]["returncode"], o["extra"]["raw_output"]) for o in observations] == [(0, ""), (0, "1\n/tmp\n")]
    assert '"output": "1\\n/tmp\\n"' in observations[1]["content"]  # what the model is shown
    assert agent.messages[-1]["role"] == "exit"
    assert redis_server.password and redis_server.password not in json.dumps(agent.serialize())  # the trajectory
    with Client(redis_server.url) as client:
        assert not client.redis.exists(protocol.keys(env.config.session).meta)  # cleaned up


def test_execute_returns_what_local_environment_returns(make_env: Factory, tmp_path: Path) -> None:
    env, local = make_env(cwd=str(tmp_path)), LocalEnvironment(cwd=str(tmp_path))
    for command in ["echo out; echo err >&2; echo out2; false", "(exit 42)", "printf 'no newline'", "ls missing"]:
        assert env.execute({"command": command}) == local.execute({"command": command})


def test_the_config_sets_the_start_directory_and_variables(
    make_env: Factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MSWEA_T_HOST", "from-host")
    env = make_env(cwd=str(tmp_path), env={"GREETING": "hi", "PAGER": "less"}, forward_env=["MSWEA_T_HOST"])
    out = env.execute({"command": "echo $GREETING $PAGER $MSWEA_T_HOST; pwd"})
    assert out == {"output": f"hi less from-host\n{tmp_path}\n", "returncode": 0, "exception_info": ""}
    env.execute({"command": "export GREETING=changed; cd /"})
    assert env.execute({"command": "echo $GREETING; pwd"})["output"] == "changed\n/\n"


def test_a_start_directory_that_does_not_exist_is_refused(make_env: Factory, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file or directory"):
        make_env(cwd=str(tmp_path / "missing"))


def test_exit_ends_the_shell_and_the_next_one_starts_as_configured(make_env: Factory, tmp_path: Path) -> None:
    env = make_env(cwd=str(tmp_path), env={"GREETING": "hi"})
    env.execute({"command": "export MINE=1; cd /"})
    assert env.execute({"command": "echo bye; exit 5"}) == {"output": "bye\n", "returncode": 5, "exception_info": ""}
    out = env.execute({"command": 'echo "$GREETING [${MINE-}]"; pwd'})
    assert out["output"] == f"hi []\n{tmp_path}\n"


def test_a_timeout_is_local_environments_result_and_the_shell_keeps_its_state(make_env: Factory) -> None:
    env = make_env(timeout=1)
    env.execute({"command": "export KEPT=yes; cd /tmp"})
    out = env.execute({"command": "echo partial; sleep 30"})
    message = "Command 'echo partial; sleep 30' timed out after 1 seconds"
    assert out == {
        "output": "partial\n",
        "returncode": -1,
        "exception_info": f"An error occurred while executing the command: {message}",
        "extra": {"exception_type": "TimeoutExpired", "exception": message},
    }
    assert env.execute({"command": "sleep 1.5; echo $KEPT; pwd"}, timeout=10)["output"] == "yes\n/tmp\n"


def test_a_cwd_argument_holds_for_that_command_only(make_env: Factory, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    env = make_env(cwd="/tmp")
    env.execute({"command": "export V=1"})
    assert env.execute({"command": "pwd; echo $V"}, cwd=str(tmp_path / "a"))["output"] == f"{tmp_path / 'a'}\n1\n"
    assert env.execute({"command": "pwd"})["output"] == "/tmp\n"
    missing = env.execute({"command": "pwd"}, cwd=str(tmp_path / "missing"))
    assert (missing["returncode"], "No such file or directory" in missing["output"]) == (1, True)
    assert env.execute({"command": "pwd"})["output"] == "/tmp\n"


def test_the_submit_sentinel_raises_submitted_with_the_rest_of_the_output(make_env: Factory) -> None:
    env = make_env()
    with pytest.raises(Submitted) as submitted:
        env.execute({"command": "echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT; printf 'diff\\nmore\\n'"})
    assert submitted.value.messages[0]["extra"] == {"exit_status": "Submitted", "submission": "diff\nmore\n"}
    failed = env.execute({"command": "echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT; false"})  # no submit on failure
    assert failed["returncode"] == 1


def test_cleanup_stops_the_worker_and_deletes_the_session(make_env: Factory, redis_server: RedisServer) -> None:
    env, kept = make_env(), make_env(keep_session=True)
    for e in (env, kept):
        e.execute({"command": "echo kept"})
        e.cleanup()
        e.cleanup()  # idempotent
    with Client(redis_server.url) as client:
        assert not client.session(env.config.session).worker_alive()
        assert not client.redis.exists(protocol.keys(env.config.session).res)
        assert not client.session(kept.config.session).worker_alive()
        history = client.session(kept.config.session).history()  # the shell's setup (`:`), then the action
        assert [r.result.stdout if r.result else None for r in history] == [b"", b"kept\n"]
