"""Live output (issue 17): chunks on `shellq:{S}:live` while a command runs, `Session.stream` / `AsyncSession.stream`
until the result is committed, late readers, bounds on Redis memory and on the command's speed, `exec --follow`."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import ROOT, RedisServer, wait_for

from producer import AsyncClient, Chunk, Client, ClientSettings, NoWorkerError
from worker import protocol
from worker.live import CHUNK
from worker.loop import Worker

WAIT_FOR_FLAG = "while [ ! -e {flag} ]; do sleep 0.02; done"


class Reader:
    """Reads one command's stream in a thread, with the sync or the async client; `chunks` fills as they come."""

    def __init__(self, kind: str, url: str, session: str, cid: str) -> None:
        self.chunks: list[Chunk] = []
        self.error: BaseException | None = None
        self.got_one = threading.Event()
        settings = ClientSettings(redis_url=url, no_worker_after=10)  # outlasts a worker's takeover of the lease
        self._thread = threading.Thread(target=self._read, args=(kind, settings, session, cid), daemon=True)
        self._thread.start()

    def _read(self, kind: str, settings: ClientSettings, session: str, cid: str) -> None:
        try:
            if kind == "sync":
                with Client(settings=settings) as client:
                    for chunk in client.session(session).stream(cid, timeout=60):
                        self._got(chunk)
            else:
                asyncio.run(self._read_async(settings, session, cid))
        except BaseException as e:
            self.error = e

    async def _read_async(self, settings: ClientSettings, session: str, cid: str) -> None:
        async with AsyncClient(settings=settings) as client:
            async for chunk in client.session(session).stream(cid, timeout=60):
                self._got(chunk)

    def _got(self, chunk: Chunk) -> None:
        self.chunks.append(chunk)
        self.got_one.set()

    def join(self) -> list[Chunk]:
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), "the stream did not end after the result"
        if self.error:
            raise self.error
        return self.chunks


def joined(chunks: list[Chunk], stream: str) -> bytes:
    return b"".join(c.data for c in chunks if c.stream == stream)


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[Client]:
    with Client(settings=ClientSettings(redis_url=redis_server.url, no_worker_after=1.5)) as c:
        yield c


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_chunks_come_while_the_command_runs(
    kind: str, client: Client, start_worker: Callable[..., Worker], session_id: str, tmp_path: Path
) -> None:
    """The first line is read while the command still waits for the test: output is live, not at the end."""
    start_worker(session_id)
    s = client.session(session_id)
    flag = tmp_path / "go"
    cid = s.submit(f"echo first; echo oops >&2; {WAIT_FOR_FLAG.format(flag=flag)}; echo last; exit 4")
    reader = Reader(kind, client.settings.redis_url, session_id, cid)
    assert reader.got_one.wait(30), "no chunk came while the command ran"
    assert client.redis.hget(s.keys.jrnl(cid), "res") is None  # no result yet: the command still runs
    assert reader.chunks[0] == Chunk("stdout", b"first\n", 0) or reader.chunks[0].stream == "stderr"
    flag.touch()
    chunks = reader.join()
    result = s.result(cid)
    assert result.exit_code == 4
    assert joined(chunks, "stdout") == result.stdout_bytes == b"first\nlast\n"
    assert joined(chunks, "stderr") == result.stderr_bytes == b"oops\n"
    for stream in ("stdout", "stderr"):  # offsets are contiguous: nothing dropped, nothing twice
        ends = 0
        for c in (c for c in chunks if c.stream == stream):
            assert c.offset == ends
            ends += len(c.data)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_late_reader_gets_what_is_left_then_the_rest(
    kind: str, client: Client, start_worker: Callable[..., Worker], session_id: str, tmp_path: Path
) -> None:
    start_worker(session_id)
    s = client.session(session_id)
    flag = tmp_path / "go"
    cid = s.submit(f"for i in $(seq 1 50); do echo line $i; done; {WAIT_FOR_FLAG.format(flag=flag)}; echo done")
    live = protocol.keys(session_id).live
    r = client.redis
    wait_for(lambda: r.xlen(live) > 0)  # published before this reader came
    reader = Reader(kind, client.settings.redis_url, session_id, cid)
    assert reader.got_one.wait(30)
    flag.touch()
    expected = "".join(f"line {i}\n" for i in range(1, 51)) + "done\n"
    assert joined(reader.join(), "stdout").decode() == expected
    # and one that starts after the result: the same bytes
    assert joined(Reader(kind, client.settings.redis_url, session_id, cid).join(), "stdout").decode() == expected


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_quick_command_publishes_nothing_and_its_stream_comes_from_the_result(
    kind: str, client: Client, start_worker: Callable[..., Worker], session_id: str
) -> None:
    start_worker(session_id)
    s = client.session(session_id)
    cid = s.submit("echo hi; echo there >&2")
    chunks = Reader(kind, client.settings.redis_url, session_id, cid).join()
    assert chunks == [Chunk("stdout", b"hi\n", 0), Chunk("stderr", b"there\n", 0)]
    assert client.redis.xlen(protocol.keys(session_id).live) == 0


