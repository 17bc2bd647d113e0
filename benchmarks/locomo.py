"""LoCoMo long-conversation QA: loading, episode building (full / truncated / memory / rag) and scoring.

LoCoMo (Maharana et al., ACL 2024) has 10 multi-session conversations between two speakers with annotated
questions in five categories. The data file is research data (CC BY-NC 4.0) and is never copied into the
package: it is read from ``<repository root>/../shared/data/locomo10.json`` (see :func:`default_locomo_path`).

Category numbers follow the data file and the reference evaluation code: 1 multi-hop, 2 temporal,
3 open-domain, 4 single-hop, 5 adversarial (excluded by default).

Everything here is tokenizer-agnostic: episodes are lists of chat messages (``{"role", "content", ...}``);
the only tokenizer hook is the optional ``count_tokens`` callable of the "truncated" mode.
"""

from __future__ import annotations

import json
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .bm25 import BM25Retriever

CATEGORY_NAMES: dict[int, str] = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}
DEFAULT_CATEGORIES: tuple[int, ...] = (1, 2, 3, 4)
MODES = ("full", "truncated", "memory", "rag")

# Category 5 questions are about things never said; the reference scorer counts an answer as right when it
# contains one of these phrases, and our episodes use the first as the gold answer.
ADVERSARIAL_ANSWER = "Not mentioned in the conversation"
_ADVERSARIAL_PHRASES = ("no information available", "not mentioned")

DEFAULT_QUESTION_TEMPLATE = (
    "Based on the conversation, answer the question with a short phrase, using exact words from the "
    "conversation whenever possible.\nQuestion: {question}\nShort answer:"
)
TEMPORAL_HINT = " Use the dates of the conversation to answer with an approximate date."

_SESSION_KEY = re.compile(r"session_(\d+)")
_DIA_ID = re.compile(r"D\d+:\d+")


class LocomoFormatError(ValueError):
    """The LoCoMo file is not valid JSON or an item does not have the expected structure."""


def default_locomo_path() -> Path:
    """``<repository root>/../shared/data/locomo10.json``, where the project keeps the data file."""
    repo_root = Path(__file__).resolve().parents[1]
    return repo_root.parent / "shared" / "data" / "locomo10.json"


# ---------------------------------------------------------------------------------------------------------------------
# Data model and loading
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocomoTurn:
    """One utterance. ``session`` is the 1-based session number of the file (``session_N``)."""

    speaker: str
    dia_id: str
    text: str
    session: int
    date_time: str
    blip_caption: str | None = None


@dataclass(frozen=True)
class LocomoSession:
    """One session: a date string (e.g. ``"1:56 pm on 8 May, 2023"``) and its turns, in order."""

    index: int
    date_time: str
    turns: tuple[LocomoTurn, ...]


@dataclass(frozen=True)
class LocomoQuestion:
    """One annotated question.

    ``answer`` is the gold answer as a string (integers in the file are converted), or ``None`` where the file
    has none (most category-5 questions, which carry ``adversarial_answer`` instead). ``evidence`` is the raw
    list of the file; :attr:`evidence_ids` extracts the well-formed dialogue ids from it.
    """

    sample_id: str
    index: int
    question: str
    answer: str | None
    category: int
    evidence: tuple[str, ...]
    adversarial_answer: str | None = None

    @property
    def qid(self) -> str:
        """Stable question id: ``"<sample_id>/<position in the sample's qa list>"``."""
        return f"{self.sample_id}/{self.index}"

    @property
    def evidence_ids(self) -> tuple[str, ...]:
        """Dialogue ids (``D<session>:<turn>``) found in ``evidence``; a few raw entries hold several or none."""
        return tuple(m for entry in self.evidence for m in _DIA_ID.findall(entry))

    @property
    def gold(self) -> str:
        """The reference answer used for scoring (see :func:`gold_answer`)."""
        return gold_answer(self.answer, self.category)


@dataclass(frozen=True)
class LocomoConversation:
    """One LoCoMo sample: two speakers, their sessions in chronological order, and the questions."""

    sample_id: str
    speaker_a: str
    speaker_b: str
    sessions: tuple[LocomoSession, ...]
    questions: tuple[LocomoQuestion, ...]

    @property
    def turns(self) -> list[LocomoTurn]:
        """All turns of all sessions, in order."""
        return [turn for session in self.sessions for turn in session.turns]


