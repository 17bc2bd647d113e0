"""Would a hard threshold on a trained read gate stop the memory tipping replies that need no memory?

g3 and g4 pulled the mean gate on general prompts to 0.03-0.06 and still changed general answers: a small gate is
not a shut one. Here each gate value below a threshold is set to 0 at inference (``DeltaMemLayer._gate`` wrapped; no
training) and, through the chat engine (window of 2, greedy, 32 new tokens), on the val split only:

- recall of told facts with the history only in memory (48 val chats, values and kinds never trained);
- the no-harm prompts that ``scripts/tune_memory_read.py`` holds out (the first quarter of its general and knowledge
  prompts, seed 0; none of the evaluation's general questions), each asked after a val chat with that chat in memory:
  the share of replies that differ from the frozen model's (adapters off) reply to the same window.

The evaluation's own general questions are not asked here: a threshold is chosen from these two measures alone.

    PYTHONPATH=. python docs/open_memory_runs/probe_gate_threshold.py adapters/smollm2-135m-memory 0,0.1,0.2,0.3,0.5
"""

import json
import random
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

adapter, thresholds = sys.argv[1], [float(t) for t in sys.argv[2].split(",")]
torch.set_num_threads(2)
base, tok = load_smollm2(cache=False)
model = PeftModel.from_pretrained(base, adapter).eval()
val = open_facts.generate_episodes("val", 48, None, seed=0)
prompts = general_prompts(open_facts, random.Random(0)) + knowledge_prompts(open_facts, random.Random(1))
random.Random(0).shuffle(prompts)
held_out = prompts[: len(prompts) // 4]  # as tune_memory_read.py holds them out (seed 0, --general-knowledge)
no_harm = [val[i % len(val)].history + [{"role": "user", "content": p}] for i, p in enumerate(held_out)]
frozen = engine_replies(model, tok, no_harm, window=2, memory=False, max_new_tokens=32)

original = DeltaMemLayer._gate
results = []
for threshold in thresholds:

    def gate(self, adapter_name, x, reads, settings, threshold=threshold):
        module = self._modules["delta_mem_read_gate"]._modules[adapter_name]
        g = 2.0 * torch.sigmoid(module(x).float())
        g = torch.where(g >= threshold, g, torch.zeros_like(g))
        batch, length, _ = reads.shape
        heads = settings.num_state_heads
        return (reads.view(batch, length, heads, settings.r) * g.unsqueeze(-1)).view(batch, length, -1)

    DeltaMemLayer._gate = gate
    try:
        recall = score(engine_replies(model, tok, [e.messages for e in val], window=2, memory=True), val)
        replies = engine_replies(model, tok, no_harm, window=2, memory=True, max_new_tokens=32)
    finally:
        DeltaMemLayer._gate = original
    changed = sum(a != b for a, b in zip(replies, frozen, strict=True)) / len(frozen)
    row = {"threshold": threshold, "recall": recall["recall"], "not_told": recall["not_told"],
           "degenerate": recall["degenerate"], "no_harm_changed": changed, "n_no_harm": len(frozen)}  # fmt: skip
    results.append(row)
    print(json.dumps(row), flush=True)
