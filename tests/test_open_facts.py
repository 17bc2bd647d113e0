"""The open-facts generator and its reply scoring: pure Python, no model."""

from __future__ import annotations

import pytest

from benchmarks import open_facts
from benchmarks.open_facts import (
    KINDS,
    OpenFactsConfig,
    contains_value,
    generate_episode,
    generate_episodes,
    is_degenerate,
    score_reply,
    split_pool,
    value_split,
)


def test_episodes_are_reproducible_and_differ_by_index_and_seed():
    a, b = generate_episode("train", 3), generate_episode("train", 3)
    assert a.messages == b.messages and a.value == b.value
    assert generate_episode("train", 4).messages != a.messages
    assert generate_episode("train", 3, seed=1).messages != a.messages


def test_kinds_and_values_are_disjoint_between_splits():
    kinds = {split: set(open_facts.kinds(split)) for split in open_facts.SPLITS}
    assert not (kinds["train"] & kinds["test"]) and not (kinds["train"] & kinds["val"])
    assert not (kinds["val"] & kinds["test"]) and len(kinds["test"]) >= 8 and len(kinds["train"]) >= 20
    for pool in open_facts.value_pools():
        train, test = set(split_pool(pool, "train")), set(split_pool(pool, "test"))
        assert train and test and not (train & test), pool
    # large pools: thousands of names and places
    assert len(open_facts.value_pools()["first"]) > 2000 and len(open_facts.value_pools()["city"]) > 5000
    for split in open_facts.SPLITS:
        for e in generate_episodes(split, 40):
            assert KINDS[e.kind]["split"] == split
            assert all(value_split(v) == split for v in e.facts.values())


def test_an_episode_is_a_chat_whose_facts_left_a_window_of_two():
    for e in generate_episodes("test", 60):
        roles = [m["role"] for m in e.messages]
        assert roles[-1] == "user" and roles[:-1] == ["user", "assistant"] * (len(roles) // 2)
        window = " ".join(m["content"] for m in e.messages[-2:])
        if e.value is not None:
            assert e.facts[e.kind] == e.value and e.value in " ".join(m["content"] for m in e.history)
            assert not contains_value(window, e.value)
            assert e.value in e.reply
        else:
            assert e.kind not in e.facts and score_reply(e.reply, None)


def test_updates_make_the_newest_value_the_answer():
    updated = [e for e in generate_episodes("train", 200) if e.stale]
    assert updated
    for e in updated:
        history = " ".join(m["content"] for m in e.history)
        assert history.rfind(e.value) > max(history.find(s) for s in e.stale)


def test_the_config_refuses_a_chat_whose_facts_stay_visible():
    with pytest.raises(ValueError, match="leave the window"):
        OpenFactsConfig(min_small_talk=0)
    with pytest.raises(ValueError, match="not_told_share"):
        OpenFactsConfig(not_told_share=1.5)


@pytest.mark.parametrize(
    ("reply", "value", "right"),
    [
        ("Your cousin's name is Mila.", "Mila", True),
        ("your cousin is MILA!", "Mila", True),
        ("Your cousin is Milan.", "Mila", False),
        ("It is in Bad Honnef, I think.", "Bad Honnef", True),
        ("You haven't told me your cousin's name.", None, True),
        ("I don't know.", None, True),
        ("Your cousin is Anna.", None, False),
    ],
)
def test_replies_are_scored_by_whole_words(reply, value, right):
    assert score_reply(reply, value) is right


def test_degenerate_replies_repeat_a_word_three_times():
    assert is_degenerate("Paris, Paris, Paris and more")
    assert is_degenerate("Bear. Bear. Bear.")
    assert not is_degenerate("Paris is the capital, Paris is big.")
