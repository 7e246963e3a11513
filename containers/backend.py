"""The seam between shellq and where a session's worker runs: the local and Docker backends implement it."""

from __future__ import annotations

from typing import Protocol


class Backend(Protocol):
    """Starts and stops the worker of a session."""

    name: str
    """How `meta.backend` names it: `local` or `docker`."""

    def start(self, session: str) -> str:
        """Start the session's worker and return once its heartbeat is seen; returns the worker's handle (a pid or
        a container id). Raises SessionStartError with the worker's last log lines when it does not come up."""
        ...

    def stop(self, session: str, timeout: float = 10.0) -> bool:
        """Stop the session's worker (idempotent); returns whether one was running."""
        ...
