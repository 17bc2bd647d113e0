"""Injection into attention blocks: detection per family, no-op at init, sizes, refusals, unload, copies, bnb, meta."""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
import transformers
from peft import get_peft_model
from torch import nn

from conftest import make_peft, random_ids
from method_reference import memory_read, memory_write
from peft_deltamem import DeltaMemConfig, DeltaMemLayer
from peft_deltamem.architectures import REFUSED_MODEL_TYPES, supported_model_types
from peft_deltamem.tiny_models import TINY_FAMILIES, tiny_config, tiny_model

HEAD_SETS = [("q", "o"), ("q", "k", "v", "o")]


# ------------------------------------------------------------------------------------------------ helpers


def logits(model, ids, mask=None, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kwargs).logits


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a (possibly PEFT-wrapped) tiny model."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return list(model.transformer.h) if hasattr(model, "transformer") else list(model.model.layers)


def attention_of(layer: nn.Module) -> nn.Module:
    return layer.self_attn if hasattr(layer, "self_attn") else layer.attn


def expected_names(family: str, layers) -> list[str]:
    if family == "gpt2":
        return [f"transformer.h.{i}.attn" for i in layers]
    return [f"model.layers.{i}.self_attn" for i in layers]


def config_dict(config) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def head_out_features(family: str, config) -> dict[str, int]:
    """Out features of each correction head, from the model config alone (method.md)."""
    cfg = config_dict(config)
    if family == "gpt2":
        hidden = cfg["n_embd"]
        return {"q": hidden, "k": hidden, "v": hidden, "o": hidden}
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    kv_heads = cfg.get("num_key_value_heads") or heads
    return {"q": heads * head_dim, "k": kv_heads * head_dim, "v": kv_heads * head_dim, "o": hidden}


def expected_trainable(family: str, config, r: int, heads: tuple[str, ...], num_state_heads: int, blocks: int) -> int:
    cfg = config_dict(config)
    d = cfg["n_embd"] if family == "gpt2" else cfg["hidden_size"]
    out = head_out_features(family, config)
    per_block = (
        3 * r * d * num_state_heads + (r * d + r) * num_state_heads + r * num_state_heads * sum(out[h] for h in heads)
    )
    return per_block * blocks


def num_layers(family: str, config) -> int:
    cfg = config_dict(config)
    return cfg["n_layer"] if family == "gpt2" else cfg["num_hidden_layers"]


def corrects(projection: nn.Module, layer: DeltaMemLayer | None = None) -> bool:
    """Whether ``projection`` has the forward that adds a δ-mem layer's correction (``layer``'s, when given)."""
    from peft_deltamem.layer import _corrected_forward

    forward = projection.__dict__.get("forward")
    return (
        isinstance(forward, functools.partial)
        and forward.func is _corrected_forward
        and (layer is None or forward.args[0] is layer)
    )


def hook_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {
        name: (len(m._forward_hooks), len(m._forward_pre_hooks) + len(m._forward_pre_hooks_with_kwargs))
        for name, m in model.named_modules()
    }


def reference_reads(layer: DeltaMemLayer, x: torch.Tensor, adapter: str = "default") -> torch.Tensor:
    """method.md token by token (one row, float64, empty start): the read of every token, (T, r·H)."""
    settings = layer.settings[adapter]
    r, n_states = settings.r, settings.num_state_heads
    weight = layer.delta_mem_write[adapter].weight.double()
    bias = layer.delta_mem_beta_bias[adapter].double()
    w_q, w_k, w_v, w_b = weight.split(r * n_states)
    state = torch.zeros(n_states, r, r, dtype=torch.float64)
    reads = []
    for x_t in x.double():
        row = []
        for h in range(n_states):
            rows = slice(h * r, (h + 1) * r)
            row.append(memory_read(state[h], w_q[rows], x_t))
            state[h] = memory_write(state[h], w_k[rows], w_v[rows], w_b[rows], bias[rows], x_t)
        reads.append(torch.cat(row))
    return torch.stack(reads)


