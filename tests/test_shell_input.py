"""Each command is read like a script file: multi-line input, heredocs, quoting, syntax errors, stdin at EOF."""

from __future__ import annotations

from pathlib import Path

from shell_helpers import PY, assert_no_private_paths, assert_ok, assert_usable, run_timed

from worker.shell import Shell


def test_multiline_command(shell: Shell) -> None:
    assert_ok(shell.run("echo one\necho two\n"), b"one\ntwo\n")


def test_multiline_compound_commands(shell: Shell) -> None:
    command = "for i in 1 2 3; do\n  echo $i\ndone\nif true; then\n  echo yes\nfi"
    assert_ok(shell.run(command), b"1\n2\n3\nyes\n")


def test_heredoc_unquoted_delimiter_expands(shell: Shell) -> None:
    assert_ok(shell.run("x=5\ncat <<EOF\nv=$x\nEOF\n"), b"v=5\n")


def test_heredoc_quoted_delimiter_is_literal(shell: Shell) -> None:
    body = "$HOME `date` \\n ${x:-y} 'single' \"double\"\n"
    assert_ok(shell.run(f"cat <<'EOF'\n{body}EOF\n"), body.encode())


def test_heredoc_with_dash_strips_leading_tabs(shell: Shell) -> None:
    command = "if true; then\n\tcat <<-EOF\n\t\tone\n\t\ttwo\n\tEOF\nfi\n"
    assert_ok(shell.run(command), b"one\ntwo\n")


def test_large_heredoc(shell: Shell, tmp_path: Path) -> None:
    body = "".join(f"line {i:06d} of a large heredoc body\n" for i in range(4000))
    assert len(body) > 100_000
    r = shell.run(f"cat <<'EOF' > '{tmp_path}/big.txt'\n{body}EOF\nwc -l < '{tmp_path}/big.txt'")
    assert_ok(r, b"4000\n")
    assert (tmp_path / "big.txt").read_text() == body


def test_heredoc_after_and_list(shell: Shell) -> None:
    command = f"echo test && {PY} <<'EOF'\nprint('from heredoc')\nEOF\n"
    assert_ok(shell.run(command), b"test\nfrom heredoc\n")


def test_quoting_is_preserved(shell: Shell) -> None:
    r = shell.run("""printf '[%s]\\n' "a  b" 'c  d' $'e\\tf' "it's" 'say "hi"'""")
    assert_ok(r, b'[a  b]\n[c  d]\n[e\tf]\n[it\'s]\n[say "hi"]\n')


def test_find_exec_with_escaped_semicolon(shell: Shell, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("")
    r = shell.run(f"cd '{tmp_path}/d' && find . -name '*.txt' -exec echo {{}} \\;")
    assert_ok(r, b"./a.txt\n")


def test_unicode_command_text(shell: Shell) -> None:
    assert_ok(shell.run("echo 'héllo € 日本'"), "héllo € 日本\n".encode())


def test_top_level_return_ends_the_command_with_its_status(shell: Shell) -> None:
    r = shell.run("echo one; return 5; echo two")
    assert (r.status, r.exit_code, r.stdout) == ("completed", 5, b"one\n")
    assert_usable(shell)


def test_no_history_expansion(shell: Shell) -> None:
    assert_ok(shell.run('echo A!B; echo "!!"'), b"A!B\n!!\n")


def test_syntax_error_returns_2_at_once(shell: Shell) -> None:
    r, elapsed = run_timed(shell, "if then fi")
    assert (r.status, r.exit_code, r.stdout) == ("completed", 2, b"")
    assert b"syntax error" in r.stderr
    assert elapsed < 5
    assert_usable(shell)


def test_syntax_error_names_its_line_like_a_terminal(shell: Shell) -> None:
    r = shell.run("true\nfi\n")
    assert r.exit_code == 2
    assert b"line 2: syntax error" in r.stderr
    assert_no_private_paths(r.stderr)


def test_unterminated_heredoc_fails_at_once(shell: Shell) -> None:
    r, elapsed = run_timed(shell, "cat <<EOF\nhello\n")
    assert r.status == "completed"
    assert r.exit_code != 0
    assert b"here-document" in r.stderr
    assert_no_private_paths(r.stderr)
    assert elapsed < 5
    assert_usable(shell)


def test_unterminated_quote_fails_at_once(shell: Shell) -> None:
    r, elapsed = run_timed(shell, 'echo "abc\n')
    assert (r.status, r.stdout) == ("completed", b"")
    assert r.exit_code != 0
    assert b"unexpected EOF" in r.stderr
    assert_no_private_paths(r.stderr)
    assert elapsed < 5
    assert_usable(shell)


def test_command_not_found_reads_like_a_terminal(shell: Shell) -> None:
    r = shell.run("nosuchcmd_xyz")
    assert (r.status, r.exit_code, r.stdout) == ("completed", 127, b"")
    assert b"nosuchcmd_xyz: command not found" in r.stderr
    assert_no_private_paths(r.stderr)


def test_cat_reads_empty_stdin(shell: Shell) -> None:
    r, elapsed = run_timed(shell, "cat")
    assert_ok(r, b"")
    assert elapsed < 5


def test_read_gets_end_of_file(shell: Shell) -> None:
    r, elapsed = run_timed(shell, 'read x; echo "rc=$?"')
    assert_ok(r, b"rc=1\n")
    assert elapsed < 5


def test_line_after_read_runs_as_a_command(shell: Shell) -> None:
    r = shell.run('read x\necho "after:[$x]"')
    assert_ok(r, b"after:[]\n")


def test_python_input_gets_eof_error(shell: Shell) -> None:
    r, elapsed = run_timed(shell, f'{PY} -c "input()"')
    assert (r.status, r.exit_code, r.stdout) == ("completed", 1, b"")
    assert b"EOFError" in r.stderr
    assert elapsed < 5
