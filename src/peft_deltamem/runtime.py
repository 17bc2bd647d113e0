"""Per-model runtime of the memory: what each top-level forward call tells the δ-mem layers.

A top-level forward pre-hook (outside every gradient-checkpointed region) opens a
:class:`CallRecord` and passes it down as the ``delta_mem_call`` keyword, which transformers
forwards to every attention module. Because gradient checkpointing re-runs a decoder layer with
the *same* keywords, a recomputed layer sees the same record: the same token mask, the same input
state and the same output slot, so recomputation is idempotent (see docs/concepts.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

CALL_KWARG = "delta_mem_call"
SEGMENT_IDS_KWARG = "memory_segment_ids"
WRITE_MASK_KWARG = "memory_write_mask"


@dataclass(eq=False)
class CallRecord:
    """Everything the layers need about one top-level forward call."""

    attention_mask: torch.Tensor | None  # 2-D (batch, total length) or None: every token valid
    segment_ids: torch.Tensor | None  # 2-D (batch, length) for segment writes
    write_mask: torch.Tensor | None  # 2-D (batch, length) user write control
    writes: bool  # False: nothing of this call is written
    fresh: bool  # True: the call starts from an empty memory (training)
    keep_graph: bool  # True: keep the autograd graph of the final state (training episodes)
    write_gate_stats: list | None = None  # where layers report their mean write gate, when tracked
    input_states: dict = field(default_factory=dict)  # (layer name, adapter) -> state read by the call
    final_states: dict = field(default_factory=dict)  # (layer name, adapter) -> state after the call

    def token_mask(self, batch: int, length: int, device: torch.device) -> torch.Tensor | None:
        """Bool (batch, length) mask of real tokens for the last ``length`` positions, or None (all real)."""
        mask = self.attention_mask
        if mask is None:
            return None
        if mask.shape[0] != batch or mask.shape[1] < length:
            raise ValueError(
                f"attention_mask has shape {tuple(mask.shape)} but the attention block sees batch {batch} and "
                f"{length} new tokens; pass the 2-D attention_mask of the whole sequence."
            )
        return mask[:, -length:].to(device=device, dtype=torch.bool)

    def tail(self, tensor: torch.Tensor | None, batch: int, length: int, name: str) -> torch.Tensor | None:
        if tensor is None:
            return None
        if tensor.shape[0] != batch or tensor.shape[1] < length:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}; expected (batch={batch}, length>={length}).")
        return tensor[:, -length:]


class MemoryRuntime:
    """Shared by all δ-mem layers of one model: the open call and the user's write switches."""

    def __init__(self) -> None:
        self.layers: dict[str, object] = {}  # module name -> DeltaMemLayer
        self.current: CallRecord | None = None
        self.writes_enabled = True
        self.episode_depth = 0  # > 0 inside a training episode (state carried across calls, graph kept)
        self.generation_calls: int | None = None  # calls made inside the current generate(), else None
        self.write_generated_tokens = True
        self.write_gate_stats: list[torch.Tensor] | None = None  # mean write gate of each writing layer call
        self.pending_loss_terms: list[torch.Tensor] = []  # added to the next call's loss (write-sparsity penalty)

    def track_write_gates(self) -> list[torch.Tensor]:
        """Start collecting the mean write gate β of every writing layer call (write-sparsity penalty, logging)."""
        self.write_gate_stats = []
        return self.write_gate_stats

    def stop_tracking(self) -> None:
        self.write_gate_stats = None

    def commit(self) -> None:
        """Make the states written by the last call the layers' current states."""
        record, self.current = self.current, None
        if record is None:
            return
        for (layer_name, adapter), state in record.final_states.items():
            self.layers[layer_name].memory[adapter] = state

    def _adapters_enabled(self) -> bool:
        return any(not layer.disable_adapters and layer.active_adapters for layer in self.layers.values())

    def begin_call(self, kwargs: dict, training: bool) -> CallRecord:
        self.commit()
        memory_stream = kwargs.pop("memory_input_ids", None)
        kwargs.pop("memory_attention_mask", None)
        kwargs.pop("ablation_mode", None)  # informational key of DeltaMemDataCollator batches
        if memory_stream is not None and self.episode_depth == 0 and self._adapters_enabled():
            raise ValueError(
                "memory_input_ids reached the model outside a δ-mem episode. Call the PeftModel (model(...) or "
                "model.generate(...)), which writes the memory stream first, not its inner transformers model."
            )
        segment_ids = kwargs.pop(SEGMENT_IDS_KWARG, None)
        write_mask = kwargs.pop(WRITE_MASK_KWARG, None)
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                f"δ-mem needs the 2-D (batch, length) attention_mask to know which tokens are padding; got shape "
                f"{tuple(attention_mask.shape)}. Pass the tokenizer's attention_mask, not a 4-D mask."
            )
        _refuse_packed(kwargs)
        writes = self.writes_enabled
        if self.generation_calls is not None:
            self.generation_calls += 1
            if self.generation_calls > 1 and not self.write_generated_tokens:
                writes = False
        in_episode = self.episode_depth > 0
        record = CallRecord(
            attention_mask=attention_mask,
            segment_ids=segment_ids,
            write_mask=write_mask,
            writes=writes,
            fresh=training and not in_episode,
            keep_graph=in_episode,
            write_gate_stats=self.write_gate_stats,
        )
        self.current = record
        kwargs[CALL_KWARG] = record
        return record


def _refuse_packed(kwargs: dict) -> None:
    if any(k in kwargs for k in ("cu_seq_lens_q", "cu_seq_lens_k")):
        raise ValueError(
            "δ-mem cannot run on packed (padding-free) batches: the memory would leak across the packed "
            "sequences. Use padded batches with an attention_mask."
        )
    position_ids = kwargs.get("position_ids")
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[1] < 2:
        return
    step_back = position_ids[:, 1:] < position_ids[:, :-1]
    attention_mask = kwargs.get("attention_mask")
    if attention_mask is not None:  # left padding gives placeholder positions to pad tokens
        valid = attention_mask[:, -position_ids.shape[1] :].bool()
        step_back = step_back & valid[:, 1:] & valid[:, :-1]
    if bool(step_back.any()):
        raise ValueError(
            "position_ids restart inside a row, i.e. the batch is packed; δ-mem cannot run on packed "
            "sequences (the memory would leak across them). Use padded batches with an attention_mask."
        )
