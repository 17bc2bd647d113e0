"""The chat engine: turns of many sessions batched into one forward/generate, one memory row per session.

``engine.chat(session_id, messages)`` is thread-safe and blocking; concurrent calls for *different* sessions
are collected by one worker thread into a batch (up to ``max_batch_size``), run together with left padding and
one memory row each, and saved one by one. Turns of the *same* session never interleave: the engine puts at
most one turn per session in a batch, and the store's lock (held from loading the session until it is saved,
taken in sorted id order across the batch) serialises them across processes too. A turn is saved before its
reply is returned, so a crash loses no completed turn; a turn that fails changes nothing.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from transformers.generation.streamers import BaseStreamer

from ..padding import pad_rows
from ..runtime import check_bool
from ..state import DeltaMemory
from .models import adapters_disabled
from .session import (
    RequestTooLarge,
    SessionPolicy,
    check_new_messages,
    follow,
    plan_turn,
    rollback_point,
    thin_checkpoints,
)
from .store import SessionRecord, SessionStore, check_session_id

logger = logging.getLogger(__name__)

# Engines whose worker thread runs. At interpreter exit they are closed (queued turns finish, the worker is
# joined): a worker left alive while the interpreter finalises can abort the process ("terminate called without
# an active exception") in torch's thread-pool teardown.
_RUNNING: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_running_engines() -> None:
    for engine in list(_RUNNING):
        engine.close()


@dataclass(frozen=True)
class Limits:
    """Bounds on one request (a larger one gets a clear error)."""

    max_messages: int = 64
    max_chars: int = 32_000
    max_new_tokens: int = 1024
    lock_timeout: float = 60.0


@dataclass(frozen=True)
class BatchStats:
    """What one model batch of turns did, handed to :attr:`ChatEngine.on_batch` (the server's metrics).

    ``prefill_s`` runs from the start of generate to its first new token: encoding the batch's prompts (the
    window, re-encoded every turn) and the first step; ``decode_s`` is the rest of generate.
    """

    sessions: int
    tokens_written: int
    prompt_tokens: int
    new_tokens: int
    write_s: float
    prefill_s: float
    decode_s: float


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0

    def key(self) -> tuple:
        return (self.temperature, self.top_p)


@dataclass
class TurnResult:
    reply: str
    prompt_tokens: int
    completion_tokens: int
    written_tokens: int
    finish_reason: str  # "stop" (end of turn) or "length"


@dataclass
class _Request:
    session_id: str
    messages: list
    params: GenerationParams
    on_text: Callable[[str], None] | None
    future: Future = field(default_factory=Future)


class ChatEngine:
    """Serve chat turns of many sessions on one δ-mem model (see the module docstring).

    ``model`` is a PEFT model with a δ-mem adapter (in eval mode), ``tokenizer`` its chat tokenizer,
    ``store`` a :class:`~peft_deltamem.agents.store.SessionStore`. ``memory=False`` serves the same sessions and
    window without the memory (the adapter disabled, nothing written): the baseline to compare against.
    ``router`` (a :class:`~peft_deltamem.agents.router.MemoryRouter`) decides per reply, from the user's last
    message, whether the reply reads the session's memory; a reply that does not is exactly the frozen model's reply
    (generated with an empty memory, or, when the prompt writes (``write="prompt"``), with its rows' reads off).
    Writes are unchanged; the session's ``memory_reads`` counter says how many replies read it. ``compile=True``
    decodes with a static cache and ``torch.compile`` (transformers' ``compile_config``: the decoding steps compiled,
    the prefill eager); call :meth:`warm_up` before serving so the first turns do not pay for the compilation.
    """

    def __init__(
        self,
        model,
        tokenizer,
        store: SessionStore,
        policy: SessionPolicy | None = None,
        *,
        max_batch_size: int = 8,
        batch_wait_s: float = 0.005,
        limits: Limits | None = None,
        memory: bool = True,
        router=None,
        compile: bool = False,
    ) -> None:
        check_bool(memory, "memory")
        check_bool(compile, "compile")
        if router is not None:
            if not memory:
                raise ValueError("a memory router needs the memory: drop router or memory=False")
            router.check(model)
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.store = store
        self.policy = policy or SessionPolicy()
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.limits = limits or Limits()
        self.memory = memory  # False: a baseline that drops what leaves the window (adapter disabled, no writes)
        self.router = router
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.stop_ids = _stop_ids(model, tokenizer)
        self.segment_writes = _segment_writes(model)
        if self.policy.write == "prompt" and self.segment_writes and memory:
            raise ValueError(
                "write='prompt' writes messages inside the reply prompt, one token at a time; this adapter writes "
                "segments (write_granularity='segment'). Use write='leave' or 'arrival' with it."
            )
        self.compile_config = _compile_config(self._device()) if compile else None
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = False
        # called after every batch with its BatchStats: the server's metrics
        self.on_batch: Callable[[BatchStats], None] | None = None
        self._last_purge = time.monotonic()

    # --------------------------------------------------------------------------------------------- API

    def chat(
        self,
        session_id: str,
        messages: list[dict[str, str]],
        params: GenerationParams | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> TurnResult:
        """Add ``messages`` (ending with a user message) to the session and return the model's reply."""
        return self.submit(session_id, messages, params, on_text).result()

    def submit(self, session_id, messages, params=None, on_text=None) -> Future:
        """Queue a turn; the future gives its :class:`TurnResult` (or the error)."""
        check_session_id(session_id)
        params = params or GenerationParams()
        if not 1 <= params.max_new_tokens <= self.limits.max_new_tokens:
            raise RequestTooLarge(
                f"max_new_tokens must be in 1..{self.limits.max_new_tokens}, got {params.max_new_tokens}"
            )
        checked = check_new_messages(messages, self.limits.max_messages, self.limits.max_chars)
        if self._closed:
            raise RuntimeError("the chat engine is closed")
        self._ensure_worker()
        request = _Request(session_id, checked, params, on_text)
        self._queue.put(request)
        return request.future

    def reset(self, session_id: str) -> bool:
        """Forget the session's messages and memory (the session stays, empty); False if it did not exist."""
        with self.store.lock(check_session_id(session_id), self.limits.lock_timeout):
            if self.store.load(session_id) is None:
                return False
            self.store.save(session_id, SessionRecord())
            return True

    def delete(self, session_id: str) -> bool:
        with self.store.lock(check_session_id(session_id), self.limits.lock_timeout):
            return self.store.delete(session_id)

    def stats(self, session_id: str) -> dict | None:
        """Counters of a stored session (messages, turns, tokens written, memory norm), or None."""
        record = self.store.load(check_session_id(session_id))
        if record is None:
            return None
        norm = 0.0
        if record.memory is not None:
            states = DeltaMemory.from_bytes(record.memory).states
            norm = float(torch.sqrt(sum((t.double() ** 2).sum() for t in states.values())))
        return {
            "session_id": session_id,
            "messages": len(record.messages),
            # without the memory (the baseline), messages that left the window are dropped, not written
            "messages_in_memory": record.processed if self.memory else 0,
            "window": self.policy.window,
            "state_norm": norm,
            **record.stats,
        }

    def export(self, session_id: str) -> dict | None:
        """The session as JSON-ready data (log, counters, memory and checkpoints as base64), or None.

        :meth:`import_session` on this or another engine serving the same adapter weights restores it exactly.
        """
        with self.store.lock(check_session_id(session_id), self.limits.lock_timeout):
            record = self.store.load(session_id)
        if record is None:
            return None
        return {
            "format": EXPORT_FORMAT,
            **record.to_dict(),
            "memory": _b64(record.memory),
            "checkpoint_memory": _b64(record.checkpoint_memory),
        }

    def import_session(self, session_id: str, data: dict, overwrite: bool = False) -> None:
        """Store an :meth:`export`-ed session under ``session_id``.

        Refuses (ValueError) data that is not an export or whose memory this model cannot read (another adapter
        configuration or other weights), and (FileExistsError) an existing session unless ``overwrite=True``.
        """
        check_bool(overwrite, "overwrite")
        if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
            raise ValueError(f"not a session export: expected an object with \"format\": \"{EXPORT_FORMAT}\"")
        data = dict(data)
        data.pop("format")
        try:
            memory, checkpoints = _from_b64(data.pop("memory", None)), _from_b64(data.pop("checkpoint_memory", None))
        except (TypeError, ValueError) as error:
            raise ValueError(f"the export's memory is not valid base64: {error}") from error
        record = SessionRecord.from_dict(data, memory, checkpoints)
        if self.memory:
            for blob in (memory, checkpoints):
                if blob is not None:
                    self.model.check_memory(DeltaMemory.from_bytes(blob))
        with self.store.lock(check_session_id(session_id), self.limits.lock_timeout):
            if not overwrite and self.store.load(session_id) is not None:
                raise FileExistsError(f"session {session_id!r} exists; import with overwrite=True to replace it")
            self.store.save(session_id, record)

    def close(self) -> None:
        """Finish the queued turns and stop the worker thread (also done at interpreter exit)."""
        self._closed = True
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join()
        _RUNNING.discard(self)

    # ------------------------------------------------------------------------------------------ worker

    def _ensure_worker(self) -> None:
        with self._start_lock:
            if self._worker is None:
                self._worker = threading.Thread(target=self._loop, name="delta-mem-chat-engine", daemon=True)
                self._worker.start()
                _RUNNING.add(self)

    def _loop(self) -> None:
        held: list[_Request] = []  # turns of sessions that already had a turn in the last batch, in order
        while True:
            batch, sessions, rest = [], set(), []
            for request in held:  # oldest first, one per session
                (rest if request.session_id in sessions or len(batch) >= self.max_batch_size else batch).append(request)
                sessions.add(request.session_id)
            held = rest
            if not batch:
                first = self._queue.get()
                if first is None:
                    return
                batch.append(first)
                sessions.add(first.session_id)
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.max_batch_size:
                try:
                    request = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    break
                if request is None:
                    self._queue.put(None)
                    break
                if request.session_id in sessions:
                    held.append(request)
                else:
                    batch.append(request)
                    sessions.add(request.session_id)
            self._run_batch(batch)
            if time.monotonic() - self._last_purge > PURGE_EVERY_S:  # a store with a ttl drops idle sessions
                self._last_purge = time.monotonic()
                try:
                    self.store.purge_expired()
                except Exception:  # noqa: BLE001 - housekeeping never stops the turns
                    logger.exception("purging expired sessions failed")

    def _run_batch(self, batch: list[_Request]) -> None:
        for group in _group(batch):
            try:
                self._run_group(group)
            except BaseException as error:  # noqa: BLE001 - every request of the group learns why
                logger.exception("chat batch failed")
                for request in group:
                    if not request.future.done():
                        request.future.set_exception(error)

    def _run_group(self, group: list[_Request]) -> None:
        with contextlib.ExitStack() as locks:
            ready: list[tuple[_Request, SessionRecord, object, DeltaMemory]] = []
            for request in sorted(group, key=lambda r: r.session_id):  # one lock order: no deadlock
                try:
                    locks.enter_context(self.store.lock(request.session_id, self.limits.lock_timeout))
                    record = self.store.load(request.session_id) or SessionRecord()
                    keep, new = follow(record.messages, request.messages, self.policy)
                    if keep < len(record.messages):
                        record = self._fork(record, keep, new)
                    plan = plan_turn(record.messages, record.processed, new, self.tokenizer, self.policy)
                    memory = (
                        DeltaMemory.from_bytes(record.memory)
                        if record.memory is not None
                        else self.model.new_memory(batch_size=1)
                    )
                    if self.memory:  # a session this model cannot read fails alone, not its batch
                        self.model.check_memory(memory)
                except BaseException as error:  # noqa: BLE001 - only this request fails
                    request.future.set_exception(error)
                    continue
                if not self.memory:
                    plan.writes, plan.prompt_writes, plan.prompt_mask = [], [], None
                ready.append((request, record, plan, memory))
            if not ready:
                return
            started = time.perf_counter()
            plans = [plan for _, _, plan, _ in ready]
            if self.policy.write == "prompt" and self.memory:  # the reply prompt writes too: its memory comes back
                memories, reads = self._prompt_writes(plans, [m for *_, m in ready])
                read_from, writing = memories, {"write_masks": [p.prompt_mask for p in plans], "reads": reads}
            else:
                memories = self._write([plan.writes for plan in plans], [m for *_, m in ready])
                reads = self._reads([plan.messages[-1]["content"] for plan in plans])
                read_from = [m if read else self.model.new_memory(batch_size=1) for m, read in zip(memories, reads)]
                writing = {}
            clock = _FirstToken() if self.on_batch is not None else None  # no streamer when nobody listens
            replies, written = self._generate(
                [r for r, *_ in ready], [plan.prompt for plan in plans], read_from, clock, **writing
            )
            if written is not None:
                memories = written
            if clock is not None:
                end = time.perf_counter()
                first = clock.first if clock.first is not None else end
                self.on_batch(BatchStats(
                    sessions=len(ready),
                    tokens_written=sum(plan.tokens_written for plan in plans),
                    prompt_tokens=sum(len(plan.prompt) for _, _, plan, _ in ready),
                    new_tokens=sum(len(tokens) for tokens, _ in replies),
                    write_s=clock.start - started, prefill_s=first - clock.start, decode_s=end - first,
                ))  # fmt: skip
            for (request, record, plan, _), memory, read, (tokens, finish) in zip(ready, memories, reads, replies):
                reply = _text(self.tokenizer, tokens)
                stats = dict(record.stats)
                stats["turns"] = stats.get("turns", 0) + 1
                if self.router is not None:
                    stats["memory_reads"] = stats.get("memory_reads", 0) + read
                stats["tokens_written"] = stats.get("tokens_written", 0) + plan.tokens_written
                checkpoints, checkpoint_memory = record.checkpoints, record.checkpoint_memory
                if (
                    self.memory
                    and plan.processed - (checkpoints[-1] if checkpoints else 0) >= self.policy.checkpoint_every
                ):
                    saved = [DeltaMemory.from_bytes(checkpoint_memory)] if checkpoint_memory is not None else []
                    checkpoints = [*checkpoints, plan.processed]
                    rows = DeltaMemory.cat([*saved, memory])
                    keep = thin_checkpoints(len(checkpoints), self.policy.max_checkpoints)
                    if len(keep) < len(checkpoints):  # the turn's cost stays bounded however long the session
                        checkpoints, rows = [checkpoints[i] for i in keep], rows.select(keep)
                    checkpoint_memory = rows.to_bytes()
                new_record = SessionRecord(
                    messages=plan.messages + [{"role": "assistant", "content": reply}],
                    processed=plan.processed,
                    memory=memory.to_bytes(),
                    stats=stats,
                    checkpoints=checkpoints,
                    checkpoint_memory=checkpoint_memory,
                )
                self.store.save(request.session_id, new_record)
                request.future.set_result(TurnResult(reply, len(plan.prompt), len(tokens), plan.tokens_written, finish))

    def _fork(self, record: SessionRecord, keep: int, new: list) -> SessionRecord:
        """The session cut to ``record.messages[:keep]``, its memory as it was after the messages it may still hold:
        the nearest checkpoint at or before that point (the messages after it are written again by the turn)."""
        point = rollback_point(record.messages, record.processed, keep, new, self.policy)
        stats = {**record.stats, "forks": record.stats.get("forks", 0) + 1}
        if point == record.processed:  # nothing written past the fork: the memory stays as it is
            return SessionRecord(record.messages[:keep], record.processed, record.memory, stats,
                                 record.checkpoints, record.checkpoint_memory)  # fmt: skip
        kept = [c for c in record.checkpoints if c <= point]
        memory = checkpoint_memory = None
        if kept:
            rows = DeltaMemory.from_bytes(record.checkpoint_memory)
            if rows.batch_size != len(record.checkpoints):
                raise RuntimeError(
                    f"the session's checkpoint memory has {rows.batch_size} rows for {len(record.checkpoints)} "
                    "checkpoints; the stored session is damaged (reset or delete it)"
                )
            memory = rows.select([len(kept) - 1]).to_bytes()
            checkpoint_memory = rows.select(list(range(len(kept)))).to_bytes()
        return SessionRecord(record.messages[:keep], kept[-1] if kept else 0, memory, stats, kept, checkpoint_memory)

    @torch.no_grad()
    def _write(self, writes: list[list[list[int]]], memories: list[DeltaMemory]) -> list[DeltaMemory]:
        """Write each row's messages in order, one message per call, rows batched (right padding)."""
        memories = list(memories)
        device = self._device()
        for step in range(max((len(w) for w in writes), default=0)):
            rows = [i for i, w in enumerate(writes) if len(w) > step]
            ids, mask = pad_rows([writes[i][step] for i in rows], self.pad_id, "right")
            memory = DeltaMemory.cat([memories[i] for i in rows])
            kwargs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "memory": memory}
            if self.segment_writes:  # one message per call: one segment
                kwargs["memory_segment_ids"] = torch.zeros_like(ids).to(device)
            self.model(**kwargs, use_cache=False, logits_to_keep=1)
            for j, i in enumerate(rows):
                memories[i] = memory.select([j])
        return memories

    @torch.no_grad()
    def _prompt_writes(self, plans: list, memories: list[DeltaMemory]) -> tuple[list[DeltaMemory], list[bool]]:
        """``write="prompt"``: run each row's earlier prompts in order (prefill only, rows batched, each reading as
        the router decides for its user message) and return the memories and the reply prompts' read decisions."""
        texts = [w.reads_for for plan in plans for w in plan.prompt_writes] + [p.messages[-1]["content"] for p in plans]
        decisions = iter(self._reads(texts))
        earlier = [[next(decisions) for _ in plan.prompt_writes] for plan in plans]
        reads = [next(decisions) for _ in plans]
        memories = list(memories)
        for step in range(max((len(p.prompt_writes) for p in plans), default=0)):
            rows = [i for i, p in enumerate(plans) if len(p.prompt_writes) > step]
            writes = [plans[i].prompt_writes[step] for i in rows]
            requests = [_Request("write", [], GenerationParams(max_new_tokens=1), None) for _ in rows]
            _, written = self._generate(
                requests, [w.ids for w in writes], [memories[i] for i in rows],
                write_masks=[w.mask for w in writes], reads=[earlier[i][step] for i in rows],
            )  # fmt: skip
            for j, i in enumerate(rows):
                memories[i] = written[j]
        return memories, reads

    def _reads(self, texts: list[str]) -> list[bool]:
        """Whether each reply reads its memory: the router's decision on the user message it answers (the turn's
        last message: ``check_new_messages``); without a router every reply reads it."""
        if self.router is None or not texts:
            return [True] * len(texts)
        return self.router.reads_memory(self.model, self.tokenizer, texts)

    @torch.no_grad()
    def _generate(
        self, requests: list[_Request], prompts: list[list[int]], memories: list[DeltaMemory], clock=None,
        min_new_tokens: int = 0, write_masks: list[list[bool]] | None = None, reads: list[bool] | None = None,
    ):  # fmt: skip
        """One generate over all rows (left padding); ``clock`` (a :class:`_FirstToken`) notes when the first new
        token came. Without ``write_masks`` the rows read their memories without writing; with them the prompt
        tokens they mark are written (not the reply) and the rows read as ``reads`` says. Returns the replies and,
        with ``write_masks``, each request's memory after the prompt's writes (else None)."""
        device = self._device()
        if self.compile_config is not None:  # a few batch sizes, each compiled once (warm_up): 1, 2, 4, 8, ...
            extra = _bucket(len(requests)) - len(requests)  # copies of the first row (greedy: they stop with it)
            prompts, memories = prompts + [prompts[0]] * extra, memories + [memories[0]] * extra
            if write_masks is not None:
                write_masks, reads = write_masks + [write_masks[0]] * extra, reads + [reads[0]] * extra
        ids, mask = pad_rows(prompts, self.pad_id, "left")
        width = ids.shape[1]
        params = requests[0].params
        limit = max(r.params.max_new_tokens for r in requests)
        sampling = {"do_sample": False}
        if params.temperature > 0:
            sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p}
        streamer = _RowStreamer(self.tokenizer, requests, self.stop_ids) if any(r.on_text for r in requests) else None
        if clock is not None:
            clock.inner, streamer = streamer, clock
        kwargs = {"memory": DeltaMemory.cat(memories), "memory_writes": False} if self.memory else {}
        if self.memory and write_masks is not None:
            width = ids.shape[1]
            written = torch.zeros(ids.shape, dtype=torch.bool)
            for j, row in enumerate(write_masks):
                if row:
                    written[j, width - len(row) :] = torch.tensor(row, dtype=torch.bool)
            kwargs.update(
                memory_writes=True, memory_write_mask=written.to(device), memory_write_generated=False,
                memory_reads=torch.tensor(reads, dtype=torch.bool, device=device),
            )  # fmt: skip
        if self.compile_config is not None:
            kwargs.update(cache_implementation="static", compile_config=self.compile_config)
        with contextlib.nullcontext() if self.memory else adapters_disabled(self.model):
            out = self.model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=limit,
                min_new_tokens=min_new_tokens,
                pad_token_id=self.pad_id,
                eos_token_id=sorted(self.stop_ids),
                streamer=streamer,
                **kwargs,
                **sampling,
            )
        results = []
        for j, request in enumerate(requests):
            generated = out[j, width:].tolist()[: request.params.max_new_tokens]
            stop = next((k for k, t in enumerate(generated) if t in self.stop_ids), None)
            if stop is not None:
                results.append((generated[:stop], "stop"))
            else:
                results.append((generated, "length"))
        if write_masks is None or not self.memory:
            return results, None
        return results, [kwargs["memory"].select([j]) for j in range(len(requests))]

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def warm_up(self) -> float:
        """Run the decoding path at every batch size a turn can take, so that a compiled engine compiles its
        decoding step before the first turn. A compiled engine rounds a batch up to 1, 2, 4, 8, … rows (it adds
        copies of its first row, whose replies are dropped), so there are a few sizes to compile, each once; the
        prompt length is dynamic after the first two (torch.compile makes a size dynamic once it has seen it
        change). Returns the seconds it took; touches no session. Without ``compile`` it runs the same small
        generates."""
        started = time.perf_counter()
        sizes = [1 << i for i in range(1, _bucket(self.max_batch_size).bit_length())]
        for rows, width in [(1, 5), (1, 11)] + [(b, 7) for b in sizes]:
            requests = [_Request("warm-up", [], GenerationParams(max_new_tokens=4), None) for _ in range(rows)]
            prompts = [[self.pad_id] * (width + j) for j in range(rows)]
            memories = [self.model.new_memory(batch_size=1) for _ in range(rows)]
            if self.memory and self.policy.write == "prompt":  # the decoding step of turns that write their prompt
                self._generate(
                    requests, prompts, memories, min_new_tokens=4,
                    write_masks=[[True] * len(p) for p in prompts], reads=[True] * rows,
                )  # fmt: skip
            else:
                self._generate(requests, prompts, memories, min_new_tokens=4)  # every decoding step runs
        return time.perf_counter() - started


