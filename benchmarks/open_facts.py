"""Open-vocabulary facts: a seeded generator of multi-session chats in which a user tells an assistant facts
and later asks about them in free chat, with values and fact kinds disjoint between the splits.

Why: a memory is judged on facts it never saw in training. Here

- **values** come from large pools (thousands of first and last names, cities, countries, jobs, colours, words,
  numbers; from the ``faker`` package, MIT licence, used offline) and each value belongs to exactly one split
  (a stable hash of the value), so no test value is ever trained;
- **fact kinds** (sister's name, locker number, employer, ...) are split too: :data:`KINDS` names which kinds
  are ``train``, ``val`` (every choice of recipe is made there) and ``test`` (held out; never used for a choice);
- an episode is a conversation of sessions ("Hi again" opens each later one): the user tells 1..``max_facts``
  facts in several phrasings, some facts are **updated** later (the newest value is the answer), distractor
  facts about other people share the kinds, and small talk sits in between; the last message is a question
  asked as a user would ask it (no started answer). A share of questions ask about something **never told**;
  the right reply then says so.

Scoring is by the reply a user reads (:func:`score_reply`): the value appears in the greedy reply as a whole
word, case-insensitive; for a never-told question the reply must say it was not told (:data:`NOT_TOLD`).
:func:`is_degenerate` flags replies that repeat a word three times in a row.

Everything is plain Python with ``random.Random`` seeded by (split, seed, index): episodes are reproducible.
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
from dataclasses import dataclass, field

SPLITS = ("train", "val", "test")

# kind -> (split, value pool, the noun phrase, kind-specific statements, kind-specific questions)
# Generic statements / questions / answers built from the noun phrase are added to every kind.
KINDS: dict[str, dict] = {
    # ------------------------------------------------------------------ train kinds
    "sister": dict(split="train", pool="first", thing="sister's name",
                   state=["My sister is called {v}.", "I have a sister named {v}."],
                   ask=["What is my sister called?", "What's my sister's name again?"]),
    "brother": dict(split="train", pool="first", thing="brother's name",
                    state=["My brother is called {v}.", "I have a younger brother, {v}."],
                    ask=["What's my brother called?"]),
    "dog": dict(split="train", pool="first", thing="dog's name",
                state=["My dog is called {v}.", "We got a puppy and named him {v}."],
                ask=["What is my dog called?", "Do you remember my dog's name?"]),
    "cat": dict(split="train", pool="first", thing="cat's name",
                state=["My cat is called {v}.", "I adopted a cat named {v}."],
                ask=["What's the name of my cat?"]),
    "boss": dict(split="train", pool="first", thing="boss's name",
                 state=["My boss is called {v}.", "I report to a manager named {v}."],
                 ask=["Who is my boss?", "What's my manager's name?"]),
    "friend": dict(split="train", pool="first", thing="best friend's name",
                   state=["My best friend is {v}.", "{v} has been my best friend since school."],
                   ask=["Who is my best friend?"]),
    "son": dict(split="train", pool="first", thing="son's name",
                state=["My son is called {v}.", "Our son {v} just started school."],
                ask=["What is my son's name?"]),
    "grandmother": dict(split="train", pool="first", thing="grandmother's name",
                        state=["My grandmother is called {v}.", "My grandma {v} turns ninety this year."],
                        ask=["What's my grandmother called?"]),
    "dentist": dict(split="train", pool="last", thing="dentist's surname",
                    state=["My dentist is Dr. {v}.", "I see a dentist called Dr. {v}."],
                    ask=["What is my dentist's name?"]),
    "teacher": dict(split="train", pool="last", thing="old teacher's surname",
                    state=["My favourite teacher at school was Mr. {v}."],
                    ask=["Who was my favourite teacher?"]),
    "hometown": dict(split="train", pool="city", thing="hometown",
                     state=["I grew up in {v}.", "I was born and raised in {v}."],
                     ask=["Where did I grow up?", "What is my hometown?"]),
    "city": dict(split="train", pool="city", thing="city",
                 state=["I live in {v}.", "These days I live in {v}."],
                 ask=["Which city do I live in?", "Where do I live?"]),
    "holiday": dict(split="train", pool="country", thing="next holiday destination",
                    state=["Next month I'm going on holiday to {v}.", "I booked a trip to {v}."],
                    ask=["Where am I going on holiday?"]),
    "job": dict(split="train", pool="job", thing="job",
                state=["I work as a {v}.", "I'm a {v} by profession."],
                ask=["What do I do for a living?", "What is my job?"]),
    "employer": dict(split="train", pool="company", thing="employer",
                     state=["I work at {v}.", "I got a job at {v}."],
                     ask=["Where do I work?", "Which company do I work for?"]),
    "colour": dict(split="train", pool="colour", thing="favourite colour",
                   state=["My favourite colour is {v}.", "I love the colour {v}."],
                   ask=["What's my favourite colour?"]),
    "word": dict(split="train", pool="word", thing="favourite word",
                 state=["My favourite word is \"{v}\".", "The word I like most is \"{v}\"."],
                 ask=["What's my favourite word?"]),
    "password": dict(split="train", pool="word", thing="wifi password",
                     state=["The wifi password is {v}.", "Our wifi password is {v}."],
                     ask=["What's the wifi password?"]),
    "locker": dict(split="train", pool="number", thing="locker number",
                   state=["My locker number is {v}.", "I got locker {v} at the gym."],
                   ask=["What's my locker number?"]),
    "room": dict(split="train", pool="number", thing="hotel room number",
                 state=["My hotel room number is {v}.", "I'm staying in room {v}."],
                 ask=["Which hotel room am I in?"]),
    "street": dict(split="train", pool="last", thing="street",
                   state=["I live on {v} Street.", "My flat is on {v} Street."],
                   ask=["Which street do I live on?"]),
    "horse": dict(split="train", pool="first", thing="horse's name",
                  state=["My horse is called {v}.", "I ride a horse named {v}."],
                  ask=["What's my horse called?"]),
    "doctor": dict(split="train", pool="last", thing="doctor's name",
                   state=["My doctor is Dr. {v}."],
                   ask=["Who is my doctor?"]),
    "country_born": dict(split="train", pool="country", thing="country of birth",
                         state=["I was born in {v}.", "My home country is {v}."],
                         ask=["Which country was I born in?"]),
    "nephew": dict(split="train", pool="first", thing="nephew's name",
                   state=["My nephew is called {v}."],
                   ask=["What's my nephew's name?"]),
    "car_colour": dict(split="train", pool="colour", thing="car's colour",
                       state=["My car is {v}.", "I drive a {v} car."],
                       ask=["What colour is my car?"]),
    # ------------------------------------------------------------------ val kinds (recipe choices)
    "daughter": dict(split="val", pool="first", thing="daughter's name",
                     state=["My daughter is called {v}."], ask=["What's my daughter called?"]),
    "landlord": dict(split="val", pool="last", thing="landlord's surname",
                     state=["My landlord is Mr. {v}."], ask=["Who is my landlord?"]),
    "study_city": dict(split="val", pool="city", thing="university city",
                       state=["I went to university in {v}."], ask=["Where did I go to university?"]),
    "bike_colour": dict(split="val", pool="colour", thing="bike's colour",
                        state=["My bike is {v}."], ask=["What colour is my bike?"]),
    "gate": dict(split="val", pool="number", thing="bus number",
                 state=["I take bus number {v} to work."], ask=["Which bus do I take to work?"]),
    "pet_word": dict(split="val", pool="word", thing="secret code word",
                     state=["Our secret code word is {v}."], ask=["What's our secret code word?"]),
    # ------------------------------------------------------------------ test kinds (held out)
    "cousin": dict(split="test", pool="first", thing="cousin's name",
                   state=["My cousin is called {v}.", "I have a cousin named {v}."],
                   ask=["What's my cousin called?"]),
    "hamster": dict(split="test", pool="first", thing="hamster's name",
                    state=["My hamster is called {v}."], ask=["What is my hamster's name?"]),
    "neighbour": dict(split="test", pool="first", thing="neighbour's name",
                      state=["My neighbour is called {v}."], ask=["Who is my neighbour?"]),
    "coach": dict(split="test", pool="last", thing="coach's surname",
                  state=["My football coach is Mr. {v}."], ask=["Who is my coach?"]),
    "honeymoon": dict(split="test", pool="country", thing="honeymoon destination",
                      state=["We went to {v} for our honeymoon."], ask=["Where did we go for our honeymoon?"]),
    "office_city": dict(split="test", pool="city", thing="office location",
                        state=["My office is in {v}."], ask=["Where is my office?"]),
    "wife_job": dict(split="test", pool="job", thing="wife's job",
                     state=["My wife works as a {v}."], ask=["What does my wife do for a living?"]),
    "pin": dict(split="test", pool="number", thing="apartment number",
                state=["My apartment number is {v}.", "I live in apartment {v}."],
                ask=["What's my apartment number?"]),
    "kitchen": dict(split="test", pool="colour", thing="kitchen's colour",
                    state=["We painted our kitchen {v}."], ask=["What colour is our kitchen?"]),
    "band": dict(split="test", pool="word", thing="band's name",
                 state=["My band is called {v}."], ask=["What's my band called?"]),
}  # fmt: skip

GENERIC_STATE = ["My {thing} is {v}.", "Just so you know, my {thing} is {v}.", "Remember this: my {thing} is {v}."]
GENERIC_ASK = ["What is my {thing}?", "Do you remember my {thing}?", "Can you tell me my {thing}?"]
UPDATE = ["Actually, that changed: my {thing} is {v} now.", "Correction: my {thing} is {v}, not what I said before."]
DISTRACTOR = ["My friend {name}'s {thing} is {v}.", "My colleague {name} told me their {thing} is {v}."]
ANSWER = "Your {thing} is {v}."
NOT_TOLD_ANSWER = "You haven't told me your {thing}."
ACKS = ["Got it.", "Thanks for telling me!", "Noted, I'll remember that.", "Good to know.", "Okay, thanks!"]
ACKS_VALUE = ["Got it: {v}.", "{v}, noted!"]
GREETINGS = [
    ("Hi again! It's me.", "Welcome back! How can I help today?"),
    ("Good morning, I'm back.", "Good morning! Nice to see you again."),
    ("Hello, it's been a few days.", "Hello again! What's new?"),
]
SMALL_TALK = [
    ("What a rainy day it is today.", "Rainy days are perfect for a warm drink and a good book."),
    ("I just got back from a long walk.", "Walks are great for clearing your head."),
    ("Can you suggest a quick breakfast?", "Oatmeal with fruit is quick and filling."),
    ("I'm a bit tired this evening.", "A good night's sleep might help."),
    ("Any tips for staying focused?", "Short breaks and a tidy desk help many people focus."),
    ("I watched a documentary about oceans.", "Oceans are fascinating, there is so much left to explore."),
    ("The train was late again this morning.", "That is frustrating, I hope the rest of the day went better."),
    ("I'm thinking about learning to cook.", "Cooking is a great skill, start with simple recipes."),
    ("What's a good way to relax?", "Many people relax with music, reading or a short walk."),
    ("I finally cleaned my desk.", "Well done! A clean desk feels great."),
    ("Do you like music?", "I enjoy talking about music of all kinds."),
    ("It's so hot outside today.", "Remember to drink plenty of water."),
    ("I started reading a new novel.", "Nice! Reading is a wonderful habit."),
    ("My phone battery keeps dying.", "Turning down the screen brightness can help."),
    ("I have a busy week ahead.", "Good luck! Planning each day can make it easier."),
    ("Tell me something interesting.", "Honey never spoils if it is stored well."),
]
NOT_TOLD = re.compile(
    r"\b(haven'?t|have not|didn'?t|did not|never)\b.{0,20}\b(told|tell|mention|mentioned|said|shared|share)\b"
    r"|\b(don'?t|do not) (know|have)\b|\bnot sure\b|\bno idea\b|\bnot (been )?told\b",
    re.IGNORECASE,
)
DEGENERATE = re.compile(r"\b(\w+)\b(?:\W+\1\b){2}", re.IGNORECASE)


def _ascii_words(values, max_words: int = 2) -> list[str]:
    out = []
    for v in values:
        v = v.strip()
        if v and v.isascii() and len(v.split()) <= max_words and all(c.isalpha() or c in " -'" for c in v):
            out.append(v)
    return sorted(set(out))


@functools.cache
def value_pools() -> dict[str, list[str]]:
    """The value pools (every split together), built once from ``faker``'s offline word lists."""
    try:
        from faker.providers.address import en as address_en
        from faker.providers.color import en_US as colour
        from faker.providers.job import en_US as job
        from faker.providers.lorem import en_US as lorem
    except ImportError as error:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "the open-facts generator takes its value pools from `faker`; install it with: "
            'pip install -e ".[real]"'
        ) from error
    import importlib

    first, last, cities = [], [], []
    for locale in ("en_US", "en_GB", "de_DE", "fr_FR", "it_IT", "es_ES", "nl_NL", "sv_SE"):
        person = importlib.import_module(f"faker.providers.person.{locale}").Provider
        for name in ("first_names", "first_names_female", "first_names_male"):
            names = getattr(person, name, ())
            first += list(names.keys() if isinstance(names, dict) else names)
        names = getattr(person, "last_names", ())
        last += list(names.keys() if isinstance(names, dict) else names)
        address = importlib.import_module(f"faker.providers.address.{locale}").Provider
        cities += list(getattr(address, "cities", ()))
    colours = [re.sub(r"(?<!^)([A-Z])", r" \1", c).lower() for c in colour.Provider.all_colors]
    jobs = [j.lower() for j in job.Provider.jobs if "," not in j and "(" not in j]
    pools = {
        "first": _ascii_words(first, 1),
        "last": _ascii_words(last, 1),
        "city": _ascii_words(cities, 2),
        "country": _ascii_words(address_en.Provider.countries, 2),
        "job": _ascii_words(jobs, 2),
        "colour": _ascii_words(colours, 2),
        "word": _ascii_words([w for w in lorem.Provider.word_list if len(w) >= 4], 1),
        "number": [str(n) for n in range(10, 1000)],
    }
    pools["company"] = [f"{name} {suffix}" for name in pools["last"] for suffix in ("Labs", "Logistics", "Foods")]
    return pools


