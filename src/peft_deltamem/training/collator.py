"""Batching δ-mem episodes (from :mod:`peft_deltamem.training.episodes`) into tensors, with context ablation.

Batch keys (all ``torch.long``; ``B`` rows, visible width ``T``, memory width ``M``):

- ``input_ids`` (B, T): padded with the pad token id; ``attention_mask`` (B, T): 1 on tokens, 0 on padding;
  ``labels`` (B, T): -100 on padding and on every non-answer token.
- ``memory_input_ids`` (B, M): padded with the pad token id; ``memory_attention_mask`` (B, M): 1 on tokens
  that are written, 0 on padding; ``memory_segment_ids`` (B, M): one id per message, **-1** on padding.
  A row without history (or a "no_memory" row) is all padding. When no row has history, ``M == 0``: the
  memory tensors have shape ``(B, 0)`` and the model should skip the write pass.
- ``ablation_mode`` (B,): index into :data:`ABLATION_MODES` of the mode used for each row (for logging;
  pop it before calling a model whose forward rejects unknown keywords, or pass ``return_ablation_mode=False``).

Both streams are padded on the **right** by default (``padding_side`` / ``memory_padding_side``), so that
default position ids (0, 1, 2, …) are right for every real token; ``tokenizer.padding_side`` is deliberately
not followed, since chat tokenizers often set it to "left" for generation.

Context-ablation mixing (``ablation_probs``), drawn per row from the collator's own seeded RNG:

- ``"memory_only"`` (default, p = 1): history in memory, visible stream as built;
- ``"memory_and_context"``: history stays in memory AND the row reads the episode's full-context stream
  (``context_input_ids``/``context_labels``, built with ``EpisodeConfig(context_stream=True)``), rendered by
  the chat template with the history in place, left-truncated to ``max_context_length`` (never the answer);
- ``"no_memory"``: the memory row is emptied (all padding), the visible stream is unchanged.
"""

from __future__ import annotations

import math
import numbers
import random
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..padding import pad_rows
from ..runtime import check_bool
from .episodes import IGNORE_INDEX

ABLATION_MODES = ("memory_only", "memory_and_context", "no_memory")
MEMORY_ONLY, MEMORY_AND_CONTEXT, NO_MEMORY = range(3)
SEGMENT_PAD_ID = -1


def validate_ablation_probs(ablation_probs: Mapping[str, float] | None) -> tuple[float, float, float]:
    """Return the probabilities of :data:`ABLATION_MODES` (missing modes are 0).

    Raises ValueError for unknown modes, negative or non-finite values, or a sum that is not 1 (±1e-6).
    """
    if ablation_probs is None:
        return (1.0, 0.0, 0.0)
    if not isinstance(ablation_probs, Mapping):
        raise ValueError(f"ablation_probs must be a mapping {{mode: probability}}, got {type(ablation_probs)}")
    unknown = set(ablation_probs) - set(ABLATION_MODES)
    if unknown:
        raise ValueError(f"unknown ablation modes {sorted(unknown)}; expected a subset of {ABLATION_MODES}")
    probs = []
    for mode in ABLATION_MODES:
        p = ablation_probs.get(mode, 0.0)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p < 0:
            raise ValueError(f"ablation probability of {mode!r} must be a finite number >= 0, got {p!r}")
        probs.append(float(p))
    if abs(sum(probs) - 1.0) > 1e-6:
        raise ValueError(f"ablation probabilities must sum to 1, got {sum(probs)} from {dict(ablation_probs)}")
    return tuple(probs)


