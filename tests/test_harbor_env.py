"""Harbor's environment (issue 20, producer/adapters/harbor_env.py): Harbor, the harness of Terminal-Bench 2.0, runs
the three tasks of tests/harbor_tasks with its oracle agent in ShellqEnvironment, three trials at once, through
`harbor run`, offline: Harbor runs in a network namespace of its own with no interface up (`unshare --net`; Redis
through its unix socket, Docker through the engine's), the containers have no network, and nothing is pulled (a
task's Dockerfile is built on this run's worker image). Harbor needs Python >= 3.12, this venv is 3.11:
scripts/harbor-venv makes Harbor's venv, and the checkout comes in through PYTHONPATH."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import need
from helpers import ROOT, RedisServer, server_binaries

from producer import Client
from producer.admin import session_names

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]  # Harbor's venv is made on a machine's first run
TASKS = Path(__file__).parent / "harbor_tasks"
BUILT_LABEL = "shellq.harbor.worker"
"""producer.adapters.harbor_env.BUILT_LABEL (not imported: that module imports Harbor, which this Python lacks)."""


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer("redis", server_binaries()["redis"], tmp_path_factory.mktemp("harbor-redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def harbor() -> str:
    """The `harbor` executable of scripts/harbor-venv (made, or found made)."""
    script = ROOT / "scripts" / "harbor-venv"
    done = subprocess.run([str(script)], capture_output=True, text=True, check=False, timeout=800)
    need(done.returncode == 0, f"no Harbor (scripts/harbor-venv): {done.stderr.strip()[-1500:]}")
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def trials(
    harbor: str, engine: Any, image: str, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, Any]]:
    """One `harbor run` of the three tasks, three at once: each task's result.json, with its trial's directory."""
    need(os.geteuid() == 0 and shutil.which("unshare") is not None, "running Harbor offline needs root and unshare")
    jobs = tmp_path_factory.mktemp("harbor-jobs")
    url = f"unix://{redis_server.socket}?password={redis_server.password}&db=0"
    env = {**os.environ, "SHELLQ_REDIS_URL": url, "HARBOR_TELEMETRY": "0", "PYTHONPATH": str(ROOT)}
    run = ["unshare", "--net", harbor, "run", "--path", str(TASKS), "--agent", "oracle", "--yes", "--quiet"]
    run += ["--env", "producer.adapters.harbor_env:ShellqEnvironment", "--ek", f"image={image}"]
    run += ["--n-concurrent", "3", "--jobs-dir", str(jobs), "--job-name", "job"]
    try:
        done = subprocess.run(run, env=env, cwd=jobs, capture_output=True, text=True, check=False, timeout=300)
    finally:  # the image built from shellq-pass's Dockerfile on this run's worker image
        for built in engine.images.list(filters={"label": f"{BUILT_LABEL}={image}"}):
            engine.images.remove(built.id, force=True)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    found = {}
    for path in (jobs / "job").glob("*/result.json"):
        result = json.loads(path.read_text())
        found[result["task_name"]] = {**result, "dir": path.parent}
    assert sorted(found) == ["shellq-fail", "shellq-pass", "shellq-timeout"]
    return found


def logged(trial: dict[str, Any], name: str) -> str:
    """A file Harbor downloaded from the trial's environment (/logs/agent, /logs/verifier)."""
    return Path(trial["dir"], name).read_text()


def test_the_oracle_passes_a_task_built_from_its_dockerfile(trials: dict[str, dict[str, Any]]) -> None:
    trial = trials["shellq-pass"]
    assert trial["exception_info"] is None
    assert trial["verifier_result"]["rewards"] == {"reward": 1.0}  # tests/data/expected.txt was uploaded with /tests
    assert logged(trial, "agent/oracle.txt") == "solved as root in /app\n"  # the image's WORKDIR
    assert logged(trial, "verifier/report/who.txt") == "verified as root in /app\n"  # a directory downloaded
    assert logged(trial, "verifier/report/server.txt") == "running\n"  # what the solution started outlived it


def test_a_wrong_solution_scores_zero_and_other_users_can_write(trials: dict[str, dict[str, Any]]) -> None:
    trial = trials["shellq-fail"]
    assert trial["exception_info"] is None
    assert trial["verifier_result"]["rewards"] == {"reward": 0, "answered": 1}
    assert logged(trial, "agent/oracle.txt") == "solved as shellq in /app\n"  # /app made for any user
    assert logged(trial, "verifier/test-stdout.txt") == "verified as nobody\n"


def test_a_solution_past_the_agent_timeout_is_stopped_and_still_graded(trials: dict[str, dict[str, Any]]) -> None:
    trial = trials["shellq-timeout"]
    assert trial["exception_info"]["exception_type"] == "AgentTimeoutError"
    assert trial["exception_info"]["exception_message"] == "Agent execution timed out after 3.0 seconds"
    assert trial["verifier_result"]["rewards"] == {"reward": 0, "solution_stopped": 1}


def test_the_trials_ran_at_once_and_left_no_session(
    trials: dict[str, dict[str, Any]], redis_server: RedisServer
) -> None:
    started = max(t["started_at"] for t in trials.values())  # ISO 8601 in UTC: they sort as times
    assert all(t["finished_at"] > started for t in trials.values())
    with Client(redis_server.url) as client:
        assert [name for name in session_names(client.redis) if name.startswith("harbor-")] == []
        assert client.redis.acl_users() == ["default"]  # each session's users went with it
