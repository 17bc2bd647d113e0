"""What each top-level forward call tells the δ-mem layers, and how its memory is committed.

A top-level forward pre-hook (outside every gradient-checkpointed region) builds a :class:`CallRecord`
from the call's keywords (``memory=``, ``memory_writes=``, masks) and passes it down as the
``delta_mem_call`` keyword, which transformers forwards to every attention module. Gradient
checkpointing re-runs a decoder layer with the *same* keywords, so a recomputed layer sees the same
record: the same token mask, the same input state and the same output slot (idempotent, see
docs/concepts.md). A forward hook commits the record's final states into the caller's
:class:`~peft_deltamem.state.DeltaMemory` once the call has completed: all layers at once, after one
finiteness check. Nothing of a call is kept in the model: the record lives only as long as the call.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import threading

import torch

from . import ops
from .state import DeltaMemory, all_finite

CALL_KWARG = "delta_mem_call"
MEMORY_KWARG = "memory"
WRITES_KWARG = "memory_writes"
SEGMENT_IDS_KWARG = "memory_segment_ids"
WRITE_MASK_KWARG = "memory_write_mask"
READS_KWARG = "memory_reads"

Key = tuple  # (layer name, adapter name)


class CallRecord:
    """Everything the layers need about one top-level forward call, and what they produced.

    A plain class, not a dataclass or a container: wrappers that rebuild the containers in a module's keywords
    (FSDP2 rebuilds dataclasses, dicts and lists holding tensors that need gradients, to hook its backward) must
    pass the record through as it is, since the layers write their final states into it for the caller.
    """

    __slots__ = (
        "attention_mask", "segment_ids", "write_mask", "writes", "initial", "keep_graph", "track_steps",
        "write_gate_stats", "memory", "memory_version", "generation", "past_length", "loss_terms", "input_states",
        "_final_states", "step_states", "previous", "weights_hash", "masks", "_token_step", "read_rows", "spans",
        "pending_writes",
    )  # fmt: skip

    def __init__(
        self,
        attention_mask: torch.Tensor | None,  # 2-D (batch, total length) or None: every token valid
        segment_ids: torch.Tensor | None,  # 2-D (batch, length) for segment writes
        write_mask: torch.Tensor | None,  # 2-D (batch, length) user write control
        writes: bool,  # False: nothing of this call is written
        keep_graph: bool = False,  # True: keep the autograd graph of the final state (the write half of an episode)
        track_steps: bool = False,  # True: keep the state before every token (assisted decoding rolls back)
        write_gate_stats: list | None = None,  # where layers report their mean write gate, when tracked
        memory: DeltaMemory | None = None,  # the caller's memory, committed when the call completes
        memory_version: int = 0,  # the memory's version when the call read it
    ) -> None:
        self.attention_mask = attention_mask
        self.segment_ids = segment_ids
        self.write_mask = write_mask
        self.writes = writes
        self.keep_graph = keep_graph
        self.track_steps = track_steps
        self.write_gate_stats = write_gate_stats
        self.initial: dict = {}  # (layer, adapter) -> state the call starts from (absent: empty)
        self.memory = memory
        self.memory_version = memory_version
        self.generation = None  # the generate() call this forward belongs to
        self.past_length = 0  # tokens already in the KV cache when this call started (generation)
        self.loss_terms: list = []  # added to this call's loss (write-sparsity penalty)
        self.input_states: dict = {}  # (layer, adapter) -> state read by the call
        self._final_states: dict = {}  # (layer, adapter) -> state after the call (see final_states)
        # (layer, adapter) -> (projection, gate bias, input state, write mask) of a decoding token's write, left by
        # the layer for the end of the call (ops.token_write, all layers at once)
        self.pending_writes: dict = {}
        self.step_states: dict = {}  # (layer, adapter) -> states before each token (track_steps)
        self.previous: CallRecord | None = None  # the thread's record before this call (nested calls)
        self.weights_hash: str | None = None  # fingerprint of the adapter weights, taken once by the memory check
        self.masks: dict = {}  # (batch, length, device) -> token_mask, computed once per call
        self.spans: dict = {}  # (batch, length, device) -> write_span, computed once per call
        self._token_step: bool | None = None
        # None: every row reads the memory; a (batch,) bool tensor: which rows read (memory_reads=)
        self.read_rows: torch.Tensor | None = None

    @property
    def final_states(self) -> dict:
        """(layer, adapter) -> the state after the call. The decoding writes the layers left pending run first."""
        if self.pending_writes:
            self._run_pending_writes()
        return self._final_states

    def _run_pending_writes(self) -> None:
        """The single-token writes of every layer, stacked into one :func:`ops.token_write` per kind of state
        (device, dtypes and shape; one for a model on one device)."""
        pending, self.pending_writes = self.pending_writes, {}
        groups: dict = {}
        for key, (projected, bias, state, mask) in pending.items():
            kind = (projected.device, projected.dtype, bias.dtype, state.dtype, state.shape, mask is None)
            groups.setdefault(kind, []).append((key, projected, bias, state, mask))
        for entries in groups.values():
            keys, projected, biases, states, masks = zip(*entries)
            batch = states[0].shape[0]
            finals = ops.token_write(
                torch.stack(projected).view(len(keys), batch, -1),
                torch.stack(biases),
                torch.stack(states),
                None if masks[0] is None else torch.stack(masks).view(len(keys), batch),
            )
            if not self.keep_graph:
                finals = finals.detach()
            self._final_states.update(zip(keys, finals.unbind(0)))

    def takes_token_step(self) -> bool:
        """Whether this call's single-token steps can take the decoding step (see ops.token_read): it only reads,
        or it writes (token-write layers) and keeps no per-token states or gate statistics; and the default scan
        implementation allows it. Decided once per call."""
        if self._token_step is None:
            self._token_step = (
                not self.writes or (not self.track_steps and self.write_gate_stats is None)
            ) and ops.token_step_enabled()
        return self._token_step

    def token_mask(self, batch: int, length: int, device: torch.device) -> torch.Tensor | None:
        """Bool (batch, length) mask of real tokens for the last ``length`` positions, or None (all real).

        Computed once per call (every layer asks the same); a CPU mask whose positions are all real gives None, so
        the layers skip the masking ops (on an accelerator that check would wait for the device: the mask stays)."""
        mask = self.attention_mask
        if mask is None:
            return None
        key = (batch, length, device)
        if key in self.masks:
            return self.masks[key]
        if mask.shape[0] != batch or mask.shape[1] < length:
            raise ValueError(
                f"attention_mask has shape {tuple(mask.shape)} but the attention block sees batch {batch} and "
                f"{length} new tokens; pass the 2-D attention_mask of the whole sequence."
            )
        valid = mask[:, -length:].to(device=device, dtype=torch.bool)
        if valid.device.type == "cpu" and not torch.compiler.is_compiling() and bool(valid.all()):
            valid = None
        self.masks[key] = valid
        return valid

    def write_span(self, write_mask: torch.Tensor | None, length: int) -> tuple[int, int]:
        """``(start, end)``: the positions from the first to the last at which some row writes (``write_mask`` is
        the layer's combined (batch, length) mask of written tokens; None: all write; ``(length, length)``: none).

        Outside it no row writes, so the layers project keys, values and gates and run the scan only inside it (the
        reads outside it are of the state before or after it). Computed once per call (every layer passes the same
        mask); on an accelerator it waits for the device once per call. Under torch.compile: the whole call."""
        if write_mask is None or torch.compiler.is_compiling():
            return 0, length
        key = (write_mask.shape[0], length, write_mask.device)
        if key not in self.spans:
            written = write_mask.any(0).nonzero().flatten().tolist()
            self.spans[key] = (written[0], written[-1] + 1) if written else (length, length)
        return self.spans[key]

    def tail(self, tensor: torch.Tensor | None, batch: int, length: int, name: str) -> torch.Tensor | None:
        if tensor is None:
            return None
        if tensor.shape[0] != batch or tensor.shape[1] < length:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}; expected (batch={batch}, length>={length}).")
        return tensor[:, -length:]


def check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__}).")
    return value


def check_reads(value) -> torch.Tensor | None:
    """``memory_reads``: True (every row reads the memory: None), False or a 1-D bool tensor of rows that read."""
    if value is True:
        return None
    if value is False:
        return torch.zeros(0, dtype=torch.bool)  # no row reads: expanded to the batch by the layers
    if isinstance(value, torch.Tensor) and value.dim() == 1 and value.dtype == torch.bool:
        return value
    raise TypeError(
        f"{READS_KWARG} must be True, False or a 1-D bool tensor with one entry per batch row (which rows read the "
        f"memory; the others still write), got {value!r}."
    )


def _mask_tensor(value, name: str) -> torch.Tensor | None:
    if value is None:
        return None
    if not isinstance(value, torch.Tensor) or value.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (batch, length) tensor, got {type(value).__name__}.")
    return value


class MemoryRuntime:
    """Shared by the δ-mem layers of one model: the layer registry and configs. Holds no call state.

    The only per-call data kept outside the call's keywords is thread-local: the current record (for
    attention modules that do not forward keywords) and the current generate() call.
    """

    def __init__(self) -> None:
        self.layers: dict[str, object] = {}  # module name -> DeltaMemLayer
        self.configs: dict[str, object] = {}  # adapter -> DeltaMemConfig
        self._local = threading.local()
        self._fingerprint_lock = threading.Lock()
        self._fingerprints: dict[str, tuple] = {}
        self._described: dict[str, tuple[list, dict]] = {}  # adapter -> (its layers, describe()), until changed()

    def register_layer(self, name: str, layer) -> None:
        self.layers[name] = layer
        self.changed()

    def unregister_layer(self, name: str) -> None:
        self.layers.pop(name, None)
        self.changed()

    def changed(self) -> None:
        """The layers or their adapters changed (added, updated, deleted): forget what was derived from them."""
        self._described.clear()

    def __deepcopy__(self, memo):
        clone = MemoryRuntime()
        memo[id(self)] = clone
        import copy

        clone.layers = copy.deepcopy(self.layers, memo)
        clone.configs = copy.deepcopy(self.configs, memo)
        return clone

    def __getstate__(self) -> dict:
        # Pickling (multiprocessing launchers, torch.save of a whole model) keeps the registry and configs; the
        # per-thread call state, the lock and the fingerprint cache belong to this process and start anew.
        return {"layers": self.layers, "configs": self.configs}

    def __setstate__(self, state: dict) -> None:
        self.__init__()
        self.layers = state["layers"]
        self.configs = state["configs"]

    # ------------------------------------------------------------------------------ thread-local state

    def current_record(self) -> CallRecord | None:
        return getattr(self._local, "record", None)

    @property
    def generation(self):
        return getattr(self._local, "generation", None)

    @generation.setter
    def generation(self, value) -> None:
        self._local.generation = value

    # ------------------------------------------------------------------------------------- adapters

    def adapter_layers(self, adapter: str) -> list:
        return list(self._adapter_info(adapter)[0])

    def _adapter_info(self, adapter: str) -> tuple[list, dict | None]:
        """The adapter's layers and description, derived once per change of the layers (calls ask every time)."""
        info = self._described.get(adapter)
        if info is None:
            layers = [layer for layer in self.layers.values() if adapter in layer.settings]
            description = None
            if layers:
                settings = layers[0].settings[adapter]
                description = {
                    "adapter_name": adapter,
                    "r": settings.r,
                    "num_state_heads": settings.num_state_heads,
                    "delta_heads": tuple(settings.delta_heads),
                    "write_granularity": settings.write_granularity,
                    "hidden_size": layers[0].layout.hidden_size,
                    "layers": tuple(layer.layer_name for layer in layers),
                    "config_hash": settings.config_hash,
                }
            info = self._described[adapter] = (layers, description)
        return info

    def active_adapters(self) -> list[str]:
        """Adapters that run in a call now (empty when adapters are disabled)."""
        for layer in self.layers.values():
            if layer.disable_adapters:
                return []
            return [a for a in layer.active_adapters if a in layer.settings]
        return []

    def describe(self, adapter: str) -> dict:
        description = self._adapter_info(adapter)[1]
        if description is None:
            raise ValueError(f"No δ-mem layer has adapter {adapter!r}.")
        return dict(description)

    def weights_fingerprint(self, adapter: str) -> str:
        """A hash of the adapter's weights; recomputed only after a weight changed (tensor version counters)."""
        # Called after every call that writes (decoding: every token), so the unchanged case is kept cheap.
        params = [p for layer in self._adapter_info(adapter)[0] for p in layer.fingerprint_tensors(adapter)]
        key = tuple((id(p), p.data_ptr(), p._version, p.shape) for p in params)
        with self._fingerprint_lock:
            cached = self._fingerprints.get(adapter)
            if cached is not None and cached[0] == key:
                return cached[1]
        digest = hashlib.sha256()
        with torch.no_grad():
            for p in params:
                if p.device.type == "meta":
                    continue
                digest.update(p.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        value = digest.hexdigest()[:16]
        with self._fingerprint_lock:
            self._fingerprints[adapter] = (key, value)
        return value

    def new_memory(self, batch_size: int, adapter: str) -> DeltaMemory:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
        description = self.describe(adapter)
        states = {}
        with torch.inference_mode(False):
            for layer in self.adapter_layers(adapter):
                s = layer.settings[adapter]
                device = layer.state_device(adapter)
                states[layer.layer_name] = torch.zeros(batch_size, s.num_state_heads, s.r, s.r, device=device)
        return DeltaMemory(**description, weights_hash=self.weights_fingerprint(adapter), states=states)

    def check_memory(self, memory: DeltaMemory) -> str:
        """Refuse a memory that another adapter, configuration or set of weights wrote; returns the fingerprint of
        the adapter's weights now."""
        if not isinstance(memory, DeltaMemory):
            raise TypeError(
                f"memory must be a peft_deltamem.DeltaMemory (from model.new_memory(batch_size)), got "
                f"{type(memory).__name__}."
            )
        if memory.adapter_name not in self.configs:
            raise ValueError(
                f"This memory belongs to adapter {memory.adapter_name!r}, which this model does not have "
                f"(adapters: {sorted(self.configs)})."
            )
        expected = self._adapter_info(memory.adapter_name)[1]
        if expected is None:
            raise ValueError(f"No δ-mem layer has adapter {memory.adapter_name!r}.")
        for name, value in expected.items():
            if getattr(memory, name) != value:
                raise ValueError(
                    f"This memory does not fit adapter {memory.adapter_name!r}: its {name} is "
                    f"{getattr(memory, name)!r} but the adapter has {value!r}. A memory can only be used with the "
                    "adapter configuration that wrote it."
                )
        # Every memory carries the fingerprint of the weights that wrote it (from new_memory, through every call,
        # row operation and file), so one written by another model, or by these weights before they changed, is
        # refused however it got here. An empty memory holds nothing that depends on the weights.
        current = self.weights_fingerprint(memory.adapter_name)
        if memory.weights_hash is not None and memory.weights_hash != current and not memory.is_empty:
            raise ValueError(
                f"This memory was written with other weights of adapter {memory.adapter_name!r} (fingerprint "
                f"{memory.weights_hash}, the model has {current}); its states would not mean the same here. Use "
                "the memory with the model (and adapter weights) that wrote it, or start from model.new_memory()."
            )
        return current

    # ------------------------------------------------------------------------------------------ calls

    def begin_call(self, module, kwargs: dict) -> CallRecord:
        """Top-level forward pre-hook: turn the call's keywords into a record passed to every layer."""
        record = kwargs.get(CALL_KWARG)
        if isinstance(record, CallRecord):  # built by our own code (the write half of an episode)
            record.previous = self.current_record()
            self._local.record = record
            return record
        memory = kwargs.pop(MEMORY_KWARG, None)
        writes = check_bool(kwargs.pop(WRITES_KWARG, True), WRITES_KWARG)
        segment_ids = _mask_tensor(kwargs.pop(SEGMENT_IDS_KWARG, None), SEGMENT_IDS_KWARG)
        write_mask = _mask_tensor(kwargs.pop(WRITE_MASK_KWARG, None), WRITE_MASK_KWARG)
        if write_mask is not None and write_mask.dtype.is_floating_point:
            raise TypeError(f"{WRITE_MASK_KWARG} must be a bool (or 0/1 integer) tensor, got {write_mask.dtype}.")
        memory_stream = kwargs.pop("memory_input_ids", None)
        memory_stream_mask = kwargs.pop("memory_attention_mask", None)
        kwargs.pop("ablation_mode", None)  # informational key of DeltaMemDataCollator batches
        attention_mask = kwargs.get("attention_mask")
        generation = self.generation if memory is None and memory_stream is None else None
        adapters = self.active_adapters()
        frozen = not adapters and memory is None and memory_stream is None  # adapters disabled: nothing to mask
        if (generation is not None or frozen) and not (
            isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
        ):
            # a static cache's 4-D mask (compiled generate: a dict of them); the generation tracks the 2-D one
            attention_mask = None
        elif attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                f"δ-mem needs the 2-D (batch, length) attention_mask to know which tokens are padding; got shape "
                f"{tuple(attention_mask.shape)}. Pass the tokenizer's attention_mask, not a 4-D mask."
            )
        _refuse_packed(kwargs, attention_mask)
        _check_inputs(module, kwargs, attention_mask, memory_stream, memory_stream_mask)
        record = CallRecord(
            attention_mask=attention_mask, segment_ids=segment_ids, write_mask=write_mask, writes=writes
        )
        record.read_rows = check_reads(kwargs.pop(READS_KWARG, True))
        batch = _call_batch(kwargs)
        if record.read_rows is not None and record.read_rows.numel() and batch is not None:
            if record.read_rows.shape[0] != batch:
                raise ValueError(
                    f"{READS_KWARG} has {record.read_rows.shape[0]} entries but the call has {batch} batch rows; "
                    "pass one bool per row."
                )
        if memory is not None:
            if memory_stream is not None:
                raise ValueError(
                    "Pass either memory= (a memory to read and update) or memory_input_ids= (an episode that writes "
                    "a fresh memory), not both."
                )
            self._attach_memory(record, memory, adapters, kwargs)
        elif memory_stream is not None:
            _check_episode_labels(kwargs.get("labels"))
            if adapters:
                self._run_episode_write(
                    module, record, kwargs, memory_stream, memory_stream_mask, segment_ids, adapters
                )
        elif generation is not None and adapters:
            generation.prepare(record, kwargs)
        elif adapters:
            if kwargs.get("fused_lm_head") and module.training and torch.is_grad_enabled():
                raise ValueError(
                    "TRL's SFTTrainer is training this δ-mem model on a batch without a memory stream (no "
                    "memory_input_ids, no memory=): its default collator feeds plain chats, so the adapter would "
                    "never learn to read a memory written from other text. Build episodes with episodes_map_fn, and "
                    "pass data_collator=DeltaMemDataCollator(tokenizer), SFTConfig(remove_unused_columns=False, "
                    "dataset_kwargs={'skip_prepare_dataset': True}); see docs/training.md, 'TRL'."
                )
            past = kwargs.get("past_key_values")
            if past is not None and hasattr(past, "get_seq_length") and past.get_seq_length() > 0:
                raise ValueError(
                    "This call continues a KV cache but passes no memory: the earlier tokens' writes are lost and "
                    "the outputs would silently differ from one call over the whole text. Pass memory=<the "
                    "DeltaMemory of the earlier calls> (model.new_memory(batch_size) before the first call), or "
                    "use the PEFT model's generate()."
                )
        self._local.record = record  # a top-level call: a record left by a call that raised is dropped here
        kwargs[CALL_KWARG] = record
        return record

    def _attach_memory(self, record: CallRecord, memory, adapters: list[str], kwargs: dict) -> None:
        record.weights_hash = self.check_memory(memory)
        if adapters and memory.adapter_name not in adapters:
            raise ValueError(
                f"This memory belongs to adapter {memory.adapter_name!r} but the active adapter is {adapters}; "
                "call set_adapter() or pass that adapter's memory."
            )
        if len(adapters) > 1:
            raise ValueError(
                f"A memory holds one adapter's states but {len(adapters)} adapters are active ({adapters}); "
                "activate one adapter for calls that carry a memory."
            )
        batch = _call_batch(kwargs)
        if batch is not None and batch != memory.batch_size:
            raise ValueError(
                f"This call has batch size {batch} but the memory has {memory.batch_size} rows. A memory is never "
                "reshaped: use model.new_memory(batch_size), mem.select(rows) or DeltaMemory.cat([...])."
            )
        states, version = memory._snapshot()
        record.initial = {(name, memory.adapter_name): t for name, t in states.items()}
        record.memory, record.memory_version = memory, version

    def _run_episode_write(self, module, record, kwargs, stream, stream_mask, segment_ids, adapters) -> None:
        """The write half of an episode: the memory stream is written into an empty memory, with gradients."""
        training = module.training
        weight = max(getattr(self.configs.get(a), "write_sparsity_weight", 0.0) for a in adapters)
        write = CallRecord(
            attention_mask=stream_mask,
            segment_ids=segment_ids,
            write_mask=None,
            writes=True,
            keep_graph=True,
            write_gate_stats=[] if training and weight > 0 else None,
        )
        if stream.shape[1] > 0:
            self.run_memory_stream(module, stream, stream_mask, write)
        record.initial = dict(write.final_states)
        record.writes = False
        record.segment_ids = None  # they describe the memory stream
        if write.write_gate_stats:
            config = self.configs[adapters[0]]
            mean_beta = torch.stack(write.write_gate_stats).mean()
            record.loss_terms.append(config.write_sparsity_weight * (mean_beta - config.write_sparsity_target) ** 2)

    @staticmethod
    def run_memory_stream(module, stream, stream_mask, record: CallRecord) -> CallRecord:
        memory_kwargs = {"input_ids": stream, "attention_mask": stream_mask, "use_cache": False, CALL_KWARG: record}
        if "logits_to_keep" in inspect.signature(module.forward).parameters:
            memory_kwargs["logits_to_keep"] = 1  # the memory pass needs no vocabulary logits
        module(**memory_kwargs)
        return record

    def end_call(self, module, kwargs: dict, output):
        """Top-level forward hook: the call completed; add its loss terms and commit its memory."""
        record = kwargs.get(CALL_KWARG)
        if not isinstance(record, CallRecord):
            return output
        self._local.record = record.previous
        record.previous = None
        if record.loss_terms:
            if kwargs.get("fused_lm_head"):
                raise ValueError(
                    "write_sparsity_weight > 0 does not work under TRL's SFTTrainer: it calls the model with "
                    "fused_lm_head=True and computes the loss from the returned log-probabilities, so the "
                    "write-sparsity penalty δ-mem adds to the model's loss would be silently dropped. Set "
                    "DeltaMemConfig(write_sparsity_weight=0.0) for SFTTrainer, or train with transformers.Trainer "
                    "(docs/training.md, 'TRL')."
                )
            output = _add_loss_terms(output, record.loss_terms, kwargs)
        if record.memory is not None:
            self.commit(record.memory, record.memory_version, record.final_states, record.weights_hash)
        elif record.generation is not None:
            record.generation.after_call(record)
        return output

    def commit(self, memory: DeltaMemory, version: int, final_states: dict, weights_hash: str | None = None) -> None:
        """Check the new states (one fused finiteness check) and swap them into ``memory`` all at once.

        ``weights_hash``: the weights' fingerprint taken when the call began (default: computed now)."""
        new = {layer: t for (layer, adapter), t in final_states.items() if adapter == memory.adapter_name}
        if not new:
            return  # adapters disabled: nothing was read or written
        if not all_finite(new.values()):
            raise ValueError(
                "The memory update of this call contains NaN or infinite values (non-finite inputs or activations?). "
                "The memory was left unchanged."
            )
        new = {layer: _standard_layout(_plain(t.detach() if t.requires_grad else t)) for layer, t in new.items()}
        memory._commit(new, version, weights_hash or self.weights_fingerprint(memory.adapter_name))


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A normal tensor (not an inference tensor), so a later call with autograd can save it."""
    if tensor.is_inference():
        with torch.inference_mode(False):
            return tensor.clone()
    return tensor


def _standard_layout(tensor: torch.Tensor) -> torch.Tensor:
    """The state with row-major strides. A scan's final state can be a view with other strides (a slice of the
    per-chunk states); one layout keeps a compiled model from compiling a variant for each."""
    if tensor.stride() == _row_major(tuple(tensor.shape)):
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


@functools.lru_cache(maxsize=64)
def _row_major(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _call_batch(kwargs: dict) -> int | None:
    for name in ("input_ids", "inputs_embeds"):
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return value.shape[0]
    return None


def _add_loss_terms(output, terms: list, kwargs: dict):
    if getattr(output, "loss", None) is None:
        raise ValueError("write_sparsity_weight > 0 needs a loss: pass labels with the visible stream.")
    penalty = sum(t.to(output.loss.device) for t in terms)
    total_items, labels = kwargs.get("num_items_in_batch"), kwargs.get("labels")
    if total_items is not None and labels is not None:
        # The Trainer then sums micro-batch losses instead of averaging them: weigh the penalty like the
        # token loss, by this micro-batch's share of the step's label tokens, so it counts once per step.
        penalty = penalty * (labels[..., 1:] != -100).sum().to(penalty.device) / total_items
    output.loss = output.loss + penalty
    return output


def _check_episode_labels(labels) -> None:
    """An episode batch whose labels supervise nothing would give a NaN loss (a mean over no token): refuse it."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        return
    supervised = (labels[:, 1:] != -100).sum(dim=1)  # the causal loss predicts labels[:, 1:]
    if labels.shape[0] and not bool(supervised.any()):
        raise ValueError(
            f"no row of this episode batch has a supervised token: rows {list(range(labels.shape[0]))} have labels "
            "that are all -100 after the first position (the loss predicts labels[:, 1:]), so the loss would be NaN. "
            "Label the answer tokens of each episode (DeltaMemDataCollator refuses such episodes), or leave these "
            "rows out."
        )


