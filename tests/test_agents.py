"""Sessions and the chat engine: incremental = whole, resume = uninterrupted, batches = alone, no interleaving."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest
import torch
from peft import get_peft_model

from peft_deltamem import DeltaMemConfig, DeltaMemory
from peft_deltamem.agents.engine import ChatEngine, GenerationParams, Limits
from peft_deltamem.agents.session import (
    RequestTooLarge,
    SessionPolicy,
    follow,
    plan_turn,
    turn_ends,
    written_until,
)
from peft_deltamem.agents.store import DirectoryStore, InvalidSessionId, SessionBusy, SessionRecord
from peft_deltamem.recall_task import build_tokenizer
from peft_deltamem.tiny_models import tiny_model

USER_TURNS = [
    "alice likes teal .",
    "we talked about trains",
    "bob likes gold .",
    "then music and lunch",
    "later books again",
    "alice likes ?",
]
PARAMS = GenerationParams(max_new_tokens=3)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def make_model(tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    base = tiny_model("llama", seed=seed, vocab_size=len(tokenizer))
    base.generation_config.eos_token_id = tokenizer.eos_token_id
    return get_peft_model(base, DeltaMemConfig(task_type="CAUSAL_LM", init_weights=False)).eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_model(tokenizer)


def engine_for(model, tokenizer, root, **kwargs) -> ChatEngine:
    kwargs.setdefault("policy", SessionPolicy(window=2))
    return ChatEngine(model, tokenizer, DirectoryStore(root), **kwargs)


def run_turns(engine: ChatEngine, session: str, turns=USER_TURNS) -> list[str]:
    return [engine.chat(session, [{"role": "user", "content": t}], PARAMS).reply for t in turns]


def memory_of(engine: ChatEngine, session: str) -> dict[str, torch.Tensor]:
    return DeltaMemory.from_bytes(engine.store.load(session).memory).states


# --------------------------------------------------------------------------------------------- planning


def test_plan_writes_each_message_once_when_it_leaves_the_window(tokenizer):
    policy = SessionPolicy(window=2)
    log = [{"role": "user", "content": "alice likes teal ."}, {"role": "assistant", "content": "ok"}]
    plan = plan_turn(log, 0, [{"role": "user", "content": "bob likes ?"}], tokenizer, policy)
    assert plan.processed == 1 and len(plan.writes) == 1  # the first message left the two-message window
    assert tokenizer.decode(plan.writes[0]) == tokenizer.decode(tokenizer("<bos> alice likes teal .").input_ids)
    again = plan_turn(plan.messages + [{"role": "assistant", "content": "red"}], plan.processed, [], tokenizer, policy)
    assert again.processed == 2 and tokenizer.decode(again.writes[0]) == "ok"  # never re-written


def test_write_roles_keep_questions_out_of_memory(tokenizer):
    log = [{"role": "user", "content": "alice likes ?"}, {"role": "assistant", "content": "teal"}]
    plan = plan_turn(
        log, 0, [{"role": "user", "content": "bob"}], tokenizer, SessionPolicy(window=1, write_roles=("assistant",))
    )
    assert plan.processed == 2 and [tokenizer.decode(w) for w in plan.writes] == ["teal"]


def test_arrival_policy_writes_the_new_message_before_the_reply(tokenizer):
    plan = plan_turn(
        [], 0, [{"role": "user", "content": "alice likes teal ."}], tokenizer, SessionPolicy(write="arrival")
    )
    assert plan.processed == 1 and len(plan.writes) == 1


def test_prompt_writes_plan_each_message_in_the_first_prompt_that_shows_it(tokenizer):
    """``write="prompt"``: a live turn writes the previous reply and the new question inside its reply prompt (no
    call of its own); a history arriving at once is written in the prompts its turns would have shown, and a message
    no turn's window shows (window 1: every reply) in the window that ends at it, reading as its turn's router says."""
    user, assistant = ({"role": r, "content": c} for r, c in (("user", "alice likes teal ."), ("assistant", "ok")))
    policy = SessionPolicy(window=2, write="prompt")
    first = plan_turn([], 0, [user], tokenizer, policy)
    assert first.processed == 1 and first.writes == [] and first.prompt_writes == [] and all(first.prompt_mask)
    question = {"role": "user", "content": "bob likes ?"}
    second = plan_turn([user, assistant], 1, [question], tokenizer, policy)
    assert second.prompt_writes == [] and second.processed == 3
    written = [t for t, m in zip(second.prompt, second.prompt_mask) if m]
    assert tokenizer.decode(written) == "ok bob likes ?" and not second.prompt_mask[0]  # <bos> is not re-written
    assert second.tokens_written == len(written)
    at_once = plan_turn([], 0, [user, assistant, question], tokenizer, policy)
    assert at_once.prompt == second.prompt and at_once.prompt_mask == second.prompt_mask
    assert [(w.ids, w.mask, w.reads_for) for w in at_once.prompt_writes] == [
        (first.prompt, first.prompt_mask, "alice likes teal .")
    ]
    narrow = plan_turn([], 0, [user, assistant, question], tokenizer, SessionPolicy(window=1, write="prompt"))
    assert [(tokenizer.decode(w.ids), w.reads_for) for w in narrow.prompt_writes] == [
        ("<bos> alice likes teal .", "alice likes teal ."), ("<bos> ok", "bob likes ?")
    ]
    assert written_until([user, assistant, question], policy) == 1  # only the first turn is closed
    assert turn_ends([user, user, assistant, question]) == [1, 3]


def test_a_client_resending_the_whole_conversation_adds_only_the_new_messages():
    log = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    c = {"role": "user", "content": "c"}
    for history in ("follow", "append"):
        policy = SessionPolicy(history=history)
        assert follow(log, [*log, c], policy) == (2, [c])
        assert follow(log, [c], policy) == (2, [c])  # new messages only
    # a resent conversation that diverges forks under "follow" and is appended whole under "append"
    assert follow(log, [log[0], c], SessionPolicy()) == (1, [c])
    assert follow(log, [log[0]], SessionPolicy()) == (1, [])  # regenerate the first reply
    assert follow(log, [log[0], c], SessionPolicy(history="append")) == (2, [log[0], c])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"history": "fork"}, "history"), ({"checkpoint_every": 0}, "checkpoint"), ({"max_checkpoints": 1}, "max_check")],
)
def test_policy_refuses_bad_history_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SessionPolicy(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"window": 0}, "window"), ({"write": "never"}, "write"), ({"write_roles": ("system",)}, "write_roles")],
)
def test_policy_refuses_bad_values_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SessionPolicy(**kwargs)


# ------------------------------------------------------------------------------------------- the engine


@pytest.mark.parametrize("write", ["leave", "prompt"])
def test_incremental_ingestion_equals_the_whole_history_at_once(model, tokenizer, tmp_path, one_thread, write):
    policy = SessionPolicy(window=2, write=write)
    turn_by_turn = engine_for(model, tokenizer, tmp_path / "a", policy=policy)
    replies = run_turns(turn_by_turn, "s")
    log = turn_by_turn.store.load("s").messages
    at_once = engine_for(model, tokenizer, tmp_path / "b", policy=policy)
    last = at_once.chat("s", log[:-1], PARAMS)  # the whole history up to the last question, in one request
    assert last.reply == replies[-1]
    assert at_once.store.load("s").processed == turn_by_turn.store.load("s").processed
    for name, state in memory_of(turn_by_turn, "s").items():
        assert torch.equal(state, memory_of(at_once, "s")[name]), name
    assert any(t.abs().sum() > 0 for t in memory_of(at_once, "s").values())
    turn_by_turn.close(), at_once.close()


class _Decline:
    """A router that sends every reply to no memory."""

    def check(self, model) -> None:
        pass

    def reads_memory(self, model, tokenizer, texts):
        return [False] * len(texts)


def test_prompt_writes_without_a_read_give_the_frozen_reply_and_still_write(model, tokenizer, tmp_path, one_thread):
    """``write="prompt"`` with a router that declines every read: each reply is the no-memory engine's, and the
    prompts still write; no message gets a forward call of its own (the engine's per-message writer never runs)."""
    policy = SessionPolicy(window=2, write="prompt")
    declining = engine_for(model, tokenizer, tmp_path / "d", policy=policy, router=_Decline())
    declining._write = None  # a call would raise
    baseline = engine_for(model, tokenizer, tmp_path / "n", policy=policy, memory=False)
    assert run_turns(declining, "s") == run_turns(baseline, "s")
    assert any(t.abs().sum() > 0 for t in memory_of(declining, "s").values())
    stats = declining.stats("s")
    assert stats["memory_reads"] == 0 and stats["tokens_written"] > 0
    reading = engine_for(model, tokenizer, tmp_path / "r", policy=policy)
    assert run_turns(reading, "s") != run_turns(baseline, "s")
    declining.close(), baseline.close(), reading.close()


def test_the_cli_offers_every_write_policy():
    from peft_deltamem.agents.session import WRITE_WHEN
    from peft_deltamem.cli import WRITTEN

    assert tuple(WRITTEN) == WRITE_WHEN


def test_prompt_writes_need_a_token_write_adapter(tokenizer, tmp_path):
    torch.manual_seed(0)
    base = tiny_model("llama", vocab_size=len(tokenizer))
    segments = get_peft_model(base, DeltaMemConfig(task_type="CAUSAL_LM", write_granularity="segment")).eval()
    with pytest.raises(ValueError, match="write='prompt'.*segment"):
        engine_for(segments, tokenizer, tmp_path, policy=SessionPolicy(write="prompt"))


def test_memory_changes_the_reply_and_the_baseline_has_none(model, tokenizer, tmp_path, one_thread):
    with_memory = engine_for(model, tokenizer, tmp_path / "m")
    without = engine_for(model, tokenizer, tmp_path / "n", memory=False)
    assert run_turns(with_memory, "s") != run_turns(without, "s")
    assert without.store.load("s").memory is None or DeltaMemory.from_bytes(without.store.load("s").memory).is_empty
    with_memory.close(), without.close()


def test_concurrent_sessions_in_one_batch_equal_each_session_alone(model, tokenizer, tmp_path, one_thread):
    alone = engine_for(model, tokenizer, tmp_path / "alone", max_batch_size=1)
    expected = {s: run_turns(alone, s, USER_TURNS[i:] + USER_TURNS[:i]) for i, s in enumerate(["p", "q", "r"])}
    batched = engine_for(model, tokenizer, tmp_path / "batched", max_batch_size=3, batch_wait_s=0.5)
    sizes = []
    original = batched._generate
    batched._generate = lambda requests, *a: sizes.append(len(requests)) or original(requests, *a)
    got = {s: [] for s in expected}
    for step in range(len(USER_TURNS)):
        futures = {
            s: batched.submit(s, [{"role": "user", "content": (USER_TURNS[i:] + USER_TURNS[:i])[step]}], PARAMS)
            for i, s in enumerate(expected)
        }
        for s, future in futures.items():
            got[s].append(future.result().reply)
    assert max(sizes) == 3  # the turns really ran as one batch
    assert got == expected
    for s in expected:
        for name, state in memory_of(alone, s).items():
            torch.testing.assert_close(memory_of(batched, s)[name], state, atol=1e-6, rtol=1e-5)
    alone.close(), batched.close()


def test_each_batch_reports_what_it_wrote_encoded_and_generated_and_its_time_by_phase(
    model, tokenizer, tmp_path, one_thread
):
    engine = engine_for(model, tokenizer, tmp_path)
    seen = []
    engine.on_batch = seen.append
    results = [engine.chat("s", [{"role": "user", "content": t}], PARAMS) for t in USER_TURNS[:4]]
    assert len(seen) == 4
    for stats, result in zip(seen, results, strict=True):
        assert (stats.sessions, stats.prompt_tokens) == (1, result.prompt_tokens)
        assert (stats.tokens_written, stats.new_tokens) == (result.written_tokens, result.completion_tokens)
        assert stats.write_s >= 0 and stats.prefill_s > 0 and stats.decode_s >= 0
    assert seen[0].tokens_written == 0 and sum(s.tokens_written for s in seen) > 0  # the window filled, then left
    engine.close()


def test_two_requests_on_one_session_never_interleave(model, tokenizer, tmp_path, one_thread):
    engine = engine_for(model, tokenizer, tmp_path, max_batch_size=4, batch_wait_s=0.2)
    futures = [engine.submit("s", [{"role": "user", "content": t}], PARAMS) for t in USER_TURNS[:4]]
    results = [f.result() for f in futures]
    log = engine.store.load("s").messages
    assert [m["role"] for m in log] == ["user", "assistant"] * 4
    assert [m["content"] for m in log[0::2]] == USER_TURNS[:4]  # in submission order, each after the last reply
    assert [m["content"] for m in log[1::2]] == [r.reply for r in results]
    sequential = engine_for(model, tokenizer, tmp_path / "seq")
    assert run_turns(sequential, "s", USER_TURNS[:4]) == [r.reply for r in results]
    engine.close(), sequential.close()


def test_a_failed_turn_changes_nothing(model, tokenizer, tmp_path, one_thread, monkeypatch):
    engine = engine_for(model, tokenizer, tmp_path)
    run_turns(engine, "s", USER_TURNS[:3])
    before = engine.store.load("s")

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine, "_generate", broken)
    with pytest.raises(RuntimeError, match="device lost"):
        engine.chat("s", [{"role": "user", "content": "later books again"}], PARAMS)
    after = engine.store.load("s")
    assert after.messages == before.messages and after.memory == before.memory and after.processed == before.processed
    engine.close()


