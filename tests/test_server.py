"""`peft-deltamem serve` end to end on localhost: the official `openai` client, streaming, sessions, errors,
a kill -9 and restart that loses no completed turn, and two server processes sharing sessions through Redis."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time

import httpx2 as httpx
import pytest
import torch
from openai import BadRequestError, OpenAI
from peft import get_peft_model

from conftest import skip_or_fail_in_ci
from peft_deltamem import DeltaMemConfig
from peft_deltamem.agents.engine import ChatEngine, GenerationParams
from peft_deltamem.agents.launch import free_port, launch_server
from peft_deltamem.agents.session import SessionPolicy
from peft_deltamem.agents.store import DirectoryStore, RedisStore
from peft_deltamem.recall_task import build_tokenizer
from peft_deltamem.tiny_models import tiny_model

TURNS = ["alice likes teal .", "we talked about trains", "bob likes gold .", "then music and lunch", "alice likes ?"]
MAX_TOKENS = 3


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny model with a δ-mem adapter whose Δ heads are non-zero (the memory changes replies), on disk."""
    root = tmp_path_factory.mktemp("served")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(root / "base")  # before δ-mem wraps it
    tokenizer.save_pretrained(root / "base")
    base = tiny_model("llama", vocab_size=len(tokenizer))
    base.generation_config.eos_token_id = tokenizer.eos_token_id
    model = get_peft_model(base, DeltaMemConfig(task_type="CAUSAL_LM", init_weights=False)).eval()
    model.save_pretrained(root / "adapter")
    return root, model, tokenizer


def expected_replies(saved_model, tmp_path, turns=TURNS) -> list[str]:
    _, model, tokenizer = saved_model
    engine = ChatEngine(model, tokenizer, DirectoryStore(tmp_path / "reference"), SessionPolicy(window=2))
    try:
        params = GenerationParams(max_new_tokens=MAX_TOKENS)
        return [engine.chat("s", [{"role": "user", "content": t}], params).reply for t in turns]
    finally:
        engine.close()


def start_server(saved_model, *store_args: str) -> tuple[subprocess.Popen, str]:
    root = saved_model[0]
    command = ["--model", str(root / "base"), "--adapter", str(root / "adapter"), "--window", "2"]
    command += ["--max-new-tokens", str(MAX_TOKENS), *store_args]
    return launch_server(command, timeout=180, env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})


def stop(process: subprocess.Popen, kill: bool = False) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        process.wait(timeout=60)


def client(url: str) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def ask(openai: OpenAI, session: str, text: str, stream: bool = False) -> str:
    kwargs = {"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": MAX_TOKENS}
    headers = {"X-Session-Id": session}
    if not stream:
        return openai.chat.completions.create(**kwargs, extra_headers=headers).choices[0].message.content
    chunks = openai.chat.completions.create(**kwargs, extra_headers=headers, stream=True)
    return "".join(c.choices[0].delta.content or "" for c in chunks)


@pytest.fixture(scope="module")
def server(saved_model, tmp_path_factory):
    process, url = start_server(saved_model, "--sessions", str(tmp_path_factory.mktemp("sessions")))
    yield url
    stop(process)


def test_openai_client_plain_and_streaming_give_the_engines_replies(server, saved_model, tmp_path):
    expected = expected_replies(saved_model, tmp_path)
    openai = client(server)
    assert [ask(openai, "plain", t) for t in TURNS] == expected
    assert [ask(openai, "streamed", t, stream=True) for t in TURNS] == expected
    models = openai.models.list().data
    assert len(models) == 1 and models[0].owned_by == "peft-deltamem"
    stats = httpx.get(f"{server}/v1/sessions/plain").json()
    assert stats["turns"] == len(TURNS) and stats["messages"] == 2 * len(TURNS) and stats["state_norm"] > 0


def test_the_user_field_names_the_session_and_a_full_history_request_adds_only_new_messages(server):
    openai = client(server)
    first = openai.chat.completions.create(
        model="m", messages=[{"role": "user", "content": TURNS[0]}], max_tokens=MAX_TOKENS, user="by-user"
    )
    history = [
        {"role": "user", "content": TURNS[0]},
        {"role": "assistant", "content": first.choices[0].message.content},
    ]
    openai.chat.completions.create(
        model="m", messages=[*history, {"role": "user", "content": TURNS[1]}], max_tokens=MAX_TOKENS, user="by-user"
    )
    assert httpx.get(f"{server}/v1/sessions/by-user").json()["messages"] == 4
    # "regenerate": the client resends the conversation without the last reply; the session forks, not doubles
    again = openai.chat.completions.create(
        model="m", messages=[*history, {"role": "user", "content": TURNS[1]}], max_tokens=MAX_TOKENS, user="by-user"
    )
    stats = httpx.get(f"{server}/v1/sessions/by-user").json()
    assert stats["messages"] == 4 and stats["forks"] == 1 and again.choices[0].message.content


