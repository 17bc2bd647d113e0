"""How long a command takes to answer --help, and whether importing the package loads heavy libraries.

Each command runs in a fresh process, ``--repeats`` times; the median wall time is reported, with what
``import peft_deltamem`` (and its command line module) loaded and anything printed on stderr. Writes
startup.json to the output directory and prints a table.

``--demos`` times the README's two demos instead (``python -m peft_deltamem.demo`` and ``demo_real``), each once
per thread count of ``--demo-threads`` (``OMP_NUM_THREADS``), in a fresh process and a temporary working directory
(the first demo writes ``demo_output/`` there, not into the checkout)::

    python scripts/bench_startup.py --demos --demo-threads 1,2
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _script import ROOT, add_output_options, doc_parser, output_dir  # noqa: E402

HEAVY = ("torch", "peft", "transformers", "bitsandbytes", "trl", "accelerate")


def commands() -> list[list[str]]:
    cli = [sys.executable, "-m", "peft_deltamem.cli"]
    out = [[*cli, "--help"]] + [[*cli, sub, "--help"] for sub in ("import-reference", "serve", "chat")]
    scripts = sorted(p for p in (ROOT / "scripts").glob("*.py") if not p.name.startswith("_"))
    return out + [[sys.executable, str(p), "--help"] for p in scripts]


def main(argv=None) -> dict:
    parser = doc_parser(__doc__)
    add_output_options(parser, "startup", "startup.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--demos", action="store_true", help="time the README's two demos instead of --help")
    parser.add_argument("--demo-threads", default="1,2", help="OMP_NUM_THREADS values the demos run with")
    args = parser.parse_args(argv)
    out = output_dir(parser, args)
    if args.demos:
        return time_demos(out, [int(t) for t in args.demo_threads.split(",")])
    probe = f"import sys, peft_deltamem, peft_deltamem.cli; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    rows = []
    for command in commands():
        times, stderr = [], ""
        for _ in range(args.repeats):
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True)
            times.append(time.perf_counter() - start)
            stderr = stderr or done.stderr.strip()
        name = " ".join(Path(c).name if c.endswith(".py") else c for c in command[1:])
        rows.append({"command": name, "median_s": statistics.median(times), "rc": done.returncode, "stderr": stderr})
    result = {
        "import_peft_deltamem_loads": loaded.split(",") if loaded else [],
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
        "repeats": args.repeats,
        "commands": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "startup.json").write_text(json.dumps(result, indent=1))
    print(f"import peft_deltamem loads: {result['import_peft_deltamem_loads'] or 'none of ' + ', '.join(HEAVY)}")
    print(f"load average {result['load_average'][0]:.2f}, {result['cpus']} CPUs, median of {args.repeats}")
    for row in rows:
        note = "" if not row["stderr"] else f"  stderr: {row['stderr'].splitlines()[0][:80]}"
        print(f"{row['median_s']:6.2f} s  rc {row['rc']}  {row['command']}{note}")
    return result


def time_demos(out: Path, threads: list[int]) -> dict:
    """Wall time of each demo, once per thread count, with the load average before it."""
    import tempfile

    rows = []
    for module in ("peft_deltamem.demo", "peft_deltamem.demo_real"):
        for n in threads:
            env = {**os.environ, "OMP_NUM_THREADS": str(n)}
            # the first demo defaults to one thread; pass the count so both run with what the row says
            extra = ["--threads", str(n)]
            load = os.getloadavg()[0]
            with tempfile.TemporaryDirectory() as cwd:
                start = time.perf_counter()
                done = subprocess.run([sys.executable, "-m", module, *extra], cwd=cwd, env=env, capture_output=True,
                                      text=True)  # fmt: skip
                seconds = time.perf_counter() - start
            if done.returncode != 0:
                raise SystemExit(f"{module} failed:\n{done.stderr[-2000:]}")
            rows.append({"demo": module, "threads": n, "seconds": seconds, "load_before": load})
            print(f"{seconds:6.1f} s  {module} with {n} thread(s), load average {load:.2f} before", flush=True)
    result = {"cpus": os.cpu_count(), "demos": rows, "finished_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out.mkdir(parents=True, exist_ok=True)
    (out / "demos.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
