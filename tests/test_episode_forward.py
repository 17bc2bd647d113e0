"""The memory-episode forward that a stock Trainer drives (memory stream written, visible stream read)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_peft, random_ids
from peft_deltamem.tiny_models import tiny_model


def episode_batch(seed=0):
    memory = random_ids(2, 14, seed=seed)
    memory_mask = torch.ones_like(memory)
    memory_mask[1, :5] = 0  # left-padded memory row
    visible = random_ids(2, 6, seed=seed + 1)
    labels = visible.clone()
    labels[:, :3] = -100
    return dict(
        memory_input_ids=memory,
        memory_attention_mask=memory_mask,
        input_ids=visible,
        attention_mask=torch.ones_like(visible),
        labels=labels,
    )


def test_episode_forward_equals_manual_write_then_read():
    model = make_peft()
    batch = episode_batch()
    with torch.no_grad():
        episode = model(**batch)
        mem = model.new_memory(2)
        model(input_ids=batch["memory_input_ids"], attention_mask=batch["memory_attention_mask"], memory=mem)
        manual = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            memory=mem,
            memory_writes=False,
        )
    torch.testing.assert_close(episode.logits, manual.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(episode.loss, manual.loss, atol=1e-6, rtol=0)


def test_episode_starts_from_empty_memory_in_eval_and_train():
    model = make_peft()
    batch = episode_batch()
    with torch.no_grad():
        first = model(**batch).logits
        model(input_ids=random_ids(2, 9, seed=7), memory=model.new_memory(2))  # unrelated memory written between
        second = model(**batch).logits
    torch.testing.assert_close(first, second, atol=1e-6, rtol=0)


def test_memory_reaches_the_visible_stream():
    model = make_peft()
    batch = episode_batch()
    with torch.no_grad():
        with_memory = model(**batch).logits
        without = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (with_memory - without).abs().max() > 1e-4


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_episode_gradients_match_without_checkpointing(mode):
    def grads(checkpointing):
        model = make_peft(tiny_model("llama", seed=2), num_state_heads=2)
        model.train()
        if checkpointing:
            kwargs = {"use_reentrant": mode == "reentrant"}
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            model.enable_input_require_grads()
        model(**episode_batch()).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    write_params = [n for n in plain if "delta_mem_write" in n or "beta_bias" in n]
    assert write_params and all(plain[n].abs().sum() > 0 for n in write_params)
    assert set(plain) == set(checkpointed)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_write_sparsity_penalty_is_added_in_training():
    batch = episode_batch()
    losses = {}
    for weight in (0.0, 10.0):
        model = make_peft(tiny_model("llama", seed=3), write_sparsity_weight=weight)
        model.train()
        losses[weight] = model(**batch).loss.item()
    # initial gate: sigmoid(-1.5) ~ 0.182 everywhere, so the penalty is 10 * (0.182 - 0.05)^2
    expected = 10.0 * (torch.sigmoid(torch.tensor(-1.5)).item() - 0.05) ** 2
    assert losses[10.0] - losses[0.0] == pytest.approx(expected, rel=1e-3)


def test_write_sparsity_penalty_is_weighed_by_the_micro_batch_share_of_label_tokens():
    # Under gradient accumulation the Trainer passes num_items_in_batch and sums micro-batch losses.
    batch = episode_batch()
    label_tokens = int((batch["labels"][:, 1:] != -100).sum())
    penalties = {}
    for total in (label_tokens, 4 * label_tokens):
        losses = {}
        for weight in (0.0, 10.0):
            model = make_peft(tiny_model("llama", seed=3), write_sparsity_weight=weight)
            model.train()
            losses[weight] = model(**batch, num_items_in_batch=torch.tensor(total)).loss.item()
        penalties[total] = losses[10.0] - losses[0.0]
    expected = 10.0 * (torch.sigmoid(torch.tensor(-1.5)).item() - 0.05) ** 2
    assert penalties[label_tokens] == pytest.approx(expected, rel=1e-3)
    assert penalties[4 * label_tokens] == pytest.approx(expected / 4, rel=1e-3)


def test_episode_and_memory_together_are_refused():
    model = make_peft()
    with pytest.raises(ValueError, match="either memory= .* or memory_input_ids="):
        model(**episode_batch(), memory=model.new_memory(2))


def test_generate_with_a_memory_stream_reads_it_without_writing():
    model = make_peft()
    model.generation_config.eos_token_id = None
    batch = episode_batch()
    stream = dict(input_ids=batch["memory_input_ids"], attention_mask=batch["memory_attention_mask"])
    prompt = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        episode = model.generate(
            **prompt,
            memory_input_ids=stream["input_ids"],
            memory_attention_mask=stream["attention_mask"],
            max_new_tokens=4,
            do_sample=False,
        )
        mem = model.new_memory(2)
        model(**stream, memory=mem)
        manual = model.generate(**prompt, memory=mem, memory_writes=False, max_new_tokens=4, do_sample=False)
        empty = model.generate(**prompt, memory_writes=False, max_new_tokens=4, do_sample=False)
    assert torch.equal(episode, manual)
    assert not torch.equal(episode, empty)
