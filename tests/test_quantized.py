"""δ-mem on a bitsandbytes 4-bit / 8-bit backbone (CPU backend), QLoRA style, trained with the stock Trainer."""

from __future__ import annotations

import json

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from datasets import Dataset  # noqa: E402
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer  # noqa: E402

from conftest import cpu_training_args  # noqa: E402
from peft_deltamem import DeltaMemConfig  # noqa: E402
from peft_deltamem.recall_task import build_tokenizer, recall_chats, sample_batch  # noqa: E402
from peft_deltamem.tiny_models import tiny_model  # noqa: E402
from peft_deltamem.training import DeltaMemDataCollator  # noqa: E402

QUANTIZATIONS = {
    "4bit": (
        dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
        bnb.nn.Linear4bit,
    ),
    "8bit": (dict(load_in_8bit=True), bnb.nn.Linear8bitLt),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_model("llama", seed=0, vocab_size=len(tokenizer)).save_pretrained(path)
    return path


def load_quantized(path, kind: str):
    kwargs, layer_type = QUANTIZATIONS[kind]
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=BitsAndBytesConfig(**kwargs), dtype=torch.float32
    )
    assert isinstance(model.model.layers[0].self_attn.q_proj, layer_type)
    return model


def recall_dataset(tokenizer, n: int, seed: int) -> Dataset:
    batch = sample_batch(tokenizer, n, torch.Generator().manual_seed(seed))
    return Dataset.from_dict(
        {
            "memory_input_ids": batch["memory_input_ids"].tolist(),
            "memory_segment_ids": torch.zeros_like(batch["memory_input_ids"]).tolist(),
            "input_ids": batch["input_ids"].tolist(),
            "labels": batch["labels"].tolist(),
        }
    )


def probe_batch(tokenizer) -> dict[str, torch.Tensor]:
    batch = sample_batch(tokenizer, 8, torch.Generator().manual_seed(1))
    batch.pop("answers")
    return batch


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_kbit_training_and_adapter_round_trip(tmp_path, saved_base, tokenizer, kind):
    base = prepare_model_for_kbit_training(load_quantized(saved_base, kind))
    checkpointed = [m for m in base.modules() if getattr(m, "gradient_checkpointing", False)]
    assert checkpointed  # prepare_model_for_kbit_training's default: reentrant checkpointing
    assert all(m._gradient_checkpointing_func.keywords.get("use_reentrant", True) for m in checkpointed)
    model = get_peft_model(base, DeltaMemConfig(task_type="CAUSAL_LM"))
    batch = probe_batch(tokenizer)
    with torch.no_grad():
        before = model.eval()(**batch).loss.item()

    args = cpu_training_args(
        tmp_path / "run",
        max_steps=8,
        per_device_train_batch_size=8,
        learning_rate=2e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=recall_dataset(tokenizer, 8, seed=1),  # one batch, fitted for 8 steps
        data_collator=DeltaMemDataCollator(tokenizer),
    )
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < losses[0]
    with torch.no_grad():
        trained_logits = model.eval()(**batch)
    assert trained_logits.loss.item() < before - 0.3

    model.save_pretrained(tmp_path / "adapter")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    fresh = PeftModel.from_pretrained(load_quantized(saved_base, kind), tmp_path / "adapter").eval()
    with torch.no_grad():
        reloaded = fresh(**batch)
    torch.testing.assert_close(reloaded.logits, trained_logits.logits, atol=1e-5, rtol=0)


def test_train_script_with_load_in_4bit(tmp_path, saved_base, tokenizer):
    from test_trainer import load_train_script

    tokenizer.save_pretrained(saved_base)
    data = tmp_path / "chats.jsonl"
    script = load_train_script()
    data.write_text("\n".join(json.dumps(chat) for chat in recall_chats(8, seed=0)))
    trainer = script.main(
        ["--model", str(saved_base), "--dataset", str(data), "--load-in-4bit", "--output-dir", str(tmp_path / "out")]
        + ["--max_steps", "2", "--per_device_train_batch_size", "4", "--disable_tqdm", "True", "--dtype", "float32"]
        + ["--activation_checkpointing", "True", "--activation_checkpointing_kwargs", '{"use_reentrant": true}']
    )
    assert isinstance(trainer.model.base_model.model.model.layers[0].self_attn.base_layer.q_proj, bnb.nn.Linear4bit)
    assert trainer.state.global_step == 2
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