def _refuse_packed(kwargs: dict, attention_mask: torch.Tensor | None) -> None:
    if any(k in kwargs for k in ("cu_seq_lens_q", "cu_seq_lens_k")):
        raise ValueError(
            "δ-mem cannot run on packed (padding-free) batches: the memory would leak across the packed "
            "sequences. Use padded batches with an attention_mask."
        )
    position_ids = kwargs.get("position_ids")
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[1] < 2:
        return
    step_back = position_ids[:, 1:] < position_ids[:, :-1]
    if attention_mask is not None:  # left padding gives placeholder positions to pad tokens
        valid = attention_mask[:, -position_ids.shape[1] :].bool()
        step_back = step_back & valid[:, 1:] & valid[:, :-1]
    if bool(step_back.any()):
        raise ValueError(
            "position_ids restart inside a row, i.e. the batch is packed; δ-mem cannot run on packed "
            "sequences (the memory would leak across them). Use padded batches with an attention_mask."
        )


def _past_length(kwargs: dict) -> int:
    past = kwargs.get("past_key_values")
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    return 1  # a legacy tuple cache: not empty


def _check_ids(module, ids: torch.Tensor, name: str) -> None:
    """Ids outside the vocabulary (checked on calls of more than one token: no host sync per decoding step)."""
    if ids.dim() != 2 or ids.shape[1] < 2 or ids.is_floating_point():
        return
    embeddings = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    if vocab is None:
        return
    low, high = torch.stack([ids.min(), ids.max()]).tolist()  # one host sync
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise ValueError(
            f"{name} contains token id {bad}, outside the model's vocabulary (0..{vocab - 1}). Tokenize with this "
            "model's tokenizer; if you added tokens, call model.resize_token_embeddings(len(tokenizer)) first."
        )


