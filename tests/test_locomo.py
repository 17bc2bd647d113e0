"""LoCoMo loader, episodes and scorer, on the real data file and on hand-worked examples."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from benchmarks.locomo import (
    ADVERSARIAL_ANSWER,
    BM25TurnRetriever,
    LocomoEpisode,
    LocomoFormatError,
    build_episodes,
    conversation_to_messages,
    default_locomo_path,
    gold_answer,
    load_locomo,
    multi_hop_f1,
    normalize_answer,
    score_answer,
    score_predictions,
    segment_ids,
    token_f1,
)
from conftest import require_locomo_file

LOCOMO_PATH = Path(__file__).resolve().parents[2] / "shared/data/locomo10.json"

# Counted on shared/data/locomo10.json (snap-research/locomo data/locomo10.json).
SESSIONS = {
    "conv-26": 19,
    "conv-30": 19,
    "conv-41": 32,
    "conv-42": 29,
    "conv-43": 29,
    "conv-44": 28,
    "conv-47": 31,
    "conv-48": 30,
    "conv-49": 25,
    "conv-50": 30,
}
TOTAL_SESSIONS = 272
TOTAL_TURNS = 5882
TOTAL_QUESTIONS = 1986
QUESTIONS_PER_CATEGORY = {1: 282, 2: 321, 3: 96, 4: 841, 5: 446}


@pytest.fixture(scope="module")
def convs():
    return load_locomo(require_locomo_file())


# --- the real file ---------------------------------------------------------------------------------------------------


def test_default_path_is_the_shared_data_file():
    assert default_locomo_path() == LOCOMO_PATH


def test_counts(convs):
    assert len(convs) == 10
    assert {c.sample_id: len(c.sessions) for c in convs} == SESSIONS
    assert sum(len(c.sessions) for c in convs) == TOTAL_SESSIONS
    assert sum(len(c.turns) for c in convs) == TOTAL_TURNS
    questions = [q for c in convs for q in c.questions]
    assert len(questions) == TOTAL_QUESTIONS
    assert Counter(q.category for q in questions) == QUESTIONS_PER_CATEGORY


def test_structure(convs):
    for conv in convs:
        assert [s.index for s in conv.sessions] == list(range(1, len(conv.sessions) + 1))
        assert all(s.turns and s.date_time for s in conv.sessions)
        for turn in conv.turns:
            assert turn.speaker in (conv.speaker_a, conv.speaker_b)
            assert turn.dia_id.startswith(f"D{turn.session}:")
        ids = [t.dia_id for t in conv.turns]
        assert len(ids) == len(set(ids))
        qids = [q.qid for q in conv.questions]
        assert len(qids) == len(set(qids))
        for q in conv.questions:
            assert q.question and isinstance(q.evidence, tuple)
            if q.category == 5:
                assert q.adversarial_answer is not None or q.answer is not None
            else:
                assert isinstance(q.answer, str) and q.answer.strip()
                assert normalize_answer(q.gold)  # every gold answer survives normalisation
    # Integers in the file (e.g. a year) become strings.
    assert convs[0].questions[1].answer == "2022"


def test_gold_answers_score_one(convs):
    questions = [q for c in convs for q in c.questions if q.category != 5]
    result = score_predictions(questions, {q.qid: q.gold for q in questions})
    assert result["count"] == len(questions) == 1540
    assert result["f1"] == pytest.approx(1.0)


def test_messages_and_segments(convs):
    conv = convs[0]
    messages = conversation_to_messages(conv)
    assert len(messages) == len(conv.turns)
    first = conv.sessions[0]
    assert messages[0]["content"] == f"[{first.date_time}] {first.turns[0].speaker}: {first.turns[0].text}"
    assert messages[0]["role"] == "user" and messages[0]["session"] == 1
    with_photo = next(i for i, t in enumerate(conv.turns) if t.blip_caption)
    assert messages[with_photo]["content"].endswith(f"(shares a photo: {conv.turns[with_photo].blip_caption})")
    assert segment_ids(messages) == list(range(len(messages)))
    per_session = segment_ids(messages, per="session")
    assert per_session[0] == 0 and per_session[-1] == len(conv.sessions) - 1
    assert all(b - a in (0, 1) for a, b in zip(per_session, per_session[1:]))

    roles = conversation_to_messages(conv, speaker_roles={conv.speaker_b: "assistant"}, date="first_turn")
    assert {m["role"] for m in roles} == {"user", "assistant"}
    assert roles[0]["content"].startswith("[") and not roles[1]["content"].startswith("[")


def test_build_episodes_each_mode(convs):
    conv = convs[0]
    n_turns = len(conv.turns)
    n_questions = sum(q.category in (1, 2, 3, 4) for q in conv.questions)

    full = build_episodes(conv, "full")
    assert len(full) == n_questions
    ep = full[0]
    assert ep.memory_messages == [] and len(ep.visible_messages) == n_turns + 1
    assert ep.question in ep.visible_messages[-1]["content"]
    assert ep.answer == conv.questions[0].gold and ep.qid == conv.questions[0].qid

    truncated = build_episodes(conv, "truncated", max_visible_turns=20)
    assert truncated[0].memory_messages == [] and len(truncated[0].visible_messages) == 21
    assert truncated[0].visible_messages[:-1] == full[0].visible_messages[n_turns - 20 : n_turns]

    def words(text: str) -> int:
        return len(text.split())

    by_tokens = build_episodes(conv, "truncated", max_visible_tokens=300, count_tokens=words)[0]
    context = by_tokens.visible_messages[:-1]
    assert 0 < sum(words(m["content"]) for m in context) <= 300
    assert context[-1]["dia_id"] == conv.turns[-1].dia_id

    memory = build_episodes(conv, "memory")[0]
    assert len(memory.memory_messages) == n_turns and len(memory.visible_messages) == 1
    split = build_episodes(conv, "memory", max_visible_turns=10)[0]
    assert len(split.memory_messages) == n_turns - 10 and len(split.visible_messages) == 11

    rag = build_episodes(conv, "rag", top_k=5)
    assert all(len(e.retrieved_dia_ids) <= 5 and len(e.visible_messages) == len(e.retrieved_dia_ids) + 1 for e in rag)
    order = {t.dia_id: i for i, t in enumerate(conv.turns)}
    assert all([order[d] for d in e.retrieved_dia_ids] == sorted(order[d] for d in e.retrieved_dia_ids) for e in rag)

    with_adversarial = build_episodes(conv, "full", categories=(5,))
    assert len(with_adversarial) == 47 and all(e.answer == ADVERSARIAL_ANSWER for e in with_adversarial)


def test_build_episodes_errors(convs):
    with pytest.raises(ValueError, match="mode"):
        build_episodes(convs[0], "everything")
    with pytest.raises(ValueError, match="max_visible_turns"):
        build_episodes(convs[0], "truncated")
    with pytest.raises(ValueError, match="count_tokens"):
        build_episodes(convs[0], "truncated", max_visible_tokens=100)
    with pytest.raises(ValueError, match="categories"):
        build_episodes(convs[0], "full", categories=(7,))


def test_bm25_finds_rare_words(convs):
    conv = convs[0]
    retriever = BM25TurnRetriever(conv.turns)
    for word in ("clarinet", "horseback"):
        (only,) = [i for i, t in enumerate(conv.turns) if word in t.text.lower()]  # occurs in exactly one turn
        assert retriever.retrieve(f"Who mentioned the {word}?", k=1) == [only]
    hits = retriever.retrieve("When did Caroline go to the LGBTQ support group?", k=3)
    assert conv.turns[hits[0]].dia_id == "D1:3"  # the question's evidence turn
    assert all({"lgbtq", "support", "group"} & set(conv.turns[i].text.lower().split()) for i in hits)
    assert retriever.retrieve("what did the", k=3) == []  # only stopwords: nothing retrieved
    assert retriever.retrieve("zzzqx", k=3) == []  # unknown word: nothing scores above zero
    assert len(retriever.retrieve("Caroline", k=10_000)) <= len(conv.turns)


def test_rag_retrieves_evidence_often(convs):
    episodes = build_episodes(convs[0], "rag", top_k=10)
    recall = sum(any(d in e.retrieved_dia_ids for d in e.evidence) for e in episodes) / len(episodes)
    assert recall > 0.5  # 0.61 at the time of writing; chance is about 10/419


# --- scorer on hand-worked examples ----------------------------------------------------------------------------------


def test_normalize_answer():
    assert normalize_answer("The Cat, and a Dog!") == "cat dog"
    assert normalize_answer("  An   apple ") == "apple"
    assert normalize_answer("Charlotte’s Web") == normalize_answer("Charlotte's Web") == "charlottes web"
    assert normalize_answer("theatre andes") == "theatre andes"  # only whole words are dropped
    assert normalize_answer("") == ""


def test_token_f1():
    assert token_f1("7 May 2023", "7 May 2023") == 1.0
    assert token_f1("the Pottery!", "pottery") == 1.0
    # prediction {she, went, to, paris, in, may} vs gold {paris, in, may}: 3 common tokens,
    # precision 3/6, recall 3/3, F1 = 2 * 0.5 * 1 / 1.5 = 2/3.
    assert token_f1("She went to Paris in May", "Paris in May") == pytest.approx(2 / 3)
    # "a red car" -> {red, car}; "red bike" -> {red, bike}: 1 common, P = R = 1/2, F1 = 1/2.
    assert token_f1("a red car", "red bike") == pytest.approx(0.5)
    # Multiplicity counts: {x, x, y} vs {x}: 1 common, P 1/3, R 1, F1 = 2 * (1/3) / (4/3) = 1/2.
    assert token_f1("x x y", "x") == pytest.approx(0.5)
    assert token_f1("", "pottery") == 0.0
    assert token_f1("the", "pottery") == 0.0
    assert token_f1("painting", "paintings", stemmer=lambda w: w.rstrip("s")) == 1.0


def test_multi_hop_f1():
    gold = "pottery, camping, painting"
    assert multi_hop_f1("camping, painting, pottery", gold) == 1.0
    # Gold parts: pottery -> 1 (exact part), camping -> 0, painting -> best part "painting and hiking" = {painting,
    # hiking} vs {painting}: P 1/2, R 1, F1 2/3. Mean = (1 + 0 + 2/3) / 3 = 5/9.
    assert multi_hop_f1("pottery, painting and hiking", gold) == pytest.approx(5 / 9)
    # A one-part prediction with all words: each gold part vs {pottery, camping, painting}: F1 = 2*(1/3)/(4/3) = 1/2.
    assert multi_hop_f1("pottery camping painting", gold) == pytest.approx(0.5)
    assert multi_hop_f1("", gold) == 0.0
    assert score_answer("camping, painting, pottery", gold, category=1) == 1.0
    assert score_answer("camping, painting, pottery", gold, category=4) == 1.0  # commas are punctuation there


def test_category_3_and_5_gold():
    assert gold_answer("Likely no; she wants to be a counselor", 3) == "Likely no"
    assert score_answer("likely no", gold_answer("Likely no; she wants to be a counselor", 3), 3) == 1.0
    assert gold_answer("Yes; it's classical", 4) == "Yes; it's classical"  # only category 3 is cut
    assert gold_answer(None, 5) == ADVERSARIAL_ANSWER
    assert score_answer("This is not mentioned in the conversation.", ADVERSARIAL_ANSWER, 5) == 1.0
    assert score_answer("No information available", ADVERSARIAL_ANSWER, 5) == 1.0
    assert score_answer("Yes", ADVERSARIAL_ANSWER, 5) == 0.0
    with pytest.raises(ValueError, match="no gold answer"):
        gold_answer(None, 2)


def test_score_predictions_aggregates():
    def ep(qid: str, category: int, answer: str) -> LocomoEpisode:
        return LocomoEpisode(qid, "s", "full", category, "q?", answer, [], [])

    episodes = [ep("a", 1, "x, y"), ep("b", 2, "7 May 2023"), ep("c", 2, "June"), ep("d", 5, ADVERSARIAL_ANSWER)]
    preds = {"a": "x", "b": "7 May 2023", "c": "", "d": "not mentioned"}
    result = score_predictions(episodes, preds)
    # a: gold parts x -> 1, y -> 0: 0.5; b: 1.0; c: 0.0; d skipped (category 5 not in the default categories).
    assert result["count"] == 3
    assert result["f1"] == pytest.approx(1.5 / 3)
    assert result["per_category"][1] == {"name": "multi-hop", "f1": 0.5, "count": 1}
    assert result["per_category"][2]["f1"] == pytest.approx(0.5) and result["per_category"][2]["count"] == 2
    assert result["per_category"][3]["count"] == 0 and result["per_category"][3]["f1"] == 0.0
    assert result["per_question"] == {"a": 0.5, "b": 1.0, "c": 0.0}

    with_adv = score_predictions(episodes, [preds[e.qid] for e in episodes], categories=(1, 2, 3, 4, 5))
    assert with_adv["count"] == 4 and with_adv["per_category"][5]["f1"] == 1.0

    with pytest.raises(KeyError, match="no prediction"):
        score_predictions(episodes, {"a": "x"})
    with pytest.raises(ValueError, match="predictions for"):
        score_predictions(episodes, ["x"])


# --- malformed input -------------------------------------------------------------------------------------------------


def _write(tmp_path: Path, data) -> Path:
    path = tmp_path / "locomo.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _sample(**overrides):
    sample = {
        "sample_id": "conv-x",
        "conversation": {
            "speaker_a": "Ann",
            "speaker_b": "Bob",
            "session_1_date_time": "1:00 pm on 1 May, 2023",
            "session_1": [
                {"speaker": "Ann", "dia_id": "D1:1", "text": "I adopted a cat named Miso."},
                {"speaker": "Bob", "dia_id": "D1:2", "text": "Cute!", "blip_caption": "a photo of a cat"},
            ],
        },
        "qa": [{"question": "What is the cat's name?", "answer": "Miso", "evidence": ["D1:1"], "category": 4}],
    }
    sample.update(overrides)
    return sample


def test_small_valid_file(tmp_path):
    (conv,) = load_locomo(_write(tmp_path, [_sample()]))
    assert conv.sample_id == "conv-x" and len(conv.turns) == 2
    assert conv.turns[1].blip_caption == "a photo of a cat"
    (episode,) = build_episodes(conv, "rag", top_k=1)
    assert episode.retrieved_dia_ids == ("D1:1",)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="locomo10.json"):
        load_locomo(tmp_path / "nope.json")


def test_corrupt_json(tmp_path):
    with pytest.raises(LocomoFormatError, match="not valid JSON"):
        load_locomo(_write(tmp_path, '[{"sample_id": "conv-x", "qa": ['))
    with pytest.raises(LocomoFormatError, match="expected a JSON list"):
        load_locomo(_write(tmp_path, {"sample_id": "conv-x"}))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.pop("qa"), r"sample 'conv-x': missing field 'qa'"),
        (lambda s: s["conversation"].pop("speaker_b"), r"conv-x'\.conversation: missing field 'speaker_b'"),
        (lambda s: s["conversation"].pop("session_1_date_time"), r"missing field 'session_1_date_time'"),
        (lambda s: s["conversation"]["session_1"][1].pop("text"), r"session_1\[1\]: missing field 'text'"),
        (lambda s: s["qa"][0].pop("answer"), r"conv-x'\.qa\[0\]: missing field 'answer'"),
        (lambda s: s["qa"][0].update(category="4"), r"qa\[0\]: field 'category' should be int, got str"),
        (lambda s: s["qa"][0].update(category=9), r"qa\[0\]: field 'category' should be 1-5"),
        (lambda s: s["qa"][0].update(evidence="D1:1"), r"field 'evidence' should be list"),
        (lambda s: s["qa"][0].update(answer=None), r"field 'answer' should be str or int or float, got NoneType"),
        (lambda s: s.pop("sample_id"), r"sample #0: missing field 'sample_id'"),
    ],
)
def test_malformed_items(tmp_path, mutate, message):
    sample = _sample()
    mutate(sample)
    with pytest.raises(LocomoFormatError, match=message):
        load_locomo(_write(tmp_path, [sample]))


def test_adversarial_without_answer_is_valid(tmp_path):
    sample = _sample(qa=[{"question": "Is Miso a dog?", "adversarial_answer": "Yes", "evidence": [], "category": 5}])
    (conv,) = load_locomo(_write(tmp_path, [sample]))
    assert conv.questions[0].answer is None and conv.questions[0].adversarial_answer == "Yes"
    assert build_episodes(conv, "full") == []
