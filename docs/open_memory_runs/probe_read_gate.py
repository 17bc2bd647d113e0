"""Would a read gate help? The forced value top-1 with a trained memory's corrections added everywhere, or only
where the value is due (an oracle read gate). Run a5, docs/open_memory.md.

The frozen model runs the window-only prompt with the reply started up to the value; at each adapted layer a hook
adds the memory's correction (the memory written from the cached frozen states of the chat's hidden messages, as
``distill_attention_memory.py`` trains it) at every position, at the last position only, or nowhere; and, to
calibrate, the cached target δ itself (the frozen model's attention to the value) everywhere or at the last position.

    PYTHONPATH=. python docs/open_memory_runs/probe_read_gate.py outputs/cache_value_p600.pt outputs/a5/adapter
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

finals, where = {}, {"mode": "none"}


def add_correction(mod, args, kwargs, out):
    if where["mode"] == "none":
        return None
    h = kwargs["hidden_states"].float()
    if where["mode"].startswith("δ"):  # the attention to the value itself (the target), for calibration
        corr = where["delta"][mod.layer_idx][None, : h.shape[1]].float().clone()
    else:
        corr = memories[mod.layer_idx].correction(finals[mod.layer_idx], h)
    if where["mode"].endswith("last"):
        corr[:, :-1] = 0
    return (out[0] + corr.to(out[0].dtype), *out[1:])


handles = [model.model.layers[i].self_attn.register_forward_hook(add_correction, with_kwargs=True) for i in layers]
hits = {"none": 0, "all": 0, "last": 0, "δ all": 0, "δ last": 0}
n = 0
with torch.no_grad():
    for chat, episode in zip(val, episodes, strict=True):
        if episode.value is None:
            continue
        _, prompt, answer = served_layout(episode, tok)
        spelled = dam.spelled_positions(answer, [episode.value], tok).nonzero()
        if len(spelled) == 0:
            continue
        first = int(spelled[0])
        ids = torch.tensor([prompt + answer[:first]])
        for i in layers:
            finals[i] = memories[i].written(chat["hist"][i])
        n += 1
        where["delta"] = chat["delta"]
        for mode in hits:
            where["mode"] = mode
            hits[mode] += int(model(ids).logits[0, -1].argmax() == answer[first])
for handle in handles:
    handle.remove()
print(f"{n} told val answers; forced value top-1 with the memory's corrections added:")
print(" | ".join(f"{mode}: {count / n:.3f}" for mode, count in hits.items()))
