"""A reproducible memory benchmark: δ-mem against full context, truncation, BM25 retrieval and LoRA.

Protocol (everything seeded, nothing downloaded):

1. A tiny Llama backbone is trained on the synthetic multi-session task (:mod:`.synthetic`) with the **whole
   history visible**, so it can answer by attention; then it is frozen and shared by every method (δ-mem only
   steers a backbone that can already answer from context).
2. Per seed, adapters are trained on the same episodes: δ-mem variants (history in memory; half of the rows with
   the visible window, half with the question only) and a LoRA control with a matched trainable-parameter
   budget (same episodes, same visible streams, no memory: static weights).
3. All methods answer the same held-out episodes of that seed (same backbone, same visible window); exact match
   of the greedy answer token. Accuracy is also measured against the number of facts per episode (capacity),
   and cost per answer against the history length (:mod:`.bench_cost`).

:func:`run_benchmark` returns a JSON-able dict; :mod:`.bench_report` turns it into tables and plots.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model

from peft_deltamem.config import DeltaMemConfig

from .bench_cost import CostSpec, cost_curve, measure
from .bench_data import EpisodeMix, FeatureBuilder, bm25_top_k, context_tokens
from .bench_train import (
    BackboneSpec,
    TrainSpec,
    cached_adapter,
    cached_backbone,
    count_trainable,
    exact_match,
    fingerprint,
    lora_rank_for_budget,
    train,
)
from .synthetic import SyntheticEpisode, build_tokenizer, task_vocabulary

DEFAULT_CACHE_DIR = Path(".cache/peft_deltamem/bench")
BENCHMARK_VERSION = 1  # bump when a change invalidates cached checkpoints without changing their specs


@dataclass(frozen=True)
class DeltaMemVariant:
    """One δ-mem configuration under test."""

    name: str
    r: int = 8
    num_state_heads: int = 1
    write_granularity: str = "token"

    def config(self) -> DeltaMemConfig:
        return DeltaMemConfig(
            task_type="CAUSAL_LM",
            r=self.r,
            num_state_heads=self.num_state_heads,
            write_granularity=self.write_granularity,
        )


DEFAULT_VARIANTS = (
    DeltaMemVariant("TSW r=8"),
    DeltaMemVariant("TSW r=16", r=16),
    DeltaMemVariant("TSW r=32", r=32),
    DeltaMemVariant("SSW r=8", write_granularity="segment"),
    DeltaMemVariant("MSW r=8 H=4", num_state_heads=4),
)


@dataclass(frozen=True)
class Phase:
    """One adapter-training phase: ``episodes`` drawn from ``mix``, trained with ``train``."""

    mix: EpisodeMix
    train: TrainSpec
    episodes: int


# Single-fact episodes with short, value-free distractors: a cheap warm-up that gets the adapters past the initial
# plateau (learning *what* to write and how to read it out) before the full mix (which facts, which update).
WARMUP_MIX = EpisodeMix(
    num_facts=(1, 1),
    num_updates=(0, 0),
    num_distractors=(1, 3),
    num_sessions=(1, 1),
    visible_turns=2,
    value_distractor_rate=0.0,
)
TRAIN_MIX = EpisodeMix(num_facts=(1, 10), num_updates=(0, 3), num_distractors=(0, 8), num_sessions=(1, 3))


@dataclass(frozen=True)
class BenchmarkConfig:
    """Every knob of a benchmark run (its hash keys the checkpoint cache).

    ``eval_mix`` is the default setting (4 facts); ``capacity_facts`` re-evaluates it at other numbers of facts.
    ``variants[0]`` is the main δ-mem configuration (the reference of the LoRA budget); the other variants
    (ablations) are trained and evaluated on the ``ablation_seeds`` only, to bound the run time. The backbone trains on
    ``train_mix`` with the history visible; every adapter (δ-mem and LoRA alike) trains through ``adapter_phases``
    on the same episodes. ``extra_questions`` adds Q/A pairs about other facts to training sequences.
    """

    backbone: BackboneSpec = field(default_factory=BackboneSpec)
    backbone_train: TrainSpec = field(default_factory=lambda: TrainSpec(steps=3000, lr=3e-3))
    train_mix: EpisodeMix = TRAIN_MIX
    backbone_episodes: int = 16384
    adapter_phases: tuple[Phase, ...] = (
        Phase(WARMUP_MIX, TrainSpec(steps=500, lr=1e-2), 2048),
        Phase(TRAIN_MIX, TrainSpec(steps=800, lr=1e-2), 4096),
    )
    eval_mix: EpisodeMix = field(default_factory=EpisodeMix)
    capacity_facts: tuple[int, ...] = (1, 2, 4, 6, 8, 10)
    eval_episodes: int = 256
    capacity_episodes: int = 128
    extra_questions: int = 9
    seeds: tuple[int, ...] = (0, 1, 2)
    ablation_seeds: tuple[int, ...] = (0,)
    backbone_seed: int = 0
    variants: tuple[DeltaMemVariant, ...] = DEFAULT_VARIANTS
    rag_k: tuple[int, ...] = (1, 2, 4)
    lora: bool = True
    latency_episodes: int = 8
    cost: CostSpec | None = field(default_factory=CostSpec)

    def key(self, *parts: Any) -> str:
        return fingerprint(BENCHMARK_VERSION, task_vocabulary(), torch.__version__.split("+")[0], *parts)


@dataclass
class Method:
    """How one method answers: which model, which view of the episode, and whether the memory is used."""

    name: str
    kind: str  # "context" | "memory" | "rag" | "lora"
    view: str
    model: Any
    memory: bool = False
    rag_k: int = 0
    trainable: int = 0
    info: dict[str, Any] = field(default_factory=dict)


class _Logger:
    def __init__(self, log: Callable[[str], None] | None):
        self.log = log or (lambda message: None)
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        self.log(f"[{time.perf_counter() - self.start:7.1f}s] {message}")


def _features(builder: FeatureBuilder, episodes: Sequence[SyntheticEpisode], method: Method) -> list[dict]:
    if method.kind == "rag":
        return [builder.build(e, "rag", bm25_top_k(e, method.rag_k)) for e in episodes]
    return [builder.build(e, method.view) for e in episodes]


def _train_backbone(config: BenchmarkConfig, tokenizer, cache: Path, log: _Logger):
    def make():
        episodes = config.train_mix.sample(10_000 + config.backbone_seed, config.backbone_episodes)
        builder = FeatureBuilder(tokenizer, config.extra_questions, seed=config.backbone_seed)
        features = [builder.build(e, "full") for e in episodes]
        model = config.backbone.build(len(tokenizer), seed=config.backbone_seed)
        log(f"training the backbone with the history visible ({config.backbone_train.steps} steps)")
        stats = train(model, tokenizer, features, config.backbone_train, config.backbone_seed, memory=False, log=log)
        return model, {"train": stats, "parameters": sum(p.numel() for p in model.parameters())}

    return cached_backbone(cache, config.key("backbone", *_backbone_parts(config)), make)


def _backbone_parts(config: BenchmarkConfig) -> tuple:
    """What determines the trained backbone (part of every cache key)."""
    return (
        config.backbone,
        config.backbone_train,
        config.train_mix,
        config.backbone_episodes,
        config.extra_questions,
        config.backbone_seed,
    )


def _adapter_training_features(builder: FeatureBuilder, episodes: Sequence[SyntheticEpisode], memory: bool):
    """Half of the rows see the visible window, half only the question (alternating); δ-mem rows get memory."""
    views = ("memory_window", "memory_only") if memory else ("window", "question")
    return [builder.build(e, views[i % 2]) for i, e in enumerate(episodes)]


def _train_phases(model, tokenizer, phases: Sequence[tuple[Phase, list]], seed: int, memory: bool, log) -> dict:
    stats = {}
    for i, (phase, features) in enumerate(phases):
        stats[f"phase{i}"] = train(model, tokenizer, features, phase.train, 100 * seed + i, memory, log)
    return stats


def _train_adapters(config: BenchmarkConfig, tokenizer, backbone, seed: int, cache: Path, log: _Logger) -> list[Method]:
    builder = FeatureBuilder(tokenizer, config.extra_questions, seed=seed)
    episodes = [phase.mix.sample(2000 + 10 * seed + i, phase.episodes) for i, phase in enumerate(config.adapter_phases)]
    memory_phases = [
        (phase, _adapter_training_features(builder, eps, memory=True))
        for phase, eps in zip(config.adapter_phases, episodes)
    ]
    common = (config.adapter_phases, seed, *_backbone_parts(config))
    methods: list[Method] = []
    variants = config.variants if seed in config.ablation_seeds else config.variants[:1]
    for variant in variants:

        def make(base, variant=variant):
            torch.manual_seed(seed)
            model = get_peft_model(base, variant.config())
            log(f"seed {seed}: training δ-mem {variant.name} ({count_trainable(model)} parameters)")
            return model, {"train": _train_phases(model, tokenizer, memory_phases, seed, True, log)}

        model, info = cached_adapter(cache, config.key("deltamem", variant, *common), backbone, make)
        trainable = sum(p.numel() for n, p in model.named_parameters() if "delta_mem_" in n)
        for view, suffix in (("memory_only", "state only"), ("memory_window", "+ truncated context")):
            methods.append(Method(f"δ-mem {variant.name} {suffix}", "memory", view, model, True, 0, trainable, info))
    if config.lora:
        budget = methods[0].trainable
        targets = ("q_proj", "k_proj", "v_proj", "o_proj")
        rank = lora_rank_for_budget(backbone, budget, targets)

        def make_lora(base):
            torch.manual_seed(seed)
            lora = LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, target_modules=list(targets))
            model = get_peft_model(base, lora)
            log(f"seed {seed}: training LoRA r={rank} ({count_trainable(model)} parameters; δ-mem budget {budget})")
            phases = [
                (phase, _adapter_training_features(builder, eps, memory=False))
                for phase, eps in zip(config.adapter_phases, episodes)
            ]
            return model, {"train": _train_phases(model, tokenizer, phases, seed, False, log)}

        model, info = cached_adapter(cache, config.key("lora", rank, targets, *common), backbone, make_lora)
        trainable = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        methods.append(Method(f"LoRA r={rank} (matched budget)", "lora", "window", model, False, 0, trainable, info))
    return methods


def _baselines(config: BenchmarkConfig, backbone) -> list[Method]:
    methods = [
        Method("full context", "context", "full", backbone),
        Method("truncated context, no memory", "context", "window", backbone),
        Method("question only, no memory", "context", "question", backbone),
    ]
    methods += [Method(f"BM25 top-{k} + truncated context", "rag", "rag", backbone, rag_k=k) for k in config.rag_k]
    return methods


@torch.no_grad()
def _next_token(method: Method, feature: dict, memory=None) -> torch.Tensor:
    """One answer: prefill the prompt and return the next-token logits (δ-mem reads ``memory``, writes off)."""
    ids = torch.tensor([feature["input_ids"][: context_tokens(feature)]])
    extra = {"memory": memory, "memory_writes": False} if memory is not None else {}
    return method.model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1, **extra).logits


@torch.no_grad()
def _write(model, feature: dict):
    """Write an episode's memory stream into a new memory and return it."""
    stream = torch.tensor([feature["memory_input_ids"]])
    memory = model.new_memory(batch_size=1)
    model(
        input_ids=stream,
        attention_mask=torch.ones_like(stream),
        memory=memory,
        memory_segment_ids=torch.tensor([feature["memory_segment_ids"]]),
    )
    return memory


