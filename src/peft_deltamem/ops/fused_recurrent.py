"""Step form of the δ-mem scan, for decoding (T small, typically 1).

Same contract as :func:`peft_deltamem.ops.naive.naive_delta_rule`, written for the fewest ops
per step (about 18 µs for one step at B = H = 1 on a 2-core CPU, vs 36 µs for the naive loop
body). One step (T = 1) is rearranged as ``S - beta * (S + (S k - v) k^T)``, two ``addcmul`` calls.
T > 1 loops over the steps with one GEMM for ``S q`` and ``S k`` and the update as
``(1 - beta) S - (beta (S k - v)) k^T``, in place when autograd does not need the states. A step with
``write_mask`` False runs with ``beta = 0``, which leaves the state bit-for-bit unchanged without a ``where``.

:func:`token_read` and :func:`token_write` are the per-token memory step of a decoding layer, split in two: the
read (feature map of the query and ``S q``) runs in the layer, the write (feature maps of key and gate, the update)
of every layer of a call at once, stacked, after the last layer (a layer's write depends only on its own input).
About eight ops per layer and a dozen per call, instead of the fifty per layer of the general path.
"""

from __future__ import annotations

import torch


def _step(
    state: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One read-before-write step. ``state`` (B, H, r, r); ``q, k, v, beta`` (B, H, 1, r).

    Returns ``(read (B, H, 1, r), new_state)``.
    """
    read = (state @ q.transpose(-1, -2)).transpose(-1, -2)
    residual = state @ k.transpose(-1, -2) - v.transpose(-1, -2)  # S k - v, (B, H, r, 1)
    new_state = torch.addcmul(state, beta.transpose(-1, -2), torch.addcmul(state, residual, k), value=-1.0)
    return read, new_state


def fused_recurrent_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor,
    write_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recurrent read-before-write gated delta rule; returns ``(reads (B, H, T, r), final_state)``.

    float32 math and outputs whatever the input dtype (float64 inputs stay float64).
    """
    dtype = torch.promote_types(torch.promote_types(q.dtype, initial_state.dtype), torch.float32)
    state = initial_state.to(dtype)
    steps = q.shape[2]
    q, k, v, beta = q.to(dtype), k.to(dtype), v.to(dtype), beta.to(dtype)
    if write_mask is not None:
        beta = beta * write_mask.reshape(write_mask.shape[0], 1, steps, 1).to(dtype)
    if steps == 1:
        return _step(state, q, k, v, beta)
    if steps == 0:
        return q.new_zeros(q.shape), state
    # Per step: one GEMM gives S q and S k (as rows: [q; k] S^T, contiguous operands), then the update as
    # (1 - beta) S - (beta (S k - v)) k^T: two passes over the state. The per-step operands are sliced once.
    # Without autograd the state is updated in place (the same ops, the same numbers): a fresh state tensor per
    # step costs as much as the arithmetic at r = 64 (a new allocation of B·H·r² floats).
    in_place = not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, beta, state)))
    if in_place:
        state = state.clone()
    queries_keys = torch.stack((q, k), dim=3).unbind(2)  # T × (B, H, 2, r)
    key_rows = k.unsqueeze(-2).unbind(2)  # T × (B, H, 1, r)
    values = v.unbind(2)  # T × (B, H, r)
    gates = beta.unsqueeze(-1)  # (B, H, T, r, 1): one gate per state row
    decays, gates = (1.0 - gates).unbind(2), gates.unbind(2)
    reads = []
    for t in range(steps):
        both = torch.matmul(queries_keys[t], state.transpose(-1, -2))  # (B, H, 2, r): (S q)^T and (S k)^T
        reads.append(both[:, :, 0])
        residual = (both[:, :, 1] - values[t]).unsqueeze(-1)  # S k - v, (B, H, r, 1)
        if in_place:
            state.mul_(decays[t]).addcmul_(gates[t] * residual, key_rows[t], value=-1.0)
        else:
            state = torch.addcmul(state * decays[t], gates[t] * residual, key_rows[t], value=-1.0)
    return torch.stack(reads, 2), state


def token_read(projected: torch.Tensor, state: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The read of one decoding token: ``scale · S q`` with ``q = normalize(tanh(.))`` of the query block.

    ``projected`` (B, 4·H·r) is the token's memory projection (W_mq, W_mk, W_mv, W_β row blocks), or its query block
    alone (B, H·r), ``state`` (B, H, r, r) the state before the token. The feature map runs in the projection's dtype
    (as the general path), the product in float32. Returns (B, H·r) float32. With :func:`token_write` the same
    numbers as the feature maps followed by :func:`fused_recurrent_delta_rule` with T = 1 (read before write).
    ``scale``: a factor the product applies (the layer's correction scale, which then needs no op of its own).

    Written on 2-D and 3-D tensors with one ``baddbmm``: a batched ``matmul`` of 4-D operands or a ``Linear`` of a 3-D
    input reshapes around the same kernel, and each extra op costs microseconds per layer and token inside a model.
    """
    batch, heads, r = projected.shape[0], state.shape[1], state.shape[-1]
    q = torch.tanh(projected[:, : heads * r]).view(batch * heads, r, 1)
    q = (q / torch.linalg.vector_norm(q, dim=1, keepdim=True).clamp_min(1e-12)).float()  # F.normalize
    # beta = 0: the first operand only gives the shape (its values are ignored)
    read = torch.baddbmm(q, state.reshape(batch * heads, r, r).float(), q, beta=0.0, alpha=scale)
    return read.view(batch, heads * r)


def token_write(
    projected: torch.Tensor,
    beta_bias: torch.Tensor,
    state: torch.Tensor,
    write_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The write of one decoding token into the state, for any number of stacked layers at once.

    ``projected`` (N, B, 4·H·r): each layer's memory projection of the token (N layers, or N = 1), ``beta_bias``
    (N, 1, H·r) the layers' gate biases, ``state`` (N, B, H, r, r) the states before the token, ``write_mask``
    (N, B) or None. Computes ``k = normalize(tanh(.))`` and ``beta = sigmoid(. + b_β)`` in the projection's dtype
    and ``S - beta ⊙ (S + (S k - v) k^T)`` in float32; a row with ``write_mask`` False gets ``beta = 0`` and keeps
    its state bit for bit. Returns the new states (N, B, H, r, r), float32.

    A decoding layer reads at once (:func:`token_read`) and leaves its write for the end of the call: every
    layer's write depends only on its own input, so the writes of all layers run as one batch of these ops.
    """
    n, batch, heads, r = state.shape[0], state.shape[1], state.shape[2], state.shape[-1]
    blocks = projected.view(n, batch, 4, heads, r)
    k = torch.tanh(blocks[:, :, 1])
    k = k / torch.linalg.vector_norm(k, dim=-1, keepdim=True).clamp_min(1e-12)  # F.normalize
    beta = torch.sigmoid(blocks[:, :, 3] + beta_bias.view(n, 1, heads, r))
    value = blocks[:, :, 2]
    if k.dtype != torch.float32:
        k, beta, value = k.float(), beta.float(), value.float()
    if write_mask is not None:
        beta = beta * write_mask.view(n, batch, 1, 1).to(beta.dtype)
    state = state.float()
    residual = torch.matmul(state, k.unsqueeze(-1)) - value.unsqueeze(-1)  # S k - v, (N, B, H, r, 1)
    updated = torch.addcmul(state, residual, k.unsqueeze(-2))  # S + (S k - v) k^T
    return torch.addcmul(state, beta.unsqueeze(-1), updated, value=-1.0)
