"""shellq's Redis Functions library has a version: shellqs of different versions on one Redis fail clearly, and an
older shellq never replaces a newer library."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, RedisServer

from producer import Client, ConfigError
from worker import protocol

NEWER = protocol.FUNCTIONS_VERSION + 1


@pytest.fixture
def server(private_server: RedisServer) -> RedisServer:
    """A server of this test's own (conftest.py): these tests change its users or its Functions library."""
    return private_server


def library(version: int) -> str:
    """shellq's library as another version of shellq would load it."""
    current = f"\nlocal VERSION = {protocol.FUNCTIONS_VERSION}\n"
    assert current in protocol.FUNCTIONS
    return protocol.FUNCTIONS.replace(current, f"\nlocal VERSION = {version}\n")


def loaded_version(server: RedisServer) -> int:
    return int(server.client().fcall_ro("shellq_version", 0))  # type: ignore[arg-type]


def start_worker(server: RedisServer, session: str, tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    env = {**os.environ, "SHELLQ_REDIS_URL": server.url, "SHELLQ_SESSION": session, "SHELLQ_HEARTBEAT": "0.2"}
    env.update(SHELLQ_LEASE_TTL="1.5", SHELLQ_BLOCK_MS="200", SHELLQ_WORK_DIR=str(tmp_path / "work"))
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "worker"], env=env, stdout=out, stderr=out, cwd=ROOT)
    return proc, log


def test_an_older_library_is_replaced_and_commands_run(server: RedisServer, session_id: str, tmp_path: Path) -> None:
    server.client().function_load(library(protocol.FUNCTIONS_VERSION - 1), replace=True)
    proc, _ = start_worker(server, session_id, tmp_path)
    try:
        assert Client(server.url).session(session_id).run("echo hi", timeout=10).stdout == "hi\n"
        assert loaded_version(server) == protocol.FUNCTIONS_VERSION
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0


def test_a_worker_refuses_a_newer_library_and_leaves_it_in_place(
    server: RedisServer, session_id: str, tmp_path: Path
) -> None:
    server.client().function_load(library(NEWER), replace=True)
    proc, log = start_worker(server, session_id, tmp_path)
    assert proc.wait(timeout=30) == 2  # bad configuration
    assert f"Redis has shellq functions version {NEWER}, newer than this shellq's" in log.read_text()
    assert loaded_version(server) == NEWER


def test_a_producer_refuses_a_newer_library_and_leaves_it_in_place(server: RedisServer, session_id: str) -> None:
    server.client().function_load(library(NEWER), replace=True)
    with pytest.raises(ConfigError, match=f"version {NEWER}, newer than this shellq's"):
        Client(server.url).session(session_id).submit("echo never")
    assert loaded_version(server) == NEWER


def test_a_newer_library_loaded_under_running_shellqs_stops_them_with_a_clear_error(
    server: RedisServer, session_id: str, tmp_path: Path
) -> None:
    proc, log = start_worker(server, session_id, tmp_path)
    session = Client(server.url).session(session_id)
    assert session.run("echo before", timeout=10).stdout == "before\n"
    server.client().function_load(library(NEWER), replace=True)  # a newer shellq came along
    with pytest.raises(ConfigError, match="same shellq version"):
        session.run("echo after", timeout=10)
    assert proc.wait(timeout=30) == 2  # its next step is refused: the worker stops instead of misreading arguments
    assert f"the shellq functions in Redis are version {NEWER}" in log.read_text()
