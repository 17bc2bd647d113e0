"""Summarise recipe runs of scripts/train_real_memory.py: a markdown table and the validation learning curves.

Reads <runs>/<name>/history.json (and results.json when the run had --test) for every run directory given
(default: every directory under outputs/real/), writes real_recipes.md (table), real_recipes.json (the curves
and results, raw) and real_curves.png (validation memory-only accuracy against training minutes).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _script import ROOT, add_output_options, doc_parser, output_dir  # noqa: E402


def describe(recipe: dict) -> str:
    gran = {"token": "TSW", "segment": "SSW"}[recipe["write_granularity"]]
    if recipe["num_state_heads"] > 1:
        gran = f"MSW×{recipe['num_state_heads']} ({gran})"
    layers = recipe["layers"]
    if not layers:
        span = "all"
    elif len(layers) == max(layers) - min(layers) + 1:
        span = f"{min(layers)}-{max(layers)}"
    else:
        span = ",".join(map(str, layers))
    parts = [gran, f"r={recipe['r']}", f"b_β={recipe['beta_bias_init']}", f"layers {span}", f"lr {recipe['lr']:g}"]
    if recipe.get("curriculum_steps"):
        parts.append(f"curriculum {recipe['curriculum_steps']}")
    if recipe.get("all_questions"):
        parts.append("all questions")
    if recipe.get("copy_init"):
        parts.append(f"copy init {recipe['copy_init']:g}")
    if recipe.get("cache_pool"):
        parts.append(f"cached pool of {recipe['cache_pool']} episodes")
    if recipe.get("ablation_no_memory"):
        parts.append(f"no-memory rows {recipe['ablation_no_memory']:g}")
    data = recipe.get("data", {})
    parts.append(f"≤{data.get('max_facts')} facts, ≤{data.get('max_small_talk')} small talk")
    parts.append(f"batch {recipe['batch_size']}")
    return ", ".join(parts)


def main(argv=None):
    parser = doc_parser(__doc__)
    parser.add_argument("runs", nargs="*", type=Path, help="run directories (default: outputs/real/*)")
    add_output_options(parser, "real_report", "real_recipes.md, real_recipes.json and real_curves.png")
    args = parser.parse_args(argv)
    out = output_dir(parser, args)
    runs = args.runs or sorted(p for p in (ROOT / "outputs" / "real").glob("*") if (p / "history.json").is_file())

    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, raw = [], {}
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        history = json.loads((run / "history.json").read_text())
        results = json.loads((run / "results.json").read_text()) if (run / "results.json").is_file() else None
        val = history["val"]
        ref = history["reference_val"]
        raw[run.name] = {"history": history, "results": results}
        ax.plot([v["minutes"] for v in val], [v["accuracy"] for v in val], marker="o", ms=3, label=run.name)
        best = max(val, key=lambda v: v["accuracy"]) if val else None
        test = results["results"] if results else None
        rows.append(
            f"| {run.name} | {describe(history['recipe'])} | {len(history['steps'])} | "
            f"{history.get('train_minutes', sum(s['seconds'] for s in history['steps']) / 60):.1f} | "
            f"{ref['none']['accuracy']:.2f} / "
            f"{val[-1]['accuracy']:.2f} (best {best['accuracy']:.2f}) / {ref['context']['accuracy']:.2f} | "
            + (
                f"{test['none']['accuracy']:.2f} / {test['memory']['accuracy']:.2f} / {test['context']['accuracy']:.2f}"
                f" | {results['gap_recovered']:.2f} |"
                if test and results.get("gap_recovered") is not None
                else "– | – |"
            )
        )
    ax.set_xlabel("training minutes")
    ax.set_ylabel("val recall, memory only (8-way)")
    ax.axhline(0.125, color="grey", ls=":", lw=1, label="chance (1/8)")
    if raw:
        reference = next(iter(raw.values()))["history"]["reference_val"]
        ax.axhline(reference["none"]["accuracy"], color="black", ls="--", lw=1, label="val: no memory")
        ax.axhline(reference["context"]["accuracy"], color="black", ls="-.", lw=1, label="val: full context")
    ax.legend(fontsize=6)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "real_curves.png", dpi=120)
    header = (
        "| run | recipe | steps | train min | val: none / memory (best) / context | "
        "test: none / memory / context | test gap recovered |\n|---|---|---|---|---|---|---|\n"
    )
    (out / "real_recipes.md").write_text(header + "\n".join(rows) + "\n")
    (out / "real_recipes.json").write_text(json.dumps(raw, indent=1))
    print(header + "\n".join(rows))


if __name__ == "__main__":
    main()