def _group(batch: list[_Request]) -> list[list[_Request]]:
    """Requests that can share one generate (same sampling settings)."""
    groups: dict[tuple, list[_Request]] = {}
    for request in batch:
        groups.setdefault(request.params.key(), []).append(request)
    return list(groups.values())


EXPORT_FORMAT = "peft-deltamem-session/1"
PURGE_EVERY_S = 60.0


def _b64(blob: bytes | None) -> str | None:
    import base64

    return None if blob is None else base64.b64encode(blob).decode("ascii")


def _from_b64(text: object) -> bytes | None:
    import base64

    if text is None:
        return None
    if not isinstance(text, str):
        raise TypeError(f"expected a base64 string, got {type(text).__name__}")
    return base64.b64decode(text, validate=True)


def _bucket(rows: int) -> int:
    """The batch size a compiled engine runs ``rows`` rows at: the next power of two."""
    return 1 << (rows - 1).bit_length()


def _compile_config(device: torch.device):
    """transformers' compile settings for the engine's decoding steps: CUDA graphs on a GPU (its default), the
    default mode elsewhere, where transformers only compiles when told to (``_compile_all_devices``)."""
    import shutil

    from transformers import CompileConfig

    if device.type == "cpu" and shutil.which("g++") is None and shutil.which("c++") is None:
        raise RuntimeError(
            "compiled decoding on a CPU needs a C++ compiler (torch.compile's inductor backend builds C++ kernels); "
            "install one (apt install g++) or turn compilation off (compile=False, --no-compile)"
        )
    config = CompileConfig() if device.type == "cuda" else CompileConfig(mode="default")
    config._compile_all_devices = True
    return config


