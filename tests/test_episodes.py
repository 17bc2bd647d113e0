"""Episode construction: memory/visible split, labels, segments, truncation, fallbacks, errors, Dataset.map."""

from __future__ import annotations

import pytest

from peft_deltamem.training import (
    IGNORE_INDEX,
    EpisodeConfig,
    EpisodeError,
    NoSupervisedTurnError,
    build_episodes,
    episodes_map_fn,
    tokenize_messages,
    tokenize_prompt_and_answer,
)
from tokenizers_for_tests import broken_chat_tokenizer, chat_tokenizer, plain_tokenizer, thinking_chat_tokenizer

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
TURNS = [
    {"role": "user", "content": "Remember that my cat is called Tom."},
    {"role": "assistant", "content": "Noted, your cat is Tom."},
    {"role": "user", "content": "My favourite colour is blue."},
    {"role": "assistant", "content": "Blue, got it."},
    {"role": "user", "content": "What is my cat called?"},
    {"role": "assistant", "content": "Your cat is called Tom."},
]


@pytest.fixture(scope="module")
def chat_tok():
    return chat_tokenizer()


@pytest.fixture(scope="module")
def plain_tok():
    return plain_tokenizer()


def chatml(messages, generation_prompt=False):
    """Reference rendering of tests' ChatML template."""
    text = "<s>" + "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if generation_prompt else "")


def plain(messages):
    lines = []
    for m in messages:
        eos = "</s>" if m["role"] == "assistant" else ""
        lines.append(f"{m['role'].capitalize()}: {m['content']}{eos}\n")
    return "<s>" + "".join(lines)


def answer_text(tok, episode):
    return tok.decode([t for t in episode["labels"] if t != IGNORE_INDEX])


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("visible_turns", [0, 1, 2, 3, 5, 10])
def test_memory_visible_split(chat_tok, visible_turns):
    (episode,) = build_episodes({"messages": [SYSTEM, *TURNS]}, chat_tok, EpisodeConfig(visible_turns=visible_turns))
    split = max(0, 5 - visible_turns)
    history, visible = TURNS[:split], TURNS[split:5]
    assert episode["num_memory_messages"] == len(history)
    assert chat_tok.decode(episode["memory_input_ids"]) == (chatml(history) if history else "")
    assert episode["input_ids"] == encode(chat_tok, chatml([SYSTEM, *visible, TURNS[5]]))
    assert episode["turn_index"] == 6


@pytest.mark.parametrize("make_tok", [chat_tokenizer, plain_tokenizer])
def test_labels_cover_exactly_the_answer(make_tok):
    tok = make_tok()
    (episode,) = build_episodes({"messages": [SYSTEM, *TURNS]}, tok)
    labels, ids = episode["labels"], episode["input_ids"]
    assert len(labels) == len(ids)
    first = next(i for i, t in enumerate(labels) if t != IGNORE_INDEX)
    assert all(t == IGNORE_INDEX for t in labels[:first])
    assert labels[first:] == ids[first:]  # contiguous to the end, equal to the inputs
    suffix = "<|im_end|>\n" if tok.chat_template else "</s>\n"
    prefix = "" if tok.chat_template else " "
    assert answer_text(tok, episode) == prefix + TURNS[5]["content"] + suffix


def test_answer_tokens_are_the_templates_tokens(chat_tok):
    prompt, answer = tokenize_prompt_and_answer([SYSTEM, TURNS[4]], TURNS[5], chat_tok)
    assert prompt + answer == encode(chat_tok, chatml([SYSTEM, TURNS[4], TURNS[5]]))
    assert prompt == encode(chat_tok, chatml([SYSTEM, TURNS[4]], generation_prompt=True))


@pytest.mark.parametrize("make_tok", [chat_tokenizer, plain_tokenizer])
def test_segment_ids_one_per_message_and_monotone(make_tok):
    tok = make_tok()
    (episode,) = build_episodes({"messages": [SYSTEM, *TURNS]}, tok, EpisodeConfig(visible_turns=1))
    ids, segments = episode["memory_input_ids"], episode["memory_segment_ids"]
    assert len(ids) == len(segments) and episode["memory_segments_exact"]
    assert segments == sorted(segments) and sorted(set(segments)) == list(range(4))
    render = chatml if tok.chat_template else plain
    for k in range(4):
        piece = tok.decode([t for t, s in zip(ids, segments) if s == k])
        expected = render(TURNS[: k + 1])[len(render(TURNS[:k])) :] if k else render(TURNS[:1])
        assert piece == expected  # segment 0 carries the BOS


