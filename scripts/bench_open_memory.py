"""Open-vocabulary recall on SmolLM2-135M-Instruct: the shipped memory adapter against the alternatives, on the test
split of the open-facts generator (values and fact kinds never trained), through the chat engine, scored by reply.

Conditions (a window of 2 messages unless said; greedy replies, at most --max-new-tokens tokens):
  none            the question alone (frozen model)
  window          the last 2 messages, the rest dropped (frozen model)
  bm25            the top-k user messages of the dropped history by BM25, as a system note, + the window
  context         the whole conversation in the prompt (frozen model)
  memory          the window, older messages written into δ-mem's memory as they leave it
  context_memory  the whole conversation visible and written into memory as it arrives (no-harm check)
  other_memory    another episode's history in memory (control)
  ttt             nothing but the window; a LoRA fine-tuned on the conversation first (test-time training, the
                  first --ttt-episodes episodes only: it costs seconds per episode)
  general_*       fixed general questions after an unrelated conversation, with and without the memory

Where the adapter directory has a memory router (memory_router.safetensors, scripts/train_memory_router.py), the
memory conditions use it as the chat engine does (each reply reads the memory only when the router says so);
--no-router measures the adapter without it.

Then recall against the number of facts and the history length (small talk up to a few thousand tokens) for
window, context and memory, with the cost per answer. Writes open_memory_benchmark.json and .md (default
outputs/open_memory/; --write-docs replaces the committed docs/ files).

--write-modes leave,prompt runs only the memory conditions (memory, other_memory and the no-harm check) once per
way of writing (the chat engine's SessionPolicy.write: "leave", each message in a call of its own as it leaves the
window; "prompt", each message in the reply prompt that first shows it) and writes open_memory_write_modes.json / .md.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _script import ROOT, add_output_options, doc_parser, output_dir  # noqa: E402


def main(argv=None):
    parser = doc_parser(__doc__)
    add_output_options(parser, "open_memory", "open_memory_benchmark.json and open_memory_benchmark.md")
    parser.add_argument("--adapter", type=Path, required=True, help="a δ-mem adapter directory for SmolLM2")
    parser.add_argument("--split", choices=["val", "test"], default="test")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--ttt-episodes", type=int, default=24)
    parser.add_argument("--ttt-steps", type=int, default=20)
    parser.add_argument("--ttt-lr", type=float, default=1e-2)
    parser.add_argument("--n-sweep", type=int, default=24, help="episodes per point of the facts / length sweeps")
    parser.add_argument("--lengths", default="1,8,32", help="small-talk exchanges per point of the length sweep")
    parser.add_argument("--facts", default="1,2,4,6")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 8 episodes, 2 TTT, short sweeps")
    parser.add_argument("--no-router", action="store_true", help="every memory reply reads the memory")
    parser.add_argument(
        "--sweeps-only", action="store_true",
        help="only the facts / length sweeps (e.g. longer histories: --lengths 128 --facts ''); writes "
        "open_memory_sweeps.json and .md",
    )  # fmt: skip
    parser.add_argument(
        "--write-modes", default=None,
        help="comma-separated SessionPolicy.write values: only the memory conditions and the no-harm check, per mode",
    )  # fmt: skip
    args = parser.parse_args(argv)
    out = output_dir(parser, args)
    if args.quick:
        args.n, args.ttt_episodes, args.n_sweep, args.lengths, args.facts = 8, 2, 4, "1,4", "1,2"

    import torch
    from peft import PeftModel

    from benchmarks import open_facts, open_recall
    from peft_deltamem.agents.router import MemoryRouter
    from peft_deltamem.real_model import load_smollm2

    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    base, tok = load_smollm2(cache=False)
    model = PeftModel.from_pretrained(base, args.adapter).eval()
    router = None if args.no_router else MemoryRouter.load(args.adapter)
    print("memory router:", f"layer {router.layer}" if router is not None else "none", flush=True)
    machine = f"{os.cpu_count()} CPU cores, {args.threads} torch threads, load average {load:.2f} at start"
    command = "python scripts/bench_open_memory.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.sweeps_only:
        sweeps = run_sweeps(model, tok, router, args)
        summary = {"adapter": str(args.adapter), "split": args.split, "sweeps": sweeps, "command": command,
                   "machine": machine}  # fmt: skip
        out.mkdir(parents=True, exist_ok=True)
        (out / "open_memory_sweeps.json").write_text(json.dumps(summary, indent=1))
        text = f"{summary['command']}\n\nMachine: {summary['machine']}.\n\n{SWEEP_HEADER}\n{render_sweeps(sweeps)}\n"
        (out / "open_memory_sweeps.md").write_text(text)
        print(text)
        return summary
    episodes = open_facts.generate_episodes(args.split, args.n)
    if args.write_modes:
        return compare_write_modes(model, tok, router, episodes, args, out, f"{command}\n\nMachine: {machine}.")
    results, seconds = {}, {}
    for condition in open_recall.CONDITIONS:
        t = time.perf_counter()
        r = open_recall.evaluate(
            model, tok, episodes, conditions=(condition,), max_new_tokens=args.max_new_tokens, router=router
        )
        results[condition], seconds[condition] = r[condition], (time.perf_counter() - t) / len(episodes)
        print(condition, _brief(results[condition]), f"{seconds[condition]:.2f} s/answer", flush=True)
    general = open_recall.evaluate(model, tok, episodes, conditions=(), general=True, router=router)
    results.update(general)
    print("general", {k: general[k]["accuracy"] for k in general}, flush=True)
    t = time.perf_counter()
    replies = open_recall.engine_replies(
        model, tok, [bm25_messages(e, args.top_k) for e in episodes], window=open_recall.FULL, memory=False,
        max_new_tokens=args.max_new_tokens,
    )  # fmt: skip
    results["bm25"] = {**open_recall.score(replies, episodes), "replies": replies}
    seconds["bm25"] = (time.perf_counter() - t) / len(episodes)
    print("bm25", _brief(results["bm25"]), flush=True)
    subset = episodes[: args.ttt_episodes]
    t = time.perf_counter()
    replies = ttt_replies(base_copy(), tok, subset, args)
    seconds["ttt"] = (time.perf_counter() - t) / len(subset)
    results["ttt"] = {**open_recall.score(replies, subset), "replies": replies}
    results["ttt_subset"] = {
        m: open_recall.score(results[m]["replies"][: len(subset)], subset)["recall"]
        for m in ("none", "window", "bm25", "context", "memory")
    }
    print("ttt", _brief(results["ttt"]), results["ttt_subset"], flush=True)

    sweeps = run_sweeps(model, tok, router, args)
    summary = {
        "split": args.split,
        "n": len(episodes),
        "adapter": str(args.adapter.relative_to(ROOT)) if args.adapter.is_relative_to(ROOT) else str(args.adapter),
        "router": None if router is None else {"file": "memory_router.safetensors", "layer": router.layer},
        "results": results,
        "seconds_per_answer": seconds,
        "gap_recovered": open_recall.gap_recovered(results),
        "targets": open_recall.targets(results),
        "sweeps": sweeps,
        "ttt": {"episodes": len(subset), "steps": args.ttt_steps, "lr": args.ttt_lr},
        "machine": machine,
        "command": command,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_memory_benchmark.json").write_text(json.dumps(summary, indent=1))
    (out / "open_memory_benchmark.md").write_text(render(summary))
    print(render(summary))
    return summary


def compare_write_modes(model, tok, router, episodes, args, out, header: str) -> dict:
    """Recall (memory, other_memory) and the no-harm check for each of --write-modes, on the same chats."""
    from benchmarks import open_recall

    rows = {}
    for write in args.write_modes.split(","):
        t = time.perf_counter()
        r = open_recall.evaluate(
            model, tok, episodes, conditions=("memory", "other_memory"), general=True, router=router, write=write,
            max_new_tokens=args.max_new_tokens,
        )  # fmt: skip
        rows[write] = {**r, "seconds": time.perf_counter() - t}
        print(write, {k: _brief(v) for k, v in r.items()}, flush=True)
    names = list(rows)
    first = rows[names[0]]
    lines = [
        header, "",
        "| write | recall | degenerate | other_memory recall | general | general_fresh | replies changed vs "
        f"{names[0]} (memory, general, general_fresh) | seconds |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]  # fmt: skip
    for name, r in rows.items():
        changed = ", ".join(
            str(sum(a != b for a, b in zip(r[c]["replies"], first[c]["replies"])))
            for c in ("memory", "general_memory", "general_fresh_memory")
        )
        lines.append(
            f"| {name} | {r['memory']['recall']:.3f} | {r['memory']['degenerate']:.3f} | "
            f"{r['other_memory']['recall']:.3f} | {r['general_memory']['accuracy']:.3f} (window "
            f"{r['general_window']['accuracy']:.3f}) | {r['general_fresh_memory']['accuracy']:.3f} (window "
            f"{r['general_fresh_window']['accuracy']:.3f}) | {changed} | {r['seconds']:.0f} |"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_memory_write_modes.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1))
    (out / "open_memory_write_modes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


def run_sweeps(model, tok, router, args) -> dict:
    """Recall and seconds per answer of window, context and memory at each point of the facts / length sweeps."""
    from benchmarks import open_recall

    sweeps = {"facts": {}, "length": {}}
    for kind, values in (("facts", args.facts), ("length", args.lengths)):
        for v in (int(x) for x in values.split(",") if x.strip()):
            sweep_eps = sweep_episodes(kind, v, args)
            point = {"history_tokens": history_tokens(tok, sweep_eps)}
            for condition in ("window", "context", "memory"):
                t = time.perf_counter()
                r = open_recall.evaluate(model, tok, sweep_eps, conditions=(condition,), router=router)[condition]
                point[condition] = r["recall"]
                point[f"{condition}_seconds"] = (time.perf_counter() - t) / len(sweep_eps)
            sweeps[kind][v] = point
            print(kind, v, point, flush=True)
    return sweeps


SWEEP_HEADER = """| episodes | history tokens | window | full history | δ-mem | s/answer full history | s/answer δ-mem |
|---|---:|---:|---:|---:|---:|---:|"""


def render_sweeps(sweeps: dict) -> str:
    return "\n".join(
        f"| {kind} = {v} | {p['history_tokens']:.0f} | {p['window']:.2f} | {p['context']:.2f} | {p['memory']:.2f} | "
        f"{p['context_seconds']:.2f} | {p['memory_seconds']:.2f} |"
        for kind in ("facts", "length")
        for v, p in sweeps[kind].items()
    )


def sweep_episodes(kind: str, value: int, args) -> list:
    """The chats of one sweep point: ``value`` facts, or ``value`` small-talk exchanges."""
    from benchmarks import open_facts

    if kind == "facts":
        config = open_facts.OpenFactsConfig(min_facts=value, max_facts=value, not_told_share=0.0)
    else:
        config = open_facts.OpenFactsConfig(min_small_talk=value, max_small_talk=value, not_told_share=0.0)
    return open_facts.generate_episodes(args.split, args.n_sweep, config, start=20_000)


def history_tokens(tok, episodes) -> float:
    """Mean length in tokens of the whole conversations as the chat template renders them."""
    from peft_deltamem.training.episodes import tokenize_messages

    return sum(len(tokenize_messages(e.messages, tok)[0]) for e in episodes) / len(episodes)


def _brief(r: dict) -> dict:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items() if k != "replies"}


def bm25_messages(episode, top_k: int) -> list[dict]:
    """The window (last 2 messages) with the top-k user messages of the older history as a system note."""
    import bm25s

    older = [m["content"] for m in episode.messages[:-2] if m["role"] == "user"]
    note = []
    if older:
        retriever = bm25s.BM25()
        retriever.index(bm25s.tokenize(older, show_progress=False), show_progress=False)
        ids, _ = retriever.retrieve(bm25s.tokenize([episode.question], show_progress=False),
                                    k=min(top_k, len(older)), show_progress=False)  # fmt: skip
        note = [older[i] for i in sorted(int(i) for i in ids[0])]
    system = {"role": "system", "content": "Earlier the user said: " + " ".join(note)}
    return [system, *episode.messages[-2:]]


def base_copy():
    from peft_deltamem.real_model import load_smollm2

    return load_smollm2()[0]


def ttt_replies(plain, tok, episodes, args) -> list[str]:
    """Test-time training: a fresh LoRA (r 8, q/v) fine-tuned for --ttt-steps on the conversation's older messages,
    then the greedy reply to the window, rendered as the engine renders it."""
    import torch

    from benchmarks.ttt import ttt_fit, ttt_lora
    from peft_deltamem.agents.session import SessionPolicy, plan_turn
    from peft_deltamem.training.episodes import tokenize_messages

    replies = []
    for e in episodes:
        lora = ttt_lora(plain)  # a new LoRA for every conversation, unloaded after it
        ttt_fit(lora, torch.tensor([tokenize_messages(e.messages[:-2], tok)[0]]), args.ttt_steps, args.ttt_lr)
        prompt = torch.tensor([plan_turn([], 0, e.messages, tok, SessionPolicy(window=2)).prompt])
        with torch.no_grad():
            out = lora.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id)  # fmt: skip
        replies.append(tok.decode(out[0, prompt.shape[1] :], skip_special_tokens=True).strip())
        plain = lora.unload()
    return replies


def render(s: dict) -> str:
    r = s["results"]
    names = {
        "none": "no history (question only)", "window": "window of 2 messages", "bm25": "BM25 top-k + window",
        "context": "full history in the prompt (frozen)", "memory": "**δ-mem: window + memory**",
        "context_memory": "full history visible and in memory (adapter on)", "other_memory": "another chat's memory",
    }  # fmt: skip
    rows = "\n".join(
        f"| {names[m]} | {r[m]['recall']:.3f} | {r[m]['not_told']:.2f} | {r[m]['stale_named']:.2f} | "
        f"{r[m]['degenerate']:.3f} | {s['seconds_per_answer'].get(m, float('nan')):.2f} |"
        for m in names
    )
    ttt, sub, spent = r["ttt"], r["ttt_subset"], s["seconds_per_answer"]["ttt"]
    gap = s["gap_recovered"]
    sweep = render_sweeps(s["sweeps"])
    targets = "\n".join(f"- {'met' if ok else '**not met**'}: {name}" for name, ok in s["targets"].items())
    router = s.get("router")
    routing = "every memory reply reads the memory" if router is None else (
        f"a memory router (layer {router['layer']}) decides which memory replies read it")
    return f"""# Open-vocabulary recall on SmolLM2-135M-Instruct

