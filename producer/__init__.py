"""The producer side of shellq: the client library agents use (and, in `cli.py`, the `shellq` command).

The client and its models are imported when first asked for (`from producer import Client` works as ever): a
module of this package (`shellq exec`'s fast path, producer/cli_fast.py) must not pay for redis-py and pydantic."""

from worker.errors import (
    AccessDeniedError,
    ConfigError,
    FileTooLargeError,
    InvalidRequestError,
    InvalidResultError,
    NoWorkerError,
    QueueFullError,
    RedisRefusedError,
    RedisTimeoutError,
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

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; mypy treats the name as true
if TYPE_CHECKING:
    from producer.aio import AsyncClient, AsyncSession
    from producer.client import Client, ClientSettings, Session
    from producer.result import Chunk, FileInfo, Result

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
    "RedisRefusedError",
    "RedisTimeoutError",
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

_LAZY = {
    "Client": "client",
    "ClientSettings": "client",
    "Session": "client",
    "Chunk": "result",
    "FileInfo": "result",
    "Result": "result",
    "AsyncClient": "aio",
    "AsyncSession": "aio",
}
"""Public name -> the module of this package that defines it, imported on first use."""


def __getattr__(name: str) -> object:
    """The client (producer/client.py), its results (producer/result.py) and the async twin (producer/aio.py),
    imported when first asked for."""
    if name not in _LAZY:
        raise AttributeError(f"module 'producer' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f"producer.{_LAZY[name]}"), name)
    globals()[name] = value  # asked once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
