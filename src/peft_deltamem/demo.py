"""End-to-end demo on an embedded default: no downloads, no GPU, well under a minute on a laptop CPU.

1. Build a tiny Llama and teach it to answer "who likes what" from *context*, then freeze it
   (δ-mem steers a backbone's existing ability to use context; see docs/concepts.md).
2. Attach δ-mem with ``get_peft_model`` and train only the adapter, with the fact only in *memory*.
3. Chat: write turns into memory one call at a time, ask a question whose answer is no longer in
   the context, compare with an empty memory, and show the memory's size.
4. Save the adapter and the memory, reload both into a fresh model, and ask again.

Run: ``python -m peft_deltamem.demo [--output-dir demo_output]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model

from . import DeltaMemConfig, DeltaMemory
from .recall_task import VALUES, build_tokenizer, evaluate, train_steps
from .tiny_models import tiny_model


@torch.no_grad()
def ask(model, tokenizer, question: str, memory: DeltaMemory) -> str:
    ids = tokenizer(question, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(
        input_ids=torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids], 1),
        memory=memory,
        memory_writes=False,  # asking does not write the question into memory
        max_new_tokens=1,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, -1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="demo_output", help="where the adapter and memory are saved")
    parser.add_argument("--backbone-steps", type=int, default=300, help="steps teaching the backbone to use context")
    parser.add_argument("--memory-steps", type=int, default=150, help="steps training the δ-mem adapter")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models run best on one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.output_dir)
    start = time.perf_counter()
    tokenizer = build_tokenizer()

    print("== 1. A tiny backbone that can answer from context")
    base = tiny_model("llama", seed=args.seed, vocab_size=len(tokenizer))
    train_steps(base, tokenizer, args.backbone_steps, in_context=True, seed=args.seed)
    in_context = evaluate(base, tokenizer, seed=99, in_context=True)
    print(f"   accuracy with the fact in context: {in_context:.2f} (chance {1 / len(VALUES):.2f})")
    base.save_pretrained(out / "backbone")

    print("== 2. δ-mem attached to the frozen backbone; only the adapter trains, the fact only in memory")
    model = get_peft_model(base, DeltaMemConfig(task_type="CAUSAL_LM"))
    model.print_trainable_parameters()
    train_steps(model, tokenizer, args.memory_steps, in_context=False, seed=args.seed + 1, lr=1e-2)
    with_memory = evaluate(model, tokenizer, seed=99)
    empty = evaluate(model, tokenizer, seed=99, memory=False)
    print(f"   held-out recall from memory: {with_memory:.2f}; with an empty memory: {empty:.2f}")

    print("== 3. A conversation written into memory one turn at a time")
    memory = model.new_memory(batch_size=1)
    turns = [
        "<bos> today we talked about work",
        "alice likes teal .",
        "and then trains and music and lunch",
        "later we talked about books again",
        "it was fine ok",
    ]
    for turn in turns:
        with torch.no_grad():
            model(**tokenizer(turn, return_tensors="pt", add_special_tokens=False), memory=memory)
        print(f"   wrote: {turn!r}")
    answer = ask(model, tokenizer, "alice likes ?", memory)
    print(f"   Q: alice likes ?  A (from memory): {answer}")
    n_numbers = sum(t.numel() for t in memory.states.values())
    print(
        f"   memory: {len(memory.layers)} layers x {memory.num_state_heads} x {memory.r}x{memory.r} = {n_numbers} "
        f"float32 numbers ({4 * n_numbers} bytes), the same however long the history"
    )
    empty_answer = ask(model, tokenizer, "alice likes ?", model.new_memory(batch_size=1))
    print(f"   with an empty memory the model says: {empty_answer}")

    print("== 4. Save adapter + memory, reload into a fresh model")
    model.save_pretrained(out / "adapter")
    memory.save(out / "session.safetensors", overwrite=True)
    fresh = PeftModel.from_pretrained(type(base).from_pretrained(out / "backbone"), out / "adapter").eval()
    reloaded = ask(fresh, tokenizer, "alice likes ?", DeltaMemory.load(out / "session.safetensors"))
    print(f"   reloaded model, restored memory: alice likes ? -> {reloaded}")
    print(f"   saved to {out.resolve()} ({time.perf_counter() - start:.0f} s in all)")
    return {
        "recall_with_memory": with_memory,
        "recall_empty_memory": empty,
        "answer": answer,
        "reloaded_answer": reloaded,
    }


if __name__ == "__main__":
    main()