# -------------------------------------------------------------------------------------- detection, no-op


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_default_config_detects_every_attention_block(family):
    base = tiny_model(family)
    model = get_peft_model(base, DeltaMemConfig())
    layers = decoder_layers(model)
    assert len(layers) == num_layers(family, base.config)
    for layer in layers:
        attention = attention_of(layer)
        assert isinstance(attention, DeltaMemLayer)
        assert not isinstance(attention.base_layer, DeltaMemLayer)
    assert sorted(model.targeted_module_names) == expected_names(family, range(len(layers)))
    wrapped = [name for name, m in model.named_modules() if isinstance(m, DeltaMemLayer)]
    assert len(wrapped) == len(layers)
    # only adapter parameters train
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("delta_mem_" in n for n in trainable)


@pytest.mark.parametrize("heads", HEAD_SETS, ids="".join)
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_zero_init_is_an_exact_noop(family, heads):
    base = tiny_model(family)
    ids = random_ids(2, 12)
    reference = logits(base, ids)
    model = get_peft_model(base, DeltaMemConfig(init_weights=True, delta_heads=heads)).eval()
    memory = model.new_memory(2)
    assert torch.equal(logits(model, ids, memory=memory), reference)
    # the memory really was written (the layers ran), the heads are just zero
    states = memory.states
    assert states and all(t.abs().sum() > 0 for t in states.values())


