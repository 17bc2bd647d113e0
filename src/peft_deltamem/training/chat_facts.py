"""A seeded generator of natural-language multi-session chats in which a user tells an assistant facts about
themselves, for testing whether δ-mem carries those facts on a real chat model.

An episode is a conversation (user/assistant messages) in which the user states 1..``max_facts`` facts
(dog's name, city, job, favourite colour/sport/food, best friend, car), some of them later **updated** (the
newest value is the answer), with small talk in between and a "Hi again" greeting opening each later session;
then one question about one of the stated facts, asked with a **started answer** ("What is my dog called?" /
"Your dog is called") whose next word is the value. Every value of a slot starts with its own token (checked),
so recall is measured on the next token: the argmax among the slot's candidate values (chance 1/8).

Splits are disjoint streams of one seed: ``train``, ``val`` (for every choice of recipe) and ``test`` (held out,
only for the final numbers). Everything is plain Python (``random.Random``), so episodes are reproducible.

:func:`tokenize_episode` turns an episode into the fields of a δ-mem training episode (see
:mod:`peft_deltamem.training.collator`): the conversation as the **memory stream** (ChatML, one segment per
message), the question + started answer as the **visible stream** with labels on the value's tokens, and the
**full-context** stream (conversation + question) for the full-context baseline.

The data of the second demo (``python -m peft_deltamem.demo_real``) and of ``scripts/train_real_memory.py``; the
recall measured on it is ``benchmarks/real_recall.py`` (in a checkout, not installed).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

IGNORE_INDEX = -100

# slot -> (values, statements, updates, question, started answer)
SLOTS: dict[str, dict] = {
    "dog": {
        "values": ["Rex", "Max", "Bella", "Luna", "Charlie", "Daisy", "Buddy", "Milo"],
        "state": ["My dog is called {v}.", "I have a dog named {v}.", "Our dog's name is {v}."],
        "update": ["We renamed our dog, he is now called {v}.", "Our dog has a new name now: {v}."],
        "question": "What is my dog called?",
        "answer": "Your dog is called",
    },
    "city": {
        "values": ["Paris", "London", "Berlin", "Madrid", "Rome", "Tokyo", "Boston", "Dublin"],
        "state": ["I live in {v}.", "My home is in {v}.", "I have lived in {v} for years."],
        "update": ["Big news: I just moved to {v}.", "I have moved, I live in {v} now."],
        "question": "Which city do I live in?",
        "answer": "You live in",
    },
    "job": {
        "values": ["teacher", "nurse", "lawyer", "farmer", "pilot", "doctor", "chef", "baker"],
        "state": ["I work as a {v}.", "I am a {v} by profession.", "My job? I am a {v}."],
        "update": ["I changed careers, I am now a {v}.", "I quit my old job and work as a {v} now."],
        "question": "What is my job?",
        "answer": "You work as a",
    },
    "colour": {
        "values": ["red", "blue", "green", "yellow", "purple", "orange", "pink", "black"],
        "state": ["My favourite colour is {v}.", "I love the colour {v} more than any other."],
        "update": ["These days my favourite colour is {v}.", "I changed my mind, my favourite colour is {v}."],
        "question": "What is my favourite colour?",
        "answer": "Your favourite colour is",
    },
    "sport": {
        "values": ["tennis", "soccer", "golf", "hockey", "rugby", "cricket", "baseball", "swimming"],
        "state": ["My favourite sport is {v}.", "I love playing {v} at the weekend."],
        "update": ["I gave that up, now my favourite sport is {v}.", "Lately my favourite sport is {v}."],
        "question": "What is my favourite sport?",
        "answer": "Your favourite sport is",
    },
    "friend": {
        "values": ["Anna", "Emma", "Sarah", "Laura", "Julia", "Maria", "Lucy", "Kate"],
        "state": ["My best friend is {v}.", "My best friend is called {v}."],
        "update": ["My best friend is {v} now.", "These days my best friend is {v}."],
        "question": "What is my best friend's name?",
        "answer": "Your best friend is",
    },
    "food": {
        "values": ["pizza", "sushi", "pasta", "tacos", "curry", "soup", "salad", "cake"],
        "state": ["My favourite food is {v}.", "Nothing beats {v}, it is my favourite food."],
        "update": ["Lately my favourite food is {v}.", "My favourite food is {v} now."],
        "question": "What is my favourite food?",
        "answer": "Your favourite food is",
    },
    "car": {
        "values": ["Toyota", "Ford", "Honda", "BMW", "Tesla", "Volvo", "Audi", "Fiat"],
        "state": ["I drive a {v}.", "My car is a {v}."],
        "update": ["I sold my car and now drive a {v}.", "I bought a new car, a {v}."],
        "question": "What car do I drive?",
        "answer": "You drive a",
    },
}
ACKS = ["Got it!", "Nice, thanks for telling me.", "Good to know.", "Noted.", "That's lovely.", "Okay, I'll remember."]
SMALL_TALK = [
    ("The weather was lovely today.", "Glad you enjoyed it!"),
    ("I had a long day at work.", "Sorry to hear that, get some rest."),
    ("I watched a funny movie last night.", "Sounds like fun!"),
    ("Can you recommend a good book?", "Try a classic novel, they rarely disappoint."),
    ("I'm thinking about learning to cook.", "That's a great idea."),
    ("It rained all afternoon.", "A good day to stay inside."),
    ("I went for a walk in the park.", "Walks are great for clearing your head."),
    ("What's a good way to relax?", "A warm bath or a short walk often helps."),
    ("My neighbours are very noisy.", "That sounds annoying."),
    ("I tried a new coffee shop today.", "How was the coffee?"),
    ("I need to clean my flat this weekend.", "Good luck with it!"),
    ("Do you like music?", "I enjoy talking about all kinds of music."),
    ("I slept badly last night.", "I hope you sleep better tonight."),
    ("I'm planning a short trip.", "That sounds exciting."),
    ("Tell me a fun fact.", "Honey never spoils if it is sealed."),
    ("I forgot my umbrella again.", "Maybe keep a spare one at work."),
]
GREETINGS = [("Hi again!", "Welcome back! How can I help?"), ("Hello, it's me again.", "Hi! Nice to see you again.")]
SPLIT_OFFSETS = {"train": 0, "val": 1_000_000, "test": 2_000_000}


@dataclass
class ChatFactsConfig:
    """Shape of the generated episodes (all counts inclusive ranges)."""

    min_facts: int = 1
    max_facts: int = 3
    max_updates: int = 1
    update_prob: float = 0.5
    min_small_talk: int = 1
    max_small_talk: int = 4
    max_sessions: int = 3
    slots: tuple[str, ...] = tuple(SLOTS)

    def __post_init__(self) -> None:
        self.slots = tuple(self.slots)
        unknown = set(self.slots) - set(SLOTS)
        if unknown:
            raise ValueError(f"unknown slots {sorted(unknown)}; known: {sorted(SLOTS)}")
        if not 1 <= self.min_facts <= self.max_facts <= len(self.slots):
            raise ValueError(f"need 1 <= min_facts <= max_facts <= {len(self.slots)} slots")
        if not 0 <= self.min_small_talk <= self.max_small_talk:
            raise ValueError("need 0 <= min_small_talk <= max_small_talk")


@dataclass
class ChatFactsEpisode:
    messages: list[dict]  # the conversation (written into memory)
    slot: str  # the slot asked about
    answer: str  # its newest value
    question: str
    started_answer: str
    facts: dict[str, list[str]] = field(default_factory=dict)  # slot -> values in the order stated
    index: int = 0
    split: str = "train"

    def to_dict(self) -> dict:
        return asdict(self)


def generate_episode(split: str, index: int, config: ChatFactsConfig | None = None, seed: int = 0) -> ChatFactsEpisode:
    """Episode ``index`` of ``split`` (``train``/``val``/``test``): a pure function of its arguments."""
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"split must be one of {sorted(SPLIT_OFFSETS)}, got {split!r}")
    config = config or ChatFactsConfig()
    rng = random.Random(f"chat-facts/{seed}/{SPLIT_OFFSETS[split] + index}")
    n_facts = rng.randint(config.min_facts, config.max_facts)
    slots = rng.sample(list(config.slots), n_facts)
    events: list[tuple] = [("fact", s, rng.choice(SLOTS[s]["values"])) for s in slots]
    n_talk = rng.randint(config.min_small_talk, config.max_small_talk)
    events += [("talk", rng.choice(SMALL_TALK)) for _ in range(n_talk)]
    rng.shuffle(events)
    n_updates = sum(rng.random() < config.update_prob for _ in range(config.max_updates))
    for slot in rng.sample(slots, min(n_updates, len(slots))):
        first = next(i for i, e in enumerate(events) if e[0] == "fact" and e[1] == slot)
        old = events[first][2]
        new = rng.choice([v for v in SLOTS[slot]["values"] if v != old])
        events.insert(rng.randint(first + 1, len(events)), ("update", slot, new))
    n_sessions = rng.randint(1, min(config.max_sessions, len(events)))
    breaks = set(rng.sample(range(1, len(events)), n_sessions - 1)) if n_sessions > 1 else set()
    messages: list[dict] = []
    facts: dict[str, list[str]] = {}
    for i, event in enumerate(events):
        if i in breaks:
            hello, reply = rng.choice(GREETINGS)
            messages += [{"role": "user", "content": hello}, {"role": "assistant", "content": reply}]
        if event[0] == "talk":
            user, reply = event[1]
        else:
            kind, slot, value = event
            user = rng.choice(SLOTS[slot]["state" if kind == "fact" else "update"]).format(v=value)
            reply = rng.choice(ACKS)
            facts.setdefault(slot, []).append(value)
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    slot = rng.choice(slots)
    return ChatFactsEpisode(
        messages=messages,
        slot=slot,
        answer=facts[slot][-1],
        question=SLOTS[slot]["question"],
        started_answer=SLOTS[slot]["answer"],
        facts=facts,
        index=index,
        split=split,
    )


def generate_episodes(split: str, n: int, config: ChatFactsConfig | None = None, seed: int = 0, start: int = 0):
    return [generate_episode(split, start + i, config, seed) for i in range(n)]


def sessions(episode: ChatFactsEpisode) -> list[list[dict]]:
    """The conversation cut into its sessions: a later session opens with a greeting from the user."""
    greetings = {hello for hello, _ in GREETINGS}
    out: list[list[dict]] = []
    for message in episode.messages:
        if not out or (message["role"] == "user" and message["content"] in greetings):
            out.append([])
        out[-1].append(message)
    return out


# ------------------------------------------------------------------------------------------------ tokens


def render_message(role: str, content: str) -> str:
    """One ChatML message, exactly as SmolLM2's (append-only) chat template renders it."""
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def candidate_token_ids(tokenizer, slot: str) -> list[int]:
    """First token of ``" " + value`` for every value of ``slot``; raises if two values share it."""
    firsts = [_ids(tokenizer, " " + v)[0] for v in SLOTS[slot]["values"]]
    if len(set(firsts)) != len(firsts):
        raise ValueError(f"values of slot {slot!r} share a first token with this tokenizer: {firsts}")
    return firsts


