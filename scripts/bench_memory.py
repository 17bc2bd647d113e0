"""Memory benchmark: δ-mem vs full context, truncated context, BM25 retrieval and a matched-budget LoRA.

Trains (or loads from ``--cache-dir``) a tiny backbone that answers from context, trains the adapters, evaluates
every method on the same held-out synthetic episodes over several seeds, measures cost per answer from 1k to 32k
history tokens, and writes ``results.md``, the PNG plots and the raw results (``bench_results.json``).

Writes into ``outputs/bench_memory/`` (git-ignored) unless ``--out DIR`` or ``--write-docs`` says otherwise; only
``--write-docs`` replaces the committed docs/results.md, plots and JSON. ``--render-only`` re-renders the page and
plots from an existing ``bench_results.json`` in the same place.

Needs the ``eval`` extra (``pip install -e ".[eval]"``: bm25s for the BM25 baseline, matplotlib for the plots).
Measured durations on a 2-core x86_64 CPU: the full run 38 min from an empty cache (4 min with cached checkpoints);
``--smoke`` 57 s on a quiet machine (load average about 1), several minutes when other jobs load both cores.

    python scripts/bench_memory.py                    # the full run -> outputs/bench_memory/
    python scripts/bench_memory.py --write-docs       # the full run -> docs/results.md (+ docs/bench_*.png)
    python scripts/bench_memory.py --smoke            # the CI-sized version
    python scripts/bench_memory.py --render-only --write-docs   # docs/bench_results.json -> docs/results.md + plots
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _script import ROOT, add_output_options, doc_parser, output_dir


def build_parser() -> argparse.ArgumentParser:
    parser = doc_parser(__doc__)
    parser.add_argument("--smoke", action="store_true", help="the CI-sized configuration (57 s on a quiet 2-core CPU)")
    add_output_options(parser, "bench_memory", "results.md, the PNG plots and bench_results.json")
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="checkpoint cache, re-created on demand (default: .cache/peft_deltamem/bench in the checkout)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the seeds (default: 0 1 2)")
    parser.add_argument("--no-cost", action="store_true", help="skip the cost-vs-history-length curve")
    parser.add_argument("--render-only", action="store_true", help="re-render from bench_results.json in the output")
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and argument errors answer here, before torch is imported

import torch

from benchmarks.bench_report import write_report
from benchmarks.benchmark import DEFAULT_CACHE_DIR, BenchmarkConfig, run_benchmark, smoke_config
from benchmarks.extras import require


def machine() -> str:
    cores = os.cpu_count()
    return (
        f"{platform.machine()} CPU, {cores} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    needed = ("matplotlib",) if args.render_only else ("bm25s", "matplotlib")
    try:  # before any training: the BM25 baseline and the plots need the `eval` extra
        require(*needed)
    except ImportError as error:
        parser.error(str(error))
    out = output_dir(parser, args)
    raw = out / "bench_results.json"
    if args.render_only:
        if not raw.is_file():
            parser.error(f"--render-only needs {raw}; run the benchmark first (without --render-only)")
        results = json.loads(raw.read_text())
        report = write_report(results, out, results["command"], results["machine"])
        print(f"re-rendered {report} from {raw}")
        return results

    config = smoke_config() if args.smoke else BenchmarkConfig()
    if args.seeds:
        config = dataclasses.replace(config, seeds=tuple(args.seeds))
    if args.no_cost:
        config = dataclasses.replace(config, cost=None)
    cache_dir = args.cache_dir or ROOT / DEFAULT_CACHE_DIR
    results = run_benchmark(config, cache_dir=cache_dir, log=lambda m: print(m, flush=True))
    command = "python scripts/bench_memory.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    results["command"], results["machine"] = command, machine()
    out.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps(results, indent=1, ensure_ascii=False, default=str))
    report = write_report(results, out, command, results["machine"])
    print(f"wrote {report} and {raw} ({results['seconds'] / 60:.1f} min)")
    return results


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    main()
