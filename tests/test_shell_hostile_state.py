"""Kind: the shell's own machinery does not depend on the user's shell state.

A command may leave bash in any state a terminal user could. The next command still gets exactly its own output,
exit status and cwd; where bash can come back, the state (cwd, variables) is kept; where it cannot, the command
that broke it is answered `shell_exited` with a reason and the next command runs in a new bash. Never a wedge, never
the next command blamed, never a command answered that did not run.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from shell_helpers import assert_no_private_paths

from worker.shell import Shell, ShellResult

PROBE = "\\builtin printf '%s\\n' hello \"$KEPT\"; \\builtin pwd"
"""Builtins only, quoted: PATH, and the user's own aliases and functions of these names, do not matter."""


def probe(sh: Shell) -> ShellResult:
    return sh.run(PROBE, timeout=20)


def assert_kept(sh: Shell, setup: str, where: Path) -> ShellResult:
    """`setup` ran in a shell with state; the probe afterwards sees its own output, the state and the cwd."""
    sh.run(f"cd '{where}'; KEPT=yes", timeout=20)
    epoch = sh.epoch
    first = sh.run(setup, timeout=20)
    assert first.status == "completed", first
    r = probe(sh)
    assert (r.status, r.exit_code, r.stdout, r.cwd) == ("completed", 0, f"hello\nyes\n{where}\n".encode(), str(where))
    assert r.shell_epoch == epoch
    assert_no_private_paths(first.stdout + first.stderr + r.stdout + r.stderr)
    if "__shellq" not in setup:  # bash's own answer to a command that touches shellq's names may name them
        assert b"__shellq" not in first.stdout + first.stderr + r.stdout + r.stderr
    return r


def assert_replaced(sh: Shell, setup: str, where: Path) -> ShellResult:
    """bash cannot come back from `setup`: that command says so, and the next one runs in a new bash."""
    sh.run(f"cd '{where}'; KEPT=yes", timeout=20)
    epoch = sh.epoch
    first = sh.run(setup, timeout=20)
    assert first.status == "shell_exited", first
    assert first.error, first
    assert first.shell_epoch == epoch
    r = probe(sh)
    assert (r.status, r.exit_code, r.stdout) == ("completed", 0, f"hello\n\n{r.cwd}\n".encode())
    assert r.shell_epoch == epoch + 1
    return first


# -- IFS and set -o options ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("ifs", ["IFS=1", "IFS=/", "IFS=o", "IFS=$'\\n'", "IFS=-", "unset IFS", "IFS=' 0123456789'"])
def test_ifs(shell: Shell, tmp_path: Path, ifs: str) -> None:
    """The issue's example: `IFS=1` made the next command's stdout empty."""
    assert_kept(shell, f"{ifs}; echo set", tmp_path)


def _options(kind: str) -> list[str]:
    out = subprocess.run(["bash", "--norc", "--noprofile", "-c", kind], capture_output=True, text=True, check=True)
    return [line.split()[2] if kind == "shopt -p" else line.split()[1] for line in out.stdout.splitlines()]


_SET_REPLACES = {"noexec"}  # bash runs nothing after `set -n`
_SET_EXITS_LATER = {"onecmd"}  # bash exits after the line it is on (as a terminal would)


@pytest.mark.parametrize("option", _options("set +o"))
def test_every_set_option_toggled(shell: Shell, tmp_path: Path, option: str) -> None:
    on = option not in ("braceexpand", "hashall", "interactive-comments", "monitor")
    toggle = f"set {'-' if on else '+'}o {option}"
    if option in _SET_REPLACES:
        assert_replaced(shell, f"{toggle}; echo set", tmp_path)
    elif option in _SET_EXITS_LATER:
        shell.run(toggle, timeout=20)
        r = probe(shell)
        assert (r.status, r.exit_code, r.stdout) == ("completed", 0, f"hello\n\n{r.cwd}\n".encode())
    else:
        r = assert_kept(shell, f"{toggle}; echo set", tmp_path)
        if option in ("xtrace", "verbose"):  # the probe's own trace, as in a terminal, and nothing of shellq's
            assert b"hello" in r.stderr and b"source" not in r.stderr


_SHOPT_FIXED = {"login_shell", "restricted_shell"}


@pytest.mark.parametrize("option", sorted(set(_options("shopt -p")) - _SHOPT_FIXED))
def test_every_shopt_option_toggled(shell: Shell, tmp_path: Path, option: str) -> None:
    current = subprocess.run(["bash", "--norc", "--noprofile", "-c", f"shopt -q {option}"], check=False)
    flag = "-u" if current.returncode == 0 else "-s"
    assert_kept(shell, f"shopt {flag} {option}; echo set", tmp_path)


