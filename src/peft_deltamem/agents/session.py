"""What a chat turn does to a session: which messages are written into memory, and what the model sees.

A session is a message log plus a memory. The last ``window`` messages (and a leading system message) stay
visible: they are the prompt of every reply, rendered with the tokenizer's chat template exactly as a training
episode's visible stream. Older messages live only in memory. Each message is written **once**, in a call of
its own (its tokens attend to each other and read the memory of everything before), when it leaves the window
(``write="leave"``, the default, as in training where the memory stream is the history before the visible
turns) or when it arrives (``write="arrival"``). ``write_roles`` chooses whose messages are written (e.g.
``("assistant",)`` keeps the user's questions out of memory). Because the unit of writing is the message, the
memory does not depend on how the messages arrived: one per turn, or a whole history at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..training.episodes import ROLES, EpisodeError, tokenize_messages, tokenize_prompt, validate_messages

WRITE_WHEN = ("leave", "arrival")


@dataclass(frozen=True)
class SessionPolicy:
    """How a session uses its context window and its memory (see the module docstring)."""

    window: int = 6
    write: str = "leave"
    write_roles: tuple[str, ...] = ("user", "assistant")

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"SessionPolicy.window must be an int >= 1 (messages kept visible), got {self.window!r}")
        if self.write not in WRITE_WHEN:
            raise ValueError(f"SessionPolicy.write must be one of {WRITE_WHEN}, got {self.write!r}")
        roles = (self.write_roles,) if isinstance(self.write_roles, str) else tuple(self.write_roles)
        unknown = [r for r in roles if r not in ("user", "assistant")]
        if unknown:
            raise ValueError(f"SessionPolicy.write_roles may hold 'user' and 'assistant', got {unknown}")
        object.__setattr__(self, "write_roles", roles)


@dataclass
class TurnPlan:
    """The model work of one turn: messages to write (token ids, in order) and the reply prompt."""

    messages: list[dict[str, str]]  # the log including this turn's new messages
    writes: list[list[int]]  # token ids of each message to write now, oldest first
    prompt: list[int]  # the visible window + generation prompt
    processed: int  # messages[:processed] are written (or skipped) once the writes are done


def check_new_messages(messages: object, max_messages: int, max_chars: int) -> list[dict[str, str]]:
    """Validate a turn's new messages: a non-empty list of chat messages ending with a user message, bounded."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("a turn needs a non-empty list of messages [{'role': ..., 'content': ...}]")
    if len(messages) > max_messages:
        raise RequestTooLarge(f"a turn may carry at most {max_messages} messages, got {len(messages)}")
    try:
        checked = validate_messages(messages, "request")
    except EpisodeError as error:
        raise ValueError(str(error)) from error
    for i, message in enumerate(checked):
        if len(message["content"]) > max_chars:
            raise RequestTooLarge(f"message {i} has {len(message['content'])} characters; the limit is {max_chars}")
    if checked[-1]["role"] != "user":
        raise ValueError(f"the last message of a turn must come from the user, not {checked[-1]['role']!r}")
    return checked


class RequestTooLarge(ValueError):
    """A request over the engine's size limits."""


def new_messages(log: list[dict[str, str]], request: list[dict[str, str]]) -> list[dict[str, str]]:
    """The messages of ``request`` that the session does not have yet.

    Clients may send only the new messages, or (as OpenAI clients do) the whole conversation: a request that
    starts with the session's whole log adds only what follows it.
    """
    if len(request) > len(log) and request[: len(log)] == log:
        return request[len(log) :]
    return request


def plan_turn(
    log: list[dict[str, str]], processed: int, new: list[dict[str, str]], tokenizer, policy: SessionPolicy
) -> TurnPlan:
    """What the model must write and read for a turn that adds ``new`` to a session with ``log``."""
    messages = log + new
    if any(m["role"] == "system" for m in messages[1:]):
        raise ValueError("only the first message of a session may be a system message")
    pinned = messages[:1] if messages[0]["role"] == "system" else []
    conversation = messages[len(pinned) :]
    visible_start = max(0, len(conversation) - policy.window)
    due_end = visible_start if policy.write == "leave" else len(conversation)
    start = max(processed - len(pinned), 0)
    writes: list[list[int]] = []
    if due_end > start:
        ids, segments, _ = tokenize_messages(conversation[:due_end], tokenizer)
        for k in range(start, due_end):
            if conversation[k]["role"] in policy.write_roles:
                writes.append([t for t, s in zip(ids, segments) if s == k])
    prompt = tokenize_prompt(pinned + conversation[visible_start:], tokenizer)
    return TurnPlan(messages, [w for w in writes if w], prompt, len(pinned) + max(due_end, start))


__all__ = [
    "ROLES",
    "RequestTooLarge",
    "SessionPolicy",
    "TurnPlan",
    "check_new_messages",
    "new_messages",
    "plan_turn",
]
