"""Padding rows of different lengths into one batch: the one helper the collator, the chat engine and the
cached-hidden-state training share."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_rows(
    rows: Sequence[Sequence[int] | torch.Tensor],
    value: int | float = 0,
    side: str = "right",
    multiple_of: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad ``rows`` to one ``(B, T, ...)`` tensor filled with ``value``, plus its ``(B, T)`` attention mask.

    A row is a list of token ids (the batch is then ``torch.long``) or a tensor of shape ``(length, ...)`` (token
    ids, hidden states: the batch takes the first row's dtype, device and trailing shape). ``T`` is the longest
    row, rounded up to a multiple of ``multiple_of`` when given. ``side="right"`` starts every row at position 0,
    ``side="left"`` ends every row at the last position (prompts that generate). The mask is ``torch.long``, 1 on
    a row's own positions. No rows give two empty ``(0, 0)`` long tensors.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    tensors = [r if isinstance(r, torch.Tensor) else torch.as_tensor(r, dtype=torch.long) for r in rows]
    if not tensors:
        return torch.zeros((0, 0), dtype=torch.long), torch.zeros((0, 0), dtype=torch.long)
    width = max(t.shape[0] for t in tensors)
    if multiple_of and width % multiple_of:
        width += multiple_of - width % multiple_of
    first = tensors[0]
    out = first.new_full((len(tensors), width, *first.shape[1:]), value)
    mask = torch.zeros((len(tensors), width), dtype=torch.long, device=first.device)
    for i, t in enumerate(tensors):
        if not t.shape[0]:
            continue
        span = slice(0, t.shape[0]) if side == "right" else slice(width - t.shape[0], width)
        out[i, span] = t
        mask[i, span] = 1
    return out, mask


__all__ = ["pad_rows"]
