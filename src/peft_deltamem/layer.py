"""The δ-mem tuner layer: wraps one attention block, owns its memory parameters and state."""

from __future__ import annotations

import functools
import math
import threading
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.nn.modules import module as _torch_module

from . import ops
from .architectures import AttentionLayout
from .config import DeltaMemConfig
from .runtime import CALL_KWARG, CallRecord, MemoryRuntime

MERGE_ERROR = (
    "δ-mem adapters cannot be merged into the base weights: their corrections depend on the memory state, "
    "which changes with every token the model reads. Keep the adapter loaded (it costs ~0.1% extra compute), "
    "or call unload() to get the plain base model back."
)


def _thread_key() -> int:
    """Which thread's corrections a projection adds. Under torch.compile the corrections flow through the
    traced graph (the dict is only the tracing device), so one constant key serves every thread."""
    return 0 if torch.compiler.is_compiling() else threading.get_ident()


# torch's registries of global module hooks (register_module_forward_hook & co.); where a torch version lacks
# them, every adapter Linear keeps the module call
_GLOBAL_HOOKS = tuple(
    getattr(_torch_module, name, None)
    for name in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")
)  # fmt: skip
_DIRECT_LINEAR = all(isinstance(hooks, dict) for hooks in _GLOBAL_HOOKS)


def _hook_free(module: nn.Module) -> bool:
    """Nothing is registered on ``module`` or for every module: ``nn.Module.__call__`` would only call its forward."""
    return (
        _DIRECT_LINEAR
        and not (module._forward_hooks or module._forward_pre_hooks)
        and not (module._backward_hooks or module._backward_pre_hooks)
        and not any(_GLOBAL_HOOKS)
    )


def _direct(module: nn.Module) -> bool:
    """A plain ``nn.Linear`` with no hooks: nothing gathers, shards or observes it, so it can be applied directly.
    Sharding wrappers (FSDP2 replaces the class, ZeRO-3 registers hooks) and user hooks keep the module call."""
    return (
        type(module) is nn.Linear
        and "forward" not in module.__dict__  # a forward set on the module (accelerate's hooks)
        and _hook_free(module)
    )


