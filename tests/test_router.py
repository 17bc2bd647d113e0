"""The memory router: which replies read the session's memory, decided once per reply from the user's last message."""

from __future__ import annotations

import json

import pytest
import torch

from peft_deltamem import cli
from peft_deltamem.agents.engine import ChatEngine
from peft_deltamem.agents.router import ROUTER_FILE, MemoryRouter, pooled_hidden_states
from peft_deltamem.agents.session import SessionPolicy
from peft_deltamem.agents.store import DirectoryStore
from test_agents import PARAMS, USER_TURNS, make_model, memory_of, run_turns


@pytest.fixture(scope="module")
def tokenizer():
    from peft_deltamem.recall_task import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_model(tokenizer, seed=3)


def constant_router(model, reads: bool) -> MemoryRouter:
    return MemoryRouter(layer=1, weight=torch.zeros(model.config.hidden_size), bias=1.0 if reads else -1.0)


def engine(model, tokenizer, root, **kwargs) -> ChatEngine:
    return ChatEngine(model, tokenizer, DirectoryStore(root), SessionPolicy(window=2), **kwargs)


def test_fit_separates_the_two_kinds_and_round_trips_through_its_file(tmp_path):
    gen = torch.Generator().manual_seed(0)
    direction = torch.randn(16, generator=gen)
    memory = torch.randn(40, 16, generator=gen) + 2 * direction
    other = torch.randn(60, 16, generator=gen) - 2 * direction
    router = MemoryRouter.fit(memory, other, layer=3)
    assert ((memory @ router.weight + router.bias) > 0).float().mean() > 0.95
    assert ((other @ router.weight + router.bias) < 0).float().mean() > 0.95
    router.save(tmp_path)
    loaded = MemoryRouter.load(tmp_path)
    assert loaded.layer == 3 and torch.equal(loaded.weight, router.weight) and loaded.bias == router.bias
    with pytest.raises(FileExistsError, match="overwrite"):
        router.save(tmp_path)
    assert MemoryRouter.load(tmp_path / "elsewhere") is None


def test_bad_router_files_and_values_are_refused_by_name(tmp_path, model):
    (tmp_path / ROUTER_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a memory router file"):
        MemoryRouter.load(tmp_path)
    with pytest.raises(ValueError, match="finite"):
        MemoryRouter(layer=1, weight=torch.tensor([float("nan"), 1.0]), bias=0.0)
    with pytest.raises(ValueError, match="non-negative"):
        MemoryRouter(layer=-1, weight=torch.zeros(2), bias=0.0)
    wrong = MemoryRouter(layer=1, weight=torch.zeros(model.config.hidden_size + 1), bias=0.0)
    with pytest.raises(ValueError, match="hidden size .*--no-router"):
        wrong.check(model)


@pytest.mark.parametrize("layer", [0, 1, 2])  # the embeddings, a layer the forward stops after, the last layer
def test_pooled_states_are_the_frozen_models_and_batching_does_not_change_them(model, tokenizer, layer, one_thread):
    texts = ["alice likes teal .", "bob ?", "we talked about trains and music"]
    assert model.config.num_hidden_layers == 2
    batched = pooled_hidden_states(model, tokenizer, texts, layer=layer)
    with model.disable_adapter():
        for i, text in enumerate(texts):
            ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])
            alone = model(input_ids=ids, output_hidden_states=True).hidden_states[layer][0].mean(0)
            torch.testing.assert_close(batched[i], alone, rtol=1e-5, atol=1e-5)


