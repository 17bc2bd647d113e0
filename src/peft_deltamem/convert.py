"""Import an adapter saved by the authors' reference code as a normal peft adapter directory.

The reference code saves ``delta_mem_config.json`` (its config dataclass as a dict) and
``delta_mem_adapter.pt`` (a flat ``{name: tensor}`` dict with keys
``model.layers.{i}.self_attn.{param}``). For the kind of adapter the authors released (coupled
λ = 1 − β, the standard update, rank-wise gates, normalised q/k, no Δo RMSNorm) the mapping onto
this package's parameters is exact:

- ``delta_mem_write.weight`` = rows of ``memory_q_proj``, ``memory_k_proj``, ``memory_v_proj``,
  ``beta_proj`` stacked in that order;
- ``delta_mem_beta_bias`` = ``beta_bias``;
- ``delta_mem_out.weight`` = the active ``delta_{q,k,v,o}_proj`` stacked in q, k, v, o order.

Two variants fold exactly: one gate per state head (``rankwise_gates`` false: each head's gate row
is repeated over its r rows) and a trainable Δ scale (multiplied into the Δ heads). Everything else
that changes the computation is refused by name. See docs/api.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import HEADS, DeltaMemConfig

REFERENCE_CONFIG = "delta_mem_config.json"
REFERENCE_WEIGHTS = "delta_mem_adapter.pt"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")

MEMORY_PARAMS = ("memory_q_proj", "memory_k_proj", "memory_v_proj")
GATE_PARAMS = ("beta_proj", "beta_bias")
# The per-layer tensor of a trainable Δ scale (``trainable_delta_scale: true``): one number that multiplies
# every Δ correction of its layer.
DELTA_SCALE_PARAM = "delta_scale"
MATRICES = (*MEMORY_PARAMS, "beta_proj", *(f"delta_{h}_proj" for h in HEADS))
KNOWN_PARAMS = (*MATRICES, "beta_bias", DELTA_SCALE_PARAM)

_KEY = re.compile(r"^model\.layers\.(\d+)\.self_attn\.(\w+?)(\.weight)?$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Reference config fields whose value decides the computation and that this package cannot express
# otherwise: field -> (the only value accepted, why, what to do).
_REQUIRED_VALUES = {
    "couple_lambda": (
        True,
        "a separate retention gate λ (lambda_proj / lambda_bias) has no counterpart here, where λ = 1 − β always",
        "only adapters trained with couple_lambda=true can be imported",
    ),
    "state_update_mode": (
        "standard",
        "only the standard gated delta rule S ← diag(1−β) S + diag(β) (v − S k) kᵀ is implemented here",
        "only adapters trained with state_update_mode='standard' can be imported",
    ),
    "normalize_qk": (
        True,
        "memory queries and keys are always L2-normalised here",
        "only adapters trained with normalize_qk=true can be imported",
    ),
    "delta_o_rmsnorm": (
        False,
        "there is no RMSNorm on the Δo correction here",
        "only adapters trained with delta_o_rmsnorm=false can be imported",
    ),
}
_GRANULARITIES = {"token": "token", "segment": "segment", "sequence": "segment"}
_BASE_MODEL_FIELDS = ("base_model_name_or_path", "model_name_or_path", "base_model")


@dataclass
class _Plan:
    """What the reference config means here, with the notes for the model card."""

    config: DeltaMemConfig
    rankwise_gates: bool
    trainable_delta_scale: bool
    target_layers: list[int] | None
    notes: list[str] = field(default_factory=list)
    ignored_fields: list[str] = field(default_factory=list)


def convert_reference_adapter(
    reference_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert an adapter saved by the authors' reference code into a peft adapter directory.

    ``reference_dir`` is a local directory holding ``delta_mem_config.json`` and
    ``delta_mem_adapter.pt``, or a Hugging Face Hub id (fetched with ``snapshot_download``; the
    local cache is used when offline). ``output_dir`` receives ``adapter_config.json``,
    ``adapter_model.safetensors`` and a model card; load it with
    ``PeftModel.from_pretrained(base, output_dir)`` after ``import peft_deltamem``. An existing
    non-empty ``output_dir`` is refused unless ``overwrite=True`` (which replaces those three files).

    The ``.pt`` file is read with ``torch.load(weights_only=True)`` only. Unknown or missing tensors,
    shapes that do not fit the config, and configs whose computation this package cannot reproduce
    raise ``ValueError`` naming the key or field. Returns the output directory.
    """
    from .runtime import check_bool

    check_bool(overwrite, "overwrite")
    output = Path(output_dir).expanduser()
    _check_output(output, overwrite)
    source_dir, source = _resolve_reference(reference_dir)
    reference_config = _read_reference_config(source_dir / REFERENCE_CONFIG)
    plan = _plan(reference_config, base_model_name_or_path)
    weights_path = source_dir / REFERENCE_WEIGHTS
    tensors = _convert_weights(_read_reference_weights(weights_path), plan)
    card = _model_card(plan, source, weights_path)
    _write(output, plan.config, tensors, card)
    return output