def value_split(value: str) -> str:
    """The one split a value belongs to (a stable hash: 70 % train, 10 % val, 20 % test)."""
    bucket = int(hashlib.sha1(value.lower().encode()).hexdigest(), 16) % 10
    return "train" if bucket < 7 else "val" if bucket < 8 else "test"


@functools.cache
def split_pool(pool: str, split: str) -> tuple[str, ...]:
    return tuple(v for v in value_pools()[pool] if value_split(v) == split)


def kinds(split: str) -> list[str]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [k for k, spec in KINDS.items() if spec["split"] == split]


@dataclass(frozen=True)
class OpenFactsConfig:
    """Shape of the generated chats."""

    min_facts: int = 1
    max_facts: int = 3
    max_updates: int = 1
    max_distractors: int = 1
    min_small_talk: int = 1
    max_small_talk: int = 3
    max_sessions: int = 2
    not_told_share: float = 0.15  # share of questions about a kind never told

    def __post_init__(self) -> None:
        if not 1 <= self.min_facts <= self.max_facts:
            raise ValueError(f"need 1 <= min_facts <= max_facts, got {self.min_facts}, {self.max_facts}")
        if not 1 <= self.min_small_talk <= self.max_small_talk:
            raise ValueError("need 1 <= min_small_talk <= max_small_talk (the facts must leave the window)")
        if not 0.0 <= self.not_told_share <= 1.0:
            raise ValueError(f"not_told_share must be in [0, 1], got {self.not_told_share}")


