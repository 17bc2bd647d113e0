"""Fast scan implementations (chunk, fused_recurrent, auto) against the naive oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peft_deltamem import ops
from peft_deltamem.ops import IMPLEMENTATIONS, delta_rule, delta_rule_states, use_impl
from peft_deltamem.ops.chunk import DEFAULT_CHUNK_SIZE, chunk_delta_rule
from peft_deltamem.ops.fused_recurrent import fused_recurrent_delta_rule
from peft_deltamem.ops.naive import naive_delta_rule

FAST_IMPLS = ["chunk", "fused_recurrent", "auto"]
C = DEFAULT_CHUNK_SIZE
LENGTHS = [1, 2, C - 1, C, C + 1, 3 * C + 7]


def make_inputs(
    b: int = 2,
    h: int = 3,
    t: int = 20,
    r: int = 8,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    state_scale: float = 0.5,
) -> list[torch.Tensor]:
    """q, k (unit norm), v, beta in (0, 1) and a non-zero float32 initial state."""
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, h, t, r, generator=gen), dim=-1)
    k = F.normalize(torch.randn(b, h, t, r, generator=gen), dim=-1)
    v = torch.randn(b, h, t, r, generator=gen)
    beta = torch.sigmoid(2 * torch.randn(b, h, t, r, generator=gen))
    state = state_scale * torch.randn(b, h, r, r, generator=gen)
    q, k, v, beta = (x.to(dtype) for x in (q, k, v, beta))
    return [q, k, v, beta, state.to(torch.float64 if dtype == torch.float64 else torch.float32)]


def make_mask(kind: str, b: int, t: int, seed: int = 1) -> torch.Tensor | None:
    """Write masks: none, left / right padding of random length per row, random holes, all off."""
    gen = torch.Generator().manual_seed(seed)
    pos = torch.arange(t)
    if kind == "none":
        return None
    if kind == "off":
        return torch.zeros(b, t, dtype=torch.bool)
    if kind == "random":
        return torch.rand(b, t, generator=gen) > 0.3
    lengths = torch.randint(0, t + 1, (b,), generator=gen)
    lengths[0] = t  # one full row
    if kind == "right":
        return pos.unsqueeze(0) < lengths.unsqueeze(1)
    if kind == "left":
        return pos.unsqueeze(0) >= (t - lengths).unsqueeze(1)
    raise ValueError(kind)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max abs difference relative to the max abs of the reference."""
    scale = expected.detach().abs().max().clamp_min(1e-12)
    return ((actual.detach().double() - expected.detach().double()).abs().max() / scale).item()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    assert actual.shape == expected.shape
    err = rel_err(actual, expected)
    assert err <= tol, f"relative error {err:.3g} > {tol:.1g}"


