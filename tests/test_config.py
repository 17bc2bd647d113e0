"""DeltaMemConfig: validation at construction, the paper's defaults, and (de)serialisation."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from peft import PeftConfig

from peft_deltamem import DeltaMemConfig, DeltaMemPeftType

STANDARD_PROJECTIONS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}


# ------------------------------------------------------------------------------------------- validation

INVALID = [
    # (field, kwargs)
    ("r", {"r": 0}),
    ("r", {"r": -8}),
    ("r", {"r": 8.0}),
    ("r", {"r": 2.5}),
    ("r", {"r": "8"}),
    ("r", {"r": True}),
    ("r", {"r": None}),
    ("alpha", {"alpha": 0}),
    ("alpha", {"alpha": -16.0}),
    ("alpha", {"alpha": math.nan}),
    ("delta_heads", {"delta_heads": ("q", "x")}),
    ("delta_heads", {"delta_heads": ["query"]}),
    ("delta_heads", {"delta_heads": ("q", "q")}),
    ("delta_heads", {"delta_heads": ["o", "q", "o"]}),
    ("delta_heads", {"delta_heads": ()}),
    ("delta_heads", {"delta_heads": []}),
    ("delta_heads", {"delta_heads": ""}),
    ("num_state_heads", {"num_state_heads": 0}),
    ("num_state_heads", {"num_state_heads": -1}),
    ("num_state_heads", {"num_state_heads": 1.5}),
    ("num_state_heads", {"num_state_heads": "2"}),
    ("num_state_heads", {"num_state_heads": True}),
    ("write_granularity", {"write_granularity": "sentence"}),
    ("write_granularity", {"write_granularity": "Token"}),
    ("write_granularity", {"write_granularity": None}),
    ("segment_read", {"segment_read": "call"}),
    ("segment_read", {"segment_read": "before_call"}),  # only meaningful with segment writes
    ("target_parameters", {"target_parameters": ["model.layers.0.self_attn.q_proj.weight"]}),
    ("projection_names", {"projection_names": {"q": "q_proj", "k": "k_proj", "v": "v_proj"}}),  # no 'o'
    ("projection_names", {"projection_names": {"q": "q_proj", "o": "o_proj"}}),  # neither q,k,v nor qkv
    ("projection_names", {"projection_names": {"qkv": "c_attn"}}),  # no 'o'
    ("projection_names", {"projection_names": {**STANDARD_PROJECTIONS, "gate": "gate_proj"}}),  # unknown slot
    ("layers_pattern", {"layers_pattern": "layers"}),  # without layers_to_transform
    ("layers_pattern", {"layers_pattern": ["layers"]}),
    ("write_sparsity_weight", {"write_sparsity_weight": -0.1}),
    ("write_sparsity_target", {"write_sparsity_target": -0.1}),
]


def _ids(cases):
    return [f"{name}={value!r}" for name, kwargs in cases for value in kwargs.values()]


@pytest.mark.parametrize(("field_name", "kwargs"), INVALID, ids=_ids(INVALID))
def test_invalid_value_raises_value_error_naming_the_field(field_name, kwargs):
    with pytest.raises(ValueError, match=rf"\b{field_name}\b"):
        DeltaMemConfig(**kwargs)


# Values the validation should also refuse with a ValueError (not a TypeError from a comparison, not silently).
INVALID_EXTRA = [
    ("alpha", {"alpha": "16"}),
    ("alpha", {"alpha": None}),
    ("alpha", {"alpha": math.inf}),
    ("beta_bias_init", {"beta_bias_init": math.nan}),
    ("delta_heads", {"delta_heads": None}),
    # strings where booleans are expected would read as True
    ("write_generated_tokens", {"write_generated_tokens": "False"}),
    ("init_weights", {"init_weights": "no"}),
    ("init_weights", {"init_weights": 0}),
    # wrong container types
    ("layers_to_transform", {"layers_to_transform": "0"}),
    ("layers_to_transform", {"layers_to_transform": [0, 1.0]}),
    ("layers_to_transform", {"layers_to_transform": -1}),
    ("target_modules", {"target_modules": 5}),
    ("target_modules", {"target_modules": ["self_attn", 3]}),
    ("exclude_modules", {"exclude_modules": 1}),
]


@pytest.mark.parametrize(("field_name", "kwargs"), INVALID_EXTRA, ids=_ids(INVALID_EXTRA))
def test_non_numeric_or_non_finite_values_raise_value_error(field_name, kwargs):
    with pytest.raises(ValueError, match=rf"\b{field_name}\b"):
        DeltaMemConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"r": 1},
        {"alpha": 0.5},
        {"delta_heads": ("q", "k", "v", "o")},
        {"delta_heads": "v"},
        {"num_state_heads": 4},
        {"write_granularity": "segment"},
        {"write_granularity": "segment", "segment_read": "before_call"},
        {"projection_names": STANDARD_PROJECTIONS},
        {"projection_names": {"qkv": "qkv_proj", "o": "o_proj"}},
        {"layers_to_transform": [0], "layers_pattern": "layers"},
        {"layers_to_transform": 1},
        {"target_parameters": None},
    ],
)
def test_valid_values_are_accepted(kwargs):
    DeltaMemConfig(**kwargs)


def test_invalid_value_in_a_modified_field_is_reported_by_name_and_value():
    with pytest.raises(ValueError, match=r"DeltaMemConfig\.r=0 is invalid"):
        DeltaMemConfig(r=0)
    with pytest.raises(ValueError, match=r"DeltaMemConfig\.write_granularity='sentence'.*token.*segment"):
        DeltaMemConfig(write_granularity="sentence")


# --------------------------------------------------------------------------------------------- defaults


def test_defaults_are_the_papers():
    config = DeltaMemConfig()
    assert config.r == 8
    assert config.alpha == 16
    assert config.delta_heads == ("q", "o")
    assert config.num_state_heads == 1
    assert config.write_granularity == "token"
    assert config.segment_read == "before_segment"
    assert config.beta_bias_init == -1.5
    assert config.init_weights is True
    assert config.scaling == 2.0
    assert config.memory_width == 8
    assert config.target_parameters is None
    assert config.target_modules is None
    assert config.peft_type is DeltaMemPeftType.DELTA_MEM
    assert config.peft_type == "DELTA_MEM"
    assert config.peft_type.value == "DELTA_MEM"


def test_delta_heads_are_normalised_to_q_k_v_o_order_and_a_tuple():
    assert DeltaMemConfig(delta_heads=["o", "v", "q"]).delta_heads == ("q", "v", "o")
    assert DeltaMemConfig(delta_heads="k").delta_heads == ("k",)
    assert DeltaMemConfig(delta_heads=["k", "o"], r=4, num_state_heads=3).memory_width == 12


def test_fingerprint_changes_with_the_fields_that_shape_the_memory():
    base = DeltaMemConfig()
    assert base.fingerprint() == DeltaMemConfig().fingerprint()
    for other in (
        DeltaMemConfig(r=4),
        DeltaMemConfig(num_state_heads=2),
        DeltaMemConfig(write_granularity="segment"),
        DeltaMemConfig(delta_heads=("q", "k", "o")),
        DeltaMemConfig(layers_to_transform=[0]),
    ):
        assert other.fingerprint() != base.fingerprint()


# ---------------------------------------------------------------------------------------- serialisation


def _custom_config() -> DeltaMemConfig:
    return DeltaMemConfig(
        r=4,
        alpha=8.0,
        delta_heads=("k", "v", "o"),
        num_state_heads=2,
        write_granularity="segment",
        segment_read="before_call",
        beta_bias_init=-2.0,
        target_modules=["self_attn"],
        layers_to_transform=[0],
        layers_pattern="layers",
        projection_names=dict(STANDARD_PROJECTIONS),
        init_weights=False,
        write_generated_tokens=False,
        write_sparsity_weight=0.5,
        write_sparsity_target=0.1,
    )


@pytest.mark.parametrize("make", [DeltaMemConfig, _custom_config], ids=["default", "custom"])
def test_to_dict_from_peft_type_round_trip(make):
    config = make()
    data = config.to_dict()
    assert data["delta_heads"] == config.delta_heads
    restored = PeftConfig.from_peft_type(**data)
    assert type(restored) is DeltaMemConfig
    assert restored.to_dict() == data
    assert restored.fingerprint() == config.fingerprint()


@pytest.mark.parametrize("make", [DeltaMemConfig, _custom_config], ids=["default", "custom"])
def test_json_round_trip(make):
    config = make()
    text = json.dumps(config.to_dict())  # the str-Enum peft_type and the tuple become JSON values
    data = json.loads(text)
    assert data["peft_type"] == "DELTA_MEM"
    assert isinstance(data["delta_heads"], list)
    restored = DeltaMemConfig.from_peft_type(**data)
    assert type(restored) is DeltaMemConfig
    assert restored.to_dict() == config.to_dict()


@pytest.mark.parametrize("make", [DeltaMemConfig, _custom_config], ids=["default", "custom"])
def test_save_pretrained_from_pretrained_round_trip(tmp_path, make):
    config = make()
    config.save_pretrained(tmp_path)
    on_disk = json.loads((tmp_path / "adapter_config.json").read_text())
    assert on_disk["peft_type"] == "DELTA_MEM"
    assert on_disk["delta_heads"] == list(config.delta_heads)
    assert on_disk["r"] == config.r
    assert on_disk["write_granularity"] == config.write_granularity
    for loader in (DeltaMemConfig, PeftConfig):
        restored = loader.from_pretrained(str(tmp_path))
        assert type(restored) is DeltaMemConfig
        assert restored.delta_heads == config.delta_heads
        assert isinstance(restored.delta_heads, tuple)
        assert restored.peft_type is DeltaMemPeftType.DELTA_MEM
        assert restored.to_dict() == config.to_dict()


def test_from_pretrained_validates(tmp_path):
    DeltaMemConfig().save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    for bad, field_name in (({"r": 0}, "r"), ({"delta_heads": ["q", "z"]}, "delta_heads"), ({"alpha": -1}, "alpha")):
        path.write_text(json.dumps({**data, **bad}))
        with pytest.raises(ValueError, match=rf"\b{field_name}\b"):
            PeftConfig.from_pretrained(str(tmp_path))


def test_misspelt_key_in_a_saved_config_is_an_error_not_a_silent_default(tmp_path):
    DeltaMemConfig().save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    data["write_granularty"] = data.pop("write_granularity")
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"'write_granularty' \(did you mean 'write_granularity'\?\)"):
        DeltaMemConfig.from_pretrained(str(tmp_path))  # what PeftModel.from_pretrained calls for a δ-mem adapter


def test_every_field_has_help_metadata():
    inherited = {f.name for f in dataclasses.fields(PeftConfig)}
    own = [f for f in dataclasses.fields(DeltaMemConfig) if f.name not in inherited]
    paper = {"r", "alpha", "delta_heads", "num_state_heads", "write_granularity", "beta_bias_init"}
    assert paper <= {f.name for f in own}
    missing = [f.name for f in own if not f.metadata.get("help")]
    assert not missing, f"fields without help text: {missing}"