@dataclass
class OpenFactsEpisode:
    """A conversation ending with a user question; ``value`` is the answer (None: never told)."""

    messages: list[dict[str, str]]
    kind: str
    value: str | None
    reply: str  # the target reply (training supervision)
    facts: dict[str, str] = field(default_factory=dict)  # kind -> newest value told
    stale: list[str] = field(default_factory=list)  # values of the asked kind that were overwritten

    @property
    def question(self) -> str:
        return self.messages[-1]["content"]

    @property
    def history(self) -> list[dict[str, str]]:
        return self.messages[:-1]


def _fill(template: str, thing: str, value: str, name: str = "") -> str:
    text = template.format(thing=thing, v=value, name=name)
    return text[0].upper() + text[1:]


def generate_episode(split: str, index: int, config: OpenFactsConfig | None = None, seed: int = 0) -> OpenFactsEpisode:
    """One reproducible episode of ``split`` (values and kinds of that split only)."""
    config = config or OpenFactsConfig()
    rng = random.Random(f"open-facts/{split}/{seed}/{index}")
    names = split_pool("first", split)
    available = kinds(split)
    n_facts = rng.randint(config.min_facts, min(config.max_facts, len(available) - 1))
    told = rng.sample(available, n_facts)
    events: list[tuple[str, str, str | None]] = [("fact", k, None) for k in told]
    for kind in rng.sample(available, rng.randint(0, config.max_distractors)):
        events.append(("distractor", kind, rng.choice(names)))
    events += [("talk", "", None)] * rng.randint(config.min_small_talk - 1, config.max_small_talk - 1)
    rng.shuffle(events)
    for kind in rng.sample(told, min(rng.randint(0, config.max_updates), len(told))):
        after = events.index(("fact", kind, None))  # an update comes after the fact it changes
        events.insert(rng.randint(after + 1, len(events)), ("update", kind, None))
    facts: dict[str, str] = {}
    stale: dict[str, list[str]] = {}
    messages: list[dict[str, str]] = []
    sessions_left = rng.randint(0, config.max_sessions - 1)

    def pair(user: str, assistant: str) -> None:
        messages.extend([{"role": "user", "content": user}, {"role": "assistant", "content": assistant}])

    for kind_event, kind, name in events:
        if messages and sessions_left and rng.random() < 0.3:
            sessions_left -= 1
            pair(*rng.choice(GREETINGS))
        if kind_event == "talk":
            pair(*rng.choice(SMALL_TALK))
            continue
        spec = KINDS[kind]
        value = rng.choice(split_pool(spec["pool"], split))
        if kind_event == "distractor":
            pair(_fill(rng.choice(DISTRACTOR), spec["thing"], value, name), rng.choice(ACKS))
            continue
        if kind_event == "update":
            while value == facts[kind]:
                value = rng.choice(split_pool(spec["pool"], split))
            stale.setdefault(kind, []).append(facts[kind])
            user = _fill(rng.choice(UPDATE), spec["thing"], value)
        else:
            user = _fill(rng.choice(spec["state"] + GENERIC_STATE), spec["thing"], value)
        facts[kind] = value
        ack = rng.choice(ACKS_VALUE) if rng.random() < 0.3 else rng.choice(ACKS)
        pair(user, _fill(ack, spec["thing"], value))
    pair(*rng.choice(SMALL_TALK))  # the facts have left a window of two messages
    if rng.random() < config.not_told_share:
        kind = rng.choice([k for k in available if k not in facts])
        value, reply = None, _fill(NOT_TOLD_ANSWER, KINDS[kind]["thing"], "")
    else:
        kind = rng.choice(told)
        value = facts[kind]
        reply = _fill(ANSWER, KINDS[kind]["thing"], value)
    question = _fill(rng.choice(KINDS[kind]["ask"] + GENERIC_ASK), KINDS[kind]["thing"], "")
    messages.append({"role": "user", "content": question})
    return OpenFactsEpisode(messages, kind, value, reply, facts, stale.get(kind, []))


