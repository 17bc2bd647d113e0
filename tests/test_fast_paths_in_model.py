"""Every fast scan, through the whole PEFT model, against the naive reference (prefill, decode, training)."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from conftest import make_peft, random_ids
from peft_deltamem.ops import use_impl
from peft_deltamem.tiny_models import tiny_model

FAST = ["chunk", "fused_recurrent", "auto"]


def padded_batch(length: int = 41):
    ids = random_ids(2, length, seed=11)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # left padding, inside the first chunk
    return ids, mask


def prefill_and_decode(model, ids, mask, steps: int = 4, step_kwargs=None, **kwargs):
    memory = model.new_memory(ids.shape[0])
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = [
            model(
                input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True, memory=memory, **kwargs
            ).logits
        ]
        token = out[0][:, -1:].argmax(-1)
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            out.append(
                model(
                    input_ids=token,
                    attention_mask=mask,
                    past_key_values=cache,
                    use_cache=True,
                    memory=memory,
                    **(step_kwargs or {}),
                ).logits
            )
            token = out[-1][:, -1:].argmax(-1)
    states = memory.states
    return torch.cat(out, 1), states


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("heads", [1, 2])
def test_prefill_and_decode_match_naive(impl, heads):
    model = make_peft(num_state_heads=heads, delta_heads=("q", "k", "v", "o"))
    ids, mask = padded_batch()
    with use_impl("naive"):
        expected_logits, expected_states = prefill_and_decode(model, ids, mask)
    with use_impl(impl):
        logits, states = prefill_and_decode(model, ids, mask)
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=0)
    for name, state in states.items():
        torch.testing.assert_close(state, expected_states[name], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("granularity", ["token", "segment"])
@pytest.mark.parametrize("reads", [True, torch.tensor([True, False])])
def test_decoding_steps_that_only_read_match_naive(granularity, reads, monkeypatch):
    """Single-token calls that do not write (memory_writes=False; some rows not reading) take the decoding read,
    for token- and segment-write layers: logits and (unchanged) states as the naive scan's."""
    from peft_deltamem import ops

    reads_taken = []
    token_read = ops.token_read
    monkeypatch.setattr(ops, "token_read", lambda *args: reads_taken.append(1) or token_read(*args))
    model = make_peft(num_state_heads=2, write_granularity=granularity)
    ids, mask = padded_batch()
    prefill = {"memory_segment_ids": torch.zeros_like(ids)} if granularity == "segment" else {}
    steps = {"memory_writes": False, "memory_reads": reads}
    with use_impl("naive"):
        expected_logits, expected_states = prefill_and_decode(model, ids, mask, step_kwargs=steps, **prefill)
    assert not reads_taken  # naive: every step runs that scan
    logits, states = prefill_and_decode(model, ids, mask, step_kwargs=steps, **prefill)
    assert len(reads_taken) == 4 * len(model.new_memory(1).layers)  # every step of every layer
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=0)
    for name, state in states.items():
        torch.testing.assert_close(state, expected_states[name], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "phi3", "gpt2"])