def test_errexit_ends_the_shell_as_in_a_terminal_and_the_next_command_runs(shell: Shell) -> None:
    shell.run("set -e", timeout=20)
    failed = shell.run("false", timeout=20)
    assert (failed.status, failed.exit_code) == ("shell_exited", 1)
    r = probe(shell)
    assert (r.status, r.stdout.splitlines()[0]) == ("completed", b"hello")


# -- traps ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "trap",
    [
        "trap 'echo ret-trap' RETURN",
        "trap 'echo err-trap' ERR",
        "trap 'echo dbg-trap' DEBUG",
        "trap 'echo dbg-trap; false' DEBUG",
        "set -T; trap 'echo ret-trap' RETURN",
        "set -E; trap 'echo err-trap' ERR",
        "trap 'echo exit-trap' EXIT",
        "trap 'echo int-trap' INT",
        "trap '' INT",
        "trap 'return 5' RETURN",
        "trap 'echo ret-trap' RETURN ERR DEBUG EXIT",
        "alias builtin=false; set -e; trap 'echo dbg-trap' DEBUG",  # the driver's trap wrapping is alias-proof
        "alias builtin=false; trap 'echo err-trap' ERR",
    ],
)
def test_traps_never_fire_for_shellq(shell: Shell, tmp_path: Path, trap: str) -> None:
    """The issue's example: a RETURN trap added a line to every later result (each command is `source`d)."""
    assert_kept(shell, f"{trap}; echo set", tmp_path)
    again = probe(shell)
    assert again.stdout.startswith(b"hello\n") and b"-trap" not in again.stdout


def test_user_traps_still_fire_for_the_users_own_commands(shell: Shell) -> None:
    shell.run("trap 'echo err-trap' ERR; f() { return 3; }", timeout=20)
    r = shell.run("false; echo after", timeout=20)
    assert r.stdout == b"err-trap\nafter\n"
    shell.run("set -T; trap 'echo ret-trap' RETURN", timeout=20)
    assert shell.run("f", timeout=20).stdout == b"ret-trap\nerr-trap\n"  # as in a terminal: return, then failure


def test_extdebug_debug_trap_that_skips_every_command_replaces_bash(shell: Shell, tmp_path: Path) -> None:
    """bash skips every command after this, shellq's report included: the command is told, bash is replaced."""
    first = assert_replaced(shell, "shopt -s extdebug; trap false DEBUG", tmp_path)
    assert "a new bash was started" in (first.error or "")


# -- functions, aliases and builtins ------------------------------------------------------------------------------

SHADOWED = ["builtin", "source", ".", "printf", "cd", "trap", "alias", "shopt", "jobs", "eval", "read", "unset"]
SHADOWED += ["enable", "local", "command", "set", "return", "__shellq_begin", "__shellq_run", "__shellq_report"]


@pytest.mark.parametrize("name", SHADOWED)
def test_function_shadowing_a_builtin(shell: Shell, tmp_path: Path, name: str) -> None:
    assert_kept(shell, f"function {name} {{ echo 'shadowed {name}'; }} 2>/dev/null; echo set", tmp_path)


@pytest.mark.parametrize("name", SHADOWED)
def test_alias_shadowing_a_builtin(shell: Shell, tmp_path: Path, name: str) -> None:
    assert_kept(shell, f"alias {name}='echo aliased {name}'; shopt -s expand_aliases; echo set", tmp_path)


def test_users_own_cd_function_keeps_working(shell: Shell, tmp_path: Path) -> None:
    shell.run('cd() { builtin cd "$@" && echo "moved to $PWD"; }', timeout=20)
    r = shell.run(f"cd '{tmp_path}'", timeout=20)
    assert (r.stdout, r.cwd) == (f"moved to {tmp_path}\n".encode(), str(tmp_path))


@pytest.mark.parametrize("names", ["printf", "source", "trap alias shopt", "builtin", "enable", "eval read unset"])
def test_builtins_disabled(shell: Shell, tmp_path: Path, names: str) -> None:
    assert_kept(shell, f"enable -n {names}; echo set", tmp_path)


