"""The `shellq` console script: `shellq exec S [options] -- CMD` on a fast path, everything else in producer/cli.py.

producer/cli.py imports redis-py and pydantic (~250 ms) before it sends a byte, and a script that calls `shellq
exec` in a loop pays that every time. This path imports the standard library and the worker's own RESP client
(worker/resp.py; msgpack too with --env), sends what `Session.run` sends (FCALL shellq_submit pipelined with a
blocking XREAD of the result stream and the command's journal, then XREAD + journal until the result; the worker's
liveness checked as `_wait` does; a wait that gives up cancels the command as `_give_up` does, with producer/core.py's
own messages) and prints what cli.py prints (the same output bytes, `--json` view, exit status and error lines).

It takes `exec` with `--timeout`, `--json`, `--env`, `--cwd` and `--id`, on a redis:// or unix:// URL without
options. Anything else goes to producer/cli.py with the same arguments: other verbs and options, no Redis URL,
unknown or invalid SHELLQ_* settings, a command over the inline limit; and, on the way, a Redis that cannot be
reached or refuses the credentials, functions to load, a reply or result entry it does not expect. Before the
command was submitted that is the same command line; after it, the same plus `--id` of the submitted command, so
that it never runs twice. tests/test_cli_fast.py holds the two paths to the same wire bytes and output."""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (2 ms); mypy treats the name as true
if TYPE_CHECKING:
    from producer.fast_run import Shown

EXIT_TIMEOUT, EXIT_SHELLQ, EXIT_CANCELLED = 124, 125, 130
EXIT_STARTED = 75
"""The command started but the wait ended before its result (its worker went away): it may have run, or still run."""

# What producer/client.py, producer/files.py, worker/protocol.py and containers/embedded.py say, copied so as not to
# import them; tests/test_cli_fast.py checks each copy against its original.
INLINE = 512 << 10
MAX_ENTRY_BYTES = 1 << 20
_WORD = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
"""Characters of ids and variable names; checked without `re` (its import is 5 ms of a 30 ms start)."""


def valid_id(text: str) -> bool:
    """worker/protocol.py ID_PATTERN, `^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\\Z`."""
    return 0 < len(text) <= 64 and text[0] not in "_-" and set(text) <= _WORD | {"-"}


def is_entry_id(text: str) -> bool:
    """worker/protocol.py is_entry_id, `^\\d+-\\d+\\Z` on ASCII digits."""
    ms, sep, seq = text.partition("-")
    return bool(sep) and all(part.isascii() and part.isdigit() for part in (ms, seq))


def valid_env_name(text: str) -> bool:
    """worker/protocol.py's rule for variable names, `^[A-Za-z_][A-Za-z0-9_]*\\Z`."""
    return bool(text) and not text[0].isdigit() and set(text) <= _WORD


ENV_NAMES = frozenset(
    f"SHELLQ_{name}"
    for name in [
        *("REDIS_URL", "SESSION", "REDIS_PASSWORD_FILE", "DEFAULT_TIMEOUT", "MAX_TIMEOUT", "HEARTBEAT"),
        *("SHUTDOWN_GRACE", "KILL_GRACE", "OUTPUT_CAP", "SPOOL_QUOTA", "WORK_DIR", "RESULTS_MAXLEN"),
        *("JOURNAL_TTL", "BLOCK_MS", "NO_WORKER_AFTER", "HOME", "LEASE_TTL", "QUEUE_CAP", "RESULTS_MAX_AGE"),
        *("JANITOR_EVERY", "REQUIRE_DURABLE", "FAULT", "FAULT_AFTER", "RETRY_FOR", "INSTANCE", "SHELL_USER"),
        *("LIVE_OUTPUT", "LIVE_MAXLEN", "LIVE_RATE", "LIVE_TTL", "ROOT_COMMANDS", "CLIENT_NAME"),
    ]
)
CLIENT_NUMBERS: dict[str, tuple[type, float, float, bool]] = {
    "no_worker_after": (float, 10.0, 0, False),
    "default_timeout": (float, 300.0, 0, False),
    "journal_ttl": (int, 7 * 86400, 1, True),
    "queue_cap": (int, 1000, 1, True),
    "retry_for": (float, 10.0, 0, True),
}
"""ClientSettings' numbers: type, default, lower bound, whether the bound itself is allowed."""
CLIENT_MAXIMUMS = {"journal_ttl": 10 * 365 * 86400}
"""ClientSettings' upper bounds (worker/protocol.py JOURNAL_TTL_MAX)."""
SERVER_INFO = frozenset({"url", "port", "pid", "data_dir", "binary", "log"})
"""The fields of containers/embedded.py's record of the `shellq up` server."""
VALUED = frozenset({"--timeout", "--env", "--cwd", "--id"})


def main(argv: list[str] | None = None) -> int:
    from worker.resp import claim_std_fds

    claim_std_fds()  # a closed stdout must not become the Redis socket, which the command's output would then reach
    argv = sys.argv[1:] if argv is None else argv
    args = parse_exec(argv)
    if args is None:
        return full(argv)
    try:
        return run_exec(argv, args)
    except KeyboardInterrupt:  # a second Ctrl-C, while the first one's interrupt is sent
        print("shellq: interrupted", file=sys.stderr)
        return EXIT_CANCELLED