def test_a_reply_the_router_keeps_from_memory_is_the_frozen_models_and_the_memory_is_still_written(
    model, tokenizer, tmp_path, one_thread
):
    with_memory = run_turns(engine(model, tokenizer, tmp_path / "a"), "s")
    frozen = run_turns(engine(model, tokenizer, tmp_path / "b", memory=False), "s")
    assert with_memory != frozen  # this adapter's memory changes the replies
    kept_out = engine(model, tokenizer, tmp_path / "c", router=constant_router(model, reads=False))
    assert run_turns(kept_out, "s") == frozen
    let_in = engine(model, tokenizer, tmp_path / "d", router=constant_router(model, reads=True))
    assert run_turns(let_in, "s") == with_memory
    written = memory_of(engine(model, tokenizer, tmp_path / "a"), "s")
    assert all(torch.equal(written[k], v) for k, v in memory_of(let_in, "s").items())
    # replies kept from the memory still go into it as they leave the window (their text is the frozen model's)
    stats = kept_out.stats("s")
    assert stats["messages_in_memory"] == let_in.stats("s")["messages_in_memory"] > 0 and stats["state_norm"] > 0
    assert stats["memory_reads"] == 0 and let_in.stats("s")["memory_reads"] == len(USER_TURNS)


def test_the_router_decides_per_row_of_a_batch(model, tokenizer, tmp_path, one_thread):
    """Two sessions in one batch, the router reading the memory for one of them only."""
    texts = ["alice likes ?", "bob likes ?"]
    pooled = pooled_hidden_states(model, tokenizer, texts, layer=1)
    direction = pooled[0] - pooled[1]
    router = MemoryRouter(layer=1, weight=direction, bias=-float(direction @ (pooled[0] + pooled[1]) / 2))
    assert router.reads_memory(model, tokenizer, texts) == [True, False]
    history = [
        m for t in USER_TURNS[:4] for m in ({"role": "user", "content": t}, {"role": "assistant", "content": "ok"})
    ]
    conversations = [history + [{"role": "user", "content": t}] for t in texts]
    alone = {}
    for name, kwargs in (("memory", {}), ("frozen", {"memory": False})):
        e = engine(model, tokenizer, tmp_path / name, max_batch_size=1, **kwargs)
        alone[name] = [e.chat(f"s{i}", c, PARAMS).reply for i, c in enumerate(conversations)]
    routed = engine(model, tokenizer, tmp_path / "routed", router=router, max_batch_size=2, batch_wait_s=0.5)
    futures = [routed.submit(f"s{i}", c, PARAMS) for i, c in enumerate(conversations)]
    replies = [f.result().reply for f in futures]
    routed.close()
    assert replies == [alone["memory"][0], alone["frozen"][1]]


def test_the_engine_refuses_a_router_it_cannot_use(model, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="needs the memory"):
        engine(model, tokenizer, tmp_path, memory=False, router=constant_router(model, reads=True))
    wrong = MemoryRouter(layer=1, weight=torch.zeros(3), bias=0.0)
    with pytest.raises(ValueError, match="hidden size"):
        engine(model, tokenizer, tmp_path, router=wrong)


def test_chat_cli_uses_the_router_beside_the_adapter_and_says_so(tmp_path, capsys, one_thread):
    from peft_deltamem.agents.models import load_chat_model

    peft_model, _, _ = load_chat_model()
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    MemoryRouter(layer=1, weight=torch.zeros(peft_model.config.hidden_size), bias=-1.0).save(adapter)
    turns = tmp_path / "turns.txt"
    turns.write_text("alice likes teal .\nbob likes ?\n/stats\n")
    common = ["chat", "--adapter", str(adapter), "--input", str(turns), "--max-new-tokens", "2", "--window", "1"]
    assert cli.main([*common, "--sessions", str(tmp_path / "a")]) == 0
    out, err = capsys.readouterr()
    assert "a memory router (layer 1) decides which replies read the memory" in err
    assert json.loads(next(x for x in out.splitlines() if x.startswith("{")))["memory_reads"] == 0
    assert cli.main([*common, "--sessions", str(tmp_path / "b"), "--no-router"]) == 0
    out, err = capsys.readouterr()
    assert "every reply reads the memory" in err
    assert "memory_reads" not in json.loads(next(x for x in out.splitlines() if x.startswith("{")))