def test_memory_left_truncation_keeps_most_recent_tokens(chat_tok):
    example = {"messages": [SYSTEM, *TURNS]}
    (full,) = build_episodes(example, chat_tok)
    budget = len(full["memory_input_ids"]) - 20
    (cut,) = build_episodes(example, chat_tok, EpisodeConfig(max_memory_tokens=budget))
    assert cut["memory_input_ids"] == full["memory_input_ids"][-budget:]
    assert cut["memory_tokens_dropped"] == 20 and full["memory_tokens_dropped"] == 0
    tail = full["memory_segment_ids"][-budget:]
    assert cut["memory_segment_ids"] == [s - tail[0] for s in tail]  # renumbered from 0, same boundaries
    (none,) = build_episodes(example, chat_tok, EpisodeConfig(max_memory_tokens=0))
    assert none["memory_input_ids"] == [] and none["memory_segment_ids"] == []


def test_supervise_all_gives_one_episode_per_assistant_turn(chat_tok):
    episodes = build_episodes({"messages": [SYSTEM, *TURNS]}, chat_tok, EpisodeConfig(supervise="all"))
    assert [e["turn_index"] for e in episodes] == [2, 4, 6]
    assert [answer_text(chat_tok, e) for e in episodes] == [TURNS[i]["content"] + "<|im_end|>\n" for i in (1, 3, 5)]
    assert [e["num_memory_messages"] for e in episodes] == [0, 2, 4]
    assert episodes[0]["memory_input_ids"] == [] and episodes[0]["memory_segment_ids"] == []
    for e in episodes:
        assert chat_tok.decode(e["input_ids"]).startswith(chatml([SYSTEM])[:-1])


def test_final_supervision_ignores_trailing_user_turn(chat_tok):
    (episode,) = build_episodes({"messages": TURNS[:5]}, chat_tok)
    assert episode["turn_index"] == 3 and answer_text(chat_tok, episode) == "Blue, got it.<|im_end|>\n"


def test_system_prompt_handling(chat_tok):
    (without,) = build_episodes({"messages": TURNS}, chat_tok)
    assert chat_tok.decode(without["input_ids"]) == chatml(TURNS[4:6])
    assert chat_tok.decode(without["memory_input_ids"]) == chatml(TURNS[:4])
    (in_memory,) = build_episodes({"messages": [SYSTEM, *TURNS]}, chat_tok, EpisodeConfig(system_in_memory=True))
    assert chat_tok.decode(in_memory["memory_input_ids"]) == chatml([SYSTEM, *TURNS[:4]])
    assert in_memory["num_memory_messages"] == 5 and max(in_memory["memory_segment_ids"]) == 4
    assert chat_tok.decode(in_memory["input_ids"]) == chatml([SYSTEM, *TURNS[4:6]])
    # no history: the system prompt alone is not written
    (short,) = build_episodes({"messages": [SYSTEM, *TURNS[:2]]}, chat_tok, EpisodeConfig(system_in_memory=True))
    assert short["memory_input_ids"] == [] and short["num_memory_messages"] == 0


def test_plain_fallback(plain_tok):
    (episode,) = build_episodes({"messages": [SYSTEM, *TURNS]}, plain_tok)
    assert plain_tok.decode(episode["memory_input_ids"]) == plain(TURNS[:4])
    assert plain_tok.decode(episode["input_ids"]) == plain([SYSTEM, *TURNS[4:6]])
    with pytest.raises(ValueError, match="no chat_template"):
        build_episodes({"messages": TURNS}, plain_tok, EpisodeConfig(chat_format="template"))


def test_plain_format_forced_on_template_tokenizer(chat_tok):
    (episode,) = build_episodes({"messages": TURNS}, chat_tok, EpisodeConfig(chat_format="plain"))
    assert chat_tok.decode(episode["input_ids"]) == plain(TURNS[4:6])


def test_visible_truncation_keeps_the_answer(chat_tok):
    long_user = {"role": "user", "content": "blue " * 200}
    messages = [SYSTEM, long_user, TURNS[5]]
    (episode,) = build_episodes({"messages": messages}, chat_tok, EpisodeConfig(max_length=32))
    assert len(episode["input_ids"]) == 32 and episode["visible_tokens_dropped"] > 0
    assert answer_text(chat_tok, episode) == TURNS[5]["content"] + "<|im_end|>\n"
    assert episode["answer_tokens_dropped"] == 0
    full = encode(chat_tok, chatml(messages))
    assert episode["input_ids"] == full[-32:]  # left-truncated
    # an answer longer than the budget: its end is cut, one prompt token stays
    long_answer = {"role": "assistant", "content": "Tom " * 100}
    (cut,) = build_episodes({"messages": [TURNS[0], long_answer]}, chat_tok, EpisodeConfig(max_length=16))
    assert len(cut["input_ids"]) == 16 and cut["labels"][0] == IGNORE_INDEX and cut["labels"][1] != IGNORE_INDEX
    assert cut["answer_tokens_dropped"] > 0