def full(argv: list[str]) -> int:
    """producer/cli.py: every verb and option, at the cost of importing redis-py and pydantic."""
    from producer.cli import main as full_main

    return full_main(argv)


class ExecArgs:
    """`shellq exec` as the fast path takes it."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.command: list[str] = []
        self.timeout: float | None = None
        self.json = False
        self.env: list[str] = []
        self.cwd: str | None = None
        self.id: str | None = None

    def take(self, option: str, value: str) -> bool:
        if option == "--timeout":
            try:
                self.timeout = float(value)  # as argparse's type=float reads it
            except ValueError:
                return False
            return self.timeout > 0 and self.timeout - self.timeout == 0  # not inf or nan: the full path says
        if option == "--env":
            self.env.append(value)
        elif option == "--cwd":
            self.cwd = value
        else:
            self.id = value
        return True


def parse_exec(argv: list[str]) -> ExecArgs | None:
    """`exec S [--timeout T] [--json] [--env K=V]... [--cwd DIR] [--id ID] -- CMD...` read as producer/cli.py's
    argparse reads it (options before `--` in any order, `--opt=value` too, the last one winning); None for any
    other form (an unknown or abbreviated option, a value that starts with `-`, command words before `--`)."""
    if argv[:1] != ["exec"] or "--" not in argv:
        return None
    cut = argv.index("--")
    args, words = ExecArgs(), iter(argv[1:cut])
    args.command = argv[cut + 1 :]
    for word in words:
        option, eq, value = word.partition("=")
        if word == "--json":
            args.json = True
        elif option in VALUED:
            value = value if eq else next(words, "-")
            if (not eq and value.startswith("-")) or not args.take(option, value):
                return None
        elif word.startswith("-") or args.name is not None:
            return None
        else:
            args.name = word
    return args if args.name is not None and args.command else None


def run_exec(argv: list[str], args: ExecArgs) -> int:
    """Run the command on the fast path, or hand it to producer/cli.py (see the module's docstring)."""
    located, settings = redis_url(os.environ), client_settings(os.environ)
    if located is None or settings is None or not plain_url(located[0]):
        return full(argv)
    url, said = located
    cid = args.id or f"c-{os.urandom(8).hex()}"  # producer/core.py new_id (secrets.token_hex(8))
    fields = request_fields(args, cid, str(settings["client_name"]))
    if fields is None or args.name is None or not valid_id(args.name):
        return full(argv)
    if said:
        print(said, file=sys.stderr)
    from producer.fast_run import Run
    from worker.errors import RedisTimeoutError

    run = Run(url, args.name, cid, settings, fields)
    try:
        outcome = run.wait_for_result(args.timeout)
    except KeyboardInterrupt:  # Ctrl-C stops the command too, as in a terminal
        return run.interrupt()
    except RedisTimeoutError as e:  # a Redis that answers nothing: the full path would wait as long again
        return run.unanswered(e)
    except Exception:  # what the fast path does not expect: the full path takes over, and says what it is
        outcome = None
    finally:
        run.r.close()
    if outcome is None:
        if said:  # said once already
            os.environ["SHELLQ_REDIS_URL"] = url
        return full([*argv[: argv.index("--")], "--id", cid, *argv[argv.index("--") :]] if run.submitted else argv)
    if isinstance(outcome, int):
        return outcome
    return show(outcome, args.json)


def redis_url(environ: os._Environ[str] | dict[str, str]) -> tuple[str, str | None] | None:
    """producer/cli.py `redis_url()`: SHELLQ_REDIS_URL, else the URL `shellq up` recorded and the line that says so;
    None when there is neither (the full path says so)."""
    if url := environ.get("SHELLQ_REDIS_URL"):
        return url, None
    import json

    try:
        with open(os.path.join(state_dir(environ), "server.json"), "rb") as f:
            info = json.loads(f.read())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or set(info) != SERVER_INFO or not isinstance(info["url"], str):
        return None
    return info["url"], f"shellq: using the server of `shellq up` (127.0.0.1:{info['port']})"


def state_dir(environ: os._Environ[str] | dict[str, str]) -> str:
    """worker/settings.py `state_dir()`: SHELLQ_HOME, else $XDG_STATE_HOME/shellq, else ~/.local/state/shellq."""
    if home := environ.get("SHELLQ_HOME"):
        return home
    from pathlib import Path

    base = environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return str(Path(base) / "shellq")


def client_settings(environ: os._Environ[str] | dict[str, str]) -> dict[str, float | int | str] | None:
    """ClientSettings.from_env(), for plain values; None for an unknown SHELLQ_* name (the full path warns about
    it) or a value it would not take as it is (the full path reads it, or says why not)."""
    if any(name.startswith("SHELLQ_") and name not in ENV_NAMES for name in environ):
        return None
    settings: dict[str, float | int | str] = {}
    for name, (kind, default, low, inclusive) in CLIENT_NUMBERS.items():
        raw = environ.get(f"SHELLQ_{name.upper()}")
        if not raw:
            settings[name] = default if kind is float else int(default)
            continue
        digits = raw.replace(".", "", 1) if kind is float else raw
        if not (digits.isascii() and digits.isdigit()):
            return None
        value = kind(raw)
        if value < low or (value == low and not inclusive) or value > CLIENT_MAXIMUMS.get(name, value):
            return None
        settings[name] = value
    name = environ.get("SHELLQ_CLIENT_NAME") or default_client_name()
    if len(name) > 200:
        return None
    settings["client_name"] = name
    return settings


def default_client_name() -> str:
    """producer/client.py `_default_name()`: user@host (the node name: socket.gethostname() is uname's, and `import
    socket` costs this path 7 ms)."""
    user = next(filter(None, map(os.environ.get, ("LOGNAME", "USER", "LNAME", "USERNAME"))), None)
    if user is None:  # getpass.getuser() looks there first, then in the password database
        import getpass

        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = str(os.getuid())
    return f"{user}@{os.uname().nodename}"


def plain_url(url: str) -> bool:
    """A URL that worker/resp.py reads as redis-py does: redis:// or unix://, no options; a username only with a
    password. (rediss:// and options are the full path's.)"""
    from worker.resp import split_url  # urllib.parse's reading, without importing it for a plain URL

    if "?" in url or "#" in url or not url.startswith(("redis://", "unix://")):  # redis-py takes these in lower case
        return False
    try:
        parts = split_url(url)
    except ValueError:
        return False
    if parts.scheme not in ("redis", "unix"):
        return False
    if parts.username and not parts.password:
        return False
    db = parts.path.strip("/") if parts.scheme == "redis" else ""
    return db == "" or (db.isascii() and db.isdigit())


def request_fields(args: ExecArgs, cid: str, client_name: str) -> list[bytes] | None:
    """The field-value pairs of the command entry, as `protocol.encode(core.request(...))` plus `by` makes them
    (producer/core.py `submit_call`); None when the full path must judge them (a bad id, env or cwd, a command over
    the inline limit, text that is not UTF-8)."""
    if not valid_id(cid) or is_entry_id(cid):
        return None
    env: dict[str, str] = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not valid_env_name(key):
            return None
        env[key] = value
    try:
        body = " ".join(args.command).encode()
        fields = [b"v", b"1", b"op", b"exec", b"id", cid.encode(), b"cmd", body]
        if args.timeout is not None:
            fields += [b"timeout", str(args.timeout).encode()]
        if env:
            import msgpack

            fields += [b"env", msgpack.packb(env, unicode_errors="surrogateescape")]
        if args.cwd is not None:
            fields += [b"cwd", args.cwd.encode(errors="surrogateescape")]
        fields += [b"idempotent", b"0", b"merge_stderr", b"0", b"offset", b"0", b"recursive", b"0"]
        fields += [b"by", client_name.encode()]
    except UnicodeError:
        return None
    if len(body) > INLINE or sum(map(len, fields)) > MAX_ENTRY_BYTES:
        return None
    return fields


def show(outcome: Shown, as_json: bool) -> int:
    """Print a result as producer/cli.py `cmd_exec` does; its exit status."""
    view, out, err = outcome
    try:
        if as_json:
            print(json_text(outcome))
        else:
            os.write(1, out)
            os.write(2, err)
    except OSError as e:  # producer/cli.py `explain` of an OSError
        print(f"shellq: {f'{e.strerror or e}: {e.filename}' if e.filename else str(e.strerror or e)}", file=sys.stderr)
        return EXIT_SHELLQ
    exit_code, error = view["exit_code"], view["error"]
    return exit_status(
        str(view["id"]),
        str(view["status"]),
        exit_code if isinstance(exit_code, int) else None,
        error if isinstance(error, str) else None,
    )


def json_text(shown: Shown) -> str:
    """`shellq exec --json`: producer/cli.py `_json_view` of the Result, with the output in base64 too."""
    import binascii
    import json

    view, out, err = shown
    b64 = {"stdout_b64": binascii.b2a_base64(out, newline=False), "stderr_b64": binascii.b2a_base64(err, newline=False)}
    return json.dumps(view | {name: value.decode() for name, value in b64.items()})


def exit_status(cid: str, status: str, exit_code: int | None, error: str | None) -> int:
    """`shellq exec`'s exit status for a result: the command's own; 124 timeout, 130 cancelled (saying why on
    stderr when the result does: cancelled before it started); otherwise 125, with what happened on stderr."""
    if status in ("completed", "shell_exited") and exit_code is not None:
        return exit_code
    if status == "timeout":
        return EXIT_TIMEOUT
    if status == "cancelled":
        if error:
            print(f"shellq: command {cid} cancelled: {error}", file=sys.stderr)
        return EXIT_CANCELLED
    print(f"shellq: command {cid} {status}: {error or 'no exit status'}", file=sys.stderr)
    return EXIT_SHELLQ


if __name__ == "__main__":
    sys.exit(main())
