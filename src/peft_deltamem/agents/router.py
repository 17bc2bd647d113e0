"""Which replies read the memory: one decision per reply, from the user's last message.

A δ-mem read gate decides per token and per layer, and on a small model its small reads still tip the near-ties of
replies that need no memory (docs/open_memory.md). :class:`MemoryRouter` decides once per reply instead: the raw text
of the user's last message (no chat template) goes through the frozen model (adapters off), the hidden states of one
layer are mean-pooled over its tokens, and a linear score above 0 means "this reply reads the session's memory".
A reply that does not read it is generated with an empty memory, which reads zeros: exactly the frozen model's
reply. The session's memory itself is written and kept as always.

The router is a file beside the adapter's weights, :data:`ROUTER_FILE` (safetensors: ``weight`` (hidden,),
``bias`` (), metadata ``layer``), fitted by ``scripts/train_memory_router.py``; the chat engine uses it when the
adapter directory has one (``peft-deltamem chat|serve --no-router`` turns it off).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .models import adapters_disabled

ROUTER_FILE = "memory_router.safetensors"


class _Stop(Exception):
    """Raised by the hook that takes a layer's output, so the layers above it are not run."""


@torch.no_grad()
def pooled_hidden_states(model, tokenizer, texts: list[str], layer: int, batch_size: int = 16) -> torch.Tensor:
    """``(len(texts), hidden)`` float32: the mean over each text's tokens of ``hidden_states[layer]`` of the model
    with its adapters off (the embeddings are layer 0). Below the last layer the forward stops at ``layer``."""
    off = adapters_disabled(model)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = base.get_decoder().layers
    taken: list[torch.Tensor] = []

    def take(module, args, output):  # the output of decoder layer `layer - 1` is hidden_states[layer]
        taken.append(output[0] if isinstance(output, tuple) else output)
        raise _Stop

    early = 0 < layer < len(layers)
    rows = []
    with off:
        for start in range(0, len(texts), batch_size):
            ids = [tokenizer(t, add_special_tokens=False).input_ids or [pad] for t in texts[start : start + batch_size]]
            width = max(map(len, ids))
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids], device=device)
            batch = torch.tensor([i + [pad] * (width - len(i)) for i in ids], device=device)
            if early:
                handle = layers[layer - 1].register_forward_hook(take)
                try:
                    model(input_ids=batch, attention_mask=mask, use_cache=False)
                except _Stop:
                    pass
                finally:
                    handle.remove()
                states = taken.pop().float()
            else:
                out = model(input_ids=batch, attention_mask=mask, output_hidden_states=True, logits_to_keep=1)
                states = out.hidden_states[layer].float()
            weights = mask.unsqueeze(-1).float()
            rows.append((states * weights).sum(1) / weights.sum(1))
    return torch.cat(rows) if rows else torch.zeros(0, base.config.hidden_size)


@dataclass
class MemoryRouter:
    """``score(x) = weight · pooled(x) + bias``; a reply reads the memory when the score is above 0."""

    layer: int
    weight: torch.Tensor
    bias: float

    def __post_init__(self) -> None:
        if not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"the router's layer must be a non-negative integer, got {self.layer!r}")
        if self.weight.dim() != 1 or not torch.isfinite(self.weight).all() or not math.isfinite(self.bias):
            raise ValueError("the router's weight must be a finite vector and its bias a finite number; refit it")
        self.weight = self.weight.float()

    def check(self, model) -> None:
        """Refuse a router fitted on another model shape (its hidden size or layer count)."""
        config = model.config
        if self.weight.numel() != config.hidden_size or self.layer > config.num_hidden_layers:
            raise ValueError(
                f"the memory router was fitted on hidden states of size {self.weight.numel()} at layer {self.layer}; "
                f"this model has hidden size {config.hidden_size} and {config.num_hidden_layers} layers. Refit it "
                "(scripts/train_memory_router.py) or serve without it (--no-router)"
            )

    def scores(self, model, tokenizer, texts: list[str]) -> list[float]:
        pooled = pooled_hidden_states(model, tokenizer, texts, self.layer)
        return (pooled @ self.weight.to(pooled.device) + self.bias).tolist()

    def reads_memory(self, model, tokenizer, texts: list[str]) -> list[bool]:
        return [score > 0 for score in self.scores(model, tokenizer, texts)]

    @classmethod
    def fit(cls, memory: torch.Tensor, other: torch.Tensor, layer: int, l2: float = 1e-2) -> MemoryRouter:
        """Balanced logistic regression on pooled hidden states of messages that need the memory (``memory``) and
        of messages that do not (``other``), features standardised, L2 penalty ``l2``, fitted with L-BFGS."""
        if len(memory) == 0 or len(other) == 0:
            raise ValueError("fitting a router needs messages of both kinds")
        x = torch.cat([memory, other]).float()
        y = torch.cat([torch.ones(len(memory)), torch.zeros(len(other))])
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
        z = (x - mean) / std
        w = torch.zeros(z.shape[1], requires_grad=True)
        b = torch.zeros((), requires_grad=True)
        optimizer = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")
        pos_weight = torch.tensor(len(other) / len(memory))

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y, pos_weight=pos_weight)
            loss = loss + l2 * w.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        weight = w.detach() / std
        return cls(layer, weight, float(b.detach() - (mean * weight).sum()))

    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        from safetensors.torch import save_file

        path = Path(directory) / ROUTER_FILE
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
        save_file(
            {"weight": self.weight.contiguous(), "bias": torch.tensor(self.bias)}, str(path),
            metadata={"layer": str(self.layer)},
        )  # fmt: skip
        return path

    @classmethod
    def load(cls, directory: str | Path) -> MemoryRouter | None:
        """The router saved in an adapter directory, or None when it has none."""
        from safetensors import safe_open

        path = Path(directory) / ROUTER_FILE
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                layer = int((f.metadata() or {})["layer"])
                weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
        except Exception as error:  # noqa: BLE001 - any unreadable file gets the same clear message
            raise ValueError(f"{path} is not a memory router file ({error}); refit it or remove it") from error
        return cls(layer, weight, float(bias))
