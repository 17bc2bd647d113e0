"""Training episodes for δ-mem from chat data (the paper's recipe; see docs/training.md).

One episode per supervised assistant turn ("target"):

- **memory stream** (written into the memory): the older history, i.e. every non-system message before the
  last ``visible_turns`` messages that precede the target (plus the system prompt when
  ``system_in_memory=True``). Tokenised with the chat template, **left**-truncated to ``max_memory_tokens``
  (the most recent tokens are kept), with one segment id per message (``0, 1, 2, …`` in message order,
  renumbered from 0 after truncation, so ids are contiguous and non-decreasing).
- **visible stream** (read with writes off): system prompt (if any) + the last ``visible_turns`` messages +
  the target answer. ``labels`` are ``-100`` except on the answer tokens, which are exactly the tokens the chat
  template emits for the assistant message after the generation prompt (content and end-of-turn marker, plus
  whatever the template appends after it, e.g. ChatML's trailing newline). When longer than ``max_length``
  the prompt is truncated from the **left** (the answer is kept); only when the answer alone does not fit is
  its end cut (at least one prompt token is always kept so the first answer token has a prediction).
- optional **context stream** (``context_stream=True``): system + *all* earlier messages + answer, left-truncated
  to ``max_context_length``; the collator uses it for "memory_and_context" ablation rows.

Tokenizers without a chat template use a plain-text format (``plain``): every message is
``"{Role}: {content}\\n"`` (``System``/``User``/``Assistant``), assistant messages end their content with the
tokenizer's EOS token, streams start with the BOS token when the tokenizer has one, the generation prompt is
``"Assistant:"`` and the answer is ``" {content}{eos}\\n"`` (prompt and answer are tokenised separately, so
the boundary is exact by construction).

Chat-template prefix property: the answer boundary is found by rendering the prompt with
``add_generation_prompt=True`` and the conversation including the answer; the former must be a *token*
prefix of the latter, otherwise an :class:`EpisodeError` (reason ``"template_prefix"``) is raised.
The memory stream is the template's rendering of the history as a conversation on its own. Templates that
are append-only (rendering ``messages[:k]`` is a prefix of rendering ``messages[:k+1]``) give exact
per-message segments. For templates that re-render earlier turns (e.g. Qwen3's ``<think>`` handling of the
last assistant turn) the tokens are still exact, but segment boundaries are placed at the end of the previous
message's content (its end-of-turn marker joins the next segment); episodes report this via
``memory_segments_exact``. Slow tokenizers (no offsets) tokenise the history message by message.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ..runtime import check_bool

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
_PLAIN_ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}
_PLAIN_GENERATION_PROMPT = "Assistant:"

EPISODE_KEYS = (
    "memory_input_ids",
    "memory_segment_ids",
    "input_ids",
    "labels",
    "turn_index",
    "num_memory_messages",
    "memory_tokens_dropped",
    "visible_tokens_dropped",
    "answer_tokens_dropped",
    "memory_segments_exact",
)
CONTEXT_KEYS = ("context_input_ids", "context_labels", "context_tokens_dropped")


class EpisodeError(ValueError):
    """An example cannot be turned into episodes; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class NoSupervisedTurnError(EpisodeError):
    """The example has no assistant turn to supervise (counted, not an error, by the map function)."""

    def __init__(self, message: str):
        super().__init__("no_supervised_turn", message)


