"""Tune a trained memory's read through the model's own next token (open-vocabulary study, docs/open_memory.md).

The attention-transfer runs (``scripts/distill_attention_memory.py``, a3-a5) leave a memory whose write gate keeps
the told values and whose read points roughly the way the model's attention to them would, yet the model's next
token where the value is due does not move: squared error to that attention is the wrong objective. This script
starts from such an adapter and trains its **read** (each adapted layer's query rows W_mq and output map Δ_o; the
write side, W_mk, W_mv, W_β and b_β, stays as it is) on what the model says:

- the history is written into memory exactly as the chat engine writes it (one call per message that left a window
  of two, through the adapted layers), once per chat before training (the write side does not change);
- the window-only prompt plus the target reply is read through the adapted layers (from the frozen states below the
  first adapted one: ``training.frozen_prefix``); the loss is the cross-entropy of the value's tokens where they are
  due, plus, at the reply's other positions (and every position of replies to questions about something never
  told), ``--kl-weight`` times the KL from the frozen model (adapters off) or ``--reply-weight`` times the target
  reply's cross-entropy;
- ``--general-weight``: a KL from the frozen model on its greedy replies to general prompts, each alone in the
  prompt with a training chat's memory (b2), or with ``--general-layout after-chat`` asked as the evaluation asks its
  general questions: after a training chat's history, its last message in the window and the rest in memory.
  ``--general-knowledge`` adds factual questions of other types than the evaluation's, ``--general-flip-weight``
  weighs the positions where the greedy token changes, and ``--max-general-kl`` keeps only a step whose KL on the
  held-out quarter of the prompts (with the val chats' memories) stays within it. With a read gate (``--read-gate``,
  ``--train gate``), ``--general-gate-weight`` adds the gates' mean over the general rows: the KL goes flat near the
  frozen model while the gate stays partly open, and this pulls it shut where no memory is needed. The memories are
  written once with the initial gate (a gate also shapes what later layers write); the engine check at the end
  writes with the trained one.

Validation (val split: values and kinds never trained) reports the forced next token where the value is due and
the reply's first token, every ``--eval-every`` steps; the step with the most of both together is kept. At the end
the adapter is measured through the chat engine (``benchmarks.open_recall``: replies with the history only in memory,
visible and in memory, and general questions with an unrelated chat in memory).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init", type=Path, required=True, help="adapter directory to start from (e.g. outputs/a5/adapter)")
    p.add_argument("--pool", type=int, default=600, help="training chats (train split)")
    p.add_argument("--n-val", type=int, default=48, help="val chats (values and kinds never trained)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--kl-weight", type=float, default=1.0)
    p.add_argument(
        "--reply-weight", type=float, default=0.0,
        help="> 0: the target reply's cross-entropy at its other positions (its wording), weighted so, instead of the "
        "KL from the frozen model there",
    )  # fmt: skip
    p.add_argument(
        "--general-weight", type=float, default=0.0,
        help="weight of a KL from the frozen model on its own greedy replies to general prompts (arithmetic, word "
        "tasks, small talk; none of the evaluation's questions), read with a training chat's memory (0: off)",
    )  # fmt: skip
    p.add_argument("--general-batch", type=int, default=8, help="general rows per step")
    p.add_argument(
        "--general-layout", choices=("alone", "after-chat"), default="alone",
        help="alone (b2): each general prompt alone in the prompt, read with a training chat's memory drawn per step; "
        "after-chat (b3-b5): asked after a training chat as the evaluation asks its general questions",
    )  # fmt: skip
    p.add_argument(
        "--general-repeat", type=int, default=1,
        help="each training general prompt is asked after this many different training chats",
    )  # fmt: skip
    p.add_argument(
        "--general-knowledge", action="store_true",
        help="add factual questions (train_open_memory.knowledge_prompts; other types than the evaluation's) to the "
        "general prompts",
    )  # fmt: skip
    p.add_argument(
        "--general-flip-weight", type=float, default=0.0,
        help="add this times each general row's summed KL where the adapter's greedy token is not the frozen "
        "model's (0: the plain mean KL)",
    )  # fmt: skip
    p.add_argument(
        "--general-gate-weight", type=float, default=0.0,
        help="add this times the read gates' mean over the general rows (needs a read gate): closes the gate where "
        "no memory is needed (0: off)",
    )  # fmt: skip
    p.add_argument(
        "--max-general-kl", type=float, default=None,
        help="keep only a validated step whose general KL (the held-out prompts, with the val chats' memories) is at "
        "most this",
    )  # fmt: skip
    p.add_argument(
        "--read-gate", action="store_true",
        help="give the adapter a learned read gate (DeltaMemConfig.read_gate; starts at g = 1, the adapter as it was) "
        "if --init has none",
    )  # fmt: skip
    p.add_argument(
        "--train", choices=("read", "gate", "read+gate"), default="read",
        help="what trains: the read (W_mq rows and Δ_o), the read gate only, or both",
    )  # fmt: skip
    p.add_argument("--gate-lr", type=float, default=None, help="learning rate of the read gate (default: --lr)")
    p.add_argument("--cache", type=Path, help="file of the written memories: loaded when it exists, else written")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--max-minutes", type=float, default=45.0, help="stop training after this long (set-up included)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine-val", type=int, default=48, help="val chats replied to through the chat engine at the end")
    p.add_argument("--out", type=Path, required=True, help="output directory (adapter, history.json)")
    return p.parse_args(argv)


def chat_items(peft_model, tok, episodes, batch_size=16):
    """Per chat: the memory after its history (``(layer, adapter) -> (H, r, r)``), the frozen states entering the
    first adapted layer of its window-only prompt plus reply (minus the last token), the reply's tokens, and a
    bool mask over them of the value's tokens."""
    import torch

    from peft_deltamem.training.frozen_prefix import cached_message_writes, frozen_hidden
    from train_open_memory import served_layout, value_span

    items = []
    for b in range(0, len(episodes), batch_size):
        chunk = [(e, *served_layout(e, tok)) for e in episodes[b : b + batch_size]]
        rows = [w for _, writes, _, _ in chunk for w in writes] + [p + a[:-1] for _, _, p, a in chunk]
        # bf16 matmuls run about twice as fast as float32 on this CPU; the memory itself is float32 whatever the dtype
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = frozen_hidden(peft_model, rows, tok.pad_token_id)
            per, at = [], 0
            for _, writes, _, _ in chunk:
                per.append(hidden[at : at + len(writes)])
                at += len(writes)
            states = cached_message_writes(peft_model, per)
        for j, (episode, _, _, answer) in enumerate(chunk):
            value = torch.zeros(len(answer), dtype=torch.bool)
            span = value_span(tok, answer, episode.value) if episode.value is not None else None
            if span is not None:
                value[span[0] : span[0] + span[1]] = True
            items.append({
                "states": {k: s[j].detach().clone() for k, s in states.items()},
                "row": hidden[at + j].to(torch.bfloat16), "answer": torch.tensor(answer), "value": value,
            })  # fmt: skip
    return items


