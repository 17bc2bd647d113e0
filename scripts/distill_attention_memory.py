"""Train a δ-mem memory to stand in for the attention a frozen model pays to messages that left its window.

The open-vocabulary study (docs/open_memory.md, "a1, a2") found by activation patching on SmolLM2-135M-Instruct
that the value of a told fact reaches the answer through the attention of layers 18-29 to the history: adding, at
those layers' attention outputs, what the frozen model's attention to the history adds (computed with the whole
chat visible) to a run that sees only the window brings the forced next token from 0.16 to 0.45 (0.53 with the
whole chat visible). This script trains each adapted layer's memory to produce exactly that addition:

- **teacher** (frozen, the whole chat and the target reply visible): at each adapted layer and at every position of
  the window and reply, ``δ = o_proj(attention over all keys) − o_proj(attention over the window's keys only)``;
- **student** (the δ-mem layer): the messages that left the window written one call per message as the chat
  engine writes them (token writes, from the frozen model's states of each message alone), read at the same
  positions of the window-only prompt; its correction ``s · Δ_o · read`` must equal δ (mean squared error,
  normalised per layer by δ's energy: the fraction of δ left unexplained).

Layers are trained independently on the frozen model's states (like attention transfer when linearising a model),
so a step needs no transformer pass: the frozen passes are cached once. The memory starts from the layer's own
attention (W_mk from k_proj, W_mq from the mean of each group's q_proj, W_mv from v_proj, Δ_o from o_proj's group
sums), one state head per key/value group. At the end the trained memory is loaded into a PEFT δ-mem model and
measured through the real path: the forced next token where the value is due, and greedy replies through the chat
engine (``benchmarks.open_recall``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", default="18-29", help="adapted layers, e.g. 18-29 (default)")
    p.add_argument("--pool", type=int, default=800, help="training chats (train split)")
    p.add_argument("--n-val", type=int, default=48, help="val chats (values and kinds never trained)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--beta-bias-init", type=float, default=-2.0)
    p.add_argument(
        "--target", choices=("history", "value"), default="history",
        help="history: what attending to every hidden message adds; value: what attending to the asked value's "
        "tokens adds (zero for a question about something never told)",
    )  # fmt: skip
    p.add_argument(
        "--gate-weight", type=float, default=0.0,
        help="weight of a balanced cross-entropy asking the write gate to open on the tokens that spell a told value "
        "(the user's facts, updated ones included) and stay shut elsewhere (0: off)",
    )  # fmt: skip
    p.add_argument(
        "--gate-open", type=float, default=0.5,
        help="the gate asked for on a told value's tokens (the retention gate is 1 - gate: 1 would wipe the state)",
    )  # fmt: skip
    p.add_argument(
        "--gate-steps", type=int, default=0,
        help="steps that train the write gates alone on the gate loss before the main loop (no scan: fast)",
    )  # fmt: skip
    p.add_argument(
        "--reply-weight", type=float, default=1.0,
        help="weight of the target reply's positions in the loss (the window's have 1): where the value is due",
    )  # fmt: skip
    p.add_argument("--cache", type=Path, help="file of the cached frozen states: loaded when it exists, else written")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--max-minutes", type=float, default=60.0, help="stop training after this long (caching included)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine-val", type=int, default=48, help="val chats replied to through the chat engine at the end")
    p.add_argument("--out", type=Path, required=True, help="output directory (adapter, history.json)")
    return p.parse_args(argv)


def layer_list(spec: str) -> list[int]:
    out = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


def chat_rows(episode, tok):
    """Token rows of one chat: the messages written into memory (engine layout, window 2), the window-only prompt
    plus the target reply (student), and the whole chat plus the reply (teacher); ``m`` positions end both alike,
    the teacher's first ``s`` (the system prompt) are visible to the student too."""
    from peft_deltamem.training.episodes import tokenize_prompt_and_answer
    from train_open_memory import served_layout

    writes, prompt, answer = served_layout(episode, tok)
    full, _ = tokenize_prompt_and_answer(episode.messages, {"role": "assistant", "content": episode.reply}, tok)
    student, teacher = prompt + answer, full + answer
    m = 0
    while m < min(len(student), len(teacher)) and student[-1 - m] == teacher[-1 - m]:
        m += 1
    s = len(student) - m
    if teacher[:s] != student[:s]:
        raise ValueError("the window-only prompt is not the whole chat's system prompt plus its last messages")
    return writes, student, teacher, s, m


