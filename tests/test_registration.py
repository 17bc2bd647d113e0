"""``import peft_deltamem`` registers the DELTA_MEM type with peft (idempotent, reload-safe, clash-checked)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import peft
import pytest
import torch
from peft import LoraConfig, LoraModel, PeftConfig, PeftModel, get_peft_model, mapping
from peft.utils import get_peft_model_state_dict

import peft_deltamem
from conftest import make_peft, random_ids
from peft_deltamem import DeltaMemConfig, DeltaMemModel, DeltaMemPeftType, registration
from peft_deltamem.tiny_models import tiny_model

DELTA_MEM = DeltaMemPeftType.DELTA_MEM
TABLES = ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING")


def _snapshot() -> dict[str, dict]:
    return {name: dict(getattr(mapping, name)) for name in TABLES}


def test_import_registers_the_type_in_every_mapping():
    assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING[DELTA_MEM] is DeltaMemConfig
    assert mapping.PEFT_TYPE_TO_TUNER_MAPPING[DELTA_MEM] is DeltaMemModel
    assert mapping.PEFT_TYPE_TO_PREFIX_MAPPING[DELTA_MEM] == "delta_mem_"
    # adapter_config.json stores the plain string; the str-Enum key must be found by it
    assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING["DELTA_MEM"] is DeltaMemConfig
    assert mapping.PEFT_TYPE_TO_TUNER_MAPPING["DELTA_MEM"] is DeltaMemModel
    # peft re-exports the same dicts at the top level
    assert peft.PEFT_TYPE_TO_CONFIG_MAPPING is mapping.PEFT_TYPE_TO_CONFIG_MAPPING
    assert peft.PEFT_TYPE_TO_TUNER_MAPPING is mapping.PEFT_TYPE_TO_TUNER_MAPPING
    # no mixed-model class: get_peft_model(mixed=True) must give peft's own error
    assert DELTA_MEM not in peft.PEFT_TYPE_TO_MIXED_MODEL_MAPPING


def test_prefix_matches_the_saved_parameter_names():
    model = make_peft()
    state = get_peft_model_state_dict(model)
    assert state
    assert all("delta_mem_" in key for key in state), sorted(state)
    assert DeltaMemModel.prefix == registration.PREFIX == "delta_mem_"
    # transformers derives the prefix as type name lower-cased + "_"
    assert DELTA_MEM.value.lower() + "_" == "delta_mem_"


def test_peft_type_is_a_str_enum_with_value():
    config = DeltaMemConfig()
    assert isinstance(config.peft_type, str)
    assert config.peft_type.value == "DELTA_MEM"
    model = make_peft()
    status = model.get_model_status()  # reads peft_type.value
    assert status.peft_types == {"default": "DELTA_MEM"}
    assert status.adapter_model_type == "DeltaMemModel"
    assert status.num_adapter_layers == 2
    layer_status = model.get_layer_status()
    assert len(layer_status) == 2 and all(s.module_type == "DeltaMemLayer" for s in layer_status)


def test_register_again_is_a_no_op():
    before = _snapshot()
    peft_deltamem.register()
    peft_deltamem.register()
    after = _snapshot()
    assert after.keys() == before.keys()
    for name in TABLES:
        assert after[name].keys() == before[name].keys(), name
        for key, value in before[name].items():
            assert after[name][key] is value, (name, key)


def test_reload_of_registration_module_then_register(monkeypatch):
    for name in TABLES:  # restore the tables whatever happens
        monkeypatch.setattr(mapping, name, dict(getattr(mapping, name)))
    reloaded = importlib.reload(registration)
    reloaded.register()
    reloaded.register()
    assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING[DELTA_MEM] is DeltaMemConfig
    assert mapping.PEFT_TYPE_TO_TUNER_MAPPING[DELTA_MEM] is DeltaMemModel
    assert mapping.PEFT_TYPE_TO_PREFIX_MAPPING[DELTA_MEM] == "delta_mem_"
    model = get_peft_model(tiny_model("llama"), DeltaMemConfig())
    assert isinstance(model.base_model, DeltaMemModel)


def test_register_accepts_a_class_from_an_earlier_import_of_the_same_module(monkeypatch):
    # what importlib.reload of peft_deltamem.config leaves behind: an older class object with the same name
    stale = type("DeltaMemConfig", (DeltaMemConfig,), {"__module__": DeltaMemConfig.__module__})
    stale.__qualname__ = DeltaMemConfig.__qualname__
    monkeypatch.setitem(mapping.PEFT_TYPE_TO_CONFIG_MAPPING, DELTA_MEM, stale)
    peft_deltamem.register()
    assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING[DELTA_MEM] is DeltaMemConfig


@pytest.mark.parametrize(
    ("table", "other"),
    [("PEFT_TYPE_TO_CONFIG_MAPPING", LoraConfig), ("PEFT_TYPE_TO_TUNER_MAPPING", LoraModel)],
)
def test_type_name_clash_raises_key_error_and_changes_nothing(monkeypatch, table, other):
    monkeypatch.setitem(getattr(mapping, table), DELTA_MEM, other)
    before = _snapshot()
    with pytest.raises(KeyError, match=rf"DELTA_MEM.*{other.__name__}"):
        peft_deltamem.register()
    assert _snapshot() == before


def test_prefix_clash_raises_key_error_and_changes_nothing(monkeypatch):
    monkeypatch.setitem(mapping.PEFT_TYPE_TO_PREFIX_MAPPING, "OTHER_MEM", "delta_mem_")
    before = _snapshot()
    with pytest.raises(KeyError, match=r"delta_mem_.*OTHER_MEM"):
        peft_deltamem.register()
    assert _snapshot() == before


def test_mixed_model_gives_peft_own_error():
    with pytest.raises(ValueError, match=r"DELTA_MEM.*not compatible with the `PeftMixedModel`"):
        get_peft_model(tiny_model("llama"), DeltaMemConfig(), mixed=True)


def test_fresh_process_needs_import_peft_deltamem(tmp_path):
    """Without ``import peft_deltamem`` peft cannot resolve the type: it fails with a bare ``KeyError: 'DELTA_MEM'``.

    peft has no plugin entry points, so loading a δ-mem adapter (``PeftModel.from_pretrained``,
    ``PeftConfig.from_pretrained``) in a process that never imported the package raises
    ``KeyError('DELTA_MEM')`` from ``PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]``. After the import it loads.
    """
    base = tiny_model("llama")
    base.save_pretrained(tmp_path / "base")  # the subprocess must not import peft_deltamem.tiny_models
    model = make_peft(base)
    model.save_pretrained(tmp_path / "adapter")
    ids = random_ids(1, 12)
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        expected = model(ids).logits
    script = textwrap.dedent(
        """
        import sys
        import torch
        import transformers
        from peft import PeftConfig, PeftModel

        adapter, ids_path, out_path, base_dir = sys.argv[1:5]

        def base():
            return transformers.AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager").eval()

        for what, load in (("PeftModel", lambda: PeftModel.from_pretrained(base(), adapter)),
                           ("PeftConfig", lambda: PeftConfig.from_pretrained(adapter))):
            try:
                load()
                print(f"{what}: loaded")
            except Exception as err:
                print(f"{what}: {type(err).__name__}: {err}")
        assert "peft_deltamem" not in sys.modules

        import peft_deltamem  # noqa: F401

        model = PeftModel.from_pretrained(base(), adapter).eval()
        assert type(PeftConfig.from_pretrained(adapter)).__name__ == "DeltaMemConfig"
        with torch.no_grad():
            torch.save(model(torch.load(ids_path)).logits, out_path)
        print("after import: loaded")
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            str(tmp_path / "adapter"),
            str(tmp_path / "ids.pt"),
            str(tmp_path / "out.pt"),
            str(tmp_path / "base"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "PeftModel: KeyError: 'DELTA_MEM'" in lines, result.stdout
    assert "PeftConfig: KeyError: 'DELTA_MEM'" in lines, result.stdout
    assert "after import: loaded" in lines, result.stdout
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)