# ------------------------------------------------------------------------------------------ inputs


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"The output {output} exists and is not a directory; choose a directory path.")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(
            f"The output directory {output} already exists and is not empty; nothing was written. Choose another "
            "directory, or pass overwrite=True (CLI: --overwrite) to replace the adapter files in it."
        )


def _resolve_reference(reference_dir: str | os.PathLike) -> tuple[Path, str]:
    """A local directory, or a Hub id resolved through the Hub cache (offline) or a download."""
    path = Path(reference_dir).expanduser()
    if path.is_dir():
        source = str(path.resolve())
    elif path.exists():
        raise FileNotFoundError(
            f"{path} is a file; pass the directory that holds {REFERENCE_CONFIG} and {REFERENCE_WEIGHTS}."
        )
    elif _HUB_ID.match(str(reference_dir)):
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(str(reference_dir), allow_patterns=[REFERENCE_CONFIG, REFERENCE_WEIGHTS]))
        except Exception as error:  # offline cache miss, unknown repository, no network, ...
            raise FileNotFoundError(
                f"{reference_dir!r} is not a local directory, and fetching it as a Hugging Face Hub repository "
                f"failed ({type(error).__name__}: {error}). Pass the local directory holding {REFERENCE_CONFIG} "
                f"and {REFERENCE_WEIGHTS}, or a Hub id that is reachable or already in the local Hub cache."
            ) from error
        source = f"the Hugging Face Hub repository {reference_dir} (snapshot {path.name})"
    else:
        raise FileNotFoundError(
            f"{reference_dir} does not exist; pass the directory holding {REFERENCE_CONFIG} and {REFERENCE_WEIGHTS} "
            "(or a Hub id such as declare-lab/delta-mem_qwen3_4b-instruct)."
        )
    missing = [name for name in (REFERENCE_CONFIG, REFERENCE_WEIGHTS) if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{source} has no {' and no '.join(missing)}; a reference δ-mem adapter directory holds "
            f"{REFERENCE_CONFIG} and {REFERENCE_WEIGHTS} (as saved by the authors' code)."
        )
    return path, source


def _read_reference_config(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a readable JSON file ({error}); re-download the reference adapter.") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not the reference config's object of fields.")
    return data


def _read_reference_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError for anything but plain tensors and containers, or a damaged file
        raise ValueError(
            f"{path} could not be read with torch.load(weights_only=True) ({type(error).__name__}: {error}). Only "
            "files holding plain tensors are imported (arbitrary pickled objects are never unpickled); re-save it "
            "as a flat dict of tensors with torch.save({name: tensor, ...}), or re-download it."
        ) from error
    if not isinstance(state, dict):
        raise ValueError(
            f"{path} holds a {type(state).__name__}, not the flat dict of tensors the reference code saves "
            "({'model.layers.0.self_attn.memory_q_proj': tensor, ...})."
        )
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise ValueError(
                f"{path}: entry {key!r} is a {type(value).__name__}"
                f"{'' if not isinstance(value, torch.Tensor) else ' of dtype ' + str(value.dtype)}, but every entry "
                "of a reference adapter is a floating-point tensor keyed 'model.layers.{i}.self_attn.{param}'."
            )
    return state


# ------------------------------------------------------------------------------------------ config


def _config_error(name: str, value, why: str, fix: str) -> ValueError:
    return ValueError(f"Reference config field {name}={value!r} cannot be imported: {why}; {fix}.")


