"""The producer side of shellq: the client library agents use (and, in `cli.py`, the `shellq` command)."""

from producer.client import Client, ClientSettings, Session
from producer.result import Result
from worker.errors import (
    ConfigError,
    InvalidRequestError,
    NoWorkerError,
    QueueFullError,
    RedisUnavailableError,
    ResultTimeoutError,
    SessionStateLostError,
    ShellqError,
)

__all__ = [
    "Client",
    "ClientSettings",
    "ConfigError",
    "InvalidRequestError",
    "NoWorkerError",
    "QueueFullError",
    "RedisUnavailableError",
    "Result",
    "ResultTimeoutError",
    "Session",
    "SessionStateLostError",
    "ShellqError",
]