def test_loading_in_process_uses_the_registered_classes(tmp_path):
    make_peft().save_pretrained(tmp_path)
    assert type(PeftConfig.from_pretrained(str(tmp_path))) is DeltaMemConfig
    loaded = PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path))
    assert type(loaded.base_model) is DeltaMemModel
    assert type(loaded.peft_config["default"]) is DeltaMemConfig


@pytest.mark.parametrize(
    "first",
    [
        "import peft_deltamem; from peft import PeftModel",
        "import peft, peft_deltamem",
        "from peft_deltamem.config import DeltaMemConfig",
        "from peft_deltamem.model import DeltaMemModel",
        "from peft_deltamem.layer import DeltaMemLayer",
        "import peft_deltamem.agents.engine",
        "from peft_deltamem import DeltaMemory",
    ],
)
def test_the_type_is_registered_however_the_package_is_first_imported(first):
    """peft is imported lazily (so that commands start at once), and δ-mem is registered with it whichever import
    comes first, including a submodule that itself imports peft."""
    code = (
        f"{first}\nimport peft\nfrom peft import mapping\n"
        "assert any(getattr(k, 'value', k) == 'DELTA_MEM' for k in mapping.PEFT_TYPE_TO_TUNER_MAPPING)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300)


def test_importing_the_package_and_its_command_line_loads_no_heavy_library():
    code = (
        "import sys, peft_deltamem, peft_deltamem.cli\n"
        "heavy = [m for m in ('torch', 'peft', 'transformers', 'bitsandbytes', 'trl') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "peft_deltamem.cli.build_parser()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300)
