"""The δ-mem tuner: injection into attention blocks, the memory API, generation guards."""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator

import torch
from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    _filter_state_dict_by_key_prefixes,
    _get_tuner_state_dict_key_prefixes,
    check_target_module_exists,
)
from peft.utils import AuxiliaryTrainingWrapper
from torch import nn

from .architectures import (
    ATTENTION_LAYOUTS,
    check_model_supported,
    default_target_modules,
    resolve_layout,
    supported_model_types,
)
from .config import DeltaMemConfig
from .generation import generate_with_memory
from .layer import MERGE_ERROR, DeltaMemLayer
from .runtime import MEMORY_KWARG, MemoryRuntime
from .state import DeltaMemory


@torch.compiler.disable  # call bookkeeping stays eager when transformers compiles the model's __call__
def _on_model_call(runtime: MemoryRuntime, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Top-level forward pre-hook: one call boundary (outside every checkpointed region)."""
    runtime.begin_call(module, kwargs)
    return args, kwargs


@torch.compiler.disable
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

    def __init__(self, model: nn.Module, peft_config, adapter_name: str, **kwargs) -> None:
        _refuse_other_peft_methods(model, "δ-mem cannot be added to a model that holds")
        super().__init__(model, peft_config, adapter_name, **kwargs)

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
        # peft keeps one config dict per model and another method wrapped around this one writes into it: refuse
        # that when it happens instead of saving δ-mem weights under the other method's config later
        if not isinstance(self.peft_config, _DeltaMemConfigs):
            self.peft_config = _DeltaMemConfigs(self.peft_config)
        # Runs once per new tuner (get_peft_model, PeftModel(...), from_pretrained, transformers' load_adapter),
        # before anything in the caller's model is changed; add_adapter on an existing PeftModel does not come here.
        _refuse_unhostable(model, config)
        existing = [m for m in model.modules() if isinstance(m, DeltaMemLayer)]
        if existing:
            loaded = sorted({a for m in existing for a in m.settings})
            if isinstance(getattr(model, "base_model", None), BaseTuner):
                where = "this model is already a PeftModel with δ-mem adapter(s)"
            else:
                where = "this base model already carries δ-mem adapter(s) (another PeftModel was built on it)"
            transformers_adapter = getattr(model, "_hf_peft_config_loaded", False) and not isinstance(
                getattr(model, "base_model", None), BaseTuner
            )
            if adapter_name in loaded or not transformers_adapter:
                # BaseTuner.__init__ has already put the new config into the shared peft_config: undo that
                shared, runtime = getattr(model, "peft_config", None), existing[0].runtime
                if isinstance(shared, dict):
                    for name in list(shared):
                        if name in runtime.configs:
                            shared[name] = runtime.configs[name]
                        else:
                            del shared[name]
                raise ValueError(
                    f"Cannot add δ-mem adapter {adapter_name!r}: {where} {loaded}. A second get_peft_model / "
                    "PeftModel on it would re-initialise or silently share those layers (one model would run the "
                    "other's adapter). Add another adapter to the existing PeftModel with "
                    "peft_model.add_adapter(name, config) or load_adapter(path, adapter_name=name), or build the new "
                    "PeftModel on a fresh copy of the base model (or after peft_model.unload())."
                )
        self.memory_runtime = existing[0].runtime if existing else MemoryRuntime()
        self._check_targets_exist(model, config)

    def _post_injection_hook(self, model: nn.Module, config: DeltaMemConfig, adapter_name: str) -> None:
        hooks = model._forward_pre_hooks.values()
        if not any(isinstance(h, functools.partial) and h.func is _on_model_call for h in hooks):
            model.register_forward_pre_hook(functools.partial(_on_model_call, self.memory_runtime), with_kwargs=True)
            model.register_forward_hook(functools.partial(_after_model_call, self.memory_runtime), with_kwargs=True)
        if hasattr(model, "generate") and not isinstance(model.__dict__.get("generate"), functools.partial):
            # generate() takes memory=, carried from step to step (PeftModel.generate ends up here too)
            model.generate = functools.partial(generate_with_memory, self.memory_runtime, model)
        original_load = getattr(type(model), "_load_pretrained_model", None)
        if original_load is not None and "_load_pretrained_model" not in model.__dict__:
            # transformers' load_adapter reads adapter files with its own loader, which never calls
            # _remap_adapter_state_dict_for_load: check the file's keys there too.
            model._load_pretrained_model = functools.partial(_guarded_adapter_load, original_load)
        # the adapted transformers model (e.g. after transformers' load_adapter) creates memories too
        model.new_memory = functools.partial(_new_memory, self.memory_runtime)
        if hasattr(model, "add_model_tags"):
            model.add_model_tags(["delta-mem", "peft-deltamem"])

    @staticmethod
    def _check_targets_exist(model: nn.Module, config: DeltaMemConfig) -> None:
        """A saved adapter whose attention blocks this base does not have does not fit it: say so, not "not found"."""
        if config.target_modules is None:
            return
        if any(check_target_module_exists(config, name) for name, _ in model.named_modules() if name):
            return
        model_config = BaseTuner.get_model_config(model)
        model_type = model_config.get("model_type")
        hint = ""
        if model_type in ATTENTION_LAYOUTS:
            hint = f" (its attention blocks are named {ATTENTION_LAYOUTS[model_type][0]!r})"
        targets = config.target_modules
        targets = sorted(targets) if isinstance(targets, set) else targets
        raise ValueError(
            f"This δ-mem adapter does not fit the base model: no module of this {model_type or type(model).__name__} "
            f"model{hint} matches target_modules={targets!r}. "
            "If you are loading a saved adapter, it was made for another architecture; load it onto the base it was "
            f"made for ({getattr(config, 'base_model_name_or_path', None) or 'see adapter_config.json'}). If you "
            "are creating one, leave target_modules=None (δ-mem finds the attention blocks of supported models) "
            "or name this model's attention modules."
        )

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
            child.restore_projections()
            child.runtime.unregister_layer(child.layer_name)

    def _unload_and_optionally_merge(
        self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False, adapter_names=None
    ):
        if merge:
            self._check_merge_allowed()
        model = super()._unload_and_optionally_merge(merge=False, progressbar=progressbar)
        _remove_model_hooks(model)
        return model

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names) -> dict:
        """Only δ-mem's tensors: another PEFT method's layers in the same model (a LoRA wrapped around this model)
        save with their own adapter, never into the δ-mem file."""
        return _filter_state_dict_by_key_prefixes(state_dict, _delta_mem_key_prefixes(model))

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model: nn.Module, config, adapter_name: str, state_dict: dict) -> dict:
        """Map checkpoint keys to the model and refuse an adapter made for a differently shaped base."""
        try:
            return cls._checked_remap(model, config, adapter_name, state_dict)
        except ValueError:
            _remove_failed_adapter(model, adapter_name)
            raise

    @classmethod
    def _checked_remap(cls, model: nn.Module, config, adapter_name: str, state_dict: dict) -> dict:
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        prefixes = _delta_mem_key_prefixes(model, adapter_name=adapter_name)
        expected = _filter_state_dict_by_key_prefixes(model.state_dict(), prefixes)
        # An adapter file may only set δ-mem parameters and the modules it declares (modules_to_save,
        # trainable tokens); anything else would overwrite the frozen base through load_state_dict(strict=False).
        allowed = set(expected)
        for name, module in model.named_modules():
            if isinstance(module, AuxiliaryTrainingWrapper):
                allowed.update(f"{name}.{k}" for k in module.adapter_state_dict_load_map(adapter_name).values())
        _refuse_foreign_keys(remapped, allowed)
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

    def check_memory(self, memory: DeltaMemory) -> None:
        """Raise (TypeError / ValueError naming the mismatch) unless this model can use ``memory``: its adapter,
        configuration and the adapter weights that wrote it. Every call taking ``memory=`` checks this itself."""
        self.memory_runtime.check_memory(memory)


def _remove_model_hooks(model: nn.Module) -> None:
    """Undo _post_injection_hook: the call hooks, generate(), new_memory and the load guard."""
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
    model.__dict__.pop("_load_pretrained_model", None)


def _strip_delta_mem(model: nn.Module) -> None:
    """Put the original attention blocks back and remove every δ-mem hook (a refused transformers load_adapter)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, DeltaMemLayer):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.base_layer)
            module.restore_projections()
    _remove_model_hooks(model)
    model.__dict__.pop("peft_config", None)
    if getattr(model, "_hf_peft_config_loaded", False):
        model._hf_peft_config_loaded = False


