"""Token-level views of synthetic memory episodes for the benchmark (one view per method), and BM25 retrieval.

Every view is a *feature*: ``input_ids`` (the visible stream, answer included), ``labels`` (-100 except on answer
tokens), ``memory_input_ids`` and ``memory_segment_ids`` (empty when nothing is written), as
:class:`peft_deltamem.training.DeltaMemDataCollator` expects. The first supervised position is always the
episode's own question (the one :func:`synthetic.generate_episode` guarantees is outside the visible window);
training views may append more question/answer pairs about the episode's other facts (``extra_questions``),
which multiplies the supervision per sequence at little cost.

Views (``visible`` = what is in the context window, ``memory`` = what is written into the δ-mem state):

==================  ===============================================  ===========================
view                visible                                          memory
==================  ===============================================  ===========================
``full``            whole history + question                         —
``window``          last ``visible_turns`` messages + question       —
``question``        question only                                    —
``memory_only``     question only                                    whole history
``memory_window``   last ``visible_turns`` messages + question       history before the window
``rag@k``           BM25 top-k older messages + window + question    —
==================  ===============================================  ===========================
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerFast

from .bm25 import BM25Retriever
from .synthetic import (
    SLOTS_BY_NAME,
    NotEnoughHistory,
    SyntheticEpisode,
    SyntheticTaskConfig,
    generate_episode,
    render_chat,
)

IGNORE_INDEX = -100
MAX_FAILED_DRAWS = 100  # consecutive draws without a valid episode before EpisodeMix.sample gives up
VIEWS = ("full", "window", "question", "memory_only", "memory_window")
Feature = dict[str, Any]


@dataclass(frozen=True)
class EpisodeMix:
    """A distribution over :class:`SyntheticTaskConfig` knobs (training draws from ranges; eval fixes them).

    ``num_facts``, ``num_updates``, ``num_distractors`` and ``num_sessions`` are inclusive ``(low, high)``
    ranges drawn uniformly per episode; the other knobs are fixed.
    """

    num_facts: tuple[int, int] = (4, 4)
    num_updates: tuple[int, int] = (2, 2)
    num_distractors: tuple[int, int] = (8, 8)
    num_sessions: tuple[int, int] = (3, 3)
    visible_turns: int = 4
    num_values: int = 8
    value_distractor_rate: float = 0.3

    def sample(self, seed: int, n: int) -> list[SyntheticEpisode]:
        """``n`` episodes, deterministic in ``(self, seed)``.

        A draw that leaves too little history outside the visible window is redrawn; after
        ``MAX_FAILED_DRAWS`` such draws in a row the mix cannot make episodes and a ``ValueError`` says so.
        An invalid config (e.g. ``num_facts`` out of range) raises at once.
        """
        rng = random.Random(f"mix-{seed}")
        episodes: list[SyntheticEpisode] = []
        index = failed = 0
        while len(episodes) < n:
            config = SyntheticTaskConfig(
                num_facts=rng.randint(*self.num_facts),
                num_updates=rng.randint(*self.num_updates),
                num_distractors=rng.randint(*self.num_distractors),
                num_sessions=rng.randint(*self.num_sessions),
                visible_turns=self.visible_turns,
                num_values=self.num_values,
                value_distractor_rate=self.value_distractor_rate,
                seed=seed,
            )
            index += 1
            try:
                episodes.append(generate_episode(config, index))
                failed = 0
            except NotEnoughHistory as error:
                failed += 1
                if failed >= MAX_FAILED_DRAWS:
                    raise ValueError(
                        f"EpisodeMix cannot make episodes: {failed} draws in a row failed ({error}). With "
                        f"visible_turns={self.visible_turns}, lower visible_turns or raise num_distractors, "
                        "num_sessions or num_facts."
                    ) from error
        return episodes


def _question_and_answer(tokenizer: PreTrainedTokenizerFast, slot: str, value: str) -> tuple[list[int], int]:
    question = render_chat(tokenizer, [{"role": "user", "content": SLOTS_BY_NAME[slot].question}], True)[1:]
    (answer,) = tokenizer.convert_tokens_to_ids([value])
    return question, answer


class FeatureBuilder:
    """Turns episodes into features of one view; ``extra_questions`` > 0 adds Q/A pairs (training only)."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, extra_questions: int = 0, seed: int = 0):
        self.tokenizer = tokenizer
        self.extra_questions = extra_questions
        self.seed = seed

    def _messages_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        return render_chat(self.tokenizer, list(messages)) if messages else []

    def _segments(self, messages: Sequence[dict[str, str]]) -> tuple[list[int], list[int]]:
        """Memory stream of ``messages``: ids and one segment id per message (``<bos>`` joins the first)."""
        ids, segments = [], []
        for i, message in enumerate(messages):
            piece = render_chat(self.tokenizer, [message])
            piece = piece if i == 0 else piece[1:]  # one <bos> for the whole stream
            ids += piece
            segments += [i] * len(piece)
        return ids, segments

    def _visible(self, episode: SyntheticEpisode, context: Sequence[dict[str, str]]) -> tuple[list[int], list[int]]:
        bos = [self.tokenizer.bos_token_id]
        ids = self._messages_ids(context) or bos
        labels = [IGNORE_INDEX] * len(ids)
        slots = [episode.metadata["slot"]]
        if self.extra_questions:
            others = sorted(s for s in episode.metadata["facts"] if s != slots[0])
            random.Random(f"{self.seed}-{episode.metadata['seed']}").shuffle(others)
            slots += others[: self.extra_questions]
        eos = self.tokenizer.eos_token_id
        for slot in slots:
            question, answer = _question_and_answer(self.tokenizer, slot, episode.metadata["facts"][slot])
            ids += question + [answer, eos]
            labels += [IGNORE_INDEX] * len(question) + [answer, IGNORE_INDEX]
        return ids, labels

    def build(self, episode: SyntheticEpisode, view: str, retrieved: Sequence[int] = ()) -> Feature:
        """The feature of ``episode`` for ``view`` (see the module docstring); ``retrieved`` for ``rag``."""
        history, older = episode.history_messages, episode.memory_messages
        window = history[len(older) :]
        memory: Sequence[dict[str, str]] = ()
        if view == "full":
            context = history
        elif view == "window":
            context = window
        elif view == "question":
            context = ()
        elif view == "memory_only":
            context, memory = (), history
        elif view == "memory_window":
            context, memory = window, older
        elif view == "rag":
            context = [older[i] for i in sorted(retrieved)] + list(window)
        else:
            raise ValueError(f"unknown view {view!r}; choose one of {VIEWS + ('rag',)}")
        ids, labels = self._visible(episode, context)
        memory_ids, segments = self._segments(memory)
        return {"input_ids": ids, "labels": labels, "memory_input_ids": memory_ids, "memory_segment_ids": segments}


def bm25_top_k(episode: SyntheticEpisode, k: int) -> list[int]:
    """Indices into ``episode.memory_messages`` of the ``k`` messages BM25 ranks highest for the question.

    One index per episode over the messages outside the visible window (their text only), as
    :class:`bm25.BM25Retriever` (English stop words "en_plus"; only positive scores).
    """
    corpus = [m["content"] for m in episode.memory_messages]
    if k <= 0 or not corpus:
        return []
    return BM25Retriever(corpus).retrieve(episode.question, k)


def answer_positions(feature: Feature) -> list[int]:
    """Positions of the supervised answer tokens in ``feature["input_ids"]`` (the first is the asked question)."""
    return [i for i, label in enumerate(feature["labels"]) if label != IGNORE_INDEX]


def context_tokens(feature: Feature) -> int:
    """Tokens in the context window before the first answer (prompt length)."""
    return answer_positions(feature)[0]