def test_live_output_off_still_streams_from_the_result(
    client: Client, start_worker: Callable[..., Worker], session_id: str
) -> None:
    start_worker(session_id, live_output=False)
    s = client.session(session_id)
    cid = s.submit("echo a; sleep 0.3; echo b")
    assert joined(list(s.stream(cid)), "stdout") == b"a\nb\n"
    assert client.redis.xlen(protocol.keys(session_id).live) == 0


def test_100_mib_of_output_is_bounded_in_redis_and_complete_in_the_result(
    client: Client, start_worker: Callable[..., Worker], session_id: str
) -> None:
    """A command that prints 100 MiB: the live stream stays within its cap (entries and bytes), the result has the
    exact size with head and tail, and a reader gets increasing offsets that end at the last byte."""
    worker = start_worker(session_id, output_cap=1 << 16)
    s = client.session(session_id)
    cid = s.submit("head -c 104857600 /dev/zero | tr '\\0' x; echo -n END")
    chunks = list(s.stream(cid, timeout=120))
    result = s.result(cid)
    assert result.status == "completed" and result.stdout_size == 100 * 2**20 + 3
    assert result.stdout_bytes.endswith(b"xEND")
    offsets = [c.offset for c in chunks]
    assert offsets == sorted(offsets)
    assert chunks[-1].offset + len(chunks[-1].data) == result.stdout_size
    assert chunks[-1].data.endswith(b"END")
    live = protocol.keys(session_id).live
    maxlen = worker.settings.live_maxlen
    assert client.redis.xlen(live) <= maxlen + 100  # MAXLEN ~ trims whole nodes of up to 100 entries
    assert client.redis.memory_usage(live) < (maxlen + 100) * (CHUNK + 512)
    assert 0 < client.redis.ttl(live) <= worker.settings.live_ttl


def test_the_live_rate_drops_bytes_from_the_live_stream_only(
    client: Client, start_worker: Callable[..., Worker], session_id: str
) -> None:
    """Published at 16 KiB/s, 400 kB in a second leave a gap between what the live stream got and the result's
    tail; the reader's offsets show it, and the spool still has every byte."""
    start_worker(session_id, live_rate=1 << 14, output_cap=1 << 16)
    s = client.session(session_id)
    cid = s.submit("for i in $(seq 1 20); do head -c 20000 /dev/zero | tr '\\0' y; sleep 0.05; done")
    chunks = list(s.stream(cid, timeout=60))
    result = s.result(cid)
    assert result.truncated and result.stdout_size == 400_000 and result.spool_path
    assert Path(result.spool_path, "stdout").read_bytes() == b"y" * 400_000
    published = sum(len(f[b"data"]) for _, f in client.redis.xrange(protocol.keys(session_id).live))
    assert 0 < published < 200_000  # about 16 KiB/s over about a second, plus the first second's burst
    assert b"".join(c.data for c in chunks) == b"y" * sum(len(c.data) for c in chunks)
    assert chunks[-1].offset + len(chunks[-1].data) == 400_000  # the end came from the result's tail
    assert any(b.offset > a.offset + len(a.data) for a, b in itertools.pairwise(chunks))  # a gap


