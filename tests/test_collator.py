"""DeltaMemDataCollator: padding conventions, empty histories, context ablation, determinism."""

from __future__ import annotations

import pytest
import torch

from peft_deltamem.training import (
    ABLATION_MODES,
    IGNORE_INDEX,
    DeltaMemDataCollator,
    EpisodeConfig,
    build_episodes,
    validate_ablation_probs,
)
from tokenizers_for_tests import chat_tokenizer

PAD = 0


def episodes():
    return [
        {
            "memory_input_ids": [5, 6, 7, 8, 9],
            "memory_segment_ids": [0, 0, 1, 1, 2],
            "input_ids": [10, 11, 12, 13],
            "labels": [IGNORE_INDEX, IGNORE_INDEX, 12, 13],
            "context_input_ids": [10, 5, 6, 7, 8, 9, 11, 12, 13],
            "context_labels": [IGNORE_INDEX] * 7 + [12, 13],
        },
        {
            "memory_input_ids": [],
            "memory_segment_ids": [],
            "input_ids": [20, 21, 22],
            "labels": [IGNORE_INDEX, 21, 22],
            "context_input_ids": [20, 21, 22],
            "context_labels": [IGNORE_INDEX, 21, 22],
        },
        {
            "memory_input_ids": [30, 31],
            "memory_segment_ids": [0, 1],
            "input_ids": [40, 41, 42, 43, 44, 45],
            "labels": [IGNORE_INDEX] * 4 + [44, 45],
            "context_input_ids": [40, 30, 31, 41, 42, 43, 44, 45],
            "context_labels": [IGNORE_INDEX] * 6 + [44, 45],
        },
    ]


def test_shapes_padding_and_masks():
    batch = DeltaMemDataCollator(pad_token_id=PAD)(episodes())
    assert set(batch) == {
        "input_ids",
        "attention_mask",
        "labels",
        "memory_input_ids",
        "memory_attention_mask",
        "memory_segment_ids",
        "ablation_mode",
    }
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, 6)
    assert batch["memory_input_ids"].shape == batch["memory_segment_ids"].shape == (3, 5)
    assert batch["input_ids"][0].tolist() == [10, 11, 12, 13, PAD, PAD]  # right padding
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 1, 0, 0]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 12, 13, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["memory_input_ids"][2].tolist() == [30, 31, PAD, PAD, PAD]
    assert batch["memory_attention_mask"][2].tolist() == [1, 1, 0, 0, 0]
    assert batch["memory_segment_ids"][2].tolist() == [0, 1, -1, -1, -1]
    assert batch["ablation_mode"].tolist() == [0, 0, 0]
    # the row without history is all padding
    assert batch["memory_attention_mask"][1].sum() == 0 and (batch["memory_segment_ids"][1] == -1).all()
    assert (batch["memory_input_ids"][1] == PAD).all()
    assert ((batch["labels"] != IGNORE_INDEX) <= (batch["attention_mask"] == 1)).all()
    assert "ablation_mode" not in DeltaMemDataCollator(pad_token_id=PAD, return_ablation_mode=False)(episodes())


def test_left_padding_and_multiple_of():
    collator = DeltaMemDataCollator(
        pad_token_id=PAD, pad_to_multiple_of=4, padding_side="left", memory_padding_side="left"
    )
    batch = collator(episodes())
    assert batch["input_ids"].shape == (3, 8) and batch["memory_input_ids"].shape == (3, 8)
    assert batch["input_ids"][1].tolist() == [PAD] * 5 + [20, 21, 22]
    assert batch["labels"][1].tolist() == [IGNORE_INDEX] * 6 + [21, 22]
    assert batch["memory_segment_ids"][0].tolist() == [-1, -1, -1, 0, 0, 1, 1, 2]
    assert batch["memory_attention_mask"][0].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]


def test_every_row_without_history_gives_width_zero_memory():
    rows = [episodes()[1], episodes()[1]]
    batch = DeltaMemDataCollator(pad_token_id=PAD, pad_to_multiple_of=8)(rows)
    for key in ("memory_input_ids", "memory_attention_mask", "memory_segment_ids"):
        assert batch[key].shape == (2, 0) and batch[key].dtype == torch.long
    assert batch["input_ids"].shape == (2, 8)