def test_resume_in_a_fresh_process_gives_the_uninterrupted_reply(model, tokenizer, tmp_path, one_thread):
    model.save_pretrained(tmp_path / "adapter")
    tiny_model("llama", seed=0, vocab_size=len(tokenizer)).save_pretrained(tmp_path / "base")  # the same weights
    tokenizer.save_pretrained(tmp_path / "base")
    uninterrupted = engine_for(model, tokenizer, tmp_path / "u")
    expected = run_turns(uninterrupted, "s")
    first = engine_for(model, tokenizer, tmp_path / "r")
    run_turns(first, "s", USER_TURNS[:-1])
    first.close()
    script = (
        "import json, sys\n"
        "from peft_deltamem.agents.engine import ChatEngine, GenerationParams\n"
        "from peft_deltamem.agents.models import load_chat_model\n"
        "from peft_deltamem.agents.session import SessionPolicy\n"
        "from peft_deltamem.agents.store import DirectoryStore\n"
        "model, tok, _ = load_chat_model(sys.argv[1], sys.argv[2])\n"
        "model.generation_config.eos_token_id = tok.eos_token_id\n"
        "engine = ChatEngine(model, tok, DirectoryStore(sys.argv[3]), SessionPolicy(window=2))\n"
        "print(json.dumps(engine.chat('s', [{'role': 'user', 'content': sys.argv[4]}], GenerationParams(3)).reply))\n"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            str(tmp_path / "base"),
            str(tmp_path / "adapter"),
            str(tmp_path / "r"),
            USER_TURNS[-1],
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **_env()},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == expected[-1]
    resumed = DeltaMemory.from_bytes(DirectoryStore(tmp_path / "r").load("s").memory).states
    for name, state in memory_of(uninterrupted, "s").items():  # another process: equal up to float rounding
        torch.testing.assert_close(resumed[name], state, atol=1e-6, rtol=1e-5)
    uninterrupted.close()


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "HF_HUB_OFFLINE")}


