"""worker/fileops.py run as the worker runs it: `python3 -I -S fileops.py OP ARGS_JSON` in the shell's directory."""

from __future__ import annotations

import copy
import errno
import hashlib
import io
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import ROOT

FILEOPS = ROOT / "worker" / "fileops.py"
SYSTEM_PYTHON = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
"""An interpreter other users may run (the venv's may lie under root's home), as in the worker's containers."""
WITHOUT_FILTERS = """
import runpy, sys, tarfile
if hasattr(tarfile, "data_filter"):
    del tarfile.data_filter
    tarfile.TarFile.extraction_filter = staticmethod(tarfile.fully_trusted_filter)  # else 3.13 warns
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
"""Runs fileops.py as on Python before 3.10.12 and 3.11.4, whose tarfile has no extraction filters."""


def fileops(
    op: str, args: dict[str, Any], cwd: Path, stdin: bytes = b"", user: str | None = None, filters: bool = True
) -> subprocess.CompletedProcess[bytes]:
    python = SYSTEM_PYTHON if user else sys.executable
    assert python is not None
    program = [str(FILEOPS)] if filters else ["-c", WITHOUT_FILTERS, str(FILEOPS)]
    return subprocess.run(
        [python, "-I", "-S", *program, op, json.dumps(args)],
        input=stdin,
        check=False,
        cwd=cwd,
        capture_output=True,
        timeout=60,
        user=user,
    )


def ok(r: subprocess.CompletedProcess[bytes]) -> bytes:
    assert (r.returncode, r.stderr) == (0, b"")
    return r.stdout


def failed(r: subprocess.CompletedProcess[bytes], status: int = 1) -> dict[str, Any]:
    """The one JSON line on stderr of a run that exited with `status`."""
    assert r.returncode == status, r.stderr
    [line] = r.stderr.splitlines()
    error: dict[str, Any] = json.loads(line)
    return error


def write(cwd: Path, path: str, data: bytes, mode: int | None = None) -> None:
    ok(fileops("write", {"path": path, "mode": mode}, cwd, stdin=data))


def read(cwd: Path, path: str, offset: int = 0, max_bytes: int | None = None) -> bytes:
    return ok(fileops("read", {"path": path, "offset": offset, "max_bytes": max_bytes}, cwd))


def listing(cwd: Path, path: str, recursive: bool = False, max_entries: int | None = None) -> dict[str, Any]:
    out = ok(fileops("list", {"path": path, "recursive": recursive, "max_entries": max_entries}, cwd))
    result: dict[str, Any] = json.loads(out)
    return result


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- write and read -------------------------------------------------------------------------------------------------


def test_write_then_read_gives_back_the_same_bytes(tmp_path: Path) -> None:
    data = b"\0" * 1000 + os.urandom(5 << 20) + b"\0\r\n"
    write(tmp_path, "blob.bin", data)
    assert hashlib.sha256((tmp_path / "blob.bin").read_bytes()).digest() == hashlib.sha256(data).digest()
    assert hashlib.sha256(read(tmp_path, "blob.bin")).digest() == hashlib.sha256(data).digest()


def test_write_makes_parents_and_replaces_without_leaving_temp_files(tmp_path: Path) -> None:
    write(tmp_path, "a/b/c.txt", b"first")
    write(tmp_path, "a/b/c.txt", b"second, longer")
    write(tmp_path, "a/b/c.txt", b"third")
    assert (tmp_path / "a/b/c.txt").read_bytes() == b"third"
    assert os.listdir(tmp_path / "a/b") == ["c.txt"]


def test_write_sets_the_mode_given_and_keeps_the_existing_one_otherwise(tmp_path: Path) -> None:
    write(tmp_path, "new.txt", b"x")
    assert mode_of(tmp_path / "new.txt") == 0o644
    write(tmp_path, "script.sh", b"#!/bin/sh\n", mode=0o750)
    assert mode_of(tmp_path / "script.sh") == 0o750
    write(tmp_path, "script.sh", b"#!/bin/sh\necho hi\n")
    assert mode_of(tmp_path / "script.sh") == 0o750
    write(tmp_path, "script.sh", b"#!/bin/sh\n", mode=0o600)
    assert mode_of(tmp_path / "script.sh") == 0o600


def test_write_through_a_symlink_changes_the_file_it_points_to(tmp_path: Path) -> None:
    (tmp_path / "real.txt").write_bytes(b"old")
    (tmp_path / "link").symlink_to("real.txt")
    write(tmp_path, "link", b"new")
    assert (tmp_path / "real.txt").read_bytes() == b"new"
    assert os.readlink(tmp_path / "link") == "real.txt"


def test_relative_paths_resolve_against_the_working_directory(tmp_path: Path) -> None:
    (tmp_path / "shell").mkdir()
    write(tmp_path / "shell", "notes/today.txt", b"relative")
    assert (tmp_path / "shell/notes/today.txt").read_bytes() == b"relative"
    assert read(tmp_path / "shell", "../shell/notes/today.txt") == b"relative"


@pytest.mark.parametrize("name", ["with space.txt", "new\nline", os.fsdecode(b"caf\xe9"), "\u00e9t\u00e9 \U0001f600"])
def test_awkward_file_names_work_for_write_read_and_list(tmp_path: Path, name: str) -> None:
    assert json.dumps(name).isascii() and json.loads(json.dumps(name)) == name  # surrogates survive the JSON
    write(tmp_path, f"dir/{name}", b"contents")
    assert os.listdir(os.fsencode(tmp_path / "dir")) == [os.fsencode(name)]
    assert (tmp_path / "dir" / name).read_bytes() == b"contents"
    assert read(tmp_path, f"dir/{name}") == b"contents"
    [entry] = listing(tmp_path, "dir")["entries"]
    assert entry[0] == f"dir/{name}"


def test_read_from_an_offset_and_at_most_max_bytes(tmp_path: Path) -> None:
    (tmp_path / "digits").write_bytes(b"0123456789")
    assert read(tmp_path, "digits", offset=3, max_bytes=4) == b"3456"
    assert read(tmp_path, "digits", offset=8) == b"89"
    assert read(tmp_path, "digits", max_bytes=0) == b""
    assert read(tmp_path, "digits", offset=20) == b""


# -- errors -----------------------------------------------------------------------------------------------------------


def test_stat_follows_a_symlink_and_a_missing_path_is_enoent(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"abc")
    (tmp_path / "link").symlink_to("f")
    path, size, mode, mtime, is_dir = json.loads(ok(fileops("stat", {"path": "link"}, tmp_path)))
    assert (path, size, stat.S_ISREG(mode), is_dir) == ("link", 3, True, False)
    assert mtime == (tmp_path / "f").stat().st_mtime
    assert json.loads(ok(fileops("stat", {"path": "."}, tmp_path)))[4] is True
    r = fileops("stat", {"path": "gone"}, tmp_path)
    assert r.returncode == 1 and json.loads(r.stderr)["errno"] == errno.ENOENT


def test_reading_a_directory_is_eisdir(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    error = failed(fileops("read", {"path": "d", "offset": 0, "max_bytes": None}, tmp_path))
    assert (error["errno"], error["filename"]) == (errno.EISDIR, "d")


def test_writing_onto_a_directory_is_eisdir_and_leaves_it_alone(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d/kept").write_bytes(b"")
    error = failed(fileops("write", {"path": "d", "mode": None}, tmp_path, stdin=b"data"))
    assert (error["errno"], error["filename"]) == (errno.EISDIR, "d")
    assert os.listdir(tmp_path / "d") == ["kept"]
    assert os.listdir(tmp_path) == ["d"]


def test_a_parent_that_is_a_file_is_enotdir(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"a file")
    error = failed(fileops("write", {"path": "f/child", "mode": None}, tmp_path, stdin=b"data"))
    assert error["errno"] == errno.ENOTDIR
    assert failed(fileops("read", {"path": "f/child"}, tmp_path))["errno"] == errno.ENOTDIR
    assert (tmp_path / "f").read_bytes() == b"a file"


@pytest.mark.parametrize("op", ["read", "list", "archive"])
def test_a_missing_path_is_enoent_naming_it(tmp_path: Path, op: str) -> None:
    r = fileops(op, {"path": "no/such thing"}, tmp_path)
    assert r.stdout == b""
    assert failed(r) == {"errno": errno.ENOENT, "strerror": os.strerror(errno.ENOENT), "filename": "no/such thing"}


def test_bad_arguments_exit_2_with_a_message(tmp_path: Path) -> None:
    assert "path" in failed(fileops("read", {"offset": 0}, tmp_path), status=2)["error"]
    assert "unknown operation" in failed(fileops("delete", {"path": "x"}, tmp_path), status=2)["error"]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory everyone may write in, holding a file (0600) and a directory (0700) only root may read."""
    with tempfile.TemporaryDirectory(prefix="shellq-fileops-") as name:
        path = Path(name)
        path.chmod(0o777)
        (path / "secret").write_bytes(b"root only")
        (path / "secret").chmod(0o600)
        (path / "private").mkdir(mode=0o700)
        yield path


