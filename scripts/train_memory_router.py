"""Fit the memory router of a SmolLM2 memory adapter: which replies read the memory (docs/open_memory.md).

The router (``peft_deltamem.agents.router``) scores the user's last message from the frozen model's hidden states
at one layer, mean-pooled over the message's tokens, with a balanced logistic regression fitted on the **train**
split only:

- reads the memory: every question of ``--train-chats`` train chats (``open_facts.all_questions`` and each chat's own
  question, never-told ones included);
- reads none: the no-harm prompts ``scripts/tune_memory_read.py`` trains on (the last three quarters of its general
  and knowledge prompts, seed 0), the first three quarters of :data:`PERSONAL_WORLD` (world questions asked in the
  words of a personal one: "What do I call my mother's brother?") and the other user messages of the same chats
  (facts told, small talk).

It then reports, on the val split only (kinds and values never trained), the share of val chats' questions routed
to the memory and the share of the held-out no-harm prompts and of the last quarter of :data:`PERSONAL_WORLD` routed
to it, and saves ``memory_router.safetensors`` into the adapter directory (refusing to replace one without
``--overwrite``). The evaluation's general questions (both sets) are never used.

    python scripts/train_memory_router.py --adapter adapters/smollm2-135m-memory --layer 12
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _script import doc_parser

# World questions in the words of a personal question ("we", "you", "I", "my"): the answer is general knowledge or
# advice, never something the user told. Written after the first router's test run (docs/open_memory.md) and before
# any score of a router fitted with them; no question type of the evaluation's general sets (baby animals, planets,
# capitals, colours, opposites, months) is among them. Three quarters are fitted, the last quarter is reported on val.
PERSONAL_WORLD = [
    "How many fingers do you have on one hand?", "What do you use to cut paper?",
    "Where do we keep milk so it stays cold?", "What do you wear on your feet?", "What should I wear when it rains?",
    "How do I boil an egg?", "What do you call a person who fixes teeth?", "Which hand do most of us write with?",
    "What do you need to open a locked door?", "How many eyes do we have?", "What do I add to tea to make it sweet?",
    "Where do you go to borrow a book?", "What do we use to see in the dark?", "How do you say thank you in Spanish?",
    "What do you put on a letter before you post it?", "What do we celebrate on the first of January?",
    "Which way do you turn a screw to tighten it?", "How long do you boil pasta, roughly?",
    "What do you call the meal we eat in the morning?", "What can I use instead of butter when baking?",
    "How many teeth do we have as adults?", "What do you need to make a cup of coffee?",
    "Where does our food go after we swallow it?", "Which organ do we think with?",
    "What do you call a house made of ice?", "Why do we need sleep?", "How do you make a paper airplane?",
    "What do you use to measure temperature?", "What do you put on bread to make a sandwich?",
    "What do you call someone who flies a plane?", "How do I convert kilometres to miles?",
    "What do you plant to grow an apple tree?", "Where do you buy stamps?", "How can I keep my plants healthy?",
    "What do I need to bake a cake?", "How many days do we have in a leap year?",
    "What do you call the person who leads an orchestra?", "What do you use to sweep the floor?",
    "Where do we get wool from?", "Which part of your body do you smell with?",
    "How do you greet someone in Japanese?", "What should you do if you burn your finger?",
    "Which tool do you use to hammer a nail?", "What do we call the frozen land at the South Pole?",
    "How many strings do you find on most guitars?", "What do you call a shop that sells bread?",
    "What do we use to tell the time?", "What do you need to take a photo?", "What do I call my mother's brother?",
    "What do I call my father's sister?", "Can you tell me a fun fact about octopuses?",
    "Could you explain what photosynthesis is?", "Can you recommend a good book for learning to program?",
    "Do you know who invented the telephone?", "Can you tell me how rainbows form?",
    "Do you know what the largest desert is?", "Can you give me a synonym for happy?",
    "Would you tell me what a noun is?", "Do we have to water cactuses often?", "Why do we have seasons?",
    "Why do we yawn?", "What keeps us on the ground when we jump?", "Where do we find sand dunes?",
    "What do I need to go swimming?", "What should I pack for a day at the beach?", "How do I tie a tie?",
    "What is the best way for me to learn to type faster?", "What do you call the person who brings our mail?",
    "How do we know how old a tree is?", "What do you call a word that sounds like another word?",
    "How do I make my bread rise?", "What do we use to dig a hole in the garden?",
]  # fmt: skip


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
    cut = len(PERSONAL_WORLD) * 3 // 4
    fitted_world, held_out_world = PERSONAL_WORLD[:cut], PERSONAL_WORLD[cut:]
    evaluation = {q for q, _ in open_facts.GENERAL + open_facts.GENERAL_FRESH}
    if shared := evaluation & set(PERSONAL_WORLD + trained):
        raise SystemExit(f"the evaluation's general questions are among the router's negatives: {sorted(shared)}")
    other = sorted(
        set(trained) | set(fitted_world) | {m["content"] for e in chats for m in e.history if m["role"] == "user"}
    )
    router = MemoryRouter.fit(
        pooled_hidden_states(model, tok, asks, args.layer), pooled_hidden_states(model, tok, other, args.layer),
        args.layer, l2=args.l2,
    )  # fmt: skip
    val_asks = [e.question for e in open_facts.generate_episodes("val", args.n_val, None, seed=0)]
    routed = router.reads_memory(model, tok, val_asks)
    misrouted = router.reads_memory(model, tok, held_out)
    world_misrouted = router.reads_memory(model, tok, held_out_world)
    report = {
        "layer": args.layer,
        "train": {"memory_questions": len(asks), "other_messages": len(other)},
        "val_questions_reading_memory": sum(routed) / len(routed),
        "val_no_harm_prompts_reading_memory": sum(misrouted) / len(misrouted),
        "held_out_personal_world_questions_reading_memory": sum(world_misrouted) / len(world_misrouted),
        "val_questions_not_reading": [q for q, r in zip(val_asks, routed) if not r],
        "val_no_harm_prompts_reading": [p for p, r in zip(held_out, misrouted) if r],
        "held_out_personal_world_questions_reading": [p for p, r in zip(held_out_world, world_misrouted) if r],
    }
    print(json.dumps(report, indent=2))
    print(f"wrote {router.save(args.adapter, overwrite=args.overwrite)}")


if __name__ == "__main__":
    main()