@pytest.mark.parametrize(
    ("session", "messages", "params", "error"),
    [
        ("../etc", [{"role": "user", "content": "hi"}], PARAMS, InvalidSessionId),
        ("a/b", [{"role": "user", "content": "hi"}], PARAMS, InvalidSessionId),
        ("s", [], PARAMS, ValueError),
        ("s", [{"role": "assistant", "content": "hi"}], PARAMS, ValueError),
        ("s", [{"role": "user", "content": "x" * 101}], PARAMS, RequestTooLarge),
        ("s", [{"role": "user", "content": "hi"}] * 5, PARAMS, RequestTooLarge),
        ("s", [{"role": "user", "content": "hi"}], GenerationParams(max_new_tokens=99), RequestTooLarge),
    ],
)
def test_bad_requests_are_refused_before_any_work(model, tokenizer, tmp_path, session, messages, params, error):
    engine = engine_for(model, tokenizer, tmp_path, limits=Limits(max_messages=4, max_chars=100, max_new_tokens=8))
    with pytest.raises(error):
        engine.submit(session, messages, params)
    assert engine._worker is None  # nothing was queued
    engine.close()


# ---------------------------------------------------------------------------------------------- stores


def test_directory_store_round_trip_and_atomic_replace(tmp_path):
    store = DirectoryStore(tmp_path)
    assert store.load("s") is None and store.list() == []
    store.save("s", SessionRecord(messages=[{"role": "user", "content": "a"}], processed=0, memory=b"one"))
    store.save("s", SessionRecord(messages=[{"role": "user", "content": "b"}], processed=1, memory=b"two"))
    record = store.load("s")
    assert (record.messages[0]["content"], record.processed, record.memory) == ("b", 1, b"two")
    assert len(list((tmp_path / "s").glob("memory-*.safetensors"))) == 1  # the old memory file is gone
    assert store.list() == ["s"] and store.delete("s") and store.load("s") is None and not store.delete("s")


