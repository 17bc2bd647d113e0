"""A stock transformers Trainer drives δ-mem episodes: columns, accumulation, eval, checkpoints, health."""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from conftest import cpu_training_args
from peft_deltamem import DeltaMemConfig, DeltaMemLayer
from peft_deltamem.tiny_models import tiny_model
from peft_deltamem.training import (
    DeltaMemDataCollator,
    EpisodeConfig,
    MemoryHealthCallback,
    add_memory_health_callback,
    episodes_map_fn,
    measure_memory_health,
)
from tokenizers_for_tests import chat_tokenizer

WORDS = "hello there how are you today fine thank capital France Paris answer cat Tom blue banana code word".split()


def chats(n: int, seed: int = 0) -> list[dict]:
    """Chats of 2-3 user/assistant exchanges (the earlier ones go to memory)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        messages = []
        for _ in range(rng.randint(2, 3)):
            messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(2, 6)))})
            messages.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(1, 4)))})
        out.append({"messages": messages})
    return out


def episode_dataset(tokenizer, n: int = 16, seed: int = 0) -> Dataset:
    data = Dataset.from_list(chats(n, seed))
    mapper = episodes_map_fn(tokenizer, EpisodeConfig(visible_turns=1, max_memory_tokens=64, max_length=48))
    return data.map(mapper, batched=True, remove_columns=["messages"], features=mapper.features)


def delta_mem_model(tokenizer, seed: int = 0, **config):
    torch.manual_seed(seed)
    base = tiny_model("llama", seed=seed, vocab_size=len(tokenizer))
    return get_peft_model(base, DeltaMemConfig(task_type="CAUSAL_LM", **config))


def trainer_args(tmp_path, **overrides) -> TrainingArguments:
    kwargs = dict(per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2, logging_steps=1, seed=0)
    return cpu_training_args(tmp_path, **{**kwargs, **overrides})


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return chat_tokenizer()


@pytest.fixture(scope="module")
def episodes(tokenizer):
    return episode_dataset(tokenizer)


# ------------------------------------------------------------------------------------- remove_unused_columns


def test_remove_unused_columns_true_is_refused_by_the_callback(tmp_path, tokenizer, episodes):
    model = delta_mem_model(tokenizer)
    args = trainer_args(tmp_path, remove_unused_columns=True)
    collator = DeltaMemDataCollator(tokenizer)
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        Trainer(model, args, train_dataset=episodes, data_collator=collator, callbacks=[MemoryHealthCallback()])
    trainer = Trainer(model=model, args=args, train_dataset=episodes, data_collator=collator)
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        add_memory_health_callback(trainer)


def test_stock_trainer_drops_memory_columns_and_the_collator_fails_loudly(tmp_path, tokenizer, episodes):
    """Without the callback the Trainer removes the memory columns; DeltaMemDataCollator then refuses the batch."""
    trainer = Trainer(
        model=delta_mem_model(tokenizer),
        args=trainer_args(tmp_path, remove_unused_columns=True),
        train_dataset=episodes,
        data_collator=DeltaMemDataCollator(tokenizer),
    )
    with pytest.raises(ValueError, match="memory_input_ids"):
        trainer.train()


# ----------------------------------------------------------------- accumulation, evaluation, save and resume


class RecordBegin(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.step = state.global_step
        self.weights = adapter_state(model)


def test_accumulation_eval_checkpoints_and_resume(tmp_path, tokenizer, episodes):
    args = dict(
        max_steps=4,
        gradient_accumulation_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        per_device_eval_batch_size=4,
    )
    eval_set = episode_dataset(tokenizer, n=8, seed=1)
    model = delta_mem_model(tokenizer)
    initial = adapter_state(model)
    trainer = Trainer(
        model=model,
        args=trainer_args(tmp_path / "run", **args),
        train_dataset=episodes,
        eval_dataset=eval_set,
        data_collator=DeltaMemDataCollator(tokenizer),
        callbacks=[MemoryHealthCallback()],
    )
    trainer.train()
    final = adapter_state(model)
    assert any((final[n] - initial[n]).abs().max() > 0 for n in final)

    history = trainer.state.log_history
    assert [e["step"] for e in history if "eval_loss" in e] == [2, 4]
    train_logs = [e for e in history if "loss" in e]
    assert [e["step"] for e in train_logs] == [1, 2, 3, 4]
    for entry in train_logs:
        assert {"delta_mem/write_gate_mean", "delta_mem/state_norm", "delta_mem/correction_ratio"} <= set(entry)
        assert 0 < entry["delta_mem/write_gate_mean"] < 1 and entry["delta_mem/state_norm"] > 0

    for step in (2, 4):
        checkpoint = tmp_path / "run" / f"checkpoint-{step}"
        files = {p.name for p in checkpoint.iterdir()}
        assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "trainer_state.json"} <= files
        assert not files & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}
        saved = load_file(checkpoint / "adapter_model.safetensors")
        assert saved and all("delta_mem_" in k for k in saved)
        assert sum(t.numel() for t in saved.values()) == sum(t.numel() for t in final.values())

    # resume from step 2 in a fresh model: same step, the checkpoint's weights, same end result
    resumed_model = delta_mem_model(tokenizer)  # the same frozen base (the checkpoint holds only the adapter)
    with torch.no_grad():
        for p in resumed_model.parameters():
            if p.requires_grad:
                p.normal_()  # the checkpoint must overwrite these
    begin = RecordBegin()
    resumed = Trainer(
        model=resumed_model,
        args=trainer_args(tmp_path / "run", **args),
        train_dataset=episodes,
        eval_dataset=eval_set,
        data_collator=DeltaMemDataCollator(tokenizer),
        callbacks=[begin],
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert begin.step == 2
    saved = load_file(tmp_path / "run" / "checkpoint-2" / "adapter_model.safetensors")
    for name, value in begin.weights.items():
        key = name.replace(".default", "")
        torch.testing.assert_close(value, saved[key], atol=0, rtol=0)
    assert resumed.state.global_step == 4
    for name, value in adapter_state(resumed_model).items():
        torch.testing.assert_close(value, final[name], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------- gradient checkpointing


class FirstStepGrads(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            self.grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def trainer_grads(tmp_path, tokenizer, episodes, **args) -> dict[str, torch.Tensor]:
    model = delta_mem_model(tokenizer, init_weights=False)  # non-zero Δ heads: every adapter parameter gets a grad
    grads = FirstStepGrads()
    trainer = Trainer(
        model=model,
        args=trainer_args(tmp_path, max_steps=1, max_grad_norm=0.0, per_device_train_batch_size=4, **args),
        train_dataset=episodes,
        data_collator=DeltaMemDataCollator(tokenizer),
        callbacks=[grads],
    )
    trainer.train()
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    assert bool(layers) == bool(args.get("activation_checkpointing"))
    for layer in layers:  # the Trainer set up the requested mode (the episode swaps it only while it runs)
        assert (
            layer._gradient_checkpointing_func.keywords["use_reentrant"]
            == args["activation_checkpointing_kwargs"]["use_reentrant"]
        )
    return grads.grads


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_adapter_gradients(tmp_path, tokenizer, episodes, use_reentrant):
    plain = trainer_grads(tmp_path / "plain", tokenizer, episodes)
    checkpointed = trainer_grads(
        tmp_path / "gc",
        tokenizer,
        episodes,
        activation_checkpointing=True,
        activation_checkpointing_kwargs={"use_reentrant": use_reentrant},
    )
    assert set(plain) == set(checkpointed)
    write = [n for n in plain if "delta_mem_write" in n or "beta_bias" in n]
    assert write and all(plain[n].abs().sum() > 0 for n in write)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------- memory health


def collated(tokenizer, episodes, n: int = 4) -> dict[str, torch.Tensor]:
    batch = DeltaMemDataCollator(tokenizer)([episodes[i] for i in range(n)])
    batch.pop("ablation_mode")
    return batch


def layer_inputs(model, batch, memory) -> dict[DeltaMemLayer, torch.Tensor]:
    """Hidden states entering each δ-mem layer during the memory pass (eval, writes on) into ``memory``."""
    seen = {}

    def record(layer, args, kwargs):
        seen[layer] = args[0] if args else kwargs["hidden_states"]

    layers = [m for m in model.modules() if isinstance(m, DeltaMemLayer)]
    hooks = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
    with torch.no_grad():
        model(input_ids=batch["memory_input_ids"], attention_mask=batch["memory_attention_mask"], memory=memory)
    for hook in hooks:
        hook.remove()
    return seen


def test_memory_health_matches_a_manual_computation(tokenizer, episodes):
    model = delta_mem_model(tokenizer, init_weights=False).train()
    for layer in model.modules():  # a non-trivial write gate: W_beta != 0
        if isinstance(layer, DeltaMemLayer):
            with torch.no_grad():
                layer.delta_mem_write["default"].weight[24:].normal_(0, 0.5)
    batch = collated(tokenizer, episodes)
    hooks_before = sum(len(m._forward_hooks) for m in model.modules())
    health = measure_memory_health(model, batch)
    assert model.training and sum(len(m._forward_hooks) for m in model.modules()) == hooks_before

    model.eval()
    # write gate: mean over layers of the masked mean of sigmoid(W_beta x + b_beta)
    valid = batch["memory_attention_mask"].bool()
    betas = []
    memory = model.new_memory(batch["input_ids"].shape[0])
    for layer, hidden in layer_inputs(model, batch, memory).items():
        w, b = layer.delta_mem_write["default"].weight[24:], layer.delta_mem_beta_bias["default"]
        beta = torch.sigmoid(hidden @ w.T + b)
        betas.append(beta[valid].mean())
    assert health.write_gate_mean == pytest.approx(torch.stack(betas).mean().item(), rel=1e-5)

    # state norm: rows that have a memory stream
    states = memory.states
    rows = valid.any(1)
    norms = [s.flatten(1).norm(dim=1)[rows].mean() for s in states.values()]
    assert health.state_norm == pytest.approx(torch.stack(norms).mean().item(), rel=1e-5)

    # correction ratio of layer 0's q_proj: its input does not depend on the memory
    q_proj = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    outputs = []
    hook = q_proj.register_forward_hook(lambda mod, inp, out: outputs.append(out.detach()))
    visible = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        model(**visible, memory=memory, memory_writes=False)  # reads the written stream
        with model.disable_adapter():
            model(**visible)
    hook.remove()
    mask = batch["attention_mask"].bool()
    corrected, base = outputs[0][mask], outputs[1][mask]
    expected = ((corrected - base).norm() / base.norm()).item()
    per_layer = health.per_layer[model.get_submodule("base_model.model.model.layers.0.self_attn").layer_name]
    assert per_layer["correction_ratio_q"] == pytest.approx(expected, rel=1e-4)
    assert set(health.correction_ratios) == {"q", "o"}


def test_memory_health_of_a_fresh_adapter_and_of_segment_writes(tokenizer, episodes):
    batch = collated(tokenizer, episodes)
    fresh = measure_memory_health(delta_mem_model(tokenizer), batch)
    assert fresh.write_gate_mean == pytest.approx(torch.sigmoid(torch.tensor(-1.5)).item(), rel=1e-5)
    assert fresh.correction_ratio == 0.0  # zero Δ heads: an exact no-op
    segment = measure_memory_health(delta_mem_model(tokenizer, write_granularity="segment"), batch)
    assert segment.state_norm > 0 and segment.write_gate_mean is not None
    no_memory = {**batch, "memory_input_ids": batch["memory_input_ids"][:, :0]}
    empty = measure_memory_health(delta_mem_model(tokenizer, init_weights=False), no_memory)
    assert empty.write_gate_mean is None and empty.state_norm == 0.0 and empty.correction_ratio == 0.0


def test_health_probe_does_not_change_training(tmp_path, tokenizer, episodes):
    def train(callbacks):
        model = delta_mem_model(tokenizer)
        trainer = Trainer(
            model=model,
            args=trainer_args(tmp_path, max_steps=3),
            train_dataset=episodes,
            data_collator=DeltaMemDataCollator(tokenizer),
            callbacks=callbacks,
        )
        trainer.train()
        return adapter_state(model), trainer

    plain, _ = train([])
    probed, trainer = train([MemoryHealthCallback(every_n_steps=1)])
    for name in plain:
        torch.testing.assert_close(probed[name], plain[name], atol=0, rtol=0)
    assert all("delta_mem/state_norm" in e for e in trainer.state.log_history if "loss" in e)


# ------------------------------------------------------------------------------------------ scripts/train.py


def load_train_script():
    """Import scripts/train.py as a module (its ``main(argv)`` runs in-process)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "train.py"
    spec = importlib.util.spec_from_file_location("delta_mem_train_script", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # HfArgumentParser resolves the dataclass annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_train_script_on_a_local_model_and_a_jsonl_file(tmp_path, tokenizer):
    model_dir, data = tmp_path / "model", tmp_path / "chats.jsonl"
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data.write_text("\n".join(json.dumps(chat) for chat in chats(12, seed=3)))
    probs = {"memory_only": 0.5, "memory_and_context": 0.25, "no_memory": 0.25}
    trainer = load_train_script().main(
        ["--model", str(model_dir), "--dataset", str(data), "--output-dir", str(tmp_path / "out")]
        + ["--max_steps", "2", "--per_device_train_batch_size", "2", "--logging_steps", "1", "--disable_tqdm", "True"]
        + ["--eval_strategy", "steps", "--eval_steps", "2", "--eval-size", "2", "--save_strategy", "no"]
        + ["--activation_checkpointing", "True", "--write-granularity", "segment", "--delta-heads", "q", "v", "o"]
        + ["--r", "4", "--num-state-heads", "2", "--ablation-probs", json.dumps(probs), "--max-length", "32"]
    )
    assert trainer.args.remove_unused_columns is False
    assert any("eval_loss" in e for e in trainer.state.log_history)
    assert all("delta_mem/state_norm" in e for e in trainer.state.log_history if "loss" in e)
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["write_granularity"], config["delta_heads"], config["r"]) == ("segment", ["q", "v", "o"], 4)
    assert config["num_state_heads"] == 2
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_train_script_refuses_bad_ablation_json_and_data_without_answers(tmp_path, tokenizer):
    model_dir, data = tmp_path / "model", tmp_path / "chats.jsonl"
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": "a b"}]}) for _ in range(4)))
    argv = ["--model", str(model_dir), "--dataset", str(data), "--output-dir", str(tmp_path), "--max_steps", "1"]
    with pytest.raises(SystemExit, match="--ablation-probs must be JSON"):
        load_train_script().main([*argv, "--ablation-probs", "not json"])
    with pytest.raises(SystemExit, match="no training episodes from 4 chats"):
        load_train_script().main(argv)


