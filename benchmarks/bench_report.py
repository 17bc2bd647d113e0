"""Statistics, goal checks, Markdown tables and PNG plots for :func:`benchmark.run_benchmark` results.

Confidence intervals are over seeds: mean ± t(0.975, n-1) · sd / √n of the per-seed values (each seed has its own
trained adapters and its own held-out episodes); "spread" is max - min over seeds.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}

FULL = "full context"
TRUNCATED = "truncated context, no memory"
FLAT_LATENCY_RATIO = 1.5  # "flat": cost at the longest history at most this many times the cost at the shortest


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (NaN for a single value: no interval)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    t = _T975.get(len(values) - 1, 1.96)
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


def spread(values: Sequence[float]) -> float:
    return max(values) - min(values)


def per_seed(results: dict[str, Any], method: str, key: str = "accuracy") -> list[float]:
    """Per-seed values of ``default[key]`` for ``method``, in seed order."""
    return list(per_seed_map(results, method, key).values())


def per_seed_map(results: dict[str, Any], method: str, key: str = "accuracy") -> dict[int, float]:
    """``{seed: default[key]}`` for ``method``, in seed order."""
    seeds = results["methods"][method]["per_seed"]
    return {int(s): seeds[s]["default"][key] for s in sorted(seeds, key=int)}


def main_deltamem(results: dict[str, Any]) -> str:
    """Name of the main δ-mem method (first variant, history only in memory)."""
    return next(m for m in results["methods"] if m.startswith("δ-mem") and m.endswith("state only"))


def gap_recovered(results: dict[str, Any], method: str | None = None) -> list[float]:
    """Per seed: (acc(method) - acc(truncated)) / (acc(full) - acc(truncated))."""
    method = method or main_deltamem(results)
    full, trunc = per_seed_map(results, FULL), per_seed_map(results, TRUNCATED)
    out = []
    for seed, value in per_seed_map(results, method).items():
        gap = full[seed] - trunc[seed]
        out.append((value - trunc[seed]) / gap if gap > 0 else float("nan"))
    return out


def _fmt(mean: float, ci: float, digits: int = 3) -> str:
    if math.isnan(ci):
        return f"{mean:.{digits}f} (1 seed)"
    return f"{mean:.{digits}f} ± {ci:.{digits}f}"


def goals(results: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """``(goal, met, evidence)`` for the benchmark's three goals of the full run."""
    main = main_deltamem(results)
    rec_mean, rec_ci = mean_ci(gap_recovered(results))
    out = [
        (
            "δ-mem (history only in memory) recovers ≥ half of the no-memory → full-context gap",
            rec_mean >= 0.5,
            f"recovered {_fmt(rec_mean, rec_ci, 2)} of the gap ({main})",
        )
    ]
    lora = next((m for m in results["methods"] if m.startswith("LoRA")), None)
    if lora is not None:
        d_mean, d_ci = mean_ci(per_seed(results, main))
        l_mean, l_ci = mean_ci(per_seed(results, lora))
        t_mean, _ = mean_ci(per_seed(results, TRUNCATED))
        out.append(
            (
                "δ-mem beats the matched-budget LoRA control (a weak control: this LoRA never sees the history, so "
                "it can only score like truncated context without memory)",
                d_mean > l_mean,
                f"{_fmt(d_mean, d_ci)} vs {_fmt(l_mean, l_ci)} ({'non-' if d_mean - d_ci > l_mean + l_ci else ''}"
                f"overlapping 95% CIs); truncated context without memory: {t_mean:.3f}",
            )
        )
    cost = results.get("cost")
    if cost:
        first, last = cost[0], cost[-1]
        d_ratio = last["deltamem_latency_s"] / first["deltamem_latency_s"]
        f_ratio = last["full_latency_s"] / first["full_latency_s"]
        out.append(
            (
                f"δ-mem cost per answer flat from {first['history_tokens']} to {last['history_tokens']} history "
                "tokens while full context grows",
                d_ratio <= FLAT_LATENCY_RATIO and f_ratio > FLAT_LATENCY_RATIO,
                f"latency ×{d_ratio:.2f} for δ-mem vs ×{f_ratio:.1f} for full context; peak memory "
                f"{_mib(first['deltamem_peak_mib'])} → {_mib(last['deltamem_peak_mib'])} MiB vs "
                f"{_mib(first['full_peak_mib'])} → {_mib(last['full_peak_mib'])} MiB",
            )
        )
    return out


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def losses(results: dict[str, Any]) -> list[str]:
    """Sentences naming where the main δ-mem method loses (to a non-oracle method, or past its capacity)."""
    main = main_deltamem(results)
    d_mean, _ = mean_ci(per_seed(results, main))
    lines = []
    for name in results["methods"]:
        if name == FULL or name.startswith("δ-mem"):
            continue
        mean, ci = mean_ci(per_seed(results, name))
        if mean > d_mean:
            lines.append(f"{name}: {_fmt(mean, ci)} vs {main} {d_mean:.3f} at the default setting.")
    curve = capacity_means(results, main)
    full_curve = capacity_means(results, FULL)
    for facts, value in curve.items():
        if value < 0.5 * full_curve[facts]:
            lines.append(
                f"capacity: at {facts} facts {main} gets {value:.3f} vs full context {full_curve[facts]:.3f} "
                "(less than half)."
            )
    return lines


