"""Save / load of δ-mem adapters (peft, transformers, offline Hub cache, push_to_hub) and of DeltaMemory files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import EntryNotFoundError
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel
from safetensors.torch import load_file, save_file

from conftest import make_peft, populate_hub_cache, random_ids
from peft_deltamem import DeltaMemConfig, DeltaMemory, push_to_hub
from peft_deltamem.tiny_models import tiny_model

BASE_ID = "tiny-org/tiny-llama"
HUB_ID = "tiny-org/tiny-deltamem"


# ----------------------------------------------------------------------------------------------- helpers


def named_base(name: str = BASE_ID, **kwargs):
    """tiny_model("llama") that looks as if it was loaded from ``name`` (what peft records as the base)."""
    base = tiny_model("llama", **kwargs)
    base.config._name_or_path = name
    base.name_or_path = name
    return base


def trained_adapter(base=None, seed: int = 1, **config_kwargs):
    """A δ-mem model whose every adapter tensor differs from any fresh initialisation (as after training)."""
    model = make_peft(base if base is not None else named_base(), **config_kwargs)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "delta_mem_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval()


IDS_1 = random_ids(2, 9, seed=1)
IDS_2 = random_ids(2, 7, seed=2)


def two_calls(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of two calls from an empty memory; the second reads what the first wrote."""
    memory = model.new_memory(IDS_1.shape[0])
    with torch.no_grad():
        first = model(IDS_1, memory=memory).logits
        second = model(IDS_2, memory=memory).logits
    return first, second


