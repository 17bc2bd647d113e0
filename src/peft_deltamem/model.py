"""The δ-mem tuner: injection into attention blocks, the memory API, generation guards."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    _filter_state_dict_by_key_prefixes,
    _get_tuner_state_dict_key_prefixes,
)
from torch import nn

from .architectures import ATTENTION_LAYOUTS, check_model_supported, default_target_modules, resolve_layout
from .config import DeltaMemConfig
from .generation import generate_with_memory
from .layer import MERGE_ERROR, DeltaMemLayer
from .runtime import MEMORY_KWARG, MemoryRuntime
from .state import DeltaMemory


def _on_model_call(runtime: MemoryRuntime, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Top-level forward pre-hook: one call boundary (outside every checkpointed region)."""
    runtime.begin_call(module, kwargs)
    return args, kwargs


def _after_model_call(runtime: MemoryRuntime, module: nn.Module, args: tuple, kwargs: dict, output):
    """Top-level forward hook: the call completed; commit its memory and add its loss terms."""
    return runtime.end_call(module, kwargs, output)


def _new_memory(runtime: MemoryRuntime, batch_size: int, adapter_name: str | None = None) -> DeltaMemory:
    """An empty float32 memory with ``batch_size`` rows for ``adapter_name`` (default: the active adapter)."""
    if adapter_name is None:
        active = runtime.active_adapters()
        if not active:
            raise ValueError("No δ-mem adapter is active; pass adapter_name=.")
        adapter_name = active[0]
    if adapter_name not in runtime.configs:
        raise ValueError(f"Unknown adapter {adapter_name!r}; loaded adapters: {sorted(runtime.configs)}.")
    return runtime.new_memory(batch_size, adapter_name)