def batch_logits(peft_model, items, memory=True):
    """Logits (B, K, vocab) at the positions that predict each reply's tokens (right-aligned, K the longest reply)
    and a (B, K) mask of them; ``memory=False``: the frozen model (adapters off)."""
    import torch

    from peft_deltamem.training.frozen_prefix import cached_read_logits

    longest = max(len(it["answer"]) for it in items)
    states = {k: torch.stack([it["states"][k] for it in items]) for k in items[0]["states"]} if memory else None
    logits = cached_read_logits(peft_model, [it["row"].float() for it in items], states, last=longest)
    mask = torch.zeros(len(items), longest, dtype=torch.bool)
    for j, it in enumerate(items):
        mask[j, longest - len(it["answer"]) :] = True
    return logits, mask


def right_aligned(items, key, longest, fill):
    import torch

    out = torch.full((len(items), longest), fill, dtype=items[0][key].dtype)
    for j, it in enumerate(items):
        out[j, longest - len(it[key]) :] = it[key]
    return out


def loss_and_hits(peft_model, items, kl_weight, reply_weight=0.0):
    """(loss, stats) of a batch. The loss: the value tokens' cross-entropy, plus at the reply's other positions
    either ``kl_weight`` times the KL from the frozen model (``reply_weight`` 0) or ``reply_weight`` times the target
    reply's cross-entropy (its wording: "Your bike's colour is ...", "You haven't told me ..."). The stats: value CE,
    KL elsewhere, forced hits on each value's first token (and how many), and hits on each reply's first token."""
    import torch
    import torch.nn.functional as F

    logits, mask = batch_logits(peft_model, items)
    with torch.no_grad():
        frozen, _ = batch_logits(peft_model, items, memory=False)
    longest = mask.shape[1]
    answer = right_aligned(items, "answer", longest, 0)
    value = right_aligned(items, "value", longest, False) & mask
    logp = logits.float().log_softmax(-1)
    ce = -logp.gather(-1, answer[..., None])[..., 0]
    value_ce = ce[value].mean() if value.any() else logits.new_zeros(())
    other = mask & ~value
    kl = F.kl_div(logp[other], frozen.float().log_softmax(-1)[other], log_target=True, reduction="batchmean")
    loss = value_ce + (reply_weight * ce[other].mean() if reply_weight else kl_weight * kl)
    first = value & ~torch.cat([value.new_zeros(len(items), 1), value[:, :-1]], dim=1)  # each value's first token
    right = logits.argmax(-1) == answer
    start = mask & ~torch.cat([mask.new_zeros(len(items), 1), mask[:, :-1]], dim=1)  # each reply's first token
    stats = {"value_ce": value_ce.item(), "kl": kl.item(), "hits": right[first].sum().item(), "n": int(first.sum()),
             "start_hits": right[start].sum().item()}  # fmt: skip
    return loss, stats