def _question_ids(tokenizer, slot: str, value: str, answer_tokens: str, first: bool) -> tuple[list, list]:
    text = ("" if first else "<|im_end|>\n") + render_message("user", SLOTS[slot]["question"])
    prompt = _ids(tokenizer, text + "<|im_start|>assistant\n" + SLOTS[slot]["answer"])
    answer = _ids(tokenizer, " " + value)
    if answer_tokens == "first":
        answer = answer[:1]
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer


def tokenize_all_questions(episode: ChatFactsEpisode, tokenizer, answer_tokens: str = "all", seed: int = 0) -> dict:
    """A training episode whose visible stream asks about **every** stated slot, one chat turn each, in a seeded
    order (labels on every answer): more supervision per (expensive) memory pass, at the cost of a few visible
    tokens. Earlier answers stay visible, but they are about other slots."""
    fields = tokenize_episode(episode, tokenizer, answer_tokens)
    slots = list(episode.facts)
    random.Random(f"questions/{seed}/{episode.split}/{episode.index}").shuffle(slots)
    ids, labels = [], []
    for i, slot in enumerate(slots):
        q_ids, q_labels = _question_ids(tokenizer, slot, episode.facts[slot][-1], answer_tokens, first=i == 0)
        ids += q_ids
        labels += q_labels
    fields.update(input_ids=ids, labels=labels)
    return fields