def _latency(method: Method, builder: FeatureBuilder, episodes: Sequence[SyntheticEpisode]) -> dict:
    """Median wall time and peak RSS growth of answering one question (batch 1, prompt prefill + next token).

    δ-mem: the memory is written first (not timed with the answer: a one-time cost paid when the history arrived;
    reported apart as ``write_ms``); BM25: indexing the history and retrieving are timed with the answer.
    """
    times, peaks, writes = [], [], []
    for episode in episodes:
        if method.kind == "rag":

            def run(episode=episode):
                return _next_token(method, builder.build(episode, "rag", bm25_top_k(episode, method.rag_k)))
        else:
            feature = builder.build(episode, method.view)
            memory = None
            if method.memory:
                memory, seconds, _ = measure(lambda feature=feature: _write(method.model, feature))
                writes.append(seconds)

            def run(feature=feature, memory=memory):
                return _next_token(method, feature, memory)

        _, seconds, peak = measure(run)
        times.append(seconds)
        peaks.append(peak)
    known = [p for p in peaks if p is not None]
    result = {"latency_ms": 1e3 * statistics.median(times), "peak_mib": statistics.median(known) if known else None}
    if writes:
        result["write_ms"] = 1e3 * statistics.median(writes)
    return result


def _evaluate(method: Method, tokenizer, builder, episodes) -> dict[str, Any]:
    features = _features(builder, episodes, method)
    correct = exact_match(method.model, tokenizer, features, memory=method.memory)
    return {
        "accuracy": sum(correct) / len(correct),
        "n": len(correct),
        "context_tokens": statistics.mean(context_tokens(f) for f in features),
        "memory_tokens": statistics.mean(len(f["memory_input_ids"]) for f in features) if method.memory else 0,
    }


