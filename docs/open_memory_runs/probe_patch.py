"""Activation patching: at which layer does a told value reach the position where the answer is due?

For val episodes (values and kinds never trained), the reply is started up to the value ("Your cousin's name is").
The frozen model runs once with the whole chat visible (teacher) and once with only the window of two messages
(student). Then, for each layer, the student's residual stream after that layer is replaced by the teacher's, at
the positions both rows end with (the window and the started reply) or at the last position only, and the next
token is checked against the value's first token. Prints the forced top-1 of the teacher, the student and each
patched run. Run from the repository root: PYTHONPATH=. python docs/open_memory_runs/probe_patch.py [N_EPISODES]
"""

import sys

import torch

sys.path.insert(0, "scripts")
from benchmarks import open_facts
from peft_deltamem.real_model import load_smollm2
from peft_deltamem.training.episodes import tokenize_prompt_and_answer
from train_open_memory import served_layout, value_span

torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
model, tok = load_smollm2(cache=False)
n = int(sys.argv[1]) if len(sys.argv) > 1 else 60
eps = open_facts.generate_episodes("val", n, None, seed=0)
L = len(model.model.layers)
hits = {"full": 0, "window": 0, **{li: 0 for li in range(L)}, **{f"last{li}": 0 for li in range(L)}}
cnt = 0


def run(ids, patch=None):
    hs = []
    handles = []
    for li, layer in enumerate(model.model.layers):

        def hook(mod, inp, out, li=li):
            h = out[0] if isinstance(out, tuple) else out
            if patch is not None and patch[0] == li:
                pos, vals = patch[1], patch[2]
                h = h.clone()
                h[0, pos] = vals
                return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
            hs.append(h[0].detach())

        handles.append(layer.register_forward_hook(hook))
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    for h in handles:
        h.remove()
    return logits, hs


for e in eps:
    if e.value is None:
        continue
    writes, prompt, answer = served_layout(e, tok)
    span = value_span(tok, answer, e.value)
    if span is None:
        continue
    reply_start = answer[: span[0]]
    target = answer[span[0]]
    full, _ = tokenize_prompt_and_answer(e.messages, {"role": "assistant", "content": e.reply}, tok)
    full = full + reply_start
    win = prompt + reply_start
    m = 0
    while m < min(len(full), len(win)) and full[-1 - m] == win[-1 - m]:
        m += 1
    lf, hf = run(full)
    lw, _ = run(win)
    cnt += 1
    hits["full"] += int(lf.argmax() == target)
    hits["window"] += int(lw.argmax() == target)
    pos = list(range(len(win) - m, len(win)))
    for li in range(L):
        lp, _ = run(win, (li, pos, hf[li][len(full) - m :]))
        hits[li] += int(lp.argmax() == target)
        lp, _ = run(win, (li, [len(win) - 1], hf[li][-1:]))
        hits[f"last{li}"] += int(lp.argmax() == target)
print("n", cnt, "common suffix example", m)
print("full", hits["full"] / cnt, "window", hits["window"] / cnt)
for li in range(L):
    print(f"layer {li:2d}: patch suffix {hits[li] / cnt:.3f}  patch last only {hits[f'last{li}'] / cnt:.3f}")
