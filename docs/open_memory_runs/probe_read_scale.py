"""How strong must the read be? Scale a trained open-memory adapter's Δ heads and measure val recall by reply.

Loads SmolLM2 with an adapter saved by scripts/train_open_memory.py (e.g. after --retrieval-steps with --steps 0),
multiplies every Δ-head weight by each factor in --scales, and runs the chat engine on val episodes (history only
in memory, window of two messages; benchmarks.open_recall). Prints recall, degenerate share and two replies per
factor. With ``--forced`` it also prints, per factor, how often the next token after the reply started up to the
value ("Your cousin's name is") is the value's first token (scripts/train_open_memory.py's forced_value_top1);
``--forced-only`` skips the replies. Run from the repository root:
PYTHONPATH=. python docs/open_memory_runs/probe_read_scale.py ADAPTER_DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from peft import PeftModel

from benchmarks import open_facts, open_recall
from peft_deltamem.layer import DeltaMemLayer
from peft_deltamem.real_model import load_smollm2

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from train_open_memory import forced_value_top1  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("adapter")
    parser.add_argument("--scales", default="1,3,10")
    parser.add_argument("--n-val", type=int, default=48)
    parser.add_argument("--simple", action="store_true")
    parser.add_argument("--forced", action="store_true", help="also the value's first token after a started reply")
    parser.add_argument("--forced-only", action="store_true", help="only that (no replies)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base, tok = load_smollm2(cache=False)
    model = PeftModel.from_pretrained(base, args.adapter).eval()
    shape = None
    if args.simple:
        shape = open_facts.OpenFactsConfig(max_facts=1, max_updates=0, max_distractors=0, max_small_talk=1,
                                           max_sessions=1)  # fmt: skip
    val = open_facts.generate_episodes("val", args.n_val, shape, seed=0)
    layers = [m for m in model.modules() if isinstance(m, DeltaMemLayer)]
    originals = [{a: m.delta_mem_out[a].weight.detach().clone() for a in m.delta_mem_out} for m in layers]
    results = {}
    for scale in [float(s) for s in args.scales.split(",")]:
        with torch.no_grad():
            for m, saved in zip(layers, originals):
                for a, w in saved.items():
                    m.delta_mem_out[a].weight.copy_(w * scale)
        results[scale] = {}
        if args.forced or args.forced_only:
            results[scale]["forced_value_top1"] = forced_value_top1(model, tok, val)
            print(f"scale {scale}: forced value top-1 {results[scale]['forced_value_top1']}", flush=True)
        if args.forced_only:
            continue
        r = open_recall.evaluate(model, tok, val, conditions=("memory",))["memory"]
        results[scale].update({k: v for k, v in r.items() if k != "replies"})
        print(f"scale {scale}: recall {r['recall']:.3f} degenerate {r['degenerate']:.2f} {r['replies'][:3]}",
              flush=True)  # fmt: skip
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
