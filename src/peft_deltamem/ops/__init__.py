"""The δ-mem memory scan: one entry point, several implementations.

``delta_rule(...)`` is what the adapter layers call. ``impl`` picks an implementation by name;
``None`` means the process-wide default (``"auto"`` unless changed with :func:`use_impl`).
Every implementation has the signature and semantics of :func:`naive.naive_delta_rule`:

* ``"naive"``: the readable step-by-step oracle.
* ``"fused_recurrent"``: the step form, fewest ops per step; for decoding (T of 1 or a few).
* ``"chunk"``: chunk-parallel WY form with a log-depth scan across chunks; for prefill / training.
* ``"auto"``: ``fused_recurrent`` up to :data:`AUTO_RECURRENT_MAX_T` steps or from a state width of
  :data:`AUTO_RECURRENT_MIN_RANK`, ``chunk`` otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from .chunk import chunk_delta_rule
from .fused_recurrent import fused_recurrent_delta_rule
from .fused_recurrent import token_read as token_read  # the layers' decoding step: read now,
from .fused_recurrent import token_write as token_write  # write at the end of the call, all layers at once
from .naive import naive_delta_rule

ScanFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]

IMPLEMENTATIONS: dict[str, ScanFn] = {
    "naive": naive_delta_rule,
    "chunk": chunk_delta_rule,
    "fused_recurrent": fused_recurrent_delta_rule,
}
_default_impl = "auto"

# Up to this many steps the step form (about 20 µs a step) wins over the chunk form (a fixed
# ~150 µs of a few dozen ops, then ~1 µs a token). Crossover measured on a 2-core CPU, r=8, forward:
# T ~ 8 at B*H = 1, T ~ 12 at B*H = 8, T ~ 32 at B*H = 32 (forward+backward: T ~ 6 to 16).
# Decoding (T = 1) and short speculative blocks take the step form, prefill and training the chunk form.
AUTO_RECURRENT_MAX_T = 8
# The chunk form's work per token grows as r^2 x C per state head (every row of the state has its own
# decay, so its C x C systems are per row), the step form's as r^2: from r = 32 the step form is faster
# at every length measured, forward and backward (B=8, H=3, r=64, T=32: 5.5 ms against 139 ms forward,
# 38 against 279 ms with the backward; at r=16 the chunk form still wins the backward from T ~ 256;
# `scripts/bench_scan.py --batch 8 --heads 3 --rank 64 --T 8 16 32 64 256`, docs/benchmarks.md).
AUTO_RECURRENT_MIN_RANK = 32


def _auto(q: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    if q.shape[2] <= AUTO_RECURRENT_MAX_T or q.shape[3] >= AUTO_RECURRENT_MIN_RANK:
        return fused_recurrent_delta_rule(q, *args, **kwargs)
    return chunk_delta_rule(q, *args, **kwargs)


IMPLEMENTATIONS["auto"] = _auto


def _resolve(impl: str | None) -> ScanFn:
    name = _default_impl if impl is None else impl
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"Unknown δ-mem scan implementation {name!r}; choose one of {sorted(IMPLEMENTATIONS)}.")
    return IMPLEMENTATIONS[name]


@contextlib.contextmanager
def use_impl(name: str) -> Iterator[None]:
    """Temporarily make ``name`` the default scan implementation (for tests and benchmarks)."""
    global _default_impl
    _resolve(name)
    previous, _default_impl = _default_impl, name
    try:
        yield
    finally:
        _default_impl = previous


def token_step_enabled() -> bool:
    """Whether single-token decoding steps take :func:`token_read` and :func:`token_write` (the default
    implementation is ``"auto"`` or ``"fused_recurrent"``); under ``use_impl("naive")`` or ``"chunk"`` every step
    runs that scan."""
    return _default_impl in ("auto", "fused_recurrent")


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor,
    write_mask: torch.Tensor | None = None,
    *,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read-before-write gated delta rule scan; see :mod:`peft_deltamem.ops.naive` for shapes."""
    return _resolve(impl)(q, k, v, beta, initial_state, write_mask)


def delta_rule_states(
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor,
    write_mask: torch.Tensor | None = None,
    *,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """States *before* each step, ``(B, H, T, r, r)``, and the final state.

    Reading with the r basis vectors as queries returns the r columns of each state, so any
    scan implementation gives the states without a second code path (used by segment writes,
    where T is the number of segments).
    """
    b, h, t, r = k.shape
    eye = torch.eye(r, device=k.device, dtype=k.dtype)
    q = eye.view(1, 1, r, 1, r).expand(b, h, r, t, r).reshape(b, h * r, t, r)

    def fold(x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(2).expand(b, h, r, *x.shape[2:]).reshape(b, h * r, *x.shape[2:])

    reads, final = delta_rule(q, fold(k), fold(v), fold(beta), fold(initial_state), write_mask, impl=impl)
    # reads[b, h*r + i, t] = S_{t-1} e_i = column i of the state before step t
    states = reads.view(b, h, r, t, r).permute(0, 1, 3, 4, 2)
    return states, final.view(b, h, r, r, r)[:, :, 0]


def read_only(q: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """Reads of a call that does not write: every step reads the same state. Returns (B, H, T, r) in float32 math,
    as the scans (float64 inputs stay float64)."""
    dtype = torch.promote_types(torch.promote_types(q.dtype, state.dtype), torch.float32)
    return torch.einsum("bhij,bhtj->bhti", state.to(dtype), q.to(dtype))