@pytest.mark.parametrize("heads", HEAD_SETS, ids="".join)
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_random_heads_change_outputs_and_disable_restores_base(family, heads):
    base = tiny_model(family)
    ids = random_ids(2, 12)
    reference = logits(base, ids)
    model = make_peft(base, delta_heads=heads)
    adapted = logits(model, ids)
    assert not torch.allclose(adapted, reference, atol=1e-6)
    with model.disable_adapter():
        assert torch.equal(logits(model, ids), reference)
    assert torch.equal(logits(model, ids), adapted)  # re-enabled, stateless: the same outputs


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_left_padded_batch_matches_unpadded_rows(family):
    model = make_peft(tiny_model(family), delta_heads=("q", "k", "v", "o"))
    ids = random_ids(2, 10, seed=1)
    pad = 3
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    batch_memory = model.new_memory(2)
    batch_logits = logits(model, ids, mask, position_ids=positions, memory=batch_memory)
    batch_state = batch_memory.states
    assert torch.isfinite(batch_logits).all()

    for row, start in ((0, 0), (1, pad)):
        memory = model.new_memory(1)
        alone = logits(model, ids[row : row + 1, start:], position_ids=positions[row : row + 1, start:], memory=memory)
        torch.testing.assert_close(batch_logits[row : row + 1, start:], alone, atol=2e-5, rtol=1e-4)
        for name, tensor in memory.states.items():
            torch.testing.assert_close(batch_state[name][row : row + 1], tensor, atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("num_state_heads", [1, 4])
@pytest.mark.parametrize("heads", HEAD_SETS, ids="".join)
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_trainable_parameter_count_matches_method_formula(family, heads, num_state_heads):
    base = tiny_model(family)
    model = get_peft_model(base, DeltaMemConfig(delta_heads=heads, num_state_heads=num_state_heads))
    trainable, _ = model.get_nb_trainable_parameters()
    blocks = num_layers(family, base.config)
    assert trainable == expected_trainable(family, base.config, 8, heads, num_state_heads, blocks)


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3"])
def test_gqa_heads_have_kv_sized_corrections(family):
    base = tiny_model(family, num_heads=4, num_kv_heads=2)  # head_dim 16: q 64, k/v 32
    model = make_peft(base, delta_heads=("q", "k", "v", "o"))
    attention = attention_of(decoder_layers(model)[0])
    out = attention.delta_mem_out["default"].weight
    assert out.shape == (64 + 32 + 32 + 64, 8)
    assert [attention.layout.head_out_features(h) for h in "qkvo"] == [64, 32, 32, 64]

    seen = {}
    projections = attention.layout.projections
    for slot, name in projections.items():
        getattr(attention.base_layer, name).register_forward_hook(
            lambda m, i, o, slot=slot: seen.__setitem__(slot, o.shape[-1])
        )
    logits(model, random_ids(1, 6))
    if family == "phi3":
        assert seen == {"qkv": 128, "o": 64}
    else:
        assert seen == {"q": 64, "k": 32, "v": 32, "o": 64}


def test_qwen3_correction_is_added_to_the_projection_output_before_the_qk_norms():
    base = tiny_model("qwen3")
    model = make_peft(base, delta_heads=("q", "k", "v", "o"))
    attention = attention_of(decoder_layers(model)[0])
    inner = attention.base_layer
    captured = {}
    handles = [
        inner.q_proj.register_forward_hook(lambda m, i, o: captured.update(x=i[0].detach(), q=o.detach())),
        inner.k_proj.register_forward_hook(lambda m, i, o: captured.update(k=o.detach())),
        inner.q_norm.register_forward_pre_hook(lambda m, i: captured.update(q_norm_in=i[0].detach())),
        inner.k_norm.register_forward_pre_hook(lambda m, i: captured.update(k_norm_in=i[0].detach())),
    ]
    logits(model, random_ids(1, 7, seed=3))
    for handle in handles:
        handle.remove()

    x = captured["x"][0]
    reads = reference_reads(attention, x)  # (T, r)
    delta = attention.delta_mem_out["default"].weight.double()
    scaling = model.peft_config["default"].scaling
    q_out, k_out = inner.q_proj.out_features, inner.k_proj.out_features
    expected_q = F.linear(x.double(), inner.q_proj.weight.double()) + scaling * reads @ delta[:q_out].T
    expected_k = F.linear(x.double(), inner.k_proj.weight.double()) + scaling * reads @ delta[q_out : q_out + k_out].T
    torch.testing.assert_close(captured["q"][0].double(), expected_q, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(captured["k"][0].double(), expected_k, atol=1e-5, rtol=1e-4)
    # the correction is really there (token 0 reads an empty memory, later tokens do not)
    plain_q = F.linear(x, inner.q_proj.weight)
    assert torch.equal(captured["q"][0, 0], plain_q[0])
    assert (captured["q"][0, 1:] - plain_q[1:]).abs().max() > 1e-4
    # ... and it is what the per-head norms receive
    torch.testing.assert_close(captured["q_norm_in"].flatten(), captured["q"].flatten(), atol=0, rtol=0)
    torch.testing.assert_close(captured["k_norm_in"].flatten(), captured["k"].flatten(), atol=0, rtol=0)


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3_text"])
def test_sliding_window_layers(family):
    base = tiny_model(family)
    assert base.config.sliding_window == 8
    ids = random_ids(2, 20, seed=2)
    reference = logits(base, ids)
    # the window really matters at this length
    full = tiny_model(family, sliding_window=4096)
    assert not torch.allclose(logits(full, ids), reference, atol=1e-5)

    model = get_peft_model(base, DeltaMemConfig(init_weights=True, delta_heads=("q", "k", "v", "o"))).eval()
    assert torch.equal(logits(model, ids), reference)
    with model.disable_adapter():
        assert torch.equal(logits(model, ids), reference)

    random_model = make_peft(tiny_model(family), delta_heads=("q", "k", "v", "o"))
    adapted = logits(random_model, ids)
    assert torch.isfinite(adapted).all() and not torch.allclose(adapted, reference, atol=1e-6)
    with random_model.disable_adapter():
        assert torch.equal(logits(random_model, ids), reference)


# ---------------------------------------------------------------------------------------- selection


@pytest.mark.parametrize(
    "family,pattern", [("llama", None), ("llama", "layers"), ("qwen3", "layers"), ("gpt2", None), ("gpt2", "h")]
)
def test_layers_to_transform_adapts_only_that_layer(family, pattern):
    base = tiny_model(family)
    model = get_peft_model(base, DeltaMemConfig(layers_to_transform=[1], layers_pattern=pattern))
    assert model.targeted_module_names == expected_names(family, [1])
    layers = decoder_layers(model)
    assert not isinstance(attention_of(layers[0]), DeltaMemLayer)
    assert isinstance(attention_of(layers[1]), DeltaMemLayer)
    assert all(not m._forward_hooks and not corrects(m) for m in attention_of(layers[0]).modules())
    assert any(corrects(m) for m in attention_of(layers[1]).modules())
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == expected_trainable(family, base.config, 8, ("q", "o"), 1, blocks=1)


@pytest.mark.parametrize("exclude", [["layers.0.self_attn"], r"model\.layers\.0\.self_attn"])
def test_exclude_modules(exclude):
    model = get_peft_model(tiny_model("llama"), DeltaMemConfig(exclude_modules=exclude))
    assert model.targeted_module_names == ["model.layers.1.self_attn"]
    layers = decoder_layers(model)
    assert not isinstance(layers[0].self_attn, DeltaMemLayer)
    assert isinstance(layers[1].self_attn, DeltaMemLayer)


# ----------------------------------------------------------------------------------------- refusals


def assert_how_to_target(message: str) -> None:
    for model_type in supported_model_types():
        assert model_type in message
    assert "target_modules" in message and "projection_names" in message


def tiny_t5():
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    return transformers.T5ForConditionalGeneration(config)


def tiny_bart():
    config = transformers.BartConfig(
        vocab_size=64,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
    )
    return transformers.BartForConditionalGeneration(config)


@pytest.mark.parametrize("build", [tiny_t5, tiny_bart], ids=["t5", "bart"])
@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
def test_encoder_decoder_is_refused(build, explicit):
    kwargs = {"target_modules": ["q", "k", "v", "o", "q_proj"]} if explicit else {}
    with pytest.raises(ValueError, match="encoder-decoder") as info:
        get_peft_model(build(), DeltaMemConfig(**kwargs))
    assert_how_to_target(str(info.value))


def tiny_deepseek_v3():
    assert "deepseek_v3" in REFUSED_MODEL_TYPES
    config = transformers.DeepseekV3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        first_k_dense_replace=1,
    )
    return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("target_modules", [None, ["self_attn"]])
def test_mla_model_is_refused(target_modules):
    with pytest.raises(ValueError, match="MLA") as info:
        get_peft_model(tiny_deepseek_v3(), DeltaMemConfig(target_modules=target_modules))
    assert "deepseek_v3" in str(info.value)


@dataclass
class WeirdConfig:
    model_type: str = "weird"


class WeirdAttention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x, **kwargs):
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        causal = torch.triu(torch.full((x.shape[1], x.shape[1]), float("-inf")), diagonal=1)
        return self.wo(torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + causal, dim=-1) @ v)


class WeirdBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.self_attn = WeirdAttention(d)
        self.mlp = nn.Linear(d, d)

    def forward(self, x, **kwargs):
        x = x + self.self_attn(x, **kwargs)
        return x + self.mlp(x)


class WeirdModel(nn.Module):
    """A decoder of a model type δ-mem does not know, with non-standard projection names."""

    def __init__(self, d: int = 16, n_layers: int = 2, vocab: int = 32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.config = WeirdConfig()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(WeirdBlock(d) for _ in range(n_layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, **kwargs)
        return self.head(x)


WEIRD_PROJECTIONS = {"q": "wq", "k": "wk", "v": "wv", "o": "wo"}


def test_unknown_model_type_without_target_modules_is_refused():
    with pytest.raises(ValueError, match="'weird'") as info:
        get_peft_model(WeirdModel(), DeltaMemConfig())
    assert_how_to_target(str(info.value))


def test_unknown_model_type_with_explicit_targets_and_projection_names_works():
    base = WeirdModel()
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = base(ids)
    model = get_peft_model(base, DeltaMemConfig(target_modules=["self_attn"], projection_names=WEIRD_PROJECTIONS))
    model.eval()
    assert model.targeted_module_names == ["layers.0.self_attn", "layers.1.self_attn"]
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 2 * (3 * 8 * 16 + 8 * 16 + 8 + 8 * (16 + 16))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids), reference)

    random_model = get_peft_model(
        WeirdModel(),
        DeltaMemConfig(target_modules=["self_attn"], projection_names=WEIRD_PROJECTIONS, init_weights=False),
    ).eval()
    with torch.no_grad():
        adapted = random_model(input_ids=ids)
        assert not torch.allclose(adapted, reference, atol=1e-6)
        with random_model.disable_adapter():
            assert torch.equal(random_model(input_ids=ids), reference)


