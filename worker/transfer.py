"""Moving bytes too large for one stream entry between a producer and the worker, in order with the commands: a
command's text past the entry cap, stdin, a file's bytes. Both directions use a stream per command, written by one
side and consumed (XDEL) by the other, so Redis holds at most WINDOW chunks of CHUNK bytes of it at a time:

    shellq:{S}:in:<id>    producer -> worker: the command's text (`cmd_size` bytes), then its input (`input_size`)
    shellq:{S}:out:<id>   worker -> producer: a file operation's output, then an entry `eof` 1

Entries are `data <bytes>`. The writer adds a chunk while fewer than WINDOW wait, else polls XLEN; the reader
XREAD BLOCKs and deletes what it took. A side that sees no progress for `stall` seconds gives up (TransferError),
and deletes the stream. The producer's side is in producer/transfer.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from worker import protocol, resp
from worker.errors import ShellqError

CHUNK = 512 << 10
"""Bytes per entry."""
WINDOW = 8
"""Entries a transfer stream holds at most (4 MiB of Redis memory per transfer)."""
STALL = 30.0
"""Seconds without progress after which a transfer is abandoned."""
TTL = 3600
"""Seconds a transfer stream is kept after its last write (a side that died leaves nothing for good)."""


class TransferError(ShellqError):
    """A transfer stopped: the other side sent or took nothing for STALL seconds, or the stream was cut short."""


def receive(redis: resp.Redis, key: str, size: int, stall: float = STALL) -> Iterator[bytes]:
    """The `size` bytes that come on stream `key`, chunk by chunk, each deleted from Redis once read. Raises
    TransferError when nothing comes for `stall` seconds; deletes the stream when done or given up."""
    got, last, taken = 0, "0-0", list[str]()
    quiet_since = time.monotonic()
    try:
        while got < size:
            calls: list[tuple[Any, ...]] = [("XDEL", key, *taken)] if taken else []
            calls.append(("XREAD", "COUNT", WINDOW, "BLOCK", 1000, "STREAMS", key, last))
            entries = protocol.stream_entries(redis.pipeline(*calls)[-1])
            taken = [eid for eid, _ in entries]
            if not entries:
                if time.monotonic() - quiet_since > stall:
                    raise TransferError(f"{size - got} of {size} bytes never came on {key} ({stall:g}s without any)")
                continue
            quiet_since = time.monotonic()
            last = entries[-1][0]
            for _, fields in entries:
                data = fields.get(b"data", b"")
                got += len(data)
                if got > size:
                    raise TransferError(f"{key} holds more than the {size} bytes announced")
                yield data
    finally:
        redis.call("DEL", key)


class Sender:
    """Writes a stream of bytes to `key` in chunks, keeping at most WINDOW unread; `close()` adds the `eof` entry.
    TransferError when the reader takes nothing for `stall` seconds (then the stream is deleted)."""

    def __init__(self, redis: resp.Redis, key: str, stall: float = STALL) -> None:
        self._redis = redis
        self._key = key
        self._stall = stall
        self._buffer = bytearray()
        self.size = 0

    def write(self, data: bytes) -> None:
        self._buffer += data
        self.size += len(data)
        while len(self._buffer) >= CHUNK:
            self._add({"data": bytes(self._buffer[:CHUNK])})
            del self._buffer[:CHUNK]

    def close(self) -> None:
        if self._buffer:
            self._add({"data": bytes(self._buffer)})
            self._buffer.clear()
        self._add({"eof": "1"})

    def abandon(self) -> None:
        self._redis.call("DEL", self._key)

    def _add(self, fields: dict[str, Any]) -> None:
        flat = [x for kv in fields.items() for x in kv]
        waiting = self._redis.pipeline(("XADD", self._key, "*", *flat), ("EXPIRE", self._key, TTL), ("XLEN", self._key))
        wait, since = 0.001, time.monotonic()
        while waiting[-1] >= WINDOW:  # the reader is behind: let it catch up before the next chunk
            if time.monotonic() - since > self._stall:
                self.abandon()
                raise TransferError(f"nobody read {self._key} for {self._stall:g}s")
            time.sleep(wait)
            wait = min(wait * 2, 0.05)
            waiting = [self._redis.call("XLEN", self._key)]
