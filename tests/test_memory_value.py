"""The memory as an explicit value (issue 10): stateless by default, atomic updates, rows, threads, generation modes.

Each test names the failure of the old hidden-state design that it guards against.
"""

from __future__ import annotations

import threading

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import DynamicCache, pipeline

from conftest import cpu_training_args, make_peft, random_ids
from peft_deltamem import DeltaMemConfig, DeltaMemory
from peft_deltamem import generation as generation_module
from peft_deltamem.tiny_models import tiny_model
from tokenizers_for_tests import plain_tokenizer

NEW = 5


def gen_model(**kwargs):
    model = make_peft(**kwargs)
    model.generation_config.eos_token_id = None  # fixed-length outputs
    model.generation_config.pad_token_id = 0
    return model


def states_equal(a: dict, b: dict, atol: float = 0.0) -> bool:
    if a.keys() != b.keys():
        return False
    if atol == 0.0:
        return all(torch.equal(a[k], b[k]) for k in a)
    return all(torch.allclose(a[k], b[k], atol=atol, rtol=0) for k in a)


def greedy_loop(model, ids, memory, steps=NEW, mask=None):
    """Hand-written greedy decoding over one memory: prefill, then one token per call with a KV cache."""
    cache = DynamicCache(config=model.config)
    mask = torch.ones_like(ids) if mask is None else mask
    tokens, step = [], ids
    with torch.no_grad():
        for _ in range(steps):
            out = model(input_ids=step, attention_mask=mask, past_key_values=cache, use_cache=True, memory=memory)
            step = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(step)
            mask = torch.cat([mask, torch.ones_like(step)], 1)
    return torch.cat(tokens, 1)


def written(model, batch=1, seed=11, length=10):
    memory = model.new_memory(batch)
    with torch.no_grad():
        model(input_ids=random_ids(batch, length, seed=seed), memory=memory)
    return memory


# ------------------------------------------------------------------------------------- stateless default


def test_pipeline_over_a_list_equals_one_call_per_item():
    """Old: a pipeline batch shared memory rows between unrelated inputs and failed on the smaller last batch."""
    tokenizer = plain_tokenizer()
    tokenizer.padding_side = "left"
    base = tiny_model("llama", vocab_size=len(tokenizer))
    model = get_peft_model(base, DeltaMemConfig(task_type="CAUSAL_LM", init_weights=False)).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    generate = pipeline("text-generation", model=model, tokenizer=tokenizer)
    prompts = ["Hello there", "What is the capital", "my cat is called Tom", "banana"]
    kwargs = dict(max_new_tokens=4, do_sample=False, return_full_text=False)
    one_by_one = [generate(p, **kwargs)[0]["generated_text"] for p in prompts]
    batched = [r[0]["generated_text"] for r in generate(prompts, batch_size=3, **kwargs)]
    assert batched == one_by_one
    assert len(set(one_by_one)) > 1


def test_a_train_step_between_two_eval_calls_changes_nothing():
    """Old: a training forward's final state was committed by the next call (logits off, or a batch-size crash)."""
    model = make_peft()
    ids = random_ids(2, 7)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    model.train()
    train_ids = random_ids(3, 9, seed=4)  # another batch size
    model(input_ids=train_ids, labels=train_ids).loss.backward()
    model.eval()
    with torch.no_grad():
        after = model(input_ids=ids).logits
        generated = model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert torch.equal(before, after)
    assert generated.shape == (2, 9)


def test_generate_in_train_mode_carries_the_memory_across_steps():
    """Old: generate() in train mode started every decoding step from an empty memory."""
    model = gen_model()
    prompt = random_ids(1, 6)
    with torch.no_grad():
        eval_tokens = model.generate(input_ids=prompt, max_new_tokens=NEW, do_sample=False)
        model.train()
        train_tokens = model.generate(input_ids=prompt, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(eval_tokens, train_tokens)  # the tiny model has no dropout
    assert torch.equal(eval_tokens[:, 6:], greedy_loop(model.eval(), prompt, model.new_memory(1)))


def test_disable_adapter_comparison_and_safetensors_round_trip_need_no_reset(tmp_path):
    """peft's generic tuner checks (disable_adapter, inference_safetensors) with no reset between calls."""
    base_ids = random_ids(2, 8)
    model = make_peft()
    with torch.no_grad():
        first = model(input_ids=base_ids).logits
        with model.disable_adapter():
            disabled = model(input_ids=base_ids).logits
        again = model(input_ids=base_ids).logits
    base = tiny_model("llama")
    with torch.no_grad():
        assert torch.equal(disabled, base(input_ids=base_ids).logits)
    assert torch.equal(first, again)
    assert not torch.allclose(first, disabled)
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=base_ids).logits, first)
        assert torch.equal(loaded(input_ids=base_ids).logits, first)