def general_items(peft_model, tok, prompts, episodes=None, memories=None):
    """The no-harm rows: each prompt with the frozen model's greedy reply to it (the target), as the states entering
    the first adapted layer (prompt plus reply minus its last token) and the reply's tokens.

    With ``episodes`` (``--general-layout after-chat``) prompt ``i`` is asked as the evaluation asks its general
    questions: after chat ``episodes[i % n]``'s history (the window: its last message and the prompt), read with that
    chat's memory (``memories[i % n]["states"]``: the same writes, the last message is not written), the target the
    frozen model's reply to the same window without memory. Without (``alone``, b2's layout) each prompt is alone in
    the prompt and :func:`general_kl` pairs it with a memory."""
    import torch

    from benchmarks.open_recall import engine_replies
    from peft_deltamem.training.episodes import tokenize_prompt_and_answer
    from peft_deltamem.training.frozen_prefix import frozen_hidden

    n = len(episodes) if episodes is not None else 1
    chats = [([] if episodes is None else episodes[i % n].history) + [{"role": "user", "content": p}]
             for i, p in enumerate(prompts)]  # fmt: skip
    replies = engine_replies(peft_model, tok, chats, window=2, memory=False, max_new_tokens=40)
    rows = [tokenize_prompt_and_answer(c[-2:], {"role": "assistant", "content": r}, tok)
            for c, r in zip(chats, replies, strict=True)]  # fmt: skip
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = frozen_hidden(peft_model, [p + a[:-1] for p, a in rows], tok.pad_token_id)
    return [{"row": h.to(torch.bfloat16), "answer": torch.tensor(a),
             **({} if memories is None else {"states": memories[i % n]["states"]})}
            for i, (h, (_, a)) in enumerate(zip(hidden, rows, strict=True))]  # fmt: skip


