"""Train and measure δ-mem recall on a real chat model with the :mod:`~peft_deltamem.training.chat_facts` task.

Three conditions on the same episodes, all scored on the started answer's next token:

- ``memory``: the conversation only in memory (written by the episode forward, ``memory_input_ids``), the
  visible stream is the question + started answer;
- ``none``: the same visible stream with an empty memory (the adapter is then an exact no-op, so this is
  also the frozen model without history);
- ``context``: the frozen model (adapter disabled) with the whole conversation in its context.

Everything runs through the episode forward (``memory_input_ids`` + ``input_ids`` in one call), never through
the stateful memory API, so it does not depend on how a memory is carried between calls.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from peft_deltamem.padding import pad_rows
from peft_deltamem.training.chat_facts import (
    ChatFactsConfig,
    generate_episodes,
    tokenize_all_questions,
    tokenize_episode,
)
from peft_deltamem.training.collator import DeltaMemDataCollator

MODES = ("none", "memory", "context")


@torch.no_grad()
def answer_logits(model, features: list[dict], mode: str, pad_id: int) -> torch.Tensor:
    """(B, vocab) float32 logits at each episode's answer position under ``mode`` (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    offset = 0
    if mode == "context":
        ids, mask = pad_rows([f["context_input_ids"] for f in features], pad_id)
        positions = [len(f["memory_input_ids"]) + f["answer_position"] for f in features]
    else:
        ids, mask = pad_rows([f["input_ids"] for f in features], pad_id)
        positions = [f["answer_position"] for f in features]
    keep = sorted(set(positions))
    kwargs = {"input_ids": ids, "attention_mask": mask, "logits_to_keep": torch.tensor(keep), "use_cache": False}
    context = contextlib.nullcontext()
    if mode == "context":
        context = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    elif hasattr(model, "peft_config"):
        rows = [f["memory_input_ids"] if mode == "memory" else [] for f in features]
        segs = [f["memory_segment_ids"] if mode == "memory" else [] for f in features]
        memory, memory_mask = pad_rows(rows, pad_id)
        segments, _ = pad_rows(segs, -1)
        segments[memory_mask == 0] = -1
        kwargs.update(memory_input_ids=memory, memory_attention_mask=memory_mask, memory_segment_ids=segments)
    elif mode == "memory":
        raise ValueError("mode='memory' needs a δ-mem PEFT model")
    with context:
        logits = model(**kwargs).logits
    index = torch.tensor([keep.index(p) - offset for p in positions])
    return logits[torch.arange(len(features)), index].float()


def correct(logits: torch.Tensor, features: list[dict]) -> list[bool]:
    """Per episode: is the gold value the argmax among the slot's candidate values?"""
    return [int(logits[row, torch.tensor(f["candidates"])].argmax()) == f["gold"] for row, f in enumerate(features)]


def score(logits: torch.Tensor, features: list[dict]) -> dict[str, float]:
    """Candidate accuracy (argmax among the slot's 8 values), full-vocabulary top-1 and mean gold log-prob."""
    logp = F.log_softmax(logits, dim=-1)
    correct_count = float(sum(correct(logits, features)))
    top1 = total_logp = 0.0
    for row, f in enumerate(features):
        gold = f["candidates"][f["gold"]]
        top1 += float(int(logp[row].argmax()) == gold)
        total_logp += float(logp[row, gold])
    n = max(len(features), 1)
    return {"accuracy": correct_count / n, "top1": top1 / n, "gold_logprob": total_logp / n, "n": len(features)}


def evaluate(model, features: list[dict], modes=MODES, pad_id: int = 0, batch_size: int = 16) -> dict[str, dict]:
    """Scores of each mode on ``features`` (tokenised episodes), in batches."""
    was_training = model.training
    model.eval()
    out = {}
    try:
        for mode in modes:
            chunks = [
                answer_logits(model, features[i : i + batch_size], mode, pad_id)
                for i in range(0, len(features), batch_size)
            ]
            out[mode] = score(torch.cat(chunks), features)
    finally:
        model.train(was_training)
    return out


