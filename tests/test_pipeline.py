"""Queue-driven pipelines (issue 16): `producer.rq_jobs.run` as RQ job functions chained with depends_on, run by a
real RQ worker against a real shellq worker; a failing step fails its job and the rest stay unrun; a step RQ runs
again does not run its commands twice."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from helpers import RedisServer
from rq import Queue, Retry, SimpleWorker
from rq.job import Job, JobStatus

from producer.rq_jobs import run
from worker.loop import Worker


def _queue(redis_server: RedisServer, name: str) -> Queue:
    return Queue(name, connection=redis_server.client())


def _work(queue: Queue) -> None:
    SimpleWorker([queue], connection=queue.connection).work(burst=True, logging_level="WARNING")


def test_three_step_pipeline(
    redis_server: RedisServer, start_worker: Callable[..., Worker], session_id: str, monkeypatch: Any
) -> None:
    monkeypatch.setenv("SHELLQ_REDIS_URL", redis_server.url)
    start_worker(session_id)
    q = _queue(redis_server, f"pipe-{session_id}")
    fetch = q.enqueue(run, session_id, ["mkdir -p app && cd app", "printf 'all:\\n\\techo built > out\\n' > Makefile"])
    build = q.enqueue(run, session_id, "make -s && cat out", depends_on=fetch)
    check = q.enqueue(run, session_id, "test -f out && pwd", depends_on=build)
    _work(q)
    assert [j.get_status(refresh=True) for j in (fetch, build, check)] == ["finished"] * 3
    steps = fetch.return_value()
    assert [r["status"] for r in steps] == ["completed", "completed"]
    assert build.return_value()["stdout"] == "built\n"
    assert check.return_value()["stdout"].endswith("/app\n")  # the steps share one shell: cd carried over


def test_failed_step_fails_its_job_and_stops_the_pipeline(
    redis_server: RedisServer, start_worker: Callable[..., Worker], session_id: str, monkeypatch: Any
) -> None:
    monkeypatch.setenv("SHELLQ_REDIS_URL", redis_server.url)
    start_worker(session_id)
    q = _queue(redis_server, f"pipe-{session_id}")
    first = q.enqueue(run, session_id, ["echo one", "echo two >&2; sh -c 'exit 3'", "echo never"])
    after = q.enqueue(run, session_id, "echo after", depends_on=first)
    _work(q)
    assert first.get_status(refresh=True) == JobStatus.FAILED
    first.refresh()
    assert first.meta["result"]["exit_code"] == 3 and first.meta["result"]["stderr"] == "two\n"
    assert [r["stdout"] for r in first.meta["results"]] == ["one\n", ""]  # the third never ran
    latest = first.latest_result()
    assert latest is not None and "CommandFailedError: step 2 of 3 failed (exit code 3)" in (latest.exc_string or "")
    assert after.get_status(refresh=True) != JobStatus.FINISHED and after.return_value() is None


def test_a_step_run_again_does_not_run_its_commands_twice(
    redis_server: RedisServer, start_worker: Callable[..., Worker], session_id: str, monkeypatch: Any
) -> None:
    """RQ runs a job again (a retry, a requeue after its worker died): the commands that already ran answer with
    their results (idempotent ids from the job's id), so `n` is incremented once."""
    monkeypatch.setenv("SHELLQ_REDIS_URL", redis_server.url)
    start_worker(session_id)
    q = _queue(redis_server, f"pipe-{session_id}")
    job = q.enqueue(run, session_id, ["n=$((n + 1)); echo $n", "echo $n"])
    _work(q)
    assert [r["stdout"] for r in job.return_value()] == ["1\n", "1\n"]
    q.enqueue_job(Job.fetch(job.id, connection=q.connection))
    _work(q)
    assert [r["stdout"] for r in Job.fetch(job.id, connection=q.connection).return_value()] == ["1\n", "1\n"]


def test_a_retried_failed_step_runs_again_and_the_steps_before_it_do_not(
    redis_server: RedisServer, start_worker: Callable[..., Worker], session_id: str, monkeypatch: Any
) -> None:
    """RQ's Retry after a failed step: the failed step runs again (its cause is gone now), the step before it is
    not repeated."""
    monkeypatch.setenv("SHELLQ_REDIS_URL", redis_server.url)
    start_worker(session_id)
    q = _queue(redis_server, f"pipe-{session_id}")
    job = q.enqueue(
        run, session_id, ["n=$((n + 1)); echo $n", "test -f ready || { touch ready; false; }"], retry=Retry(max=1)
    )
    _work(q)  # the first try fails at step 2 and is retried at once (no interval)
    job.refresh()
    assert job.get_status(refresh=True) == JobStatus.FINISHED, job.meta
    assert [r["exit_code"] for r in job.return_value()] == [0, 0]
    assert job.return_value()[0]["stdout"] == "1\n"  # step 1 ran once
