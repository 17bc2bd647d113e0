"""peft-deltamem: δ-mem online memory for frozen language models, as a PEFT method.

``import peft_deltamem`` registers the ``DELTA_MEM`` PEFT type, after which peft's
``get_peft_model``, ``PeftModel.from_pretrained`` and transformers' ``load_adapter`` work with
:class:`DeltaMemConfig`.

Importing the package is instant: peft (and with it transformers and bitsandbytes) is imported when a name of
the package is first used, and the type is registered then, or as soon as anything imports peft, whichever
comes first (so that ``import peft_deltamem`` followed by ``PeftModel.from_pretrained(...)`` works). Commands
such as ``peft-deltamem --help`` therefore start at once.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

_EXPORTS = {
    "DeltaMemory": ".state",
    "DeltaMemConfig": ".config",
    "DeltaMemLayer": ".layer",
    "DeltaMemModel": ".model",
    "DeltaMemPeftType": ".peft_type",
    "convert_reference_adapter": ".convert",
    "push_to_hub": ".hub",
    "register": ".registration",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def _register() -> None:
    from .registration import register

    register()


def _register_if_ready() -> None:
    """Register now, unless one of the modules registration needs is itself still being imported (peft was first
    imported from inside it); the ends of config.py, layer.py and model.py call this again."""
    try:
        _register()
    except ImportError:  # a partially imported module of ours; a real import problem shows on first use
        pass


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    _register()
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _RegisterWhenPeftLoads(importlib.abc.MetaPathFinder):
    """Registers δ-mem with peft right after ``peft`` itself is imported, by whom ever."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "peft":
            return None
        sys.meta_path.remove(self)  # one shot: the other finders locate peft
        spec = importlib.util.find_spec("peft")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module) -> None:
            exec_module(module)
            _register_if_ready()

        spec.loader.exec_module = exec_and_register
        return spec


if "peft" in sys.modules:
    _register()
elif not any(isinstance(f, _RegisterWhenPeftLoads) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenPeftLoads())