@pytest.mark.parametrize(
    "build,kwargs,match",
    [
        (WeirdModel, {"target_modules": ["self_attn"]}, "no recognised q/k/v/o projections"),
        (WeirdModel, {"target_modules": ["mlp"], "projection_names": WEIRD_PROJECTIONS}, "no projection"),
        (lambda: tiny_model("llama"), {"target_modules": ["mlp"]}, "no projection"),
    ],
    ids=["weird-no-names", "weird-mlp", "llama-mlp"],
)
def test_target_without_projections_is_refused(build, kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        get_peft_model(build(), DeltaMemConfig(**kwargs))
    assert "projection_names" in str(info.value)


def test_cross_attention_is_refused():
    base = tiny_model("gpt2", add_cross_attention=True)
    with pytest.raises(ValueError, match="cross-attention"):
        get_peft_model(base, DeltaMemConfig(target_modules=["crossattention"]))
    # the default only picks the self-attention blocks
    model = get_peft_model(tiny_model("gpt2", add_cross_attention=True), DeltaMemConfig())
    assert model.targeted_module_names == expected_names("gpt2", [0, 1])


@pytest.mark.parametrize("with_mask", [False, True])
def test_packed_batch_is_refused(with_mask):
    model = make_peft()
    ids = random_ids(2, 10)
    positions = torch.cat([torch.arange(6), torch.arange(4)]).expand(2, 10)
    mask = torch.ones(2, 10, dtype=torch.long) if with_mask else None
    with pytest.raises(ValueError, match="packed"):
        logits(model, ids, mask, position_ids=positions)


def test_four_dimensional_attention_mask_is_refused():
    model = make_peft()
    ids = random_ids(2, 6)
    mask = torch.ones(2, 1, 6, 6)
    with pytest.raises(ValueError, match="2-D"):
        logits(model, ids, mask)


# --------------------------------------------------------------------------------- unload, merge, adapters


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "qwen3"])
def test_unload_restores_the_original_model(family):
    base = tiny_model(family)
    ids = random_ids(2, 8)
    reference = logits(base, ids)
    classes = {name: type(m) for name, m in base.named_modules()}
    q_name = next(n for n in classes if n.endswith(("self_attn.q_proj", "self_attn.qkv_proj", "attn.c_attn")))
    user_calls = []
    user_hook = lambda m, i, o: user_calls.append(1)  # noqa: E731
    base.get_submodule(q_name).register_forward_hook(user_hook)
    hooks_before = hook_counts(base)

    model = make_peft(base, delta_heads=("q", "k", "v", "o"))
    model.add_adapter("other", DeltaMemConfig(init_weights=False))
    assert not torch.allclose(logits(model, ids), reference, atol=1e-6)
    unloaded = model.unload()

    assert {name: type(m) for name, m in unloaded.named_modules()} == classes
    assert not any(isinstance(m, DeltaMemLayer) for m in unloaded.modules())
    assert hook_counts(unloaded) == hooks_before
    assert not any("forward" in m.__dict__ for m in unloaded.modules())  # the projections' own forward again
    assert list(unloaded.get_submodule(q_name)._forward_hooks.values()) == [user_hook]
    user_calls.clear()
    assert torch.equal(logits(unloaded, ids), reference)
    assert user_calls  # the user's own hook survived and still runs
    assert not any("delta_mem" in n for n, _ in unloaded.named_parameters())