@contextlib.contextmanager
def read_gates(peft_model):
    """Collects every read gate's pre-sigmoid output ``(B, T, H)`` of the forward passes run inside, in a list."""
    from peft_deltamem.layer import DeltaMemLayer

    seen, handles = [], []
    for layer in (m for m in peft_model.modules() if isinstance(m, DeltaMemLayer)):
        for gate in layer.delta_mem_read_gate.values():
            handles.append(gate.register_forward_hook(lambda module, args, out: seen.append(out)))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def general_kl(peft_model, items, memories=None, flip_weight=0.0):
    """KL(frozen || adapter) over each general reply's positions, read with each item's memory (or, given, the
    ``memories`` items' states); with ``flip_weight``, plus that times each row's summed KL at the positions where
    the adapter's greedy token is not the frozen model's (where a greedy reply changes)."""
    import torch

    if memories is not None:
        items = [{**g, "states": m["states"]} for g, m in zip(items, memories, strict=True)]
    logits, mask = batch_logits(peft_model, items)
    with torch.no_grad():
        frozen, _ = batch_logits(peft_model, items, memory=False)
    logp, ref = logits.float().log_softmax(-1), frozen.float().log_softmax(-1)
    per = (ref.exp() * (ref - logp)).sum(-1)  # (B, K): the KL at each position
    kl = per[mask].mean()
    if flip_weight:
        flips = mask & (logits.argmax(-1) != frozen.argmax(-1))
        kl = kl + flip_weight * per[flips].sum() / len(items)
    return kl


def gate_mean(gates, items):
    """The mean ``2·sigmoid`` of the collected gate outputs (``read_gates``) over each row's own (left-padded)
    positions (prompt included), every layer and state head; ``--general-gate-weight`` adds it over the general rows:
    a pull towards a closed gate on questions that need no memory, where the KL has gone flat."""
    import torch

    if not gates:
        raise SystemExit("a gate weight needs a read gate: pass --read-gate")
    longest = max(len(it["row"]) for it in items)
    valid = torch.stack([torch.arange(longest) >= longest - len(it["row"]) for it in items])  # (B, T)
    return torch.stack([(2.0 * torch.sigmoid(g.float()))[valid].mean() for g in gates]).mean()


def read_parameters(peft_model, train="read"):
    """What trains, everything else frozen: ``(rows, outs, gates)``. ``train`` "read": every δ-mem layer's read
    side, (write weight, its W_mq rows) in ``rows`` and Δ_o's weight in ``outs``; "gate": only the read gates
    (W_g and b_g, in ``gates``); "read+gate": both."""
    from peft_deltamem.layer import DeltaMemLayer

    for p in peft_model.parameters():
        p.requires_grad_(False)
    rows, outs, gates = [], [], []
    for layer in (m for m in peft_model.modules() if isinstance(m, DeltaMemLayer)):
        for adapter, setting in layer.settings.items():
            if "read" in train.split("+"):
                rows.append((layer.delta_mem_write[adapter].weight, slice(0, setting.width)))
                outs.append(layer.delta_mem_out[adapter].weight)
            if "gate" in train.split("+"):
                if adapter not in layer.delta_mem_read_gate:
                    raise SystemExit(f"--train {train} needs a read gate: pass --read-gate")
                gates += list(layer.delta_mem_read_gate[adapter].parameters())
    for p in [w for w, _ in rows] + outs + gates:
        p.requires_grad_(True)
    return rows, outs, gates


def load_init(model, init, read_gate=False):
    """The PEFT model of adapter ``init``, trainable; ``read_gate`` gives an adapter without a read gate one at its
    initial zeros (g = 1: the same outputs until it trains)."""
    import torch
    from peft import PeftModel, get_peft_model
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    from peft_deltamem import DeltaMemConfig

    config = DeltaMemConfig.from_pretrained(str(init))
    if not read_gate or config.read_gate:
        return PeftModel.from_pretrained(model, init, is_trainable=True).eval()
    config.read_gate, config.inference_mode = True, False
    peft_model = get_peft_model(model, config)
    weights = load_peft_weights(str(init))
    for name in [n for n in weights if n.endswith("delta_mem_write.weight")]:
        layer = name[: -len("delta_mem_write.weight")]
        weights[layer + "delta_mem_read_gate.weight"] = torch.zeros(config.num_state_heads, weights[name].shape[1])
        weights[layer + "delta_mem_read_gate.bias"] = torch.zeros(config.num_state_heads)
    set_peft_model_state_dict(peft_model, weights)
    return peft_model.eval()


