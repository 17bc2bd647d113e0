"""scripts/profile_decode.py: the wall-clock timers on the parts of a decoding call count each part of the model that
runs it (and nothing of the model that does not), and leave the classes as they were."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import DynamicCache

from peft_deltamem import DeltaMemConfig
from peft_deltamem.layer import DeltaMemLayer
from peft_deltamem.runtime import MemoryRuntime
from peft_deltamem.tiny_models import tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import profile_decode  # noqa: E402


def _decode(model, memory, parts, steps=3):
    cache = DynamicCache(config=model.config)
    kwargs = {"memory": memory} if memory is not None else {}
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]), past_key_values=cache, use_cache=True, **kwargs)
        parts.clear()
        for _ in range(steps):
            model(input_ids=torch.tensor([[8]]), past_key_values=cache, use_cache=True, **kwargs)


def test_part_timers_count_each_model_s_parts_and_restore_the_classes():
    frozen = tiny_model().eval()
    delta = get_peft_model(tiny_model().eval(), DeltaMemConfig(task_type="CAUSAL_LM", init_weights=False)).eval()
    attention, mlp = type(frozen.model.layers[0].self_attn), type(frozen.model.layers[0].mlp)
    timed = [(attention, "forward"), (mlp, "forward"), (DeltaMemLayer, "forward"), (DeltaMemLayer, "_corrections_for"),
             (MemoryRuntime, "begin_call"), (MemoryRuntime, "end_call")]  # fmt: skip
    before = [owner.__dict__[name] for owner, name in timed]
    parts, restore = profile_decode._part_timers(attention, mlp)
    try:
        _decode(frozen, None, parts)
        frozen_parts = profile_decode._per_token(parts, total_ms=100.0, tokens=3)
        _decode(delta.get_base_model(), delta.new_memory(1), parts)
        delta_parts = profile_decode._per_token(parts, total_ms=100.0, tokens=3)
    finally:
        restore()
    assert all(owner.__dict__[name] is fn for (owner, name), fn in zip(timed, before))
    assert set(frozen_parts) == set(delta_parts) == {p for p, _ in profile_decode.PARTS}
    assert frozen_parts["attention"] > 0 and frozen_parts["mlp"] > 0
    assert all(frozen_parts[p] == 0 for p in ("read", "layer_code", "call_start", "call_end"))
    assert all(delta_parts[p] > 0 for p in ("attention", "mlp", "read", "layer_code", "call_start", "call_end"))
    for out in (frozen_parts, delta_parts):  # the parts and the rest add up to the total
        named = sum(out[p] for p in ("attention", "mlp", "read", "layer_code", "call_start", "call_end", "rest"))
        assert abs(named - out["total"]) < 1e-9


def test_op_count_of_a_decoding_step_names_what_delta_mem_adds():
    frozen = tiny_model().eval()
    delta = get_peft_model(tiny_model().eval(), DeltaMemConfig(task_type="CAUSAL_LM", init_weights=False)).eval()

    def call(model, cache, ids, start, **kwargs):
        return model(input_ids=ids, past_key_values=cache, use_cache=True, **kwargs)

    prompt = torch.randint(3, 100, (1, 20))
    frozen_ops = profile_decode._count_ops(frozen, None, call, prompt)
    delta_ops = profile_decode._count_ops(delta.get_base_model(), delta.new_memory(1), call, prompt)
    layers = len(frozen.model.layers)
    assert frozen_ops["aten.baddbmm"] == 0 and delta_ops["aten.baddbmm"] == layers  # one read product per layer
    assert delta_ops["aten.tanh"] - frozen_ops["aten.tanh"] == layers + 1  # each layer's query, the stacked keys
