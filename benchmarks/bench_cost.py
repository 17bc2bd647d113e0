"""Cost per answer vs history length: full context (the whole history re-read) vs δ-mem (a fixed-size state).

For each history length L, a synthetic conversation is cut to its last L tokens (whole messages) and one question is
answered by greedy generation (``max_new_tokens`` tokens, batch 1):

- **full context**: prompt = the whole history + question; the cost is prefill + answer (no KV cache carried
  over from earlier turns). Median of ``repeats`` runs up to ``repeat_full_up_to`` history tokens, one run beyond.
- **δ-mem**: the history was already written into the memory as the conversation went on (one call per chunk of
  messages, ``write_chunk_tokens`` at most; its cost is reported separately as a one-time write cost); the
  answer reads the r x r state with writes off from a prompt of the visible window + question (median of
  ``repeats`` runs).

A warm-up pass at the smallest length runs first and is discarded.

Latency is wall-clock time (``time.perf_counter``). Peak memory is the growth of the process's peak resident set
size during the measured call: Linux ``VmHWM`` is reset by writing ``5`` to ``/proc/self/clear_refs`` before the
call and read after it, minus ``VmRSS`` before the call (NOT tracemalloc, which does not see torch's tensor
allocations). Before the call, glibc's ``malloc_trim(0)`` hands freed heap pages back to the system: without it, a
process that held more memory earlier (training, a longer history) serves the call from pages it still holds and
shows no growth at all (which can still happen with a C library that has no ``malloc_trim``). Where
``clear_refs`` is unavailable the value is ``None``.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import get_peft_model
from transformers import PreTrainedTokenizerFast

from peft_deltamem.config import DeltaMemConfig

from .bench_train import BackboneSpec
from .synthetic import SyntheticTaskConfig, generate_episode, render_chat


def _malloc_trim() -> None:
    """Return freed heap memory to the system (glibc), so that the next call's peak shows up as RSS growth."""
    try:
        ctypes.CDLL(None).malloc_trim(0)  # the symbols already loaded into the process, libc's among them
    except (OSError, AttributeError):
        pass  # not glibc: the peak may be under-reported (see the module docstring)


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def measure(fn: Callable[[], Any]) -> tuple[Any, float, float | None]:
    """Run ``fn()``; return ``(result, seconds, peak RSS growth in MiB or None)``."""
    gc.collect()
    _malloc_trim()
    peak_ok = True
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        peak_ok = False
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    growth = (peak - before) / 1024 if peak_ok and peak is not None and before is not None else None
    return result, seconds, growth


@dataclass(frozen=True)
class CostSpec:
    """Knobs of the cost curve."""

    history_tokens: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384, 32768)
    max_new_tokens: int = 2
    visible_turns: int = 4
    write_chunk_tokens: int = 512
    repeats: int = 3
    repeat_full_up_to: int = 8192
    r: int = 8
    seed: int = 0


