"""Run every benchmark in one go and write docs/benchmarks.md, bench/results/*.json and a PNG chart.

    make bench        (the bench environment, Docker engine and images are set up by scripts/bench)

Each benchmark is its own script in bench/ (they print their method and raw numbers); this one runs them in
sequence on an otherwise idle machine, keeps their output verbatim, sums the `true` round trips up in a chart, and
puts the project's targets against this run's numbers (from the scripts' JSON) in a table first.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DOC = HERE.parent / "docs" / "benchmarks.md"

RUNS = [
    ("The CLI: `shellq exec S -- true`", ["cli.py", "--json", "RESULTS/cli.json"]),
    (
        "Round trip of `true`, AOF everysec",
        ["roundtrip.py", "--runs", "3000", "--json", "RESULTS/roundtrip-everysec.json"],
    ),
    (
        "Round trip of `true`, AOF always",
        ["roundtrip.py", "--runs", "1000", "--appendfsync", "always", "--json", "RESULTS/roundtrip-always.json"],
    ),
    ("Against the alternatives", ["peers.py", "--json", "RESULTS/peers.json"]),
    ("Containers: cold start and per command", ["containers.py", "--json", "RESULTS/containers.json"]),
    ("Agent trajectory (~50 commands)", ["trajectory.py", "--json", "RESULTS/trajectory.json"]),
    ("Where a round trip goes", ["breakdown.py", "--json", "RESULTS/breakdown.json"]),
    ("Throughput", ["throughput.py", "--seconds", "8", "--json", "RESULTS/throughput.json"]),
    ("Cost per session", ["costs.py", "--json", "RESULTS/costs.json"]),
    ("Many sessions at once", ["run_many.py", "--json", "RESULTS/run_many.json"]),
    ("Live output", ["live.py", "--json", "RESULTS/live.json"]),
    ("Through the manager (RQ)", ["manager.py", "--json", "RESULTS/manager.json"]),
    ("Files and stdin", ["files.py", "--json", "RESULTS/files.json"]),
]
PEERS = [  # the docker-exec-based peers and SWE-ReX: shellq is to be >= 100x faster than each
    "docker exec (CLI)",
    "docker SDK exec_run",
    "mini-swe-agent",
    "autogen docker",
    "swe-rex local",
    "swe-rex docker",
]


def run(args: list[str]) -> str:
    cmd = [sys.executable, str(HERE / args[0]), *(a.replace("RESULTS", str(RESULTS)) for a in args[1:])]
    print("$", " ".join(cmd[1:]), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    out = "\n".join(line for line in done.stdout.splitlines() if not line.startswith("raw "))
    if done.returncode != 0:
        out += f"\n(exit {done.returncode})\n" + done.stderr[-2000:]
    print(out, flush=True)
    return out


def chart(peers: Path, png: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    results = json.loads(peers.read_text())["results"]
    names = list(results)
    values = [results[n]["true"]["p50"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.barh(names[::-1], values[::-1], color=["#2a7" if n.startswith("shellq") else "#888" for n in names[::-1]])
    ax.set_xscale("log")
    ax.set_xlabel("median round trip of `true`, ms (log scale)")
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in values[::-1]], padding=3, fontsize=8)
    ax.set_title("Per-command round trip, same machine, same run")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    return True


def read_results(results: Path, since: float) -> dict[str, Any]:
    """Every JSON file in `results` written since `since` (by this run), by name without .json."""
    return {p.stem: json.loads(p.read_text()) for p in results.glob("*.json") if p.stat().st_mtime >= since}


def ms(x: float) -> str:
    return f"{x:.2f} ms" if x < 10 else f"{x:.0f} ms"


def mib(kb: float) -> str:
    return f"{kb / 1024:.1f} MiB"


def aof(doc: dict[str, Any]) -> str:
    """The Redis persistence mode of a script's run (peers.py names none: it always runs AOF everysec)."""
    return f"AOF {doc['meta'].get('aof', 'everysec')}"


def summaries(r: dict[str, Any], mode: str) -> dict[str, Any]:
    """roundtrip.py's summaries (p50, p99, ...) by what was measured ("shellq", "pipe bash", "stream echo")."""
    doc = r[f"roundtrip-{mode}"]
    return dict(doc.get("results") or doc["summary"])


