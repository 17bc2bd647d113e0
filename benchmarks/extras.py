"""The optional packages behind the evaluation tools (the ``eval`` extra), checked before any work starts."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

EVAL_PACKAGES = {"bm25s": "BM25 retrieval", "matplotlib": "the benchmark's plots"}


def require(*modules: str) -> None:
    """Raise ImportError naming every missing module of ``modules`` and the command that installs them."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        uses = ", ".join(f"{m} ({EVAL_PACKAGES.get(m, 'evaluation')})" for m in missing)
        raise ImportError(
            f"missing optional package(s): {uses}. Install them with: pip install 'peft-deltamem[eval]' "
            "(from a checkout: pip install -e '.[eval]')"
        )


def import_optional(module: str) -> ModuleType:
    """``import module`` with :func:`require`'s message when it is not installed."""
    require(module)
    return importlib.import_module(module)
