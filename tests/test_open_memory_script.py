"""scripts/train_open_memory.py's ``--reply-params retrieval``: the reply loss leaves the fitted value path (W_mv)
and the Δ_q heads exactly as they were and trains the retrieval and Δ_o."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from peft import get_peft_model

from peft_deltamem import DeltaMemConfig
from peft_deltamem.tiny_models import tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import train_open_memory  # noqa: E402


def test_reply_params_retrieval_keeps_the_value_path_and_delta_q():
    model = get_peft_model(tiny_model("llama"), DeltaMemConfig(task_type="CAUSAL_LM", r=4, init_weights=False))
    params = [p for p in model.parameters() if p.requires_grad]
    before = {id(p): p.detach().clone() for p in params}
    keep = train_open_memory.reply_frozen_rows(model)
    assert len(keep) == 2 * len(model.base_model.model.model.layers)  # W_mv and Δ_q of every layer
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    for _ in range(3):  # as the script's step does it: backward, zero the kept rows' gradients, step
        ids = torch.randint(0, 100, (2, 12))
        memory = model.new_memory(2)
        model(input_ids=ids, memory=memory)
        loss = model(input_ids=ids, memory=memory, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        for weight, rows in keep:
            weight.grad[rows] = 0
        optimizer.step()
    for weight, rows in keep:
        assert torch.equal(weight[rows], before[id(weight)][rows])
    changed = [p for p in params if not torch.equal(p, before[id(p)])]
    assert changed  # the retrieval and Δ_o did train
    for weight, rows in keep:  # and inside a kept matrix, the other rows moved
        mask = torch.ones(weight.shape[0], dtype=torch.bool)
        mask[rows] = False
        assert not torch.equal(weight[mask], before[id(weight)][mask])