def cli(r: dict[str, Any]) -> tuple[str, bool]:
    """Judged on the console script as `pip install shellq` installs it (a wheel) when the run measured that, else
    on this checkout's editable install (whose finder costs every Python start here ~11 ms)."""
    res = r["cli"]["results"]
    docker = res["docker exec"]["p50"]
    judged = "shellq exec, wheel" if "shellq exec, wheel" in res else "shellq exec"
    shown = [name for name in ("shellq exec, wheel", "shellq exec", "docker exec", "redis-cli") if name in res]
    shown += [name for name in ("python, wheel venv", "python -c pass") if name in res]
    figures = ", ".join(f"{name} {ms(res[name]['p50'])}" for name in shown)
    return f"{ms(res[judged]['p50'])} wall, p50 ({figures}; {aof(r['cli'])})", res[judged]["p50"] <= docker / 2


def round_trip(r: dict[str, Any], mode: str, p: str, limit: float) -> tuple[str, bool]:
    x = summaries(r, mode)["shellq"][p]
    return f"{ms(x)} (shellq, local worker, AOF {mode})", x <= limit


def near_floor(r: dict[str, Any]) -> tuple[str, bool]:
    res = summaries(r, "everysec")
    shellq, echo, bash = res["shellq"]["p50"], res["stream echo"]["p50"], res["pipe bash"]["p50"]
    floor = echo + bash
    parts = f"bare stream echo {ms(echo)} + bash behind pipes {ms(bash)}"
    return f"{ms(shellq)} = {shellq / floor:.2f}x the floor {ms(floor)} ({parts}; AOF everysec)", shellq <= 1.5 * floor


def tail(r: dict[str, Any]) -> tuple[str, bool]:
    res = summaries(r, "everysec")["shellq"]
    return f"p99 {ms(res['p99'])} = {res['p99'] / res['p50']:.1f}x p50 {ms(res['p50'])} (AOF everysec)", (
        res["p99"] <= 3 * res["p50"]
    )


def faster(r: dict[str, Any]) -> tuple[str, bool]:
    res = r["peers"]["results"]
    p50 = {name: res[name]["true"]["p50"] for name in [*PEERS, "shellq local", "shellq container"]}
    closest = min(PEERS, key=p50.__getitem__)  # the fastest peer: the smallest ratio
    local, box, mode = p50["shellq local"], p50["shellq container"], aof(r["peers"])
    text = (
        f"{p50[closest] / local:.1f}x ({closest} {ms(p50[closest])} / shellq local {ms(local)}, {mode}); "
        f"against shellq container ({ms(box)}, {mode}): {p50[closest] / box:.1f}x"
    )
    return text, p50[closest] / local >= 100


def cpu(r: dict[str, Any]) -> tuple[str, bool]:
    free = r["breakdown"]["free"]
    total = sum(x["cpu_us"] for x in free["processes"].values())
    each = ", ".join(f"{name} {x['cpu_us']:.0f}" for name, x in free["processes"].items())
    return f"{total:.0f} µs ({each}; AOF everysec)", total <= 400


def throughput(r: dict[str, Any], sessions: int, goal: float = 4000) -> tuple[str, bool]:
    point = r["throughput"]["results"][str(sessions)]
    x = point["commands_per_s"]
    roles = point.get("cpu_us_per_cmd_by_role")
    split = f"; CPU per command {point['cpu_us_per_cmd']:.0f} µs" + (
        " (" + ", ".join(f"{k} {v:.0f}" for k, v in roles.items()) + ")" if roles else ""
    )
    return f"{x:,.0f} commands/s ({sessions} sessions, local workers, {aof(r['throughput'])}{split})", x >= goal


def scaling(r: dict[str, Any]) -> tuple[str, bool]:
    res = r["throughput"]["results"]
    many, few = res["128"]["commands_per_s"], res["8"]["commands_per_s"]
    return f"{many:,.0f} vs {few:,.0f} commands/s: {many / few:.0%} ({aof(r['throughput'])})", many >= 0.9 * few