def run_benchmark(
    config: BenchmarkConfig,
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the whole benchmark; returns ``{"config", "backbone", "methods", "training", "cost", "seconds", ...}``.

    ``methods`` maps each method name to ``{"kind", "trainable", "per_seed": {seed: {"default": {...},
    "capacity": {facts: accuracy}, "latency": {...}, "train": {...}}}}``; ``training`` lists every adapter's
    training time (``cached``: loaded from ``cache_dir`` in this run, its time is the original training's).
    """
    logger = _Logger(log)
    cache = Path(cache_dir)
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    backbone, backbone_info = _train_backbone(config, tokenizer, cache, logger)
    for p in backbone.parameters():
        p.requires_grad_(False)
    results: dict[str, Any] = {"methods": {}, "backbone": backbone_info, "training": []}
    builder = FeatureBuilder(tokenizer)  # evaluation: the episode's own question only
    for seed in config.seeds:
        adapters = _train_adapters(config, tokenizer, backbone, seed, cache, logger)
        unique: dict[int, Method] = {}
        for method in adapters:
            unique.setdefault(id(method.model), method)  # both views of a δ-mem adapter share one model
        for method in unique.values():
            seconds = sum(phase["seconds"] for phase in method.info["train"].values())
            name = method.name.removesuffix(" state only")
            results["training"].append(
                {"model": name, "seed": seed, "seconds": seconds, "cached": method.info["cached"]}
            )
        methods = _baselines(config, backbone) + adapters
        default_episodes = config.eval_mix.sample(1000 + seed, config.eval_episodes)
        capacity = {
            f: replace(config.eval_mix, num_facts=(f, f)).sample(3000 + 100 * seed + f, config.capacity_episodes)
            for f in config.capacity_facts
        }
        logger(f"seed {seed}: evaluating {len(methods)} methods")
        for method in methods:
            entry = results["methods"].setdefault(
                method.name, {"kind": method.kind, "trainable": method.trainable, "per_seed": {}}
            )
            per_seed = {
                "default": _evaluate(method, tokenizer, builder, default_episodes),
                "capacity": {f: _evaluate(method, tokenizer, builder, eps)["accuracy"] for f, eps in capacity.items()},
                "latency": _latency(method, builder, default_episodes[: config.latency_episodes]),
                "train": method.info.get("train"),
            }
            entry["per_seed"][seed] = per_seed
            logger(f"    {method.name:<40} acc {per_seed['default']['accuracy']:.3f}")
        del methods
    if config.cost is not None:
        logger("cost per answer vs history length (untrained weights)")
        results["cost"] = cost_curve(tokenizer, config.backbone, config.cost, log=logger)
    results["config"] = asdict(config)
    results["seconds"] = time.perf_counter() - logger.start
    results["environment"] = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    return results


def smoke_config() -> BenchmarkConfig:
    """A CI-sized benchmark (57 s on a quiet 2-core CPU): single-fact episodes, one δ-mem variant, two seeds."""
    mix = replace(WARMUP_MIX, num_distractors=(1, 3))
    return BenchmarkConfig(
        backbone_train=TrainSpec(steps=300, lr=3e-3),
        train_mix=mix,
        backbone_episodes=1024,
        adapter_phases=(Phase(mix, TrainSpec(steps=200, lr=3e-3), 1024),),
        eval_mix=replace(mix, num_distractors=(2, 2)),
        capacity_facts=(1, 2),
        eval_episodes=128,
        capacity_episodes=64,
        extra_questions=1,
        seeds=(0, 1),
        variants=DEFAULT_VARIANTS[:1],
        rag_k=(1,),
        latency_episodes=2,
        cost=CostSpec(history_tokens=(256, 1024), visible_turns=2),
    )
