"""A synthetic long-horizon memory task over a small closed vocabulary.

Each episode is a multi-session user/assistant dialogue in which the user states facts (preferences, codes,
appointments, task progress), restates some of them later with a new value, and chats about other things
(distractors, some of which mention value words out of context). The episode ends with a question about one fact
that was stated, and possibly updated, *outside* the visible window: the newest value is the answer, a single
word. Generation is deterministic for a given seed (``random.Random`` only).

:func:`build_tokenizer` gives a word-level ``PreTrainedTokenizerFast`` whose vocabulary covers every word the
generator can produce, with a chat template, so tiny models can be trained and evaluated on the task.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

# ---------------------------------------------------------------------------------------------------------------------
# The closed world: slots, value pools and sentence templates. Every sentence is lowercase, words separated by
# single spaces, punctuation as separate words, and no apostrophes (the tokenizer splits on them).
# ---------------------------------------------------------------------------------------------------------------------

_COLORS = "red blue green yellow purple orange pink black white gray brown teal gold silver navy maroon"
_FRUITS = "apple banana cherry grape lemon mango melon peach pear plum kiwi lime apricot fig papaya guava"
_DRINKS = "tea coffee juice milk soda water cocoa lemonade cider smoothie espresso latte kefir chai matcha tonic"
_PET_NAMES = "max bella rocky luna charlie daisy milo coco oscar ruby teddy nala ziggy pepper biscuit mochi"
_CITIES = "paris tokyo london berlin rome madrid lima cairo oslo dublin seoul delhi sydney boston denver austin"
_PASSWORDS = (
    "falcon tiger river cobalt maple comet harbor lantern meadow quartz saffron thunder velvet willow zephyr orbit"
)
_CODES = " ".join(str(1000 + (i * 7919) % 9000) for i in range(1, 17))
_ORDINALS = "1st 2nd 3rd 4th 5th 6th 7th 8th 9th 10th 11th 12th 13th 14th 15th 16th"
_PERCENTS = " ".join(str(5 * i) for i in range(1, 17))
_HOURS = "6am 7am 8am 9am 10am 11am noon 1pm 2pm 3pm 4pm 5pm 6pm 7pm 8pm 9pm"


class NotEnoughHistory(ValueError):
    """This draw left too little history outside the visible window (another draw of the same config may not)."""


@dataclass(frozen=True)
class Slot:
    """One kind of fact: how it is stated, updated and asked, and its possible values (in a fixed order)."""

    name: str
    values: tuple[str, ...]
    statements: tuple[str, ...]
    updates: tuple[str, ...]
    question: str


def _slot(name: str, values: str, statements: Sequence[str], updates: Sequence[str], question: str) -> Slot:
    return Slot(name, tuple(values.split()), tuple(statements), tuple(updates), question)


SLOTS: tuple[Slot, ...] = (
    _slot(
        "color",
        _COLORS,
        ["my favorite color is {value} .", "i really like the color {value} ."],
        ["actually my favorite color is now {value} .", "i changed my mind , my favorite color is {value} ."],
        "what is my favorite color ?",
    ),
    _slot(
        "fruit",
        _FRUITS,
        ["my favorite fruit is {value} .", "i eat {value} every day , it is my favorite fruit ."],
        ["these days my favorite fruit is {value} .", "update : my favorite fruit is now {value} ."],
        "what is my favorite fruit ?",
    ),
    _slot(
        "drink",
        _DRINKS,
        ["in the morning i always drink {value} .", "my usual drink is {value} ."],
        ["i switched my usual drink to {value} .", "now my usual drink is {value} ."],
        "what is my usual drink ?",
    ),
    _slot(
        "pet",
        _PET_NAMES,
        ["my dog is called {value} .", "the name of my dog is {value} ."],
        ["we renamed my dog to {value} .", "my dog is now called {value} ."],
        "what is the name of my dog ?",
    ),
    _slot(
        "trip",
        _CITIES,
        ["next month i am flying to {value} .", "i booked a trip to {value} ."],
        ["my trip is now going to {value} instead .", "change of plans , i am flying to {value} ."],
        "where am i flying next month ?",
    ),
    _slot(
        "password",
        _PASSWORDS,
        ["the wifi password is {value} .", "please remember the wifi password {value} ."],
        ["i reset the wifi password to {value} .", "the new wifi password is {value} ."],
        "what is the wifi password ?",
    ),
    _slot(
        "door_code",
        _CODES,
        ["the door code is {value} .", "to open the door use code {value} ."],
        ["the door code changed to {value} .", "new door code : {value} ."],
        "what is the door code ?",
    ),
    _slot(
        "dentist",
        _ORDINALS,
        ["my dentist appointment is on the {value} .", "i see the dentist on the {value} ."],
        ["my dentist appointment moved to the {value} .", "the dentist rescheduled me to the {value} ."],
        "on which day is my dentist appointment ?",
    ),
    _slot(
        "report",
        _PERCENTS,
        ["the report is {value} percent done .", "i finished {value} percent of the report ."],
        ["progress update : the report is {value} percent done .", "now the report is {value} percent done ."],
        "how many percent of the report is done ?",
    ),
    _slot(
        "meeting",
        _HOURS,
        ["the team meeting is at {value} .", "we meet with the team at {value} ."],
        ["the team meeting moved to {value} .", "the team meeting is now at {value} ."],
        "at what time is the team meeting ?",
    ),
)
SLOTS_BY_NAME: dict[str, Slot] = {s.name: s for s in SLOTS}
MAX_VALUES_PER_SLOT = min(len(s.values) for s in SLOTS)

_ACKS = ("ok , noted .", "got it , i will remember that .", "thanks , i wrote that down .", "sure , noted .")
_SMALL_TALK = (
    ("the weather is nice today .", "that sounds lovely ."),
    ("i watched a movie last night .", "was it any good ?"),
    ("work was busy this week .", "i hope you get some rest ."),
    ("i went for a long walk .", "walking is good for you ."),
    ("my neighbor got a new car .", "that is exciting news ."),
    ("i am reading a good book .", "what is it about ?"),
    ("the train was late again .", "that is annoying ."),
    ("i cooked soup for dinner .", "that sounds tasty ."),
    ("i might take a nap later .", "good idea , rest well ."),
    ("my sister called me today .", "how is she doing ?"),
)
# Distractors that mention a value word out of context, so that "repeat the last value you saw" is not a solution.
_VALUE_TALK = (
    ("my friend said {value} is overrated .", "people have different tastes ."),
    ("i saw the word {value} on a poster .", "funny coincidence ."),
    ("someone at work mentioned {value} today .", "interesting ."),
)
_GREETINGS = (
    ("hello again .", "welcome back , how can i help ?"),
    ("hi , i am back .", "good to see you again ."),
    ("good morning .", "good morning , what is new ?"),
)

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>", "<sep>", "<system>", "<user>", "<assistant>")
ROLES = ("system", "user", "assistant")

# Each message is "<role> content <eos>"; <bos> starts a rendered chat. <sep> is in the vocabulary for callers.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<' + message['role'] + '> ' + message['content'] + ' ' + eos_token + ' ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant> ' }}{% endif %}"
)


# ---------------------------------------------------------------------------------------------------------------------
# Configuration and episodes
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticTaskConfig:
    """Knobs of the synthetic task.

    Attributes:
        num_facts: distinct slots stated in the history (at most ``len(SLOTS)``).
        num_updates: restatements with a new value (each of a random stated slot, after its first statement).
        num_distractors: minimum number of distractor exchanges (user message + assistant reply).
        history_turns: if set, distractor exchanges are added until the history has at least this many messages.
        visible_turns: messages at the end of the history that stay visible; the asked fact is never among them.
        num_values: possible values per slot (the first ``num_values`` of each slot's pool).
        num_sessions: sessions; each starts with a greeting exchange.
        value_distractor_rate: fraction of distractors that mention a value word out of context.
        ask_updated: ask about an updated slot (True), a never-updated one (False) or any stated slot (None).
        seed: base seed; episode ``i`` uses its own generator derived from ``(seed, i)``.
    """

    num_facts: int = 4
    num_updates: int = 2
    num_distractors: int = 8
    history_turns: int | None = None
    visible_turns: int = 4
    num_values: int = 8
    num_sessions: int = 3
    value_distractor_rate: float = 0.3
    ask_updated: bool | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.num_facts <= len(SLOTS):
            raise ValueError(f"num_facts must be in 1..{len(SLOTS)}, got {self.num_facts}")
        if not 2 <= self.num_values <= MAX_VALUES_PER_SLOT:
            raise ValueError(f"num_values must be in 2..{MAX_VALUES_PER_SLOT}, got {self.num_values}")
        for name in ("num_updates", "num_distractors", "visible_turns"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.num_sessions < 1:
            raise ValueError(f"num_sessions must be >= 1, got {self.num_sessions}")
        if self.history_turns is not None and self.history_turns < 1:
            raise ValueError(f"history_turns must be >= 1, got {self.history_turns}")
        if not 0.0 <= self.value_distractor_rate <= 1.0:
            raise ValueError(f"value_distractor_rate must be in [0, 1], got {self.value_distractor_rate}")
        if self.ask_updated is True and self.num_updates == 0:
            raise ValueError("ask_updated=True needs num_updates >= 1")
        if self.ask_updated is False and self.num_updates > 0 and self.num_facts < 2:
            raise ValueError("ask_updated=False with updates needs num_facts >= 2")


@dataclass
class SyntheticEpisode:
    """One episode.

    ``history_messages`` is the whole dialogue; ``memory_messages`` is its part before the visible window (what
    gets written into memory); ``visible_messages`` is the visible window followed by the question message.
    ``history_sessions`` gives the session number of each history message (usable as SSW segment ids).
    ``metadata`` holds ``slot``, ``updated``, ``stated_at`` (history index of the first statement of the asked
    slot), ``answer_stated_at`` (index of the statement giving the answer), ``value_history``, ``events``
    (``(kind, slot, user message index)`` per exchange, kind in fact/update/distractor/greeting), ``facts``
    (final value per stated slot), ``num_facts``, ``num_updates``, ``num_distractors`` and ``seed``.
    """

    memory_messages: list[dict[str, str]]
    visible_messages: list[dict[str, str]]
    question: str
    answer: str
    history_messages: list[dict[str, str]]
    history_sessions: list[int] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)


def generate_episode(config: SyntheticTaskConfig, index: int = 0) -> SyntheticEpisode:
    """Episode number ``index`` of the stream defined by ``config`` (deterministic in ``(config, index)``)."""
    seed = config.seed * 1_000_003 + index
    rng = random.Random(seed)
    slots = rng.sample(SLOTS, config.num_facts)
    asked = slots[0]  # the sample is already random; slot 0 is the asked one

    # Which slot each update restates; the asked slot's share follows ask_updated.
    others = slots[1:]
    if config.ask_updated is None:
        update_slots = [rng.choice(slots) for _ in range(config.num_updates)]
    elif config.ask_updated:
        update_slots = [asked] + [rng.choice(slots) for _ in range(config.num_updates - 1)]
    else:
        update_slots = [rng.choice(others) for _ in range(config.num_updates)]

    n_events = config.num_facts + config.num_updates
    n_distractors = config.num_distractors
    if config.history_turns is not None:
        # Each exchange is 2 messages; each session adds one greeting exchange.
        needed = -(-config.history_turns // 2) - config.num_sessions - n_events
        n_distractors = max(n_distractors, needed)
    kinds = ["fact"] * config.num_facts + ["update"] * config.num_updates + ["distractor"] * n_distractors
    owners: list[Slot | None] = [*slots, *update_slots, *([None] * n_distractors)]
    order = list(range(len(kinds)))
    rng.shuffle(order)
    layout = _session_layout(len(order), config.num_sessions)  # per exchange: event position or None (greeting)
    n_messages = 2 * len(layout)
    if n_messages <= config.visible_turns:
        raise NotEnoughHistory(
            f"history has {n_messages} messages, not more than visible_turns={config.visible_turns}; "
            "add distractors or raise history_turns"
        )
    first_visible = n_messages - config.visible_turns
    # Event positions whose messages reach into the visible window must not hold the asked slot.
    hidden_positions = [pos for ex, pos in enumerate(layout) if pos is not None and 2 * ex + 1 < first_visible]
    visible_positions = [pos for ex, pos in enumerate(layout) if pos is not None and 2 * ex + 1 >= first_visible]
    order = _keep_out_of_window(order, owners, asked, hidden_positions, visible_positions, rng)
    order = _chronological(order, kinds, owners)

    values = asked.values[: config.num_values]
    current: dict[str, str] = {}
    value_history: dict[str, list[tuple[int, str]]] = {}
    messages: list[dict[str, str]] = []
    sessions: list[int] = []
    events: list[tuple[str, str | None, int]] = []
    session = -1
    for pos in layout:
        if pos is None:
            session += 1
            user, reply = rng.choice(_GREETINGS)
            kind, owner = "greeting", None
        else:
            event = order[pos]
            kind, owner = kinds[event], owners[event]
            user, reply = _render_event(kind, owner, current, config, rng)
            if owner is not None:
                value_history.setdefault(owner.name, []).append((len(messages), current[owner.name]))
        events.append((kind, owner.name if owner else None, len(messages)))
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        sessions += [session, session]

    history = value_history[asked.name]
    answer = current[asked.name]
    assert answer in values and history[-1][1] == answer
    question = asked.question
    return SyntheticEpisode(
        memory_messages=messages[:first_visible],
        visible_messages=[*messages[first_visible:], {"role": "user", "content": question}],
        question=question,
        answer=answer,
        history_messages=messages,
        history_sessions=sessions,
        metadata={
            "slot": asked.name,
            "updated": len(history) > 1,
            "stated_at": history[0][0],
            "answer_stated_at": history[-1][0],
            "value_history": [v for _, v in history],
            "events": events,
            "facts": dict(current),
            "num_facts": config.num_facts,
            "num_updates": config.num_updates,
            "num_distractors": n_distractors,
            "seed": seed,
        },
    )


def generate_episodes(config: SyntheticTaskConfig, n: int) -> list[SyntheticEpisode]:
    """Episodes ``0 .. n-1`` of the stream defined by ``config``."""
    return [generate_episode(config, i) for i in range(n)]


def make_full_context_episode(episode: SyntheticEpisode) -> SyntheticEpisode:
    """The full-context baseline of ``episode``: no memory, the whole history and the question visible."""
    return SyntheticEpisode(
        memory_messages=[],
        visible_messages=[*episode.history_messages, {"role": "user", "content": episode.question}],
        question=episode.question,
        answer=episode.answer,
        history_messages=list(episode.history_messages),
        history_sessions=list(episode.history_sessions),
        metadata={**episode.metadata, "full_context": True},
    )


def _session_layout(n_events: int, n_sessions: int) -> list[int | None]:
    """Exchange slots: ``None`` for a session greeting, else the position in the event order."""
    layout: list[int | None] = []
    base, extra = divmod(n_events, n_sessions)
    pos = 0
    for s in range(n_sessions):
        layout.append(None)
        for _ in range(base + (s < extra)):
            layout.append(pos)
            pos += 1
    return layout


def _keep_out_of_window(
    order: list[int],
    owners: Sequence[Slot | None],
    asked: Slot,
    hidden: Sequence[int],
    visible: Sequence[int],
    rng: random.Random,
) -> list[int]:
    """Swap the asked slot's events out of the visible window's positions."""
    order = list(order)
    free = [p for p in hidden if owners[order[p]] is not asked]
    rng.shuffle(free)
    for p in visible:
        if owners[order[p]] is asked:
            if not free:
                raise NotEnoughHistory(
                    "not enough history outside the visible window; add distractors or history_turns"
                )
            q = free.pop()
            order[p], order[q] = order[q], order[p]
    return order


def _chronological(order: list[int], kinds: Sequence[str], owners: Sequence[Slot | None]) -> list[int]:
    """Reassign each slot's events over the positions that slot occupies so that its first statement comes first
    (a shuffle may put an update before the fact it updates)."""
    order = list(order)
    by_slot: dict[str, list[int]] = {}
    for pos, event in enumerate(order):
        if owners[event] is not None:
            by_slot.setdefault(owners[event].name, []).append(pos)
    for positions in by_slot.values():
        events = sorted((order[p] for p in positions), key=lambda e: kinds[e] != "fact")
        for p, e in zip(positions, events):
            order[p] = e
    return order


def _render_event(
    kind: str, slot: Slot | None, current: dict[str, str], config: SyntheticTaskConfig, rng: random.Random
) -> tuple[str, str]:
    if kind == "distractor":
        if rng.random() < config.value_distractor_rate:
            user, reply = rng.choice(_VALUE_TALK)
            word = rng.choice(rng.choice(SLOTS).values[: config.num_values])
            return user.format(value=word), reply
        return rng.choice(_SMALL_TALK)
    assert slot is not None
    choices = slot.values[: config.num_values]
    if kind == "fact":
        value = rng.choice(choices)
        template = rng.choice(slot.statements)
    else:
        value = rng.choice([v for v in choices if v != current[slot.name]])
        template = rng.choice(slot.updates)
    current[slot.name] = value
    return template.format(value=value), rng.choice(_ACKS)


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------------


def task_vocabulary() -> list[str]:
    """Every word the generator can produce (all templates, all values of every pool), sorted."""
    sentences: list[str] = [*_ACKS]
    for pair in (*_SMALL_TALK, *_VALUE_TALK, *_GREETINGS):
        sentences += pair
    for slot in SLOTS:
        sentences += [*slot.statements, *slot.updates, slot.question, " ".join(slot.values)]
    pre = pre_tokenizers.Whitespace()
    words = {w for s in sentences for w, _ in pre.pre_tokenize_str(s.replace("{value}", " "))}
    return sorted(words)


def build_tokenizer(config: SyntheticTaskConfig | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over :func:`task_vocabulary` with a chat template.

    Special tokens come first (``<pad>`` = 0, ``<unk>``, ``<bos>``, ``<eos>``, ``<sep>``, ``<system>``, ``<user>``,
    ``<assistant>``), then the words in sorted order, so ids do not depend on ``config`` (accepted for symmetry
    with the generator). Text is lowercased and split on whitespace and punctuation.
    """
    del config  # the vocabulary is the whole closed world, whatever the knobs
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *task_vocabulary()))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        sep_token="<sep>",
        extra_special_tokens=["<system>", "<user>", "<assistant>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def render_chat(
    tokenizer: PreTrainedTokenizerFast, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False
) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's chat template (``<bos>`` first)."""
    encoded = tokenizer.apply_chat_template(
        [dict(m) for m in messages], tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True
    )
    return list(encoded["input_ids"])