def test_a_session_lock_excludes_a_second_holder(tmp_path):
    store = DirectoryStore(tmp_path)
    with store.lock("s"):
        errors = []
        thread = threading.Thread(target=lambda: _try_lock(store, errors))
        thread.start()
        thread.join()
    assert errors and isinstance(errors[0], SessionBusy)
    with store.lock("s", timeout=0.1):  # released
        pass


def _try_lock(store, errors):
    try:
        with store.lock("s", timeout=0.2):
            pass
    except SessionBusy as error:
        errors.append(error)


@pytest.mark.parametrize("bad", ["", "..", "../x", "a/b", "a\\b", ".hidden", "x" * 129, None, 5])
def test_invalid_session_ids_are_refused(tmp_path, bad):
    with pytest.raises(InvalidSessionId):
        DirectoryStore(tmp_path).load(bad)


def run_chat_cli(tmp_path, turns_text: str, window=("--window", "1")) -> subprocess.CompletedProcess:
    """`peft-deltamem chat` on the embedded model, reading its turns from a file (window 1, 2-token replies)."""
    turns = tmp_path / "turns.txt"
    turns.write_text(turns_text)
    done = subprocess.run(
        [sys.executable, "-m", "peft_deltamem.cli", "chat", "--input", str(turns), "--sessions", str(tmp_path / "s")]
        + [*window, "--max-new-tokens", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**_env(), "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_chat_cli_reads_turns_from_a_file(tmp_path):
    done = run_chat_cli(tmp_path, "alice likes teal .\n/stats\nbob likes ?\n/reset\n/stats\n")
    lines = done.stdout.splitlines()
    assert sum(line.startswith("assistant: ") for line in lines) == 2
    stats = [json.loads(line) for line in lines if line.startswith("{")]
    assert stats[0]["messages"] == 2 and stats[0]["turns"] == 1
    assert stats[1]["messages"] == 0  # after /reset
    assert "(session reset" in done.stdout


def test_chat_cli_window_defaults_to_the_session_policys_and_is_printed(tmp_path):
    done = run_chat_cli(tmp_path, "alice likes teal .\n/stats\n", window=())
    stats = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    assert stats["window"] == 6
    assert "model embedded-tiny, window of 6 messages" in done.stderr


def test_a_fresh_adapter_is_the_same_in_every_process_so_stored_memories_stay_valid():
    from peft_deltamem.agents.models import load_chat_model

    torch.manual_seed(123)
    first, _, _ = load_chat_model()
    torch.manual_seed(456)  # whatever the caller's random state
    second, _, _ = load_chat_model()
    a, b = first.state_dict(), second.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if "delta_mem_" in k)


def test_chat_cli_save_onto_an_existing_file_says_so_and_goes_on(tmp_path):
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"the user's own file")
    done = run_chat_cli(
        tmp_path, f"alice likes teal .\nand then trains\n/save {taken}\nbob likes ?\n/save {tmp_path / 'new.st'}\n"
    )
    assert "Traceback" not in done.stderr
    assert f"(not saved: {taken}: it already exists; give another path" in done.stdout
    assert taken.read_bytes() == b"the user's own file"  # nothing the user saved is overwritten
    assert sum(line.startswith("assistant: ") for line in done.stdout.splitlines()) == 3  # the chat went on
    assert (tmp_path / "new.st").is_file()