def test_context_stream(chat_tok):
    config = EpisodeConfig(context_stream=True, max_memory_tokens=8, max_length=16)
    (episode,) = build_episodes({"messages": [SYSTEM, *TURNS]}, chat_tok, config)
    full = encode(chat_tok, chatml([SYSTEM, *TURNS]))
    assert episode["context_input_ids"] == full[-24:] and episode["context_tokens_dropped"] == len(full) - 24
    n = len([t for t in episode["labels"] if t != IGNORE_INDEX])
    assert episode["context_labels"][-n:] == episode["labels"][-n:]
    (unlimited,) = build_episodes({"messages": [SYSTEM, *TURNS]}, chat_tok, EpisodeConfig(context_stream=True))
    assert unlimited["context_input_ids"] == full and unlimited["context_tokens_dropped"] == 0


def test_non_append_only_template_gives_approximate_segments():
    tok = thinking_chat_tokenizer()
    (episode,) = build_episodes({"messages": [SYSTEM, *TURNS]}, tok)
    assert not episode["memory_segments_exact"]
    # the memory stream is still the template's own rendering of the history
    assert tok.decode(episode["memory_input_ids"]) == tok.apply_chat_template(TURNS[:4], tokenize=False)
    segments = episode["memory_segment_ids"]
    assert segments == sorted(segments) and sorted(set(segments)) == list(range(4))
    for k, message in enumerate(TURNS[:4]):
        assert message["content"] in tok.decode([t for t, s in zip(episode["memory_input_ids"], segments) if s == k])
    assert answer_text(tok, episode) == "<think>\n\n</think>\n\n" + TURNS[5]["content"] + "<|im_end|>\n"


def test_template_without_prefix_property_raises():
    with pytest.raises(EpisodeError, match="prefix property") as info:
        build_episodes({"messages": TURNS}, broken_chat_tokenizer())
    assert info.value.reason == "template_prefix"


def test_tokenize_messages_helpers(chat_tok):
    assert tokenize_messages([], chat_tok) == ([], [], True)
    ids, segments, exact = tokenize_messages(TURNS[:2], chat_tok)
    assert chat_tok.decode(ids) == chatml(TURNS[:2]) and exact and segments[0] == 0 and segments[-1] == 1


@pytest.mark.parametrize(
    ("messages", "reason", "match"),
    [
        ("hello", "not_a_list", "must be a list"),
        ([], "no_messages", "empty"),
        (["hi"], "not_a_message", "message 0 is a str"),
        ([{"content": "hi"}], "missing_role", "message 0 has no 'role'"),
        ([{"role": "user"}], "missing_content", "message 0 .* has no 'content'"),
        ([{"role": "user", "content": None}], "missing_content", "no 'content'"),
        ([{"role": "tool", "content": "x"}], "unknown_role", "unknown role 'tool'"),
        ([{"role": "user", "content": ["a", "b"]}], "non_string_content", "list content"),
        ([TURNS[0], SYSTEM, TURNS[1]], "misplaced_system", "message 1 is a system message"),
        ([SYSTEM, TURNS[0]], "no_supervised_turn", "no assistant message"),
    ],
)
def test_malformed_examples_raise_clear_errors(chat_tok, messages, reason, match):
    with pytest.raises(ValueError, match=match) as info:
        build_episodes({"id": "ex-7", "messages": messages}, chat_tok, EpisodeConfig(id_column="id"))
    assert isinstance(info.value, EpisodeError) and info.value.reason == reason
    assert "example 'ex-7'" in str(info.value)
    assert isinstance(info.value, NoSupervisedTurnError) == (reason == "no_supervised_turn")


def test_missing_messages_column(chat_tok):
    with pytest.raises(EpisodeError, match="no 'messages' column"):
        build_episodes({"conversation": TURNS}, chat_tok)


def test_config_validation():
    for bad in (dict(visible_turns=-1), dict(max_length=1), dict(supervise="last"), dict(on_error="skip")):
        with pytest.raises(ValueError):
            EpisodeConfig(**bad)


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_length", "512"), ("max_memory_tokens", 2.5), ("max_context_length", 64.0), ("visible_turns", True)],
)
def test_config_refuses_non_integer_sizes_by_name(field, value):
    with pytest.raises(ValueError, match=f"{field} must be an int .*got {value!r}"):
        EpisodeConfig(**{field: value})


