"""The evaluation tools name their missing optional packages (the `eval` extra) before doing any work."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from benchmarks.extras import import_optional, require
from benchmarks.locomo import BM25TurnRetriever, LocomoTurn

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_bm25s(monkeypatch):
    monkeypatch.setitem(sys.modules, "bm25s", None)  # find_spec -> None, import -> ImportError


def test_require_names_every_missing_package_and_the_install_command(no_bm25s, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(
        ImportError, match=r"bm25s \(BM25 retrieval\), matplotlib .*pip install 'peft-deltamem\[eval\]'"
    ):
        require("json", "bm25s", "matplotlib")
    require("json")  # present: no error
    assert import_optional("json").dumps([1]) == "[1]"


def test_bm25_retriever_without_bm25s(no_bm25s):
    turn = LocomoTurn(speaker="A", dia_id="D1:1", text="hello", session=1, date_time="today")
    with pytest.raises(ImportError, match="bm25s"):
        BM25TurnRetriever([turn])


def test_bench_memory_stops_before_training_without_its_packages(no_bm25s, tmp_path, capsys):
    with pytest.raises(SystemExit):
        load_script("bench_memory").main(
            ["--smoke", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c")]
        )
    assert "pip install 'peft-deltamem[eval]'" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # nothing was trained or cached


def test_eval_locomo_rag_stops_before_loading_the_model(no_bm25s, capsys):
    with pytest.raises(SystemExit):
        load_script("eval_locomo").main(["--model", "/nonexistent/model", "--mode", "rag"])
    assert "bm25s" in capsys.readouterr().err
