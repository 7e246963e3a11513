"""`python -m worker --redis-url URL --session S` (also `shellq worker`): serve one session until SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from types import FrameType

from worker import procs, resp
from worker.errors import RedisUnavailableError, ShellqError
from worker.loop import EXIT_CONFIG, EXIT_OK, EXIT_REDIS, Worker
from worker.settings import WorkerSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shellq worker", description=__doc__)
    parser.add_argument("--redis-url", help="Redis URL (default: SHELLQ_REDIS_URL)")
    parser.add_argument("--session", help="session id (default: SHELLQ_SESSION)")
    parser.add_argument("--max-commands", type=int, help="exit after this many commands")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    resp.claim_std_fds()  # before any pipe or socket: a closed stderr must not become one that logs are written to
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log = logging.getLogger("shellq.worker")
    procs.set_not_dumpable()  # the password file's contents and the environment stay out of the commands' reach
    worker: Worker | None = None

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if worker is None or not worker.leased:  # asked to stop before it served: leave whatever it waits for
            log.info("%s before serving: exiting", signal.Signals(signum).name)
            raise SystemExit(EXIT_OK)
        grace = worker.settings.shutdown_grace
        log.info("%s: stopping after the running command (grace %ss)", signal.Signals(signum).name, grace)
        worker.stop()

    # Before the shell starts: a handler (not SIG_IGN, which a parent that ran this in the background of a script
    # leaves) is what bash finds as SIG_DFL, so its interrupt trap works and stops a command's whole line.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        settings = WorkerSettings.from_env(redis_url=args.redis_url, session=args.session)
        worker = Worker(settings)
    except ShellqError as e:
        log.error("%s", e)
        return EXIT_CONFIG
    try:
        return worker.serve(max_commands=args.max_commands)
    except RedisUnavailableError as e:
        log.error("cannot reach Redis at %s: %s", settings.redis_url, e)
        return EXIT_REDIS


if __name__ == "__main__":
    sys.exit(main())