def _linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for one of the adapter's Linear layers, without the module call's dispatch when it is plain
    (a few µs per layer and token)."""
    if _direct(module):
        return F.linear(x, module.weight, module.bias)
    return module(x)


def _call(module: nn.Module, args: tuple, kwargs: dict):
    """``module(*args, **kwargs)``; a module without hooks (the wrapped attention block, as a rule) gets its forward
    called directly, as ``nn.Module.__call__`` does then, without its dispatch (a few µs per layer and token)."""
    if _hook_free(module) and not torch._C._get_tracing_state():
        return module.forward(*args, **kwargs)
    return module(*args, **kwargs)


def _query_rows(module: nn.Module, x: torch.Tensor, rows: int) -> torch.Tensor:
    """The first ``rows`` outputs of the memory projection (the query block: all that a call that only reads
    needs), computed alone for a plain Linear; other modules (quantized, sharded, hooked) run whole, then sliced."""
    if _direct(module):
        return F.linear(x, module.weight[:rows], module.bias[:rows] if module.bias is not None else None)
    return module(x)[..., :rows]


def _span_projection(module: nn.Module, x: torch.Tensor, rows: int, start: int, end: int):
    """The memory projection of a call that writes only at positions ``start:end``: the query block (the first
    ``rows`` outputs) at every position and the key, value and gate blocks inside the span, computed alone for a plain
    Linear; other modules (quantized, sharded, hooked) run whole, then sliced."""
    if _direct(module):
        rest = F.linear(x[:, start:end], module.weight[rows:], module.bias[rows:] if module.bias is not None else None)
        return _query_rows(module, x, rows), rest
    projected = module(x)
    return projected[..., :rows], projected[:, start:end, rows:]


def _read_rows(rows: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """The (batch,) float mask of rows that read the memory (``memory_reads``; empty: no row reads)."""
    if rows.numel() == 0:
        return torch.zeros(batch, device=device)
    if rows.shape[0] != batch:
        raise ValueError(
            f"memory_reads has {rows.shape[0]} entries but the call has {batch} batch rows; pass one bool per row."
        )
    return rows.to(device=device, dtype=torch.float32)


@dataclass(frozen=True)
class AdapterSettings:
    """The per-adapter numbers a layer needs at run time (derived from the config)."""

    r: int
    num_state_heads: int
    delta_heads: tuple[str, ...]
    scaling: float
    write_granularity: str
    segment_read: str
    config_hash: str
    head_sizes: tuple[int, ...] = ()  # output width of each Δ head, in delta_heads order
    read_gate: bool = False

    @property
    def width(self) -> int:
        return self.r * self.num_state_heads


class DeltaMemLayer(nn.Module, BaseTunerLayer):
    """Wraps an attention module; adds ``scale * Δ_h read_t`` to the outputs of its projections.

    Parameters per adapter (each container is keyed by adapter name):

    - ``delta_mem_write``: one Linear ``d -> 4·r·H`` whose row blocks are W_mq, W_mk, W_mv and W_β;
      one GEMM computes every memory projection and the gate.
    - ``delta_mem_beta_bias``: the write-gate bias b_β (r·H).
    - ``delta_mem_out``: one Linear ``r·H -> Σ out_features`` stacking the Δ heads in q, k, v, o order.
    - ``delta_mem_read_gate`` (only with ``read_gate=True``): one Linear ``d -> H`` with bias; each token's read of
      state head h is scaled by ``2·sigmoid(.)_h``.

    The layer holds no memory: each call brings its input state in the call record (``delta_mem_call``)
    and leaves its final state there; the caller's ``DeltaMemory`` receives it when the call completes.
    """

    adapter_layer_names = ("delta_mem_write", "delta_mem_beta_bias", "delta_mem_out", "delta_mem_read_gate")
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, layout: AttentionLayout, runtime: MemoryRuntime, name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.delta_mem_write = nn.ModuleDict()
        self.delta_mem_beta_bias = nn.ParameterDict()
        self.delta_mem_out = nn.ModuleDict()
        self.delta_mem_read_gate = nn.ModuleDict()
        self.settings: dict[str, AdapterSettings] = {}
        self.layout = layout
        self.runtime = runtime
        self.layer_name = name
        # thread id -> the corrections of the call running in that thread (threads may share one model)
        self._corrections: dict[int, dict[str, tuple[torch.Tensor, float]]] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self._corrected: set[str] = set()  # projection slots whose forward adds a correction (some adapter corrects)
        runtime.register_layer(name, self)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            # decoder layers read attributes such as `is_sliding` or `layer_idx` from their attention module
            return getattr(self.base_layer, name)

    # ----------------------------------------------------------------------------------------- set-up

    @property
    def in_features(self) -> int:
        """The hidden size the wrapped attention block reads (peft's generic checks read it)."""
        return self.layout.hidden_size

    @property
    def out_features(self) -> int:
        """The hidden size the wrapped attention block writes (its output projection's width)."""
        return self.layout.out_features["o"] if "o" in self.layout.out_features else self.layout.hidden_size

    def update_layer(self, adapter_name: str, config: DeltaMemConfig) -> None:
        hidden = self.layout.hidden_size
        if config.r > hidden:
            raise ValueError(
                f"DeltaMemConfig.r={config.r} is larger than the hidden size of {self.layer_name} ({hidden}): the "
                f"memory's key and value projections map the hidden state to r dimensions, so r above the hidden size "
                f"adds no capacity, only parameters (and memory: r·r per state head). Use r <= {hidden} (the paper "
                "uses r much smaller than the hidden size, e.g. 8-64)."
            )
        settings = AdapterSettings(
            r=config.r,
            num_state_heads=config.num_state_heads,
            delta_heads=tuple(config.delta_heads),
            scaling=config.scaling,
            write_granularity=config.write_granularity,
            segment_read=config.segment_read,
            config_hash=config.fingerprint(),
            head_sizes=tuple(self.layout.head_out_features(h) for h in config.delta_heads),
            read_gate=config.read_gate,
        )
        width, d = settings.width, self.layout.hidden_size
        out_features = sum(self.layout.head_out_features(h) for h in settings.delta_heads)
        self.delta_mem_write[adapter_name] = nn.Linear(d, 4 * width, bias=False)
        self.delta_mem_beta_bias[adapter_name] = nn.Parameter(torch.empty(width))
        self.delta_mem_out[adapter_name] = nn.Linear(width, out_features, bias=False)
        if config.read_gate:
            self.delta_mem_read_gate[adapter_name] = nn.Linear(d, settings.num_state_heads, bias=True)
        self.settings[adapter_name] = settings
        self.runtime.configs[adapter_name] = config
        self.runtime.changed()
        self._correct_projections(settings)
        self.reset_parameters(adapter_name, config)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    @torch.no_grad()
    def reset_parameters(self, adapter_name: str, config: DeltaMemConfig) -> None:
        write = self.delta_mem_write[adapter_name].weight
        if write.device.type == "meta":
            return
        width = self.settings[adapter_name].width
        bound = 1.0 / math.sqrt(self.layout.hidden_size)  # kaiming-uniform(a=√5), as nn.Linear
        write[: 3 * width].uniform_(-bound, bound)
        write[3 * width :].zero_()  # W_β = 0: every token starts with the same gate sigmoid(b_β)
        self.delta_mem_beta_bias[adapter_name].fill_(config.beta_bias_init)
        out = self.delta_mem_out[adapter_name].weight
        if config.init_weights:
            out.zero_()  # Δ heads at zero: the adapter is an exact no-op until trained
        else:
            out.normal_(0.0, 0.02)
        if adapter_name in self.delta_mem_read_gate:
            for p in self.delta_mem_read_gate[adapter_name].parameters():
                p.zero_()  # g = 2·sigmoid(0) = 1: the read as without a gate until trained

    def _apply(self, fn, recurse: bool = True):
        # A base built on the meta device and materialised with to_empty() gets uninitialised memory
        # parameters; initialise them again once they have real storage.
        was_meta = {
            adapter
            for adapter in self.settings
            if adapter in self.delta_mem_write and self.delta_mem_write[adapter].weight.device.type == "meta"
        }
        result = super()._apply(fn, recurse)
        for adapter in was_meta:
            if self.delta_mem_write[adapter].weight.device.type != "meta" and adapter in self.runtime.configs:
                self.reset_parameters(adapter, self.runtime.configs[adapter])
        return result

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        # The wrapped attention has no weight of its own; follow its first projection.
        projection = getattr(self.base_layer, next(iter(self.layout.projections.values())))
        proj_device, proj_dtype = self._get_base_layer_device_and_dtype(projection)
        target = device if device is not None else proj_device
        if target is None:
            return
        dtype = proj_dtype if proj_dtype is not None and proj_dtype.is_floating_point else None
        for name in self.adapter_layer_names:
            container = getattr(self, name)
            if adapter_name not in container:
                continue
            item = container[adapter_name]
            params = [item] if isinstance(item, nn.Parameter) else list(item.parameters())
            if any(p.device.type == "meta" for p in params):
                continue  # low_cpu_mem_usage: the weights arrive later with the state dict
            container[adapter_name] = item.to(target, dtype=dtype) if dtype is not None else item.to(target)

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        gate = self.delta_mem_read_gate[adapter_name] if adapter_name in self.delta_mem_read_gate else None
        return [
            *self.delta_mem_write[adapter_name].parameters(),
            self.delta_mem_beta_bias[adapter_name],
            *self.delta_mem_out[adapter_name].parameters(),
            *(gate.parameters() if gate is not None else ()),
        ]

    def fingerprint_tensors(self, adapter_name: str) -> tuple[torch.Tensor, ...]:
        """The adapter's parameters, read straight from the module dicts (what the weights fingerprint hashes;
        it runs once per call, so it avoids the generic accessors). Same tensors as :meth:`adapter_parameters`."""
        try:
            gate = self._modules["delta_mem_read_gate"]._modules.get(adapter_name)
            return (
                self._modules["delta_mem_write"]._modules[adapter_name]._parameters["weight"],
                self._modules["delta_mem_beta_bias"]._parameters[adapter_name],
                self._modules["delta_mem_out"]._modules[adapter_name]._parameters["weight"],
                *((gate._parameters["weight"], gate._parameters["bias"]) if gate is not None else ()),
            )
        except (KeyError, AttributeError):  # wrapped or replaced containers (e.g. sharding wrappers)
            return tuple(self.adapter_parameters(adapter_name))

    def state_device(self, adapter_name: str) -> torch.device:
        device = self.delta_mem_write[adapter_name].weight.device
        return torch.device("cpu") if device.type == "meta" else device

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(MERGE_ERROR)

    def unmerge(self) -> None:
        # Nothing can be merged (merge() refuses), so there is never anything to unmerge; warn as LoRA does.
        warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)

    def _correct_projections(self, settings: AdapterSettings) -> None:
        """Each projection that one of the adapter's Δ heads corrects gets a forward that adds the running call's
        correction for its slot to its output (the others keep theirs: no cost). The forward is set on the
        projection module itself, as accelerate's hooks do, so the model's modules and state dict stay as they are;
        the module's own hooks run around it and see the corrected output."""
        fused = "qkv" in self.layout.projections
        slots = {"qkv" if fused and head in "qkv" else head for head in settings.delta_heads}
        for slot in sorted(slots - self._corrected):
            child = getattr(self.base_layer, self.layout.projections[slot])
            child.forward = functools.partial(_corrected_forward, self, slot, child, child.__dict__.get("forward"))
            self._corrected.add(slot)

    def restore_projections(self) -> None:
        """Give the projections their own forward back."""
        for child_name in self.layout.projections.values():
            child = getattr(self.base_layer, child_name)
            forward = child.__dict__.get("forward")
            ours = isinstance(forward, functools.partial) and forward.func is _corrected_forward
            if ours and forward.args[0] is self:
                if forward.args[3] is None:
                    del child.forward
                else:
                    child.forward = forward.args[3]
        self._corrected.clear()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.settings.pop(adapter_name, None)
        self.runtime.changed()

    # ---------------------------------------------------------------------------------------- forward

    def forward(self, *args, **kwargs):
        # The per-token path of decoding: module dicts are read directly (not through nn.Module.__getattr__) and
        # per-call values come from the call record, so a step costs the memory's few tensor ops, not Python.
        record: CallRecord | None = kwargs.pop(CALL_KWARG, None)
        base_layer = self._modules["base_layer"]
        if self._disable_adapters:
            return base_layer(*args, **kwargs)
        active = self._active_adapter
        writes = self._modules["delta_mem_write"]._modules
        adapters = [a for a in ((active,) if isinstance(active, str) else active) if a in writes]
        if not adapters:
            return base_layer(*args, **kwargs)
        record = record or self.runtime.current_record()
        if record is None:
            raise RuntimeError(
                f"The δ-mem layer {self.layer_name} ran outside a forward call of its model. Call the PEFT model "
                "(or the model returned by get_peft_model / load_adapter) rather than an inner submodule."
            )
        hidden = args[0] if args else kwargs["hidden_states"]
        if len(adapters) == 1:
            corrections = self._corrections_for(adapters[0], hidden, record)
        else:
            corrections: dict[str, tuple[torch.Tensor, float]] = {}
            for adapter in adapters:
                for slot, (value, scale) in self._corrections_for(adapter, hidden, record).items():
                    if slot in corrections:  # several active adapters: their scaled corrections add up
                        total, total_scale = corrections[slot]
                        corrections[slot] = (total * total_scale + value * scale, 1.0)
                    else:
                        corrections[slot] = (value, scale)
        thread = _thread_key()
        outer = self._corrections.get(thread)
        self._corrections[thread] = corrections
        try:
            return _call(base_layer, args, kwargs)
        finally:
            if outer is None:
                self._corrections.pop(thread, None)
            else:
                self._corrections[thread] = outer

    def running_correction(self, slot: str) -> torch.Tensor | None:
        """What the call running in this thread adds to projection ``slot``'s output (scaled; in the correction's
        dtype, which the projection casts to its output's), or None outside a call (diagnostics: training.callbacks)."""
        corrections = self._corrections.get(_thread_key())
        if corrections is None or slot not in corrections:
            return None
        value, scale = corrections[slot]
        return value * scale

    def _corrections_for(
        self, adapter: str, hidden: torch.Tensor, record: CallRecord
    ) -> dict[str, tuple[torch.Tensor, float]]:
        """Each corrected slot's correction and its scale (the projection adds ``scale * correction``; a decoding
        step's correction is scaled already, with scale 1.0)."""
        settings = self.settings[adapter]
        write = self._modules["delta_mem_write"]._modules[adapter]
        out_proj = self._modules["delta_mem_out"]._modules[adapter]
        dtype = write._parameters["weight"].dtype if type(write) is nn.Linear else write.weight.dtype
        x = hidden if hidden.dtype == dtype else hidden.to(dtype)
        batch, length, _ = x.shape
        valid = record.token_mask(batch, length, x.device)
        state = self._input_state(adapter, record, batch, x.device)
        key = (self.layer_name, adapter)
        if length == 1 and self._takes_token_step(settings, record):
            # the decoding step, on (batch, features) tensors: see ops.token_read
            x = x.reshape(batch, -1)
            if record.writes:
                write_mask = valid if record.write_mask is None else self._write_mask(valid, record, batch, 1)
                projected = _linear(write, x)
                read = ops.token_read(projected, state, settings.scaling)
                # the write waits for the end of the call, where every layer's runs at once (ops.token_write)
                beta_bias = self._modules["delta_mem_beta_bias"]._parameters[adapter]
                record.pending_writes[key] = (projected, beta_bias, state, write_mask)
            else:  # the query block is all a read needs
                read = ops.token_read(_query_rows(write, x, settings.width), state, settings.scaling)
                record.final_states[key] = state if record.keep_graph else state.detach()
            if valid is not None:
                read = read * valid.view(batch, 1)
            if record.read_rows is not None:
                read = read * _read_rows(record.read_rows, batch, read.device).view(batch, 1)
            if settings.read_gate:
                read = self._gate(adapter, x.view(batch, 1, -1), read.view(batch, 1, -1), settings).view(batch, -1)
            out = _linear(out_proj, read if read.dtype == dtype else read.to(dtype))
            # scaled already (by the read); one row's correction is 1-D: a plain projection adds it as its bias
            return self._split_heads(out.view(-1) if batch == 1 else out.view(batch, 1, -1), settings, 1.0)
        if settings.write_granularity == "segment":  # the tokens only read: the query block is all they need
            reads, final = self._segment_scan(adapter, x, _query_rows(write, x, settings.width), state, valid, record)
        else:
            reads, final = self._token_scan(adapter, write, x, state, valid, record)
        record.final_states[key] = final if record.keep_graph else final.detach()
        if valid is not None:
            reads = reads * valid[:, None, :, None]
        if record.read_rows is not None:
            reads = reads * _read_rows(record.read_rows, batch, reads.device).view(batch, 1, 1, 1)
        reads = reads.transpose(1, 2).reshape(batch, length, settings.width)
        if settings.read_gate:
            reads = self._gate(adapter, x, reads, settings)
        return self._split_heads(_linear(out_proj, reads.to(dtype)), settings)

    def _gate(self, adapter: str, x: torch.Tensor, reads: torch.Tensor, settings: AdapterSettings) -> torch.Tensor:
        """``reads`` (B, T, H·r) scaled per token and state head by the read gate ``2·sigmoid(W_g x + b_g)``."""
        gate = 2.0 * torch.sigmoid(_linear(self._modules["delta_mem_read_gate"]._modules[adapter], x).float())
        batch, length, _ = reads.shape
        heads = settings.num_state_heads
        return (reads.view(batch, length, heads, settings.r) * gate.unsqueeze(-1)).view(batch, length, -1)

    @staticmethod
    def _takes_token_step(settings: AdapterSettings, record: CallRecord) -> bool:
        """A decoding step that the per-token functions compute exactly (see ops.token_read, ops.token_write): a
        token-write layer's, or any layer's that only reads."""
        return (settings.write_granularity == "token" or not record.writes) and record.takes_token_step()

    def _input_state(self, adapter: str, record: CallRecord, batch: int, device: torch.device) -> torch.Tensor:
        # Recorded once per call, so a recomputed (checkpointed) layer reads the same state.
        key = (self.layer_name, adapter)
        if key in record.input_states:
            return record.input_states[key]
        state = record.initial.get(key)
        settings = self.settings[adapter]
        if state is None:
            state = torch.zeros(batch, settings.num_state_heads, settings.r, settings.r, device=device)
        elif state.shape[0] != batch:
            raise ValueError(
                f"The δ-mem memory of adapter {adapter!r} holds {state.shape[0]} batch rows but this call has "
                f"{batch}. A memory is never reshaped: use model.new_memory(batch_size), mem.select(rows) or "
                "DeltaMemory.cat([...])."
            )
        state = state.to(device)
        record.input_states[key] = state
        return state

    def _heads(self, projected: torch.Tensor, settings: AdapterSettings) -> torch.Tensor:
        batch, length, _ = projected.shape
        return projected.view(batch, length, settings.num_state_heads, settings.r).transpose(1, 2)

    def _write_mask(
        self, valid: torch.Tensor | None, record: CallRecord, batch: int, length: int
    ) -> torch.Tensor | None:
        user = record.tail(record.write_mask, batch, length, "memory_write_mask")
        if user is None:
            return valid
        user = user.to(device=valid.device if valid is not None else user.device, dtype=torch.bool)
        return user if valid is None else valid & user

    def _token_scan(self, adapter, write, x, state, valid, record):
        """Reads and final state of a token-write call: the scan runs over the span of positions at which some row
        writes (:meth:`CallRecord.write_span`); the positions before it read the input state, those after it the
        final one, and only their query block is projected."""
        settings = self.settings[adapter]
        width, length = settings.width, x.shape[1]
        if not record.writes:
            q = F.normalize(torch.tanh(self._heads(_query_rows(write, x, width), settings)), dim=-1)
            return ops.read_only(q, state), state
        write_mask = self._write_mask(valid, record, x.shape[0], length)
        start, end = (0, length) if record.track_steps else record.write_span(write_mask, length)
        if (start, end) == (0, length):
            projected = _linear(write, x)
            query, rest = projected[..., :width], projected[..., width:]
        else:
            query, rest = _span_projection(write, x, width, start, end)
            write_mask = write_mask[:, start:end]
        q = F.normalize(torch.tanh(self._heads(query, settings)), dim=-1)
        k, v, gate = (self._heads(p, settings) for p in rest.split(width, dim=-1))
        k = F.normalize(torch.tanh(k), dim=-1)
        beta = torch.sigmoid(gate + self.delta_mem_beta_bias[adapter].view(settings.num_state_heads, 1, settings.r))
        self._report_write_gate(record, beta, write_mask)
        if record.track_steps and length > 1:  # assisted decoding may roll back some of these tokens
            states, final = ops.delta_rule_states(k, v, beta, state, write_mask)
            record.step_states[(self.layer_name, adapter)] = states.detach()
            return torch.einsum("bhtij,bhtj->bhti", states, q.float()), final
        if (start, end) == (0, length):
            return ops.delta_rule(q, k, v, beta, state, write_mask)
        if start == end:  # no row writes: the state stays as it is
            return ops.read_only(q, state), state
        reads, final = ops.delta_rule(q[:, :, start:end], k, v, beta, state, write_mask)
        before = [ops.read_only(q[:, :, :start], state)] if start > 0 else []
        after = [ops.read_only(q[:, :, end:], final)] if end < length else []
        return torch.cat([*before, reads, *after], dim=2), final

    @staticmethod
    def _report_write_gate(record: CallRecord, beta: torch.Tensor, write_mask: torch.Tensor | None) -> None:
        if record.write_gate_stats is None:
            return
        if write_mask is None:
            record.write_gate_stats.append(beta.float().mean())
            return
        weights = write_mask[:, None, :, None].to(beta.dtype).expand_as(beta)
        record.write_gate_stats.append((beta * weights).sum().float() / weights.sum().clamp(min=1).float())

    def _segment_scan(self, adapter, x, projected, state, valid, record):
        """SSW: each segment's mean hidden state is written once.

        A token reads the state before its own segment (``segment_read="before_segment"``) or, as in the
        authors' reference code, the state before the whole call (``segment_read="before_call"``).
        """
        settings = self.settings[adapter]
        width = settings.width
        batch, length, _ = x.shape
        q = F.normalize(torch.tanh(self._heads(projected[..., :width], settings)), dim=-1)
        if not record.writes:
            return ops.read_only(q, state), state
        ids = record.tail(record.segment_ids, batch, length, "memory_segment_ids")
        if ids is None:
            raise ValueError(
                "write_granularity='segment' needs per-token segment ids for every call that writes: pass "
                "memory_segment_ids=<(batch, length) ints, e.g. one id per chat message> to the forward call, or "
                "switch writes off for this call (memory_writes=False; for generate(), "
                "write_generated_tokens=False)."
            )
        ids = ids.to(x.device)
        writes = self._write_mask(valid, record, batch, length)
        if writes is None:
            writes = torch.ones(batch, length, dtype=torch.bool, device=x.device)
        positions = torch.arange(length, device=x.device).expand(batch, length)
        last_writer = torch.cummax(torch.where(writes, positions, -1), dim=1).values
        previous = torch.cat([last_writer.new_full((batch, 1), -1), last_writer[:, :-1]], dim=1)
        previous_ids = ids.gather(1, previous.clamp(min=0))
        starts = writes & ((previous < 0) | (ids != previous_ids))
        segment = torch.cumsum(starts.long(), dim=1) - 1  # segment in progress (or last started) at each token

        slot = torch.where(writes, segment, length).unsqueeze(-1)  # non-writing tokens go to a dump slot
        sums = x.new_zeros(batch, length + 1, x.shape[-1]).scatter_add(1, slot.expand_as(x), x)
        counts = x.new_zeros(batch, length + 1, 1).scatter_add(1, slot, torch.ones_like(slot, dtype=x.dtype))
        pooled = sums[:, :length] / counts[:, :length].clamp(min=1)
        segment_valid = counts[:, :length, 0] > 0

        pooled_projection = _linear(self.delta_mem_write[adapter], pooled)
        _, k, v, gate = (self._heads(p, settings) for p in pooled_projection.split(width, dim=-1))
        k = F.normalize(torch.tanh(k), dim=-1)
        beta = torch.sigmoid(gate + self.delta_mem_beta_bias[adapter].view(settings.num_state_heads, 1, settings.r))
        self._report_write_gate(record, beta, segment_valid)
        states, final = ops.delta_rule_states(k, v, beta, state, segment_valid)
        if settings.segment_read == "before_call":
            return ops.read_only(q, state), final
        index = (
            segment.clamp(min=0)
            .view(batch, 1, length, 1, 1)
            .expand(-1, settings.num_state_heads, -1, settings.r, settings.r)
        )
        before = states.gather(2, index)
        return torch.einsum("bhtij,bhtj->bhti", before, q.float()), final

    def _split_heads(
        self, out: torch.Tensor, settings: AdapterSettings, scale: float | None = None
    ) -> dict[str, tuple[torch.Tensor, float]]:
        """``{slot: (correction, scaling)}`` from the stacked Δ-head output (one slot per projection); ``scale``:
        the scaling to give each (default: the adapter's; 1.0 for an output that is scaled already)."""
        scale = settings.scaling if scale is None else scale
        if len(settings.delta_heads) == 1 and "qkv" not in self.layout.projections:
            return {settings.delta_heads[0]: (out, scale)}
        per_head = dict(zip(settings.delta_heads, out.split(settings.head_sizes, dim=-1)))
        if "qkv" not in self.layout.projections:
            return {head: (value, scale) for head, value in per_head.items()}
        corrections = {"o": (per_head["o"], scale)} if "o" in per_head else {}
        if any(h in per_head for h in "qkv"):
            parts = [
                per_head[h] if h in per_head else out.new_zeros(*out.shape[:-1], size)
                for h, size in zip("qkv", self.layout.fused_sizes)
            ]
            corrections["qkv"] = (torch.cat(parts, dim=-1), scale)
        return corrections


