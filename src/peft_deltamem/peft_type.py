"""The package-owned PEFT type (peft's own ``PeftType`` enum cannot be extended)."""

from enum import Enum


class DeltaMemPeftType(str, Enum):  # noqa: UP042  (same base classes as peft's PeftType)
    DELTA_MEM = "DELTA_MEM"