def assert_same_logits(model, expected: tuple[torch.Tensor, torch.Tensor]) -> None:
    got = two_calls(model)
    assert torch.equal(got[0], expected[0])
    assert torch.equal(got[1], expected[1])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(adapter directory, the model that wrote it, its reference logits); read-only: copy before editing."""
    model = trained_adapter()
    directory = tmp_path_factory.mktemp("saved") / "adapter"
    model.save_pretrained(directory)
    return directory, model, two_calls(model)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------- save_pretrained


def test_save_pretrained_writes_config_and_safetensors(saved):
    directory, model, _ = saved
    assert (directory / "adapter_config.json").is_file()
    assert (directory / "adapter_model.safetensors").is_file()
    assert not (directory / "adapter_model.bin").exists()
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["peft_type"] == "DELTA_MEM"
    assert config["base_model_name_or_path"] == BASE_ID
    assert config["delta_heads"] == ["q", "o"]
    assert config["r"] == 8
    tensors = load_file(directory / "adapter_model.safetensors")
    assert tensors and all("delta_mem_" in k for k in tensors)
    assert not any("base_layer" in k or ".default." in k for k in tensors), sorted(tensors)
    n_params = sum(p.numel() for n, p in model.named_parameters() if "delta_mem_" in n)
    assert sum(t.numel() for t in tensors.values()) == n_params


def test_save_pretrained_saves_only_the_adapter_parameters_not_the_memory(tmp_path):
    model = trained_adapter()
    memory = model.new_memory(2)
    with torch.no_grad():
        model(IDS_1, memory=memory)
    assert not memory.is_empty
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    expected = {
        f"base_model.model.model.layers.{i}.self_attn.{name}"
        for i in range(2)
        for name in ("delta_mem_write.weight", "delta_mem_beta_bias", "delta_mem_out.weight")
    }
    assert set(tensors) == expected


def test_model_card_says_import_peft_deltamem(saved):
    directory, _, _ = saved
    card = (directory / "README.md").read_text()
    assert BASE_ID in card
    assert "import peft_deltamem" in card, "the model card must tell users to `import peft_deltamem` before loading"


def test_safe_serialization_false_writes_bin_and_reloads(tmp_path):
    model = trained_adapter()
    expected = two_calls(model)
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file()
    assert not (tmp_path / "adapter_model.safetensors").exists()
    assert_same_logits(PeftModel.from_pretrained(tiny_model("llama"), tmp_path), expected)


# ------------------------------------------------------------------------------------------------ loading


def test_in_process_reload_gives_identical_logits(saved):
    directory, model, expected = saved
    loaded = PeftModel.from_pretrained(tiny_model("llama"), directory)
    assert not loaded.training
    assert type(loaded.peft_config["default"]) is DeltaMemConfig
    assert_same_logits(loaded, expected)
    assert_same_logits(model, expected)  # the original, again


def test_reload_restores_every_adapter_tensor(saved):
    directory, model, _ = saved
    loaded = PeftModel.from_pretrained(tiny_model("llama"), directory)
    original = {n: p for n, p in model.named_parameters() if "delta_mem_" in n}
    restored = {n: p for n, p in loaded.named_parameters() if "delta_mem_" in n}
    assert original.keys() == restored.keys()
    for name in original:
        assert torch.equal(original[name], restored[name]), name


def test_low_cpu_mem_usage_load(saved):
    directory, _, expected = saved
    loaded = PeftModel.from_pretrained(tiny_model("llama"), directory, low_cpu_mem_usage=True)
    assert not any(p.device.type == "meta" for p in loaded.parameters())
    assert_same_logits(loaded, expected)


def test_is_trainable_load_gives_trainable_adapter(saved):
    directory, _, expected = saved
    loaded = PeftModel.from_pretrained(tiny_model("llama"), directory, is_trainable=True)
    trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert trainable and all("delta_mem_" in n for n in trainable)
    assert_same_logits(loaded.eval(), expected)


def test_peft_config_from_pretrained_is_delta_mem_config(saved):
    directory, model, _ = saved
    config = PeftConfig.from_pretrained(str(directory))
    assert type(config) is DeltaMemConfig
    assert config.delta_heads == ("q", "o")
    assert config.fingerprint() == model.peft_config["default"].fingerprint()


def test_fresh_process_load_gives_bit_identical_logits(saved, tmp_path):
    directory, _, expected = saved
    torch.save((IDS_1, IDS_2), tmp_path / "ids.pt")
    script = textwrap.dedent(
        """
        import sys
        import torch
        import peft_deltamem  # noqa: F401
        from peft import PeftModel
        from peft_deltamem.tiny_models import tiny_model

        adapter, ids_path, out_path = sys.argv[1:4]
        ids_1, ids_2 = torch.load(ids_path)
        model = PeftModel.from_pretrained(tiny_model("llama"), adapter)
        memory = model.new_memory(ids_1.shape[0])
        with torch.no_grad():
            first = model(ids_1, memory=memory).logits
            second = model(ids_2, memory=memory).logits
        torch.save((first, second), out_path)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(directory), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"},
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = torch.load(tmp_path / "out.pt")
    assert torch.equal(first, expected[0])
    assert torch.equal(second, expected[1])


def test_auto_peft_model_for_causal_lm(tmp_path):
    base_dir = tmp_path / "base"
    base = tiny_model("llama")
    base.save_pretrained(base_dir)
    model = trained_adapter(named_base(str(base_dir)))
    expected = two_calls(model)
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        base_dir
    )
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter", attn_implementation="eager")
    assert isinstance(loaded, PeftModel)
    assert type(loaded.peft_config["default"]) is DeltaMemConfig
    assert not loaded.training
    assert_same_logits(loaded, expected)


