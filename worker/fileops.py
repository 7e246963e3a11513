"""File operations run as a session's shell user: a program of its own, started by the worker (worker/files.py).

    python3 -I -S fileops.py OP ARGS_JSON

The worker starts it with the shell user's uid and groups, in the shell's current directory, so permissions mean what
they say and relative paths resolve as in the shell. It imports only the standard library and runs on Python 3.10+.
Paths in ARGS_JSON are `os.fsdecode` strings (non-UTF-8 bytes as surrogate escapes, kept by JSON's `\\udcXX`).
Data flows through stdin and stdout as raw bytes, 64 KiB at a time.

- `write` {"path", "mode": int|null}: stdin becomes the file, atomically (a temp file beside it, then a rename);
  parents are made. Mode null: the existing file's permission bits, else 0o644. A symlink is written through; an
  existing file this user may not write is refused (EACCES) although the rename alone would be allowed.
- `read` {"path", "offset": int, "max_bytes": int|null}: the file's bytes from `offset` to stdout.
- `list` {"path", "recursive": bool, "max_entries": int|null}: stdout gets JSON
  {"entries": [[path, size, st_mode, mtime, is_dir], ...], "truncated": bool}, sorted by name, depth first,
  symlinks not followed; a subdirectory that cannot be read is listed but not entered.
- `stat` {"path"}: stdout gets JSON [path, size, st_mode, mtime, is_dir] of the file or directory, symlinks
  followed (what a `read` of it would open).
- `archive` {"path"}: a tar.gz stream of the file or tree to stdout, members named from its basename.
- `extract` {"path"}: a tar stream (any compression) from stdin unpacked into directory `path`, made if missing.
  Absolute names, members or links leading outside, and device files are refused; setuid/setgid bits and
  ownership are dropped (tarfile's "data" filter where Python has it).

Exit status 0 with nothing on stderr; 1 on an OSError, with one JSON line {"errno", "strerror", "filename"} on
stderr; 2 on anything else (bad arguments, a bad or refused tar member) with {"error": message}; 3 when the reader
of stdout went away (a broken pipe), quietly.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import itertools
import json
import os
import secrets
import stat
import sys
import tarfile
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

CHUNK = 1 << 16


class RefusedError(Exception):
    """A tar member that would land outside the target directory or is a device file."""


def op_write(args: dict[str, Any]) -> None:
    """Atomically replace (or create) `path` with all of stdin."""
    path = os.fsencode(args["path"])
    mode = args.get("mode")
    if os.path.islink(path):
        path = os.path.realpath(path)
    try:
        info: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        info = None
    if info is not None and stat.S_ISDIR(info.st_mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    if info is not None and not os.access(path, os.W_OK):
        # Replacing needs only the directory's permission; a plain write would be refused, so this is too.
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
    parent, base = os.path.split(path)
    tmp = os.path.join(parent, b"." + base[:200] + b".shellq-" + secrets.token_hex(8).encode())
    try:
        with _create(tmp, parent) as f:
            while chunk := os.read(0, CHUNK):
                f.write(chunk)
            if info is not None and stat.S_ISREG(info.st_mode):
                with contextlib.suppress(OSError):  # keeps the owner when allowed (as root); else the file is ours
                    os.fchown(f.fileno(), info.st_uid, info.st_gid)
                if mode is None:
                    mode = stat.S_IMODE(info.st_mode)
            os.fchmod(f.fileno(), 0o644 if mode is None else mode)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename == tmp:
            e.filename, e.filename2 = path, None  # the temp file's name would only puzzle the caller
        raise


def _create(tmp: bytes, parent: bytes) -> BinaryIO:
    """A new file `tmp`, open for writing, making its missing parent directories."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o600)
    except FileNotFoundError:
        os.makedirs(parent, exist_ok=True)
        fd = os.open(tmp, flags, 0o600)
    return open(fd, "wb")


def op_read(args: dict[str, Any]) -> None:
    """Copy the file's bytes from `offset`, at most `max_bytes`, to stdout. A FIFO or device may be read."""
    path = os.fsencode(args["path"])
    offset, left = args.get("offset", 0), args.get("max_bytes")
    # O_NONBLOCK so that opening a FIFO with no writer does not hang; reads then block as usual.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        os.set_blocking(fd, True)
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if offset:
            os.lseek(fd, offset, os.SEEK_SET)
        out = sys.stdout.buffer
        while left is None or left > 0:
            chunk = os.read(fd, CHUNK if left is None else min(CHUNK, left))
            if not chunk:
                break
            out.write(chunk)
            if left is not None:
                left -= len(chunk)
    finally:
        os.close(fd)


def op_list(args: dict[str, Any]) -> None:
    """Write the directory's entries (all below it when `recursive`), at most `max_entries`, as JSON to stdout."""
    top = os.fsencode(args["path"])
    limit = args.get("max_entries")
    found = list(itertools.islice(_walk(top, args.get("recursive", False)), None if limit is None else limit + 1))
    truncated = limit is not None and len(found) > limit
    entries = [[os.fsdecode(p), s.st_size, s.st_mode, s.st_mtime, stat.S_ISDIR(s.st_mode)] for p, s in found[:limit]]
    sys.stdout.buffer.write(json.dumps({"entries": entries, "truncated": truncated}).encode())


