"""Train a δ-mem adapter with the stock ``transformers.Trainer`` (every TrainingArguments flag works).

Embedded default (no downloads, a few seconds on a laptop CPU): a tiny Llama is built from a config, first
taught to answer "who likes what" with the fact *in context* (δ-mem steers a backbone's existing ability to
use context; it cannot teach a random backbone to recall), then frozen while δ-mem is trained with the fact
only in *memory*; held-out recall with and without memory is printed at the end::

    python scripts/train.py --output-dir /tmp/delta_mem
    python scripts/train.py --backbone-steps 0      # mechanics only: random frozen backbone, recall stays at chance

Your model and chat data (a jsonl file with a ``messages`` column, or a Hub dataset name with ``--split``)::

    python scripts/train.py --model Qwen/Qwen3-4B-Instruct-2507 --dataset chats.jsonl --output-dir out \\
        --bf16 --learning_rate 2e-4 --lr_scheduler_type cosine --warmup_steps 0.1 ...

Data parallel (CPU: gloo; ``--use_cpu`` is implied when there is no GPU)::

    torchrun --nproc_per_node 2 scripts/train.py ...
    accelerate launch --config_file configs/accelerate_multi_cpu.yaml scripts/train.py ...

``--help`` lists this script's own options at once; ``--help-all`` adds every TrainingArguments flag with the
defaults this script uses (it imports transformers, several seconds). See ``docs/training.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ScriptArguments:
    """Model, data, δ-mem and episode options (TrainingArguments flags are accepted next to these)."""

    model: str | None = field(
        default=None, metadata={"help": "Local path or Hub id of a causal LM. None: the embedded tiny model."}
    )
    dataset: str | None = field(
        default=None, metadata={"help": "A .jsonl/.json file of chats, or a Hub dataset name (needs --model)."}
    )
    split: str = field(default="train", metadata={"help": "Dataset split (Hub datasets)."})
    messages_column: str = field(default="messages", metadata={"help": "Column with [{role, content}, ...]."})
    eval_size: int = field(
        default=0, metadata={"help": "Examples held out for evaluation (default 64 when --eval_strategy is set)."}
    )
    dtype: str = field(default="auto", metadata={"help": "Model dtype: auto, float32, bfloat16 or float16."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the backbone in 4-bit NF4 (QLoRA style)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the backbone in 8-bit."})
    # δ-mem
    r: int = field(default=8, metadata={"help": "Memory rank."})
    alpha: float = field(default=16.0, metadata={"help": "Correction scale alpha (scaling alpha / r)."})
    delta_heads: list[str] = field(default_factory=lambda: ["q", "o"], metadata={"help": "Corrected projections."})
    num_state_heads: int = field(default=1, metadata={"help": "Memories per block (> 1: MSW)."})
    write_granularity: str = field(default="token", metadata={"help": "token (TSW) or segment (SSW)."})
    write_sparsity_weight: float = field(default=0.0, metadata={"help": "Weight of the write-sparsity penalty."})
    write_sparsity_target: float = field(default=0.05, metadata={"help": "Target mean write gate of the penalty."})
    # episodes
    visible_turns: int = field(default=1, metadata={"help": "Messages before the answer that stay visible."})
    max_memory_tokens: int = field(default=8192, metadata={"help": "Memory-stream (write) budget in tokens."})
    max_length: int = field(default=512, metadata={"help": "Visible-stream budget in tokens."})
    supervise: str = field(default="final", metadata={"help": "final: last assistant turn; all: every turn."})
    ablation_probs: str | None = field(
        default=None,
        metadata={"help": 'Context-ablation mixing as JSON, e.g. \'{"memory_only": 0.8, "no_memory": 0.2}\'.'},
    )
    # embedded default
    num_examples: int = field(
        default=0, metadata={"help": "Embedded default: generated chats (0: enough for max_steps)."}
    )
    backbone_steps: int = field(
        default=150,
        metadata={"help": "Embedded default: steps teaching the tiny backbone to answer from context (0: skip)."},
    )
    # checks
    dump_rank_weights: str | None = field(
        default=None, metadata={"help": "Write each rank's adapter weights and their hash to this directory."}
    )


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _quick_help() -> None:
    """``--help`` without importing torch or transformers: this script's own options, and where the rest are."""
    import dataclasses

    head, _, rest = __doc__.strip().partition("\n\n")
    parser = argparse.ArgumentParser(
        description=head + "\n\nEvery transformers TrainingArguments flag is accepted next to these (--output_dir, "
        "--max_steps, --learning_rate, --bf16, ...); --help-all lists them with the defaults this script uses.",
        epilog=rest,
        formatter_class=_HelpFormatter,
    )
    for f in dataclasses.fields(ScriptArguments):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = {"nargs": "?", "const": True, "metavar": "BOOL"} if isinstance(default, bool) else {}
        parser.add_argument(f"--{f.name}", default=default, help=f.metadata.get("help"), **flag)
    parser.print_help()