def _check_inputs(module, kwargs: dict, attention_mask, stream, stream_mask) -> None:
    """Shapes and ids a call must have; a wrong one would silently use other tokens' masks or crash deep inside."""
    ids = kwargs.get("input_ids")
    inputs = ids if isinstance(ids, torch.Tensor) else kwargs.get("inputs_embeds")
    if isinstance(inputs, torch.Tensor) and inputs.dim() >= 2:
        name = "input_ids" if inputs is ids else "inputs_embeds"
        length = inputs.shape[1]
        if length == 0:
            raise ValueError(
                f"{name} has shape {tuple(inputs.shape)}: the call has no tokens. Pass at least one token per row "
                "(skip the call when there is nothing to read)."
            )
        if (
            isinstance(attention_mask, torch.Tensor)
            and attention_mask.dim() == 2
            and attention_mask.shape[1] != length
            and _past_length(kwargs) == 0
        ):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but {name} has {length} tokens and there is "
                "no KV cache: without a cache the mask must cover exactly the call's tokens. Pass the tokenizer's "
                "attention_mask for these tokens."
            )
        if inputs is ids:
            _check_ids(module, ids, "input_ids")
    if stream_mask is not None:
        if stream is None:
            raise ValueError(
                "memory_attention_mask was passed without memory_input_ids: it is the mask of the memory stream. "
                "Pass memory_input_ids too (an episode), or drop memory_attention_mask."
            )
        if not isinstance(stream_mask, torch.Tensor) or stream_mask.dim() != 2:
            raise ValueError(
                f"memory_attention_mask must be a 2-D (batch, length) tensor, got {type(stream_mask).__name__}."
            )
        if isinstance(stream, torch.Tensor) and tuple(stream_mask.shape) != tuple(stream.shape[:2]):
            raise ValueError(
                f"memory_attention_mask has shape {tuple(stream_mask.shape)} but memory_input_ids has shape "
                f"{tuple(stream.shape)}; they must have the same (batch, length)."
            )
    if isinstance(stream, torch.Tensor):
        _check_ids(module, stream, "memory_input_ids")
