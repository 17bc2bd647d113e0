"""The package-owned PEFT type (peft's own ``PeftType`` enum cannot be extended)."""

from enum import Enum


class DeltaMemPeftType(str, Enum):
    DELTA_MEM = "DELTA_MEM"
