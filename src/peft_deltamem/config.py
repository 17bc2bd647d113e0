"""Configuration of a δ-mem adapter."""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import numbers
import os
from dataclasses import dataclass, field, fields
from typing import Literal

from peft import PeftConfig

from .peft_type import DeltaMemPeftType

HEADS = ("q", "k", "v", "o")
MODEL_CARD_MARKER = "<!-- peft-deltamem -->"
MODEL_CARD_NOTE = f"""
{MODEL_CARD_MARKER}
## Loading this δ-mem adapter

This adapter uses the δ-mem method from [peft-deltamem](https://pypi.org/project/peft-deltamem/), which peft
does not ship. Install it and `import peft_deltamem` before loading, or peft fails with `KeyError: 'DELTA_MEM'`:

```python
import peft_deltamem  # registers the DELTA_MEM PEFT type
from peft import PeftModel

model = PeftModel.from_pretrained(base_model, "<this adapter>")
```
"""
GRANULARITIES = ("token", "segment")
SEGMENT_READS = ("before_segment", "before_call")


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _all(values, kind, check=None) -> bool:
    """A non-string sequence whose items are all of ``kind`` (and pass ``check``)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple, set, frozenset)):
        return False
    return all(isinstance(v, kind) and (check is None or check(v)) for v in values)


@dataclass
class DeltaMemConfig(PeftConfig):
    """Configuration of a δ-mem adapter (defaults are the paper's).

    Each selected attention block gets an ``r x r`` float32 memory written by the gated delta rule
    and read by every token; the reads become low-rank corrections of the attention projections
    named in ``delta_heads``. See ``docs/concepts.md`` for the math and the memory lifecycle.
    """

    r: int = field(default=8, metadata={"help": "Memory rank: the state of one block is an r x r matrix."})
    alpha: float = field(default=16.0, metadata={"help": "Corrections are scaled by alpha / r."})
    delta_heads: tuple[str, ...] = field(
        default=("q", "o"),
        metadata={"help": "Projections that receive a correction: any non-empty subset of 'q', 'k', 'v', 'o'."},
    )
    num_state_heads: int = field(
        default=1, metadata={"help": "Independent memories per block; > 1 is multi-state write (MSW)."}
    )
    write_granularity: Literal["token", "segment"] = field(
        default="token",
        metadata={
            "help": "'token' (TSW): every valid token writes. 'segment' (SSW): the mean hidden state of each "
            "caller-marked segment is written once; pass `memory_segment_ids` to every writing call."
        },
    )
    segment_read: Literal["before_segment", "before_call"] = field(
        default="before_segment",
        metadata={
            "help": "Which state the tokens of a writing call read under segment writes. 'before_segment': each token "
            "reads the state before its own segment's write (invariant to how the history is split into calls). "
            "'before_call': every token reads the state from before the whole call, as the authors' reference "
            "code does (set by `convert_reference_adapter` for their SSW adapters)."
        },
    )
    beta_bias_init: float = field(default=-1.5, metadata={"help": "Initial write-gate bias (sigmoid(-1.5) ~ 0.18)."})
    read_gate: bool = field(
        default=False,
        metadata={
            "help": "A learned read gate (not in the paper): each token scales its read of every state head by "
            "g = 2·sigmoid(W_g x + b_g), one Linear hidden -> num_state_heads per block, so a token that does not "
            "need the memory (a question not about the conversation) can leave it unread. W_g and b_g start at zero "
            "(g = 1: the same adapter as without the gate); the writes and the memory are unchanged."
        },
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Attention modules to adapt (names or a regex). None: detected from the model type "
            "(see `peft_deltamem.architectures`)."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex to leave out."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only adapt the attention blocks of these layer indices."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer list, used with `layers_to_transform` (e.g. 'layers')."}
    )
    projection_names: dict[str, str] | None = field(
        default=None,
        metadata={
            "help": "Names of the attention's projection children, overriding the per-model-type map, e.g. "
            "{'q': 'q_proj', 'k': 'k_proj', 'v': 'v_proj', 'o': 'o_proj'} or {'qkv': 'qkv_proj', 'o': 'o_proj'}."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: zero correction heads (an exact no-op at init). False: small random heads (tests)."},
    )
    write_generated_tokens: bool = field(
        default=True, metadata={"help": "Whether tokens produced by generate() are written into memory."}
    )
    write_sparsity_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the optional write-sparsity penalty weight * (mean beta - target)^2 in training."},
    )
    write_sparsity_target: float = field(default=0.05, metadata={"help": "Target mean write gate of that penalty."})
    target_parameters: list[str] | None = field(
        default=None, metadata={"help": "Not supported by δ-mem; must stay None."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules to train and save next to the adapter."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = DeltaMemPeftType.DELTA_MEM
        if isinstance(self.delta_heads, str):
            self.delta_heads = (self.delta_heads,)
        if not isinstance(self.delta_heads, (list, tuple, set, frozenset)):
            raise ValueError(
                f"DeltaMemConfig.delta_heads={self.delta_heads!r} is invalid: give a list of heads from {HEADS}."
            )
        self.delta_heads = tuple(self.delta_heads)
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"DeltaMemConfig.{name}={getattr(self, name)!r} is invalid: {why}")

        def real(value) -> bool:
            return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)

        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise bad("r", "the memory rank must be a positive integer (the paper uses 8).")
        if not real(self.alpha) or self.alpha <= 0:
            raise bad("alpha", "the correction scale alpha must be a finite number > 0 (the paper uses 16).")
        if not real(self.beta_bias_init):
            raise bad("beta_bias_init", "the write-gate bias must be a finite number (the paper uses -1.5).")
        if not self.delta_heads:
            raise bad("delta_heads", f"give at least one of {HEADS}.")
        unknown = [h for h in self.delta_heads if h not in HEADS]
        if unknown or len(set(self.delta_heads)) != len(self.delta_heads):
            raise bad("delta_heads", f"each entry must be one of {HEADS}, at most once.")
        self.delta_heads = tuple(h for h in HEADS if h in self.delta_heads)
        if (
            isinstance(self.num_state_heads, bool)
            or not isinstance(self.num_state_heads, int)
            or self.num_state_heads < 1
        ):
            raise bad("num_state_heads", "must be an integer >= 1 (1 = one memory, > 1 = MSW).")
        if self.write_granularity not in GRANULARITIES:
            raise bad("write_granularity", f"choose one of {GRANULARITIES}.")
        if self.segment_read not in SEGMENT_READS:
            raise bad("segment_read", f"choose one of {SEGMENT_READS}.")
        if self.segment_read != "before_segment" and self.write_granularity != "segment":
            raise bad(
                "segment_read",
                "it only has an effect with write_granularity='segment'; leave it at 'before_segment' for token "
                "writes.",
            )
        if self.target_parameters:
            raise bad("target_parameters", "δ-mem adapts attention modules, not parameters; use target_modules.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise bad("layers_pattern", "it only has an effect together with layers_to_transform.")
        if self.projection_names is not None:
            keys = set(self.projection_names)
            if (
                not keys <= {"q", "k", "v", "o", "qkv"}
                or "o" not in keys
                or not ({"q", "k", "v"} <= keys or "qkv" in keys)
            ):
                raise bad(
                    "projection_names",
                    "give 'o' and either 'q', 'k', 'v' or a fused 'qkv', e.g. {'qkv': 'qkv_proj', 'o': 'o_proj'}.",
                )
        for name in ("write_sparsity_weight", "write_sparsity_target"):
            if not real(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "must be a finite number >= 0.")
        for name in ("init_weights", "write_generated_tokens", "inference_mode", "read_gate"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be True or False (a string such as 'False' would read as True).")
        for name in ("target_modules", "exclude_modules", "layers_pattern"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str) and not _all(value, str):
                raise bad(name, "give a module name or regex (str) or a list of names.")
        layers = self.layers_to_transform
        if layers is not None and not _is_index(layers) and not _all(layers, int, _is_index):
            raise bad("layers_to_transform", "give a layer index or a list of layer indices, e.g. [0, 1].")

    @classmethod
    def from_peft_type(cls, **kwargs):
        """Build the config from saved keys; an unknown key is an error (peft would warn and use the default)."""
        peft_type = kwargs.get("peft_type")
        if peft_type is not None and str(getattr(peft_type, "value", peft_type)) != "DELTA_MEM":
            raise ValueError(
                f"The adapter config has peft_type={getattr(peft_type, 'value', peft_type)!r}, not 'DELTA_MEM': it is "
                "not a δ-mem adapter config (or its peft_type was edited). Load it with its own PEFT method, or fix "
                "adapter_config.json to peft_type 'DELTA_MEM'."
            )
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, sorted(names), n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ValueError(
                f"The δ-mem adapter config has keys that DeltaMemConfig does not know: {', '.join(hints)}. A misspelt "
                "key would silently fall back to its default; fix adapter_config.json (or upgrade peft-deltamem if "
                "the adapter was saved by a newer version)."
            )
        return super().from_peft_type(**kwargs)

    @classmethod
    def from_json_file(cls, path_json_file: str, **kwargs):
        """Read adapter_config.json; a file that is not JSON is named in the error."""
        try:
            return super().from_json_file(path_json_file, **kwargs)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path_json_file} is not valid JSON ({error}); the adapter config is corrupt. Save the adapter "
                "again with model.save_pretrained() or restore the file."
            ) from error

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs):
        """Load the config; refuse a saved adapter directory whose weights file is missing."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        directory = os.path.join(pretrained_model_name_or_path, subfolder or "")
        weights = ("adapter_model.safetensors", "adapter_model.bin")
        # PeftModel.save_pretrained stores inference_mode=True; a config saved on its own has no weights by design
        if config.inference_mode and os.path.isdir(directory):
            if not any(os.path.exists(os.path.join(directory, w)) for w in weights):
                raise FileNotFoundError(
                    f"{directory} holds a δ-mem adapter_config.json but no adapter weights ({' or '.join(weights)}); "
                    "the adapter directory is incomplete. Save it again with model.save_pretrained()."
                )
        _check_safetensors(os.path.join(directory, weights[0]))
        return config

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Save ``adapter_config.json`` and make sure the directory's model card says how to load δ-mem."""
        super().save_pretrained(save_directory, **kwargs)
        card = os.path.join(save_directory, "README.md")
        text = open(card, encoding="utf-8").read() if os.path.exists(card) else ""
        if MODEL_CARD_MARKER not in text:
            with open(card, "a", encoding="utf-8") as f:
                f.write(MODEL_CARD_NOTE)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @property
    def memory_width(self) -> int:
        """Width of the concatenated reads: r times the number of state heads."""
        return self.r * self.num_state_heads

    def fingerprint(self) -> str:
        """A short hash of the fields that decide the memory's shape and meaning."""
        fields = {
            "r": self.r,
            "num_state_heads": self.num_state_heads,
            "write_granularity": self.write_granularity,
            "delta_heads": list(self.delta_heads),
            "layers_to_transform": self.layers_to_transform,
            "target_modules": sorted(self.target_modules)
            if isinstance(self.target_modules, (set, list))
            else self.target_modules,
        }
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _check_safetensors(path: str) -> None:
    """Read a weights file's header now, so a corrupt file is named before anything is injected into a model.

    PeftModel.from_pretrained loads the config (here) before it adapts the caller's model and reads the weights.
    """
    if not os.path.isfile(path):
        return
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            f.keys()
    except Exception as error:  # safetensors raises its own SafetensorError, and OSError for short files
        raise ValueError(
            f"{path} is not a readable safetensors file ({error}): the adapter weights are corrupt or truncated. "
            "Save the adapter again with model.save_pretrained() or download it again."
        ) from error


# peft may first have been imported from inside this module: finish δ-mem's registration now
from . import _register_if_ready  # noqa: E402

_register_if_ready()
