"""The decode/prefill matrix of scripts/bench_speed.py: its targets table says met or not for each cell."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import speed_matrix  # noqa: E402


def cell(prefill: float, decode: float, loop: float | None = None) -> dict:
    out = {
        "prefill": {"frozen_ms": 100.0, "delta_mem_ms": 100.0 * prefill, "ratio": prefill},
        "decode": {"frozen_ms": 10.0, "delta_mem_ms": 10.0 * decode, "ratio": decode},
    }
    if loop is not None:  # the hand-written loop (eager only)
        out["loop"] = {"frozen_ms": 12.0, "delta_mem_ms": 12.0 * loop, "ratio": loop}
    return out


def test_targets_table_marks_each_cell():
    matrix = {
        "lengths": speed_matrix.lengths(quick=False),
        "command": "python scripts/bench_speed.py --sections matrix",
        "machine": "test machine",
        "finished_at": "2026-01-01 00:00 UTC",
        "load_before_run": 0.5,
        "cells": [
            {
                "model": "reference",
                "threads": 2,
                "busy_core": False,
                "eager": cell(1.04, 1.05, loop=1.02),
                "compiled": cell(1.06, 1.02),
            },
            {"model": "smollm2", "threads": 2, "busy_core": True, "eager": cell(1.09, 1.11)},
        ],
    }
    lines = speed_matrix.render(matrix)
    rows = [line for line in lines if line.startswith("| reference |") or line.startswith("| smollm2 |")]
    # decode limit 1.03 on a quiet machine, for generate()'s step and for the hand-written loop
    assert "| reference | 2 | eager | 1.040× | yes | 1.050× | no | 1.020× | yes |" in rows
    assert "| reference | 2 | compiled | 1.060× | no | 1.020× | yes | — | — |" in rows  # prefill limit 1.05
    # 1.10 with the other core busy; a result without the loop rows (older files) renders a dash
    assert "| smollm2 | 2, busy | eager | 1.090× | yes | 1.110× | no | — | — |" in rows
    assert not any("| smollm2 | 2, busy | compiled" in row for row in rows)  # busy rows: eager only
    assert "| smollm2 | 2, other core busy | 1.090× | — | 1.110× | — | — | — | 10.00 / — ms |" in rows
    assert "| reference | 2 | 1.040× | 1.060× | 1.050× | 1.020× | 1.020× | — | 10.00 / 10.00 ms |" in rows


def test_gpu_table_renders_each_prompt_and_a_failed_cuda_graphs_cell():
    eager = {**cell(1.02, 1.04, loop=1.06), "generate": {"frozen_ms": 11.0, "delta_mem_ms": 11.55, "ratio": 1.05}}
    matrix = {
        "command": "python scripts/bench_speed.py --device cuda --sections matrix",
        "machine": "test GPU",
        "started_at": "2026-01-01 00:00",
        "finished_at": "2026-01-01 00:10 UTC",
        "rows": [
            {"prompt": 8192, "eager": eager, "cudagraphs": {"decode": cell(1.0, 1.01)["decode"]}},
            {"prompt": 32768, "eager": eager, "cudagraphs": {"error": "RuntimeError: graph capture failed"}},
        ],
    }
    lines = speed_matrix.render_gpu(matrix)
    assert "| 8192 | 1.020× | 1.040× | 1.060× | 1.050× | 1.010× | 10.00 / 10.00 ms |" in lines
    failed = "| 32768 | 1.020× | 1.040× | 1.060× | 1.050× | failed: RuntimeError: graph capture failed | 10.00 / — ms |"
    assert failed in lines
