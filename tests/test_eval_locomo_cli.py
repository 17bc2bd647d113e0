"""scripts/eval_locomo.py end to end on a tiny locally built model over one LoCoMo conversation.

The model is random, so the answers are garbage: these tests check the pipeline (loading from a directory, the
four modes, the δ-mem memory path with TSW and SSW adapters, the output file and its score keys).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from benchmarks.locomo import default_locomo_path, load_locomo
from benchmarks.locomo_runner import _memory_chunks
from benchmarks.synthetic import build_tokenizer
from conftest import require_locomo_file
from peft_deltamem import DeltaMemConfig
from peft_deltamem.tiny_models import tiny_model

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "eval_locomo.py"
SCORE_KEYS = {"f1", "count", "per_category", "per_question"}
RECORD_KEYS = {"qid", "sample_id", "category", "question", "answer", "prediction", "prompt_tokens", "latency_s"}


def _load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_locomo_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A small BPE trained here on one conversation's text; no chat template (the plain chat format is used)."""
    conv = load_locomo(default_locomo_path())[0]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<unk>", "<bos>", "<eos>"])
    backend.train_from_iterator([t.text for t in conv.turns], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>"
    )


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Saved tiny models (word-level chat-template tokenizer; BPE plain tokenizer) and δ-mem adapters."""
    require_locomo_file()
    root = tmp_path_factory.mktemp("locomo_cli")
    dirs = {}
    for name, tokenizer in (("chat", build_tokenizer()), ("plain", _bpe_tokenizer())):
        # sdpa keeps full-context prompts of a whole conversation cheap in memory on CPU
        base = tiny_model("llama", vocab_size=len(tokenizer), attn_implementation="sdpa")
        base.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        dirs[name] = root / name
    for granularity in ("token", "segment"):
        base = tiny_model("llama", vocab_size=len(build_tokenizer()), attn_implementation="sdpa")
        config = DeltaMemConfig(task_type="CAUSAL_LM", write_granularity=granularity, init_weights=False)
        get_peft_model(base, config).save_pretrained(root / f"adapter_{granularity}")
        dirs[granularity] = root / f"adapter_{granularity}"
    return dirs


def _check_output(result: dict, path: Path, mode: str, n_questions: int) -> None:
    saved = json.loads(path.read_text())
    assert set(saved) >= {"config", "args", "scores", "predictions", "timing"}
    assert SCORE_KEYS <= set(saved["scores"])
    assert saved["scores"]["count"] == n_questions == len(saved["predictions"])
    assert set(saved["scores"]["per_category"]) <= {"1", "2", "3", "4"}
    for record in saved["predictions"]:
        assert RECORD_KEYS <= set(record)
        assert record["mode"] == mode and isinstance(record["prediction"], str)
        assert 0.0 <= saved["scores"]["per_question"][record["qid"]] <= 1.0
    assert 0.0 <= saved["scores"]["f1"] <= 1.0
    assert result["scores"]["f1"] == pytest.approx(saved["scores"]["f1"])


def test_cli_subprocess_memory_mode_with_adapter(model_dirs, tmp_path):
    output = tmp_path / "preds.json"
    command = [
        sys.executable,
        str(SCRIPT),
        "--model",
        str(model_dirs["chat"]),
        "--adapter",
        str(model_dirs["token"]),
        "--mode",
        "memory",
        "--limit-conversations",
        "1",
        "--limit-questions",
        "3",
        "--max-new-tokens",
        "4",
        "--write-chunk-tokens",
        "2048",
        "--device",
        "cpu",
        "--output",
        str(output),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "F1=" in done.stdout
    saved = json.loads(output.read_text())
    _check_output(saved, output, "memory", 3)
    assert all(r["memory_tokens"] > 1000 for r in saved["predictions"])  # the history went into memory


@pytest.mark.parametrize(
    ("mode", "tokenizer", "adapter", "extra"),
    [
        ("full", "plain", None, ["--max-prompt-tokens", "4096"]),
        ("truncated", "plain", None, ["--max-visible-tokens", "256"]),
        ("rag", "chat", None, ["--top-k", "4"]),
        ("memory", "chat", "segment", ["--max-visible-turns", "2", "--write-chunk-tokens", "1024"]),
    ],
)
def test_cli_modes(model_dirs, tmp_path, mode, tokenizer, adapter, extra):
    output = tmp_path / f"{mode}.json"
    argv = ["--model", str(model_dirs[tokenizer]), "--mode", mode, "--limit-conversations", "1"]
    argv += ["--limit-questions", "2", "--max-new-tokens", "3", "--device", "cpu", "--output", str(output), *extra]
    if adapter:
        argv += ["--adapter", str(model_dirs[adapter])]
    result = _load_script().main(argv)
    _check_output(result, output, mode, 2)
    records = result["predictions"]
    if mode == "rag":
        assert all(0 < len(r["retrieved_dia_ids"]) <= 4 for r in records)
    if mode == "full":
        assert all(r["prompt_tokens"] == 4096 for r in records)  # a whole conversation exceeds the budget
    if mode == "memory":
        assert all(r["memory_tokens"] > 0 for r in records)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mode", "memory"], "--mode memory needs --adapter"),
        (["--mode", "truncated", "--limit-conversations", "-1"], "must be a positive integer, got -1"),
        (["--mode", "truncated", "--limit-questions", "0"], "must be a positive integer, got 0"),
        (["--mode", "truncated", "--categories", "6"], "invalid choice: 6"),
    ],
)
def test_cli_refuses_bad_arguments_by_name(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _load_script().parse_args(["--model", "unused", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_choices_match_the_library():
    from benchmarks import locomo

    script = _load_script()
    assert script.MODES == locomo.MODES
    assert script.CATEGORIES == locomo.CATEGORY_NAMES
    assert script.DEFAULT_CATEGORIES == locomo.DEFAULT_CATEGORIES


def _fake_nltk(monkeypatch, stem):
    """Install a stand-in ``nltk.stem`` module (NLTK is not a dependency)."""
    import types

    stem_module = types.ModuleType("nltk.stem")
    stem_module.PorterStemmer = type("PorterStemmer", (), {"stem": lambda self, word: stem(word)})
    nltk = types.ModuleType("nltk")
    nltk.stem = stem_module
    monkeypatch.setitem(sys.modules, "nltk", nltk)
    monkeypatch.setitem(sys.modules, "nltk.stem", stem_module)


def test_porter_stemmer_flag_scores_with_the_stemmer(model_dirs, tmp_path, monkeypatch):
    from benchmarks.locomo import score_answer

    def one_stem(word: str) -> str:  # every token matches: a random model's answers score above 0 only if used
        return "x"

    _fake_nltk(monkeypatch, one_stem)
    output = tmp_path / "stemmed.json"
    argv = ["--model", str(model_dirs["plain"]), "--mode", "truncated", "--max-visible-tokens", "128"]
    argv += ["--limit-conversations", "1", "--limit-questions", "4", "--max-new-tokens", "6", "--device", "cpu"]
    result = _load_script().main([*argv, "--porter-stemmer", "--output", str(output)])
    per_question = result["scores"]["per_question"]
    changed = 0
    for record in result["predictions"]:
        stemmed = score_answer(record["prediction"], record["answer"], record["category"], one_stem)
        assert per_question[record["qid"]] == pytest.approx(stemmed)
        changed += stemmed != score_answer(record["prediction"], record["answer"], record["category"])
    assert changed > 0
    assert json.loads(output.read_text())["args"]["porter_stemmer"] is True


def test_porter_stemmer_flag_without_nltk_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "nltk", None)  # import nltk -> ImportError
    with pytest.raises(SystemExit):
        _load_script().parse_args(["--model", "m", "--mode", "truncated", "--porter-stemmer"])
    assert "pip install nltk" in capsys.readouterr().err


def test_memory_chunks_keep_messages_whole():
    segments = [0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 3]
    ids = list(range(len(segments)))
    chunks = _memory_chunks(ids, segments, 4)
    assert [c for c, _ in chunks] == [[0, 1, 2], [3, 4], [5, 6, 7, 8, 9, 10], [11]]
    assert sum((c for c, _ in chunks), []) == ids
    assert _memory_chunks(ids, segments, None) == [(ids, segments)]
    assert _memory_chunks([], [], 4) == []


def test_memory_mode_questions_do_not_write(model_dirs):
    """Questions are answered with writes off: after them the memory is exactly the written history."""
    from benchmarks.locomo_runner import LocomoRunConfig, run_conversation, write_memory
    from peft_deltamem.training import tokenize_messages

    script = _load_script()
    args = script.parse_args(["--model", str(model_dirs["chat"]), "--adapter", str(model_dirs["token"])])
    tokenizer, model = script.load_model(args, torch.device("cpu"))
    conv = load_locomo(default_locomo_path())[0]
    config = LocomoRunConfig(mode="memory", max_new_tokens=2, limit_questions=2, write_chunk_tokens=4096)
    seen = []
    generate = model.generate

    def spy(*args, memory=None, memory_writes=True, **kwargs):
        before = memory.states
        out = generate(*args, memory=memory, memory_writes=memory_writes, **kwargs)
        seen.append((before, memory.states, memory_writes))
        return out

    model.generate = spy
    try:
        episodes, _ = run_conversation(model, tokenizer, conv, config, torch.device("cpu"))
    finally:
        del model.generate
    assert len(seen) == 2 and all(writes is False for _, _, writes in seen)

    history = [{"role": m["role"], "content": m["content"]} for m in episodes[0].memory_messages]
    ids, segments, _ = tokenize_messages(history, tokenizer)
    written, _ = write_memory(model, ids, segments, 4096, torch.device("cpu"))
    assert not written.is_empty
    for before, after, _ in seen:  # each question read the written history and left it unchanged
        for name, tensor in written.states.items():
            torch.testing.assert_close(before[name], tensor)
            torch.testing.assert_close(after[name], tensor)


def test_memory_mode_with_a_router_answers_routed_away_questions_from_an_empty_memory(model_dirs):
    """With a memory router (as the chat engine serves it), a question it routes away reads an empty memory and a
    question it routes to the memory reads the written history; the records say which."""
    from benchmarks.locomo_runner import LocomoRunConfig, run_conversation

    script = _load_script()
    args = script.parse_args(["--model", str(model_dirs["chat"]), "--adapter", str(model_dirs["token"])])
    tokenizer, model = script.load_model(args, torch.device("cpu"))
    conv = load_locomo(default_locomo_path())[0]
    config = LocomoRunConfig(mode="memory", max_new_tokens=2, limit_questions=3, write_chunk_tokens=4096)

    class FirstOnly:  # reads the memory for the first question only
        def reads_memory(self, model, tokenizer, texts):
            return [i == 0 for i in range(len(texts))]

    read = []
    generate = model.generate

    def spy(*args, memory=None, **kwargs):
        read.append(not memory.is_empty)
        return generate(*args, memory=memory, **kwargs)

    model.generate = spy
    try:
        _, records = run_conversation(model, tokenizer, conv, config, torch.device("cpu"), router=FirstOnly())
        _, unrouted = run_conversation(model, tokenizer, conv, config, torch.device("cpu"))
    finally:
        del model.generate
    assert read == [True, False, False, True, True, True]
    assert [r["reads_memory"] for r in records] == [True, False, False]
    assert [r["reads_memory"] for r in unrouted] == [True, True, True]