def test_trainer_evaluate_on_plain_batches_with_a_smaller_last_batch(tmp_path):
    """Old: Trainer.evaluate chained memory across eval batches and crashed on the smaller last batch."""
    from datasets import Dataset
    from transformers import Trainer

    rows = [random_ids(1, 8, seed=i)[0].tolist() for i in range(5)]
    dataset = Dataset.from_dict({"input_ids": rows, "labels": rows, "attention_mask": [[1] * 8] * 5})
    model = make_peft()
    args = cpu_training_args(tmp_path, per_device_eval_batch_size=2)
    trainer = Trainer(model=model, args=args, eval_dataset=dataset)
    first = trainer.evaluate()["eval_loss"]
    second = trainer.evaluate()["eval_loss"]
    assert first == second
    # the same as the mean of per-example losses computed stateless, one at a time
    with torch.no_grad():
        losses = [model(input_ids=torch.tensor([r]), labels=torch.tensor([r])).loss for r in rows]
    assert first == pytest.approx(torch.stack(losses).mean().item(), rel=1e-4)


def test_continuing_a_kv_cache_without_a_memory_is_refused():
    model = make_peft()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=random_ids(1, 5), past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="continues a KV cache but passes no memory"):
            model(input_ids=random_ids(1, 1), past_key_values=cache, use_cache=True)


# ------------------------------------------------------------------------------------------ atomicity


def test_a_raising_call_leaves_the_memory_bit_identical():
    """Old: a call that raised kept its writes, possibly layer 0 written and layer 1 not."""
    model = make_peft()
    memory = written(model)
    before = memory.states
    ids = random_ids(1, 6, seed=3)
    with pytest.raises(Exception):  # noqa: B017  (bad labels: the loss fails after every layer ran)
        model(input_ids=ids, labels=torch.zeros(1, 3, dtype=torch.long), memory=memory)
    assert states_equal(memory.states, before)
    layer1 = model.base_model.model.model.layers[1].self_attn

    def boom(*_):
        raise RuntimeError("boom in layer 1")

    handle = layer1.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        model(input_ids=ids, memory=memory)
    handle.remove()
    assert states_equal(memory.states, before)
    # nothing pending in the model: the next call is the one a fresh memory copy gives
    fresh = memory.clone()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, memory=memory).logits, model(input_ids=ids, memory=fresh).logits)


def test_a_failed_episode_leaves_nothing_pending():
    """Old: a failed episode left a write-sparsity term that changed or broke later calls."""
    model = make_peft(write_sparsity_weight=1.0)
    model.train()
    ids = random_ids(2, 6)
    batch = dict(memory_input_ids=random_ids(2, 8, seed=1), input_ids=ids, labels=ids)
    reference = model(**batch).loss.item()
    with pytest.raises(ValueError, match="needs a loss"):
        model(memory_input_ids=batch["memory_input_ids"], input_ids=ids)  # no labels: the penalty has no loss
    assert model(**batch).loss.item() == reference


