"""Where the attention blocks and their projections live, per transformers model type."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

_STANDARD = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}

# model_type -> (name of the attention module inside a decoder layer, projection names)
ATTENTION_LAYOUTS: dict[str, tuple[str, dict[str, str]]] = {
    **{
        model_type: ("self_attn", _STANDARD)
        for model_type in (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "gemma",
            "gemma2",
            "gemma3_text",
            "olmo",
            "olmo2",
            "smollm3",
            "granite",
            "starcoder2",
        )
    },
    "phi3": ("self_attn", {"qkv": "qkv_proj", "o": "o_proj"}),
    "gpt2": ("attn", {"qkv": "c_attn", "o": "c_proj"}),
}

# Architectures that look like decoders but whose attention δ-mem cannot wrap as specified.
REFUSED_MODEL_TYPES: dict[str, str] = {
    "deepseek_v2": "multi-head latent attention (MLA) has no plain q/k/v projections",
    "deepseek_v3": "multi-head latent attention (MLA) has no plain q/k/v projections",
    "kimi_k2": "multi-head latent attention (MLA) has no plain q/k/v projections",
}


def supported_model_types() -> list[str]:
    return sorted(ATTENTION_LAYOUTS)


def _how_to_target() -> str:
    return (
        f"Supported model types: {', '.join(supported_model_types())}. For another decoder-only model, pass "
        "DeltaMemConfig(target_modules=[<attention module name>, e.g. 'self_attn'], projection_names={'q': ..., "
        "'k': ..., 'v': ..., 'o': ...}) (or {'qkv': <fused projection>, 'o': ...})."
    )


def check_model_supported(model_config: dict) -> None:
    """Refuse model families δ-mem cannot adapt (encoder-decoder, MLA), with a message saying why."""
    model_type = model_config.get("model_type")
    if model_config.get("is_encoder_decoder"):
        raise ValueError(
            f"δ-mem supports decoder-only language models; {model_type!r} is an encoder-decoder model "
            "(cross-attention is not supported). " + _how_to_target()
        )
    if model_type in REFUSED_MODEL_TYPES:
        raise ValueError(f"δ-mem cannot adapt {model_type!r}: {REFUSED_MODEL_TYPES[model_type]}. " + _how_to_target())


def default_target_modules(model_config: dict) -> list[str]:
    """The attention module name for ``target_modules=None``."""
    check_model_supported(model_config)
    model_type = model_config.get("model_type")
    if model_type not in ATTENTION_LAYOUTS:
        raise ValueError(
            f"δ-mem does not know where the attention blocks of model type {model_type!r} are. " + _how_to_target()
        )
    return [ATTENTION_LAYOUTS[model_type][0]]


@dataclass(frozen=True)
class AttentionLayout:
    """Resolved projections of one attention module.

    ``projections`` maps a correction slot ('q', 'k', 'v', 'o' or fused 'qkv') to the child name;
    ``fused_sizes`` gives the (q, k, v) column sizes of a fused projection.
    """

    projections: dict[str, str]
    out_features: dict[str, int]
    hidden_size: int
    fused_sizes: tuple[int, int, int] | None = None

    def head_out_features(self, head: str) -> int:
        if "qkv" in self.projections and head in ("q", "k", "v"):
            return self.fused_sizes["qkv".index(head)]
        return self.out_features[head]


def _features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, a bitsandbytes Linear or a GPT-2 Conv1D."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.in_features, module.out_features
    if hasattr(module, "nf") and hasattr(module, "nx"):  # transformers Conv1D
        return module.nx, module.nf
    raise ValueError(f"δ-mem cannot read the in/out features of projection {type(module).__name__}.")


def resolve_layout(
    attention: nn.Module, module_name: str, model_config: dict, projection_names: dict | None
) -> AttentionLayout:
    """Find the projections of ``attention`` (config override, then model-type map, then standard names)."""
    if getattr(attention, "is_cross_attention", False):
        raise ValueError(f"{module_name} is a cross-attention block; δ-mem only adapts causal self-attention.")
    names = projection_names
    if names is None:
        model_type = model_config.get("model_type")
        if model_type in ATTENTION_LAYOUTS:
            names = ATTENTION_LAYOUTS[model_type][1]
        elif all(hasattr(attention, n) for n in _STANDARD.values()):
            names = _STANDARD
        else:
            children = [n for n, _ in attention.named_children()]
            raise ValueError(
                f"{module_name} ({type(attention).__name__}, children {children}) has no recognised q/k/v/o "
                "projections. " + _how_to_target()
            )
    missing = [n for n in names.values() if not isinstance(getattr(attention, n, None), nn.Module)]
    if missing:
        raise ValueError(
            f"{module_name} ({type(attention).__name__}) has no projection(s) {missing}; check target_modules "
            "(it must name the attention block itself) and projection_names. " + _how_to_target()
        )
    features = {slot: _features(getattr(attention, name)) for slot, name in names.items()}
    first = "qkv" if "qkv" in names else "q"
    hidden_size = features[first][0]
    out_features = {slot: f[1] for slot, f in features.items()}
    fused_sizes = None
    if "qkv" in names:
        fused_sizes = _fused_sizes(model_config, out_features["qkv"], module_name)
    return AttentionLayout(dict(names), out_features, hidden_size, fused_sizes)


def _fused_sizes(model_config: dict, fused_out: int, module_name: str) -> tuple[int, int, int]:
    heads = model_config.get("num_attention_heads") or model_config.get("n_head")
    hidden = model_config.get("hidden_size") or model_config.get("n_embd")
    if heads and hidden:
        head_dim = model_config.get("head_dim") or hidden // heads
        kv_heads = model_config.get("num_key_value_heads") or heads
        sizes = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
        if sum(sizes) == fused_out:
            return sizes
    raise ValueError(
        f"Cannot split the fused projection of {module_name} ({fused_out} outputs) into q, k, v from the model "
        "config; pass separate projection_names instead."
    )
