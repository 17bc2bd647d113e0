"""scripts/tune_memory_read.py: it trains only the memory's read, and its loss and hit counts look at the reply's
positions (rows of different lengths, right-aligned)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from peft_deltamem.layer import DeltaMemLayer
from peft_deltamem.training.frozen_prefix import cached_message_writes, frozen_hidden
from test_frozen_prefix import _model as frozen_prefix_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import tune_memory_read as tmr  # noqa: E402


def _model():
    return frozen_prefix_model("token", [2, 3]).eval()  # non-zero Δ heads and gates: the memory changes the outputs


def _items(model):
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 128, (n,), generator=generator).tolist() for n in (9, 6, 12, 7, 8)]
    hidden = frozen_hidden(model, rows, 0)
    with torch.no_grad():
        states = cached_message_writes(model, [[hidden[0], hidden[1]], [hidden[2]]])
    items = []
    for j, (row, answer_len, value) in enumerate([(3, 4, [1, 2]), (4, 3, [])]):
        answer = torch.randint(3, 128, (answer_len,), generator=generator)
        mask = torch.zeros(answer_len, dtype=torch.bool)
        mask[value] = True
        items.append({"states": {k: s[j] for k, s in states.items()}, "row": hidden[row], "answer": answer,
                      "value": mask})  # fmt: skip
    return items


def test_loss_and_hits_read_the_reply_positions_of_right_aligned_rows():
    model = _model()
    items = _items(model)
    loss, stats = tmr.loss_and_hits(model, items, kl_weight=0.0, reply_weight=2.0)
    logits, _ = tmr.batch_logits(model, items)
    ce, value_ce, first, start_hits = [], [], [], 0
    for j, it in enumerate(items):  # each row's reply occupies its last len(answer) positions
        row_logits = logits[j, logits.shape[1] - len(it["answer"]) :]
        per = F.cross_entropy(row_logits, it["answer"], reduction="none")
        ce += per[~it["value"]].tolist()
        value_ce += per[it["value"]].tolist()
        if it["value"].any():
            k = int(it["value"].nonzero()[0])
            first.append(int(row_logits[k].argmax() == it["answer"][k]))
        start_hits += int(row_logits[0].argmax() == it["answer"][0])
    expected = torch.tensor(value_ce).mean() + 2.0 * torch.tensor(ce).mean()
    torch.testing.assert_close(loss.detach(), expected, atol=1e-4, rtol=1e-4)
    assert (stats["n"], stats["hits"], stats["start_hits"]) == (1, sum(first), start_hits)
    # without the reply's cross-entropy the other positions weigh in through the KL from the frozen model
    kl_loss, kl_stats = tmr.loss_and_hits(model, items, kl_weight=1.0)
    torch.testing.assert_close(kl_loss.detach(), torch.tensor(value_ce).mean() + kl_stats["kl"], atol=1e-4, rtol=1e-4)
    assert kl_stats["kl"] > 0  # the memory changes the other positions' logits


def test_only_the_read_trains_the_query_rows_and_the_output_map():
    model = _model()
    rows, outs = tmr.read_parameters(model)
    layers = [m for m in model.modules() if isinstance(m, DeltaMemLayer)]
    assert not any(layer.delta_mem_beta_bias["default"].requires_grad for layer in layers)
    loss, _ = tmr.loss_and_hits(model, _items(model), kl_weight=1.0, reply_weight=1.0)
    loss.backward()
    tmr.keep_read_rows(rows)
    for write, keep in rows:
        width = keep.stop
        assert write.grad[:width].abs().sum() > 0  # W_mq
        assert write.grad[width:].abs().sum() == 0  # W_mk, W_mv, W_β stay
    assert all(out.grad.abs().sum() > 0 for out in outs)