@pytest.mark.skipif(os.geteuid() != 0, reason="running as another user needs root")
@pytest.mark.skipif(SYSTEM_PYTHON is None, reason="no python3 in /usr/local/bin, /usr/bin or /bin")
def test_permissions_are_the_users_own(shared_dir: Path) -> None:
    r = fileops("read", {"path": "secret", "offset": 0, "max_bytes": None}, shared_dir, user="nobody")
    assert (r.stdout, failed(r)["errno"]) == (b"", errno.EACCES)
    # Replacing the file would need only the directory's permission: refused all the same.
    r = fileops("write", {"path": "secret", "mode": None}, shared_dir, stdin=b"overwritten", user="nobody")
    assert failed(r)["errno"] == errno.EACCES
    assert (shared_dir / "secret").read_bytes() == b"root only"
    assert failed(fileops("list", {"path": "private"}, shared_dir, user="nobody"))["errno"] == errno.EACCES
    ok(fileops("write", {"path": "mine.txt", "mode": None}, shared_dir, stdin=b"hello", user="nobody"))
    assert (shared_dir / "mine.txt").stat().st_uid == pwd.getpwnam("nobody").pw_uid
    assert sorted(os.listdir(shared_dir)) == ["mine.txt", "private", "secret"]


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_root_rewriting_a_users_file_keeps_its_owner(tmp_path: Path) -> None:
    (tmp_path / "theirs.txt").write_bytes(b"old")
    nobody = pwd.getpwnam("nobody")
    os.chown(tmp_path / "theirs.txt", nobody.pw_uid, nobody.pw_gid)
    write(tmp_path, "theirs.txt", b"new")
    info = (tmp_path / "theirs.txt").stat()
    assert (info.st_uid, info.st_gid) == (nobody.pw_uid, nobody.pw_gid)


