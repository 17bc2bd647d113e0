"""scripts/distill_attention_memory.py: its teacher target is the attention the frozen model pays to the hidden
messages, and the correction it trains is the one the δ-mem layer adds once the weights are loaded into an adapter."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from peft_deltamem.tiny_models import tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import distill_attention_memory as dam  # noqa: E402


def _attention_outputs(model, ids, layer):
    captured = {}
    handle = model.model.layers[layer].self_attn.register_forward_hook(lambda mod, a, out: captured.update(o=out[0]))
    with torch.no_grad():
        model.model(torch.tensor([ids]))
    handle.remove()
    return captured["o"][0]


def test_teacher_delta_is_the_attention_paid_to_the_hidden_positions():
    model = tiny_model("llama")
    ids = torch.randint(3, 100, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    (states,), deltas = dam.frozen_pass(model, [ids], [0, 1], teacher=(_hidden(20, 4, 6), 6))
    assert set(states) == {0, 1} and states[0].shape == (20, 64)
    assert deltas[1].shape == (6, 64) and deltas[1].abs().max() > 1e-3  # hiding 10 positions changes the output
    # nothing hidden (the window is the whole row): no difference
    _, none_hidden = dam.frozen_pass(model, [ids], [0, 1], teacher=(torch.zeros(20, dtype=torch.bool), 6))
    assert torch.allclose(none_hidden[1].float(), torch.zeros(6, 64), atol=1e-3)
    # layer 0 sees the embeddings: hiding positions there equals running the model without them, up to RoPE,
    # which is relative, so the window's own pairs keep their distances only when nothing sits between them:
    # with s = 0 the window is the last m positions alone, and its attention is that of those tokens run alone
    _, last_only = dam.frozen_pass(model, [ids], [0], teacher=(_hidden(20, 0, 6), 6))
    full = _attention_outputs(model, ids, 0)[-6:]
    alone = _attention_outputs(model, ids[-6:], 0)
    assert torch.allclose(full - alone, last_only[0].float(), atol=2e-3)


def _hidden(length, s, m):
    return dam.hidden_positions(list(range(length)), s, m, None, None, "history")


def test_value_target_hides_only_the_values_tokens_outside_the_window():
    class Tok:
        def encode(self, text, add_special_tokens=False):
            return {" Mila": [7, 8], "Mila": [9]}[text]

    row = [1, 2, 7, 8, 3, 9, 4, 7, 8, 5]  # the value spelled twice in the history, once in the window (last 3)
    hidden = dam.hidden_positions(row, 1, 3, "Mila", Tok(), "value")
    assert hidden.nonzero().flatten().tolist() == [2, 3, 5]
    assert not dam.hidden_positions(row, 1, 3, None, Tok(), "value").any()  # never told: nothing hidden
    assert dam.hidden_positions(row, 1, 3, "Mila", Tok(), "history").nonzero().flatten().tolist() == list(range(1, 7))


def test_trained_correction_is_what_the_adapter_adds(tmp_path):
    model = tiny_model("llama")
    generator = torch.Generator().manual_seed(1)
    history = torch.randint(3, 100, (14,), generator=generator).tolist()
    query = torch.randint(3, 100, (7,), generator=generator).tolist()
    (hist_states, query_states), _ = dam.frozen_pass(model, [history, query], [1])
    memory = dam.LayerMemory(model.model.layers[1].self_attn, r=16, beta_bias=-1.0)
    with torch.no_grad():
        for p in memory.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    peft_model = dam.to_adapter(model, {1: memory}, [1], r=16)
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = dam.from_adapter(model, tmp_path / "adapter", [1], r=16)[1]  # the inverse of to_adapter
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), memory.parameters(), strict=True))
    mem = peft_model.new_memory(1)
    peft_model(input_ids=torch.tensor([history]), memory=mem)
    with_memory = _read(peft_model, query, mem)
    # the memory the probes write from cached states is the one the adapter wrote (fp16 cached states: rounding)
    (state,) = mem.states.values()  # one adapted layer
    assert torch.allclose(memory.written(hist_states[1]), state, atol=1e-3)
    without = _read(peft_model, query, None)
    told = torch.zeros(14, dtype=torch.bool)
    told[5:7] = True
    chat = {"hist": hist_states, "query": query_states, "delta": {1: (with_memory - without)}, "told": told}
    assert (with_memory - without).abs().max() > 1e-3
    assert dam.batch_loss({1: memory}, [chat], [1])[0][1].item() < 1e-4  # fp16 cached states: rounding only
    chat["delta"] = {1: 2 * (with_memory - without)}
    assert dam.batch_loss({1: memory}, [chat], [1])[0][1].item() > 0.2
    # right on the reply (the last 2 positions) only: the loss weighted to the reply is nearly zero
    chat["delta"][1][-2:] = (with_memory - without)[-2:]
    chat["reply"] = 2
    assert dam.batch_loss({1: memory}, [chat], [1])[0][1].item() > 0.1
    assert dam.batch_loss({1: memory}, [chat], [1], reply_weight=1e6)[0][1].item() < 1e-4


def test_gate_loss_asks_the_gate_to_open_on_the_told_values_only():
    model = tiny_model("llama")
    (states,), _ = dam.frozen_pass(model, [list(range(3, 17))], [1])
    hist = states[1].float()
    told = torch.zeros(14, dtype=torch.bool)
    told[5:7] = True
    chat = {"hist": {1: hist}, "query": {1: hist[:3]}, "delta": {1: torch.zeros(3, 64)}, "told": told}
    memory = dam.LayerMemory(model.model.layers[1].self_attn, r=16, beta_bias=-4.0)
    stats = {}
    _, shut = dam.batch_loss({1: memory}, [chat], [1], stats, gate_open=1.0)
    assert dam.gate_only_loss({1: memory}, [chat], [1], gate_open=1.0).item() == pytest.approx(shut.item())
    assert stats["told"] == pytest.approx(stats["other"])  # W_β starts at zero: one gate everywhere
    gate_rows = memory.write[3 * memory.heads_n * memory.r :]
    with torch.no_grad():  # a gate that reads one coordinate that only the told tokens have large
        hist[:, 0] = torch.where(told, 10.0, 0.0)
        gate_rows[:, 0] = 1.0
    _, opened = dam.batch_loss({1: memory}, [chat], [1], stats, gate_open=1.0)
    assert opened < shut and stats["told"] > 0.99 and stats["other"] < 0.02
    assert dam.spelled_positions([1, 7, 8, 2, 7, 9], ["ab"], _Tok({" ab": [7, 8], "ab": [9]})).tolist() == [
        False, True, True, False, False, True]  # fmt: skip


class _Tok:
    def __init__(self, vocab):
        self.vocab = vocab

    def encode(self, text, add_special_tokens=False):
        return self.vocab[text]


def _read(peft_model, query, mem):
    captured = {}
    attn = peft_model.base_model.model.model.layers[1].self_attn
    handle = attn.register_forward_hook(lambda mod, a, out: captured.update(o=out[0]))
    with torch.no_grad():
        if mem is None:  # the frozen model (without memory= a call still writes its own tokens as it goes)
            with peft_model.disable_adapter():
                peft_model(input_ids=torch.tensor([query]))
        else:
            peft_model(input_ids=torch.tensor([query]), memory=mem, memory_writes=False)
    handle.remove()
    return captured["o"][0]
