"""CI-sized memory benchmark (scripts/bench_memory.py --smoke) end to end, plus its building blocks.

The smoke run trains a tiny backbone with the history visible, then δ-mem and a matched-budget LoRA on two
seeds, evaluates every method, measures the cost curve at two lengths and writes the report; it must show
δ-mem with the history only in memory beating truncated-context-no-memory by more than the seed-to-seed spread.
"""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from benchmarks.bench_data import EpisodeMix, FeatureBuilder, answer_positions, bm25_top_k, context_tokens
from benchmarks.bench_report import gap_recovered, mean_ci, per_seed, spread
from benchmarks.bench_train import BackboneSpec, cached_backbone, fingerprint, lora_rank_for_budget
from benchmarks.synthetic import build_tokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_memory.py"
MAIN = "δ-mem TSW r=8 state only"
TRUNCATED = "truncated context, no memory"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    spec = importlib.util.spec_from_file_location("bench_memory_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    results = script.main(["--smoke", "--out", str(out / "docs"), "--cache-dir", str(out / "cache")])
    return results, out, script


def test_smoke_deltamem_beats_truncation_by_more_than_the_seed_spread(smoke):
    results, _, _ = smoke
    memory, truncated = per_seed(results, MAIN), per_seed(results, TRUNCATED)
    assert len(memory) == len(truncated) == 2
    margin = statistics.fmean(memory) - statistics.fmean(truncated)
    assert margin > max(spread(memory), spread(truncated)), (memory, truncated)
    assert statistics.fmean(per_seed(results, "full context")) >= 0.9  # the backbone answers from context
    assert statistics.fmean(gap_recovered(results)) > 0.5


def test_smoke_report_and_outputs(smoke):
    results, out, _ = smoke
    docs = out / "docs"
    for name in ("results.md", "bench_results.json", "bench_accuracy.png", "bench_capacity.png", "bench_cost.png"):
        assert (docs / name).is_file() and (docs / name).stat().st_size > 0, name
    saved = json.loads((docs / "bench_results.json").read_text())
    assert set(saved) >= {"methods", "backbone", "cost", "config", "seconds"}
    names = set(results["methods"])
    assert {"full context", TRUNCATED, MAIN, "BM25 top-1 + truncated context"} <= names
    assert any(n.startswith("LoRA") for n in names)
    for entry in results["methods"].values():
        for seed in entry["per_seed"].values():
            assert 0.0 <= seed["default"]["accuracy"] <= 1.0
            assert seed["latency"]["latency_ms"] > 0
            assert set(seed["capacity"]) == {1, 2}
    lora = next(n for n in names if n.startswith("LoRA"))
    budget = results["methods"][MAIN]["trainable"]
    assert abs(results["methods"][lora]["trainable"] - budget) <= 0.25 * budget
    assert [row["history_tokens"] for row in results["cost"]] == sorted(
        row["history_tokens"] for row in results["cost"]
    )
    text = (docs / "results.md").read_text()
    assert "## Goals" in text and "Memory capacity" in text and "Cost per answer" in text
    assert (out / "cache").is_dir() and any((out / "cache").glob("backbone-*/bench_info.json"))


def test_render_only_reproduces_the_page_from_the_json(smoke):
    _, out, script = smoke
    docs = out / "docs"
    page = (docs / "results.md").read_text()
    (docs / "results.md").unlink()
    (docs / "bench_cost.png").unlink()
    script.main(["--render-only", "--out", str(docs)])
    assert (docs / "results.md").read_text() == page
    assert (docs / "bench_cost.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        script.main(["--render-only", "--out", str(out / "nowhere")])


def test_features_views():
    tokenizer = build_tokenizer()
    episode = EpisodeMix(visible_turns=4).sample(0, 1)[0]
    builder = FeatureBuilder(tokenizer)
    full, window, question = (builder.build(episode, v) for v in ("full", "window", "question"))
    memory_only, memory_window = builder.build(episode, "memory_only"), builder.build(episode, "memory_window")
    answer = tokenizer.convert_tokens_to_ids(episode.answer)
    for feature in (full, window, question, memory_only, memory_window):
        assert feature["input_ids"][answer_positions(feature)[0]] == answer
        assert len(feature["memory_input_ids"]) == len(feature["memory_segment_ids"])
    assert context_tokens(full) > 4 * context_tokens(question)
    assert context_tokens(window) == context_tokens(memory_window) and context_tokens(question) == context_tokens(
        memory_only
    )
    assert not full["memory_input_ids"] and len(memory_only["memory_input_ids"]) > len(
        memory_window["memory_input_ids"]
    )
    assert memory_window["memory_segment_ids"][-1] == len(episode.memory_messages) - 1
    hits = bm25_top_k(episode, 2)
    assert 0 < len(hits) <= 2 and all(0 <= i < len(episode.memory_messages) for i in hits)
    rag = builder.build(episode, "rag", hits)
    assert context_tokens(window) < context_tokens(rag) < context_tokens(full)
    extra = FeatureBuilder(tokenizer, extra_questions=3).build(episode, "full")
    assert len(answer_positions(extra)) == min(4, len(episode.metadata["facts"]))


def test_mix_that_cannot_make_episodes_says_so_instead_of_looping():
    with pytest.raises(ValueError, match="EpisodeMix cannot make episodes.*visible_turns=1000"):
        EpisodeMix(visible_turns=1000).sample(0, 1)
    with pytest.raises(ValueError, match="num_facts must be in"):  # an invalid config is not redrawn
        EpisodeMix(num_facts=(0, 0)).sample(0, 1)


def test_mix_is_deterministic_and_respects_ranges():
    mix = EpisodeMix(num_facts=(1, 3), num_updates=(0, 1), num_distractors=(0, 2), num_sessions=(1, 2))
    a, b = mix.sample(7, 20), mix.sample(7, 20)
    assert [e.history_messages for e in a] == [e.history_messages for e in b]
    assert all(1 <= e.metadata["num_facts"] <= 3 and e.metadata["num_updates"] <= 1 for e in a)
    assert [e.history_messages for e in mix.sample(8, 20)] != [e.history_messages for e in a]


def test_backbone_cache_roundtrip(tmp_path):
    calls = []

    def make():
        calls.append(1)
        return BackboneSpec().build(len(build_tokenizer()), seed=3), {"parameters": 1}

    first, info = cached_backbone(tmp_path, fingerprint("k"), make)
    second, info2 = cached_backbone(tmp_path, fingerprint("k"), make)
    assert calls == [1] and not info["cached"] and info2["cached"]
    ids = torch.tensor([[2, 10, 11, 12]])
    torch.testing.assert_close(first(input_ids=ids).logits, second(input_ids=ids).logits)


def test_lora_rank_matches_budget():
    model = BackboneSpec().build(100)
    per_rank = 2 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64))  # 2 layers of q, k, v, o
    assert lora_rank_for_budget(model, 7 * per_rank + 3, ("q_proj", "k_proj", "v_proj", "o_proj")) == 7


def test_measure_sees_a_peak_served_from_memory_the_process_freed_earlier():
    """Without handing freed heap pages back first, the second call would show (almost) no growth."""
    import gc

    from benchmarks.bench_cost import measure

    def allocate():  # 10 x 20 MB, touched: glibc serves these from its heap once a 20 MB block has been freed
        return sum(float(torch.ones(5_000_000)[0]) for _ in range(10))

    held = [torch.ones(5_000_000) for _ in range(10)]
    del held
    gc.collect()
    _, _, first = measure(allocate)
    _, _, second = measure(allocate)
    if first is None:
        pytest.fail("/proc/self/clear_refs is not writable here: peak memory cannot be measured")
    assert first > 15 and second > 15, (first, second)


def test_mean_ci():
    mean, ci = mean_ci([0.5, 0.7])
    assert mean == pytest.approx(0.6) and ci == pytest.approx(12.706 * 0.1414213 / 1.4142135, rel=1e-4)
    mean, ci = mean_ci([0.3])
    assert mean == 0.3 and math.isnan(ci)  # one seed: no interval
