"""Live output: while a command runs, what it writes is published in chunks on `shellq:{S}:live`, for readers that
want it before the result (`Session.stream`, `shellq exec --follow`). Best effort by design: it never slows the
command nor delays its result, and the result stays the record of the command's output.

* The shell's read loop hands `feed` each piece it reads once the command has run a few milliseconds (a command
  that ends sooner publishes nothing: its result comes as soon); `feed` only appends to a buffer. A thread of its
  own sends the buffer, pipelined: one XADD per chunk of at most CHUNK bytes, with MAXLEN ~ `maxlen`.
* Bounded everywhere: the buffer holds at most BUFFER bytes (what comes beyond is dropped, and the next chunk's
  offset jumps past it), the thread sends at most `rate` bytes a second, the stream keeps about `maxlen` entries
  and expires `ttl` seconds after its last chunk.
* `end()` waits for a send under way, so every chunk sent is in Redis before the result is committed, then drops
  what was not sent: the result holds those bytes, and readers take them from there.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Literal

from worker import protocol, resp
from worker.errors import ShellqError
from worker.protocol import OutputChunk

log = logging.getLogger("shellq.worker")

CHUNK = 16 << 10
"""Bytes of output one live entry holds at most."""
BUFFER = 1 << 20
"""Bytes of output waiting to be sent at most; more is dropped."""
END_WAIT = 2.0
"""Seconds `end()` waits at most for a send under way (Redis slow or gone)."""

Stream = Literal["stdout", "stderr"]


class LiveOutput:
    """Publishes the running command's output on one session's live stream. `begin`, `feed` and `end` are called by
    the thread that runs commands; the sending is done by a thread of its own, started on first use."""

    def __init__(self, redis: resp.Redis, key: str, *, maxlen: int, rate: int, ttl: int) -> None:
        self._redis = redis
        self._key = key
        self._maxlen = maxlen
        self._rate = rate
        self._ttl = ttl
        self._cond = threading.Condition()
        self._pending: list[tuple[Stream, int, bytearray]] = []  # (stream, offset, data), in the order read
        self._pending_bytes = 0
        self._command: tuple[str, int] | None = None  # (command id, lease epoch) while a command runs
        self._sending = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._tokens = float(rate)
        self._stamp = time.monotonic()
        self._failing = False
        self.dropped = 0
        """Bytes dropped so far because the buffer was full (they are in the results and the spool)."""

    def begin(self, command_id: str, lease_epoch: int) -> None:
        with self._cond:
            self._command = (command_id, lease_epoch)

    def feed(self, stream: Stream, offset: int, data: bytes) -> None:
        """Queue `data`, which starts at byte `offset` of the running command's `stream`. Never blocks."""
        with self._cond:
            if self._command is None or self._closed:
                return
            if self._pending_bytes + len(data) > BUFFER:
                self.dropped += len(data)
                return
            last = self._pending[-1] if self._pending else None
            if last and last[0] == stream and last[1] + len(last[2]) == offset:
                last[2].extend(data)
            else:
                self._pending.append((stream, offset, bytearray(data)))
            self._pending_bytes += len(data)
            if not self._start():
                return
            self._cond.notify()

    def end(self) -> None:
        """The command is over: wait for a send under way (up to END_WAIT seconds), drop what was not sent."""
        with self._cond:
            self._command = None
            self._pending.clear()
            self._pending_bytes = 0
            self._cond.wait_for(lambda: not self._sending, timeout=END_WAIT)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=END_WAIT)

    def _start(self) -> bool:
        """Start the sending thread if it is not running; False when no thread can be had (a pids limit reached):
        then nothing is published, and the results carry the output as always."""
        if self._thread is not None:
            return True
        try:
            self._thread = threading.Thread(target=self._run, name="shellq-live", daemon=True)
            self._thread.start()
        except RuntimeError:
            self._thread = None
            self._pending.clear()
            self._pending_bytes = 0
            return False
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._closed)
                if self._closed:
                    return
                wait = self._refill()
                if wait > 0:
                    self._cond.wait(wait)  # end() may drop the buffer meanwhile
                    continue
                assert self._command is not None
                command, chunks = self._command, self._take(int(self._tokens))
                self._tokens -= sum(len(c[2]) for c in chunks)
                self._sending = True
            try:
                self._send(command, chunks)
            finally:
                with self._cond:
                    self._sending = False
                    self._cond.notify_all()

    def _refill(self) -> float:
        """Add the tokens earned since the last send (at most a second's worth); the seconds to wait before there
        are enough for the next chunk, or 0."""
        now = time.monotonic()
        self._tokens = min(float(self._rate), self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        need = min(self._pending_bytes, CHUNK)
        return 0.0 if self._tokens >= need else (need - self._tokens) / self._rate

    def _take(self, budget: int) -> list[tuple[Stream, int, bytes]]:
        """Up to `budget` bytes off the front of the buffer, cut into chunks of at most CHUNK bytes."""
        chunks: list[tuple[Stream, int, bytes]] = []
        while self._pending and budget > 0:
            stream, offset, data = self._pending[0]
            n = min(len(data), CHUNK, budget)
            chunks.append((stream, offset, bytes(data[:n])))
            budget -= n
            self._pending_bytes -= n
            if n == len(data):
                self._pending.pop(0)
            else:
                del data[:n]
                self._pending[0] = (stream, offset + n, data)
        return chunks

    def _send(self, command: tuple[str, int], chunks: list[tuple[Stream, int, bytes]]) -> None:
        cid, epoch = command
        calls: list[tuple[Any, ...]] = []
        for stream, offset, data in chunks:
            fields = protocol.encode(OutputChunk(id=cid, stream=stream, offset=offset, lease_epoch=epoch, data=data))
            calls.append(
                ("XADD", self._key, "MAXLEN", "~", self._maxlen, "*", *(x for kv in fields.items() for x in kv))
            )
        calls.append(("EXPIRE", self._key, self._ttl))
        try:
            self._redis.pipeline(*calls)
        except ShellqError as e:  # unreachable, an error reply, an unreadable password file
            if not self._failing:  # once per outage: the worker's own loop says more
                log.warning("live output not published: %s", e)
            self._failing = True
            return
        self._failing = False