@pytest.mark.parametrize(
    ("headers", "body", "status", "phrase"),
    [
        ({}, {"messages": [{"role": "user", "content": "hi"}]}, 400, "name the session"),
        ({"X-Session-Id": "../etc"}, {"messages": [{"role": "user", "content": "hi"}]}, 400, "invalid session id"),
        ({"X-Session-Id": "s"}, {"messages": []}, 400, "non-empty list"),
        ({"X-Session-Id": "s"}, {"messages": [{"role": "user", "content": "x" * 40_000}]}, 413, "the limit is"),
        ({"X-Session-Id": "s"}, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, 413, "max_new"),
    ],
)
def test_bad_requests_get_clear_4xx_errors(server, headers, body, status, phrase):
    response = httpx.post(f"{server}/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert response.status_code == status, response.text
    assert phrase in response.json()["error"]["message"]


def test_oversized_body_and_unknown_sessions(server):
    response = httpx.post(
        f"{server}/v1/chat/completions", content=b"{" + b" " * 2_000_000 + b"}", headers={"X-Session-Id": "s"}
    )
    assert response.status_code == 413
    assert httpx.get(f"{server}/v1/sessions/nobody").status_code == 404
    assert httpx.delete(f"{server}/v1/sessions/nobody").status_code == 404
    with pytest.raises(BadRequestError, match="invalid session id"):
        ask(client(server), "a b", "hi")


def test_reset_and_delete(server):
    openai = client(server)
    ask(openai, "gone", TURNS[0])
    assert httpx.post(f"{server}/v1/sessions/gone/reset").json()["reset"] is True
    assert httpx.get(f"{server}/v1/sessions/gone").json()["messages"] == 0
    assert httpx.delete(f"{server}/v1/sessions/gone").json()["deleted"] is True
    assert httpx.get(f"{server}/v1/sessions/gone").status_code == 404


def test_kill_and_restart_loses_no_completed_turn(saved_model, tmp_path):
    expected = expected_replies(saved_model, tmp_path)
    sessions = ["--sessions", str(tmp_path / "sessions")]
    process, url = start_server(saved_model, *sessions)
    try:
        got = [ask(client(url), "s", t) for t in TURNS[:3]]
    finally:
        stop(process, kill=True)  # SIGKILL: no shutdown handler runs
    process, url = start_server(saved_model, *sessions)
    try:
        got += [ask(client(url), "s", t) for t in TURNS[3:]]
    finally:
        stop(process)
    assert got == expected


@pytest.fixture
def redis_url(tmp_path):
    binary = shutil.which("redis-server")
    if binary is None:
        skip_or_fail_in_ci("redis-server is not installed (apt-get install redis-server); .ci/run installs it")
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
    )
    import redis

    client_ = redis.Redis(port=port)
    for _ in range(100):
        try:
            client_.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    process.terminate()
    process.wait(timeout=30)


def test_redis_store_passes_the_store_contract(redis_url):
    import redis

    from peft_deltamem.agents.store import SessionBusy, SessionRecord

    store = RedisStore(redis.Redis.from_url(redis_url))
    assert store.load("s") is None
    store.save("s", SessionRecord(messages=[{"role": "user", "content": "a"}], processed=0, memory=b"one"))
    store.save("s", SessionRecord(messages=[{"role": "user", "content": "b"}], processed=1, memory=None))
    record = store.load("s")
    assert (record.messages[0]["content"], record.processed, record.memory) == ("b", 1, None)
    assert record.checkpoints == [] and record.checkpoint_memory is None
    store.save("s", SessionRecord(messages=[{"role": "user", "content": "b"}] * 2, processed=2, memory=b"m",
                                  checkpoints=[1, 2], checkpoint_memory=b"two rows"))  # fmt: skip
    record = store.load("s")
    assert (record.checkpoints, record.checkpoint_memory) == ([1, 2], b"two rows")
    store.save("s", SessionRecord(messages=[{"role": "user", "content": "b"}], processed=1, memory=None))
    assert store.list() == ["s"]
    with store.lock("s"):
        with pytest.raises(SessionBusy):
            with RedisStore(redis.Redis.from_url(redis_url)).lock("s", timeout=0.2):
                pass
    assert store.delete("s") and store.load("s") is None and store.list() == []
    expiring = RedisStore(redis.Redis.from_url(redis_url), prefix="ttl", ttl=0.3)
    expiring.save("idle", SessionRecord(messages=[{"role": "user", "content": "a"}], processed=0, memory=None))
    assert expiring.list() == ["idle"]
    time.sleep(0.5)
    assert expiring.load("idle") is None and expiring.list() == [] and expiring.purge_expired() == 1


