"""The δ-mem tuner: injection into attention blocks, the memory API, generation guards."""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator, Sequence

import torch
from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    _filter_state_dict_by_key_prefixes,
    _get_tuner_state_dict_key_prefixes,
)
from torch import nn

from .architectures import ATTENTION_LAYOUTS, check_model_supported, default_target_modules, resolve_layout
from .config import DeltaMemConfig
from .layer import MERGE_ERROR, DeltaMemLayer
from .runtime import SEGMENT_IDS_KWARG, MemoryRuntime
from .state import MemoryState

_REORDERS = "beam search reorders batch rows, but the memory state cannot be reordered"
_ROLLS_BACK = "{} rolls back rejected tokens, but memory writes cannot be rolled back"
_UNSUPPORTED_GENERATION = {
    "num_beams": _REORDERS,
    "num_beam_groups": _REORDERS,
    "assistant_model": _ROLLS_BACK.format("assisted decoding"),
    "prompt_lookup_num_tokens": _ROLLS_BACK.format("prompt-lookup decoding"),
    "assistant_early_exit": _ROLLS_BACK.format("self-speculative decoding"),
}


def _on_model_call(runtime: MemoryRuntime, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Top-level forward pre-hook: one call boundary (outside every checkpointed region)."""
    runtime.begin_call(kwargs, training=module.training)
    return args, kwargs


def _after_model_call(runtime: MemoryRuntime, module: nn.Module, args: tuple, kwargs: dict, output):
    """Top-level forward hook: add pending loss terms (the write-sparsity penalty) to the call's loss."""
    if not runtime.pending_loss_terms:
        return output
    if getattr(output, "loss", None) is None:
        raise ValueError("write_sparsity_weight > 0 needs a loss: pass labels with the visible stream.")
    penalty = sum(t.to(output.loss.device) for t in runtime.pending_loss_terms)
    runtime.pending_loss_terms.clear()
    total_items, labels = kwargs.get("num_items_in_batch"), kwargs.get("labels")
    if total_items is not None and labels is not None:
        # The Trainer then sums micro-batch losses instead of averaging them: weigh the penalty like the
        # token loss, by this micro-batch's share of the step's label tokens, so it counts once per step.
        penalty = penalty * (labels[..., 1:] != -100).sum().to(penalty.device) / total_items
    output.loss = output.loss + penalty
    return output


class DeltaMemModel(BaseTuner):
    """Creates δ-mem layers in a pretrained transformers model (use through ``get_peft_model``).

    Besides the usual tuner API it exposes the memory: :meth:`reset_memory`,
    :meth:`get_memory_state`, :meth:`set_memory_state`, :meth:`memory_writes` and
    :meth:`memory_episode` (all reachable from the ``PeftModel``).
    """

    prefix: str = "delta_mem_"
    tuner_layer_cls = DeltaMemLayer
    target_module_mapping = {model_type: [layout[0]] for model_type, layout in ATTENTION_LAYOUTS.items()}

    # ------------------------------------------------------------------------------------- episodes

    def _write_memory_stream(self, kwargs: dict) -> None:
        """The write half of an episode: run the memory stream with writes on (gradients flow)."""
        memory_ids = kwargs["memory_input_ids"]
        if memory_ids.shape[1] == 0:
            return
        memory_kwargs = {
            "input_ids": memory_ids,
            "attention_mask": kwargs.get("memory_attention_mask"),
            "use_cache": False,
        }
        if kwargs.get(SEGMENT_IDS_KWARG) is not None:
            memory_kwargs[SEGMENT_IDS_KWARG] = kwargs[SEGMENT_IDS_KWARG]
        if "logits_to_keep" in inspect.signature(self.model.forward).parameters:
            memory_kwargs["logits_to_keep"] = 1  # the memory pass needs no vocabulary logits
        stats = self.memory_runtime.track_write_gates()
        try:
            with self.memory_writes(True):
                self.model(**memory_kwargs)
        finally:
            self.memory_runtime.stop_tracking()
        config: DeltaMemConfig = self.peft_config[self.active_adapters[0]]
        if self.model.training and config.write_sparsity_weight > 0 and stats:
            mean_beta = torch.stack(stats).mean()
            penalty = config.write_sparsity_weight * (mean_beta - config.write_sparsity_target) ** 2
            self.memory_runtime.pending_loss_terms.append(penalty)

    @contextlib.contextmanager
    def _episode(self, kwargs: dict) -> Iterator[None]:
        """Entered around a forward/generate whose inputs carry ``memory_input_ids``.

        The episode starts from an empty memory, writes the memory stream (``memory_input_ids``,
        ``memory_attention_mask``, ``memory_segment_ids``) with gradients flowing through the scan,
        then lets the visible call run with writes off. Rows whose memory stream is all padding
        start empty. In training the memory is emptied afterwards; in eval it is kept (detached).
        """
        with self.memory_episode(keep_state=not self.model.training), self._checkpointing_without_reentrant():
            self._write_memory_stream(kwargs)
            with self.memory_writes(False):
                yield
        self.memory_runtime.pending_loss_terms.clear()

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

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs) -> Iterator[None]:
        """Entered by ``PeftModel.forward`` and ``PeftModel.generate``: refuse what the memory cannot follow."""
        if kwargs.get("adapter_names") is not None:
            raise ValueError(
                "δ-mem does not support mixed-adapter batches (adapter_names=...): each adapter keeps its own "
                "memory per batch row. Use set_adapter() and run one adapter per call."
            )
        generation_config = kwargs.get("generation_config")
        for name, why in _UNSUPPORTED_GENERATION.items():
            value = kwargs.get(name, getattr(generation_config, name, None))
            if (
                value is not None
                and value is not False
                and not (name in ("num_beams", "num_beam_groups") and value == 1)
            ):
                raise NotImplementedError(
                    f"δ-mem cannot run generate() with {name}={value!r}: {why}. Use greedy or sampling."
                )
        runtime = self.memory_runtime
        episode = self._episode(kwargs) if kwargs.get("memory_input_ids") is not None else contextlib.nullcontext()
        with episode:
            previous = (runtime.generation_calls, runtime.write_generated_tokens)
            runtime.generation_calls = 0
            runtime.write_generated_tokens = all(
                self.peft_config[a].write_generated_tokens for a in self.active_adapters if a in self.peft_config
            )
            try:
                yield
            finally:
                runtime.generation_calls, runtime.write_generated_tokens = previous

    # ---------------------------------------------------------------------------------------- memory

    def _memory_layers(self) -> list[DeltaMemLayer]:
        return [m for m in self.model.modules() if isinstance(m, DeltaMemLayer)]

    def _adapter(self, adapter_name: str | None) -> str:
        name = adapter_name or self.active_adapters[0]
        if name not in self.peft_config:
            raise ValueError(f"Unknown adapter {name!r}; loaded adapters: {sorted(self.peft_config)}.")
        return name

    def reset_memory(self, rows: Sequence[int] | torch.Tensor | None = None, adapter_name: str | None = None) -> None:
        """Empty the memory: all of it (``rows=None``) or only the given batch rows, for one adapter or all."""
        self.memory_runtime.commit()
        adapters = [self._adapter(adapter_name)] if adapter_name else list(self.peft_config)
        for layer in self._memory_layers():
            for adapter in adapters:
                state = layer.memory.get(adapter)
                if rows is None or state is None:
                    layer.memory[adapter] = None
                    continue
                index = torch.as_tensor(rows, dtype=torch.long)
                if index.numel() and (index.min() < -state.shape[0] or index.max() >= state.shape[0]):
                    raise IndexError(
                        f"reset_memory rows {index.tolist()} out of range for batch size {state.shape[0]}."
                    )
                state = state.clone()
                state[index.to(state.device)] = 0.0
                layer.memory[adapter] = state

    def get_memory_state(self, adapter_name: str | None = None) -> MemoryState:
        """A detached float32 snapshot of the memory of ``adapter_name`` (default: the active adapter)."""
        self.memory_runtime.commit()
        adapter = self._adapter(adapter_name)
        layers = [layer for layer in self._memory_layers() if adapter in layer.settings]
        tensors = {layer.layer_name: layer.memory.get(adapter) for layer in layers}
        present = [t for t in tensors.values() if t is not None]
        if present:
            template = present[0]
            tensors = {n: (t if t is not None else torch.zeros_like(template)) for n, t in tensors.items()}
            tensors = {n: t.detach().clone().float() for n, t in tensors.items()}
        else:
            tensors = {}
        return self._describe(adapter, [layer.layer_name for layer in layers], tensors)

    def _describe(self, adapter: str, layer_names: list[str], tensors: dict[str, torch.Tensor]) -> MemoryState:
        config: DeltaMemConfig = self.peft_config[adapter]
        return MemoryState(
            adapter_name=adapter,
            r=config.r,
            num_state_heads=config.num_state_heads,
            delta_heads=tuple(config.delta_heads),
            write_granularity=config.write_granularity,
            layers=tuple(layer_names),
            config_hash=config.fingerprint(),
            states=tensors,
        )

    def set_memory_state(self, state: MemoryState, adapter_name: str | None = None) -> None:
        """Replace the memory of ``adapter_name`` (default: ``state.adapter_name`` if loaded, else the active one)."""
        if not isinstance(state, MemoryState):
            raise TypeError(f"set_memory_state expects a MemoryState, got {type(state).__name__}.")
        if adapter_name is None:
            adapter_name = state.adapter_name if state.adapter_name in self.peft_config else None
        adapter = self._adapter(adapter_name)
        layers = [layer for layer in self._memory_layers() if adapter in layer.settings]
        expected = self._describe(adapter, [layer.layer_name for layer in layers], {})
        for name in ("r", "num_state_heads", "delta_heads", "write_granularity", "layers", "config_hash"):
            if getattr(state, name) != getattr(expected, name):
                raise ValueError(
                    f"This memory state does not fit adapter {adapter!r}: its {name} is {getattr(state, name)!r} but "
                    f"the adapter has {getattr(expected, name)!r}. A state can only be restored into the adapter "
                    "configuration that wrote it."
                )
        state.validate_tensors()
        self.memory_runtime.commit()
        for layer in layers:
            tensor = state.states.get(layer.layer_name)
            if tensor is not None:
                device = layer.delta_mem_write[adapter].weight.device
                tensor = tensor.detach().to(device=device, dtype=torch.float32).clone()
            layer.memory[adapter] = tensor

    @contextlib.contextmanager
    def memory_writes(self, enabled: bool) -> Iterator[None]:
        """Switch memory writes on or off for the calls inside the block (reads always happen)."""
        previous = self.memory_runtime.writes_enabled
        self.memory_runtime.writes_enabled = bool(enabled)
        try:
            yield
        finally:
            self.memory_runtime.writes_enabled = previous

    @contextlib.contextmanager
    def memory_episode(self, keep_state: bool = False) -> Iterator[None]:
        """An episode: start from an empty memory and carry it, with its graph, across the calls inside.

        Outside an episode a model in training mode starts every forward from an empty memory. On exit
        the memory is emptied, or kept (detached) with ``keep_state=True``.
        """
        self.reset_memory()
        self.memory_runtime.episode_depth += 1
        try:
            yield
        finally:
            self.memory_runtime.episode_depth -= 1
            if keep_state:
                self.memory_runtime.commit()
                for layer in self._memory_layers():
                    layer.memory = {a: (s.detach() if s is not None else None) for a, s in layer.memory.items()}
            else:
                self.reset_memory()