def with_other_memory(features: list[dict], shift: int = 1) -> list[dict]:
    """The same episodes, each given the memory stream of episode ``i + shift`` (a control: recall that survives
    a mismatched history is a prior, not memory)."""
    n = len(features)
    return [
        dict(
            f,
            memory_input_ids=features[(i + shift) % n]["memory_input_ids"],
            memory_segment_ids=features[(i + shift) % n]["memory_segment_ids"],
        )
        for i, f in enumerate(features)
    ]


def with_history(features: list[dict], histories: list[list[int]]) -> list[dict]:
    """The same episodes with other history tokens (a truncated or retrieved context): ``context`` mode then
    reads ``history + visible stream``, ``memory`` mode writes ``history`` (one segment)."""
    return [
        dict(f, memory_input_ids=h, memory_segment_ids=[0] * len(h), context_input_ids=h + f["input_ids"])
        for f, h in zip(features, histories, strict=True)
    ]


def gap_recovered(results: dict[str, dict], key: str = "accuracy") -> float | None:
    """(memory - none) / (context - none); None when full context is not better than no memory."""
    none, memory, context = (results[m][key] for m in ("none", "memory", "context"))
    return (memory - none) / (context - none) if context > none else None


# ------------------------------------------------------------------------------------------------ training


@dataclass
class RecipeConfig:
    """One training recipe (adapter shape, optimisation and data); every field is recorded with its results."""

    write_granularity: str = "segment"
    r: int = 8
    num_state_heads: int = 1
    alpha: float = 16.0
    delta_heads: tuple[str, ...] = ("q", "o")
    beta_bias_init: float = -2.0
    layers: list[int] | None = None  # None: every layer
    lr: float = 3e-3
    warmup_steps: int = 10
    schedule: str = "cosine"  # or "constant"
    weight_decay: float = 0.0
    steps: int = 150
    batch_size: int = 8
    max_minutes: float = 30.0
    curriculum_steps: int = 0  # the first steps use one fact and little small talk
    ablation_no_memory: float = 0.0  # share of rows trained with an empty memory
    answer_tokens: str = "all"
    all_questions: bool = False  # train on one question per stated slot in each visible stream
    copy_init: float = 0.0  # > 0: start W_mv and Δ_o as a random orthonormal projection and its transpose (scaled)
    cache_pool: int = 0  # > 0: train on a fixed pool of this many episodes from cached frozen hidden states
    eval_every: int = 25
    n_val: int = 64
    seed: int = 0
    data: dict = field(default_factory=lambda: asdict(ChatFactsConfig()))

    def peft_config(self):
        from peft_deltamem.config import DeltaMemConfig

        return DeltaMemConfig(
            task_type="CAUSAL_LM",
            r=self.r,
            alpha=self.alpha,
            num_state_heads=self.num_state_heads,
            delta_heads=tuple(self.delta_heads),
            write_granularity=self.write_granularity,
            beta_bias_init=self.beta_bias_init,
            layers_to_transform=self.layers,
        )


@torch.no_grad()
def apply_copy_init(model, scale: float, seed: int = 0, shared_qk: bool = False) -> int:
    """Start every adapted layer as a "copy" path: W_mv = Bᵀ and Δ_o = scale · B for a random orthonormal
    B (d × r·H, its own per layer), so that what a token writes as value is (a projection of) its own hidden
    state and a read adds that projection back to the residual stream. Δ_q stays zero. With tied embeddings
    and early layers, whose hidden states still resemble the token embeddings, this gives the adapter a
    prior that transfers across values instead of one output direction to learn per value.
    With ``shared_qk`` also W_mk = W_mq, so that keys and queries of similar hidden states agree from the start.
    Returns the number of layers initialised.
    """
    from peft_deltamem.layer import DeltaMemLayer

    generator = torch.Generator().manual_seed(seed)
    count = 0
    for layer in (m for m in model.modules() if isinstance(m, DeltaMemLayer)):
        for adapter, settings in layer.settings.items():
            if "o" not in settings.delta_heads:
                raise ValueError("copy init needs the 'o' Δ head")
            width, d = settings.width, layer.layout.hidden_size
            basis, _ = torch.linalg.qr(torch.randn(d, width, generator=generator))
            write = layer.delta_mem_write[adapter].weight
            write[2 * width : 3 * width] = basis.T.to(write)
            if shared_qk:
                write[width : 2 * width] = write[:width]
            out = layer.delta_mem_out[adapter].weight
            o_rows = layer.layout.head_out_features("o")
            out[-o_rows:] = (scale * basis).to(out)
            count += 1
    return count


