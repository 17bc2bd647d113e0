"""Where δ-mem's decode overhead goes: a hand-written loop (``past_key_values`` and ``memory=`` each step) timed
against the frozen model without a PEFT wrapper, then profiled per token.

1. Ratio: interleaved repetitions of ``--tokens`` single-token steps after a ``--prompt``-token prefill, frozen
   model vs δ-mem model (default adapter shape, non-zero Δ heads), median ms per token of each.
2. Breakdown: the δ-mem loop under cProfile; every function of peft_deltamem (and torch's hook dispatch) with its
   own time per token, largest first. cProfile slows Python code more than kernels, so read the shares, not
   the absolute times.

Writes profile_decode.json to the output directory (git-ignored by default) and prints both tables.

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
    args = parser.parse_args(argv)
    out = output_dir(parser, args)

    import copy
    import cProfile
    import pstats

    import torch
    from peft import get_peft_model
    from transformers import DynamicCache

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

    def loop(model, memory, profiler=None):
        cache = DynamicCache(config=model.config)
        kwargs = {"memory": memory} if memory is not None else {}
        with torch.no_grad():
            token = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1, **kwargs).logits
            token = token[:, -1:].argmax(-1)
            if profiler is not None:
                profiler.enable()
            start = time.perf_counter()
            for _ in range(args.tokens):
                model(input_ids=token, past_key_values=cache, use_cache=True, **kwargs)
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
    layers = len(delta.base_model.model.model.layers) if hasattr(delta.base_model.model, "model") else None
    result = {
        "model": args.model,
        "layers": layers,
        "threads": args.threads,
        "prompt": args.prompt,
        "tokens": args.tokens,
        "reps": args.reps,
        "load_average_at_start": os.getloadavg(),
        "ms_per_token": medians,
        "ratio": medians["delta_mem"] / medians["frozen"],
        "extra_ms_per_token": medians["delta_mem"] - medians["frozen"],
        "profile_top": rows[: args.top],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_decode.json").write_text(json.dumps(result, indent=1))
    head = f"{args.model}, {args.threads} threads, prompt {args.prompt}, {args.tokens} tokens x {args.reps} reps"
    print(f"{head}: frozen {medians['frozen']:.2f} ms/token, δ-mem {medians['delta_mem']:.2f} ({result['ratio']:.3f}x)")
    print("own ms/token under cProfile  calls/token  function")
    for r in rows[: args.top]:
        print(f"{r['own_ms_per_token']:10.3f}  {r['calls_per_token']:8.1f}  {r['function']}")
    return result


if __name__ == "__main__":
    main()