if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):
    _quick_help()
    raise SystemExit(0)

import torch  # noqa: E402

# Before TrainingArguments sets up the devices: on a machine without a GPU, a multi-process launch must run
# on CPU with gloo, otherwise accelerate treats every process as a separate single-process run.
if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
    os.environ.setdefault("ACCELERATE_USE_CPU", "true")

from datasets import Dataset, load_dataset  # noqa: E402
from peft import get_peft_model, get_peft_model_state_dict, prepare_model_for_kbit_training  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from peft_deltamem import DeltaMemConfig  # noqa: E402
from peft_deltamem.recall_task import VALUES, build_tokenizer, evaluate, recall_chats, train_steps  # noqa: E402
from peft_deltamem.tiny_models import tiny_model  # noqa: E402
from peft_deltamem.training import (  # noqa: E402
    DeltaMemDataCollator,
    EpisodeConfig,
    MemoryHealthCallback,
    add_memory_health_callback,
    episodes_map_fn,
    validate_ablation_probs,
)

# TrainingArguments defaults of the embedded run (any flag given on the command line wins).
EMBEDDED_DEFAULTS = {
    "max_steps": 100,
    "learning_rate": 1e-2,
    "lr_scheduler_type": "constant",
    "per_device_train_batch_size": 32,
    "logging_steps": 20,
    "save_strategy": "no",
}
ALWAYS_DEFAULTS = {"output_dir": "delta_mem_output", "remove_unused_columns": False}
if not torch.cuda.is_available():
    ALWAYS_DEFAULTS["dataloader_pin_memory"] = False


def build_parser(embedded: bool = True) -> HfArgumentParser:
    """The script's options and every TrainingArguments flag, with the defaults this script really uses."""
    head, _, rest = __doc__.strip().partition("\n\n")
    parser = HfArgumentParser(
        (ScriptArguments, TrainingArguments),
        description=head + "\n\nDefaults shown are the embedded run's; with --model, the training flags default to "
        "TrainingArguments' own values, except --output_dir and --remove_unused_columns False.",
        epilog=rest,
        formatter_class=_HelpFormatter,
    )
    parser.set_defaults(**ALWAYS_DEFAULTS, **(EMBEDDED_DEFAULTS if embedded else {}))
    return parser


def parse(argv: list[str]) -> tuple[ScriptArguments, TrainingArguments]:
    argv = ["--help" if a == "--help-all" else a for a in argv]  # the full listing (script options + TrainingArguments)
    embedded = not any(a == "--model" or a.startswith("--model=") for a in argv)
    script_args, training_args = build_parser(embedded).parse_args_into_dataclasses(args=argv)
    if script_args.dataset and not script_args.model:
        raise SystemExit("--dataset needs --model: the embedded tiny model only knows the recall task's vocabulary.")
    if script_args.load_in_4bit and script_args.load_in_8bit:
        raise SystemExit("choose one of --load-in-4bit and --load-in-8bit")
    return script_args, training_args


# ------------------------------------------------------------------------------------------- the model