# -- list -----------------------------------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """tmp_path/tree: a.txt, b/ (inner.txt, z/deep.txt), c -> b."""
    root = tmp_path / "tree"
    (root / "b/z").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"abc")
    (root / "b/inner.txt").write_bytes(b"inner")
    (root / "b/z/deep.txt").write_bytes(b"deep")
    (root / "c").symlink_to("b")
    return root


def test_list_gives_the_direct_children_sorted_with_symlinks_as_such(tree: Path) -> None:
    result = listing(tree.parent, "tree")
    assert result["truncated"] is False
    assert [(e[0], e[4]) for e in result["entries"]] == [("tree/a.txt", False), ("tree/b", True), ("tree/c", False)]
    [a, b, c] = result["entries"]
    assert a[1] == 3 and stat.S_ISREG(a[2]) and a[3] == pytest.approx((tree / "a.txt").stat().st_mtime)
    assert stat.S_ISDIR(b[2])
    assert stat.S_ISLNK(c[2])


def test_list_recursive_goes_depth_first_and_not_through_symlinks(tree: Path) -> None:
    result = listing(tree, ".", recursive=True)
    assert [e[0] for e in result["entries"]] == [
        "./a.txt",
        "./b",
        "./b/inner.txt",
        "./b/z",
        "./b/z/deep.txt",
        "./c",
    ]
    assert result["truncated"] is False


def test_list_stops_at_max_entries(tree: Path) -> None:
    result = listing(tree, str(tree), recursive=True, max_entries=3)
    assert [e[0] for e in result["entries"]] == [f"{tree}/a.txt", f"{tree}/b", f"{tree}/b/inner.txt"]
    assert result["truncated"] is True
    assert listing(tree, ".", max_entries=3)["truncated"] is False
    assert listing(tree, ".", max_entries=0) == {"entries": [], "truncated": True}


def test_listing_a_file_is_enotdir(tree: Path) -> None:
    assert failed(fileops("list", {"path": "a.txt"}, tree))["errno"] == errno.ENOTDIR


# -- archive and extract --------------------------------------------------------------------------------------------


@pytest.fixture(params=[True, False], ids=["filters", "no-filters"])
def filters(request: pytest.FixtureRequest) -> bool:
    """Extract with tarfile's data filter, and with fileops.py's own checks (Pythons without the filter)."""
    value: bool = request.param
    return value


def test_archive_then_extract_elsewhere_gives_the_same_tree(tree: Path, tmp_path: Path, filters: bool) -> None:
    (tree / "b/run.sh").write_bytes(b"#!/bin/sh\n")
    (tree / "b/run.sh").chmod(0o755)
    (tree / os.fsdecode(b"caf\xe9")).write_bytes(os.urandom(100_000))
    stream = ok(fileops("archive", {"path": "tree"}, tmp_path))
    assert stream[:2] == b"\x1f\x8b"  # gzip
    ok(fileops("extract", {"path": "out/here"}, tmp_path, stdin=stream, filters=filters))
    extracted = tmp_path / "out/here/tree"
    for name in ["a.txt", "b/inner.txt", "b/z/deep.txt", "b/run.sh", os.fsdecode(b"caf\xe9")]:
        assert (extracted / name).read_bytes() == (tree / name).read_bytes()
    assert os.readlink(extracted / "c") == "b"
    assert mode_of(extracted / "b/run.sh") & 0o111
    assert sorted(os.listdir(extracted)) == sorted(os.listdir(tree))


