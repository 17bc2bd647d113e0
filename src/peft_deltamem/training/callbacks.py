"""Training with a stock ``transformers.Trainer``: the column guard and memory-health logging.

Two things a δ-mem run needs from the Trainer that it does not do by itself:

- **Keep the memory columns.** With ``remove_unused_columns=True`` (the Trainer's default) the Trainer drops
  every dataset column that the *base* model's ``forward`` does not name, which removes ``memory_input_ids``
  and friends before the collator sees them. :func:`check_remove_unused_columns` (run by
  :class:`MemoryHealthCallback` when the Trainer is built) refuses that setting with a clear error.
- **Watch the memory.** :func:`measure_memory_health` runs one episode of a batch without gradients and reports
  the mean write gate β, the norm of the written memory state and how large the corrections are next to the
  projections they correct; :class:`MemoryHealthCallback` logs these at the Trainer's logging steps.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from peft import PeftModel
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import DefaultFlowCallback

from ..layer import DeltaMemLayer
from ..model import DeltaMemModel
from ..runtime import SEGMENT_IDS_KWARG, CallRecord, check_bool

MEMORY_COLUMNS = ("memory_input_ids", "memory_attention_mask", "memory_segment_ids")
_VISIBLE_KEYS = ("input_ids", "attention_mask")

REMOVE_UNUSED_COLUMNS_ERROR = (
    "TrainingArguments(remove_unused_columns=True) would make the Trainer drop the δ-mem memory columns "
    f"({', '.join(MEMORY_COLUMNS)}): it keeps only the columns named in the base model's forward signature, so "
    "the model would train without its memory stream. Set remove_unused_columns=False (command line: "
    "--remove_unused_columns False). DeltaMemDataCollator only reads the columns it needs, so other dataset "
    "columns are harmless."
)


NO_MEMORY_STREAM_ERROR = (
    "A training batch reached the δ-mem model without a memory stream (no memory_input_ids and no memory=): the "
    "adapter would train without ever reading a memory written from other text. This happens when the Trainer "
    "uses its default collator (e.g. TRL's SFTTrainer on a 'messages' dataset) or drops the memory columns. Build "
    "episodes with episodes_map_fn, pass data_collator=DeltaMemDataCollator(tokenizer) and "
    "remove_unused_columns=False (with TRL also dataset_kwargs={'skip_prepare_dataset': True}); see "
    "docs/training.md. To train on such batches on purpose, use MemoryHealthCallback(require_memory_stream=False)."
)


def check_remove_unused_columns(args) -> None:
    """Raise ``ValueError`` if ``args.remove_unused_columns`` is set (the Trainer would drop the memory columns)."""
    if getattr(args, "remove_unused_columns", False):
        raise ValueError(REMOVE_UNUSED_COLUMNS_ERROR)


# ------------------------------------------------------------------------------------------ measurement


@dataclass
class MemoryHealth:
    """Memory statistics of one episode (see :func:`measure_memory_health`).

    Attributes:
        write_gate_mean: mean write gate β over the written tokens (segments for SSW) of every layer, or None
            when the batch has no memory stream.
        state_norm: mean over layers and over rows with a memory stream of the Frobenius norm of the memory
            state (all state heads of a layer together).
        state_norm_max: the largest such norm.
        correction_ratio: mean over layers and corrected projections of ``‖correction‖ / ‖base output‖``
            (Frobenius norms over the visible stream's real tokens), or None without visible tokens.
        correction_ratios: the same per projection slot (``"q"``, ``"k"``, ``"v"``, ``"o"`` or fused ``"qkv"``).
        per_layer: per layer name: ``state_norm`` and ``correction_ratio_<slot>``.
    """

    write_gate_mean: float | None
    state_norm: float
    state_norm_max: float
    correction_ratio: float | None
    correction_ratios: dict[str, float] = field(default_factory=dict)
    per_layer: dict[str, dict[str, float]] = field(default_factory=dict)

    def as_logs(self, prefix: str = "delta_mem/") -> dict[str, float]:
        """Flat ``{name: value}`` for ``Trainer.log`` (None values are left out)."""
        logs = {"state_norm": self.state_norm, "state_norm_max": self.state_norm_max}
        if self.write_gate_mean is not None:
            logs["write_gate_mean"] = self.write_gate_mean
        if self.correction_ratio is not None:
            logs["correction_ratio"] = self.correction_ratio
            logs.update({f"correction_ratio_{slot}": v for slot, v in self.correction_ratios.items()})
        return {prefix + k: v for k, v in logs.items()}


def _tuner(model: nn.Module) -> DeltaMemModel:
    tuner = model.base_model if isinstance(model, PeftModel) else model
    if not isinstance(tuner, DeltaMemModel):
        raise TypeError(
            f"expected a δ-mem PeftModel (get_peft_model(base, DeltaMemConfig(...))), got {type(model).__name__} "
            f"wrapping {type(tuner).__name__}"
        )
    return tuner


def _corrected_slots(layer: DeltaMemLayer, adapter: str) -> list[str]:
    heads = layer.settings[adapter].delta_heads
    if "qkv" in layer.layout.projections:
        return (["qkv"] if any(h in heads for h in "qkv") else []) + (["o"] if "o" in heads else [])
    return list(heads)


class _CorrectionProbe:
    """A forward hook on each corrected projection: its output, with the correction the δ-mem layer added to it."""

    def __init__(self, layers: list[DeltaMemLayer], adapter: str, valid: torch.Tensor | None) -> None:
        self.valid = valid
        self.ratios: dict[tuple[str, str], float] = {}
        self.handles = []
        for layer in layers:
            for slot in _corrected_slots(layer, adapter):
                projection = getattr(layer.base_layer, layer.layout.projections[slot])
                key = (layer.layer_name, slot)
                self.handles.append(projection.register_forward_hook(functools.partial(self._measure, layer, key)))

    def _measure(self, layer: DeltaMemLayer, key, module, inputs, output) -> None:
        correction = layer.running_correction(key[1])
        if correction is None:
            return
        delta = correction.detach().float().expand_as(output)
        base = output.detach().float() - delta
        if self.valid is not None:
            valid = self.valid.to(base.device)
            base, delta = base[valid], delta[valid]
        denominator = base.norm().item()
        self.ratios[key] = delta.norm().item() / denominator if denominator > 0 else math.nan

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _call_kwargs(kwargs: dict) -> dict:
    return {**{k: v for k, v in kwargs.items() if v is not None}, "use_cache": False}


@torch.no_grad()
def measure_memory_health(
    model: nn.Module, batch: Mapping[str, torch.Tensor], adapter_name: str | None = None
) -> MemoryHealth:
    """Run one episode of ``batch`` without gradients and measure the memory.

    The memory stream (``memory_input_ids``, ``memory_attention_mask``, ``memory_segment_ids``) is written into
    an empty memory, then the visible stream (``input_ids``, ``attention_mask``) is read with writes off, as in a
    training episode but in eval mode (no dropout), into a memory of its own; the model's train/eval
    mode is restored. Cost: one forward of each stream, no backward.

    Args:
        model: the δ-mem ``PeftModel`` (or its ``DeltaMemModel``).
        batch: a training batch (e.g. from ``DeltaMemDataCollator``) on the model's device; ``labels`` and other
            keys are ignored.
        adapter_name: the adapter to measure (default: the active one).
    """
    tuner = _tuner(model)
    adapter = tuner._adapter(adapter_name)
    layers = [m for m in model.modules() if isinstance(m, DeltaMemLayer) and adapter in m.settings]
    runtime = tuner.memory_runtime
    memory_ids = batch.get("memory_input_ids")
    memory_mask = batch.get("memory_attention_mask")
    has_memory = memory_ids is not None and memory_ids.shape[1] > 0
    visible_mask = batch.get("attention_mask")
    with _eval_mode(model):
        memory = tuner.new_memory(batch["input_ids"].shape[0], adapter)
        gates: list[torch.Tensor] = []
        if has_memory:
            write = CallRecord(
                attention_mask=memory_mask,
                segment_ids=batch.get(SEGMENT_IDS_KWARG),
                write_mask=None,
                writes=True,
                write_gate_stats=gates,
                memory=memory,
                memory_version=memory._snapshot()[1],
            )
            runtime.run_memory_stream(tuner.model, memory_ids, memory_mask, write)  # commits into `memory`
        states = memory.states
        probe = _CorrectionProbe(layers, adapter, visible_mask.bool() if visible_mask is not None else None)
        try:
            model(**_call_kwargs({k: batch.get(k) for k in _VISIBLE_KEYS}), memory=memory, memory_writes=False)
        finally:
            probe.remove()
    return _summarise(layers, gates, states, memory_mask if has_memory else None, probe, visible_mask)


def _summarise(layers, gates, states, memory_mask, probe, visible_mask) -> MemoryHealth:
    per_layer: dict[str, dict[str, float]] = {layer.layer_name: {} for layer in layers}
    norms = []
    for name, state in states.items():
        rows = state.flatten(1).norm(dim=1)  # Frobenius norm of each row's (H, r, r) state
        if memory_mask is not None:
            rows = rows[memory_mask.bool().any(dim=1).to(rows.device)]
        if rows.numel():
            per_layer[name]["state_norm"] = rows.mean().item()
            norms.append(rows)
    all_norms = torch.cat(norms) if norms else torch.zeros(1)
    state_norm = float(torch.stack([n.mean() for n in norms]).mean()) if norms else 0.0
    by_slot: dict[str, list[float]] = {}
    for (name, slot), ratio in probe.ratios.items():
        per_layer[name][f"correction_ratio_{slot}"] = ratio
        by_slot.setdefault(slot, []).append(ratio)
    has_visible = visible_mask is None or bool(visible_mask.any())
    ratios = [r for values in by_slot.values() for r in values if not math.isnan(r)]
    return MemoryHealth(
        write_gate_mean=float(torch.stack([g.float() for g in gates]).mean()) if gates else None,
        state_norm=state_norm,
        state_norm_max=float(all_norms.max()),
        correction_ratio=sum(ratios) / len(ratios) if ratios and has_visible else None,
        correction_ratios={slot: sum(v) / len(v) for slot, v in by_slot.items()} if has_visible else {},
        per_layer=per_layer,
    )


# ---------------------------------------------------------------------------------------------- callback


class MemoryHealthCallback(TrainerCallback):
    """Refuses ``remove_unused_columns=True`` and logs memory health at the Trainer's logging steps.

    At every optimizer step where the Trainer logs (``logging_steps``), or every ``every_n_steps`` steps if
    given, it runs :func:`measure_memory_health` on a probe batch: the one given here, or else the last
    training micro-batch the model saw (captured by a forward pre-hook, so no extra data is drawn). The values
    (``delta_mem/write_gate_mean``, ``delta_mem/state_norm``, ``delta_mem/state_norm_max``,
    ``delta_mem/correction_ratio`` and ``delta_mem/correction_ratio_<slot>``) are added to the next log
    entry: the console/progress bar, ``trainer.state.log_history`` and ``trainer_state.json``.

    transformers runs the reporting integrations (TensorBoard, W&B, …) *before* callbacks passed to the
    Trainer; to send the values to them too, add the callback with :func:`add_memory_health_callback`.

    Args:
        probe_batch: a fixed batch to measure (moved to the model's device); None: the last training batch.
        every_n_steps: measure every n optimizer steps instead of at the logging steps.
        check_columns: run :func:`check_remove_unused_columns` when the Trainer is built and when training starts.
        require_memory_stream: raise ``ValueError`` when a training forward has neither ``memory_input_ids`` (an
            episode, as from ``DeltaMemDataCollator``) nor ``memory=``: the Trainer is then not feeding episodes.
        adapter_name: adapter to measure (default: the active one).
        prefix: prefix of the logged names.
    """

    def __init__(
        self,
        probe_batch: Mapping[str, torch.Tensor] | None = None,
        every_n_steps: int | None = None,
        check_columns: bool = True,
        adapter_name: str | None = None,
        prefix: str = "delta_mem/",
        require_memory_stream: bool = True,
    ) -> None:
        check_bool(check_columns, "check_columns")
        check_bool(require_memory_stream, "require_memory_stream")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1 or None, got {every_n_steps}")
        self.probe_batch = dict(probe_batch) if probe_batch is not None else None
        self.every_n_steps = every_n_steps
        self.check_columns = check_columns
        self.require_memory_stream = require_memory_stream
        self.adapter_name = adapter_name
        self.prefix = prefix
        self.last: MemoryHealth | None = None
        self._pending: dict[str, float] | None = None
        self._last_batch: dict[str, torch.Tensor] | None = None
        self._hook = None

    def on_init_end(self, args, state, control, **kwargs):
        if self.check_columns:
            check_remove_unused_columns(args)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.check_columns:
            check_remove_unused_columns(args)
        if model is not None and self._hook is None:
            _tuner(model)  # fail early on a model that is not δ-mem
            self._hook = model.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if (
            self.require_memory_stream
            and module.training
            and torch.is_grad_enabled()
            and kwargs.get("memory_input_ids") is None
            and kwargs.get("memory") is None
        ):
            raise ValueError(NO_MEMORY_STREAM_ERROR)
        if module.training and kwargs.get("memory_input_ids") is not None:
            keep = MEMORY_COLUMNS + _VISIBLE_KEYS
            self._last_batch = {k: kwargs[k] for k in keep if kwargs.get(k) is not None}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        due = state.global_step % self.every_n_steps == 0 if self.every_n_steps else control.should_log
        batch = self._probe(model) if due and model is not None else None
        if batch is not None:
            self.last = measure_memory_health(model, batch, self.adapter_name)
            self._pending = self.last.as_logs(self.prefix)

    def _probe(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        if self.probe_batch is None:
            return self._last_batch
        device = next(p.device for p in model.parameters())
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.probe_batch.items()}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending is None or logs is None or "loss" not in logs:
            return
        logs.update(self._pending)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._pending)
        self._pending = None

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._last_batch = None


def add_memory_health_callback(trainer, callback: MemoryHealthCallback | None = None) -> MemoryHealthCallback:
    """Add a :class:`MemoryHealthCallback` ahead of the reporting integrations, so they receive its values too.

    Also checks ``remove_unused_columns`` right away (the callback was not there when the Trainer was built).
    """
    callback = callback or MemoryHealthCallback()
    if callback.check_columns:
        check_remove_unused_columns(trainer.args)
    callbacks = trainer.callback_handler.callbacks
    # after DefaultFlowCallback, which decides control.should_log before the other callbacks' on_step_end
    position = next((i + 1 for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)), 0)
    callbacks.insert(position, callback)
    return callback