def _refuse_unhostable(model: nn.Module, config: DeltaMemConfig) -> None:
    """Refuse models δ-mem cannot run in, before anything in them is changed."""
    forward = getattr(model, "forward", None)
    if forward is not None:
        params = inspect.signature(forward).parameters.values()
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            raise ValueError(
                f"δ-mem cannot be added to {type(model).__name__}: its forward() takes no **kwargs. δ-mem passes each "
                "call's memory (memory=, memory_input_ids=, ...) through the model's keyword arguments down to its "
                "attention blocks, so it needs a decoder-only model whose forward accepts and passes on **kwargs, "
                "like the transformers causal LMs (AutoModelForCausalLM; model types with built-in support: "
                f"{', '.join(supported_model_types())}). Add **kwargs to forward() and pass them to the attention "
                "modules, or use a transformers model."
            )
    device_map = getattr(model, "hf_device_map", None)
    if isinstance(device_map, dict) and "disk" in device_map.values():
        on_disk = sorted(k for k, v in device_map.items() if v == "disk")
        raise ValueError(
            f"δ-mem cannot be used with a base model whose weights are offloaded to disk (device_map puts {on_disk[:3]}"
            f"{' ...' if len(on_disk) > 3 else ''} on 'disk'): peft's disk-offload bookkeeping does not know the "
            "attention wrapper δ-mem adds, and every step would re-read the weights from disk. Load the base "
            "without disk offload (device_map='cpu', or a device_map/max_memory using only GPUs and 'cpu'), or "
            "quantise it (load_in_4bit) so it fits in memory."
        )


