"""shellq steps for queue-driven pipelines: `run` is an RQ job function that runs one command, or a list of
commands, in a session and returns the result as a plain dict, so RQ chains steps with `depends_on`:

    from rq import Queue
    from producer.rq_jobs import run

    q = Queue(connection=redis_conn)
    fetch = q.enqueue(run, "s1", ["git clone /src/app /repo", "cd /repo"])
    build = q.enqueue(run, "s1", "make", depends_on=fetch, job_timeout=1800)
    test = q.enqueue(run, "s1", "make test", depends_on=build)

A command that does not end with exit code 0 fails its job (CommandFailedError; the job's `meta["result"]` holds
its result), and RQ then leaves the steps that depend on it unrun. Each command is submitted with an id made from
the job's id, its place in the list and its text, idempotently: a job that RQ runs again (a worker that died)
gets the results of the commands that already ran instead of running them twice; after a failure, a retry runs
the failed step and the ones after it again.
"""

from __future__ import annotations

import hashlib
from typing import Any

from producer.client import Client
from producer.result import Result
from worker.errors import ShellqError


class CommandFailedError(ShellqError):
    """A pipeline step's command ended without exit code 0; `result` is its result as a dict."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


def result_dict(r: Result) -> dict[str, Any]:
    """A Result as a plain, JSON-ready dict: the text fields (stdout, stderr decoded), without the raw bytes."""
    return r.model_dump(exclude={"stdout_bytes", "stderr_bytes"})


def run(
    session: str,
    commands: str | list[str],
    *,
    timeout: float | None = None,
    redis_url: str | None = None,
    check: bool = True,
) -> dict[str, Any] | list[dict[str, Any]]:
    """Run `commands` in order in `session` (stopping at the first that fails, like `set -e`); returns the result
    dict (one command) or their list. timeout: each command's execution limit in seconds (None: the worker's).
    redis_url: shellq's Redis (None: SHELLQ_REDIS_URL). check: raise CommandFailedError for a command that did
    not exit 0 (after recording `meta["result"]`, and `meta["results"]` for a list, on the current RQ job)."""
    from rq import get_current_job

    job = get_current_job()
    client = Client(redis_url) if redis_url else Client.from_env()
    handle = client.session(session)
    batch = [commands] if isinstance(commands, str) else list(commands)
    results: list[dict[str, Any]] = []
    failed_at, attempt = (job.meta.get("failed_at", len(batch)), job.meta.get("attempt", 0)) if job else (0, 0)
    try:
        for i, command in enumerate(batch):
            cid = _command_id(job.id, i, command, attempt if i >= failed_at else 0) if job else None
            r = handle.run(command, timeout=timeout, id=cid, idempotent=job is not None)
            results.append(result_dict(r))
            if check and not r.ok:
                if job is not None:  # a later run of this job runs this step and the rest again, under new ids
                    job.meta.update(result=results[-1], results=results, failed_at=i, attempt=attempt + 1)
                    job.save_meta()  # type: ignore[no-untyped-call]
                code = "" if r.exit_code is None else f"exit code {r.exit_code}"
                why = r.error or (code if r.status == "completed" else f"{r.status}, {code}".rstrip(", "))
                raise CommandFailedError(f"step {i + 1} of {len(batch)} failed ({why}): {command}", results[-1])
    finally:
        client.close()
    return results[0] if isinstance(commands, str) else results


def _command_id(job_id: str, index: int, command: str, attempt: int) -> str:
    """The id of a step's command: the job's id, its place, its text (a job id reused for another command is
    another command) and, for the steps from a failed one on, the attempt (a retry runs them again)."""
    digest = hashlib.sha256(command.encode()).hexdigest()[:12]
    return f"rq-{job_id}-{index}-{digest}-{attempt}"
