"""Training and scoring for the memory benchmark: the tiny backbone, δ-mem and LoRA adapters, exact-match accuracy.

Checkpoints are cached under a local directory keyed by a hash of everything that determines them (never
downloaded; re-created when missing): the backbone as ``save_pretrained`` output, adapters as PEFT adapter
directories.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from peft_deltamem.tiny_models import tiny_model
from peft_deltamem.training import DeltaMemDataCollator

from .bench_data import IGNORE_INDEX, Feature


@dataclass(frozen=True)
class BackboneSpec:
    """Architecture of the tiny Llama backbone (sdpa attention keeps long contexts linear in memory)."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128

    def build(self, vocab_size: int, seed: int = 0) -> PreTrainedModel:
        """A randomly initialised backbone (``seed``) in eval mode."""
        return tiny_model(
            "llama",
            seed=seed,
            vocab_size=vocab_size,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=65536,
            attn_implementation="sdpa",
        )


@dataclass(frozen=True)
class TrainSpec:
    """Optimisation of one training phase (AdamW, linear warm-up then cosine decay, grad-norm clip 1)."""

    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    warmup: float = 0.1
    weight_decay: float = 0.0


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (dataclasses are converted with ``asdict``)."""

    def plain(x: Any) -> Any:
        return asdict(x) if hasattr(x, "__dataclass_fields__") else x

    text = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def count_trainable(model: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_rank_for_budget(backbone: torch.nn.Module, budget: int, targets: Sequence[str]) -> int:
    """The LoRA rank whose trainable-parameter count on ``targets`` is closest to ``budget``."""
    per_rank = sum(
        m.in_features + m.out_features
        for name, m in backbone.named_modules()
        if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in targets
    )
    return max(1, round(budget / per_rank))


# ----------------------------------------------------------------------------------------------------- batches


class _Batches:
    """Batches of similar length (a random window of the length-sorted pool), to waste little on padding."""

    def __init__(self, features: Sequence[Feature], collator: DeltaMemDataCollator, batch_size: int, seed: int):
        self.features = sorted(features, key=lambda f: (len(f["memory_input_ids"]), len(f["input_ids"])))
        self.collator = collator
        self.batch_size = min(batch_size, len(features))
        self.rng = random.Random(seed)

    def __next__(self) -> dict[str, torch.Tensor]:
        span = min(len(self.features), 4 * self.batch_size)
        start = self.rng.randrange(len(self.features) - span + 1)
        return self.collator(self.rng.sample(self.features[start : start + span], self.batch_size))


def _model_inputs(batch: dict[str, torch.Tensor], memory: bool) -> dict[str, torch.Tensor]:
    keys = ["input_ids", "attention_mask", "labels"]
    if memory and batch["memory_input_ids"].shape[1] > 0:
        keys += ["memory_input_ids", "memory_attention_mask", "memory_segment_ids"]
    return {k: batch[k] for k in keys}


def train(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    features: Sequence[Feature],
    spec: TrainSpec,
    seed: int,
    memory: bool,
    log: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Train the trainable parameters of ``model`` on ``features``; ``memory`` passes the memory stream.

    Returns ``{"seconds", "final_loss"}`` (final loss: mean of the last 10% of steps).
    """
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    warmup = max(1, int(spec.warmup * spec.steps))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, spec.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    batches = _Batches(features, DeltaMemDataCollator(tokenizer, return_ablation_mode=False), spec.batch_size, seed)
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(spec.steps):
        loss = model(**_model_inputs(next(batches), memory)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if log is not None and (step + 1) % max(1, spec.steps // 5) == 0:
            log(f"    step {step + 1}/{spec.steps} loss {sum(losses[-20:]) / len(losses[-20:]):.3f}")
    model.eval()
    tail = losses[-max(1, spec.steps // 10) :]
    return {"seconds": time.perf_counter() - start, "final_loss": sum(tail) / len(tail)}


# ----------------------------------------------------------------------------------------------------- scoring


@torch.no_grad()
def exact_match(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    features: Sequence[Feature],
    memory: bool,
    batch_size: int = 64,
) -> list[bool]:
    """Per feature: is the greedy next token after the prompt the answer (answers are single words/tokens)?

    Only the first supervised position (the episode's own question) is scored. With ``memory`` the memory
    stream is written into an empty memory first (one δ-mem episode per batch).
    """
    collator = DeltaMemDataCollator(tokenizer, return_ablation_mode=False)
    model.eval()
    correct: list[bool] = []
    for i in range(0, len(features), batch_size):
        batch = collator(features[i : i + batch_size])
        inputs = _model_inputs(batch, memory)
        labels = inputs.pop("labels")
        logits = model(**inputs).logits
        first = (labels != IGNORE_INDEX).float().argmax(dim=1)
        rows = torch.arange(labels.shape[0])
        predicted = logits[rows, first - 1].argmax(-1)
        correct += (predicted == labels[rows, first]).tolist()
    return correct


# ------------------------------------------------------------------------------------------------------ caching


def cached_backbone(
    cache_dir: Path,
    key: str,
    make: Callable[[], tuple[PreTrainedModel, dict[str, Any]]],
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """Load the backbone cached under ``cache_dir/backbone-<key>``, or ``make()`` it and save it there.

    ``make`` returns the trained model and a JSON-able info dict (saved as ``bench_info.json``).
    """
    from transformers import AutoModelForCausalLM

    path = Path(cache_dir) / f"backbone-{key}"
    info_file = path / "bench_info.json"
    if info_file.is_file():
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
        return model, {**json.loads(info_file.read_text()), "cached": True}
    model, info = make()
    model.save_pretrained(path)
    info_file.write_text(json.dumps(info, indent=2))
    return model, {**info, "cached": False}


def cached_adapter(
    cache_dir: Path,
    key: str,
    backbone: PreTrainedModel,
    make: Callable[[PreTrainedModel], tuple[torch.nn.Module, dict[str, Any]]],
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A PEFT model on a private copy of ``backbone``: loaded from ``cache_dir/adapter-<key>`` or trained by
    ``make(copy)`` (which returns the PEFT model and an info dict) and saved there."""
    from peft import PeftModel

    path = Path(cache_dir) / f"adapter-{key}"
    info_file = path / "bench_info.json"
    base = copy.deepcopy(backbone)
    if info_file.is_file():
        model = PeftModel.from_pretrained(base, path).eval()
        return model, {**json.loads(info_file.read_text()), "cached": True}
    model, info = make(base)
    model.save_pretrained(path)
    info_file.write_text(json.dumps(info, indent=2))
    return model.eval(), {**info, "cached": False}
