"""What does the memory do to the model's own next-token logits where the value is due?

For val episodes (values and kinds never trained) laid out as the engine serves them, the reply is started up to
the value ("Your cousin's name is"); the memory is written from the messages that left the window (one call per
message) and the logits of the adapter with that memory are compared with the frozen model's (adapters off). Prints,
per episode, the value's first token, the token the memory raises most, and the change of the value's logit; then
how often that most-raised token is the value and the value's median rank among the changes. Run from the
repository root: PYTHONPATH=. python docs/open_memory_runs/probe_logit_effect.py ADAPTER_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from peft import PeftModel

from benchmarks import open_facts
from peft_deltamem.real_model import load_smollm2
from peft_deltamem.training.frozen_prefix import cached_message_writes, cached_read_logits, frozen_hidden

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from train_open_memory import started_replies  # noqa: E402


def main() -> None:
    torch.set_num_threads(2)
    base, tok = load_smollm2(cache=False)
    model = PeftModel.from_pretrained(base, sys.argv[1]).eval()
    items = started_replies(tok, open_facts.generate_episodes("val", 48, None, seed=0))
    hits, ranks = 0, []
    with torch.no_grad():
        for writes, row, target in items:
            hidden = frozen_hidden(model, writes + [row], tok.pad_token_id)
            states = cached_message_writes(model, [hidden[:-1]])
            change = (cached_read_logits(model, [hidden[-1]], states, last=1) -
                      cached_read_logits(model, [hidden[-1]], None, last=1))[0, -1]  # fmt: skip
            hits += int(change.argmax() == target)
            ranks.append(int((change > change[target]).sum()))
            print(f"value {tok.decode([target])!r}: most raised {tok.decode([int(change.argmax())])!r} "
                  f"(+{change.max().item():.2f}), the value's change {change[target].item():+.2f}")  # fmt: skip
    print(f"most raised token is the value: {hits}/{len(items)}; the value's median rank among the changes: "
          f"{sorted(ranks)[len(ranks) // 2]} of {change.numel()}")  # fmt: skip


if __name__ == "__main__":
    main()