def load_model(script_args: ScriptArguments, training_args: TrainingArguments):
    """Tokenizer and frozen backbone: a Hub/local model, or the embedded tiny Llama with the recall tokenizer."""
    if script_args.model is None:
        tokenizer = build_tokenizer()
        return tokenizer, tiny_model("llama", seed=training_args.seed, vocab_size=len(tokenizer))
    tokenizer = AutoTokenizer.from_pretrained(script_args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    quantization = None
    if script_args.load_in_4bit or script_args.load_in_8bit:
        compute = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32
        quantization = BitsAndBytesConfig(
            load_in_4bit=script_args.load_in_4bit,
            load_in_8bit=script_args.load_in_8bit,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
    dtype = script_args.dtype if script_args.dtype == "auto" else getattr(torch, script_args.dtype)
    device_map = {"": training_args.local_process_index} if quantization and torch.cuda.is_available() else None
    model = AutoModelForCausalLM.from_pretrained(
        script_args.model, dtype=dtype, quantization_config=quantization, device_map=device_map
    )
    if quantization is not None:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=bool(training_args.activation_checkpointing),
            gradient_checkpointing_kwargs=training_args.activation_checkpointing_kwargs,
        )
    return tokenizer, model


def pretrain_backbone_in_context(model, tokenizer, steps: int, seed: int) -> float:
    """Embedded default: teach the tiny backbone to answer from context; returns held-out in-context accuracy."""
    train_steps(model, tokenizer, steps, in_context=True, seed=seed, lr=5e-3)
    return evaluate(model, tokenizer, seed + 10_000, in_context=True)


def recall_accuracy(model, tokenizer, seed: int) -> tuple[float, float]:
    """Embedded default: held-out recall with the fact only in memory, and with an empty memory."""
    return evaluate(model, tokenizer, seed + 20_000), evaluate(model, tokenizer, seed + 20_000, memory=False)


# -------------------------------------------------------------------------------------------- the data


def load_chats(script_args: ScriptArguments, training_args: TrainingArguments) -> Dataset:
    if script_args.dataset is None:
        n = script_args.num_examples
        if n <= 0:
            steps = training_args.max_steps if training_args.max_steps > 0 else 64
            n = steps * training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
            n *= training_args.world_size
        return Dataset.from_list(recall_chats(n + script_args.eval_size, training_args.seed))
    path = Path(script_args.dataset)
    if path.suffix in (".jsonl", ".json") and path.exists():
        return load_dataset("json", data_files=str(path), split="train")
    return load_dataset(script_args.dataset, split=script_args.split)


def build_datasets(chats: Dataset, tokenizer, script_args: ScriptArguments, training_args: TrainingArguments):
    try:
        probs = json.loads(script_args.ablation_probs) if script_args.ablation_probs else None
    except json.JSONDecodeError as error:
        raise SystemExit(
            f"--ablation-probs must be JSON such as '{{\"memory_only\": 0.8, \"no_memory\": 0.2}}', got "
            f"{script_args.ablation_probs!r} ({error})"
        ) from error
    validate_ablation_probs(probs)
    config = EpisodeConfig(
        visible_turns=script_args.visible_turns,
        max_memory_tokens=script_args.max_memory_tokens,
        max_length=script_args.max_length,
        supervise=script_args.supervise,
        messages_column=script_args.messages_column,
        context_stream=bool(probs and probs.get("memory_and_context", 0) > 0),
    )
    mapper = episodes_map_fn(tokenizer, config)
    with training_args.main_process_first(desc="building episodes"):
        episodes = chats.map(mapper, batched=True, remove_columns=chats.column_names, features=mapper.features)
    if training_args.process_index == 0:
        print(f"episodes: {len(episodes)} from {len(chats)} chats")
    if len(episodes) == 0:
        raise SystemExit(
            f"no training episodes from {len(chats)} chats: an episode is made for each supervised assistant turn "
            "with a non-empty answer, and none has one. Check --messages-column ({script_args.messages_column!r}) and "
            "that the chats contain messages with role 'assistant'."
        )
    eval_size = script_args.eval_size
    if training_args.eval_strategy != "no" and eval_size == 0:
        eval_size = min(64, max(1, len(episodes) // 10))
    if eval_size == 0:
        return episodes, None, probs
    split = episodes.train_test_split(test_size=eval_size, seed=training_args.seed, shuffle=True)
    return split["train"], split["test"], probs


# ------------------------------------------------------------------------------------------- callbacks


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (forward, backward and optimizer; not the memory-health probe)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)

    def summary(self) -> str:
        steady = self.times[1:] or self.times
        if not steady:
            return "no steps timed"
        return (
            f"time per step: median {statistics.median(steady):.3f} s, mean {statistics.mean(steady):.3f} s "
            f"over {len(steady)} steps (first step excluded)"
        )


class FirstBatchFingerprint(TrainerCallback):
    """Hash of the first training batch this rank saw (data parallel ranks must see different data)."""

    def __init__(self) -> None:
        self.digest: str | None = None
        self._hook = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._hook = model.register_forward_pre_hook(self._see, with_kwargs=True)

    def _see(self, module, args, kwargs):
        if self.digest is None and module.training and kwargs.get("input_ids") is not None:
            self.digest = hashlib.sha256(kwargs["input_ids"].cpu().numpy().tobytes()).hexdigest()

    def on_train_end(self, args, state, control, **kwargs):
        self._hook.remove()


def adapter_digest(model) -> tuple[dict[str, torch.Tensor], str]:
    """The adapter's weights as full CPU tensors (FSDP2 shards are gathered) and a hash of them."""
    state = {}
    for key, value in get_peft_model_state_dict(model).items():
        value = value.full_tensor() if hasattr(value, "full_tensor") else value
        state[key] = value.detach().float().cpu().contiguous()
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].numpy().tobytes())
    return state, digest.hexdigest()


def memory_buffers(model, memory) -> list[str]:
    """Names of buffers that hold a δ-mem memory state (must be none: DDP would broadcast them)."""
    states = list(memory.states.values())  # copies: compared by value (a buffer holding the state equals it)
    return [
        n
        for n, b in model.named_buffers()
        if "delta_mem" in n or any(b.shape == s.shape and torch.equal(b.to(s.device), s) for s in states)
    ]


