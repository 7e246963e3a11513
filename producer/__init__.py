"""The producer side of shellq: the client library agents use (and, in `cli.py`, the `shellq` command)."""

from producer.client import Client, ClientSettings, Session
from producer.result import Chunk, Result
from worker.errors import (
    AccessDeniedError,
    ConfigError,
    InvalidRequestError,
    InvalidResultError,
    NoWorkerError,
    QueueFullError,
    RedisUnavailableError,
    ResultTimeoutError,
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
    "InvalidRequestError",
    "InvalidResultError",
    "NoWorkerError",
    "QueueFullError",
    "RedisUnavailableError",
    "Result",
    "ResultTimeoutError",
    "Session",
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
