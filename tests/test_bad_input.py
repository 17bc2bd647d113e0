"""Bad input and faults (issue 11, part 2): each gets a clear error naming the input, or correct behaviour.

Security first: an adapter file cannot change the frozen base. Then refused models and double adapters,
shapes and ids of a call, materialising a meta base, offload, peft conventions.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import make_peft, random_ids
from peft_deltamem import DeltaMemConfig, DeltaMemLayer
from peft_deltamem.model import _on_model_call
from peft_deltamem.tiny_models import tiny_model

WEIGHTS = "adapter_model.safetensors"


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_bit_identical(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert sorted(after) == sorted(before)
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert not changed, changed


def _clean(model: nn.Module) -> None:
    """Nothing of δ-mem left: no layer, no hook, no peft_config, no new_memory."""
    assert not any(isinstance(m, DeltaMemLayer) for m in model.modules())
    hooks = [*model._forward_pre_hooks.values(), *model._forward_hooks.values()]
    assert not any(getattr(h, "func", None) is _on_model_call for h in hooks)
    assert "new_memory" not in model.__dict__
    assert "peft_config" not in model.__dict__


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bad_input") / "adapter"
    make_peft(tiny_model("llama")).save_pretrained(directory)
    return directory


def _copy(saved: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "adapter"))


def _add_tensors(directory: Path, **tensors: torch.Tensor) -> None:
    path = directory / WEIGHTS
    save_file({**load_file(path), **tensors}, path)


# ------------------------------------------------------------------------------------------- security


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_adapter_file_with_a_base_weight_is_refused_and_the_base_is_unchanged(saved, tmp_path, low_cpu_mem_usage):
    directory = _copy(saved, tmp_path)
    _add_tensors(directory, **{"base_model.model.model.embed_tokens.weight": torch.zeros(128, 64)})
    base = tiny_model("llama")
    before = _state(base)
    with pytest.raises(ValueError, match=r"base_model\.model\.model\.embed_tokens\.weight.*overwrite the frozen base"):
        PeftModel.from_pretrained(base, directory, low_cpu_mem_usage=low_cpu_mem_usage)
    _assert_bit_identical(base, before)
    _clean(base)


def test_adapter_file_with_a_base_weight_is_refused_by_load_adapter_on_a_peft_model(saved, tmp_path):
    directory = _copy(saved, tmp_path)
    _add_tensors(directory, **{"base_model.model.lm_head.weight": torch.zeros(128, 64)})
    model = make_peft(tiny_model("llama"))
    before = _state(model)
    with pytest.raises(ValueError, match=r"lm_head\.weight"):
        model.load_adapter(directory, adapter_name="other")
    _assert_bit_identical(model, before)
    assert list(model.peft_config) == ["default"]  # the refused adapter is gone, the first one stays


def test_adapter_file_with_a_base_weight_is_refused_by_transformers_load_adapter(saved, tmp_path):
    directory = _copy(saved, tmp_path)
    _add_tensors(directory, **{"base_model.model.model.norm.weight": torch.zeros(64)})
    base = tiny_model("llama")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=r"model\.norm\.weight"):
        base.load_adapter(str(directory))
    _clean(base)
    _assert_bit_identical(base, before)
    assert not base._hf_peft_config_loaded


def test_declared_modules_to_save_still_load(tmp_path):
    model = make_peft(tiny_model("llama"), modules_to_save=["lm_head"])
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.add_(1.0)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    expected = model.base_model.model.lm_head.modules_to_save["default"].weight
    assert torch.equal(loaded.base_model.model.lm_head.modules_to_save["default"].weight, expected)


# ------------------------------------------------------------------------------ double adapters, clean-up


def test_get_peft_model_on_a_peft_model_is_refused():
    model = make_peft(tiny_model("llama"))
    before = _state(model)
    with pytest.raises(ValueError, match=r"already a PeftModel.*add_adapter"):
        get_peft_model(model, DeltaMemConfig())
    _assert_bit_identical(model, before)


def test_get_peft_model_on_an_adapted_base_is_refused():
    base = tiny_model("llama")
    first = make_peft(base)
    before = _state(first)
    with pytest.raises(ValueError, match=r"already carries δ-mem adapter.*\['default'\].*fresh copy"):
        get_peft_model(base, DeltaMemConfig(), adapter_name="second")
    _assert_bit_identical(first, before)
    assert list(first.peft_config) == ["default"]


def test_second_get_peft_model_with_the_same_name_does_not_reinitialise_the_trained_adapter():
    base = tiny_model("llama")
    first = make_peft(base)
    config = first.peft_config["default"]
    before = _state(first)
    with pytest.raises(ValueError, match=r"Cannot add δ-mem adapter 'default'"):
        get_peft_model(base, DeltaMemConfig(r=4))
    _assert_bit_identical(first, before)
    assert first.peft_config["default"] is config


def test_add_adapter_on_the_same_peft_model_still_works():
    model = make_peft(tiny_model("llama"))
    model.add_adapter("second", DeltaMemConfig(init_weights=False))
    model.set_adapter("second")
    memory = model.new_memory(1)
    model(random_ids(1, 5), memory=memory)
    assert memory.adapter_name == "second"


def test_failed_from_pretrained_leaves_the_base_clean(saved, tmp_path):
    directory = _copy(saved, tmp_path)
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))  # weights say r=8
    base = tiny_model("llama")
    before = _state(base)
    with pytest.raises(ValueError, match=r"does not fit the base model"):
        PeftModel.from_pretrained(base, directory)
    _clean(base)
    _assert_bit_identical(base, before)
    PeftModel.from_pretrained(base, saved)  # the base is usable again


# ------------------------------------------------------------------------------------- model does not fit


def test_llama_adapter_on_gpt2_says_it_does_not_fit(saved):
    base = tiny_model("gpt2")
    with pytest.raises(ValueError, match=r"does not fit the base model.*'attn'.*target_modules=\['self_attn'\]"):
        PeftModel.from_pretrained(base, saved)
    _clean(base)


def test_wrong_target_modules_on_get_peft_model_names_them():
    with pytest.raises(ValueError, match=r"'self_attn'.*target_modules=\['attention_block'\]"):
        get_peft_model(tiny_model("llama"), DeltaMemConfig(target_modules=["attention_block"]))


def test_r_larger_than_the_hidden_size_is_refused_without_allocating():
    with pytest.raises(ValueError, match=r"r=100000 is larger than the hidden size.*\(64\)"):
        get_peft_model(tiny_model("llama"), DeltaMemConfig(r=100000))


def test_r_equal_to_the_hidden_size_is_accepted():
    get_peft_model(tiny_model("llama", hidden_size=32), DeltaMemConfig(r=32, num_state_heads=1))


class _NoKwargsLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self.self_attn, name, nn.Linear(8, 8))

    def forward(self, input_ids):
        return self.embed(input_ids)


def test_model_whose_forward_takes_no_kwargs_is_refused():
    model = _NoKwargsLM()
    with pytest.raises(ValueError, match=r"_NoKwargsLM: its forward\(\) takes no \*\*kwargs.*transformers causal LMs"):
        get_peft_model(model, DeltaMemConfig(target_modules=["self_attn"]))
    assert not any(isinstance(m, DeltaMemLayer) for m in model.modules())


def test_from_pretrained_onto_a_disk_offloaded_base_is_refused_clearly(saved, tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_model("llama").save_pretrained(tmp_path / "base")
    device_map = {
        "model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
        "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
    }
    base = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", device_map=device_map, offload_folder=tmp_path / "off"
    )
    with pytest.raises(ValueError, match=r"offloaded to disk \(device_map puts \['model\.layers\.1'\] on 'disk'\)"):
        PeftModel.from_pretrained(base, saved)
    assert not any(isinstance(m, DeltaMemLayer) for m in base.modules())


def test_disk_offloaded_base_is_refused_up_front():
    base = tiny_model("llama")
    base.hf_device_map = {"model.embed_tokens": "cpu", "model.layers": "disk", "lm_head": "cpu"}
    with pytest.raises(ValueError, match=r"offloaded to disk.*model\.layers.*without disk offload"):
        get_peft_model(base, DeltaMemConfig())
    _clean(base)


# ------------------------------------------------------------------------------------------- call inputs


@pytest.fixture(scope="module")
def peft_llama():
    return make_peft(tiny_model("llama"))


def test_empty_input_is_refused(peft_llama):
    with pytest.raises(ValueError, match=r"input_ids has shape \(1, 0\).*no tokens"):
        peft_llama(input_ids=torch.zeros(1, 0, dtype=torch.long), memory=peft_llama.new_memory(1))


def test_attention_mask_longer_than_the_input_without_a_cache_is_refused(peft_llama):
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 9\) but input_ids has 6 tokens"):
        peft_llama(input_ids=random_ids(1, 6), attention_mask=torch.ones(1, 9, dtype=torch.long))


def test_memory_attention_mask_without_memory_input_ids_is_refused(peft_llama):
    with pytest.raises(ValueError, match=r"memory_attention_mask was passed without memory_input_ids"):
        peft_llama(input_ids=random_ids(1, 6), memory_attention_mask=torch.ones(1, 4, dtype=torch.long))


def test_memory_attention_mask_wider_than_the_memory_stream_is_refused(peft_llama):
    with pytest.raises(ValueError, match=r"memory_attention_mask has shape \(1, 7\) but memory_input_ids has shape"):
        peft_llama(
            input_ids=random_ids(1, 6),
            memory_input_ids=random_ids(1, 5),
            memory_attention_mask=torch.ones(1, 7, dtype=torch.long),
        )


@pytest.mark.parametrize("bad", [128, 5000, -1])
def test_out_of_vocabulary_ids_are_refused(peft_llama, bad):
    ids = random_ids(1, 6)
    ids[0, 3] = bad
    with pytest.raises(ValueError, match=rf"input_ids contains token id {bad}, outside the model's vocabulary"):
        peft_llama(input_ids=ids, memory=peft_llama.new_memory(1))


def test_out_of_vocabulary_memory_stream_is_refused(peft_llama):
    stream = random_ids(1, 6)
    stream[0, 0] = 999
    with pytest.raises(ValueError, match=r"memory_input_ids contains token id 999"):
        peft_llama(input_ids=random_ids(1, 6), memory_input_ids=stream)


def test_a_refused_call_leaves_the_memory_unchanged(peft_llama):
    memory = peft_llama.new_memory(1)
    peft_llama(input_ids=random_ids(1, 6), memory=memory)
    before = {k: v.clone() for k, v in memory.states.items()}
    ids = random_ids(1, 6)
    ids[0, 1] = 10_000
    with pytest.raises(ValueError):
        peft_llama(input_ids=ids, memory=memory)
    assert all(torch.equal(memory.states[k], v) for k, v in before.items())


# --------------------------------------------------------------------------------------- meta, to_empty


def test_meta_base_materialised_with_to_empty_initialises_the_memory_parameters():
    with torch.device("meta"):
        base = tiny_model("llama")
    model = get_peft_model(base, DeltaMemConfig(beta_bias_init=-3.0))
    model.to_empty(device="cpu")
    for layer in (m for m in model.modules() if isinstance(m, DeltaMemLayer)):
        bias = layer.delta_mem_beta_bias["default"]
        assert torch.equal(bias, torch.full_like(bias, -3.0))
        assert torch.count_nonzero(layer.delta_mem_out["default"].weight) == 0  # init_weights=True: a no-op
        width = layer.settings["default"].width
        write = layer.delta_mem_write["default"].weight
        assert torch.count_nonzero(write[3 * width :]) == 0
        assert write[: 3 * width].abs().max() <= 1 / 64**0.5


def test_to_empty_of_a_materialised_model_does_not_reinitialise():
    model = make_peft(tiny_model("llama"))
    layer = next(m for m in model.modules() if isinstance(m, DeltaMemLayer))
    with torch.no_grad():
        layer.delta_mem_beta_bias["default"].fill_(7.0)
    model.cpu()
    assert torch.all(layer.delta_mem_beta_bias["default"] == 7.0)


# ------------------------------------------------------------------------------------- peft conventions


def test_layer_has_in_and_out_features():
    model = make_peft(tiny_model("llama"))
    layer = next(m for m in model.modules() if isinstance(m, DeltaMemLayer))
    assert (layer.in_features, layer.out_features) == (64, 64)
    gpt2 = make_peft(tiny_model("gpt2"))
    layer = next(m for m in gpt2.modules() if isinstance(m, DeltaMemLayer))
    assert (layer.in_features, layer.out_features) == (64, 64)


def test_unmerge_adapter_when_nothing_is_merged_warns():
    model = make_peft(tiny_model("llama"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.base_model.unmerge_adapter()
    assert any("Already unmerged" in str(w.message) for w in caught)


def test_merge_adapter_is_still_refused():
    model = make_peft(tiny_model("llama"))
    with pytest.raises(NotImplementedError, match=r"cannot be merged"):
        model.merge_adapter()


# ------------------------------------------------------------------------------------- corrupt configs


def test_non_json_adapter_config_is_named(saved, tmp_path):
    """DeltaMemConfig.from_pretrained names the file (PeftModel.from_pretrained reads it in peft first)."""
    directory = _copy(saved, tmp_path)
    (directory / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"adapter_config\.json is not valid JSON.*corrupt"):
        DeltaMemConfig.from_pretrained(directory)


def test_tampered_peft_type_is_named(saved, tmp_path):
    directory = _copy(saved, tmp_path)
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "peft_type": "DELTA_MEMX"}))
    with pytest.raises(ValueError, match=r"peft_type='DELTA_MEMX', not 'DELTA_MEM'"):
        DeltaMemConfig.from_pretrained(directory)


# ----------------------------------------------------------------------------------- Trainer, no stream


def test_memory_health_callback_refuses_training_batches_without_a_memory_stream(tmp_path, one_thread):
    from datasets import Dataset
    from transformers import Trainer

    from conftest import cpu_training_args
    from peft_deltamem.training import MemoryHealthCallback

    rows = [{"input_ids": random_ids(1, 8, seed=i)[0].tolist()} for i in range(4)]

    def plain_collator(features):  # what a language-modelling collator gives: no memory_input_ids
        ids = torch.tensor([f["input_ids"] for f in features])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    model = make_peft(tiny_model("llama"))
    model.train()
    trainer = Trainer(
        model=model, args=cpu_training_args(tmp_path, max_steps=1, per_device_train_batch_size=2),
        train_dataset=Dataset.from_list(rows), data_collator=plain_collator, callbacks=[MemoryHealthCallback()],
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match=r"training batch reached the δ-mem model without a memory stream"):
        trainer.train()
    assert all(torch.equal(dict(model.named_parameters())[n], v) for n, v in before.items())


# ------------------------------------------------------------------------------------------ more cases


def test_adapter_file_with_a_tensor_for_no_module_is_refused(saved, tmp_path):
    directory = _copy(saved, tmp_path)
    _add_tensors(directory, **{"base_model.model.evil.weight": torch.zeros(3)})
    base = tiny_model("llama")
    with pytest.raises(ValueError, match=r"1 tensor\(s\) that are not δ-mem.*base_model\.model\.evil\.weight"):
        PeftModel.from_pretrained(base, directory)
    _clean(base)


def test_saved_r_above_the_hidden_size_is_refused_and_the_base_stays_clean(saved, tmp_path):
    directory = _copy(saved, tmp_path)
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "r": 1000}))
    base = tiny_model("llama")
    with pytest.raises(ValueError, match=r"r=1000 is larger than the hidden size"):
        PeftModel.from_pretrained(base, directory)
    _clean(base)


def test_gpt2_adapter_through_transformers_load_adapter_on_llama_does_not_fit(tmp_path):
    make_peft(tiny_model("gpt2")).save_pretrained(tmp_path)
    base = tiny_model("llama")
    with pytest.raises(ValueError, match=r"does not fit the base model.*target_modules=\['attn'\]"):
        base.load_adapter(str(tmp_path))
    assert not any(isinstance(m, DeltaMemLayer) for m in base.modules())


def test_memory_attention_mask_that_is_not_a_tensor_is_refused(peft_llama):
    with pytest.raises(ValueError, match=r"memory_attention_mask must be a 2-D \(batch, length\) tensor, got list"):
        peft_llama(input_ids=random_ids(1, 6), memory_input_ids=random_ids(1, 4), memory_attention_mask=[[1, 1, 1, 1]])


def test_out_of_vocabulary_prompt_is_refused_by_generate(peft_llama):
    ids = random_ids(1, 6)
    ids[0, 2] = 128
    with pytest.raises(ValueError, match=r"token id 128, outside the model's vocabulary \(0\.\.127\)"):
        peft_llama.generate(input_ids=ids, memory=peft_llama.new_memory(1), max_new_tokens=2)


def test_generate_with_a_mask_still_works_after_the_new_checks(peft_llama):
    ids = random_ids(2, 6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    out = peft_llama.generate(
        input_ids=ids, attention_mask=mask, memory=peft_llama.new_memory(2), max_new_tokens=3, do_sample=False
    )
    assert out.shape == (2, 9)


@pytest.mark.parametrize("content", [b"\xff" * 64, b""], ids=["header_too_large", "empty"])
def test_corrupt_weights_are_named_before_the_base_is_touched(saved, tmp_path, content):
    directory = _copy(saved, tmp_path)
    (directory / WEIGHTS).write_bytes(content)
    base = tiny_model("llama")
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors is not a readable safetensors file.*corrupt"):
        PeftModel.from_pretrained(base, directory)
    _clean(base)


def test_transformers_load_adapter_twice_with_two_names_still_works(saved):
    base = tiny_model("llama")
    base.load_adapter(str(saved))
    base.load_adapter(str(saved), adapter_name="second")
    assert sorted(base.peft_config) == ["default", "second"]
    layer = next(m for m in base.modules() if isinstance(m, DeltaMemLayer))
    assert sorted(layer.settings) == ["default", "second"]
    with pytest.raises(ValueError, match=r"Adapter with name second already exists"):  # transformers' own check
        base.load_adapter(str(saved), adapter_name="second")


def test_an_episode_batch_with_nothing_to_learn_is_refused_instead_of_a_nan_loss(peft_llama):
    labels = torch.full((2, 6), -100)
    labels[1, 0] = 5  # the first position is never predicted: still nothing to learn
    with pytest.raises(ValueError, match=r"rows \[0, 1\] have labels that are all -100"):
        peft_llama(input_ids=random_ids(2, 6), memory_input_ids=random_ids(2, 4), labels=labels)
    labels[1, 3] = 5  # one supervised token in the batch: a finite loss
    loss = peft_llama(input_ids=random_ids(2, 6), memory_input_ids=random_ids(2, 4), labels=labels).loss
    assert torch.isfinite(loss)


def test_a_peft_model_pickles_and_unpickles_to_the_same_outputs(peft_llama):
    import pickle

    clone = pickle.loads(pickle.dumps(peft_llama))
    ids = random_ids(1, 6)
    with torch.no_grad():
        memory, other = peft_llama.new_memory(1), clone.new_memory(1)
        expected = peft_llama(input_ids=ids, memory=memory).logits
        assert torch.equal(clone(input_ids=ids, memory=other).logits, expected)
    assert torch.equal(memory.states[next(iter(memory.states))], other.states[next(iter(other.states))])


@pytest.mark.parametrize(
    "call",
    [
        lambda tmp: __import__("peft_deltamem").convert_reference_adapter(tmp, tmp / "out", overwrite="no"),
        lambda tmp: __import__("peft_deltamem.training.episodes", fromlist=["x"]).EpisodeConfig(context_stream="no"),
        lambda tmp: __import__("peft_deltamem.training.episodes", fromlist=["x"]).EpisodeConfig(system_in_memory=1),
        lambda tmp: __import__("peft_deltamem.training.collator", fromlist=["x"]).DeltaMemDataCollator(
            pad_token_id=0, return_ablation_mode="False"
        ),
        lambda tmp: __import__("peft_deltamem.training.callbacks", fromlist=["x"]).MemoryHealthCallback(
            check_columns="yes"
        ),
        lambda tmp: __import__("peft_deltamem.training.callbacks", fromlist=["x"]).MemoryHealthCallback(
            require_memory_stream=0
        ),
        lambda tmp: __import__("peft_deltamem.real_model", fromlist=["x"]).load_smollm2(cache="no"),
    ],
)
def test_boolean_parameters_refuse_other_values(call, tmp_path):
    """A truthy string such as "no" must not silently mean True (overwrite="no" used to overwrite)."""
    with pytest.raises(TypeError, match=r"must be True or False, got"):
        call(tmp_path)


def test_the_chat_engine_refuses_a_non_bool_memory_flag(tmp_path):
    from peft_deltamem.agents.engine import ChatEngine
    from peft_deltamem.agents.store import DirectoryStore
    from peft_deltamem.recall_task import build_tokenizer

    with pytest.raises(TypeError, match=r"memory must be True or False, got 'off'"):
        ChatEngine(make_peft(tiny_model("llama")), build_tokenizer(), DirectoryStore(tmp_path), memory="off")
