"""Files, stdin and `user=` through a real worker and a real Redis: `run(stdin=...)`, `write_file`, `read_file`,
`list_dir`, `archive`, `upload`, `download`, commands over the entry cap, one command or file operation as another
user, the errors a file operation raises, and the chunked transfers that carry large payloads (at most WINDOW chunks
in Redis at a time, nothing left behind)."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import pwd
import random
import shutil
import stat
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import RedisServer, wait_for

from producer import (
    Client,
    ClientSettings,
    FileInfo,
    FileTooLargeError,
    Session,
    SessionFileNotFoundError,
    SessionIsADirectoryError,
    SessionNotADirectoryError,
    SessionPermissionError,
    ShellqError,
    files,
)
from worker import protocol
from worker.loop import Worker
from worker.transfer import CHUNK, WINDOW

MiB = 1 << 20
NOBODY = pwd.getpwnam("nobody")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs a worker running as root")


def blob(size: int, seed: int = 0) -> bytes:
    """`size` random bytes (NULs and invalid UTF-8 among them), the same for the same seed."""
    return random.Random(seed).randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def names(entries: list[FileInfo], top: Path) -> list[str]:
    """The listed paths relative to `top`."""
    return [os.path.relpath(e.path, top) for e in entries]


def make_tree(root: Path) -> None:
    """A small tree: nested directories, an empty one, binary and text files, a relative symlink, a name with a
    space."""
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "top.txt").write_bytes(b"top\n")
    (root / "a" / "mid.txt").write_bytes(b"mid\0dle")
    (root / "a" / "b" / "c" / "deep.bin").write_bytes(blob(MiB + 3, seed=7))
    (root / "a" / "with space.txt").write_bytes(b"spaced")
    (root / "a" / "link-to-mid").symlink_to("mid.txt")


def snapshot(root: Path) -> dict[str, str]:
    """Every path below `root` (relative) -> "dir", "link:<target>" or the sha256 of the file's bytes."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            if p.is_symlink():
                found[rel] = f"link:{os.readlink(p)}"
            elif p.is_dir():
                found[rel] = "dir"
            else:
                found[rel] = sha(p.read_bytes())
    return found


def transfer_keys(r: redis.Redis, session: str) -> list[bytes]:
    """The session's transfer streams still in Redis (`shellq:{S}:in:*`, `shellq:{S}:out:*`)."""
    k = protocol.keys(session)
    return [key for pattern in (k.input("*"), k.output("*")) for key in r.scan_iter(match=pattern)]


class StreamWatch:
    """Polls XLEN of every stream matching `pattern` from a thread while a transfer runs; `most` is the longest
    length seen."""

    def __init__(self, r: redis.Redis, pattern: str) -> None:
        self._redis, self._pattern = r, pattern
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self.most = 0

    def __enter__(self) -> StreamWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _poll(self) -> None:
        while not self._stop.is_set():
            for key in self._redis.scan_iter(match=self._pattern):
                self.most = max(self.most, self._redis.xlen(key))
            time.sleep(0.002)


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[Client]:
    with Client(settings=ClientSettings(redis_url=redis_server.url, no_worker_after=5)) as c:
        yield c


@pytest.fixture
def session(client: Client, start_worker: Callable[..., Worker], session_id: str) -> Session:
    """A session whose shell runs as the worker's user (root in CI)."""
    start_worker(session_id)
    return client.session(session_id)