def frozen_pass(model, rows, layers, teacher=None):
    """The frozen model on token ``rows`` (right-padded into one batch); returns per row {layer: attention input
    (length, d)} and, for a teacher pass of one row with ``teacher=(hidden, m)`` (``hidden``: a bool mask of the
    positions the student does not see), {layer: δ at its last m positions}."""
    import torch
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    inputs, deltas = {}, {}

    def hook(mod, args, kwargs, out):
        h = kwargs["hidden_states"]
        inputs[mod.layer_idx] = h.to(torch.float16)
        if teacher is None:
            return
        hidden, m = teacher
        cos, sin = kwargs["position_embeddings"]
        shape = (*h.shape[:-1], -1, mod.head_dim)
        q = mod.q_proj(h).view(shape).transpose(1, 2)
        k = mod.k_proj(h).view(shape).transpose(1, 2)
        v = repeat_kv(mod.v_proj(h).view(shape).transpose(1, 2), mod.num_key_value_groups)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        q, k = q[:, :, -m:], repeat_kv(k, mod.num_key_value_groups)
        scores = (q @ k.transpose(-1, -2)) * mod.scaling
        length = h.shape[1]
        pos = torch.arange(length - m, length)[:, None]
        causal = torch.arange(length)[None, :] <= pos
        window = causal & ~hidden[None, :]

        def attend(mask):
            a = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
            return mod.o_proj(a.transpose(1, 2).reshape(1, m, -1))[0]

        deltas[mod.layer_idx] = (attend(causal) - attend(window)).to(torch.float16)

    lengths = [len(r) for r in rows]
    ids = torch.zeros(len(rows), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    base = model.model
    handles = [base.layers[i].self_attn.register_forward_hook(hook, with_kwargs=True) for i in layers]
    try:
        with torch.no_grad():
            base(ids, attention_mask=mask if len(rows) > 1 else None)
    finally:
        for handle in handles:
            handle.remove()
    return [{i: inputs[i][j, :n] for i in layers} for j, n in enumerate(lengths)], deltas


def hidden_positions(teacher, s, m, value, tok, target):
    """Positions of the teacher's row that the student does not see: the messages between the system prompt and
    the window (``history``), or only the tokens spelling the asked value there (``value``; none when nothing was
    told)."""
    import torch

    hidden = torch.zeros(len(teacher), dtype=torch.bool)
    if target == "history":
        hidden[s : len(teacher) - m] = True
        return hidden
    if value is None:
        return hidden
    hidden[s : len(teacher) - m] = spelled_positions(teacher[s : len(teacher) - m], [value], tok)
    return hidden


def spelled_positions(tokens, values, tok):
    """A bool mask over ``tokens`` of the positions that spell one of ``values`` (with or without a leading space)."""
    import torch

    mask = torch.zeros(len(tokens), dtype=torch.bool)
    for value in values:
        for spelled in (" " + value, value):
            ids = tok.encode(spelled, add_special_tokens=False)
            for i in range(len(tokens) - len(ids) + 1):
                if tokens[i : i + len(ids)] == ids:
                    mask[i : i + len(ids)] = True
    return mask


def cache_chats(model, tok, episodes, layers, target="history"):
    """Per chat: {'hist': {layer: (T_hist, d)}, 'query': {layer: (T_student, d)}, 'delta': {layer: (T_student, d)}}
    (δ is zero on the student's system prompt: there the teacher has not seen the history yet)."""
    import torch

    chats = []
    for episode in episodes:
        writes, student, teacher, s, m = chat_rows(episode, tok)
        # each message alone (one call per message, as the engine writes them), batched with the student prompt;
        # bf16 matmuls run about twice as fast as float32 on this CPU
        with torch.autocast("cpu", dtype=torch.bfloat16):
            *messages, query = frozen_pass(model, writes + [student], layers)[0]
            hidden = hidden_positions(teacher, s, m, episode.value, tok, target)
            _, deltas = frozen_pass(model, [teacher], layers, teacher=(hidden, m))
        hist = {i: [states[i] for states in messages] for i in layers}
        flat = [t for row in writes for t in row]
        told = [*episode.facts.values(), *episode.stale]
        chats.append({
            "hist": {i: torch.cat(hist[i]) for i in layers},
            "told": spelled_positions(flat, told, tok),
            "query": query,
            "delta": {i: torch.cat([deltas[i].new_zeros(s, deltas[i].shape[1]), deltas[i]]) for i in layers},
        })  # fmt: skip
    return chats


def init_from_attention(attn, r: int, beta_bias: float):
    """(write weight (4·H·r, d), beta bias (H·r), out weight (d, H·r)) from the layer's own projections: one state
    head per key/value group, keys from k_proj, queries from the group's mean q_proj, values from v_proj, the
    output from o_proj summed over the group's query heads."""
    import torch

    groups, heads, dim = attn.config.num_key_value_heads, attn.config.num_attention_heads, attn.head_dim
    per = heads // groups
    wq = attn.q_proj.weight.detach().view(heads, dim, -1)
    wq = wq.view(groups, per, dim, -1).mean(1).reshape(groups * dim, -1)
    wk, wv = attn.k_proj.weight.detach(), attn.v_proj.weight.detach()
    wo = attn.o_proj.weight.detach().view(-1, groups, per, dim).sum(2).reshape(-1, groups * dim)
    assert dim == r, "one state head per key/value group needs r = head_dim"
    write = torch.cat([wq, wk, wv, torch.zeros_like(wk)])
    return write.clone(), torch.full((groups * dim,), beta_bias), wo.clone()


class LayerMemory:
    """One layer's trainable memory (the δ-mem layer's parameters, same layout) and its teacher-forced loss."""

    def __init__(self, attn, r, beta_bias):
        import torch

        write, bias, out = init_from_attention(attn, r, beta_bias)
        self.heads_n, self.r = write.shape[0] // (4 * r), r
        self.write = torch.nn.Parameter(write)
        self.bias = torch.nn.Parameter(bias)
        self.out = torch.nn.Parameter(out)

    def parameters(self):
        return [self.write, self.bias, self.out]

    def heads(self, x):
        return x.view(x.shape[0], x.shape[1], self.heads_n, self.r).transpose(1, 2)

    def write_inputs(self, hist):
        """Keys, values and write-gate logits (B, H, T, r) of the history states ``hist`` (B, T, d)."""
        import torch
        import torch.nn.functional as F

        _, k, v, gate = (self.heads(p) for p in F.linear(hist, self.write).split(self.heads_n * self.r, dim=-1))
        return F.normalize(torch.tanh(k), dim=-1), v, gate + self.bias.view(self.heads_n, 1, self.r)

    def written(self, hist):
        """The memory (1, H, r, r) after writing one chat's history states ``hist`` (T, d)."""
        import torch

        from peft_deltamem import ops

        k, v, logits = self.write_inputs(hist.float()[None])
        state, valid = torch.zeros(1, k.shape[1], self.r, self.r), torch.ones(1, k.shape[2], dtype=torch.bool)
        return ops.delta_rule(k, k, v, torch.sigmoid(logits), state, valid, impl="fused_recurrent")[1]

    def correction(self, final, query):
        """``s · Δ_o · read`` (s = 1) of ``query`` states (B, Tq, d) reading the memory ``final`` (B, H, r, r)."""
        import torch
        import torch.nn.functional as F

        from peft_deltamem import ops

        q = F.normalize(torch.tanh(self.heads(F.linear(query, self.write[: self.heads_n * self.r]))), dim=-1)
        read = ops.read_only(q, final).transpose(1, 2).reshape(query.shape[0], query.shape[1], -1)
        return F.linear(read, self.out)


def gate_only_loss(memories, chats, layers, gate_open):
    """The gate loss of :func:`batch_loss` alone: the write gates' logits need no scan."""
    import torch.nn.functional as F

    losses = []
    for i in layers:
        hist, mask = pad([c["hist"][i] for c in chats])
        memory = memories[i]
        logits = F.linear(hist, memory.write[3 * memory.heads_n * memory.r :]) + memory.bias
        losses.append(balanced_gate_loss(logits, told_mask(chats, mask)[..., None], mask[..., None], gate_open))
    return sum(losses) / len(losses)


def told_mask(chats, hist_mask):
    """The told values' positions of a batch, shaped like its padded history mask (B, T)."""
    import torch

    told = torch.zeros_like(hist_mask)
    for row, c in enumerate(chats):
        told[row, : len(c["told"])] = c["told"]
    return told


def balanced_gate_loss(logits, told, valid, gate_open):
    """Cross-entropy of the write gates (``logits``) against ``gate_open`` on the ``told`` positions and 0 on the
    other ``valid`` ones, each side averaged on its own (the told values' tokens are about 1 % of a history)."""
    import torch.nn.functional as F

    told, valid = told.expand_as(logits), valid.expand_as(logits)
    bce = F.binary_cross_entropy_with_logits(logits, told.float() * gate_open, reduction="none")
    neg = bce[valid & ~told].mean()
    return bce[told].mean() + neg if told.any() else neg


def from_adapter(model, adapter_dir, layers, r):
    """The :class:`LayerMemory` of each of ``layers`` carrying a saved adapter's weights (the inverse of
    :func:`to_adapter`)."""
    import torch
    from safetensors.torch import load_file

    weights = load_file(Path(adapter_dir) / "adapter_model.safetensors")
    memories = {}
    for i in layers:
        memory = LayerMemory(model.model.layers[i].self_attn, r, 0.0)
        prefix = f"base_model.model.model.layers.{i}.self_attn.delta_mem_"
        with torch.no_grad():
            memory.write.copy_(weights[prefix + "write.weight"])
            memory.bias.copy_(weights[prefix + "beta_bias"])
            memory.out.copy_(weights[prefix + "out.weight"])
        memories[i] = memory
    return memories


def split_episodes(key, split):
    """The chats of ``split`` ("train" or "val") that a run (or its ``--cache`` file's key) trains or validates on."""
    from benchmarks import open_facts

    if split == "train":
        return open_facts.generate_episodes("train", key["pool"], None, seed=key["seed"])
    return open_facts.generate_episodes("val", key["n_val"], None, seed=0)


def pad(tensors):
    import torch

    length = max(t.shape[0] for t in tensors)
    out = torch.zeros(len(tensors), length, tensors[0].shape[1])
    mask = torch.zeros(len(tensors), length, dtype=torch.bool)
    for i, t in enumerate(tensors):
        out[i, : t.shape[0]] = t.float()
        mask[i, : t.shape[0]] = True
    return out, mask


def batch_loss(memories, chats, layers, gate_stats=None, gate_open=0.5, reply_weight=1.0):
    """Per layer: the fraction of δ's energy the memory leaves unexplained, over the batch, and the write gate's
    balanced cross-entropy against the told values' tokens. The layers' writes run as one scan (their state heads
    side by side: the layers are independent, the token order the same); the gate is asked for ``gate_open`` on
    the told values' tokens and 0 elsewhere. ``gate_stats`` (a dict) receives the mean
    gate on the told values' tokens and on the others."""
    import torch

    from peft_deltamem import ops

    inputs = [memories[i].write_inputs(pad([c["hist"][i] for c in chats])[0]) for i in layers]
    hist_mask = pad([c["hist"][layers[0]] for c in chats])[1]
    told = told_mask(chats, hist_mask)
    k, v, logits = (torch.cat(parts, dim=1) for parts in zip(*inputs))
    gate_loss = balanced_gate_loss(logits, told[:, None, :, None], hist_mask[:, None, :, None], gate_open)
    beta = torch.sigmoid(logits)
    if gate_stats is not None:
        pos, neg = told[:, None, :, None].expand_as(beta), (hist_mask & ~told)[:, None, :, None].expand_as(beta)
        gate_stats["told"] = beta[pos].mean().item() if pos.any() else float("nan")
        gate_stats["other"] = beta[neg].mean().item()
    state = torch.zeros(k.shape[0], k.shape[1], k.shape[3], k.shape[3])
    _, final = ops.delta_rule(k, k, v, beta, state, hist_mask, impl="fused_recurrent")
    finals = final.split([memories[i].heads_n for i in layers], dim=1)
    losses = {}
    for i, layer_final in zip(layers, finals, strict=True):
        query, query_mask = pad([c["query"][i] for c in chats])
        weight = query_mask.float()
        if reply_weight != 1.0:  # the last ``reply`` positions of each row: its target reply
            for row, c in enumerate(chats):
                length = len(c["query"][i])
                weight[row, length - c["reply"] : length] = reply_weight
        delta, _ = pad([c["delta"][i] for c in chats])
        err = (memories[i].correction(layer_final, query) - delta).pow(2) * weight[..., None]
        losses[i] = err.sum() / (delta.pow(2) * weight[..., None]).sum().clamp_min(1e-6)
    return losses, gate_loss


def to_adapter(model, memories, layers, r):
    """A PEFT δ-mem model (token writes, Δ on o only, one state head per key/value group) carrying the weights."""
    import torch
    from peft import get_peft_model

    from peft_deltamem import DeltaMemConfig

    heads = model.config.num_key_value_heads
    config = DeltaMemConfig(r=r, alpha=float(r), num_state_heads=heads, delta_heads=("o",),
                            layers_to_transform=layers, write_granularity="token")  # fmt: skip
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for i in layers:
            attn = peft_model.base_model.model.model.layers[i].self_attn
            layer = next(mod for mod in attn.modules() if hasattr(mod, "delta_mem_write"))
            layer.delta_mem_write["default"].weight.copy_(memories[i].write)
            layer.delta_mem_beta_bias["default"].copy_(memories[i].bias)
            layer.delta_mem_out["default"].weight.copy_(memories[i].out)
    return peft_model.eval()


def main(argv=None):
    args = parse_args(argv)
    import torch

    from peft_deltamem.real_model import load_smollm2

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()
    args.out.mkdir(parents=True, exist_ok=False)
    model, tok = load_smollm2(cache=False)
    layers = layer_list(args.layers)
    r = model.model.layers[0].self_attn.head_dim
    key = {"pool": args.pool, "n_val": args.n_val, "seed": args.seed, "layers": layers, "target": args.target}
    train_eps, val_eps = split_episodes(key, "train"), split_episodes(key, "val")

    def build():
        return (cache_chats(model, tok, train_eps, layers, args.target),
                cache_chats(model, tok, val_eps, layers, args.target))  # fmt: skip

    train, val = load_or_build(args.cache, key, build)
    from train_open_memory import served_layout

    for chats, episodes in ((train, train_eps), (val, val_eps)):  # the reply's length (not in older caches)
        for chat, episode in zip(chats, episodes, strict=True):
            chat["reply"] = len(served_layout(episode, tok)[2])
    history = {"args": {k: str(v) for k, v in vars(args).items()}, "cache_minutes": (time.time() - start) / 60,
               "steps": [], "val": []}  # fmt: skip
    print(f"cached {len(train)} train and {len(val)} val chats in {history['cache_minutes']:.1f} min", flush=True)
    memories = {i: LayerMemory(model.model.layers[i].self_attn, r, args.beta_bias_init) for i in layers}
    params = [p for m in memories.values() for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    from transformers import get_cosine_schedule_with_warmup

    schedule = get_cosine_schedule_with_warmup(optimizer, min(50, args.steps // 10), args.steps)
    rng = random.Random(args.seed)

    def validate(step):
        with torch.no_grad():
            per, gate = {i: 0.0 for i in layers}, {"told": 0.0, "other": 0.0}
            for b in range(0, len(val), args.batch_size):
                chats, stats = val[b : b + args.batch_size], {}
                for i, loss in batch_loss(memories, chats, layers, stats, args.gate_open, args.reply_weight)[0].items():
                    per[i] += loss.item() * len(chats) / len(val)
                for name in gate:
                    gate[name] += stats[name] * len(chats) / len(val)
        history["val"].append({"step": step, "unexplained": per, "mean": sum(per.values()) / len(per), "gate": gate})
        print(f"step {step}: val unexplained {sum(per.values()) / len(per):.3f} "
              f"({', '.join(f'{i}: {v:.2f}' for i, v in per.items())}); "
              f"gate on told values {gate['told']:.4f}, elsewhere {gate['other']:.4f}", flush=True)  # fmt: skip

    validate(0)
    if args.gate_steps:
        gate_optimizer = torch.optim.AdamW([p for m in memories.values() for p in (m.write, m.bias)], lr=1e-2,
                                           weight_decay=0.0)  # fmt: skip
        for step in range(1, args.gate_steps + 1):
            loss = gate_only_loss(memories, rng.sample(train, args.batch_size), layers, args.gate_open)
            gate_optimizer.zero_grad()
            loss.backward()
            # only the gate rows move (the write matrix holds the query, key and value rows too)
            for m in memories.values():
                m.write.grad[: 3 * m.heads_n * m.r] = 0
            gate_optimizer.step()
            if step % 50 == 0:
                print(f"gate step {step} loss {loss.item():.3f}", flush=True)
        history["gate_steps"] = args.gate_steps
        validate(0)
    for step in range(1, args.steps + 1):
        chats = rng.sample(train, args.batch_size)
        losses, gate_loss = batch_loss(memories, chats, layers, gate_open=args.gate_open,
                                       reply_weight=args.reply_weight)  # fmt: skip
        loss = sum(losses.values()) / len(losses) + args.gate_weight * gate_loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        history["steps"].append({"step": step, "loss": loss.item(), "gate_loss": gate_loss.item()})
        if step % 25 == 0:
            print(f"step {step} loss {loss.item():.3f} gate {gate_loss.item():.3f} "
                  f"({(time.time() - start) / 60:.1f} min)", flush=True)  # fmt: skip
        if step % args.eval_every == 0 or step == args.steps:
            validate(step)
        if (time.time() - start) / 60 > args.max_minutes:
            validate(step)
            break
    history["train_minutes"] = (time.time() - start) / 60
    peft_model = to_adapter(model, memories, layers, r)
    peft_model.save_pretrained(args.out / "adapter")
    final_checks(peft_model, tok, val_eps, history, args.out, args.engine_val)
    return history


def load_or_build(path, key, build):
    """``(train, val)`` from the ``--cache`` file ``path`` when it exists (its key must be ``key``), else ``build()``,
    written to ``path`` when given."""
    import torch

    if path and path.exists():
        cached = torch.load(path, weights_only=True)
        if cached["key"] != key:
            raise SystemExit(f"{path} holds the states of {cached['key']}, not of {key}: pass another --cache")
        return cached["train"], cached["val"]
    train, val = build()
    if path:
        torch.save({"key": key, "train": train, "val": val}, path)
    return train, val


def final_checks(peft_model, tok, val_eps, history, out, engine_val):
    """The end of a run: the forced value top-1 on val through the real adapter, then replies through the chat engine
    to the first ``engine_val`` val chats (history only in memory, visible and in memory, general questions), into
    ``history`` and ``out``/history.json (written after each)."""
    from train_open_memory import forced_value_top1

    history["forced_value_top1"] = forced_value_top1(peft_model, tok, val_eps)
    print("forced value top-1 on val:", history["forced_value_top1"], flush=True)
    (out / "history.json").write_text(json.dumps(history, indent=1))
    if engine_val:
        from benchmarks import open_recall

        result = open_recall.evaluate(peft_model, tok, val_eps[:engine_val],
                                      conditions=("memory", "context_memory"), general=True)  # fmt: skip
        history["engine"] = result
        print("engine:", json.dumps({k: {a: b for a, b in v.items() if a != "replies"} for k, v in result.items()}),
              flush=True)  # fmt: skip
        (out / "history.json").write_text(json.dumps(history, indent=1))


if __name__ == "__main__":
    main()