def dump_rank_weights(directory: str, trainer: Trainer, initial: str, fingerprint: FirstBatchFingerprint) -> None:
    model, args = trainer.model, trainer.args
    state, digest = adapter_digest(model)
    batch = DeltaMemDataCollator(pad_token_id=0)(  # a memory written in eval: does any buffer hold it?
        [{"memory_input_ids": [3, 4, 5], "memory_segment_ids": [0, 0, 0], "input_ids": [3, 4], "labels": [-100, 4]}]
    )
    model.eval()
    memory = model.new_memory(batch_size=1)
    with torch.no_grad():
        model(
            input_ids=batch["memory_input_ids"].to(args.device),
            memory_segment_ids=batch["memory_segment_ids"].to(args.device),
            memory=memory,
        )
    report = {
        "rank": args.process_index,
        "world_size": args.world_size,
        "parallel_mode": str(args.parallel_mode),
        "global_step": trainer.state.global_step,
        "fsdp": bool(trainer.is_fsdp_enabled),
        "adapter_param_types": sorted({type(p).__name__ for p in model.parameters() if p.requires_grad}),
        "adapter_sha256": digest,
        "initial_adapter_sha256": initial,
        "first_batch_sha256": fingerprint.digest,
        "buffer_names": [n for n, _ in model.named_buffers()],
        "memory_buffers": memory_buffers(model, memory),
        "memory_written": not memory.is_empty,
    }
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, out / f"rank{args.process_index}.safetensors")
    (out / f"rank{args.process_index}.json").write_text(json.dumps(report, indent=1))


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> Trainer:
    script_args, training_args = parse(sys.argv[1:] if argv is None else argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if training_args.world_size != world:
        raise SystemExit(
            f"launched as {world} processes but TrainingArguments sees world size {training_args.world_size}; "
            "on a machine without a GPU pass --use_cpu (gloo)."
        )
    embedded = script_args.model is None
    if embedded and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # a model this small only loses from intra-op threads
    tokenizer, base = load_model(script_args, training_args)
    if embedded:
        if script_args.backbone_steps > 0:
            start = time.perf_counter()
            accuracy = pretrain_backbone_in_context(base, tokenizer, script_args.backbone_steps, training_args.seed)
            print(
                f"embedded default: tiny backbone trained {script_args.backbone_steps} steps with the fact IN CONTEXT "
                f"({time.perf_counter() - start:.1f} s): in-context accuracy {accuracy:.2f} "
                f"(chance {1 / len(VALUES):.2f})"
            )
        else:
            print("embedded default: random tiny backbone (--backbone-steps 0): this run only shows the mechanics")
    for p in base.parameters():
        p.requires_grad_(False)

    chats = load_chats(script_args, training_args)
    train_set, eval_set, probs = build_datasets(chats, tokenizer, script_args, training_args)
    config = DeltaMemConfig(
        task_type="CAUSAL_LM",
        r=script_args.r,
        alpha=script_args.alpha,
        delta_heads=tuple(script_args.delta_heads),
        num_state_heads=script_args.num_state_heads,
        write_granularity=script_args.write_granularity,
        write_sparsity_weight=script_args.write_sparsity_weight,
        write_sparsity_target=script_args.write_sparsity_target,
    )
    model = get_peft_model(base, config)
    if training_args.process_index == 0:
        model.print_trainable_parameters()
    _, initial = adapter_digest(model)

    timer, fingerprint = StepTimer(), FirstBatchFingerprint()
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=DeltaMemDataCollator(tokenizer, ablation_probs=probs, seed=training_args.seed),
        processing_class=tokenizer,
        callbacks=[timer, fingerprint],
    )
    add_memory_health_callback(trainer, MemoryHealthCallback())
    if training_args.fsdp and not trainer.is_fsdp_enabled:
        print(
            "warning: --fsdp was given but accelerate did not enable FSDP (it ignores FSDP on CPU); plain DDP is used"
        )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    if training_args.process_index == 0:
        print(timer.summary())
        print(f"adapter saved to {Path(training_args.output_dir).resolve()}")
    if script_args.dump_rank_weights:
        dump_rank_weights(script_args.dump_rank_weights, trainer, initial, fingerprint)
    if embedded and training_args.process_index == 0:
        with_memory, empty = recall_accuracy(model, tokenizer, training_args.seed)
        print(
            f"embedded default: held-out recall with the fact only in memory {with_memory:.2f}, "
            f"with an empty memory {empty:.2f} (chance {1 / len(VALUES):.2f})"
        )
    return trainer


if __name__ == "__main__":
    main()
