"""Tiny randomly initialised causal LMs built from configs (tests, demo, benchmarks; no downloads)."""

from __future__ import annotations

import torch
import transformers

TINY_FAMILIES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "phi3",
    "gpt2",
    "olmo2",
    "smollm3",
)

_CONFIG_CLASSES = {
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "qwen2": "Qwen2Config",
    "qwen3": "Qwen3Config",
    "gemma2": "Gemma2Config",
    "gemma3_text": "Gemma3TextConfig",
    "phi3": "Phi3Config",
    "gpt2": "GPT2Config",
    "olmo2": "Olmo2Config",
    "smollm3": "SmolLM3Config",
}


def tiny_config(
    model_type: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 128,
    intermediate_size: int | None = None,
    **overrides,
) -> transformers.PretrainedConfig:
    """A small config of ``model_type`` (GQA where the family has it; sliding windows where it has them)."""
    if model_type not in _CONFIG_CLASSES:
        raise ValueError(f"No tiny config for {model_type!r}; choose one of {TINY_FAMILIES}.")
    cls = getattr(transformers, _CONFIG_CLASSES[model_type])
    if model_type == "gpt2":
        kwargs = dict(
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            vocab_size=vocab_size,
            n_positions=4096,
            bos_token_id=1,
            eos_token_id=2,
        )
    else:
        kwargs = dict(
            hidden_size=hidden_size,
            intermediate_size=intermediate_size or 2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=hidden_size // num_heads,
            vocab_size=vocab_size,
            max_position_embeddings=4096,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        if model_type in ("gemma2", "gemma3_text", "mistral"):
            kwargs["sliding_window"] = 8  # exercise sliding-window layers with short sequences
        if model_type == "gemma3_text":
            kwargs["layer_types"] = ["sliding_attention", "full_attention"] * (num_layers // 2) + (
                ["sliding_attention"] if num_layers % 2 else []
            )
    kwargs.update(overrides)
    config = cls(**kwargs)
    config._attn_implementation = overrides.get("attn_implementation", "eager")
    return config


def tiny_model(model_type: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs):
    """A tiny ``AutoModelForCausalLM`` with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(model_type, **config_kwargs), dtype=dtype)
    return model.eval()