def _lr_factor(recipe: RecipeConfig, step: int) -> float:
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    if recipe.schedule == "constant":
        return 1.0
    progress = (step - recipe.warmup_steps) / max(recipe.steps - recipe.warmup_steps, 1)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _tokenized(episodes, tokenizer, recipe: RecipeConfig) -> list[dict]:
    if recipe.all_questions:
        return [tokenize_all_questions(e, tokenizer, recipe.answer_tokens, recipe.seed) for e in episodes]
    return [tokenize_episode(e, tokenizer, recipe.answer_tokens) for e in episodes]


def _hidden_pool(model, tokenizer, recipe: RecipeConfig, data: ChatFactsConfig) -> dict:
    """``recipe.cache_pool`` train episodes with the frozen hidden states entering the first adapted layer of
    both streams (computed once: the layers below are frozen and read no memory)."""
    from peft_deltamem.training.frozen_prefix import first_adapted_layer, frozen_hidden

    if recipe.cache_pool < recipe.batch_size:
        raise ValueError(
            f"cache_pool={recipe.cache_pool} is smaller than one batch ({recipe.batch_size}); give at least "
            "batch_size episodes (thousands, to generalise), or cache_pool=0 to generate episodes step by step."
        )
    if recipe.curriculum_steps or recipe.ablation_no_memory:
        raise ValueError(
            "cache_pool trains on one fixed pool of episodes; it cannot be combined with curriculum_steps or "
            "ablation_no_memory (set them to 0, or cache_pool=0 for episodes generated step by step)."
        )
    t0 = time.perf_counter()
    features = _tokenized(generate_episodes("train", recipe.cache_pool, data, seed=recipe.seed), tokenizer, recipe)
    pad_id = tokenizer.pad_token_id
    memory = frozen_hidden(model, [f["memory_input_ids"] for f in features], pad_id)
    visible = frozen_hidden(model, [f["input_ids"] for f in features], pad_id)
    return {
        "features": features,
        "memory": memory,
        "visible": visible,
        "order": [],
        "rng": random.Random(f"pool/{recipe.seed}"),
        "episodes": len(features),
        "start_layer": first_adapted_layer(model),
        "tokens": sum(len(f["memory_input_ids"]) + len(f["input_ids"]) for f in features),
        "seconds": time.perf_counter() - t0,
    }


def _pool_step(model, pool: dict, recipe: RecipeConfig):
    """One batch of the pool (a fresh seeded shuffle every epoch) through :func:`cached_episode_forward`."""
    from peft_deltamem.training.frozen_prefix import cached_episode_forward

    if len(pool["order"]) < recipe.batch_size:
        order = list(range(pool["episodes"]))
        pool["rng"].shuffle(order)
        pool["order"] = order
    index = [pool["order"].pop() for _ in range(recipe.batch_size)]
    features = [pool["features"][i] for i in index]
    labels, _ = pad_rows([f["labels"] for f in features], -100)
    segments = None
    if recipe.write_granularity == "segment":
        segments, mask = pad_rows([f["memory_segment_ids"] for f in features], -1)
        segments[mask == 0] = -1
    output = cached_episode_forward(
        model, [pool["memory"][i] for i in index], [pool["visible"][i] for i in index], labels, segments
    )
    _, memory_mask = pad_rows([f["memory_input_ids"] for f in features], 0)
    return {"labels": labels, "memory_attention_mask": memory_mask}, output


