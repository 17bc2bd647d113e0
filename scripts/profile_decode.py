"""Where δ-mem's decode overhead goes: a hand-written loop (``past_key_values`` and ``memory=`` each step) timed
against the frozen model without a PEFT wrapper, then profiled per token.

1. Ratio: interleaved repetitions of ``--tokens`` single-token steps after a ``--prompt``-token prefill, frozen
   model vs δ-mem model (default adapter shape, non-zero Δ heads), median ms per token of each.
2. Parts: the same loops again with a wall-clock timer on the forward of each part of a call (attention blocks, MLP
   blocks; δ-mem's read per layer, its layer code, the start and end of each call); per token, frozen vs δ-mem,
   medians of the repetitions. The timers sit on the classes, so both models pay the same timer cost for the parts
   they share; what δ-mem adds is timed where it runs, inside the model, between the frozen layers' weight streams.
3. Ops: the tensor operations one decoding step dispatches (aten ops, counted by a dispatch mode), frozen vs δ-mem,
   and which ops δ-mem adds. A count, not a time: it does not move with the machine's load.
4. Breakdown: the δ-mem loop under cProfile; every function of peft_deltamem (and torch's hook dispatch) with its
   own time per token, largest first. cProfile slows Python code more than kernels, so read the shares, not
   the absolute times.

``--cache static`` makes each step as generate() makes it with a static cache (explicit ``cache_position`` and
``position_ids``) instead of the hand-written loop's ``DynamicCache``.

Writes profile_decode.json to the output directory (git-ignored by default) and prints the four.

    python scripts/profile_decode.py --model smollm2 --threads 2
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _script import add_output_options, doc_parser, output_dir  # noqa: E402


def main(argv=None) -> dict:
    parser = doc_parser(__doc__)
    add_output_options(parser, "profile_decode", "profile_decode.json")
    parser.add_argument("--model", choices=["reference", "smollm2"], default="smollm2")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--cache", choices=["dynamic", "static"], default="dynamic")
    args = parser.parse_args(argv)
    out = output_dir(parser, args)

    import copy
    import cProfile
    import pstats

    import torch
    from peft import get_peft_model
    from transformers import DynamicCache, StaticCache

    from peft_deltamem import DeltaMemConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model == "smollm2":
        from peft_deltamem.real_model import load_smollm2

        frozen, _ = load_smollm2(cache=False)
    else:
        import transformers

        from bench_speed import reference_config

        frozen = transformers.AutoModelForCausalLM.from_config(reference_config("cpu")).eval()
    delta = get_peft_model(copy.deepcopy(frozen), DeltaMemConfig(task_type="CAUSAL_LM", init_weights=False)).eval()
    inner = delta.get_base_model()  # what generate() calls each step
    prompt = torch.randint(100, 1000, (1, args.prompt))

    def call(model, cache, ids, start, **kwargs):
        if args.cache == "static":  # as generate() calls the model with a static cache: explicit positions
            at = torch.arange(start, start + ids.shape[1])
            kwargs.update(cache_position=at, position_ids=at[None])
        return model(input_ids=ids, past_key_values=cache, use_cache=True, **kwargs)

    def loop(model, memory, profiler=None, parts=None):
        if args.cache == "static":
            cache = StaticCache(config=model.config, max_cache_len=args.prompt + args.tokens)
        else:
            cache = DynamicCache(config=model.config)
        kwargs = {"memory": memory} if memory is not None else {}
        with torch.no_grad():
            token = call(model, cache, prompt, 0, logits_to_keep=1, **kwargs).logits[:, -1:].argmax(-1)
            if profiler is not None:
                profiler.enable()
            if parts is not None:
                parts.clear()
            start = time.perf_counter()
            for i in range(args.tokens):
                call(model, cache, token, args.prompt + i, **kwargs)
            seconds = time.perf_counter() - start
            if profiler is not None:
                profiler.disable()
            return seconds / args.tokens * 1000

    times = {"frozen": [], "delta_mem": []}
    loop(frozen, None), loop(inner, delta.new_memory(1))  # warm-up
    for _ in range(args.reps):
        times["frozen"].append(loop(frozen, None))
        times["delta_mem"].append(loop(inner, delta.new_memory(1)))
    medians = {k: statistics.median(v) for k, v in times.items()}

    layers = frozen.model.layers
    parts, restore = _part_timers(type(layers[0].self_attn), type(layers[0].mlp))
    per_part: dict = {"frozen": {}, "delta_mem": {}}
    try:
        for _ in range(args.reps):
            for name, model, memory in (("frozen", frozen, None), ("delta_mem", inner, delta.new_memory(1))):
                total = loop(model, memory, parts=parts)
                for part, ms in _per_token(parts, total, args.tokens).items():
                    per_part[name].setdefault(part, []).append(ms)
    finally:
        restore()
    part_rows = [
        {"part": part, "label": label,
         "frozen_ms": statistics.median(per_part["frozen"].get(part, [0.0])),
         "delta_mem_ms": statistics.median(per_part["delta_mem"][part])}
        for part, label in PARTS
    ]  # fmt: skip

    frozen_ops, delta_ops = _count_ops(frozen, None, call, prompt), _count_ops(inner, delta.new_memory(1), call, prompt)
    added_ops = {op: delta_ops[op] - frozen_ops[op] for op in delta_ops | frozen_ops}
    added_ops = dict(sorted(((op, n) for op, n in added_ops.items() if n), key=lambda item: -item[1]))

    profiler = cProfile.Profile()
    loop(inner, delta.new_memory(1), profiler)  # the decode steps only
    stats = pstats.Stats(profiler)
    rows = []
    for (file, line, name), (_, calls, own, cumulative, _) in stats.stats.items():
        ours = "peft_deltamem" in file
        hooks = name in ("_call_impl", "_wrapped_call_impl") or "hooks" in file
        if ours or hooks:
            where = (file.split("peft_deltamem/")[-1] if ours else Path(file).name) + f":{line} {name}"
            rows.append({"function": where, "calls_per_token": calls / args.tokens,
                         "own_ms_per_token": own / args.tokens * 1000,
                         "cumulative_ms_per_token": cumulative / args.tokens * 1000})  # fmt: skip
    rows.sort(key=lambda r: -r["own_ms_per_token"])
    result = {
        "model": args.model,
        "layers": len(layers),
        "cache": args.cache,
        "threads": args.threads,
        "prompt": args.prompt,
        "tokens": args.tokens,
        "reps": args.reps,
        "load_average_at_start": os.getloadavg(),
        "ms_per_token": medians,
        "ratio": medians["delta_mem"] / medians["frozen"],
        "extra_ms_per_token": medians["delta_mem"] - medians["frozen"],
        "parts_ms_per_token": part_rows,
        "ops_per_token": {
            "frozen": sum(frozen_ops.values()),
            "delta_mem": sum(delta_ops.values()),
            "added_by_delta_mem": added_ops,
        },  # fmt: skip
        "profile_top": rows[: args.top],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_decode.json").write_text(json.dumps(result, indent=1))
    head = (f"{args.model}, {args.cache} cache, {args.threads} threads, prompt {args.prompt}, {args.tokens} tokens x "
            f"{args.reps} reps")  # fmt: skip
    print(f"{head}: frozen {medians['frozen']:.2f} ms/token, δ-mem {medians['delta_mem']:.2f} ({result['ratio']:.3f}x)")
    print(f"wall-clock ms/token with timers on each part (per layer: {len(layers)} layers)")
    print(f"{'frozen':>8} {'δ-mem':>8} {'extra':>7} {'µs/layer':>9}  part")
    for r in part_rows:
        extra = r["delta_mem_ms"] - r["frozen_ms"]
        per_layer = f"{extra / len(layers) * 1000:9.1f}" if r["part"] in PER_LAYER else " " * 9
        print(f"{r['frozen_ms']:8.2f} {r['delta_mem_ms']:8.2f} {extra:7.2f} {per_layer}  {r['label']}")
    frozen_n, delta_n = sum(frozen_ops.values()), sum(delta_ops.values())
    print(f"aten ops per decoding step: frozen {frozen_n}, δ-mem {delta_n} (+{delta_n - frozen_n}); δ-mem adds:")
    print("  " + ", ".join(f"{op} {n}" for op, n in added_ops.items()))
    print("own ms/token under cProfile  calls/token  function")
    for r in rows[: args.top]:
        print(f"{r['own_ms_per_token']:10.3f}  {r['calls_per_token']:8.1f}  {r['function']}")
    return result


# (key, what it is); "layer_code", "rest" and "total" are derived in _per_token
PARTS = (
    ("attention", "attention blocks (their projections; δ-mem: the corrections added to q and o)"),
    ("mlp", "MLP blocks"),
    ("read", "δ-mem read per layer: memory projection, S q, Δ heads"),
    ("layer_code", "δ-mem layer's own code around the attention block"),
    ("call_start", "start of each call: memory check (weights key), record"),
    ("call_end", "end of each call: stacked write of all layers, finiteness check, commit"),
    ("rest", "rest: embeddings, norms, residuals, LM head, cache, model call"),
    ("total", "total"),
)
PER_LAYER = ("attention", "mlp", "read", "layer_code")


def _part_timers(attention_class, mlp_class):
    """Wall-clock timers (ns, summed) on the forward of each part; returns (the sums, a function that removes them).
    Set on the classes: the frozen and the δ-mem model run the same attention and MLP code."""
    import functools

    from peft_deltamem.layer import DeltaMemLayer
    from peft_deltamem.runtime import MemoryRuntime

    sums: dict[str, int] = {}
    targets = [(attention_class, "forward", "attention"), (mlp_class, "forward", "mlp"),
               (DeltaMemLayer, "_corrections_for", "read"), (DeltaMemLayer, "forward", "delta_layer"),
               (MemoryRuntime, "begin_call", "call_start"), (MemoryRuntime, "end_call", "call_end")]  # fmt: skip
    originals = [(owner, name, owner.__dict__[name]) for owner, name, _ in targets]

    def timer(fn, part):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = time.perf_counter_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                sums[part] = sums.get(part, 0) + time.perf_counter_ns() - start

        return timed

    for owner, name, part in targets:
        setattr(owner, name, timer(owner.__dict__[name], part))

    def restore():
        for owner, name, fn in originals:
            setattr(owner, name, fn)

    return sums, restore


def _count_ops(model, memory, call, prompt):
    """The aten ops (name -> count) that one decoding step after ``prompt`` dispatches."""
    import collections

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import DynamicCache

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    kwargs = {"memory": memory} if memory is not None else {}
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        token = call(model, cache, prompt[:, :16], 0, logits_to_keep=1, **kwargs).logits[:, -1:].argmax(-1)
        with Count() as count:
            call(model, cache, token, 16, **kwargs)
    return count.ops


def _per_token(sums: dict, total_ms: float, tokens: int) -> dict:
    """ms per token of each part in PARTS from the summed ns of one loop and its total ms per token."""
    ms = {part: ns / tokens / 1e6 for part, ns in sums.items()}
    timed = [part for part, _ in PARTS if part not in ("layer_code", "rest", "total")]
    out = {part: ms.get(part, 0.0) for part in timed}
    out["layer_code"] = ms["delta_layer"] - out["attention"] - out["read"] if "delta_layer" in ms else 0.0
    out["rest"] = total_ms - sum(out.values())
    out["total"] = total_ms
    return out


if __name__ == "__main__":
    main()
