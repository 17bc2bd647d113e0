"""Measure open-vocabulary recall the way a user meets it: chats played through the chat engine, scored by reply.

Every condition sends a whole :mod:`~benchmarks.open_facts` conversation to a fresh session of
:class:`~peft_deltamem.agents.engine.ChatEngine` (the code path of ``peft-deltamem chat`` and ``serve``) and
scores the greedy reply it returns:

=================  ========================================================================================
``none``           the question alone, the frozen model (no history)
``window``         the whole conversation, a window of ``window`` messages, nothing in memory (frozen model)
``memory``         the same window, the older messages written into δ-mem's memory as they leave it
``context``        the whole conversation visible, the frozen model (the reference a memory tries to reach)
``context_memory`` the whole conversation visible **and** written into memory as it arrives, adapter on
``other_memory``   another episode's history with this episode's question (a control: no real recall)
=================  ========================================================================================

and, for the no-harm check, fixed general questions (:data:`~benchmarks.open_facts.GENERAL`) asked after
an unrelated conversation, with the memory (``general_memory``) and without (``general_window``), and the same for a
second set written later (:data:`~benchmarks.open_facts.GENERAL_FRESH`: ``general_fresh_memory``, ``..._window``).
"""

from __future__ import annotations

import tempfile

from .open_facts import GENERAL, GENERAL_FRESH, OpenFactsEpisode, contains_value, is_degenerate, score_reply

CONDITIONS = ("none", "window", "memory", "context", "context_memory", "other_memory")
# The no-harm check's question sets: the fixed one the target is measured on, and a second one written later
# (:data:`~benchmarks.open_facts.GENERAL_FRESH`) that nothing is fitted or chosen on.
GENERAL_SETS = {"general": GENERAL, "general_fresh": GENERAL_FRESH}
GENERAL_CONDITIONS = tuple(f"{name}_{c}" for name in GENERAL_SETS for c in ("window", "memory"))
FULL = 1_000_000  # a window that holds any conversation


def engine_replies(
    model,
    tokenizer,
    conversations: list[list[dict[str, str]]],
    *,
    window: int,
    memory: bool,
    write: str = "leave",
    max_new_tokens: int = 32,
    batch_size: int = 8,
    router=None,
) -> list[str]:
    """The engine's greedy reply to each conversation, each in a fresh session (sessions batched); ``router`` (a
    :class:`~peft_deltamem.agents.router.MemoryRouter`) decides which replies read the memory (memory runs only)."""
    from peft_deltamem.agents.engine import ChatEngine, GenerationParams, Limits
    from peft_deltamem.agents.session import SessionPolicy
    from peft_deltamem.agents.store import DirectoryStore

    was_training = model.training
    with tempfile.TemporaryDirectory() as root:
        engine = ChatEngine(
            model,
            tokenizer,
            DirectoryStore(root),
            SessionPolicy(window=window, write=write),
            max_batch_size=batch_size,
            memory=memory,
            router=router if memory else None,
            # a whole long conversation arrives in one request, as a client resending its history sends it
            limits=Limits(max_messages=max(64, max(map(len, conversations), default=0))),
        )
        try:
            params = GenerationParams(max_new_tokens=max_new_tokens)
            futures = [engine.submit(f"episode-{i}", c, params) for i, c in enumerate(conversations)]
            replies = [f.result().reply for f in futures]
        finally:
            engine.close()
            model.train(was_training)
    return replies


def conversations(episodes: list[OpenFactsEpisode], condition: str) -> tuple[list[list[dict]], dict]:
    """The messages sent to the engine for ``condition`` and the engine settings it uses."""
    if condition == "none":
        return [[{"role": "user", "content": e.question}] for e in episodes], {"memory": False}
    if condition == "other_memory":
        n = len(episodes)
        return [episodes[(i + 1) % n].history + e.messages[-1:] for i, e in enumerate(episodes)], {"memory": True}
    settings = {
        "window": {"memory": False},
        "memory": {"memory": True},
        "context": {"memory": False, "window": FULL},
        "context_memory": {"memory": True, "window": FULL, "write": "arrival"},
    }
    if condition not in settings:
        raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
    return [e.messages for e in episodes], settings[condition]


