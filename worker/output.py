"""Bounded capture of one command's output: head and tail in memory, the whole stream spooled to disk past the cap."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from worker.errors import ConfigError


def private_dir(path: Path, group: int | None = None) -> Path:
    """`path` as a directory no other user may change: made (with its parents) mode 0700, or 0750 owned by `group`
    (the shell user's, which may then read what is spooled there). An existing one must be this process's user's
    own directory, not a symlink, and writable by nobody else; ConfigError otherwise (a path another user planted
    beforehand in /tmp, say: the worker would write, and delete, wherever it points)."""
    try:
        path.mkdir(parents=True, mode=0o700)
    except FileExistsError:
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
            raise ConfigError(f"{path} is not a private directory of this user's: refusing to use it") from None
        return path
    if group is not None:
        os.chown(path, -1, group)
        os.chmod(path, 0o750)
    return path


class Spool:
    """A directory of spooled outputs, one subdirectory per command, kept under a byte quota (oldest evicted first)."""

    def __init__(self, root: Path, quota: int, group: int | None = None) -> None:
        self.root = root
        self.quota = quota
        self.group = group
        """The shell user's group, which may read the spool (see `private_dir`)."""

    def open(self, name: str) -> Path:
        """Create the command's directory, evicting the oldest ones while the spool is over half its quota."""
        private_dir(self.root, self.group)
        dirs = sorted((p for p in self.root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        used = sum(_tree_size(p) for p in dirs)
        while dirs and used > self.quota // 2:
            oldest = dirs.pop(0)
            used -= _tree_size(oldest)
            shutil.rmtree(oldest, ignore_errors=True)
        return private_dir(self.root / name, self.group)

    def room(self) -> int:
        """Bytes that may still be written before the quota is reached."""
        if not self.root.exists():
            return self.quota
        return max(0, self.quota - _tree_size(self.root))


def _tree_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class OutputCapture:
    """One output stream: exact total size, the first and last `cap // 2` bytes, and a spool file once over the cap.

    `rewrite` replaces bash's name for the sourced command file (`/…/c: line 3:`) with `bash: line 3:` in stderr,
    across chunk boundaries, so errors read as in a terminal.
    """

    def __init__(
        self,
        cap: int,
        open_spool: Callable[[], tuple[Path, int] | None] | None = None,
        rewrite: tuple[bytes, bytes] | None = None,
    ) -> None:
        self.cap = cap
        self._tail_cap = cap - cap // 2
        self._open_spool = open_spool
        self.size = 0
        self._head = bytearray()
        self._tail = bytearray()
        self._rewrite = rewrite
        self._carry = b""
        self._file: BinaryIO | None = None
        self._room = 0
        self.spooled: Path | None = None
        self.spool_error: str | None = None
        """Why the output past the cap could not be spooled (a full disk, say); the command goes on regardless."""
        self.live: Callable[[int, bytes], None] | None = None
        """Called with (offset, bytes) for every piece taken while set (live output, worker/live.py)."""

    @property
    def truncated(self) -> bool:
        return self.size > self.cap

    def feed(self, data: bytes) -> None:
        if self._rewrite:
            data = self._apply_rewrite(self._carry + data)
        self._take(data)

    def finish(self) -> None:
        """Flush what the rewrite held back and close the spool file."""
        if self._carry:
            self._take(self._carry)
            self._carry = b""
        if self._file:
            try:
                self._file.close()
            except OSError as e:
                self._spool_failed(e)
            self._file = None

    def kept(self) -> bytes:
        """All bytes when under the cap, else head + tail."""
        if not self.truncated:
            return bytes(self._head + self._tail)
        return bytes(self._head) + bytes(self._tail[-self._tail_cap :])

    def _take(self, data: bytes) -> None:
        if not data:
            return
        if self.live is not None:
            self.live(self.size, data)
        self.size += len(data)
        if not self._tail:
            room = self.cap // 2 - len(self._head)
            self._head += data[:room]
            data = data[room:]
        self._tail += data
        if self._file:
            self._write_spool(data)
        elif self.truncated and self._open_spool and not self.spooled and not self.spool_error:
            self._start_spool(self._open_spool)
        if len(self._tail) > 2 * self._tail_cap:
            del self._tail[: len(self._tail) - self._tail_cap]

    def _start_spool(self, open_spool: Callable[[], tuple[Path, int] | None]) -> None:
        # Nothing has been dropped yet: head + tail is the whole stream so far.
        try:
            target = open_spool()
            if target is None:
                return
            self.spooled, self._room = target
            self._file = open(self.spooled, "wb")  # noqa: SIM115 - closed in finish()
        except OSError as e:
            self._spool_failed(e)
            return
        self._write_spool(bytes(self._head) + bytes(self._tail))

    def _write_spool(self, data: bytes) -> None:
        assert self._file is not None
        chunk = data[: self._room]
        try:
            self._file.write(chunk)
        except OSError as e:
            self._spool_failed(e)
            return
        self._room -= len(chunk)

    def save_kept(self, path: Path) -> None:
        """Write the bytes kept to `path` (beside the other stream's spool); a failure is a spool error."""
        try:
            path.write_bytes(self.kept())
        except OSError as e:
            self._spool_failed(e)

    def _spool_failed(self, error: OSError) -> None:
        self.spool_error = f"{error.strerror or error}: {error.filename or self.spooled}"
        if self._file:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def _apply_rewrite(self, data: bytes) -> bytes:
        assert self._rewrite is not None
        old, new = self._rewrite
        data = data.replace(old, new)
        # Hold back a suffix that could be the start of `old` completed by the next chunk.
        for k in range(min(len(old) - 1, len(data)), 0, -1):
            if data.endswith(old[:k]):
                self._carry = data[-k:]
                return data[:-k]
        self._carry = b""
        return data


class Captures:
    """A command's stdout and stderr: both spooled to one directory of `spool`, named `name`, as soon as either passes
    the cap (the other's kept bytes are saved beside it at the end). With `merge`, stderr is written into stdout by
    the command itself and `rewrite` applies to stdout."""

    def __init__(
        self, cap: int, spool: Spool, name: str, rewrite: tuple[bytes, bytes] | None = None, merge: bool = False
    ) -> None:
        self._spool = spool
        self._name = name
        self.dir: Path | None = None
        self.out = OutputCapture(cap, lambda: self._open("stdout"), rewrite if merge else None)
        self.err = OutputCapture(cap, lambda: self._open("stderr"), None if merge else rewrite)

    def _open(self, stream: str) -> tuple[Path, int] | None:
        if self.dir is None:
            self.dir = self._spool.open(self._name)
        room = self._spool.room()
        return (self.dir / stream, room) if room > 0 else None

    @property
    def truncated(self) -> bool:
        return self.out.truncated or self.err.truncated

    @property
    def spool_path(self) -> str | None:
        """The spool directory when some output is not in the result."""
        return str(self.dir) if self.truncated and self.dir else None

    def finish(self) -> None:
        for capture, stream in ((self.out, "stdout"), (self.err, "stderr")):
            capture.finish()
            if self.dir and capture.spooled is None:  # the other stream overflowed: keep this one beside it
                capture.save_kept(self.dir / stream)

    def problem(self) -> str | None:
        """Why output past the cap could not be spooled (a full disk), if it could not."""
        failed = [f"{n}: {c.spool_error}" for n, c in (("stdout", self.out), ("stderr", self.err)) if c.spool_error]
        return f"output past the cap could not be spooled ({'; '.join(failed)})" if failed else None


def read_available(fd: int, limit: int = 1 << 16) -> bytes | None:
    """One non-blocking read: bytes, b"" at EOF, or None when nothing is there yet."""
    try:
        return os.read(fd, limit)
    except BlockingIOError:
        return None
