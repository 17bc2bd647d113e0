"""`MemoryState`: a detached, portable snapshot of a model's δ-mem memory."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FORMAT = "peft-deltamem/memory-state"
FORMAT_VERSION = 1


@dataclass
class MemoryState:
    """The memory of every adapted layer for one adapter, plus what is needed to validate it.

    ``states`` maps the attention module name (e.g. ``model.layers.0.self_attn``) to a float32
    tensor of shape ``(batch, num_state_heads, r, r)``. An empty memory has no tensors.
    """

    adapter_name: str
    r: int
    num_state_heads: int
    delta_heads: tuple[str, ...]
    write_granularity: str
    layers: tuple[str, ...]
    config_hash: str
    states: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return not self.states

    @property
    def batch_size(self) -> int:
        return next(iter(self.states.values())).shape[0] if self.states else 0

    def metadata(self) -> dict[str, str]:
        fields = {
            "adapter_name": self.adapter_name,
            "r": self.r,
            "num_state_heads": self.num_state_heads,
            "delta_heads": list(self.delta_heads),
            "write_granularity": self.write_granularity,
            "layers": list(self.layers),
            "config_hash": self.config_hash,
        }
        return {"format": FORMAT, "format_version": str(FORMAT_VERSION), "fields": json.dumps(fields)}

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        """Write the state to a safetensors file (atomically; refuses to replace a file unless ``overwrite``)."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it.")
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in self.states.items()}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=self.metadata())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> MemoryState:
        """Read a state written by :meth:`save`; raises ``ValueError`` for files that are not one."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No memory state file at {path}.")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                metadata = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(
                f"{path} is not a readable safetensors file ({err}); was it truncated or corrupted?"
            ) from err
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is a safetensors file but not a δ-mem memory state (no '{FORMAT}' metadata).")
        if metadata.get("format_version") != str(FORMAT_VERSION):
            raise ValueError(
                f"{path} has memory-state format version {metadata.get('format_version')}; this peft-deltamem reads "
                f"version {FORMAT_VERSION}. Upgrade peft-deltamem."
            )
        try:
            fields = json.loads(metadata["fields"])
            state = cls(
                adapter_name=fields["adapter_name"],
                r=int(fields["r"]),
                num_state_heads=int(fields["num_state_heads"]),
                delta_heads=tuple(fields["delta_heads"]),
                write_granularity=fields["write_granularity"],
                layers=tuple(fields["layers"]),
                config_hash=fields["config_hash"],
                states=tensors,
            )
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} has damaged memory-state metadata ({err!r}).") from err
        state.validate_tensors()
        return state

    def validate_tensors(self) -> None:
        """Check shapes, dtype, layer names and finiteness of the tensors."""
        unknown = set(self.states) - set(self.layers)
        if unknown:
            raise ValueError(f"Memory state has tensors for layers it does not list: {sorted(unknown)}.")
        if self.states and set(self.states) != set(self.layers):
            raise ValueError(f"Memory state lacks the layers {sorted(set(self.layers) - set(self.states))}.")
        batch = self.batch_size
        for name, tensor in self.states.items():
            expected = (batch, self.num_state_heads, self.r, self.r)
            if tuple(tensor.shape) != expected:
                raise ValueError(f"Memory state of {name} has shape {tuple(tensor.shape)}; expected {expected}.")
            if tensor.dtype != torch.float32:
                raise ValueError(f"Memory state of {name} is {tensor.dtype}; δ-mem states are float32.")
            if not torch.isfinite(tensor).all():
                raise ValueError(f"Memory state of {name} contains NaN or infinite values; refusing to use it.")