Adapter `{s["adapter"]}`, {routing}; {s["n"]} {s["split"]}-split episodes of `benchmarks.open_facts` (values and
kinds of fact never trained); every reply produced by the chat engine and scored by what it says.
Machine: {s["machine"]}.

```bash
{s["command"]}
```

| condition | recall (told) | "not told" (never-told) | names an old value | degenerate | s / answer |
|---|---:|---:|---:|---:|---:|
{rows}

Gap between no history and the full history in the prompt recovered by the memory:
{"n/a" if gap is None else f"{gap:.2f}"}.

Test-time training (a LoRA, r 8 on q/v, fine-tuned for {s["ttt"]["steps"]} steps at lr {s["ttt"]["lr"]} on each
conversation's older messages), first {s["ttt"]["episodes"]} episodes: recall {ttt["recall"]:.3f}, {spent:.1f} s per
answer; on the same episodes: no history {sub["none"]:.3f}, window {sub["window"]:.3f}, BM25 {sub["bm25"]:.3f},
full history {sub["context"]:.3f}, δ-mem {sub["memory"]:.3f}.

No harm on general questions after an unrelated conversation ({len(r["general_window"]["replies"])} questions):
accuracy {r["general_memory"]["accuracy"]:.3f} with that conversation in memory, {r["general_window"]["accuracy"]:.3f}
without; degenerate replies {r["general_memory"]["degenerate"]:.3f} / {r["general_window"]["degenerate"]:.3f}.
The second set, written later and never fitted on ({len(r["general_fresh_window"]["replies"])} questions): accuracy
{r["general_fresh_memory"]["accuracy"]:.3f} with the conversation in memory, {r["general_fresh_window"]["accuracy"]:.3f}
without; degenerate replies {r["general_fresh_memory"]["degenerate"]:.3f} /
{r["general_fresh_window"]["degenerate"]:.3f}.

Targets:
{targets}

Recall against the number of facts and the history length (small-talk exchanges), with seconds per answer:

{SWEEP_HEADER}
{sweep}
"""


if __name__ == "__main__":
    main()
