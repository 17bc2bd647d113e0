"""Memory semantics: the math of method.md, the memory passed per call, pieces == whole, padding, write control."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from conftest import make_peft, random_ids
from method_reference import memory_write
from peft_deltamem.tiny_models import tiny_model

ATOL = 1e-5


def logits(model, ids, mask=None, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kwargs).logits


def first_layer_input(model, ids, **kwargs):
    """The hidden state entering layer 0's attention block, captured with a pre-hook."""
    captured = {}
    attention = model.base_model.model.model.layers[0].self_attn.base_layer

    def grab(module, args, kw):
        captured["x"] = (args[0] if args else kw["hidden_states"]).detach()

    handle = attention.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        logits(model, ids, **kwargs)
    finally:
        handle.remove()
    return captured["x"]


def reference_token_state(layer, x: torch.Tensor, adapter: str = "default") -> torch.Tensor:
    """method.md written out by hand, token by token, for one batch row and H state heads."""
    settings = layer.settings[adapter]
    r, heads = settings.r, settings.num_state_heads
    weight = layer.delta_mem_write[adapter].weight.double()
    bias = layer.delta_mem_beta_bias[adapter].double()
    w_q, w_k, w_v, w_b = weight.split(r * heads)
    state = torch.zeros(heads, r, r, dtype=torch.float64)
    for x_t in x.double():
        for h in range(heads):
            rows = slice(h * r, (h + 1) * r)
            state[h] = memory_write(state[h], w_k[rows], w_v[rows], w_b[rows], bias[rows], x_t)
    return state


@pytest.mark.parametrize("heads", [1, 3])
def test_state_follows_the_method_math(heads):
    model = make_peft(num_state_heads=heads)
    ids = random_ids(1, 9)
    x = first_layer_input(model, ids)
    mem = model.new_memory(1)
    logits(model, ids, memory=mem)
    layer = model.base_model.model.model.layers[0].self_attn
    state = mem.states["model.layers.0.self_attn"][0]
    assert state.dtype == torch.float32
    torch.testing.assert_close(state.double(), reference_token_state(layer, x[0]), atol=1e-5, rtol=1e-4)


def test_correction_is_scale_times_delta_of_read_before_write():
    model = make_peft(delta_heads=("q", "o"))
    layer = model.base_model.model.model.layers[0].self_attn
    ids = random_ids(1, 6)
    x = first_layer_input(model, ids)[0]
    seen = {}
    q_proj = layer.base_layer.q_proj
    handle = q_proj.register_forward_hook(lambda m, i, o: seen.setdefault("q", o.detach()))
    logits(model, ids)
    handle.remove()
    # Rebuild each token's read from the reference states: read_t = S_{t-1} q_t.
    r = layer.settings["default"].r
    w_q = layer.delta_mem_write["default"].weight[:r].double()
    reads = []
    for t in range(x.shape[0]):
        state = reference_token_state(layer, x[:t])[0] if t else torch.zeros(r, r, dtype=torch.float64)
        reads.append(state @ F.normalize(torch.tanh(w_q @ x[t].double()), dim=0))
    delta_q = layer.delta_mem_out["default"].weight[: q_proj.out_features].double()
    expected = (
        x.double() @ q_proj.weight.double().T + layer.settings["default"].scaling * torch.stack(reads) @ delta_q.T
    )
    torch.testing.assert_close(seen["q"][0].double(), expected, atol=1e-5, rtol=1e-4)


def test_zero_init_is_exact_noop():
    base = tiny_model("llama")
    ids = random_ids(2, 7)
    expected = logits(base, ids)
    model = make_peft(tiny_model("llama"), init_weights=True)
    mem = model.new_memory(2)
    logits(model, ids, memory=mem)  # writes memory; with zero Δ heads the reads change nothing
    assert not mem.is_empty
    assert torch.equal(logits(model, ids, memory=mem), expected)


def test_memory_carries_across_calls_only_when_passed():
    model = make_peft()
    history, question = random_ids(1, 12, seed=1), random_ids(1, 5, seed=2)
    alone = logits(model, question)
    mem = model.new_memory(1)
    logits(model, history, memory=mem)
    after_history = logits(model, question, memory=mem)
    assert (after_history - alone).abs().max() > 1e-3
    assert torch.equal(logits(model, question), alone)  # no memory passed: stateless
    mem.reset()
    assert torch.equal(logits(model, question, memory=mem), alone)


