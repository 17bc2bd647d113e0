"""What a fork costs: a regenerated reply and an edit of an early message, against an ordinary turn, in the chat
engine (memory restored from the nearest checkpoint, the messages after it written again).

One session plays ``--turns`` user turns the way an OpenAI client sends them (the whole conversation each time),
then the client regenerates the last reply and edits its second message; each is timed, as is rebuilding the
edited branch in a fresh session (what a memory without checkpoints would have to do). Also reports the
checkpoint and memory sizes. Writes forks.json to the output directory.

    python scripts/bench_forks.py                     # embedded tiny model
    python scripts/bench_forks.py --model smollm2     # SmolLM2-135M-Instruct (the real extra)
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _script import add_output_options, doc_parser, output_dir  # noqa: E402


def main(argv=None) -> dict:
    parser = doc_parser(__doc__)
    add_output_options(parser, "forks", "forks.json")
    parser.add_argument("--model", default=None, help="smollm2, a model directory, or none (embedded tiny model)")
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--turns", type=int, default=24)
    parser.add_argument("--window", type=int, default=6)
    parser.add_argument("--checkpoint-every", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args(argv)
    out = output_dir(parser, args)

    from peft_deltamem.agents.engine import ChatEngine, GenerationParams
    from peft_deltamem.agents.models import load_chat_model
    from peft_deltamem.agents.session import SessionPolicy
    from peft_deltamem.agents.store import DirectoryStore

    model, tok, name = load_chat_model(args.model, args.adapter)
    policy = SessionPolicy(window=args.window, checkpoint_every=args.checkpoint_every)
    params = GenerationParams(max_new_tokens=args.max_new_tokens)
    users = [f"note {i}: my item number {i} is called thing{i} ." for i in range(args.turns)]
    with tempfile.TemporaryDirectory() as root:
        engine = ChatEngine(model, tok, DirectoryStore(root), policy)

        def turn(session, messages):
            start = time.perf_counter()
            reply = engine.chat(session, messages, params).reply
            return reply, time.perf_counter() - start

        log, times = [], []
        for text in users:
            log.append({"role": "user", "content": text})
            reply, seconds = turn("s", log)
            log.append({"role": "assistant", "content": reply})
            times.append(seconds)
        record = engine.store.load("s")
        _, regenerate = turn("s", log[:-1])
        edited = [*log[:2], {"role": "user", "content": "my item number 1 is called other ."}, *log[3:-1]]
        _, edit = turn("s", edited)
        _, fresh = turn("fresh", edited)
        engine.close()
    result = {
        "model": name,
        "turns": args.turns,
        "window": args.window,
        "checkpoint_every": args.checkpoint_every,
        "ordinary_turn_s_median_last8": sorted(times[-8:])[4],
        "regenerate_s": regenerate,
        "edit_second_message_s": edit,
        "fresh_session_on_edited_branch_s": fresh,
        "memory_bytes": len(record.memory),
        "checkpoints": len(record.checkpoints),
        "checkpoint_bytes": len(record.checkpoint_memory or b""),
        "load_average": os.getloadavg(),
        "torch_threads": __import__("torch").get_num_threads(),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "forks.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
