"""Fit the memory router of a SmolLM2 memory adapter: which replies read the memory (docs/open_memory.md).

The router (``peft_deltamem.agents.router``) scores the user's last message from the frozen model's hidden states
at one layer, mean-pooled over the message's tokens, with a balanced logistic regression fitted on the **train**
split only:

- reads the memory: every question of ``--train-chats`` train chats (``open_facts.all_questions`` and each chat's own
  question, never-told ones included);
- reads none: the no-harm prompts ``scripts/tune_memory_read.py`` trains on (the last three quarters of its general
  and knowledge prompts, seed 0) and the other user messages of the same chats (facts told, small talk).

It then reports, on the val split only (kinds and values never trained), the share of val chats' questions routed
to the memory and the share of the held-out no-harm prompts routed to it, and saves ``memory_router.safetensors``
into the adapter directory (refusing to replace one without ``--overwrite``). The evaluation's general questions are
never used.

    python scripts/train_memory_router.py --adapter adapters/smollm2-135m-memory --layer 12
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _script import doc_parser


def build_parser():
    parser = doc_parser(__doc__)
    parser.add_argument("--adapter", type=Path, required=True, help="adapter directory to save the router into")
    parser.add_argument("--layer", type=int, default=12, help="hidden-state layer the router reads (default: 12)")
    parser.add_argument("--train-chats", type=int, default=300, help="train chats for the questions (default: 300)")
    parser.add_argument("--n-val", type=int, default=48, help="val chats to report on (default: 48)")
    parser.add_argument("--l2", type=float, default=1e-2, help="L2 penalty on standardised weights (default: 0.01)")
    parser.add_argument("--overwrite", action="store_true", help="replace the adapter's existing router")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if not (args.adapter / "adapter_config.json").is_file():
        raise SystemExit(f"{args.adapter} is not an adapter directory (no adapter_config.json)")
    import torch

    from benchmarks import open_facts
    from peft_deltamem.agents.router import ROUTER_FILE, MemoryRouter, pooled_hidden_states
    from peft_deltamem.real_model import load_smollm2
    from train_open_memory import general_prompts, knowledge_prompts

    if (args.adapter / ROUTER_FILE).exists() and not args.overwrite:
        raise SystemExit(f"{args.adapter / ROUTER_FILE} exists; pass --overwrite to replace it")
    torch.manual_seed(0)
    model, tok = load_smollm2(cache=False)
    prompts = general_prompts(open_facts, random.Random(0)) + knowledge_prompts(open_facts, random.Random(1))
    random.Random(0).shuffle(prompts)
    held_out, trained = prompts[: len(prompts) // 4], prompts[len(prompts) // 4 :]  # as tune_memory_read.py
    chats = open_facts.generate_episodes("train", args.train_chats, None, seed=0)
    asks = sorted({q for e in chats for q in [e.question] + [q for q, _ in open_facts.all_questions(e)]})
    other = sorted(set(trained) | {m["content"] for e in chats for m in e.history if m["role"] == "user"})
    router = MemoryRouter.fit(
        pooled_hidden_states(model, tok, asks, args.layer), pooled_hidden_states(model, tok, other, args.layer),
        args.layer, l2=args.l2,
    )  # fmt: skip
    val_asks = [e.question for e in open_facts.generate_episodes("val", args.n_val, None, seed=0)]
    routed = router.reads_memory(model, tok, val_asks)
    misrouted = router.reads_memory(model, tok, held_out)
    report = {
        "layer": args.layer,
        "train": {"memory_questions": len(asks), "other_messages": len(other)},
        "val_questions_reading_memory": sum(routed) / len(routed),
        "val_no_harm_prompts_reading_memory": sum(misrouted) / len(misrouted),
        "val_questions_not_reading": [q for q, r in zip(val_asks, routed) if not r],
        "val_no_harm_prompts_reading": [p for p, r in zip(held_out, misrouted) if r],
    }
    print(json.dumps(report, indent=2))
    print(f"wrote {router.save(args.adapter, overwrite=args.overwrite)}")


if __name__ == "__main__":
    main()
