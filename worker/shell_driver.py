"""The driver: the shell code shellq puts in the persistent bash to run each command and report on it.

Each command costs bash two short lines on its stdin:

    \\__shellq_begin NONCE GEN     re-asserts what the driver needs (a command may have changed any of it), then
                                  defines the alias below with this command's nonce and FIFO generation
    __shellq_run                  the alias: wrap the traps the last command set (see below), then
                                  `{ source FILE <IN >OUT 2>ERR; }; __shellq_report NONCE "$?"`,
                                  expanded at top level so `declare`, `return` and `local` in the command behave
                                  as typed at a prompt

IN is the run directory's `i`, a symlink the worker points at /dev/null or at the file holding the command's stdin.
The report is one NUL-terminated record `NONCE RC STATE CWD` opened and written to the report FIFO at report time
(no descriptor of shellq's lives in bash, so `ulimit -n` and `exec N>&-` cannot take one away). STATE is `ok`, or
`lost` when bash's own stdin is no longer its command pipe (a command closed the descriptor bash saved it in).
The command file's access time, which the worker zeroes when it writes the file, says whether bash read it: whether
the command ran at all (bash may fail to make its redirections).

What the driver is immune to, and how (see docs/design.md, "The shell"):

* IFS, `set -u`, `set -f`, `set -C`, `set -a`, `set -x`, `set -v`, posix mode: no unquoted expansion, no glob, no
  clobbering redirection, no variable the command could need; xtrace of the driver goes to bash's own stderr,
  /dev/null (bash's stdout and stderr are /dev/null outside a command, so the driver redirects nothing else).
* aliases: the driver's words are quoted or inside functions (aliases expand when a function is defined).
* functions that shadow builtins: every builtin is called as `builtin X`; a function named `builtin` is removed.
* builtins disabled with `enable -n` (`builtin` itself included): the ones the driver needs are enabled again.
* the driver's functions are read-only: a command cannot redefine or unset them.
* RETURN, ERR and DEBUG traps: wrapped so they run only inside the command file, never for the driver's own steps
  (a RETURN trap fires once, at the end of the command that set it, as that command's own output).
* what bash cannot come back from (`set -n`, a DEBUG trap under `extdebug` that skips every command, `enable -n
  enable builtin`): the worker sees bash back at its prompt with no report, and starts a new bash (`worker.shell`).
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

_TRAPS = (
    "\\builtin trap -p RETURN ERR DEBUG >|%(d)s/t; "
    '[[ ! -s %(d)s/t ]] || { \\__shellq_guard_traps; \\builtin eval "$__shellq_t"; }'
)
"""Top-level code (RETURN and DEBUG traps are not visible inside a function) that wraps the traps a command set."""
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9_./-]+\Z")
_GUARD = "[[ ${BASH_SOURCE[@]: -1:1} == @(|main) ]] || {\n"
"""Prefix of a wrapped trap: outside the command file (at the prompt, where BASH_SOURCE is empty, and in the
driver's functions, defined on stdin: `main`) the trap does nothing."""


@dataclass(frozen=True, slots=True)
class Report:
    """One record from the report FIFO."""

    tag: bytes
    exit_code: int
    stdin_ok: bool
    cwd: str
    """The shell's `$PWD` (surrogate-escaped bytes); empty when PWD is unset or not the working directory."""


class ReportReader:
    """Splits the report FIFO's bytes into records; anything malformed (a command can write there) is dropped."""

    LIMIT = 1 << 16
    """Bytes kept while no NUL has come: more than any real record (PATH_MAX is 4096)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[Report]:
        *records, self._buffer = (self._buffer + data).split(b"\0")
        if len(self._buffer) > self.LIMIT:
            self._buffer = b""
        return [r for r in map(_parse, records) if r is not None]


def _parse(record: bytes) -> Report | None:
    parts = record.split(b" ", 3)
    if len(parts) != 4 or not parts[1].isdigit() or len(parts[1]) > 3 or parts[2] not in (b"ok", b"lost"):
        return None
    return Report(parts[0], int(parts[1]), parts[2] == b"ok", os.fsdecode(parts[3]))


def is_safe_path(path: str) -> bool:
    """Can the driver write this path unquoted (letters, digits, `_`, `.`, `-` and `/` only)?"""
    return bool(_SAFE_PATH.match(path))


def prelude(rundir: Path) -> bytes:
    """Defined once per bash: `set -m` (a process group per job), the INT trap (an interrupt returns from the
    command file) and the driver's read-only functions. `rundir` must be a path of safe characters only."""
    d = str(rundir)
    if not _SAFE_PATH.match(d):
        raise ValueError(f"unsafe run directory for the driver: {d!r}")
    guard = shlex.quote(_GUARD)
    # The alias's text, in double quotes: $1 (the nonce) and $2 (the FIFO generation) expand when it is defined.
    alias = "".join(
        part if part in ("$1", "$2") else _double_quoted(part)
        for part in (
            f"{_TRAPS % {'d': d}}; {{ \\builtin source {d}/c <{d}/i >{d}/o",
            "$2",
            f" 2>{d}/e",
            "$2",
            "; }; \\__shellq_report ",
            "$1",
            ' "$?"',
        )
    )
    text = f"""
set -m; shopt -s expand_aliases; builtin trap 'builtin return 130' INT
__shellq_fix() {{
  unset -f builtin || ((1))
  enable builtin || ((1))
  builtin enable source printf trap alias shopt jobs return read eval unset local || ((1))
}}
__shellq_begin() {{
  __shellq_fix
  builtin shopt -s expand_aliases || ((1))
  builtin trap 'builtin return 130' INT || ((1))
  builtin jobs || ((1))
  builtin alias __shellq_run="{alias}" || ((1))
}}
__shellq_guard_traps() {{
  builtin local t= nl=$'\\n'
  builtin printf -v __shellq_t '' || ((1))
  IFS= builtin read -r -d '' t <{d}/t || ((1))
  t=$nl$t
  builtin eval "${{t//${{nl}}trap -- /${{nl}}__shellq_wrap_trap }}" || ((1))
}}
__shellq_wrap_trap() {{
  builtin local q=
  [[ $1 != {guard}* ]] || builtin return 0
  builtin printf -v q %q {guard}"$1"$'\\n}}' || ((1))
  builtin printf -v __shellq_t '%s\\\\builtin trap -- %s %s\\n' "${{__shellq_t-}}" "$q" "$2" || ((1))
}}
__shellq_report() {{
  unset -f builtin
  builtin printf -v __shellq_last %s "$1" || {{ __shellq_fix; builtin printf -v __shellq_last %s "$1"; }} || ((1))
  builtin local __shellq_s=ok __shellq_d=
  [[ -p /dev/stdin ]] || __shellq_s=lost
  [[ ! ${{PWD-}} -ef . ]] || __shellq_d=$PWD
  builtin printf -v __shellq_last '%s %s %s %s' "$1" "$2" "$__shellq_s" "$__shellq_d" || ((1))
  builtin printf '%s %s %s %s\\0' "$1" "$2" "$__shellq_s" "$__shellq_d" >>{d}/r || ((1))
}}
__shellq_resend() {{
  __shellq_fix
  [[ ${{__shellq_last-}} != "$1 "* ]] || builtin printf '%s\\0' "$__shellq_last" >>{d}/r || ((1))
}}
builtin readonly -f __shellq_fix __shellq_begin __shellq_guard_traps __shellq_wrap_trap __shellq_report __shellq_resend
"""
    return text.encode()


def _double_quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$").replace("`", "\\`")


def begin(nonce: bytes, generation: int) -> bytes:
    """The two lines that run the command file with this nonce and FIFO generation."""
    return b"\\__shellq_begin %s %d\n__shellq_run\n" % (nonce, generation)


def begin_with(
    rundir: Path, nonce: bytes, generation: int, env: dict[str, str], cwd: str | None, merge_stderr: bool = False
) -> bytes:
    """The long form, for a command with `env` to export and `cwd` to enter first (as if typed before it; a failure
    there is the command's), or whose stderr goes to its stdout (`merge_stderr`: the FIFO for stderr is not
    opened). The command's stderr reaches the command file through a descriptor bash picks."""
    d, e = str(rundir), '2>&"$__shellq_e"'
    steps = "".join(f"\\builtin export {k}={shlex.quote(v)} {e} && " for k, v in env.items())
    if cwd is not None:
        steps += f"\\builtin cd -- {shlex.quote(cwd)} {e} && "
    err = "{__shellq_e}>&1" if merge_stderr else f"{{__shellq_e}}>{d}/e{generation}"
    line = (
        f"{_TRAPS % {'d': d}}; {{ {steps}\\builtin source {d}/c {e} {{__shellq_e}}>&-; }} "
        f"<{d}/i >{d}/o{generation} {err}; "
        f'\\__shellq_report {nonce.decode()} "$?" {{__shellq_e}}>&-\n'
    )
    return b"\\__shellq_begin %s %d\n" % (nonce, generation) + line.encode(errors="surrogateescape")


def report(tag: bytes) -> bytes:
    """A line that reports `$?` under `tag` (queued when an interrupt starts: bash is back at its prompt)."""
    return b'\\__shellq_report %s "$?"\n' % tag


def resend(nonce: bytes) -> bytes:
    """A line that sends the command's report again if bash made one (its FIFO may have been removed)."""
    return b"\\__shellq_resend %s\n" % nonce