def test_stats_of_the_no_memory_baseline_count_nothing_in_memory(tmp_path):
    from peft_deltamem.agents.engine import ChatEngine
    from peft_deltamem.agents.models import load_chat_model
    from peft_deltamem.agents.session import SessionPolicy

    model, tok, _ = load_chat_model()
    for memory in (True, False):
        engine = ChatEngine(model, tok, DirectoryStore(tmp_path / str(memory)), SessionPolicy(window=1), memory=memory)
        try:
            for text in ("alice likes teal .", "bob likes ?"):
                engine.chat("s", [{"role": "user", "content": text}], PARAMS)
            stats = engine.stats("s")
        finally:
            engine.close()
        assert stats["messages"] == 4
        assert stats["messages_in_memory"] == (2 if memory else 0)


def test_the_served_model_name_shows_no_local_paths(tmp_path):
    from peft_deltamem.agents.models import load_chat_model

    tok = build_tokenizer()
    base = tiny_model("llama", vocab_size=len(tok))
    base.save_pretrained(tmp_path / "deep" / "base")
    tok.save_pretrained(tmp_path / "deep" / "base")
    get_peft_model(base, DeltaMemConfig(task_type="CAUSAL_LM")).save_pretrained(tmp_path / "deep" / "my-adapter")
    _, _, name = load_chat_model(str(tmp_path / "deep" / "base"), str(tmp_path / "deep" / "my-adapter"))
    assert name == "base+my-adapter" and str(tmp_path) not in name