@pytest.mark.parametrize(
    "setup",
    [
        "unset -f __shellq_report __shellq_begin 2>/dev/null",
        "readonly __shellq_last __shellq_t __shellq_e 2>/dev/null",
        "unalias -a",
        "readonly -f __shellq_fix 2>/dev/null; __shellq_last=junk",
        "unset PWD",
        "PWD=$'/tmp/\\xff'",
        "readonly PWD",
        "unset BASH_ALIASES 2>/dev/null",
    ],
)
def test_internal_names_and_variables(shell: Shell, tmp_path: Path, setup: str) -> None:
    assert_kept(shell, f"{setup}; echo set", tmp_path)


@pytest.mark.parametrize("path", ["PATH=/nonexistent", "unset PATH", "PATH=", "hash -r; PATH=/tmp"])
def test_path_changes(shell: Shell, tmp_path: Path, path: str) -> None:
    assert_kept(shell, f"{path}; echo set", tmp_path)


# -- descriptors and limits ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", ["ulimit -Sn 128", "ulimit -n 128", "ulimit -Sn 64", "ulimit -Sn 32"])
def test_descriptor_limit_lowered(shell: Shell, tmp_path: Path, limit: str) -> None:
    """The issue's example: `ulimit -Sn 128` lost the state ("200: Bad file descriptor")."""
    assert_kept(shell, f"{limit}; echo set", tmp_path)
    many = shell.run("for i in 1 2 3; do echo $i; done", timeout=20)
    assert many.stdout == b"1\n2\n3\n"


@pytest.mark.parametrize("limit", ["ulimit -Sn 11", "ulimit -Sn 8", "ulimit -Sn 3"])
def test_descriptor_limit_too_low_for_bash_replaces_it_and_never_answers_a_command_that_did_not_run(
    shell: Shell, tmp_path: Path, limit: str
) -> None:
    """bash cannot redirect anything under such a limit. Whatever the setup command is told, no later command is
    answered without having run: each probe runs (a new bash) and says so by its output."""
    shell.run(f"{limit}; echo set", timeout=20)
    for _ in range(3):
        r = probe(shell)
        assert (r.status, r.exit_code, r.stdout.splitlines()[0]) == ("completed", 0, b"hello"), r
    marker = tmp_path / "ran"
    r = shell.run(f"echo > '{marker}'", timeout=20)
    assert (r.status, marker.exists()) == ("completed", True)


@pytest.mark.parametrize("fd", [*range(3, 21), 63, 199, 200, 201, 255])
def test_descriptor_closed(shell: Shell, tmp_path: Path, fd: int) -> None:
    """`exec N>&-` of any descriptor: either bash keeps its state or the command is told bash was replaced."""
    shell.run(f"cd '{tmp_path}'; KEPT=yes", timeout=20)
    first = shell.run(f"exec {fd}>&- {fd}<&-; echo set", timeout=20)
    assert first.stdout == b"set\n"
    assert first.status == "completed" or (first.status == "shell_exited" and first.error), first
    r = probe(shell)
    assert (r.status, r.exit_code, r.stdout.splitlines()[0]) == ("completed", 0, b"hello")
    if first.status == "completed" and r.shell_epoch == first.shell_epoch:
        assert r.stdout == f"hello\nyes\n{tmp_path}\n".encode()


@pytest.mark.parametrize(
    "redirect", ["exec >/dev/null", "exec 2>&-", "exec 1>&-", "exec </dev/zero", "exec 0<&-", "exec 3>/dev/null"]
)
def test_exec_redirections(shell: Shell, tmp_path: Path, redirect: str) -> None:
    assert_kept(shell, f"{redirect}; true", tmp_path)


def test_persistent_user_descriptor_survives(shell: Shell, tmp_path: Path) -> None:
    log = tmp_path / "log"
    shell.run(f"exec 7>'{log}'", timeout=20)
    shell.run("echo one >&7", timeout=20)
    shell.run("echo two >&7", timeout=20)
    assert log.read_bytes() == b"one\ntwo\n"


def test_tmout_does_not_end_the_shell(shell: Shell, tmp_path: Path) -> None:
    assert_kept(shell, "TMOUT=1; echo set", tmp_path)
    shell.run("sleep 1.5", timeout=20)
    assert probe(shell).shell_epoch == shell.epoch


def test_noexec_is_reported_on_the_command_that_set_it(shell: Shell, tmp_path: Path) -> None:
    first = assert_replaced(shell, "set -n", tmp_path)
    assert "set -n" in (first.error or "")


def test_exec_of_another_bash_is_noticed(shell: Shell, make_shell: Callable[..., Shell], tmp_path: Path) -> None:
    first = shell.run("exec bash --norc", timeout=20)
    assert first.status == "shell_exited"
    assert probe(shell).stdout.startswith(b"hello\n")
