"""Which of the adapted layers' reads change replies that need no memory, and which carry the recall?

g3's diagnosis (on the evaluation's general questions, nothing chosen from it) pointed at layers 18-24. Here the read
of every adapted layer outside a kept set is shut (its gated read set to 0, so that layer computes exactly what the
frozen layer does, during the writes too); no training. Through the chat engine (window of 2, greedy), on the val
split only, as ``probe_gate_threshold.py`` measures:

- recall of told facts with the history only in memory (48 val chats, values and kinds never trained);
- the share of replies to the no-harm prompts ``scripts/tune_memory_read.py`` holds out (none of the evaluation's
  general questions), each asked after a val chat with that chat in memory, that differ from the frozen model's.

    PYTHONPATH=. python docs/open_memory_runs/probe_read_layers.py adapters/smollm2-135m-memory 18-29 25-29 22-29 18-24
"""

import json
import random
import re
import sys
from pathlib import Path

import torch
from peft import PeftModel

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from benchmarks import open_facts  # noqa: E402
from benchmarks.open_recall import engine_replies, score  # noqa: E402
from peft_deltamem.layer import DeltaMemLayer  # noqa: E402
from peft_deltamem.real_model import load_smollm2  # noqa: E402
from train_open_memory import general_prompts, knowledge_prompts  # noqa: E402

adapter, spans = sys.argv[1], sys.argv[2:]
torch.set_num_threads(2)
base, tok = load_smollm2(cache=False)
model = PeftModel.from_pretrained(base, adapter).eval()
layer_of = {}
for name, module in model.named_modules():
    if isinstance(module, DeltaMemLayer):
        layer_of[module] = int(re.search(r"layers\.(\d+)\.", name).group(1))
val = open_facts.generate_episodes("val", 48, None, seed=0)
prompts = general_prompts(open_facts, random.Random(0)) + knowledge_prompts(open_facts, random.Random(1))
random.Random(0).shuffle(prompts)
held_out = prompts[: len(prompts) // 4]  # as tune_memory_read.py holds them out (seed 0, --general-knowledge)
no_harm = [val[i % len(val)].history + [{"role": "user", "content": p}] for i, p in enumerate(held_out)]
frozen = engine_replies(model, tok, no_harm, window=2, memory=False, max_new_tokens=32)

original = DeltaMemLayer._gate
for span in spans:
    first, last = (int(x) for x in span.split("-"))

    def gate(self, adapter_name, x, reads, settings, first=first, last=last):
        gated = original(self, adapter_name, x, reads, settings)
        return gated if first <= layer_of[self] <= last else torch.zeros_like(gated)

    DeltaMemLayer._gate = gate
    try:
        recall = score(engine_replies(model, tok, [e.messages for e in val], window=2, memory=True), val)
        replies = engine_replies(model, tok, no_harm, window=2, memory=True, max_new_tokens=32)
    finally:
        DeltaMemLayer._gate = original
    changed = sum(a != b for a, b in zip(replies, frozen, strict=True)) / len(frozen)
    row = {"reading_layers": span, "recall": recall["recall"], "not_told": recall["not_told"],
           "degenerate": recall["degenerate"], "no_harm_changed": changed, "n_no_harm": len(frozen)}  # fmt: skip
    print(json.dumps(row), flush=True)