def test_second_adapter_has_its_own_memory(tmp_path):
    model_a = trained_adapter(seed=1)
    model_a.save_pretrained(tmp_path / "a")
    trained_adapter(seed=2).save_pretrained(tmp_path / "b")
    reference_a = two_calls(model_a)

    model = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "a")
    model.load_adapter(tmp_path / "b", adapter_name="other")
    assert set(model.peft_config) == {"default", "other"}
    assert type(model.peft_config["other"]) is DeltaMemConfig
    assert model.active_adapters == ["default"]

    with pytest.raises(ValueError, match="Unknown adapter 'missing'"):
        model.new_memory(2, adapter_name="missing")
    mem_a = model.new_memory(2)
    with torch.no_grad():
        first_a = model(IDS_1, memory=mem_a).logits
    assert torch.equal(first_a, reference_a[0])
    assert mem_a.adapter_name == "default" and not mem_a.is_empty
    state_a = mem_a.states

    model.set_adapter("other")
    with pytest.raises(ValueError, match="belongs to adapter 'default'"):
        model(IDS_2, memory=mem_a)  # A's memory is not read by B
    mem_b = model.new_memory(2)
    assert mem_b.adapter_name == "other"
    with torch.no_grad():
        first_b = model(IDS_1, memory=mem_b).logits
    assert not torch.equal(first_b, first_a)  # B's own weights
    assert any(not torch.equal(mem_b.states[k], state_a[k]) for k in state_a)

    model.set_adapter("default")
    for name, tensor in state_a.items():
        assert torch.equal(mem_a.states[name], tensor), name
    with torch.no_grad():
        second_a = model(IDS_2, memory=mem_a).logits
    assert torch.equal(second_a, reference_a[1])  # A continues exactly as if B had never run


def test_transformers_load_adapter_on_plain_model(saved):
    directory, _, expected = saved
    model = tiny_model("llama")
    with torch.no_grad():
        base_logits = model(IDS_1).logits
    model.load_adapter(str(directory))
    assert model.active_adapters() == ["default"]
    memory = model.new_memory(2)
    with torch.no_grad():
        first = model(IDS_1, memory=memory).logits
        second = model(IDS_2, memory=memory).logits
        stateless = model(IDS_2).logits
        model.generation_config.eos_token_id = None
        generated = model.generate(IDS_2, memory=memory.clone(), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert not torch.equal(first, base_logits)
    assert torch.equal(first, expected[0])
    assert torch.equal(second, expected[1])  # the memory carries across the calls it is passed to
    assert not torch.equal(stateless, second)
    assert torch.equal(generated[:, IDS_2.shape[1]], model(IDS_2, memory=memory.clone()).logits[:, -1].argmax(-1))


# --------------------------------------------------------------------------------------------- mismatches


@pytest.mark.parametrize(
    ("base_kwargs", "match"),
    [
        ({"hidden_size": 32}, r"(?i)size mismatch|hidden"),
        ({"num_layers": 3}, r"(?i)layer"),
        ({"num_layers": 1}, r"(?i)layer"),
    ],
    ids=["hidden_size", "more_layers", "fewer_layers"],
)
def test_mismatched_base_raises(saved, base_kwargs, match):
    directory, _, _ = saved
    with pytest.raises((ValueError, RuntimeError), match=match):
        PeftModel.from_pretrained(tiny_model("llama", **base_kwargs), directory)


def test_llama_adapter_on_gpt2_raises(saved):
    directory, _, _ = saved
    with pytest.raises(ValueError, match=r"does not fit the base model.*target_modules=\['self_attn'\]"):
        PeftModel.from_pretrained(tiny_model("gpt2"), directory)


def test_gpt2_adapter_on_llama_raises(tmp_path):
    make_peft(tiny_model("gpt2")).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"does not fit the base model.*'self_attn'.*target_modules=\['attn'\]"):
        PeftModel.from_pretrained(tiny_model("llama"), tmp_path)


# ------------------------------------------------------------------------------------ corrupt directories


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_missing_weights_file_raises_clearly(saved, tmp_path):
    directory = _copy(saved[0], tmp_path / "no_weights")
    (directory / "adapter_model.safetensors").unlink()
    with pytest.raises((ValueError, OSError), match=r"adapter_model"):
        PeftModel.from_pretrained(tiny_model("llama"), str(directory))


