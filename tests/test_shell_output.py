"""Output comes back byte-exact, bounded by the cap with the full stream spooled, and background jobs never block."""

from __future__ import annotations

import shlex
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from shell_helpers import PY, assert_ok, free_port, python_command, run_timed

from worker.shell import Shell, ShellResult


def assert_untruncated(r: ShellResult) -> None:
    assert (r.stdout_size, r.stderr_size) == (len(r.stdout), len(r.stderr))
    assert (r.truncated, r.spool_path) == (False, None)


def numbered_lines(count: int) -> bytes:
    """Distinct 10-byte lines, so any misplaced slice of the output shows."""
    return b"".join(b"%09d\n" % i for i in range(count))


def print_numbered_lines(count: int, stream: str) -> str:
    code = f"import sys; sys.{stream}.buffer.write(b''.join(b'%09d\\n' % i for i in range({count})))"
    return python_command(code)


def test_output_without_trailing_newline(shell: Shell) -> None:
    r = shell.run("printf abc")
    assert_ok(r, b"abc")
    assert_untruncated(r)


def test_stderr_without_trailing_newline(shell: Shell) -> None:
    assert_ok(shell.run("printf err >&2"), b"", b"err")


def test_stdout_and_stderr_are_separate(shell: Shell) -> None:
    r = shell.run("echo out1; echo err1 >&2; echo out2; echo err2 >&2")
    assert_ok(r, b"out1\nout2\n", b"err1\nerr2\n")
    assert (r.stdout_size, r.stderr_size) == (10, 10)


def test_empty_output(shell: Shell) -> None:
    r = shell.run("true")
    assert_ok(r, b"")
    assert (r.stdout_size, r.stderr_size, r.truncated, r.spool_path) == (0, 0, False, None)


def test_marker_like_output_is_returned_exactly(shell: Shell) -> None:
    text = "__SHELLQ_DONE__ 0 /\nEOF\n$? $PWD\n\x1b]0;title\x07\r\nPS1> \n___"
    r = shell.run(f"printf '%s' {shlex.quote(text)}")
    assert_ok(r, text.encode())


def test_nul_and_invalid_utf8_bytes_are_returned_exactly(shell: Shell) -> None:
    r = shell.run(r"printf '\xff\xfe\x00abc'; printf '\x00\xc3' >&2")
    assert_ok(r, b"\xff\xfe\x00abc", b"\x00\xc3")
    assert (r.stdout_size, r.stderr_size) == (6, 2)


def test_multibyte_character_split_across_pipe_boundary(shell: Shell) -> None:
    expected = b"a" * 65535 + "é".encode() + b"b" * 70000 + "€".encode()
    code = "import sys; sys.stdout.buffer.write(b'a' * 65535 + 'é'.encode() + b'b' * 70000 + '€'.encode())"
    r = shell.run(f"{python_command(code)} | cat")
    assert_ok(r, expected)
    assert_untruncated(r)


def test_small_output_is_not_truncated(shell: Shell) -> None:
    r = shell.run("seq 1000")
    assert_ok(r, b"".join(b"%d\n" % i for i in range(1, 1001)))
    assert_untruncated(r)


def test_large_output_keeps_head_and_tail(make_shell: Callable[..., Shell]) -> None:
    sh = make_shell(output_cap=1 << 20)
    full = numbered_lines(524_288)
    r, _ = run_timed(sh, print_numbered_lines(524_288, "stdout"))
    assert (r.status, r.exit_code, r.stderr, r.stderr_size) == ("completed", 0, b"", 0)
    assert r.stdout_size == len(full) == 5 << 20
    assert r.truncated
    assert len(r.stdout) == 1 << 20
    assert r.stdout == full[: 512 << 10] + full[-(512 << 10) :]


def test_large_output_is_spooled_in_full(make_shell: Callable[..., Shell], tmp_path: Path) -> None:
    work_dir = tmp_path / "session"
    work_dir.mkdir()
    sh = make_shell(work_dir=str(work_dir), output_cap=1 << 20)
    r, _ = run_timed(sh, print_numbered_lines(524_288, "stdout"))
    assert r.spool_path is not None
    assert Path(r.spool_path).resolve().is_relative_to((work_dir / "spool").resolve())
    assert (Path(r.spool_path) / "stdout").read_bytes() == numbered_lines(524_288)


def test_large_stderr_is_truncated_on_its_own(make_shell: Callable[..., Shell]) -> None:
    sh = make_shell(output_cap=1 << 20)
    full = numbered_lines(300_000)
    r, _ = run_timed(sh, "echo small; " + print_numbered_lines(300_000, "stderr"))
    assert (r.status, r.exit_code, r.stdout, r.stdout_size) == ("completed", 0, b"small\n", 6)
    assert (r.stderr_size, r.truncated) == (len(full), True)
    assert r.stderr == full[: 512 << 10] + full[-(512 << 10) :]
    assert r.spool_path is not None
    assert (Path(r.spool_path) / "stderr").read_bytes() == full


