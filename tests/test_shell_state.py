"""Shell state persists across commands, per-command env/cwd options, and the environment bash starts with."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from shell_helpers import run_ok

from worker.shell import Shell


def test_cd_persists_to_next_command(shell: Shell, tmp_path: Path) -> None:
    run_ok(shell, f"cd '{tmp_path}'")
    r = run_ok(shell, "pwd")
    assert r.stdout == f"{tmp_path}\n".encode()
    assert r.cwd == str(tmp_path)


def test_result_cwd_is_pwd_after_command(shell: Shell, tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    r = run_ok(shell, f"cd '{tmp_path}' && cd sub")
    assert r.cwd == str(tmp_path / "sub")


def test_export_persists_to_child_processes(shell: Shell) -> None:
    run_ok(shell, "export SHELLQ_T_EXPORTED='a b'")
    assert run_ok(shell, "printenv SHELLQ_T_EXPORTED").stdout == b"a b\n"


def test_plain_variable_persists(shell: Shell) -> None:
    run_ok(shell, "x=41")
    assert run_ok(shell, "echo $((x + 1))").stdout == b"42\n"


def test_function_persists(shell: Shell) -> None:
    run_ok(shell, 'greet() { echo "hi $1"; }')
    assert run_ok(shell, "greet bob").stdout == b"hi bob\n"


def test_alias_persists(shell: Shell) -> None:
    run_ok(shell, "alias ll='echo aliased'")
    assert run_ok(shell, "ll").stdout == b"aliased\n"


@pytest.mark.parametrize("removal", ["unalias -a", "shopt -u expand_aliases", "unalias __shellq_run"])
def test_commands_still_run_after_aliases_are_removed(shell: Shell, removal: str, tmp_path: Path) -> None:
    """shellq's own per-command alias may be removed by a command; the next commands run all the same, with state."""
    run_ok(shell, f"{removal}; cd '{tmp_path}'; export KEPT=yes")
    r = run_ok(shell, 'echo "$KEPT $PWD"')
    assert r.stdout == f"yes {tmp_path}\n".encode()
    assert run_ok(shell, "echo again").stdout == b"again\n"


def test_associative_array_persists(shell: Shell) -> None:
    run_ok(shell, "declare -A colors=([sky]=blue [grass]=green)")
    assert run_ok(shell, 'echo "${colors[grass]} ${#colors[@]}"').stdout == b"green 2\n"


def test_declare_at_top_level_is_global(shell: Shell) -> None:
    run_ok(shell, "declare -i n=5")
    assert run_ok(shell, "n+=2; echo $n").stdout == b"7\n"


def test_venv_activation_persists(shell: Shell, tmp_path: Path) -> None:
    venv = tmp_path / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    run_ok(shell, f"cd '{tmp_path}' && source .venv/bin/activate")
    assert run_ok(shell, "which python").stdout == f"{venv}/bin/python\n".encode()
    assert run_ok(shell, 'echo "$VIRTUAL_ENV"').stdout == f"{venv}\n".encode()


def test_pipefail_option_persists(shell: Shell) -> None:
    assert shell.run("false | true").exit_code == 0
    run_ok(shell, "set -o pipefail")
    assert shell.run("false | true").exit_code == 1


def test_shopt_persists(shell: Shell, tmp_path: Path) -> None:
    run_ok(shell, f"cd '{tmp_path}' && shopt -s nullglob")
    assert run_ok(shell, "echo *.nomatch").stdout == b"\n"


def test_exit_code_of_failing_command(shell: Shell) -> None:
    r = shell.run("(exit 7)")
    assert (r.status, r.exit_code, r.stdout, r.stderr) == ("completed", 7, b"", b"")


def test_exit_code_is_last_command_of_the_input(shell: Shell) -> None:
    r = shell.run("false\necho done")
    assert (r.status, r.exit_code, r.stdout) == ("completed", 0, b"done\n")


def test_result_reports_epoch_and_duration(shell: Shell) -> None:
    r = run_ok(shell, "sleep 0.2")
    assert shell.epoch == 1
    assert r.shell_epoch == 1
    assert r.duration_ms >= 150


def test_command_given_as_bytes(shell: Shell) -> None:
    r = shell.run(b"printf '%s' '\xff\xc3\xa9'")
    assert (r.status, r.exit_code, r.stdout) == ("completed", 0, b"\xff\xc3\xa9")


def test_env_option_is_exported_and_persists(shell: Shell) -> None:
    assert run_ok(shell, "printenv SHELLQ_T_OPT", env={"SHELLQ_T_OPT": "1"}).stdout == b"1\n"
    assert run_ok(shell, "printenv SHELLQ_T_OPT").stdout == b"1\n"


def test_env_option_value_is_not_reinterpreted(shell: Shell) -> None:
    value = "a b'c\"$HOME`x`\\n\nline2 *"
    r = run_ok(shell, "printenv SHELLQ_T_TRICKY", env={"SHELLQ_T_TRICKY": value})
    assert r.stdout == (value + "\n").encode()


def test_cwd_option_changes_directory_and_persists(shell: Shell, tmp_path: Path) -> None:
    sub = tmp_path / "dir with space"
    sub.mkdir()
    r = run_ok(shell, "pwd", cwd=str(sub))
    assert (r.stdout, r.cwd) == (f"{sub}\n".encode(), str(sub))
    assert run_ok(shell, "pwd").stdout == f"{sub}\n".encode()