@pytest.mark.parametrize("foreign", ["other weights", "other config"])
def test_a_session_the_model_cannot_read_fails_alone_and_is_not_re_saved(tokenizer, model, tmp_path, foreign):
    """A session written under other adapter weights (or another configuration) is refused even inside a batch
    (the batch joins memories with DeltaMemory.cat); its neighbour's turn is served as if it ran alone."""
    if foreign == "other weights":
        writer = make_model(tokenizer, seed=1)  # same configuration, other weights
    else:
        base = tiny_model("llama", seed=0, vocab_size=len(tokenizer))
        writer = get_peft_model(base, DeltaMemConfig(task_type="CAUSAL_LM", r=4, init_weights=False)).eval()
    other = engine_for(writer, tokenizer, tmp_path / "sessions")
    try:
        run_turns(other, "bad", USER_TURNS[:3])
    finally:
        other.close()
    alone = engine_for(model, tokenizer, tmp_path / "alone")
    try:
        expected = run_turns(alone, "good", USER_TURNS[:3])[-1]
    finally:
        alone.close()
    engine = engine_for(model, tokenizer, tmp_path / "sessions", max_batch_size=4, batch_wait_s=0.5)
    stored = (tmp_path / "sessions" / "bad" / "session.json").read_bytes()
    try:
        run_turns(engine, "good", USER_TURNS[:2])
        bad = engine.submit("bad", [{"role": "user", "content": "alice likes ?"}], PARAMS)
        good = engine.submit("good", [{"role": "user", "content": USER_TURNS[2]}], PARAMS)
        assert good.result().reply == expected
        with pytest.raises(ValueError, match="written with other weights" if foreign == "other weights" else "its r"):
            bad.result()
    finally:
        engine.close()
    assert (tmp_path / "sessions" / "bad" / "session.json").read_bytes() == stored


# ----------------------------------------------------------------------------- edits and regenerations


def _conversation(engine, session, turns):
    """Play ``turns`` as an OpenAI client does (the whole conversation each turn); the final log."""
    log = []
    for turn in turns:
        log = [*log, {"role": "user", "content": turn}]
        log.append({"role": "assistant", "content": engine.chat(session, log, PARAMS).reply})
    return log


def _record(engine, session):
    record = engine.store.load(session)
    return record.messages, DeltaMemory.from_bytes(record.memory).states, record.processed


@pytest.mark.parametrize("write", ["leave", "arrival", "prompt"])
@pytest.mark.parametrize(("checkpoint_every", "max_checkpoints"), [(1, 16), (1, 2), (3, 16), (100, 16)])
@pytest.mark.parametrize("edit", ["regenerate", "early", "in_window"])
def test_a_fork_equals_a_fresh_session_that_only_saw_the_new_branch(
    model, tokenizer, tmp_path, one_thread, write, checkpoint_every, max_checkpoints, edit
):
    policy = SessionPolicy(window=2, write=write, checkpoint_every=checkpoint_every, max_checkpoints=max_checkpoints)
    engine = engine_for(model, tokenizer, tmp_path / "forked", policy=policy)
    log = _conversation(engine, "s", USER_TURNS[:5])  # 10 messages, most of them in memory
    assert len(engine.store.load("s").checkpoints) <= max_checkpoints  # (1, 2): thinned as the session grew
    if edit == "regenerate":  # resend up to the last user message: its reply again
        branch = log[:-1]
    elif edit == "early":  # edit the second user message, long written into memory, and go on
        branch = [*log[:2], {"role": "user", "content": "bob likes teal ."}]
    else:  # edit the last user message (still in the window)
        branch = [*log[:-2], {"role": "user", "content": "alice likes ?"}]
    reply = engine.chat("s", branch, PARAMS).reply
    fresh = engine_for(model, tokenizer, tmp_path / "fresh", policy=policy)
    fresh_log = _conversation(fresh, "f", [m["content"] for m in branch if m["role"] == "user"][:-1])
    assert fresh_log == branch[:-1]  # greedy replies: the same branch up to the edit
    fresh_reply = fresh.chat("f", branch, PARAMS).reply
    messages, states, processed = _record(engine, "s")
    fresh_messages, fresh_states, fresh_processed = _record(fresh, "f")
    assert reply == fresh_reply and messages == fresh_messages and processed == fresh_processed
    assert states.keys() == fresh_states.keys()
    for key in states:
        assert torch.equal(states[key], fresh_states[key]), key
    assert engine.stats("s")["forks"] == 1
    # the forked session goes on like the fresh one
    after = [*messages, {"role": "user", "content": "bob likes ?"}]
    assert engine.chat("s", after, PARAMS).reply == fresh.chat("f", after, PARAMS).reply


def test_thinned_checkpoints_stay_bounded_dense_at_the_end_and_sparser_further_back():
    from peft_deltamem.agents.session import thin_checkpoints

    assert thin_checkpoints(5, 16) == [0, 1, 2, 3, 4]
    assert thin_checkpoints(17, 16) == [0, 2, 4, 6, 8, *range(9, 17)]
    positions = []  # checkpoint positions (message counts) of a long session, thinned as the engine does
    for n in range(1, 201):
        positions.append(8 * n)
        positions = [positions[i] for i in thin_checkpoints(len(positions), 16)]
        assert len(positions) <= 16 and positions[-1] == 8 * n
    assert positions[-8:] == [8 * n for n in range(193, 201)]  # the newest eight all kept
    gaps = [b - a for a, b in zip(positions, positions[1:])]
    assert gaps == sorted(gaps, reverse=True) and gaps[0] > 8  # sparser the further back