def test_pad_id_from_tokenizer_and_tensor_inputs():
    tok = chat_tokenizer()
    rows = [{k: torch.tensor(v) for k, v in e.items()} for e in episodes()]
    batch = DeltaMemDataCollator(tok)(rows)
    assert batch["input_ids"][1, -1].item() == tok.pad_token_id
    with pytest.raises(ValueError, match="no pad id"):
        DeltaMemDataCollator(None)


def test_ablation_memory_only_is_the_default():
    default = DeltaMemDataCollator(pad_token_id=PAD)(episodes())
    explicit = DeltaMemDataCollator(pad_token_id=PAD, ablation_probs={"memory_only": 1.0}, seed=3)(episodes())
    assert all(torch.equal(default[k], explicit[k]) for k in default)


def test_ablation_no_memory_empties_the_memory():
    batch = DeltaMemDataCollator(pad_token_id=PAD, ablation_probs={"no_memory": 1.0})(episodes())
    assert batch["ablation_mode"].tolist() == [ABLATION_MODES.index("no_memory")] * 3
    assert batch["memory_input_ids"].shape == (3, 0)
    assert torch.equal(batch["input_ids"], DeltaMemDataCollator(pad_token_id=PAD)(episodes())["input_ids"])


def test_ablation_memory_and_context_reads_the_context_stream():
    batch = DeltaMemDataCollator(pad_token_id=PAD, ablation_probs={"memory_and_context": 1.0})(episodes())
    assert batch["ablation_mode"].tolist() == [1, 1, 1]
    assert batch["input_ids"][0].tolist() == episodes()[0]["context_input_ids"]
    assert batch["labels"][2].tolist()[:8] == episodes()[2]["context_labels"]
    assert batch["memory_input_ids"][0].tolist() == [5, 6, 7, 8, 9]  # the memory is kept


def test_memory_and_context_truncation_never_cuts_the_answer():
    collator = DeltaMemDataCollator(pad_token_id=PAD, ablation_probs={"memory_and_context": 1.0}, max_context_length=4)
    batch = collator(episodes())
    assert batch["input_ids"][0].tolist() == [8, 9, 11, 12, 13][-4:]  # left-truncated
    assert batch["labels"][0].tolist()[-2:] == [12, 13]
    long_answer = dict(episodes()[0], context_input_ids=[1, 2, 3, 4, 5], context_labels=[IGNORE_INDEX, 2, 3, 4, 5])
    batch = DeltaMemDataCollator(pad_token_id=PAD, ablation_probs={"memory_and_context": 1.0}, max_context_length=2)(
        [long_answer]
    )
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, 2, 3, 4, 5]


def test_memory_and_context_needs_context_streams():
    rows = [{k: v for k, v in e.items() if not k.startswith("context_")} for e in episodes()]
    collator = DeltaMemDataCollator(pad_token_id=PAD, ablation_probs={"memory_and_context": 1.0})
    with pytest.raises(ValueError, match="context_stream=True"):
        collator(rows)


def test_mixed_ablation_is_deterministic_with_a_seed():
    probs = {"memory_only": 0.5, "memory_and_context": 0.2, "no_memory": 0.3}
    runs = []
    for _ in range(2):
        collator = DeltaMemDataCollator(pad_token_id=PAD, ablation_probs=probs, seed=1234)
        runs.append([collator(episodes() * 4) for _ in range(3)])
    for a, b in zip(*runs):
        assert all(torch.equal(a[k], b[k]) for k in a)
    other = DeltaMemDataCollator(pad_token_id=PAD, ablation_probs=probs, seed=99)
    modes = torch.cat([r["ablation_mode"] for r in runs[0]])
    assert not torch.equal(modes, torch.cat([other(episodes() * 4)["ablation_mode"] for _ in range(3)]))
    # frequencies follow the probabilities; rows follow their mode
    many = DeltaMemDataCollator(pad_token_id=PAD, ablation_probs=probs, seed=0).sample_modes(4000)
    freq = [many.count(i) / len(many) for i in range(3)]
    assert freq == pytest.approx([0.5, 0.2, 0.3], abs=0.03)
    batch = runs[0][0]
    for row, mode in enumerate(batch["ablation_mode"].tolist()):
        has_memory = batch["memory_attention_mask"][row].sum().item() > 0
        assert has_memory == (mode != 2 and row % 3 != 1)


