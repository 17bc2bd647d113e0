"""Is the memory's correction sharp where the model's attention to the value is? (run a5, docs/open_memory.md)

For the val chats of a ``distill_attention_memory.py --cache`` file and a trained adapter: per adapted layer, the
size (L2 norm) of δ (the frozen model's attention to the value's tokens) and of the memory's correction at the
answer position (the one whose next token is the value's first) against their mean size at the window's positions.

    PYTHONPATH=. python docs/open_memory_runs/probe_read_sharpness.py outputs/cache_value_p600.pt outputs/a5/adapter
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import distill_attention_memory as dam  # noqa: E402
from peft_deltamem.real_model import load_smollm2  # noqa: E402
from train_open_memory import served_layout  # noqa: E402

cache, adapter = Path(sys.argv[1]), Path(sys.argv[2])
torch.set_num_threads(2)
model, tok = load_smollm2(cache=False)
data = torch.load(cache, weights_only=True)
layers, val, episodes = data["key"]["layers"], data["val"], dam.split_episodes(data["key"], "val")
memories = dam.from_adapter(model, adapter, layers, 64)
rows = {i: {"delta": [], "corr": []} for i in layers}
with torch.no_grad():
    for chat, episode in zip(val, episodes, strict=True):
        if episode.value is None:
            continue
        _, prompt, answer = served_layout(episode, tok)
        spelled = dam.spelled_positions(answer, [episode.value], tok).nonzero()
        if len(spelled) == 0:
            continue
        at = len(prompt) + int(spelled[0]) - 1  # the position whose next token is the value's first
        window = torch.arange(len(prompt))[chat["delta"][layers[0]][: len(prompt)].abs().sum(-1) > 0]
        for i in layers:
            final = memories[i].written(chat["hist"][i])
            corr = memories[i].correction(final, chat["query"][i].float()[None])[0]
            delta = chat["delta"][i].float()
            for name, size in (("delta", delta.norm(dim=-1)), ("corr", corr.norm(dim=-1))):
                rows[i][name].append((size[at].item(), size[window].mean().item()))
            size_at = (corr[at].norm() / delta[at].norm()).item()
            rows[i].setdefault("at", []).append((size_at, torch.cosine_similarity(corr[at], delta[at], 0).item()))
print(
    f"{len(rows[layers[0]]['delta'])} val answers; median over them of (size at the answer position) / "
    "(mean size over the window's positions)"
)
print("and at the answer position, the medians of |correction| / |δ| and of their cosine")
print("layer | δ (the model's attention to the value) | the memory's correction | |correction| / |δ| | cosine")
for i in layers:
    ratio = {n: torch.tensor([a / max(b, 1e-9) for a, b in rows[i][n]]).median().item() for n in ("delta", "corr")}
    size, cosine = (torch.tensor(x).median().item() for x in zip(*rows[i]["at"]))
    print(f"{i} | {ratio['delta']:.2f} | {ratio['corr']:.2f} | {size:.2f} | {cosine:.2f}")
