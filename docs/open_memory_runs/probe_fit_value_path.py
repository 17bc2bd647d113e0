"""Can a rank-k linear map from a token's hidden state at layer l (q_proj input) produce logits naming that token?
Fit M = U V (d x k)(k x d) with logits = E diag(g) (U V x) * t, CE on the token itself; evaluate on value tokens of
held-out values (val split)."""
import sys, time, torch, torch.nn.functional as F
from peft_deltamem.real_model import load_smollm2
from benchmarks import open_facts
torch.set_num_threads(2); torch.manual_seed(0)
model, tok = load_smollm2(cache=False)
L = [int(x) for x in sys.argv[1].split(",")]
def msgs(split, n):
    out = []
    for e in open_facts.generate_episodes(split, n, seed=3):
        for m in e.messages:
            if m["role"] == "user": out.append(m["content"])
    return out
def states(texts, values=None):
    xs = {l: [] for l in L}; ys = []; vx = {l: [] for l in L}; vy = []
    cap = {}
    hooks = [model.model.layers[l].self_attn.q_proj.register_forward_hook(
        lambda m, i, o, l=l: cap.__setitem__(l, i[0][0])) for l in L]
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad(): model(torch.tensor([ids]))
        for l in L: xs[l].append(cap[l][1:])
        ys.append(torch.tensor(ids[1:]))
    for h in hooks: h.remove()
    return {l: torch.cat(xs[l]) for l in L}, torch.cat(ys)
t = time.time()
train_x, train_y = states(msgs("train", 700))
# eval: first token of each val value, in its statement
ev = [e for e in open_facts.generate_episodes("val", 150, seed=4) if e.value]
ex = {l: [] for l in L}; ey = []; single = 0
cap = {}
hooks = [model.model.layers[l].self_attn.q_proj.register_forward_hook(lambda m, i, o, l=l: cap.__setitem__(l, i[0][0])) for l in L]
for e in ev:
    msg = [m["content"] for m in e.messages if m["role"] == "user" and e.value in m["content"]][-1]
    ids = tok(msg, add_special_tokens=False)["input_ids"]
    vids = tok(" " + e.value, add_special_tokens=False)["input_ids"]
    s = next((s for s in range(len(ids)) if ids[s:s + len(vids)] == vids), None)
    if s is None: continue
    single += len(vids) == 1
    with torch.no_grad(): model(torch.tensor([ids]))
    for l in L: ex[l].append(cap[l][s])
    ey.append(ids[s])
for h in hooks: h.remove()
ey = torch.tensor(ey)
print(f"{len(train_y)} train tokens, {len(ey)} eval values ({single} single-token), {time.time()-t:.0f}s", flush=True)
E = model.lm_head.weight.detach(); g = model.model.norm.weight.detach()
W = E * g  # logits = W @ delta  (linearised final norm, up to a scale)
for l in L:
    for k in [int(x) for x in sys.argv[2].split(",")]:
        U = torch.nn.Parameter(torch.randn(576, k) * 0.02); V = torch.nn.Parameter(torch.randn(k, 576) * 0.02)
        temp = torch.nn.Parameter(torch.tensor(1.0))
        opt = torch.optim.Adam([U, V, temp], lr=3e-3)
        X, Y = train_x[l], train_y
        t = time.time()
        for step in range(int(sys.argv[3])):
            idx = torch.randint(len(Y), (512,))
            logits = (X[idx] @ V.T @ U.T) @ W.T * temp
            loss = F.cross_entropy(logits, Y[idx])
            opt.zero_grad(); loss.backward(); opt.step()
        with torch.no_grad():
            logits = (torch.stack(ex[l]) @ V.T @ U.T) @ W.T * temp
            rank = (logits > logits.gather(1, ey[:, None])).sum(1)
        print(f"layer {l} rank {k}: train loss {loss.item():.2f}, held-out value top1 {(rank==0).float().mean():.2f} "
              f"top10 {(rank<10).float().mean():.2f} median rank {rank.median().item()} ({time.time()-t:.0f}s)", flush=True)