def variant_ranking(results: dict[str, Any]) -> list[str]:
    """The δ-mem variants with the history only in memory, best first, with their budget and the bounds."""
    names = [n for n in results["methods"] if n.startswith("δ-mem") and n.endswith("state only")]
    stats = {n: mean_ci(per_seed(results, n)) for n in names}
    full_mean, _ = mean_ci(per_seed(results, FULL))
    lines = []
    for name in sorted(names, key=lambda n: -stats[n][0]):
        relative = "above" if stats[name][0] > full_mean else "below"
        lines.append(
            f"{name}: {_fmt(*stats[name])}, {results['methods'][name]['trainable']} trainable parameters "
            f"({relative} full context's {full_mean:.3f})"
        )
    return lines


def capacity_means(results: dict[str, Any], method: str) -> dict[int, float]:
    seeds = results["methods"][method]["per_seed"]
    facts = sorted({int(f) for s in seeds.values() for f in s["capacity"]})
    return {
        f: statistics.fmean(s["capacity"][f if f in s["capacity"] else str(f)] for s in seeds.values()) for f in facts
    }


def _capacity_ci(results: dict[str, Any], method: str) -> dict[int, tuple[float, float]]:
    seeds = results["methods"][method]["per_seed"]
    facts = sorted({int(f) for s in seeds.values() for f in s["capacity"]})
    return {f: mean_ci([s["capacity"][f if f in s["capacity"] else str(f)] for s in seeds.values()]) for f in facts}


def _latency(results: dict[str, Any], method: str, key: str) -> float | None:
    values = [s["latency"].get(key) for s in results["methods"][method]["per_seed"].values()]
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# ------------------------------------------------------------------------------------------------------ markdown


