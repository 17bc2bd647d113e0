"""The chat-facts generator (natural-language user facts for the real-model recall task): pure Python, no model."""

from __future__ import annotations

import pytest

from peft_deltamem.training.chat_facts import SLOTS, ChatFactsConfig, generate_episode, generate_episodes


def test_episodes_are_seeded_and_splits_differ():
    a = generate_episodes("train", 20)
    assert [e.to_dict() for e in a] == [e.to_dict() for e in generate_episodes("train", 20)]
    b = generate_episodes("test", 20)
    assert [e.messages for e in a] != [e.messages for e in b]
    assert generate_episode("val", 3, seed=1).messages != generate_episode("val", 3, seed=0).messages
    with pytest.raises(ValueError, match="split"):
        generate_episode("dev", 0)


def test_the_newest_value_is_the_answer_and_is_stated_in_the_history():
    config = ChatFactsConfig(max_facts=3, max_updates=2, update_prob=1.0)
    updated = 0
    for episode in generate_episodes("train", 100, config):
        values = episode.facts[episode.slot]
        assert episode.answer == values[-1] and episode.answer in SLOTS[episode.slot]["values"]
        text = " ".join(m["content"] for m in episode.messages if m["role"] == "user")
        assert text.rfind(episode.answer) >= max(text.rfind(v) for v in values)  # stated last
        assert episode.question == SLOTS[episode.slot]["question"]
        roles = [m["role"] for m in episode.messages]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        updated += len(values) > 1
        if len(values) > 1:
            assert values[-1] != values[-2]
    assert updated > 50


def test_counts_follow_the_config():
    config = ChatFactsConfig(min_facts=2, max_facts=2, min_small_talk=0, max_small_talk=0, max_updates=0)
    for episode in generate_episodes("val", 30, config):
        assert len(episode.facts) == 2 and all(len(v) == 1 for v in episode.facts.values())
        # two facts, no small talk: 2 exchanges plus at most one greeting exchange per new session
        assert 4 <= len(episode.messages) <= 6
    with pytest.raises(ValueError):
        ChatFactsConfig(min_facts=3, max_facts=2)
    with pytest.raises(ValueError, match="unknown slots"):
        ChatFactsConfig(slots=("dog", "planet"))


def test_other_memory_control_rotates_only_the_memory():
    from benchmarks.real_recall import with_other_memory

    features = [
        {"memory_input_ids": [i] * (i + 1), "memory_segment_ids": [0] * (i + 1), "input_ids": [10 + i]}
        for i in range(3)
    ]
    rotated = with_other_memory(features)
    assert [f["memory_input_ids"] for f in rotated] == [[1, 1], [2, 2, 2], [0]]
    assert [f["memory_segment_ids"] for f in rotated] == [[0, 0], [0, 0, 0], [0]]
    assert [f["input_ids"] for f in rotated] == [[10], [11], [12]]
    assert features[0]["memory_input_ids"] == [0]  # the originals are untouched


def test_sessions_cut_the_conversation_at_greetings():
    from peft_deltamem.training.chat_facts import GREETINGS, sessions

    greetings = {hello for hello, _ in GREETINGS}
    counts = set()
    for episode in generate_episodes("test", 40, ChatFactsConfig(max_sessions=3)):
        parts = sessions(episode)
        assert [m for part in parts for m in part] == episode.messages
        assert all(part[0]["content"] in greetings for part in parts[1:])
        assert not any(m["content"] in greetings for m in parts[0])
        counts.add(len(parts))
    assert counts == {1, 2, 3}