def test_nan_input_gives_a_clear_error_and_an_unchanged_memory():
    """Old: NaN/inf in the input was stored and poisoned every later call."""
    model = make_peft()
    memory = written(model)
    before = memory.states
    embeds = model.get_input_embeddings()(random_ids(1, 4)).detach()
    embeds[0, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite.*left unchanged"):
        model(inputs_embeds=embeds, memory=memory)
    assert states_equal(memory.states, before)
    with pytest.raises(ValueError, match="NaN or infinite"):
        model.generate(inputs_embeds=embeds, memory=memory, max_new_tokens=2, pad_token_id=0)
    assert states_equal(memory.states, before)


@pytest.mark.parametrize("shape", [(1, 1, 8, 8), (8, 3, 64, 64)])  # one cat / one by one (megabytes)
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), -float("inf")])
def test_the_finiteness_check_finds_every_bad_value_and_nothing_else(shape, bad):
    from peft_deltamem.state import all_finite

    tensors = [torch.randn(*shape) for _ in range(12)]
    tensors[4].view(-1)[7] = 3e38  # finite values whose sum overflows are still finite
    tensors[5].view(-1)[:2] = 3e38
    if bad is not None:
        tensors[9].view(-1)[-1] = bad
    assert all_finite(tensors) is (bad is None)
    assert all_finite([]) is True


def test_inference_mode_then_a_normal_call_works():
    """Old: a memory written under inference_mode made the next normal forward fail."""
    model = make_peft()
    memory = model.new_memory(1)
    with torch.inference_mode():
        model(input_ids=random_ids(1, 6), memory=memory)
        fresh = model.new_memory(1)
    model.train()
    ids = random_ids(1, 5, seed=2)
    model(input_ids=ids, labels=ids, memory=memory).loss.backward()
    model(input_ids=ids, labels=ids, memory=fresh).loss.backward()
    with torch.no_grad():
        model(input_ids=ids, memory=memory)
    with torch.inference_mode():
        model(input_ids=ids, memory=memory)
    with torch.enable_grad():
        model(input_ids=ids, labels=ids, memory=memory).loss.backward()
    assert all(not t.is_inference() for t in memory._states.values())


def test_booleans_are_checked():
    model = make_peft()
    memory = model.new_memory(1)
    with pytest.raises(TypeError, match="memory_writes must be True or False"):
        model(input_ids=random_ids(1, 4), memory=memory, memory_writes="False")
    with pytest.raises(TypeError, match="memory_writes must be True or False"):
        model.generate(input_ids=random_ids(1, 4), memory=memory, memory_writes=0, max_new_tokens=1)
    assert memory.is_empty
    with pytest.raises(ValueError, match="write_generated_tokens.*True or False"):
        DeltaMemConfig(write_generated_tokens="no")


# ------------------------------------------------------------------------------------------------ rows


def test_rows_select_cat_reset_and_pieces_equal_whole():
    """Old: no way to take one row (user) out of a batched memory or put it back."""
    model = make_peft()
    ids = random_ids(3, 9)
    whole = model.new_memory(3)
    with torch.no_grad():
        model(input_ids=ids, memory=whole)
    parts = []
    for row in range(3):
        memory = model.new_memory(1)
        with torch.no_grad():
            model(input_ids=ids[row : row + 1], memory=memory)
        parts.append(memory)
    joined = DeltaMemory.cat(parts)
    assert states_equal(joined.states, whole.states, atol=1e-5)
    assert states_equal(whole.select([2]).states, parts[2].states, atol=1e-5)
    mask = whole.select(torch.tensor([True, False, True]))
    assert mask.batch_size == 2 and states_equal(mask.states, DeltaMemory.cat([parts[0], parts[2]]).states, atol=1e-5)
    assert whole.select([0, 0]).batch_size == 2
    question = random_ids(1, 4, seed=9)
    with torch.no_grad():
        alone = model(input_ids=question, memory=whole.select([1])).logits
        batched = model(input_ids=question.expand(3, -1), memory=whole.clone()).logits
    torch.testing.assert_close(batched[1:2], alone, atol=1e-5, rtol=0)
    whole.reset(rows=[1])
    assert whole.select([1]).is_empty and not whole.select([0]).is_empty
    for bad, error, match in [
        ([0.5], TypeError, "int indices or a bool mask"),
        ("0", TypeError, "int indices or a bool mask"),
        (torch.tensor([1.0]), TypeError, "float32"),
        ([3], IndexError, "out of range"),
        ([True, False], ValueError, "length 3"),
    ]:
        with pytest.raises(error, match=match):
            whole.select(bad)
    with pytest.raises(ValueError, match="batch size 1 but the memory has 3 rows"):
        model(input_ids=question, memory=whole)


