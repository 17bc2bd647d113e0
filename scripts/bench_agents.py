"""Load test of `peft-deltamem serve`: concurrent sessions, memory vs no memory vs full-history prompting.

Starts the server (a subprocess on a free localhost port) three times: with δ-mem memory (a window of
``--window`` messages, older ones written into memory), with the memory disabled (same window, older messages
dropped), and with full-history prompting (no memory, every message kept in the prompt). Each time
``--sessions`` clients each play ``--turns`` turns concurrently. The memory run is killed with SIGKILL halfway
and restarted on the same session directory; the script then checks that every completed turn survived.
Reports throughput, p50/p95 latency per turn and the server's peak RSS.

Writes ``bench_agents.json`` and ``bench_agents.md`` into ``outputs/bench_agents/`` (git-ignored) unless
``--out DIR`` or ``--write-docs`` says otherwise. Only localhost is contacted; every loop is bounded.

    python scripts/bench_agents.py                                   # embedded tiny model, a quick run
    python scripts/bench_agents.py --model DIR --gguf-file F --adapter DIR --max-tokens 16
"""

from __future__ import annotations

import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _script import add_output_options, doc_parser, output_dir


def build_parser():
    parser = doc_parser(__doc__)
    parser.add_argument("--model", default=None, help="base model directory or Hub id (default: embedded tiny model)")
    parser.add_argument("--gguf-file", default=None, help="GGUF file inside --model")
    parser.add_argument("--adapter", default=None, help="δ-mem adapter directory")
    parser.add_argument("--sessions", type=int, default=8, help="concurrent sessions (default: 8)")
    parser.add_argument("--turns", type=int, default=20, help="turns per session (default: 20)")
    parser.add_argument("--window", type=int, default=4, help="visible messages with memory (default: 4)")
    parser.add_argument("--max-tokens", type=int, default=8, help="reply length limit (default: 8)")
    parser.add_argument("--batch-size", type=int, default=8, help="server batch size (default: 8)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per request (default: 600)")
    parser.add_argument(
        "--configs", default="memory,no-memory,full-history",
        help="which servers to run, comma-separated (default: memory,no-memory,full-history); full-history prompting "
        "grows with every turn, so long sessions may leave it out",
    )  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="every server decodes compiled (serve --compile)")
    parser.add_argument(
        "--write", choices=("leave", "arrival", "prompt"), default="leave",
        help="how the memory server writes (serve --write; default: leave)",
    )  # fmt: skip
    add_output_options(parser, "bench_agents", "bench_agents.json and bench_agents.md")
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and argument errors answer here, before anything heavy is imported

from peft_deltamem.agents.launch import launch_server

WORDS = "alice likes teal . we talked about trains bob likes gold then music and lunch later books again".split()
CONFIGS = {
    "δ-mem memory": ["--window", "{window}", "--write", "{write}"],
    "no memory (same window)": ["--window", "{window}", "--no-memory"],
    "full-history prompting": ["--window", "100000", "--no-memory"],
}
SHORT = dict(zip(("memory", "no-memory", "full-history"), CONFIGS))


def http(method: str, url: str, body: dict | None = None, headers: dict | None = None, timeout: float = 5):
    """(status, parsed JSON) of one request (standard library only)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    for key, value in (headers or {}).items():
        request.add_header(key, value)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


def start(args, extra: list[str], sessions_dir: Path) -> tuple[subprocess.Popen, str]:
    command = ["--sessions", str(sessions_dir)]
    for flag, value in (("--model", args.model), ("--gguf-file", args.gguf_file), ("--adapter", args.adapter)):
        if value:
            command += [flag, value]
    command += ["--max-new-tokens", str(args.max_tokens), "--batch-size", str(args.batch_size), *extra]
    command += ["--compile"] if args.compile else ["--no-compile"]
    try:
        return launch_server(command)
    except RuntimeError as error:
        raise SystemExit(str(error)) from error


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def message(session: int, turn: int) -> str:
    """Session ``session``'s user message at turn ``turn``; numbered, so that no turn repeats the first message (the
    server would take a request starting with it for a client resending the conversation, and fork there)."""
    return f"{turn + 1}. " + " ".join(WORDS[(session * 7 + turn * 3 + i) % len(WORDS)] for i in range(6))


def play(url: str, sessions: int, turns: range, max_tokens: int, timeout: float) -> list[tuple[int, float]]:
    """Every session plays ``turns`` concurrently (one thread each); returns (turn, latency) of every turn."""
    latencies: list[tuple[int, float]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def session_loop(s: int) -> None:
        for t in turns:
            body = {"messages": [{"role": "user", "content": message(s, t)}], "max_tokens": max_tokens}
            start = time.perf_counter()
            status, answer = http(
                "POST", f"{url}/v1/chat/completions", body, {"X-Session-Id": f"s{s}"}, timeout=timeout
            )
            elapsed = time.perf_counter() - start
            with lock:
                if status != 200:
                    errors.append(str(answer))
                latencies.append((t, elapsed))

    threads = [threading.Thread(target=session_loop, args=(s,)) for s in range(sessions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, e.g. {errors[0][:500]}")
    return latencies


PHASES = ("write", "prefill", "decode")


def server_totals(url: str) -> dict[str, float]:
    """The server's own totals from GET /metrics: seconds of its model batches by phase, prompt tokens encoded and
    reply tokens generated."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        text = response.read().decode()
    totals = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "peft_deltamem_batch_phase_seconds_sum":
                totals[sample.labels["phase"] + "_s"] = sample.value
            elif sample.name in ("peft_deltamem_prompt_tokens_total", "peft_deltamem_generated_tokens_total"):
                totals[sample.name.removeprefix("peft_deltamem_").removesuffix("_total")] = sample.value
    return totals