def test_missing_config_raises_clearly(saved, tmp_path):
    directory = _copy(saved[0], tmp_path / "no_config")
    (directory / "adapter_config.json").unlink()
    with pytest.raises(ValueError, match=r"adapter_config\.json"):
        PeftModel.from_pretrained(tiny_model("llama"), directory)


@pytest.mark.parametrize("keep", [0.5, 0.0], ids=["truncated", "empty"])
def test_truncated_weights_file_raises(saved, tmp_path, keep):
    directory = _copy(saved[0], tmp_path / "truncated")
    path = directory / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(Exception, match=r"(?i)deserializ|truncat|corrupt|header") as info:
        PeftModel.from_pretrained(tiny_model("llama"), directory)
    assert not isinstance(info.value, (AttributeError, TypeError, KeyError, IndexError))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"r": 0}, r"DeltaMemConfig\.r=0"),
        ({"delta_heads": ["q", "x"]}, r"delta_heads"),
        ({"write_granularity": "sentence"}, r"write_granularity"),
        ({"num_state_heads": 0}, r"num_state_heads"),
    ],
    ids=["r=0", "unknown_head", "granularity", "state_heads"],
)
def test_invalid_adapter_config_raises(saved, tmp_path, changes, match):
    directory = _copy(saved[0], tmp_path / "bad_config")
    _edit_config(directory, **changes)
    with pytest.raises(ValueError, match=match):
        PeftModel.from_pretrained(tiny_model("llama"), directory)


def test_config_disagreeing_with_weights_raises(saved, tmp_path):
    directory = _copy(saved[0], tmp_path / "r4")
    _edit_config(directory, r=4)
    with pytest.raises(ValueError, match=r"does not fit the base model.*other shapes.*delta_mem_"):
        PeftModel.from_pretrained(tiny_model("llama"), directory)


# -------------------------------------------------------------------------------------- offline Hub cache


def test_load_hub_id_from_offline_cache(saved, offline_hub_cache):
    directory, _, expected = saved
    populate_hub_cache(offline_hub_cache, directory, HUB_ID)
    config = PeftConfig.from_pretrained(HUB_ID)
    assert type(config) is DeltaMemConfig
    loaded = PeftModel.from_pretrained(tiny_model("llama"), HUB_ID)
    assert_same_logits(loaded, expected)


def test_load_hub_id_with_cache_dir_argument(saved, tmp_path, monkeypatch):
    directory, _, expected = saved
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "explicit_cache"
    populate_hub_cache(cache, directory, HUB_ID)
    loaded = PeftModel.from_pretrained(tiny_model("llama"), HUB_ID, cache_dir=str(cache))
    assert_same_logits(loaded, expected)


def test_unknown_hub_id_offline_raises_clearly(offline_hub_cache):
    with pytest.raises(ValueError, match=r"adapter_config\.json.*tiny-org/not-cached"):
        PeftModel.from_pretrained(tiny_model("llama"), "tiny-org/not-cached")


# -------------------------------------------------------------------------------------------- push_to_hub


@pytest.fixture
def mocked_hub(monkeypatch):
    """Captures what push_to_hub would upload (transformers' PushToHubMixin: create_repo, then create_commit)."""
    uploads: dict = {"repos": [], "files": {}}

    class _Repo:
        def __init__(self, repo_id):
            self.repo_id = repo_id

    def create_repo(self, repo_id, **kwargs):
        uploads["repos"].append(repo_id)
        return _Repo(repo_id)

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            source = op.path_or_fileobj
            uploads["files"][op.path_in_repo] = Path(source).read_bytes() if isinstance(source, (str, Path)) else source
        return "commit"

    def no_remote_card(*args, **kwargs):
        raise EntryNotFoundError("no README.md in the (mocked) repo yet")

    def refuse(*args, **kwargs):
        raise AssertionError("push_to_hub used an unexpected Hub API")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(HfApi, "upload_folder", refuse)
    monkeypatch.setattr(HfApi, "upload_file", refuse)
    monkeypatch.setattr(ModelCard, "load", classmethod(no_remote_card))
    return uploads


