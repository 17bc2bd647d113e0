"""Is the frozen model's attention to the hidden messages all a memory has to supply?

For val episodes with the reply started up to the value: the teacher (the whole chat visible) computes at every
layer, at the positions both rows end with, δ = o_proj(attention over all keys) − o_proj(attention over the window's
keys only), on its own hidden states. The student (only the window visible) then runs with δ added to the attention
outputs of a set of layers, and its next token is checked against the value's first token. A memory that produced
δ exactly at those layers would score what this prints. Run from the repository root:
PYTHONPATH=. python docs/open_memory_runs/probe_history_attention.py [N_EPISODES] [--value-only]

With ``--value-only`` the teacher hides only the told value's tokens in the history (δ is then what attending to
the value itself adds), and ``mean share`` prints how much of the full δ's energy that is.
"""

import sys

import torch

sys.path.insert(0, "scripts")
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from benchmarks import open_facts
from peft_deltamem.real_model import load_smollm2
from peft_deltamem.training.episodes import tokenize_prompt_and_answer
from train_open_memory import served_layout, value_span

torch.set_num_threads(2)
model, tok = load_smollm2(cache=False)
VALUE_ONLY = "--value-only" in sys.argv
sys.argv = [a for a in sys.argv if a != "--value-only"]
n = int(sys.argv[1]) if len(sys.argv) > 1 else 60
eps = open_facts.generate_episodes("val", n, None, seed=0)
L = len(model.model.layers)
SETS = {
    "none": [],
    "29": [29],
    "28-29": [28, 29],
    "26-29": [26, 27, 28, 29],
    "23-29": list(range(23, 30)),
    "18-29": list(range(18, 30)),
    "all": list(range(30)),
    "23-28": list(range(23, 29)),
    "23-27": list(range(23, 28)),
}
hits = {k: 0 for k in SETS} | {"full": 0}
norms = torch.zeros(L)
cnt = 0
share = 0.0


def teacher_deltas(ids, vis, P):
    deltas = {}

    def hook(mod, args, kwargs, out):
        h = kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        shp = (*h.shape[:-1], -1, mod.head_dim)
        q = mod.q_proj(h).view(shp).transpose(1, 2)
        k = mod.k_proj(h).view(shp).transpose(1, 2)
        v = mod.v_proj(h).view(shp).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = repeat_kv(k, mod.num_key_value_groups)
        v = repeat_kv(v, mod.num_key_value_groups)
        s = (q[:, :, P] @ k.transpose(-1, -2)) * mod.scaling  # 1,H,|P|,T
        T = ids.shape[1]
        causal = torch.arange(T)[None, :] <= torch.tensor(P)[:, None]
        full = s.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        vm = causal & vis[None, :]
        win = s.masked_fill(~vm, float("-inf")).softmax(-1) @ v
        def o(a):
            return mod.o_proj(a.transpose(1, 2).reshape(1, len(P), -1))

        deltas[mod.layer_idx] = (o(full) - o(win))[0]

    hs = [li.self_attn.register_forward_hook(hook, with_kwargs=True) for li in model.model.layers]
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    for x in hs:
        x.remove()
    return logits, deltas


def student(ids, deltas, layers, m):
    def hook(mod, args, out):
        if mod.layer_idx in layers:
            a = out[0].clone()
            a[0, -m:] += deltas[mod.layer_idx]
            return (a,) + tuple(out[1:])

    hs = [li.self_attn.register_forward_hook(hook) for li in model.model.layers]
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    for x in hs:
        x.remove()
    return logits


for e in eps:
    if e.value is None:
        continue
    writes, prompt, answer = served_layout(e, tok)
    span = value_span(tok, answer, e.value)
    if span is None:
        continue
    rs = answer[: span[0]]
    target = answer[span[0]]
    full, _ = tokenize_prompt_and_answer(e.messages, {"role": "assistant", "content": e.reply}, tok)
    full = full + rs
    win = prompt + rs
    m = 0
    while m < min(len(full), len(win)) and full[-1 - m] == win[-1 - m]:
        m += 1
    s = 0
    while full[s] == win[s]:
        s += 1
    vis = torch.zeros(len(full), dtype=torch.bool)
    vis[:s] = True
    vis[-m:] = True
    P = list(range(len(full) - m, len(full)))
    if VALUE_ONLY:
        _, d_all = teacher_deltas(torch.tensor([full]), vis, P)
        vis = torch.ones(len(full), dtype=torch.bool)
        found = 0
        for spelled in (" " + e.value, e.value):
            ids = tok.encode(spelled, add_special_tokens=False)
            for i in range(len(full) - m - len(ids) + 1):
                if full[i : i + len(ids)] == ids:
                    vis[i : i + len(ids)] = False
                    found += 1
        if not found:
            continue
    lf, d = teacher_deltas(torch.tensor([full]), vis, P)
    if VALUE_ONLY:
        share += sum(d[li].pow(2).sum() for li in range(18, L)) / sum(d_all[li].pow(2).sum() for li in range(18, L))
    cnt += 1
    hits["full"] += int(lf.argmax() == target)
    for li in range(L):
        norms[li] += d[li][-1].norm()
    for k, layers in SETS.items():
        hits[k] += int(student(torch.tensor([win]), d, layers, m).argmax() == target)
print("n", cnt, {k: round(v / cnt, 3) for k, v in hits.items()})
if VALUE_ONLY:
    print("mean share of the full delta's energy (layers 18-29)", round(float(share) / cnt, 4))
print("mean |delta| at last pos per layer", [round(x, 2) for x in (norms / cnt).tolist()])
