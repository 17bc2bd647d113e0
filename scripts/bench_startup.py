"""How long a command takes to answer --help, and whether importing the package loads heavy libraries.

Each command runs in a fresh process, ``--repeats`` times; the median wall time is reported, with what
``import peft_deltamem`` (and its command line module) loaded and anything printed on stderr. Writes
startup.json to the output directory and prints a table.
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
    args = parser.parse_args(argv)
    out = output_dir(parser, args)
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


if __name__ == "__main__":
    main()