# --------------------------------------------------------------------------------------------- threads


def test_two_threads_with_their_own_memories_get_their_sequential_results():
    """Old: two threads calling one model mixed their states silently."""
    model = make_peft()
    inputs = {name: [random_ids(b, 5, seed=s + i) for i in range(3)] for name, b, s in (("a", 1, 0), ("b", 2, 10))}

    def run(name):
        memory = model.new_memory(inputs[name][0].shape[0])
        outs = []
        with torch.no_grad():
            for ids in inputs[name]:
                outs.append(model(input_ids=ids, memory=memory).logits)
        return outs, memory.states

    expected = {name: run(name) for name in inputs}
    for _ in range(20):
        results, errors = {}, []

        def worker(name, results=results, errors=errors):
            try:
                results[name] = run(name)
            except Exception as error:  # noqa: BLE001
                errors.append(error)

        threads = [threading.Thread(target=worker, args=(n,)) for n in inputs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        for name, (outs, states) in expected.items():
            got_outs, got_states = results[name]
            assert all(torch.equal(g, e) for g, e in zip(got_outs, outs))
            assert states_equal(got_states, states)


def test_two_threads_sharing_one_memory_are_serialised():
    model = make_peft()
    a, b = random_ids(1, 6, seed=1), random_ids(1, 6, seed=2)

    def sequential(first, second):
        memory = model.new_memory(1)
        with torch.no_grad():
            model(input_ids=first, memory=memory)
            model(input_ids=second, memory=memory)
        return memory.states

    orders = [sequential(a, b), sequential(b, a)]
    for _ in range(10):
        memory = model.new_memory(1)

        def call(ids, memory=memory):
            with torch.no_grad():
                model(input_ids=ids, memory=memory)

        threads = [threading.Thread(target=call, args=(ids,)) for ids in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert any(states_equal(memory.states, order) for order in orders)


# ------------------------------------------------------------------------------------------ generation


def test_use_cache_false_equals_cached_generation_and_does_not_rewrite_the_prompt():
    """Old: generate(use_cache=False) rewrote the prompt into memory at every step."""
    model = gen_model()
    prompt = random_ids(2, 6)
    cached_mem, uncached_mem = written(model, 2), written(model, 2)
    with torch.no_grad():
        cached = model.generate(input_ids=prompt, max_new_tokens=NEW, do_sample=False, memory=cached_mem)
        uncached = model.generate(
            input_ids=prompt, max_new_tokens=NEW, do_sample=False, use_cache=False, memory=uncached_mem
        )
    assert torch.equal(cached, uncached)
    assert states_equal(cached_mem.states, uncached_mem.states, atol=1e-5)


def test_static_cache_generation_equals_the_step_loop():
    """Old: cache_implementation='static' was refused."""
    model = gen_model()
    prompt = random_ids(2, 6)
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0  # left padding: the static cache's 4-D mask must not hide it
    memory = written(model, 2)
    loop_memory = memory.clone()
    with torch.no_grad():
        static = model.generate(
            input_ids=prompt,
            attention_mask=mask,
            max_new_tokens=NEW,
            do_sample=False,
            cache_implementation="static",
            memory=memory,
        )
    assert torch.equal(static[:, 6:], greedy_loop(model, prompt, loop_memory.clone(), mask=mask))
    dynamic_memory = loop_memory.clone()
    with torch.no_grad():
        model.generate(
            input_ids=prompt, attention_mask=mask, max_new_tokens=NEW, do_sample=False, memory=dynamic_memory
        )
    assert states_equal(memory.states, dynamic_memory.states, atol=1e-5)
    assert not states_equal(memory.states, loop_memory.states, atol=1e-5)


def beam_loop(model, prompt, memory, beams, steps=NEW):
    """Hand-written beam search (no length penalty effects: every beam has the same length)."""
    ids = prompt.repeat_interleave(beams, 0)
    memory = memory.select([0] * beams)
    cache = DynamicCache(config=model.config)
    scores = torch.full((beams,), -1e9)
    scores[0] = 0.0
    sequences, step = ids, ids
    with torch.no_grad():
        for _ in range(steps):
            mask = torch.ones_like(sequences)
            out = model(input_ids=step, attention_mask=mask, past_key_values=cache, use_cache=True, memory=memory)
            logprobs = torch.log_softmax(out.logits[:, -1].float(), -1)
            total = (scores[:, None] + logprobs).view(-1)
            top, index = total.topk(beams)
            beam_idx, token = index // logprobs.shape[-1], index % logprobs.shape[-1]
            cache.reorder_cache(beam_idx)
            memory = memory.select(beam_idx)
            sequences = torch.cat([sequences[beam_idx], token[:, None]], 1)
            scores, step = top, token[:, None]
    return sequences[:, prompt.shape[1] :], scores  # best first (topk sorts)


def test_beam_search_equals_a_hand_written_beam_loop_and_keeps_the_prompt_state():
    """Old: beam search was refused. The caller's memory receives the prompt's writes (documented)."""
    model = gen_model()
    prompt = random_ids(1, 6)
    memory = written(model)
    start = memory.clone()
    with torch.no_grad():
        out = model.generate(
            input_ids=prompt,
            max_new_tokens=NEW,
            num_beams=3,
            do_sample=False,
            memory=memory,
            output_scores=True,
            return_dict_in_generate=True,
            num_return_sequences=3,  # every final beam, not only the best (whose lineage may never move)
        )
    tokens, scores = beam_loop(model, prompt, start.clone(), beams=3)
    assert torch.equal(out.sequences[:, 6:], tokens)
    # a beam's score sums every step's log-probability: each beam must have read its own (reordered) memory
    torch.testing.assert_close(out.sequences_scores, scores / NEW, atol=1e-5, rtol=0)
    prompt_only = start.clone()
    with torch.no_grad():
        model(input_ids=prompt, memory=prompt_only)
    assert states_equal(memory.states, prompt_only.states, atol=1e-6)


def test_num_return_sequences_equals_the_step_loop_over_expanded_rows():
    """Old: num_return_sequences > 1 failed with a message whose fix threw the memory away."""
    model = gen_model()
    prompt = random_ids(1, 6)
    memory = written(model)
    start = memory.clone()
    kwargs = dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=NEW)
    torch.manual_seed(7)
    with torch.no_grad():
        out = model.generate(input_ids=prompt, num_return_sequences=3, memory=memory, **kwargs)
    # the loop: the same rows transformers runs (the prompt three times), one memory row each
    expanded = start.select([0, 0, 0])
    cache = DynamicCache(config=model.config)
    step, tokens = prompt.expand(3, -1), []
    torch.manual_seed(7)
    with torch.no_grad():
        for _ in range(NEW):
            logits = model(input_ids=step, past_key_values=cache, use_cache=True, memory=expanded).logits[:, -1]
            step = torch.multinomial(torch.softmax(logits.float(), -1), 1)
            tokens.append(step)
    assert torch.equal(out[:, 6:], torch.cat(tokens, 1))
    assert len({tuple(r.tolist()) for r in out[:, 6:]}) > 1
    prompt_only = start.clone()
    with torch.no_grad():
        model(input_ids=prompt, memory=prompt_only)
    assert memory.batch_size == 1 and states_equal(memory.states, prompt_only.states, atol=1e-6)


def test_prompt_lookup_decoding_rolls_back_rejected_tokens_exactly(monkeypatch):
    """Old: prompt-lookup decoding was refused (writes could not be rolled back)."""
    model = gen_model()
    pattern = random_ids(1, 4, seed=5)
    prompt = torch.cat([pattern, pattern, pattern[:, :2]], 1)  # repeated n-grams: lookups propose drafts
    removed = []
    crop = generation_module.Generation.crop
    monkeypatch.setattr(generation_module.Generation, "crop", lambda self, n: (removed.append(-n), crop(self, n)))
    memory, greedy_memory = written(model), written(model)
    with torch.no_grad():
        lookup = model.generate(
            input_ids=prompt, max_new_tokens=8, do_sample=False, prompt_lookup_num_tokens=3, memory=memory
        )
        greedy = model.generate(input_ids=prompt, max_new_tokens=8, do_sample=False, memory=greedy_memory)
    assert torch.equal(lookup, greedy)
    assert torch.equal(lookup[:, prompt.shape[1] :], greedy_loop(model, prompt, written(model), steps=8))
    assert any(n > 0 for n in removed), "no draft token was rejected: the test would not check the rollback"
    assert states_equal(memory.states, greedy_memory.states, atol=1e-5)


def test_assisted_decoding_with_an_assistant_model_equals_greedy():
    model = gen_model()
    assistant = tiny_model("llama", seed=3)
    assistant.generation_config.eos_token_id = None
    prompt = random_ids(1, 6)
    memory, greedy_memory = written(model), written(model)
    with torch.no_grad():
        assisted = model.generate(
            input_ids=prompt, max_new_tokens=6, do_sample=False, assistant_model=assistant, memory=memory
        )
        greedy = model.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, memory=greedy_memory)
    assert torch.equal(assisted, greedy)
    assert states_equal(memory.states, greedy_memory.states, atol=1e-5)


