"""One rank of the sharded-training check (tests/test_distributed.py): an episode's gradients under FSDP on CPU.

Run as ``python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_worker.py MODE OUT`` with MODE

- ``fsdp2``: ``fully_shard`` on every Linear of the δ-mem layers, then the root;
- ``fsdp1``: ``FullyShardedDataParallel`` with a per-Linear wrap policy (as peft's FSDP recipe wraps adapter
  Linears), ``use_orig_params=True``;

Every rank takes its half of a 4-row episode batch; rank 0 writes the ranks' losses and the full gradients of the
adapter parameters to OUT, to be compared with one process on the whole batch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import make_peft  # noqa: E402
from peft_deltamem.tiny_models import tiny_model  # noqa: E402


def episode_batch() -> dict:
    """4 rows, each with the same number of supervised tokens (so the ranks' mean losses average to the whole)."""
    generator = torch.Generator().manual_seed(7)
    memory = torch.randint(3, 128, (4, 12), generator=generator)
    visible = torch.randint(3, 128, (4, 6), generator=generator)
    labels = visible.clone()
    labels[:, :2] = -100
    return {"memory_input_ids": memory, "input_ids": visible, "labels": labels}


def build():
    torch.manual_seed(0)
    model = make_peft(tiny_model("llama"))
    model.train()
    return model


def gradients(model, batch) -> tuple[dict, float]:
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return grads, loss.item()


def main(mode: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build()
    batch = {k: v[rank * 2 : rank * 2 + 2] for k, v in episode_batch().items()}
    full = {}
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for module in list(model.modules()):  # every Linear its own unit (adapter and frozen), the rest in the root
            if type(module) is nn.Linear:
                fully_shard(module)
        fully_shard(model)
        grads, loss = gradients(model, batch)
        full = {n: g.full_tensor() for n, g in grads.items()}
    elif mode == "fsdp1":
        import functools

        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

        def adapter_linear(module: nn.Module) -> bool:
            return type(module) is nn.Linear and all(p.requires_grad for p in module.parameters())

        policy = functools.partial(lambda_auto_wrap_policy, lambda_fn=adapter_linear)
        model = FSDP(model, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"))
        loss = model(**batch).loss
        loss.backward()
        with FSDP.summon_full_params(model, with_grads=True):
            full = {
                n.replace("_fsdp_wrapped_module.", ""): p.grad.detach().clone()
                for n, p in model.named_parameters()
                if p.requires_grad and p.grad is not None
            }
        loss = loss.item()
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    losses = [None] * world
    dist.all_gather_object(losses, loss)
    if rank == 0:
        torch.save({"grads": full, "losses": losses}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    # The work is done and the process group destroyed: skip the interpreter's teardown, where torch's thread pools
    # have aborted a rank now and then ("terminate called without an active exception", exit code -6) after a
    # complete, correct run. Any error above still exits non-zero before this line.
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)