@pytest.mark.parametrize("order", ["accelerate first", "δ-mem first"])
def test_corrections_compose_with_forwards_that_accelerate_sets_on_a_projection(order):
    """accelerate's hooks (device maps, offloading) replace a module's forward; the correcting forward of a projection
    runs inside or around theirs, in either order, and each side's removal gives the other's forward back."""
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    class Counting(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Counting.calls += 1
            return args, kwargs

    ids = random_ids(2, 6)
    base = tiny_model("llama")
    torch.manual_seed(1)
    reference = logits(make_peft(copy.deepcopy(base)), ids)
    q_name = "model.layers.0.self_attn.q_proj"
    torch.manual_seed(1)
    if order == "accelerate first":
        add_hook_to_module(base.get_submodule(q_name), Counting())
        accelerate_forward = base.get_submodule(q_name).forward
        model = make_peft(base)
    else:
        model = make_peft(base)
        add_hook_to_module(model.get_base_model().get_submodule("model.layers.0.self_attn.base_layer.q_proj"),
                           Counting())  # fmt: skip
    q_proj = model.get_base_model().get_submodule("model.layers.0.self_attn.base_layer.q_proj")
    assert torch.equal(logits(model, ids), reference)  # corrected once, not twice or never
    assert Counting.calls == 1
    if order == "accelerate first":
        unloaded = model.unload()
        assert unloaded.get_submodule(q_name).forward is accelerate_forward
        remove_hook_from_module(unloaded.get_submodule(q_name))  # accelerate puts the module's bound forward back
        assert unloaded.get_submodule(q_name).forward.__func__ is nn.Linear.forward
    else:
        remove_hook_from_module(q_proj)
        assert corrects(q_proj) and torch.equal(logits(model, ids), reference)


def test_hooks_on_the_attention_block_and_its_projections_still_run():
    """The layer calls the attention block's forward directly only when nothing is registered on it; a hook on the
    block or a projection runs, and a projection's hook sees the corrected output."""
    model = make_peft()
    attention = decoder_layers(model)[0].self_attn
    seen = []
    handles = [
        attention.base_layer.register_forward_pre_hook(lambda module, args: seen.append("attention")),
        attention.base_layer.o_proj.register_forward_hook(lambda module, args, out: seen.append(out.detach())),
    ]
    ids = random_ids(1, 5)
    corrected = logits(model, ids)
    assert seen[0] == "attention" and len(seen) == 2
    with model.disable_adapter():
        logits(model, ids)
    assert not torch.allclose(seen[1], seen[3])  # the hook saw the correction, then the plain output
    for handle in handles:
        handle.remove()
    assert torch.equal(logits(model, ids), corrected)


@pytest.mark.parametrize("method", ["merge_and_unload", "merge_adapter"])
def test_merging_is_refused(method):
    model = make_peft()
    ids = random_ids(1, 6)
    before = logits(model, ids)
    with pytest.raises(NotImplementedError, match="memory"):
        getattr(model, method)()
    # nothing was touched
    assert isinstance(decoder_layers(model)[0].self_attn, DeltaMemLayer)
    assert torch.equal(logits(model, ids), before)


def test_delete_adapter_with_two_adapters():
    base = tiny_model("llama")
    ids = random_ids(2, 8)
    reference = logits(base, ids)
    model = make_peft(base)
    default_out = logits(model, ids)
    model.add_adapter("other", DeltaMemConfig(init_weights=False, delta_heads=("q", "k", "v", "o")))
    model.set_adapter("other")
    other_out = logits(model, ids)
    assert not torch.allclose(other_out, default_out, atol=1e-6)

    model.delete_adapter("default")
    assert list(model.peft_config) == ["other"]
    assert model.active_adapters == ["other"]
    for layer in decoder_layers(model):
        attention = layer.self_attn
        assert isinstance(attention, DeltaMemLayer)
        assert set(attention.settings) == {"other"} and set(attention.runtime.configs) == {"other"}
        assert set(attention.delta_mem_write) == {"other"}
        # one correcting forward per projection, not one per adapter ever added
        projections = [getattr(attention.base_layer, n) for n in attention.layout.projections.values()]
        assert all(corrects(p, attention) and p.forward.args[3] is None for p in projections)
        assert all(not p._forward_hooks for p in projections)
    assert not any(".default" in n for n, _ in model.named_parameters())
    assert torch.equal(logits(model, ids), other_out)
    with model.disable_adapter():
        assert torch.equal(logits(model, ids), reference)


def test_only_corrected_projections_carry_a_correction_and_memories_follow_adapter_changes():
    """A projection no Δ head corrects keeps its own forward (no cost); adding, deleting and unloading adapters is seen
    by what the model derives from its layers once (descriptions of new memories, the memory check)."""
    model = make_peft(tiny_model("llama"), delta_heads=("o",))
    attention = decoder_layers(model)[0].self_attn
    hooked = {slot for slot, name in attention.layout.projections.items()
              if corrects(getattr(attention.base_layer, name), attention)}  # fmt: skip
    assert hooked == {"o"}
    assert model.new_memory(1).r == 8
    model.add_adapter("other", DeltaMemConfig(r=4, init_weights=False, delta_heads=("q", "v")))
    hooked = {slot for slot, name in attention.layout.projections.items()
              if corrects(getattr(attention.base_layer, name), attention)}  # fmt: skip
    assert hooked == {"q", "v", "o"}
    default_memory = model.new_memory(1)
    model.set_adapter("other")
    memory = model.new_memory(2)
    assert (memory.adapter_name, memory.r, memory.delta_heads) == ("other", 4, ("q", "v"))
    model(input_ids=random_ids(2, 5), memory=memory)  # the check sees the new adapter's description
    assert not memory.is_empty
    model.delete_adapter("default")
    with pytest.raises(ValueError, match="does not have"):
        model.check_memory(default_memory)
    with pytest.raises(ValueError):
        model.new_memory(1, adapter_name="default")


def test_deepcopy_corrections_act_on_the_copy():
    model = make_peft()
    ids = random_ids(2, 8)
    original = logits(model, ids)
    clone = copy.deepcopy(model)

    clone_attention = decoder_layers(clone)[0].self_attn
    assert clone_attention is not decoder_layers(model)[0].self_attn
    q_proj = clone_attention.base_layer.q_proj
    assert corrects(q_proj, clone_attention) and q_proj.forward.args[2] is q_proj
    assert clone_attention.runtime is clone.base_model.memory_runtime
    assert clone.base_model.memory_runtime is not model.base_model.memory_runtime

    assert torch.equal(logits(clone, ids), original)
    with torch.no_grad():
        for name, param in clone.named_parameters():
            if "delta_mem_out" in name:
                param.mul_(5.0)
    changed = logits(clone, ids)
    assert not torch.allclose(changed, original, atol=1e-6)
    assert torch.equal(logits(model, ids), original)
    # the copy creates memories of its own (generate and new_memory are bound to the copy)
    memory = clone.new_memory(2)
    assert torch.equal(logits(clone, ids, memory=memory), changed)
    assert memory.weights_hash != model.new_memory(2).weights_hash
    assert clone.base_model.model.generate.args[1] is clone.base_model.model


# ----------------------------------------------------------------------------------------- bitsandbytes


@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_backbone_trains_the_adapter(bits, tmp_path):
    try:
        import bitsandbytes as bnb
    except Exception as error:  # noqa: BLE001
        pytest.fail(f"bitsandbytes cannot be imported here: {error!r}")
    tiny_model("llama").save_pretrained(tmp_path)
    if bits == 4:
        quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
        expected_cls = bnb.nn.Linear4bit
    else:
        quantization = transformers.BitsAndBytesConfig(load_in_8bit=True)
        expected_cls = bnb.nn.Linear8bitLt
    try:
        base = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, quantization_config=quantization, device_map="cpu"
        )
    except Exception as error:  # noqa: BLE001
        pytest.fail(f"bitsandbytes {bits}-bit quantization on CPU is not possible here: {error!r}")
    assert isinstance(base.model.layers[0].self_attn.q_proj, expected_cls)
    ids = random_ids(2, 8)
    reference = logits(base, ids)

    zero = get_peft_model(base, DeltaMemConfig(delta_heads=("q", "k", "v", "o"))).eval()
    assert torch.equal(logits(zero, ids), reference)
    zero.unload()

    model = make_peft(base, delta_heads=("q", "k", "v", "o"))
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    adapter = {n: p for n, p in model.named_parameters() if "delta_mem_" in n}
    assert adapter and all(p.requires_grad for p in adapter.values())
    for name, param in adapter.items():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name
    frozen = [n for n, p in model.named_parameters() if "delta_mem_" not in n and p.grad is not None]
    assert not frozen


# --------------------------------------------------------------------------------------- meta Qwen3-4B


def qwen3_4b_on_meta():
    config = transformers.Qwen3Config(
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("num_state_heads,expected,percent", [(1, 4_866_336, "0.12"), (4, 19_465_344, "0.48")])
def test_qwen3_4b_parameter_overhead_on_meta(num_state_heads, expected, percent, capsys):
    base = qwen3_4b_on_meta()
    assert expected == expected_trainable("qwen3", base.config, 8, ("q", "o"), num_state_heads, 36)
    model = get_peft_model(base, DeltaMemConfig(num_state_heads=num_state_heads))
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == expected
    assert len(model.targeted_module_names) == 36
    assert abs(100 * trainable / total - float(percent)) < 0.005
    capsys.readouterr()
    model.print_trainable_parameters()
    printed = capsys.readouterr().out
    assert f"trainable params: {expected:,}" in printed
    assert f"trainable%: {percent}" in printed


def test_tiny_config_helper_sanity():
    # the helper gives GQA and the sliding windows these tests rely on
    config = tiny_config("gemma3_text")
    assert config.num_key_value_heads < config.num_attention_heads
    assert "sliding_attention" in config.layer_types and "full_attention" in config.layer_types
