"""The synthetic long-horizon memory task and its word-level tokenizer."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
from jinja2.exceptions import TemplateError

from benchmarks.synthetic import (
    SLOTS,
    SLOTS_BY_NAME,
    SPECIAL_TOKENS,
    SyntheticTaskConfig,
    build_tokenizer,
    encode_episode,
    generate_episode,
    generate_episodes,
    make_full_context_episode,
    render_chat,
)

CONFIG = SyntheticTaskConfig(num_facts=5, num_updates=3, num_distractors=10, visible_turns=6, seed=7)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(CONFIG)


def _asked_statement_indices(episode) -> list[int]:
    slot = episode.metadata["slot"]
    return [i for kind, s, i in episode.metadata["events"] if s == slot and kind in ("fact", "update")]


def test_deterministic_per_seed():
    assert generate_episodes(CONFIG, 5) == generate_episodes(CONFIG, 5)
    assert generate_episode(CONFIG, 3) == generate_episodes(CONFIG, 5)[3]


def test_different_seeds_and_indices_differ():
    a = generate_episodes(CONFIG, 5)
    b = generate_episodes(replace(CONFIG, seed=8), 5)
    assert [e.history_messages for e in a] != [e.history_messages for e in b]
    assert len({str(e.history_messages) for e in a}) == 5


@pytest.mark.parametrize(
    "config",
    [
        CONFIG,
        SyntheticTaskConfig(num_facts=1, num_updates=0, num_distractors=3, visible_turns=2, num_sessions=1),
        SyntheticTaskConfig(num_facts=10, num_updates=6, num_distractors=0, visible_turns=4, num_values=16),
        SyntheticTaskConfig(num_facts=3, num_updates=2, num_distractors=2, history_turns=60, visible_turns=8),
    ],
)
def test_knobs_respected(config):
    for episode in generate_episodes(config, 30):
        meta = episode.metadata
        kinds = Counter(kind for kind, _, _ in meta["events"])
        assert kinds["fact"] == config.num_facts == len(meta["facts"])
        assert kinds["update"] == config.num_updates
        assert kinds["greeting"] == config.num_sessions
        assert kinds["distractor"] == meta["num_distractors"]
        if config.history_turns is None:
            assert meta["num_distractors"] == config.num_distractors
        else:
            assert config.history_turns <= len(episode.history_messages) <= config.history_turns + 1
        assert len(episode.history_messages) == 2 * sum(kinds.values())
        assert len(episode.history_messages) > config.visible_turns
        assert len(set(episode.history_sessions)) == config.num_sessions
        assert episode.history_sessions == sorted(episode.history_sessions)

        # Every slot's first statement comes before its updates; the values in play are the first num_values.
        first_kind = {}
        for kind, slot, _ in meta["events"]:
            if slot is not None:
                first_kind.setdefault(slot, kind)
        assert set(first_kind.values()) <= {"fact"}
        for slot, value in meta["facts"].items():
            assert value in SLOTS_BY_NAME[slot].values[: config.num_values]


def test_episode_layout():
    for episode in generate_episodes(CONFIG, 50):
        n_visible = CONFIG.visible_turns
        history = episode.history_messages
        assert episode.memory_messages == history[:-n_visible]
        assert episode.visible_messages[:-1] == history[-n_visible:]
        assert episode.visible_messages[-1] == {"role": "user", "content": episode.question}
        assert all(set(m) == {"role", "content"} for m in history)
        assert [m["role"] for m in history] == ["user", "assistant"] * (len(history) // 2)

        # The asked fact (every statement of its slot) lies in memory, none in the visible window.
        first_visible = len(history) - n_visible
        statements = _asked_statement_indices(episode)
        assert statements and all(i + 1 < first_visible for i in statements)
        assert statements[0] == episode.metadata["stated_at"]
        assert statements[-1] == episode.metadata["answer_stated_at"]
        stated = history[episode.metadata["answer_stated_at"]]["content"]
        assert episode.answer in stated.split()
        assert all(history[i]["content"] not in {m["content"] for m in episode.visible_messages} for i in statements)


def test_updates_newest_value_wins():
    config = replace(CONFIG, ask_updated=True)
    for episode in generate_episodes(config, 30):
        meta = episode.metadata
        assert meta["updated"] and len(meta["value_history"]) >= 2
        assert episode.answer == meta["value_history"][-1] != meta["value_history"][-2]
        assert meta["answer_stated_at"] > meta["stated_at"]
        assert meta["facts"][meta["slot"]] == episode.answer
    for episode in generate_episodes(replace(CONFIG, ask_updated=False), 30):
        assert not episode.metadata["updated"] and episode.metadata["value_history"] == [episode.answer]
    asked_updated = [e.metadata["updated"] for e in generate_episodes(CONFIG, 60)]
    assert any(asked_updated) and not all(asked_updated)


def test_invalid_configs():
    with pytest.raises(ValueError, match="num_facts"):
        SyntheticTaskConfig(num_facts=len(SLOTS) + 1)
    with pytest.raises(ValueError, match="num_values"):
        SyntheticTaskConfig(num_values=1000)
    with pytest.raises(ValueError, match="ask_updated"):
        SyntheticTaskConfig(num_updates=0, ask_updated=True)
    with pytest.raises(ValueError, match="visible_turns"):
        generate_episode(SyntheticTaskConfig(num_facts=1, num_updates=0, num_distractors=0, visible_turns=10))
    with pytest.raises(ValueError, match="outside the visible window"):
        generate_episode(
            SyntheticTaskConfig(num_facts=1, num_updates=0, num_distractors=0, num_sessions=1, visible_turns=3)
        )


def test_full_context_episode():
    episode = generate_episode(CONFIG, 0)
    full = make_full_context_episode(episode)
    assert full.memory_messages == []
    assert full.visible_messages == [*episode.history_messages, {"role": "user", "content": episode.question}]
    assert full.answer == episode.answer and full.metadata["full_context"]


def test_tokenizer_basics(tokenizer):
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(len(SPECIAL_TOKENS)))
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id == 0
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == ("<bos>", "<eos>", "<unk>")
    text = "my favorite color is teal ."
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == 6 and tokenizer.decode(ids) == text
    assert tokenizer.encode("My Favorite", add_special_tokens=False) == tokenizer.encode("my favorite")
    assert tokenizer.unk_token_id in tokenizer.encode("supercalifragilistic", add_special_tokens=False)
    batch = tokenizer(["the door code is", "hello ."], padding=True)
    assert batch["input_ids"][1][-2:] == [0, 0] and batch["attention_mask"][1][-2:] == [0, 0]
    assert build_tokenizer().get_vocab() == tokenizer.get_vocab()  # ids do not depend on the config


def test_no_unk_and_single_token_answers(tokenizer):
    wide = SyntheticTaskConfig(
        num_facts=10, num_updates=8, num_distractors=12, num_values=16, value_distractor_rate=0.5
    )
    for config in (wide, CONFIG):
        for seed in range(25):
            for episode in generate_episodes(replace(config, seed=seed), 4):
                ids = render_chat(tokenizer, episode.visible_messages + episode.history_messages)
                assert tokenizer.unk_token_id not in ids
                assert len(tokenizer.encode(episode.answer, add_special_tokens=False)) == 1
    for slot in SLOTS:  # every value of every pool, not just the ones sampled above
        for value in slot.values:
            assert tokenizer.encode(value, add_special_tokens=False) != [tokenizer.unk_token_id]
            assert len(tokenizer.encode(value, add_special_tokens=False)) == 1


def test_chat_template(tokenizer):
    messages = [
        {"role": "user", "content": "the door code is 8919 ."},
        {"role": "assistant", "content": "ok , noted ."},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<bos><user> the door code is 8919 . <eos> <assistant> ok , noted . <eos> "
    ids = render_chat(tokenizer, messages)
    assert ids == tokenizer.encode(text, add_special_tokens=False)
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.convert_ids_to_tokens(ids[1:3]) == ["<user>", "the"]
    with_prompt = render_chat(tokenizer, messages, add_generation_prompt=True)
    assert with_prompt[:-1] == ids and with_prompt[-1] == tokenizer.convert_tokens_to_ids("<assistant>")
    with pytest.raises(TemplateError, match="unknown role"):
        tokenizer.apply_chat_template([{"role": "narrator", "content": "hi"}], tokenize=False)


def test_encode_episode(tokenizer):
    episode = generate_episode(CONFIG, 1)
    enc = encode_episode(tokenizer, episode)
    assert enc["memory_input_ids"] == render_chat(tokenizer, episode.memory_messages)
    assert len(enc["memory_segment_ids"]) == len(enc["memory_input_ids"])
    assert enc["memory_segment_ids"][0] == 0 and enc["memory_segment_ids"][-1] == len(episode.memory_messages) - 1
    assert enc["visible_input_ids"] == render_chat(tokenizer, episode.visible_messages, add_generation_prompt=True)
    assert tokenizer.decode(enc["answer_ids"]) == f"{episode.answer} <eos>"
    empty = encode_episode(tokenizer, make_full_context_episode(episode))
    assert empty["memory_input_ids"] == [] and empty["memory_segment_ids"] == []