def run(impl: str, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    return delta_rule(*args, impl=impl, **kwargs)


def test_registry() -> None:
    assert {"naive", "chunk", "fused_recurrent", "auto"} <= set(IMPLEMENTATIONS)
    with pytest.raises(ValueError):
        delta_rule(*make_inputs(t=2), impl="nope")
    with use_impl("chunk"):
        assert ops._default_impl == "chunk"
    assert ops._default_impl == "auto"


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("t", LENGTHS)
def test_forward_matches_naive(impl: str, t: int) -> None:
    inputs = make_inputs(t=t, seed=t)
    mask = make_mask("random", 2, t, seed=t)
    expected = naive_delta_rule(*inputs, mask)
    reads, state = run(impl, *inputs, mask)
    assert reads.dtype == state.dtype == torch.float32
    assert_close(reads, expected[0], 1e-5)
    assert_close(state, expected[1], 1e-5)


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("kind", ["none", "left", "right", "random", "off"])
def test_padding_masks(impl: str, kind: str) -> None:
    t = 2 * C + 5
    inputs = make_inputs(b=4, h=2, t=t, seed=3)
    mask = make_mask(kind, 4, t, seed=4)
    expected = naive_delta_rule(*inputs, mask)
    reads, state = run(impl, *inputs, mask)
    assert_close(reads, expected[0], 1e-5)
    assert_close(state, expected[1], 1e-5)
    if kind == "off":
        torch.testing.assert_close(state, inputs[4], rtol=0, atol=0)


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("t", [1, C + 1, 3 * C + 7])
def test_gradients_match_naive(impl: str, t: int) -> None:
    inputs = make_inputs(t=t, seed=10 + t)
    mask = make_mask("random", 2, t, seed=t)
    gen = torch.Generator().manual_seed(99)
    grad_reads = torch.randn(2, 3, t, 8, generator=gen)
    grad_state = torch.randn(2, 3, 8, 8, generator=gen)

    def grads(fn) -> list[torch.Tensor]:
        leaves = [x.clone().requires_grad_() for x in inputs]
        reads, state = fn(*leaves, mask)
        torch.autograd.backward([reads, state], [grad_reads, grad_state])
        return [x.grad for x in leaves]

    expected = grads(naive_delta_rule)
    actual = grads(lambda *a: run(impl, *a))
    for name, got, want in zip("q k v beta initial_state".split(), actual, expected):
        assert rel_err(got, want) <= 1e-4, name


@pytest.mark.parametrize(
    "fn",
    [
        fused_recurrent_delta_rule,
        lambda *a: chunk_delta_rule(*a, chunk_size=2),
        lambda *a: chunk_delta_rule(*a, chunk_size=4),
    ],
    ids=["fused_recurrent", "chunk2", "chunk4"],
)
def test_gradcheck_float64(fn) -> None:
    q, k, v, beta, state = make_inputs(b=1, h=2, t=5, r=3, seed=5, dtype=torch.float64)
    beta = beta.clamp(0.05, 0.95)
    mask = torch.tensor([[True, True, False, True, True]])
    leaves = [x.clone().requires_grad_() for x in (q, k, v, beta, state)]
    assert torch.autograd.gradcheck(lambda *a: fn(*a, mask), leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(impl: str, dtype: torch.dtype) -> None:
    t = C + 3
    inputs = make_inputs(t=t, seed=7, dtype=dtype)
    mask = make_mask("right", 2, t)
    expected = naive_delta_rule(*inputs, mask)  # upcasts the same rounded inputs
    reads, state = run(impl, *inputs, mask)
    assert reads.dtype == state.dtype == torch.float32
    assert_close(reads, expected[0], 1e-5)
    assert_close(state, expected[1], 1e-5)


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_single_head_small_rank(impl: str) -> None:
    t = 2 * C + 1
    inputs = make_inputs(b=1, h=1, t=t, r=4, seed=8)
    expected = naive_delta_rule(*inputs)
    reads, state = run(impl, *inputs)
    assert_close(reads, expected[0], 1e-5)
    assert_close(state, expected[1], 1e-5)


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_beta_near_one(impl: str) -> None:
    """Saturated writes (beta == 1 happens after bf16 rounding) match the oracle, gradients included."""
    t = 2 * C + 3
    q, k, v, beta, state = make_inputs(t=t, seed=11)
    gen = torch.Generator().manual_seed(0)
    beta = torch.sigmoid(12 * torch.randn(beta.shape, generator=gen))  # many exact 1.0 and 1 - 1e-6
    beta[0, 0, :4] = 1.0
    assert (beta == 1.0).any()

    def forward_backward(fn) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        leaves = [x.clone().requires_grad_() for x in (q, k, v, beta, state)]
        reads, final = fn(*leaves)
        (reads.square().sum() + final.square().sum()).backward()
        return reads, final, [x.grad for x in leaves]

    expected = forward_backward(naive_delta_rule)
    reads, final, grads = forward_backward(lambda *a: run(impl, *a))
    assert_close(reads, expected[0], 1e-5)
    assert_close(final, expected[1], 1e-5)
    for name, got, want in zip("q k v beta initial_state".split(), grads, expected[2]):
        assert rel_err(got, want) <= 1e-4, name


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_pieces_equal_at_once(impl: str) -> None:
    t1, t2 = C + 3, 2 * C + 5
    q, k, v, beta, state = make_inputs(t=t1 + t2, seed=12)
    mask = make_mask("random", 2, t1 + t2)
    whole_reads, whole_state = run(impl, q, k, v, beta, state, mask)
    reads1, mid = run(impl, q[:, :, :t1], k[:, :, :t1], v[:, :, :t1], beta[:, :, :t1], state, mask[:, :t1])
    reads2, end = run(impl, q[:, :, t1:], k[:, :, t1:], v[:, :, t1:], beta[:, :, t1:], mid, mask[:, t1:])
    assert_close(torch.cat([reads1, reads2], 2), whole_reads, 1e-5)
    assert_close(end, whole_state, 1e-5)


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_decode_steps_equal_at_once(impl: str) -> None:
    """Token-by-token decoding (T == 1 calls) reproduces the prefill scan."""
    t = 6
    q, k, v, beta, state = make_inputs(t=t, seed=13)
    whole_reads, whole_state = run(impl, q, k, v, beta, state)
    reads = []
    for i in range(t):
        sl = slice(i, i + 1)
        read, state = run(impl, q[:, :, sl], k[:, :, sl], v[:, :, sl], beta[:, :, sl], state)
        reads.append(read)
    assert_close(torch.cat(reads, 2), whole_reads, 1e-5)
    assert_close(state, whole_state, 1e-5)


@pytest.mark.parametrize("chunk_size", [1, 3, 8, 64])
def test_chunk_sizes(chunk_size: int) -> None:
    t = 3 * C + 7
    inputs = make_inputs(t=t, seed=14)
    mask = make_mask("left", 2, t)
    expected = naive_delta_rule(*inputs, mask)
    reads, state = chunk_delta_rule(*inputs, mask, chunk_size=chunk_size)
    assert_close(reads, expected[0], 1e-5)
    assert_close(state, expected[1], 1e-5)


def test_chunk_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        chunk_delta_rule(*make_inputs(t=4), chunk_size=0)


@pytest.mark.parametrize("fn", [chunk_delta_rule, fused_recurrent_delta_rule])
def test_empty_sequence(fn) -> None:
    q, k, v, beta, state = make_inputs(t=0)
    reads, final = fn(q, k, v, beta, state, torch.zeros(2, 0, dtype=torch.bool))
    assert reads.shape == (2, 3, 0, 8)
    torch.testing.assert_close(final, state, rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["naive", *FAST_IMPLS])
def test_delta_rule_states(impl: str) -> None:
    t = C + 2
    _, k, v, beta, state = make_inputs(t=t, seed=15)
    mask = make_mask("random", 2, t)
    states, final = delta_rule_states(k, v, beta, state, mask, impl=impl)
    assert states.shape == (2, 3, t, 8, 8)
    # the states before each step, built step by step with the oracle
    expected, current = [], state
    for i in range(t):
        expected.append(current)
        sl = slice(i, i + 1)
        _, current = naive_delta_rule(k[:, :, sl], k[:, :, sl], v[:, :, sl], beta[:, :, sl], current, mask[:, sl])
    assert_close(states, torch.stack(expected, 2), 1e-5)
    assert_close(final, current, 1e-5)


def test_auto_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setitem(ops.__dict__, "fused_recurrent_delta_rule", lambda *a, **kw: calls.append("fr"))
    monkeypatch.setitem(ops.__dict__, "chunk_delta_rule", lambda *a, **kw: calls.append("chunk"))
    delta_rule(*make_inputs(t=1), impl="auto")
    delta_rule(*make_inputs(t=ops.AUTO_RECURRENT_MAX_T + 1), impl="auto")
    # a wide state takes the step form at every length (the chunk form's work grows with r^2 x C per token)
    delta_rule(*make_inputs(t=64, r=ops.AUTO_RECURRENT_MIN_RANK), impl="auto")
    delta_rule(*make_inputs(t=64, r=ops.AUTO_RECURRENT_MIN_RANK // 2), impl="auto")
    assert calls == ["fr", "chunk", "fr", "chunk"]


def feature_maps_then_scan(projected, bias, state, write_mask, impl="naive"):
    """The general path of a token-write layer for one token: feature maps, then a scan implementation."""
    b, _, width4 = projected.shape
    h, r = state.shape[1], state.shape[-1]
    q, k, v, gate = (p.view(b, 1, h, r).transpose(1, 2) for p in projected.split(width4 // 4, dim=-1))
    q, k = F.normalize(torch.tanh(q), dim=-1), F.normalize(torch.tanh(k), dim=-1)
    beta = torch.sigmoid(gate + bias.view(h, 1, r))
    reads, final = delta_rule(q, k, v, beta, state, write_mask, impl=impl)
    return reads.transpose(1, 2).reshape(b, 1, h * r), final


def token_step(projected, bias, state, write_mask=None):
    """The decoding step of one layer: its read, then its write as one layer of the stacked write."""
    from peft_deltamem.ops.fused_recurrent import token_read, token_write

    b = projected.shape[0]
    read = token_read(projected.view(b, -1), state).view(b, 1, -1)
    mask = None if write_mask is None else write_mask.view(1, -1)
    final = token_write(projected.view(1, b, -1), bias.view(1, 1, -1), state.unsqueeze(0), mask)
    return read, final[0]


@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("mask", [None, "mixed", "off"])
def test_the_decoding_step_matches_naive(heads: int, mask: str | None) -> None:
    """The decoding step the layers take for single tokens (read in the layer, write at the end of the call): reads,
    state and gradients equal the naive scan's."""
    gen = torch.Generator().manual_seed(21)
    b, r = 2, 8
    masks = {None: None, "mixed": torch.tensor([[True], [False]]), "off": torch.zeros(b, 1, dtype=torch.bool)}
    write_mask = masks[mask]

    def inputs():
        projected = torch.randn(b, 1, 4 * heads * r, generator=torch.Generator().manual_seed(22)).requires_grad_(True)
        bias = torch.full((heads * r,), -1.0).requires_grad_(True)
        state = (0.5 * torch.randn(b, heads, r, r, generator=torch.Generator().manual_seed(23))).requires_grad_(True)
        return projected, bias, state

    weights = torch.randn(b, 1, heads * r, generator=gen), torch.randn(b, heads, r, r, generator=gen)
    results = []
    for fn in (token_step, feature_maps_then_scan):
        projected, bias, state = inputs()
        read, final = fn(projected, bias, state, write_mask)
        ((read * weights[0]).sum() + (final * weights[1]).sum()).backward()
        results.append((read, final, projected.grad, bias.grad, state.grad))
    (read, final, *grads), (read_ref, final_ref, *grads_ref) = results
    assert read.dtype == final.dtype == torch.float32
    assert_close(read, read_ref, 1e-5)
    assert_close(final, final_ref, 1e-5)
    if mask == "off":
        assert torch.equal(final, inputs()[2].detach())  # no write: the state is left bit-for-bit unchanged
    for grad, grad_ref in zip(grads, grads_ref):
        assert_close(grad, grad_ref, 1e-4)


def test_the_stacked_write_equals_each_layer_written_alone() -> None:
    """The end of a decoding call writes every layer at once: stacked, each layer's new state is its own write's
    (different projections, biases, states and masks per layer)."""
    from peft_deltamem.ops.fused_recurrent import token_write

    gen = torch.Generator().manual_seed(26)
    n, b, h, r = 5, 3, 2, 8
    projected = torch.randn(n, b, 4 * h * r, generator=gen)
    bias = torch.randn(n, 1, h * r, generator=gen)
    state = torch.randn(n, b, h, r, r, generator=gen)
    mask = torch.rand(n, b, generator=gen) > 0.3
    stacked = token_write(projected, bias, state, mask)
    for i in range(n):
        alone = token_write(projected[i : i + 1], bias[i : i + 1], state[i : i + 1], mask[i : i + 1])
        assert_close(stacked[i], alone[0], 1e-6)
        _, reference = feature_maps_then_scan(projected[i].unsqueeze(1), bias[i, 0], state[i], mask[i].view(b, 1))
        assert_close(stacked[i], reference, 1e-5)


def test_the_decoding_read_needs_only_the_query_block() -> None:
    """A call that only reads projects the query block alone; its read equals the one from the whole projection."""
    from peft_deltamem.ops.fused_recurrent import token_read

    gen = torch.Generator().manual_seed(27)
    projected, state = torch.randn(3, 4 * 2 * 8, generator=gen), torch.randn(3, 2, 8, 8, generator=gen)
    assert torch.equal(token_read(projected[..., :16].contiguous(), state), token_read(projected, state))


def test_the_decoding_read_applies_its_scale_in_the_product() -> None:
    """``token_read(.., scale)``: the layer's correction scale, applied by the read's product, is the scaled read."""
    from peft_deltamem.ops.fused_recurrent import token_read

    gen = torch.Generator().manual_seed(28)
    projected, state = torch.randn(3, 4 * 2 * 8, generator=gen), torch.randn(3, 2, 8, 8, generator=gen)
    assert_close(token_read(projected, state, 2.0), 2.0 * token_read(projected, state), 1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_decoding_step_in_low_precision(dtype: torch.dtype) -> None:
    """Low-precision projections: feature maps in their dtype (as the general path), the step in float32."""
    projected = torch.randn(2, 1, 4 * 2 * 8, generator=torch.Generator().manual_seed(24)).to(dtype)
    bias = torch.full((16,), -1.0, dtype=dtype)
    state = 0.5 * torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(25))
    read, final = token_step(projected, bias, state)
    read_ref, final_ref = feature_maps_then_scan(projected, bias, state, None, impl="fused_recurrent")
    assert read.dtype == final.dtype == torch.float32
    assert_close(read, read_ref, 1e-5)
    assert_close(final, final_ref, 1e-5)


def test_token_step_follows_the_chosen_implementation() -> None:
    """use_impl("naive") (or "chunk") makes the layers run that scan for single tokens too (tests compare them)."""
    assert ops.token_step_enabled()
    for name, enabled in (("naive", False), ("chunk", False), ("fused_recurrent", True), ("auto", True)):
        with use_impl(name):
            assert ops.token_step_enabled() is enabled


def test_the_step_form_without_autograd_updates_in_place_with_the_same_numbers() -> None:
    """Without autograd the step form updates its state in place (no allocation per step, the cost that dominated
    at r = 64): the same numbers, bit for bit, as with autograd, and the caller's initial state untouched."""
    q, k, v, beta, s0 = make_inputs(2, 3, 11, 64, seed=5)
    mask = make_mask("random", 2, 11)
    before = s0.clone()
    with torch.no_grad():
        reads, final = fused_recurrent_delta_rule(q, k, v, beta, s0, mask)
    assert torch.equal(s0, before)
    graph = [t.clone().requires_grad_(True) for t in (q, k, v, beta, s0)]
    reads_g, final_g = fused_recurrent_delta_rule(*graph, mask)
    assert torch.equal(reads, reads_g.detach()) and torch.equal(final, final_g.detach())
    (reads_g.sum() + final_g.sum()).backward()
    assert all(t.grad is not None for t in graph)
    naive_reads, naive_final = naive_delta_rule(q, k, v, beta, s0, mask)
    assert_close(reads, naive_reads, 1e-5), assert_close(final, naive_final, 1e-5)
