"""scripts/bench_agents.py's clients: no turn repeats a session's first message, which the server (history
"follow") would take for a client resending the conversation, and fork there."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_agents  # noqa: E402


def test_no_turn_of_a_session_repeats_its_first_message():
    for session in range(32):
        messages = [bench_agents.message(session, turn) for turn in range(200)]
        assert len(set(messages)) == len(messages)


def test_configs_runs_only_the_servers_asked_for_and_refuses_unknown_names(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit):
        bench_agents.main(["--configs", "memory,bogus", "--out", str(tmp_path)])
    assert "--configs takes a comma-separated subset of memory,no-memory,full-history" in capsys.readouterr().err
    results = bench_agents.main(["--configs", "no-memory", "--sessions", "1", "--turns", "2", "--out", str(tmp_path)])
    assert list(results["configs"]) == ["no memory (same window)"]
    assert results["configs"]["no memory (same window)"]["turns"] == 2