def test_push_to_hub_uploads_adapter_files(mocked_hub, tmp_path):
    model = trained_adapter()
    expected = two_calls(model)
    model.push_to_hub("tiny-org/pushed")
    assert mocked_hub["repos"] == ["tiny-org/pushed"]
    files = mocked_hub["files"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
    assert json.loads(files["adapter_config.json"])["peft_type"] == "DELTA_MEM"
    # what was uploaded loads back to the same model
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / name).write_bytes(files[name])
    assert_same_logits(PeftModel.from_pretrained(tiny_model("llama"), tmp_path), expected)


def test_peft_deltamem_push_to_hub_keeps_the_model_card(mocked_hub):
    # transformers' push_to_hub replaces the saved README with the Hub's card (or its template), dropping the
    # "import peft_deltamem" note; peft_deltamem.push_to_hub uploads what save_pretrained wrote.
    push_to_hub(trained_adapter(), "tiny-org/pushed")
    assert mocked_hub["repos"] == ["tiny-org/pushed"]
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(mocked_hub["files"])
    assert "import peft_deltamem" in mocked_hub["files"]["README.md"].decode()


# ------------------------------------------------------------------------------------------- DeltaMemory


def written_memory(batch: int = 2, model=None, **config_kwargs) -> tuple:
    model = model if model is not None else trained_adapter(**config_kwargs)
    memory = model.new_memory(batch)
    with torch.no_grad():
        model(random_ids(batch, 9, seed=1), memory=memory)
    return model, memory


def test_memory_save_load_round_trip(tmp_path):
    _, memory = written_memory()
    assert not memory.is_empty and memory.batch_size == 2
    assert memory.layers == ("model.layers.0.self_attn", "model.layers.1.self_attn")
    assert memory.adapter_name == "default" and memory.r == 8 and memory.delta_heads == ("q", "o")
    for tensor in memory.states.values():
        assert tensor.shape == (2, 1, 8, 8) and tensor.dtype == torch.float32
        assert tensor.abs().sum() > 0
    memory.save(tmp_path / "memory.safetensors")
    loaded = DeltaMemory.load(tmp_path / "memory.safetensors")
    assert loaded.descriptor() == memory.descriptor() and loaded.weights_hash == memory.weights_hash
    for name, tensor in memory.states.items():
        assert torch.equal(loaded.states[name], tensor), name


def test_empty_memory_round_trip(tmp_path):
    model = trained_adapter()
    expected = two_calls(model)
    memory = model.new_memory(2)
    assert memory.is_empty and memory.batch_size == 2
    memory.save(tmp_path / "empty.safetensors")
    loaded = DeltaMemory.load(tmp_path / "empty.safetensors")
    assert loaded.is_empty and loaded.descriptor() == memory.descriptor()
    with torch.no_grad():
        assert torch.equal(model(IDS_1, memory=loaded).logits, expected[0])


def test_states_are_a_detached_copy():
    _, memory = written_memory()
    states = memory.states
    before = {k: v.clone() for k, v in states.items()}
    for tensor in states.values():
        tensor.add_(1.0)
    for name, tensor in before.items():
        assert torch.equal(memory.states[name], tensor), name


def test_loaded_memory_reproduces_next_call_logits(tmp_path, saved):
    directory, _, _ = saved
    model = PeftModel.from_pretrained(tiny_model("llama"), directory)
    memory = model.new_memory(2)
    with torch.no_grad():
        model(IDS_1, memory=memory)
        memory.save(tmp_path / "memory.safetensors")
        expected = model(IDS_2, memory=memory.clone()).logits
        assert not torch.equal(model(IDS_2).logits, expected)  # the memory matters
        # from the file, into another instance of the same adapter
        other = PeftModel.from_pretrained(tiny_model("llama"), directory)
        assert torch.equal(other(IDS_2, memory=DeltaMemory.load(tmp_path / "memory.safetensors")).logits, expected)


