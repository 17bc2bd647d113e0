"""generate(): same tokens as a manual loop, padding, prefill+decode == full forward, refusals."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from conftest import make_peft, random_ids

NEW = 6


def peft_for_generation(**kwargs):
    model = make_peft(**kwargs)
    model.generation_config.eos_token_id = None  # never stop early: compare fixed-length outputs
    model.generation_config.pad_token_id = 0
    return model


def manual_loop(model, ids, mask, sample_seed=None, memory=None):
    """Prefill, then one forward per token with a KV cache and one memory; greedy or multinomial sampling."""
    memory = memory if memory is not None else model.new_memory(ids.shape[0])
    cache = DynamicCache(config=model.config)
    tokens, step_ids = [], ids
    if sample_seed is not None:
        torch.manual_seed(sample_seed)
    with torch.no_grad():
        for _ in range(NEW):
            out = model(input_ids=step_ids, attention_mask=mask, past_key_values=cache, use_cache=True, memory=memory)
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
    mem = model.new_memory(1)
    with torch.no_grad():
        model(input_ids=history, memory=mem)
        generated = model.generate(
            input_ids=prompt, attention_mask=mask, max_new_tokens=NEW, do_sample=False, memory=mem
        )
    after_generate = mem.states
    mem = model.new_memory(1)
    with torch.no_grad():
        model(input_ids=history, memory=mem)
    manual = manual_loop(model, prompt, mask, memory=mem.clone())
    assert torch.equal(generated[:, prompt.shape[1] :], manual)
    # generate() feeds the last token only if it asks for another one: the manual loop fed all NEW.
    with torch.no_grad():
        model(input_ids=torch.cat([prompt, manual[:, :-1]], 1), memory=mem)
    for name, state in mem.states.items():
        torch.testing.assert_close(state, after_generate[name], atol=1e-5, rtol=0)


def test_memory_changes_what_is_generated():
    model = peft_for_generation()
    prompt = random_ids(1, 5)
    with torch.no_grad():
        empty = model.generate(
            input_ids=prompt, max_new_tokens=NEW, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        mem = model.new_memory(1)
        model(input_ids=random_ids(1, 30, seed=9), memory=mem)
        full = model.generate(
            input_ids=prompt,
            max_new_tokens=NEW,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            memory=mem,
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
    manual = manual_loop(model, prompt, mask, sample_seed=123)
    assert torch.equal(generated[:, prompt.shape[1] :], manual)


def test_left_padded_batch_generates_what_each_row_generates_alone():
    model = peft_for_generation()
    short, long_ = random_ids(1, 4, seed=1), random_ids(1, 7, seed=2)
    singles = []
    for ids in (short, long_):
        with torch.no_grad():
            singles.append(model.generate(input_ids=ids, max_new_tokens=NEW, do_sample=False)[:, -NEW:])
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long_])
    mask = torch.ones_like(batch)
    mask[0, :3] = 0
    with torch.no_grad():
        out = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=NEW, do_sample=False)[:, -NEW:]
    assert torch.equal(out[0:1], singles[0]) and torch.equal(out[1:2], singles[1])


def test_prefill_then_decode_equals_one_full_forward():
    model = peft_for_generation(delta_heads=("q", "k", "v", "o"))
    ids = random_ids(2, 12)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        mem = model.new_memory(2)
        cache = DynamicCache(config=model.config)
        parts = [model(input_ids=ids[:, :8], past_key_values=cache, use_cache=True, memory=mem).logits]
        for t in range(8, 12):
            parts.append(model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True, memory=mem).logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)


def test_write_generated_tokens_false_keeps_only_the_prompt():
    model = peft_for_generation(write_generated_tokens=False)
    prompt = random_ids(1, 6)
    generated_mem, prompt_mem = model.new_memory(1), model.new_memory(1)
    with torch.no_grad():
        model.generate(input_ids=prompt, max_new_tokens=NEW, do_sample=False, memory=generated_mem)
        model(input_ids=prompt, memory=prompt_mem)
    after = generated_mem.states
    assert not prompt_mem.is_empty
    for name, state in prompt_mem.states.items():
        torch.testing.assert_close(after[name], state, atol=1e-6, rtol=0)


def test_generated_tokens_are_written_by_default():
    model = peft_for_generation()
    prompt = random_ids(1, 6)
    generated_mem, prompt_mem = model.new_memory(1), model.new_memory(1)
    with torch.no_grad():
        model.generate(input_ids=prompt, max_new_tokens=NEW, do_sample=False, memory=generated_mem)
        model(input_ids=prompt, memory=prompt_mem)
    after = generated_mem.states
    assert any((after[n] - s).abs().max() > 1e-5 for n, s in prompt_mem.states.items())


def test_segment_granularity_refuses_assisted_decoding():
    model = peft_for_generation(write_granularity="segment")
    with pytest.raises(NotImplementedError, match="prompt-lookup"):
        model.generate(input_ids=random_ids(1, 4), max_new_tokens=2, prompt_lookup_num_tokens=2)


def test_mixed_adapter_batches_raise():
    model = peft_for_generation()
    with pytest.raises(ValueError, match="mixed-adapter"):
        model(input_ids=random_ids(2, 4), adapter_names=["default", "default"])


def test_a_batch_of_prompts_with_a_memory_of_fewer_rows_is_refused_and_the_memory_kept():
    model = peft_for_generation()
    mem = model.new_memory(1)
    with torch.no_grad():
        model(input_ids=random_ids(1, 5, seed=4), memory=mem)
    before = mem.states
    prompts = random_ids(2, 6)
    with pytest.raises(ValueError, match=r"generate\(\) got 2 prompt rows but the memory has 1.*num_return_sequences"):
        model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=2, memory=mem)
    assert all(torch.equal(before[k], v) for k, v in mem.states.items())
    # several replies to one prompt still read the one row: num_return_sequences says so
    with torch.no_grad():
        out = model.generate(
            input_ids=prompts[:1], attention_mask=torch.ones_like(prompts[:1]), max_new_tokens=2, memory=mem,
            do_sample=True, num_return_sequences=2,
        )  # fmt: skip
    assert out.shape[0] == 2
