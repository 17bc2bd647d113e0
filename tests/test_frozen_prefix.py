"""Training from cached hidden states of the frozen layers below the adapters equals the whole-model episode."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_deltamem import DeltaMemConfig
from peft_deltamem.padding import pad_rows
from peft_deltamem.tiny_models import tiny_model
from peft_deltamem.training.frozen_prefix import cached_episode_forward, first_adapted_layer, frozen_hidden


def _model(granularity: str, layers, **config_kwargs):
    config = DeltaMemConfig(
        task_type="CAUSAL_LM",
        r=4,
        num_state_heads=2,
        write_granularity=granularity,
        layers_to_transform=layers,
        **config_kwargs,
    )
    model = get_peft_model(tiny_model("llama", num_layers=4), config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero Δ heads and gates, so that the memory changes the outputs
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    return model


def _rows(lengths, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=generator).tolist() for n in lengths]


@pytest.mark.parametrize("granularity", ["token", "segment"])
@pytest.mark.parametrize("layers", [[2, 3], [1, 3]])
def test_cached_forward_equals_the_episode_forward(granularity, layers):
    model = _model(granularity, layers)
    model.train()
    memory_rows, visible_rows = _rows([11, 7, 14], 0), _rows([5, 9, 6], 1)
    memory, memory_mask = pad_rows(memory_rows, 0)
    segments = torch.where(memory_mask.bool(), torch.arange(memory.shape[1]) // 3, -1)
    visible, mask = pad_rows(visible_rows, 0)
    labels = torch.where(mask.bool(), visible, -100)
    params = [p for p in model.parameters() if p.requires_grad]

    full = model(
        input_ids=visible, attention_mask=mask, labels=labels, memory_input_ids=memory,
        memory_attention_mask=memory_mask, memory_segment_ids=segments,
    )  # fmt: skip
    full_grads = torch.autograd.grad(full.loss, params)

    assert first_adapted_layer(model) == layers[0]
    memory_hidden = frozen_hidden(model, memory_rows, pad_id=0, batch_size=2)
    hidden = frozen_hidden(model, visible_rows, pad_id=0)
    assert [h.shape[0] for h in memory_hidden] == [11, 7, 14] and not any(h.requires_grad for h in hidden)
    cached = cached_episode_forward(
        model, memory_hidden, hidden, labels=labels, memory_segment_ids=segments if granularity == "segment" else None
    )
    cached_grads = torch.autograd.grad(cached.loss, params)

    assert torch.allclose(cached.logits[mask.bool()], full.logits[mask.bool()], atol=1e-5)
    assert torch.allclose(cached.loss, full.loss, atol=1e-6)
    for a, b in zip(cached_grads, full_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    # the decoder has its whole stack again, and the memory did change the answer
    assert len(model.get_base_model().get_decoder().layers) == 4
    with model.disable_adapter():
        plain = model(input_ids=visible, attention_mask=mask).logits
    assert not torch.allclose(plain[mask.bool()], full.logits[mask.bool()], atol=1e-3)


def test_plain_cached_forward_of_a_lora_model_equals_its_forward():
    from peft import LoraConfig

    model = get_peft_model(
        tiny_model("llama", num_layers=4),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[2, 3], init_lora_weights=False),
    )
    rows = _rows([6, 9], 2)
    ids, mask = pad_rows(rows, 0)
    labels = torch.where(mask.bool(), ids, -100)
    full = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert first_adapted_layer(model) == 2
    cached = cached_episode_forward(model, None, frozen_hidden(model, rows, pad_id=0), labels=labels)
    assert torch.allclose(cached.logits[mask.bool()], full.logits[mask.bool()], atol=1e-5)
    assert torch.allclose(cached.loss, full.loss, atol=1e-6)


def test_refuses_a_model_without_adapter_layers():
    with pytest.raises(ValueError, match="no adapter layers"):
        first_adapted_layer(tiny_model("llama"))


def test_refuses_gemma_whose_embeddings_are_scaled():
    config = DeltaMemConfig(task_type="CAUSAL_LM", r=4, layers_to_transform=[1])
    model = get_peft_model(tiny_model("gemma3_text"), config)
    with pytest.raises(ValueError, match="Gemma"):
        frozen_hidden(model, [[3, 4, 5]], pad_id=0)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"cache_pool": 4}, "smaller than one batch"),
        ({"cache_pool": -1}, "smaller than one batch"),
        ({"cache_pool": 64, "curriculum_steps": 10}, "cannot be combined with curriculum_steps"),
    ],
)
def test_a_recipe_with_a_pool_refuses_what_it_cannot_do(changes, message):
    from benchmarks.real_recall import RecipeConfig, _hidden_pool

    with pytest.raises(ValueError, match=message):
        _hidden_pool(None, None, RecipeConfig(batch_size=8, **changes), None)


def test_refuses_a_decoder_that_mixes_layer_types():
    config = DeltaMemConfig(task_type="CAUSAL_LM", r=4, layers_to_transform=[1])
    model = get_peft_model(
        tiny_model("qwen2", num_layers=2, layer_types=["sliding_attention", "full_attention"], use_sliding_window=True),
        config,
    )
    with pytest.raises(ValueError, match="mixes layer types"):
        frozen_hidden(model, [[3, 4, 5]], pad_id=0)


@pytest.mark.parametrize("granularity", ["token", "segment"])
def test_cached_message_writes_equal_the_memory_api_one_call_per_message(granularity):
    """The chat engine writes each message with a call of its own; the cached path must give the same memory
    (rows with different numbers of messages) and the same read logits, and carry gradients through the writes."""
    from peft_deltamem.training.frozen_prefix import cached_message_writes, cached_read_logits

    model = _model(granularity, [2, 3])
    messages = [_rows([5, 8, 3], 10), _rows([6], 11), _rows([4, 7], 12)]
    visible = _rows([6, 4, 9], 13)
    expected, reads = [], []
    with torch.no_grad():
        for row, question in zip(messages, visible, strict=True):
            memory = model.new_memory(batch_size=1)
            for message in row:
                ids = torch.tensor([message])
                kwargs = {"memory_segment_ids": torch.zeros_like(ids)} if granularity == "segment" else {}
                model(input_ids=ids, memory=memory, use_cache=False, **kwargs)
            expected.append(memory)
            ids = torch.tensor([question])
            reads.append(model(input_ids=ids, memory=memory, memory_writes=False).logits[0, -2:])
    hidden = [frozen_hidden(model, row, pad_id=0) for row in messages]
    states = cached_message_writes(model, hidden, segment_writes=granularity == "segment")
    for key, state in states.items():
        for i, memory in enumerate(expected):
            assert torch.allclose(state[i], memory.states[key[0]][0], atol=1e-5), key
    logits = cached_read_logits(model, frozen_hidden(model, visible, pad_id=0), states, last=2)
    assert torch.allclose(logits, torch.stack(reads), atol=1e-4)
    frozen = cached_read_logits(model, frozen_hidden(model, visible, pad_id=0), None, last=2)
    assert not torch.allclose(frozen, logits, atol=1e-3)  # the memory changed the answer
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(logits.sum(), [p for _, p in named], allow_unused=True)
    write_weights = [g for (n, _), g in zip(named, grads, strict=True) if "delta_mem_write" in n]
    assert write_weights and all(g is not None and g.abs().sum() > 0 for g in write_weights)