def test_loaded_memory_from_other_adapter_weights_is_refused(tmp_path):
    _, memory = written_memory(model=trained_adapter(seed=1))
    memory.save(tmp_path / "memory.safetensors")
    other = trained_adapter(seed=2)  # same configuration, other weights
    loaded = DeltaMemory.load(tmp_path / "memory.safetensors")
    with pytest.raises(ValueError, match="written with other weights"):
        other(IDS_1, memory=loaded)
    assert torch.equal(loaded.states[loaded.layers[0]], memory.states[memory.layers[0]])


def test_memory_refuses_to_overwrite(tmp_path):
    path = tmp_path / "memory.safetensors"
    _, first = written_memory()
    first.save(path)
    original = path.read_bytes()
    second = first.clone()
    second.reset(rows=[0])
    with pytest.raises(FileExistsError, match=r"overwrite=True"):
        second.save(path)
    assert path.read_bytes() == original
    with pytest.raises(TypeError, match="overwrite must be a bool"):
        second.save(path, overwrite="yes")
    second.save(path, overwrite=True)
    loaded = DeltaMemory.load(path)
    for name, tensor in second.states.items():
        assert torch.equal(loaded.states[name], tensor)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory.safetensors"]  # no temporary files left


def test_memory_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"memory"):
        DeltaMemory.load(tmp_path / "memory.safetensors")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_memory_load_corrupt_file(tmp_path, damage):
    path = tmp_path / "memory.safetensors"
    written_memory()[1].save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00not a safetensors file" * 10)
    with pytest.raises(ValueError, match=r"not a readable safetensors file"):
        DeltaMemory.load(path)


