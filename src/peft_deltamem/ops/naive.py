"""Readable sequential reference of the δ-mem memory scan (the oracle for every fast path).

Shapes (B = batch, H = state heads, T = steps, r = memory rank):

    q, k, v, beta : (B, H, T, r)   q and k already L2-normalised, beta in (0, 1)
    initial_state : (B, H, r, r)   float32; ``S @ k`` maps a key to a value
    write_mask    : (B, T) bool    steps that write (padding / writes-off steps do not)

For each step t (read before write)::

    read_t = S_{t-1} q_t
    S_t    = diag(1 - beta_t) S_{t-1} + diag(beta_t) (v_t - S_{t-1} k_t) k_t^T

Steps with ``write_mask`` False leave the state unchanged; their read is still returned (the
caller zeroes reads of padded tokens). All arithmetic is float32 whatever the input dtype.
"""

from __future__ import annotations

import torch


def naive_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor,
    write_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the gated delta rule one step at a time.

    Returns ``(reads, final_state)``: reads ``(B, H, T, r)`` and the state after the last step
    ``(B, H, r, r)``, both float32.
    """
    q, k, v, beta = (x.float() for x in (q, k, v, beta))
    state = initial_state.float()
    reads = []
    for t in range(q.shape[2]):
        q_t, k_t, v_t, b_t = q[:, :, t], k[:, :, t], v[:, :, t], beta[:, :, t]
        reads.append(torch.einsum("bhij,bhj->bhi", state, q_t))
        prediction = torch.einsum("bhij,bhj->bhi", state, k_t)
        new_state = (1.0 - b_t).unsqueeze(-1) * state + (b_t * (v_t - prediction)).unsqueeze(-1) * k_t.unsqueeze(-2)
        if write_mask is None:
            state = new_state
        else:
            state = torch.where(write_mask[:, t].view(-1, 1, 1, 1), new_state, state)
    return torch.stack(reads, dim=2), state
