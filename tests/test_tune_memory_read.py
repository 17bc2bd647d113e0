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
    rows, outs, gates = tmr.read_parameters(model)
    assert gates == []
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


def test_train_gate_trains_only_the_read_gates_and_they_move_the_loss():
    model = frozen_prefix_model("token", [2, 3], read_gate=True).eval()
    rows, outs, gates = tmr.read_parameters(model, "gate")
    assert rows == [] and outs == [] and len(gates) == 4  # W_g and b_g of two layers
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in gates}
    loss, _ = tmr.loss_and_hits(model, _items(model), kl_weight=1.0)
    loss.backward()
    assert all(g.grad.abs().sum() > 0 for g in gates)
    plain = frozen_prefix_model("token", [2, 3]).eval()
    try:
        tmr.read_parameters(plain, "read+gate")
    except SystemExit as stop:
        assert "--read-gate" in str(stop)
    else:
        raise AssertionError("a model without a read gate cannot train one")


def test_general_rows_are_asked_after_a_chat_as_the_evaluation_asks_them(monkeypatch):
    """Each general prompt follows a chat's history: the row is the engine's window-of-two prompt (the chat's last
    message and the prompt) plus the frozen model's greedy reply to it, read with that chat's memory."""
    from peft import get_peft_model

    import peft_deltamem.training.frozen_prefix as frozen_prefix
    from benchmarks.open_facts import OpenFactsEpisode
    from benchmarks.open_recall import engine_replies
    from peft_deltamem import DeltaMemConfig
    from peft_deltamem.agents.session import SessionPolicy, plan_turn
    from peft_deltamem.tiny_models import tiny_model
    from tokenizers_for_tests import chat_tokenizer

    tok = chat_tokenizer()
    config = DeltaMemConfig(task_type="CAUSAL_LM", r=4, layers_to_transform=[2, 3])
    model = get_peft_model(tiny_model("llama", num_layers=4, vocab_size=len(tok)), config).eval()
    say = [("user", "My bike is red."), ("assistant", "Noted."), ("user", "Hi again"), ("assistant", "Hello!")]
    episodes = [OpenFactsEpisode(messages=[{"role": r, "content": c} for r, c in say[: 2 + 2 * j]]
                                 + [{"role": "user", "content": "What colour is my bike?"}],
                                 kind="bike", value="red", reply="Red.") for j in (0, 1)]  # fmt: skip
    memories = [{"states": {"chat": j}} for j in (0, 1)]
    prompts = ["What is 12 plus 30?", "Spell 'cat'.", "Hi there"]
    seen = []
    real = frozen_prefix.frozen_hidden
    monkeypatch.setattr(frozen_prefix, "frozen_hidden", lambda m, rows, pad: seen.extend(rows) or real(m, rows, pad))
    items = tmr.general_items(model, tok, prompts, episodes, memories)
    chats = [episodes[i % 2].history + [{"role": "user", "content": p}] for i, p in enumerate(prompts)]
    replies = engine_replies(model, tok, chats, window=2, memory=False, max_new_tokens=40)
    for i, (item, chat, row) in enumerate(zip(items, chats, seen, strict=True)):
        assert item["states"] is memories[i % 2]["states"]
        prompt = plan_turn([], 0, chat, tok, SessionPolicy(window=2)).prompt
        answer = item["answer"].tolist()
        assert row == prompt + answer[:-1]
        assert tok.decode(answer, skip_special_tokens=True).strip() == replies[i].strip()
    # b2's layout: each prompt alone, no memory of its own (general_kl pairs one per step)
    seen.clear()
    alone = tmr.general_items(model, tok, prompts)
    for item, prompt, row in zip(alone, prompts, seen, strict=True):
        assert "states" not in item
        assert row[: len(row) - len(item["answer"]) + 1] == plan_turn([], 0, [{"role": "user", "content": prompt}], tok,
                                                                      SessionPolicy(window=2)).prompt  # fmt: skip