def train_recipe(model, tokenizer, recipe: RecipeConfig, log_path: str | Path | None = None, log=print) -> dict:
    """Train the δ-mem adapter of ``model`` (a PeftModel) on generated train episodes; evaluate on ``val``.

    Returns (and writes to ``log_path`` as JSON after every evaluation) the recipe, the per-step losses and
    times, and the validation curve (memory-only accuracy, plus the fixed no-memory / full-context references).
    With ``recipe.cache_pool`` the steps draw from a fixed pool of train episodes whose frozen hidden states
    below the first adapted layer are computed once (that time counts as training time), and run only the
    layers from there up (:mod:`peft_deltamem.training.frozen_prefix`).
    """
    torch.manual_seed(recipe.seed)
    data = ChatFactsConfig(**{k: tuple(v) if k == "slots" else v for k, v in recipe.data.items()})
    easy = ChatFactsConfig(
        **{**asdict(data), "min_facts": 1, "max_facts": 1, "min_small_talk": 0, "max_small_talk": 2, "max_updates": 0}
    )
    pad_id = tokenizer.pad_token_id
    val = [tokenize_episode(e, tokenizer) for e in generate_episodes("val", recipe.n_val, data, seed=recipe.seed)]
    reference = evaluate(model, val, modes=("none", "context"), pad_id=pad_id)
    log(f"val references: none {reference['none']['accuracy']:.3f}, context {reference['context']['accuracy']:.3f}")
    collator = DeltaMemDataCollator(
        pad_token_id=pad_id,
        ablation_probs={"memory_only": 1 - recipe.ablation_no_memory, "no_memory": recipe.ablation_no_memory},
        seed=recipe.seed,
        return_ablation_mode=False,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    history = {"recipe": asdict(recipe), "reference_val": reference, "steps": [], "val": []}
    keys = ("memory_input_ids", "memory_segment_ids", "input_ids", "labels")

    def write():
        if log_path is not None:
            Path(log_path).write_text(json.dumps(history, indent=1))

    def validate(step: int, elapsed: float):
        result = evaluate(model, val, modes=("memory",), pad_id=pad_id)["memory"]
        history["val"].append({"step": step, "minutes": elapsed / 60, **result})
        log(
            f"step {step:4d} {elapsed / 60:5.1f} min  val memory acc {result['accuracy']:.3f} logp "
            f"{result['gold_logprob']:.2f}"
        )
        write()

    model.train()
    start = time.perf_counter()
    train_seconds = 0.0
    pool = None
    if recipe.cache_pool:
        pool = _hidden_pool(model, tokenizer, recipe, data)
        train_seconds = pool["seconds"]
        history["pool"] = {k: v for k, v in pool.items() if k in ("episodes", "start_layer", "seconds", "tokens")}
        log(
            f"pool of {pool['episodes']} episodes: hidden states entering layer {pool['start_layer']} cached in "
            f"{pool['seconds'] / 60:.1f} min (counted as training time)"
        )
    step = 0
    for step in range(recipe.steps):
        if train_seconds / 60 >= recipe.max_minutes:
            log(f"time budget of {recipe.max_minutes} min reached after {step} steps")
            break
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * _lr_factor(recipe, step)
        if pool is not None:
            batch, output = _pool_step(model, pool, recipe)
        else:
            config = easy if step < recipe.curriculum_steps else data
            episodes = generate_episodes(
                "train", recipe.batch_size, config, seed=recipe.seed, start=step * recipe.batch_size
            )
            features = [{k: v for k, v in t.items() if k in keys} for t in _tokenized(episodes, tokenizer, recipe)]
            batch = collator(features)
            output = model(**batch)
        loss = output.loss
        with torch.no_grad():  # full-vocabulary top-1 on every labelled token of the batch (a noisy train curve)
            shifted = batch["labels"][:, 1:]
            hits = (output.logits[:, :-1].argmax(-1) == shifted) & (shifted != -100)
            train_top1 = float(hits.sum() / (shifted != -100).sum().clamp(min=1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        history["steps"].append(
            {
                "step": step + 1,
                "loss": loss.item(),
                "train_top1": train_top1,
                "grad_norm": float(grad_norm),
                "seconds": seconds,
                "memory_tokens": int(batch["memory_attention_mask"].sum()),
            }
        )
        if (step + 1) % 5 == 0:
            log(f"step {step + 1:4d} loss {loss.item():.3f} top1 {train_top1:.2f} ({seconds:.1f} s/step)")
        if (step + 1) % recipe.eval_every == 0:
            validate(step + 1, train_seconds)
    if not history["val"] or history["val"][-1]["step"] != len(history["steps"]):
        validate(len(history["steps"]), train_seconds)
    history["train_minutes"] = train_seconds / 60
    history["wall_minutes"] = (time.perf_counter() - start) / 60
    write()
    model.eval()
    return history


__all__ = [
    "MODES",
    "RecipeConfig",
    "answer_logits",
    "apply_copy_init",
    "correct",
    "evaluate",
    "gap_recovered",
    "score",
    "train_recipe",
    "with_history",
    "with_other_memory",
]
