"""`shellq exec`'s fast path (producer/cli_fast.py, producer/fast_run.py) against the full one (producer/cli.py): the
same bytes on the wire for every option it takes, the same reading of every result, the same output, exit status
and error lines; and that the console script really takes it (no redis-py, no pydantic imported)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import pytest
import redis
from helpers import ROOT, SHELLQ_SCRIPT, Cli, free_port

from containers.embedded import ServerInfo
from producer import cli, cli_fast, core, fast_run, files
from producer.client import ClientSettings
from producer.result import Result
from worker import protocol, settings
from worker.errors import ShellqError
from worker.protocol import CommandResult

# -- the copies in cli_fast.py, against their originals ------------------------------------------------------------


def test_the_copied_constants_match_their_originals() -> None:
    assert (fast_run.RUN_MARGIN, fast_run.READ_COUNT, cli_fast.INLINE) == (
        core.RUN_MARGIN,
        core.READ_COUNT,
        files.INLINE,
    )
    assert cli_fast.MAX_ENTRY_BYTES == protocol.MAX_ENTRY_BYTES
    assert cli_fast.CLIENT_MAXIMUMS == {"journal_ttl": protocol.JOURNAL_TTL_MAX}
    assert cli_fast.ENV_NAMES == protocol.ENV_NAMES
    assert fast_run.functions() == (protocol.FUNCTIONS, protocol.CALLER)
    exits = (cli.EXIT_TIMEOUT, cli.EXIT_SHELLQ, cli.EXIT_CANCELLED, cli.EXIT_STARTED)
    assert exits == (cli_fast.EXIT_TIMEOUT, cli_fast.EXIT_SHELLQ, cli_fast.EXIT_CANCELLED, cli_fast.EXIT_STARTED)
    assert set(get_args(protocol.Status)) == fast_run.STATUSES
    assert set(fast_run.RESULT_FIELDS) == set(CommandResult.model_fields)
    assert {f.name for f in dataclasses.fields(ServerInfo)} == cli_fast.SERVER_INFO
    numbers = {name: field.default for name, field in ClientSettings.model_fields.items()}
    assert set(numbers) == {*cli_fast.CLIENT_NUMBERS, "redis_url", "client_name"}
    assert {name: default for name, (_, default, _, _) in cli_fast.CLIENT_NUMBERS.items()} == {
        name: numbers[name] for name in cli_fast.CLIENT_NUMBERS
    }
    for url in ("redis://:pw@127.0.0.1:6379/0", "redis://127.0.0.1", "unix:///tmp/x.sock"):
        assert fast_run.redact(url) == core.redact(url)


NAMES = ["c-1", "a" * 64, "a" * 65, "", "-a", "_a", "a-_b", "1-2", "12-34", "1-", "-1", "a.b", "a:b", "é", "a b"]
ARABIC_DIGITS = "\u0661-\u0662"  # `\\d` of a bytes pattern takes ASCII digits only


@pytest.mark.parametrize("text", [*NAMES, ARABIC_DIGITS])
def test_the_fast_paths_id_and_name_checks_agree_with_the_protocols(text: str) -> None:
    assert cli_fast.valid_id(text) == bool(protocol.ID_PATTERN.match(text))
    assert cli_fast.is_entry_id(text) == protocol.is_entry_id(text)
    assert cli_fast.valid_env_name(text) == bool(re.match(r"^[A-Za-z_][A-Za-z0-9_]*\Z", text))


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"SHELLQ_HOME": "/srv/shellq"},
        {"XDG_STATE_HOME": "/var/state"},
        {"HOME": "/home/someone"},
        {"SHELLQ_HOME": "", "XDG_STATE_HOME": "", "HOME": "/h"},
    ],
)
def test_state_dir_is_the_workers(environ: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SHELLQ_HOME", "XDG_STATE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert cli_fast.state_dir(os.environ) == str(settings.state_dir())


@pytest.mark.parametrize("user", [{}, {"USER": "u1"}, {"LOGNAME": "l1", "USER": "u1"}, {"USERNAME": "n1"}])
def test_the_default_client_name_is_the_clients(user: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in user.items():
        monkeypatch.setenv(name, value)
    assert cli_fast.default_client_name() == ClientSettings.model_fields["client_name"].get_default(
        call_default_factory=True
    )


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"SHELLQ_NO_WORKER_AFTER": "2", "SHELLQ_DEFAULT_TIMEOUT": "12.5", "SHELLQ_RETRY_FOR": "0"},
        {"SHELLQ_JOURNAL_TTL": "60", "SHELLQ_QUEUE_CAP": "5", "SHELLQ_CLIENT_NAME": "bot@ci"},
        {"SHELLQ_HEARTBEAT": "0.2", "SHELLQ_HOME": "/x", "SHELLQ_NO_WORKER_AFTER": ""},
        {"SHELLQ_NO_WORKER_AFTER": "0"},  # the rest: the full path says why, or warns
        {"SHELLQ_QUEUE_CAP": "1.5"},
        {"SHELLQ_RETRY_FOR": "-1"},
        {"SHELLQ_DEFAULT_TIMEOUT": "1e3"},
        {"SHELLQ_CLIENT_NAME": "x" * 201},
        {"SHELLQ_TIMOUT": "5"},
    ],
)
def test_client_settings_are_read_as_the_client_reads_them(environ: dict[str, str]) -> None:
    fast = cli_fast.client_settings(environ)
    if fast is None:
        return  # the full path's to judge
    full = ClientSettings.from_env(environ)
    assert fast == full.model_dump(exclude={"redis_url"})


@pytest.mark.parametrize(
    "argv",
    [
        ["exec", "s1", "--", "true"],
        ["exec", "s1", "--", "echo", "a  b", "'c'"],
        ["exec", "--json", "s1", "--timeout", "2.5", "--", "sleep 1"],
        ["exec", "s1", "--timeout=30", "--timeout", "1_0", "--json", "--", "x"],
        ["exec", "s1", "--env", "A=1", "--env=B=two words", "--env", "A=3", "--env", "E=", "--", "echo $A"],
        ["exec", "s1", "--cwd", "/tmp", "--cwd=/repo dir", "--id", "c-42", "--", "pwd", "--", "-x"],
        ["exec", "s1", "--cwd", "", "--", "pwd"],
        ["exec", "s1", "--cwd", "/d\udcff", "--", "ls"],  # a directory name that is not UTF-8 (surrogate escapes)
        ["exec", "s1", "--env", "P=\udcfe", "--", "env"],
    ],
)
def test_the_fast_path_sends_the_full_paths_command_entry(argv: list[str]) -> None:
    fast = cli_fast.parse_exec(argv)
    assert fast is not None
    cut = argv.index("--")
    args = cli._parser().parse_args(argv[:cut])
    args.command += argv[cut + 1 :]
    for name in ("name", "command", "timeout", "json", "env", "cwd", "id"):
        assert getattr(fast, name) == getattr(args, name), name
    environ = {"SHELLQ_CLIENT_NAME": "tester@here", "SHELLQ_JOURNAL_TTL": "99"}
    fast_settings = cli_fast.client_settings(environ)
    assert fast_settings is not None
    cid = args.id or "c-0123456789abcdef"
    fields = cli_fast.request_fields(fast, cid, str(fast_settings["client_name"]))
    assert fields is not None
    run = fast_run.Run("redis://127.0.0.1:1/0", fast.name or "", cid, fast_settings, fields)
    env = dict(cli._key_value(item) for item in args.env)
    req = core.request(" ".join(args.command), cid, args.timeout, False, env or None, args.cwd, args.user)
    full = core.submit_call(protocol.keys(args.name), ClientSettings.from_env(environ), req)
    assert [as_bytes(x) for x in run.submit_call()] == [as_bytes(x) for x in full]


def as_bytes(value: object) -> bytes:
    """What redis-py (and hiredis) send for a command argument."""
    return value if isinstance(value, bytes) else str(value).encode(errors="surrogateescape")


@pytest.mark.parametrize(
    "argv",
    [
        ["exec", "s1", "--", ""],  # nothing to run? no: "" is a word; and these are not the fast path's:
        ["exec", "s1"],
        ["exec", "s1", "--follow", "--", "x"],
        ["exec", "s1", "-i", "--", "x"],
        ["exec", "s1", "-u", "nobody", "--", "x"],
        ["exec", "s1", "--js", "--", "x"],
        ["exec", "s1", "--timeout", "-1", "--", "x"],
        ["exec", "s1", "--timeout", "inf", "--", "x"],
        ["exec", "s1", "--timeout", "0", "--", "x"],
        ["exec", "s1", "--timeout", "--", "x"],
        ["exec", "s1", "echo", "--", "x"],
        ["exec", "--", "x"],
        ["exec", "s1", "--json=1", "--", "x"],
        ["log", "s1"],
        ["session", "list"],
    ],
)
def test_other_forms_are_the_full_paths(argv: list[str]) -> None:
    assert (cli_fast.parse_exec(argv) is None) == (argv != ["exec", "s1", "--", ""])


@pytest.mark.parametrize(
    "env, cwd",
    [({"A": "1", "_B": "x"}, None), ({"1A": "x"}, None), ({}, "/tmp"), (None, "\udcff")],
)
def test_env_names_and_cwds_the_model_refuses_are_the_full_paths(env: dict[str, str] | None, cwd: str | None) -> None:
    args = cli_fast.ExecArgs()
    args.name, args.command, args.cwd = "s1", ["true"], cwd
    args.env = [f"{k}={v}" for k, v in (env or {}).items()]
    fields = cli_fast.request_fields(args, "c-1", "me@here")
    try:
        core.request("true", "c-1", None, False, env or None, cwd)
    except protocol.ConfigError:
        assert fields is None
    else:
        assert fields is not None


RESULTS = [
    CommandResult(id="c-1", entry_id="1-0", status="completed", exit_code=0, stdout=b"hi\n", cwd="/tmp"),
    CommandResult(
        id="c-1",
        entry_id="17-3",
        status="completed",
        exit_code=3,
        stdout=b"out\xff\x00",
        stderr=b"err \xe2\x82",
        stdout_size=5,
        stderr_size=6,
        duration_ms=12.345,
        shell_epoch=4,
        cwd="/d\udcff",
    ),
    CommandResult(id="c-1", entry_id="1-0", status="timeout", stdout=b"begun\n", duration_ms=500.0),
    CommandResult(id="c-1", entry_id="1-0", status="cancelled", error="interrupted by c"),
    CommandResult(id="c-1", entry_id="1-0", status="rejected", error="no-such-user-x: no such user"),
    CommandResult(id="c-1", entry_id="1-0", status="shell_exited", exit_code=7, shell_epoch=2),
    CommandResult(id="c-1", entry_id="1-0", status="interrupted"),
    CommandResult(
        id="c-1",
        entry_id="1-0",
        status="completed",
        exit_code=0,
        stdout=b"a" * 10,
        stdout_size=1 << 30,
        truncated=True,
        spool_path="/s/p",
        duration_ms=1e-05,
    ),
    CommandResult(id="c-1", entry_id="1-0", status="completed", exit_code=2, errno=2, filename="/x", streamed=True),
]


@pytest.mark.parametrize("result", RESULTS, ids=lambda r: r.status)
def test_results_read_and_shown_as_the_full_path_does(
    result: CommandResult, capsys: pytest.CaptureFixture[str]
) -> None:
    fields = {name.encode(): value for name, value in protocol.encode(result).items()}  # as XREAD gives them
    full = Result.from_wire(protocol.decode(CommandResult, fields))
    shown = fast_run.result_view(fields, "c-1")
    assert shown is not None
    assert cli_fast.json_text(shown) == json.dumps(cli._json_view(full))
    assert shown[1:] == (full.stdout_bytes, full.stderr_bytes)
    fast_status = cli_fast.exit_status(full.id, full.status, full.exit_code, full.error)
    fast_err = capsys.readouterr().err
    assert (fast_status, fast_err) == (cli._exit_status(full), capsys.readouterr().err)


@pytest.mark.parametrize(
    "fields",
    [
        {b"id": b"c-2", b"entry_id": b"1-0", b"status": b"completed"},  # another command's
        {b"id": b"c-1", b"entry_id": b"1-0", b"status": b"finished"},
        {b"id": b"c-1", b"status": b"completed"},
        {b"id": b"c-1", b"entry_id": b"1-0", b"status": b"completed", b"exit_code": b"x"},
        {b"id": b"c-1", b"entry_id": b"1-0", b"status": b"completed", b"truncated": b"yes"},
        {b"id": b"c-1", b"entry_id": b"1-0", b"status": b"completed", b"colour": b"blue"},
        {b"id": b"c-1", b"entry_id": b"1-0", b"status": b"completed", b"v": b"2"},
        {b"id": b"c-1", b"entry_id": b"1-0", b"status": b"completed", b"duration_ms": b"nan"},
    ],
)
def test_result_entries_it_does_not_expect_are_the_full_paths(fields: dict[bytes, bytes]) -> None:
    assert fast_run.result_view(fields, "c-1") is None


@pytest.mark.parametrize(
    "reply",
    [
        *([10_000, beat, b"running"] for beat in (b"9500", b"5000", None)),
        *([10_000, b"9999", state] for state in (b"stopped", b"gone", b"lost", None)),
        *([10_000, b"9999", b"idle", since, b"OOM command not allowed"] for since in (b"9000", b"7000", None)),
    ],
)
def test_a_worker_is_gone_when_the_client_says_so(reply: list[Any]) -> None:
    try:
        core.check_worker("s1", reply, 2.0)
    except ShellqError:
        assert fast_run.worker_gone(reply, 2.0)
    else:
        assert not fast_run.worker_gone(reply, 2.0)


# -- end to end: the console script, against a `shellq up` server ---------------------------------------------------


@pytest.fixture
def shellq(cli: Cli) -> Cli:
    return cli


@pytest.fixture
def session(cli_session: str) -> str:
    return cli_session


def fast(shellq: Cli, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[bytes], str]:
    """The console script, with `python -X importtime` on: its result, and the modules it imported."""
    done = shellq(*args, env={"PYTHONPROFILEIMPORTTIME": "1", **(env or {})})
    lines = done.stderr.splitlines(keepends=True)
    imported = b"".join(line for line in lines if line.startswith(b"import time:")).decode()
    done.stderr = b"".join(line for line in lines if not line.startswith(b"import time:"))
    return done, imported


def full(shellq: Cli, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """producer/cli.py itself."""
    command = [sys.executable, "-m", "producer.cli", *args]
    return subprocess.run(command, env={**shellq.env, **(env or {})}, capture_output=True, cwd=ROOT, check=False)


def took_the_fast_path(imported: str) -> bool:
    modules = {line.rsplit("|", 1)[1].strip() for line in imported.splitlines()}
    return "worker.resp" in modules and not {"redis", "pydantic", "producer.cli"} & modules


def test_exec_takes_the_fast_path_with_the_same_output(shellq: Cli, session: str, tmp_path: Path) -> None:
    done, imported = fast(shellq, "exec", session, "--", "printf 'out\\xff'; printf err >&2; exit 3")
    assert (done.returncode, done.stdout, done.stderr.splitlines()[-1]) == (3, b"out\xff", b"err")
    assert took_the_fast_path(imported), imported
    assert done.stderr == full(shellq, "exec", session, "--", "printf 'out\\xff'; printf err >&2; exit 3").stderr

    options = ["--json", "--env", "A=1", "--env", "B=two words", "--cwd", str(tmp_path), "--timeout", "20"]
    command = ["--", "echo $A $B; pwd; echo oops >&2; false"]
    done, imported = fast(shellq, "exec", session, *options, *command)
    assert took_the_fast_path(imported), imported
    slow = full(shellq, "exec", session, *options, *command)
    assert (done.returncode, done.stderr) == (slow.returncode, slow.stderr)
    views = [json.loads(done.stdout), json.loads(slow.stdout)]
    for view in views:  # what differs from one run to the next
        del view["id"], view["entry_id"], view["duration_ms"]
    assert views[0] == views[1]
    assert views[0]["stdout"] == f"1 two words\n{tmp_path}\n"

    timed_out, imported = fast(shellq, "exec", session, "--timeout", "0.3", "--", "echo begun; sleep 30")
    assert (timed_out.returncode, timed_out.stdout) == (124, b"begun\n")
    assert took_the_fast_path(imported)


def test_the_same_id_twice_runs_once(shellq: Cli, session: str) -> None:
    r = redis.Redis.from_url(shellq.url())
    first, imported = fast(shellq, "exec", session, "--id", "once-1", "--", "echo ran >> runs; wc -l < runs")
    assert (first.returncode, first.stdout) == (0, b"1\n")
    assert took_the_fast_path(imported)
    again, imported = fast(shellq, "exec", session, "--id", "once-1", "--json", "--", "echo ran >> runs; wc -l < runs")
    assert again.returncode == 0 and json.loads(again.stdout)["stdout"] == "1\n"
    assert took_the_fast_path(imported)
    assert r.xlen(protocol.keys(session).cmd) == 1
    bad = shellq("exec", session, "--id", "1-1", "--", "true")  # looks like an entry id: the full path says so
    assert bad.returncode == 125 and bad.stderr.splitlines()[-1].startswith(b"shellq: command id '1-1'")


def test_an_unreachable_redis_reads_as_on_the_full_path(shellq: Cli) -> None:
    env = {"SHELLQ_REDIS_URL": f"redis://:pw@127.0.0.1:{free_port()}/0", "SHELLQ_RETRY_FOR": "0"}
    done = shellq("exec", "s1", "--", "true", env=env)
    assert done.returncode == 125
    assert done.stderr.startswith(b"shellq: cannot reach Redis at redis://***@127.0.0.1:")
    assert len(done.stderr.splitlines()) == 1 and b"Traceback" not in done.stderr
    assert done.stderr == full(shellq, "exec", "s1", "--", "true", env=env).stderr


def test_a_rediss_url_naming_a_plain_redis_says_so(shellq: Cli) -> None:
    """A plain Redis takes a TLS handshake for the start of a command and never answers it: the CLI (the full path,
    which takes rediss:// URLs) says the server does not speak TLS, instead of waiting out the read timeout on every
    retry (7.5 minutes)."""
    plain = shellq.url()
    host_port = plain.rsplit("@", 1)[-1].split("/", 1)[0]
    done = shellq("exec", "s1", "--", "true", env={"SHELLQ_REDIS_URL": plain.replace("redis://", "rediss://", 1)})
    assert done.returncode == 125
    assert done.stderr.splitlines()[-1] == (
        f"shellq: Redis at {host_port} does not speak TLS: use a redis:// URL for it, not rediss://".encode()
    )


def test_what_the_fast_path_does_not_take_goes_to_the_full_path(shellq: Cli, session: str) -> None:
    done, imported = fast(shellq, "exec", session, "--follow", "--", "echo followed")
    assert (done.returncode, done.stdout) == (0, b"followed\n")
    assert "pydantic" in imported and not took_the_fast_path(imported)
    unknown, imported = fast(shellq, "exec", session, "--", "echo hi", env={"SHELLQ_NO_WORKR_AFTER": "1"})
    assert (unknown.returncode, unknown.stdout) == (0, b"hi\n")
    assert b"did you mean SHELLQ_NO_WORKER_AFTER?" in unknown.stderr
    assert not took_the_fast_path(imported)


def test_exec_id_of_a_command_cancelled_before_it_started_says_why(shellq: Cli, session_id: str) -> None:
    """The same id again after a wait that gave up (no worker: the command was cancelled unrun) exits 130 and says
    why on stderr, instead of an exit status alone."""
    env = {"SHELLQ_NO_WORKER_AFTER": "1"}
    assert shellq("exec", session_id, "--id", "gave-up", "--", "true", env=env).returncode == 125
    again = shellq("exec", session_id, "--id", "gave-up", "--", "true", env=env)
    assert again.returncode == 130
    assert again.stderr.splitlines()[-1].startswith(b"shellq: command gave-up cancelled: cancelled before it started:")


def test_no_worker_gives_up_and_cancels_on_the_fast_path(shellq: Cli, session_id: str) -> None:
    done = shellq("exec", session_id, "--", "true", env={"SHELLQ_NO_WORKER_AFTER": "1"})
    assert done.returncode == 125
    [line] = [line for line in done.stderr.splitlines() if not line.startswith(b"shellq: using")]
    assert line.startswith(b"shellq: no worker has ever served session") and b"will never run" in line


# -- found by trying the two paths side by side ---------------------------------------------------------------------


@pytest.mark.parametrize("path", ["fast", "full"])
@pytest.mark.parametrize("closed", [1, 2])
def test_a_closed_stdout_or_stderr_never_lets_output_reach_redis(
    shellq: Cli, session: str, path: str, closed: int
) -> None:
    """With fd 1 or 2 closed, the Redis connection took that number, and the command's output went to Redis as
    commands (the full path: exit 0, and `SET` had run)."""
    key = f"injected-{path}-{closed}"
    command = f"printf 'SET {key} yes\\r\\n' >&{closed}"
    script = [str(SHELLQ_SCRIPT)] if path == "fast" else [sys.executable, "-m", "producer.cli"]
    done = subprocess.run(
        ["bash", "-c", f'exec "$@" {closed}>&-', "bash", *script, "exec", session, "--", command],
        env={**shellq.env, "SHELLQ_REDIS_URL": shellq.url()},
        capture_output=True,
        cwd=ROOT,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done
    assert redis.Redis.from_url(shellq.url()).exists(key) == 0


@pytest.mark.parametrize("scheme", ["REDIS", "Redis"])
def test_a_scheme_not_in_lower_case_reads_as_on_the_full_path(shellq: Cli, session: str, scheme: str) -> None:
    url = shellq.url().replace("redis://", f"{scheme}://", 1)
    fast_done, _ = fast(shellq, "exec", session, "--", "echo x", env={"SHELLQ_REDIS_URL": url})
    full_done = full(shellq, "exec", session, "--", "echo x", env={"SHELLQ_REDIS_URL": url})
    assert (fast_done.returncode, fast_done.stdout, fast_done.stderr) == (
        full_done.returncode,
        full_done.stdout,
        full_done.stderr,
    )
    assert redis.Redis.from_url(shellq.url()).xlen(protocol.keys(session).cmd) == 0


def test_a_journal_ttl_past_redis_range_is_refused_before_anything_is_queued(shellq: Cli, session: str) -> None:
    env = {"SHELLQ_JOURNAL_TTL": "99999999999999999999", "SHELLQ_REDIS_URL": shellq.url()}
    for done in (
        shellq("exec", session, "--", "echo x", env=env),
        full(shellq, "exec", session, "--", "echo x", env=env),
    ):
        assert done.returncode == 125 and b"journal_ttl" in done.stderr and b"Traceback" not in done.stderr
    assert redis.Redis.from_url(shellq.url()).xlen(protocol.keys(session).cmd) == 0
