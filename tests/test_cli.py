"""The `shellq` console script end to end, in subprocesses, against a private `shellq up` server."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from helpers import Cli, free_port, wait_for

from worker import protocol

SHELLQ = Path(sys.executable).parent / "shellq"


@pytest.fixture
def session(cli_session: str) -> str:
    return cli_session


def test_up_records_a_private_server_the_other_verbs_find(cli: Cli, tmp_path: Path) -> None:
    again = cli("up")
    assert again.returncode == 0
    assert b"already running" in again.stdout
    record = Path(cli.env["SHELLQ_HOME"]) / "server.json"
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    info = json.loads(record.read_text())
    assert info["url"].startswith("redis://:") and "@127.0.0.1:" in info["url"]
    r = redis.Redis.from_url(info["url"])
    assert r.config_get("appendonly")["appendonly"] == "yes"
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=info["port"]).ping()
    listing = cli("session", "list")
    assert listing.returncode == 0
    assert b"using the server of `shellq up`" in listing.stderr


def test_exec_passes_output_bytes_and_exit_status_through(cli: Cli, session: str) -> None:
    r = cli("exec", session, "--", "printf 'out\\xff\\x00'; printf err >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr.split(b"\n")[-1]) == (3, b"out\xff\x00", b"err")


def test_exec_keeps_state_between_invocations(cli: Cli, session: str, tmp_path: Path) -> None:
    assert cli("exec", session, "--", f"cd {tmp_path} && export COLOUR=blue").returncode == 0
    r = cli("exec", session, "--", "echo", "$COLOUR", "&&", "pwd")
    assert r.stdout == f"blue\n{tmp_path}\n".encode()


def test_exec_env_cwd_and_json(cli: Cli, session: str, tmp_path: Path) -> None:
    r = cli(
        "exec",
        session,
        "--json",
        "--env",
        "A=1",
        "--env",
        "B=two words",
        "--cwd",
        str(tmp_path),
        "--",
        "echo $A $B; pwd",
    )
    assert r.returncode == 0
    view = json.loads(r.stdout)
    assert view["status"] == "completed" and view["exit_code"] == 0
    assert view["stdout"] == f"1 two words\n{tmp_path}\n"
    assert base64.b64decode(view["stdout_b64"]) == view["stdout"].encode()
    assert view["cwd"] == str(tmp_path)


def test_exec_timeout_exits_124_and_keeps_the_session(cli: Cli, session: str) -> None:
    r = cli("exec", session, "--timeout", "0.5", "--", "echo begun; sleep 30")
    assert (r.returncode, r.stdout) == (124, b"begun\n")
    assert cli("exec", session, "--", "echo fine").stdout == b"fine\n"


def test_exec_interrupted_exits_130(cli: Cli, session: str) -> None:
    proc = cli.popen("exec", session, "--", "sleep 30")
    r = redis.Redis.from_url(cli.url())
    meta = protocol.keys(session).meta
    wait_for(lambda: r.hget(meta, "current"))
    from producer import Client

    Client(cli.url()).session(session).interrupt(r.hget(meta, "current").decode())  # type: ignore[union-attr]
    assert proc.wait(timeout=20) == 130
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    proc.stderr.close()


def test_exec_without_worker_exits_125_quickly(cli: Cli, session_id: str) -> None:
    r = cli("exec", session_id, "--", "true", timeout=30)
    assert r.returncode == 125
    assert b"no worker" in r.stderr


def test_exec_without_redis_exits_125_naming_the_problem(cli: Cli) -> None:
    r = cli("exec", "s1", "--", "true", env={"SHELLQ_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert r.returncode == 125
    assert b"cannot reach Redis" in r.stderr
    assert b"Traceback" not in r.stderr


def test_session_list_and_stop(cli: Cli, session: str) -> None:
    cli("exec", session, "--", "exit 0")
    row = next(line for line in cli("session", "list").stdout.decode().splitlines() if line.startswith(session))
    assert row.split()[1:5] == ["local", "alive", "idle", "0"]
    kept = cli("session", "stop", session, "--keep")
    assert kept.returncode == 0 and b"streams kept" in kept.stdout
    r = redis.Redis.from_url(cli.url())
    assert r.xlen(protocol.keys(session).res) == 1
    row = next(line for line in cli("session", "list").stdout.decode().splitlines() if line.startswith(session))
    assert row.split()[2] == "down"
    gone = cli("session", "stop", session)
    assert gone.returncode == 0 and b"no worker was running" in gone.stdout
    assert r.exists(protocol.keys(session).res) == 0
    assert session not in cli("session", "list").stdout.decode()


def test_shellq_worker_serves_a_session(cli: Cli, session_id: str) -> None:
    proc = subprocess.Popen(
        [str(SHELLQ), "worker", "--session", session_id],
        env={**cli.env, "SHELLQ_REDIS_URL": cli.url()},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        r = cli("exec", session_id, "--", "echo served", env={"SHELLQ_REDIS_URL": cli.url()})
        assert r.stdout == b"served\n"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0


def test_down_stops_the_server(tmp_path: Path) -> None:
    run = Cli(tmp_path)
    assert run("up").returncode == 0
    url = run.url()
    stopped = run("down")
    assert (stopped.returncode, stopped.stdout) == (0, b"shellq: server stopped\n")
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url).ping()
    assert run("down").stdout == b"shellq: no server was running\n"
    missing = run("session", "list")
    assert missing.returncode == 1 and b"shellq up" in missing.stderr


# -- lifecycle: what a user means by start, stop, down and up ------------------------------------------------------


def _json(cli: Cli, session: str, command: str) -> dict[str, object]:
    done = cli("exec", session, "--json", "--", command)
    assert done.returncode == 0, done.stderr
    view: dict[str, object] = json.loads(done.stdout)
    return view


def test_a_stopped_session_name_starts_fresh(cli: Cli, session_id: str) -> None:
    assert cli("session", "start", "--name", session_id).returncode == 0
    first = _json(cli, session_id, "export COLOUR=blue")
    stopped = cli("session", "stop", session_id)
    assert stopped.returncode == 0 and b"the name is free again" in stopped.stdout
    again = cli("session", "start", "--name", session_id)
    assert again.returncode == 0, again.stderr
    try:
        view = _json(cli, session_id, "echo colour=$COLOUR")
        assert (view["stdout"], view["shell_epoch"]) == ("colour=\n", first["shell_epoch"])  # new: no state, no history
        assert redis.Redis.from_url(cli.url()).xlen(protocol.keys(session_id).res) == 1
    finally:
        cli("session", "stop", session_id)


def test_stop_keep_then_start_resumes_the_session(cli: Cli, session_id: str) -> None:
    assert cli("session", "start", "--name", session_id).returncode == 0
    try:
        twice = cli("session", "start", "--name", session_id)
        assert twice.returncode == 1 and b"already has a live worker" in twice.stderr
        first = _json(cli, session_id, "echo one")
        kept = cli("session", "stop", session_id, "--keep")
        assert kept.returncode == 0 and b"resumes it" in kept.stdout
        resumed = cli("session", "start", "--name", session_id)
        assert resumed.returncode == 0, resumed.stderr
        second = _json(cli, session_id, "echo two")
        assert second["stdout"] == "two\n"
        assert second["shell_epoch"] == int(str(first["shell_epoch"])) + 1  # a new bash: the epoch says so
        history = redis.Redis.from_url(cli.url()).xrange(protocol.keys(session_id).res)
        assert [fields[b"stdout"] for _, fields in history] == [b"one\n", b"two\n"]
    finally:
        cli("session", "stop", session_id)


def test_stop_of_an_unknown_session_says_so(cli: Cli, session_id: str) -> None:
    for args in ((), ("--keep",)):
        done = cli("session", "stop", session_id, *args)
        assert done.returncode == 1
        assert (
            done.stderr.splitlines()[-1]
            == f"shellq: no session {session_id} (`shellq session list` shows them)".encode()
        )


def _row(cli: Cli, session: str) -> str:
    listing = cli("session", "list")
    assert listing.returncode == 0, listing.stderr
    return next(line for line in listing.stdout.decode().splitlines() if line.startswith(session + " "))


def test_session_list_shows_queued_commands_nobody_serves(cli: Cli, session_id: str) -> None:
    from producer import Client

    with Client(cli.url()) as client:
        never = client.session(session_id)
        never.submit("echo one")
        never.submit("echo two")
        row = _row(cli, session_id)
        assert row.split()[1:5] == ["-", "none", "-", "2"]
        assert row.endswith("no worker, 2 queued")

        served = f"{session_id}-b"
        assert cli("session", "start", "--name", served).returncode == 0
        try:
            assert cli("session", "stop", served, "--keep").returncode == 0
            client.session(served).submit("echo three")
            row = _row(cli, served)
            assert row.split()[1:5] == ["local", "down", "stopped", "1"]
            assert row.endswith("no worker, 1 queued")
        finally:
            cli("session", "stop", served)
    assert cli("session", "stop", session_id).returncode == 0
    assert session_id not in cli("session", "list").stdout.decode()


def test_down_stops_live_sessions_and_up_brings_back_the_same_server(tmp_path: Path, session_id: str) -> None:
    run = Cli(tmp_path)
    assert run("up").returncode == 0
    url = run.url()
    try:
        assert run("session", "start", "--name", session_id).returncode == 0
        pid = int(redis.Redis.from_url(url).hget(protocol.keys(session_id).meta, "pid") or 0)
        assert _json(run, session_id, "echo before")["status"] == "completed"
        down = run("down")
        assert down.returncode == 0, down.stderr
        assert f"stopped session {session_id} (local), history kept".encode() in down.stdout
        assert b"Traceback" not in down.stderr
        assert not Path(f"/proc/{pid}").exists() or b" Z " in Path(f"/proc/{pid}/stat").read_bytes()

        up = run("up")
        assert up.returncode == 0 and b"started" in up.stdout
        assert run.url() == url  # same port, same password: URLs handed out before still work
        assert redis.Redis.from_url(url).xlen(protocol.keys(session_id).res) == 1
        assert _row(run, session_id).split()[2:4] == ["down", "stopped"]
        assert run("session", "start", "--name", session_id).returncode == 0
        assert _json(run, session_id, "echo after")["stdout"] == "after\n"
    finally:
        run("session", "stop", session_id)
        run("down")


def test_ctrl_c_on_exec_cancels_the_command(cli: Cli, session: str) -> None:
    proc = cli.popen("exec", session, "--", "sleep 30")
    r = redis.Redis.from_url(cli.url())
    wait_for(lambda: r.hget(protocol.keys(session).meta, "current"))
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130
    assert b"Traceback" not in err and b"shellq: interrupted; command c-" in err
    wait_for(lambda: r.xlen(protocol.keys(session).res) == 1)
    [(_, fields)] = r.xrange(protocol.keys(session).res)
    assert fields[b"status"] == b"cancelled"
    assert cli("exec", session, "--", "echo next").stdout == b"next\n"


BAD_SITUATIONS = {
    "no server": {},
    "nothing listening": {"SHELLQ_REDIS_URL": "redis://127.0.0.1:{closed}/0", "SHELLQ_RETRY_FOR": "0"},
    "wrong password": {"SHELLQ_REDIS_URL": "redis://:wrong@127.0.0.1:{port}/0", "SHELLQ_RETRY_FOR": "0"},
}
VERBS = [
    ("session", "list"),
    ("session", "start", "--name", "s1"),
    ("session", "start", "--backend", "docker", "--name", "s1"),
    ("session", "stop", "s1"),
    ("session", "stop", "s1", "--keep"),
    ("exec", "s1", "--", "true"),
    ("gc",),
]


@pytest.mark.parametrize("situation", sorted(BAD_SITUATIONS))
def test_every_verb_fails_in_one_line_without_a_traceback(cli: Cli, tmp_path: Path, situation: str) -> None:
    port = json.loads((Path(cli.env["SHELLQ_HOME"]) / "server.json").read_text())["port"]
    env = {k: v.format(closed=free_port(), port=port) for k, v in BAD_SITUATIONS[situation].items()}
    lonely = Cli(tmp_path)  # a home where `shellq up` never ran
    for verb in VERBS:
        done = lonely(*verb, env=env)
        lines = [line for line in done.stderr.decode().splitlines() if not line.startswith("shellq: using")]
        assert done.returncode == (125 if verb[0] == "exec" else 1), (verb, done.stderr)
        assert len(lines) == 1 and lines[0].startswith("shellq: "), (verb, done.stderr)
        assert "Traceback" not in done.stderr.decode()


@pytest.mark.parametrize(
    "args",
    [
        ("session", "start", "--name", "bad:name"),
        ("session", "stop", "-bad"),
        ("exec", "bad name", "--", "true"),
        ("exec", "s1"),
        ("exec", "s1", "--env", "NOEQUALS", "--", "true"),
        ("image", "build", "--base", "shellq-no-such-base:1", "--tag", "shellq-no-such:1"),
    ],
)
def test_bad_arguments_get_one_line(cli: Cli, args: tuple[str, ...]) -> None:
    done = cli(*args)
    assert done.returncode in (1, 2, 125), done.stderr
    assert b"Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1].startswith(b"shellq")


def test_docker_and_rq_come_with_shellq() -> None:
    from importlib.metadata import requires

    plain = [re.match(r"[A-Za-z0-9_.-]+", r).group() for r in requires("shellq") or [] if "extra ==" not in r]  # type: ignore[union-attr]
    assert {"docker", "rq"} <= set(plain)


def test_up_after_down_says_when_the_old_port_is_taken(tmp_path: Path) -> None:
    import socket

    run = Cli(tmp_path)
    assert run("up", "--data-dir", str(tmp_path / "data")).returncode == 0
    before = json.loads((tmp_path / "server.json").read_text())
    assert run("down").returncode == 0
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", before["port"]))
        up = run("up")  # no --data-dir: the one `down` left
        try:
            assert up.returncode == 0, up.stderr
            assert f"port {before['port']} is taken now".encode() in up.stderr
            after = json.loads((tmp_path / "server.json").read_text())
            assert after["data_dir"] == before["data_dir"] and after["port"] != before["port"]
            assert after["url"].split("@")[0] == before["url"].split("@")[0]  # the same password
        finally:
            run("down")


def test_exec_i_gives_the_command_this_stdin(cli: Cli, session: str) -> None:
    data = os.urandom(3 << 20) + b"\0end"  # over the inline limit: it goes in chunks
    done = cli("exec", session, "-i", "--", "sha256sum", stdin=data)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    assert cli("exec", session, "--", "cat").stdout == b""  # without -i: /dev/null


def test_exec_u_runs_one_command_as_another_user(cli: Cli, session: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("switching users needs a worker run as root")
    cli("exec", session, "--", "cd /tmp && export MINE=1")
    done = cli("exec", session, "-u", "nobody", "--", "whoami; pwd; echo $MINE; cd /")
    assert done.stdout == b"nobody\n/tmp\n1\n"
    assert cli("exec", session, "--", "pwd").stdout == b"/tmp\n"  # the child's cd left the shell alone
    unknown = cli("exec", session, "-u", "no-such-user-x", "--", "true")
    assert unknown.returncode == 125 and b"no-such-user-x: no such user" in unknown.stderr


def test_cp_copies_files_and_trees_both_ways(cli: Cli, session: str, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "a.bin").write_bytes(os.urandom(100_000))
    (tree / "top.txt").write_text("top\n")
    remote = f"/tmp/cp-{session}"
    assert cli("cp", str(tree), f"{session}:{remote}").returncode == 0
    assert cli("exec", session, "--", f"cat {remote}/top.txt").stdout == b"top\n"
    back = tmp_path / "back"
    back.mkdir()
    done = cli("cp", f"{session}:{remote}", f"{back}/")  # an existing directory receives it under its own name
    assert done.returncode == 0, done.stderr
    assert (back / f"cp-{session}" / "sub" / "a.bin").read_bytes() == (tree / "sub" / "a.bin").read_bytes()
    assert cli("cp", f"{session}:{remote}/top.txt", "-").stdout == b"top\n"
    missing = cli("cp", f"{session}:{remote}/nope", str(tmp_path / "x"))
    assert missing.returncode == 1 and b"No such file or directory" in missing.stderr and b"nope" in missing.stderr
    both_local = cli("cp", str(tree), str(tmp_path / "y"))
    assert both_local.returncode == 1 and b"name one session path" in both_local.stderr
