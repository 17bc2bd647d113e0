"""Data-parallel training of scripts/train.py on CPU (gloo) under torchrun and accelerate launch.

Each launch runs two processes for a few steps on the embedded default; every rank dumps its adapter weights
(``--dump-rank-weights``). The ranks must have seen different data and ended with identical, trained weights,
and the runtime memory must never be a buffer (DDP broadcasts buffers from rank 0 on every forward).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_peft, random_ids

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train.py"
ACCELERATE_CONFIG = ROOT / "configs" / "accelerate_multi_cpu.yaml"
TIMEOUT_S = 120
SCRIPT_ARGS = [
    "--backbone-steps", "0",
    "--max_steps", "3",
    "--per_device_train_batch_size", "4",
    "--logging_steps", "1",
    "--disable_tqdm", "True",
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: list[str], tmp_path: Path) -> list[dict]:
    dump = tmp_path / "ranks"
    command = [sys.executable, "-m", *launcher, str(SCRIPT), *SCRIPT_ARGS]
    command += ["--output-dir", str(tmp_path / "out"), "--dump-rank-weights", str(dump)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    env.pop("WORLD_SIZE", None)
    try:
        done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{' '.join(command)} did not finish in {TIMEOUT_S} s:\n{err.stdout}\n{err.stderr}")
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    reports = [json.loads((dump / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, report in enumerate(reports):
        report["weights"] = load_file(dump / f"rank{rank}.safetensors")
    return reports


def check_ranks_agree(reports: list[dict]) -> None:
    first, second = reports
    for report in reports:
        assert report["world_size"] == 2 and report["parallel_mode"] == "ParallelMode.DISTRIBUTED"
        assert report["global_step"] == 3
        assert report["memory_written"]  # there was a memory to look for ...
        assert report["memory_buffers"] == []  # ... and no buffer holds it
        assert not any("delta_mem" in name for name in report["buffer_names"])
    assert first["first_batch_sha256"] != second["first_batch_sha256"]  # each rank saw its own shard
    assert first["adapter_sha256"] != first["initial_adapter_sha256"]  # trained
    assert first["adapter_sha256"] == second["adapter_sha256"]
    assert first["weights"].keys() == second["weights"].keys()
    for key, value in first["weights"].items():
        assert torch.equal(value, second["weights"][key]), key


def test_torchrun_two_cpu_processes_end_with_identical_adapters(tmp_path):
    launcher = ["torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    check_ranks_agree(launch(launcher, tmp_path))


def test_accelerate_launch_two_cpu_processes_end_with_identical_adapters(tmp_path):
    # `accelerate launch --cpu --num_processes 2` starts ONE process in accelerate 1.15 (several CPU processes
    # need mpirun); the config file makes accelerate spawn two through torchrun, which then run on CPU/gloo.
    launcher = [
        "accelerate.commands.launch",
        "--config_file", str(ACCELERATE_CONFIG),
        "--main_process_port", str(free_port()),
    ]  # fmt: skip
    check_ranks_agree(launch(launcher, tmp_path))


def test_memory_is_neither_a_buffer_nor_saved():
    model = make_peft()
    ids = random_ids(2, 7)
    mem = model.new_memory(batch_size=2)
    with torch.no_grad():
        model(input_ids=ids, memory=mem)
    assert not mem.is_empty
    memory = list(mem._states.values())
    pointers = {s.data_ptr() for s in memory}
    assert not any(b.data_ptr() in pointers for b in model.buffers())
    assert not any(p.data_ptr() in pointers for p in model.parameters())
    assert not any(t.data_ptr() in pointers for t in model.state_dict().values())
    assert all("delta_mem" not in name for name, _ in model.named_buffers())


FSDP_WORKER = ROOT / "tests" / "fsdp_worker.py"


@pytest.mark.parametrize("mode", ["fsdp2", "fsdp1"])
def test_sharded_training_on_two_cpu_processes_gives_the_single_process_gradients(mode, tmp_path):
    """FSDP2 (every Linear a unit) and FSDP1 with a per-Linear wrap train an episode on 2 gloo processes with the
    loss and gradients of one process on the whole batch."""
    import fsdp_worker

    out = tmp_path / "rank0.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(FSDP_WORKER), mode, str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, f"{mode} failed:\n{done.stderr[-6000:]}"
    result = torch.load(out)
    single = fsdp_worker.build()
    grads, loss = fsdp_worker.gradients(single, fsdp_worker.episode_batch())
    # each rank's mean loss over its half (same number of label tokens per row): their mean is the whole batch's
    assert abs(sum(result["losses"]) / 2 - loss) < 1e-5
    assert result["grads"].keys() == grads.keys() and len(grads) == 6  # write, gate bias, Δ heads of both layers
    for name, grad in grads.items():
        torch.testing.assert_close(result["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_the_call_record_is_no_container_that_sharding_wrappers_rebuild():
    """FSDP2 rebuilds dataclasses, dicts, lists and tuples holding tensors that need gradients in a unit's keywords
    (to hook its backward). The layers write their final states into the call record, so a rebuilt copy loses them:
    with decoder layers as FSDP2 units the episode loss was silently wrong (docs/training.md). The record must stay
    a plain object (checked by hand on 2 processes: the forward's loss then equals one process's)."""
    import dataclasses

    from peft_deltamem.runtime import CallRecord

    record = CallRecord(attention_mask=None, segment_ids=None, write_mask=None, writes=True)
    assert not dataclasses.is_dataclass(record)
    assert not isinstance(record, (dict, list, tuple))
    assert not hasattr(record, "__dict__")  # slots: no stray attribute can be set by mistake
