"""shellq's exceptions. A failed command is data (a `Result` with a status); these are for failures of shellq itself.

ShellqError
├── ConfigError(ShellqError, ValueError)        bad settings, ids or arguments
├── InvalidRequestError(ShellqError, ValueError) a command that breaks a limit (too large, bad timeout)
├── QueueFullError                               the session's queue is at its cap
├── RedisUnavailableError(ShellqError, ConnectionError)  Redis cannot be reached (after retries)
│   ├── RedisTimeoutError                        Redis accepted the connection but gave no reply in time
│   └── RedisRefusedError                        Redis answers but refuses commands for now (OOM, MISCONF, ...)
├── RedisReplyError                              Redis answered the worker's own client with an error
├── AccessDeniedError(ShellqError, PermissionError) this Redis user may not do that (another session's keys)
├── SessionStateLostError                        Redis came back without the session's consumer group
├── FencedError                                  a worker's lease was taken over: it may no longer take or commit
├── SessionFileError(ShellqError, OSError)       a file operation failed in the session (errno, filename)
│   ├── SessionFileNotFoundError(.., FileNotFoundError), SessionIsADirectoryError(.., IsADirectoryError),
│   ├── SessionNotADirectoryError(.., NotADirectoryError), SessionPermissionError(.., PermissionError)
│   └── FileTooLargeError                        over the size limit asked for
└── WaitError                                    a producer's wait for a result ended without one
    ├── NoWorkerError                            nobody is serving the session: no live heartbeat
    ├── ResultTimeoutError(WaitError, TimeoutError) the wait ran out of time
    └── InvalidResultError(WaitError, ValueError) the command's result entry cannot be read (hand-written, garbage)

A WaitError's `cancelled` says what became of the command waited for. True: it did not run and never will (no
worker had taken it, so the wait cancelled it and its result is `cancelled`; or it was never queued). False: a worker
had taken it (it is running or ran; its result comes when a worker commits it), or nothing was cancelled (an id the
session does not know, or a wait told not to cancel).
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
    """Redis could not be reached. `command_id`: the command a `run` or `submit` had sent, or may have (its reply was
    lost), before Redis went: it may still run, and `result(command_id)` tells once Redis answers; None otherwise."""

    command_id: str | None = None


class RedisTimeoutError(RedisUnavailableError):
    """Redis gave no reply within the client's read timeout (seconds; 10 by default): it accepted the connection and
    is stopped, overloaded or not Redis. Another attempt waits as long again."""


REFUSALS = ("OOM", "MISCONF", "READONLY", "LOADING", "BUSY", "MASTERDOWN", "NOREPLICAS", "UNBLOCKED")
"""Error replies by which a Redis that is up refuses commands until its state changes: at maxmemory with
`noeviction` (OOM), unable to write its AOF or RDB to disk (MISCONF), a replica (READONLY), loading its data
(LOADING), running a long script (BUSY), a replica cut off from its master or a master short of replicas; and the
end of a blocking read cut short by such a change (UNBLOCKED: a master turned replica, say)."""


class RedisRefusedError(RedisUnavailableError):
    """Redis answers, but refuses commands for now (one of REFUSALS: out of memory, a disk it cannot write...)."""


def is_refusal(message: str) -> bool:
    """Is this error reply's text one of REFUSALS (a state of the server, not a fault of the command)?"""
    return message.split(" ", 1)[0] in REFUSALS


class AccessDeniedError(ShellqError, PermissionError):
    """Redis refused a command to this client's user (NOPERM): a session's producer or worker user reaches its own
    session only."""


class RedisReplyError(ShellqError):
    """An error reply from Redis to the worker's client (the producer's client raises redis-py's own)."""


class SessionStateLostError(ShellqError):
    """The session's stream or consumer group is gone although the session was started: Redis lost its data."""


class FencedError(ShellqError):
    """This worker's lease on the session expired and another worker holds it: it may no longer take or commit."""


class WaitError(ShellqError):
    """A wait for a result ended without one; `cancelled`: the command had not started and never will (see above)."""

    def __init__(self, message: str, cancelled: bool = False) -> None:
        super().__init__(message)
        self.cancelled = cancelled


class NoWorkerError(WaitError):
    """No worker has a live heartbeat on the session, so a result would never come."""


class ResultTimeoutError(WaitError, TimeoutError):
    """No result within the time the caller was willing to wait; unless `cancelled`, the command may still run."""


class InvalidResultError(WaitError, ValueError):
    """A result entry for the command waited for cannot be decoded; the message names the stream and the entry."""


class SessionFileError(ShellqError, OSError):
    """A file operation failed in the session: `errno`, `strerror` and `filename` as the session's OS said them.
    The subclasses below are also the builtin types an agent expects (`except FileNotFoundError` catches one)."""


class SessionFileNotFoundError(SessionFileError, FileNotFoundError):
    """ENOENT: no such file or directory in the session."""


class SessionIsADirectoryError(SessionFileError, IsADirectoryError):
    """EISDIR: a directory where a file was expected."""


class SessionNotADirectoryError(SessionFileError, NotADirectoryError):
    """ENOTDIR: a file where a directory was expected."""


class SessionPermissionError(SessionFileError, PermissionError):
    """EACCES or EPERM: the session's user may not do that."""


class FileTooLargeError(SessionFileError):
    """EFBIG: the file or archive is larger than the limit asked for (the message says it)."""