def score(replies: list[str], episodes: list[OpenFactsEpisode]) -> dict:
    """Recall on told facts, "not told" on never-told ones, stale values named, and degenerate replies."""
    told = [(r, e) for r, e in zip(replies, episodes, strict=True) if e.value is not None]
    untold = [(r, e) for r, e in zip(replies, episodes, strict=True) if e.value is None]
    stale = [(r, e) for r, e in told if e.stale]
    return {
        "recall": sum(score_reply(r, e.value) for r, e in told) / max(len(told), 1),
        "not_told": sum(score_reply(r, None) for r, _ in untold) / max(len(untold), 1),
        "stale_named": sum(any(contains_value(r, s) for s in e.stale) for r, e in stale) / max(len(stale), 1),
        "degenerate": sum(map(is_degenerate, replies)) / max(len(replies), 1),
        "n_told": len(told),
        "n_not_told": len(untold),
        "n_updated": len(stale),
    }


def evaluate(
    model,
    tokenizer,
    episodes: list[OpenFactsEpisode],
    conditions=CONDITIONS,
    *,
    window: int = 2,
    general: bool = False,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    router=None,
    write: str = "leave",
) -> dict:
    """Scores (and replies) of each condition; with ``general`` also the no-harm check on :data:`GENERAL`;
    ``router`` as in :func:`engine_replies`; ``write`` how the memory conditions write (``SessionPolicy.write``;
    ``context_memory`` always writes on arrival)."""
    out: dict[str, dict] = {}
    for condition in conditions:
        messages, settings = conversations(episodes, condition)
        settings = {"window": window, "write": write, **settings}
        replies = engine_replies(
            model, tokenizer, messages, max_new_tokens=max_new_tokens, batch_size=batch_size, router=router, **settings
        )
        out[condition] = {**score(replies, episodes), "replies": replies}
    for name, items in GENERAL_SETS.items() if general else ():
        questions = [
            episodes[i % len(episodes)].history + [{"role": "user", "content": q}] for i, (q, _) in enumerate(items)
        ]
        for condition, memory in ((f"{name}_window", False), (f"{name}_memory", True)):
            replies = engine_replies(
                model, tokenizer, questions, window=window, memory=memory, max_new_tokens=max_new_tokens,
                batch_size=batch_size, router=router, write=write,
            )  # fmt: skip
            right = [contains_value(r, a) for r, (_, a) in zip(replies, items, strict=True)]
            out[condition] = {
                "accuracy": sum(right) / len(right),
                "degenerate": sum(map(is_degenerate, replies)) / len(replies),
                "replies": replies,
            }
    return out


def gap_recovered(results: dict, key: str = "recall") -> float | None:
    """(memory - none) / (context - none) of told-fact recall; None when full context is not better."""
    none, memory, context = (results[m][key] for m in ("none", "memory", "context"))
    return (memory - none) / (context - none) if context > none else None


def targets(results: dict) -> dict[str, bool]:
    """The issue's targets, each True when met (missing conditions are left out)."""
    met = {}
    if all(m in results for m in ("none", "memory", "context")):
        gap = gap_recovered(results)
        met["memory recovers >= 50 % of the gap"] = gap is not None and gap >= 0.5
    if "context_memory" in results and "context" in results:
        met["history visible: adapter >= frozen - 0.02"] = (
            results["context_memory"]["recall"] >= results["context"]["recall"] - 0.02
        )
    for name in GENERAL_SETS:
        if f"{name}_memory" in results:
            label = "general questions" if name == "general" else "fresh general questions"
            met[f"{label} within 0.05"] = (
                abs(results[f"{name}_memory"]["accuracy"] - results[f"{name}_window"]["accuracy"]) <= 0.05
            )
    if "memory" in results and "context" in results:
        frozen = max(results["context"]["degenerate"], results.get("window", results["context"])["degenerate"])
        met["degenerate replies no more than the frozen model"] = results["memory"]["degenerate"] <= frozen
    return met


__all__ = [
    "CONDITIONS",
    "GENERAL_CONDITIONS",
    "GENERAL_SETS",
    "conversations",
    "engine_replies",
    "evaluate",
    "gap_recovered",
    "score",
    "targets",
]