@dataclass
class EpisodeConfig:
    """How chat examples become δ-mem training episodes.

    Attributes:
        visible_turns: non-system messages before the target answer that stay visible (0: only the system prompt
            and the generation prompt are visible; everything else is in memory).
        max_memory_tokens: memory-stream budget; longer streams keep their last tokens. None: no limit.
        max_length: visible-stream budget (prompt + answer); the prompt is truncated from the left.
        supervise: ``"final"`` (the last assistant message) or ``"all"`` (one episode per assistant message).
        system_in_memory: also write the system prompt at the start of the memory stream (only when there is
            history to write). It always stays in the visible stream.
        context_stream: also build the full-context stream (all history visible) for context-ablation mixing.
        max_context_length: budget of the context stream; None means ``max_memory_tokens + max_length``
            (unlimited when ``max_memory_tokens`` is None).
        chat_format: ``"auto"`` (chat template when the tokenizer has one, else plain), ``"template"`` or
            ``"plain"``.
        chat_template_kwargs: extra variables for ``apply_chat_template`` (e.g. ``{"enable_thinking": False}``).
        messages_column: column holding the list of ``{"role", "content"}`` messages.
        id_column: optional column copied (as a string) into each episode as ``example_id`` and used in errors.
        on_error: what the map function does with a malformed example: ``"raise"`` or ``"count"`` (skip it and
            count it by reason). Examples without an assistant turn are always skipped and counted.
    """

    visible_turns: int = 1
    max_memory_tokens: int | None = 8192
    max_length: int = 512
    supervise: Literal["final", "all"] = "final"
    system_in_memory: bool = False
    context_stream: bool = False
    max_context_length: int | None = None
    chat_format: Literal["auto", "template", "plain"] = "auto"
    chat_template_kwargs: dict[str, Any] | None = None
    messages_column: str = "messages"
    id_column: str | None = None
    on_error: Literal["raise", "count"] = "raise"

    def __post_init__(self) -> None:
        def integer(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        for name in ("system_in_memory", "context_stream"):
            check_bool(getattr(self, name), name)
        if not integer(self.visible_turns) or self.visible_turns < 0:
            raise ValueError(f"visible_turns must be an int >= 0, got {self.visible_turns!r}")
        if self.max_memory_tokens is not None and (not integer(self.max_memory_tokens) or self.max_memory_tokens < 0):
            raise ValueError(f"max_memory_tokens must be an int >= 0 or None, got {self.max_memory_tokens!r}")
        if not integer(self.max_length) or self.max_length < 2:
            raise ValueError(
                f"max_length must be an int >= 2 (one prompt token and one answer token), got {self.max_length!r}"
            )
        context = self.max_context_length
        if context is not None and (not integer(context) or context < 2):
            raise ValueError(f"max_context_length must be an int >= 2 or None, got {self.max_context_length!r}")
        if self.supervise not in ("final", "all"):
            raise ValueError(f"supervise must be 'final' or 'all', got {self.supervise!r}")
        if self.chat_format not in ("auto", "template", "plain"):
            raise ValueError(f"chat_format must be 'auto', 'template' or 'plain', got {self.chat_format!r}")
        if self.on_error not in ("raise", "count"):
            raise ValueError(f"on_error must be 'raise' or 'count', got {self.on_error!r}")

    @property
    def context_budget(self) -> int | None:
        """Effective budget of the context stream."""
        if self.max_context_length is not None:
            return self.max_context_length
        if self.max_memory_tokens is None:
            return None
        return self.max_memory_tokens + self.max_length


# ----------------------------------------------------------------------------------------------- validation


def validate_messages(messages: Any, name: str = "example") -> list[dict[str, str]]:
    """Check a chat example and return its messages as plain ``{"role", "content"}`` dicts.

    Raises :class:`EpisodeError` naming ``name`` and the problem: not a list, empty, a message that is not a
    mapping, missing role/content, unknown role, non-string content, or a system message that is not first.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise EpisodeError("not_a_list", f"{name}: messages must be a list of {{role, content}}, got {type(messages)}")
    if len(messages) == 0:
        raise EpisodeError("no_messages", f"{name}: messages is empty")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise EpisodeError("not_a_message", f"{name}: message {i} is a {type(message).__name__}, not a mapping")
        if "role" not in message or message["role"] is None:
            raise EpisodeError("missing_role", f"{name}: message {i} has no 'role'")
        if "content" not in message or message["content"] is None:
            raise EpisodeError("missing_content", f"{name}: message {i} ({message['role']!r}) has no 'content'")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise EpisodeError("unknown_role", f"{name}: message {i} has unknown role {role!r} (expected {ROLES})")
        if not isinstance(content, str):
            raise EpisodeError(
                "non_string_content",
                f"{name}: message {i} ({role}) has {type(content).__name__} content; only strings are supported",
            )
        if role == "system" and i != 0:
            raise EpisodeError("misplaced_system", f"{name}: message {i} is a system message; only the first may be")
        out.append({"role": role, "content": content})
    return out


# ------------------------------------------------------------------------------------------------ rendering


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# (tokenizer id, template, kwargs) -> whether the template renders a probe conversation append-only
_APPEND_ONLY: dict[tuple, bool] = {}


class _TemplateFormat:
    """Chat-template rendering; renders are cached per conversation prefix within one example."""

    def __init__(self, tokenizer: Any, kwargs: dict[str, Any] | None, name: str):
        self.tokenizer = tokenizer
        self.kwargs = dict(kwargs or {})
        self.name = name
        self._cache: dict[tuple, str] = {}

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        key = (tuple((m["role"], m["content"]) for m in messages), add_generation_prompt)
        if key not in self._cache:
            try:
                text = self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=add_generation_prompt, **self.kwargs
                )
            except Exception as err:  # jinja errors, raise_exception() in templates, ...
                roles = [m["role"] for m in messages]
                raise EpisodeError(
                    "template_error", f"{self.name}: the chat template failed on roles {roles}: {err}"
                ) from err
            if not isinstance(text, str):
                raise EpisodeError("template_error", f"{self.name}: apply_chat_template returned {type(text)}")
            self._cache[key] = text
        return self._cache[key]

    def history(self, messages: list[dict[str, str]], first: int = 0) -> tuple[list[int], list[int], bool]:
        if first > 0 and getattr(self.tokenizer, "is_fast", False):
            known = self._history_from(messages, first)
            if known is not None:
                return known
        renders = [self.render(messages[: k + 1], False) for k in range(len(messages))]
        text = renders[-1]
        exact = all(renders[k + 1].startswith(renders[k]) for k in range(len(renders) - 1))
        starts = [0] + [len(r) for r in renders[:-1]] if exact else _anchored_starts(text, messages, self.name)
        if not getattr(self.tokenizer, "is_fast", False):
            return _encode_pieces(self.tokenizer, text, starts) + (False,)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        # a token belongs to the message in which it starts
        segments = [bisect.bisect_right(starts, begin) - 1 for begin, _ in enc["offset_mapping"]]
        return list(enc["input_ids"]), segments, exact

    def _history_from(self, messages: list[dict[str, str]], first: int) -> tuple[list[int], list[int], bool] | None:
        """The whole history's tokens with the segments of messages ``first`` on (earlier tokens: -1), rendering
        only the prefixes that end at those messages: O(history) work, not O(history²). None when one of those
        prefixes is not a prefix of the whole rendering, or the template is not append-only on a probe conversation
        (a template that rewrites earlier turns, as thinking templates do: the caller then takes the general path,
        whose segments for such templates are anchored on the messages' contents)."""
        if not self._append_only():
            return None
        text = self.render(messages, False)
        prefixes = [self.render(messages[:k], False) if k else "" for k in range(first, len(messages))]
        if not all(text.startswith(p) for p in prefixes):
            return None
        starts = [len(p) for p in prefixes]
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        segments = [
            first + bisect.bisect_right(starts, begin) - 1 if begin >= starts[0] else -1
            for begin, _ in enc["offset_mapping"]
        ]
        return list(enc["input_ids"]), segments, True

    def _append_only(self) -> bool:
        key = (id(self.tokenizer), self.tokenizer.chat_template, repr(sorted(self.kwargs.items())))
        if key not in _APPEND_ONLY:
            probe = [{"role": r, "content": c} for r, c in
                     (("user", "one"), ("assistant", "two"), ("user", "three"), ("assistant", "four"))]  # fmt: skip
            try:
                renders = [self.render(probe[: k + 1], False) for k in range(len(probe))]
            except EpisodeError:
                renders = ["x", ""]  # a template that refuses the probe is not assumed append-only
            _APPEND_ONLY[key] = all(b.startswith(a) for a, b in zip(renders, renders[1:]))
        return _APPEND_ONLY[key]

    def prompt(self, context: list[dict[str, str]]) -> list[int]:
        return _encode(self.tokenizer, self.render(context, True))

    def prompt_and_answer(self, context: list[dict[str, str]], answer: dict[str, str]) -> tuple[list[int], list[int]]:
        prompt_text = self.render(context, True)
        full_text = self.render(context + [answer], False)
        prompt, full = _encode(self.tokenizer, prompt_text), _encode(self.tokenizer, full_text)
        if full[: len(prompt)] != prompt or len(full) <= len(prompt):
            how = "not even a text prefix" if not full_text.startswith(prompt_text) else "a text but not a token prefix"
            raise EpisodeError(
                "template_prefix",
                f"{self.name}: the chat template lacks the prefix property: the prompt rendered with "
                f"add_generation_prompt=True (ending {prompt_text[-40:]!r}) is {how} of the conversation rendered "
                f"with the assistant answer (around {full_text[len(prompt_text) - 40 : len(prompt_text) + 40]!r}), "
                "so the answer tokens cannot be located. Fix the template or use chat_format='plain'.",
            )
        return prompt, full[len(prompt) :]


class _PlainFormat:
    """Plain-text fallback (see the module docstring); tokenised message by message."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token or ""
        bos_id = tokenizer.bos_token_id
        self.bos = [bos_id] if bos_id is not None else []

    def _message(self, message: dict[str, str]) -> list[int]:
        eos = self.eos if message["role"] == "assistant" else ""
        return _encode(self.tokenizer, f"{_PLAIN_ROLE_NAMES[message['role']]}: {message['content']}{eos}\n")

    def history(self, messages: list[dict[str, str]], first: int = 0) -> tuple[list[int], list[int], bool]:
        ids, segments = list(self.bos), [0] * len(self.bos)
        for k, message in enumerate(messages):
            piece = self._message(message)
            ids += piece
            segments += [k] * len(piece)
        return ids, segments, True

    def prompt(self, context: list[dict[str, str]]) -> list[int]:
        prompt = list(self.bos)
        for message in context:
            prompt += self._message(message)
        return prompt + _encode(self.tokenizer, _PLAIN_GENERATION_PROMPT)

    def prompt_and_answer(self, context: list[dict[str, str]], answer: dict[str, str]) -> tuple[list[int], list[int]]:
        return self.prompt(context), _encode(self.tokenizer, f" {answer['content']}{self.eos}\n")


def _anchored_starts(text: str, messages: list[dict[str, str]], name: str) -> list[int]:
    """Segment starts for non-append-only templates: each message starts where the previous content ended."""
    starts, cursor = [0], 0
    for k, message in enumerate(messages):
        content = message["content"]
        pos = text.find(content, cursor) if content else -1
        if pos < 0 and content.strip():
            content = content.strip()
            pos = text.find(content, cursor)
        if pos < 0:
            if content.strip():
                raise EpisodeError(
                    "template_error",
                    f"{name}: cannot locate message {k} in the chat template's rendering of the history (the template "
                    "is not append-only and changes the content); use chat_format='plain'",
                )
            pos = cursor
        if k > 0:
            starts.append(cursor)
        cursor = pos + len(content)
    return starts


def _encode_pieces(tokenizer: Any, text: str, starts: list[int]) -> tuple[list[int], list[int]]:
    # slow tokenizers have no offsets: tokenise each message's text on its own
    ids, segments = [], []
    bounds = starts + [len(text)]
    for k in range(len(starts)):
        piece = _encode(tokenizer, text[bounds[k] : bounds[k + 1]])
        ids += piece
        segments += [k] * len(piece)
    return ids, segments


def _make_format(tokenizer: Any, config: EpisodeConfig, name: str) -> _TemplateFormat | _PlainFormat:
    has_template = getattr(tokenizer, "chat_template", None) is not None
    fmt = config.chat_format
    if fmt == "template" and not has_template:
        raise ValueError("chat_format='template' but the tokenizer has no chat_template")
    if fmt == "template" or (fmt == "auto" and has_template):
        return _TemplateFormat(tokenizer, config.chat_template_kwargs, name)
    return _PlainFormat(tokenizer)


# ------------------------------------------------------------------------------------------- public helpers


def tokenize_messages(
    messages: list[dict[str, str]],
    tokenizer: Any,
    *,
    chat_format: Literal["auto", "template", "plain"] = "auto",
    chat_template_kwargs: dict[str, Any] | None = None,
    first: int = 0,
) -> tuple[list[int], list[int], bool]:
    """Tokenise a message list as a memory stream.

    Returns ``(input_ids, segment_ids, exact_segments)``: segment ``k`` is message ``k``; ``exact_segments`` is
    False when the template is not append-only (see the module docstring). An empty list gives empty lists.
    ``first``: only the segments of messages ``first`` on are needed (a chat session's new messages); with a fast
    tokenizer and a template whose renderings up to those messages are prefixes of the whole, earlier tokens may
    get segment -1, and the work grows with the history's length instead of its square.
    """
    if not messages:
        return [], [], True
    config = EpisodeConfig(chat_format=chat_format, chat_template_kwargs=chat_template_kwargs)
    name = "messages"
    return _make_format(tokenizer, config, name).history(validate_messages(messages, name), first)


def tokenize_prompt_and_answer(
    context: list[dict[str, str]],
    answer: dict[str, str],
    tokenizer: Any,
    *,
    chat_format: Literal["auto", "template", "plain"] = "auto",
    chat_template_kwargs: dict[str, Any] | None = None,
) -> tuple[list[int], list[int]]:
    """Tokenise ``context`` + generation prompt, and the tokens the format emits for the ``answer`` message.

    ``prompt + answer`` equals the tokenisation of the whole conversation (checked for chat templates).
    """
    config = EpisodeConfig(chat_format=chat_format, chat_template_kwargs=chat_template_kwargs)
    name = "messages"
    checked = validate_messages(list(context) + [answer], name)
    return _make_format(tokenizer, config, name).prompt_and_answer(checked[:-1], checked[-1])


def tokenize_prompt(
    context: list[dict[str, str]],
    tokenizer: Any,
    *,
    chat_format: Literal["auto", "template", "plain"] = "auto",
    chat_template_kwargs: dict[str, Any] | None = None,
) -> list[int]:
    """Tokenise ``context`` + generation prompt: what an episode's visible stream holds before the answer."""
    config = EpisodeConfig(chat_format=chat_format, chat_template_kwargs=chat_template_kwargs)
    name = "messages"
    return _make_format(tokenizer, config, name).prompt(validate_messages(list(context), name))


def fit_prompt_and_answer(
    prompt: list[int], answer: list[int], max_length: int | None
) -> tuple[list[int], list[int], int, int]:
    """Join prompt and answer into ``(input_ids, labels, prompt_tokens_dropped, answer_tokens_dropped)``.

    The prompt is left-truncated first; the answer's end is cut only if the answer alone exceeds
    ``max_length - 1`` (one prompt token is always kept). Labels are -100 on the prompt.
    """
    if not prompt:
        raise ValueError("the prompt is empty: at least one token must precede the answer")
    answer_dropped = 0
    if max_length is not None and len(prompt) + len(answer) > max_length:
        keep_answer = min(len(answer), max_length - 1)
        answer_dropped = len(answer) - keep_answer
        answer = answer[:keep_answer]
        keep_prompt = max_length - keep_answer
        prompt_dropped = len(prompt) - keep_prompt
        prompt = prompt[prompt_dropped:]
    else:
        prompt_dropped = 0
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + list(answer), prompt_dropped, answer_dropped


# ------------------------------------------------------------------------------------------------- episodes


def build_episodes(
    example: Mapping[str, Any], tokenizer: Any, config: EpisodeConfig | None = None, *, name: str | None = None
) -> list[dict[str, Any]]:
    """Build the training episodes of one chat example.

    Each episode is a dict with ``memory_input_ids``, ``memory_segment_ids``, ``input_ids``, ``labels`` (lists of
    ints), stats (``turn_index``: index of the target in ``messages``; ``num_memory_messages``;
    ``memory_tokens_dropped``; ``visible_tokens_dropped``; ``answer_tokens_dropped``;
    ``memory_segments_exact``), with ``context_stream=True`` also ``context_input_ids``, ``context_labels``,
    ``context_tokens_dropped``, and with ``id_column`` set, ``example_id``.

    Messages after the last supervised assistant message are ignored. Raises :class:`EpisodeError` (a
    ValueError) for malformed examples and :class:`NoSupervisedTurnError` when
    there is no assistant message; messages name the example (``name``, else its id, else "example").
    """
    config = config or EpisodeConfig()
    if not isinstance(example, Mapping):
        raise EpisodeError("not_a_mapping", f"{name or 'example'}: expected a mapping, got {type(example).__name__}")
    example_id = example.get(config.id_column) if config.id_column else None
    if name is None:
        name = f"example {example_id!r}" if example_id is not None else "example"
    if config.messages_column not in example:
        raise EpisodeError("missing_messages", f"{name}: no {config.messages_column!r} column")
    messages = validate_messages(example[config.messages_column], name)

    offset = 1 if messages[0]["role"] == "system" else 0
    system, turns = messages[:offset], messages[offset:]
    targets = [i for i, m in enumerate(turns) if m["role"] == "assistant"]
    if not targets:
        raise NoSupervisedTurnError(f"{name}: no assistant message to supervise")
    if config.supervise == "final":
        targets = targets[-1:]

    fmt = _make_format(tokenizer, config, name)
    episodes = []
    for target in targets:
        if not turns[target]["content"].strip():
            raise EpisodeError(
                "empty_answer",
                f"{name}: message {target + offset} is an assistant message with empty content, so there is nothing "
                "to supervise; drop the message or give it content",
            )
        split = max(0, target - config.visible_turns)
        history, visible, answer = turns[:split], turns[split:target], turns[target]

        memory_ids, segments, exact = [], [], True
        if history:
            memory_ids, segments, exact = fmt.history((system if config.system_in_memory else []) + history)
        memory_ids, segments, memory_dropped = _left_truncate_memory(memory_ids, segments, config.max_memory_tokens)

        prompt, answer_ids = fmt.prompt_and_answer(system + visible, answer)
        if not prompt:
            raise EpisodeError("empty_prompt", f"{name}: turn {target + offset}: nothing precedes the answer")
        input_ids, labels, prompt_dropped, answer_dropped = fit_prompt_and_answer(prompt, answer_ids, config.max_length)

        episode = {
            "memory_input_ids": memory_ids,
            "memory_segment_ids": segments,
            "input_ids": input_ids,
            "labels": labels,
            "turn_index": target + offset,
            "num_memory_messages": len(history) + (len(system) if config.system_in_memory and history else 0),
            "memory_tokens_dropped": memory_dropped,
            "visible_tokens_dropped": prompt_dropped,
            "answer_tokens_dropped": answer_dropped,
            "memory_segments_exact": exact,
        }
        if config.context_stream:
            prompt, answer_ids = fmt.prompt_and_answer(system + turns[:target], answer)
            ids, ctx_labels, dropped, _ = fit_prompt_and_answer(prompt, answer_ids, config.context_budget)
            episode.update(context_input_ids=ids, context_labels=ctx_labels, context_tokens_dropped=dropped)
        if config.id_column:
            episode["example_id"] = None if example_id is None else str(example_id)
        episodes.append(episode)
    return episodes


def _left_truncate_memory(ids: list[int], segments: list[int], budget: int | None) -> tuple[list[int], list[int], int]:
    dropped = 0
    if budget is not None and len(ids) > budget:
        dropped = len(ids) - budget
        ids, segments = ids[dropped:], segments[dropped:]
    # renumber so ids are contiguous from 0 (messages without tokens and cut-off messages leave no gap)
    renumbered, previous, current = [], None, -1
    for seg in segments:
        if seg != previous:
            current, previous = current + 1, seg
        renumbered.append(current)
    return ids, renumbered, dropped


# --------------------------------------------------------------------------------------- Dataset.map wrapper


@dataclass
class EpisodeStats:
    """Counters kept by :class:`EpisodeMapper` (summed over every call in this process)."""

    examples_seen: int = 0
    examples_used: int = 0
    episodes: int = 0
    skipped_no_supervised_turn: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    memory_truncated: int = 0
    visible_truncated: int = 0
    answer_truncated: int = 0
    context_truncated: int = 0
    approximate_segments: int = 0

    @property
    def examples_skipped(self) -> int:
        """Examples that produced no episode (no assistant turn, or a counted error)."""
        return self.skipped_no_supervised_turn + sum(self.errors.values())

    def add_episode(self, episode: Mapping[str, Any]) -> None:
        self.episodes += 1
        self.memory_truncated += episode["memory_tokens_dropped"] > 0
        self.visible_truncated += episode["visible_tokens_dropped"] > 0
        self.answer_truncated += episode["answer_tokens_dropped"] > 0
        self.context_truncated += episode.get("context_tokens_dropped", 0) > 0
        self.approximate_segments += not episode["memory_segments_exact"]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "examples_skipped": self.examples_skipped}

    def report(self) -> str:
        """One human-readable line."""
        errors = ", ".join(f"{k}={v}" for k, v in sorted(self.errors.items())) or "none"
        return (
            f"{self.examples_seen} examples -> {self.episodes} episodes ({self.examples_used} used; skipped: "
            f"{self.skipped_no_supervised_turn} without an assistant turn, errors: {errors}); truncated streams: "
            f"memory {self.memory_truncated}, visible {self.visible_truncated} (answer cut in {self.answer_truncated})"
            f", context {self.context_truncated}; approximate memory segments: {self.approximate_segments}"
        )


class EpisodeMapper:
    """Batched ``Dataset.map`` function expanding each example into 0..n episodes, with counters in ``stats``.

    Use ``dataset.map(mapper, batched=True, remove_columns=dataset.column_names, features=mapper.features)``.
    Passing ``features`` matters: a first batch whose memory streams are all empty would otherwise fix the
    column type to a list of nulls. Counters only see calls made in this process: with ``num_proc > 1`` or a
    cache hit (pass ``load_from_cache_file=False``) they stay incomplete; the per-episode stat columns remain.
    ``with_indices=True`` is supported (indices name examples in errors).
    """

    def __init__(self, tokenizer: Any, config: EpisodeConfig | None = None):
        self.tokenizer = tokenizer
        self.config = config or EpisodeConfig()
        self.stats = EpisodeStats()

    @property
    def keys(self) -> tuple[str, ...]:
        keys = EPISODE_KEYS + (CONTEXT_KEYS if self.config.context_stream else ())
        return keys + (("example_id",) if self.config.id_column else ())

    @property
    def features(self):  # -> datasets.Features
        """The ``datasets.Features`` of the produced columns."""
        from datasets import Features, Value

        try:
            from datasets import List
        except ImportError:  # datasets < 4
            from datasets import Sequence as List
        ids = List(Value("int32"))
        types = {
            "memory_input_ids": ids,
            "memory_segment_ids": ids,
            "input_ids": ids,
            "labels": ids,
            "turn_index": Value("int32"),
            "num_memory_messages": Value("int32"),
            "memory_tokens_dropped": Value("int64"),
            "visible_tokens_dropped": Value("int64"),
            "answer_tokens_dropped": Value("int64"),
            "memory_segments_exact": Value("bool"),
            "context_input_ids": ids,
            "context_labels": ids,
            "context_tokens_dropped": Value("int64"),
            "example_id": Value("string"),
        }
        return Features({key: types[key] for key in self.keys})

    def __call__(self, batch: Mapping[str, list], indices: list[int] | None = None) -> dict[str, list]:
        column = self.config.messages_column
        if column not in batch:
            raise KeyError(f"the dataset has no {column!r} column (columns: {list(batch)})")
        out: dict[str, list] = {key: [] for key in self.keys}
        for i in range(len(batch[column])):
            number = indices[i] if indices is not None else self.stats.examples_seen
            self.stats.examples_seen += 1
            example = {key: values[i] for key, values in batch.items()}
            name = f"example {number}"
            if self.config.id_column and example.get(self.config.id_column) is not None:
                name += f" ({self.config.id_column}={example[self.config.id_column]!r})"
            try:
                episodes = build_episodes(example, self.tokenizer, self.config, name=name)
            except NoSupervisedTurnError:
                self.stats.skipped_no_supervised_turn += 1
                continue
            except EpisodeError as err:
                if self.config.on_error == "raise":
                    raise
                self.stats.errors[err.reason] = self.stats.errors.get(err.reason, 0) + 1
                logger.debug("skipping %s", err)
                continue
            self.stats.examples_used += 1
            for episode in episodes:
                self.stats.add_episode(episode)
                for key in self.keys:
                    out[key].append(episode[key])
        return out


def episodes_map_fn(tokenizer: Any, config: EpisodeConfig | None = None) -> EpisodeMapper:
    """Return an :class:`EpisodeMapper` for ``Dataset.map(batched=True, remove_columns=...)``."""
    return EpisodeMapper(tokenizer, config)


__all__ = [
    "EpisodeConfig",
    "EpisodeError",
    "EpisodeMapper",
    "EpisodeStats",
    "NoSupervisedTurnError",
    "build_episodes",
    "episodes_map_fn",
    "fit_prompt_and_answer",
    "tokenize_messages",
    "tokenize_prompt_and_answer",
    "validate_messages",
]
