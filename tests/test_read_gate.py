"""The learned read gate (``DeltaMemConfig(read_gate=True)``): g = 2·sigmoid(W_g x + b_g) scales each token's read."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

import peft_deltamem
from conftest import make_peft, random_ids
from peft_deltamem.layer import DeltaMemLayer
from peft_deltamem.ops import use_impl
from peft_deltamem.tiny_models import tiny_model

ATOL = 1e-5


def layers(model):
    return [m for m in model.modules() if isinstance(m, DeltaMemLayer)]


def gated_copy(model, **config_kwargs):
    """A model with the same base and adapter weights as ``model`` plus a read gate (at its initial zeros)."""
    torch.manual_seed(0)
    base = tiny_model("llama")
    gated = make_peft(base, read_gate=True, **config_kwargs)
    missing, unexpected = gated.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("delta_mem_read_gate" in k for k in missing) and missing
    return gated


def set_gate(model, bias: float, weight_std: float = 0.0, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers(model):
            gate = layer.delta_mem_read_gate["default"]
            gate.bias.fill_(bias)
            gate.weight.copy_(torch.randn(gate.weight.shape, generator=generator) * weight_std)


def run(model, history, question, **kwargs):
    memory = model.new_memory(history.shape[0])
    with torch.no_grad():
        model(input_ids=history, memory=memory, **kwargs)
        return model(input_ids=question, memory=memory, **kwargs).logits, memory.states


@pytest.fixture
def pair():
    torch.manual_seed(0)
    plain = make_peft(tiny_model("llama"), num_state_heads=2)
    return plain, gated_copy(plain, num_state_heads=2)


def test_initial_gate_is_the_adapter_without_a_gate(pair):
    plain, gated = pair
    history, question = random_ids(2, 19, seed=1), random_ids(2, 6, seed=2)
    expected, expected_states = run(plain, history, question)
    logits, states = run(gated, history, question)
    assert torch.equal(logits, expected)
    for key, state in states.items():
        assert torch.equal(state, expected_states[key])  # the gate never touches the writes


def test_gate_scales_the_read(pair):
    """g = 0.5 everywhere equals the adapter without a gate whose Δ heads are halved; a closed gate (g = 0) is the
    frozen model even with a full memory, which it writes as an adapter without reads (Δ heads zero) does."""
    plain, gated = pair
    history, question = random_ids(2, 19, seed=1), random_ids(2, 6, seed=2)
    set_gate(gated, -math.log(3.0))  # 2·sigmoid(-ln 3) = 0.5
    with torch.no_grad():
        for layer in layers(plain):
            layer.delta_mem_out["default"].weight.mul_(0.5)
    expected, _ = run(plain, history, question)
    logits, _ = run(gated, history, question)
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)

    set_gate(gated, -1e4)
    with torch.no_grad():
        for layer in layers(plain):
            layer.delta_mem_out["default"].weight.zero_()
    _, written = run(plain, history, question)
    closed, states = run(gated, history, question)
    with torch.no_grad(), gated.disable_adapter():
        frozen = gated(input_ids=question).logits
    torch.testing.assert_close(closed, frozen, atol=ATOL, rtol=0)
    for key, state in states.items():
        assert torch.equal(state, written[key])


@pytest.mark.parametrize("impl", ["chunk", "fused_recurrent", "auto"])
def test_gated_prefill_and_decode_match_naive_and_pieces_equal_whole(pair, impl):
    _, gated = pair
    set_gate(gated, 0.3, weight_std=0.5)
    ids = random_ids(2, 23)

    def pieces(spans):
        memory, cache, out = gated.new_memory(2), DynamicCache(config=gated.config), []
        with torch.no_grad():
            for start, end in spans:
                mask = torch.ones(2, end, dtype=torch.long)
                out.append(gated(input_ids=ids[:, start:end], attention_mask=mask, past_key_values=cache,
                                 use_cache=True, memory=memory).logits)  # fmt: skip
        return torch.cat(out, 1), memory.states

    spans = [(0, 7), (7, 8), (8, 9), (9, 16), (16, 23)]  # single tokens take the fused decoding step
    with use_impl("naive"):
        whole, whole_states = pieces([(0, 23)])
    with use_impl(impl):
        split, split_states = pieces(spans)
    torch.testing.assert_close(split, whole, atol=ATOL, rtol=0)
    for key, state in split_states.items():
        torch.testing.assert_close(state, whole_states[key], atol=ATOL, rtol=ATOL)
    # the gate matters: the same weights with a gate at its initial zeros give other logits
    set_gate(gated, 0.0)
    with use_impl("naive"):
        ungated, _ = pieces([(0, 23)])
    assert (ungated - whole).abs().max() > 1e-3


def test_gate_trains_saves_and_loads(tmp_path, pair):
    from peft import PeftModel

    _, gated = pair
    history, question = random_ids(2, 19, seed=1), random_ids(2, 6, seed=2)
    memory = gated.new_memory(2)
    gated.train()
    gated(input_ids=history, memory=memory)
    gated(input_ids=question, memory=memory).logits.square().mean().backward()
    for layer in layers(gated):
        gate = layer.delta_mem_read_gate["default"]
        assert gate.weight.requires_grad and gate.weight.grad.abs().sum() > 0 and gate.bias.grad.abs().sum() > 0
    gated.eval()
    set_gate(gated, 0.7, weight_std=0.3)
    expected, _ = run(gated, history, question)
    gated.save_pretrained(tmp_path / "adapter")
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "adapter").eval()
    assert loaded.peft_config["default"].read_gate is True
    logits, _ = run(loaded, history, question)
    torch.testing.assert_close(logits, expected, atol=0, rtol=0)


def test_read_gate_must_be_a_bool():
    with pytest.raises(ValueError, match="read_gate"):
        peft_deltamem.DeltaMemConfig(read_gate="yes")