def test_train_script_embedded_default_runs(tmp_path, capsys):
    trainer = load_train_script().main(
        ["--output-dir", str(tmp_path), "--backbone-steps", "3", "--max_steps", "3", "--logging_steps", "1"]
        + ["--disable_tqdm", "True"]
    )
    out = capsys.readouterr().out
    assert "with the fact IN CONTEXT" in out and "time per step" in out and "held-out recall" in out
    assert trainer.state.global_step == 3 and (tmp_path / "adapter_model.safetensors").exists()


def test_train_script_help_is_instant_and_help_all_lists_the_training_arguments(capsys):
    path = Path(__file__).resolve().parents[1] / "scripts" / "train.py"
    code = (
        "import runpy, sys\n"
        "sys.argv = ['train.py', '--help']\n"
        "try:\n"
        f"    runpy.run_path({str(path)!r}, run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        "print('heavy:', sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "--backbone_steps" in done.stdout and "--load_in_4bit [BOOL]" in done.stdout
    assert "--help-all" in done.stdout and "--learning_rate LEARNING_RATE" not in done.stdout  # named, not listed
    assert "heavy: []" in done.stdout and done.stderr == ""
    script = load_train_script()
    with pytest.raises(SystemExit) as exit:
        script.parse(["--help-all"])
    assert exit.value.code == 0
    listing = capsys.readouterr().out
    assert "--learning_rate LEARNING_RATE" in listing and "--backbone_steps" in listing