class DeltaMemModel(BaseTuner):
    """Creates δ-mem layers in a pretrained transformers model (use through ``get_peft_model``).

    Besides the usual tuner API it creates memories: :meth:`new_memory` (reachable from the
    ``PeftModel``). A memory is passed to each call (``memory=``); without one, a call is stateless.
    """

    prefix: str = "delta_mem_"
    tuner_layer_cls = DeltaMemLayer
    target_module_mapping = {model_type: [layout[0]] for model_type, layout in ATTENTION_LAYOUTS.items()}

    # ------------------------------------------------------------------------------------- episodes

    @contextlib.contextmanager
    def _checkpointing_without_reentrant(self) -> Iterator[None]:
        """Run checkpointed layers non-reentrantly for the duration of an episode.

        A reentrant checkpoint runs its forward under no_grad and only backpropagates into the
        layer when its *outputs* receive a gradient; the memory pass's outputs never do (only its
        state feeds the loss), so its memory parameters would get no gradient. Non-reentrant
        checkpointing saves the same activations and differentiates the state correctly.
        """
        swapped = []
        for module in self.model.modules():
            func = module.__dict__.get("_gradient_checkpointing_func")
            if isinstance(func, functools.partial) and func.keywords.get("use_reentrant", True):
                module._gradient_checkpointing_func = functools.partial(
                    func.func, *func.args, **{**func.keywords, "use_reentrant": False}
                )
                swapped.append((module, func))
        try:
            yield
        finally:
            for module, func in swapped:
                module._gradient_checkpointing_func = func

    # ------------------------------------------------------------------------------------- injection

    def _pre_injection_hook(self, model: nn.Module, config: DeltaMemConfig, adapter_name: str) -> None:
        existing = [m for m in model.modules() if isinstance(m, DeltaMemLayer)]
        self.memory_runtime = existing[0].runtime if existing else MemoryRuntime()

    def _post_injection_hook(self, model: nn.Module, config: DeltaMemConfig, adapter_name: str) -> None:
        hooks = model._forward_pre_hooks.values()
        if not any(isinstance(h, functools.partial) and h.func is _on_model_call for h in hooks):
            model.register_forward_pre_hook(functools.partial(_on_model_call, self.memory_runtime), with_kwargs=True)
            model.register_forward_hook(functools.partial(_after_model_call, self.memory_runtime), with_kwargs=True)
        if hasattr(model, "generate") and not isinstance(model.__dict__.get("generate"), functools.partial):
            # generate() takes memory=, carried from step to step (PeftModel.generate ends up here too)
            model.generate = functools.partial(generate_with_memory, self.memory_runtime, model)
        # the adapted transformers model (e.g. after transformers' load_adapter) creates memories too
        model.new_memory = functools.partial(_new_memory, self.memory_runtime)
        if hasattr(model, "add_model_tags"):
            model.add_model_tags(["delta-mem", "peft-deltamem"])

    def _prepare_adapter_config(self, peft_config: DeltaMemConfig, model_config: dict) -> DeltaMemConfig:
        if not isinstance(peft_config, DeltaMemConfig):
            raise TypeError(f"DeltaMemModel needs a DeltaMemConfig, got {type(peft_config).__name__}.")
        if peft_config.target_modules is None:
            peft_config.target_modules = default_target_modules(model_config)
        else:
            check_model_supported(model_config)
        return peft_config

    def _create_and_replace(
        self,
        peft_config: DeltaMemConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs,
    ) -> None:
        if isinstance(target, DeltaMemLayer):
            target.update_layer(adapter_name, peft_config)
            return
        if isinstance(target, BaseTunerLayer):
            raise ValueError(f"{current_key} is already wrapped by another PEFT method ({type(target).__name__}).")
        layout = resolve_layout(target, current_key, self.get_model_config(self.model), peft_config.projection_names)
        new_module = DeltaMemLayer(target, layout, self.memory_runtime, current_key)
        new_module.update_layer(adapter_name, peft_config)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # The default assumes a Linear-like layer; an attention wrapper only needs swapping in or out.
        setattr(parent, child_name, new_module)
        if isinstance(child, DeltaMemLayer):  # unloading
            child.remove_projection_hooks()
            child.runtime.layers.pop(child.layer_name, None)

    def _unload_and_optionally_merge(
        self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False, adapter_names=None
    ):
        if merge:
            self._check_merge_allowed()
        model = super()._unload_and_optionally_merge(merge=False, progressbar=progressbar)
        for hooks, flags in (
            (model._forward_pre_hooks, model._forward_pre_hooks_with_kwargs),
            (model._forward_hooks, model._forward_hooks_with_kwargs),
        ):
            for key, hook in list(hooks.items()):
                if isinstance(hook, functools.partial) and hook.func in (_on_model_call, _after_model_call):
                    del hooks[key]
                    flags.pop(key, None)
        generate = model.__dict__.get("generate")
        if isinstance(generate, functools.partial) and generate.func is generate_with_memory:
            del model.generate
        model.__dict__.pop("new_memory", None)
        return model

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model: nn.Module, config, adapter_name: str, state_dict: dict) -> dict:
        """Map checkpoint keys to the model and refuse an adapter made for a differently shaped base."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
        expected = _filter_state_dict_by_key_prefixes(model.state_dict(), prefixes)
        ours = {k: v for k, v in remapped.items() if cls.prefix in k}
        missing = sorted(set(expected) - set(ours))
        unexpected = sorted(set(ours) - set(expected))
        wrong_shape = [k for k in set(ours) & set(expected) if tuple(ours[k].shape) != tuple(expected[k].shape)]
        if missing or unexpected or wrong_shape:
            details = []
            if missing:
                details.append(f"{len(missing)} tensors the base expects are not in the file (e.g. {missing[0]})")
            if unexpected:
                details.append(f"{len(unexpected)} tensors in the file do not fit this base (e.g. {unexpected[0]})")
            if wrong_shape:
                k = sorted(wrong_shape)[0]
                details.append(
                    f"{len(wrong_shape)} tensors have other shapes (e.g. {k}: file {tuple(ours[k].shape)}, "
                    f"model {tuple(expected[k].shape)})"
                )
            raise ValueError(
                f"This δ-mem adapter does not fit the base model: {'; '.join(details)}. It was trained on a base "
                "with another number of layers, hidden size or architecture; load it onto the base it was made for "
                f"({getattr(config, 'base_model_name_or_path', None) or 'see adapter_config.json'})."
            )
        return remapped

    def _check_merge_allowed(self) -> None:
        raise NotImplementedError(MERGE_ERROR)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        raise NotImplementedError(MERGE_ERROR)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.memory_runtime.configs.pop(adapter_name, None)

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs) -> Iterator[None]:
        """Entered by ``PeftModel.forward`` and ``PeftModel.generate`` around the whole call.

        Refuses mixed-adapter batches; serialises calls that share one memory object (its lock); runs
        checkpointed layers non-reentrantly during an episode (``memory_input_ids``).
        """
        if kwargs.get("adapter_names") is not None:
            raise ValueError(
                "δ-mem does not support mixed-adapter batches (adapter_names=...): a memory holds one adapter's "
                "states. Use set_adapter() and run one adapter per call."
            )
        memory = kwargs.get(MEMORY_KWARG)
        lock = memory._lock if isinstance(memory, DeltaMemory) else contextlib.nullcontext()
        episode = kwargs.get("memory_input_ids") is not None
        with lock, self._checkpointing_without_reentrant() if episode else contextlib.nullcontext():
            yield

    # ---------------------------------------------------------------------------------------- memory

    def _memory_layers(self) -> list[DeltaMemLayer]:
        return [m for m in self.model.modules() if isinstance(m, DeltaMemLayer)]

    def _adapter(self, adapter_name: str | None) -> str:
        name = adapter_name or self.active_adapters[0]
        if name not in self.peft_config:
            raise ValueError(f"Unknown adapter {name!r}; loaded adapters: {sorted(self.peft_config)}.")
        return name

    def new_memory(self, batch_size: int, adapter_name: str | None = None) -> DeltaMemory:
        """An empty float32 memory with ``batch_size`` rows for ``adapter_name`` (default: the active adapter)."""
        return self.memory_runtime.new_memory(batch_size, self._adapter(adapter_name))
