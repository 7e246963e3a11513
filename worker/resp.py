"""The worker's Redis client: RESP2 over a socket per thread, parsed by hiredis, no redis-py.

A worker sends a dozen kinds of command. redis-py 8 imports its asyncio client, cluster support and observability
code on `import redis` (19 MB of a worker's 43 and ~190 ms of its start), and its client layer costs ~80 µs a call
on the hot path; this module is the part of it a worker needs. URLs: `redis://[user:password@]host[:port][/db]`,
`rediss://` (TLS; `?ssl_cert_reqs=none` and `?ssl_ca_certs=PATH` as in redis-py) and `unix:///path[?db=N]`.

Every failure to reach Redis (refused, reset, closed, timed out) is a RedisUnavailableError; an error reply is a
RedisReplyError. After either kind of connection failure the socket is dropped and the next call connects again.
"""

from __future__ import annotations

import _socket
import os
import struct
from _thread import _local, allocate_lock

import hiredis

from worker.errors import (
    ConfigError,
    RedisRefusedError,
    RedisReplyError,
    RedisTimeoutError,
    RedisUnavailableError,
    is_refusal,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from collections.abc import Sequence
    from pathlib import Path
    from typing import Any, TypeAlias

    Command: TypeAlias = Sequence[Any]

# This module is on `shellq exec`'s start-up path (producer/cli_fast.py), where every import counts: `_socket` rather
# than `socket` (7 ms here: enum, selectors), plain URLs read without urllib.parse (9 ms), no contextlib (3 ms).


def claim_std_fds() -> None:
    """Open /dev/null on whichever of descriptors 0, 1 and 2 is closed, so that no socket takes that number: what this
    process (or a command's output it prints) writes to stdout or stderr must never go to Redis as commands. Called
    before a connection is made (by Redis() here, and by the CLI's entry points, whose redis-py client has none)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:  # the lowest free number: `fd` itself, unless a lower one was closed too (then taken)
                os.dup2(null, fd)
                os.close(null)


class Url:
    """A Redis URL's parts, as urllib.parse reads them (a plain class: typing.NamedTuple would import typing)."""

    __slots__ = ("hostname", "password", "path", "port", "query", "scheme", "username")

    def __init__(
        self,
        scheme: str,
        username: str | None,
        password: str | None,
        hostname: str | None,
        port: int | None,
        path: str,
        query: dict[str, str],
    ) -> None:
        self.scheme, self.username, self.password = scheme, username, password
        self.hostname, self.port, self.path = hostname, port, path
        self.query = query
        """The last value of each parameter."""


def split_url(url: str) -> Url:
    """`scheme://[user[:password]@]host[:port][/path]` split as urllib.parse's urlsplit, unquote and parse_qs split
    it (hostname lowercased; ValueError for a bad port); a URL with a query, a %-escape, a fragment, brackets or a
    backslash goes to urllib.parse itself."""
    scheme, sep, rest = url.partition("://")
    if not sep or any(c in url for c in "%?#[]\\") or not scheme.isalpha():
        return _split_with_urllib(url)
    netloc, slash, path = rest.partition("/")
    userinfo, at, hostport = netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    host, colon_port, port = hostport.rpartition(":") if ":" in hostport else (hostport, "", "")
    if colon_port and not (port.isascii() and port.isdigit() and int(port) <= 65535):
        if port:
            raise ValueError(f"Port could not be cast to integer value as {port!r}")
        port = ""
    return Url(
        scheme.lower(),
        user if at else None,
        password if colon else None,
        host.lower() or None,
        int(port) if port else None,
        slash + path,
        {},
    )


def _split_with_urllib(url: str) -> Url:
    from urllib.parse import parse_qs, unquote, urlsplit

    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    user = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return Url(parts.scheme, user, password, parts.hostname, parts.port, parts.path, query)


class Redis:
    """One connection per thread that uses it, made on first use; `close()` closes them all."""

    def __init__(
        self,
        url: str,
        *,
        password_file: Path | None = None,
        name: str | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
    ) -> None:
        claim_std_fds()
        parts = split_url(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ConfigError(f"unsupported Redis URL scheme {parts.scheme!r} (redis://, rediss:// or unix://)")
        query = parts.query
        self.url = url
        self._tls = parts.scheme == "rediss"
        self._query = query
        self._address: str | tuple[str, int] = (
            parts.path if parts.scheme == "unix" else (parts.hostname or "localhost", parts.port or 6379)
        )
        db = query.get("db") or (parts.path.strip("/") if parts.scheme != "unix" else "") or "0"
        if not db.isdigit():
            raise ConfigError(f"invalid database number {db!r} in the Redis URL")
        self._db = int(db)
        self._user = parts.username or None
        self._password = parts.password or None
        self._password_file = password_file
        self._name = name
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._local = _local()
        self._lock = allocate_lock()
        self._open: set[_Connection] = set()

    def _read_password(self, conn: _Connection) -> str:
        """The password, read from its file at each connect (not kept in memory between connects)."""
        assert self._password_file is not None
        try:
            return self._password_file.read_text().strip()
        except OSError as e:
            conn.close()
            raise ConfigError(f"cannot read the Redis password file {self._password_file}: {e.strerror}") from None

    def call(self, *args: Any) -> Any:
        """Send one command and return its reply."""
        return self.pipeline(args)[0]

    def pipeline(self, *commands: Command) -> list[Any]:
        """Send `commands` in one write and return their replies; the first error reply is raised once all are read."""
        conn = self._connection()
        try:
            replies = conn.roundtrip(commands)
        except (OSError, hiredis.ProtocolError) as e:
            self._drop(conn)
            raise self._unavailable(e) from None
        for reply in replies:
            if isinstance(reply, RedisReplyError):
                if is_refusal(str(reply)):
                    raise RedisRefusedError(f"Redis refuses commands now: {reply}")
                raise reply
        return replies

    def _unavailable(self, e: Exception, step: str = "") -> RedisUnavailableError:
        """What went wrong with a connection, as shellq's error: the kernel's receive timeout surfaces as EAGAIN."""
        if isinstance(e, (BlockingIOError, TimeoutError)):
            silent = f"no reply within {self._timeout:g}s (the server accepted the connection but does not answer)"
            return RedisTimeoutError(step + silent)
        return RedisUnavailableError(step + (f"{type(e).__name__}: {e}" if str(e) else type(e).__name__))

    def close(self) -> None:
        with self._lock:
            conns, self._open = self._open, set()
        for conn in conns:
            conn.close()

    def release(self) -> None:
        """Close the calling thread's connection (a thread that is done with Redis; `close` may have run already)."""
        conn: _Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            self._local.conn = None
            with self._lock:
                self._open.discard(conn)
            conn.close()

    def _connection(self) -> _Connection:
        conn: _Connection | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed:
            conn = _Connection(self._connect())
            handshake: list[Command] = []
            password = self._password if self._password_file is None else self._read_password(conn)
            if password is not None:
                handshake.append(("AUTH", self._user, password) if self._user else ("AUTH", password))
            del password
            if self._name:
                handshake.append(("CLIENT", "SETNAME", self._name))
            if self._db:
                handshake.append(("SELECT", self._db))
            try:
                refused = [r for r in conn.roundtrip(handshake) if isinstance(r, RedisReplyError)]
            except OSError as e:
                conn.close()
                raise self._unavailable(e, "connection setup failed: ") from None
            if refused:
                conn.close()
                if is_refusal(str(refused[0])):  # BUSY with a long script, LOADING: the server's state, not ours
                    raise RedisRefusedError(f"Redis refuses commands now: {refused[0]}")
                raise ConfigError(f"Redis refused the connection setup: {refused[0]}")
            self._local.conn = conn
            with self._lock:
                self._open.add(conn)
        return conn

    def _connect(self) -> _socket.socket:
        where = self._address if isinstance(self._address, str) else "{}:{}".format(*self._address)
        try:
            if isinstance(self._address, str):
                sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
                sock.settimeout(self._connect_timeout)
                sock.connect(self._address)
            else:
                sock = _tcp(*self._address, self._connect_timeout)
                sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
                sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_KEEPALIVE, 1)
            if self._tls:
                sock = self._wrap_tls(sock)
        except OSError as e:
            raise RedisUnavailableError(f"Error {e.errno} connecting to {where}. {e.strerror or e}") from None
        if self._tls:
            sock.settimeout(self._timeout)
        else:  # the kernel's timeout: a Python one polls before every send and receive (3 more syscalls a command)
            sock.settimeout(None)
            limit = struct.pack("ll", int(self._timeout), int(self._timeout % 1 * 1e6))
            sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVTIMEO, limit)
            sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDTIMEO, limit)
        return sock

    def _wrap_tls(self, raw: _socket.socket) -> socket.socket:
        import socket  # only for rediss://, as ssl: 2 MB and 15 ms otherwise spent at every worker start
        import ssl

        sock = socket.socket(fileno=raw.detach())
        sock.settimeout(self._connect_timeout)  # the handshake's limit (the new socket object has none)

        context = ssl.create_default_context(cafile=self._query.get("ssl_ca_certs"))
        if self._query.get("ssl_cert_reqs", "required") == "none":
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        host = self._address[0] if isinstance(self._address, tuple) else None
        try:
            return context.wrap_socket(sock, server_hostname=host)
        except TimeoutError:  # a plain Redis takes the ClientHello for the start of a command and never answers
            sock.close()
            if isinstance(self._address, tuple) and _answers_plain_resp(*self._address, self._connect_timeout):
                where = "{}:{}".format(*self._address)
                hint = "use a redis:// URL for it, not rediss://"
                raise ConfigError(f"Redis at {where} does not speak TLS: {hint}") from None
            raise

    def _drop(self, conn: _Connection) -> None:
        conn.close()
        with self._lock:
            self._open.discard(conn)