def _history(tokenizer: PreTrainedTokenizerFast, tokens: int, visible_turns: int, seed: int):
    """Messages whose rendering has at least ``tokens`` tokens, cut to the last ones that fit; and the question."""
    turns = max(16, tokens // 4)  # messages average ~8 tokens; generous, then cut
    episode = generate_episode(
        SyntheticTaskConfig(num_facts=10, history_turns=turns, visible_turns=visible_turns, seed=seed), 0
    )
    messages = list(episode.history_messages)
    total, start = 1, len(messages)  # 1: the stream's <bos>
    while start > 0:
        size = len(render_chat(tokenizer, [messages[start - 1]])) - 1  # without the per-render <bos>
        if total + size > tokens:
            break
        total, start = total + size, start - 1
    return messages[start:], episode.question


def _chunks(tokenizer, messages: Sequence[dict[str, str]], budget: int) -> list[list[int]]:
    chunks, current = [], []
    for i, message in enumerate(messages):
        piece = render_chat(tokenizer, [message])
        piece = piece if i == 0 else piece[1:]
        if current and len(current) + len(piece) > budget:
            chunks.append(current)
            current = []
        current = current + piece
    return chunks + ([current] if current else [])


def _median(measurements: Sequence[tuple[Any, float, float | None]]) -> tuple[float, float | None]:
    """Median seconds and median peak growth of several :func:`measure` results."""
    seconds = statistics.median(m[1] for m in measurements)
    peaks = [m[2] for m in measurements if m[2] is not None]
    return seconds, (statistics.median(peaks) if peaks else None)


@torch.no_grad()
def _answer(model, ids: list[int], max_new_tokens: int, pad_id: int, **memory_kwargs) -> torch.Tensor:
    input_ids = torch.tensor([ids])
    return model.generate(
        **memory_kwargs,
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
    )


def cost_curve(
    tokenizer: PreTrainedTokenizerFast,
    backbone: BackboneSpec,
    spec: CostSpec,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per history length with both methods' latency and peak memory (see the module docstring).

    Untrained weights: the curve measures cost, not accuracy (δ-mem heads get small random values so that the
    reads are not skipped as no-ops anywhere).
    """
    base = backbone.build(len(tokenizer), seed=spec.seed)
    model = get_peft_model(
        backbone.build(len(tokenizer), seed=spec.seed),
        DeltaMemConfig(task_type="CAUSAL_LM", r=spec.r, init_weights=False),
    ).eval()
    pad = tokenizer.pad_token_id
    rows = []
    lengths = [min(spec.history_tokens), *spec.history_tokens]  # the first pass is a warm-up, discarded
    for i, length in enumerate(lengths):
        history, question = _history(tokenizer, length, spec.visible_turns, spec.seed)
        ask = [{"role": "user", "content": question}]
        full_ids = render_chat(tokenizer, [*history, *ask], add_generation_prompt=True)
        window_ids = render_chat(tokenizer, [*history[-spec.visible_turns :], *ask], add_generation_prompt=True)
        full_repeats = spec.repeats if length <= spec.repeat_full_up_to else 1
        full_s, full_mb = _median(
            [measure(lambda ids=full_ids: _answer(base, ids, spec.max_new_tokens, pad)) for _ in range(full_repeats)]
        )

        memory = model.new_memory(batch_size=1)

        def write(history=history, memory=memory) -> int:
            chunks = _chunks(tokenizer, history, spec.write_chunk_tokens)
            with torch.no_grad():
                for chunk in chunks:
                    ids = torch.tensor([chunk])
                    model(input_ids=ids, attention_mask=torch.ones_like(ids), memory=memory)
            return sum(len(c) for c in chunks)

        def answer(ids=window_ids, memory=memory):
            return _answer(model, ids, spec.max_new_tokens, pad, memory=memory, memory_writes=False)

        written, write_s, write_mb = measure(write)
        mem_s, mem_mb = _median([measure(answer) for _ in range(spec.repeats)])
        if i == 0:
            continue
        rows.append(
            {
                "history_tokens": written,
                "full_context_tokens": len(full_ids),
                "full_latency_s": full_s,
                "full_peak_mib": full_mb,
                "deltamem_context_tokens": len(window_ids),
                "deltamem_latency_s": mem_s,
                "deltamem_peak_mib": mem_mb,
                "deltamem_write_s": write_s,
                "deltamem_write_peak_mib": write_mb,
                "deltamem_state_floats": sum(t.numel() for t in memory.states.values()),
            }
        )
        if log is not None:
            log(
                f"    {written:>6} history tokens: full {full_s * 1e3:8.1f} ms / {full_mb or 0:7.1f} MiB | "
                f"δ-mem answer {mem_s * 1e3:6.1f} ms / {mem_mb or 0:5.1f} MiB (one-time write {write_s:.2f} s)"
            )
    return rows