def test_spool_holds_both_streams_when_one_is_truncated(make_shell: Callable[..., Shell]) -> None:
    sh = make_shell(output_cap=1000)
    r = sh.run("echo small; head -c 5000 /dev/zero >&2", timeout=60)
    assert (r.status, r.stdout, r.stderr_size, r.truncated) == ("completed", b"small\n", 5000, True)
    assert r.spool_path is not None
    assert (Path(r.spool_path) / "stdout").read_bytes() == b"small\n"
    assert (Path(r.spool_path) / "stderr").read_bytes() == bytes(5000)


def test_output_just_under_cap_is_kept_whole(make_shell: Callable[..., Shell]) -> None:
    sh = make_shell(output_cap=1000)
    r = sh.run("head -c 999 /dev/zero | tr '\\0' x")
    assert_ok(r, b"x" * 999)
    assert_untruncated(r)


def test_output_just_over_cap_keeps_head_and_tail(make_shell: Callable[..., Shell]) -> None:
    sh = make_shell(output_cap=1000)
    r = sh.run("printf 'h%.0s' $(seq 500); printf m; printf 't%.0s' $(seq 500)")
    assert (r.status, r.exit_code, r.stdout_size, r.truncated) == ("completed", 0, 1001, True)
    assert r.stdout == b"h" * 500 + b"t" * 500
    assert r.spool_path is not None
    assert (Path(r.spool_path) / "stdout").read_bytes() == b"h" * 500 + b"m" + b"t" * 500


def test_background_job_returns_at_once(shell: Shell) -> None:
    r, elapsed = run_timed(shell, "sleep 30.11 &")
    assert_ok(r, b"")
    assert elapsed < 5


def test_background_job_holding_stdout_returns_at_once(shell: Shell) -> None:
    r, elapsed = run_timed(shell, "(echo started; sleep 30.12; echo never) &")
    assert r.status == "completed"
    assert elapsed < 5
    assert b"never" not in r.stdout


def test_nohup_background_job_returns_at_once(shell: Shell) -> None:
    r, elapsed = run_timed(shell, "nohup sleep 30.13 >/dev/null 2>&1 &")
    assert_ok(r, b"")
    assert elapsed < 5


def test_setsid_background_job_returns_at_once(shell: Shell) -> None:
    r, elapsed = run_timed(shell, "setsid sleep 30.14 &")
    assert_ok(r, b"")
    assert elapsed < 5


def test_background_server_survives_later_commands(shell: Shell, tmp_path: Path) -> None:
    (tmp_path / "hello.txt").write_text("hello from server\n")
    port = free_port()
    r, elapsed = run_timed(shell, f"{PY} -m http.server {port} --bind 127.0.0.1 --directory '{tmp_path}' &")
    assert (r.status, r.exit_code) == ("completed", 0)
    assert elapsed < 5
    assert_ok(shell.run("true"), b"")
    assert_ok(shell.run("sleep 0.2"), b"")
    fetch = (
        "import time, urllib.request\n"
        "for _ in range(100):\n"
        "    try:\n"
        f"        body = urllib.request.urlopen('http://127.0.0.1:{port}/hello.txt', timeout=5).read()\n"
        "        break\n"
        "    except OSError:\n"
        "        time.sleep(0.1)\n"
        "print(body.decode(), end='')\n"
    )
    r, _ = run_timed(shell, python_command(fetch))
    assert_ok(r, b"hello from server\n")


def test_late_background_output_does_not_leak_into_next_result(shell: Shell) -> None:
    r = shell.run("(sleep 0.5; echo late-out; echo late-err >&2) &")
    assert (r.status, r.exit_code) == ("completed", 0)
    time.sleep(1.0)
    assert_ok(shell.run("echo next"), b"next\n")


def test_background_job_output_never_blocks_the_job(shell: Shell, tmp_path: Path) -> None:
    done = tmp_path / "done"
    r, elapsed = run_timed(shell, f"(seq 1 300000; seq 1 300000 >&2; touch '{done}') &")
    assert r.status == "completed"
    assert elapsed < 5
    assert_ok(shell.run("sleep 0.1; echo next"), b"next\n")
    deadline = time.monotonic() + 20
    while not done.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert done.exists()
    assert_ok(shell.run("echo after"), b"after\n")


@pytest.mark.skipif(shutil.which("less") is None, reason="less is not installed")
def test_less_prints_the_file_at_once(shell: Shell, tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_text("line1\nline2\n")
    r, elapsed = run_timed(shell, f"less '{tmp_path}/f.txt'")
    assert_ok(r, b"line1\nline2\n")
    assert elapsed < 5


def test_background_then_wait(shell: Shell) -> None:
    r, elapsed = run_timed(shell, "echo x & wait")
    assert_ok(r, b"x\n")
    assert elapsed < 5