def load_locomo(path: str | Path | None = None) -> list[LocomoConversation]:
    """Load and validate ``locomo10.json`` (default: :func:`default_locomo_path`).

    Raises:
        FileNotFoundError: the file does not exist.
        LocomoFormatError: the file is not valid JSON, or an item lacks a field or has one of the wrong type
            (the message names the sample and the field).
    """
    path = Path(path) if path is not None else default_locomo_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"LoCoMo data file not found: {path}. The project expects it at <repository root>/../shared/data/"
            "locomo10.json (snap-research/locomo, data/locomo10.json)."
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise LocomoFormatError(f"{path} is not valid JSON: {err}") from err
    except UnicodeDecodeError as err:
        raise LocomoFormatError(f"{path} is not UTF-8 text: {err}") from err
    if not isinstance(raw, list):
        raise LocomoFormatError(f"{path}: expected a JSON list of samples, got {type(raw).__name__}")
    return [_parse_sample(item, position) for position, item in enumerate(raw)]


def _require(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise LocomoFormatError(f"{where}: missing field '{key}'")
    value = obj[key]
    # bool is an int subclass; never accept it where a number or string is expected.
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise LocomoFormatError(f"{where}: field '{key}' should be {names}, got {type(value).__name__}")
    return value


def _parse_sample(item: Any, position: int) -> LocomoConversation:
    if not isinstance(item, dict):
        raise LocomoFormatError(f"sample #{position}: expected an object, got {type(item).__name__}")
    sample_id = _require(item, "sample_id", str, f"sample #{position}")
    where = f"sample '{sample_id}'"
    conv = _require(item, "conversation", dict, where)
    speaker_a = _require(conv, "speaker_a", str, f"{where}.conversation")
    speaker_b = _require(conv, "speaker_b", str, f"{where}.conversation")

    numbers = sorted(int(m.group(1)) for key in conv if (m := _SESSION_KEY.fullmatch(key)))
    if not numbers:
        raise LocomoFormatError(f"{where}.conversation: no 'session_N' entries")
    sessions = []
    # Some samples list more session_N_date_time keys than sessions; only sessions with turns are read.
    for number in numbers:
        key = f"session_{number}"
        date_time = _require(conv, f"{key}_date_time", str, f"{where}.conversation")
        raw_turns = _require(conv, key, list, f"{where}.conversation")
        turns = tuple(
            _parse_turn(raw, number, date_time, f"{where}.conversation.{key}[{i}]") for i, raw in enumerate(raw_turns)
        )
        sessions.append(LocomoSession(index=number, date_time=date_time, turns=turns))

    raw_qa = _require(item, "qa", list, where)
    questions = tuple(_parse_question(raw, sample_id, i, f"{where}.qa[{i}]") for i, raw in enumerate(raw_qa))
    return LocomoConversation(sample_id, speaker_a, speaker_b, tuple(sessions), questions)


def _parse_turn(raw: Any, session: int, date_time: str, where: str) -> LocomoTurn:
    if not isinstance(raw, dict):
        raise LocomoFormatError(f"{where}: expected an object, got {type(raw).__name__}")
    caption = raw.get("blip_caption")
    if caption is not None and not isinstance(caption, str):
        raise LocomoFormatError(f"{where}: field 'blip_caption' should be str, got {type(caption).__name__}")
    return LocomoTurn(
        speaker=_require(raw, "speaker", str, where),
        dia_id=_require(raw, "dia_id", str, where),
        text=_require(raw, "text", str, where),
        session=session,
        date_time=date_time,
        blip_caption=caption or None,
    )


def _parse_question(raw: Any, sample_id: str, index: int, where: str) -> LocomoQuestion:
    if not isinstance(raw, dict):
        raise LocomoFormatError(f"{where}: expected an object, got {type(raw).__name__}")
    category = _require(raw, "category", int, where)
    if category not in CATEGORY_NAMES:
        raise LocomoFormatError(f"{where}: field 'category' should be 1-5, got {category}")
    if category == 5 and "answer" not in raw:
        answer = None
    else:
        answer = str(_require(raw, "answer", (str, int, float), where))
    evidence = _require(raw, "evidence", list, where)
    if not all(isinstance(e, str) for e in evidence):
        raise LocomoFormatError(f"{where}: field 'evidence' should be a list of str")
    adversarial = raw.get("adversarial_answer")
    return LocomoQuestion(
        sample_id=sample_id,
        index=index,
        question=_require(raw, "question", str, where),
        answer=answer,
        category=category,
        evidence=tuple(evidence),
        adversarial_answer=None if adversarial is None else str(adversarial),
    )


# ---------------------------------------------------------------------------------------------------------------------
# Rendering and episodes
# ---------------------------------------------------------------------------------------------------------------------


def render_turn(turn: LocomoTurn, *, date: bool = True) -> str:
    """``"[date] Speaker: text (shares a photo: caption)"``; the date and caption parts are optional."""
    text = f"{turn.speaker}: {turn.text}".rstrip()
    if turn.blip_caption:
        text += f" (shares a photo: {turn.blip_caption})"
    return f"[{turn.date_time}] {text}" if date else text


def conversation_to_messages(
    conv: LocomoConversation,
    *,
    role: str = "user",
    speaker_roles: Mapping[str, str] | None = None,
    date: Literal["every_turn", "first_turn", "none"] = "every_turn",
) -> list[dict[str, Any]]:
    """All turns, sessions in order, as chat messages: one message per turn.

    Each message is ``{"role", "content", "session", "dia_id"}``: ``session`` is the session number (use it, or
    the message index, as SSW segment id; see :func:`segment_ids`). ``role`` is used for every speaker unless
    ``speaker_roles`` maps the speaker's name to a role. ``date`` puts the session date on every turn, on the first
    turn of each session only, or nowhere.
    """
    speaker_roles = dict(speaker_roles or {})
    messages = []
    for session in conv.sessions:
        for position, turn in enumerate(session.turns):
            show_date = date == "every_turn" or (date == "first_turn" and position == 0)
            messages.append(
                {
                    "role": speaker_roles.get(turn.speaker, role),
                    "content": render_turn(turn, date=show_date),
                    "session": turn.session,
                    "dia_id": turn.dia_id,
                }
            )
    return messages


def segment_ids(messages: Sequence[Mapping[str, Any]], per: Literal["turn", "session"] = "turn") -> list[int]:
    """One segment id per message, numbered from 0 in order: a new segment per message, or per session."""
    if per == "turn":
        return list(range(len(messages)))
    if per != "session":
        raise ValueError(f"per must be 'turn' or 'session', got {per!r}")
    ids: list[int] = []
    for i, message in enumerate(messages):
        if "session" not in message:
            raise ValueError(f"message {i} has no 'session' key; build messages with conversation_to_messages")
        new = not ids or message["session"] != messages[i - 1]["session"]
        ids.append((ids[-1] + 1 if ids else 0) if new else ids[-1])
    return ids


@dataclass
class LocomoEpisode:
    """One question ready to run.

    ``memory_messages`` are written into the memory stream (empty except in "memory" mode),
    ``visible_messages`` are the prompt the model reads (ending with the question), ``answer`` is the scoring
    reference (:func:`gold_answer`).
    """

    qid: str
    sample_id: str
    mode: str
    category: int
    question: str
    answer: str
    memory_messages: list[dict[str, Any]]
    visible_messages: list[dict[str, Any]]
    evidence: tuple[str, ...] = ()
    retrieved_dia_ids: tuple[str, ...] = field(default_factory=tuple)


class BM25TurnRetriever(BM25Retriever):
    """BM25 over the turns of one conversation; documents are ``"Speaker: text (caption)"`` (no date).

    See :class:`bm25.BM25Retriever` for ``stopwords``; :meth:`retrieve` returns indices into ``turns``.
    """

    def __init__(self, turns: Sequence[LocomoTurn], stopwords: str | list[str] = "en_plus"):
        self.turns = list(turns)
        super().__init__([render_turn(t, date=False) for t in self.turns], stopwords, what="turns")


def gold_answer(answer: str | None, category: int) -> str:
    """The reference answer used for scoring: category 3 keeps the part before the first ``';'`` (the rest is a
    rationale), category 5 is :data:`ADVERSARIAL_ANSWER`."""
    if category == 5:
        return ADVERSARIAL_ANSWER
    if answer is None:
        raise ValueError(f"category {category} question has no gold answer")
    return answer.split(";")[0].strip() if category == 3 else answer


def question_prompt(question: LocomoQuestion, template: str = DEFAULT_QUESTION_TEMPLATE) -> str:
    """The question as the model sees it (temporal questions get a hint to answer with a date)."""
    text = question.question + (TEMPORAL_HINT if question.category == 2 else "")
    return template.format(question=text)


def _visible_start(
    messages: Sequence[Mapping[str, Any]],
    max_turns: int | None,
    max_tokens: int | None,
    count_tokens: Callable[[str], int] | None,
) -> int:
    """Index where the visible tail starts: the longest suffix of whole messages within both budgets."""
    if max_turns is None and max_tokens is None:
        raise ValueError("give max_visible_turns and/or max_visible_tokens")
    if max_tokens is not None and count_tokens is None:
        raise ValueError("max_visible_tokens needs a count_tokens callable")
    if (max_turns is not None and max_turns < 0) or (max_tokens is not None and max_tokens < 0):
        raise ValueError("visible budgets must be >= 0")
    start = 0 if max_turns is None else max(0, len(messages) - max_turns)
    if max_tokens is None:
        return start
    used, cut = 0, len(messages)
    for i in range(len(messages) - 1, start - 1, -1):
        used += count_tokens(messages[i]["content"])
        if used > max_tokens:
            break
        cut = i
    return cut


def build_episodes(
    conv: LocomoConversation,
    mode: Literal["full", "truncated", "memory", "rag"],
    categories: Sequence[int] = DEFAULT_CATEGORIES,
    *,
    max_visible_turns: int | None = None,
    max_visible_tokens: int | None = None,
    count_tokens: Callable[[str], int] | None = None,
    top_k: int = 10,
    question_template: str = DEFAULT_QUESTION_TEMPLATE,
    **message_kwargs: Any,
) -> list[LocomoEpisode]:
    """One episode per question of ``conv`` whose category is in ``categories``.

    Modes:
        - ``"full"``: the whole history, then the question, is visible; nothing goes to memory.
        - ``"truncated"``: only the last turns of the history fit the visible budget (``max_visible_turns`` and/or
          ``max_visible_tokens`` measured with ``count_tokens`` on each message's content; whole messages only);
          no memory. This is the no-memory baseline for a short context window.
        - ``"memory"``: the history is written to memory and only the question is visible. With a visible budget,
          the budget's tail stays visible and only the older history goes to memory (no turn is in both).
        - ``"rag"``: the ``top_k`` turns that BM25 ranks highest for the question (positive scores only), in
          chronological order, then the question, are visible; no memory.

    ``message_kwargs`` go to :func:`conversation_to_messages` (``role``, ``speaker_roles``, ``date``).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    bad = [c for c in categories if c not in CATEGORY_NAMES]
    if bad:
        raise ValueError(f"unknown LoCoMo categories {bad}; valid: {sorted(CATEGORY_NAMES)}")
    history = conversation_to_messages(conv, **message_kwargs)
    questions = [q for q in conv.questions if q.category in categories]

    memory: list[dict[str, Any]] = []
    context: list[dict[str, Any]] = []
    if mode == "full":
        context = history
    elif mode == "truncated":
        context = history[_visible_start(history, max_visible_turns, max_visible_tokens, count_tokens) :]
    elif mode == "memory":
        has_budget = max_visible_turns is not None or max_visible_tokens is not None
        cut = (
            _visible_start(history, max_visible_turns, max_visible_tokens, count_tokens) if has_budget else len(history)
        )
        memory, context = history[:cut], history[cut:]
    retriever = BM25TurnRetriever(conv.turns) if mode == "rag" and questions else None

    episodes = []
    for q in questions:
        retrieved: tuple[str, ...] = ()
        if retriever is not None:
            hits = sorted(retriever.retrieve(q.question, top_k))
            context = [history[i] for i in hits]
            retrieved = tuple(m["dia_id"] for m in context)
        episodes.append(
            LocomoEpisode(
                qid=q.qid,
                sample_id=conv.sample_id,
                mode=mode,
                category=q.category,
                question=q.question,
                answer=q.gold,
                memory_messages=list(memory),
                visible_messages=[*context, {"role": "user", "content": question_prompt(q, question_template)}],
                evidence=q.evidence_ids,
                retrieved_dia_ids=retrieved,
            )
        )
    return episodes


# ---------------------------------------------------------------------------------------------------------------------
# Scoring (the LoCoMo / SQuAD recipe)
# ---------------------------------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the|and)\b")


def _is_punctuation(ch: str) -> bool:
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation, drop the words a/an/the/and, collapse whitespace.

    As LoCoMo's evaluation (which extends SQuAD's with "and"); we also drop non-ASCII punctuation such as
    curly quotes, so ``Charlotte’s`` and ``Charlotte's`` normalise alike.
    """
    text = "".join(ch for ch in text.lower() if not _is_punctuation(ch))
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, gold: str, stemmer: Callable[[str], str] | None = None) -> float:
    """Token-level F1 between the normalised prediction and gold answer (bag of words, with multiplicity).

    LoCoMo's published numbers stem every token with NLTK's Porter stemmer; pass
    ``stemmer=nltk.stem.PorterStemmer().stem`` to match them exactly (NLTK is not a dependency).
    """
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(gold).split()
    if stemmer is not None:
        pred, ref = [stemmer(w) for w in pred], [stemmer(w) for w in ref]
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def multi_hop_f1(prediction: str, gold: str, stemmer: Callable[[str], str] | None = None) -> float:
    """Category-1 score: the gold answer is split on commas; each gold part takes the best F1 against any
    comma-separated part of the prediction; the result is the mean over gold parts."""
    pred_parts = [p.strip() for p in prediction.split(",")]
    gold_parts = [g.strip() for g in gold.split(",")]
    best = [max(token_f1(p, g, stemmer) for p in pred_parts) for g in gold_parts]
    return sum(best) / len(best)