def test_empty_assistant_answer_is_named_as_such(chat_tok):
    messages = [TURNS[0], {"role": "assistant", "content": ""}]
    with pytest.raises(EpisodeError, match="message 1 is an assistant message with empty content") as error:
        build_episodes({"messages": messages}, chat_tok)
    assert error.value.reason == "empty_answer"


def _dataset_rows():
    return [
        {"id": "a", "messages": [TURNS[0], TURNS[1]]},  # no history: empty memory in the first batch
        {"id": "b", "messages": [SYSTEM, *TURNS]},
        {"id": "c", "messages": [SYSTEM, TURNS[0]]},  # no assistant turn
        {"id": "d", "messages": [TURNS[0], {"role": "tool", "content": "x"}, TURNS[1]]},  # malformed
        {"id": "e", "messages": [{"role": "user", "content": "hi " * 100}, TURNS[1]]},  # long turn
    ]


def test_dataset_map_with_counters(chat_tok):
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_list(_dataset_rows())
    config = EpisodeConfig(supervise="all", on_error="count", max_length=96, id_column="id")
    mapper = episodes_map_fn(chat_tok, config)
    out = dataset.map(
        mapper,
        batched=True,
        batch_size=1,
        remove_columns=dataset.column_names,
        features=mapper.features,
        load_from_cache_file=False,
    )
    assert out["example_id"] == ["a", "b", "b", "b", "e"]
    assert out["turn_index"] == [1, 2, 4, 6, 1]
    assert out[0]["memory_input_ids"] == [] and len(out[3]["memory_input_ids"]) > 0
    stats = mapper.stats
    assert (stats.examples_seen, stats.examples_used, stats.episodes) == (5, 3, 5)
    assert stats.skipped_no_supervised_turn == 1 and stats.errors == {"unknown_role": 1}
    assert stats.examples_skipped == 2 and stats.visible_truncated == 1 and stats.memory_truncated == 0
    assert "5 examples -> 5 episodes" in stats.report()
    with pytest.raises(EpisodeError, match=r"example 3 \(id='d'\): message 1 has unknown role"):
        dataset.map(
            episodes_map_fn(chat_tok, EpisodeConfig(id_column="id")),
            batched=True,
            remove_columns=dataset.column_names,
            load_from_cache_file=False,
        )
    assert stats.as_dict()["examples_skipped"] == 2


def test_dataset_map_raises_on_malformed_by_default(chat_tok):
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_list(_dataset_rows())
    mapper = episodes_map_fn(chat_tok)
    with pytest.raises(EpisodeError, match="example 3: message 1 has unknown role 'tool'"):
        dataset.map(mapper, batched=True, remove_columns=dataset.column_names, load_from_cache_file=False)


class _SlowTokenizer:
    """Proxy without offsets support, to exercise the slow-tokenizer path."""

    is_fast = False

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, text, **kwargs):
        kwargs.pop("return_offsets_mapping", None)
        return self._tok(text, **kwargs)


def test_slow_tokenizer_tokenises_message_by_message(chat_tok):
    (fast,) = build_episodes({"messages": [SYSTEM, *TURNS]}, chat_tok)
    (slow,) = build_episodes({"messages": [SYSTEM, *TURNS]}, _SlowTokenizer(chat_tok))
    assert chat_tok.decode(slow["memory_input_ids"]) == chatml(TURNS[:4])
    assert slow["memory_segment_ids"] == fast["memory_segment_ids"] and not slow["memory_segments_exact"]
    assert slow["input_ids"] == fast["input_ids"] and slow["labels"] == fast["labels"]


@pytest.mark.parametrize("which", ["append_only", "thinking"])
def test_tokenize_messages_from_a_first_message_gives_the_same_tokens_and_later_segments(chat_tok, which):
    """A chat session needs only its new messages' segments: ``first=k`` renders only the prefixes ending at them
    (linear in the history, not quadratic), and gives the whole call's tokens and its segments from k on."""
    tok = chat_tok if which == "append_only" else thinking_chat_tokenizer()
    messages = [SYSTEM, *TURNS, *TURNS, *TURNS]
    ids, segments, _ = tokenize_messages(messages, tok)
    for first in (1, 4, len(messages) - 1):
        part_ids, part_segments, _ = tokenize_messages(messages, tok, first=first)
        assert part_ids == ids
        later = [(i, s) for i, s in enumerate(segments) if s >= first]
        assert [(i, s) for i, s in enumerate(part_segments) if s >= first] == later