def _corrected_forward(layer: DeltaMemLayer, slot: str, module: nn.Module, own_forward, *args, **kwargs):
    """The forward of a projection one of ``layer``'s Δ heads corrects: the projection's own output (its class's
    forward, or the forward it had before, e.g. accelerate's) plus the correction the running call of ``layer``
    holds for ``slot`` (none outside a call: the projection's own output). A plain Linear without a bias takes a
    decoding step's correction of one row (1-D, scaled already) as its bias: one ``addmm``, no add."""
    corrections = layer._corrections.get(_thread_key())
    correction = None if corrections is None else corrections.get(slot)
    if own_forward is not None:
        output = own_forward(*args, **kwargs)
    elif type(module) is nn.Linear and not kwargs:
        weight, bias = module._parameters["weight"], module._parameters["bias"]
        if correction is not None and bias is None and correction[1] == 1.0:
            value = correction[0]
            if value.dim() == 1 and value.dtype == weight.dtype:
                return F.linear(args[0], weight, value)
        output = F.linear(args[0], weight, bias)
    else:
        output = type(module).forward(module, *args, **kwargs)
    if correction is None:
        return output
    value, scale = correction
    if value.dtype != output.dtype:
        value = value.to(output.dtype)
    return output.add(value, alpha=scale)


# peft may first have been imported from inside this module: finish δ-mem's registration now
from . import _register_if_ready  # noqa: E402

_register_if_ready()
