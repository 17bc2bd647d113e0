"""The memory of one generate() call: carried from step to step, reordered and rolled back with the KV cache.

``DeltaMemModel.generate`` opens a :class:`Generation` (thread-local to the runtime) around transformers'
``generate``. Each forward step of that generate reads the generation's working state and, when it
completes, makes its final state the working state. The working state has one row per row that
transformers runs (``batch × num_beams`` or ``batch × num_return_sequences``).

The KV cache object that transformers passes to the steps gets a subclass (its class is swapped for the
duration of the call) whose ``reorder_cache`` (beam search), ``crop`` (assisted / prompt-lookup decoding:
rejected draft tokens), ``batch_repeat_interleave`` and ``batch_select_indices`` apply the same operation
to the working state, so every cache type (dynamic, static, sliding window) carries the memory along.

Without a cache (``use_cache=False``) every step re-feeds the whole sequence; each step then starts from
the memory as it was before generate(), so the prompt is written once, not once per step.
"""

from __future__ import annotations

import contextlib

import torch

from .runtime import SEGMENT_IDS_KWARG, WRITES_KWARG, CallRecord, check_bool, check_reads
from .state import DeltaMemory

_CACHE_CLASSES: dict[type, type] = {}


def _memory_cache_class(cls: type) -> type:
    if getattr(cls, "_delta_mem_cache", False):
        return cls
    if cls not in _CACHE_CLASSES:

        def reorder_cache(self, beam_idx):
            cls.reorder_cache(self, beam_idx)
            self._delta_mem_generation.apply_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

        def crop(self, max_length):
            cls.crop(self, max_length)
            self._delta_mem_generation.crop(max_length)

        def batch_repeat_interleave(self, repeats):
            cls.batch_repeat_interleave(self, repeats)
            self._delta_mem_generation.apply_rows(lambda t: t.repeat_interleave(repeats, dim=0))

        def batch_select_indices(self, indices):
            cls.batch_select_indices(self, indices)
            self._delta_mem_generation.apply_rows(lambda t: t[indices.to(t.device)])

        _CACHE_CLASSES[cls] = type(
            cls.__name__,
            (cls,),
            {
                "_delta_mem_cache": True,
                "__module__": cls.__module__,
                "reorder_cache": reorder_cache,
                "crop": crop,
                "batch_repeat_interleave": batch_repeat_interleave,
                "batch_select_indices": batch_select_indices,
            },
        )
    return _CACHE_CLASSES[cls]