class DeltaMemDataCollator:
    """Pad a list of episodes into a δ-mem training batch (keys and conventions: see the module docstring).

    Args:
        tokenizer: supplies the pad id (``pad_token_id``, else ``eos_token_id``); may be None if
            ``pad_token_id`` is given.
        pad_to_multiple_of: round both widths up to a multiple of this (a width of 0 stays 0).
        ablation_probs: ``{mode: p}`` over :data:`ABLATION_MODES`; None means ``{"memory_only": 1.0}``.
        seed: seed of the collator's RNG (``random.Random``); the same seed and the same sequence of batches
            give the same modes. In DataLoader workers the RNG is re-seeded once per worker from
            ``(seed, worker id)`` (or the worker's torch seed when ``seed`` is None), so workers differ.
        padding_side: side on which the visible stream is padded (default ``"right"``).
        memory_padding_side: side on which the memory stream is padded (default ``"right"``).
        max_context_length: left-truncation budget of "memory_and_context" rows (None: as built).
        pad_token_id: explicit pad id, overriding the tokenizer's.
        return_ablation_mode: include the ``ablation_mode`` tensor in the batch.
    """

    def __init__(
        self,
        tokenizer: Any = None,
        pad_to_multiple_of: int | None = None,
        ablation_probs: Mapping[str, float] | None = None,
        seed: int | None = None,
        padding_side: str = "right",
        memory_padding_side: str = "right",
        max_context_length: int | None = None,
        pad_token_id: int | None = None,
        return_ablation_mode: bool = True,
    ):
        check_bool(return_ablation_mode, "return_ablation_mode")
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = tokenizer.pad_token_id
            if pad_token_id is None:
                pad_token_id = tokenizer.eos_token_id
        if pad_token_id is None:
            raise ValueError("no pad id: the tokenizer has neither pad_token_id nor eos_token_id; pass pad_token_id")
        for name, side in (("padding_side", padding_side), ("memory_padding_side", memory_padding_side)):
            if side not in ("left", "right"):
                raise ValueError(f"{name} must be 'left' or 'right', got {side!r}")
        if pad_to_multiple_of is not None and (not _is_int(pad_to_multiple_of) or pad_to_multiple_of < 1):
            raise ValueError(f"pad_to_multiple_of must be an integer >= 1 or None, got {pad_to_multiple_of!r}")
        if max_context_length is not None and (not _is_int(max_context_length) or max_context_length < 2):
            raise ValueError(f"max_context_length must be an integer >= 2 or None, got {max_context_length!r}")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.probs = validate_ablation_probs(ablation_probs)
        self.seed = seed
        self.padding_side = padding_side
        self.memory_padding_side = memory_padding_side
        self.max_context_length = max_context_length
        self.return_ablation_mode = return_ablation_mode
        self._rng = random.Random(seed)
        self._rng_worker: int | None = None

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if len(features) == 0:
            raise ValueError("cannot collate an empty list of episodes")
        modes = self.sample_modes(len(features))
        ids_rows, label_rows, mem_rows, seg_rows = [], [], [], []
        for row, (feature, mode) in enumerate(zip(features, modes)):
            ids, labels = _field(feature, "input_ids", row), _field(feature, "labels", row)
            if mode == MEMORY_AND_CONTEXT:
                ids, labels = self._context_stream(feature, row)
            if len(ids) != len(labels):
                raise ValueError(f"episode {row}: input_ids ({len(ids)}) and labels ({len(labels)}) differ in length")
            if all(label == IGNORE_INDEX for label in labels):
                raise ValueError(
                    f"episode {row} has no supervised token (its labels are all {IGNORE_INDEX}), so it carries no "
                    "training signal and a batch of such episodes has a NaN loss. Drop it when building the data "
                    "(episodes_map_fn only makes episodes for assistant turns with a non-empty answer)."
                )
            memory, segments = _field(feature, "memory_input_ids", row), _field(feature, "memory_segment_ids", row)
            if len(memory) != len(segments):
                raise ValueError(
                    f"episode {row}: memory_input_ids ({len(memory)}) and memory_segment_ids ({len(segments)}) "
                    "differ in length"
                )
            if mode == NO_MEMORY:
                memory, segments = [], []
            ids_rows.append(ids)
            label_rows.append(labels)
            mem_rows.append(memory)
            seg_rows.append(segments)

        side, memory_side, multiple = self.padding_side, self.memory_padding_side, self.pad_to_multiple_of
        input_ids, attention_mask = pad_rows(ids_rows, self.pad_token_id, side, multiple)
        labels, _ = pad_rows(label_rows, IGNORE_INDEX, side, multiple)
        memory_input_ids, memory_attention_mask = pad_rows(mem_rows, self.pad_token_id, memory_side, multiple)
        memory_segment_ids, _ = pad_rows(seg_rows, SEGMENT_PAD_ID, memory_side, multiple)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "memory_input_ids": memory_input_ids,
            "memory_attention_mask": memory_attention_mask,
            "memory_segment_ids": memory_segment_ids,
        }
        if self.return_ablation_mode:
            batch["ablation_mode"] = torch.tensor(modes, dtype=torch.long)
        return batch

    def sample_modes(self, n: int) -> list[int]:
        """Draw the ablation mode (index into :data:`ABLATION_MODES`) of ``n`` rows."""
        if self.probs[MEMORY_ONLY] == 1.0:
            return [MEMORY_ONLY] * n  # no draw: the default consumes no randomness
        rng = self._worker_rng()
        cumulative = [sum(self.probs[: i + 1]) for i in range(len(self.probs))]
        last = max(i for i, p in enumerate(self.probs) if p > 0)  # guards against rounding in the cumsum
        modes = []
        for _ in range(n):
            u = rng.random()
            modes.append(next((i for i, c in enumerate(cumulative) if u < c and self.probs[i] > 0), last))
        return modes

    def _worker_rng(self) -> random.Random:
        info = torch.utils.data.get_worker_info()
        if info is not None and self._rng_worker != info.id:
            self._rng = random.Random(info.seed if self.seed is None else f"{self.seed}-worker-{info.id}")
            self._rng_worker = info.id
        return self._rng

    def _context_stream(self, feature: Mapping[str, Any], row: int) -> tuple[list[int], list[int]]:
        if "context_input_ids" not in feature or "context_labels" not in feature:
            raise ValueError(
                f"episode {row} was drawn 'memory_and_context' but has no context_input_ids/context_labels: "
                "build the episodes with EpisodeConfig(context_stream=True)"
            )
        ids, labels = list(feature["context_input_ids"]), list(feature["context_labels"])
        budget = self.max_context_length
        if budget is not None and len(ids) > budget:
            first_label = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
            # cut from the left, but never into the answer and keep one token before it
            cut = min(len(ids) - budget, max(first_label - 1, 0))
            ids, labels = ids[cut:], labels[cut:]
        return ids, labels


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _field(feature: Mapping[str, Any], key: str, row: int) -> list[int]:
    if key not in feature:
        raise ValueError(f"episode {row} has no {key!r} (keys: {sorted(feature)})")
    value = feature[key]
    values = value.tolist() if isinstance(value, torch.Tensor) else list(value)
    wrong = [v for v in values if not _is_int(v)][:1]
    if wrong:
        (wrong,) = wrong
        raise ValueError(
            f"episode {row}: {key} must hold integer token ids, found {wrong!r} ({type(wrong).__name__}); "
            "tokenize the text first (episodes_map_fn does)"
        )
    return values