@pytest.fixture
def open_base() -> Iterator[Path]:
    """A root-owned directory every user may enter, not write (tmp_path's parents are root's own, 0700)."""
    path = Path(tempfile.mkdtemp(prefix="shellq-test-base-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def nobody_session(client: Client, start_worker: Callable[..., Worker], session_id: str, open_base: Path) -> Session:
    """A session whose shell runs as `nobody`, its session directory where nobody may reach it."""
    start_worker(session_id, shell_user="nobody", work_dir=open_base / "work")
    return client.session(session_id)


@pytest.fixture
def remote(tmp_path: Path) -> Path:
    """A directory for the session's files (the worker runs on this machine, so the test can look at them)."""
    path = tmp_path / "remote"
    path.mkdir()
    return path


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory every user may enter and write (tmp_path's parents are root's own, 0700)."""
    path = Path(tempfile.mkdtemp(prefix="shellq-test-files-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def root_secret(shared: Path) -> Path:
    """A file only root may read, in a directory everyone may enter."""
    path = shared / "secret.txt"
    path.write_bytes(b"root-only\n")
    path.chmod(0o600)
    return path


# -- stdin -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size", [0, 1, 1000, CHUNK, CHUNK + 1, 50 * MiB], ids=["0", "1", "1000", "512KiB", "512KiB+1", "50MiB"]
)
def test_stdin_reaches_the_command_byte_for_byte(session: Session, size: int) -> None:
    data = b"\0" + blob(size - 1, seed=size) if size else b""
    r = session.run("sha256sum; wc -c < /dev/null", stdin=data, timeout=120)
    assert r.ok, r
    assert r.stdout == f"{sha(data)}  -\n0\n"


def test_small_stdin_with_nuls_comes_back_exactly(session: Session) -> None:
    data = b"a\0b\0\0\xff\xfe\nlast line without newline"
    r = session.run("cat", stdin=data)
    assert (r.status, r.exit_code, r.stdout_bytes) == ("completed", 0, data)


def test_without_stdin_the_command_reads_eof_at_once(session: Session) -> None:
    r = session.run("cat; read line; echo read=$?", timeout=20)
    assert (r.status, r.stdout) == ("completed", "read=1\n")


def test_stdin_does_not_leak_into_the_next_command(session: Session) -> None:
    """What a command left unread of its stdin is gone; the next command reads /dev/null again."""
    first = session.run("head -c 3", stdin=b"abcdef")
    assert first.stdout_bytes == b"abc"
    assert session.run("cat; echo end", timeout=20).stdout == "end\n"
    big = session.run("head -c 5", stdin=blob(2 * MiB, seed=1))
    assert big.stdout_bytes == blob(2 * MiB, seed=1)[:5]
    assert session.run("wc -c", timeout=20).stdout.strip() == "0"


@pytest.mark.parametrize("size", [100, 3 * MiB], ids=["inline", "chunked"])
def test_submit_with_stdin_then_result(session: Session, size: int) -> None:
    data = blob(size, seed=3)
    cid = session.submit("sha256sum", stdin=data)
    r = session.result(cid, timeout=60)
    assert r.ok, r
    assert r.stdout == f"{sha(data)}  -\n"


@needs_root
@pytest.mark.parametrize("size", [5, CHUNK + 1], ids=["inline", "chunked"])
def test_stdin_reaches_a_command_of_a_shell_run_as_another_user(nobody_session: Session, size: int) -> None:
    data = blob(size, seed=4)
    nobody_session.run("export KEEP=1")
    r = nobody_session.run("sha256sum; id -un", stdin=data, timeout=60)
    assert (r.status, r.exit_code, r.error) == ("completed", 0, None)
    assert r.stdout == f"{sha(data)}  -\nnobody\n"
    assert nobody_session.run("echo $KEEP").stdout == "1\n"  # the same bash, state and all


@needs_root
def test_stdin_reaches_a_command_run_with_user(session: Session, shared: Path) -> None:
    session.run(f"cd {shared}")
    data = blob(2 * MiB, seed=5)
    r = session.run("sha256sum; id -un", stdin=data, user="nobody", timeout=60)
    assert r.ok, r
    assert r.stdout == f"{sha(data)}  -\nnobody\n"


# -- commands over the entry cap -------------------------------------------------------------------------------------


def test_a_command_over_the_entry_cap_runs(session: Session) -> None:
    body = ": " + "x" * 98 + "\n"
    r = session.run(body * (3 * MiB // len(body)) + "echo ok", timeout=60)
    assert (r.status, r.exit_code, r.stdout) == ("completed", 0, "ok\n")


def test_a_two_mib_argument_reaches_the_command(session: Session) -> None:
    r = session.run("echo " + "x" * (2 * MiB) + " | wc -c", timeout=60)
    assert (r.status, r.stdout) == ("completed", f"{2 * MiB + 1}\n")


def test_a_large_command_and_a_large_stdin_arrive_both_whole(session: Session) -> None:
    """Text and input share the input stream (text first): neither loses or gains a byte at the seam."""
    text = ": " + "y" * (CHUNK + 5) + "\nsha256sum"
    data = blob(CHUNK + 7, seed=6)
    r = session.run(text, stdin=data, timeout=60)
    assert r.ok, r
    assert r.stdout == f"{sha(data)}  -\n"


@needs_root
def test_a_command_over_128_kib_runs_as_another_user(session: Session, shared: Path) -> None:
    session.run(f"cd {shared}")
    r = session.run(": " + "z" * (200 << 10) + "\nid -un", user="nobody", timeout=60)
    assert (r.status, r.exit_code, r.stdout, r.stderr) == ("completed", 0, "nobody\n", "")


# -- write_file / read_file ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, CHUNK, CHUNK + 1, 20 * MiB], ids=["0", "1", "512KiB", "512KiB+1", "20MiB"])
def test_write_then_read_is_byte_exact(session: Session, remote: Path, size: int) -> None:
    data = blob(size, seed=size)
    path = str(remote / "f.bin")
    session.write_file(path, data)
    assert sha((remote / "f.bin").read_bytes()) == sha(data)  # what is on disk
    got = session.read_file(path)
    assert (len(got), sha(got)) == (size, sha(data))


def test_write_makes_the_missing_parents(session: Session, remote: Path) -> None:
    session.write_file(str(remote / "x" / "y" / "z.txt"), b"deep")
    assert (remote / "x" / "y" / "z.txt").read_bytes() == b"deep"
    assert session.run(f"cat {remote}/x/y/z.txt").stdout == "deep"


def test_overwrite_replaces_the_whole_content_and_leaves_no_temp_file(session: Session, remote: Path) -> None:
    path = str(remote / "f")
    session.write_file(path, blob(3 * MiB, seed=8))
    session.write_file(path, b"short")
    assert session.read_file(path) == b"short"
    assert names(session.list_dir(str(remote)), remote) == ["f"]


@pytest.mark.parametrize("mode", [0o600, 0o755, 0o640])
def test_write_sets_the_mode_given(session: Session, remote: Path, mode: int) -> None:
    path = remote / "m"
    session.write_file(str(path), b"#!/bin/sh\necho run\n", mode)
    [info] = session.list_dir(str(remote))
    assert stat.S_IMODE(info.mode) == mode
    assert session.run(f"stat -c %a {path}").stdout == f"{mode:o}\n"


def test_write_without_mode_is_0644_for_a_new_file_and_keeps_an_existing_ones(session: Session, remote: Path) -> None:
    path = remote / "m"
    session.write_file(str(path), b"1")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    path.chmod(0o700)
    session.write_file(str(path), b"2")
    assert (stat.S_IMODE(path.stat().st_mode), path.read_bytes()) == (0o700, b"2")


def test_relative_paths_resolve_against_the_shells_cwd(session: Session, remote: Path) -> None:
    session.run(f"mkdir -p {remote}/X && cd {remote}/X")
    session.write_file("rel.txt", b"relative")
    assert (remote / "X" / "rel.txt").read_bytes() == b"relative"
    assert session.read_file("rel.txt") == b"relative"
    assert session.run("cat rel.txt").stdout == "relative"
    assert names(session.list_dir("."), Path(".")) == ["rel.txt"]


def test_a_file_operation_waits_for_the_commands_queued_before_it(session: Session, remote: Path) -> None:
    """Queued right after a command that changes the tree (and the cwd), a read sees what it did."""
    session.run(f"cd {remote}")
    cid = session.submit("sleep 1 && mkdir d && echo v1 > d/f && cd d")
    assert session.read_file("f") == b"v1\n"  # relative to the cwd the command left
    assert session.result(cid).ok
    session.submit("echo v2 > f")
    session.write_file("g", b"after")
    assert session.run("cat f g").stdout == "v2\nafter"


def test_a_file_operation_after_the_shells_cwd_was_removed_reads_and_keeps_the_shell(
    session: Session, remote: Path
) -> None:
    """A shell may stand in a directory that is gone (`rm -rf` of the cwd); an absolute path still reads, and the
    shell (its variables) is not replaced."""
    (remote / "f").write_bytes(b"abs")
    session.run(f"export KEEP=1; mkdir {remote}/gone && cd {remote}/gone && rmdir {remote}/gone")
    assert session.read_file(str(remote / "f")) == b"abs"
    assert session.run("echo $KEEP").stdout == "1\n"


@pytest.mark.parametrize(
    "name", ["with space.txt", "new\nline", os.fsdecode(b"caf\xe9"), "\u00e9t\u00e9 \U0001f600"],
    ids=["space", "newline", "latin1-bytes", "utf8"],
)  # fmt: skip
def test_awkward_file_names_work_for_write_read_and_list(session: Session, remote: Path, name: str) -> None:
    path = os.path.join(remote, name)
    session.write_file(path, b"awkward")
    assert os.listdir(os.fsencode(remote)) == [os.fsencode(name)]  # the exact bytes on disk
    assert session.read_file(path) == b"awkward"
    [info] = session.list_dir(str(remote))
    assert (info.path, info.size, info.is_dir) == (path, 7, False)


def test_read_from_an_offset_and_at_most_max_bytes(session: Session, remote: Path) -> None:
    data = blob(3 * MiB, seed=9)
    path = str(remote / "f")
    session.write_file(path, data)
    assert session.read_file(path, max_bytes=5, offset=10) == data[10:15]
    assert session.read_file(path, max_bytes=0) == b""
    assert session.read_file(path, offset=len(data) + 10) == b""
    assert session.read_file(path, offset=len(data) - 4) == data[-4:]
    across = session.read_file(path, max_bytes=CHUNK + 6, offset=CHUNK - 3)  # streamed, across chunk edges
    assert sha(across) == sha(data[CHUNK - 3 : 2 * CHUNK + 3])


# -- list_dir / archive ----------------------------------------------------------------------------------------------


def test_list_dir_gives_the_direct_children_sorted(session: Session, remote: Path) -> None:
    make_tree(remote)
    entries = session.list_dir(str(remote))
    assert names(entries, remote) == ["a", "empty", "top.txt"]
    assert [e.is_dir for e in entries] == [True, True, False]
    assert entries[2].size == 4
    assert entries[2].mtime == pytest.approx((remote / "top.txt").stat().st_mtime)


def test_list_dir_recursive_goes_depth_first_and_lists_symlinks_without_following_them(
    session: Session, remote: Path
) -> None:
    make_tree(remote)
    (remote / "dirlink").symlink_to("a")
    entries = session.list_dir(str(remote), recursive=True)
    assert names(entries, remote) == [
        "a",
        "a/b",
        "a/b/c",
        "a/b/c/deep.bin",
        "a/link-to-mid",
        "a/mid.txt",
        "a/with space.txt",
        "dirlink",
        "empty",
        "top.txt",
    ]
    by_name = dict(zip(names(entries, remote), entries, strict=True))
    for link in ("a/link-to-mid", "dirlink"):
        assert stat.S_ISLNK(by_name[link].mode) and not by_name[link].is_dir
    assert by_name["a/b/c/deep.bin"].size == MiB + 3


def test_list_dir_stops_at_max_entries(session: Session, remote: Path) -> None:
    make_tree(remote)
    entries = session.list_dir(str(remote), recursive=True, max_entries=3)
    assert names(entries, remote) == ["a", "a/b", "a/b/c"]


def test_an_archive_unpacks_to_the_same_tree(session: Session, remote: Path, tmp_path: Path) -> None:
    """Over 512 KiB of archive (random bytes do not compress): it comes back in chunks."""
    make_tree(remote / "proj")
    data = session.archive(str(remote / "proj"))
    assert len(data) > CHUNK
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        assert {m.name.split("/")[0] for m in tar.getmembers()} == {"proj"}
        tar.extractall(tmp_path / "out", filter="data")
    assert snapshot(tmp_path / "out" / "proj") == snapshot(remote / "proj")


def test_an_archive_over_max_bytes_is_file_too_large(session: Session, remote: Path) -> None:
    make_tree(remote / "proj")
    with pytest.raises(FileTooLargeError) as caught:
        session.archive(str(remote / "proj"), max_bytes=100)
    assert isinstance(caught.value, ShellqError)
    assert caught.value.errno == errno.EFBIG
    assert str(remote / "proj") in str(caught.value)
    assert session.run("echo still here").stdout == "still here\n"


# -- upload / download -----------------------------------------------------------------------------------------------


def test_upload_and_download_a_file(session: Session, remote: Path, tmp_path: Path) -> None:
    data = blob(3 * MiB + 1, seed=10)
    (tmp_path / "local.bin").write_bytes(data)
    session.upload(tmp_path / "local.bin", str(remote / "up" / "copy.bin"))
    assert session.run(f"sha256sum < {remote}/up/copy.bin").stdout == f"{sha(data)}  -\n"
    session.download(str(remote / "up" / "copy.bin"), tmp_path / "back.bin")
    assert sha((tmp_path / "back.bin").read_bytes()) == sha(data)


def test_upload_a_directory_tree(session: Session, remote: Path, tmp_path: Path) -> None:
    make_tree(tmp_path / "local")
    session.upload(tmp_path / "local", str(remote / "up"))
    assert snapshot(remote / "up") == snapshot(tmp_path / "local")
    assert session.read_file(str(remote / "up" / "a" / "link-to-mid")) == b"mid\0dle"


@pytest.mark.parametrize("into", ["copy", "fresh/copy"])
def test_download_a_directory_into_a_new_local_one(session: Session, remote: Path, tmp_path: Path, into: str) -> None:
    """`local` is made if missing, with its parents (as `upload` makes `remote`)."""
    make_tree(remote / "proj")
    target = tmp_path / into
    session.download(str(remote / "proj"), target)
    assert snapshot(target) == snapshot(remote / "proj")
    assert os.readlink(target / "a" / "link-to-mid") == "mid.txt"


def test_download_of_a_missing_file_raises_and_leaves_nothing(session: Session, remote: Path, tmp_path: Path) -> None:
    local = tmp_path / "local"
    local.mkdir()
    with pytest.raises(FileNotFoundError):
        session.download(str(remote / "nope"), local / "got")
    assert list(local.iterdir()) == []


# -- errors ----------------------------------------------------------------------------------------------------------

FileCall = Callable[[Session, str], Any]


@pytest.mark.parametrize(
    ("call", "where", "error", "builtin", "code"),
    [
        (lambda s, p: s.read_file(p), "missing", SessionFileNotFoundError, FileNotFoundError, errno.ENOENT),
        (lambda s, p: s.list_dir(p), "missing", SessionFileNotFoundError, FileNotFoundError, errno.ENOENT),
        (lambda s, p: s.archive(p), "missing", SessionFileNotFoundError, FileNotFoundError, errno.ENOENT),
        (lambda s, p: s.read_file(p), "dir", SessionIsADirectoryError, IsADirectoryError, errno.EISDIR),
        (lambda s, p: s.write_file(p, b"x"), "dir", SessionIsADirectoryError, IsADirectoryError, errno.EISDIR),
        (lambda s, p: s.list_dir(p), "file", SessionNotADirectoryError, NotADirectoryError, errno.ENOTDIR),
        (lambda s, p: s.write_file(p, b"x"), "file/x", SessionNotADirectoryError, NotADirectoryError, errno.ENOTDIR),
        (lambda s, p: s.read_file(p), "file/x", SessionNotADirectoryError, NotADirectoryError, errno.ENOTDIR),
    ],
    ids=["read-missing", "list-missing", "archive-missing", "read-dir", "write-dir", "list-file", "write-under-file",
         "read-under-file"],
)  # fmt: skip
def test_a_failed_file_operation_raises_the_builtin_error_naming_the_path(
    session: Session, remote: Path, call: FileCall, where: str, error: type[Exception], builtin: type[OSError],
    code: int,
) -> None:  # fmt: skip
    (remote / "dir").mkdir()
    (remote / "file").write_bytes(b"f")
    path = str(remote / where)
    with pytest.raises(error) as caught:
        call(session, path)
    e = caught.value
    assert isinstance(e, builtin) and isinstance(e, ShellqError)
    assert (e.errno, e.filename) == (code, path)
    assert path in str(e)
    assert (remote / "dir").is_dir() and (remote / "file").read_bytes() == b"f"  # nothing changed


@pytest.mark.parametrize("name", ["new\nline", os.fsdecode(b"caf\xe9"), "it's.txt"], ids=["newline", "latin1", "quote"])
def test_the_error_for_an_awkward_missing_name_carries_that_exact_name(
    session: Session, remote: Path, name: str
) -> None:
    path = os.path.join(remote, name)
    with pytest.raises(FileNotFoundError) as caught:
        session.read_file(path)
    assert caught.value.filename == path


@needs_root
def test_a_shell_run_as_nobody_may_not_read_roots_file(nobody_session: Session, root_secret: Path) -> None:
    with pytest.raises(SessionPermissionError) as caught:
        nobody_session.read_file(str(root_secret))
    e = caught.value
    assert isinstance(e, PermissionError) and isinstance(e, ShellqError)
    assert (e.errno, e.filename) == (errno.EACCES, str(root_secret))


@needs_root
def test_a_shell_run_as_nobody_reads_and_writes_its_own_files(nobody_session: Session, shared: Path) -> None:
    mine = shared / "mine.txt"
    mine.write_bytes(b"nobody's\n")
    os.chown(mine, NOBODY.pw_uid, NOBODY.pw_gid)
    mine.chmod(0o600)
    assert nobody_session.read_file(str(mine)) == b"nobody's\n"
    nobody_session.write_file(str(shared / "new.txt"), b"made by nobody")
    assert (shared / "new.txt").stat().st_uid == NOBODY.pw_uid


@needs_root
def test_user_nobody_may_not_read_what_the_root_shell_can(session: Session, root_secret: Path) -> None:
    with pytest.raises(SessionPermissionError) as caught:
        session.read_file(str(root_secret), user="nobody")
    assert isinstance(caught.value, PermissionError) and caught.value.filename == str(root_secret)
    assert session.read_file(str(root_secret)) == b"root-only\n"


@needs_root
def test_write_as_nobody_into_a_root_only_directory_is_refused(session: Session, shared: Path) -> None:
    locked = shared / "locked"
    locked.mkdir(mode=0o755)
    with pytest.raises(SessionPermissionError) as caught:
        session.write_file(str(locked / "x"), b"no", user="nobody")
    assert isinstance(caught.value, PermissionError) and isinstance(caught.value, ShellqError)
    assert str(locked / "x") in str(caught.value)
    assert list(locked.iterdir()) == []
    session.write_file(str(shared / "ok.txt"), b"yes", user="nobody")
    assert (shared / "ok.txt").stat().st_uid == NOBODY.pw_uid


# -- user= -----------------------------------------------------------------------------------------------------------


@needs_root
def test_a_command_runs_as_the_user_asked_and_the_shell_stays_itself(session: Session, shared: Path) -> None:
    session.run(f"cd {shared}")
    r = session.run("whoami; id -u", user="nobody")
    assert (r.status, r.exit_code, r.stdout) == ("completed", 0, f"nobody\n{NOBODY.pw_uid}\n")
    assert session.run("whoami").stdout == "root\n"


@needs_root
def test_a_command_as_another_user_sees_the_shells_exported_variables_and_cwd(session: Session, shared: Path) -> None:
    session.run(f"export A=1 SPACED='a b'; NOT_EXPORTED=2; cd {shared}")
    r = session.run('echo "$A|$SPACED|${NOT_EXPORTED-unset}"; pwd', user="nobody")
    assert r.stdout == f"1|a b|unset\n{shared}\n"


@needs_root
def test_a_command_as_another_user_changes_none_of_the_shells_state(session: Session, shared: Path) -> None:
    session.run(f"cd {shared}; export B=1")
    r = session.run("cd / && export B=2 C=3 && pwd", user="nobody")
    assert r.stdout == "/\n"
    after = session.run('pwd; echo "$B ${C-unset}"')
    assert after.stdout == f"{shared}\n1 unset\n"
    assert after.cwd == str(shared)


@needs_root
def test_env_and_cwd_apply_to_that_one_command(session: Session, shared: Path) -> None:
    (shared / "sub").mkdir()
    session.run(f"cd {shared}")
    r = session.run('echo "$D"; pwd', user="nobody", env={"D": "4"}, cwd="sub")
    assert r.stdout == f"4\n{shared}/sub\n"
    assert session.run('echo "${D-unset}"; pwd').stdout == f"unset\n{shared}\n"


@needs_root
def test_an_unknown_user_is_rejected_naming_it(session: Session, remote: Path) -> None:
    r = session.run(f"touch {remote}/ran", user="no-such-user-xq")
    assert r.status == "rejected"
    assert r.error is not None and "no-such-user-xq" in r.error
    assert not (remote / "ran").exists()


@needs_root
@pytest.mark.parametrize("root", ["root", "0"])
def test_root_is_refused_when_the_shell_runs_as_another_user(
    client: Client, start_worker: Callable[..., Worker], session_id: str, root: str, root_secret: Path
) -> None:
    start_worker(session_id, shell_user="nobody")
    s = client.session(session_id)
    r = s.run("id -u", user=root)
    assert (r.status, r.stdout) == ("rejected", "")
    assert r.error is not None and "root" in r.error
    with pytest.raises(ShellqError, match="rejected"):
        s.read_file(str(root_secret), user=root)


@needs_root
def test_root_commands_lets_root_in(
    client: Client, start_worker: Callable[..., Worker], session_id: str, root_secret: Path
) -> None:
    start_worker(session_id, shell_user="nobody", root_commands=True)
    s = client.session(session_id)
    assert s.run("id -u").stdout == f"{NOBODY.pw_uid}\n"
    r = s.run("id -u", user="root")
    assert (r.status, r.stdout) == ("completed", "0\n")
    assert s.read_file(str(root_secret), user="root") == b"root-only\n"


# -- the transfers themselves ----------------------------------------------------------------------------------------


def test_no_transfer_stream_is_left_in_redis(
    client: Client, session: Session, remote: Path, tmp_path: Path, session_id: str
) -> None:
    big = blob(3 * MiB, seed=11)
    assert session.run("sha256sum", stdin=big).stdout == f"{sha(big)}  -\n"
    session.write_file(str(remote / "big"), big)
    assert session.read_file(str(remote / "big")) == big
    make_tree(tmp_path / "local")
    session.upload(tmp_path / "local", str(remote / "tree"))
    session.download(str(remote / "tree"), tmp_path / "back")
    assert len(session.archive(str(remote / "tree"))) > CHUNK
    with pytest.raises(FileTooLargeError):
        session.archive(str(remote / "tree"), max_bytes=CHUNK + 1)
    assert session.run(": " + "w" * (2 * MiB) + "\necho done").stdout == "done\n"
    assert transfer_keys(client.redis, session_id) == []


def test_a_refused_command_with_a_large_stdin_leaves_nothing_behind(
    client: Client, session: Session, session_id: str
) -> None:
    """The worker refuses it before reading its input: the producer stops sending and deletes what it sent."""
    r = session.run("cat", stdin=blob(20 * MiB, seed=13), timeout=protocol.MAX_TIMEOUT + 1)
    assert r.status == "rejected"
    assert r.error is not None and "timeout" in r.error
    assert transfer_keys(client.redis, session_id) == []
    assert session.run("echo next").stdout == "next\n"


@pytest.mark.parametrize("direction", ["write", "read"])
def test_a_20_mib_transfer_holds_at_most_window_chunks_in_redis(
    client: Client, session: Session, remote: Path, session_id: str, direction: str
) -> None:
    """The side that is ahead stops at WINDOW chunks in Redis and waits: a write queued behind a busy shell fills
    the input stream to WINDOW and no further; a read whose reader does not read yet fills the output stream to
    WINDOW and no further. Then the transfer completes, byte-exact."""
    data = blob(20 * MiB, seed=12)
    path = str(remote / "big")
    keys = protocol.keys(session_id)
    if direction == "read":
        session.write_file(path, data)
    stream = keys.input("*") if direction == "write" else keys.output("*")
    with StreamWatch(client.redis, stream) as w:
        if direction == "write":
            busy = session.submit("sleep 1")  # the worker takes the write only after this: the producer waits
            session.write_file(path, data)
            assert session.result(busy).ok
        else:
            req = files.request("read", path)
            deadline = time.monotonic() + 60
            files.drive(session, files.submit(session, req, deadline=deadline))
            wait_for(lambda: w.most >= WINDOW)  # the worker has filled the window and waits for the reader
            time.sleep(0.3)  # it stays there: nobody reads
            got = bytearray()
            result = files.drive(session, files._wait(session, req.id or "", got.extend, deadline))
            assert result.streamed and bytes(got) == data
    assert sha((remote / "big").read_bytes()) == sha(data)
    assert w.most == WINDOW
