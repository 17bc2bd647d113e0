"""Oracle copy path: if the memory retrieved the value token's own (projected) hidden state perfectly, would the
frozen model say the value? Inject c * B B^T x_v(l) into layer l's o_proj output at the answer position."""
import sys, torch, itertools
from peft_deltamem.real_model import load_smollm2
from benchmarks import open_facts
torch.set_num_threads(2)
model, tok = load_smollm2(cache=False)
eps = [e for e in open_facts.generate_episodes("val", 200, seed=1) if e.value][:60]
layers = model.model.layers
def value_state(e, l):
    # the last user message that contains the value
    msg = [m for m in e.messages if m["role"] == "user" and e.value in m["content"]][-1]
    ids = tok.apply_chat_template([msg], tokenize=True)
    if not isinstance(ids, list): ids = ids["input_ids"]
    vids = tok(" " + e.value, add_special_tokens=False)["input_ids"]
    for s in range(len(ids) - len(vids), -1, -1):
        if ids[s:s+len(vids)] == vids: break
    else:
        vids = tok(e.value, add_special_tokens=False)["input_ids"]
        s = next(s for s in range(len(ids)) if ids[s:s+len(vids)] == vids)
    cap = {}
    h = layers[l].self_attn.q_proj.register_forward_hook(lambda m, i, o: cap.__setitem__("x", i[0][0, s]))
    with torch.no_grad(): model(torch.tensor([ids]))
    h.remove()
    return cap["x"], vids
def prefix(e):
    reply = e.reply
    cut = reply.rfind(e.value)
    return reply[:cut].rstrip()
res = {}
for l in [int(x) for x in sys.argv[1].split(",")]:
    data = []
    for e in eps:
        x, vids = value_state(e, l)
        ctx = e.messages[-2:]
        ids = tok.apply_chat_template(ctx, tokenize=True, add_generation_prompt=True)
        if not isinstance(ids, list): ids = ids["input_ids"]
        ids = ids + tok(prefix(e), add_special_tokens=False)["input_ids"]
        data.append((x, vids[0], ids))
    for k in [64, 576]:
        g = torch.Generator().manual_seed(0)
        B, _ = torch.linalg.qr(torch.randn(576, k, generator=g))
        for c in [1, 3, 10, 30]:
            top1 = 0; ranks = []
            for x, v0, ids in data:
                inj = c * (B @ (B.T @ x))
                def hook(m, i, o):
                    o = o.clone(); o[0, -1] += inj; return o
                h = layers[l].self_attn.o_proj.register_forward_hook(hook)
                with torch.no_grad(): logits = model(torch.tensor([ids])).logits[0, -1]
                h.remove()
                r = int((logits > logits[v0]).sum()); ranks.append(r); top1 += r == 0
            ranks.sort()
            print(f"layer {l} k {k} c {c}: top1 {top1/len(data):.2f} median rank {ranks[len(ranks)//2]}", flush=True)
# baseline without injection