def test_generate_batch_must_match_the_memory_rows():
    model = gen_model()
    memory = model.new_memory(2)
    with pytest.raises(ValueError, match="got 3 prompt rows but the memory has 2"):
        model.generate(input_ids=random_ids(3, 4), memory=memory, max_new_tokens=2)
    assert memory.is_empty


@pytest.mark.parametrize("granularity", ["token", "segment"])
def test_generate_applies_prompt_write_masks_and_segment_ids(granularity):
    model = gen_model(write_granularity=granularity, write_generated_tokens=False)
    prompt = random_ids(2, 8)
    write_mask = torch.ones_like(prompt, dtype=torch.bool)
    write_mask[:, 5:] = False
    segments = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 2]] * 2)
    extra = {"memory_segment_ids": segments} if granularity == "segment" else {}
    generated, forward = model.new_memory(2), model.new_memory(2)
    with torch.no_grad():
        model.generate(
            input_ids=prompt, max_new_tokens=3, do_sample=False, memory=generated, memory_write_mask=write_mask, **extra
        )
        model(input_ids=prompt, memory=forward, memory_write_mask=write_mask, **extra)
    assert not forward.is_empty
    assert states_equal(generated.states, forward.states, atol=1e-6)
    unmasked = model.new_memory(2)
    with torch.no_grad():
        model(input_ids=prompt, memory=unmasked, **extra)
    assert not states_equal(unmasked.states, forward.states, atol=1e-6)


