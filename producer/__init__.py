"""The producer side of shellq: the client library agents use (and, in `cli.py`, the `shellq` command)."""

from producer.client import Client, ClientSettings, Session
from producer.result import Chunk, FileInfo, Result
from worker.errors import (
    AccessDeniedError,
    ConfigError,
    FileTooLargeError,
    InvalidRequestError,
    InvalidResultError,
    NoWorkerError,
    QueueFullError,
    RedisUnavailableError,
    ResultTimeoutError,
    SessionFileError,
    SessionFileNotFoundError,
    SessionIsADirectoryError,
    SessionNotADirectoryError,
    SessionPermissionError,
    SessionStateLostError,
    ShellqError,
    WaitError,
)

__all__ = [
    "AccessDeniedError",
    "AsyncClient",
    "AsyncSession",
    "Chunk",
    "Client",
    "ClientSettings",
    "ConfigError",
    "FileInfo",
    "FileTooLargeError",
    "InvalidRequestError",
    "InvalidResultError",
    "NoWorkerError",
    "QueueFullError",
    "RedisUnavailableError",
    "Result",
    "ResultTimeoutError",
    "Session",
    "SessionFileError",
    "SessionFileNotFoundError",
    "SessionIsADirectoryError",
    "SessionNotADirectoryError",
    "SessionPermissionError",
    "SessionStateLostError",
    "ShellqError",
    "WaitError",
]


def __getattr__(name: str) -> object:
    """AsyncClient and AsyncSession (producer/aio.py), imported when first asked for."""
    if name in ("AsyncClient", "AsyncSession"):
        from producer import aio

        return getattr(aio, name)
    raise AttributeError(f"module 'producer' has no attribute {name!r}")
