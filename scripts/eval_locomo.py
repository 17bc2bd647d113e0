"""Evaluate a causal LM, with or without a δ-mem adapter, on LoCoMo long-conversation QA.

Loads the model with transformers' ``AutoModelForCausalLM``/``AutoTokenizer`` (a local directory or a Hub id; the
Hub is only contacted if the id is not cached and ``HF_HUB_OFFLINE`` is unset), optionally a δ-mem adapter with
``PeftModel.from_pretrained``, answers the LoCoMo questions by greedy generation and scores them with
``peft_deltamem.eval.locomo.score_predictions`` (token F1, LoCoMo recipe).

    python scripts/eval_locomo.py --model Qwen/Qwen3-4B-Instruct-2507 --adapter path/to/delta-mem-adapter \\
        --mode memory --output preds.json
    python scripts/eval_locomo.py --model Qwen/Qwen3-4B-Instruct-2507 --mode rag --top-k 10 --output rag.json
    python scripts/eval_locomo.py --model Qwen/Qwen3-4B-Instruct-2507 --mode truncated --max-visible-tokens 512

The output JSON has ``config``, ``args``, ``scores`` (``f1``, ``count``, ``per_category``, ``per_question``),
``predictions`` (one record per question) and ``timing``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from peft_deltamem.eval.extras import require
from peft_deltamem.eval.locomo import CATEGORY_NAMES, DEFAULT_CATEGORIES, MODES, default_locomo_path, load_locomo
from peft_deltamem.eval.locomo_runner import LocomoRunConfig, run_locomo

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local directory or Hub id of the base causal LM")
    parser.add_argument("--adapter", default=None, help="δ-mem adapter directory or Hub id (default: the bare model)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory or id (default: --model)")
    parser.add_argument("--mode", choices=MODES, default="memory")
    parser.add_argument("--data", default=None, help=f"LoCoMo JSON file (default: {default_locomo_path()})")
    parser.add_argument("--limit-conversations", type=int, default=None, help="only the first N conversations")
    parser.add_argument("--limit-questions", type=int, default=None, help="at most N questions per conversation")
    parser.add_argument(
        "--categories", type=int, nargs="+", default=list(DEFAULT_CATEGORIES), help=f"of {CATEGORY_NAMES}"
    )
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-visible-tokens", type=int, default=None, help="visible budget (truncated / memory)")
    parser.add_argument("--max-visible-turns", type=int, default=None, help="visible budget in messages")
    parser.add_argument("--top-k", type=int, default=10, help="retrieved turns (rag)")
    parser.add_argument(
        "--write-chunk-tokens", type=int, default=8192, help="memory mode: tokens per write call (0: one call)"
    )
    parser.add_argument("--max-prompt-tokens", type=int, default=None, help="left-truncate longer prompts")
    parser.add_argument("--role", choices=("user", "alternate"), default="user", help="chat role of the speakers")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help="auto: bfloat16 on GPU, else fp32")
    parser.add_argument(
        "--porter-stemmer",
        action="store_true",
        help="stem tokens with NLTK's Porter stemmer before scoring, as LoCoMo's published numbers do (needs nltk)",
    )
    parser.add_argument("--output", default=None, help="where to write predictions and scores (JSON)")
    args = parser.parse_args(argv)
    if args.mode == "rag":
        try:  # before loading the model
            require("bm25s")
        except ImportError as error:
            parser.error(str(error))
    if args.porter_stemmer:
        try:
            from nltk.stem import PorterStemmer
        except ImportError:
            parser.error("--porter-stemmer needs NLTK: pip install nltk (or drop the flag to score without stemming)")
        args.stemmer = PorterStemmer().stem
    else:
        args.stemmer = None
    return args


def load_model(args: argparse.Namespace, device: torch.device):
    """The tokenizer and the model (with its adapter, if any), in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = DTYPES.get(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device)
    if args.adapter:
        from peft import PeftModel

        import peft_deltamem  # noqa: F401  (registers the DELTA_MEM PEFT type)

        model = PeftModel.from_pretrained(model, args.adapter).to(device)
    return tokenizer, model.eval()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    conversations = load_locomo(args.data or default_locomo_path())[: args.limit_conversations]
    tokenizer, model = load_model(args, device)
    config = LocomoRunConfig(
        mode=args.mode,
        max_new_tokens=args.max_new_tokens,
        max_visible_tokens=args.max_visible_tokens,
        max_visible_turns=args.max_visible_turns,
        top_k=args.top_k,
        categories=tuple(args.categories),
        write_chunk_tokens=args.write_chunk_tokens or None,
        max_prompt_tokens=args.max_prompt_tokens,
        limit_questions=args.limit_questions,
        role=args.role,
    )
    result = run_locomo(
        model, tokenizer, conversations, config, device, progress=lambda m: print(m, flush=True), stemmer=args.stemmer
    )
    result["args"] = {k: v for k, v in vars(args).items() if k != "stemmer"}
    scores = result["scores"]
    print(f"mode={args.mode} F1={scores['f1']:.4f} over {scores['count']} questions")
    for category, entry in scores["per_category"].items():
        print(f"  {category} {entry['name']:<12} F1={entry['f1']:.4f} (n={entry['count']})")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2, ensure_ascii=False))
        print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    main(sys.argv[1:])