def test_pieces_equal_whole_with_kv_cache():
    model = make_peft(num_state_heads=2, delta_heads=("q", "k", "v", "o"))
    ids = random_ids(2, 23)
    whole_mem = model.new_memory(2)
    whole = logits(model, ids, use_cache=True, memory=whole_mem)
    whole_state = whole_mem.states
    mem = model.new_memory(2)
    cache, pieces = DynamicCache(config=model.config), []
    for start, end in [(0, 7), (7, 8), (8, 16), (16, 23)]:
        mask = torch.ones(2, end, dtype=torch.long)
        pieces.append(logits(model, ids[:, start:end], mask, past_key_values=cache, use_cache=True, memory=mem))
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, atol=ATOL, rtol=0)
    for name, state in mem.states.items():
        torch.testing.assert_close(state, whole_state[name], atol=ATOL, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_neither_writes_nor_reads(side):
    model = make_peft()
    short, long_ = random_ids(1, 6, seed=3), random_ids(1, 10, seed=4)
    expected = {}
    for name, ids in (("short", short), ("long", long_)):
        mem = model.new_memory(1)
        expected[name] = (logits(model, ids, memory=mem), mem.states)
    pad = torch.zeros(1, 4, dtype=torch.long)
    ones, zeros = torch.ones(1, 6, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)
    padded = torch.cat([pad, short], 1) if side == "left" else torch.cat([short, pad], 1)
    mask = torch.cat([zeros, ones], 1) if side == "left" else torch.cat([ones, zeros], 1)
    batch = torch.cat([padded, long_]), torch.cat([mask, torch.ones(1, 10, dtype=torch.long)])
    mem = model.new_memory(2)
    out = logits(model, *batch, memory=mem)
    short_out = out[0, 4:] if side == "left" else out[0, :6]
    torch.testing.assert_close(short_out, expected["short"][0][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1], expected["long"][0][0], atol=ATOL, rtol=0)
    for name, state in mem.states.items():
        torch.testing.assert_close(state[0], expected["short"][1][name][0], atol=ATOL, rtol=0)
        torch.testing.assert_close(state[1], expected["long"][1][name][0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_without_a_memory_every_forward_starts_empty(mode):
    model = make_peft()
    getattr(model, mode)()
    ids = random_ids(1, 8)
    first = model(input_ids=ids).logits.detach()
    model(input_ids=random_ids(1, 8, seed=3))
    second = model(input_ids=ids).logits.detach()
    assert torch.equal(first, second)


def test_batch_size_must_match_the_memory_rows():
    model = make_peft()
    mem = model.new_memory(2)
    logits(model, random_ids(2, 5), memory=mem)
    before = mem.states
    with pytest.raises(ValueError, match="batch size 3 but the memory has 2 rows"):
        logits(model, random_ids(3, 5), memory=mem)
    assert all(torch.equal(before[n], t) for n, t in mem.states.items())
    logits(model, random_ids(3, 5), memory=model.new_memory(3))


def test_reset_selected_rows():
    model = make_peft()
    history, question = random_ids(2, 9, seed=5), random_ids(2, 4, seed=6)
    mem = model.new_memory(2)
    logits(model, history, memory=mem)
    continued = logits(model, question, memory=mem.clone())
    mem.reset(rows=[1])
    out = logits(model, question, memory=mem)
    fresh = logits(model, question)
    torch.testing.assert_close(out[1], fresh[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[0], continued[0], atol=ATOL, rtol=0)
    with pytest.raises(IndexError):
        mem.reset(rows=[5])


def test_writes_off_reads_but_keeps_state():
    model = make_peft()
    mem = model.new_memory(1)
    logits(model, random_ids(1, 9, seed=7), memory=mem)
    before = mem.states
    question = random_ids(1, 4, seed=8)
    read_only = logits(model, question, memory=mem, memory_writes=False)
    after = mem.states
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert (logits(model, question) - read_only).abs().max() > 1e-4


def test_write_mask_controls_which_tokens_write():
    model = make_peft()
    ids = random_ids(1, 10, seed=9)
    write_mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    masked_mem, prefix_mem = model.new_memory(1), model.new_memory(1)
    logits(model, ids, memory_write_mask=write_mask, memory=masked_mem)
    logits(model, ids[:, :5], memory=prefix_mem)
    masked, prefix = masked_mem.states, prefix_mem.states
    assert not prefix_mem.is_empty
    for name in masked:
        torch.testing.assert_close(masked[name], prefix[name], atol=ATOL, rtol=0)


def test_state_is_float32_for_bf16_models():
    model = make_peft(tiny_model("llama", dtype=torch.bfloat16))
    mem = model.new_memory(1)
    logits(model, random_ids(1, 5), memory=mem)
    for state in mem.states.values():
        assert state.dtype == torch.float32 and state.shape == (1, 1, 8, 8)


def test_disable_adapter_gives_base_outputs_and_does_not_write():
    base_out = logits(tiny_model("llama"), random_ids(1, 6))
    model = make_peft()
    mem = model.new_memory(1)
    logits(model, random_ids(1, 8, seed=1), memory=mem)
    before = mem.states
    with model.disable_adapter():
        assert torch.equal(logits(model, random_ids(1, 6), memory=mem), base_out)
    after = mem.states
    assert all(torch.equal(before[n], after[n]) for n in before)


class TestSegmentWrites:
    def model(self):
        return make_peft(write_granularity="segment")

    def test_missing_segment_ids_is_an_error(self):
        with pytest.raises(ValueError, match="memory_segment_ids"):
            logits(self.model(), random_ids(1, 6))

    def test_first_segment_sees_empty_memory_and_later_ones_do_not(self):
        model = self.model()
        ids = random_ids(1, 9)
        segments = torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2, 2]])
        out = logits(model, ids, memory_segment_ids=segments)
        with model.disable_adapter():
            base = logits(model, ids)
        torch.testing.assert_close(out[:, :3], base[:, :3], atol=ATOL, rtol=0)
        assert (out[:, 3:] - base[:, 3:]).abs().max() > 1e-4

    def test_calls_split_at_segment_boundaries_equal_one_call(self):
        model = self.model()
        ids = random_ids(2, 10)
        segments = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 3, 3, 3]] * 2)
        whole = logits(model, ids, use_cache=True, memory_segment_ids=segments)
        mem = model.new_memory(2)
        cache = DynamicCache(config=model.config)
        first = logits(
            model, ids[:, :5], torch.ones(2, 5), past_key_values=cache, memory_segment_ids=segments[:, :5], memory=mem
        )
        second = logits(
            model, ids[:, 5:], torch.ones(2, 10), past_key_values=cache, memory_segment_ids=segments[:, 5:], memory=mem
        )
        torch.testing.assert_close(torch.cat([first, second], 1), whole, atol=ATOL, rtol=0)

    def test_state_is_one_write_per_segment_of_mean_hidden(self):
        model = self.model()
        ids = random_ids(1, 8)
        segments = torch.tensor([[4, 4, 4, 9, 9, 7, 7, 7]])
        x = first_layer_input(model, ids, memory_segment_ids=segments)[0]
        mem = model.new_memory(1)
        logits(model, ids, memory_segment_ids=segments, memory=mem)
        layer = model.base_model.model.model.layers[0].self_attn
        pooled = torch.stack([x[0:3].mean(0), x[3:5].mean(0), x[5:8].mean(0)])
        expected = reference_token_state(layer, pooled)
        state = mem.states["model.layers.0.self_attn"][0]
        torch.testing.assert_close(state.double(), expected, atol=1e-5, rtol=1e-4)

    def test_padding_is_not_part_of_a_segment(self):
        model = self.model()
        ids = random_ids(1, 6)
        segments = torch.tensor([[0, 0, 1, 1, 1, 2]])
        mem = model.new_memory(1)
        logits(model, ids, memory_segment_ids=segments, memory=mem)
        expected = mem.states
        mem = model.new_memory(1)
        padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
        mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 6)], 1).long()
        pad_segments = torch.cat([torch.tensor([[0, 0, 0]]), segments], 1)
        logits(model, padded, mask, memory_segment_ids=pad_segments, memory=mem)
        for name, state in mem.states.items():
            torch.testing.assert_close(state, expected[name], atol=ATOL, rtol=0)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    def grads(checkpointing: bool):
        model = make_peft(tiny_model("llama", seed=1), num_state_heads=2)
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
            model.enable_input_require_grads()
        ids = random_ids(2, 12)
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain and set(plain) == set(checkpointed)
    for name in plain:
        assert plain[name].abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)