def test_missing_cwd_option_fails_without_running_command(shell: Shell, tmp_path: Path) -> None:
    run_ok(shell, f"cd '{tmp_path}'")
    r = shell.run(f"touch '{tmp_path}/ran'", cwd=str(tmp_path / "missing"))
    assert (r.status, r.exit_code, r.stdout) == ("completed", 1, b"")
    assert b"cd: " in r.stderr
    assert b"No such file or directory" in r.stderr
    assert not (tmp_path / "ran").exists()
    assert r.cwd == str(tmp_path)
    assert run_ok(shell, "pwd").stdout == f"{tmp_path}\n".encode()


def test_user_functions_shadowing_builtins_do_not_break_the_session(shell: Shell, tmp_path: Path) -> None:
    run_ok(shell, "printf() { echo fake; }; source() { echo fake; }; cd() { echo fake; }; export() { echo fake; }")
    run_ok(shell, "trap() { echo fake; }; return() { echo fake; }; jobs() { echo fake; }; command() { echo fake; }")
    r = run_ok(shell, "pwd", env={"SHELLQ_T_SHADOW": "1"}, cwd=str(tmp_path))
    assert (r.stdout, r.cwd) == (f"{tmp_path}\n".encode(), str(tmp_path))
    assert run_ok(shell, "printenv SHELLQ_T_SHADOW").stdout == b"1\n"


@pytest.mark.parametrize("removal", ["rm -rf {rundir}", "rm -f {rundir}/*"])
def test_a_command_that_removes_the_shells_own_files_does_not_break_the_session(shell: Shell, removal: str) -> None:
    """Say `rm -rf /dev/shm/*`, where the shell keeps its per-command files: the session goes on, state and all."""
    run_ok(shell, "export KEPT=yes")
    run_ok(shell, removal.format(rundir=shell._bash.rundir))
    for _ in range(2):
        r = shell.run("echo $KEPT; echo err >&2", timeout=60)
        assert (r.status, r.exit_code, r.stdout, r.stderr, r.shell_epoch) == ("completed", 0, b"yes\n", b"err\n", 1)


def test_changed_ifs_does_not_break_the_session(shell: Shell, tmp_path: Path) -> None:
    run_ok(shell, "IFS=/")
    r = run_ok(shell, 'echo "$IFS"', cwd=str(tmp_path))
    assert (r.stdout, r.cwd) == (b"/\n", str(tmp_path))


def test_xtrace_shows_only_the_users_commands(shell: Shell, tmp_path: Path) -> None:
    run_ok(shell, "set -x")
    r = shell.run("echo hi", cwd=str(tmp_path), timeout=60)
    assert (r.status, r.exit_code, r.stdout) == ("completed", 0, b"hi\n")
    assert r.stderr.endswith(b"+ echo hi\n")
    assert b"source" not in r.stderr
    assert b"/dev/shm" not in r.stderr
    assert b"/shellq" not in r.stderr


def test_default_environment_is_agent_friendly(shell: Shell) -> None:
    r = run_ok(shell, "printenv PAGER GIT_PAGER GIT_EDITOR TERM LANG")
    assert r.stdout == b"cat\ncat\n:\ndumb\nC.UTF-8\n"


def test_bash_env_is_cleared(make_shell: Callable[..., Shell], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    startup = tmp_path / "startup.sh"
    startup.write_text("echo from-startup-file\n")
    monkeypatch.setenv("BASH_ENV", str(startup))
    monkeypatch.setenv("ENV", str(startup))
    sh = make_shell()
    assert run_ok(sh, 'echo "[${BASH_ENV-unset}] [${ENV-unset}]"').stdout == b"[unset] [unset]\n"
    assert run_ok(sh, "bash -c 'echo child'").stdout == b"child\n"


def test_rc_files_are_not_read(
    make_shell: Callable[..., Shell],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    for name in (".bashrc", ".bash_profile", ".bash_login", ".profile"):
        (home / name).write_text("echo RC-FILE-READ; echo RC-FILE-READ >&2; export RC_FILE_READ=1\n")
    monkeypatch.setenv("HOME", str(home))
    sh = make_shell()
    r = run_ok(sh, 'echo "[${RC_FILE_READ-}]"')
    assert r.stdout == b"[]\n"
    captured = capfd.readouterr()
    assert "RC-FILE-READ" not in captured.out + captured.err


def test_git_log_does_not_start_a_pager(shell: Shell, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    run_ok(
        shell,
        "git init -q . && git -c user.name=t -c user.email=t@example.com commit -q --allow-empty -m first-commit",
        cwd=str(repo),
    )
    r = run_ok(shell, "git log")
    assert b"    first-commit\n" in r.stdout
    assert run_ok(shell, "git --paginate log --format=%s").stdout == b"first-commit\n"


def test_git_commit_without_message_does_not_open_an_editor(shell: Shell, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    run_ok(shell, "git init -q .", cwd=str(repo))
    r = shell.run("git -c user.name=t -c user.email=t@example.com commit -q --allow-empty", timeout=60)
    assert (r.status, r.exit_code) == ("completed", 1)
    assert b"empty commit message" in r.stderr