def test_archive_a_single_file(tree: Path, tmp_path: Path) -> None:
    stream = ok(fileops("archive", {"path": "tree/a.txt"}, tmp_path))
    with tarfile.open(fileobj=io.BytesIO(stream), mode="r:gz") as tar:
        assert tar.getnames() == ["a.txt"]


def test_extract_overwrites_existing_files(tmp_path: Path, filters: bool) -> None:
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest/f").write_bytes(b"old contents, longer")
    (tmp_path / "dest/l").write_bytes(b"a file where the archive has a symlink")
    stream = tar_of(member("f", b"new"), member("l", link="f"))
    ok(fileops("extract", {"path": "dest"}, tmp_path, stdin=stream, filters=filters))
    assert (tmp_path / "dest/f").read_bytes() == b"new"
    assert os.readlink(tmp_path / "dest/l") == "f"


def member(
    name: str, data: bytes = b"", link: str | None = None, kind: bytes = tarfile.REGTYPE, mode: int = 0o644
) -> tuple[tarfile.TarInfo, bytes]:
    """A tar member: a file, a symlink to `link`, or another `kind` of entry."""
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size = (tarfile.SYMTYPE, 0o777, 0) if link is not None else (kind, mode, len(data))
    info.linkname = link or ""
    return info, data


def tar_of(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize(
    "bad",
    [
        member("../evil", b"evil"),
        member("ok/../../evil", b"evil"),
        member("/ABS/evil", b"evil"),
        member("evil", link="../outside"),
        member("evil", link="/etc/passwd"),
        member("evil", kind=tarfile.CHRTYPE),
    ],
    ids=["dotdot", "dotdot-inside", "absolute", "link-out", "link-absolute", "device"],
)
def test_extract_refuses_members_outside_the_target(
    tmp_path: Path, filters: bool, bad: tuple[tarfile.TarInfo, bytes]
) -> None:
    info, data = copy.copy(bad[0]), bad[1]
    info.name = info.name.replace("/ABS", str(tmp_path))
    (tmp_path / "dest").mkdir()
    stream = tar_of(member("fine.txt", b"ok"), (info, data))
    r = fileops("extract", {"path": "dest"}, tmp_path, stdin=stream, filters=filters)
    assert failed(r, status=2)["error"]
    assert sorted(os.listdir(tmp_path)) == ["dest"]
    assert os.listdir(tmp_path / "dest") == ["fine.txt"]  # members before the bad one are extracted


def test_extract_refuses_writing_through_a_symlink_leading_out(tmp_path: Path, filters: bool) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest/out").symlink_to(tmp_path / "elsewhere")
    stream = tar_of(member("out/evil", b"evil"))
    assert failed(fileops("extract", {"path": "dest"}, tmp_path, stdin=stream, filters=filters), status=2)["error"]
    assert os.listdir(tmp_path / "elsewhere") == []


def test_extract_drops_setuid_bits(tmp_path: Path, filters: bool) -> None:
    stream = tar_of(member("tool", b"#!/bin/sh\n", mode=0o6755))
    ok(fileops("extract", {"path": "dest"}, tmp_path, stdin=stream, filters=filters))
    assert mode_of(tmp_path / "dest/tool") == 0o755


def test_extract_of_garbage_exits_2(tmp_path: Path) -> None:
    assert failed(fileops("extract", {"path": "dest"}, tmp_path, stdin=b"not a tar stream" * 100), status=2)["error"]


# -- special files and a reader that goes away ----------------------------------------------------------------------


def test_reading_a_fifo_with_no_writer_returns_at_once(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    assert read(tmp_path, "fifo") == b""


def test_reading_a_fifo_gives_what_was_written(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    fd = os.open(tmp_path / "fifo", os.O_RDWR)  # a writer that never blocks; the data waits in the pipe
    try:
        os.write(fd, b"through the fifo")
        assert read(tmp_path, "fifo", max_bytes=16) == b"through the fifo"
    finally:
        os.close(fd)


@pytest.mark.parametrize("op", ["read", "archive"])
def test_a_reader_that_goes_away_ends_it_quietly_with_status_3(tmp_path: Path, op: str) -> None:
    with open(tmp_path / "big", "wb") as f:
        f.write(os.urandom(8 << 20))
    args = json.dumps({"path": "big", "offset": 0, "max_bytes": None} if op == "read" else {"path": "big"})
    with subprocess.Popen(
        [sys.executable, "-I", "-S", str(FILEOPS), op, args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as p:
        assert p.stdout is not None and p.stderr is not None
        assert p.stdout.read(1000)
        p.stdout.close()
        assert p.wait(timeout=60) == 3
        assert p.stderr.read() == b""
