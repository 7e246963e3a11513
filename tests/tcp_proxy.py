"""A loopback TCP proxy a test controls: forward 127.0.0.1:<free port> to a local Redis, cut every connection at will.

    with TcpProxy(redis_port) as proxy:
        worker_url = proxy.url          # the worker dials Redis through the proxy
        proxy.cut()                     # every current connection is reset; new ones are accepted as before
        proxy.muted.set()               # Redis's replies are dropped from now on (requests still reach it)

Loopback only: it listens on and forwards to 127.0.0.1, nothing else.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading

LOOPBACK = "127.0.0.1"


class TcpProxy:
    """Forwards every connection made to `port` to `LOOPBACK:target_port`, one thread per connection pair."""

    def __init__(self, target_port: int, password: str | None = None) -> None:
        self.target_port = target_port
        self.password = password
        self._listener = socket.create_server((LOOPBACK, 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: list[_Pair] = []
        self._closed = threading.Event()
        self.accepted = 0
        """Connections accepted so far (reconnections show up here)."""
        self.muted = threading.Event()
        """While set, what Redis sends is dropped: a request reaches it and its reply is lost on the way."""
        self._thread = threading.Thread(target=self._accept_loop, name=f"tcp-proxy-{self.port}", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """A Redis URL (db 0) that goes through the proxy."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{LOOPBACK}:{self.port}/0"

    def connections(self) -> int:
        """How many forwarded connections are open now."""
        with self._lock:
            return sum(1 for pair in self._pairs if pair.thread.is_alive())

    def upstream_ports(self) -> set[int]:
        """Local ports of the open connections to the target: how the target (CLIENT LIST `addr`) sees them."""
        ports = set()
        with self._lock:
            for pair in self._pairs:
                try:
                    ports.add(pair.upstream.getsockname()[1])
                except OSError:
                    continue
        return ports

    def cut(self) -> int:
        """Reset every current connection (both peers see a connection reset); keep accepting new ones.
        Returns how many connections were cut; when it returns, they are all closed."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            pair.stop()
        for pair in pairs:
            pair.thread.join(timeout=5)
        return len(pairs)

    def close(self) -> None:
        """Stop listening and reset every connection."""
        self._closed.set()
        self._thread.join(timeout=5)
        self._listener.close()
        self.cut()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection((LOOPBACK, self.target_port), timeout=5)
            except OSError:
                _reset(client)
                continue
            pair = _Pair(client, upstream, self.muted)
            with self._lock:
                self._pairs = [p for p in self._pairs if p.thread.is_alive()]
                self._pairs.append(pair)
                self.accepted += 1
            pair.thread.start()


class _Pair:
    """One forwarded connection: the accepted socket, the socket to the target, the thread copying between them."""

    def __init__(self, client: socket.socket, upstream: socket.socket, muted: threading.Event) -> None:
        client.settimeout(None)
        upstream.settimeout(None)
        self.client, self.upstream, self.muted = client, upstream, muted
        self.thread = threading.Thread(target=self._pump, name="tcp-proxy-pump", daemon=True)

    def stop(self) -> None:
        """Wake the pump with a read shutdown (sends nothing); the pump then resets both sockets."""
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)

    def _pump(self) -> None:
        """Copy bytes both ways until either side closes or `stop()` is called; then reset both sockets."""
        peer = {self.client: self.upstream, self.upstream: self.client}
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(self.client, selectors.EVENT_READ)
                sel.register(self.upstream, selectors.EVENT_READ)
                while True:
                    for key, _ in sel.select():
                        src: socket.socket = key.fileobj  # type: ignore[assignment]
                        data = src.recv(65536)
                        if not data:
                            return
                        if not (src is self.upstream and self.muted.is_set()):
                            peer[src].sendall(data)
        except OSError:
            return
        finally:
            _reset(self.client)
            _reset(self.upstream)


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0, so the peer sees a connection reset rather than an orderly end."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()
