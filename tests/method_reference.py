"""method.md written out by hand in float64, one token and one state head at a time (the tests' shared oracle).

Independent of the package's layers and scan ops: tests compare those against these few lines.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def memory_read(state: torch.Tensor, w_q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """read = S q̂ with q̂ = L2normalize(tanh(W_mq x)); ``state`` (r, r), ``w_q`` (r, d), ``x`` (d,)."""
    return state @ F.normalize(torch.tanh(w_q @ x), dim=0)


def memory_write(
    state: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor, w_beta: torch.Tensor, b_beta: torch.Tensor, x
) -> torch.Tensor:
    """S ← diag(1 − β) S + diag(β) (v̂ − S k̂) k̂ᵀ for the hidden state ``x``.

    ``w_beta`` (r, d) / ``b_beta`` (r,) give one gate per row of S; (1, d) / (1,) one gate for the whole head.
    """
    k = F.normalize(torch.tanh(w_k @ x), dim=0)
    v = w_v @ x
    beta = torch.sigmoid(w_beta @ x + b_beta)
    return (1 - beta)[:, None] * state + beta[:, None] * torch.outer(v - state @ k, k)
