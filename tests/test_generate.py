"""generate(): same tokens as a manual loop, padding, prefill+decode == full forward, refusals."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from conftest import make_peft, random_ids
from peft_deltamem.tiny_models import tiny_model

NEW = 6


def peft_for_generation(**kwargs):
    model = make_peft(**kwargs)
    model.generation_config.eos_token_id = None  # never stop early: compare fixed-length outputs
    model.generation_config.pad_token_id = 0
    return model


def manual_loop(model, ids, mask, sample_seed=None):
    """Prefill, then one forward per token with a KV cache; greedy or multinomial sampling."""
    cache = DynamicCache(config=model.config)
    tokens, step_ids = [], ids
    if sample_seed is not None:
        torch.manual_seed(sample_seed)
    with torch.no_grad():
        for _ in range(NEW):
            out = model(input_ids=step_ids, attention_mask=mask, past_key_values=cache, use_cache=True)
            last = out.logits[:, -1].float()
            if sample_seed is None:
                nxt = last.argmax(-1, keepdim=True)
            else:
                nxt = torch.multinomial(torch.softmax(last, -1), 1)
            tokens.append(nxt)
            step_ids = nxt
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    return torch.cat(tokens, 1)


def test_greedy_generate_equals_manual_loop_and_writes_the_same_memory():
    model = peft_for_generation()
    prompt = random_ids(1, 7)
    mask = torch.ones_like(prompt)
    history = random_ids(1, 11, seed=3)
    with torch.no_grad():
        model(input_ids=history)
        generated = model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    after_generate = model.get_memory_state().states
    model.reset_memory()
    with torch.no_grad():
        model(input_ids=history)
    manual = manual_loop(model, prompt, mask)
    assert torch.equal(generated[:, prompt.shape[1] :], manual)
    # generate() feeds the last token only if it asks for another one: the manual loop fed all NEW.
    model.reset_memory()
    with torch.no_grad():
        model(input_ids=history)
        model(input_ids=torch.cat([prompt, manual[:, :-1]], 1))
    for name, state in model.get_memory_state().states.items():
        torch.testing.assert_close(state, after_generate[name], atol=1e-5, rtol=0)


def test_memory_changes_what_is_generated():
    model = peft_for_generation()
    prompt = random_ids(1, 5)
    with torch.no_grad():
        empty = model.generate(
            input_ids=prompt, max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        model.reset_memory()
        model(input_ids=random_ids(1, 30, seed=9))
        full = model.generate(
            input_ids=prompt, max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    assert (empty.logits[0] - full.logits[0]).abs().max() > 1e-4


def test_sampling_generate_equals_manual_sampling_loop():
    model = peft_for_generation()
    prompt = random_ids(1, 6)
    mask = torch.ones_like(prompt)
    torch.manual_seed(123)
    with torch.no_grad():
        generated = model.generate(
            input_ids=prompt,
            attention_mask=mask,
            max_new_tokens=NEW,
            do_sample=True,
            top_k=0,
            top_p=1.0,
            temperature=1.0,
        )
    model.reset_memory()
    manual = manual_loop(model, prompt, mask, sample_seed=123)
    assert torch.equal(generated[:, prompt.shape[1] :], manual)


def test_left_padded_batch_generates_what_each_row_generates_alone():
    model = peft_for_generation()
    short, long_ = random_ids(1, 4, seed=1), random_ids(1, 7, seed=2)
    singles = []
    for ids in (short, long_):
        model.reset_memory()
        with torch.no_grad():
            singles.append(model.generate(input_ids=ids, max_new_tokens=NEW, do_sample=False)[:, -NEW:])
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long_])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    model.reset_memory()
    with torch.no_grad():
        out = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=NEW, do_sample=False)[:, -NEW:]
    assert torch.equal(out[0:1], singles[0]) and torch.equal(out[1:2], singles[1])


def test_prefill_then_decode_equals_one_full_forward():
    model = peft_for_generation(delta_heads=("q", "k", "v", "o"))
    ids = random_ids(2, 12)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        model.reset_memory()
        cache = DynamicCache(config=model.config)
        parts = [model(input_ids=ids[:, :8], past_key_values=cache, use_cache=True).logits]
        for t in range(8, 12):
            parts.append(model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)


def test_write_generated_tokens_false_keeps_only_the_prompt():
    model = peft_for_generation(write_generated_tokens=False)
    prompt = random_ids(1, 6)
    with torch.no_grad():
        model.generate(input_ids=prompt, max_new_tokens=NEW, do_sample=False)
    after = model.get_memory_state().states
    model.reset_memory()
    with torch.no_grad():
        model(input_ids=prompt)
    for name, state in model.get_memory_state().states.items():
        torch.testing.assert_close(after[name], state, atol=1e-6, rtol=0)


def test_generated_tokens_are_written_by_default():
    model = peft_for_generation()
    prompt = random_ids(1, 6)
    with torch.no_grad():
        model.generate(input_ids=prompt, max_new_tokens=NEW, do_sample=False)
    after = model.get_memory_state().states
    model.reset_memory()
    with torch.no_grad():
        model(input_ids=prompt)
    assert any((after[n] - s).abs().max() > 1e-5 for n, s in model.get_memory_state().states.items())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_beams": 2},
        {"prompt_lookup_num_tokens": 2},
        {"assistant_model": "placeholder"},
    ],
)
def test_unsupported_decoding_strategies_raise(kwargs):
    model = peft_for_generation()
    if kwargs.get("assistant_model") == "placeholder":
        kwargs = {"assistant_model": tiny_model("llama")}
    with pytest.raises(NotImplementedError, match="δ-mem cannot run generate"):
        model.generate(input_ids=random_ids(1, 4), max_new_tokens=2, **kwargs)


def test_mixed_adapter_batches_raise():
    model = peft_for_generation()
    with pytest.raises(ValueError, match="mixed-adapter"):
        model(input_ids=random_ids(2, 4), adapter_names=["default", "default"])