def _stop_ids(model, tokenizer) -> set[int]:
    ids = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    if not ids:
        raise ValueError("neither the model's generation_config nor the tokenizer names an end-of-sequence token")
    return ids


def _segment_writes(model) -> bool:
    configs = getattr(model, "peft_config", {})
    return any(getattr(c, "write_granularity", None) == "segment" for c in configs.values())


def _text(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


class _FirstToken(BaseStreamer):
    """A streamer that notes when it was made (``start``: just before generate) and when generate's first new
    token came (its second ``put``: the first is the prompt), and passes everything on to ``inner`` (another
    streamer, or None)."""

    def __init__(self) -> None:
        self.inner: BaseStreamer | None = None
        self.start = time.perf_counter()
        self.first: float | None = None
        self.puts = 0

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()
        if self.inner is not None:
            self.inner.put(value)

    def end(self) -> None:
        if self.inner is not None:
            self.inner.end()


class _RowStreamer(BaseStreamer):
    """Hands each row's new text to its request's ``on_text`` as generate produces tokens.

    The pieces of a row add up to exactly the reply the turn returns (and saves).
    """

    def __init__(self, tokenizer, requests: list[_Request], stop_ids: set[int]) -> None:
        self.tokenizer = tokenizer
        self.requests = requests
        self.stop_ids = stop_ids
        self.tokens: list[list[int]] = [[] for _ in requests]
        self.sent = [""] * len(requests)
        self.done = [False] * len(requests)
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate first passes the prompt
            self.prompt_seen = True
            return
        for j, token in enumerate(value.view(value.shape[0], -1)[: len(self.requests), -1].tolist()):
            if self.done[j]:
                continue
            if token in self.stop_ids or len(self.tokens[j]) >= self.requests[j].params.max_new_tokens:
                self.done[j] = True
                continue
            self.tokens[j].append(token)
            self._send(j)

    def end(self) -> None:
        for j in range(len(self.requests)):
            self._send(j)

    def _send(self, j: int) -> None:
        text = _text(self.tokenizer, self.tokens[j])
        callback = self.requests[j].on_text
        if callback is not None and text.startswith(self.sent[j]) and len(text) > len(self.sent[j]):
            callback(text[len(self.sent[j]) :])
            self.sent[j] = text
