"""peft-deltamem: δ-mem online memory for frozen language models, as a PEFT method.

``import peft_deltamem`` registers the ``DELTA_MEM`` PEFT type, after which peft's
``get_peft_model``, ``PeftModel.from_pretrained`` and transformers' ``load_adapter`` work with
:class:`DeltaMemConfig`.
"""

from .config import DeltaMemConfig
from .convert import convert_reference_adapter
from .hub import push_to_hub
from .layer import DeltaMemLayer
from .model import DeltaMemModel
from .peft_type import DeltaMemPeftType
from .registration import register
from .state import DeltaMemory

register()

__all__ = [
    "DeltaMemory",
    "DeltaMemConfig",
    "DeltaMemLayer",
    "DeltaMemModel",
    "DeltaMemPeftType",
    "convert_reference_adapter",
    "push_to_hub",
    "register",
]
__version__ = "0.1.0"
