"""The README's main job: the demo runs end to end and really recalls from memory."""


def test_demo_recalls_from_memory_and_survives_save_and_reload(demo_output):
    out, summary = demo_output
    assert summary["recall_with_memory"] >= 0.9
    assert summary["recall_empty_memory"] <= 0.3
    assert summary["answer"] == "teal"  # the fact written in the second turn of the demo conversation
    assert summary["reloaded_answer"] == summary["answer"]
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "session.safetensors"):
        assert (out / name).is_file(), name
