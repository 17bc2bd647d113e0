"""`DeltaMemory`: the δ-mem memory as an explicit value that the caller owns and passes to each call."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

FORMAT = "peft-deltamem/memory"
FORMAT_VERSION = 2

# The fields that must match between a memory and the adapter that reads or writes it.
_DESCRIPTOR = (
    "adapter_name",
    "r",
    "num_state_heads",
    "delta_heads",
    "write_granularity",
    "hidden_size",
    "layers",
    "config_hash",
)


class DeltaMemory:
    """The memory of every adapted layer of one adapter: one float32 ``(batch, H, r, r)`` tensor per layer.

    Create one with ``model.new_memory(batch_size)`` and pass it to calls: ``model(**batch, memory=mem)``,
    ``model.generate(**batch, memory=mem)``. A call reads ``mem`` and, only if it completes, replaces all of its
    layer states at once with the new ones (see docs/concepts.md). A call without ``memory=`` starts from an
    empty memory and keeps nothing.

    Rows are batch rows (one conversation / user each): :meth:`select`, :meth:`cat`, :meth:`reset`,
    :meth:`clone`; :meth:`save` / :meth:`load` write and read a safetensors file with the metadata that is
    checked against the adapter when the memory is used. Calls that use one memory object are serialised by
    a lock on the object; a change made while a call ran (from another thread) makes that call raise.
    """

    def __init__(
        self,
        *,
        adapter_name: str,
        r: int,
        num_state_heads: int,
        delta_heads: Sequence[str],
        write_granularity: str,
        hidden_size: int,
        layers: Sequence[str],
        config_hash: str,
        weights_hash: str | None,
        states: dict[str, torch.Tensor],
    ) -> None:
        self.adapter_name = adapter_name
        self.r = int(r)
        self.num_state_heads = int(num_state_heads)
        self.delta_heads = tuple(delta_heads)
        self.write_granularity = write_granularity
        self.hidden_size = int(hidden_size)
        self.layers = tuple(layers)
        self.config_hash = config_hash
        self.weights_hash = weights_hash
        self._lock = threading.RLock()
        self._version = 0
        self._states = dict(states)
        self._validate(self._states)

    # ------------------------------------------------------------------------------------------ views

    @property
    def batch_size(self) -> int:
        return next(iter(self._states.values())).shape[0]

    @property
    def states(self) -> dict[str, torch.Tensor]:
        """A copy of the layer states: ``{layer name: float32 (batch, H, r, r)}``."""
        with self._lock:
            return {name: t.detach().clone() for name, t in self._states.items()}

    @property
    def is_empty(self) -> bool:
        """True if every state is exactly zero (nothing written, or reset)."""
        with self._lock:
            return all(not bool(t.any()) for t in self._states.values())

    def descriptor(self) -> dict:
        return {name: getattr(self, name) for name in _DESCRIPTOR}

    def __repr__(self) -> str:
        return (
            f"DeltaMemory(adapter={self.adapter_name!r}, batch_size={self.batch_size}, layers={len(self.layers)}, "
            f"r={self.r}, state_heads={self.num_state_heads})"
        )

    def __getstate__(self) -> dict:
        with self._lock:
            state = dict(self.__dict__)
        state.pop("_lock")
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    # ------------------------------------------------------------------------------------------- rows

    def _like(self, states: dict[str, torch.Tensor]) -> DeltaMemory:
        memory = DeltaMemory(
            **{k: getattr(self, k) for k in _DESCRIPTOR}, weights_hash=self.weights_hash, states=states
        )
        return memory

    def clone(self) -> DeltaMemory:
        """An independent copy."""
        return self._like(self.states)

    def select(self, rows) -> DeltaMemory:
        """A new memory with the given rows, in that order (int indices, repeats allowed, or a bool mask)."""
        with self._lock:
            index = row_index(rows, self.batch_size, "select")
            return self._like({n: t.index_select(0, index.to(t.device)).clone() for n, t in self._states.items()})

    @classmethod
    def cat(cls, memories: Sequence[DeltaMemory]) -> DeltaMemory:
        """Concatenate the rows of memories of the same adapter configuration into one new memory."""
        memories = list(memories)
        if not memories or not all(isinstance(m, DeltaMemory) for m in memories):
            raise TypeError("DeltaMemory.cat expects a non-empty sequence of DeltaMemory objects.")
        first = memories[0]
        for other in memories[1:]:
            for name in _DESCRIPTOR:
                if getattr(other, name) != getattr(first, name):
                    raise ValueError(
                        f"DeltaMemory.cat: the memories differ in {name} ({getattr(first, name)!r} vs "
                        f"{getattr(other, name)!r}); only memories of one adapter configuration can be joined."
                    )
        states = {}
        for name in first.layers:
            parts = []
            for m in memories:
                with m._lock:
                    parts.append(m._states[name].to(first._states[name].device))
            states[name] = torch.cat(parts, 0)
        # The weights that wrote the rows travel with them: rows written by different weights are never joined
        # (an empty memory was written by nothing and joins any).
        hashes = {m.weights_hash for m in memories if not m.is_empty} or {first.weights_hash}
        if len(hashes) > 1:
            raise ValueError(
                f"DeltaMemory.cat: the memories were written by different weights of adapter {first.adapter_name!r} "
                f"(fingerprints {sorted(map(str, hashes))}); rows of one memory must come from one set of weights. "
                "Use each memory with the model that wrote it."
            )
        memory = first._like(states)
        memory.weights_hash = hashes.pop()
        return memory

    def reset(self, rows=None) -> None:
        """Empty the memory: all rows (``rows=None``), or the given rows (int indices or a bool mask)."""
        with self._lock:
            if rows is None:
                new = {n: torch.zeros_like(t) for n, t in self._states.items()}
            else:
                index = row_index(rows, self.batch_size, "reset")
                new = {}
                for n, t in self._states.items():
                    t = t.clone()
                    t[index.to(t.device)] = 0.0
                    new[n] = t
            self._states = new
            self._version += 1

    # ----------------------------------------------------------------------------- used by the runtime

    def _snapshot(self) -> tuple[dict[str, torch.Tensor], int]:
        with self._lock:
            return dict(self._states), self._version

    def _commit(self, states: dict[str, torch.Tensor], version: int, weights_hash: str | None) -> None:
        """Replace every layer state at once; refuses if the memory changed since the call read it."""
        with self._lock:
            if self._version != version:
                raise RuntimeError(
                    "This DeltaMemory was changed by another call while this call ran (two threads using one "
                    "memory object?). The call's writes were discarded; give each thread its own memory "
                    "(mem.clone(), mem.select(rows)) or serialise the calls."
                )
            merged = dict(self._states)
            merged.update(states)
            self._states = merged
            self._version += 1
            self.weights_hash = weights_hash

    def _validate(self, states: dict[str, torch.Tensor]) -> None:
        if set(states) != set(self.layers):
            missing, unknown = set(self.layers) - set(states), set(states) - set(self.layers)
            raise ValueError(
                f"Memory tensors do not match its layers (missing {sorted(missing)}, unknown {sorted(unknown)})."
            )
        batch = None
        for name, tensor in states.items():
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"Memory state of {name} is a {type(tensor).__name__}, not a tensor.")
            batch = tensor.shape[0] if batch is None and tensor.dim() > 0 else batch
            expected = (batch, self.num_state_heads, self.r, self.r)
            if tuple(tensor.shape) != expected:
                raise ValueError(f"Memory state of {name} has shape {tuple(tensor.shape)}; expected {expected}.")
            if tensor.dtype != torch.float32:
                raise ValueError(f"Memory state of {name} is {tensor.dtype}; δ-mem states are float32.")
        if states and not all_finite(states.values()):
            raise ValueError("Memory state contains NaN or infinite values; refusing to use it.")

    # -------------------------------------------------------------------------------------- save/load

    def metadata(self) -> dict[str, str]:
        fields = {name: getattr(self, name) for name in _DESCRIPTOR}
        fields["delta_heads"], fields["layers"] = list(self.delta_heads), list(self.layers)
        fields["weights_hash"] = self.weights_hash
        return {"format": FORMAT, "format_version": str(FORMAT_VERSION), "fields": json.dumps(fields)}

    def to_bytes(self) -> bytes:
        """The memory as the bytes of a safetensors file (what :meth:`save` writes; for stores such as Redis)."""
        with self._lock:
            tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in self._states.items()}
            metadata = self.metadata()
        return safetensors_save(tensors, metadata=metadata)

    @classmethod
    def from_bytes(cls, data: bytes, device: str | torch.device = "cpu", source: str = "memory bytes") -> DeltaMemory:
        """Read bytes written by :meth:`to_bytes`; raises ``ValueError`` for bytes that are not a δ-mem memory.

        The adapter-weights fingerprint is compared with the model's at the first call that uses the memory.
        """
        try:
            metadata = _safetensors_metadata(data)
            tensors = {name: t.to(device) for name, t in safetensors_load(data).items()}
        except (SafetensorError, ValueError, TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"{source} are not a readable safetensors file ({err}); truncated or corrupted?") from err
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{source} hold a safetensors file but not a δ-mem memory (no '{FORMAT}' metadata).")
        if metadata.get("format_version") != str(FORMAT_VERSION):
            raise ValueError(
                f"{source} have memory format version {metadata.get('format_version')}; this peft-deltamem reads "
                f"version {FORMAT_VERSION}. Upgrade peft-deltamem."
            )
        try:
            fields = json.loads(metadata["fields"])
            kwargs = {name: fields[name] for name in _DESCRIPTOR}
            kwargs["r"], kwargs["num_state_heads"] = int(kwargs["r"]), int(kwargs["num_state_heads"])
            kwargs["hidden_size"] = int(kwargs["hidden_size"])
            weights_hash = fields["weights_hash"]
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as err:
            raise ValueError(f"{source} have damaged memory metadata ({err!r}).") from err
        if not tensors:
            raise ValueError(f"{source} hold no layer states.")
        memory = cls(**kwargs, weights_hash=weights_hash, states=tensors)
        return memory

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        """Write the memory to a safetensors file (atomically; refuses to replace a file unless ``overwrite``)."""
        if not isinstance(overwrite, bool):
            raise TypeError(f"overwrite must be a bool, got {type(overwrite).__name__}.")
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it.")
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_bytes()
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> DeltaMemory:
        """Read a memory written by :meth:`save`; raises ``ValueError`` for files that are not one.

        The adapter-weights fingerprint is compared with the model's at the first call that uses the memory.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No memory file at {path}.")
        return cls.from_bytes(path.read_bytes(), device=device, source=str(path))


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (8-byte little-endian length, then JSON)."""
    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    length = int.from_bytes(data[:8], "little")
    if length > len(data) - 8:
        raise ValueError(f"header of {length} bytes in {len(data)} bytes of data")
    return json.loads(data[8 : 8 + length]).get("__metadata__") or {}


def all_finite(tensors) -> bool:
    """Whether every tensor is finite, with a single host sync.

    A few small tensors (a decoding step's states) are checked as one: one stack (one cat when their shapes
    differ), one ``isfinite``. Larger ones
    (prefill and write calls of wide states: megabytes) one by one without copies: a finite value times 0 is 0 and
    an infinite or NaN one gives NaN, so a tensor is finite exactly when the sum of ``t * 0`` is 0 (one pass and a
    reduction, where ``isfinite`` of a cat copies them all and makes several passes)."""
    tensors = list(tensors)
    if not tensors:
        return True
    first = tensors[0].device
    if sum(t.numel() for t in tensors) > _SMALL_CHECK:
        return bool(torch.stack([t.mul(0).sum().float().to(first) for t in tensors]).sum() == 0)
    try:  # the usual case, every tensor on one device: one stack (or cat), one check
        shape = tensors[0].shape
        if all(t.shape == shape for t in tensors):
            return bool(torch.isfinite(torch.stack(tensors)).all())
        return bool(torch.isfinite(torch.cat([t.reshape(-1) for t in tensors])).all())
    except RuntimeError:  # tensors on several devices (a model spread over GPUs)
        pass
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t.reshape(-1))
    flags = [torch.isfinite(torch.cat(group)).all().to(first) for group in by_device.values()]
    return bool(flags[0] if len(flags) == 1 else torch.stack(flags).all())


_SMALL_CHECK = 1 << 16  # elements: up to here all_finite checks all tensors at once (one stack or cat)


def row_index(rows, batch: int, what: str) -> torch.Tensor:
    """Long index tensor for ``rows``: ints (negative allowed, repeats allowed) or a bool mask of length ``batch``."""
    if isinstance(rows, (str, bytes)) or isinstance(rows, bool):
        raise TypeError(f"{what}: rows must be int indices or a bool mask, got {rows!r}.")
    if isinstance(rows, int):
        rows = [rows]
    if isinstance(rows, torch.Tensor):
        tensor = rows.detach().cpu()
        if tensor.dim() == 0:
            tensor = tensor.view(1)
    else:
        items = list(rows)
        if not all(isinstance(i, (int, bool)) or (isinstance(i, torch.Tensor) and i.dim() == 0) for i in items):
            raise TypeError(f"{what}: rows must be int indices or a bool mask, got {rows!r}.")
        if items and all(isinstance(i, bool) for i in items):
            tensor = torch.tensor(items, dtype=torch.bool)
        elif any(isinstance(i, bool) for i in items):
            raise TypeError(f"{what}: rows mixes bools and ints ({rows!r}).")
        else:
            tensor = torch.tensor([int(i) for i in items], dtype=torch.long)
    if tensor.dtype == torch.bool:
        if tensor.dim() != 1 or tensor.shape[0] != batch:
            raise ValueError(
                f"{what}: a bool row mask needs length {batch} (the memory's batch size), got {tuple(tensor.shape)}."
            )
        return tensor.nonzero().view(-1)
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex:
        raise TypeError(f"{what}: rows must be int indices or a bool mask, got a {tensor.dtype} tensor.")
    tensor = tensor.long().view(-1)
    if tensor.numel() and (tensor.min() < -batch or tensor.max() >= batch):
        raise IndexError(f"{what}: rows {tensor.tolist()} out of range for a memory of {batch} rows.")
    return tensor % batch if batch else tensor