def test_an_early_edit_really_changes_the_memory_and_append_sessions_never_fork(model, tokenizer, tmp_path, one_thread):
    engine = engine_for(model, tokenizer, tmp_path / "a")
    log = _conversation(engine, "s", USER_TURNS[:5])
    before = _record(engine, "s")[1]
    branch = [*log[:2], {"role": "user", "content": "bob likes teal ."}]
    engine.chat("s", branch, PARAMS)
    after = _record(engine, "s")[1]
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert len(engine.store.load("s").messages) == 4
    appending = engine_for(model, tokenizer, tmp_path / "b", policy=SessionPolicy(window=2, history="append"))
    log = _conversation(appending, "s", USER_TURNS[:3])
    appending.chat("s", log[:-1], PARAMS)  # a "regenerate" is appended whole
    assert len(appending.store.load("s").messages) == len(log) + len(log) - 1 + 1
    assert "forks" not in appending.stats("s")


def test_checkpoints_survive_the_store_and_a_damaged_checkpoint_file_is_named(model, tokenizer, tmp_path, one_thread):
    engine = engine_for(model, tokenizer, tmp_path, policy=SessionPolicy(window=2, checkpoint_every=2))
    _conversation(engine, "s", USER_TURNS[:4])
    record = engine.store.load("s")
    assert record.checkpoints and DeltaMemory.from_bytes(record.checkpoint_memory).batch_size == len(record.checkpoints)
    meta = tmp_path / "s" / "session.json"
    data = json.loads(meta.read_text())
    data["checkpoints"] = [record.processed + 5]
    meta.write_text(json.dumps(data))
    with pytest.raises(Exception, match="checkpoints"):
        engine.store.load("s")


def test_an_adapter_that_is_not_delta_mem_is_refused_by_name(tmp_path):
    """A LoRA adapter_config.json beside δ-mem weights would load as a LoRA that does nothing; a real LoRA adapter
    is not a memory. Both are refused, saying what they are."""
    from peft import LoraConfig

    from peft_deltamem.agents.models import load_chat_model

    tok = build_tokenizer()
    base = tiny_model("llama", vocab_size=len(tok))
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    get_peft_model(base, DeltaMemConfig(task_type="CAUSAL_LM")).save_pretrained(tmp_path / "mixed")
    lora = LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"])
    lora.save_pretrained(tmp_path / "mixed")  # overwrites adapter_config.json only
    with pytest.raises(ValueError, match="holds δ-mem weights"):
        load_chat_model(str(tmp_path / "base"), str(tmp_path / "mixed"))
    get_peft_model(tiny_model("llama", vocab_size=len(tok)), lora).save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match="LORA adapter, not a δ-mem adapter"):
        load_chat_model(str(tmp_path / "base"), str(tmp_path / "lora"))


def test_an_exported_session_imports_exactly_and_nothing_is_overwritten(model, tokenizer, tmp_path, one_thread):
    policy = SessionPolicy(window=2, checkpoint_every=2)
    source = engine_for(model, tokenizer, tmp_path / "a", policy=policy)
    log = _conversation(source, "s", USER_TURNS[:4])
    data = json.loads(json.dumps(source.export("s")))  # JSON all the way
    target = engine_for(model, tokenizer, tmp_path / "b", policy=policy)
    target.import_session("moved", data)
    assert target.store.load("moved") == source.store.load("s")
    following = [*log, {"role": "user", "content": USER_TURNS[5]}]
    assert target.chat("moved", following, PARAMS).reply == source.chat("s", following, PARAMS).reply
    with pytest.raises(FileExistsError, match="overwrite=True"):
        target.import_session("moved", data)
    target.import_session("moved", data, overwrite=True)
    assert source.export("missing") is None
    with pytest.raises(ValueError, match="not a session export"):
        target.import_session("x", {"messages": []})
    with pytest.raises(ValueError, match="base64"):
        target.import_session("x", {**data, "memory": "not base64!"})
    foreign = engine_for(make_model(tokenizer, seed=1), tokenizer, tmp_path / "c", policy=policy)
    with pytest.raises(ValueError, match="weights"):
        foreign.import_session("x", data)  # written by other adapter weights
    assert foreign.store.load("x") is None