def tokenize_episode(episode: ChatFactsEpisode, tokenizer, answer_tokens: str = "all") -> dict:
    """The fields of a δ-mem episode plus the full-context stream and the candidates of the question's slot.

    - ``memory_input_ids`` / ``memory_segment_ids``: the conversation, one segment id per message;
    - ``input_ids`` / ``labels``: question + started answer + `` value`` (labels only on the value's tokens;
      ``answer_tokens="first"`` keeps only its first token);
    - ``context_input_ids`` / ``context_labels``: the conversation followed by the same visible stream;
    - ``answer_position``: index in ``input_ids`` of the token whose logits predict the value;
    - ``candidates`` / ``gold``: first-token ids of the slot's values, and the index of the answer among them.
    """
    memory, segments = [], []
    for i, message in enumerate(episode.messages):
        ids = _ids(tokenizer, render_message(message["role"], message["content"]))
        memory += ids
        segments += [i] * len(ids)
    prompt = _ids(
        tokenizer, render_message("user", episode.question) + "<|im_start|>assistant\n" + episode.started_answer
    )
    value = _ids(tokenizer, " " + episode.answer)
    if answer_tokens == "first":
        value = value[:1]
    input_ids = prompt + value
    labels = [IGNORE_INDEX] * len(prompt) + value
    candidates = candidate_token_ids(tokenizer, episode.slot)
    return {
        "memory_input_ids": memory,
        "memory_segment_ids": segments,
        "input_ids": input_ids,
        "labels": labels,
        "context_input_ids": memory + input_ids,
        "context_labels": [IGNORE_INDEX] * len(memory) + labels,
        "answer_position": len(prompt) - 1,
        "candidates": candidates,
        "gold": SLOTS[episode.slot]["values"].index(episode.answer),
    }


__all__ = [
    "ChatFactsConfig",
    "ChatFactsEpisode",
    "SLOTS",
    "candidate_token_ids",
    "generate_episode",
    "generate_episodes",
    "render_message",
    "sessions",
    "tokenize_all_questions",
    "tokenize_episode",
]