def op_stat(args: dict[str, Any]) -> None:
    """Write the file's size, mode, mtime and kind as JSON to stdout; a symlink is followed."""
    path = os.fsencode(args["path"])
    s = os.stat(path)
    entry = [os.fsdecode(path), s.st_size, s.st_mode, s.st_mtime, stat.S_ISDIR(s.st_mode)]
    sys.stdout.buffer.write(json.dumps(entry).encode())


def _walk(path: bytes, recursive: bool) -> Iterator[tuple[bytes, os.stat_result]]:
    """(path joined with the entry's name, lstat) for each entry, sorted by name, subdirectories right after their
    own entry. Only `path` itself failing to open is an error; a subdirectory that cannot be read is left out."""
    for name in sorted(os.listdir(path)):
        child = os.path.join(path, name)
        try:
            info = os.lstat(child)
        except FileNotFoundError:  # removed meanwhile
            continue
        yield child, info
        if recursive and stat.S_ISDIR(info.st_mode):
            with contextlib.suppress(OSError):
                yield from _walk(child, True)


def op_archive(args: dict[str, Any]) -> None:
    """Write `path` (a file or a tree, symlinks kept as symlinks) as a tar.gz stream to stdout."""
    path = args["path"]  # a str: tarfile joins member names as str (surrogate escapes encode back to the bytes)
    os.lstat(path)  # a missing path fails here, before any output
    with tarfile.open(fileobj=sys.stdout.buffer, mode="w|gz") as tar:
        tar.add(path, arcname=os.path.basename(os.path.abspath(path)) or ".")


def op_extract(args: dict[str, Any]) -> None:
    """Unpack the tar stream on stdin into directory `path`, refusing members that are not plain data."""
    dest = args["path"]
    os.makedirs(dest, exist_ok=True)
    with tarfile.open(fileobj=sys.stdin.buffer, mode="r|*") as tar:
        members = (_checked(m, dest) for m in tar)
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, members, filter="fully_trusted")  # already filtered by _checked
        else:
            tar.extractall(dest, members)


def _checked(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """`member` as tarfile's "data" filter passes it, or RefusedError (also for absolute names, which the filter
    would only strip); the same checks done here on Pythons without the filter (before 3.10.12 and 3.11.4)."""
    if os.path.isabs(member.name):
        raise RefusedError(f"{member.name!r} is an absolute path")
    if hasattr(tarfile, "data_filter"):
        return tarfile.data_filter(member, dest)
    root = os.path.realpath(dest)
    target = os.path.join(root, member.name)
    if not _inside(target, root):
        raise RefusedError(f"{member.name!r} would be extracted outside the destination")
    if member.issym() or member.islnk():
        link = os.path.join(os.path.dirname(target) if member.issym() else root, member.linkname)
        if os.path.isabs(member.linkname) or not _inside(link, root):
            raise RefusedError(f"{member.name!r} links outside the destination ({member.linkname!r})")
        if member.issym() and os.path.lexists(target) and not os.path.isdir(target):
            os.unlink(target)  # older tarfile fails on an existing file instead of replacing it
    elif not (member.isreg() or member.isdir()):
        raise RefusedError(f"{member.name!r} is a special file")
    member = copy.copy(member)
    member.mode &= 0o755
    member.mode |= 0o700 if member.isdir() else 0o600
    if not member.mode & 0o100:
        member.mode &= ~0o111
    member.uid, member.gid, member.uname, member.gname = os.geteuid(), os.getegid(), "", ""
    return member


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([os.path.realpath(path), root]) == root


OPS: dict[str, Callable[[dict[str, Any]], None]] = {
    "write": op_write,
    "read": op_read,
    "list": op_list,
    "stat": op_stat,
    "archive": op_archive,
    "extract": op_extract,
}


def main(argv: list[str]) -> int:
    """Run `argv[1]` with the JSON arguments `argv[2]`; the exit status."""
    try:
        if len(argv) != 3:
            raise ValueError("usage: fileops.py OP ARGS_JSON")
        op, raw = argv[1:]
        if op not in OPS:
            raise ValueError(f"unknown operation {op!r}, expected one of {', '.join(OPS)}")
        OPS[op](json.loads(raw))
        sys.stdout.buffer.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit fails no more
        return 3
    except OSError as e:
        filename = None if e.filename is None else os.fsdecode(e.filename)
        _report({"errno": e.errno, "strerror": e.strerror, "filename": filename})
        return 1
    except Exception as e:
        _report({"error": f"{type(e).__name__}: {e}"})
        return 2
    return 0


def _report(error: dict[str, Any]) -> None:
    sys.stderr.write(json.dumps(error) + "\n")


if __name__ == "__main__":
    sys.exit(main(sys.argv))