def test_idle_sessions_expire_with_a_ttl(model, tokenizer, tmp_path, one_thread):
    import time

    store = DirectoryStore(tmp_path, ttl=0.5)
    engine = ChatEngine(model, tokenizer, store, SessionPolicy(window=2))
    run_turns(engine, "old", USER_TURNS[:2])
    time.sleep(0.6)
    run_turns(engine, "new", USER_TURNS[:1])
    assert store.list() == ["new"] and store.load("old") is None
    assert len(store.load("new").messages) == 2
    assert store.purge_expired() == 1 and not (tmp_path / "old").exists() and (tmp_path / "new").exists()
    run_turns(engine, "old", USER_TURNS[:1])  # an expired session starts afresh
    assert len(store.load("old").messages) == 2
    for bad in (0, -1, "10", True):
        with pytest.raises(ValueError, match="ttl"):
            DirectoryStore(tmp_path, ttl=bad)


@pytest.mark.parametrize("write", ["leave", "prompt"])
def test_compiled_decoding_gives_the_eager_replies_and_memories_and_compiles_only_at_warm_up(
    model, tokenizer, tmp_path, one_thread, write
):
    """``compile=True`` decodes with a static cache and torch.compile: the same replies and memories as the eager
    engine, sessions batched; ``warm_up`` compiles the decoding step (dynamic in batch and length, no graph break),
    so later turns of other batch sizes (one row included) and prompt lengths compile nothing more. With
    ``write="prompt"`` the prefill writes and the decoding step reads with per-row read flags."""
    from conftest import require_cxx_compiler

    require_cxx_compiler()
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    policy = SessionPolicy(window=2, write=write)
    eager = engine_for(model, tokenizer, tmp_path / "eager", max_batch_size=3, batch_wait_s=0.3, policy=policy)
    compiled = engine_for(
        model, tokenizer, tmp_path / "compiled", max_batch_size=3, batch_wait_s=0.3, compile=True, policy=policy
    )
    compiled.warm_up()
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1 and not counters["graph_break"], dict(counters["graph_break"])
    sessions = {"p": USER_TURNS, "q": USER_TURNS[2:] + USER_TURNS[:2], "r": USER_TURNS[4:]}

    def play(engine):
        replies = {s: [] for s in sessions}
        for step in range(len(USER_TURNS)):  # 3, then 2 sessions a batch; prompts grow with the window
            futures = {
                s: engine.submit(s, [{"role": "user", "content": turns[step]}], PARAMS)
                for s, turns in sessions.items()
                if step < len(turns)
            }
            for s, future in futures.items():
                replies[s].append(future.result().reply)
        return replies

    assert play(compiled) == play(eager)
    alone = [{"role": "user", "content": "alice likes ?"}]  # then a batch of one
    assert compiled.chat("p", alone, PARAMS).reply == eager.chat("p", alone, PARAMS).reply
    assert counters["stats"]["unique_graphs"] == graphs, "a turn after the warm-up compiled again"
    for s in sessions:
        for name, state in memory_of(eager, s).items():
            torch.testing.assert_close(memory_of(compiled, s)[name], state, atol=1e-6, rtol=1e-5)
    eager.close(), compiled.close()
    torch._dynamo.reset()


def test_compile_must_be_a_bool(model, tokenizer, tmp_path):
    with pytest.raises(TypeError, match="compile"):
        engine_for(model, tokenizer, tmp_path, compile="yes")


def test_the_compiled_no_memory_baseline_gives_the_eager_baselines_replies(model, tokenizer, tmp_path, one_thread):
    """memory=False runs the frozen model (adapter disabled) with the static cache's 4-D masks: compiled, the same
    replies as eager."""
    from conftest import require_cxx_compiler

    require_cxx_compiler()
    torch._dynamo.reset()
    eager = engine_for(model, tokenizer, tmp_path / "eager", memory=False)
    compiled = engine_for(model, tokenizer, tmp_path / "compiled", memory=False, compile=True)
    compiled.warm_up()
    assert run_turns(compiled, "s", USER_TURNS[:4]) == run_turns(eager, "s", USER_TURNS[:4])
    eager.close(), compiled.close()
    torch._dynamo.reset()


def test_the_no_memory_baseline_leaves_the_adapters_parameters_frozen(tokenizer, tmp_path, one_thread):
    """peft's disable_adapter() marks the adapter trainable when it re-enables it; the engine's no-memory turns (and
    the router, which reads the frozen model the same way) restore every requires_grad flag, so a loaded adapter
    stays frozen (and a compiled decoding step is not compiled again for the flag)."""
    model = make_model(tokenizer)
    model.requires_grad_(False)
    engine = engine_for(model, tokenizer, tmp_path, memory=False)
    run_turns(engine, "s", USER_TURNS[:2])
    engine.close()
    assert not any(p.requires_grad for p in model.parameters())