def _remove_failed_adapter(model: nn.Module, adapter_name: str) -> None:
    """A load that our checks refused leaves nothing of the adapter behind in the caller's model."""
    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, DeltaMemModel):
        return  # set_peft_model_state_dict on a model adapted in place: its caller owns the clean-up
    if list(tuner.peft_config) == [adapter_name]:
        tuner.unload()
        tuner.peft_config.pop(adapter_name, None)
        tuner.memory_runtime.configs.pop(adapter_name, None)
        for attr in ("peft_config", "new_memory"):
            tuner.model.__dict__.pop(attr, None)
    else:
        tuner.delete_adapter(adapter_name)


_PEFT_PREFIX = "base_model.model."

COMBINE_HINT = (
    "peft keeps one adapter-config dict per model, so one method wrapped around the other overwrites its config and "
    "the saved adapter would load as the wrong method. To use a LoRA with δ-mem, merge the LoRA into the base first "
    "(PeftModel.from_pretrained(base, lora_dir).merge_and_unload()), then add δ-mem to the merged model "
    "(get_peft_model or PeftModel.from_pretrained); see docs/api.md."
)


def _refuse_other_peft_methods(model: nn.Module, what: str) -> None:
    other = next(
        (m for m in model.modules() if isinstance(m, BaseTunerLayer) and not isinstance(m, DeltaMemLayer)), None
    )
    if other is not None:
        kind = f"{type(other).__module__}.{type(other).__name__}"
        raise ValueError(f"{what} layers of another PEFT method ({kind}). {COMBINE_HINT}")


class _DeltaMemConfigs(dict):
    """A δ-mem model's adapter configs: refuses another PEFT method's config (it would replace δ-mem's)."""

    def __setitem__(self, key, value) -> None:
        if not isinstance(value, DeltaMemConfig):
            raise ValueError(
                f"a {type(value).__name__} cannot be added to a δ-mem model (as in get_peft_model(delta_mem_model, "
                f"LoraConfig(...))). {COMBINE_HINT}"
            )
        super().__setitem__(key, value)

    def update(self, *args, **kwargs) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value


def _delta_mem_key_prefixes(model: nn.Module, adapter_name: str | None = None) -> set[str]:
    """peft's state-dict key prefixes of the PEFT layers, restricted to δ-mem's layers (and its tuner)."""
    ours = [name for name, module in model.named_modules() if isinstance(module, (DeltaMemLayer, DeltaMemModel))]
    return {
        p for p in _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
        if any(p.startswith(f"{name}.") or not name for name in ours)
    }  # fmt: skip


def _refuse_foreign_keys(keys, allowed: set[str]) -> None:
    """Refuse, by name, adapter-file tensors that are neither δ-mem parameters nor declared extra modules."""
    known = allowed | {_PEFT_PREFIX + k for k in allowed} | {k.removeprefix(_PEFT_PREFIX) for k in allowed}
    foreign = sorted(k for k in keys if DeltaMemModel.prefix not in k and k not in known)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(
            f"Refusing to load this δ-mem adapter: its file carries {len(foreign)} tensor(s) that are not δ-mem "
            f"parameters or declared modules_to_save ({shown}). Loading them would overwrite the frozen base "
            "model. Use an adapter file written by save_pretrained (it holds only delta_mem_* tensors and the "
            "modules listed in adapter_config.json's modules_to_save), or remove those tensors from it."
        )


def _guarded_adapter_load(original, model, state_dict, checkpoint_files, load_config, *args, **kwargs):
    """transformers' load_adapter loader, after checking that the file only holds adapter tensors."""
    if state_dict is not None:
        keys = list(state_dict)
    else:
        keys = []
        for path in checkpoint_files or []:
            if str(path).endswith(".safetensors"):
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as f:
                    keys.extend(f.keys())
            else:
                import torch

                keys.extend(torch.load(path, map_location="meta", weights_only=True))
    allowed = set()
    for name, module in model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            for adapter in getattr(model, "peft_config", None) or {}:
                allowed.update(f"{name}.{k}" for k in module.adapter_state_dict_load_map(adapter))
    try:
        _refuse_foreign_keys(keys, allowed)
    except ValueError:
        adapters = list(getattr(model, "peft_config", None) or {})
        if len(adapters) <= 1:
            _strip_delta_mem(model)
        else:
            model.delete_adapter(adapters[-1])  # the adapter load_adapter has just injected
        raise
    return original(model, state_dict, checkpoint_files, load_config, *args, **kwargs)


# peft may first have been imported from inside this module: finish δ-mem's registration now
from . import _register_if_ready  # noqa: E402

_register_if_ready()