@pytest.mark.parametrize("granularity", ["token", "segment"])
def test_rows_that_do_not_read_get_the_frozen_outputs_and_still_write(granularity):
    """``memory_reads``: a row that does not read gives the frozen model's logits, bit for bit, and writes what a
    reading row writes from the frozen hidden states; reading rows are untouched; one call, forward or generate."""
    model = gen_model(write_granularity=granularity)
    extra = {"memory_segment_ids": torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2]] * 2)} if granularity == "segment" else {}
    prompt = random_ids(2, 8)
    filled = model.new_memory(2)
    with torch.no_grad():
        model(input_ids=random_ids(2, 8, seed=11), memory=filled, **extra)
    mixed, reading = filled.clone(), filled.clone()
    with torch.no_grad():
        got = model(input_ids=prompt, memory=mixed, memory_reads=torch.tensor([True, False]), **extra).logits
        want = model(input_ids=prompt, memory=reading, **extra).logits
        with model.disable_adapter():
            frozen = model(input_ids=prompt).logits
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], frozen[1]) and not torch.equal(want[1], frozen[1])
    assert all(torch.equal(mixed.states[k][0], reading.states[k][0]) for k in mixed.states)
    assert all(not torch.equal(mixed.states[k][1], filled.states[k][1]) for k in mixed.states)  # row 1 wrote
    if granularity == "token":  # generate: the same rows read, the reply as the frozen model's for row 1
        quiet = filled.clone()
        with torch.no_grad():
            reads = torch.tensor([True, False])
            out = model.generate(input_ids=prompt, max_new_tokens=3, do_sample=False, memory=quiet, memory_reads=reads)
            with model.disable_adapter():
                plain = model.generate(input_ids=prompt, max_new_tokens=3, do_sample=False)
        assert torch.equal(out[1], plain[1])
    with pytest.raises(ValueError, match="memory_reads has 3 entries but the call has 2"):
        model(input_ids=prompt, memory=filled.clone(), memory_reads=torch.tensor([True, False, True]), **extra)
    for bad in ("no", torch.tensor([1, 0]), torch.ones(2, 1, dtype=torch.bool)):
        with pytest.raises(TypeError, match="memory_reads must be True, False or a 1-D bool tensor"):
            model(input_ids=prompt, memory=filled.clone(), memory_reads=bad, **extra)


