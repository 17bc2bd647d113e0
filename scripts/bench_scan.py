"""Throughput of the δ-mem scan implementations (tokens/s), naive vs chunk vs fused_recurrent vs auto.

Forward is timed under ``torch.no_grad()`` (prefill / inference); forward+backward (with
autograd, gradients for every input) is timed for chunk and fused_recurrent, and for naive up to
``--max-naive-bwd-T``. Each entry is the median of ``--reps`` timed runs after warm-up.

    python scripts/bench_scan.py                      # writes outputs/bench_scan/bench_scan.json (git-ignored)
    python scripts/bench_scan.py --write-docs         # replaces the committed docs/bench_scan.json
    python scripts/bench_scan.py --max-naive-T 2048 --reps 5 --out /tmp/bench
    python scripts/bench_scan.py --chunk-sizes 8 16 32 64   # also sweep the chunk size
    python scripts/bench_scan.py --batch 8 --heads 3 --rank 64 --T 16 32 64 256   # where auto picks the step form

On a shared machine, ``--threads 1 --clock cpu`` gives steadier numbers: with 2 threads every
batched matmul enters an OpenMP parallel region, which stalls for a scheduler tick when another
process holds the second core.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _script import add_output_options, doc_parser, output_dir


def build_parser() -> argparse.ArgumentParser:
    parser = doc_parser(__doc__)
    parser.add_argument("--T", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192], help="sequence lengths")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default: 1)")
    parser.add_argument("--heads", type=int, default=1, help="state heads (default: 1)")
    parser.add_argument("--rank", type=int, default=8, help="memory rank r (default: 8)")
    parser.add_argument("--reps", type=int, default=7, help="timed runs per entry (default: 7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first (default: 2)")
    parser.add_argument("--max-naive-T", type=int, default=8192, help="skip the naive forward above this T")
    parser.add_argument("--max-naive-bwd-T", type=int, default=2048, help="skip naive forward+backward above this T")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    parser.add_argument("--chunk-sizes", type=int, nargs="*", default=[], help="also time chunk at these chunk sizes")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: process CPU time, immune to other processes taking the core (use with --threads 1)",
    )
    add_output_options(parser, "bench_scan", "bench_scan.json")
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and argument errors answer here, before torch is imported

import torch
import torch.nn.functional as F

from peft_deltamem.ops import AUTO_RECURRENT_MAX_T, AUTO_RECURRENT_MIN_RANK, IMPLEMENTATIONS
from peft_deltamem.ops.chunk import DEFAULT_CHUNK_SIZE, chunk_delta_rule

FORWARD_IMPLS = ["naive", "fused_recurrent", "chunk", "auto"]


def make_inputs(t: int, b: int, h: int, r: int, requires_grad: bool = False) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(t)
    q = F.normalize(torch.randn(b, h, t, r, generator=gen), dim=-1)
    k = F.normalize(torch.randn(b, h, t, r, generator=gen), dim=-1)
    v = torch.randn(b, h, t, r, generator=gen)
    beta = torch.sigmoid(torch.randn(b, h, t, r, generator=gen))
    state = 0.1 * torch.randn(b, h, r, r, generator=gen)
    return [x.requires_grad_(requires_grad) for x in (q, k, v, beta, state)]


CLOCK = time.perf_counter


def median_seconds(fn: Callable[[], object], reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = CLOCK()
        fn()
        times.append(CLOCK() - start)
    return statistics.median(times)


def time_forward(fn: Callable, inputs: list[torch.Tensor], reps: int, warmup: int) -> float:
    def step() -> None:
        with torch.no_grad():
            fn(*inputs)

    return median_seconds(step, reps, warmup)


def time_forward_backward(fn: Callable, inputs: list[torch.Tensor], reps: int, warmup: int) -> float:
    def step() -> None:
        for x in inputs:
            x.grad = None
        reads, state = fn(*inputs)
        (reads.square().sum() + state.square().sum()).backward()

    return median_seconds(step, reps, warmup)


def chunk_size_sweep(args: argparse.Namespace) -> list[dict[str, float]]:
    """Median forward and forward+backward time of chunk at each ``--chunk-sizes`` and T."""
    print(f"\nchunk size sweep ({torch.get_num_threads()} threads), median ms: forward / forward+backward\n")
    print("| T | " + " | ".join(f"C={c}" for c in args.chunk_sizes) + " |")
    print("|---|" + "---|" * len(args.chunk_sizes))
    sweep = []
    for t in args.T:
        inputs = make_inputs(t, args.batch, args.heads, args.rank)
        grad_inputs = make_inputs(t, args.batch, args.heads, args.rank, requires_grad=True)
        cells = []
        for size in args.chunk_sizes:

            def fn(*a: torch.Tensor, size: int = size) -> tuple[torch.Tensor, torch.Tensor]:
                return chunk_delta_rule(*a, chunk_size=size)

            fwd = time_forward(fn, inputs, args.reps, args.warmup)
            fwd_bwd = time_forward_backward(fn, grad_inputs, args.reps, args.warmup)
            sweep.append({"T": t, "chunk_size": size, "chunk_fwd_s": fwd, "chunk_fwd_bwd_s": fwd_bwd})
            cells.append(f"{fwd * 1e3:.2f} / {fwd_bwd * 1e3:.2f}")
        print(f"| {t} | " + " | ".join(cells) + " |")
    return sweep


def scan_rows(
    lengths: list[int],
    batch: int = 1,
    heads: int = 1,
    rank: int = 8,
    reps: int = 7,
    warmup: int = 2,
    max_naive_t: int = 8192,
    max_naive_bwd_t: int = 2048,
) -> list[dict]:
    """Median seconds per implementation and length: ``{"T", "<impl>_fwd_s", "chunk_fwd_bwd_s", ...}`` rows."""
    results = []
    for t in lengths:
        row: dict[str, object] = {"T": t}
        inputs = make_inputs(t, batch, heads, rank)
        for impl in FORWARD_IMPLS:
            if impl == "naive" and t > max_naive_t:
                continue
            # the naive scan is slow and steady: fewer repetitions suffice
            impl_reps = max(3, reps // 2) if impl in ("naive", "fused_recurrent") else reps
            impl_warmup = 1 if impl == "naive" else warmup
            row[f"{impl}_fwd_s"] = time_forward(IMPLEMENTATIONS[impl], inputs, impl_reps, impl_warmup)
        grad_inputs = make_inputs(t, batch, heads, rank, requires_grad=True)
        row["chunk_fwd_bwd_s"] = time_forward_backward(IMPLEMENTATIONS["chunk"], grad_inputs, reps, warmup)
        row["fused_recurrent_fwd_bwd_s"] = time_forward_backward(
            IMPLEMENTATIONS["fused_recurrent"], grad_inputs, max(3, reps // 2), warmup
        )
        if t <= max_naive_bwd_t:
            row["naive_fwd_bwd_s"] = time_forward_backward(IMPLEMENTATIONS["naive"], grad_inputs, 3, 1)
        results.append(row)
        print(f"T={t}: " + ", ".join(f"{key}={value * 1e3:.2f}ms" for key, value in row.items() if key != "T"))
    return results


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    out = output_dir(parser, args) / "bench_scan.json"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        global CLOCK
        CLOCK = time.process_time

    results = scan_rows(
        args.T, args.batch, args.heads, args.rank, args.reps, args.warmup, args.max_naive_T, args.max_naive_bwd_T
    )

    def cell(row: dict, key: str) -> str:
        seconds = row.get(key)
        return "—" if seconds is None else f"{row['T'] / seconds:,.0f} ({seconds * 1e3:.2f} ms)"

    def speedup(row: dict, fast: str, slow: str) -> str:
        return f"{row[slow] / row[fast]:.0f}×" if slow in row else "—"

    print()
    threads = torch.get_num_threads()
    setup = f"B={args.batch}, H={args.heads}, r={args.rank}, float32, {threads} threads, {args.clock} clock"
    print(f"{setup}; tokens/s (median ms)")
    print()
    print(
        "| T | naive fwd | fused_recurrent fwd | chunk fwd | auto fwd | chunk vs naive fwd "
        "| naive fwd+bwd | fused_recurrent fwd+bwd | chunk fwd+bwd | chunk vs naive fwd+bwd |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in results:
        print(
            f"| {row['T']} | {cell(row, 'naive_fwd_s')} | {cell(row, 'fused_recurrent_fwd_s')} "
            f"| {cell(row, 'chunk_fwd_s')} | {cell(row, 'auto_fwd_s')} | {speedup(row, 'chunk_fwd_s', 'naive_fwd_s')} "
            f"| {cell(row, 'naive_fwd_bwd_s')} | {cell(row, 'fused_recurrent_fwd_bwd_s')} "
            f"| {cell(row, 'chunk_fwd_bwd_s')} "
            f"| {speedup(row, 'chunk_fwd_bwd_s', 'naive_fwd_bwd_s')} |"
        )

    sweep = chunk_size_sweep(args) if args.chunk_sizes else []

    meta = {
        "batch": args.batch,
        "heads": args.heads,
        "rank": args.rank,
        "dtype": "float32",
        "reps": args.reps,
        "statistic": f"median seconds per call ({args.clock} clock); forward under no_grad",
        "chunk_size": DEFAULT_CHUNK_SIZE,
        "auto_recurrent_max_t": AUTO_RECURRENT_MAX_T,
        "auto_recurrent_min_rank": AUTO_RECURRENT_MIN_RANK,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    for row in results:
        for key in [k for k in row if k.endswith("_s")]:
            row[key[: -len("_s")] + "_tokens_per_s"] = row["T"] / row[key]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results, "chunk_size_sweep": sweep}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