def all_questions(episode: OpenFactsEpisode, seed: int = 0) -> list[tuple[str, str]]:
    """``(question, target reply)`` for every fact told in ``episode`` (newest values), plus the episode's own
    question when it asks about something never told: more supervised answers for one written memory."""
    rng = random.Random(f"open-facts/questions/{seed}/{episode.question}/{sorted(episode.facts.items())}")
    out = []
    for kind, value in episode.facts.items():
        spec = KINDS[kind]
        question = _fill(rng.choice(spec["ask"] + GENERIC_ASK), spec["thing"], "")
        out.append((question, _fill(ANSWER, spec["thing"], value)))
    if episode.value is None:
        out.append((episode.question, episode.reply))
    return out


def generate_episodes(
    split: str, n: int, config: OpenFactsConfig | None = None, seed: int = 0, start: int = 0
) -> list[OpenFactsEpisode]:
    return [generate_episode(split, i, config, seed) for i in range(start, start + n)]


def contains_value(reply: str, value: str) -> bool:
    """The value appears in the reply as a whole word (or phrase), case-insensitive."""
    return re.search(rf"(?<!\w){re.escape(value)}(?!\w)", reply, re.IGNORECASE) is not None


def score_reply(reply: str, value: str | None) -> bool:
    """Right reply: it names the value (told facts) or says it was not told (``value=None``)."""
    if value is None:
        return NOT_TOLD.search(reply) is not None
    return contains_value(reply, value)