def test_generate_can_write_chosen_prompt_tokens_and_not_the_reply():
    """``memory_write_generated=False`` with a write mask: the memory after generate() is the masked prompt's write,
    whatever the adapter's ``write_generated_tokens``; the reply reads it."""
    model = gen_model(write_generated_tokens=True)
    prompt = random_ids(2, 8)
    write_mask = torch.zeros_like(prompt, dtype=torch.bool)
    write_mask[:, 2:6] = True
    generated, forward = model.new_memory(2), model.new_memory(2)
    with torch.no_grad():
        model.generate(
            input_ids=prompt, max_new_tokens=3, do_sample=False, memory=generated, memory_write_mask=write_mask,
            memory_write_generated=False,
        )  # fmt: skip
        model(input_ids=prompt, memory=forward, memory_write_mask=write_mask)
    assert not forward.is_empty and states_equal(generated.states, forward.states)
    with pytest.raises(TypeError, match="memory_write_generated"):
        model.generate(input_ids=prompt, max_new_tokens=1, memory=model.new_memory(2), memory_write_generated=1)


def test_generate_under_inference_mode_then_a_training_call():
    model = gen_model()
    memory = model.new_memory(1)
    with torch.inference_mode():
        model.generate(input_ids=random_ids(1, 5), max_new_tokens=3, memory=memory)
    model.train()
    ids = random_ids(1, 4, seed=1)
    model(input_ids=ids, labels=ids, memory=memory).loss.backward()
    assert not memory.is_empty


# ------------------------------------------------------------------------- the weights that wrote a memory


def _other_weights():
    """A model of the same configuration whose adapter weights differ."""
    other = gen_model()
    with torch.no_grad():
        for p in other.parameters():
            if p.requires_grad:
                p.add_(0.01)
    return other


def test_a_memory_from_another_model_in_the_same_process_is_refused():
    model, other = gen_model(), _other_weights()
    memory = written(model)
    before = memory.states
    with pytest.raises(ValueError, match="written with other weights"):
        other(input_ids=random_ids(1, 4), memory=memory)
    with pytest.raises(ValueError, match="written with other weights"):
        other.generate(input_ids=random_ids(1, 4), memory=memory, max_new_tokens=2)
    assert states_equal(memory.states, before)
    model(input_ids=random_ids(1, 4), memory=memory)  # its own model still reads it
    other(input_ids=random_ids(1, 4), memory=other.new_memory(1))  # and an empty memory fits any weights
    fresh = model.new_memory(1)
    other(input_ids=random_ids(1, 4), memory=fresh)
    assert fresh.weights_hash == other.new_memory(1).weights_hash  # re-stamped by the model that wrote it


def test_cat_keeps_the_weights_that_wrote_the_rows_and_refuses_to_mix_them(tmp_path):
    model, other = gen_model(), _other_weights()
    native, foreign = written(model), written(other, seed=3)
    foreign.save(tmp_path / "foreign.safetensors")
    loaded = DeltaMemory.load(tmp_path / "foreign.safetensors")
    with pytest.raises(ValueError, match="written by different weights"):
        DeltaMemory.cat([native, loaded])
    joined = DeltaMemory.cat([native, model.new_memory(1), written(model, seed=4)])
    assert joined.weights_hash == native.weights_hash
    model(input_ids=random_ids(3, 4), memory=joined)
    with pytest.raises(ValueError, match="written with other weights"):
        model(input_ids=random_ids(1, 4), memory=loaded.select([0]))
