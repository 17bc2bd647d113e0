"""Importing adapters saved by the authors' reference code (convert_reference_adapter, the CLI, segment_read).

Reference-format checkpoints are built here from the documented format (shared/notes/method.md, "The
released checkpoint format") with random weights; the converted adapter's logits are checked against
a float64 computation of method.md that reads the reference tensors directly (tests/method_reference.py).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import DynamicCache

import peft_deltamem
from conftest import populate_hub_cache, random_ids
from method_reference import memory_read, memory_write
from peft_deltamem import DeltaMemConfig, convert_reference_adapter
from peft_deltamem.cli import main
from peft_deltamem.convert import REFERENCE_CONFIG, REFERENCE_WEIGHTS
from peft_deltamem.tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

HEADS = ("q", "k", "v", "o")
NUM_LAYERS = 2
BASE_ID = "tiny-org/tiny-qwen3"
REFERENCE_HUB_ID = "tiny-org/delta-mem_tiny-reference"

# The fields of the released adapter's config that matter, plus training settings the conversion ignores.
RELEASE_CONFIG = {
    "rank": 8,
    "alpha": 16.0,
    "beta_bias_init": -1.5,
    "normalize_qk": True,
    "couple_lambda": True,
    "state_update_mode": "standard",
    "rankwise_gates": True,
    "output_init": "frozen_columns",
    "num_state_heads": 1,
    "memory_write_granularity": "token",
    "delta_heads": ["q", "o"],
    "target_modules": ["q_proj", "o_proj"],
    "target_layers": None,
    "delta_o_rmsnorm": False,
    "trainable_delta_scale": False,
    "learning_rate": 2e-4,
    "write_length": 8192,
}


def base_model():
    base = tiny_model("qwen3", num_layers=NUM_LAYERS)
    base.config._name_or_path = BASE_ID
    return base


def out_features(base) -> dict[str, int]:
    attention = base.model.layers[0].self_attn
    return {h: getattr(attention, f"{h}_proj").out_features for h in HEADS}


def reference_checkpoint(config: dict, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random weights in the reference layout: every Δ head present, the inactive ones zero."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype)

    base = tiny_model("qwen3", num_layers=NUM_LAYERS)
    d, outs = base.config.hidden_size, out_features(base)
    width = config["rank"] * config["num_state_heads"]
    gate_rows = width if config["rankwise_gates"] else config["num_state_heads"]
    tensors = {}
    for layer in config["target_layers"] or range(NUM_LAYERS):
        prefix = f"model.layers.{layer}.self_attn."
        for name in ("memory_q_proj", "memory_k_proj", "memory_v_proj"):
            tensors[prefix + name] = randn(width, d, scale=0.3)
        tensors[prefix + "beta_proj"] = randn(gate_rows, d, scale=0.2)
        tensors[prefix + "beta_bias"] = randn(gate_rows, scale=0.5) - 1.0
        for head in HEADS:
            active = head in config["delta_heads"]
            tensors[prefix + f"delta_{head}_proj"] = randn(outs[head], width, scale=0.3 if active else 0.0)
        if config["trainable_delta_scale"]:
            tensors[prefix + "delta_scale"] = torch.tensor(0.5 + torch.rand((), generator=generator).item()).to(dtype)
    return tensors


def write_reference(directory: Path, config: dict, tensors: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / REFERENCE_CONFIG).write_text(json.dumps(config))
    torch.save(tensors, directory / REFERENCE_WEIGHTS)
    return directory


class ReferenceMath:
    """The tiny base in float64 with method.md's corrections computed from the reference tensors themselves.

    Hooks on each adapted attention block read its input hidden states, run the memory token by token
    (or segment by segment, every token reading the state from before the call, as the reference code
    does) and add ``alpha/rank · Δ_h read`` to the projection outputs. The state persists across calls.
    """

    def __init__(self, base, config: dict, tensors: dict) -> None:
        self.model = copy.deepcopy(base).double()
        self.config = config
        self.tensors = {k: v.double() for k, v in tensors.items()}
        self.layers = sorted({int(k.split(".")[2]) for k in tensors})
        self.states: dict[int, torch.Tensor] = {}
        self.reads: dict[int, torch.Tensor] = {}
        self.segment_ids: torch.Tensor | None = None
        for i in self.layers:
            attention = self.model.model.layers[i].self_attn
            attention.register_forward_pre_hook(functools.partial(self._memory, i), with_kwargs=True)
            for head in config["delta_heads"]:
                getattr(attention, f"{head}_proj").register_forward_hook(functools.partial(self._correct, i, head))

    def __call__(self, ids: torch.Tensor, segment_ids: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        self.segment_ids = segment_ids
        with torch.no_grad():
            return self.model(ids, **kwargs).logits

    def _param(self, layer: int, name: str) -> torch.Tensor:
        return self.tensors[f"model.layers.{layer}.self_attn.{name}"]

    def _memory(self, layer: int, module, args, kwargs):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        r, n_heads = self.config["rank"], self.config["num_state_heads"]
        w_q, w_k, w_v = (self._param(layer, f"memory_{p}_proj") for p in "qkv")
        w_b, b_b = self._param(layer, "beta_proj"), self._param(layer, "beta_bias")
        gate_rows = r if self.config["rankwise_gates"] else 1
        batch, length, _ = x.shape
        states = self.states.get(layer, torch.zeros(batch, n_heads, r, r, dtype=torch.float64)).clone()
        reads = torch.zeros(batch, length, r * n_heads, dtype=torch.float64)
        for b in range(batch):
            for h in range(n_heads):
                rows, gate = slice(h * r, (h + 1) * r), slice(h * gate_rows, (h + 1) * gate_rows)
                if self.config["memory_write_granularity"] == "token":
                    for t in range(length):
                        reads[b, t, rows] = memory_read(states[b, h], w_q[rows], x[b, t])
                        states[b, h] = memory_write(states[b, h], w_k[rows], w_v[rows], w_b[gate], b_b[gate], x[b, t])
                else:
                    for t in range(length):  # every token reads the state from before the call
                        reads[b, t, rows] = memory_read(states[b, h], w_q[rows], x[b, t])
                    for segment in torch.unique_consecutive(self.segment_ids[b]):
                        pooled = x[b, self.segment_ids[b] == segment].mean(dim=0)
                        states[b, h] = memory_write(states[b, h], w_k[rows], w_v[rows], w_b[gate], b_b[gate], pooled)
        self.states[layer], self.reads[layer] = states, reads

    def _correct(self, layer: int, head: str, module, inputs, output):
        delta = self._param(layer, f"delta_{head}_proj")
        if self.config["trainable_delta_scale"]:
            delta = delta * self._param(layer, "delta_scale")
        scale = self.config["alpha"] / self.config["rank"]
        return output + scale * self.reads[layer] @ delta.T


# ----------------------------------------------------------------------------------- agreement with method.md

CASES = {
    "release_q_o": {},
    "authors_default_empty_target_layers": {"target_layers": []},  # their code reads [] as every layer
    "msw4_qkvo": {"num_state_heads": 4, "delta_heads": ["q", "k", "v", "o"]},
    "msw4_per_head_gates": {"num_state_heads": 4, "rankwise_gates": False},
    "delta_scale_layer1_only": {
        "trainable_delta_scale": True,
        "delta_heads": ["q", "k", "v", "o"],
        "target_layers": [1],
    },
    "bf16_weights": {"_dtype": torch.bfloat16},
    "ssw_msw4": {"memory_write_granularity": "segment", "num_state_heads": 4},
}
CALLS = [random_ids(2, 9, seed=1), random_ids(2, 6, seed=2)]
SEGMENTS = [
    torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1, 2, 2, 3]]),
    torch.tensor([[0] * 6, [0, 0, 1, 1, 2, 2]]),
]


@pytest.mark.parametrize("case", list(CASES))
def test_converted_adapter_matches_method_md_in_float64(case, tmp_path):
    changes = dict(CASES[case])
    dtype = changes.pop("_dtype", torch.float32)
    config = {**RELEASE_CONFIG, **changes}
    tensors = reference_checkpoint(config, dtype=dtype)
    reference = write_reference(tmp_path / "reference", config, tensors)

    output = convert_reference_adapter(reference, tmp_path / "adapter", base_model_name_or_path=BASE_ID)
    model = PeftModel.from_pretrained(base_model(), output).eval()
    oracle = ReferenceMath(base_model(), config, tensors)
    plain = base_model()

    segment = config["memory_write_granularity"] == "segment"
    worst, change = 0.0, 0.0
    memory = model.new_memory(batch_size=CALLS[0].shape[0])
    for ids, segment_ids in zip(CALLS, SEGMENTS):  # the second call reads what the first wrote
        kwargs = {"memory_segment_ids": segment_ids} if segment else {}
        with torch.no_grad():
            got = model(ids, memory=memory, **kwargs).logits.double()
            base_logits = plain(ids).logits.double()
        expected = oracle(ids, segment_ids if segment else None)
        worst = max(worst, (got - expected).abs().max().item())
        change = max(change, (expected - base_logits).abs().max().item())
    print(f"{case}: max |logit difference| converted vs float64 method.md = {worst:.2e} (adapter effect {change:.2f})")
    assert change > 0.05, "the random adapter must visibly change the logits, or this comparison proves nothing"
    assert worst < 2e-5


def test_converted_directory_is_a_normal_adapter(tmp_path):
    config = {**RELEASE_CONFIG, "num_state_heads": 4, "rankwise_gates": False, "trainable_delta_scale": True}
    reference = write_reference(tmp_path / "reference", config, reference_checkpoint(config))
    output = convert_reference_adapter(reference, tmp_path / "adapter")
    assert sorted(p.name for p in output.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    saved = json.loads((output / "adapter_config.json").read_text())
    assert saved["peft_type"] == "DELTA_MEM" and saved["task_type"] == "CAUSAL_LM"
    assert (saved["r"], saved["alpha"], saved["num_state_heads"], saved["delta_heads"]) == (8, 16.0, 4, ["q", "o"])
    assert saved["layers_to_transform"] == [0, 1] and saved["segment_read"] == "before_segment"
    assert saved["base_model_name_or_path"] is None
    weights = load_file(output / "adapter_model.safetensors")
    assert weights["base_model.model.model.layers.0.self_attn.delta_mem_write.weight"].shape == (4 * 32, 64)
    assert weights["base_model.model.model.layers.0.self_attn.delta_mem_out.weight"].shape == (64 + 64, 32)
    card = (output / "README.md").read_text()
    assert str(reference) in card and REFERENCE_WEIGHTS in card and "sha256" in card
    assert "rankwise_gates=false" in card and "delta_scale" in card and "`learning_rate`" in card
    assert "import peft_deltamem" in card  # the loading note every δ-mem adapter card carries


def test_segment_config_sets_before_call_reads(tmp_path):
    config = {**RELEASE_CONFIG, "memory_write_granularity": "segment"}
    reference = write_reference(tmp_path / "reference", config, reference_checkpoint(config))
    saved = json.loads((convert_reference_adapter(reference, tmp_path / "adapter") / "adapter_config.json").read_text())
    assert (saved["write_granularity"], saved["segment_read"]) == ("segment", "before_call")


def test_hub_id_from_the_offline_cache(tmp_path, offline_hub_cache):
    config = {**RELEASE_CONFIG, "base_model_name_or_path": BASE_ID}
    reference = write_reference(tmp_path / "reference", config, reference_checkpoint(config))
    populate_hub_cache(offline_hub_cache, reference, REFERENCE_HUB_ID)
    output = convert_reference_adapter(REFERENCE_HUB_ID, tmp_path / "adapter")
    saved = json.loads((output / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == BASE_ID  # taken from the reference config
    assert REFERENCE_HUB_ID in (output / "README.md").read_text()
    local = convert_reference_adapter(reference, tmp_path / "local")
    assert (
        load_file(output / "adapter_model.safetensors").keys() == load_file(local / "adapter_model.safetensors").keys()
    )
    for key, value in load_file(output / "adapter_model.safetensors").items():
        assert torch.equal(value, load_file(local / "adapter_model.safetensors")[key])


def test_unknown_hub_id_offline_is_refused_by_name(tmp_path, offline_hub_cache):
    with pytest.raises(FileNotFoundError, match=r"tiny-org/not-cached.*not a local directory"):
        convert_reference_adapter("tiny-org/not-cached", tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


# ------------------------------------------------------------------------------------------------- refusals


def _edit(config=None, drop=(), add=None, reshape=None):
    """A mutation of (config dict, tensors dict)."""

    def apply(cfg: dict, tensors: dict) -> None:
        cfg.update(config or {})
        for key in drop:
            del tensors[key]
        tensors.update(add or {})
        for key, shape in (reshape or {}).items():
            tensors[key] = torch.randn(shape)

    return apply


def _del_field(name):
    return lambda cfg, tensors: cfg.pop(name)


L0 = "model.layers.0.self_attn."
L1 = "model.layers.1.self_attn."
REFUSALS = {
    # inexpressible configs
    "separate_lambda_gate": (_edit({"couple_lambda": False}), r"couple_lambda=False.*λ = 1 − β"),
    "update_mode": (_edit({"state_update_mode": "residual"}), r"state_update_mode='residual'.*standard"),
    "delta_o_rmsnorm": (_edit({"delta_o_rmsnorm": True}), r"delta_o_rmsnorm=True.*RMSNorm"),
    "no_qk_normalisation": (_edit({"normalize_qk": False}), r"normalize_qk=False"),
    "sentence_writes": (_edit({"memory_write_granularity": "sentence"}), r"memory_write_granularity='sentence'"),
    "unknown_granularity": (_edit({"memory_write_granularity": "chunk"}), r"memory_write_granularity='chunk'"),
    "unknown_delta_head": (_edit({"delta_heads": ["q", "gate"]}), r"delta_heads=\['q', 'gate'\]"),
    "missing_field": (_del_field("rankwise_gates"), r"no field 'rankwise_gates'"),
    "bad_rank": (_edit({"rank": 0}), r"rank=0"),
    # tensors that do not belong
    "unknown_key": (_edit(add={L0 + "memory_gate": torch.zeros(8)}), rf"{L0}memory_gate"),
    "lambda_proj_present": (_edit(add={L0 + "lambda_proj": torch.zeros(8, 64)}), rf"{L0}lambda_proj.*λ"),
    "other_prefix": (_edit(add={"lm_head.weight": torch.zeros(2, 2)}), r"'lm_head\.weight'"),
    "scale_without_flag": (_edit(add={L1 + "delta_scale": torch.tensor(1.0)}), rf"{L1}delta_scale"),
    "missing_key": (_edit(drop=[L1 + "memory_v_proj"]), rf"no tensor {L1}memory_v_proj"),
    "missing_active_head": (_edit(drop=[L0 + "delta_o_proj"]), rf"no tensor {L0}delta_o_proj"),
    "missing_scale": (_edit({"trainable_delta_scale": True}), rf"no tensor {L0}delta_scale"),
    "wrong_rank_shape": (_edit(reshape={L1 + "memory_k_proj": (4, 64)}), rf"{L1}memory_k_proj has shape \(4, 64\)"),
    "wrong_hidden_shape": (_edit(reshape={L0 + "beta_proj": (8, 32)}), rf"{L0}beta_proj has shape \(8, 32\)"),
    "delta_o_not_hidden": (_edit(reshape={L0 + "delta_o_proj": (32, 8)}), rf"{L0}delta_o_proj has shape \(32, 8\)"),
    "per_head_gate_shape": (_edit({"rankwise_gates": False}), rf"{L0}beta_proj has shape \(8, 64\).*\(1, 64\)"),
    "nonzero_inactive_head": (_edit(reshape={L1 + "delta_k_proj": (32, 8)}), rf"{L1}delta_k_proj is non-zero"),
    "target_layers_mismatch": (_edit({"target_layers": [0, 1, 2]}), r"target_layers=\[0, 1, 2\].*layer\(s\) \[2\]"),
    "integer_tensor": (_edit(add={L0 + "beta_bias": torch.zeros(8, dtype=torch.long)}), rf"{L0}beta_bias.*int64"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusal_names_the_offending_field_or_key(case, tmp_path):
    mutate, match = REFUSALS[case]
    config = dict(RELEASE_CONFIG)
    tensors = reference_checkpoint(config)
    mutate(config, tensors)
    reference = write_reference(tmp_path / "reference", config, tensors)
    with pytest.raises(ValueError, match=match):
        convert_reference_adapter(reference, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()  # nothing is written when the conversion is refused


def test_pickled_objects_are_never_unpickled(tmp_path):
    reference = write_reference(tmp_path / "reference", RELEASE_CONFIG, {})
    torch.save({"model.layers.0.self_attn.memory_q_proj": Path("not a tensor")}, reference / REFERENCE_WEIGHTS)
    with pytest.raises(ValueError, match=r"weights_only=True"):
        convert_reference_adapter(reference, tmp_path / "adapter")


def test_missing_reference_files_are_named(tmp_path):
    (tmp_path / "reference").mkdir()
    (tmp_path / "reference" / REFERENCE_CONFIG).write_text(json.dumps(RELEASE_CONFIG))
    with pytest.raises(FileNotFoundError, match=REFERENCE_WEIGHTS):
        convert_reference_adapter(tmp_path / "reference", tmp_path / "adapter")


def test_existing_output_is_not_overwritten_without_the_flag(tmp_path):
    reference = write_reference(tmp_path / "reference", RELEASE_CONFIG, reference_checkpoint(RELEASE_CONFIG))
    output = tmp_path / "adapter"
    output.mkdir()
    (output / "adapter_config.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"overwrite=True"):
        convert_reference_adapter(reference, output)
    assert (output / "adapter_config.json").read_text() == "{}"
    convert_reference_adapter(reference, output, overwrite=True)
    assert json.loads((output / "adapter_config.json").read_text())["peft_type"] == "DELTA_MEM"
    assert not [p for p in output.iterdir() if p.name.startswith(".")]  # no staging directory left behind


# ------------------------------------------------------------------------------------------------------ CLI


def test_cli_import_reference(tmp_path, capsys):
    reference = write_reference(tmp_path / "reference", RELEASE_CONFIG, reference_checkpoint(RELEASE_CONFIG))
    output = tmp_path / "adapter"
    assert main(["import-reference", str(reference), str(output), "--base-model", BASE_ID]) == 0
    assert json.loads((output / "adapter_config.json").read_text())["base_model_name_or_path"] == BASE_ID
    assert str(output) in capsys.readouterr().out
    assert main(["import-reference", str(reference), str(output)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["import-reference", str(reference), str(output), "--overwrite"]) == 0
    PeftModel.from_pretrained(base_model(), output)  # loads


def test_cli_reports_a_refusal_without_a_traceback(tmp_path, capsys):
    config = {**RELEASE_CONFIG, "couple_lambda": False}
    reference = write_reference(tmp_path / "reference", config, reference_checkpoint(config))
    assert main(["import-reference", str(reference), str(tmp_path / "adapter")]) == 1
    err = capsys.readouterr().err
    assert "couple_lambda" in err and "Traceback" not in err


def test_cli_help_in_a_subprocess():
    source = Path(peft_deltamem.__file__).resolve().parents[1]  # the package under test, not another install
    result = subprocess.run(
        [sys.executable, "-m", "peft_deltamem.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(source), os.environ.get("PYTHONPATH", "")])},
    )
    assert result.returncode == 0, result.stderr
    assert "import-reference" in result.stdout


def test_cli_subcommand_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["import-reference", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "REFERENCE_DIR" in out and "--base-model" in out and "--overwrite" in out


# ------------------------------------------------------------------------------------- segment_read (SSW)


def _segment_runs(segment_read: str, split: bool) -> tuple[torch.Tensor, dict]:
    """Logits and final memory of one 3-message history, written in one call or in one call per message.

    The calls share a KV cache, so attention sees the same tokens either way; only the memory reads differ.
    """
    model = get_peft_model(
        tiny_model("qwen3", num_layers=NUM_LAYERS),
        DeltaMemConfig(write_granularity="segment", segment_read=segment_read, init_weights=False),
    ).eval()
    with torch.no_grad():  # large Δ heads, so that what a token reads visibly changes the logits
        for name, param in model.named_parameters():
            if "delta_mem_out" in name:
                param.mul_(20)
    ids = random_ids(1, 12, seed=3)
    segments = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2]])
    bounds = [(0, 4), (4, 7), (7, 12)] if split else [(0, 12)]
    cache, pieces, memory = DynamicCache(config=model.config), [], model.new_memory(batch_size=1)
    with torch.no_grad():
        for start, end in bounds:
            out = model(
                ids[:, start:end],
                memory=memory,
                attention_mask=torch.ones(1, end, dtype=torch.long),
                memory_segment_ids=segments[:, start:end],
                past_key_values=cache,
                use_cache=True,
            )
            pieces.append(out.logits)
    return torch.cat(pieces, dim=1), memory.states


def test_default_segment_reads_do_not_depend_on_how_the_history_is_split_into_calls():
    whole, whole_state = _segment_runs("before_segment", split=False)
    split, split_state = _segment_runs("before_segment", split=True)
    torch.testing.assert_close(split, whole, atol=1e-5, rtol=0)
    for name, state in split_state.items():
        torch.testing.assert_close(state, whole_state[name], atol=1e-5, rtol=0)


def test_before_call_reads_depend_on_the_split_as_in_the_reference():
    whole, _ = _segment_runs("before_call", split=False)
    split, _ = _segment_runs("before_call", split=True)
    default, _ = _segment_runs("before_segment", split=False)
    # one call per message: each message reads the state before it, which is what the default always does
    torch.testing.assert_close(split, default, atol=1e-5, rtol=0)
    # one call for the whole history: the first message's tokens read the same (empty) state either way,
    # the later ones read the empty state instead of the writes of the messages before them
    torch.testing.assert_close(whole[:, :4], default[:, :4], atol=1e-5, rtol=0)
    assert (whole[:, 4:] - default[:, 4:]).abs().max() > 1e-2


def test_an_adapter_saved_by_the_authors_own_code_reproduces_their_logits(tmp_path):
    """tests/fixtures/authors_default was written by the authors' code (declare-lab/delta-Mem; see its SOURCE.md and
    make_authors_adapter.py) with their default config, every field as they write it (target_layers [], all four
    Δ heads, partition and reader fields at their defaults), and their logits for two calls that carry the memory.
    The converted adapter gives the same logits within float32 rounding."""
    import transformers

    fixture = Path(__file__).resolve().parent / "fixtures" / "authors_default"
    output = convert_reference_adapter(fixture, tmp_path / "adapter")
    config = json.loads((fixture / "base_config.json").read_text())
    base = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**config)).eval()
    base.load_state_dict(load_file(fixture / "base_model.safetensors"))
    reference = load_file(fixture / "reference_logits.safetensors")
    with torch.no_grad():
        plain = [base(input_ids=reference[f"ids_{i}"]).logits for i in range(2)]
    model = PeftModel.from_pretrained(base, output).eval()
    memory = model.new_memory(batch_size=2)
    for i in range(2):  # the second call reads what the first wrote
        with torch.no_grad():
            got = model(input_ids=reference[f"ids_{i}"], memory=memory).logits
        assert (reference[f"logits_{i}"] - plain[i]).abs().max() > 0.1  # their adapter visibly acts
        assert (got - reference[f"logits_{i}"]).abs().max() < 1e-5
