"""What a chat turn does to a session: which messages are written into memory, and what the model sees.

A session is a message log plus a memory. The last ``window`` messages (and a leading system message) stay
visible: they are the prompt of every reply, rendered with the tokenizer's chat template exactly as a training
episode's visible stream. Older messages live only in memory. Each message is written **once**: in a call of
its own (its tokens attend to each other and read the memory of everything before), when it leaves the window
(``write="leave"``, the default, as in training where the memory stream is the history before the visible
turns) or when it arrives (``write="arrival"``); or, with ``write="prompt"``, in the forward pass of the first
reply prompt that shows it complete (:func:`turn_ends`): the turn's prompt writes the previous reply and the new
user message as the model reads them, so writing costs no forward pass of its own. A prompt's reads follow the
router's decision on its user message; messages no prompt shows (a history longer than the window arriving at
once) are written in the prompt a turn would have shown them in (or, if no turn's prompt shows them, the window
that ends at them), run without a reply. ``write_roles`` chooses whose messages are written (e.g.
``("assistant",)`` keeps the user's questions out of memory). The memory does not depend on how the messages
arrived: one per turn, or a whole history at once.

Clients edit and regenerate (``history="follow"``, the default): OpenAI-style clients resend the whole
conversation every turn, so a request that starts with the session's first message **is** the conversation. If
it extends the log, only the rest is new; if it diverges from the log at message k (a regenerated reply, an edited
earlier message), the session forks there: the log is cut to its first k messages and the memory returns exactly
to what it held after them (:func:`follow`, :func:`rollback_point`; the engine keeps a memory checkpoint every
``checkpoint_every`` processed messages and replays the messages after the nearest one; beyond
``max_checkpoints`` the older half is thinned, :func:`thin_checkpoints`, so a turn's cost stays bounded however
long the session, and a fork far back replays more). A request that does
not start with the session's first message carries new messages only and is appended. ``history="append"`` never
forks: a request that does not extend the log is appended whole (for clients that send new messages only and may
repeat the first one, such as ``peft-deltamem chat``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..training.episodes import ROLES, EpisodeError, tokenize_messages, tokenize_prompt, validate_messages

WRITE_WHEN = ("leave", "arrival", "prompt")
HISTORY = ("follow", "append")


@dataclass(frozen=True)
class SessionPolicy:
    """How a session uses its context window and its memory (see the module docstring)."""

    window: int = 6
    write: str = "leave"
    write_roles: tuple[str, ...] = ("user", "assistant")
    history: str = "follow"
    checkpoint_every: int = 8
    max_checkpoints: int = 16

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
        if self.history not in HISTORY:
            raise ValueError(f"SessionPolicy.history must be one of {HISTORY}, got {self.history!r}")
        every = self.checkpoint_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(
                f"SessionPolicy.checkpoint_every must be an int >= 1 (messages between checkpoints), got {every!r}"
            )
        most = self.max_checkpoints
        if isinstance(most, bool) or not isinstance(most, int) or most < 2:
            raise ValueError(f"SessionPolicy.max_checkpoints must be an int >= 2 (checkpoints kept), got {most!r}")


def thin_checkpoints(count: int, limit: int) -> list[int]:
    """Which of ``count`` checkpoints (oldest first) to keep when there are more than ``limit``: the newest
    ``limit // 2`` all, every second of the older ones (the newest of them kept). Applied whenever the count goes
    over the limit, it keeps at most ``limit`` checkpoints, dense near the end of the log (regenerating a reply
    or editing inside the window replays a few messages) and sparser the further back."""
    if count <= limit:
        return list(range(count))
    recent = limit // 2
    older = count - recent
    return [i for i in range(older) if (older - 1 - i) % 2 == 0] + list(range(older, count))


@dataclass
class PromptWrite:
    """A prompt run only to write (``write="prompt"``): its tokens, which of them are written, and the user message
    whose router decision its reads follow."""

    ids: list[int]
    mask: list[bool]
    reads_for: str


@dataclass
class TurnPlan:
    """The model work of one turn: messages to write (token ids, in order) and the reply prompt."""

    messages: list[dict[str, str]]  # the log including this turn's new messages
    writes: list[list[int]]  # token ids of each message to write now, oldest first ("leave", "arrival")
    prompt: list[int]  # the visible window + generation prompt
    processed: int  # messages[:processed] are written (or skipped) once the writes are done
    prompt_writes: list[PromptWrite] = field(default_factory=list)  # "prompt": earlier prompts, run first, in order
    prompt_mask: list[bool] | None = None  # "prompt": which tokens of the reply prompt are written

    @property
    def tokens_written(self) -> int:
        return (
            sum(map(len, self.writes))
            + sum(sum(w.mask) for w in self.prompt_writes)
            + (sum(self.prompt_mask) if self.prompt_mask else 0)
        )


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


def follow(
    log: list[dict[str, str]], request: list[dict[str, str]], policy: SessionPolicy
) -> tuple[int, list[dict[str, str]]]:
    """``(keep, new)``: the session keeps ``log[:keep]`` and adds ``new`` (see the module docstring).

    A request that starts with the whole log adds what follows it. Under ``history="follow"`` a request that
    starts with the log's first message but diverges at message k forks the session there (``keep = k``);
    anything else is new messages, appended (``keep = len(log)``).
    """
    if len(request) > len(log) and request[: len(log)] == log:
        return len(log), request[len(log) :]
    if policy.history == "append" or not log or request[0] != log[0]:
        return len(log), request
    keep = 0
    while keep < min(len(log), len(request)) and request[keep] == log[keep]:
        keep += 1
    return keep, request[keep:]


def written_until(messages: list[dict[str, str]], policy: SessionPolicy) -> int:
    """How many leading messages of a session with log ``messages`` are due in memory (written or skipped)."""
    pinned = 1 if messages and messages[0]["role"] == "system" else 0
    conversation = len(messages) - pinned
    if policy.write == "arrival":
        return len(messages)
    if policy.write == "prompt":  # whole turns: those whose user message has a reply (or more) after it
        closed = [e for e in turn_ends(messages[pinned:]) if e < conversation - 1]
        return pinned + (closed[-1] + 1 if closed else 0)
    return pinned + max(0, conversation - policy.window)


def turn_ends(conversation: list[dict[str, str]]) -> list[int]:
    """Indices of the user messages a reply follows (or would: the last message): the end of each turn's prompt.
    Under ``write="prompt"`` each message is written by the first turn whose index is at or after its own."""
    return [
        e
        for e, m in enumerate(conversation)
        if m["role"] == "user" and (e + 1 == len(conversation) or conversation[e + 1]["role"] != "user")
    ]


def rollback_point(
    log: list[dict[str, str]], processed: int, keep: int, new: list[dict[str, str]], policy: SessionPolicy
) -> int:
    """After a fork that keeps ``log[:keep]`` and adds ``new``: how many leading messages the memory may still hold.

    It is what a fresh session fed only the new branch would hold before this turn's new writes: no message past
    the fork, none already written that the new branch keeps in its window.
    """
    return min(keep, processed, written_until(log[:keep] + new, policy))


def plan_turn(
    log: list[dict[str, str]], processed: int, new: list[dict[str, str]], tokenizer, policy: SessionPolicy
) -> TurnPlan:
    """What the model must write and read for a turn that adds ``new`` to a session with ``log``."""
    messages = log + new
    if any(m["role"] == "system" for m in messages[1:]):
        raise ValueError("only the first message of a session may be a system message")
    if policy.write == "prompt":
        return _plan_prompt_writes(messages, processed, tokenizer, policy)
    pinned = messages[:1] if messages[0]["role"] == "system" else []
    conversation = messages[len(pinned) :]
    visible_start = max(0, len(conversation) - policy.window)
    due_end = written_until(messages, policy) - len(pinned)
    start = max(processed - len(pinned), 0)
    writes: list[list[int]] = []
    if due_end > start:
        ids, segments, _ = tokenize_messages(conversation[:due_end], tokenizer, first=start)
        for k in range(start, due_end):
            if conversation[k]["role"] in policy.write_roles:
                writes.append([t for t, s in zip(ids, segments) if s == k])
    prompt = tokenize_prompt(pinned + conversation[visible_start:], tokenizer)
    return TurnPlan(messages, [w for w in writes if w], prompt, len(pinned) + max(due_end, start))


def _plan_prompt_writes(messages: list[dict[str, str]], processed: int, tokenizer, policy: SessionPolicy) -> TurnPlan:
    """``write="prompt"``: each unwritten message is written in the prompt of the first turn that ends at or after
    it (a prompt run without a reply for earlier turns, the reply prompt for this one), or, if that prompt's window
    does not show it, in a prompt of its own: the window that ends at it."""
    pinned = messages[:1] if messages[0]["role"] == "system" else []
    conversation = messages[len(pinned) :]
    start = max(processed - len(pinned), 0)
    ends = [e for e in turn_ends(conversation) if e >= start]
    if not ends or ends[-1] != len(conversation) - 1:
        raise ValueError("a turn's last message must come from the user")
    own = _own_tokens(pinned, conversation, start, tokenizer)  # each message's tokens as the whole log renders them
    earlier: list[PromptWrite] = []
    prompt, prompt_mask = [], None
    first = start
    for e in ends:
        visible = max(0, e - policy.window + 1)
        written = [k for k in range(first, e + 1) if conversation[k]["role"] in policy.write_roles]
        reads_for = conversation[e]["content"]
        for k in (k for k in written if k < visible):  # not shown by the turn's window: the window ending at it
            ids, mask = _prompt_with_mask(pinned, conversation, max(0, k - policy.window + 1), k, [k], own, tokenizer)
            earlier.append(PromptWrite(ids, mask, reads_for))
        ids, mask = _prompt_with_mask(
            pinned, conversation, visible, e, [k for k in written if k >= visible], own, tokenizer
        )
        if e == len(conversation) - 1:
            prompt, prompt_mask = ids, mask
        elif any(mask):
            earlier.append(PromptWrite(ids, mask, reads_for))
        first = e + 1
    return TurnPlan(messages, [], prompt, len(messages), earlier, prompt_mask)


def _own_tokens(pinned, conversation, start: int, tokenizer) -> dict[int, list[int]]:
    """Tokens of each conversation message from ``start`` on, as the rendering of the whole log gives them."""
    ids, segments, _ = tokenize_messages(pinned + conversation, tokenizer, first=len(pinned) + start)
    own: dict[int, list[int]] = {}
    for token, segment in zip(ids, segments):
        if segment >= len(pinned) + start:
            own.setdefault(segment - len(pinned), []).append(token)
    return own


def _prompt_with_mask(pinned, conversation, lo, e, write, own, tokenizer) -> tuple[list[int], list[bool]]:
    """The reply prompt showing ``pinned + conversation[lo:e + 1]`` and the mask of the tokens of messages ``write``
    (each message's own tokens: a template prefix rendered before the window's first message is not written)."""
    shown = pinned + conversation[lo : e + 1]
    ids = tokenize_prompt(shown, tokenizer)
    body, segments, _ = tokenize_messages(shown, tokenizer)
    if ids[: len(body)] != body:
        raise ValueError(
            "write='prompt' needs a chat template that renders a prompt as the messages followed by the generation "
            "prompt; this tokenizer's does not. Use write='leave'."
        )
    mask = [False] * len(ids)
    offset = len(pinned) - lo
    for k in write:
        positions = [i for i, s in enumerate(segments) if s == k + offset]
        tokens = own.get(k, [])
        if not tokens:  # a message the template renders as nothing writes nothing
            continue
        if len(positions) < len(tokens) or [body[i] for i in positions[-len(tokens) :]] != tokens:
            raise ValueError(
                f"message {k} renders differently in the prompt than in the whole conversation; write='prompt' needs "
                "an append-only chat template. Use write='leave'."
            )
        for i in positions[-len(tokens) :]:
            mask[i] = True
    return ids, mask


__all__ = [
    "ROLES",
    "RequestTooLarge",
    "PromptWrite",
    "SessionPolicy",
    "TurnPlan",
    "check_new_messages",
    "follow",
    "plan_turn",
    "rollback_point",
    "turn_ends",
    "written_until",
]