def is_degenerate(reply: str) -> bool:
    """A word repeated three times in a row ("Paris, Paris, Paris")."""
    return DEGENERATE.search(reply) is not None


# General questions and instructions (with the word a correct reply must contain): the no-harm check.
GENERAL = [
    ("What is the capital of France?", "paris"),
    ("What is the capital of Japan?", "tokyo"),
    ("What is the capital of Italy?", "rome"),
    ("What is the capital of Germany?", "berlin"),
    ("What is the capital of Spain?", "madrid"),
    ("What is the capital of England?", "london"),
    ("What is 2 plus 2?", "4"),
    ("What is 10 minus 3?", "7"),
    ("What is 5 times 2?", "10"),
    ("How many days are in a week?", "7"),
    ("How many legs does a spider have?", "8"),
    ("What color is the sky on a clear day?", "blue"),
    ("What color is grass?", "green"),
    ("What is the opposite of hot?", "cold"),
    ("What is the opposite of up?", "down"),
    ("What animal says meow?", "cat"),
    ("What animal barks?", "dog"),
    ("What is the largest planet in our solar system?", "jupiter"),
    ("What planet do we live on?", "earth"),
    ("What is frozen water called?", "ice"),
    ("Translate 'hello' into French.", "bonjour"),
    ("Say the word 'banana' and nothing else.", "banana"),
    ("Which month comes after January?", "february"),
    ("What do bees make?", "honey"),
    ("Write the word 'yes' in capital letters.", "yes"),
    ("Complete the sentence: The early bird catches the ...", "worm"),
    ("What is the boiling point of water in Celsius?", "100"),
    ("Which is bigger, an elephant or a mouse?", "elephant"),
    ("What do you call a baby cat?", "kitten"),
    ("What is the first letter of the English alphabet?", "a"),
]


