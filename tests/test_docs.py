"""Code in the docs runs as written."""

import re
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def python_block(path: Path, heading: str) -> str:
    """The first ```python block after ``heading`` in a markdown file."""
    text = path.read_text()
    return re.search(r"```python\n(.*?)```", text[text.index(heading) :], re.S).group(1)


def test_training_md_trainer_example_runs_as_written(tmp_path, monkeypatch, one_thread):
    code = python_block(ROOT / "docs" / "training.md", "## The changes to an existing Trainer script")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "docs/training.md", "exec"), namespace)
    saved = load_file(tmp_path / "delta_mem_out" / "adapter_model.safetensors")
    assert saved and all("delta_mem_" in key for key in saved)
    assert namespace["trainer"].state.global_step == 4
    history = namespace["trainer"].state.log_history
    logged = [entry for entry in history if any(k.startswith("delta_mem/") for k in entry)]
    assert logged, "the memory-health callback logged nothing"  # the example shows what it logs
    trained = {n: p for n, p in namespace["model"].named_parameters() if p.requires_grad}
    assert any(p.abs().sum() > 0 for n, p in trained.items() if "delta_mem_out" in n)  # the Δ heads left zero