def test_an_interrupted_command_ends_its_stream(
    client: Client, start_worker: Callable[..., Worker], session_id: str
) -> None:
    start_worker(session_id)
    s = client.session(session_id)
    cid = s.submit("echo started; sleep 60")
    chunks = s.stream(cid, timeout=30)
    assert next(chunks) == Chunk("stdout", b"started\n", 0)
    s.interrupt(cid)
    assert list(chunks) == []
    assert s.result(cid).status == "cancelled"


def test_stream_without_a_worker_raises_no_worker(client: Client, session_id: str) -> None:
    s = client.session(session_id)
    cid = s.submit("echo never")
    with pytest.raises(NoWorkerError):
        list(s.stream(cid, timeout=30))


def test_a_session_producer_reads_live_output_and_cannot_forge_it(
    redis_server: RedisServer, start_worker: Callable[..., Worker], session_id: str, tmp_path: Path
) -> None:
    from containers import access

    creds = access.grant(redis_server.client(), session_id)
    start_worker(session_id, redis_url=access.url_for(redis_server.url, creds.worker_user, creds.worker_password))
    url = access.url_for(redis_server.url, creds.producer_user, creds.producer_password)
    with Client(settings=ClientSettings(redis_url=url, no_worker_after=1.5)) as producer:
        s = producer.session(session_id)
        flag = tmp_path / "go"
        cid = s.submit(f"echo visible; {WAIT_FOR_FLAG.format(flag=flag)}")
        reader = Reader("sync", url, session_id, cid)
        assert reader.got_one.wait(30)
        flag.touch()
        assert joined(reader.join(), "stdout") == b"visible\n"
        fields: Any = {"id": cid, "stream": "stdout", "offset": "0", "data": "forged"}
        with pytest.raises(redis.exceptions.NoPermissionError):
            producer.redis.xadd(protocol.keys(session_id).live, fields)


def test_exec_follow_prints_as_output_comes_and_exits_with_the_status(
    redis_server: RedisServer, start_worker: Callable[..., Worker], session_id: str, tmp_path: Path
) -> None:
    start_worker(session_id)
    flag = tmp_path / "go"
    command = f"echo one; echo two >&2; {WAIT_FOR_FLAG.format(flag=flag)}; echo three; exit 3"
    env = {**os.environ, "SHELLQ_REDIS_URL": redis_server.url}
    proc = subprocess.Popen(
        [sys.executable, "-m", "producer.cli", "exec", session_id, "--follow", "--", command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"one\n"  # printed while the command waits for the flag
    flag.touch()
    out, err = proc.communicate(timeout=60)
    assert out == b"three\n"
    assert err == b"two\n"
    assert proc.returncode == 3


def test_a_command_started_over_by_a_new_worker_starts_its_stream_over(
    client: Client, worker_process: Callable[..., subprocess.Popen[bytes]], session_id: str, tmp_path: Path
) -> None:
    """An idempotent command whose worker dies mid-run is run again by the next worker: the reader sees the first
    run's chunks, then the second run's from offset 0 (a higher lease epoch), and the result is the second run's."""
    first = worker_process(session_id)
    wait_for(lambda: client.session(session_id).worker_alive())
    s = client.session(session_id)
    flag = tmp_path / "go"
    cid = s.submit(f"echo run; {WAIT_FOR_FLAG.format(flag=flag)}; echo end", idempotent=True)
    reader = Reader("sync", client.settings.redis_url, session_id, cid)
    assert reader.got_one.wait(30)
    first.kill()
    first.wait()
    worker_process(session_id)
    wait_for(lambda: len(reader.chunks) >= 2, timeout=30)  # the second run has printed its first line
    flag.touch()
    chunks = reader.join()
    assert [(c.offset, c.data) for c in chunks] == [(0, b"run\n"), (0, b"run\n"), (4, b"end\n")]
    assert s.result(cid).stdout == "run\nend\n"