def add_totals(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in a.keys() | b.keys()}


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] if len(values) > 1 else values[0]


def run_config(args, name: str, extra: list[str], workdir: Path) -> dict:
    extra = [a.format(window=args.window, write=args.write) for a in extra]
    sessions_dir = workdir / name.replace(" ", "_")
    process, url = start(args, extra, sessions_dir)
    half = args.turns // 2 if name == "δ-mem memory" else args.turns
    wall = time.perf_counter()
    latencies = play(url, args.sessions, range(half), args.max_tokens, args.timeout)
    wall = time.perf_counter() - wall
    peak = peak_rss_mib(process.pid)
    totals = server_totals(url)
    restart = None
    if half < args.turns:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        down = time.perf_counter()
        process, url = start(args, extra, sessions_dir)
        restart_s = time.perf_counter() - down
        counts = [http("GET", f"{url}/v1/sessions/s{s}")[1]["messages"] for s in range(args.sessions)]
        lost = sum(max(0, 2 * half - c) for c in counts)
        second = time.perf_counter()
        latencies += play(url, args.sessions, range(half, args.turns), args.max_tokens, args.timeout)
        wall += time.perf_counter() - second
        peak = max(peak, peak_rss_mib(process.pid))
        totals = add_totals(totals, server_totals(url))
        restart = {"after_turn": half, "restart_s": restart_s, "messages_lost": lost}
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    turns = args.sessions * args.turns
    every = [latency for _, latency in latencies]
    edge = min(5, args.turns // 2)  # the first and the last turns of every session
    return {
        "turns": turns,
        "wall_s": wall,
        "turns_per_s": turns / wall,
        "p50_s": statistics.median(every),
        "p95_s": p95(every),
        "p95_first_turns_s": p95([x for t, x in latencies if t < edge]),
        "p95_last_turns_s": p95([x for t, x in latencies if t >= args.turns - edge]),
        "edge_turns": edge,
        "server": totals,
        "peak_rss_mib": peak,
        "restart": restart,
    }


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        "# Load test: `peft-deltamem serve`",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; load average before the run {meta['load_before']}  ",
        f"Model: {meta['model']}; adapter: {meta.get('adapter', '?')}; server threads (OMP_NUM_THREADS): "
        f"{meta.get('server_threads', '?')}  ",
        f"{meta['sessions']} concurrent sessions × {meta['turns']} turns, replies of at most {meta['max_tokens']} "
        f"tokens, server batch size {meta['batch_size']}",
        "",
        "| configuration | turns/s | p50 latency | p95 latency | server peak RSS | kill -9 + restart |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, r in results["configs"].items():
        restart = r["restart"]
        note = (
            f"after turn {restart['after_turn']}: restarted in {restart['restart_s']:.1f} s, "
            f"{restart['messages_lost']} messages of completed turns lost"
            if restart
            else "—"
        )
        lines.append(
            f"| {name} | {r['turns_per_s']:.2f} | {r['p50_s'] * 1e3:.0f} ms | {r['p95_s'] * 1e3:.0f} ms | "
            f"{r['peak_rss_mib']:.0f} MiB | {note} |"
        )
    lines += [
        "",
        "Latency is per turn as the client sees it (queueing included). The memory configuration keeps the prompt "
        "at the window; full-history prompting re-reads every earlier message at every turn.",
        "",
        "Where the server's time went (its own `/metrics`, summed over its model batches): writing the messages that "
        "left the window into memory, prefill (generate's start to its first new token: the window re-encoded, and "
        "the first step), decode (the rest); tokens per turn; p95 latency over the first and the last turns of the "
        "sessions (a memory turn should cost the same at turn 200 as at turn 5).",
        "",
        "| configuration | write | prefill | decode | prompt tokens / turn | reply tokens / turn | "
        "p95, first turns | p95, last turns |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results["configs"].items():
        server, edge = r["server"], r["edge_turns"]
        total = sum(server.get(p + "_s", 0.0) for p in PHASES) or float("nan")
        shares = " | ".join(f"{server.get(p + '_s', 0.0):.1f} s ({server.get(p + '_s', 0.0) / total:.0%})"
                            for p in PHASES)  # fmt: skip
        lines.append(
            f"| {name} | {shares} | {server.get('prompt_tokens', 0) / r['turns']:.0f} | "
            f"{server.get('generated_tokens', 0) / r['turns']:.1f} | {r['p95_first_turns_s'] * 1e3:.0f} ms "
            f"(turns 1–{edge}) | {r['p95_last_turns_s'] * 1e3:.0f} ms (last {edge}) |"
        )
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = output_dir(parser, args)
    chosen = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in SHORT]
    if unknown or not chosen:
        parser.error(f"--configs takes a comma-separated subset of {','.join(SHORT)}; got {args.configs!r}")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        configs = {SHORT[c]: run_config(args, SHORT[c], CONFIGS[SHORT[c]], Path(tmp)) for c in SHORT if c in chosen}
    results = {
        "meta": {
            "command": "python scripts/bench_agents.py" + "".join(f" {a}" for a in (argv or sys.argv[1:])),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
            "load_before": round(load_before, 2),
            "model": args.model or "embedded tiny model",
            "adapter": args.adapter or "fresh, untrained (seed 0): measures cost, not reply quality",
            "server_threads": os.environ.get("OMP_NUM_THREADS", "torch default"),
            "sessions": args.sessions,
            "turns": args.turns,
            "max_tokens": args.max_tokens,
            "batch_size": args.batch_size,
        },
        "configs": configs,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_agents.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    (out / "bench_agents.md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {out / 'bench_agents.json'} and {out / 'bench_agents.md'}")
    return results


if __name__ == "__main__":
    main()