def test_memory_load_rejects_other_safetensors(saved, tmp_path):
    directory, _, _ = saved
    with pytest.raises(ValueError, match=r"not a δ-mem memory"):
        DeltaMemory.load(directory / "adapter_model.safetensors")
    save_file({"x": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match=r"not a δ-mem memory"):
        DeltaMemory.load(tmp_path / "plain.safetensors")


def test_memory_load_rejects_other_format_version_and_damaged_metadata(tmp_path):
    _, memory = written_memory()
    tensors = {k: v.contiguous() for k, v in memory.states.items()}
    meta = memory.metadata()
    save_file(tensors, tmp_path / "v99.safetensors", metadata={**meta, "format_version": "99"})
    with pytest.raises(ValueError, match=r"format version 99"):
        DeltaMemory.load(tmp_path / "v99.safetensors")
    save_file(tensors, tmp_path / "broken.safetensors", metadata={**meta, "fields": "{not json"})
    with pytest.raises(ValueError, match=r"damaged memory metadata"):
        DeltaMemory.load(tmp_path / "broken.safetensors")
    fields = json.loads(meta["fields"])
    del fields["r"]
    save_file(tensors, tmp_path / "no_r.safetensors", metadata={**meta, "fields": json.dumps(fields)})
    with pytest.raises(ValueError, match=r"damaged memory metadata"):
        DeltaMemory.load(tmp_path / "no_r.safetensors")


def test_memory_file_with_nan_is_refused(tmp_path):
    _, memory = written_memory()
    tensors = {k: v.contiguous() for k, v in memory.states.items()}
    tensors[memory.layers[0]][0, 0, 0, 0] = float("nan")
    save_file(tensors, tmp_path / "nan.safetensors", metadata=memory.metadata())
    with pytest.raises(ValueError, match=r"NaN"):
        DeltaMemory.load(tmp_path / "nan.safetensors")


@pytest.mark.parametrize(
    ("other_config", "match"),
    [
        ({"r": 4}, r"its r is 4"),
        ({"num_state_heads": 2}, r"num_state_heads"),
        ({"delta_heads": ("q", "k", "o")}, r"delta_heads"),
        ({"layers_to_transform": [0]}, r"layers"),
    ],
    ids=["r", "state_heads", "delta_heads", "layers"],
)
def test_memory_from_other_config_is_refused(other_config, match):
    _, other = written_memory(**other_config)
    model, memory = written_memory()
    before = memory.states
    with pytest.raises(ValueError, match=rf"does not fit adapter 'default'.*{match}"):
        model(IDS_1, memory=other)
    with pytest.raises(ValueError, match=r"differ in"):
        DeltaMemory.cat([memory, other])
    for layer, tensor in before.items():
        assert torch.equal(memory.states[layer], tensor)


def test_memory_with_bad_tensors_is_refused():
    _, good = written_memory()
    first = good.layers[0]
    states = good.states
    cases = [
        ({first: torch.zeros(2, 1, 4, 4)}, r"shape"),
        ({first: states[first].half()}, r"float32"),
        ({first: torch.full_like(states[first], float("inf"))}, r"infinite"),
        ({"model.layers.7.self_attn": states[first]}, r"do not match its layers"),
    ]
    for replacement, match in cases:
        with pytest.raises(ValueError, match=match):
            DeltaMemory(**good.descriptor(), weights_hash=None, states={**states, **replacement})
    with pytest.raises(ValueError, match=r"do not match its layers"):
        DeltaMemory(**good.descriptor(), weights_hash=None, states={first: states[first]})
    model = trained_adapter()
    with pytest.raises(TypeError, match=r"DeltaMemory"):
        model(IDS_1, memory=states)


def test_lora_and_delta_mem_in_one_model_are_refused_when_built_and_the_merged_way_works(tmp_path):
    """peft keeps one config dict per model: a LoRA wrapped around a δ-mem model would overwrite δ-mem's config and
    save δ-mem weights as a LoRA that does nothing (and δ-mem around a LoRA the reverse). Both are refused when
    built, leaving the models as they were; a LoRA merged into the base, then δ-mem, saves and reloads exactly."""
    from peft import LoraConfig, get_peft_model

    from peft_deltamem import DeltaMemConfig
    from peft_deltamem.tiny_models import tiny_model

    lora = LoraConfig(task_type="CAUSAL_LM", target_modules=["up_proj"], init_lora_weights=False)
    delta = get_peft_model(
        tiny_model("llama", vocab_size=64), DeltaMemConfig(task_type="CAUSAL_LM", init_weights=False)
    )
    with pytest.raises(ValueError, match="LoraConfig cannot be added to a δ-mem model.*merge_and_unload"):
        get_peft_model(delta, lora)
    assert {type(c).__name__ for c in delta.peft_config.values()} == {"DeltaMemConfig"}
    lora_model = get_peft_model(tiny_model("llama", vocab_size=64), lora)
    with pytest.raises(ValueError, match="another PEFT method.*lora"):
        get_peft_model(lora_model, DeltaMemConfig(task_type="CAUSAL_LM"))
    assert {type(c).__name__ for c in lora_model.peft_config.values()} == {"LoraConfig"}
    # the way that works: merge the LoRA, then δ-mem on the merged base
    lora_model.save_pretrained(tmp_path / "lora")
    torch.manual_seed(1)
    combined = get_peft_model(lora_model.merge_and_unload(), DeltaMemConfig(task_type="CAUSAL_LM", init_weights=False))
    combined.save_pretrained(tmp_path / "delta")
    ids = torch.randint(0, 64, (1, 10))
    memory = combined.new_memory(1)
    with torch.no_grad():
        expected = combined(input_ids=ids, memory=memory).logits
    base = PeftModel.from_pretrained(tiny_model("llama", vocab_size=64), tmp_path / "lora").merge_and_unload()
    reloaded = PeftModel.from_pretrained(base, tmp_path / "delta")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, memory=reloaded.new_memory(1)).logits, expected)