def test_two_server_processes_share_a_session_through_redis(saved_model, redis_url, tmp_path):
    expected = expected_replies(saved_model, tmp_path)
    first, url_a = start_server(saved_model, "--redis", redis_url)
    second, url_b = start_server(saved_model, "--redis", redis_url)
    try:
        clients = [client(url_a), client(url_b)]
        got = [ask(clients[i % 2], "shared", t) for i, t in enumerate(TURNS)]  # turns alternate between processes
    finally:
        stop(first), stop(second)
    assert got == expected


# ------------------------------------------------------------------------------ in-process app (no subprocess)


@pytest.fixture()
def app_client(saved_model, tmp_path):
    from fastapi.testclient import TestClient

    from peft_deltamem.agents.server import create_app

    _, model, tokenizer = saved_model
    store = DirectoryStore(tmp_path / "sessions")
    engine = ChatEngine(model, tokenizer, store, SessionPolicy(window=2))
    try:
        with TestClient(create_app(engine, "m")) as test_client:
            yield test_client, store
    finally:
        engine.close()


def test_a_chunked_body_over_the_limit_is_refused(app_client):
    from peft_deltamem.agents.server import MAX_REQUEST_BYTES

    test_client, _ = app_client
    headers = {"X-Session-Id": "s", "Content-Type": "application/json"}

    def body():  # no Content-Length: sent with chunked transfer encoding
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"x" * 50_000
        yield b'"}]}'

    response = test_client.post("/v1/chat/completions", content=body(), headers=headers)
    assert response.status_code == 413, response.text
    assert f"the limit is {MAX_REQUEST_BYTES}" in response.json()["error"]["message"]
    small = test_client.post(
        "/v1/chat/completions",
        content=iter([b'{"messages": [{"role": "user", "content": "alice likes teal ."}], ', b'"max_tokens": 2}']),
        headers=headers,
    )
    assert small.status_code == 200, small.text  # a chunked body within the limit is served


@pytest.mark.parametrize(
    ("damage", "phrase"),
    [
        (lambda meta: meta.write_text("{not json"), "Expecting property name"),
        (lambda meta: meta.write_text('{"version": 1, "messages": "hi", "processed": 0, "stats": {}}'), "'messages'"),
        (lambda meta: meta.write_text('{"version": 1, "messages": [], "processed": 7, "stats": {}}'), "'processed'"),
    ],
)
def test_a_damaged_session_is_a_500_naming_it_and_left_for_inspection(app_client, damage, phrase):
    test_client, store = app_client
    ok = test_client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "alice likes teal ."}], "max_tokens": 2},
        headers={"X-Session-Id": "s"},
    )
    assert ok.status_code == 200
    meta = store.root / "s" / "session.json"
    damage(meta)
    damaged = meta.read_bytes()
    for response in (
        test_client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "bob likes ?"}], "max_tokens": 2},
            headers={"X-Session-Id": "s"},
        ),
        test_client.get("/v1/sessions/s"),
    ):
        assert response.status_code == 500, response.text
        error = response.json()["error"]
        assert error["type"] == "server_error"
        assert "session 's'" in error["message"] and str(meta) in error["message"] and phrase in error["message"]
    assert meta.read_bytes() == damaged  # left as it was
    assert test_client.delete("/v1/sessions/s").status_code == 200  # and can be deleted


def test_an_api_key_is_required_when_set_and_health_answers(saved_model, tmp_path):
    from fastapi.testclient import TestClient

    from peft_deltamem.agents.server import create_app

    _, model, tokenizer = saved_model
    engine = ChatEngine(model, tokenizer, DirectoryStore(tmp_path / "sessions"), SessionPolicy(window=2))
    body = {"messages": [{"role": "user", "content": TURNS[0]}], "max_tokens": MAX_TOKENS}
    try:
        with TestClient(create_app(engine, "m", api_key="s3cret")) as http:
            assert http.get("/health").json()["status"] == "ok"  # open: load balancers probe it
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                response = http.post("/v1/chat/completions", json=body, headers={"X-Session-Id": "k", **headers})
                assert response.status_code == 401 and "API key" in response.json()["error"]["message"]
            assert http.get("/v1/models").status_code == 401
            ok = http.post(
                "/v1/chat/completions", json=body, headers={"X-Session-Id": "k", "Authorization": "Bearer s3cret"}
            )
            assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None
        with pytest.raises(ValueError, match="api_key"):
            create_app(engine, "m", api_key="")
    finally:
        engine.close()