# A second fixed set for the no-harm check, written (with its answers) after the memory router's first test run
# showed two general questions phrased in the first and second person routed to the memory, and before any score of
# a router fitted since: about half ask about the world in the words of a personal question ("we", "you", "I").
# Nothing is fitted or chosen on it; it measures whether a fix carries beyond the questions that prompted it.
GENERAL_FRESH = [
    ("What is the capital of Canada?", "ottawa"),
    ("What is the capital of Egypt?", "cairo"),
    ("What is 6 plus 3?", "9"),
    ("What is 3 times 3?", "9"),
    ("How many legs does a dog have?", "4"),
    ("What color is a ripe banana?", "yellow"),
    ("What is the opposite of big?", "small"),
    ("What animal says moo?", "cow"),
    ("Which month comes before December?", "november"),
    ("Translate 'thank you' into French.", "merci"),
    ("Say the word 'apple' and nothing else.", "apple"),
    ("Which planet is known as the red planet?", "mars"),
    ("Which animal is known as the king of the jungle?", "lion"),
    ("What do bees live in?", "hive"),
    ("What do you call a baby dog?", "puppy"),
    ("What do you call a baby sheep?", "lamb"),
    ("What do you call the home of a bird?", "nest"),
    ("What do you call water that falls from the sky?", "rain"),
    ("What gas do we breathe in to live?", "oxygen"),
    ("What do we call the day after Friday?", "saturday"),
    ("What do we call a person who teaches at a school?", "teacher"),
    ("Where do we see the stars at night, in the sky or in the sea?", "sky"),
    ("What do your eyes let you do?", "see"),
    ("What color are most leaves in summer, as we see them?", "green"),
    ("What do I call the opposite of night?", "day"),
    ("If I am thirsty, what should I drink?", "water"),
    ("What fruit do we make apple pie from?", "apple"),
    ("Where do we find fish living?", "water"),
    ("What do you use to hear sounds?", "ears"),
    ("Which is colder, our summer or our winter?", "winter"),
]


__all__ = [
    "GENERAL",
    "GENERAL_FRESH",
    "all_questions",
    "KINDS",
    "OpenFactsConfig",
    "OpenFactsEpisode",
    "SPLITS",
    "contains_value",
    "generate_episode",
    "generate_episodes",
    "is_degenerate",
    "kinds",
    "score_reply",
    "split_pool",
    "value_pools",
    "value_split",
]
