"""How much of δ at the answer position can a read of the written value supply? A ceiling for runs a3-a5.

Per adapted layer, a ridge regression from the asked value's own states (the mean of its tokens' attention inputs
in the hidden messages, as the memory writes them) to δ at the answer position (the frozen model's attention to
the value there), fitted on the train chats of a ``distill_attention_memory.py --cache`` file; then, on its val
chats, the fraction of δ left unexplained and the forced value top-1 with the fitted map's output added at the
answer position of layers 18-29 (the window-only prompt, the reply started up to the value).

    PYTHONPATH=. python docs/open_memory_runs/probe_value_ceiling.py outputs/cache_value_p600.pt --ridge 10
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import distill_attention_memory as dam  # noqa: E402
from peft_deltamem.real_model import load_smollm2  # noqa: E402
from train_open_memory import served_layout  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("cache", type=Path)
parser.add_argument("--ridge", type=float, default=10.0)
args = parser.parse_args()
torch.set_num_threads(2)
model, tok = load_smollm2(cache=False)
data = torch.load(args.cache, weights_only=True)
key, layers = data["key"], data["key"]["layers"]


def samples(split):
    """Per told answer: (prompt + reply up to the value, value's first token, {layer: value state}, {layer: δ})."""
    out = []
    for chat, episode in zip(data[split], dam.split_episodes(key, split), strict=True):
        if episode.value is None:
            continue
        writes, prompt, answer = served_layout(episode, tok)
        spelled = dam.spelled_positions(answer, [episode.value], tok).nonzero()
        where = dam.spelled_positions([t for w in writes for t in w], [episode.value], tok)
        if len(spelled) == 0 or not where.any():
            continue
        first = int(spelled[0])
        at = len(prompt) + first - 1
        value = {i: chat["hist"][i][where].float().mean(0) for i in layers}
        out.append((prompt + answer[:first], answer[first], value, {i: chat["delta"][i][at].float() for i in layers}))
    return out


train, val = samples("train"), samples("val")
maps, unexplained = {}, {}
for i in layers:
    x = torch.stack([s[2][i] for s in train])
    y = torch.stack([s[3][i] for s in train])
    x1 = torch.cat([x, torch.ones(len(x), 1)], 1)
    maps[i] = torch.linalg.solve(x1.T @ x1 + args.ridge * torch.eye(x1.shape[1]), x1.T @ y)
    xv = torch.cat([torch.stack([s[2][i] for s in val]), torch.ones(len(val), 1)], 1)
    yv = torch.stack([s[3][i] for s in val])
    unexplained[i] = ((xv @ maps[i] - yv).pow(2).sum() / yv.pow(2).sum()).item()
print(f"{len(train)} train and {len(val)} val answers; ridge {args.ridge}")
print("val δ unexplained at the answer position: " + ", ".join(f"{i}: {u:.2f}" for i, u in unexplained.items()))

current = {}


def add_last(mod, a, kwargs, out):
    extra = torch.zeros_like(out[0])
    extra[:, -1] = current[mod.layer_idx].to(out[0].dtype)
    return (out[0] + extra, *out[1:])


handles = [model.model.layers[i].self_attn.register_forward_hook(add_last, with_kwargs=True) for i in layers]
hits = {"fitted map": 0, "δ itself": 0, "nothing": 0}
with torch.no_grad():
    for ids, target, value, delta in val:
        for mode in hits:
            for i in layers:
                fitted = torch.cat([value[i], torch.ones(1)]) @ maps[i]
                current[i] = {"fitted map": fitted, "δ itself": delta[i], "nothing": torch.zeros_like(fitted)}[mode]
            hits[mode] += int(model(torch.tensor([ids])).logits[0, -1].argmax() == target)
for handle in handles:
    handle.remove()
print("forced value top-1, added at the answer position of every adapted layer: "
      + " | ".join(f"{m}: {h / len(val):.3f}" for m, h in hits.items()))  # fmt: skip