def score_answer(prediction: str, gold: str, category: int, stemmer: Callable[[str], str] | None = None) -> float:
    """Score one prediction against the scoring reference ``gold`` (from :func:`gold_answer`).

    Category 1: :func:`multi_hop_f1`; 2-4: :func:`token_f1`; 5: 1.0 when the prediction says the information is
    not available ("no information available" / "not mentioned"), else 0.0.
    """
    if category == 1:
        return multi_hop_f1(prediction, gold, stemmer)
    if category in (2, 3, 4):
        return token_f1(prediction, gold, stemmer)
    if category == 5:
        return float(any(p in prediction.lower() for p in _ADVERSARIAL_PHRASES))
    raise ValueError(f"unknown LoCoMo category {category}")


def score_predictions(
    questions: Sequence[LocomoQuestion | LocomoEpisode],
    predictions: Mapping[str, str] | Sequence[str],
    categories: Sequence[int] = DEFAULT_CATEGORIES,
    *,
    stemmer: Callable[[str], str] | None = None,
) -> dict[str, Any]:
    """Mean score overall and per category.

    ``questions`` are :class:`LocomoQuestion` or :class:`LocomoEpisode` objects; those whose category is not in
    ``categories`` are skipped. ``predictions`` maps ``qid`` to the predicted answer, or is a sequence aligned
    with ``questions``. Every scored question needs a prediction.

    Returns ``{"f1", "count", "per_category": {cat: {"name", "f1", "count"}}, "per_question": {qid: score}}``;
    ``f1`` is the mean over scored questions (0.0 when none).
    """
    if not isinstance(predictions, Mapping):
        if len(predictions) != len(questions):
            raise ValueError(f"{len(predictions)} predictions for {len(questions)} questions")
        predictions = {q.qid: p for q, p in zip(questions, predictions)}
    selected = [q for q in questions if q.category in categories]
    missing = [q.qid for q in selected if q.qid not in predictions]
    if missing:
        raise KeyError(f"no prediction for {len(missing)} question(s), e.g. {missing[:3]}")

    per_question: dict[str, float] = {}
    per_category: dict[int, list[float]] = {c: [] for c in sorted(set(categories))}
    for q in selected:
        gold = q.answer if isinstance(q, LocomoEpisode) else gold_answer(q.answer, q.category)
        score = score_answer(predictions[q.qid], gold, q.category, stemmer)
        per_question[q.qid] = score
        per_category[q.category].append(score)

    def mean(values: Sequence[float]) -> float:
        return sum(values) / len(values) if values else 0.0

    return {
        "f1": mean(list(per_question.values())),
        "count": len(per_question),
        "per_category": {
            c: {"name": CATEGORY_NAMES[c], "f1": mean(v), "count": len(v)} for c, v in per_category.items()
        },
        "per_question": per_question,
    }