def cold_start(r: dict[str, Any]) -> tuple[str, bool]:
    res = r["containers"]["results"]
    shellq, bare = res["cold start shellq"]["p50"], res["cold start docker run -d"]["p50"]
    text = (
        f"shellq {ms(shellq)} vs `docker run -d` {ms(bare)}: {shellq - bare:+.0f} ms (medians; {aof(r['containers'])})"
    )
    return text, shellq <= bare + 200


def idle_rss(r: dict[str, Any]) -> tuple[str, bool]:
    kb = r["roundtrip-everysec"]["idle_rss_kb"]  # VmRSS in KiB; the target's 40 MB taken as 40e6 bytes
    return f"{mib(kb)} = {kb * 1024 / 1e6:.1f} MB (local worker, AOF everysec)", kb * 1024 <= 40e6


def peak_rss(r: dict[str, Any]) -> tuple[str, bool]:
    big = r["costs"]["results"]["stdout_100mb"]
    ratio = big["peak_rss_kb"] / big["idle_rss_kb"]
    text = (
        f"{mib(big['peak_rss_kb'])} vs {mib(big['idle_rss_kb'])} idle: {ratio:.2f}x (local worker, {aof(r['costs'])})"
    )
    return text, ratio <= 2


def teardown(r: dict[str, Any]) -> str:
    res = r["containers"]["results"]
    shellq, bare = res["teardown shellq"]["p50"], res["teardown docker rm -f"]["p50"]
    return f"{ms(shellq)} (shellq, {aof(r['containers'])}) vs `docker rm -f` {ms(bare)} (medians)"


def redis_memory(r: dict[str, Any], key: str) -> str:
    return f"{r['costs']['results']['redis_memory'][key] / 1024:.1f} KiB ({aof(r['costs'])})"


def rss_after_commands(r: dict[str, Any]) -> str:
    rss = r["costs"]["results"]["worker_rss"]
    return (
        f"{mib(rss['after_commands_kb'])} after {rss['commands']:,} commands "
        f"(idle {mib(rss['idle_kb'])}; local worker, {aof(r['costs'])})"
    )


def trajectory(r: dict[str, Any]) -> str:
    doc = r["trajectory"]
    totals = [
        f"{name} {x['total_s']['median']:.1f} s" + (f" ({len(x['failed'])} checks FAILED)" if x["failed"] else "")
        for name, x in doc["results"].items()
    ]
    runs = f"{len(doc['commands'])} commands, median of {doc['meta']['repeat']} runs"
    return f"{', '.join(totals)} ({runs}; shellq {aof(doc)})"


def stream_echo(r: dict[str, Any]) -> str:
    return ", ".join(f"{ms(summaries(r, mode)['stream echo']['p50'])} AOF {mode}" for mode in ["everysec", "always"])


Row = Callable[[dict[str, Any]], Any]
TARGETS: list[tuple[str, Row]] = [  # each returns (measured, met)
    ("`shellq exec S -- true`, wall, as a shell script calls it: ≤ half of `docker exec C true`", cli),
    ('Python `run("true")` p50 ≤ 1.5x the floor (bare stream echo + bash behind pipes)', near_floor),
    ("the same, p99 ≤ 3x its p50", tail),
    ("≥ 100x faster per command than every docker-exec-based peer and SWE-ReX (`true` p50, smallest ratio)", faster),
    ("CPU per `true`, all four processes (producer, Redis, worker, bash) ≤ 400 µs", cpu),
    ("≥ 4,000 commands/s aggregate at 8 sessions", lambda r: throughput(r, 8)),
    ("at 128 sessions ≥ 90% of the 8-session figure", scaling),
    ("`true` round trip p50 ≤ 1.2 ms, AOF always", lambda r: round_trip(r, "always", "p50", 1.2)),
    ("cold start to first result ≤ bare `docker run -d` + 200 ms", cold_start),
    ("worker idle RSS ≤ 40 MB", idle_rss),
    ("peak worker RSS under 100 MB of stdout ≤ 2x idle", peak_rss),
]