def test_serve_refuses_to_listen_beyond_localhost_without_a_key(monkeypatch):
    from peft_deltamem import cli

    monkeypatch.delenv(cli.API_KEY_ENV, raising=False)
    monkeypatch.setattr(cli, "_engine", lambda args: pytest.fail("the model must not even load"))
    assert cli.main(["serve", "--host", "0.0.0.0"]) == 2


def test_metrics_count_requests_batches_tokens_written_and_sessions(app_client):
    http, _ = app_client
    for turn in TURNS[:3]:
        body = {"messages": [{"role": "user", "content": turn}], "max_tokens": MAX_TOKENS}
        assert http.post("/v1/chat/completions", json=body, headers={"X-Session-Id": "m1"}).status_code == 200
    assert http.post("/v1/chat/completions", json=body).status_code == 400  # no session named
    text = http.get("/metrics").text

    def value(line_start: str) -> float:
        return float(next(line for line in text.splitlines() if line.startswith(line_start)).split()[-1])

    assert value('peft_deltamem_requests_total{route="/v1/chat/completions",status="200"}') == 3
    assert value('peft_deltamem_requests_total{route="/v1/chat/completions",status="400"}') == 1
    assert value('peft_deltamem_request_seconds_count{route="/v1/chat/completions"}') == 4
    assert value("peft_deltamem_batch_sessions_count") == 3
    assert value("peft_deltamem_tokens_written_total") > 0  # window 2: the first turns left it by turn 3
    assert value("peft_deltamem_prompt_tokens_total") > 0
    assert 0 < value("peft_deltamem_generated_tokens_total") <= 3 * MAX_TOKENS
    for phase in ("write", "prefill", "decode"):
        assert value(f'peft_deltamem_batch_phase_seconds_count{{phase="{phase}"}}') == 3
    assert value('peft_deltamem_batch_phase_seconds_sum{phase="prefill"}') > 0
    assert value("peft_deltamem_sessions") == 1


def test_sigterm_finishes_the_turns_in_flight_and_saves_them(saved_model, tmp_path):
    """uvicorn's graceful shutdown: on SIGTERM the server stops accepting, lets the turns in flight finish (each is
    saved before its reply is sent) and exits (uvicorn re-raises the signal once it has shut down: status -15); every
    turn a client saw completed is in the store."""
    import concurrent.futures

    process, url = start_server(saved_model, "--sessions", str(tmp_path / "sessions"))
    ask(client(url), "warm", TURNS[0])
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(ask, client(url), f"s{i}", TURNS[i % len(TURNS)]) for i in range(8)]
            time.sleep(0.05)  # the turns are under way (a turn takes longer), some may not have connected yet
            process.send_signal(signal.SIGTERM)
            outcomes = [f.exception() is None for f in futures]
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        stop(process, kill=True)
    store = DirectoryStore(tmp_path / "sessions")
    for i, completed in enumerate(outcomes):
        if completed:
            assert len(store.load(f"s{i}").messages) == 2
    assert any(outcomes), outcomes  # killed at once, every turn in flight would have failed


def test_sessions_export_and_import_through_the_api(app_client):
    http, store = app_client
    body = {"messages": [{"role": "user", "content": TURNS[0]}], "max_tokens": MAX_TOKENS}
    assert http.post("/v1/chat/completions", json=body, headers={"X-Session-Id": "e1"}).status_code == 200
    exported = http.get("/v1/sessions/e1/export").json()
    assert exported["format"] == "peft-deltamem-session/1" and len(exported["messages"]) == 2
    assert http.post("/v1/sessions/e2/import", json=exported).json()["imported"] is True
    assert store.load("e2") == store.load("e1")
    assert http.post("/v1/sessions/e2/import", json=exported).status_code == 409
    assert http.post("/v1/sessions/e2/import?overwrite=true", json=exported).status_code == 200
    assert http.get("/v1/sessions/none/export").status_code == 404
    assert http.post("/v1/sessions/e3/import", json={"messages": []}).status_code == 400


def test_a_server_that_does_not_answer_in_time_is_killed_and_its_output_shown():
    # PYTHONVERBOSE makes the interpreter print every import at once: output that must reach the error
    with pytest.raises(RuntimeError, match=r"(?s)did not answer within 0 s; its output: .*import") as error:
        launch_server(["--model", "unused"], timeout=0.5, env={"PYTHONVERBOSE": "1"})
    assert "exited" not in str(error.value)
