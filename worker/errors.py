"""shellq's exceptions. A failed command is data (a `Result` with a status); these are for failures of shellq itself.

ShellqError
├── ConfigError(ShellqError, ValueError)        bad settings, ids or arguments
├── InvalidRequestError(ShellqError, ValueError) a command that breaks a limit (too large, bad timeout)
├── QueueFullError                               the session's queue is at its cap
├── RedisUnavailableError(ShellqError, ConnectionError)  Redis cannot be reached (after retries)
├── RedisReplyError                              Redis answered the worker's own client with an error
├── SessionStateLostError                        Redis came back without the session's consumer group
├── NoWorkerError                                nobody is serving the session: no live heartbeat
└── ResultTimeoutError(ShellqError, TimeoutError) the wait for a result ran out (the command may still run)
"""

from __future__ import annotations


class ShellqError(Exception):
    """Base of every shellq exception."""


class ConfigError(ShellqError, ValueError):
    """A setting, id or argument is invalid."""


class InvalidRequestError(ShellqError, ValueError):
    """The command breaks a limit of the wire format."""


class QueueFullError(ShellqError):
    """The session already holds as many unfinished commands as its cap allows."""


class RedisUnavailableError(ShellqError, ConnectionError):
    """Redis could not be reached."""


class RedisReplyError(ShellqError):
    """An error reply from Redis to the worker's client (the producer's client raises redis-py's own)."""


class SessionStateLostError(ShellqError):
    """The session's stream or consumer group is gone although the session was started: Redis lost its data."""


class FencedError(ShellqError):
    """This worker's lease on the session expired and another worker holds it: it may no longer take or commit."""


class NoWorkerError(ShellqError):
    """No worker has a live heartbeat on the session, so a result would never come."""


class ResultTimeoutError(ShellqError, TimeoutError):
    """No result within the time the caller was willing to wait; the command may still be queued or running."""