def _plan(ref: dict, base_model_name_or_path: str | None) -> _Plan:
    def get(name: str):
        if name not in ref:
            raise ValueError(
                f"The reference config ({REFERENCE_CONFIG}) has no field {name!r}, which the conversion needs; "
                "use the config file saved together with the weights by the authors' code."
            )
        return ref[name]

    def positive_int(name: str, what: str) -> int:
        value = get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _config_error(name, value, f"{what} must be a positive integer", "fix the config file")
        return value

    def flag(name: str) -> bool:
        value = get(name)
        if not isinstance(value, bool):
            raise _config_error(name, value, "expected true or false", "fix the config file")
        return value

    rank = positive_int("rank", "the memory rank")
    num_state_heads = positive_int("num_state_heads", "the number of state heads")
    alpha = get("alpha")
    if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise _config_error("alpha", alpha, "the correction scale must be a finite number > 0", "fix the config file")

    for name, (needed, why, fix) in _REQUIRED_VALUES.items():
        value = get(name)
        if value != needed or type(value) is not type(needed):
            raise _config_error(name, value, why, fix)

    granularity = get("memory_write_granularity")
    if granularity == "sentence":
        raise _config_error(
            "memory_write_granularity",
            granularity,
            "sentence-level writes split the text into sentences inside the reference code, which this package "
            "does not reproduce (here segments are marked by the caller with memory_segment_ids)",
            "only token ('token') and segment ('segment') writes can be imported",
        )
    if granularity not in _GRANULARITIES:
        raise _config_error(
            "memory_write_granularity",
            granularity,
            f"unknown write granularity (known: {sorted(_GRANULARITIES)} and 'sentence', which is refused)",
            "only token and segment writes can be imported",
        )
    write_granularity = _GRANULARITIES[granularity]

    delta_heads = _parse_heads(get("delta_heads"))
    rankwise_gates = flag("rankwise_gates")
    trainable_delta_scale = flag("trainable_delta_scale")
    target_layers = get("target_layers")
    if target_layers is not None and (
        not isinstance(target_layers, list)
        or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in target_layers)
    ):
        raise _config_error(
            "target_layers", target_layers, "expected null or [] (every layer) or a list of layer indices",
            "fix the config",
        )  # fmt: skip
    if target_layers == []:  # the reference code's default: `if config.target_layers and ...` adapts every layer
        target_layers = None

    base = base_model_name_or_path
    if base is None:
        base = next((ref[n] for n in _BASE_MODEL_FIELDS if isinstance(ref.get(n), str) and ref[n]), None)
    beta_bias_init = ref.get("beta_bias_init", -1.5)
    if (
        not isinstance(beta_bias_init, numbers.Real)
        or isinstance(beta_bias_init, bool)
        or not math.isfinite(beta_bias_init)
    ):
        beta_bias_init = -1.5  # only the initialisation of new adapters; never used for loaded weights
    segment_read = "before_call" if write_granularity == "segment" else "before_segment"
    config = DeltaMemConfig(
        r=rank,
        alpha=float(alpha),
        delta_heads=delta_heads,
        num_state_heads=num_state_heads,
        write_granularity=write_granularity,
        segment_read=segment_read,
        beta_bias_init=float(beta_bias_init),
        target_modules=["self_attn"],
        base_model_name_or_path=base,
        task_type="CAUSAL_LM",
        inference_mode=True,
    )
    notes = []
    if not rankwise_gates:
        notes.append(
            "one write gate per state head (rankwise_gates=false): each head's gate row and bias were repeated "
            "over its r rows, which computes the same gate for every row"
        )
    if trainable_delta_scale:
        notes.append(f"the trainable Δ scale of each layer ({DELTA_SCALE_PARAM}) was multiplied into its Δ heads")
    if write_granularity == "segment":
        notes.append(
            "segment writes: segment_read='before_call', so every token of a writing call reads the state from "
            "before the whole call, as the reference code does (this package's default reads the state before "
            "each token's own segment); pass memory_segment_ids to every writing call"
        )
    interpreted = {
        "rank",
        "alpha",
        "num_state_heads",
        "delta_heads",
        "memory_write_granularity",
        "rankwise_gates",
        "trainable_delta_scale",
        "target_layers",
        "beta_bias_init",
        *_REQUIRED_VALUES,
        *_BASE_MODEL_FIELDS,
    }
    ignored = sorted(k for k in ref if k not in interpreted)
    return _Plan(config, rankwise_gates, trainable_delta_scale, target_layers, notes, ignored)


def _parse_heads(value) -> tuple[str, ...]:
    items = re.split(r"[\s,]+", value.strip()) if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise _config_error("delta_heads", value, "expected a list of heads such as ['q', 'o']", "fix the config")
    heads = []
    for item in items:
        name = re.sub(r"^delta_|_proj$", "", item.strip().lower()) if isinstance(item, str) else item
        if name not in HEADS or name in heads:
            raise _config_error(
                "delta_heads",
                value,
                f"each head must be one of {HEADS} (or q_proj, ...), at most once",
                "fix the config",
            )
        heads.append(name)
    return tuple(heads)


