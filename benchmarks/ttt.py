"""Test-time training, the baseline of both real-model benchmarks (``scripts/bench_real_memory.py`` and
``scripts/bench_open_memory.py``): a LoRA on a plain copy of the model is fine-tuned on one conversation with the
language-model loss, then asked the question with nothing else in its context.

The two benchmarks share the adapter (:func:`ttt_lora`) and the training loop (:func:`ttt_fit`); each starts every
conversation from a fresh LoRA its own way (bench_real_memory resets one seeded LoRA to its initial weights,
bench_open_memory makes a new one per conversation and unloads it afterwards).
"""

from __future__ import annotations

import torch


def ttt_lora(plain):
    """``plain`` with a new LoRA: r 8 (alpha 16) on q_proj and v_proj of every layer (B starts at zero, so the
    model starts as ``plain``)."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(plain, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))


def ttt_fit(model, ids: torch.Tensor, steps: int, lr: float) -> list[float]:
    """Fine-tune ``model``'s trainable parameters on the token ids ``ids`` (1, T): ``steps`` full-sequence steps of
    a fresh AdamW at ``lr`` on the language-model loss (labels = ids). Leaves the model in eval mode; returns the
    loss of every step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


__all__ = ["ttt_fit", "ttt_lora"]
