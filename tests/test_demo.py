"""The README's main job: the demo runs end to end and really recalls from memory."""

import torch

from peft_deltamem.demo import main


def test_demo_recalls_from_memory_and_survives_save_and_reload(tmp_path):
    threads = torch.get_num_threads()
    try:
        summary = main(["--output-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # the demo runs single-threaded; leave the other tests as they were
    assert summary["recall_with_memory"] >= 0.9
    assert summary["recall_empty_memory"] <= 0.3
    assert summary["answer"] == "teal"  # the fact written in the second turn of the demo conversation
    assert summary["reloaded_answer"] == summary["answer"]
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "session.safetensors"):
        assert (tmp_path / name).is_file(), name
