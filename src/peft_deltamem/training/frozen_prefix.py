"""Training δ-mem adapters that sit on upper layers only, from hidden states of the frozen layers below.

When no layer below layer ``L`` carries an adapter (δ-mem, or any PEFT adapter), the hidden states entering
layer ``L`` depend only on the text: the layers below are frozen and read no memory. They can be computed once
per episode (:func:`frozen_hidden`) and reused for every epoch, and a training step then runs layers ``L..``
only (:func:`cached_episode_forward`), which is what makes a real model trainable on a CPU
(scripts/train_real_memory.py ``--cache-pool``). :func:`cached_episode_forward` gives the same loss, logits
and gradients as the episode forward of the whole model (``memory_input_ids=`` + ``input_ids=``); see
tests/test_frozen_prefix.py.

The decoder must expose ``get_decoder()`` with ``layers`` and ``norm`` (Llama, Qwen, Mistral and similar
decoders) and take ``inputs_embeds`` unscaled (not Gemma, which multiplies its embeddings).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..padding import pad_rows  # defined here before; still importable from this module
from ..runtime import CALL_KWARG, CallRecord

_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def _decoder(model) -> nn.Module:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if (
        decoder is None
        or not isinstance(getattr(decoder, "layers", None), nn.ModuleList)
        or not hasattr(decoder, "norm")
    ):
        raise ValueError(
            f"{type(base).__name__} has no decoder with `layers` and `norm` (get_decoder()); training from cached "
            "hidden states supports Llama-like decoders. Train with the episode forward (memory_input_ids=) instead."
        )
    if getattr(base.config, "model_type", "").startswith("gemma"):
        raise ValueError("Gemma scales its input embeddings, so cached hidden states cannot be fed as inputs_embeds.")
    if len(set(getattr(base.config, "layer_types", None) or ())) > 1:
        raise ValueError(
            "this decoder mixes layer types (e.g. sliding-window and full attention), which it looks up by position "
            "in its layer stack; running a slice of the stack would give layers the wrong kind of attention mask."
        )
    return decoder


def first_adapted_layer(model) -> int:
    """Index of the lowest decoder layer that holds a PEFT adapter layer (δ-mem, LoRA, ...); ValueError when none."""
    indices = []
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            match = _LAYER_INDEX.search(name + ".")
            if match is None:
                raise ValueError(f"cannot tell which decoder layer adapter module {name!r} belongs to")
            indices.append(int(match.group(1)))
    if not indices:
        raise ValueError(
            "the model has no adapter layers; wrap it with get_peft_model(model, DeltaMemConfig(...)) first."
        )
    return min(indices)


@contextlib.contextmanager
def only_layers(model, start: int, stop: int | None = None) -> Iterator[None]:
    """Run the decoder with its layers ``start:stop`` only, restoring the full stack afterwards."""
    decoder = _decoder(model)
    layers = decoder.layers
    decoder.layers = nn.ModuleList(list(layers)[start:stop])
    try:
        yield
    finally:
        decoder.layers = layers


@torch.no_grad()
def frozen_hidden(model, rows: Sequence[Sequence[int]], pad_id: int, batch_size: int = 32) -> list[torch.Tensor]:
    """For each token row, the ``(len(row), d)`` hidden states entering the first adapted layer.

    Runs only the (frozen, adapter-free) layers below it, in batches of similar lengths, on the device of the
    model's input embeddings (where the returned states live).
    """
    start = first_adapted_layer(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = _decoder(model)
    captured = []
    hook = decoder.norm.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out: list[torch.Tensor | None] = [None] * len(rows)
    device = base.get_input_embeddings().weight.device
    was_training = base.training
    base.eval()
    try:
        with only_layers(model, 0, start):
            for s in range(0, len(order), batch_size):
                index = order[s : s + batch_size]
                ids, mask = pad_rows([torch.as_tensor(rows[i], dtype=torch.long) for i in index], pad_id)
                captured.clear()
                base(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, logits_to_keep=1)
                for j, i in enumerate(index):
                    out[i] = captured[0][j, : len(rows[i])].clone()
    finally:
        hook.remove()
        base.train(was_training)
    return out


def cached_episode_forward(
    model,
    memory_hidden: Sequence[torch.Tensor] | None,
    hidden: Sequence[torch.Tensor],
    labels: torch.Tensor | None = None,
    memory_segment_ids: torch.Tensor | None = None,
):
    """The episode forward of ``model`` from :func:`frozen_hidden` states: the memory stream's states are written
    into a fresh memory (with gradients), then the visible stream's states read it (writes off), both through
    the layers from the first adapted one up. Returns the model output (``loss`` when ``labels`` is given).
    With ``memory_hidden=None`` it is a plain forward of the visible stream (any adapter, e.g. LoRA).
    """
    start = first_adapted_layer(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    visible, mask = pad_rows(hidden)
    if labels is not None and tuple(labels.shape) != tuple(mask.shape):
        raise ValueError(f"labels have shape {tuple(labels.shape)} but the visible stream is {tuple(mask.shape)}")
    if memory_hidden is None:
        with only_layers(model, start):
            return base(inputs_embeds=visible, attention_mask=mask, labels=labels, use_cache=False)
    memory, memory_mask = pad_rows(memory_hidden)
    with only_layers(model, start):
        write = CallRecord(
            attention_mask=memory_mask, segment_ids=memory_segment_ids, write_mask=None, writes=True, keep_graph=True
        )
        if memory.shape[1] > 0:
            base(inputs_embeds=memory, attention_mask=memory_mask, use_cache=False, logits_to_keep=1,
                 **{CALL_KWARG: write})  # fmt: skip
        read = CallRecord(attention_mask=mask, segment_ids=None, write_mask=None, writes=False)
        read.initial = dict(write.final_states)
        return base(inputs_embeds=visible, attention_mask=mask, labels=labels, use_cache=False, **{CALL_KWARG: read})


def cached_message_writes(
    model, messages: Sequence[Sequence[torch.Tensor]], states: dict | None = None, segment_writes: bool = False
) -> dict:
    """Write each row's messages into memory in order, **one call per message** as the chat engine writes them
    (a message's tokens attend to each other only), from :func:`frozen_hidden` states of each message alone.

    ``messages[i]`` is the list of ``(length, d)`` hidden states of row ``i``'s messages; rows may hold different
    numbers of messages. ``states`` (``(layer, adapter) -> (B, H, r, r)``) is the memory to start from (absent:
    empty). Returns the states after the writes, with their autograd graph (gradients flow through every write).
    With ``segment_writes`` each message is one segment, as the engine passes it to a segment-write adapter.
    """
    start = first_adapted_layer(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    batch = len(messages)
    states = dict(states or {})
    with only_layers(model, start):
        for k in range(max((len(m) for m in messages), default=0)):
            rows = [i for i, m in enumerate(messages) if len(m) > k]
            hidden, mask = pad_rows([messages[i][k] for i in rows])
            index = torch.tensor(rows, device=hidden.device)
            record = CallRecord(
                attention_mask=mask,
                segment_ids=torch.zeros_like(mask) if segment_writes else None,
                write_mask=None,
                writes=True,
                keep_graph=True,
            )
            record.initial = {key: s.index_select(0, index) for key, s in states.items()}
            base(inputs_embeds=hidden, attention_mask=mask, use_cache=False, logits_to_keep=1,
                 **{CALL_KWARG: record})  # fmt: skip
            for key, final in record.final_states.items():
                if len(rows) == batch:
                    states[key] = final
                else:
                    full = states[key] if key in states else final.new_zeros((batch, *final.shape[1:]))
                    states[key] = full.index_copy(0, index, final)
    return states


def cached_read_logits(model, hidden: Sequence[torch.Tensor], states: dict | None, last: int) -> torch.Tensor:
    """Logits ``(B, last, vocab)`` of the last ``last`` positions of each (left-padded) row, reading ``states``
    (writes off). ``states=None`` runs the frozen model (adapters disabled): the teacher of a distillation term.
    """
    start = first_adapted_layer(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    x, mask = pad_rows(hidden, side="left")  # the answers sit in the last positions of every row
    if states is None:
        with torch.no_grad(), model.disable_adapter(), only_layers(model, start):
            return base(inputs_embeds=x, attention_mask=mask, use_cache=False, logits_to_keep=last).logits
    record = CallRecord(attention_mask=mask, segment_ids=None, write_mask=None, writes=False)
    record.initial = dict(states)
    with only_layers(model, start):
        return base(inputs_embeds=x, attention_mask=mask, use_cache=False, logits_to_keep=last,
                    **{CALL_KWARG: record}).logits  # fmt: skip


__all__ = [
    "cached_episode_forward",
    "cached_message_writes",
    "cached_read_logits",
    "first_adapted_layer",
    "frozen_hidden",
    "only_layers",
]