# ----------------------------------------------------------------------------------------- weights


def _unknown_key(key: str, why: str) -> ValueError:
    hint = ""
    if re.search(r"lambda_(proj|bias)$", key):
        hint = " A separate λ gate is not supported (it needs couple_lambda=true)."
    elif key.endswith(DELTA_SCALE_PARAM):
        hint = " A Δ scale tensor is only expected with trainable_delta_scale=true."
    return ValueError(
        f"{REFERENCE_WEIGHTS} holds the tensor {key!r}, which {why}.{hint} Only the reference adapter's own "
        f"tensors (model.layers.{{i}}.self_attn.{{{', '.join(KNOWN_PARAMS)}}}) can be imported; use the file saved "
        "by the authors' code, unmodified, with its own config."
    )


class _ShapeCheck:
    """Takes one layer's tensors as float64, refusing a shape that does not fit the config."""

    def __init__(self, params: dict[str, tuple[str, torch.Tensor]], plan: _Plan) -> None:
        self.params, self.plan = params, plan

    def take(self, name: str, shape: tuple[int, ...], meaning: str) -> torch.Tensor:
        key, value = self.params[name]
        if tuple(value.shape) != shape:
            config = self.plan.config
            raise ValueError(
                f"{REFERENCE_WEIGHTS}: {key} has shape {tuple(value.shape)}, but the config (rank={config.r}, "
                f"num_state_heads={config.num_state_heads}, rankwise_gates={self.plan.rankwise_gates}) and the other "
                f"tensors need {shape} ({meaning}); the weights and the config do not belong together."
            )
        return value.detach().to(torch.float64)