def keep_read_rows(rows):
    """Zero the gradient of every row of the write projections but W_mq's (``rows`` from :func:`read_parameters`)."""
    for write, keep in rows:
        grad = write.grad.clone()
        write.grad.zero_()
        write.grad[keep] = grad[keep]


def main(argv=None):
    args = parse_args(argv)
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from distill_attention_memory import final_checks, load_or_build, split_episodes
    from peft_deltamem.real_model import load_smollm2

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()
    args.out.mkdir(parents=True, exist_ok=False)
    model, tok = load_smollm2(cache=False)
    peft_model = load_init(model, args.init, args.read_gate)
    if args.general_gate_weight and not peft_model.peft_config["default"].read_gate:
        raise SystemExit(f"--general-gate-weight needs a read gate: {args.init} has none, pass --read-gate")
    key = {"pool": args.pool, "n_val": args.n_val, "seed": args.seed}
    train_eps, val_eps = split_episodes(key, "train"), split_episodes(key, "val")
    key |= {"init": str(args.init)}
    train, val = load_or_build(
        args.cache, key, lambda: (chat_items(peft_model, tok, train_eps), chat_items(peft_model, tok, val_eps))
    )
    history = {"args": {k: str(v) for k, v in vars(args).items()}, "setup_minutes": (time.time() - start) / 60,
               "steps": [], "val": []}  # fmt: skip
    print(f"wrote {len(train)} train and {len(val)} val memories in {history['setup_minutes']:.1f} min", flush=True)
    general, general_val = [], []
    after_chat = args.general_layout == "after-chat"
    if not after_chat and (args.general_repeat != 1 or args.general_knowledge):
        raise SystemExit("--general-repeat and --general-knowledge need --general-layout after-chat")
    if args.general_weight:
        from benchmarks import open_facts
        from train_open_memory import general_prompts, knowledge_prompts

        # a quarter of the prompts is held out, asked after the val chats (measured every --eval-every steps)
        prompts = general_prompts(open_facts, random.Random(args.seed))
        if args.general_knowledge:
            prompts += knowledge_prompts(open_facts, random.Random(args.seed + 1))
            random.Random(args.seed).shuffle(prompts)
        held_out, prompts = prompts[: len(prompts) // 4], prompts[len(prompts) // 4 :]
        if after_chat:
            order = random.Random(args.seed).sample(range(len(train)), len(train))
            general = general_items(peft_model, tok, prompts * args.general_repeat, [train_eps[i] for i in order],
                                    [train[i] for i in order])  # fmt: skip
            general_val = general_items(peft_model, tok, held_out, val_eps, val)
        else:  # each prompt alone, read with a memory drawn per step (val: the val chats' in turn)
            general, general_val = general_items(peft_model, tok, prompts), general_items(peft_model, tok, held_out)
        print(f"{len(general)} general rows to train on and {len(general_val)} held out ({args.general_layout}), with "
              f"the frozen model's replies ({(time.time() - start) / 60:.1f} min)", flush=True)  # fmt: skip
    rows, outs, gates = read_parameters(peft_model, args.train)
    params = [w for w, _ in rows] + outs + gates
    groups = [{"params": [w for w, _ in rows] + outs}, {"params": gates, "lr": args.gate_lr or args.lr}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(20, args.steps // 10), args.steps)
    rng = random.Random(args.seed)
    best = {"score": (-1, 0.0)}

    def validate(step):
        with torch.no_grad():
            total = {"ce": 0.0, "kl": 0.0, "hits": 0, "n": 0, "general": 0.0, "start": 0, "general_gate": 0.0,
                     "recall_gate": 0.0}  # fmt: skip
            for b in range(0, len(general_val), args.batch_size):
                chunk = general_val[b : b + args.batch_size]
                memories = None if after_chat else [val[(b + j) % len(val)] for j in range(len(chunk))]
                with read_gates(peft_model) as seen:
                    total["general"] += general_kl(peft_model, chunk, memories).item() * len(chunk) / len(general_val)
                if seen:
                    total["general_gate"] += gate_mean(seen, chunk).item() * len(chunk) / len(general_val)
            for b in range(0, len(val), args.batch_size):
                chunk = val[b : b + args.batch_size]
                with read_gates(peft_model) as seen:
                    _, stats = loss_and_hits(peft_model, chunk, args.kl_weight, args.reply_weight)
                if seen:
                    total["recall_gate"] += gate_mean(seen, chunk).item() * len(chunk) / len(val)
                total["ce"] += stats["value_ce"] * stats["n"]
                total["kl"] += stats["kl"] * len(chunk)
                total["hits"] += stats["hits"]
                total["n"] += stats["n"]
                total["start"] += stats["start_hits"]
        record = {"step": step, "value_ce": total["ce"] / max(total["n"], 1), "kl": total["kl"] / len(val),
                  "forced_top1": total["hits"] / max(total["n"], 1), "n": total["n"],
                  "general_kl": total["general"], "reply_start_top1": total["start"] / len(val),
                  "general_gate": total["general_gate"], "recall_gate": total["recall_gate"]}  # fmt: skip
        history["val"].append(record)
        print(f"step {step}: val value CE {record['value_ce']:.3f}, KL elsewhere {record['kl']:.3f}, "
              f"forced top-1 {record['forced_top1']:.3f} of {record['n']}, general KL {total['general']:.3f}, "
              f"reply start top-1 {record['reply_start_top1']:.3f}, mean read gate general {total['general_gate']:.3f} "
              f"recall {total['recall_gate']:.3f}",
              flush=True)  # fmt: skip
        # the most forced values and reply starts together (ties: the lower general KL), among the steps within
        # --max-general-kl
        allowed = args.max_general_kl is None or total["general"] <= args.max_general_kl
        score = (total["hits"] + total["start"], -total["general"])
        if allowed and score > best["score"]:
            best.update(score=score, step=step, weights=[p.detach().clone() for p in params])

    validate(0)
    for step in range(1, args.steps + 1):
        loss, stats = loss_and_hits(peft_model, rng.sample(train, args.batch_size), args.kl_weight, args.reply_weight)
        if general:
            drawn = rng.sample(general, args.general_batch)
            memories = None if after_chat else rng.sample(train, args.general_batch)
            # the gate outputs are collected only where they enter the loss (the hooks take the layers' fast path away)
            with read_gates(peft_model) if args.general_gate_weight else contextlib.nullcontext([]) as seen:
                g_kl = general_kl(peft_model, drawn, memories, args.general_flip_weight)
            loss = loss + args.general_weight * g_kl
            if args.general_gate_weight:
                g_gate = gate_mean(seen, drawn)
                loss = loss + args.general_gate_weight * g_gate
                stats["general_gate"] = g_gate.item()
            stats["general_kl"] = g_kl.item()
        optimizer.zero_grad()
        loss.backward()
        if rows:
            keep_read_rows(rows)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        history["steps"].append({"step": step, "loss": loss.item(), **stats})
        if step % 10 == 0 or step <= 3:
            print(f"step {step} loss {loss.item():.3f} value CE {stats['value_ce']:.3f} KL {stats['kl']:.3f} "
                  f"({(time.time() - start) / 60:.1f} min)", flush=True)  # fmt: skip
        if step % args.eval_every == 0 or step == args.steps or (time.time() - start) / 60 > args.max_minutes:
            validate(step)
        if (time.time() - start) / 60 > args.max_minutes:
            break
    history["train_minutes"] = (time.time() - start) / 60
    if "step" not in best:
        (args.out / "history.json").write_text(json.dumps(history, indent=1))
        raise SystemExit(f"no validated step had a general KL within --max-general-kl {args.max_general_kl} "
                         f"(see {args.out / 'history.json'}); nothing saved")  # fmt: skip
    history["best_step"] = best["step"]
    with torch.no_grad():
        for p, w in zip(params, best["weights"], strict=True):
            p.copy_(w)
    peft_model.save_pretrained(args.out / "adapter")
    print(f"best step {best['step']}", flush=True)
    final_checks(peft_model, tok, val_eps, history, args.out, args.engine_val)
    return history


if __name__ == "__main__":
    main()
