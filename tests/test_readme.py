"""The README's quickstart runs as written (after the demo, as the README says) and shows memory at work."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs_as_written_and_the_memory_changes_the_answer(tmp_path, monkeypatch, demo_output):
    text = README.read_text()
    quickstart = text[text.index("## Quickstart") :]
    code = re.search(r"```python\n(.*?)```", quickstart, re.S).group(1)
    (tmp_path / "demo_output").symlink_to(demo_output[0])
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README quickstart", "exec"), namespace)
    tok = namespace["tok"]
    assert tok.decode(namespace["answer"][0, -1]) == "teal"  # recalled from memory
    assert tok.decode(namespace["no_memory"][0, -1]) != "teal"  # without the memory the fact is gone
    assert Path(namespace["path"]).is_file() and not (tmp_path / "session.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo_output"]  # the quickstart writes nothing here


def test_ci_checks_the_readme_tested_versions_against_a_fresh_install():
    """.ci/fresh_resolve.py fails CI when the README's 'Tested versions' states another version than a fresh
    install gets (here with a made-up fresh resolve; CI asks pip for the real one)."""
    import importlib.util

    path = README.parent / ".ci" / "fresh_resolve.py"
    spec = importlib.util.spec_from_file_location("fresh_resolve", path)
    fresh_resolve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh_resolve)
    text = README.read_text()
    stated = fresh_resolve.readme_versions(text)
    assert set(fresh_resolve.CHECKED) <= set(stated)
    assert fresh_resolve.readme_drift(text, dict(stated)) == []
    assert fresh_resolve.readme_drift(text, {**stated, "torch": stated["torch"] + "+cpu"}) == []  # a local build
    newer = {**stated, "accelerate": "9.9.9"}
    assert fresh_resolve.readme_drift(text, newer) == [
        f"  accelerate: the README says {stated['accelerate']}, a fresh install gets 9.9.9"
    ]
    without_trl = text.replace(f"trl {stated['trl']}", "trl")
    assert any("trl: the README does not state it" in line for line in fresh_resolve.readme_drift(without_trl, stated))