def cpu_per_command(r: dict[str, Any]) -> str:
    parts = []
    for label, p in r["breakdown"].items():
        each = ", ".join(f"{name} {x['cpu_us']:.0f}" for name, x in p["processes"].items())
        total = sum(x["cpu_us"] for x in p["processes"].values())
        parts.append(f"{label}: {total:.0f} µs ({each}), p50 {p['p50_ms']:.2f} ms")
    return "; ".join(parts) + " (AOF everysec)"


FIGURES: list[tuple[str, Row]] = [  # without a target; each returns the measured text
    ("aggregate throughput at 32 sessions", lambda r: throughput(r, 32)[0]),
    (
        "`true` round trip p50 and p99, AOF everysec",
        lambda r: f"{round_trip(r, 'everysec', 'p50', 0)[0]}, p99 {ms(summaries(r, 'everysec')['shellq']['p99'])}",
    ),
    ("container teardown, until the container is gone", teardown),
    ("Redis memory per idle session", lambda r: redis_memory(r, "per_idle_session_bytes")),
    ("Redis memory per 1,000 `true` results, with their commands", lambda r: redis_memory(r, "per_1k_results_bytes")),
    ("worker RSS after a run of `true` commands", rss_after_commands),
    ("agent trajectory, total wall time", trajectory),
    (
        "floor: one wake-up of another process and back (pipe ping-pong), p50",
        lambda r: f"{summaries(r, 'everysec')['ping-pong']['p50'] * 1000:.0f} µs",
    ),
    (
        "floor: `true` to a bash behind plain pipes (no shellq, no Redis), p50",
        lambda r: ms(summaries(r, "everysec")["pipe bash"]["p50"]),
    ),
    ("floor: bare Redis-stream echo (no shell), p50", stream_echo),
    ("CPU per `true` round trip, all processes (producer, Redis, worker, bash)", cpu_per_command),
]
MISSING = (LookupError, TypeError, ArithmeticError)  # a file, or a key in it, is not there


def targets(results: Path, since: float = 0.0) -> list[str]:
    """The "## Targets" section: the project's targets against the figures of this run in `results`/*.json."""
    r = read_results(results, since)
    lines = [
        "## Targets",
        "",
        "The project's targets, each against the figures of this run (from `bench/results/*.json`, the numbers of",
        "the sections below). A shellq figure is of a local worker (`python -m worker`) unless it says container,",
        "and names the Redis persistence mode it ran with. 'not measured': that number is missing from this run.",
        "",
        "| target | measured | met |",
        "| --- | --- | --- |",
    ]
    for target, row in TARGETS:
        try:
            measured, met = row(r)
            lines.append(f"| {target} | {measured} | {'yes' if met else '**no**'} |")
        except MISSING:
            lines.append(f"| {target} | not measured | |")
    lines += ["", "Without a target:", "", "| figure | measured |", "| --- | --- |"]
    for figure, row in FIGURES:
        try:
            lines.append(f"| {figure} | {row(r)} |")
        except MISSING:
            lines.append(f"| {figure} | not measured |")
    return [*lines, ""]


def main() -> None:
    RESULTS.mkdir(exist_ok=True)
    started = time.time() - 1  # file times come from a coarser clock, up to a tick behind time.time()
    sections = [(title, run(args)) for title, args in RUNS]
    has_chart = chart(RESULTS / "peers.json", DOC.parent / "benchmarks.png")
    machine = f"{platform.node()} {platform.machine()}, Python {platform.python_version()}"
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `make bench` on {time.strftime('%Y-%m-%d %H:%M')} ({machine}). Every figure below is from",
        "that one run on one machine; each section is the verbatim output of one script in `bench/`, which prints",
        "its own method. Raw numbers: `bench/results/*.json`. The Redis persistence mode is named on every shellq",
        "figure. Commands like `python3 -c pass` run the host's `python3` for the local systems and the image's in",
        "containers, so compare those within a row's environment. What a change cost, and analyses not repeated",
        "on every run: [benchmark-history.md](benchmark-history.md).",
        "",
    ]
    if has_chart:
        lines += ["![round trip of `true` per system](benchmarks.png)", ""]
    summary = targets(RESULTS, started)
    print("\n".join(summary))
    lines += summary
    for title, out in sections:
        lines += [f"## {title}", "", "```", out.strip(), "```", ""]
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text("\n".join(lines))
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
