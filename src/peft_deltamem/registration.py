"""Registers the DELTA_MEM type with peft's mappings (done on ``import peft_deltamem``)."""

from __future__ import annotations

from peft import mapping

from .config import DeltaMemConfig
from .model import DeltaMemModel
from .peft_type import DeltaMemPeftType

PREFIX = DeltaMemModel.prefix


def _same_class(a: type, b: type) -> bool:
    # importlib.reload creates new class objects; accept them as the same registration
    return a is b or (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def register() -> None:
    """Add δ-mem to peft's type mappings; idempotent and reload-safe, raises on a clash."""
    peft_type = DeltaMemPeftType.DELTA_MEM
    wanted = {
        "PEFT_TYPE_TO_CONFIG_MAPPING": DeltaMemConfig,
        "PEFT_TYPE_TO_TUNER_MAPPING": DeltaMemModel,
    }
    for table_name, cls in wanted.items():
        table = getattr(mapping, table_name)
        current = table.get(peft_type)
        if current is not None and not _same_class(current, cls):
            raise KeyError(
                f"peft already maps {peft_type.value!r} to {current.__module__}.{current.__qualname__} in "
                f"{table_name}; another package registered a PEFT type with the same name."
            )
    for other_type, prefix in mapping.PEFT_TYPE_TO_PREFIX_MAPPING.items():
        if prefix == PREFIX and other_type != peft_type:
            raise KeyError(f"peft already uses the parameter prefix {PREFIX!r} for {other_type!r}.")
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = DeltaMemConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = DeltaMemModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = PREFIX
