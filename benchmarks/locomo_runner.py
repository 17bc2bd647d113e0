"""Run a causal LM (optionally with a δ-mem adapter) on LoCoMo and score it: the engine of ``scripts/eval_locomo.py``.

Per conversation, :func:`run_conversation` builds the episodes of one mode with :func:`locomo.build_episodes`, then
answers every question by greedy generation:

- ``full`` / ``truncated`` / ``rag``: the visible messages (whole history, its tail, or the BM25 top-k turns) and the
  question are the prompt; nothing is written into memory.
- ``memory``: the older history is written into the δ-mem memory **once per conversation** (in chunks of whole
  messages, each chunk one forward call with writes on), the state is snapshotted, and every question restarts
  from that snapshot and is answered with writes off (the question never pollutes the memory). Without a δ-mem
  adapter the memory stream is simply dropped (the "no memory" baseline) and a warning says so.

Prompts are tokenised exactly as training episodes are (:func:`training.episodes.tokenize_prompt_and_answer`: the
tokenizer's chat template, or the plain ``Role: content`` format when it has none); the memory stream with
:func:`training.episodes.tokenize_messages`, one SSW segment per message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from peft_deltamem.training.episodes import tokenize_messages, tokenize_prompt_and_answer

from .locomo import DEFAULT_CATEGORIES, LocomoConversation, LocomoEpisode, build_episodes, score_predictions

logger = logging.getLogger(__name__)

_ANSWER_PROBE = {"role": "assistant", "content": "x"}  # only the prompt half of the tokenisation is used


@dataclass
class LocomoRunConfig:
    """How questions are asked.

    Attributes:
        mode: ``full``, ``truncated``, ``memory`` or ``rag`` (see :func:`locomo.build_episodes`).
        max_new_tokens: generation budget per answer (greedy).
        max_visible_tokens: visible budget of ``truncated`` (and optionally ``memory``) in tokens of message content.
        max_visible_turns: visible budget in messages (either budget, or both, may be given).
        top_k: retrieved turns in ``rag`` mode.
        categories: LoCoMo categories asked (1-4 by default; 5 is adversarial).
        write_chunk_tokens: ``memory`` mode writes the history in calls of at most this many tokens (whole
            messages; a longer message is one call on its own). None: the whole history in one call.
        max_prompt_tokens: left-truncate longer prompts (keeps the question). None: no limit.
        limit_questions: ask at most this many questions per conversation (None: all).
        role: chat role given to every speaker's turns (``user``), or ``alternate`` (first speaker ``user``,
            second ``assistant``), for templates that require alternating roles.
    """

    mode: str = "memory"
    max_new_tokens: int = 32
    max_visible_tokens: int | None = None
    max_visible_turns: int | None = None
    top_k: int = 10
    categories: tuple[int, ...] = DEFAULT_CATEGORIES
    write_chunk_tokens: int | None = 8192
    max_prompt_tokens: int | None = None
    limit_questions: int | None = None
    role: str = "user"


def is_delta_mem_model(model: Any) -> bool:
    """Whether ``model`` is a PEFT model whose active adapter is δ-mem (has the memory API)."""
    return hasattr(model, "new_memory")


def _message_kwargs(conv: LocomoConversation, role: str) -> dict[str, Any]:
    if role == "alternate":
        return {"speaker_roles": {conv.speaker_a: "user", conv.speaker_b: "assistant"}}
    return {"role": role}


def _episodes(conv: LocomoConversation, config: LocomoRunConfig, count_tokens: Callable[[str], int]):
    budgets: dict[str, Any] = {}
    if config.mode in ("truncated", "memory"):
        if config.max_visible_turns is not None:
            budgets["max_visible_turns"] = config.max_visible_turns
        if config.max_visible_tokens is not None:
            budgets.update(max_visible_tokens=config.max_visible_tokens, count_tokens=count_tokens)
        if config.mode == "truncated" and not budgets:
            raise ValueError("mode 'truncated' needs --max-visible-tokens and/or --max-visible-turns")
    episodes = build_episodes(
        conv,
        config.mode,
        config.categories,
        top_k=config.top_k,
        **budgets,
        **_message_kwargs(conv, config.role),
    )
    return episodes[: config.limit_questions] if config.limit_questions is not None else episodes


def _memory_chunks(ids: list[int], segments: list[int], budget: int | None) -> list[tuple[list[int], list[int]]]:
    """Split a memory stream into calls of whole segments (messages) of at most ``budget`` tokens."""
    if budget is None or len(ids) <= budget:
        return [(ids, segments)] if ids else []
    chunks, start = [], 0
    while start < len(ids):
        end = min(start + budget, len(ids))
        if end < len(ids):
            # back off to the start of the segment that the budget cuts (unless that leaves the chunk empty)
            cut = end
            while cut > start and segments[cut - 1] == segments[end]:
                cut -= 1
            if cut > start:
                end = cut
            else:  # one message longer than the budget: it is a call on its own
                while end < len(ids) and segments[end] == segments[end - 1]:
                    end += 1
        chunks.append((ids[start:end], segments[start:end]))
        start = end
    return chunks


@torch.no_grad()
def write_memory(
    model: Any, ids: list[int], segments: list[int], budget: int | None, device: torch.device
) -> tuple[Any, int]:
    """Write the stream into a new δ-mem memory; returns the memory and the number of forward calls."""
    memory = model.new_memory(batch_size=1)
    chunks = _memory_chunks(ids, segments, budget)
    for chunk_ids, chunk_segments in chunks:
        input_ids = torch.tensor([chunk_ids], device=device)
        model(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            memory=memory,
            memory_segment_ids=torch.tensor([chunk_segments], device=device),
        )
    return memory, len(chunks)


def _prompt_ids(tokenizer: Any, messages: Sequence[dict[str, Any]], max_prompt_tokens: int | None) -> list[int]:
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    prompt, _ = tokenize_prompt_and_answer(plain, _ANSWER_PROBE, tokenizer)
    if max_prompt_tokens is not None and len(prompt) > max_prompt_tokens:
        prompt = prompt[len(prompt) - max_prompt_tokens :]
    return prompt


@torch.no_grad()
def _generate(
    model: Any, tokenizer: Any, prompt: list[int], max_new_tokens: int, device: torch.device, **memory_kwargs
) -> str:
    input_ids = torch.tensor([prompt], device=device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    output = model.generate(
        **memory_kwargs,
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
    )
    return tokenizer.decode(output[0, len(prompt) :], skip_special_tokens=True).strip()


def run_conversation(
    model: Any, tokenizer: Any, conv: LocomoConversation, config: LocomoRunConfig, device: torch.device,
    router: Any = None,
) -> tuple[list[LocomoEpisode], list[dict[str, Any]]]:
    """Answer the questions of one conversation; returns the episodes and one prediction record per episode.
    ``router`` (a :class:`~peft_deltamem.agents.router.MemoryRouter`, memory mode) decides per question whether the
    answer reads the written memory; one that does not reads an empty memory, as in the chat engine."""

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    episodes = _episodes(conv, config, count_tokens)
    delta_mem = is_delta_mem_model(model)
    memory_tokens, snapshot, write_s = 0, None, 0.0
    if config.mode == "memory" and episodes:
        history = [{"role": m["role"], "content": m["content"]} for m in episodes[0].memory_messages]
        ids, segments, _ = tokenize_messages(history, tokenizer)
        memory_tokens = len(ids)
        if delta_mem:
            start = time.perf_counter()
            snapshot, _ = write_memory(model, ids, segments, config.write_chunk_tokens, device)
            write_s = time.perf_counter() - start
        else:
            logger.warning("mode 'memory' without a δ-mem adapter: the history is dropped (no-memory baseline)")

    reads = [True] * len(episodes)
    if router is not None and snapshot is not None:
        reads = router.reads_memory(model, tokenizer, [episode.question for episode in episodes])
    records = []
    for episode, read in zip(episodes, reads, strict=True):
        prompt = _prompt_ids(tokenizer, episode.visible_messages, config.max_prompt_tokens)
        start = time.perf_counter()
        if delta_mem:  # the questions read the written history (or an empty memory) and write nothing
            memory = snapshot if snapshot is not None and read else model.new_memory(batch_size=1)
            prediction = _generate(
                model, tokenizer, prompt, config.max_new_tokens, device, memory=memory, memory_writes=False
            )
        else:
            prediction = _generate(model, tokenizer, prompt, config.max_new_tokens, device)
        records.append(
            {
                "qid": episode.qid,
                "sample_id": episode.sample_id,
                "category": episode.category,
                "question": episode.question,
                "answer": episode.answer,
                "prediction": prediction,
                "mode": episode.mode,
                "prompt_tokens": len(prompt),
                "memory_tokens": memory_tokens if delta_mem else 0,
                "reads_memory": bool(snapshot is not None and read),
                "memory_write_s": write_s,
                "latency_s": time.perf_counter() - start,
                "evidence": list(episode.evidence),
                "retrieved_dia_ids": list(episode.retrieved_dia_ids),
            }
        )
    return episodes, records


def run_locomo(
    model: Any,
    tokenizer: Any,
    conversations: Sequence[LocomoConversation],
    config: LocomoRunConfig,
    device: torch.device | str = "cpu",
    progress: Callable[[str], None] | None = None,
    stemmer: Callable[[str], str] | None = None,
    router: Any = None,
) -> dict[str, Any]:
    """Answer and score the questions of ``conversations``; ``router`` as in :func:`run_conversation`.

    ``stemmer`` is applied to every token before scoring (LoCoMo's published numbers use NLTK's Porter stemmer).

    Returns ``{"config", "scores", "predictions", "timing"}``: ``scores`` is :func:`locomo.score_predictions`'s
    dict (``f1``, ``count``, ``per_category``, ``per_question``), ``predictions`` one record per question
    (``qid``, ``prediction``, ``answer``, ``category``, ``prompt_tokens``, ``memory_tokens``, ``latency_s``, …).
    """
    device = torch.device(device)
    model.eval()  # in eval mode the memory written by one call is kept for the next
    all_episodes, records = [], []
    start = time.perf_counter()
    for i, conv in enumerate(conversations):
        episodes, conv_records = run_conversation(model, tokenizer, conv, config, device, router)
        all_episodes += episodes
        records += conv_records
        if progress is not None:
            progress(f"[{i + 1}/{len(conversations)}] {conv.sample_id}: {len(conv_records)} questions")
    predictions = {r["qid"]: r["prediction"] for r in records}
    scores = score_predictions(all_episodes, predictions, config.categories, stemmer=stemmer)
    latencies = [r["latency_s"] for r in records]
    return {
        "config": asdict(config),
        "scores": scores,
        "predictions": records,
        "timing": {
            "total_s": time.perf_counter() - start,
            "mean_latency_s": sum(latencies) / len(latencies) if latencies else 0.0,
            "questions": len(records),
            "conversations": len(conversations),
        },
    }