def _convert_weights(state: dict[str, torch.Tensor], plan: _Plan) -> dict[str, torch.Tensor]:
    config = plan.config
    r, heads, width = config.r, config.num_state_heads, config.memory_width
    per_layer: dict[int, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in state.items():
        match = _KEY.match(key)
        if match is None:
            raise _unknown_key(key, "is not of the form model.layers.{i}.self_attn.{param}")
        layer, name, suffix = int(match.group(1)), match.group(2), match.group(3)
        if name not in KNOWN_PARAMS or (suffix and name not in MATRICES):
            raise _unknown_key(key, "is not a parameter of a reference δ-mem adapter")
        if name == DELTA_SCALE_PARAM and not plan.trainable_delta_scale:
            raise _unknown_key(key, "the config does not use (trainable_delta_scale=false)")
        if name in per_layer.setdefault(layer, {}):
            raise _unknown_key(key, f"duplicates {per_layer[layer][name][0]!r}")
        per_layer[layer][name] = (key, tensor)
    if not per_layer:
        raise ValueError(f"{REFERENCE_WEIGHTS} holds no tensors; re-download the reference adapter.")

    layers = sorted(per_layer)
    if plan.target_layers is not None and sorted(set(plan.target_layers)) != layers:
        absent = sorted(set(plan.target_layers) - set(layers))
        extra = sorted(set(layers) - set(plan.target_layers))
        raise ValueError(
            f"The reference config's target_layers={plan.target_layers} does not match the layers in "
            f"{REFERENCE_WEIGHTS} ({layers}): "
            + (
                f"missing tensors for layer(s) {absent} (e.g. model.layers.{absent[0]}.self_attn.memory_q_proj)"
                if absent
                else f"tensors for layer(s) {extra} that the config does not target"
            )
            + "; the config and the weights do not belong together."
        )

    required = [*MEMORY_PARAMS, *GATE_PARAMS, *(f"delta_{h}_proj" for h in config.delta_heads)]
    if plan.trainable_delta_scale:
        required.append(DELTA_SCALE_PARAM)
    gate_rows = width if plan.rankwise_gates else heads
    hidden = None
    out_features: dict[str, int] = {}
    converted: dict[str, torch.Tensor] = {}
    for layer in layers:
        params = per_layer[layer]
        missing = [name for name in required if name not in params]
        if missing:
            raise ValueError(
                f"{REFERENCE_WEIGHTS} has no tensor model.layers.{layer}.self_attn.{missing[0]}"
                + (f" (nor {', '.join(missing[1:])})" if missing[1:] else "")
                + f", which the config (delta_heads={list(config.delta_heads)}, trainable_delta_scale="
                f"{plan.trainable_delta_scale}) needs; the file is incomplete or belongs to another config."
            )

        if hidden is None:
            first = params["memory_q_proj"][1]
            hidden = first.shape[-1] if first.dim() else 0
        shapes = _ShapeCheck(params, plan)
        memory = [shapes.take(n, (width, hidden), "rank·state heads × hidden size") for n in MEMORY_PARAMS]
        gate = shapes.take("beta_proj", (gate_rows, hidden), "gate rows × hidden size")
        bias = shapes.take("beta_bias", (gate_rows,), "one bias per gate row")
        if not plan.rankwise_gates:
            gate, bias = gate.repeat_interleave(r, dim=0), bias.repeat_interleave(r, dim=0)
        deltas = []
        for head in HEADS:
            name = f"delta_{head}_proj"
            if name not in params:
                continue
            key, value = params[name]
            expected_out = hidden if head == "o" else out_features.get(head, value.shape[0] if value.dim() else 0)
            delta = shapes.take(name, (expected_out, width), "out_features of the projection × rank·state heads")
            out_features.setdefault(head, expected_out)
            if head in config.delta_heads:
                deltas.append(delta)
            elif bool(delta.any()):
                raise ValueError(
                    f"{REFERENCE_WEIGHTS}: {key} is non-zero, but the config's delta_heads={list(config.delta_heads)} "
                    f"does not include {head!r}; the config and the weights disagree. Use the config saved with "
                    "these weights."
                )
        out = torch.cat(deltas, dim=0)
        if plan.trainable_delta_scale:
            key, scale = params[DELTA_SCALE_PARAM]
            if scale.numel() != 1:
                raise ValueError(
                    f"{REFERENCE_WEIGHTS}: {key} has shape {tuple(scale.shape)}, but a trainable Δ scale is one "
                    "number per layer; the weights and the config do not belong together."
                )
            out = out * scale.detach().to(torch.float64).reshape(())
        prefix = f"base_model.model.model.layers.{layer}.self_attn."
        converted[prefix + "delta_mem_write.weight"] = torch.cat([*memory, gate], dim=0).float().contiguous()
        converted[prefix + "delta_mem_beta_bias"] = bias.float().contiguous()
        converted[prefix + "delta_mem_out.weight"] = out.float().contiguous()
    bad = [k for k, v in converted.items() if not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{REFERENCE_WEIGHTS} holds non-finite values (they end up in {bad[0]}); re-download it.")
    config.layers_to_transform = layers
    return converted


# ------------------------------------------------------------------------------------------ output


def _model_card(plan: _Plan, source: str, weights_path: Path) -> str:
    from . import __version__

    config = plan.config
    digest = hashlib.sha256(weights_path.read_bytes()).hexdigest()
    base = config.base_model_name_or_path
    lines = ["---", "library_name: peft"]
    if base:
        lines.append(f"base_model: {base}")
    lines += ["tags:", "- peft-deltamem", "- delta-mem", "---", ""]
    lines += [
        "# δ-mem adapter imported from the authors' reference checkpoint",
        "",
        f"Converted with `peft_deltamem.convert_reference_adapter` (peft-deltamem {__version__}) from {source}: "
        f"`{REFERENCE_CONFIG}` and `{REFERENCE_WEIGHTS}` (sha256 {digest}), saved by the reference code of "
        "δ-mem (Lei et al., 2026, arXiv 2605.12357). The weights are the authors'; only their layout changed.",
        "",
        f"- base model: {base or 'not recorded in the reference config; load onto the base it was trained on'}",
        f"- rank {config.r}, alpha {config.alpha:g} (scale {config.scaling:g}), "
        f"Δ heads {', '.join(config.delta_heads)}, {config.num_state_heads} state head(s), "
        f"{config.write_granularity} writes, layers {config.layers_to_transform}",
    ]
    lines += [f"- {note}" for note in plan.notes]
    if plan.ignored_fields:
        lines.append(
            "- reference config fields the conversion does not read (training settings and the like): "
            + ", ".join(f"`{name}`" for name in plan.ignored_fields)
        )
    return "\n".join(lines) + "\n"


def _write(output: Path, config: DeltaMemConfig, tensors: dict[str, torch.Tensor], card: str) -> None:
    output.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".import-reference-", dir=output))
    try:
        (staging / "README.md").write_text(card, encoding="utf-8")
        config.save_pretrained(str(staging))  # adapter_config.json, and the loading note appended to the card
        save_file(tensors, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
        for name in ADAPTER_FILES:
            os.replace(staging / name, output / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
