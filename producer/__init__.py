"""The producer side of shellq: the client library agents use (and, in `cli.py`, the `shellq` command)."""

from producer.client import Client, ClientSettings, Session
from producer.result import Result
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