def method_table(results: dict[str, Any]) -> str:
    rows = [
        "| method | exact match (95% CI) | per seed | context tokens | memory tokens | trainable params | "
        "latency / answer (ms) | peak RSS growth (MiB) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, entry in results["methods"].items():
        accs = per_seed(results, name)
        mean, ci = mean_ci(accs)
        first = next(iter(entry["per_seed"].values()))["default"]
        latency = _latency(results, name, "latency_ms")
        write = _latency(results, name, "write_ms")
        latency_text = f"{latency:.1f}" + (f" (+{write:.0f} write)" if write is not None else "")
        rows.append(
            f"| {name} | {_fmt(mean, ci)} | {' / '.join(f'{a:.3f}' for a in accs)} | {first['context_tokens']:.0f} | "
            f"{first['memory_tokens']:.0f} | {entry['trainable'] or '—'} | {latency_text} | "
            f"{_mib(_latency(results, name, 'peak_mib'))} |"
        )
    return "\n".join(rows)


def capacity_table(results: dict[str, Any]) -> str:
    facts = list(capacity_means(results, FULL))
    rows = ["| method | " + " | ".join(f"{f} facts" for f in facts) + " |", "| --- |" + " ---: |" * len(facts)]
    for name in results["methods"]:
        cis = _capacity_ci(results, name)
        rows.append(f"| {name} | " + " | ".join(_fmt(*cis[f], 2) for f in facts) + " |")
    return "\n".join(rows)


def cost_table(results: dict[str, Any]) -> str:
    rows = [
        "| history tokens | full context: prompt tokens | latency (ms) | peak RSS growth (MiB) | δ-mem: prompt tokens "
        "| latency (ms) | peak RSS growth (MiB) | state floats | one-time write of the history (s) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results.get("cost", []):
        rows.append(
            f"| {row['history_tokens']} | {row['full_context_tokens']} | {1e3 * row['full_latency_s']:.1f} | "
            f"{_mib(row['full_peak_mib'])} | {row['deltamem_context_tokens']} | {1e3 * row['deltamem_latency_s']:.1f} "
            f"| {_mib(row['deltamem_peak_mib'])} | {row['deltamem_state_floats']} | {row['deltamem_write_s']:.2f} |"
        )
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------------------- plots


def _pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _short(name: str) -> str:
    return name.replace(", no memory", "").replace(" + truncated context", " + window")


def plot_capacity(results: dict[str, Any], path: Path) -> None:
    """Two panels: every baseline with the main δ-mem; every δ-mem variant (history only in memory) with the bounds."""
    plt = _pyplot()

    names = list(results["methods"])
    main = main_deltamem(results)
    baselines = [n for n in names if not n.startswith("δ-mem")] + [main]
    variants = [FULL, TRUNCATED] + [n for n in names if n.startswith("δ-mem") and n.endswith("state only")]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, group, title in (
        (axes[0], baselines, "baselines vs δ-mem (history only in memory)"),
        (axes[1], variants, "δ-mem variants (history only in memory)"),
    ):
        colors = plt.get_cmap("tab10")
        for i, name in enumerate(group):
            cis = _capacity_ci(results, name)
            facts = list(cis)
            one_seed = all(math.isnan(cis[f][1]) for f in facts)
            ax.errorbar(
                facts,
                [cis[f][0] for f in facts],
                yerr=None if one_seed else [cis[f][1] for f in facts],
                label=_short(name) + (" (1 seed)" if one_seed else ""),
                color=colors(i % 10),
                linestyle="-" if name.startswith("δ-mem") else "--",
                marker="o",
                markersize=3,
                capsize=2,
            )
        ax.set_xlabel("facts stated in the history")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    axes[0].set_ylabel("exact match (mean over seeds, 95% CI)")
    fig.suptitle("Memory capacity: accuracy vs number of facts per episode")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cost(results: dict[str, Any], path: Path) -> None:
    plt = _pyplot()

    rows = results["cost"]
    x = [r["history_tokens"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(x, [1e3 * r["full_latency_s"] for r in rows], "o--", label="full context (prefill + answer)")
    left.plot(x, [1e3 * r["deltamem_latency_s"] for r in rows], "o-", label="δ-mem (window + question, reads state)")
    left.set_ylabel("latency per answer (ms)")
    right.plot(x, [r["full_peak_mib"] or 0 for r in rows], "o--", label="full context")
    right.plot(x, [r["deltamem_peak_mib"] or 0 for r in rows], "o-", label="δ-mem")
    right.set_ylabel("peak RSS growth during the answer (MiB)")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("history tokens")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    left.set_yscale("log")
    fig.suptitle("Cost per answer vs history length (tiny backbone, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy(results: dict[str, Any], path: Path) -> None:
    plt = _pyplot()

    names = list(results["methods"])
    stats = [mean_ci(per_seed(results, n)) for n in names]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(names) + 1.2))
    colors = ["tab:blue" if n.startswith("δ-mem") else "tab:gray" for n in names]
    ax.barh(range(len(names)), [s[0] for s in stats], color=colors)
    with_ci = [i for i, s in enumerate(stats) if not math.isnan(s[1])]
    ax.errorbar(
        [stats[i][0] for i in with_ci],
        with_ci,
        xerr=[stats[i][1] for i in with_ci],
        fmt="none",
        ecolor="black",
        capsize=2,
    )
    labels = [_short(n) + (" (1 seed)" if math.isnan(s[1]) else "") for n, s in zip(names, stats)]
    ax.set_yticks(range(len(names)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("exact match at the default setting (mean over seeds, 95% CI where more than one seed)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict[str, Any], docs_dir: str | Path, command: str, machine: str) -> Path:
    """Write ``results.md`` and the PNG plots into ``docs_dir``; returns the Markdown path."""
    docs = Path(docs_dir)
    docs.mkdir(parents=True, exist_ok=True)
    plot_accuracy(results, docs / "bench_accuracy.png")
    plot_capacity(results, docs / "bench_capacity.png")
    if results.get("cost"):
        plot_cost(results, docs / "bench_cost.png")
    path = docs / "results.md"
    path.write_text(render_markdown(results, command, machine))
    return path


def _timing(results: dict[str, Any]) -> str:
    """How much of the run was training, and what a run from an empty cache costs."""
    backbone = results["backbone"]
    runs = [(t["seconds"], t["cached"]) for t in results.get("training", [])]
    runs.append((backbone["train"]["seconds"], bool(backbone.get("cached"))))
    trained = [seconds for seconds, cached in runs if not cached]
    saved = [seconds for seconds, cached in runs if cached]
    text = f"training {sum(trained) / 60:.1f} min of it" if trained else "no training"
    if saved:
        text += (
            f"; {len(saved)} checkpoints came from the cache, whose original training took {sum(saved) / 60:.1f} "
            f"min, so a run from an empty cache takes about {(results['seconds'] + sum(saved)) / 60:.0f} min"
        )
    return text


def training_table(results: dict[str, Any]) -> str:
    rows = ["| model | seed | training time (s) | loaded from cache |", "| --- | ---: | ---: | --- |"]
    backbone = results["backbone"]
    rows.append(f"| backbone | — | {backbone['train']['seconds']:.0f} | {'yes' if backbone.get('cached') else 'no'} |")
    for t in results.get("training", []):
        rows.append(f"| {t['model']} | {t['seed']} | {t['seconds']:.0f} | {'yes' if t['cached'] else 'no'} |")
    return "\n".join(rows)


def _phases(config: dict[str, Any]) -> str:
    parts = []
    for phase in config["adapter_phases"]:
        mix, train = phase["mix"], phase["train"]
        facts = mix["num_facts"]
        facts_text = f"{facts[0]}" if facts[0] == facts[1] else f"{facts[0]}–{facts[1]}"
        parts.append(
            f"{train['steps']} steps on {phase['episodes']} episodes with {facts_text} facts "
            f"(AdamW lr {train['lr']}, batch {train['batch_size']}, warm-up + cosine)"
        )
    return "; then ".join(parts)


def render_markdown(results: dict[str, Any], command: str, machine: str) -> str:
    config = results["config"]
    main = main_deltamem(results)
    rec_mean, rec_ci = mean_ci(gap_recovered(results))
    full_mean, _ = mean_ci(per_seed(results, FULL))
    trunc_mean, _ = mean_ci(per_seed(results, TRUNCATED))
    main_mean, main_ci = mean_ci(per_seed(results, main))
    default = next(iter(results["methods"][FULL]["per_seed"].values()))["default"]
    window = next(iter(results["methods"][TRUNCATED]["per_seed"].values()))["default"]
    mix = config["eval_mix"]
    backbone = results["backbone"]
    lines = [
        "# Does it remember? δ-mem vs full context, truncation, RAG and LoRA",
        "",
        f"Generated by `{command}` on {machine}: {results['seconds'] / 60:.1f} min wall time "
        f"({_timing(results)}). Everything is seeded and built locally (no downloads); checkpoints are cached under "
        "`.cache/peft_deltamem/bench/` and re-created when missing.",
        "",
        "## Headline",
        "",
        f"With the history **only in memory** ({main}), the frozen tiny backbone answers "
        f"**{_fmt(main_mean, main_ci)}** exact match, against {trunc_mean:.3f} with a truncated context and no "
        f"memory and {full_mean:.3f} with the full history in context: δ-mem recovers "
        f"**{_fmt(rec_mean, rec_ci, 2)}** of the gap (mean over {len(config['seeds'])} seeds, 95% CI).",
        "",
        "![accuracy](bench_accuracy.png)",
        "",
        "## Goals",
        "",
        "| goal | met | evidence |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {goal} | {'yes' if met else '**no**'} | {why} |" for goal, met, why in goals(results)]
    lost = losses(results)
    lines += ["", "Where δ-mem loses:", ""] + ([f"- {line}" for line in lost] or ["- nowhere at these settings."])
    lines += ["", "δ-mem variants, history only in memory, best first:", ""]
    lines += [f"- {line}" for line in variant_ranking(results)]
    lines += [
        "",
        "## Setup",
        "",
        f"- Task: `eval/synthetic.py`, default setting {mix['num_facts'][0]} facts, {mix['num_updates'][0]} updates, "
        f"{mix['num_distractors'][0]} distractor exchanges, {mix['num_sessions'][0]} sessions, "
        f"{mix['num_values']} values per slot, visible window = last {mix['visible_turns']} messages + question. "
        f"History ≈ {default['context_tokens']:.0f} tokens in context for full context vs "
        f"{window['context_tokens']:.0f} for the window ({default['context_tokens'] / window['context_tokens']:.1f}×). "
        "The asked fact (possibly updated; the newest value is the answer) is always outside the window.",
        f"- Backbone: tiny Llama (d={config['backbone']['hidden_size']}, {config['backbone']['num_layers']} layers, "
        f"{backbone['parameters']} parameters) trained {config['backbone_train']['steps']} steps with the whole "
        "history visible (answering every stated fact), then frozen and shared by all methods.",
        f"- Adapters (δ-mem and LoRA alike, the same episodes per seed): {_phases(config)}. δ-mem rows alternate "
        "between (window visible, older history in memory) and (question only, whole history in memory); LoRA "
        "(q, k, v, o) sees the same episodes' visible streams with no memory (static weights), with the rank whose "
        "parameter count is closest to δ-mem TSW r=8's.",
        f"- Evaluation: {config['eval_episodes']} held-out episodes per seed at the default setting, "
        f"{config['capacity_episodes']} per point of the capacity curve; seeds {list(config['seeds'])} (each seed: "
        "its own adapters and its own held-out episodes). Exact match = the greedy next token after the prompt is "
        "the answer word.",
        "- BM25: `bm25s` over the messages outside the window (stop words 'en_plus'), the top-k in chronological "
        "order before the window.",
        f"- Latency: median wall time of one answer (batch 1, prompt prefill + next token) over "
        f"{config['latency_episodes']} episodes; δ-mem's memory is written before the timer starts (the history "
        "arrived earlier; write time in parentheses); BM25's indexing and retrieval are timed with the answer. "
        "Peak memory: growth of the process's peak resident set size during the answer (freed heap pages handed "
        "back with malloc_trim, then Linux VmHWM reset through /proc/self/clear_refs), not tracemalloc (which does "
        "not see torch allocations). Timings on a shared CPU are noisy.",
        "",
        "## Accuracy at the default setting",
        "",
        method_table(results),
        "",
        "## Memory capacity: accuracy vs facts per episode",
        "",
        "![capacity](bench_capacity.png)",
        "",
        capacity_table(results),
    ]
    if results.get("cost"):
        lines += [
            "",
            "## Cost per answer vs history length",
            "",
            "Untrained weights (cost, not accuracy), same backbone architecture, r=8 TSW; one measurement per point "
            "after a warm-up. Full context: prefill of history + question, then the answer. δ-mem: the history was "
            f"written into the state as it arrived (calls of ≤{config['cost']['write_chunk_tokens']} tokens, the "
            "one-time cost in the last column, linear in the history); the answer reads the fixed-size state from a "
            f"prompt of the last {config['cost']['visible_turns']} messages + question.",
            "",
            "![cost](bench_cost.png)",
            "",
            cost_table(results),
        ]
    lines += ["", "## Training time", "", training_table(results)]
    return "\n".join(lines) + "\n"