def test_general_kl_is_the_mean_kl_plus_the_weighted_kl_where_the_greedy_token_changes():
    model = _model()
    items = _items(model)
    logits, mask = tmr.batch_logits(model, items)
    frozen, _ = tmr.batch_logits(model, items, memory=False)
    logp, ref = logits.log_softmax(-1), frozen.log_softmax(-1)
    plain = F.kl_div(logp[mask], ref[mask], log_target=True, reduction="batchmean")
    torch.testing.assert_close(tmr.general_kl(model, items).detach(), plain.detach(), atol=1e-5, rtol=1e-5)
    flips = mask & (logits.argmax(-1) != frozen.argmax(-1))
    assert flips.any()  # the memory changes some greedy tokens of this model
    per_flip = sum(F.kl_div(logp[j][flips[j]], ref[j][flips[j]], log_target=True, reduction="sum")
                   for j in range(len(items)))  # fmt: skip
    torch.testing.assert_close(tmr.general_kl(model, items, flip_weight=3.0).detach(),
                               (plain + 3.0 * per_flip / len(items)).detach(), atol=1e-5, rtol=1e-5)  # fmt: skip


def test_load_init_adds_a_read_gate_that_starts_as_the_adapter_without_it(tmp_path):
    from peft import PeftModel

    from peft_deltamem.tiny_models import tiny_model

    model = _model()
    model.save_pretrained(tmp_path / "plain")
    items = _items(model)
    expected, _ = tmr.batch_logits(model, items)
    torch.manual_seed(0)
    gated = tmr.load_init(tiny_model("llama", num_layers=4), tmp_path / "plain", read_gate=True)
    assert gated.peft_config["default"].read_gate
    logits, _ = tmr.batch_logits(gated, items)
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=0)
    torch.manual_seed(0)
    plain = tmr.load_init(tiny_model("llama", num_layers=4), tmp_path / "plain")
    assert isinstance(plain, PeftModel) and not plain.peft_config["default"].read_gate


def test_gate_mean_averages_each_rows_own_left_padded_positions_over_layers_and_heads():
    items = [{"row": torch.zeros(3, 4)}, {"row": torch.zeros(1, 4)}]
    # two layers, (B=2, T=3, H=2) pre-sigmoid outputs; logit 0 is g = 1, a large negative one g = 0
    shut, pad = -30.0, 30.0  # padded positions hold a wide-open gate that must not count
    first = torch.tensor([[[0.0, 0.0], [shut, shut], [0.0, shut]], [[pad, pad], [pad, pad], [0.0, 0.0]]])
    second = torch.full((2, 3, 2), shut)
    mean = tmr.gate_mean([first, second], items)
    # layer one: row 0 has g = 1,1,0,0,1,0 and row 1 has 1,1 over its one position -> (3 + 2) / 8
    torch.testing.assert_close(mean, torch.tensor((5 / 8 + 0.0) / 2), atol=1e-6, rtol=0)


def test_read_gates_collect_the_adapters_gate_outputs_and_their_mean_trains_the_gate_shut():
    model = frozen_prefix_model("token", [2, 3], read_gate=True).eval()  # random gates: g between 0 and 2
    _, _, gates = tmr.read_parameters(model, "gate")
    items = _items(model)
    with tmr.read_gates(model) as seen:
        tmr.general_kl(model, items)  # the frozen model's pass (adapters off) runs no gate
    assert len(seen) == 2 and seen[0].shape[-1] == model.peft_config["default"].num_state_heads
    mean = tmr.gate_mean(seen, items)
    assert 0.3 < mean.item() < 1.7
    mean.backward()
    biases = [g for g in gates if g.dim() == 1]
    assert all((b.grad > 0).all() for b in biases)  # descent lowers every bias: the gate closes
    with torch.no_grad():
        for b in biases:
            b.fill_(-30.0)
    with tmr.read_gates(model) as seen:
        shut = tmr.general_kl(model, items)
    assert tmr.gate_mean(seen, items) < 1e-3
    assert shut.item() < 1e-6  # a closed gate is the frozen model
    plain_model = _model()
    with tmr.read_gates(plain_model) as seen:
        tmr.general_kl(plain_model, _items(plain_model))
    try:
        tmr.gate_mean(seen, items)
    except SystemExit as stop:
        assert "--read-gate" in str(stop)
    else:
        raise AssertionError("a gate mean without a read gate must stop")