def _tcp(host: str, port: int, timeout: float) -> _socket.socket:
    """socket.create_connection: each address of `host` in turn until one connects. The host goes to getaddrinfo
    as bytes when it is ASCII (a str would load the IDNA codec)."""
    error: OSError | None = None
    name = host.encode() if host.isascii() else host
    for family, kind, proto, _, address in _socket.getaddrinfo(name, port, 0, _socket.SOCK_STREAM):
        sock = _socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(address)
            return sock
        except OSError as e:
            sock.close()
            error = e
    raise error or OSError(f"getaddrinfo found no address for {host}")


def _answers_plain_resp(host: str, port: int, timeout: float) -> bool:
    """Does HOST:PORT answer a plain-text PING as Redis does (`+PONG`, or an error such as `-NOAUTH`)?"""
    try:
        probe = _tcp(host, port, timeout)
    except OSError:
        return False
    try:
        probe.sendall(b"PING\r\n")
        return probe.recv(1) in (b"+", b"-")
    except OSError:
        return False
    finally:
        probe.close()


class _Connection:
    """A socket and its reply parser."""

    def __init__(self, sock: _socket.socket | socket.socket) -> None:
        self.sock = sock
        self.reader = hiredis.Reader(replyError=RedisReplyError)
        self.closed = False

    def roundtrip(self, commands: Sequence[Command]) -> list[Any]:
        if not commands:
            return []
        self.sock.sendall(b"".join(hiredis.pack_command(tuple(c)) for c in commands))
        replies = []
        for _ in commands:
            reply = self.reader.gets()
            while reply is False:
                data = self.sock.recv(1 << 16)
                if not data:
                    raise ConnectionResetError("Redis closed the connection")
                self.reader.feed(data)
                reply = self.reader.gets()
            replies.append(reply)
        return replies

    def close(self) -> None:
        self.closed = True
        try:  # noqa: SIM105 - no contextlib on `shellq exec`'s start-up path
            self.sock.close()
        except OSError:
            pass
