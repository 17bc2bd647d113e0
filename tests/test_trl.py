"""TRL's SFTTrainer: the documented episode recipe trains with a memory stream; the silent paths are refused."""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402

from peft_deltamem import DeltaMemConfig  # noqa: E402
from peft_deltamem.recall_task import build_tokenizer, recall_chats  # noqa: E402
from peft_deltamem.tiny_models import tiny_model  # noqa: E402
from peft_deltamem.training import DeltaMemDataCollator, EpisodeConfig, episodes_map_fn  # noqa: E402
from test_docs import ROOT, python_block  # noqa: E402


def _args(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4, report_to="none",
        use_cpu=True, save_strategy="no", disable_tqdm=True, dataloader_pin_memory=False,
    )
    return trl.SFTConfig(**{**kwargs, **overrides})


def _episodes(tokenizer, chats):
    mapper = episodes_map_fn(tokenizer, EpisodeConfig(visible_turns=1, max_memory_tokens=512, max_length=128))
    return chats.map(mapper, batched=True, remove_columns=chats.column_names, features=mapper.features)


def test_training_md_sft_recipe_runs_as_written_and_trains_with_the_memory_stream(tmp_path, monkeypatch, one_thread):
    code = python_block(ROOT / "docs" / "training.md", "## TRL `SFTTrainer`")
    monkeypatch.chdir(tmp_path)
    import peft_deltamem.runtime as runtime

    streams = []
    original = runtime.MemoryRuntime._run_episode_write

    def counting(self, module, record, kwargs, stream, *rest):
        streams.append(stream.shape)
        return original(self, module, record, kwargs, stream, *rest)

    monkeypatch.setattr(runtime.MemoryRuntime, "_run_episode_write", counting)
    namespace: dict = {}
    exec(compile(code, "docs/training.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 4
    assert len(streams) >= 4 and all(s[1] > 0 for s in streams)  # every step wrote a memory stream
    trained = [p for n, p in trainer.model.named_parameters() if "delta_mem_out" in n]
    assert trained and any(p.abs().sum() > 0 for p in trained)  # the Δ heads started at zero and moved
    assert (tmp_path / "delta_mem_sft" / "adapter_model.safetensors").is_file()


def test_sft_trainer_default_collator_on_chats_is_refused(tmp_path, one_thread):
    tokenizer = build_tokenizer()
    chats = Dataset.from_list(recall_chats(8, seed=0))
    trainer = trl.SFTTrainer(
        model=tiny_model("llama", vocab_size=len(tokenizer)), args=_args(tmp_path), train_dataset=chats,
        processing_class=tokenizer, peft_config=DeltaMemConfig(task_type="CAUSAL_LM"),
    )
    with pytest.raises(ValueError, match=r"SFTTrainer is training this δ-mem model on a batch without a memory stream"):
        trainer.train()


def test_sft_trainer_with_write_sparsity_is_refused(tmp_path, one_thread):
    tokenizer = build_tokenizer()
    episodes = _episodes(tokenizer, Dataset.from_list(recall_chats(8, seed=0)))
    trainer = trl.SFTTrainer(
        model=tiny_model("llama", vocab_size=len(tokenizer)),
        args=_args(tmp_path, remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True}),
        train_dataset=episodes, processing_class=tokenizer, data_collator=DeltaMemDataCollator(tokenizer),
        peft_config=DeltaMemConfig(task_type="CAUSAL_LM", write_sparsity_weight=0.1),
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match=r"write_sparsity_weight > 0 does not work under TRL's SFTTrainer"):
        trainer.train()
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in before.items())  # refused before any update