class Generation:
    """State of one generate() call. ``memory`` is the caller's memory, or None (stateless generate)."""

    def __init__(
        self,
        runtime,
        memory: DeltaMemory | None,
        adapter: str | None,
        prompt_length: int,
        writes: bool,
        write_generated: bool,
        write_mask: torch.Tensor | None,
        segment_ids: torch.Tensor | None,
        track_steps: bool,
        attention_mask: torch.Tensor | None = None,
        read_rows: torch.Tensor | None = None,
    ) -> None:
        self.runtime = runtime
        self.attention_mask = attention_mask if isinstance(attention_mask, torch.Tensor) else None
        self.memory = memory
        self.adapter = adapter
        self.prompt_length = prompt_length
        self.writes = writes
        self.write_generated = write_generated
        self.write_mask = write_mask
        self.segment_ids = segment_ids
        self.track_steps = track_steps
        self.read_rows = read_rows
        if memory is not None:
            states, self.version = memory._snapshot()
            self.initial = {(name, memory.adapter_name): t for name, t in states.items()}
            self.rows = memory.batch_size
        else:
            self.initial, self.version, self.rows = {}, 0, None
        self.expand: int | None = None
        self.working: dict | None = None
        self.prompt_states: dict | None = None
        self.last: tuple | None = None  # (input states, per-token states, whether it wrote) of the last call
        self.caches: list = []  # (cache, original class)

    # ------------------------------------------------------------------------------------ step calls

    def _expanded_initial(self, batch: int) -> dict:
        if self.expand is None:
            if self.rows is None:
                self.expand = 1
            elif batch % self.rows:
                raise ValueError(
                    f"generate() runs {batch} rows but the memory has {self.rows}; the call's batch size must match "
                    "the memory's rows."
                )
            else:
                self.expand = batch // self.rows
        if self.expand == 1:
            return dict(self.initial)
        return {k: t.repeat_interleave(self.expand, dim=0) for k, t in self.initial.items()}

    def prepare(self, record: CallRecord, kwargs: dict) -> None:
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        batch, length = ids.shape[0], ids.shape[1]
        cache = kwargs.get("past_key_values")
        cached = cache is not None and hasattr(cache, "get_seq_length") and kwargs.get("use_cache", True) is not False
        if cached:
            if not getattr(type(cache), "_delta_mem_cache", False):
                self.caches.append((cache, type(cache)))
                cache.__class__ = _memory_cache_class(type(cache))
            cache._delta_mem_generation = self
            past = int(cache.get_seq_length())
            source = self.working if self.working is not None and past > 0 else self._expanded_initial(batch)
        else:
            past = 0
            source = self._expanded_initial(batch)
        record.initial = source
        record.generation = self
        mask = kwargs.get("attention_mask")
        if not (isinstance(mask, torch.Tensor) and mask.dim() == 2) and self.attention_mask is not None:
            record.attention_mask = self._tracked_mask(batch, past + length, ids.device)
        record.past_length = past
        record.track_steps = self.track_steps and cached
        if self.read_rows is not None:
            rows = self.read_rows
            if rows.numel() and rows.shape[0] != batch:
                rows = rows.repeat_interleave(batch // rows.shape[0])
            record.read_rows = rows
        record.writes = self.writes and (self.write_generated or past < self.prompt_length)
        start, end = past, past + length
        if record.writes and (self.write_mask is not None or not self.write_generated):
            device = ids.device
            prompt_part = (
                self.write_mask[:, start : min(end, self.prompt_length)].to(device=device, dtype=torch.bool)
                if self.write_mask is not None
                else torch.ones(batch, max(0, min(end, self.prompt_length) - start), dtype=torch.bool, device=device)
            )
            if prompt_part.shape[0] != batch:
                prompt_part = prompt_part.repeat_interleave(batch // prompt_part.shape[0], dim=0)
            generated = torch.full((batch, end - start - prompt_part.shape[1]), self.write_generated, device=device)
            record.write_mask = torch.cat([prompt_part, generated], dim=1)
        if self.segment_ids is not None and start < self.prompt_length:
            ids_part = self.segment_ids[:, start : min(end, self.prompt_length)]
            if ids_part.shape[0] != batch:
                ids_part = ids_part.repeat_interleave(batch // ids_part.shape[0], dim=0)
            if end > self.prompt_length:
                if self.write_generated and record.writes:
                    ids_part = None  # generated tokens have no segment ids: the layer says so
                else:
                    fill = ids_part[:, -1:].expand(batch, end - self.prompt_length)
                    ids_part = torch.cat([ids_part, fill], dim=1)
            record.segment_ids = ids_part

    def _tracked_mask(self, batch: int, end: int, device) -> torch.Tensor:
        """The 2-D mask of the first ``end`` positions: the prompt's mask, then ones for generated tokens."""
        prompt = self.attention_mask[:, :end].to(device)
        if prompt.shape[0] != batch:
            prompt = prompt.repeat_interleave(batch // prompt.shape[0], dim=0)
        extra = end - prompt.shape[1]
        return torch.cat([prompt, prompt.new_ones(batch, extra)], dim=1) if extra > 0 else prompt

    def after_call(self, record: CallRecord) -> None:
        new = dict(record.initial)
        new.update(record.final_states)
        if record.past_length == 0 and self.prompt_states is None:
            self.prompt_states = new
        self.working = new
        self.last = (dict(record.input_states), dict(record.step_states), record.writes)

    # --------------------------------------------------------------------------- cache-driven changes

    def apply_rows(self, fn) -> None:
        if self.working is not None:
            self.working = {k: fn(t) for k, t in self.working.items()}
        self.last = None

    def crop(self, max_length: int) -> None:
        """Roll back the last call's writes for the tokens the cache dropped (``crop(-n)``: the last n)."""
        if max_length == 0:
            return
        if max_length > 0:
            raise NotImplementedError("δ-mem can only roll back the memory for crop(-n) (drop the last n tokens).")
        remove = -max_length
        if self.last is None:
            raise RuntimeError("δ-mem cannot roll the memory back: the cache was cropped twice after one call.")
        input_states, step_states, wrote = self.last
        self.last = None
        if not wrote:
            return
        new = dict(self.working)
        for key, before in input_states.items():
            steps = step_states.get(key)
            length = steps.shape[2] if steps is not None else 1
            if remove > length:
                raise RuntimeError(f"δ-mem cannot roll back {remove} tokens: the last call fed {length}.")
            keep = length - remove
            if keep == 0:
                new[key] = before
            elif steps is None:
                raise RuntimeError("δ-mem cannot roll back part of a call whose per-token states were not kept.")
            else:
                new[key] = steps[:, :, keep]
        self.working = new

    # ------------------------------------------------------------------------------------------- end

    def restore_caches(self) -> None:
        for cache, cls in self.caches:
            cache.__class__ = cls
            cache.__dict__.pop("_delta_mem_generation", None)
        self.caches.clear()

    def finish(self) -> None:
        """Commit into the caller's memory: the final state, or the prompt's state when rows were expanded."""
        if self.memory is None or self.working is None:
            return
        if self.expand == 1:
            final = self.working
        else:
            final = {k: t[:: self.expand] for k, t in (self.prompt_states or self.working).items()}
        self.runtime.commit(self.memory, self.version, final)


_ROLLBACK_OPTIONS = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")


def generate_with_memory(
    runtime,
    model,
    *args,
    memory: DeltaMemory | None = None,
    memory_writes: bool = True,
    memory_write_mask: torch.Tensor | None = None,
    memory_write_generated: bool | None = None,
    memory_reads: bool | torch.Tensor = True,
    memory_segment_ids: torch.Tensor | None = None,
    memory_input_ids: torch.Tensor | None = None,
    memory_attention_mask: torch.Tensor | None = None,
    **kwargs,
):
    """transformers' ``generate`` with the memory carried from step to step.

    Installed as the ``generate`` of the adapted transformers model, so ``PeftModel.generate`` and a model
    adapted through transformers' ``load_adapter`` both take these keywords:

    - ``memory``: read by the prompt and updated when generate() returns (without it, generate starts from
      an empty memory and keeps nothing);
    - ``memory_writes=False``: nothing is written; ``memory_write_mask`` / ``memory_segment_ids`` describe
      the prompt's tokens;
    - ``memory_write_generated``: whether the generated tokens are written (default: the adapter's
      ``write_generated_tokens``); ``False`` with a write mask writes chosen prompt tokens only;
    - ``memory_reads``: False, or a (batch,) bool tensor of the rows that read the memory: the other rows'
      tokens do not read it (their outputs are the frozen model's) but still write what the call writes;
    - ``memory_input_ids`` (+ ``memory_attention_mask``; ``memory_segment_ids`` then describe that stream):
      an episode: the stream is written into a fresh memory that the prompt and the generated tokens read
      without writing.
    """
    original = type(model).generate
    check_bool(memory_writes, WRITES_KWARG)
    if memory_write_generated is not None:
        check_bool(memory_write_generated, "memory_write_generated")
    read_rows = check_reads(memory_reads)
    adapters = runtime.active_adapters()
    if memory is not None:
        runtime.check_memory(memory)
    if memory_input_ids is not None:
        if memory is not None:
            raise ValueError("Pass either memory= or memory_input_ids= to generate(), not both.")
        if adapters:
            memory = runtime.new_memory(memory_input_ids.shape[0], adapters[0])
            with torch.no_grad():
                model(
                    input_ids=memory_input_ids,
                    attention_mask=memory_attention_mask,
                    use_cache=False,
                    memory=memory,
                    **({SEGMENT_IDS_KWARG: memory_segment_ids} if memory_segment_ids is not None else {}),
                )
        memory_segment_ids, memory_writes = None, False
    if not adapters:
        return original(model, *args, **kwargs)
    if memory is not None and memory.adapter_name not in adapters:
        raise ValueError(f"This memory belongs to adapter {memory.adapter_name!r}; the active adapter is {adapters}.")
    if memory is not None and len(adapters) > 1:
        raise ValueError(f"A memory holds one adapter's states but {len(adapters)} adapters are active.")
    prompt = kwargs.get("input_ids", args[0] if args else None)
    if prompt is None:
        prompt = kwargs.get("inputs_embeds")
    if memory is not None and prompt is not None and prompt.shape[0] != memory.batch_size:
        raise ValueError(
            f"generate() got {prompt.shape[0]} prompt rows but the memory has {memory.batch_size}: each prompt row "
            "reads and updates its own memory row. Pass model.new_memory(batch_size={0}) or DeltaMemory.cat([...]) "
            "with one row per prompt; for several replies to one prompt, pass one prompt row and "
            "num_return_sequences (or num_beams).".replace("{0}", str(prompt.shape[0]))
        )
    if read_rows is not None and read_rows.numel() and prompt is not None and read_rows.shape[0] != prompt.shape[0]:
        raise ValueError(
            f"memory_reads has {read_rows.shape[0]} entries but generate() got {prompt.shape[0]} prompt rows; pass "
            "one bool per prompt row."
        )
    generation_config = kwargs.get("generation_config") or model.generation_config
    rollback = any(
        kwargs.get(name, getattr(generation_config, name, None)) not in (None, False) for name in _ROLLBACK_OPTIONS
    )
    if rollback and any(runtime.describe(a)["write_granularity"] == "segment" for a in adapters):
        raise NotImplementedError(
            "δ-mem cannot run assisted / prompt-lookup decoding with write_granularity='segment': a rejected draft "
            "token's segment write cannot be rolled back. Use greedy, sampling or beam search."
        )
    generation = Generation(
        runtime,
        memory,
        adapters[0],
        prompt_length=prompt.shape[1] if prompt is not None else 0,
        writes=memory_writes,
        write_generated=(
            all(runtime.configs[a].write_generated_tokens for a in adapters)
            if memory_write_generated is None
            else memory_write_generated
        ),
        write_mask=memory_write_mask,
        segment_ids=memory_segment_ids,
        track_steps=rollback,
        attention_mask=kwargs.get("attention_mask"),
        read_rows=read_rows,
    )
    lock = memory._lock if memory is not None else contextlib.nullcontext()
    previous = runtime.generation
    runtime.generation = generation
    try:
        with lock:
            output = original(model, *args, **kwargs)
            generation.finish()
    finally:
        runtime.generation = previous
        generation.restore_caches()
    return output