def encode_episode(tokenizer: PreTrainedTokenizerFast, episode: SyntheticEpisode) -> dict[str, list[int]]:
    """Token ids of an episode, each part rendered as its own chat (each starts with ``<bos>``).

    Returns ``memory_input_ids`` (empty when there is no memory), ``memory_segment_ids`` (index of the memory
    message each token belongs to, the ``<bos>`` going with the first message; for SSW),
    ``visible_input_ids`` (visible messages plus the ``<assistant>`` generation prompt) and ``answer_ids``
    (the answer token then ``<eos>``: the target to predict after ``visible_input_ids``).
    """
    memory_ids: list[int] = []
    segments: list[int] = []
    for i, message in enumerate(episode.memory_messages):
        ids = render_chat(tokenizer, [message])
        if i > 0:
            ids = ids[1:]  # drop the <bos> the template puts at the start of every rendering
        memory_ids += ids
        segments += [i] * len(ids)
    answer_ids = tokenizer.encode(episode.answer, add_special_tokens=False)
    if len(answer_ids) != 1:
        raise ValueError(f"answer {episode.answer!r} is not a single token: {answer_ids}")
    return {
        "memory_input_ids": memory_ids,
        "memory_segment_ids": segments,
        "visible_input_ids": render_chat(tokenizer, episode.visible_messages, add_generation_prompt=True),
        "answer_ids": [*answer_ids, tokenizer.eos_token_id],
    }