@pytest.mark.parametrize(
    ("probs", "match"),
    [
        ({"memory_only": 0.5}, "sum to 1"),
        ({"memory_only": 0.7, "no_memory": 0.7}, "sum to 1"),
        ({"memory_only": 1.5, "no_memory": -0.5}, ">= 0"),
        ({"memory_only": float("nan")}, "finite"),
        ({"memory_only": "1"}, "finite number"),
        ({"drop_everything": 1.0}, "unknown ablation modes"),
        ([("memory_only", 1.0)], "mapping"),
    ],
)
def test_invalid_ablation_probs(probs, match):
    with pytest.raises(ValueError, match=match):
        validate_ablation_probs(probs)
    with pytest.raises(ValueError, match=match):
        DeltaMemDataCollator(pad_token_id=PAD, ablation_probs=probs)


def test_other_invalid_arguments():
    with pytest.raises(ValueError, match="padding_side"):
        DeltaMemDataCollator(pad_token_id=PAD, padding_side="middle")
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        DeltaMemDataCollator(pad_token_id=PAD, pad_to_multiple_of=0)
    with pytest.raises(ValueError, match="empty"):
        DeltaMemDataCollator(pad_token_id=PAD)([])
    bad = dict(episodes()[0], labels=[1])
    with pytest.raises(ValueError, match="differ in length"):
        DeltaMemDataCollator(pad_token_id=PAD)([bad])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pad_to_multiple_of": 2.5}, "pad_to_multiple_of must be an integer >= 1 or None, got 2.5"),
        ({"pad_to_multiple_of": True}, "pad_to_multiple_of must be an integer >= 1 or None, got True"),
        ({"max_context_length": "512"}, "max_context_length must be an integer >= 2 or None, got '512'"),
    ],
)
def test_non_integer_sizes_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeltaMemDataCollator(pad_token_id=PAD, **kwargs)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("input_ids", ["10", "11", "12", "13"], r"input_ids must hold integer token ids, found '10' \(str\)"),
        ("memory_input_ids", [5, 6.0, 7, 8, 9], r"episode 0: memory_input_ids must hold integer token ids, found 6.0"),
        ("labels", [IGNORE_INDEX, None, 12, 13], "episode 0: labels must hold integer token ids, found None"),
    ],
)
def test_non_integer_token_ids_are_refused_by_name(key, value, match):
    with pytest.raises(ValueError, match=match):
        DeltaMemDataCollator(pad_token_id=PAD)([dict(episodes()[0], **{key: value})])


def test_episode_without_supervised_tokens_is_refused_not_trained_on_as_nan():
    unsupervised = dict(episodes()[1], labels=[IGNORE_INDEX] * 3)
    with pytest.raises(ValueError, match="episode 1 has no supervised token"):
        DeltaMemDataCollator(pad_token_id=PAD)([episodes()[0], unsupervised])


def test_end_to_end_with_real_episodes_and_dataloader():
    tok = chat_tokenizer()
    messages = [
        {"role": "user", "content": "My cat is called Tom."},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "What is my cat called?"},
        {"role": "assistant", "content": "Tom."},
    ]
    rows = build_episodes({"messages": messages}, tok, EpisodeConfig(supervise="all", context_stream=True))
    collator = DeltaMemDataCollator(tok, ablation_probs={"memory_only": 0.5, "memory_and_context": 0.5}, seed=0)
    loader = torch.utils.data.DataLoader(rows, batch_size=2, collate_fn=collator)
    (batch,) = list(loader)
    assert batch["memory_attention_mask"].sum(1).tolist() == [0, len(rows[1]["memory_input_ids"])]
    for row, mode in enumerate(batch["ablation_mode"].tolist()):
        labels = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX]
        assert tok.decode(labels) == messages[2 * row + 1]["content"] + "<|im_end|>\n"
        key = "context_input_ids" if mode == 1 else "input_ids"
        assert batch["input_ids"][row, : len(rows[row][key])].tolist() == rows[row][key]


def test_dataloader_workers_get_distinct_reproducible_streams():
    probs = {"memory_only": 0.5, "no_memory": 0.5}

    def modes():
        collator = DeltaMemDataCollator(pad_token_id=PAD, ablation_probs=probs, seed=7)
        loader = torch.utils.data.DataLoader(episodes() * 16, batch_size=24, collate_fn=collator, num_workers=2)
        return [batch["ablation_mode"].tolist() for batch in loader]

    first = modes()
    assert first == modes() and len(first) == 2 and first[0] != first[1]
