"""δ-mem really learns to carry a fact through its memory, trained with the stock Trainer.

The recipe of method.md's small-scale experiments: a tiny backbone first learns to answer from *context*, is
frozen, then only δ-mem trains (through ``transformers.Trainer`` and ``DeltaMemDataCollator``) with the fact
only in the *memory* stream. Held-out recall must be far above chance (1/16) and far above the same model with
an empty memory or with another episode's memory.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import Trainer

from conftest import cpu_training_args
from peft_deltamem import DeltaMemConfig
from peft_deltamem.recall_task import VALUES, answer_accuracy, build_tokenizer, sample_batch, train_steps
from peft_deltamem.tiny_models import tiny_model
from peft_deltamem.training import DeltaMemDataCollator

BACKBONE_STEPS = 150
DELTA_MEM_STEPS = 100
HELD_OUT = 256


pytestmark = pytest.mark.usefixtures("one_thread")


def backbone_answering_from_context(tokenizer, seed: int):
    model = tiny_model("llama", seed=seed, vocab_size=len(tokenizer))
    train_steps(model, tokenizer, BACKBONE_STEPS, in_context=True, seed=seed, lr=5e-3)
    return model.requires_grad_(False)


def recall_episodes(tokenizer, n: int, seed: int) -> Dataset:
    batch = sample_batch(tokenizer, n, torch.Generator().manual_seed(seed))
    memory = batch["memory_input_ids"]
    return Dataset.from_dict(
        {
            "memory_input_ids": memory.tolist(),
            "memory_segment_ids": torch.zeros_like(memory).tolist(),
            "input_ids": batch["input_ids"].tolist(),
            "labels": batch["labels"].tolist(),
        }
    )


@torch.no_grad()
def held_out(model, tokenizer, seed: int) -> dict[str, tuple[float, float]]:
    """(accuracy, loss) with the episode's memory, with an empty memory and with another episode's memory."""
    model.eval()
    batch = sample_batch(tokenizer, HELD_OUT, torch.Generator().manual_seed(seed))
    answers = batch.pop("answers")
    results = {}
    out = model(**batch)
    results["memory"] = (answer_accuracy(out.logits, answers), out.loss.item())
    shuffled = {**batch, "memory_input_ids": batch["memory_input_ids"].roll(1, dims=0)}
    out = model(**shuffled)
    results["other_memory"] = (answer_accuracy(out.logits, answers), out.loss.item())
    visible = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    out = model(**visible, memory_writes=False)
    results["empty_memory"] = (answer_accuracy(out.logits, answers), out.loss.item())
    return results


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_delta_mem_recalls_a_fact_only_seen_in_memory(tmp_path, seed):
    tokenizer = build_tokenizer()
    base = backbone_answering_from_context(tokenizer, seed)
    model = get_peft_model(base, DeltaMemConfig(task_type="CAUSAL_LM"))
    args = cpu_training_args(
        tmp_path,
        max_steps=DELTA_MEM_STEPS,
        per_device_train_batch_size=32,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=DELTA_MEM_STEPS,
        seed=seed,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=recall_episodes(tokenizer, DELTA_MEM_STEPS * 32, seed=seed + 1),
        data_collator=DeltaMemDataCollator(tokenizer),
    )
    trainer.train()
    results = held_out(model, tokenizer, seed=1000 + seed)
    print(f"seed {seed}: " + ", ".join(f"{k} acc {a:.3f} loss {loss:.3f}" for k, (a, loss) in results.items()))
    chance = 1 / len(VALUES)
    assert results["memory"][0] >= 0.8 > 10 * chance
    assert results["empty_memory"][0] <= 0.3
    assert results["other_memory"][0] <= 0.3
    assert results["memory"][1] < results["empty_memory"][1]