def test_one_row_decoding_matches_naive(model_type, monkeypatch):
    """A one-row decoding step hands each corrected projection its correction scaled already and 1-D: a plain Linear
    without a bias takes it as its bias (llama's q and o; qwen2's o; phi3's fused qkv, zeros where no Δ head
    corrects); one with a bias (qwen2's q) and a Conv1D (gpt2) add it to their output. Logits and states as the
    naive scan's."""
    import torch.nn.functional as F

    linear, as_bias = F.linear, []

    def spy(x, weight, bias=None):
        as_bias.append(bias is not None and not isinstance(bias, torch.nn.Parameter))
        return linear(x, weight, bias)

    model = make_peft(tiny_model(model_type, seed=3))
    ids = random_ids(1, 19, seed=5)
    mask = torch.ones_like(ids)
    with use_impl("naive"):
        expected_logits, expected_states = prefill_and_decode(model, ids, mask)
    monkeypatch.setattr(F, "linear", spy)
    logits, states = prefill_and_decode(model, ids, mask)
    assert any(as_bias) == (model_type != "gpt2")
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=0)
    for name, state in states.items():
        torch.testing.assert_close(state, expected_states[name], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", FAST)
def test_segment_writes_match_naive(impl):
    model = make_peft(write_granularity="segment")
    ids, mask = padded_batch(37)
    segments = torch.arange(37).div(5, rounding_mode="floor").expand(2, -1)

    def run():
        memory = model.new_memory(2)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, memory_segment_ids=segments, memory=memory).logits
        return logits, memory.states

    with use_impl("naive"):
        expected_logits, expected_states = run()
    with use_impl(impl):
        logits, states = run()
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=0)
    for name, state in states.items():
        torch.testing.assert_close(state, expected_states[name], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", FAST)
def test_training_step_gradients_match_naive(impl):
    memory, memory_mask = padded_batch(45)
    visible = random_ids(2, 9, seed=12)
    labels = visible.clone()
    labels[:, :4] = -100

    def grads():
        model = make_peft(tiny_model("llama", seed=4), num_state_heads=2)
        model.train()
        loss = model(memory_input_ids=memory, memory_attention_mask=memory_mask, input_ids=visible, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    with use_impl("naive"):
        expected_loss, expected = grads()
    with use_impl(impl):
        loss, got = grads()
    torch.testing.assert_close(loss, expected_loss, atol=1e-6, rtol=1e-6)
    for name, grad in expected.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(got[name], grad, atol=1e-6, rtol=1e-4)


def test_compiled_generate_equals_eager():
    """generate() with a static cache and transformers' compile_config: the decoder layers, δ-mem included, compile
    without a graph break (the call hooks stay eager) and give the tokens and memory of the eager run."""
    from transformers import CompileConfig

    from conftest import require_cxx_compiler

    require_cxx_compiler()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = make_peft(num_state_heads=2)
    ids, mask = padded_batch(12)
    mask[0, :7] = 0
    compile_config = CompileConfig(mode="default")
    compile_config._compile_all_devices = True  # transformers compiles generate's decoding steps on CUDA only

    def run(config):
        memory = model.new_memory(2)
        tokens = model.generate(
            input_ids=ids,
            attention_mask=mask,
            memory=memory,
            max_new_tokens=6,
            do_sample=False,
            cache_implementation="static",
            compile_config=config,
            pad_token_id=0,
        )
        return tokens, memory.states

    expected_tokens, expected_states = run(None)
    tokens, states = run(compile_config)
    assert torch.equal(tokens, expected_tokens)
    for name, state in states.items():
        torch.testing.assert_close(state, expected_states[name], atol=1e-5, rtol=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # something was compiled
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])


@pytest.mark.parametrize("projection", ["plain", "hooked"])
@pytest.mark.parametrize("impl", ["naive", *FAST])
def test_a_call_scans_only_the_span_where_some_row_writes(impl, projection):
    """Positions before the first and after the last written one (in any row) read the state before / after the
    span and project no keys, values or gates: the reads and final states are method.md's, token by token."""
    from method_reference import memory_read, memory_write
    from peft_deltamem.layer import DeltaMemLayer
    from peft_deltamem.runtime import CallRecord

    model = make_peft(num_state_heads=2, r=4)
    layer = next(m for m in model.modules() if isinstance(m, DeltaMemLayer))
    write = layer.delta_mem_write["default"]
    if projection == "hooked":  # a module the layer must call whole (quantized, sharded, observed)
        write.register_forward_hook(lambda module, args, output: None)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 12, layer.layout.hidden_size, generator=generator)
    state = torch.randn(2, 2, 4, 4, generator=generator) * 0.3
    write_mask = torch.zeros(2, 12, dtype=torch.bool)
    write_mask[0, 3:6] = True
    write_mask[0, 7] = True  # a gap inside the span: that token reads and does not write
    write_mask[1, 5:10] = True
    record = CallRecord(attention_mask=None, segment_ids=None, write_mask=write_mask, writes=True)
    with torch.no_grad(), use_impl(impl):
        reads, final = layer._token_scan("default", write, x, state, None, record)
    assert record.spans == {(2, 12, write_mask.device): (3, 10)}

    weight = write.weight.double()
    bias = layer.delta_mem_beta_bias["default"].double()
    w_q, w_k, w_v, w_b = weight.split(8)
    for row in range(2):
        for head in range(2):
            rows = slice(4 * head, 4 * head + 4)
            s = state[row, head].double()
            for t in range(12):
                expected = memory_read(s, w_q[rows], x[row, t].double())
                torch.testing.assert_close(reads[row, head, t].double(), expected, atol=1e-5, rtol=1e-5)
                if write_mask[row, t]:
                    s = memory_write(s, w_k[rows], w_v[rows], w_b[rows], bias[rows], x[row, t].double())
            torch.testing.assert_close(final[row, head].double(), s, atol=1e-5, rtol=1e-5)


def test_a_call_in_which_no_row_writes_leaves_the_state_as_it_is():
    from peft_deltamem.layer import DeltaMemLayer
    from peft_deltamem.runtime import CallRecord

    model = make_peft()
    layer = next(m for m in model.modules() if isinstance(m, DeltaMemLayer))
    x = torch.randn(2, 6, layer.layout.hidden_size)
    state = torch.randn(2, 1, 8, 8)
    record = CallRecord(None, None, torch.zeros(2, 6, dtype=torch.bool), writes=True, write_gate_stats=[])
    with torch.no_grad():
        reads, final = layer._token_scan("default", layer.delta_mem_write["default"], x, state, None, record)
    assert final is state and reads.shape == (2, 1, 6, 8)
    assert record.write_gate_stats == [0.0]  # the mean gate of no written token, as before
