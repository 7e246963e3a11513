"""The worker's control thread: renews the lease with each heartbeat, reads the control stream (interrupts,
shutdown) while commands run, and trims old history. It shares the worker's connection pool."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from worker import protocol
from worker.errors import RedisUnavailableError, ShellqError
from worker.protocol import ControlRequest, DecodeError

if TYPE_CHECKING:
    from worker.loop import Worker

log = logging.getLogger("shellq.worker")


class Control(threading.Thread):
    """Runs beside the worker loop until the worker stops (and its last command is done)."""

    def __init__(self, worker: Worker) -> None:
        super().__init__(name="shellq-control", daemon=True)
        self.worker = worker
        self.settings = worker.settings
        self.store = worker.store

    def run(self) -> None:
        w, s = self.worker, self.settings
        started = int(time.time() * 1000) - 5000  # shutdowns older than this worker are history
        last = "0"  # the whole (capped) control history: interrupts of queued commands count
        next_trim = time.monotonic() + s.janitor_every
        while not w.stopping.is_set() or w.running:
            try:
                w.renewed(self.store.beat(w.heartbeat_fields()))
                block = int(s.heartbeat * 1000)
                k = self.store.keys
                reply: Any = self.store.redis.call(
                    "XREAD", "BLOCK", block, "STREAMS", k.ctl, k.wake, last, self.store.wake_seen
                )
                for last, fields in self.store.woken(reply):
                    self._on_message(fields or {}, fresh=int(last.split("-")[0]) >= started)
                if time.monotonic() >= next_trim:
                    next_trim = time.monotonic() + s.janitor_every
                    self.store.trim()
            except RedisUnavailableError:
                time.sleep(min(1.0, s.heartbeat))  # the loop logs the outage and reconnects
            except ShellqError as e:  # the loop meets the same problem and acts on it
                log.warning("control thread: %s", e)
                time.sleep(s.heartbeat)

    def _on_message(self, fields: dict[bytes, bytes], fresh: bool) -> None:
        try:
            msg = protocol.decode(ControlRequest, fields)
        except DecodeError as e:
            log.warning("ignored control message: %s", e)
            return
        if msg.op == "shutdown" and fresh:
            log.info("shutdown requested on the control stream")
            self.worker.stop()
        elif msg.op == "interrupt" and msg.id:
            self.worker.interrupt(msg.id)
