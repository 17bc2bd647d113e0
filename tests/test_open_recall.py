"""The open-vocabulary recall harness: every condition goes through the chat engine, scored by the reply."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from benchmarks import open_recall
from benchmarks.open_facts import OpenFactsEpisode
from peft_deltamem import DeltaMemConfig
from peft_deltamem.recall_task import build_tokenizer
from peft_deltamem.tiny_models import tiny_model


def _episode(value, kind="cousin", stale=()):
    messages = [
        {"role": "user", "content": f"alice likes {value or 'teal'} ."},
        {"role": "assistant", "content": "we talked about work"},
        {"role": "user", "content": "then music and lunch"},
        {"role": "assistant", "content": "and then trains"},
        {"role": "user", "content": "alice likes ?"},
    ]
    return OpenFactsEpisode(messages, kind, value, f"alice likes {value} .", {kind: value}, list(stale))


@pytest.fixture(scope="module")
def chat_model():
    tok = build_tokenizer()
    torch.manual_seed(0)
    base = tiny_model("llama", vocab_size=len(tok))
    base.generation_config.eos_token_id = tok.eos_token_id
    return get_peft_model(base, DeltaMemConfig(task_type="CAUSAL_LM", init_weights=False)).eval(), tok


def test_each_condition_sends_what_it_names():
    episodes = [_episode("teal"), _episode("gold")]
    none, settings = open_recall.conversations(episodes, "none")
    assert none == [[{"role": "user", "content": "alice likes ?"}]] * 2 and settings == {"memory": False}
    other, _ = open_recall.conversations(episodes, "other_memory")
    assert other[0][:-1] == episodes[1].history and other[0][-1] == episodes[0].messages[-1]
    full, settings = open_recall.conversations(episodes, "context_memory")
    assert full[0] == episodes[0].messages
    assert settings == {"memory": True, "window": open_recall.FULL, "write": "arrival"}
    with pytest.raises(ValueError, match="condition must be one of"):
        open_recall.conversations(episodes, "oracle")


def test_replies_come_from_the_engine_and_are_scored(chat_model):
    model, tok = chat_model
    episodes = [_episode("teal"), _episode("gold", stale=("teal",)), _episode(None)]
    results = open_recall.evaluate(model, tok, episodes, conditions=("memory", "context"), max_new_tokens=3)
    for condition in ("memory", "context"):
        r = results[condition]
        assert len(r["replies"]) == 3 and all(isinstance(x, str) for x in r["replies"])
        assert (r["n_told"], r["n_not_told"], r["n_updated"]) == (2, 1, 1)
        assert 0.0 <= r["recall"] <= 1.0
    # the same chats through the engine directly give the same replies (greedy, fresh sessions)
    direct = open_recall.engine_replies(model, tok, [e.messages for e in episodes], window=2, memory=True,
                                        max_new_tokens=3)  # fmt: skip
    assert direct == results["memory"]["replies"]
    assert not model.training


def test_the_write_policy_reaches_every_memory_condition_but_context_memory(chat_model, monkeypatch):
    model, tok = chat_model
    seen = []
    monkeypatch.setattr(open_recall, "engine_replies", lambda *a, **k: seen.append(k) or ["x"] * len(a[2]))
    conditions = ("memory", "other_memory", "context_memory", "window")
    open_recall.evaluate(model, tok, [_episode("teal")], conditions=conditions, general=True, write="prompt")
    writes = [k.get("write") for k in seen if k["memory"]]
    assert writes == ["prompt", "prompt", "arrival", "prompt", "prompt"]  # + general_memory, general_fresh_memory


def test_scores_and_targets():
    episodes = [_episode("teal"), _episode("gold", stale=("teal",)), _episode(None)]
    s = open_recall.score(["It is teal.", "teal, I think", "You haven't told me."], episodes)
    assert s["recall"] == 0.5 and s["not_told"] == 1.0 and s["stale_named"] == 1.0 and s["degenerate"] == 0.0
    results = {
        "none": {"recall": 0.0, "degenerate": 0.0},
        "window": {"recall": 0.0, "degenerate": 0.1},
        "memory": {"recall": 0.12, "degenerate": 0.05},
        "context": {"recall": 0.2, "degenerate": 0.0},
        "context_memory": {"recall": 0.17, "degenerate": 0.0},
        "general_window": {"accuracy": 0.7},
        "general_memory": {"accuracy": 0.66},
        "general_fresh_window": {"accuracy": 0.7},
        "general_fresh_memory": {"accuracy": 0.6},
    }
    assert open_recall.gap_recovered(results) == pytest.approx(0.6)
    met = open_recall.targets(results)
    assert met == {
        "memory recovers >= 50 % of the gap": True,
        "history visible: adapter >= frozen - 0.02": False,
        "general questions within 0.05": True,
        "fresh general questions within 0.05": False,
        "degenerate replies no more than the frozen model": True,
    }


def test_a_conversation_longer_than_the_engines_request_limit_is_played(chat_model):
    """A long chat arrives in one request (as a client resending its history sends it): the harness raises the
    engine's message limit for its own sessions instead of failing at 64 messages."""
    model, tok = chat_model
    long = [{"role": "user" if i % 2 == 0 else "assistant", "content": "we talked about work"} for i in range(70)]
    long.append({"role": "user", "content": "alice likes ?"})
    (reply,) = open_recall.engine_replies(model, tok, [long], window=2, memory=True, max_new_tokens=2)
    assert isinstance(reply, str)
